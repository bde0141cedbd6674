"""A session disk's merged view written out as a plain sparse file (`appliance session export`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from overlay.disk import Overlay
from overlay.fileio import fsync_dir, pwrite_all

#: Bytes read from the overlay at a time (whole blocks).
EXPORT_STEP = 1 << 20


def export_disk(overlay: Overlay, path: Path) -> None:
    """Write the merged disk to a new sparse file at `path`, atomically; never over an existing one.

    All-zero blocks become holes. The file appears complete or not at all: it is written
    under a temporary name and linked to `path`, which fails if anything is there (a
    rename would silently replace it). The export is not a snapshot: writes that race
    with it may or may not be in it, so callers export a quiesced disk.

    Raises OverlayError when the overlay cannot be read, and OSError (FileExistsError
    included) when the output cannot be created: the two are different people's problems.
    """
    block = overlay.block_size
    step = block * max(1, EXPORT_STEP // block)
    zeros = bytes(block)
    size = overlay.size
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            for offset in range(0, size, step):
                chunk = overlay.read(offset, step)
                for at in range(0, len(chunk), block):
                    piece = chunk[at : at + block]
                    if piece != zeros[: len(piece)]:
                        pwrite_all(fd, piece, offset + at)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(name, path)
    finally:
        Path(name).unlink(missing_ok=True)
    fsync_dir(path.parent)
