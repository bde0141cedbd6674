#!/usr/bin/env bash
# Installs the appliance as a service on a Debian host (12 or later), from this checkout:
#   Debian packages -> /opt/appliance/venv (the project, not editable) -> /etc/appliance
#   (example config, 0640, never overwritten) -> the store and mount point named in that
#   config -> /etc/systemd/system/appliance.service, enabled (started at next boot, or now
#   with `systemctl start appliance`).
# Idempotent: a second run changes only what is missing or outdated.
# --dry-run prints the commands it would run (prefixed "+") and changes nothing; it needs
# neither root nor systemd.
set -euo pipefail

usage() { echo "usage: $0 [--dry-run]" >&2; exit 2; }
dry_run=false
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=true ;;
    *) usage ;;
  esac
done

source_dir=$(cd "$(dirname "$0")/.." && pwd)
venv=/opt/appliance/venv
config_dir=/etc/appliance
config=$config_dir/appliance.toml
unit=/etc/systemd/system/appliance.service
# python3-venv/-dev and gcc build the venv and pyfuse3; fuse3 provides fusermount3;
# rpcbind is the portmapper ESXi asks for the NFS ports.
debs=(python3 python3-venv python3-dev gcc pkg-config libfuse3-dev fuse3 rpcbind)

run() {
  if $dry_run; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

if ! $dry_run && [ "$(id -u)" -ne 0 ]; then
  echo "$0: run as root (or with --dry-run)" >&2
  exit 1
fi

missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  run apt-get update -qq
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

[ -x "$venv/bin/python" ] || run python3 -m venv "$venv"
run "$venv/bin/python" -m pip install -q --upgrade pip
run "$venv/bin/python" -m pip install -q --upgrade "$source_dir"

run install -d -m 0750 -o root -g root "$config_dir"
if [ -e "$config" ]; then
  echo "keeping $config (the example is $source_dir/deploy/appliance.toml)"
else
  run install -m 0640 -o root -g root "$source_dir/deploy/appliance.toml" "$config"
fi
# Before the service can start: the configuration must pass, and its store and FUSE mount
# point must exist. In a dry run nothing is installed yet, so read the example.
read_config=$config
[ -e "$read_config" ] || read_config=$source_dir/deploy/appliance.toml
config_value() {  # config_value SECTION KEY: the value in the config, empty when absent
  python3 -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb")).get(sys.argv[2], {}).get(sys.argv[3], ""))' \
    "$read_config" "$1" "$2"
}
store=$(config_value store path)
mountpoint=$(config_value fuse mountpoint)
run "$venv/bin/appliance" config check "$config"
if [ -z "$store" ]; then
  echo "$0: $read_config gives no store.path" >&2
  exit 2
elif [ -e "$store/config" ]; then
  echo "keeping the store at $store"
else
  # umask 077: VM backups are for root only (the service runs with UMask=0077 too).
  [ -d "$(dirname "$store")" ] || run install -d -m 0700 -o root -g root "$(dirname "$store")"
  (umask 077 && run "$venv/bin/appliance" --store "$store" init)
fi
if [ -n "$mountpoint" ] && [ ! -d "$mountpoint" ]; then
  run install -d -m 0755 -o root -g root "$mountpoint"
fi

if ! cmp -s "$source_dir/deploy/appliance.service" "$unit"; then
  run install -m 0644 -o root -g root "$source_dir/deploy/appliance.service" "$unit"
  # Not when building an image without systemd running: enable below works offline.
  if [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
  fi
fi
run systemctl enable appliance.service
if systemctl is-active --quiet appliance.service 2>/dev/null; then
  echo "appliance.service is running: restart it to use what was installed (systemctl restart appliance)"
fi
