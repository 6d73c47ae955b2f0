#!/usr/bin/env bash
# Sets up this machine for hull and runs it: installs the Debian packages hull
# needs, builds hull in release mode, starts hulld with its inner container
# (`hull up`) and opens a console into it. Run as root.
#
#   ./hull.sh            set up, start, and open a console
#   ./hull.sh up         set up and start only
#   ./hull.sh <args>     any other hull command, e.g. ./hull.sh status
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
  echo "hull.sh: hull manages namespaces, mounts and cgroups; run it as root" >&2
  exit 1
fi

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v mkfs.btrfs >/dev/null || missing+=(btrfs-progs)
command -v nft >/dev/null || missing+=(nftables)
if [ ${#missing[@]} -gt 0 ]; then
  echo "hull.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo build --release --bins -q
hull=./target/release/hull

case "${1:-}" in
  "")
    "$hull" up
    exec "$hull" console
    ;;
  *)
    exec "$hull" "$@"
    ;;
esac
