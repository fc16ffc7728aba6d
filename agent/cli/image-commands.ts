/**
 * `issu image ...`: image bundle tooling that needs no running agent.
 *
 *   issu image keygen --out DIR [--name NAME] [--force]   ed25519 key pair: NAME.key (0600), NAME.pub
 *   issu image sign BUNDLE --key NAME.key                   writes BUNDLE/manifest.sig
 *   issu image verify BUNDLE --trust DIR                    manifest, signature, every file's sha256
 *   issu image inspect BUNDLE                               what the bundle holds (no hashing)
 *
 * Human text by default; with --json one JSON object on stdout. Domain failures (HitlessError)
 * are reported through `out` and answer exit code 1; bad usage throws an Error named
 * 'UsageError' (the CLI maps it to exit 2).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { GLOBAL_OPTIONS } from './global-options';
import { HitlessError, alreadyExists } from '../common/errors';
import { MANIFEST_FILE, SIGNATURE_FILE, readManifest, totalBytes } from '../images/manifest';
import { generateKeyPair, readKeyFile, readSignature, signBundle, verifyBundle, type ProgressFn } from '../images/signing';

export interface ImageCommandOptions {
  json: boolean;
  /** Prints obj as JSON (--json) or calls text() to print for a person. */
  out: (o: unknown, text: () => void) => void;
}

export const IMAGE_USAGE = `usage: issu image <command> [--json]
  keygen --out DIR [--name NAME] [--force]   create an ed25519 signing key pair: DIR/NAME.key (0600, keep it
                                             secret) and DIR/NAME.pub (copy it into the agents' trust directory)
  sign BUNDLE --key FILE                     sign BUNDLE/manifest.json with a private key; writes manifest.sig
  verify BUNDLE --trust DIR                  check the manifest, the signature against the *.pub keys in DIR
                                             and every file's size and sha256; exit 1 with the reason if not OK
  inspect BUNDLE                             show the manifest: version, kernel, processes and schemas, files`;

function usageError(message: string): Error {
  const e = new Error(message);
  e.name = 'UsageError';
  return e;
}

const human = (n: number) =>
  n >= 1 << 30
    ? `${(n / (1 << 30)).toFixed(2)} GiB`
    : n >= 1 << 20
      ? `${(n / (1 << 20)).toFixed(1)} MiB`
      : n >= 1024
        ? `${(n / 1024).toFixed(1)} KiB`
        : `${n} B`;

type Spec = Record<string, { type: 'string' | 'boolean'; short?: string }>;

function parse(sub: string, args: string[], options: Spec, positionals: number): { values: Record<string, string | boolean | undefined>; pos: string[] } {
  let r: ReturnType<typeof parseArgs>;
  try {
    // issu's global options are accepted here too (an image command needs no agent: they do nothing).
    r = parseArgs({ args, options: { ...options, ...GLOBAL_OPTIONS }, allowPositionals: true, strict: true });
  } catch (e) {
    throw usageError(`image ${sub}: ${(e as Error).message}`);
  }
  const values = r.values as Record<string, string | boolean | undefined>;
  if (!values.help && r.positionals.length !== positionals) {
    throw usageError(
      positionals === 0
        ? `image ${sub} takes no arguments besides its options, got '${r.positionals.join(' ')}'`
        : `image ${sub} needs exactly one BUNDLE directory${r.positionals.length ? `, got '${r.positionals.join(' ')}'` : ''}`,
    );
  }
  return { values, pos: r.positionals };
}

function requireOpt(values: Record<string, string | boolean | undefined>, name: string, sub: string, hint: string): string {
  const v = values[name];
  if (typeof v !== 'string' || v === '') throw usageError(`image ${sub} needs --${name} ${hint}`);
  return v;
}

/** Bundle arguments are resolved so messages and JSON carry absolute paths. */
const bundleDir = (p: string): string => path.resolve(p);

/** Progress on stderr when it is a terminal: one line, redrawn at most 10 times a second. */
function ttyProgress(label: string): { fn?: ProgressFn; done: () => void } {
  const err = process.stderr;
  if (!err.isTTY) return { done: () => undefined };
  let last = 0;
  let lastDone = -1;
  let drawn = false;
  const t0 = Date.now();
  const fn: ProgressFn = (d, t) => {
    const now = Date.now();
    if ((now - last < 100 && d < t) || d === lastDone) return;
    last = now;
    lastDone = d;
    drawn = true;
    const pct = t ? Math.floor((d / t) * 100) : 100;
    const rate = now > t0 ? d / ((now - t0) / 1000) : 0;
    err.write(`\r\x1b[K${label}: ${String(pct).padStart(3)}% ${human(d)} / ${human(t)}${rate ? ` (${human(rate)}/s)` : ''}`);
  };
  return { fn, done: () => void (drawn && err.write('\r\x1b[K')) };
}

async function keygen(args: string[], o: ImageCommandOptions): Promise<number> {
  const { values } = parse('keygen', args, { out: { type: 'string', short: 'o' }, name: { type: 'string' }, force: { type: 'boolean' } }, 0);
  if (values.help) return help(o);
  const dir = requireOpt(values, 'out', 'keygen', 'DIR (where NAME.key and NAME.pub are written)');
  const name = typeof values.name === 'string' ? values.name : 'image-signing';
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name) || name.startsWith('.'))
    throw usageError(`image keygen: --name must match [A-Za-z0-9_.-]{1,64} and not start with '.', got '${name}'`);
  const keyFile = path.resolve(dir, `${name}.key`);
  const pubFile = path.resolve(dir, `${name}.pub`);
  if (!values.force) {
    for (const f of [keyFile, pubFile]) {
      if (fs.existsSync(f))
        throw alreadyExists(
          `${f} already exists; pick another --name, or pass --force to replace the key pair (bundles signed with the old key will no longer verify against the new .pub)`,
        );
    }
  }
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const kp = generateKeyPair();
  // Private key: created 0600 (umask can only narrow it), replaced atomically with --force.
  const tmp = `${keyFile}.tmp-${process.pid}`;
  fs.rmSync(tmp, { force: true });
  fs.writeFileSync(tmp, kp.privateKeyPem, { mode: 0o600, flag: 'wx' });
  fs.chmodSync(tmp, 0o600);
  fs.renameSync(tmp, keyFile);
  fs.writeFileSync(pubFile, kp.publicKeyPem, { mode: 0o644 });
  const res = { keyId: kp.keyId, algorithm: 'ed25519', privateKey: keyFile, publicKey: pubFile };
  o.out(res, () => {
    console.log(`key ${kp.keyId} (ed25519)`);
    console.log(`  private: ${keyFile}  (mode 0600; keep it secret, sign with 'issu image sign BUNDLE --key ${keyFile}')`);
    console.log(`  public:  ${pubFile}  (copy it into the trust directory of every agent that should accept these bundles)`);
  });
  return 0;
}

async function sign(args: string[], o: ImageCommandOptions): Promise<number> {
  const { values, pos } = parse('sign', args, { key: { type: 'string', short: 'k' } }, 1);
  if (values.help) return help(o);
  const keyFile = requireOpt(values, 'key', 'sign', 'FILE (the NAME.key written by issu image keygen)');
  const dir = bundleDir(pos[0]);
  const pem = readKeyFile(path.resolve(keyFile), 'private key');
  const p = ttyProgress('checking files before signing');
  let r;
  try {
    r = await signBundle(dir, pem, { onProgress: p.fn });
  } finally {
    p.done();
  }
  const m = readManifest(dir);
  const res = { bundle: dir, name: m.name, version: m.version, arch: m.arch, keyId: r.keyId, signature: r.sigPath };
  o.out(res, () => console.log(`signed ${m.name} ${m.version} (${m.arch}) with key ${r.keyId}: ${r.sigPath}`));
  return 0;
}

async function verify(args: string[], o: ImageCommandOptions): Promise<number> {
  const { values, pos } = parse('verify', args, { trust: { type: 'string', short: 't' } }, 1);
  if (values.help) return help(o);
  const trust = path.resolve(requireOpt(values, 'trust', 'verify', 'DIR (directory of trusted *.pub keys)'));
  const dir = bundleDir(pos[0]);
  const p = ttyProgress(`verifying ${path.basename(dir)}`);
  const t0 = process.hrtime.bigint();
  try {
    const v = await verifyBundle(dir, trust, p.fn);
    p.done();
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    const m = v.manifest;
    const res = {
      ok: true,
      bundle: dir,
      name: m.name,
      version: m.version,
      arch: m.arch,
      keyId: v.keyId,
      trustedKey: v.trustedKeyFile,
      files: m.files.length,
      bytes: v.bytes,
      elapsedMs: Math.round(ms),
    };
    o.out(res, () =>
      console.log(
        `OK ${m.name} ${m.version} (${m.arch}): signed by trusted key ${v.keyId} (${path.basename(v.trustedKeyFile)}); ${m.files.length} files, ${human(v.bytes)} verified in ${(ms / 1000).toFixed(2)} s`,
      ),
    );
    return 0;
  } catch (e) {
    p.done();
    if (!(e instanceof HitlessError)) throw e;
    o.out({ ok: false, bundle: dir, error: { code: e.codeName, message: e.message } }, () =>
      process.stderr.write(`issu: verify ${dir}: FAILED (${e.codeName}): ${e.message}\n`),
    );
    return 1;
  }
}

async function inspect(args: string[], o: ImageCommandOptions): Promise<number> {
  const { values, pos } = parse('inspect', args, {}, 1);
  if (values.help) return help(o);
  const dir = bundleDir(pos[0]);
  const m = readManifest(dir);
  let signature: { keyId: string; algorithm: string; verified: false } | null = null;
  let signatureProblem: string | undefined;
  try {
    const s = readSignature(dir);
    if (s) signature = { keyId: s.keyId, algorithm: s.algorithm, verified: false };
  } catch (e) {
    if (!(e instanceof HitlessError)) throw e;
    signatureProblem = e.message;
  }
  const files = m.files.map((f) => {
    let onDisk: number | null = null;
    try {
      const st = fs.lstatSync(path.join(dir, f.path));
      onDisk = st.isFile() ? st.size : null;
    } catch {
      onDisk = null;
    }
    return { role: f.role, path: f.path, size: f.size, sha256: f.sha256, present: onDisk !== null, sizeMatches: onDisk === f.size };
  });
  const listed = new Set([MANIFEST_FILE, SIGNATURE_FILE, ...m.files.map((f) => f.path)]);
  let extra: string[] = [];
  try {
    extra = fs
      .readdirSync(dir)
      .filter((n) => !listed.has(n))
      .sort();
  } catch {
    /* readManifest succeeded, so the directory exists */
  }
  const res = {
    bundle: dir,
    name: m.name,
    version: m.version,
    arch: m.arch,
    kernel: m.kernel,
    console: m.console,
    memoryMiB: m.memoryMiB,
    cpus: m.cpus,
    node: m.node ?? null,
    build: m.build ? { key: m.build.key, builtAt: m.build.builtAt } : null,
    processes: m.processes.map((p) => ({
      name: p.name,
      command: p.command,
      schemaWrites: p.schemaWrites,
      schemaReads: p.schemaReads,
      transforms: p.transforms ?? [],
    })),
    files,
    totalBytes: totalBytes(m),
    signature,
    ...(signatureProblem ? { signatureProblem } : {}),
    unlistedFiles: extra,
  };
  o.out(res, () => {
    const w = (s: string) => console.log(s);
    w(`${m.name} ${m.version} (${m.arch})  ${dir}`);
    w(`  kernel    ${m.kernel.release} (${m.kernel.package} ${m.kernel.packageVersion})`);
    w(`  cmdline   ${m.kernel.cmdline}`);
    w(`  vm        ${m.memoryMiB} MiB, ${m.cpus} cpu${m.cpus === 1 ? '' : 's'}, console ${m.console}`);
    if (m.node) w(`  node      ${m.node.version} (${m.node.source}) ${m.node.path}`);
    if (m.build) w(`  built     ${m.build.builtAt} key ${m.build.key.slice(0, 12)}`);
    w(`  processes${m.processes.length ? '' : '  (none)'}`);
    for (const p of m.processes) {
      const tr = p.transforms?.length ? `, transforms ${p.transforms.join(' ')}` : '';
      w(`    ${p.name.padEnd(12)} writes schema ${p.schemaWrites}, reads [${p.schemaReads.join(', ')}]${tr}`);
      w(`    ${''.padEnd(12)} ${p.command.join(' ')}`);
    }
    w('  files');
    for (const f of files) {
      const state = !f.present ? '  MISSING' : f.sizeMatches ? '' : '  SIZE DIFFERS';
      w(`    ${f.role.padEnd(7)} ${f.path.padEnd(14)} ${human(f.size).padStart(10)}  sha256 ${f.sha256}${state}`);
    }
    w(`  total     ${human(res.totalBytes)} (${res.totalBytes} bytes)`);
    if (signature) w(`  signature key ${signature.keyId} (${signature.algorithm}; not checked here, run 'issu image verify ${dir} --trust DIR')`);
    else if (signatureProblem) w(`  signature unusable: ${signatureProblem}`);
    else w(`  signature none (unsigned; sign with 'issu image sign ${dir} --key FILE')`);
    if (extra.length) w(`  unlisted  ${extra.join(' ')} (not covered by the manifest)`);
  });
  return 0;
}

function help(o: ImageCommandOptions): number {
  o.out({ usage: IMAGE_USAGE }, () => console.log(IMAGE_USAGE));
  return 0;
}

/**
 * Runs `issu image ARGS...`. args are the words after `image` (a leading 'image' is skipped).
 * Returns the exit code: 0 OK, 1 domain failure (reported through out). Throws UsageError.
 */
export async function imageCommand(args: string[], opts: ImageCommandOptions): Promise<number> {
  const a = args[0] === 'image' ? args.slice(1) : [...args];
  const json = opts.json || a.includes('--json');
  const o: ImageCommandOptions = { json, out: opts.out };
  const [sub, ...rest] = a.filter((x) => x !== '--json');
  if (sub === undefined || sub === 'help' || sub === '--help' || sub === '-h') {
    if (sub === undefined) throw usageError(`image needs a command: keygen, sign, verify or inspect\n${IMAGE_USAGE}`);
    return help(o);
  }
  try {
    switch (sub) {
      case 'keygen':
        return await keygen(rest, o);
      case 'sign':
        return await sign(rest, o);
      case 'verify':
        return await verify(rest, o);
      case 'inspect':
        return await inspect(rest, o);
      default:
        throw usageError(`unknown command 'image ${sub}' (keygen, sign, verify, inspect)`);
    }
  } catch (e) {
    if (!(e instanceof HitlessError)) throw e;
    o.out({ error: { code: e.codeName, message: e.message } }, () => process.stderr.write(`issu: image ${sub}: ${e.codeName}: ${e.message}\n`));
    return 1;
  }
}
