"""The configuration file: every section's keys, every refusal naming file and key,
secret files checked with real permissions, `config check` through the real CLI, and
the command line laid over the file."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import _serve_config, build_parser
from appliance.config import ApplianceConfig, load_config, resolve_secrets, summary
from appliance.config_checks import Secret
from appliance.errors import ConfigError, UsageError
from appliance.serve import ServeOptions, serve_options
from nfs_export import Export
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "appliance.toml"
BASE = '[store]\npath = "/srv/appliance/store"\n'
REMOTE = ('[[remotes]]\nname = "dr"\nurl = "https://192.0.2.7:9751"\nfingerprint = "sha256:' + "ab:" * 31 + 'ab"\n')
CONNECTION = '[[vsphere.connections]]\nname = "vc1"\nurl = "https://vc1.example.com/sdk"\nuser = "backup"\n'


def write(tmp_path: Path, body: str, name: str = "appliance.toml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def secret(tmp_path: Path, content: str = "s3cret\n", mode: int = 0o600, name: str = "vc.password") -> Path:
    path = tmp_path / name
    path.write_text(content)
    path.chmod(mode)
    return path


def value_at(config: ApplianceConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


def test_defaults_are_the_serve_commands_defaults(tmp_path: Path) -> None:
    """A file with only store.path serves exactly what `serve` without flags always did."""
    config = load_config(write(tmp_path, BASE))
    assert serve_options(config) == ServeOptions(export=Export())
    assert (config.metrics.port, config.metrics.enabled, config.api.port, config.fuse.mountpoint) == (
        9750, True, 9751, None)
    assert (config.limits.max_sessions, config.limits.session_expiry_hours, config.vsphere.connections) == (
        64, None, ())


@pytest.mark.parametrize(("body", "key", "expected"), [
    ('[store]\npath = "/data/store"\n', "store.path", Path("/data/store")),
    ("[cache]\nchunk_cache_mib = 4096\n", "cache.chunk_cache_mib", 4096),
    ('[cache]\nhydrated_dir = "/ssd/hydrated"\n', "cache.hydrated_dir", Path("/ssd/hydrated")),
    ("[cache]\nhydrated_gib = 0.5\n", "cache.hydrated_gib", 0.5),
    ('[cache]\nhydrated_dir = "/ssd/h"\nhydrate = "policies"\n', "cache.hydrate", "policies"),
    ("[nfs]\nenabled = true\n", "nfs.enabled", True),
    ('[nfs]\nbind = "0.0.0.0"\n', "nfs.bind", "0.0.0.0"),
    ('[nfs]\nbind = "::"\n', "nfs.bind", "::"),
    ("[nfs]\nport = 12049\n", "nfs.port", 12049),
    ("[nfs]\nport = 0\n", "nfs.port", 0),
    ("[nfs]\nmount_port = 635\n", "nfs.mount_port", 635),
    ("[nfs]\nportmap = false\n", "nfs.portmap", False),
    ('[nfs]\nexport_path = "/datastore//esx/"\n', "nfs.export_path", "/datastore/esx"),
    ('[nfs]\nallow = ["10.1.2.3/24", "fd00::/64", "192.0.2.7"]\n', "nfs.allow",
     (ipaddress.ip_network("10.1.2.0/24"), ipaddress.ip_network("fd00::/64"), ipaddress.ip_network("192.0.2.7/32"))),
    ("[nfs]\nread_only = true\n", "nfs.read_only", True),
    ("[nfs]\nroot_squash = true\n", "nfs.root_squash", True),
    ('[fuse]\nmountpoint = "/srv/appliance/datastore"\n', "fuse.mountpoint", Path("/srv/appliance/datastore")),
    ("[metrics]\nenabled = false\n", "metrics.enabled", False),
    ('[metrics]\nbind = "0.0.0.0"\nport = 9100\n', "metrics.port", 9100),
    ('[api]\nbind = "10.0.0.5"\nport = 8443\n', "api.bind", "10.0.0.5"),
    ("[limits]\nmax_sessions = 10\n", "limits.max_sessions", 10),
    ("[limits]\nmax_instant_boots = 3\n", "limits.max_instant_boots", 3),
    ("[limits]\nsession_expiry_hours = 36\n", "limits.session_expiry_hours", 36.0),
    ("[limits]\nsession_expiry_hours = 0.5\n", "limits.session_expiry_hours", 0.5),
    ('[qemu]\naccel = "tcg"\n', "qemu.accel", "tcg"),
    ('[qemu]\naccel = "kvm"\nbinary = "/usr/libexec/qemu-kvm"\n', "qemu.binary", "/usr/libexec/qemu-kvm"),
    (CONNECTION + 'password_env = "VC1_PASSWORD"\n', "vsphere.connections.0.password_env", "VC1_PASSWORD"),
    (CONNECTION + 'password_env = "P"\nverify_tls = false\n', "vsphere.connections.0.verify_tls", False),
    (CONNECTION + 'password_env = "P"\ndisk_reads = "url"\nhost_addresses = { esx01 = "10.0.0.5", "esx 2" = "h2:8443" }\n',
     "vsphere.connections.0.host_addresses", (("esx01", "10.0.0.5:443"), ("esx 2", "h2:8443"))),
    (CONNECTION + 'password_env = "P"\nnfs_server_address = "nas-1.example.com"\n',
     "vsphere.connections.0.nfs_server_address", "nas-1.example.com"),
])
def test_every_section_accepts_good_values(tmp_path: Path, body: str, key: str, expected: Any) -> None:
    text = body if body.startswith("[store]") else BASE + body
    assert value_at(load_config(write(tmp_path, text)), key) == expected


def test_secret_files_are_accepted_when_only_root_may_read_them(tmp_path: Path) -> None:
    password = secret(tmp_path, "s3cret\n", 0o600)
    token = secret(tmp_path, "t0ken", 0o400, name="api.token")
    config = load_config(write(tmp_path, BASE + f'[api]\ntoken_file = "{token}"\n'
                               + CONNECTION + f'password_file = "{password}"\n'))
    assert config.api.token_file == token
    secrets = resolve_secrets(config, "appliance.toml")
    assert secrets["vc1"].reveal() == "s3cret"
    assert "s3cret" not in repr(secrets) and "s3cret" not in str(secrets["vc1"])


@pytest.mark.parametrize(("body", "key", "fragment"), [
    ("", "store.path", "no default"),
    ("[store]\n", "store.path", "no default"),
    ('[store]\npath = "relative/store"\n', "store.path", "not an absolute path"),
    ("[store]\npath = 5\n", "store.path", "expected a string, got an integer"),
    ('store = "/srv"\n', "store", "expected a table"),
    ("colour = 1\n" + BASE, "colour", "unknown key (known here: store, cache, nfs"),
    (BASE + "colour = 1\n", "store.colour", "unknown key (known here: path, backend, endpoint"),
    (BASE + 'backend = "ceph"\n', "store.backend", '"ceph" is not one of: local, s3'),
    (BASE + 'backend = "s3"\nbucket = "b12"\n', "store.endpoint", "required when backend"),
    (BASE + 'backend = "s3"\nendpoint = "ftp://h"\nbucket = "b12"\n', "store.endpoint", "not an http"),
    (BASE + 'backend = "s3"\nendpoint = "https://h"\n', "store.bucket", "required when backend"),
    (BASE + 'backend = "s3"\nendpoint = "https://h"\nbucket = "Big_Bucket"\n', "store.bucket", "not an S3 bucket"),
    (BASE + 'backend = "s3"\nendpoint = "https://h"\nbucket = "b12"\nprefix = "a//b"\n', "store.prefix",
     "not a key prefix"),
    (BASE + 'backend = "s3"\nendpoint = "https://h"\nbucket = "b12"\naccess_key_env = "K"\n',
     "store.access_key_env", "together"),
    (BASE + 'backend = "s3"\nendpoint = "https://h"\nbucket = "b12"\naccess_key_env = "K K"\n',
     "store.access_key_env", "not an environment variable name"),
    (BASE + 'backend = "s3"\nendpoint = "https://h"\nbucket = "b12"\ncredentials_file = "/nonexistent/c"\n',
     "store.credentials_file", "No such file"),
    (BASE + 'bucket = "b12"\n', "store.bucket", 'only for backend = "s3"'),
    (BASE + "[nfs]\nprot = 2049\n", "nfs.prot", "unknown key (known here: enabled, bind, port"),
    (BASE + "[cache]\nchunk_cache_mib = 1\n", "cache.chunk_cache_mib", "out of range 16..1048576"),
    (BASE + '[cache]\nchunk_cache_mib = "1 GiB"\n', "cache.chunk_cache_mib", "expected an integer, got a string"),
    (BASE + "[cache]\nchunk_cache_mib = 1024.0\n", "cache.chunk_cache_mib", "expected an integer, got a float"),
    (BASE + '[cache]\nhydrated_dir = "ssd"\n', "cache.hydrated_dir", "not an absolute path"),
    (BASE + "[cache]\nhydrated_gib = 0\n", "cache.hydrated_gib", "must be greater than 0"),
    (BASE + '[cache]\nhydrate = "all"\n', "cache.hydrate", "not one of: newest, policies, off"),
    (BASE + '[cache]\nhydrate = "policies"\n', "cache.hydrated_dir", "needs hydrated_dir"),
    (BASE + '[nfs]\nenabled = "yes"\n', "nfs.enabled", "expected a boolean"),
    (BASE + "[nfs]\nread_only = 1\n", "nfs.read_only", "expected a boolean (true or false), got an integer"),
    (BASE + '[nfs]\nbind = "localhost"\n', "nfs.bind", "not an IP address"),
    (BASE + '[nfs]\nbind = ""\n', "nfs.bind", "must not be empty"),
    (BASE + "[nfs]\nport = 65536\n", "nfs.port", "65536 is out of range 0..65535"),
    (BASE + "[nfs]\nport = -1\n", "nfs.port", "out of range"),
    (BASE + "[nfs]\nport = true\n", "nfs.port", "expected an integer, got a boolean"),
    (BASE + "[nfs]\nmount_port = 2049\n", "nfs.mount_port", "also the NFS port"),
    (BASE + '[nfs]\nexport_path = "datastore"\n', "nfs.export_path", "absolute path"),
    (BASE + '[nfs]\nexport_path = "/a/../b"\n', "nfs.export_path", '".."'),
    (BASE + '[nfs]\nallow = ["10.0.0.0/33"]\n', "nfs.allow", 'item 0: "10.0.0.0/33" is not an IP network'),
    (BASE + '[nfs]\nallow = ["10.0.0.0/8", "ten"]\n', "nfs.allow", 'item 1: "ten"'),
    (BASE + '[nfs]\nallow = "10.0.0.0/8"\n', "nfs.allow", "expected an array of networks, got a string"),
    (BASE + "[nfs]\nallow = []\n", "nfs.allow", "no client could mount"),
    (BASE + "[nfs]\nenabled = false\n", "nfs.enabled", "nothing to serve"),
    (BASE + '[fuse]\nmountpoint = "mnt"\n', "fuse.mountpoint", "not an absolute path"),
    (BASE + "[metrics]\nport = 2049\n", "metrics.port", "port 2049 is also nfs.port"),
    (BASE + '[metrics]\nbind = "0.0.0.0"\nport = 20048\n', "metrics.port", "also nfs.mount_port"),
    (BASE + '[api]\nport = 9750\n', "api.port", "also metrics.port"),
    (BASE + '[api]\ntoken_file = "/nonexistent/api.token"\n', "api.token_file", "No such file"),
    (BASE + "[limits]\nmax_sessions = 0\n", "limits.max_sessions", "out of range"),
    (BASE + '[qemu]\naccel = "hvf"\n', "qemu.accel", '"hvf" is not one of: auto, kvm, tcg'),
    (BASE + '[qemu]\nbinary = ""\n', "qemu.binary", "must not be empty"),
    (BASE + "[limits]\nsession_expiry_hours = 0\n", "limits.session_expiry_hours", "greater than 0"),
    (BASE + '[limits]\nsession_expiry_hours = "1d"\n', "limits.session_expiry_hours", "expected a number"),
    (BASE + "[vsphere]\nconnections = 1\n", "vsphere.connections", "expected an array of tables"),
    (BASE + CONNECTION, "vsphere.connections[0].password_env", "give password_env"),
    (BASE + CONNECTION + 'password = "hunter2"\n', "vsphere.connections[0].password", "unknown key"),
    (BASE + CONNECTION + 'password_env = "1BAD"\n', "vsphere.connections[0].password_env", "not an environment"),
    (BASE + CONNECTION + 'password_env = "P"\npassword_file = "{secret}"\n',
     "vsphere.connections[0].password_file", "not both"),
    (BASE + '[[vsphere.connections]]\nname = "vc1"\nuser = "u"\npassword_env = "P"\n',
     "vsphere.connections[0].url", "no default"),
    (BASE + CONNECTION.replace("https://", "http://") + 'password_env = "P"\n', "vsphere.connections[0].url",
     "not an https:// URL"),
    (BASE + CONNECTION.replace('"vc1"', '"vc 1"') + 'password_env = "P"\n', "vsphere.connections[0].name",
     "letters, digits"),
    (BASE + CONNECTION + 'password_env = "P"\n' + CONNECTION + 'password_env = "Q"\n',
     "vsphere.connections[1].name", 'already named "vc1"'),
    (BASE + '[nfs]\nbind = "0.0.0.0"\n' + CONNECTION + 'password_env = "P"\n',
     "vsphere.connections[0].nfs_server_address", "required while nfs.bind is 0.0.0.0"),
    (BASE + CONNECTION + 'password_env = "P"\nnfs_server_address = "bad host!"\n',
     "vsphere.connections[0].nfs_server_address", "neither an IP address nor a host name"),
    (BASE + CONNECTION + 'password_env = "P"\nverify_tls = "no"\n', "vsphere.connections[0].verify_tls",
     "expected a boolean"),
    (BASE + CONNECTION + 'password_env = "P"\ndisk_reads = "vcenter"\n', "vsphere.connections[0].disk_reads",
     "not one of: host, url"),
    (BASE + CONNECTION + 'password_env = "P"\nhost_addresses = { esx01 = "10.0.0.5:99999" }\n',
     "vsphere.connections[0].host_addresses", 'host "esx01": "10.0.0.5:99999" has no port'),
    (BASE + CONNECTION + 'password_env = "P"\nhost_addresses = ["esx01"]\n',
     "vsphere.connections[0].host_addresses", "a table of host name = address"),
    (BASE + '[api]\ntls_cert = "/etc/a.crt"\n', "api.tls_cert", "together"),
    (BASE + REMOTE, "remotes[0].token_env", "exactly one of token_env"),
    (BASE + REMOTE.replace("https://", "http://") + 'token_env = "T"\n', "remotes[0].url", "not an https:// URL"),
    (BASE + REMOTE.replace('"sha256:' + "ab:" * 31 + 'ab"', '"sha256:ab"') + 'token_env = "T"\n',
     "remotes[0].fingerprint", "not a SHA-256 certificate fingerprint"),
    (BASE + REMOTE + 'token_env = "T"\nwindow = "22-6"\n', "remotes[0].window", "not a window of local hours"),
    (BASE + REMOTE + 'token_env = "T"\nvms = ["a/b"]\n', "remotes[0].vms", "/"),
    (BASE + REMOTE + 'token_env = "T"\ndirection = "both"\n', "remotes[0].direction", "not one of: push, pull"),
    (BASE + REMOTE + 'token_env = "T"\n' + REMOTE + 'token_env = "U"\n', "remotes[1].name", 'already named "dr"'),
])
def test_bad_values_name_file_and_key(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    path = write(tmp_path, body.replace("{secret}", str(secret(tmp_path))))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith(f'{path}: key "{key}": '), str(caught.value)
    assert fragment in caught.value.reason, str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(("body", "fragment"), [
    ("[store\npath = 1\n", "not valid TOML"),
    ('[store]\npath = "/a"\npath = "/b"\n', "not valid TOML"),
])
def test_toml_syntax_errors_name_the_file(tmp_path: Path, body: str, fragment: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=fragment) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize(("mode", "owner", "fragment"), [
    (0o640, None, "mode 0640: group or others"),
    (0o604, None, "mode 0604"),
    (0o620, None, "mode 0620"),
    (0o600, 65534, "owned by uid 65534, not root"),
])
def test_secret_files_others_could_read_are_refused(tmp_path: Path, mode: int, owner: int | None,
                                                      fragment: str) -> None:
    if owner is not None and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    password = secret(tmp_path, mode=mode)
    if owner is not None:
        os.chown(password, owner, owner)
    path = write(tmp_path, BASE + CONNECTION + f'password_file = "{password}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f'{path}: key "vsphere.connections[0].password_file": {password}')
    assert fragment in str(caught.value)


def test_a_directory_is_no_secret_file(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(write(tmp_path, BASE + CONNECTION + f'password_file = "{folder}"\n'))


def test_password_env_is_checked_when_secrets_are_resolved_not_before(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + CONNECTION + 'password_env = "VC1_PASSWORD"\n')
    config = load_config(path)  # config check runs without the service's environment
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(config, str(path), environ={})
    assert str(caught.value) == (f'{path}: key "vsphere.connections[0].password_env": '
                                 "environment variable VC1_PASSWORD is not set or empty")
    secrets = resolve_secrets(config, str(path), environ={"VC1_PASSWORD": "pa55"})
    assert secrets["vc1"].reveal() == "pa55" and "pa55" not in repr(secrets)


def test_a_secret_file_loosened_after_the_check_is_refused_at_start(tmp_path: Path) -> None:
    password = secret(tmp_path)
    path = write(tmp_path, BASE + CONNECTION + f'password_file = "{password}"\n')
    config = load_config(path)
    password.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        resolve_secrets(config, str(path))
    password.chmod(0o600)
    password.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_secrets(config, str(path))


def test_secret_repr_hides_the_value() -> None:
    hidden = Secret("correct horse")
    assert "correct horse" not in f"{hidden!r} {hidden!s} {[hidden]}"
    assert hidden.reveal() == "correct horse"


def test_example_config_passes_config_check() -> None:
    result = run_cli("config", "check", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{EXAMPLE}: OK: {summary(load_config(EXAMPLE))}"]
    assert "NFS on 0.0.0.0:2049" in result.stdout and "FUSE at /srv/appliance/datastore" in result.stdout


@pytest.mark.parametrize(("body", "fragment"), [
    (BASE + "[nfs]\nport = 99999\n", 'key "nfs.port": 99999 is out of range 0..65535'),
    (BASE + "[nsf]\n", 'key "nsf": unknown key'),
    ("[store\n", "not valid TOML"),
    (None, "cannot read: No such file or directory"),
])
def test_config_check_errors_are_one_line(tmp_path: Path, body: str | None, fragment: str) -> None:
    path = tmp_path / "appliance.toml"
    if body is not None:
        path.write_text(body)
    result = run_cli("config", "check", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert result.stdout == "" and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"appliance: error: {path}: ") and fragment in lines[0], result.stderr


def parse_serve(monkeypatch: pytest.MonkeyPatch, *argv: str) -> ApplianceConfig:
    monkeypatch.delenv("APPLIANCE_STORE", raising=False)
    return _serve_config(build_parser().parse_args(list(argv)))


def test_serve_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, BASE + '[nfs]\nport = 3049\nmount_port = 3048\nallow = ["10.0.0.0/8"]\n'
                 'root_squash = true\n[cache]\nchunk_cache_mib = 64\n')
    from_file = parse_serve(monkeypatch, "serve", "--config", str(path))
    assert (from_file.nfs.port, from_file.nfs.root_squash, from_file.store.path) == (
        3049, True, Path("/srv/appliance/store"))
    monkeypatch.chdir(tmp_path)
    flagged = parse_serve(monkeypatch, "--store", "other", "serve", "--config", str(path), "--nfs-port", "4049",
                          "--no-root-squash", "--export-allow", "192.0.2.0/24", "--mount", "mnt", "--no-portmap")
    assert flagged.store.path == tmp_path / "other"
    assert (flagged.nfs.port, flagged.nfs.mount_port, flagged.nfs.root_squash, flagged.nfs.portmap) == (
        4049, 3048, False, False)
    assert flagged.nfs.allow == (ipaddress.ip_network("192.0.2.0/24"),)
    assert (flagged.fuse.mountpoint, flagged.cache.chunk_cache_mib) == (tmp_path / "mnt", 64)


def test_serve_without_config_takes_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_serve(monkeypatch, "--store", str(tmp_path), "serve")
    assert config.store.path == tmp_path and serve_options(config) == ServeOptions(export=Export())


@pytest.mark.parametrize(("argv", "error", "message"), [
    (["serve", "--export-allow", "10.0.0.0/33"], UsageError, "--export-allow: item 0"),
    (["serve", "--nfs-port", "70000"], UsageError, "--nfs-port: 70000 is out of range"),
    (["serve", "--mount-port", "2049"], UsageError, "--mount-port: 2049 is also the NFS port"),
    (["serve", "--export-path", "x"], UsageError, '--export-path: "x" must be an absolute path'),
    (["serve", "--cache-mib", "0"], UsageError, "--cache-mib: 0 is out of range"),
])
def test_bad_serve_flags_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                   error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        parse_serve(monkeypatch, "--store", str(tmp_path), *argv)
    assert str(caught.value).startswith(message), str(caught.value)


def test_serve_needs_a_store_or_a_config(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(Exception, match="no store given"):
        parse_serve(monkeypatch, "serve")


def test_a_bad_file_value_is_reported_against_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, BASE + "[nfs]\nread_only = 2\n")
    with pytest.raises(ConfigError, match=f'^{path}: key "nfs.read_only"'):
        parse_serve(monkeypatch, "serve", "--config", str(path), "--nfs-port", "4049")
    # ... unless a flag overrides it: the flag wins and the file's value is never used
    assert parse_serve(monkeypatch, "serve", "--config", str(path), "--read-only").nfs.read_only is True
