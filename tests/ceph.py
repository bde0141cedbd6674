"""A real single-node Ceph cluster (Debian's ceph-mon, ceph-osd and radosgw) serving S3 on loopback, for the tests.

One monitor, one OSD and one RGW run as the caller without systemd, each in the foreground in a
process group of its own, with every path (data, logs, sockets, pid files) under `root` and one
config file there, so nothing outside `root` is read or written. The OSD is a file-backed
bluestore: there is no block device to give it (no loop devices either). Choices, and the traps
they avoid:

- `auth none` for the daemons (cephx keyrings buy nothing on loopback). With it the monitor's client
  mode must be `crc`: otherwise RGW's connection to the monitor hangs in authentication.
- RGW still authenticates S3 requests against its own users, so `radosgw-admin user create` makes
  one with the shared test keys.
- `bluestore block path` lies outside the OSD's data directory: mkfs links `<data>/block` to that
  path, which inside it is a link to itself (mkfs fails with ELOOP).
- One replica, one placement group per pool, and short monitor and report intervals: RGW creates
  its pools at first start and waits for each to become active, which takes seconds per pool at
  Ceph's defaults.
- RGW's beast frontend with `tcp_nodelay=1`: without it, LIST and DELETE answers wait out Nagle's
  algorithm against the client's delayed ACK (the README's S3 section says what that cost).
- No ceph-mgr: nothing here needs it (pools are created by the monitor).

`restart` restarts RGW alone (the S3 service a store talks to); the monitor and the OSD keep running.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

from tests.s3_engines import ACCESS_KEY, SECRET_KEY, S3Engine, free_ports, start_daemon, stop_daemons

OSD_SIZE = 16 << 30  # sparse: the block file holds only what was written
TOOL_TIMEOUT = 120.0
TOOLS = ("monmaptool", "ceph-mon", "ceph", "ceph-osd", "radosgw", "radosgw-admin")


class CephRgw(S3Engine):
    """Monitor `a`, OSD 0 and RGW `client.rgw`; `start` makes the cluster the first time."""

    name = "Ceph RGW"
    start_timeout = 180.0

    def __init__(self, root: Path) -> None:
        mon_port, rgw_port = free_ports(2)
        super().__init__(root, rgw_port)
        for part in ("mon", "osd", "run", "log", "rgw"):
            (root / part).mkdir(exist_ok=True)
        self.conf = root / "ceph.conf"
        self._fsid = str(uuid.uuid4())
        self._mon_address = f"v2:127.0.0.1:{mon_port}"
        self.conf.write_text(self._config(rgw_port))
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}

    def _config(self, rgw_port: int) -> str:
        root = self.root
        return f"""[global]
fsid = {self._fsid}
mon host = {self._mon_address}
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
run dir = {root}/run
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 1
osd pool default pgp num = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon tick interval = 1
paxos propose interval = 0.05
paxos min wait = 0.01
osd mon report interval = 1
client mount timeout = 60
[mon]
mon data = {root}/mon
[osd]
osd data = {root}/osd
osd objectstore = bluestore
bluestore block path = {root}/block
bluestore block create = true
bluestore block size = {OSD_SIZE}
bluestore fsck on mkfs = false
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw data = {root}/rgw
"""

    def _tool(self, *command: str) -> str:
        """A Ceph command-line tool against this cluster; its output, or a RuntimeError with its reason."""
        done = subprocess.run([command[0], "-c", str(self.conf), *command[1:]], capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def _run(self, name: str, *command: str) -> None:
        self._daemons[name] = start_daemon([command[0], "-c", str(self.conf), "-f", *command[1:]],
                                           self.root / "log" / f"{name}.out")

    def start(self) -> None:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(f"no {', '.join(missing)}: run deploy/dev-setup.sh "
                               "(Debian's ceph-mon, ceph-osd and radosgw)")
        fresh = not (self.root / "osd" / "whoami").exists()
        try:
            if fresh:
                self._tool("monmaptool", "--create", "--fsid", self._fsid, "--addv", "a",
                           f"[{self._mon_address}]", str(self.root / "monmap"))
                self._tool("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(self.root / "monmap"))
            self._run("mon", "ceph-mon", "-i", "a")
            if fresh:
                osd_uuid = str(uuid.uuid4())
                osd_id = self._tool("ceph", "osd", "new", osd_uuid).strip()
                if osd_id != "0":
                    raise RuntimeError(f"ceph osd new gave id {osd_id!r}, not 0")
                self._tool("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
            self._run("osd", "ceph-osd", "-i", "0")
            self._run("rgw", "radosgw", "-n", "client.rgw")
            if fresh:
                self._tool("radosgw-admin", "user", "create", "--uid=appliance", "--display-name=appliance tests",
                           f"--access-key={ACCESS_KEY}", f"--secret={SECRET_KEY}")
        except BaseException:
            self.stop()
            raise
        self.wait_until_answering(list(self._daemons.values()))

    def stop(self) -> None:
        """RGW, the OSD and the monitor at once: a test cluster has nothing to flush that a test needs."""
        stop_daemons(list(self._daemons.values()), grace=1.0)
        self._daemons.clear()

    def restart(self, down_for: float = 0.0) -> None:
        stop_daemons([self._daemons.pop("rgw")], grace=1.0)
        time.sleep(down_for)
        self._run("rgw", "radosgw", "-n", "client.rgw")
        self.wait_until_answering(list(self._daemons.values()))
