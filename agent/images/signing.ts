/**
 * Signing and verifying image bundles with ed25519 (node:crypto only).
 *
 * A bundle is signed by signing the exact bytes of its manifest.json; the manifest lists every
 * file's size and sha256, so a valid signature plus matching files proves the whole bundle.
 * The signature lives next to it in manifest.sig:
 *
 *   {"keyId":"<16 hex>","algorithm":"ed25519","signature":"<base64>"}
 *
 * The key id is the first 16 hex digits of sha256 over the public key's SPKI DER. A trust
 * directory holds the public keys (PEM SPKI, files named *.pub) that an agent accepts.
 *
 * verifyBundle() checks, cheapest first so that an untrusted bundle is rejected before ~100 MB
 * are hashed: manifest parses and validates (INVALID_ARGUMENT) -> signature present, key
 * trusted, signature valid over the bytes just parsed (PERMISSION_DENIED) -> every file exists
 * with its size (FAILED_PRECONDITION) -> every file's sha256 (FAILED_PRECONDITION).
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { failedPrecondition, invalidArgument, notFound, permissionDenied } from '../common/errors';
import { type Manifest, parseManifest, readManifestBytes, MANIFEST_FILE, SIGNATURE_FILE, totalBytes } from './manifest';

export const SIGNATURE_ALGORITHM = 'ed25519';
const KEY_ID = /^[0-9a-f]{16}$/;

export interface KeyPair {
  /** PKCS#8 PEM; keep it secret. */
  privateKeyPem: string;
  /** SPKI PEM; goes into the trust directory as <name>.pub. */
  publicKeyPem: string;
  keyId: string;
}

export interface BundleSignature {
  keyId: string;
  algorithm: 'ed25519';
  /** base64 ed25519 signature over the bytes of manifest.json */
  signature: string;
}

export interface VerifiedBundle {
  dir: string;
  manifest: Manifest;
  /** Key id of the trusted key that signed the manifest. */
  keyId: string;
  /** Total bytes hashed (sum of the manifest's file sizes). */
  bytes: number;
  /** The trust file that held the key. */
  trustedKeyFile: string;
}

export type ProgressFn = (bytesDone: number, bytesTotal: number) => void;

/** First 16 hex digits of sha256(SPKI DER) of a public key (or of the public half of a private key). */
export function keyIdOf(key: crypto.KeyObject | string): string {
  const k = typeof key === 'string' ? crypto.createPublicKey(key) : key.type === 'private' ? crypto.createPublicKey(key) : key;
  const der = k.export({ type: 'spki', format: 'der' });
  return crypto.createHash('sha256').update(der).digest('hex').slice(0, 16);
}

export function generateKeyPair(): KeyPair {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('ed25519');
  return {
    privateKeyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string,
    publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }) as string,
    keyId: keyIdOf(publicKey),
  };
}

function loadPrivateKey(pem: string): crypto.KeyObject {
  let key: crypto.KeyObject;
  try {
    key = crypto.createPrivateKey(pem);
  } catch (e) {
    throw invalidArgument(`the signing key is not a PEM private key (${(e as Error).message}); give the NAME.key file written by 'issu image keygen'`);
  }
  if (key.asymmetricKeyType !== 'ed25519') {
    throw invalidArgument(
      `the signing key is a ${key.asymmetricKeyType ?? 'unknown'} key, bundles are signed with ed25519; create one with 'issu image keygen'`,
    );
  }
  return key;
}

function writeAtomic(file: string, data: string): void {
  const tmp = `${file}.tmp-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
  try {
    fs.writeFileSync(tmp, data, { mode: 0o644 });
    fs.renameSync(tmp, file);
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw e;
  }
}

/**
 * Signs dir/manifest.json with an ed25519 private key (PKCS#8 PEM) and writes dir/manifest.sig.
 * The manifest must validate, and unless `checkFiles` is false the files must match it too
 * (signing a bundle vouches for its contents, so a corrupt one is refused).
 */
export async function signBundle(
  dir: string,
  privateKeyPem: string,
  opts: { checkFiles?: boolean; onProgress?: ProgressFn } = {},
): Promise<{ keyId: string; sigPath: string; signature: BundleSignature }> {
  const key = loadPrivateKey(privateKeyPem);
  const raw = readManifestBytes(dir);
  const manifest = parseManifest(raw, path.join(dir, MANIFEST_FILE));
  if (opts.checkFiles !== false) await verifyFiles(dir, manifest, opts.onProgress);
  const signature: BundleSignature = {
    keyId: keyIdOf(key),
    algorithm: SIGNATURE_ALGORITHM,
    signature: crypto.sign(null, raw, key).toString('base64'),
  };
  const sigPath = path.join(dir, SIGNATURE_FILE);
  writeAtomic(sigPath, JSON.stringify(signature) + '\n');
  return { keyId: signature.keyId, sigPath, signature };
}

/**
 * Reads dir/manifest.sig. Undefined when the bundle is unsigned; PERMISSION_DENIED when the file
 * is there but malformed.
 */
export function readSignature(dir: string): BundleSignature | undefined {
  const file = path.join(dir, SIGNATURE_FILE);
  let raw: string;
  try {
    raw = fs.readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  let s: unknown;
  try {
    s = JSON.parse(raw);
  } catch {
    throw permissionDenied(`signature not trusted: ${file} is not valid JSON; fetch the bundle again or re-sign it with 'issu image sign'`);
  }
  const o = s as Record<string, unknown>;
  if (typeof o !== 'object' || o === null || typeof o.keyId !== 'string' || !KEY_ID.test(o.keyId) || typeof o.signature !== 'string') {
    throw permissionDenied(
      `signature not trusted: ${file} is malformed (needs keyId of 16 hex digits and a base64 signature); fetch the bundle again or re-sign it`,
    );
  }
  if (o.algorithm !== SIGNATURE_ALGORITHM) {
    throw permissionDenied(
      `signature not trusted: ${file} uses algorithm ${JSON.stringify(o.algorithm)}, only ed25519 is accepted; re-sign the bundle with 'issu image sign'`,
    );
  }
  return { keyId: o.keyId, algorithm: SIGNATURE_ALGORITHM, signature: o.signature };
}

export interface TrustedKey {
  keyId: string;
  file: string;
  key: crypto.KeyObject;
}

/**
 * Loads every *.pub (PEM SPKI ed25519) in trustDir. Files that are not such keys are listed in
 * `skipped` with the reason, so messages can say why a key did not count.
 */
export function loadTrustDir(trustDir: string): { keys: TrustedKey[]; skipped: string[] } {
  let names: string[];
  try {
    names = fs.readdirSync(trustDir);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw permissionDenied(`signature not trusted: trust directory ${trustDir} does not exist; create it and put the vendor's public key (NAME.pub) there`);
    }
    throw e;
  }
  const keys: TrustedKey[] = [];
  const skipped: string[] = [];
  for (const n of names.filter((x) => x.endsWith('.pub')).sort()) {
    const file = path.join(trustDir, n);
    try {
      const key = crypto.createPublicKey(fs.readFileSync(file));
      if (key.asymmetricKeyType !== 'ed25519') {
        skipped.push(`${n} (a ${key.asymmetricKeyType} key, not ed25519)`);
        continue;
      }
      keys.push({ keyId: keyIdOf(key), file, key });
    } catch (e) {
      skipped.push(`${n} (${(e as Error).message.split('\n')[0]})`);
    }
  }
  return { keys, skipped };
}

/** Checks the signature of manifest bytes against the trust directory; returns the trusted key. */
export function checkSignature(dir: string, manifestRaw: Buffer, trustDir: string): TrustedKey {
  const sig = readSignature(dir);
  if (!sig) {
    throw permissionDenied(
      `signature not trusted: ${dir} is unsigned (no ${SIGNATURE_FILE}); sign it with 'issu image sign ${dir} --key KEY' using a key whose .pub is in ${trustDir}`,
    );
  }
  const { keys, skipped } = loadTrustDir(trustDir);
  const trusted = keys.find((k) => k.keyId === sig.keyId);
  if (!trusted) {
    const have = keys.length ? `it holds ${keys.map((k) => `${k.keyId} (${path.basename(k.file)})`).join(', ')}` : 'it holds no usable *.pub key';
    const skip = skipped.length ? `; ignored ${skipped.join(', ')}` : '';
    throw permissionDenied(
      `signature not trusted: key ${sig.keyId} is not in ${trustDir} (${have}${skip}); add the vendor's public key there or sign with a trusted key`,
    );
  }
  const sigBytes = Buffer.from(sig.signature, 'base64');
  if (sigBytes.length !== 64 || !crypto.verify(null, manifestRaw, trusted.key, sigBytes)) {
    throw permissionDenied(
      `signature not trusted: the signature by key ${sig.keyId} does not match ${MANIFEST_FILE}; the manifest was modified after signing or the signature is corrupt; fetch the bundle again`,
    );
  }
  return trusted;
}

/**
 * Checks that every file the manifest lists is a regular file with the recorded size and sha256.
 * Sizes are checked for all files before anything is hashed. Files are streamed (1 MiB reads) and
 * progress is reported as (bytesDone, bytesTotal) over all files. Returns the bytes hashed.
 */
export async function verifyFiles(dir: string, manifest: Manifest, onProgress?: ProgressFn): Promise<number> {
  const total = totalBytes(manifest);
  for (const f of manifest.files) {
    const p = path.join(dir, f.path);
    let st: fs.Stats;
    try {
      st = fs.lstatSync(p);
    } catch {
      throw failedPrecondition(`file ${f.path} (${f.role}) is missing from ${dir}: the bundle is incomplete; fetch it again`);
    }
    if (!st.isFile())
      throw failedPrecondition(`file ${f.path} (${f.role}) is not a regular file (symlinks are not allowed in a bundle); fetch the bundle again`);
    if (st.size !== f.size) {
      throw failedPrecondition(
        `file ${f.path}: size mismatch (manifest ${f.size} bytes, file ${st.size}): the bundle is corrupt or was modified; fetch it again`,
      );
    }
  }
  let done = 0;
  onProgress?.(0, total);
  for (const f of manifest.files) {
    const p = path.join(dir, f.path);
    const { sha256: got, bytes: n } = await sha256OfFile(p, {
      noFollow: true,
      limit: f.size,
      onRead: (read) => {
        done += read;
        onProgress?.(Math.min(done, total), total);
      },
    });
    if (n !== f.size) {
      throw failedPrecondition(
        `file ${f.path}: size mismatch (manifest ${f.size} bytes, read ${n}${n > f.size ? '+' : ''}): the file changed while it was verified; fetch the bundle again`,
      );
    }
    if (got !== f.sha256) {
      throw failedPrecondition(
        `file ${f.path}: sha256 mismatch (manifest ${f.sha256.slice(0, 12)}.., file ${got.slice(0, 12)}..): the bundle is corrupt or was modified; fetch it again`,
      );
    }
  }
  onProgress?.(total, total);
  return total;
}

/**
 * Full verification of a bundle before it is booted: manifest valid, signed by a key in
 * trustDir, every file intact. See the file comment for the order and the error codes.
 */
export async function verifyBundle(dir: string, trustDir: string, onProgress?: ProgressFn): Promise<VerifiedBundle> {
  // A turn of the event loop between the steps: each reads files synchronously, and together
  // they held the agent's loop for 40 ms at the start of an upgrade with the CPUs busy.
  const raw = readManifestBytes(dir);
  const manifest = parseManifest(raw, path.join(dir, MANIFEST_FILE));
  await nextTurn();
  const trusted = checkSignature(dir, raw, trustDir);
  await nextTurn();
  const bytes = await verifyFiles(dir, manifest, onProgress);
  return { dir, manifest, keyId: trusted.keyId, bytes, trustedKeyFile: trusted.file };
}

const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

/** Reads a PEM file for the CLI with a clear error when it is missing. */
export function readKeyFile(file: string, what: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw notFound(`${what} ${file} does not exist; create a key pair with 'issu image keygen --out DIR'`);
    throw e;
  }
}

/**
 * A file's sha256, read 1 MiB at a time into one buffer: each read is a turn of the event loop
 * (about 1 ms of hashing), and no fresh memory is taken per chunk. `noFollow`: a symlink is
 * refused (ELOOP). `onRead` hears of every read; reading stops once more than `limit` bytes were
 * read (a file that grew while it was read), so `bytes` then exceeds it.
 */
export async function sha256OfFile(
  p: string,
  opts: { noFollow?: boolean; limit?: number; onRead?: (bytes: number) => void } = {},
): Promise<{ sha256: string; bytes: number }> {
  const limit = opts.limit ?? Number.MAX_SAFE_INTEGER;
  const fh = await fs.promises.open(p, fs.constants.O_RDONLY | (opts.noFollow ? fs.constants.O_NOFOLLOW : 0));
  const h = crypto.createHash('sha256');
  let n = 0;
  try {
    const buf = Buffer.allocUnsafe(1 << 20);
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
      n += bytesRead;
      if (n > limit) break;
      opts.onRead?.(bytesRead);
    }
  } finally {
    await fh.close();
  }
  return { sha256: h.digest('hex'), bytes: n };
}
