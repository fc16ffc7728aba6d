#!/usr/bin/env bash
# Builds the guest image bundles the VM tests and demos boot:
#   x86_64  1.0.0  kernel linux-image-6.1.0-47-cloud-amd64, daemons report version 1.0.0
#   x86_64  2.0.0  kernel linux-image-6.1.0-50-cloud-amd64, daemons report version 2.0.0
#   aarch64 1.0.0  kernel linux-image-6.1.0-47-arm64, daemons report version 1.0.0
#   aarch64 2.0.0  kernel linux-image-6.1.0-50-arm64, daemons report version 2.0.0
# (arm64 takes the generic flavour, not -cloud-: see platform/arm64-kvm/build-image.sh.)
#
# Steps: bundle the example daemons (examples/bgp-rib, examples/ospf-lsdb) with esbuild into
# one self-contained CommonJS file each (platform node, target node18: the arm64 guest runs
# Debian's Node 18) but for koffi (the TCP repair FFI: its x64 and arm64 binaries go in
# node_modules/koffi next to them), put proto/ next to them (agent/grpc/proto.ts finds <dir of the bundle>/proto
# by itself, so the guest needs no HITLESS_PROTO_DIR), write one processes JSON per version, and
# call platform/<arch>-kvm/build-image.sh for each bundle.
#
# Guest processes (image manifest): only `bgp`, with no --role: the role comes from the kernel
# cmdline (hitless.role=active|standby -> env HITLESS_ROLE, set by the guest init; unset = the
# daemon's default, active). An active loads 20000 routes and churns 2000 changes/s
# (--records 20000 --churn 2000) and publishes a fixed FIB of 1000 routes (--fib 1000, table
# "fib", toward the test network's receiver: see harness/netlab.ts); a standby's churn timer
# idles until it is promoted. The active also speaks BGP (AS 65001, from the control-plane NIC's
# 203.0.113.2) to a peer at 198.51.100.2 (AS 65000: BIRD in the test network's receiver
# namespace), announcing 192.0.2.0/24 and 2001:db8:1::/64 with the data plane's port2 addresses
# as next hops; without that network it keeps trying to connect, and nothing else changes.
# 1.0.0 writes and reads schema 1; 2.0.0 writes schema 2 and registers the transforms 1->2 and
# 2->1 (examples/bgp-rib/daemon.ts --schema 2). ospf.js is in the image but not started.
#
# Caching: the daemon dir is rebuilt in place (esbuild output is deterministic) and the build
# scripts key their bundles on its content hash, so a re-run with unchanged inputs is a cache
# hit for every bundle (a few seconds in total).
#
# Output: progress on stderr; on stdout one JSON object {"x86_64-1.0.0": DIR, ...} (also
# written to .cache/guest/images/guest-images.json).
#
# usage: scripts/build-guest-images.sh [--only x86_64-1.0.0,...] [--force]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
ONLY=""
FORCE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="${2:?}"; shift 2 ;;
    --force) FORCE=(--force); shift ;;
    # The whole header comment, whatever its length (a fixed line range cut it short).
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "build-guest-images: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { printf '[build-guest-images] %s\n' "$*" >&2; }

ESBUILD="$REPO/node_modules/.bin/esbuild"
[ -x "$ESBUILD" ] || { log "esbuild missing: run npm ci (it is a devDependency)"; exit 1; }
# A cache of our own (bundles under $CACHE/images/): other tools clear .cache/images while
# timing cold builds, which must not pull a bundle from under a running VM or test. Downloaded
# .debs are shared by hard links with .cache/debs (no second download).
CACHE="${HITLESS_GUEST_CACHE_DIR:-$REPO/.cache/guest}"
export HITLESS_CACHE_DIR="$CACHE"
WORK="$CACHE/daemons-build"
mkdir -p "$WORK" "$CACHE/debs"
if [ -d "$REPO/.cache/debs" ]; then cp -aln "$REPO/.cache/debs/." "$CACHE/debs/" 2>/dev/null || true; fi

# One daemon dir per daemon version: the bundles are identical, the processes file differs.
DAEMONS="$WORK/daemons"
mkdir -p "$DAEMONS.new"
for d in bgp:examples/bgp-rib/daemon.ts ospf:examples/ospf-lsdb/daemon.ts; do
  name="${d%%:*}"; src="${d#*:}"
  # --log-level=warning: esbuild notes that require.resolve('grpc-health-check/...') in
  # agent/grpc/proto.ts stays a runtime call; in the guest it fails and is handled.
  # koffi (the FFI behind TCP repair, agent/sdk/tcp-repair.ts) loads a native binary: it stays a
  # runtime require, resolved from node_modules/koffi next to the bundles.
  "$ESBUILD" "$src" --bundle --platform=node --target=node18 --format=cjs --log-level=error \
    --legal-comments=none --external:koffi --outfile="$DAEMONS.new/$name.js"
done
# koffi with the prebuilt binaries of the two guest architectures only (3 MB instead of 28).
KOFFI="$REPO/node_modules/koffi"
[ -f "$KOFFI/build/koffi/linux_x64/koffi.node" ] || { log "node_modules/koffi is missing: run npm ci"; exit 1; }
mkdir -p "$DAEMONS.new/node_modules/koffi/build/koffi"
cp "$KOFFI/package.json" "$KOFFI/index.js" "$KOFFI/LICENSE.txt" "$DAEMONS.new/node_modules/koffi/"
cp -r "$KOFFI/build/koffi/linux_x64" "$KOFFI/build/koffi/linux_arm64" "$DAEMONS.new/node_modules/koffi/build/koffi/"
mkdir -p "$DAEMONS.new/proto"
cp -r proto/. "$DAEMONS.new/proto/"
# Replace only when something changed, so the directory (and its hash) is stable.
if [ -d "$DAEMONS" ] && diff -r -q "$DAEMONS" "$DAEMONS.new" >/dev/null 2>&1; then
  rm -rf "$DAEMONS.new"
else
  rm -rf "$DAEMONS"; mv "$DAEMONS.new" "$DAEMONS"
  log "daemons bundled into $DAEMONS ($(du -sh "$DAEMONS" | cut -f1))"
fi

processes() { # version -> path of the processes JSON
  # No --role: the kernel cmdline decides (hitless.role= -> env HITLESS_ROLE; the daemon's
  # default is active). 1.x writes/reads schema 1; 2.x writes schema 2 (path attributes + a
  # received-at word, see examples/bgp-rib/daemon.ts) and converts both ways.
  local v="$1" f="$WORK/processes-$1.json" sargs smeta
  case "$v" in
    1.*) sargs='"--schema", "1"'
         smeta='"schemaWrites": 1, "schemaReads": [1]' ;;
    2.*) sargs='"--schema", "2", "--reads", "1,2"'
         smeta='"schemaWrites": 2, "schemaReads": [1, 2], "transforms": ["1->2", "2->1"]' ;;
    *) log "no processes definition for version $v"; exit 1 ;;
  esac
  cat > "$f.new" <<EOF
[
  {
    "name": "bgp",
    "command": ["/opt/hitless/node", "/opt/hitless/daemons/bgp.js", "--version", "$v", $sargs,
                "--records", "20000", "--churn", "2000", "--fib", "1000", "--json-only", "--loop-stats", "10",
                "--bgp-peer", "198.51.100.2:65000", "--bgp-as", "65001", "--bgp-router-id", "203.0.113.2",
                "--bgp-announce", "192.0.2.0/24,2001:db8:1::/64", "--bgp-next-hop", "198.51.100.1,2001:db8:2::1"],
    $smeta
  }
]
EOF
  if cmp -s "$f.new" "$f"; then rm -f "$f.new"; else mv "$f.new" "$f"; fi
  echo "$f"
}

declare -A OUT=()
build() { # key script version [extra args]
  local key="$1" script="$2" version="$3"; shift 3
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$key,"* ]]; then return 0; fi
  local dir
  dir="$(bash "$script" --version "$version" --daemon-dir "$DAEMONS" --processes "$(processes "$version")" "${FORCE[@]}" "$@" | tail -n 1)"
  [ -f "$dir/manifest.json" ] || { log "$script produced no bundle for $key"; exit 1; }
  OUT[$key]="$dir"
  log "$key: $dir"
}
build x86_64-1.0.0 platform/x86-kvm/build-image.sh 1.0.0 --kernel linux-image-6.1.0-47-cloud-amd64
build x86_64-2.0.0 platform/x86-kvm/build-image.sh 2.0.0 --kernel linux-image-6.1.0-50-cloud-amd64
build aarch64-1.0.0 platform/arm64-kvm/build-image.sh 1.0.0 --kernel linux-image-6.1.0-47-arm64
build aarch64-2.0.0 platform/arm64-kvm/build-image.sh 2.0.0 --kernel linux-image-6.1.0-50-arm64

json="{"
sep=""
for k in $(printf '%s\n' "${!OUT[@]}" | sort); do json="$json$sep\"$k\": \"${OUT[$k]}\""; sep=", "; done
json="$json}"
mkdir -p "$CACHE/images"
[ -n "$ONLY" ] || echo "$json" > "$CACHE/images/guest-images.json"
echo "$json"
