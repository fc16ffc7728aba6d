/**
 * The manifest.json of a guest image bundle (platform/README.md, written by
 * platform/common/gen-manifest.js) as a type, and a strict reader for it. Field tooling and the
 * agent both read bundles through readManifest(): every problem is reported with its field path
 * (e.g. `files[1].path`) as one HitlessError INVALID_ARGUMENT.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { invalidArgument, notFound } from '../common/errors';

export type ManifestArch = 'x86_64' | 'aarch64';
export const MANIFEST_ARCHES: readonly ManifestArch[] = ['x86_64', 'aarch64'];
/** Roles every bundle must list exactly once. Other roles are allowed (extra files). */
export const REQUIRED_ROLES = ['kernel', 'initrd', 'rootfs'] as const;
export const MANIFEST_FILE = 'manifest.json';
export const SIGNATURE_FILE = 'manifest.sig';

export interface ManifestKernel {
  /** uname -r of the kernel, e.g. 6.1.0-47-cloud-amd64 */
  release: string;
  /** Debian package it came from and that package's version (Debian syntax, not semver). */
  package: string;
  packageVersion: string;
  /** Base command line; the agent appends hitless.vm=… hitless.agent=… */
  cmdline: string;
}

export interface ManifestFile {
  role: string;
  /** Plain file name inside the bundle directory (no '/', no '..'). */
  path: string;
  /** Lower-case hex sha256 of the file. */
  sha256: string;
  size: number;
}

export interface ManifestProcess {
  /** [A-Za-z0-9_.-]{1,32} */
  name: string;
  /** argv; command[0] is an absolute path inside the rootfs. */
  command: string[];
  /** Checkpoint schema version this build writes (>= 1). */
  schemaWrites: number;
  /** Checkpoint schema versions this build reads natively (each >= 1). */
  schemaReads: number[];
  /**
   * Optional schema transforms "from->to" built into the process. A transform a->b makes a
   * readable when b is a schema the process reads, and makes b writable when a is the schema it
   * writes (same rule as the checkpoint SDK).
   */
  transforms?: string[];
}

export interface ManifestNode {
  version: string;
  source: string;
  path: string;
}

export interface ManifestBuild {
  key: string;
  inputs: string[];
  builtAt: string;
}

export interface Manifest {
  name: string;
  /** Bundle version, semver-ish: MAJOR.MINOR.PATCH[-pre][+build] */
  version: string;
  arch: ManifestArch;
  kernel: ManifestKernel;
  console: string;
  memoryMiB: number;
  cpus: number;
  files: ManifestFile[];
  processes: ManifestProcess[];
  node?: ManifestNode;
  build?: ManifestBuild;
}

export const SEMVERISH = /^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$/;
export const PROCESS_NAME = /^[A-Za-z0-9_.-]{1,32}$/;
const SHA256_HEX = /^[0-9a-f]{64}$/;
const TRANSFORM = /^(\d+)->(\d+)$/;

/** Parses "a->b"; undefined when it is not of that form (or a/b are not >= 1, or a === b). */
export function parseTransform(t: string): { from: number; to: number } | undefined {
  const m = TRANSFORM.exec(t);
  if (!m) return undefined;
  const from = Number(m[1]);
  const to = Number(m[2]);
  if (!(from >= 1 && to >= 1 && from !== to && Number.isSafeInteger(from) && Number.isSafeInteger(to))) return undefined;
  return { from, to };
}

/** True when p is a plain file name that stays inside the bundle directory. */
export function isPlainFileName(p: string): boolean {
  return p.length > 0 && p.length <= 255 && p !== '.' && p !== '..' && !/[/\\\0]/.test(p);
}

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);
const show = (v: unknown) => {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
};

class Checker {
  readonly problems: string[] = [];
  add(at: string, what: string): void {
    this.problems.push(`${at} ${what}`);
  }
  str(o: Obj, key: string, at: string, nonEmpty = true): string | undefined {
    const v = o[key];
    if (v === undefined) return void this.add(`${at}${key}`, 'is required (a string)');
    if (typeof v !== 'string') return void this.add(`${at}${key}`, `must be a string, got ${show(v)}`);
    if (nonEmpty && v.trim() === '') return void this.add(`${at}${key}`, 'must not be empty');
    return v;
  }
  int(o: Obj, key: string, at: string, min: number): number | undefined {
    const v = o[key];
    if (v === undefined) return void this.add(`${at}${key}`, `is required (an integer >= ${min})`);
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) return void this.add(`${at}${key}`, `must be an integer >= ${min}, got ${show(v)}`);
    return v;
  }
  obj(o: Obj, key: string, at: string): Obj | undefined {
    const v = o[key];
    if (v === undefined) return void this.add(`${at}${key}`, 'is required (an object)');
    if (!isObj(v)) return void this.add(`${at}${key}`, `must be an object, got ${show(v)}`);
    return v;
  }
  arr(o: Obj, key: string, at: string): unknown[] | undefined {
    const v = o[key];
    if (v === undefined) return void this.add(`${at}${key}`, 'is required (an array)');
    if (!Array.isArray(v)) return void this.add(`${at}${key}`, `must be an array, got ${show(v)}`);
    return v;
  }
}

function checkManifest(m: unknown): string[] {
  const c = new Checker();
  if (!isObj(m)) {
    c.add('(top level)', 'must be a JSON object');
    return c.problems;
  }
  c.str(m, 'name', '');
  const version = c.str(m, 'version', '');
  if (version !== undefined && !SEMVERISH.test(version)) c.add('version', `must look like MAJOR.MINOR.PATCH[-pre][+build], got ${show(version)}`);
  const arch = c.str(m, 'arch', '');
  if (arch !== undefined && !MANIFEST_ARCHES.includes(arch as ManifestArch)) c.add('arch', `must be one of ${MANIFEST_ARCHES.join(', ')}, got ${show(arch)}`);
  const kernel = c.obj(m, 'kernel', '');
  if (kernel) {
    for (const k of ['release', 'package', 'packageVersion']) c.str(kernel, k, 'kernel.');
    c.str(kernel, 'cmdline', 'kernel.', false);
  }
  c.str(m, 'console', '');
  c.int(m, 'memoryMiB', '', 1);
  c.int(m, 'cpus', '', 1);

  const files = c.arr(m, 'files', '');
  if (files) {
    const paths = new Set<string>();
    const roles = new Map<string, number>();
    files.forEach((f, i) => {
      const at = `files[${i}]`;
      if (!isObj(f)) return c.add(at, `must be an object, got ${show(f)}`);
      const role = c.str(f, 'role', `${at}.`);
      if (role !== undefined) roles.set(role, (roles.get(role) ?? 0) + 1);
      const p = c.str(f, 'path', `${at}.`, false);
      if (p !== undefined) {
        if (!isPlainFileName(p)) c.add(`${at}.path`, `${show(p)} must be a plain file name inside the bundle (no '/', no '..')`);
        else if (p === MANIFEST_FILE || p === SIGNATURE_FILE) c.add(`${at}.path`, `${show(p)} is reserved for the bundle's own metadata`);
        else if (paths.has(p)) c.add(`${at}.path`, `${show(p)} is listed twice`);
        paths.add(p);
      }
      const sha = c.str(f, 'sha256', `${at}.`);
      if (sha !== undefined && !SHA256_HEX.test(sha)) c.add(`${at}.sha256`, `must be 64 lower-case hex digits, got ${show(sha)}`);
      c.int(f, 'size', `${at}.`, 0);
    });
    for (const r of REQUIRED_ROLES) {
      const n = roles.get(r) ?? 0;
      if (n === 0) c.add('files', `has no entry with role '${r}'`);
      else if (n > 1) c.add('files', `has ${n} entries with role '${r}' (exactly one expected)`);
    }
  }

  const procs = c.arr(m, 'processes', '');
  if (procs) {
    const names = new Set<string>();
    procs.forEach((p, i) => {
      const at = `processes[${i}]`;
      if (!isObj(p)) return c.add(at, `must be an object, got ${show(p)}`);
      const name = c.str(p, 'name', `${at}.`);
      if (name !== undefined) {
        if (!PROCESS_NAME.test(name)) c.add(`${at}.name`, `must match [A-Za-z0-9_.-]{1,32}, got ${show(name)}`);
        else if (names.has(name)) c.add(`${at}.name`, `${show(name)} is used twice`);
        names.add(name);
      }
      const cmd = c.arr(p, 'command', `${at}.`);
      if (cmd) {
        if (cmd.length === 0 || !cmd.every((a) => typeof a === 'string')) c.add(`${at}.command`, 'must be a non-empty array of strings');
        else if (!(cmd[0] as string).startsWith('/')) c.add(`${at}.command[0]`, `must be an absolute path inside the rootfs, got ${show(cmd[0])}`);
      }
      c.int(p, 'schemaWrites', `${at}.`, 1);
      const reads = c.arr(p, 'schemaReads', `${at}.`);
      if (reads) {
        if (reads.length === 0) c.add(`${at}.schemaReads`, 'must list at least one schema version');
        reads.forEach((r, j) => {
          if (typeof r !== 'number' || !Number.isSafeInteger(r) || r < 1) c.add(`${at}.schemaReads[${j}]`, `must be an integer >= 1, got ${show(r)}`);
        });
      }
      if (p.transforms !== undefined) {
        if (!Array.isArray(p.transforms)) c.add(`${at}.transforms`, `must be an array of "from->to" strings, got ${show(p.transforms)}`);
        else
          p.transforms.forEach((t, j) => {
            if (typeof t !== 'string' || !parseTransform(t))
              c.add(`${at}.transforms[${j}]`, `must be "FROM->TO" with two different schema versions >= 1, got ${show(t)}`);
          });
      }
    });
  }

  if (m.node !== undefined) {
    const node = c.obj(m, 'node', '');
    if (node) for (const k of ['version', 'source', 'path']) c.str(node, k, 'node.');
  }
  if (m.build !== undefined) {
    const build = c.obj(m, 'build', '');
    if (build) {
      c.str(build, 'key', 'build.');
      c.str(build, 'builtAt', 'build.');
      const inputs = c.arr(build, 'inputs', 'build.');
      if (inputs && !inputs.every((s) => typeof s === 'string')) c.add('build.inputs', 'must be an array of strings');
    }
  }
  return c.problems;
}

/**
 * Parses and validates manifest bytes. `source` names the file in messages. Throws
 * INVALID_ARGUMENT listing every problem with its field path.
 */
export function parseManifest(raw: Buffer | string, source: string): Manifest {
  let m: unknown;
  try {
    m = JSON.parse(typeof raw === 'string' ? raw : raw.toString('utf8'));
  } catch (e) {
    throw invalidArgument(`${source} is not valid JSON (${(e as Error).message}); the bundle is corrupt, fetch or rebuild it`);
  }
  const problems = checkManifest(m);
  if (problems.length) {
    throw invalidArgument(
      `${source} is not a valid image manifest: ${problems.join('; ')}. Fix the manifest or rebuild the bundle with platform/<arch>-kvm/build-image.sh`,
    );
  }
  return m as Manifest;
}

/** Reads the raw bytes of dir/manifest.json (NOT_FOUND when the directory or file is missing). */
export function readManifestBytes(dir: string): Buffer {
  const file = path.join(dir, MANIFEST_FILE);
  try {
    return fs.readFileSync(file);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      if (!fs.existsSync(dir)) throw notFound(`image bundle directory ${dir} does not exist; give the path of a bundle directory (it holds manifest.json)`);
      throw notFound(`${dir} has no ${MANIFEST_FILE}, so it is not an image bundle; give the bundle directory (e.g. one under .cache/images/)`);
    }
    if (code === 'EISDIR') throw invalidArgument(`${file} is a directory, not a manifest; the bundle is malformed, fetch or rebuild it`);
    throw e;
  }
}

/** Reads and strictly validates dir/manifest.json. */
export function readManifest(dir: string): Manifest {
  return parseManifest(readManifestBytes(dir), path.join(dir, MANIFEST_FILE));
}

/** The manifest entry with the given role (kernel, initrd, rootfs always exist after validation). */
export function fileByRole(m: Manifest, role: string): ManifestFile | undefined {
  return m.files.find((f) => f.role === role);
}

/** Sum of the sizes of every file the manifest lists. */
export function totalBytes(m: Manifest): number {
  return m.files.reduce((n, f) => n + f.size, 0);
}
