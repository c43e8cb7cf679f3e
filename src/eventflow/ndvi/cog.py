"""Cloud Optimized GeoTIFF: write one with GDAL's COG driver and check the IFD layout of a file.

The checks follow GDAL's ``validate_cloud_optimized_geotiff.py`` (not shipped with rasterio): the file
is tiled, has internal reduced-resolution IFDs (overviews) when larger than one tile, all IFDs come
before the image data in increasing order (main image first), the tile data of the smallest overview
comes first and the full-resolution data last, and the GDAL ghost header declares
``LAYOUT=IFDS_BEFORE_DATA``. The TIFF structure is read directly from the bytes, not through GDAL.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import rasterio
import rasterio.shutil

Codec = Literal["deflate", "zstd"]

#: Tile size of the output (also the COG driver's BLOCKSIZE).
COG_BLOCKSIZE = 512

_TAG_WIDTH, _TAG_HEIGHT, _TAG_SUBFILE = 256, 257, 254
_TAG_TILE_WIDTH, _TAG_TILE_HEIGHT, _TAG_TILE_OFFSETS = 322, 323, 324
# TIFF field type -> (struct code, size in bytes) for the integer types these tags use.
_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}


def cog_options(compress: Codec, level: int | None, num_threads: str) -> dict[str, Any]:
    """Return the COG driver creation options used for the NDVI output."""
    options: dict[str, Any] = {
        "BLOCKSIZE": COG_BLOCKSIZE,
        "COMPRESS": compress.upper(),
        # PREDICTOR=YES picks the floating-point predictor (3) for float32 data.
        "PREDICTOR": "YES",
        "OVERVIEW_RESAMPLING": "AVERAGE",
        "NUM_THREADS": num_threads,
        "BIGTIFF": "IF_SAFER",
    }
    if level is not None:
        options["LEVEL"] = level
    return options


def write_cog(source: Path, target: Path, compress: Codec, level: int | None, num_threads: str) -> None:
    """Copy the tiled GeoTIFF ``source`` to a COG at ``target`` (metadata and band descriptions are copied)."""
    rasterio.shutil.copy(str(source), str(target), driver="COG", **cog_options(compress, level, num_threads))


@dataclass(frozen=True, slots=True)
class TiffLevel:
    """One image IFD of a TIFF file: its place in the file and its size."""

    ifd_offset: int
    width: int
    height: int
    tile_width: int | None
    tile_height: int | None
    #: Offset of the first tile's data; None when the image has no data tiles.
    first_data_offset: int | None
    #: NewSubfileType: 0 full resolution, 1 reduced resolution (overview), 4/5 masks.
    subfile_type: int


@dataclass(frozen=True, slots=True)
class TiffLayout:
    """The IFD chain of a TIFF file and its GDAL ghost header, if any."""

    bigtiff: bool
    levels: tuple[TiffLevel, ...]
    #: Key=value pairs of GDAL's structural metadata ghost header (empty when there is none).
    ghost: dict[str, str]

    @property
    def overviews(self) -> tuple[TiffLevel, ...]:
        """The reduced-resolution (overview) image IFDs, excluding masks."""
        return tuple(level for level in self.levels if level.subfile_type == 1)


def _values(handle: BinaryIO, order: str, type_: int, count: int, inline: bytes, inline_size: int) -> list[int]:
    code, size = _TYPES[type_]
    raw = inline[: size * count] if size * count <= inline_size else None
    if raw is None:
        (offset,) = struct.unpack(order + ("Q" if inline_size == 8 else "I"), inline)
        handle.seek(offset)
        raw = handle.read(size * count)
    return list(struct.unpack(f"{order}{count}{code}", raw))


def read_tiff_layout(path: str | Path) -> TiffLayout:
    """Parse the header, ghost header and IFD chain of a classic TIFF or BigTIFF file."""
    with open(path, "rb") as handle:
        header = handle.read(16)
        order = {b"II": "<", b"MM": ">"}.get(header[:2])
        if order is None:
            raise ValueError(f"{path} is not a TIFF file")
        (magic,) = struct.unpack(order + "H", header[2:4])
        bigtiff = magic == 43
        if magic not in (42, 43):
            raise ValueError(f"{path} is not a TIFF file (magic {magic})")
        if bigtiff:
            (next_ifd,) = struct.unpack(order + "Q", header[8:16])
            ghost_at, count_fmt, entry_size, inline_size, next_fmt = 16, "Q", 20, 8, "Q"
        else:
            (next_ifd,) = struct.unpack(order + "I", header[4:8])
            ghost_at, count_fmt, entry_size, inline_size, next_fmt = 8, "H", 12, 4, "I"
        handle.seek(ghost_at)
        ghost_text = handle.read(1024).decode("latin-1")
        ghost: dict[str, str] = {}
        match = re.match(r"GDAL_STRUCTURAL_METADATA_SIZE=(\d+) bytes\n", ghost_text)
        if match:
            body = ghost_text[match.end() : match.end() + int(match.group(1))]
            ghost = dict(line.split("=", 1) for line in body.splitlines() if "=" in line)
        levels: list[TiffLevel] = []
        seen: set[int] = set()
        while next_ifd and next_ifd not in seen:
            seen.add(next_ifd)
            handle.seek(next_ifd)
            count_size = struct.calcsize(count_fmt)
            (count,) = struct.unpack(order + count_fmt, handle.read(count_size))
            entries = handle.read(entry_size * count)
            (following,) = struct.unpack(order + next_fmt, handle.read(struct.calcsize(next_fmt)))
            tags: dict[int, list[int]] = {}
            for index in range(count):
                entry = entries[index * entry_size : (index + 1) * entry_size]
                tag, type_ = struct.unpack(order + "HH", entry[:4])
                if tag not in (_TAG_WIDTH, _TAG_HEIGHT, _TAG_SUBFILE, _TAG_TILE_WIDTH, _TAG_TILE_HEIGHT,
                               _TAG_TILE_OFFSETS) or type_ not in _TYPES:  # fmt: skip
                    continue
                (value_count,) = struct.unpack(order + ("Q" if bigtiff else "I"), entry[4 : 4 + inline_size])
                position = handle.tell()
                tags[tag] = _values(handle, order, type_, value_count, entry[4 + inline_size :], inline_size)
                handle.seek(position)
            offsets = [offset for offset in tags.get(_TAG_TILE_OFFSETS, []) if offset]
            levels.append(
                TiffLevel(
                    ifd_offset=next_ifd,
                    width=tags[_TAG_WIDTH][0],
                    height=tags[_TAG_HEIGHT][0],
                    tile_width=tags[_TAG_TILE_WIDTH][0] if _TAG_TILE_WIDTH in tags else None,
                    tile_height=tags[_TAG_TILE_HEIGHT][0] if _TAG_TILE_HEIGHT in tags else None,
                    first_data_offset=min(offsets) if offsets else None,
                    subfile_type=tags.get(_TAG_SUBFILE, [0])[0],
                )
            )
            next_ifd = following
    return TiffLayout(bigtiff=bigtiff, levels=tuple(levels), ghost=ghost)


def cog_errors(path: str | Path, blocksize: int = COG_BLOCKSIZE) -> list[str]:
    """Return the reasons ``path`` is not a Cloud Optimized GeoTIFF with ``blocksize`` tiles (empty if it is)."""
    layout = read_tiff_layout(path)
    errors: list[str] = []
    images = [level for level in layout.levels if level.subfile_type in (0, 1)]
    if not images or images[0].subfile_type != 0:
        return ["the first IFD is not the full-resolution image"]
    main = images[0]
    if layout.ghost.get("LAYOUT") != "IFDS_BEFORE_DATA":
        errors.append("no GDAL ghost header with LAYOUT=IFDS_BEFORE_DATA")
    for level in images:
        if (level.tile_width, level.tile_height) != (blocksize, blocksize):
            errors.append(f"{level.width}x{level.height} image is not tiled {blocksize}x{blocksize}")
    overviews = [level for level in images if level.subfile_type == 1]
    if max(main.width, main.height) > blocksize and not overviews:
        errors.append("no internal overviews although the image is larger than one tile")
    previous = main
    for overview in overviews:
        if overview.width >= previous.width and overview.height >= previous.height:
            errors.append("overviews are not in decreasing size order")
        previous = overview
    ifd_offsets = [level.ifd_offset for level in layout.levels]
    if ifd_offsets != sorted(ifd_offsets):
        errors.append("IFDs are not in increasing file order")
    data_offsets = [level.first_data_offset for level in images if level.first_data_offset is not None]
    if data_offsets and min(data_offsets) < max(ifd_offsets):
        errors.append("image data starts before the last IFD")
    if data_offsets != sorted(data_offsets, reverse=True):
        errors.append("tile data is not ordered from the smallest overview to the full-resolution image")
    return errors


def open_profile(path: str | Path) -> dict[str, Any]:
    """Return what GDAL reports about a written file's structure (handy in tests and the bench)."""
    with rasterio.open(path) as src:
        return {
            "image_structure": src.tags(ns="IMAGE_STRUCTURE"),
            "overviews": src.overviews(1),
            "block_shapes": src.block_shapes,
            "descriptions": src.descriptions,
        }
