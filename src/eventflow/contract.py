"""The stream contract: edge models for requests, stream entries, lifecycle events and DLQ records.

Versioned by ``SCHEMA_VERSION``; docs/contract.md mirrors this module. A stream entry whose version is
unknown or whose payload does not validate raises :class:`PoisonMessage` (dead-lettered, never a crash).
"""

from __future__ import annotations

import json
import math
import os
import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from eventflow.errors import PoisonMessage
from eventflow.hashing import request_hash

#: Version of the stream entry layout. Bump it when a field's meaning changes; consumers refuse others.
SCHEMA_VERSION = 1
#: Schema versions this code can decode.
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

MAX_HREF_CHARS = 2048
MAX_FIELD_FEATURES = 1000
MAX_GEOJSON_BYTES = 1_000_000

FarmId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Tenant-local farm id.")]
Href = Annotated[str, Field(min_length=1, max_length=MAX_HREF_CHARS, description="file://, https:// or s3:// URI.")]


def _number_not_text(value: Any) -> Any:
    """Refuse JSON true/false and numeric strings where a number is expected (pydantic's lax mode would
    read `true` as 1 and `"7"` as 7); 3 and 3.0 stay the same request."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


BandNumber = Annotated[int, BeforeValidator(_number_not_text), Field(ge=1, le=1000, description="1-based band index.")]
Priority = Annotated[int, BeforeValidator(_number_not_text)]
#: A JSON number (int or float), never a string or boolean.
Number = Annotated[float, BeforeValidator(_number_not_text)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sensor(StrEnum):
    """Sensor presets that fill band numbers and reflectance scale/offset."""

    sentinel2 = "sentinel2"  #: Sentinel-2 MSI: B04 red, B08 NIR, DN / 10000
    landsat8 = "landsat8"  #: Landsat 8 OLI, Collection 2 L2: B4/B5, DN * 2.75e-5 - 0.2
    landsat9 = "landsat9"  #: Landsat 9 OLI-2, as Landsat 8
    landsat7 = "landsat7"  #: Landsat 7 ETM+, Collection 2 L2: B3/B4
    landsat5 = "landsat5"  #: Landsat 4-5 TM, Collection 2 L2: B3/B4
    planetscope4 = "planetscope4"  #: PlanetScope 4-band analytic: 3/4, DN / 10000
    naip = "naip"  #: NAIP RGBN: 1/4, DN as is
    modis = "modis"  #: MODIS surface reflectance: b01/b02, DN / 10000


#: Reflectance offset of Sentinel-2 products from processing baseline 04.00 on: -1000 DN at scale 1e-4.
S2_BASELINE_OFFSET = -0.1

#: (red band, NIR band, scale, offset) per sensor, for one multiband file laid out in band order.
#: Sentinel-2's offset is not a constant (see S2_BASELINE_OFFSET and NdviJobRequest.processing_baseline).
SENSOR_PRESETS: dict[Sensor, tuple[int, int, float, float]] = {
    Sensor.sentinel2: (4, 8, 1e-4, 0.0),
    Sensor.landsat8: (4, 5, 2.75e-5, -0.2),
    Sensor.landsat9: (4, 5, 2.75e-5, -0.2),
    Sensor.landsat7: (3, 4, 2.75e-5, -0.2),
    Sensor.landsat5: (3, 4, 2.75e-5, -0.2),
    Sensor.planetscope4: (3, 4, 1e-4, 0.0),
    Sensor.naip: (1, 4, 1.0, 0.0),
    Sensor.modis: (1, 2, 1e-4, 0.0),
}


class BandRef(_Strict):
    """One band of one raster."""

    href: Href
    band: BandNumber = 1


class MultibandInputs(_Strict):
    """Red and NIR from one multiband raster."""

    href: Href
    red_band: BandNumber | None = None
    nir_band: BandNumber | None = None


class BandFileInputs(_Strict):
    """Red and NIR from one raster each."""

    red: BandRef
    nir: BandRef


class OutputOptions(_Strict):
    """What to produce: the NDVI Cloud Optimized GeoTIFF, and optionally previews."""

    format: Literal["COG"] = "COG"
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = "ndvi"
    compress: Literal["zstd", "deflate"] = "zstd"
    previews: bool = Field(default=False, description="Also write PNG previews (absolute and p2-p98 stretch).")
    all_touched: bool = Field(default=False, description="Per-field rule: every touched pixel, not pixel centres.")
    vegetation_threshold: Number = Field(default=0.3, ge=-1, le=1, description="NDVI counted as vegetation.")


class QaInput(_Strict):
    """A quality band whose rejected classes mask pixels (counted separately from nodata)."""

    href: Href
    band: BandNumber = 1
    kind: Literal["scl", "qa_pixel", "fmask"]


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class NdviJobRequest(_Strict):
    """The NDVI job request: the HTTP body of ``POST /v1/ndvi/jobs`` and the NdviJob spec."""

    farm_id: FarmId
    inputs: MultibandInputs | BandFileInputs
    sensor: Sensor | None = None
    scale: Number | None = Field(default=None, description="Reflectance = DN * scale + offset.")
    offset: Number | None = Field(default=None, description="Additive offset applied after scale.")
    processing_baseline: str | None = Field(
        default=None, pattern=r"^\d{2}\.\d{2}$",
        description="Sentinel-2 processing baseline (e.g. 05.10, from the product name's N0510): from 04.00 "
        "on, DN carry a +1000 offset, so reflectance = (DN - 1000) / 10000. Without it the file's declared "
        "offset or baseline tag is used, else no offset (with a warning in the result).")
    nodata: Number | None = Field(default=None, description="Input nodata override.")
    fields: dict[str, Any] | None = Field(default=None, description="GeoJSON FeatureCollection.")
    output: OutputOptions | None = None
    priority: Priority | None = Field(default=None, ge=0, le=9, description="0 (low) to 9 (high).")
    qa: QaInput | None = None
    resample: Literal["none", "nearest", "bilinear"] = Field(
        default="none", description="Red and NIR on different grids: refuse (none) or warp NIR onto red.")

    _check_finite = field_validator("scale", "offset", "nodata")(_finite)

    @field_validator("fields")
    @classmethod
    def _geojson(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if value.get("type") != "FeatureCollection":
            raise ValueError("must be a GeoJSON FeatureCollection")
        features = value.get("features")
        if not isinstance(features, list):
            raise ValueError("features must be a list")
        if len(features) > MAX_FIELD_FEATURES:
            raise ValueError(f"at most {MAX_FIELD_FEATURES} features")
        try:
            # NaN / Infinity literals (which Python's JSON parser accepts) are not JSON and no coordinate.
            size = len(json.dumps(value, allow_nan=False))
        except ValueError:
            raise ValueError("GeoJSON must not contain NaN or Infinity") from None
        if size > MAX_GEOJSON_BYTES:
            raise ValueError(f"GeoJSON larger than {MAX_GEOJSON_BYTES} bytes")
        for i, feature in enumerate(features):
            if not isinstance(feature, dict) or feature.get("type") != "Feature":
                raise ValueError(f"features[{i}] is not a GeoJSON Feature")
            geometry = feature.get("geometry")
            if not isinstance(geometry, dict) or geometry.get("type") not in {"Polygon", "MultiPolygon"}:
                raise ValueError(f"features[{i}].geometry must be a Polygon or MultiPolygon")
        return value

    @model_validator(mode="after")
    def _baseline_is_sentinel2(self) -> NdviJobRequest:
        if self.processing_baseline is not None and self.sensor is not Sensor.sentinel2:
            raise ValueError("processing_baseline applies only to sensor sentinel2")
        return self

    @model_validator(mode="after")
    def _bands_known(self) -> NdviJobRequest:
        if isinstance(self.inputs, MultibandInputs) and self.sensor is None:
            if self.inputs.red_band is None or self.inputs.nir_band is None:
                raise ValueError("inputs.red_band and inputs.nir_band are required without a sensor preset")
        return self

    def normalized(self) -> dict[str, Any]:
        """The request with sensor presets applied and defaults dropped: what is hashed and executed."""
        data = self.model_dump(mode="json", exclude_none=True)
        # Spelled-out defaults and omitted ones are the same request, so they hash alike.
        data["output"] = (self.output or OutputOptions()).model_dump(mode="json")
        if self.sensor is not None:
            red, nir, scale, offset = SENSOR_PRESETS[self.sensor]
            if "href" in data["inputs"]:
                data["inputs"].setdefault("red_band", red)
                data["inputs"].setdefault("nir_band", nir)
            data.setdefault("scale", scale)
            if self.sensor is Sensor.sentinel2:
                # The offset depends on the processing baseline, not on the sensor: known from the request,
                # else left to the engine (file-declared offset or baseline tag), never a guessed constant.
                if self.processing_baseline is not None and "offset" not in data:
                    data["offset"] = S2_BASELINE_OFFSET if self.processing_baseline >= "04.00" else 0.0
            else:
                data.setdefault("offset", offset)
        return data

    def hrefs(self) -> list[tuple[str, str]]:
        """(field path, href) for every input location, so admission can vet each one."""
        qa = [("qa.href", self.qa.href)] if self.qa else []
        if isinstance(self.inputs, MultibandInputs):
            return [("inputs.href", self.inputs.href), *qa]
        return [("inputs.red.href", self.inputs.red.href), ("inputs.nir.href", self.inputs.nir.href), *qa]

    def hash_for(self, tenant: str) -> str:
        """The tenant-scoped deterministic request hash."""
        return request_hash(tenant, self.normalized())


class JobType(StrEnum):
    """Job types the consumer's handler registry knows."""

    ndvi = "ndvi"  #: compute NDVI from red and NIR bands


class StreamEntry(BaseModel):
    """One job on the job stream. Stored as flat string fields; ``payload`` is JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    job_type: JobType = JobType.ndvi
    job_id: str
    request_hash: str
    tenant: str
    enqueued_at_ms: int
    trace_id: str
    payload: dict[str, Any]

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for XADD."""
        return {
            "v": str(self.schema_version),
            "type": self.job_type.value,
            "job_id": self.job_id,
            "request_hash": self.request_hash,
            "tenant": self.tenant,
            "enqueued_at_ms": str(self.enqueued_at_ms),
            "trace_id": self.trace_id,
            "payload": json.dumps(self.payload, separators=(",", ":"), sort_keys=True),
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> StreamEntry:
        """Decode an entry read from the stream; raises :class:`PoisonMessage` on anything off."""
        version = fields.get("v")
        if version is None or not version.isdigit() or int(version) not in SUPPORTED_SCHEMA_VERSIONS:
            raise PoisonMessage(f"unknown schema version {version!r}")
        try:
            payload = json.loads(fields["payload"])
            entry = cls(
                schema_version=int(version),
                job_type=fields["type"],
                job_id=fields["job_id"],
                request_hash=fields["request_hash"],
                tenant=fields["tenant"],
                enqueued_at_ms=int(fields["enqueued_at_ms"]),
                trace_id=fields.get("trace_id", ""),
                payload=payload,
            )
            if entry.job_type is JobType.ndvi:
                NdviJobRequest.model_validate(entry.payload)
        except (KeyError, ValueError, TypeError, ValidationError) as exc:
            raise PoisonMessage(f"invalid entry: {_short(exc)}") from exc
        return entry

    def request(self) -> NdviJobRequest:
        """The validated NDVI request carried by this entry."""
        return NdviJobRequest.model_validate(self.payload)


class JobState(StrEnum):
    """States of a job in its state hash."""

    queued = "queued"  #: accepted, on the stream, not yet started
    running = "running"  #: a consumer holds the lease and is executing
    retrying = "retrying"  #: the last attempt failed transiently; it will be delivered again
    succeeded = "succeeded"  #: a result is committed
    failed = "failed"  #: failed permanently (also dead-lettered)
    dead_lettered = "dead_lettered"  #: moved to the dead-letter stream
    cancelled = "cancelled"  #: cancelled by a client before it finished

    @property
    def terminal(self) -> bool:
        """True for states a job never leaves."""
        return self in {JobState.succeeded, JobState.failed, JobState.dead_lettered, JobState.cancelled}


class EventType(StrEnum):
    """Lifecycle event types on the event stream."""

    queued = "queued"  #: the job was accepted
    started = "started"  #: a consumer took the lease and began executing
    progress = "progress"  #: fraction of work done
    succeeded = "succeeded"  #: the result was committed
    failed = "failed"  #: an attempt failed
    retrying = "retrying"  #: the job will be retried
    dead_lettered = "dead_lettered"  #: the job was moved to the dead-letter stream
    cancelled = "cancelled"  #: the job was cancelled


class LifecycleEvent(BaseModel):
    """One lifecycle event (also the shape of the event stream's fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: EventType
    job_id: str
    request_hash: str = ""
    at_ms: int = Field(default_factory=lambda: now_ms())
    attempt: int = 0
    entry_id: str = ""
    consumer: str = ""
    progress: float | None = None
    message: str = ""
    trace_id: str = ""

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for XADD."""
        data = self.model_dump(mode="json")
        return {k: ("" if v is None else str(v)) for k, v in data.items()}


class DeadLetterEntry(BaseModel):
    """One record on the dead-letter stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    original_entry_id: str
    delivery_count: int
    failure_class: str
    failure_message: str
    payload: str = Field(description="The original entry's fields as JSON.")
    first_failure_ms: int | None = None
    last_failure_ms: int | None = None
    dead_lettered_at_ms: int
    job_id: str = ""
    request_hash: str = ""
    replay_generation: int = 0

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> DeadLetterEntry:
        """Decode a DLQ stream record."""
        def opt_int(name: str) -> int | None:
            value = fields.get(name, "")
            return int(value) if value else None

        return cls(
            original_entry_id=fields["original_entry_id"],
            delivery_count=int(fields.get("delivery_count", "0")),
            failure_class=fields.get("failure_class", ""),
            failure_message=fields.get("failure_message", ""),
            payload=fields.get("payload", "{}"),
            first_failure_ms=opt_int("first_failure_ms"),
            last_failure_ms=opt_int("last_failure_ms"),
            dead_lettered_at_ms=int(fields.get("dead_lettered_at_ms", "0")),
            job_id=fields.get("job_id", ""),
            request_hash=fields.get("request_hash", ""),
            replay_generation=int(fields.get("replay_generation", "0") or 0),
        )


class SubmitResponse(BaseModel):
    """Answer to ``POST /v1/ndvi/jobs``."""

    job_id: str
    request_hash: str
    status: JobState
    duplicate: bool


class JobView(BaseModel):
    """Answer to ``GET /v1/ndvi/jobs/{job_id}``."""

    job_id: str
    request_hash: str
    tenant: str
    state: JobState
    attempts: int
    created_at_ms: int
    updated_at_ms: int
    progress: float
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @classmethod
    def from_hash(cls, job_id: str, data: dict[str, str], result: str | None) -> JobView:
        """Build the view from the job state hash and the committed result, if any."""
        error = None
        if data.get("error_class"):
            error = {"class": data["error_class"], "message": data.get("error_message", "")}
        return cls(
            job_id=job_id,
            request_hash=data.get("request_hash", ""),
            tenant=data.get("tenant", ""),
            state=JobState(data.get("state", "queued")),
            attempts=int(data.get("attempts", "0") or 0),
            created_at_ms=int(data.get("created_at_ms", "0") or 0),
            updated_at_ms=int(data.get("updated_at_ms", "0") or 0),
            progress=float(data.get("progress", "0") or 0),
            result=json.loads(result) if result else None,
            error=error,
        )


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def new_job_id() -> str:
    """A fresh job id: sortable by time (ms prefix) and unique (random suffix)."""
    # 48 random bits, as the first 12 hex digits of a uuid4 were, without building a UUID per request.
    return f"j{now_ms():013x}{os.urandom(6).hex()}"


def new_trace_id() -> str:
    """A W3C-compatible 32-hex trace id."""
    return os.urandom(16).hex()


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text[:300]
