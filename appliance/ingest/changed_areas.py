"""Changed-areas files: which byte ranges of a disk changed since the parent point.

The shape is what vSphere's QueryChangedDiskAreas returns, serialised as JSON:
``{"changedArea": [{"start": BYTES, "length": BYTES}, ...]}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from appliance.errors import ChangedAreasError


def load_changed_areas(path: Path, disk_size: int) -> list[tuple[int, int]]:
    """Validated (start, length) ranges, sorted; every range lies inside the disk."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ChangedAreasError(f"cannot read changed-areas file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ChangedAreasError(f"changed-areas file {path} is not valid JSON: {exc}") from None
    areas = doc.get("changedArea") if isinstance(doc, dict) else None
    if not isinstance(areas, list):
        raise ChangedAreasError(f"changed-areas file {path} has no 'changedArea' list")
    ranges = []
    for number, area in enumerate(areas):
        start = area.get("start") if isinstance(area, dict) else None
        length = area.get("length") if isinstance(area, dict) else None
        if type(start) is not int or type(length) is not int or start < 0 or length < 0:
            raise ChangedAreasError(
                f"changed-areas file {path}, entry {number}: 'start' and 'length' must be non-negative integers"
            )
        if start + length > disk_size:
            raise ChangedAreasError(
                f"changed-areas file {path}, entry {number}: range {start}+{length} ends past the "
                f"end of the disk ({disk_size} bytes)"
            )
        if length:
            ranges.append((start, length))
    return sorted(ranges)


def chunks_touched(ranges: list[tuple[int, int]], chunk_size: int) -> set[int]:
    """Indices of the chunks that any range overlaps."""
    touched: set[int] = set()
    for start, length in ranges:
        touched.update(range(start // chunk_size, (start + length - 1) // chunk_size + 1))
    return touched
