#!/usr/bin/env bash
# Installs hitless on this host as a service: the built agent and CLI under PREFIX, `hitlessd`
# and `issu` commands in BINDIR, the systemd unit, and the operators' group. Run from a built
# tree (npm ci && npm run build), as root. Idempotent: running it again replaces the files.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<USAGE
Usage: scripts/install.sh [options]

Options:
  --prefix DIR     where the agent's files go (default /opt/hitless)
  --bin-dir DIR    where the hitlessd and issu commands go (default /usr/local/bin)
  --unit-dir DIR   where hitlessd.service goes (default /etc/systemd/system)
  --group NAME     group that may use the agent's socket; created if missing (default hitless)
  --no-start       install only; do not enable or start the service
  -h, --help       this text

After installing: add operators to the group (usermod -aG hitless NAME), put agent options in
/etc/default/hitlessd as HITLESSD_OPTS="..." (see 'hitlessd --help'), then
'systemctl restart hitlessd'. The CLI finds the agent at /run/hitless/agent.sock.
USAGE
}

prefix=/opt/hitless bindir=/usr/local/bin unitdir=/etc/systemd/system group=hitless start=1
while (($#)); do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --bin-dir) bindir=$2; shift 2 ;;
    --unit-dir) unitdir=$2; shift 2 ;;
    --group) group=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ ! -f dist/agent/main.js ]]; then
  echo "install: no built agent here (dist/agent/main.js); run 'npm ci && npm run build' first" >&2
  exit 1
fi
if ! getent group "$group" >/dev/null; then
  echo "install: creating group $group" >&2
  groupadd --system "$group"
fi

echo "install: agent files -> $prefix" >&2
mkdir -p "$prefix" "$bindir" "$unitdir"
rm -rf "$prefix/dist" "$prefix/node_modules"
cp -a dist proto platform package.json package-lock.json README.md "$prefix/"
# Runtime dependencies only (native modules as built here): copy, then drop the dev tooling.
mkdir -p "$prefix/node_modules" && cp -a node_modules/. "$prefix/node_modules/"
(cd "$prefix" && npm prune --omit=dev --no-audit --no-fund --offline >/dev/null)

node=$(command -v node)
for cmd in hitlessd:agent/main.js issu:agent/cli/issu.js; do
  name=${cmd%%:*} file=${cmd#*:}
  # The Node flags on the program's first line (#!/usr/bin/env -S node FLAGS), as when run directly.
  flags=$(sed -n '1s|^#!/usr/bin/env -S node||p' "dist/$file")
  cat > "$bindir/$name" <<WRAPPER
#!/bin/sh
# Installed by hitless scripts/install.sh.
export HITLESS_GRPC_SOCKET="\${HITLESS_GRPC_SOCKET:-/run/hitless/agent.sock}"
exec $node$flags $prefix/dist/$file "\$@"
WRAPPER
  chmod 0755 "$bindir/$name"
done

sed -e "s|@PREFIX@|$prefix|g" -e "s|@BINDIR@|$bindir|g" -e "s|@GROUP@|$group|g" \
  deploy/systemd/hitlessd.service.in > "$unitdir/hitlessd.service"
chmod 0644 "$unitdir/hitlessd.service"
echo "install: unit -> $unitdir/hitlessd.service" >&2

if ((start)) && [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  systemctl enable --now hitlessd.service
  echo "install: hitlessd enabled and started; 'issu show platform' to see the host" >&2
elif ((start)); then
  echo "install: systemd is not running on this host; start the agent with $bindir/hitlessd" >&2
fi
