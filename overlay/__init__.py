"""Copy-on-write overlay over a read-only base image.

A VM runs from its backup while every write lands in an overlay directory, so the
backup is never modified. This package knows nothing of chunks or the store: the base
is anything with a `size` and a positional `read` (`BaseImage`). `overlay.disk` holds
the merged view (reads, writes, stable writes); `overlay.storage` the files and their
durability rules; `overlay.mapfile` and `overlay.mapstate` the map on disk and in memory;
`overlay.journal` the stable-write journal; `overlay.export` the merged view written out
as a sparse file; `overlay.stalls` how writes on an event loop back off from a slow
disk; `overlay.fileio` small file helpers.
"""

from overlay.disk import BaseImage, Overlay
from overlay.errors import OverlayClosed, OverlayCorrupt, OverlayError
from overlay.export import export_disk

__all__ = ["BaseImage", "Overlay", "OverlayClosed", "OverlayCorrupt", "OverlayError", "export_disk"]
