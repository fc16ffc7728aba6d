/**
 * Image bundles: manifest validation, ed25519 signing and verification, and the per-process
 * schema compatibility matrix. Uses small synthetic bundles (same manifest format, real sha256s)
 * and, when one is cached, a single real bundle from .cache/images (hard-linked, not copied).
 */
import assert from 'node:assert/strict';
import { status } from '@grpc/grpc-js';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { HitlessError } from '../../agent/common/errors';
import { assertCompatible, compatibilityMatrix, type ProcessInfo } from '../../agent/images/compatibility';
import { type Manifest, type ManifestProcess, readManifest } from '../../agent/images/manifest';
import { generateKeyPair, keyIdOf, signBundle, verifyBundle } from '../../agent/images/signing';
import { writeTestBundle } from '../helpers/test-bundle';

const sha = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

/** A small bundle: three role files with random contents (3 MiB rootfs) and its manifest. */
function makeBundle(dir: string, over: { version?: string; processes?: ManifestProcess[]; mutate?: (m: Record<string, unknown>) => void } = {}): Manifest {
  return writeTestBundle(dir, { ...over, rootfsBytes: 3 * 1048576 + 17 });
}

async function rejects(p: Promise<unknown> | (() => unknown), code: status, re: RegExp): Promise<HitlessError> {
  let err: unknown;
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof HitlessError, `expected a HitlessError, got ${String(err)}`);
  assert.equal(status[err.code], status[code], err.message);
  assert.match(err.message, re);
  return err;
}

const proc = (name: string, schemaWrites: number, schemaReads: number[], transforms?: string[]): ManifestProcess => ({
  name,
  command: ['/opt/hitless/node', `/opt/hitless/daemons/${name}.js`],
  schemaWrites,
  schemaReads,
  ...(transforms ? { transforms } : {}),
});
const manifestWith = (version: string, processes: ManifestProcess[]) => ({ version, processes }) as unknown as Manifest;

describe('image bundles', () => {
  let tmp: string;
  let trust: string;
  let kp: ReturnType<typeof generateKeyPair>;

  before(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-images-'));
    trust = path.join(tmp, 'trust');
    fs.mkdirSync(trust);
    kp = generateKeyPair();
    fs.writeFileSync(path.join(trust, 'vendor.pub'), kp.publicKeyPem);
    fs.writeFileSync(path.join(trust, 'README'), 'not a key');
  });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  describe('manifest', () => {
    it('rejects a file path that leaves the bundle, naming the field', async () => {
      const d = path.join(tmp, 'dotdot');
      makeBundle(d, { mutate: (m) => ((m.files as { path: string }[])[1].path = '../x') });
      await rejects(() => readManifest(d), status.INVALID_ARGUMENT, /files\[1\]\.path "\.\.\/x" must be a plain file name/);
    });

    it('reports every problem with its field path', async () => {
      const d = path.join(tmp, 'bad-fields');
      makeBundle(d, {
        mutate: (m) => {
          m.version = 'one';
          m.arch = 'riscv64';
          delete m.cpus;
          (m.files as unknown[]).splice(0, 1);
          (m.processes as Record<string, unknown>[])[0].schemaWrites = 0;
          (m.processes as Record<string, unknown>[])[0].transforms = ['1=>2'];
        },
      });
      const e = await rejects(() => readManifest(d), status.INVALID_ARGUMENT, /version must look like/);
      for (const re of [
        /arch must be one of x86_64, aarch64/,
        /cpus is required/,
        /files has no entry with role 'kernel'/,
        /processes\[0\]\.schemaWrites must be an integer >= 1/,
        /processes\[0\]\.transforms\[0\]/,
      ]) {
        assert.match(e.message, re);
      }
    });

    it('answers NOT_FOUND for a directory without manifest.json', async () => {
      await rejects(() => readManifest(path.join(tmp, 'trust')), status.NOT_FOUND, /has no manifest\.json/);
    });
  });

  describe('signing', () => {
    it('key id is the first 16 hex of sha256 over the SPKI DER', () => {
      const der = crypto.createPublicKey(kp.publicKeyPem).export({ type: 'spki', format: 'der' });
      assert.equal(kp.keyId, sha(der).slice(0, 16));
      assert.equal(keyIdOf(kp.privateKeyPem), kp.keyId);
      assert.match(kp.privateKeyPem, /BEGIN PRIVATE KEY/);
      assert.match(kp.publicKeyPem, /BEGIN PUBLIC KEY/);
    });

    it('sign -> verify OK, with progress up to the total', async () => {
      const d = path.join(tmp, 'ok');
      const m = makeBundle(d);
      const s = await signBundle(d, kp.privateKeyPem);
      assert.equal(s.keyId, kp.keyId);
      const sig = JSON.parse(fs.readFileSync(path.join(d, 'manifest.sig'), 'utf8'));
      assert.deepEqual(Object.keys(sig).sort(), ['algorithm', 'keyId', 'signature']);
      assert.equal(sig.algorithm, 'ed25519');
      const seen: [number, number][] = [];
      const v = await verifyBundle(d, trust, (done, total) => seen.push([done, total]));
      const total = m.files.reduce((n, f) => n + f.size, 0);
      assert.equal(v.keyId, kp.keyId);
      assert.equal(v.bytes, total);
      assert.equal(v.manifest.version, '1.0.0');
      assert.deepEqual(seen.at(-1), [total, total]);
      for (let i = 1; i < seen.length; i++) assert.ok(seen[i][0] >= seen[i - 1][0]);
    });

    it('a tampered file fails with a sha256 mismatch', async () => {
      const d = path.join(tmp, 'tampered-file');
      makeBundle(d);
      await signBundle(d, kp.privateKeyPem);
      const f = path.join(d, 'rootfs.ext4');
      const fd = fs.openSync(f, 'r+');
      fs.writeSync(fd, Buffer.from([0xff, 0x00, 0xaa]), 0, 3, 1048576);
      fs.closeSync(fd);
      await rejects(
        verifyBundle(d, trust),
        status.FAILED_PRECONDITION,
        /^file rootfs\.ext4: sha256 mismatch \(manifest [0-9a-f]+\.\., file [0-9a-f]+\.\.\): the bundle is corrupt or was modified; fetch it again$/,
      );
    });

    it('a truncated file fails on its size before hashing', async () => {
      const d = path.join(tmp, 'truncated');
      makeBundle(d);
      await signBundle(d, kp.privateKeyPem);
      fs.truncateSync(path.join(d, 'initrd.img'), 10);
      let hashed = 0;
      await rejects(
        verifyBundle(d, trust, (n) => (hashed = n)),
        status.FAILED_PRECONDITION,
        /file initrd\.img: size mismatch \(manifest 2000 bytes, file 10\)/,
      );
      assert.equal(hashed, 0);
    });

    it('a tampered manifest fails the signature', async () => {
      const d = path.join(tmp, 'tampered-manifest');
      makeBundle(d);
      await signBundle(d, kp.privateKeyPem);
      const mf = path.join(d, 'manifest.json');
      fs.writeFileSync(mf, fs.readFileSync(mf, 'utf8').replace('"memoryMiB": 256', '"memoryMiB": 4096'));
      await rejects(verifyBundle(d, trust), status.PERMISSION_DENIED, new RegExp(`signature by key ${kp.keyId} does not match manifest\\.json`));
    });

    it('an untrusted key is PERMISSION_DENIED naming the key id', async () => {
      const d = path.join(tmp, 'untrusted');
      makeBundle(d);
      const other = generateKeyPair();
      await signBundle(d, other.privateKeyPem);
      const e = await rejects(verifyBundle(d, trust), status.PERMISSION_DENIED, new RegExp(`^signature not trusted: key ${other.keyId} is not in ${trust}`));
      assert.match(e.message, /add the vendor's public key there or sign with a trusted key/);
      assert.match(e.message, new RegExp(`it holds ${kp.keyId} \\(vendor\\.pub\\)`));
    });

    it('an unsigned bundle is PERMISSION_DENIED', async () => {
      const d = path.join(tmp, 'unsigned');
      makeBundle(d);
      await rejects(verifyBundle(d, trust), status.PERMISSION_DENIED, /is unsigned \(no manifest\.sig\)/);
    });

    it('refuses to sign a bundle whose files do not match, or with a non-ed25519 key', async () => {
      const d = path.join(tmp, 'sign-corrupt');
      makeBundle(d);
      fs.appendFileSync(path.join(d, 'vmlinuz'), 'x');
      await rejects(signBundle(d, kp.privateKeyPem), status.FAILED_PRECONDITION, /file vmlinuz: size mismatch/);
      assert.equal(fs.existsSync(path.join(d, 'manifest.sig')), false);
      const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 1024 }).privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
      await rejects(signBundle(d, rsa), status.INVALID_ARGUMENT, /rsa key, bundles are signed with ed25519/);
    });
  });

  describe('compatibility', () => {
    it('same schema both ways is direct', () => {
      const [r] = compatibilityMatrix(manifestWith('1.0.0', [proc('bgp', 1, [1])]), manifestWith('1.1.0', [proc('bgp', 1, [1])]));
      assert.deepEqual(
        { process: r.process, change: r.change, fromVersion: r.fromVersion, toVersion: r.toVersion, forward: r.forward, backward: r.backward, via: r.via },
        { process: 'bgp', change: 'kept', fromVersion: '1.0.0', toVersion: '1.1.0', forward: true, backward: true, via: 'direct' },
      );
      assertCompatible([r]);
    });

    it('forward only: the new one reads 1 and writes 2, the old one cannot read 2', () => {
      const m = compatibilityMatrix(manifestWith('1.0.0', [proc('bgp', 1, [1])]), manifestWith('2.0.0', [proc('bgp', 2, [1, 2])]));
      assert.equal(m[0].forward, true);
      assert.equal(m[0].forwardVia, 'direct');
      assert.equal(m[0].backward, false);
      assert.match(m[0].reason!, /a rollback would not be hitless/);
      assert.throws(
        () => assertCompatible(m),
        (e: HitlessError) =>
          e.code === status.FAILED_PRECONDITION && /incompatible schema 1->2 for process bgp/.test(e.message) && /transform "2->1"/.test(e.message),
      );
    });

    it('backward only: the old one already reads 2 but the new one no longer reads 1', () => {
      const m = compatibilityMatrix(manifestWith('1.5.0', [proc('ospf', 1, [1, 2])]), manifestWith('2.0.0', [proc('ospf', 2, [2])]));
      assert.equal(m[0].forward, false);
      assert.equal(m[0].backward, true);
      assert.match(m[0].reason!, /cannot start as its standby/);
      assert.throws(() => assertCompatible(m), /incompatible schema 1->2 for process ospf.*add it to schemaReads, or declare a transform "1->2"/);
    });

    it('transforms make both directions work', () => {
      // new writes 2 natively, reads 1 through 1->2 and can write 1 for the old one through 2->1
      const m = compatibilityMatrix(manifestWith('1.0.0', [proc('bgp', 1, [1])]), manifestWith('2.0.0', [proc('bgp', 2, [2], ['1->2', '2->1'])]));
      assert.equal(m[0].forward, true);
      assert.equal(m[0].backward, true);
      assert.equal(m[0].forwardVia, 'transform');
      assert.equal(m[0].backwardVia, 'transform');
      assert.equal(m[0].via, 'transform');
      assertCompatible(m);
    });

    it('running side as ProcessInfo[], with added and removed processes', () => {
      const running: ProcessInfo[] = [
        { name: 'bgp', schemaWrites: 3, schemaReads: [2, 3], version: '3.1.0' },
        { name: 'rip', schemaWrites: 1, schemaReads: [1], version: '3.1.0' },
      ];
      const m = compatibilityMatrix(running, manifestWith('4.0.0', [proc('bgp', 3, [3]), proc('isis', 1, [1])]));
      assert.deepEqual(
        m.map((r) => [r.process, r.change, r.forward, r.backward]),
        [
          ['bgp', 'kept', true, true],
          ['isis', 'added', true, true],
          ['rip', 'removed', true, true],
        ],
      );
      assert.equal(m[0].fromVersion, '3.1.0');
      assert.match(m[1].reason!, /added in 4\.0\.0/);
      assert.match(m[2].reason!, /removed in 4\.0\.0/);
      assertCompatible(m);
    });

    it('works on manifests read from disk', () => {
      const a = path.join(tmp, 'compat-a');
      const b = path.join(tmp, 'compat-b');
      makeBundle(a, { version: '1.0.0', processes: [proc('bgp', 1, [1])] });
      makeBundle(b, { version: '2.0.0', processes: [proc('bgp', 2, [2], ['1->2', '2->1'])] });
      const m = compatibilityMatrix(readManifest(a), readManifest(b));
      assert.equal(m[0].via, 'transform');
    });
  });
});
