"""The `[cache]` section: decompressed chunks in RAM and, optionally, a hydrated tier on a local disk.

Apart from `appliance.config` so the read path's settings sit together; `serve` turns them
into the `ReadPath`'s memory cache, the `HydratedTier` and the `Hydrator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.config_checks import Invalid, absolute_path, integer, one_of, option, positive_number

HYDRATE_MODES = ("newest", "policies", "off")


@dataclass(frozen=True)
class CacheConfig:
    #: Decompressed chunks kept in memory: a boot storm reads the same OS blocks from every VM.
    chunk_cache_mib: int = option(1024, integer(16, 1 << 20))
    #: A local disk tier of decompressed chunks behind RAM (absent: none), and its size limit.
    hydrated_dir: Path | None = option(None, absolute_path)
    hydrated_gib: float = option(64.0, positive_number)
    #: Which points the tier keeps hydrated: the newest of every VM, of the VMs whose policy says
    #: `hydrate = true`, or none ("off": the tier keeps only what reads passed through).
    hydrate: str = option("newest", one_of(*HYDRATE_MODES))

    def __post_init__(self) -> None:
        if self.hydrate == "policies" and self.hydrated_dir is None:
            raise Invalid('hydrate = "policies" needs hydrated_dir: where the hydrated chunks go', "hydrated_dir")

    def describe(self) -> str:
        """The cache part of `config check`'s summary line."""
        if self.hydrated_dir is None:
            return f"cache {self.chunk_cache_mib} MiB"
        return (f"cache {self.chunk_cache_mib} MiB + {self.hydrated_gib:g} GiB hydrated at {self.hydrated_dir} "
                f"(hydrate {self.hydrate})")
