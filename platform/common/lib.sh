# shellcheck shell=bash
# Shared implementation of platform/<arch>-kvm/build-image.sh.
#
# The per-arch scripts only set the variables listed under "arch profile"
# below and then call `hitless_build "$@"`. Everything that decides what goes
# into a guest bundle lives here so both arches stay in lock-step.
#
# Design notes for newcomers:
# * Inputs come from Debian packages fetched with `apt-get download` (never
#   installed on the host), unpacked with `dpkg-deb -x`. The cache key is
#   computed from the SHA256 that apt's package index already knows, so a
#   cache hit does not need to download or even hash a single .deb.
# * Nothing here needs loop mounts or mknod: the initramfs is a cpio made
#   from a staging dir, and rootfs.ext4 is made with `mke2fs -d`. Running as
#   root is only needed for apt-get (and `dpkg --add-architecture arm64`).
# * The guest has two layers:
#     initrd.img  busybox + /init + the kernel modules of *this* kernel.
#                 /init stays PID 1 for the whole life of the VM: it is the
#                 supervisor that starts the daemons and handles power-down.
#     rootfs.ext4 read-only application root: Node runtime + its libs +
#                 /opt/hitless/daemons. Daemons are started chroot'ed into it.
#   Keeping the kernel modules in the initrd means the kernel can be swapped
#   (--kernel) without touching the application image layout.
#
# Arch profile (set by the caller):
#   ARCH            manifest arch: x86_64 | aarch64
#   DEB_ARCH        Debian arch: amd64 | arm64
#   TRIPLET         multiarch dir: x86_64-linux-gnu | aarch64-linux-gnu
#   DEFAULT_KERNEL  Debian kernel package
#   CONSOLE         serial console device for the kernel cmdline
#   WANTED_MODULES  modules to put into the initrd (deps are added and ordered
#                   automatically; names that the kernel builds in or does not
#                   have are skipped with a note)
#   NODE_SOURCE     host | debian  (default for --node-source)

set -euo pipefail

HITLESS_COMMON_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HITLESS_REPO_DIR="$(cd "$HITLESS_COMMON_DIR/../.." && pwd)"
CACHE_DIR="${HITLESS_CACHE_DIR:-$HITLESS_REPO_DIR/.cache}"

# Debian packages that make up the Debian-built Node runtime. Fixed list
# rather than a dependency solver: the ELF closure check in copy_elf_closure
# fails the build loudly if a library is missing, which is what matters.
# node-acorn/cjs-module-lexer/undici(+busboy,xtend): Debian's node loads these
# "builtins" from /usr/share/nodejs at runtime (acorn for the REPL/inspector,
# the lexer for ESM->CJS imports, undici for global fetch()).
DEBIAN_NODE_PKGS="nodejs libnode108 libc6 libstdc++6 libgcc-s1 libbrotli1 libc-ares2 libicu72 libnghttp2-14 libssl3 libuv1 zlib1g"
DEBIAN_NODE_ALL_PKGS="node-acorn node-xtend node-cjs-module-lexer node-undici node-busboy"

log() { printf '[build-image %s] %s\n' "${ARCH:-?}" "$*" >&2; }
die() { printf '[build-image %s] ERROR: %s\n' "${ARCH:-?}" "$*" >&2; exit 1; }

usage() {
  cat >&2 <<EOF
usage: $(basename "$0") --version V [--kernel PKG] [--daemon-dir DIR]
                        [--processes FILE] [--out DIR] [--node-source host|debian]
                        [--memory MiB] [--cpus N] [--force]
  --version V        bundle version (manifest "version", shown in HITLESS-INIT)
  --kernel PKG       Debian kernel package (default: $DEFAULT_KERNEL)
  --daemon-dir DIR   copied to /opt/hitless/daemons in the rootfs
  --processes FILE   JSON array of process entries (see platform/README.md)
  --out DIR          bundle dir (default: .cache/images/<arch>-<version>-<hash>)
  --node-source S    host: copy this machine's /usr/bin/node (x86_64 only)
                     debian: Debian's nodejs package for $DEB_ARCH
                     (default: $NODE_SOURCE)
  --force            rebuild even if a bundle with the same inputs exists
Prints progress on stderr and the bundle directory on stdout.
EOF
  exit 2
}

# ---------------------------------------------------------------- apt helpers

# apt-cache is slow here (~1 s per call, mostly loading the package lists,
# more so with a foreign arch added), so all candidate look-ups for a build
# are done in one call by apt_load and memoised in .cache/apt/, keyed on the
# package lists' and apt config's mtimes (an `apt-get update` or a pinning
# change invalidates it). This is what makes a cache hit take well under a
# second.
declare -A APT_VERSION=() APT_SHA256=() APT_FILENAME=()
apt_load() { # pkg[:arch]...
  local memo sig spec v s f
  sig="$( { echo "$*"; ls -l --time-style=+%s.%N /var/lib/apt/lists/ /etc/apt/ /etc/apt/*.d/ /var/lib/dpkg/arch 2>/dev/null; } | sha256sum | cut -c1-16)"
  memo="$CACHE_DIR/apt/candidates-$sig"
  if [ ! -f "$memo" ]; then
    mkdir -p "$CACHE_DIR/apt"
    # One stanza per requested spec, in order; arch-qualified names keep the
    # arch, "all" packages are asked for without one.
    apt-cache show --no-all-versions "$@" 2>/dev/null | awk '
      /^Package:/ {p=$2} /^Architecture:/ {a=$2} /^Version:/ {v=$2}
      /^SHA256:/ {s=$2} /^Filename:/ {f=$2}
      /^$/ { if (p != "") print p, a, v, s, f; p="" }
      END { if (p != "") print p, a, v, s, f }' > "$memo.tmp.$$"
    mv "$memo.tmp.$$" "$memo"
  fi
  local p a
  while read -r p a v s f; do
    APT_VERSION[$p:$a]="$v"; APT_SHA256[$p:$a]="$s"; APT_FILENAME[$p:$a]="$f"
    [ "$a" != all ] || { APT_VERSION[$p]="$v"; APT_SHA256[$p]="$s"; APT_FILENAME[$p]="$f"; }
  done < "$memo"
  for spec in "$@"; do
    [ -n "${APT_VERSION[$spec]:-}" ] || { rm -f "$memo"; die "package $spec not known to apt (apt-get update? dpkg --add-architecture $DEB_ARCH?)"; }
  done
}

# Field of the candidate version of a package loaded by apt_load.
apt_field() { # pkg[:arch] Version|SHA256|Filename
  case "$2" in
    Version) echo "${APT_VERSION[$1]:?$1 not loaded}" ;;
    SHA256) echo "${APT_SHA256[$1]:?$1 not loaded}" ;;
    Filename) echo "${APT_FILENAME[$1]:?$1 not loaded}" ;;
  esac
}

# Echo "<pkg> <version> <sha256>" for the candidate of pkg (used in the key).
apt_ident() { # pkg[:arch]
  echo "$1 $(apt_field "$1" Version) $(apt_field "$1" SHA256)"
}

# Download (once) the candidate .deb of pkg[:arch] into .cache/debs and echo
# its path. Files are named after the pool filename, i.e. they are unique per
# version, so a newer candidate never silently reuses an older download.
fetch_deb() { # pkg[:arch]
  local fn sha dest tmp
  fn="$(basename "$(apt_field "$1" Filename)")"; sha="$(apt_field "$1" SHA256)"
  [ -n "$fn" ] || die "package $1 not known to apt"
  dest="$CACHE_DIR/debs/$fn"
  if [ ! -f "$dest" ]; then
    mkdir -p "$CACHE_DIR/debs"
    tmp="$(mktemp -d "$CACHE_DIR/debs/.dl.XXXXXX")"
    log "downloading $1"
    # _apt cannot write into a root-owned dir; chmod keeps apt from warning.
    chmod 0777 "$tmp"
    (cd "$tmp" && apt-get download -q=2 "$1=$(apt_field "$1" Version)" >&2) || { rm -rf "$tmp"; die "apt-get download $1 failed"; }
    echo "$sha  $(ls "$tmp"/*.deb)" | sha256sum -c --quiet - >&2 || { rm -rf "$tmp"; die "checksum mismatch for $1"; }
    mv "$tmp"/*.deb "$dest"; rm -rf "$tmp"
  fi
  echo "$dest"
}

# ------------------------------------------------------------- ELF handling

# Copy an ELF file plus the transitive closure of its DT_NEEDED libraries and
# its program interpreter from a source root into the guest root. Works
# cross-arch because it uses readelf instead of ldd (we cannot execute arm64
# binaries on the build host).
#   $1 source root ("/" for the host, or a dir of unpacked .debs)
#   $2 path of the ELF inside the source root
#   $3 destination root
#   $4 path inside destination root (default: same as $2)
# Libraries keep the directory they were found in (lib/<triplet>, ...), which
# is in the guest ld.so's built-in search path, so no ld.so.cache is needed.
copy_elf_closure() {
  local src="$1" rel="$2" dst="$3" drel="${4:-$2}"
  local -A seen=()
  local queue=() f lib d found interp
  install -D -m 0755 "$(resolve_in_root "$src" "$rel")" "$dst/$drel"
  queue+=("$dst/$drel")
  interp="$(readelf -l "$dst/$drel" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
  if [ -n "$interp" ]; then
    # The interpreter path is absolute and fixed in the binary (e.g.
    # /lib64/ld-linux-x86-64.so.2, /lib/ld-linux-aarch64.so.1): recreate it.
    install -D -m 0755 "$(resolve_in_root "$src" "$interp")" "$dst$interp"
  fi
  while [ "${#queue[@]}" -gt 0 ]; do
    f="${queue[0]}"; queue=("${queue[@]:1}")
    for lib in $(readelf -d "$f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [ -n "${seen[$lib]:-}" ] && continue
      seen[$lib]=1
      found=""
      for d in lib/$TRIPLET usr/lib/$TRIPLET lib usr/lib; do
        if [ -e "$src/$d/$lib" ] || [ -L "$src/$d/$lib" ]; then found="$d"; break; fi
      done
      [ -n "$found" ] || die "cannot find $lib (needed by ${f#"$dst"/}) in $src"
      if [ ! -e "$dst/$found/$lib" ]; then
        install -D -m 0755 "$(resolve_in_root "$src" "$found/$lib")" "$dst/$found/$lib"
        queue+=("$dst/$found/$lib")
      fi
    done
  done
}

# Follow symlinks of root-relative path $2 *inside* root $1 (absolute link
# targets are relative to the root, not to the build host).
resolve_in_root() { # root path
  local root="${1%/}" p="${2#/}" t n=0
  while [ -L "$root/$p" ]; do
    t="$(readlink "$root/$p")"
    case "$t" in
      /*) p="${t#/}" ;;
      *) p="$(dirname "$p")/$t" ;;
    esac
    n=$((n + 1)); [ $n -lt 40 ] || die "symlink loop at $2"
  done
  [ -e "$root/$p" ] || die "missing $2 in $root"
  echo "$root/$p"
}

# ----------------------------------------------------------- kernel modules

# Echo the module names (basename without .ko) that $1 needs, from the
# .modinfo section ("depends=a,b"). Avoids needing kmod's modinfo on the host.
ko_depends() { strings -a "$1" | sed -n 's/^depends=//p' | tr ',' ' '; }

# Resolve WANTED_MODULES + dependencies against the unpacked kernel tree and
# echo them in load order (dependencies first). There is no modules.dep in
# the cloud kernel packages (depmod runs in postinst), and busybox insmod
# does not resolve dependencies, so the order we emit is the order /init uses.
resolve_modules() { # moddir
  local moddir="$1" m
  local -A path=() state=()
  local order=()
  while IFS= read -r m; do
    path[$(basename "$m" .ko)]="$m"
  done < <(find "$moddir" -name '*.ko')
  visit() {
    local name="$1" dep
    case "${state[$name]:-}" in done) return ;; visiting) die "module dependency cycle at $name" ;; esac
    state[$name]=visiting
    for dep in $(ko_depends "${path[$name]}"); do
      [ -n "${path[$dep]:-}" ] || die "module $name depends on $dep which is not in the package"
      visit "$dep"
    done
    state[$name]=done
    order+=("$name")
  }
  for m in $WANTED_MODULES; do
    if [ -n "${path[$m]:-}" ]; then
      visit "$m"
    elif grep -qE "/$m\.ko\$" "$moddir"/modules.builtin 2>/dev/null; then
      log "module $m is built into this kernel"
    else
      log "module $m not available in this kernel (skipped)"
    fi
  done
  for m in "${order[@]}"; do echo "$m ${path[$m]}"; done
}

# --------------------------------------------------------------- hashing

hash_dir() { # dir -> sha256 over relative paths, modes and contents
  local d="$1"
  (cd "$d" && find . \( -type f -o -type l \) -print0 | LC_ALL=C sort -z |
    while IFS= read -r -d '' f; do
      if [ -L "$f" ]; then echo "L $f $(readlink "$f")"; else echo "F $f $(stat -c %a "$f") $(sha256sum < "$f" | cut -c1-64)"; fi
    done) | sha256sum | cut -c1-64
}

# ------------------------------------------------------------------- main

hitless_build() {
  local version="" kernel="$DEFAULT_KERNEL" daemon_dir="" processes="" out="" force=0
  local node_source="$NODE_SOURCE" memory=256 cpus=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --version) version="${2:?}"; shift 2 ;;
      --kernel) kernel="${2:?}"; shift 2 ;;
      --daemon-dir) daemon_dir="${2:?}"; shift 2 ;;
      --processes) processes="${2:?}"; shift 2 ;;
      --out) out="${2:?}"; shift 2 ;;
      --node-source) node_source="${2:?}"; shift 2 ;;
      --memory) memory="${2:?}"; shift 2 ;;
      --cpus) cpus="${2:?}"; shift 2 ;;
      --force) force=1; shift ;;
      -h|--help) usage ;;
      *) log "unknown argument: $1"; usage ;;
    esac
  done
  [ -n "$version" ] || { log "--version is required"; usage; }
  [[ "$version" =~ ^[A-Za-z0-9._+-]+$ ]] || die "version must match [A-Za-z0-9._+-]+"
  [ -z "$daemon_dir" ] || [ -d "$daemon_dir" ] || die "--daemon-dir $daemon_dir is not a directory"
  [ -z "$processes" ] || [ -f "$processes" ] || die "--processes $processes not found"
  case "$node_source" in
    host) [ "$DEB_ARCH" = "$(dpkg --print-architecture)" ] || die "--node-source host only works when building for the host arch" ;;
    debian) ;;
    *) die "--node-source must be host or debian" ;;
  esac
  for tool in apt-get apt-cache dpkg-deb readelf strings cpio gzip mke2fs node sha256sum; do
    command -v "$tool" >/dev/null || die "missing host tool: $tool"
  done
  local t0; t0=$(date +%s.%N)

  # ---- cache key: everything that can change the bundle's bytes
  local specs="$kernel:$DEB_ARCH busybox-static:$DEB_ARCH" p
  if [ "$node_source" = debian ]; then
    for p in $DEBIAN_NODE_PKGS; do specs="$specs $p:$DEB_ARCH"; done
    specs="$specs $DEBIAN_NODE_ALL_PKGS"
  fi
  # shellcheck disable=SC2086
  apt_load $specs
  if [ "$node_source" = debian ] && [[ "$(apt_field "nodejs:$DEB_ARCH" Version)" == *nodesource* ]]; then
    # A locally installed nodesource package (priority 100) wins apt's
    # candidate selection for the host arch; its layout is not Debian's.
    die "apt's nodejs:$DEB_ARCH candidate is a nodesource build; use --node-source host"
  fi
  local keyfile; keyfile="$(mktemp)"
  # shellcheck disable=SC2064
  trap "rm -f '$keyfile'" EXIT
  {
    echo "bundle-format 1"
    echo "arch $ARCH version $version memory $memory cpus $cpus node-source $node_source"
    apt_ident "$kernel:$DEB_ARCH"
    apt_ident "busybox-static:$DEB_ARCH"
    if [ "$node_source" = host ]; then
      # The host node binary and the exact host libs it links against.
      echo "host-node $(sha256sum < "$(readlink -f /usr/bin/node)" | cut -c1-64)"
      ldd /usr/bin/node | awk '/=>/ {print $3} /^\t\// {print $1}' | sort -u | while read -r l; do
        echo "host-lib $l $(sha256sum < "$(readlink -f "$l")" | cut -c1-64)"; done
    else
      for p in $DEBIAN_NODE_PKGS; do apt_ident "$p:$DEB_ARCH"; done
      for p in $DEBIAN_NODE_ALL_PKGS; do apt_ident "$p"; done
    fi
    echo "daemon-dir ${daemon_dir:+$(hash_dir "$daemon_dir")}"
    echo "processes ${processes:+$(sha256sum < "$processes" | cut -c1-64)}"
    # The build scripts themselves (this dir + the per-arch wrapper).
    echo "scripts $(hash_dir "$HITLESS_COMMON_DIR") $(sha256sum < "$HITLESS_SCRIPT" | cut -c1-64)"
  } > "$keyfile"
  local key; key="$(sha256sum < "$keyfile" | cut -c1-64)"
  local short="${key:0:12}"
  [ -n "$out" ] || out="$CACHE_DIR/images/$ARCH-$version-$short"
  mkdir -p "$(dirname "$out")"; out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

  if [ "$force" = 0 ] && [ -f "$out/manifest.json" ] &&
     [ "$(node -e 'process.stdout.write(require(process.argv[1]).build?.key || "")' "$out/manifest.json")" = "$key" ]; then
    log "cache hit: $out (key $short) in $(awk "BEGIN{printf \"%.2f\", $(date +%s.%N)-$t0}")s"
    echo "$out"; return 0
  fi
  log "cache miss: building $out (key $short)"

  # ---- staging
  local work; work="$(mktemp -d "${TMPDIR:-/tmp}/hitless-build.XXXXXX")"
  # Build into a temp dir next to the target and rename at the end, so a
  # failed or interrupted build never leaves a half bundle that looks valid.
  local stage="$out.tmp.$$"
  # shellcheck disable=SC2064
  trap "rm -rf '$work' '$keyfile' '$stage'" EXIT
  rm -rf "$stage"; mkdir -p "$stage"
  local ird="$work/initrd" rfs="$work/rootfs"
  mkdir -p "$ird" "$rfs"

  # ---- kernel
  local kdeb; kdeb="$(fetch_deb "$kernel:$DEB_ARCH")"
  log "unpacking $kernel"
  dpkg-deb -x "$kdeb" "$work/kernel"
  local kimg; kimg="$(ls "$work"/kernel/boot/vmlinuz-* 2>/dev/null | head -1)"
  [ -n "$kimg" ] || die "$kernel has no /boot/vmlinuz-*"
  local krel; krel="$(basename "$kimg")"; krel="${krel#vmlinuz-}"
  if [ "$ARCH" = aarch64 ] && [ "$(head -c2 "$kimg" | od -An -tx1 | tr -d ' ')" != 1f8b ]; then
    # Debian's arm64 vmlinuz is an uncompressed Image (~32 MB; the EFI stub
    # needs that). QEMU's -kernel loader gunzips arm64 Images itself, so ship
    # it gzipped (~1/3 of the size).
    gzip -n -9 < "$kimg" > "$stage/vmlinuz"
  else
    cp "$kimg" "$stage/vmlinuz"
  fi

  # ---- initramfs: busybox + /init + modules
  local bbdeb; bbdeb="$(fetch_deb "busybox-static:$DEB_ARCH")"
  dpkg-deb -x "$bbdeb" "$work/busybox"
  mkdir -p "$ird"/{bin,dev,proc,sys,run,tmp,newroot,etc/hitless,etc/acpi/PWRF,lib/modules/"$krel"}
  install -m 0755 "$work/busybox/bin/busybox" "$ird/bin/busybox"
  # /init installs the applet symlinks itself at boot (busybox --install),
  # so we never need to execute a foreign-arch busybox on the build host.
  ln -s busybox "$ird/bin/sh"
  install -m 0755 "$HITLESS_COMMON_DIR/init.sh" "$ird/init"
  # busybox acpid runs /etc/acpi/PWRF/00000080 on KEY_POWER (see init.sh).
  install -m 0755 "$HITLESS_COMMON_DIR/power-button.sh" "$ird/etc/acpi/PWRF/00000080"
  local mods; mods="$(resolve_modules "$work/kernel/lib/modules/$krel")"
  : > "$ird/etc/hitless/modules.list"
  local name kopath
  while read -r name kopath; do
    [ -n "$name" ] || continue
    cp "$kopath" "$ird/lib/modules/$krel/$name.ko"
    echo "$name" >> "$ird/etc/hitless/modules.list"
  done <<< "$mods"
  log "modules (load order): $(tr '\n' ' ' < "$ird/etc/hitless/modules.list")"
  {
    echo "HITLESS_VERSION='$version'"
    echo "HITLESS_ARCH='$ARCH'"
    echo "HITLESS_BUILD_KEY='$short'"
  } > "$ird/etc/hitless/bundle.env"

  # ---- rootfs: node runtime + daemons
  mkdir -p "$rfs"/{proc,sys,dev,tmp,run,etc/hitless,opt/hitless/daemons}
  if [ "$node_source" = host ]; then
    log "node runtime: host /usr/bin/node ($(node --version))"
    copy_elf_closure / usr/bin/node "$rfs" opt/hitless/node
    # nodesource ships node with debug info (~12 MB); the guest never needs it.
    strip --strip-all "$rfs/opt/hitless/node" 2>/dev/null || true
  else
    local p nroot="$work/noderoot"
    mkdir -p "$nroot"
    local deb
    for p in $DEBIAN_NODE_PKGS; do deb="$(fetch_deb "$p:$DEB_ARCH")"; dpkg-deb -x "$deb" "$nroot"; done
    for p in $DEBIAN_NODE_ALL_PKGS; do deb="$(fetch_deb "$p")"; dpkg-deb -x "$deb" "$nroot"; done
    log "node runtime: Debian nodejs $(apt_field "nodejs:$DEB_ARCH" Version)"
    copy_elf_closure "$nroot" usr/bin/node "$rfs"
    ln -s ../../usr/bin/node "$rfs/opt/hitless/node"
    # The JS "builtins" Debian's node loads from disk (see DEBIAN_NODE_ALL_PKGS).
    if [ -d "$nroot/usr/share/nodejs" ]; then
      mkdir -p "$rfs/usr/share"
      cp -a "$nroot/usr/share/nodejs" "$rfs/usr/share/nodejs"
      find "$rfs/usr/share/nodejs" \( -iname '*.md' -o -iname 'LICENSE*' -o -iname '*.d.ts' -o -iname '*.map' \) -delete
    fi
  fi
  # glibc only consults /etc/hosts for "localhost" if these exist.
  printf '127.0.0.1 localhost\n::1 localhost\n' > "$rfs/etc/hosts"
  printf 'hosts: files\n' > "$rfs/etc/nsswitch.conf"
  if [ -n "$daemon_dir" ]; then
    cp -a "$daemon_dir/." "$rfs/opt/hitless/daemons/"
  fi

  # ---- manifest + processes.sh (validation and JSON in one node script)
  local procjson="${processes:-$work/no-processes.json}"
  [ -n "$processes" ] || echo '[]' > "$procjson"
  node "$HITLESS_COMMON_DIR/gen-processes.js" "$procjson" "$rfs/etc/hitless/processes.sh" "$rfs"
  cp "$procjson" "$rfs/etc/hitless/processes.json"

  # ---- pack initrd
  log "packing initrd.img"
  (cd "$ird" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -n -9 > "$stage/initrd.img"

  # ---- pack rootfs.ext4 (no journal: it is always mounted read-only)
  log "packing rootfs.ext4"
  local kb; kb="$(du -sk --apparent-size "$rfs" | cut -f1)"
  local files; files="$(find "$rfs" | wc -l)"
  # 4 KiB blocks: per-file rounding (~2 KiB avg) + 8% metadata + 4 MiB slack.
  local size_kb=$(( (kb + files * 4 + kb / 12 + 4096) / 4 * 4 ))
  mke2fs -q -F -t ext4 -b 4096 -m 0 -O ^has_journal,^resize_inode -L hitless-root \
    -U clear -E root_owner=0:0,hash_seed=6c5c6b27-4bd8-4b87-9c4b-9b1b3a8d2f00 \
    -d "$rfs" "$stage/rootfs.ext4" "${size_kb}k" >&2 ||
    die "mke2fs failed (size ${size_kb}k for ${kb}k of files)"

  # ---- manifest
  node "$HITLESS_COMMON_DIR/gen-manifest.js" \
    --stage "$stage" --version "$version" --arch "$ARCH" --kernel-release "$krel" \
    --kernel-package "$kernel" --kernel-package-version "$(apt_field "$kernel:$DEB_ARCH" Version)" \
    --cmdline "console=$CONSOLE panic=-1 quiet" --console "$CONSOLE" \
    --memory "$memory" --cpus "$cpus" --processes "$procjson" \
    --node-version "$(node_version_of "$node_source" "$rfs")" --node-source "$node_source" \
    --key "$key" --inputs "$keyfile" > "$stage/manifest.json"

  rm -rf "$out"; mv "$stage" "$out"
  log "built in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N)-$t0}")s:"
  (cd "$out" && for f in vmlinuz initrd.img rootfs.ext4; do log "  $f $(du -h --apparent-size "$f" | cut -f1) ($(du -h "$f" | cut -f1) on disk)"; done)
  echo "$out"
}

# Node version string without running a foreign-arch binary: the host binary
# can simply be asked; for Debian's node we take the package version.
node_version_of() { # source rootfs
  if [ "$1" = host ]; then node --version; else echo "v$(apt_field "nodejs:$DEB_ARCH" Version | sed 's/[+~].*//')"; fi
}
