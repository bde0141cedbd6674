"""govmomi's vCenter simulator as a pytest fixture: `from tests.vcsim import vcsim`.

`tests/vcsim/build.sh` builds the launcher (cached by a hash of its Go sources); each
test gets its own simulator on a free loopback port, in its own working directory, so
inventories never leak from one test into the next (starting one takes well under a
second; its TMPDIR, where it keeps the local datastores, is the test's directory too).
vcsim's default vCenter inventory: datacenter DC0, standalone host DC0_H0,
cluster DC0_C0 of DC0_C0_H0..H2, VMs DC0_H0_VM0/1 and DC0_C0_RP0_VM0/1, datastore
LocalDS_0, networks "VM Network" and DC0_DVPG0 (distributed).

vcsim does not speak NFS: a NAS datastore is a folder named like it in the working
directory, and registering a VM needs its .vmx, .nvram and vmware.log there. The
appliance's export is stood in for by that folder (`Vcsim.stage_session`).
"""

from __future__ import annotations

import os
import secrets
import select
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from appliance.vsphere.settings import VsphereSettings, from_mapping

BUILD_SCRIPT = Path(__file__).parent / "vcsim" / "build.sh"
USER = "appliance"
#: The launcher prints its URL once it accepts connections; a cold start takes < 1 s.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: The address the tests' appliance gives ESXi for its NFS server.
NFS_SERVER = "192.0.2.10"


@cache
def vcsim_binary() -> Path:
    """Build (or find cached) the launcher once per test run."""
    result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed ({result.returncode}): {result.stderr.strip()}")
    return Path(result.stdout.strip())


@dataclass(frozen=True)
class Vcsim:
    url: str  # https://127.0.0.1:PORT/sdk
    user: str
    password_file: Path  # mode 0600, as the appliance demands
    certificate: Path  # the server's self-signed certificate (PEM), a CA for verify_tls
    workdir: Path  # vcsim's working directory: NAS datastores are folders here

    def settings(self, **overrides: Any) -> VsphereSettings:
        """Appliance settings for this simulator; TLS unverified unless overridden (the certificate is self-signed)."""
        table = {"url": self.url, "user": self.user, "password_file": str(self.password_file),
                 "verify_tls": False, "nfs_server": NFS_SERVER, "export_path": "/datastore"}
        table.update(overrides)
        return from_mapping(table, "test settings")

    def stage_session(self, datastore: str, session: str, vm: str, registered_as: str) -> Path:
        """The files vcsim wants before it registers `[datastore] sessions/<session>/<vm>.vmx`.

        vcsim names the .nvram after the name the VM is registered under, not the .vmx.
        """
        directory = self.workdir / datastore / "sessions" / session
        directory.mkdir(parents=True, exist_ok=True)
        for name in (f"{vm}.vmx", f"{registered_as}.nvram", "vmware.log"):
            (directory / name).touch()
        return directory


@pytest.fixture
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    binary = vcsim_binary()
    root = tmp_path_factory.mktemp("vcsim")
    workdir = root / "work"
    workdir.mkdir()
    password = secrets.token_hex(12)
    password_file = root / "password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    certificate = root / "certificate.pem"
    with open(root / "vcsim.log", "w") as log:
        process = subprocess.Popen([str(binary), "-user", USER, "-certificate", str(certificate)],
                                   cwd=workdir, env={**os.environ, "VCSIM_PASSWORD": password, "TMPDIR": str(root)},
                                   stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        url = process.stdout.readline().strip() if ready else ""
        if not url.startswith("https://"):
            raise RuntimeError(f"vcsim did not start; see {root / 'vcsim.log'}")
        yield Vcsim(url, USER, password_file, certificate, workdir)
    finally:
        process.terminate()
        try:
            process.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
