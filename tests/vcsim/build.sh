#!/usr/bin/env bash
# Builds the vcsim launcher (main.go) with our simulator additions (every other .go
# file here, compiled into govmomi's simulator package) and prints the
# binary's path. Offline: Debian's golang-go and golang-github-vmware-govmomi-dev in
# GOPATH mode, no module proxy. The binary is cached under a key made of the Go
# sources, this script and the toolchain's and govmomi's versions, so only a change
# to one of them rebuilds (about 10 s on two cores, cold); concurrent test runs wait
# for one build instead of racing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${VCSIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance-vcsim}
simulator=/usr/share/gocode/src/github.com/vmware/govmomi/simulator

for tool in go dpkg-query flock; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (deploy/dev-setup.sh installs golang-go)" >&2; exit 1; }
done
[ -d "$simulator" ] || { echo "build.sh: $simulator missing (apt-get install golang-github-vmware-govmomi-dev)" >&2; exit 1; }

key=$( { cat "$here"/*.go "$0"; go version; dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev; } \
       | sha256sum | cut -c1-16)
binary=$cache/vcsim-$key

mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
if [ ! -x "$binary" ]; then
  overlay=$cache/overlay-$key.json
  # Every Go file here but the launcher joins the simulator package, as appliance_<name>.
  entries=()
  for source in "$here"/*.go; do
    [ "$(basename "$source")" = main.go ] && continue
    entries+=("$(printf '"%s/appliance_%s": "%s"' "$simulator" "$(basename "$source")" "$source")")
  done
  (IFS=,; printf '{"Replace": {%s}}\n' "${entries[*]}") >"$overlay"
  GO111MODULE=off GOPATH="$cache/gopath:/usr/share/gocode" GOPROXY=off GOFLAGS= GOCACHE="$cache/go-build" \
    go build -overlay "$overlay" -o "$binary.tmp" "$here/main.go" >&2
  mv "$binary.tmp" "$binary"
  # Other keys' binaries go once a day old: another worktree's tests may still run theirs.
  find "$cache" -mindepth 1 -maxdepth 1 -type f \( -name 'vcsim-*' -o -name 'overlay-*.json' \) ! -name "*-$key*" -mtime +1 -delete
fi
echo "$binary"
