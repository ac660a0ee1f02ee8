#!/usr/bin/env bash
# Installs the host packages boxlite needs on Debian 12 (bookworm). Idempotent; run as root.
# QEMU comes from bookworm-backports (see shared VM notes: qemu-utils there conflicts with bookworm's 7.2).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi

need=()
for bin in qemu-system-x86_64 docker-registry skopeo umoci debootstrap cpio mke2fs mkfs.erofs \
  busybox passt htpasswd jq iperf3 xz depmod openssl python3; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
[ -e /usr/lib/x86_64-linux-gnu/libslirp.so ] || need+=(libslirp)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -eq 0 ]; then
  echo "setup-host: all host packages present"
  exit 0
fi
echo "setup-host: installing packages for: ${need[*]}"

if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  uri=${uri:-http://deb.debian.org/debian}
  $SUDO tee /etc/apt/sources.list.d/boxlite-backports.sources >/dev/null <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86
$SUDO apt-get install -y -q --no-install-recommends \
  docker-registry skopeo umoci debootstrap cpio e2fsprogs erofs-utils busybox-static passt \
  kmod libslirp-dev libslirp0 apache2-utils jq iperf3 xz-utils libc6-dev libseccomp-dev libcap-ng-dev \
  pkg-config iproute2 dnsutils python3 curl ca-certificates zstd openssl
# docker-registry's package starts a system service on :5000; tests run their own instances.
$SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
pkill -f '/usr/bin/docker-registry serve /etc/docker/registry' 2>/dev/null || true
echo "setup-host: done"
