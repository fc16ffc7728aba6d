/**
 * Installed image bundles for gNOI OS.Install, and the package format.
 *
 * A gNOI "OS package" here is a tar archive (POSIX ustar) of one signed image bundle directory:
 * its plain files (manifest.json, manifest.sig, vmlinuz, initrd.img, rootfs.ext4, ...) either at
 * the top level ("./name" or "name") or under one top directory ("v2/name"). Nothing else is
 * accepted: no links, devices, nested directories, or names that leave the bundle (PARSE_FAIL).
 * The archive is unpacked while it streams in (no second copy on disk) into
 * <state-dir>/images/.incoming-<random>/, verified (sha256 of every file + ed25519 signature
 * against --trust-dir) and then renamed to <state-dir>/images/<version>/, where <version> is the
 * manifest's version (validated, never a client-supplied path). Any failure removes the partial
 * directory.
 *
 * Disk space (gNOI: the target manages its own storage, frees space for a new package and answers
 * TOO_LARGE only when it cannot): a package needs its declared package_size plus DISK_MARGIN_BYTES
 * free on the images file system before TransferReady (the margin keeps room for everything
 * else the agent writes there). When that is short, older installed versions are released,
 * oldest first, but never one the caller protects (the running version, both sides of an
 * upgrade in progress) and never the last one installed (a client may rely on it). Nothing is
 * deleted unless that makes enough room. While the package streams in, the margin is checked
 * again every SPACE_CHECK_BYTES (a package larger than declared, or of unknown size), and a
 * write that fails with ENOSPC is TOO_LARGE too, not an internal error.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { HitlessError } from '../common/errors';
import { freeBytes } from '../common/disk-space';
import { Manifest, SEMVERISH, isPlainFileName, parseManifest, readManifestBytes } from '../images/manifest';
import { checkSignature, verifyBundle } from '../images/signing';

export type InstallErrorType =
  'UNSPECIFIED' | 'INCOMPATIBLE' | 'TOO_LARGE' | 'PARSE_FAIL' | 'INTEGRITY_FAIL' | 'INSTALL_RUN_PACKAGE' | 'INSTALL_IN_PROGRESS' | 'NOT_SUPPORTED_ON_BACKUP';

export class InstallFailure extends Error {
  constructor(
    readonly type: InstallErrorType,
    message: string,
  ) {
    super(message);
  }
}

/** Free space kept on the images directory's file system beyond the package itself. */
export const DISK_MARGIN_BYTES = 64 * 1024 * 1024;
/** How often (in bytes received) a transfer re-checks the free space. */
export const SPACE_CHECK_BYTES = 1024 * 1024;
const MAX_FILES = 64;

const noSpace = (e: unknown) => {
  const code = (e as NodeJS.ErrnoException)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
};

/** Bytes a flat bundle directory occupies on disk (allocated blocks, not apparent sizes). */
function diskUsage(dir: string): number {
  let n = 0;
  for (const f of fs.readdirSync(dir)) {
    const st = fs.statSync(path.join(dir, f));
    n += st.blocks * 512;
  }
  return n;
}

export function validVersion(v: string): boolean {
  return v.length > 0 && v.length <= 64 && SEMVERISH.test(v) && isPlainFileName(v);
}

export class PackageStore {
  readonly imagesDir: string;
  private busy = false;

  constructor(
    stateDir: string,
    private readonly trustDir: string,
    readonly maxPackageBytes: number,
  ) {
    this.imagesDir = path.join(stateDir, 'images');
    fs.mkdirSync(this.imagesDir, { recursive: true });
    // Leftovers of an install interrupted by a crash.
    for (const f of fs.readdirSync(this.imagesDir)) if (f.startsWith('.incoming-')) fs.rmSync(path.join(this.imagesDir, f), { recursive: true, force: true });
  }

  dirFor(version: string): string {
    if (!validVersion(version)) throw new InstallFailure('UNSPECIFIED', `'${version}' is not a valid bundle version (MAJOR.MINOR.PATCH[-pre][+build])`);
    return path.join(this.imagesDir, version);
  }

  /** An installed bundle of `version` whose manifest parses and whose signature is trusted; no hashing. */
  present(version: string): { dir: string; manifest: Manifest } | null {
    if (!validVersion(version)) return null;
    const dir = path.join(this.imagesDir, version);
    try {
      const raw = readManifestBytes(dir);
      const manifest = parseManifest(raw, dir);
      checkSignature(dir, raw, this.trustDir);
      return manifest.version === version ? { dir, manifest } : null;
    } catch {
      return null;
    }
  }

  /**
   * Starts receiving a package of `packageSize` bytes (0: not declared); only one at a time
   * (INSTALL_IN_PROGRESS). Makes room first when needed (see the file comment); `protect` says
   * which installed bundle directories must not be released.
   */
  begin(packageSize: number, protect: (dir: string) => boolean = () => false): Incoming {
    if (this.busy) throw new InstallFailure('INSTALL_IN_PROGRESS', 'another Install is in progress on this agent; retry when it is done');
    if (packageSize > this.maxPackageBytes)
      throw new InstallFailure(
        'TOO_LARGE',
        `package_size ${packageSize} bytes exceeds the agent's limit of ${this.maxPackageBytes} bytes (--max-package-bytes)`,
      );
    const need = packageSize + DISK_MARGIN_BYTES;
    let free = freeBytes(this.imagesDir);
    if (need > free) {
      const released = this.makeRoom(need, protect);
      free = freeBytes(this.imagesDir);
      if (need > free) {
        const what = packageSize > 0 ? `the package needs ${packageSize} bytes` : 'the package size is not declared (package_size 0)';
        throw new InstallFailure(
          'TOO_LARGE',
          `not enough disk space in ${this.imagesDir}: ${free} bytes free, ${what} plus ${DISK_MARGIN_BYTES} bytes kept free; ` +
            (released.length
              ? `released ${released.join(', ')} and still short`
              : "no older installed version can be released to make room (the running one, an upgrade's and the last installed are kept)"),
        );
      }
    }
    this.busy = true;
    const dir = path.join(this.imagesDir, `.incoming-${crypto.randomBytes(6).toString('hex')}`);
    fs.mkdirSync(dir, { mode: 0o700 });
    return new Incoming(dir, this.maxPackageBytes, () => {
      this.busy = false;
    });
  }

  /** Installed version directories, oldest install first. */
  installed(): { version: string; dir: string; mtimeMs: number }[] {
    const out: { version: string; dir: string; mtimeMs: number }[] = [];
    for (const f of fs.readdirSync(this.imagesDir)) {
      if (!validVersion(f)) continue;
      const dir = path.join(this.imagesDir, f);
      const st = fs.statSync(dir, { throwIfNoEntry: false });
      if (st?.isDirectory()) out.push({ version: f, dir, mtimeMs: st.mtimeMs });
    }
    return out.sort((a, b) => a.mtimeMs - b.mtimeMs || a.version.localeCompare(b.version));
  }

  /**
   * Releases older installed versions, oldest first, until `need` bytes are free; releases
   * nothing when even all of them would not make enough room. Returns the released versions.
   */
  private makeRoom(need: number, protect: (dir: string) => boolean): string[] {
    const all = this.installed();
    // The newest directory is the last successful install (commit() stamps its mtime).
    const candidates = all.slice(0, -1).filter((b) => !protect(b.dir));
    const reclaimable = candidates.reduce((n, b) => n + diskUsage(b.dir), 0);
    if (freeBytes(this.imagesDir) + reclaimable < need) return [];
    const released: string[] = [];
    for (const b of candidates) {
      if (freeBytes(this.imagesDir) >= need) break;
      fs.rmSync(b.dir, { recursive: true, force: true });
      released.push(b.version);
    }
    return released;
  }

  /** Verifies a received bundle; resolves with its manifest or throws an InstallFailure. */
  async verify(dir: string): Promise<Manifest> {
    try {
      return (await verifyBundle(dir, this.trustDir)).manifest;
    } catch (e) {
      if (!(e instanceof HitlessError)) throw e;
      const code = e.codeName;
      if (code === 'PERMISSION_DENIED' || code === 'FAILED_PRECONDITION') throw new InstallFailure('INTEGRITY_FAIL', e.message);
      throw new InstallFailure('PARSE_FAIL', e.message);
    }
  }

  /** Moves a verified bundle to images/<version>/ (replacing an older copy); returns its path. */
  commit(incoming: Incoming, version: string, keep: (dir: string) => boolean): string {
    const dest = this.dirFor(version);
    if (fs.existsSync(dest)) {
      if (keep(dest)) {
        incoming.abort();
        return dest;
      }
      fs.rmSync(dest, { recursive: true, force: true });
    }
    fs.renameSync(incoming.dir, dest);
    // Marks it as the last installed version, which makeRoom() never releases.
    const now = new Date();
    fs.utimesSync(dest, now, now);
    incoming.release();
    return dest;
  }
}

/** A package being received: a streaming ustar reader writing plain files into `dir`. */
export class Incoming {
  received = 0;
  private header = Buffer.alloc(512);
  private headerFill = 0;
  private fd: number | null = null;
  private remaining = 0;
  private skipping = false;
  private padding = 0;
  private ended = false;
  private topDir: string | null = null;
  private readonly names = new Set<string>();
  private released = false;
  private lastSpaceCheck = 0;

  constructor(
    readonly dir: string,
    private readonly maxBytes: number,
    private readonly onRelease: () => void,
  ) {}

  push(buf: Buffer): void {
    this.received += buf.length;
    if (this.received > this.maxBytes)
      throw new InstallFailure('TOO_LARGE', `the package exceeds the agent's limit of ${this.maxBytes} bytes (--max-package-bytes)`);
    if (this.received - this.lastSpaceCheck >= SPACE_CHECK_BYTES) {
      this.lastSpaceCheck = this.received;
      const free = freeBytes(this.dir);
      if (free < DISK_MARGIN_BYTES) {
        throw new InstallFailure(
          'TOO_LARGE',
          `disk space ran short while receiving the package: ${free} bytes free in ${path.dirname(this.dir)} after ${this.received} bytes, ${DISK_MARGIN_BYTES} are kept free; declare package_size so the agent can make room first`,
        );
      }
    }
    try {
      this.unpack(buf);
    } catch (e) {
      if (noSpace(e))
        throw new InstallFailure(
          'TOO_LARGE',
          `the disk of ${path.dirname(this.dir)} is full after ${this.received} bytes of the package (${(e as Error).message})`,
        );
      throw e;
    }
  }

  private unpack(buf: Buffer): void {
    let off = 0;
    while (off < buf.length) {
      if (this.remaining > 0) {
        const n = Math.min(this.remaining, buf.length - off);
        if (this.fd !== null && !this.skipping) fs.writeSync(this.fd, buf, off, n);
        this.remaining -= n;
        off += n;
        if (this.remaining === 0) this.endEntry();
      } else if (this.padding > 0) {
        const n = Math.min(this.padding, buf.length - off);
        this.padding -= n;
        off += n;
      } else if (this.ended) {
        // Zero blocks (and any trailing padding) after the end-of-archive marker.
        off = buf.length;
      } else {
        const n = Math.min(512 - this.headerFill, buf.length - off);
        buf.copy(this.header, this.headerFill, off, off + n);
        this.headerFill += n;
        off += n;
        if (this.headerFill === 512) {
          this.headerFill = 0;
          this.onHeader(this.header);
        }
      }
    }
  }

  /** After TransferEnd: the archive must be complete. */
  finish(): void {
    if (this.remaining > 0 || this.headerFill > 0)
      throw new InstallFailure('PARSE_FAIL', `the package ends in the middle of a tar entry after ${this.received} bytes; send the whole archive`);
    if (this.names.size === 0) throw new InstallFailure('PARSE_FAIL', 'the package holds no files; it must be a tar archive of an image bundle directory');
  }

  abort(): void {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
    fs.rmSync(this.dir, { recursive: true, force: true });
    this.release();
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    this.onRelease();
  }

  private endEntry(): void {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
    this.skipping = false;
  }

  private onHeader(h: Buffer): void {
    if (h.every((b) => b === 0)) {
      this.ended = true;
      return;
    }
    const stored = parseOctal(h, 148, 8);
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 32 : h[i];
    if (stored !== sum)
      throw new InstallFailure(
        'PARSE_FAIL',
        `the package is not a tar archive (bad header checksum at byte ${this.received}); send a tar (ustar) of the bundle directory`,
      );
    const name = cstr(h, 0, 100);
    const ustar = cstr(h, 257, 6).startsWith('ustar');
    const prefix = ustar ? cstr(h, 345, 155) : '';
    const full = prefix ? `${prefix}/${name}` : name;
    if (h[124] & 0x80) throw new InstallFailure('PARSE_FAIL', `tar entry '${full}' uses a base-256 size; packages are limited to ustar sizes`);
    const size = parseOctal(h, 124, 12);
    if (size < 0) throw new InstallFailure('PARSE_FAIL', `tar entry '${full}' has an unreadable size`);
    const type = String.fromCharCode(h[156] || 0x30);
    this.padding = (512 - (size % 512)) % 512;
    this.remaining = size;
    if (type === 'x' || type === 'g') {
      // pax extended headers: their fields are not used (names come from the ustar header).
      this.skipping = true;
      if (size === 0) this.endEntry();
      return;
    }
    const parts = full.split('/').filter((p) => p !== '' && p !== '.');
    if (type === '5') {
      if (parts.length > 1) throw new InstallFailure('PARSE_FAIL', `tar entry '${full}' is a nested directory; a bundle is one flat directory`);
      if (parts.length === 1) this.setTop(parts[0], full);
      this.skipping = true;
      if (size === 0) this.endEntry();
      return;
    }
    if (type !== '0') throw new InstallFailure('PARSE_FAIL', `tar entry '${full}' is not a regular file (type '${type}'); a bundle holds plain files only`);
    if (parts.length === 2) this.setTop(parts[0], full);
    else if (parts.length !== 1) throw new InstallFailure('PARSE_FAIL', `tar entry '${full}' is nested too deep; a bundle is one flat directory`);
    const base = parts[parts.length - 1];
    if (!isPlainFileName(base) || base.startsWith('.')) throw new InstallFailure('PARSE_FAIL', `tar entry '${full}' is not a plain file name`);
    if (this.names.has(base)) throw new InstallFailure('PARSE_FAIL', `tar entry '${base}' appears twice`);
    if (this.names.size >= MAX_FILES) throw new InstallFailure('PARSE_FAIL', `the package holds more than ${MAX_FILES} files`);
    this.names.add(base);
    this.fd = fs.openSync(path.join(this.dir, base), 'wx', 0o644);
    this.skipping = false;
    if (size === 0) this.endEntry();
  }

  private setTop(top: string, full: string): void {
    if (this.topDir !== null && this.topDir !== top)
      throw new InstallFailure('PARSE_FAIL', `tar entry '${full}' is outside the bundle directory '${this.topDir}'`);
    this.topDir = top;
  }
}

function cstr(b: Buffer, off: number, len: number): string {
  const s = b.subarray(off, off + len);
  const z = s.indexOf(0);
  return s.subarray(0, z < 0 ? len : z).toString('utf8');
}

function parseOctal(b: Buffer, off: number, len: number): number {
  const s = cstr(b, off, len).trim();
  if (!/^[0-7]*$/.test(s)) return -1;
  return s ? parseInt(s, 8) : 0;
}
