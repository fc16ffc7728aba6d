/**
 * `issu image ...` through imageCommand() directly (no CLI process, no agent), with --json.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { imageCommand } from '../../agent/cli/image-commands';
import { writeTestBundle } from '../helpers/test-bundle';

const makeBundle = (dir: string, over: { version?: string } = {}) => void writeTestBundle(dir, over);

async function run(...args: string[]): Promise<{ code: number; out: Record<string, unknown>[] }> {
  const out: Record<string, unknown>[] = [];
  const code = await imageCommand(args, { json: true, out: (o) => out.push(o as Record<string, unknown>) });
  return { code, out };
}

async function usage(args: string[], re: RegExp): Promise<void> {
  await assert.rejects(run(...args), (e: Error) => e.name === 'UsageError' && re.test(e.message));
}

describe('issu image (imageCommand, --json)', () => {
  let tmp: string;
  before(() => (tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-image-cli-'))));
  after(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('keygen -> sign -> verify -> inspect', async () => {
    const keys = path.join(tmp, 'keys');
    const bundle = path.join(tmp, 'b1');
    makeBundle(bundle, { version: '1.2.3' });

    const k = await run('keygen', '--out', keys, '--name', 'vendor');
    assert.equal(k.code, 0);
    const key = k.out[0] as { keyId: string; privateKey: string; publicKey: string };
    assert.match(key.keyId, /^[0-9a-f]{16}$/);
    assert.equal(key.privateKey, path.join(keys, 'vendor.key'));
    assert.equal(fs.statSync(key.privateKey).mode & 0o777, 0o600);
    assert.ok(fs.existsSync(path.join(keys, 'vendor.pub')));

    const again = await run('keygen', '--out', keys, '--name', 'vendor');
    assert.equal(again.code, 1);
    assert.equal((again.out[0].error as { code: string }).code, 'ALREADY_EXISTS');

    const s = await run('image', 'sign', bundle, '--key', key.privateKey); // a leading 'image' is tolerated
    assert.equal(s.code, 0);
    assert.equal(s.out[0].keyId, key.keyId);

    const trust = path.join(tmp, 'trust');
    fs.mkdirSync(trust);
    fs.copyFileSync(key.publicKey, path.join(trust, 'vendor.pub'));
    const v = await run('verify', bundle, '--trust', trust);
    assert.equal(v.code, 0);
    assert.equal(v.out.length, 1);
    assert.equal(v.out[0].ok, true);
    assert.equal(v.out[0].keyId, key.keyId);
    assert.equal(v.out[0].version, '1.2.3');

    const i = await run('inspect', bundle, '--json');
    assert.equal(i.code, 0);
    const info = i.out[0] as {
      version: string;
      arch: string;
      totalBytes: number;
      files: { path: string; sha256: string; sizeMatches: boolean }[];
      signature: { keyId: string };
      processes: { name: string; schemaWrites: number }[];
    };
    assert.equal(info.version, '1.2.3');
    assert.equal(info.arch, 'x86_64');
    assert.deepEqual(
      info.files.map((f) => f.path),
      ['vmlinuz', 'initrd.img', 'rootfs.ext4'],
    );
    assert.ok(info.files.every((f) => f.sizeMatches && /^[0-9a-f]{64}$/.test(f.sha256)));
    assert.equal(info.signature.keyId, key.keyId);
    assert.deepEqual(
      info.processes.map((p) => [p.name, p.schemaWrites]),
      [['bgp', 1]],
    );
    assert.equal(
      info.totalBytes,
      info.files.reduce((n, f) => n + (f as unknown as { size: number }).size, 0),
    );
  });

  it('verify fails with exit 1 and the reason', async () => {
    const keys = path.join(tmp, 'keys2');
    const bundle = path.join(tmp, 'b2');
    makeBundle(bundle);
    const k = (await run('keygen', '--out', keys)).out[0] as { keyId: string; privateKey: string };
    await run('sign', bundle, '--key', k.privateKey);
    const emptyTrust = path.join(tmp, 'empty-trust');
    fs.mkdirSync(emptyTrust);
    const v = await run('verify', bundle, '--trust', emptyTrust);
    assert.equal(v.code, 1);
    const err = v.out[0].error as { code: string; message: string };
    assert.equal(v.out[0].ok, false);
    assert.equal(err.code, 'PERMISSION_DENIED');
    assert.match(err.message, new RegExp(`key ${k.keyId} is not in`));

    fs.copyFileSync(path.join(keys, 'image-signing.pub'), path.join(emptyTrust, 'k.pub'));
    fs.appendFileSync(path.join(bundle, 'rootfs.ext4'), 'extra');
    const v2 = await run('verify', bundle, '--trust', emptyTrust);
    assert.equal(v2.code, 1);
    assert.match((v2.out[0].error as { message: string }).message, /file rootfs\.ext4: size mismatch/);

    const missing = await run('inspect', path.join(tmp, 'nope'));
    assert.equal(missing.code, 1);
    assert.equal((missing.out[0].error as { code: string }).code, 'NOT_FOUND');
  });

  it('usage errors throw UsageError', async () => {
    await usage([], /needs a command/);
    await usage(['frobnicate'], /unknown command 'image frobnicate'/);
    await usage(['keygen'], /needs --out DIR/);
    await usage(['sign', path.join(tmp, 'b1')], /needs --key FILE/);
    await usage(['verify', '--trust', tmp], /needs exactly one BUNDLE/);
    await usage(['verify', 'a', 'b', '--trust', tmp], /needs exactly one BUNDLE directory, got 'a b'/);
    await usage(['inspect', 'x', '--bogus'], /Unknown option '--bogus'/);
    await usage(['keygen', '--out', tmp, '--name', '../evil'], /--name must match/);
  });
});
