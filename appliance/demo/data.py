"""The demo's data part: backups, restores and the FUSE view, on any host with FUSE.

Generates a mixed disk image (zeros, text, random data, repeated blocks), backs it up,
changes ~2% of it and takes an incremental backup from a changed-areas file, restores
both points and proves them byte-identical to their sources, serves the datastore over
FUSE and reads the point back through it, writes into a session (the point stays
unchanged), then verifies the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from appliance.cli import main as cli_main
from appliance.demo.clock import StepClock
from appliance.errors import ApplianceError
from appliance.store import open_store

DEMO_IMAGE_BYTES = 256 << 20
_BLOCK = 64 << 10


def make_demo_image(path: Path, size: int, seed: int = 7) -> None:
    """A disk-like image: a quarter zeros, text, incompressible data and repeats."""
    rng = random.Random(seed)
    words = [b"backup", b"restore", b"vmdk", b"datastore", b"esxi", b"chunk", b"nfs", b"appliance\n"]
    repeated = rng.randbytes(_BLOCK)
    with open(path, "wb") as image:
        image.truncate(size)
        for offset in range(0, size, _BLOCK):
            kind = rng.random()
            if kind < 0.25:
                continue
            if kind < 0.55:
                block = b" ".join(rng.choice(words) for _ in range(_BLOCK // 5))[:_BLOCK]
            elif kind < 0.8:
                block = rng.randbytes(_BLOCK)
            else:
                block = repeated
            image.seek(offset)
            image.write(block[: size - offset])


def change_image(path: Path, fraction: float, seed: int) -> list[dict[str, int]]:
    """Overwrite ~`fraction` of the image in 64 KiB blocks; returns the changed areas."""
    rng = random.Random(seed)
    size = path.stat().st_size
    blocks = sorted(rng.sample(range(size // _BLOCK), max(1, int(size // _BLOCK * fraction))))
    with open(path, "r+b") as image:
        for block in blocks:
            image.seek(block * _BLOCK)
            image.write(rng.randbytes(_BLOCK))
    return [{"start": b * _BLOCK, "length": _BLOCK} for b in blocks]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run_cli(*argv: str) -> None:
    """One `appliance` command, in this process, echoed as a user would type it; raises if it fails."""
    print("$ appliance " + " ".join(argv), flush=True)
    code = cli_main(list(argv))
    if code != 0:
        raise ApplianceError(f"demo step `appliance {' '.join(argv)}` failed with exit code {code}")


def run_data_demo(work: Path, clock: StepClock) -> bool:
    """Back up, restore and serve a generated disk image in `work`; True if every check held."""
    work.mkdir(parents=True, exist_ok=True)
    store, image = work / "store", work / "demo-vm.img"
    with clock.step("generate a 256 MiB disk image"):
        make_demo_image(image, DEMO_IMAGE_BYTES)
        day0 = sha256_file(image)
    with clock.step("full backup"):
        run_cli("--store", str(store), "init")
        run_cli("--store", str(store), "backup", "--vm", "demo-vm", str(image))
    with clock.step("incremental backup of 2% changed blocks"):
        areas = work / "changed.json"
        areas.write_text(json.dumps({"changedArea": change_image(image, 0.02, seed=1)}))
        day1 = sha256_file(image)
        run_cli("--store", str(store), "backup", "--vm", "demo-vm", "--parent", "latest",
                "--changed-areas", str(areas), str(image))
        run_cli("--store", str(store), "points", "--vm", "demo-vm")
    with open_store(store) as opened, opened.env.begin() as txn:
        first, second = (p.id for p in opened.catalog.vm_points(txn, "demo-vm"))
    with clock.step("restore both points and compare"):
        for point, expected in ((first, day0), (second, day1)):
            output = work / f"restored-{point}.img"
            run_cli("--store", str(store), "restore", "--vm", "demo-vm", "--point", point, "--disk", "0",
                    "--output", str(output))
            actual = sha256_file(output)
            verdict = "identical" if actual == expected else "DIFFERENT"
            print(f"point {point}: restored sha256 {actual[:16]}... source {expected[:16]}... -> {verdict}")
            if actual != expected:
                return False
    with clock.step("serve over FUSE, read back, write into a session"):
        run_cli("--store", str(store), "session", "create", "--vm", "demo-vm", "--point", second, "--name", "demo")
        if not _serve_and_read_back(store, work / "mnt", second, day1):
            return False
    with clock.step("verify the store"):
        run_cli("--store", str(store), "verify")
        run_cli("--store", str(store), "stats")
    return True


def _serve_and_read_back(store: Path, mountpoint: Path, point: str, expected: str) -> bool:
    """Mount the datastore (a child `appliance mount`), read a point back, write a session."""
    mountpoint.mkdir(exist_ok=True)
    print(f"$ appliance --store {store} mount {mountpoint} &", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "appliance", "--store", str(store), "mount", str(mountpoint)],
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if server.poll() is not None or time.monotonic() > deadline:
                raise ApplianceError(f"demo: the FUSE mount at {mountpoint} did not come up")
            time.sleep(0.05)
        flat = mountpoint / "restore-points" / "demo-vm" / point / "demo-vm-flat.vmdk"
        actual = sha256_file(flat)
        verdict = "identical" if actual == expected else "DIFFERENT"
        print(f"served {flat.relative_to(mountpoint)}: sha256 {actual[:16]}... -> {verdict}")
        session_disk = mountpoint / "sessions" / "demo" / "demo-vm-flat.vmdk"
        with open(session_disk, "r+b") as disk:
            disk.write(b"written by the demo into a session")
            os.fsync(disk.fileno())
        untouched = sha256_file(flat) == expected
        print(f"wrote into {session_disk.relative_to(mountpoint)}; restore point unchanged: {untouched}")
        return actual == expected and untouched
    finally:
        server.terminate()
        server.wait(timeout=30)
