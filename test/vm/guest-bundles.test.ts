/**
 * The guest image bundles the build scripts write (scripts/build-guest-images.sh, built here or
 * taken from .cache/guest/images): their manifests read, and a real bundle signs and verifies.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { readManifest } from '../../agent/images/manifest';
import { generateKeyPair, signBundle, verifyBundle } from '../../agent/images/signing';
import { tempDir } from '../../harness/agent-process';
import { buildGuestImages } from '../../harness/guest-images';

describe('guest image bundles from the build scripts', function () {
  this.timeout(40 * 60_000); // on a fresh machine both bundles are built first: minutes
  let built: Record<string, string>;
  let tmp: string;

  before(() => {
    built = buildGuestImages(['x86_64-1.0.0', 'aarch64-1.0.0']);
    tmp = tempDir('bundles');
  });
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('have manifests naming their arch and a kernel, an initrd and a rootfs', () => {
    assert.deepEqual(Object.keys(built).sort(), ['aarch64-1.0.0', 'x86_64-1.0.0']);
    for (const [name, dir] of Object.entries(built)) {
      const m = readManifest(dir);
      assert.equal(m.arch, name.split('-')[0]);
      assert.equal(m.version, '1.0.0');
      assert.deepEqual(m.files.map((f) => f.role).sort(), ['initrd', 'kernel', 'rootfs']);
    }
  });

  it('sign and verify (a bundle hard-linked into a temp dir, signed with a fresh key)', async () => {
    const src = built['x86_64-1.0.0'];
    const d = path.join(tmp, 'real');
    fs.mkdirSync(d);
    for (const f of fs.readdirSync(src)) {
      if (f === 'manifest.sig') continue;
      try {
        fs.linkSync(path.join(src, f), path.join(d, f));
      } catch {
        fs.copyFileSync(path.join(src, f), path.join(d, f), fs.constants.COPYFILE_FICLONE);
      }
    }
    const kp = generateKeyPair();
    const trust = path.join(tmp, 'trust');
    fs.mkdirSync(trust);
    fs.writeFileSync(path.join(trust, 'vendor.pub'), kp.publicKeyPem);
    await signBundle(d, kp.privateKeyPem, { checkFiles: false });
    const t0 = process.hrtime.bigint();
    const v = await verifyBundle(d, trust);
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    assert.ok(v.bytes > 10 * 1048576);
    console.log(`      verified ${path.basename(src)}: ${(v.bytes / 1048576).toFixed(1)} MiB in ${ms.toFixed(0)} ms`);
  });
});
