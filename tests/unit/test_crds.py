"""The NdviJob CRD schema, the contract's NdviJobRequest and the sample agree (no I/O beyond reading files)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from eventflow.contract import BandFileInputs, BandRef, MultibandInputs, NdviJobRequest, OutputOptions, QaInput, Sensor

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "charts/eventflow/templates/crds"


def crd_schema(name: str) -> dict[str, Any]:
    """The v1alpha1 schema of a chart CRD template (template lines dropped: they only wrap and label it)."""
    text = "\n".join(line for line in (CRDS / name).read_text().splitlines() if "{{" not in line)
    doc = yaml.safe_load(text)
    [version] = doc["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def fields(*models: type[BaseModel]) -> set[str]:
    return {name for model in models for name in model.model_fields}


def literal(model: type[BaseModel], field: str) -> list[str]:
    return list(typing.get_args(model.model_fields[field].annotation))


def test_ndvijob_spec_has_exactly_the_request_fields_and_enums() -> None:
    spec = crd_schema("ndvijobs.yaml")["properties"]["spec"]
    props = spec["properties"]
    assert set(props) == fields(NdviJobRequest)
    assert set(props["inputs"]["properties"]) == fields(MultibandInputs, BandFileInputs)
    assert set(props["inputs"]["properties"]["red"]["properties"]) == fields(BandRef)
    assert set(props["output"]["properties"]) == fields(OutputOptions)
    assert set(props["qa"]["properties"]) == fields(QaInput)
    assert props["sensor"]["enum"] == [s.value for s in Sensor]
    assert props["output"]["properties"]["format"]["enum"] == literal(OutputOptions, "format")
    assert props["output"]["properties"]["compress"]["enum"] == literal(OutputOptions, "compress")
    assert props["qa"]["properties"]["kind"]["enum"] == literal(QaInput, "kind")
    assert props["resample"]["enum"] == literal(NdviJobRequest, "resample")
    assert [r["rule"] for r in spec["x-kubernetes-validations"]] == ["self == oldSelf"]  # immutable


def test_ndvijob_sample_is_a_valid_request() -> None:
    sample = yaml.safe_load((REPO / "k8s/ndvijob-sample.yaml").read_text())
    request = NdviJobRequest.model_validate(sample["spec"])
    assert request.normalized()["output"]["format"] == "COG"


def test_status_phases_are_the_operators() -> None:
    ndvijob = pytest.importorskip("eventflow_operator.ndvijob", reason="the operator extra (kopf) is not installed")
    replay = pytest.importorskip("eventflow_operator.replay")
    phases = crd_schema("ndvijobs.yaml")["properties"]["status"]["properties"]["phase"]["enum"]
    assert set(phases) == {"Pending", *ndvijob.PHASES.values()}  # Pending: not submitted yet
    replay_phases = crd_schema("dlqreplays.yaml")["properties"]["status"]["properties"]["phase"]["enum"]
    assert set(replay_phases) == {"Pending", "Running", *replay.FINISHED_PHASES}
