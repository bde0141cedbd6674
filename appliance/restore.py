"""Full restore of a disk to a local file.

The output is sparse (zero chunks become holes) and appears only when complete: it is
written under a temporary name, fsynced and renamed, so an integrity error or a crash
never leaves a plausible-looking but wrong disk image behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from appliance.errors import ApplianceError, UsageError
from appliance.store.catalog import RestorePoint
from appliance.store.formats import ZERO_CHUNK_ID
from appliance.store.reader import ReadPath
from appliance.store.repository import Store


def restore_disk(
    store: Store,
    point: RestorePoint,
    disk: int,
    output: Path,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    if output.exists() and not overwrite:
        raise UsageError(f"{output} already exists (use --force to overwrite)")
    temp = output.with_name(f".{output.name}.partial")
    with store.reader_lock(), ReadPath(store) as read_path:
        reader = read_path.disk(point, disk)
        chunk_size = store.config.chunk_size
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ApplianceError(f"cannot create {temp}: {exc.strerror}") from None
        try:
            for index, offset in enumerate(range(0, reader.size, chunk_size)):
                data = reader.read(offset, chunk_size)
                if reader.chunk_id_at(index) != ZERO_CHUNK_ID:
                    os.pwrite(fd, data, offset)
                if progress is not None:
                    progress(offset + len(data), reader.size)
            os.ftruncate(fd, reader.size)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(temp, output)
