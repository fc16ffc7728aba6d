/**
 * Reading and verifying a guest image bundle (platform/README.md): manifest.json plus the
 * kernel, initrd and rootfs it lists. Before a VM boots a bundle, every listed file must exist,
 * have the recorded size and the recorded sha256. Hashing a ~100 MB rootfs takes a few hundred
 * ms, so verified files are remembered by (path, size, mtime, inode) and not hashed again.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { VmError, type Arch } from './hypervisor';
import { parseManifest } from '../images/manifest';
import { sha256OfFile } from '../images/signing';

export interface ImageBundle {
  dir: string;
  name: string;
  version: string;
  arch: Arch;
  kernelPath: string;
  initrdPath: string;
  rootfsPath: string;
  /** Kernel command line of the manifest without its console= (the platform adds that). */
  cmdline: string;
  memoryMiB: number;
  cpus: number;
  processes: { name: string }[];
}

const verified = new Map<string, string>();

function fileKey(p: string, st: fs.Stats): string {
  return `${p}|${st.size}|${st.mtimeMs}|${st.ino}`;
}

async function sha256File(p: string): Promise<string> {
  return (await sha256OfFile(p)).sha256;
}

const bad = (dir: string, why: string) =>
  new VmError(
    'INVALID_ARGUMENT',
    `Image bundle ${dir} is not usable: ${why}. Rebuild it (scripts/build-guest-images.sh or platform/<arch>-kvm/build-image.sh).`,
  );

/**
 * Loads dir/manifest.json and checks every file it lists. Errors: INVALID_ARGUMENT for a
 * relative path or a broken bundle, FAILED_PRECONDITION when the directory or a file is missing.
 */
export async function loadImageBundle(dir: string, opts: { verifyHashes?: boolean } = {}): Promise<ImageBundle> {
  if (typeof dir !== 'string' || dir === '')
    throw new VmError('INVALID_ARGUMENT', 'image_dir is required: the absolute path of an image bundle directory (it holds manifest.json).');
  if (!path.isAbsolute(dir)) throw new VmError('INVALID_ARGUMENT', `image_dir must be an absolute path, got '${dir}'.`);
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch {
    throw new VmError(
      'FAILED_PRECONDITION',
      `Image bundle directory ${dir} does not exist; build it first (scripts/build-guest-images.sh) or give the right path.`,
    );
  }
  if (!st.isDirectory()) throw new VmError('INVALID_ARGUMENT', `image_dir ${dir} is not a directory; give the bundle directory that holds manifest.json.`);
  const manifestPath = path.join(dir, 'manifest.json');
  let raw: string;
  try {
    raw = fs.readFileSync(manifestPath, 'utf8');
  } catch {
    throw new VmError('FAILED_PRECONDITION', `${dir} has no manifest.json, so it is not an image bundle; build one with scripts/build-guest-images.sh.`);
  }
  // One validator for the manifest format (agent/images/manifest.ts); this module adds the file
  // checks a boot needs, with a hash cache so a bundle verified once is not hashed again.
  const m = parseManifest(raw, manifestPath);
  const arch: Arch = m.arch;
  const version = m.version;
  const files = m.files;
  const byRole = new Map<string, string>();
  for (const f of files) {
    const p = path.resolve(dir, f.path);
    if (path.relative(dir, p).startsWith('..')) throw bad(dir, `file ${f.path} points outside the bundle`);
    let fst: fs.Stats;
    try {
      fst = fs.statSync(p);
    } catch {
      throw new VmError('FAILED_PRECONDITION', `Image bundle ${dir} lacks ${f.path} (its ${f.role}); the bundle is incomplete, rebuild it.`);
    }
    if (fst.size !== f.size) throw bad(dir, `${f.path} is ${fst.size} bytes but the manifest says ${f.size} (truncated or replaced)`);
    if (opts.verifyHashes !== false) {
      const key = fileKey(p, fst);
      if (verified.get(key) !== f.sha256) {
        const got = await sha256File(p);
        if (got !== f.sha256)
          throw bad(dir, `${f.path} has sha256 ${got.slice(0, 16)}… but the manifest says ${f.sha256.slice(0, 16)}… (corrupted or replaced)`);
        verified.set(key, got);
      }
    }
    byRole.set(f.role, p);
  }
  for (const role of ['kernel', 'initrd', 'rootfs']) {
    if (!byRole.has(role)) throw bad(dir, `manifest lists no ${role} file`);
  }
  const cmdline = (m.kernel.cmdline ?? '')
    .split(/\s+/)
    .filter((a) => a && !a.startsWith('console='))
    .join(' ');
  return {
    dir,
    name: m.name,
    version,
    arch,
    kernelPath: byRole.get('kernel')!,
    initrdPath: byRole.get('initrd')!,
    rootfsPath: byRole.get('rootfs')!,
    cmdline,
    memoryMiB: m.memoryMiB,
    cpus: m.cpus,
    processes: m.processes,
  };
}
