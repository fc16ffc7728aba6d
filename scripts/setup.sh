#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks for hitless: Debian packages (QEMU for x86-64 and
# arm64, busybox-static and kernel tooling for guest images, socat for the guest channel,
# iproute2 for QEMU's private network namespace, Redis for the benchmark peer, systemd-analyze to
# check the service unit, headless Chromium to test the upgrade report page) and the npm
# packages from package-lock.json. Idempotent: packages that are present are not touched. Run as
# root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

packages=(qemu-system-x86 qemu-system-arm qemu-utils busybox-static socat iproute2 e2fsprogs cpio xz-utils zstd
  redis-server python3-grpcio python3-grpc-tools ca-certificates systemd chromium bird2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# arm64 guest images are built from Debian's arm64 packages (kernel, busybox, nodejs).
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup: adding the arm64 architecture for guest image packages" >&2
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
fi
# The test-suite's Redis is started by the benchmark itself; the packaged service is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
  $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
# Likewise BIRD: the tests and the demo run their own in network namespaces they make. Only a
# service this script just installed is stopped; one that was there before is left alone.
if [[ " ${missing[*]} " == *" bird2 "* ]] && command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet bird 2>/dev/null; then
  $SUDO systemctl disable --now bird >/dev/null 2>&1 || true
fi

echo "setup: npm ci" >&2
npm ci --no-audit --no-fund
