"""Copy-on-write overlay over a read-only base image.

A VM runs from its backup while every write lands in an overlay directory, so the
backup is never modified. This package knows nothing of chunks or the store: the base
is anything with a `size` and a positional `read` (`BaseImage`). `overlay.disk` holds
the merged view and its durability rules, `overlay.mapfile` the on-disk format.
"""

from overlay.disk import BaseImage, Overlay
from overlay.errors import OverlayClosed, OverlayCorrupt, OverlayError

__all__ = ["BaseImage", "Overlay", "OverlayClosed", "OverlayCorrupt", "OverlayError"]
