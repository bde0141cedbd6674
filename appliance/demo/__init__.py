"""`appliance demo`: the product's main job on embedded defaults, end to end, each step timed.

Two parts, in one directory (a new temporary one unless `--dir` names one):

- data (`data`): a generated disk image is backed up, incrementally backed up after 2% of
  it changed, restored byte for byte, served over FUSE and read back, written through a
  session while the restore point stays unchanged; then the store is verified.
- boot (`boot`): a small bootable Linux disk is backed up and instant-booted with QEMU
  from a session over the appliance's own NFS export, shows its console marker and a
  file it wrote, is migrated to local disks while it runs and stopped; the restore
  point's sha256 is unchanged.

The boot part needs root, QEMU and the tools the guest disk is built with; where it
cannot run, the demo says why in one line and runs the data part alone (as it does with
`--data-only`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from appliance.demo.boot import boot_unavailable, run_boot_demo
from appliance.demo.clock import StepClock
from appliance.demo.data import make_demo_image as make_demo_image
from appliance.demo.data import run_data_demo
from appliance.demo.data import sha256_file as sha256_file

__all__ = ["make_demo_image", "run_demo", "sha256_file"]


def run_demo(work: Path | None, data_only: bool = False, accel: str = "auto") -> int:
    """Run the demo in `work`; the exit code (0: every check held)."""
    work = work or Path(tempfile.mkdtemp(prefix="appliance-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"demo directory: {work}")
    clock = StepClock()
    if not run_data_demo(work / "data", clock):
        return 1
    reason = "--data-only was given" if data_only else boot_unavailable()
    if reason is not None:
        print(f"\nboot part skipped: {reason}")
    elif not run_boot_demo(work / "boot", clock, accel):
        return 1
    clock.summary()
    return 0
