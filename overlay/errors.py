"""The overlay's exceptions.

The overlay is a leaf package that knows nothing of the appliance, so it has its own
small hierarchy; protocol adapters map `OverlayError` to EIO. Every message names the
overlay directory (and the offset, where one is involved) so a log line alone says
which session disk failed and where.
"""

from __future__ import annotations


class OverlayError(Exception):
    """An overlay cannot be created, opened, read or written."""


class OverlayCorrupt(OverlayError):
    """The map file is not a sound overlay map (magic, version, checksum or entries)."""


class OverlayClosed(OverlayError):
    """A change reached an overlay that is closing or closed: the caller may retry on a new one."""
