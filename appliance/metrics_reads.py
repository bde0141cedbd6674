"""The read path's metrics: the chunk cache by tier, chunk loads, and hydration progress.

Read at scrape time from the counters the read path, the hydrated tier and the hydrator
keep anyway (`ReadPath.statistics()`, `Hydrator.progress()`), never mirrored into second
counters. Every family is yielded even when it has no series (no hydrated tier), so a
dashboard's queries name only series the appliance can export.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from appliance.hydration import Hydrator
from appliance.store.hydrated import TierStatistics
from appliance.store.reader import ReadPath


class ReadPathCollector:
    def __init__(self, read_path: ReadPath, hydrator: Hydrator | None) -> None:
        self._read_path, self._hydrator = read_path, hydrator

    def collect(self) -> Iterator[Metric]:
        reads = self._read_path.statistics()
        memory, disk = reads.cache, reads.tier
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "hits": CounterMetricFamily("appliance_chunk_cache_hits", "Chunk lookups answered by a tier of the "
                                        "decompressed-chunk cache (memory, then the hydrated disk tier).",
                                        labels=["tier"]),
            "misses": CounterMetricFamily("appliance_chunk_cache_misses", "Chunk lookups a tier could not answer "
                                          "(a disk-tier miss is loaded from the store).", labels=["tier"]),
            "bytes": GaugeMetricFamily("appliance_chunk_cache_bytes", "Decompressed bytes a tier holds.",
                                       labels=["tier"]),
            "entries": GaugeMetricFamily("appliance_chunk_cache_entries", "Chunks a tier holds.", labels=["tier"]),
            "capacity": GaugeMetricFamily("appliance_chunk_cache_capacity_bytes", "A tier's size limit.",
                                          labels=["tier"]),
        }
        for tier, figures in (("memory", memory), ("disk", disk)):
            if figures is not None:
                for name, family in families.items():
                    family.add_metric([tier], getattr(figures, name))
        yield from families.values()
        yield CounterMetricFamily("appliance_chunk_loads", "Chunks read from packs, verified and decompressed "
                                  "(cache misses and read-ahead).", value=reads.loads.chunks_loaded)
        yield CounterMetricFamily("appliance_checksum_failures", "Chunk loads refused because the stored record "
                                  "failed verification (checksum, header, identity); the reader got an I/O error.",
                                  value=reads.loads.integrity_failures)
        yield from self._hydration(reads.tier)

    def _hydration(self, stats: TierStatistics | None) -> Iterator[Metric]:
        pinned = GaugeMetricFamily("appliance_hydrated_pinned_chunks", "Chunks of the hydrated tier the "
                                   "hydration policy keeps (evicted last).")
        corrupt = CounterMetricFamily("appliance_hydrated_dropped_corrupt", "Hydrated chunks whose bytes failed "
                                      "their checksum: dropped and loaded again from the store, never served.")
        skipped = CounterMetricFamily("appliance_hydrated_fills_skipped", "Chunks reads loaded that were not "
                                      "written to the hydrated tier (its writer was behind, or every slot is pinned).")
        if stats is not None:
            pinned.add_metric([], stats.pinned)
            corrupt.add_metric([], stats.dropped_corrupt)
            skipped.add_metric([], stats.fills_skipped)
        chunks = GaugeMetricFamily("appliance_hydration_chunks", "Distinct chunks of the point kept hydrated for "
                                   "each VM, by state: done (in the tier) or pending.", labels=["vm", "state"])
        if self._hydrator is not None:
            for vm, progress in sorted(self._hydrator.progress().items()):
                chunks.add_metric([vm, "done"], progress.done)
                chunks.add_metric([vm, "pending"], progress.pending)
        yield from (pinned, corrupt, skipped, chunks)
