#!/usr/bin/env bash
# Installs what the appliance, its demo, its tests and its benchmarks (tests/bench/*) need on a Debian host,
# and the project itself into ./.venv. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(qemu-utils qemu-block-extra borgbackup restic e2fsprogs zstd fuse3 libfuse3-dev pkg-config fio bindfs
      libnfs-utils rpcbind tshark systemd
      golang-go golang-github-vmware-govmomi-dev        # the vSphere tests build vcsim
      qemu-system-x86 busybox-static kmod cpio iproute2   # the QEMU boot tests build and boot a guest
      syslinux syslinux-common mtools dosfstools fdisk     # ... from its own bootloader (no loop mounts)
      nfs-ganesha nfs-ganesha-vfs                         # tests/bench/nfs.py: the peer NFS server
      xfsprogs ntfs-3g cryptsetup-bin                     # tests/test_flr.py builds XFS, NTFS and LUKS volumes
      exfatprogs exfat-fuse gcc libc6-dev                 # ... and exFAT ones (mkfs.exfat, exfat-fuse + a compiled shim)
      lvm2                                                # tests/test_flr_lvm.py checks its PVs with pvck, vgcfgrestore
      openssh-server)                                     # tests/bench/replicate.py runs its own sshd: restic's sftp peer
# The Ceph job's S3 engine (tests/ceph.py: monitor, OSD and RGW, no mgr); installed without their
# Recommends, which would add 48 packages nothing here uses (ceph-mgr, ceph-mds, their Python modules).
bare_debs=(ceph-mon ceph-osd radosgw)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
install_missing() {  # install_missing [apt-get option...] -- package...
  local options=() missing=()
  while [ "$1" != "--" ]; do options+=("$1"); shift; done
  shift
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${options[@]}" "${missing[@]}" >/dev/null
  fi
}
install_missing -- "${debs[@]}"
install_missing --no-install-recommends -- "${bare_debs[@]}"
# The QEMU boot tests `apt-get download` Debian's current kernel: they need package lists.
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,flr]'
