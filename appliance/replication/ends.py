"""The two ends of a replication, whichever side of the network each is on.

A push reads from this store (`LocalSource`) and writes to another appliance
(`RemoteAppliance`); a pull reads from another appliance and writes here
(`LocalTarget`). One algorithm (`appliance.replication.run`) drives both through these
interfaces, so push and pull cannot drift apart.
"""

from __future__ import annotations

from typing import Protocol

from appliance.replication.wire import StoreIdentity
from appliance.store.catalog import RestorePoint
from appliance.store.manifests import Manifest


class SourceEnd(Protocol):
    """Where restore points come from."""

    def identity(self) -> StoreIdentity: ...

    def points(self, vms: list[str] | None) -> list[RestorePoint]: ...

    def manifest(self, point_id: str) -> Manifest: ...

    def records(self, pairs: list[tuple[bytes, bytes]]) -> bytes:
        """A chunk stream (`wire`) of each (chunk, base): a delta against the base where that is smaller.

        Each record is verified where it is stored before it leaves.
        """
        ...


class TargetEnd(Protocol):
    """Where restore points go."""

    def identity(self) -> StoreIdentity: ...

    def points(self, vms: list[str] | None) -> list[RestorePoint]: ...

    def missing(self, ids: list[bytes]) -> list[bytes]:
        """Which of `ids` the target does not hold."""
        ...

    def store(self, frames: bytes) -> int:
        """Verify and keep a chunk stream; the number of chunks newly stored."""
        ...

    def commit(self, manifest: Manifest) -> bool:
        """Add the restore point (False: it was there already); ChunksMissing if a chunk is not held."""
        ...

    def remove(self, point_ids: list[str]) -> list[str]:
        """Delete these points, except those a session holds; the ids deleted (their space returns at the next gc)."""
        ...
