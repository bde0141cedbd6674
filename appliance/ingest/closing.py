"""Context-manager plumbing shared by the disk readers."""

from __future__ import annotations

import os
from typing import Self


class ClosedOnExit:
    """`with reader:` closes the reader, whatever it holds."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class OwnsFd(ClosedOnExit):
    """A reader over one file descriptor it owns; closing twice is harmless."""

    _fd: int

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
