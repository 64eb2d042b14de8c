"""A slide's tiling record, `results/tiles/{slide_id}.json`: what the tile job found and decided, read back by the
feature job and the run summary through `TilesRecord.from_json` (with a check of its schema version)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pathwsi.errors import PathwsiError
from pathwsi.runtime.outputs import write_json
from pathwsi.samples import Sample
from pathwsi.stain.macenko import StainFit

SCHEMA = "pathwsi.tiles/1"
TilingStatus = Literal["ok", "no_tissue", "failed"]


class TilesRecordError(PathwsiError):
    """A tiling record that cannot be read (missing, damaged, or written by another schema version)."""


@dataclass(frozen=True)
class LevelZeroMpp:
    """The slide's level-0 µm/px and where it came from (sheet, file property, TIFF tags)."""

    value: float
    source: str


@dataclass(frozen=True)
class TileGeometry:
    """Tile side in px at `mpp` µm/px (`um` µm), and the same side in level-0 pixels."""

    px: int
    mpp: float
    um: float
    level0_px: float


@dataclass(frozen=True)
class TileCounts:
    grid: int
    kept: int


@dataclass(frozen=True)
class TilesRecord:
    """Everything the tile job records for one slide; `status` ok, no_tissue (no tiles) or failed (`reason`)."""

    sample: Sample
    status: TilingStatus
    reason: str | None
    settings: dict[str, Any]  # the tiling, tissue and seed settings it ran with
    pathwsi_version: str
    seconds: float = 0.0
    slide: dict[str, Any] | None = None  # the file: vendor, size, levels (Slide.describe)
    mpp: LevelZeroMpp | None = None
    read: dict[str, Any] | None = None  # the pyramid level the tiles are read from
    tile: TileGeometry | None = None
    mask: dict[str, Any] | None = None  # the tissue mask's resolution, threshold and area
    counts: TileCounts | None = None  # None when the slide could not be read
    stain: StainFit | None = None
    source: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # the JSON it was read from

    @property
    def kept(self) -> int:
        """Tiles kept (0 when the slide could not be read)."""
        return self.counts.kept if self.counts is not None else 0

    @property
    def backend(self) -> str | None:
        """The library the tiling job opened the slide with: "openslide" in records made before backends existed
        (OpenSlide read every slide then; `auto` could now pick another library for the same file, e.g. an OME-TIFF);
        None when the slide never opened."""
        return self.slide.get("backend", "openslide") if self.slide else None

    def stain_json(self) -> dict[str, Any] | None:
        """The stain fit's record as stored. A record read from its file gives the stored values unchanged (hashes
        and store attrs are made from them): re-serialising a fit can move its 6th decimal."""
        if self.source is not None:
            return self.source.get("stain")
        return self.stain.to_json() if self.stain is not None else None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, in the file's layout."""
        record: dict[str, Any] = {
            "schema": SCHEMA,
            "pathwsi_version": self.pathwsi_version,
            "sample": asdict(self.sample),
            "settings": self.settings,
            "status": self.status,
            "reason": self.reason,
        }
        for name in ("slide", "mpp", "read", "tile", "mask", "counts"):
            value = getattr(self, name)
            if value is not None:
                record[name] = value if isinstance(value, dict) else asdict(value)
        stain = self.stain_json()
        if stain is not None:
            record["stain"] = stain
        record["seconds"] = self.seconds
        return record

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "tiling record") -> TilesRecord:
        """Inverse of `to_json`; a record of another schema version is refused, naming `source`."""
        if data.get("schema") != SCHEMA:
            raise TilesRecordError(
                f"{source}: schema {data.get('schema')!r}, this pathwsi reads {SCHEMA!r}; "
                "delete the slide's results/tiles/ files and rerun to tile it again"
            )
        try:
            return cls(
                sample=Sample(**data["sample"]),
                status=data["status"],
                reason=data.get("reason"),
                settings=data["settings"],
                pathwsi_version=data["pathwsi_version"],
                seconds=data.get("seconds", 0.0),
                slide=data.get("slide"),
                mpp=LevelZeroMpp(**data["mpp"]) if data.get("mpp") else None,
                read=data.get("read"),
                tile=TileGeometry(**data["tile"]) if data.get("tile") else None,
                mask=data.get("mask"),
                counts=TileCounts(**data["counts"]) if data.get("counts") else None,
                stain=StainFit.from_json(data["stain"]) if data.get("stain") else None,
                source=data,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise TilesRecordError(
                f"{source}: damaged ({type(err).__name__}: {err}); rerun the slide's tiling"
            ) from err

    def save(self, path: Path) -> None:
        write_json(self.to_json(), path)

    @classmethod
    def load(cls, path: Path) -> TilesRecord:
        """The record in `path`; a missing, unreadable or foreign file raises TilesRecordError naming it."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise TilesRecordError(f"{path}: cannot read the tiling record ({err}); rerun the slide's tiling") from err
        return cls.from_json(data, str(path))
