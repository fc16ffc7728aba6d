/**
 * Test fixtures for the VM layer: where the guest images come from, a per-test state dir,
 * and a QEMU reaper so no test leaves a QEMU behind even when it fails.
 *
 * Guest source (one-line switch, GUEST_SOURCE below):
 *  - 'bundle': the real image bundles from platform/<id>/build-image.sh (manifest.json,
 *    vmlinuz, initrd.img, rootfs.ext4), whose init prints HITLESS-INIT and handles powerdown.
 *  - 'testguest': a throwaway guest built here from Debian's cloud kernel + busybox-static
 *    (apt-get download, no root filesystem build): init prints the same HITLESS-INIT marker
 *    and powers off on the ACPI power button (x86). Cached under /tmp/hitless-testguest.
 *  - 'prefer-bundle': bundle when the build script succeeds, else testguest.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Arch, VmLogger } from '../../agent/vm/hypervisor';

type GuestSource = 'bundle' | 'testguest' | 'prefer-bundle';
const SOURCES: readonly GuestSource[] = ['bundle', 'testguest', 'prefer-bundle'];
/** The one-line switch; HITLESS_TEST_GUEST=bundle|testguest|prefer-bundle overrides it per run. */
const DEFAULT_GUEST_SOURCE: GuestSource = 'prefer-bundle';
const envSource = SOURCES.find((s) => s === process.env.HITLESS_TEST_GUEST);
export const GUEST_SOURCE: GuestSource = envSource ?? DEFAULT_GUEST_SOURCE;

/** What the guest init prints on the console once userspace runs. */
export const INIT_MARKER = /HITLESS-INIT version=\S+ arch=\S+/;

export interface GuestImage {
  source: 'bundle' | 'testguest';
  dir: string;
  kernel: string;
  initrd: string;
  rootfs: string;
  version: string;
}

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..');
const PLATFORM_DIR: Record<Arch, string> = { x86_64: 'x86-kvm', aarch64: 'arm64-kvm' };
const DEB_ARCH: Record<Arch, string> = { x86_64: 'amd64', aarch64: 'arm64' };

function fromDir(dir: string, source: GuestImage['source']): GuestImage | null {
  const f = (n: string) => path.join(dir, n);
  if (!['vmlinuz', 'initrd.img', 'rootfs.ext4'].every((n) => fs.existsSync(f(n)))) return null;
  let version = 'unknown';
  try {
    const m = JSON.parse(fs.readFileSync(f('manifest.json'), 'utf8')) as { version?: unknown };
    if (typeof m.version === 'string') version = m.version;
  } catch {
    // manifest optional for the test guest
  }
  return { source, dir, kernel: f('vmlinuz'), initrd: f('initrd.img'), rootfs: f('rootfs.ext4'), version };
}

function bundle(arch: Arch): GuestImage | null {
  const script = path.join(REPO_ROOT, 'platform', PLATFORM_DIR[arch], 'build-image.sh');
  if (!fs.existsSync(script)) return null;
  try {
    const out = execFileSync('bash', [script, '--version', '1.0.0'], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
      timeout: 20 * 60_000,
    });
    const dir = out.trim().split('\n').pop() ?? '';
    return fromDir(path.resolve(REPO_ROOT, dir), 'bundle');
  } catch (e) {
    process.stderr.write(`fixtures: ${script} failed (${(e as Error).message.split('\n')[0]})\n`);
    return null;
  }
}

const TESTGUEST_SCRIPT = String.raw`#!/bin/bash
# usage: build-testguest.sh <amd64|arm64> <outdir>
set -euo pipefail
arch=$1; out=$2
# cloud kernel on amd64 (small, virtio); the generic one on arm64: the arm64 cloud flavour has
# no gpio-keys, so the virt machine's GPIO power key (system_powerdown) would be ignored.
case $arch in amd64) meta=linux-image-cloud-amd64 ;; arm64) meta=linux-image-arm64 ;; esac
kpkg=$(apt-cache depends "$meta:$arch" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
kpkg=\${kpkg%:*}
[ -n "$kpkg" ] || { echo "cannot resolve $meta:$arch (run apt-get update; for arm64 first dpkg --add-architecture arm64)" >&2; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$out"; cd "$work"
apt-get download "$kpkg:$arch" "busybox-static:$arch" >/dev/null 2>&1 || {
  echo "apt-get download $kpkg:$arch busybox-static:$arch failed" >&2; exit 1; }
mkdir x root
for d in *.deb; do dpkg-deb -x "$d" x; done
mkdir -p root/bin root/proc root/sys root/dev root/mnt root/lib/modules
cp x/bin/busybox root/bin/busybox
# Wanted modules plus their dependencies (the .ko's own "depends=" modinfo string; no kmod
# needed on the host), dependencies first, in load order.
# crc32c_generic: ext4 needs a crc32c driver (a soft dependency, not in depends=).
mods="virtio_pci virtio_blk virtio_net crc32c_generic ext4 button evdev gpio_keys"
: > root/lib/modules/order
add() {
  local f; f=$(find x/lib/modules -name "$1.ko" | head -1)
  [ -n "$f" ] || return 0
  grep -qx "$1.ko" root/lib/modules/order && return 0
  local deps; deps=$(tr '\0' '\n' < "$f" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
  for d in $deps; do add "$d"; done
  cp "$f" root/lib/modules/ && echo "$1.ko" >> root/lib/modules/order
}
for m in $mods; do add "$m"; done
cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null; done
ro=no; mount -t ext4 -o ro /dev/vda /mnt 2>/dev/null && ro=yes
echo "HITLESS-INIT version=testguest arch=$(uname -m) rootfs=$ro"
# The agent channel: 10.0.2.100:7000 exists only inside QEMU's user net and leads to the
# agent's per-VM unix socket.
ip link set lo up; ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0
( echo "HITLESS-GUEST-HELLO arch=$(uname -m)" | nc 10.0.2.100 7000 >/dev/null 2>&1 && echo "HITLESS-CHANNEL ok" ) &
# restrict=on must cut every other route: try the host (10.0.2.2) on a port the test names.
for a in $(cat /proc/cmdline); do case $a in hitless.escape_probe=*) port=\${a#*=} ;; esac; done
if [ -n "\${port:-}" ]; then
  ( if echo escaped | nc -w 3 10.0.2.2 $port >/dev/null 2>&1; then echo "HITLESS-ESCAPE open"; else echo "HITLESS-ESCAPE blocked"; fi ) &
fi
for i in 1 2 3 4 5 6 7 8 9 10; do
  for e in /sys/class/input/event*; do
    [ -e "$e/device/name" ] || continue
    case "$(cat $e/device/name)" in *ower*|gpio-keys) pb=/dev/input/$(basename $e) ;; esac
  done
  [ -n "\${pb:-}" ] && break; sleep 0.5
done
if [ -n "\${pb:-}" ]; then
  echo "HITLESS-POWERBUTTON $pb"
  dd if=$pb of=/dev/null bs=24 count=1 2>/dev/null
  echo "HITLESS-POWERDOWN"; sync; poweroff -f
fi
echo "HITLESS-NO-POWERBUTTON"
while true; do sleep 3600; done
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$out/initrd.img"
cp x/boot/vmlinuz-* "$out/vmlinuz"
rm -f "$out/rootfs.ext4"; mkdir -p rootfs/etc; echo testguest > rootfs/etc/hitless-version
mkfs.ext4 -q -d rootfs "$out/rootfs.ext4" 8M
echo "{\"version\":\"testguest\",\"arch\":\"$arch\"}" > "$out/manifest.json"
`.replace(/\\\$\{/g, '${');

/** The throwaway test guest regardless of GUEST_SOURCE (its init talks on the agent channel). */
export function testGuestImage(arch: Arch): GuestImage {
  const tag = createHash('sha256').update(TESTGUEST_SCRIPT).digest('hex').slice(0, 12);
  const dir = path.join(os.tmpdir(), 'hitless-testguest', `${DEB_ARCH[arch]}-${tag}`);
  const have = fromDir(dir, 'testguest');
  if (have) return have;
  const script = path.join(os.tmpdir(), `hitless-build-testguest-${tag}.sh`);
  fs.writeFileSync(script, TESTGUEST_SCRIPT, { mode: 0o755 });
  const tmpOut = `${dir}.tmp-${process.pid}`;
  execFileSync('bash', [script, DEB_ARCH[arch], tmpOut], { stdio: ['ignore', 'inherit', 'inherit'], timeout: 5 * 60_000 });
  fs.rmSync(dir, { recursive: true, force: true });
  fs.renameSync(tmpOut, dir);
  const built = fromDir(dir, 'testguest');
  if (!built) throw new Error(`test guest build for ${arch} produced no image in ${dir}`);
  return built;
}

const images = new Map<Arch, GuestImage>();

export function guestImage(arch: Arch): GuestImage {
  const cached = images.get(arch);
  if (cached) return cached;
  let img: GuestImage | null = null;
  if (GUEST_SOURCE !== 'testguest') img = bundle(arch);
  if (!img && GUEST_SOURCE === 'bundle') throw new Error(`no image bundle for ${arch}: platform/${PLATFORM_DIR[arch]}/build-image.sh failed or is missing`);
  img ??= testGuestImage(arch);
  process.stderr.write(`fixtures: ${arch} guest from ${img.source} (${img.dir})\n`);
  images.set(arch, img);
  return img;
}

/** A fresh state dir; short path, since unix socket paths are limited to 107 bytes. */
export function makeStateDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'hvm-'));
}

/** Collects log lines so a failing test can show them; also the VmLogger for the service. */
export class MemoryLogger implements VmLogger {
  readonly lines: string[] = [];
  private add(level: string, obj: Record<string, unknown>, msg: string): void {
    this.lines.push(`${level} ${msg} ${JSON.stringify(obj)}`);
    if (process.env.HITLESS_TEST_VERBOSE) process.stderr.write(`${level} ${msg} ${JSON.stringify(obj)}\n`);
  }
  info(obj: Record<string, unknown>, msg: string): void {
    this.add('info', obj, msg);
  }
  warn(obj: Record<string, unknown>, msg: string): void {
    this.add('warn', obj, msg);
  }
  error(obj: Record<string, unknown>, msg: string): void {
    this.add('error', obj, msg);
  }
}

/** Polls `read()` until `re` matches, resolves with ms elapsed since `since`. */
export async function waitForText(read: () => string, re: RegExp, timeoutMs: number, since = Date.now()): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (re.test(read())) return Date.now() - since;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${re} did not appear within ${timeoutMs} ms; last output: ${read().slice(-800)}`);
}
