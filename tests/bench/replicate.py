#!/usr/bin/env python3
"""Replication benchmark: a VM's restore points sent to a second site over one shaped link.

What is measured, and why:

* The data: ingest.py's series cut to two days (its image builder, imported): an ext4
  image (``mkfs.ext4 -d``) ~60% filled with real files of this machine (partly
  compressible), and the next day's copy with ~``--change-fraction`` of its 4 KiB
  blocks rewritten in clustered runs. Both are backed up untimed into a source store of
  ours and into a source restic repository, once; every run replicates the same points.
* The link: two network namespaces joined by a veth pair, each end shaped by
  ``tc qdisc tbf rate --link-mbit``. The target serves in one namespace (ours:
  ``appliance serve --api-tls``; restic: a repository behind OpenSSH's sftp server), the
  source side runs in the other. Bytes on the wire are the source veth's tx + rx byte
  counters (Ethernet frames: TCP, TLS or SSH and the payload) read before and after each
  command, so both tools are metered the same way, whatever they count themselves.
* The peer: ``restic copy`` (restic 0.14) from the source repository to the one at the
  other end, snapshot by snapshot. borg 1.2 has no ``borg transfer`` (that is borg 2),
  so restic is the peer that copies a repository's snapshots between sites. Debian has
  no restic rest-server package, so the far repository is reached over sftp (openssh-server).
* Per run, both target repositories start empty: (1) the first full copy of day 0's
  point (ours: ``replicate push`` from a store holding only day 0; restic: ``copy`` of
  day 0's snapshot), then (2) the daily incremental (ours: push from a store that also
  holds day 1; restic: ``copy`` of day 1's snapshot). Seconds are each command's wall
  clock, process start to exit. An untimed check then restores day 1 from our target
  and compares it with the image, and counts restic's snapshots at its target.

Targets (from the issue): incremental: ours' bytes on the wire <= 1.2x the changed bytes
(the changed 4 KiB blocks; also given: over the changed chunks ours sends, and over
restic's bytes); full copy: what crosses the wire per second >= 0.8x of the link rate
when the link is the limit, and ours' time against restic's.
Output: one JSON line on stdout (medians over runs, plus each run); logs on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.bench.ingest import (  # noqa: E402
    add_run_arguments,
    build_series,
    image_bytes,
    log,
    medians,
    run,
    running_child,
    stop_child,
    work_directory,
)

#: RFC 2544's benchmarking range: the two ends exist only inside this run's namespaces.
SOURCE_IP, TARGET_IP = "198.18.0.1", "198.18.0.2"
API_PORT, SSH_PORT = 9751, 22
VM = "bench"
START_TIMEOUT = 60.0
RESTIC_PASSWORD = "bench"


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    """`cmd` run inside network namespace `ns` (`ip netns exec` execs it: its PID is the command's)."""
    return ["ip", "netns", "exec", ns, *cmd]


class ShapedLink:
    """Two namespaces joined by a veth pair shaped to `mbit` each way; the source end's byte meter."""

    def __init__(self, mbit: float) -> None:
        tag = os.getpid()
        self.source_ns, self.target_ns = f"rb-src-{tag}", f"rb-dst-{tag}"
        self._source_dev, self._target_dev = f"rbs{tag}"[:15], f"rbd{tag}"[:15]
        self.bytes_per_second = mbit * 1e6 / 8
        self._mbit = mbit
        self._made: list[str] = []

    def __enter__(self) -> ShapedLink:
        try:
            for ns in (self.source_ns, self.target_ns):
                run(["ip", "netns", "add", ns])
                self._made.append(ns)
                run(in_ns(ns, ["ip", "link", "set", "lo", "up"]))
            run(["ip", "link", "add", self._source_dev, "netns", self.source_ns,
                 "type", "veth", "peer", "name", self._target_dev, "netns", self.target_ns])
            # A burst of 10 ms of traffic (at least 64 KiB): tbf needs one GSO frame to fit in it.
            burst = max(64 << 10, int(self.bytes_per_second / 100))
            for ns, dev, ip in ((self.source_ns, self._source_dev, SOURCE_IP),
                                (self.target_ns, self._target_dev, TARGET_IP)):
                run(in_ns(ns, ["ip", "addr", "add", f"{ip}/30", "dev", dev]))
                run(in_ns(ns, ["ip", "link", "set", dev, "up"]))
                run(in_ns(ns, ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self._mbit}mbit",
                               "burst", str(burst), "latency", "50ms"]))
        except BaseException:
            self.close()
            raise
        log(f"link {SOURCE_IP} <-> {TARGET_IP}: veth, tbf {self._mbit} Mbit/s each way")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the namespaces (the veth pair goes with them); their processes must be stopped first."""
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], check=False, capture_output=True)

    def wire_bytes(self) -> int:
        """Bytes the source end has sent plus received so far (the kernel's counters, every frame)."""
        stats = f"/sys/class/net/{self._source_dev}/statistics"
        out = run(in_ns(self.source_ns, ["cat", f"{stats}/tx_bytes", f"{stats}/rx_bytes"]))
        return sum(int(value) for value in out.split())

    def listening(self, port: int) -> bool:
        out = run(in_ns(self.target_ns, ["ss", "-Hltn", f"sport = :{port}"]))
        return bool(out.strip())

    def metered(self, name: str, cmd: list[str], **kwargs: Any) -> tuple[float, int, str]:
        """Run `cmd` in the source namespace: its wall-clock seconds, bytes on the wire, and stdout."""
        before, started = self.wire_bytes(), time.perf_counter()
        out = run(in_ns(self.source_ns, cmd), **kwargs)
        seconds, wire = time.perf_counter() - started, self.wire_bytes() - before
        log(f"{name}: {seconds:.2f}s, {wire / 1e6:.1f} MB on the wire "
            f"({wire / seconds / self.bytes_per_second:.2f}x the link rate)")
        return seconds, wire, out


def stopped_by_sigterm(name: str, proc: subprocess.Popen[bytes]) -> str | None:
    """Stop a server child by PID; what went wrong, if anything (sshd exits 255 on SIGTERM)."""
    rc = stop_child(name, proc)
    return None if rc in (0, 255, -signal.SIGTERM) else f"exited with {rc}"


def appliance(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance", *args]


@contextlib.contextmanager
def our_target(link: ShapedLink, store: Path, logs: Path) -> Iterator[tuple[str, Path]]:
    """A fresh store served over https in the target namespace; its pinned fingerprint and token file."""
    run(appliance("--store", str(store), "init"), cwd=REPO)
    fingerprint = run(appliance("--store", str(store), "api-certificate"), cwd=REPO).strip()
    config = store.parent / "target.toml"
    config.write_text(f'[store]\npath = "{store}"\n\n[metrics]\nenabled = false\n\n'
                      f'[api]\nbind = "{TARGET_IP}"\nport = {API_PORT}\ntls = true\n')
    token = store / "api.token"
    cmd = in_ns(link.target_ns, appliance("serve", "--config", str(config), "--no-portmap"))
    with running_child("serve", cmd, logs, lambda: token.exists() and link.listening(API_PORT), START_TIMEOUT, 0.2,
                       lambda proc: stopped_by_sigterm("serve", proc), cwd=REPO):
        yield fingerprint, token


def push_config(path: Path, store: Path, fingerprint: str, token: Path) -> Path:
    path.write_text(f'[store]\npath = "{store}"\n\n[[remotes]]\nname = "dr"\nurl = "https://{TARGET_IP}:{API_PORT}"\n'
                    f'token_file = "{token}"\nfingerprint = "{fingerprint}"\n')
    return path


@contextlib.contextmanager
def sftp_server(link: ShapedLink, work: Path, logs: Path) -> Iterator[str]:
    """OpenSSH's sshd (internal sftp) in the target namespace, with a key made here; restic's `sftp.command`."""
    keys = work / "ssh"
    keys.mkdir()
    for name in ("host", "client"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)])
    shutil.copy(keys / "client.pub", keys / "authorized_keys")
    config = keys / "sshd_config"
    config.write_text(f"Port {SSH_PORT}\nListenAddress {TARGET_IP}\nHostKey {keys / 'host'}\n"
                      f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile none\n"
                      "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                      "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n")
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation directory
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    cmd = in_ns(link.target_ns, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)])
    try:
        with running_child("sshd", cmd, logs, lambda: link.listening(SSH_PORT), START_TIMEOUT, 0.2,
                           lambda proc: stopped_by_sigterm("sshd", proc)):
            yield (f"ssh -i {keys / 'client'} -p {SSH_PORT} -o BatchMode=yes -o StrictHostKeyChecking=no "
                   f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@{TARGET_IP} -s sftp")
    finally:
        if made_privsep:
            privsep.rmdir()


class Sources:
    """The untimed part: our source stores (day 0 alone; days 0 and 1) and restic's source repository."""

    def __init__(self, work: Path, images: list[Path]) -> None:
        self.day0_store, self.day1_store = work / "ours-day0", work / "ours-day1"
        run(appliance("--store", str(self.day0_store), "init"), cwd=REPO)
        run(appliance("--store", str(self.day0_store), "backup", "--vm", VM, str(images[0])), cwd=REPO)
        run(["cp", "-a", "--reflink=auto", str(self.day0_store), str(self.day1_store)])
        out = run(appliance("--store", str(self.day1_store), "backup", "--vm", VM, str(images[1])), cwd=REPO)
        self.day1_point = out.strip().splitlines()[-1]
        stats = json.loads(run(appliance("--store", str(self.day0_store), "stats", "--json"), cwd=REPO))
        self.day0_pack_bytes = int(stats["stored_bytes"])
        self.restic_repo = work / "restic-source"
        self.restic_env = dict(os.environ, RESTIC_PASSWORD=RESTIC_PASSWORD, RESTIC_FROM_PASSWORD=RESTIC_PASSWORD,
                               RESTIC_CACHE_DIR=str(work / "restic-source-cache"))
        run(["restic", "init", "-q", "--repo", str(self.restic_repo)], env=self.restic_env)
        for image in images:
            run(["restic", "backup", "-q", "--repo", str(self.restic_repo), image.name], env=self.restic_env,
                cwd=image.parent)
        snapshots = json.loads(run(["restic", "snapshots", "--json", "--repo", str(self.restic_repo)],
                                   env=self.restic_env))
        self.snapshots = [doc["id"] for doc in sorted(snapshots, key=lambda doc: doc["time"])]
        log(f"sources ready: our day-0 packs {self.day0_pack_bytes / 1e6:.1f} MB, restic snapshots {self.snapshots}")


def changed_figures(areas: list[dict[str, int]], chunk_size: int) -> dict[str, int]:
    """The changed bytes (4 KiB blocks) and the logical bytes of the chunks they touch."""
    touched: set[int] = set()
    for area in areas:
        touched.update(range(area["start"] // chunk_size, (area["start"] + area["length"] - 1) // chunk_size + 1))
    return {"changed_bytes": sum(area["length"] for area in areas), "changed_chunks": len(touched),
            "changed_chunks_logical_bytes": len(touched) * chunk_size}


def measure_ours(link: ShapedLink, run_dir: Path, sources: Sources, image: Path, logs: Path) -> dict[str, Any]:
    fig: dict[str, Any] = {}
    target = run_dir / "ours-target"
    with our_target(link, target, logs) as (fingerprint, token):
        for phase, store in (("full", sources.day0_store), ("incr", sources.day1_store)):
            config = push_config(run_dir / f"push-{phase}.toml", store, fingerprint, token)
            seconds, wire, out = link.metered(f"ours {phase}", appliance(
                "replicate", "push", "--config", str(config), "--remote", "dr", "--json"), cwd=REPO)
            report = json.loads(out)
            fig.update({f"ours_{phase}_seconds": round(seconds, 3), f"ours_{phase}_wire_bytes": wire,
                        f"ours_{phase}_own_seconds": report["seconds"],
                        f"ours_{phase}_own_wire_bytes": report["wire_bytes_sent"] + report["wire_bytes_received"],
                        f"ours_{phase}_chunks_sent": report["chunks_sent"],
                        f"ours_{phase}_chunk_bytes_sent": report["chunk_bytes_sent"],
                        f"ours_{phase}_logical_bytes": report["logical_bytes"]})
            if len(report["points_sent"]) != 1:
                raise SystemExit(f"bench: ours {phase} sent points {report['points_sent']}, not one")
    restored = run_dir / "restored.img"
    run(appliance("--store", str(target), "restore", "--vm", VM, "--point", sources.day1_point,
                  "--output", str(restored)), cwd=REPO)
    run(["cmp", str(restored), str(image)])
    restored.unlink()
    log("check: day 1 restored from our target equals the image")
    return fig


def measure_restic(link: ShapedLink, run_dir: Path, sources: Sources, sftp_command: str) -> dict[str, Any]:
    fig: dict[str, Any] = {}
    target = run_dir / "restic-target"
    env = dict(sources.restic_env, RESTIC_CACHE_DIR=str(run_dir / "restic-cache"))
    remote = ["--repo", f"sftp:root@{TARGET_IP}:{target}", "-o", f"sftp.command={sftp_command}"]
    run(in_ns(link.source_ns, ["restic", "init", "-q", *remote, "--from-repo", str(sources.restic_repo),
                               "--copy-chunker-params"]), env=env)
    for phase, snapshot in zip(("full", "incr"), sources.snapshots):
        seconds, wire, _ = link.metered(f"restic {phase}", ["restic", "copy", "-q", *remote, "--from-repo",
                                                            str(sources.restic_repo), snapshot], env=env)
        fig.update({f"restic_{phase}_seconds": round(seconds, 3), f"restic_{phase}_wire_bytes": wire})
    copied = json.loads(run(in_ns(link.source_ns, ["restic", "snapshots", "--json", *remote]), env=env))
    if len(copied) != 2:
        raise SystemExit(f"bench: restic's target holds {len(copied)} snapshots after two copies")
    return fig


def ratios(fig: dict[str, Any], link: ShapedLink) -> dict[str, Any]:
    """The figures the issue targets, from one run's measurements."""
    out = {
        "ours_full_link_utilisation": fig["ours_full_wire_bytes"] / fig["ours_full_seconds"] / link.bytes_per_second,
        "ours_full_own_link_utilisation":
            fig["ours_full_wire_bytes"] / fig["ours_full_own_seconds"] / link.bytes_per_second,
        "ours_full_logical_MBps": fig["ours_full_logical_bytes"] / fig["ours_full_seconds"] / 1e6,
        "restic_full_link_utilisation":
            fig["restic_full_wire_bytes"] / fig["restic_full_seconds"] / link.bytes_per_second,
        "ratio_full_seconds_vs_restic": fig["ours_full_seconds"] / fig["restic_full_seconds"],
        "ratio_full_wire_vs_restic": fig["ours_full_wire_bytes"] / fig["restic_full_wire_bytes"],
        "ratio_incr_wire_vs_changed": fig["ours_incr_wire_bytes"] / fig["changed_bytes"],
        "ratio_incr_wire_vs_chunk_bytes_sent": fig["ours_incr_wire_bytes"] / max(1, fig["ours_incr_chunk_bytes_sent"]),
        "ratio_incr_wire_vs_restic": fig["ours_incr_wire_bytes"] / fig["restic_incr_wire_bytes"],
        "ratio_incr_seconds_vs_restic": fig["ours_incr_seconds"] / fig["restic_incr_seconds"],
        "restic_incr_wire_vs_changed": fig["restic_incr_wire_bytes"] / fig["changed_bytes"],
    }
    return {key: round(value, 3) for key, value in out.items()}


def measure(link: ShapedLink, run_dir: Path, sources: Sources, images: list[Path], changed: dict[str, int],
            sftp_command: str, logs: Path) -> dict[str, Any]:
    run_dir.mkdir()
    fig: dict[str, Any] = dict(changed)
    fig.update(measure_ours(link, run_dir, sources, images[1], logs))
    fig.update(measure_restic(link, run_dir, sources, sftp_command))
    fig.update(ratios(fig, link))
    shutil.rmtree(run_dir)
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="image size (a few hundred MiB to 1 GiB)")
    parser.add_argument("--change-fraction", type=float, default=0.03, help="share of 4 KiB blocks changed on day 1")
    parser.add_argument("--link-mbit", type=float, default=200.0, help="the link's rate each way, Mbit/s")
    add_run_arguments(parser, runs=3, kept="images, source stores and repositories")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it makes network namespaces and shapes a veth pair")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks remove namespaces, children, files
    size = image_bytes(args.size_gib)
    work = work_directory(parser, args.work, "replicate-bench-")
    try:
        images = build_series(work, size, 1, args.change_fraction)
        areas = json.loads(images[1].with_suffix(".json").read_text())["changedArea"]
        sources = Sources(work, images)
        from appliance.store.repository import DEFAULT_CHUNK_SIZE

        changed = changed_figures(areas, DEFAULT_CHUNK_SIZE)
        logs = work / "logs"
        logs.mkdir()
        runs = []
        with ShapedLink(args.link_mbit) as link, sftp_server(link, work, logs) as sftp_command:
            for number in range(args.runs):
                log(f"run {number + 1} of {args.runs}")
                runs.append(measure(link, work / f"run-{number}", sources, images, changed, sftp_command, logs))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = medians(runs)
    met = {
        "incr_wire_le_1_2x_changed": figures["ratio_incr_wire_vs_changed"] <= 1.2,
        "full_wire_ge_0_8x_link": figures["ours_full_link_utilisation"] >= 0.8,
    }
    result: dict[str, Any] = {"bench": "replicate", "image_bytes": size, "change_fraction": args.change_fraction,
                              "link_mbit": args.link_mbit, "day0_pack_bytes": sources.day0_pack_bytes,
                              "runs": args.runs, **figures, "targets_met": met, "all_targets_met": all(met.values())}
    result["per_run"] = runs if args.runs > 1 else []
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
