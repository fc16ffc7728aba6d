/**
 * gnoi.os.OS/Install limits without VMs: one Install at a time, the size limit, tar entries that
 * are not plain bundle files, bad version strings, and partial packages removed on any failure;
 * and disk space on a real small file system (a tmpfs mounted over <state-dir>/images).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { AgentHandle, startAgent, stopAllAgents, tempDir } from '../../harness/agent-process';
import { AnyClient, rawClient } from '../../harness/grpc-client';
import { InstallErrorMsg, InstallResp, fakeBundle, install, installPackage, tarBundle } from '../helpers/gnoi';
import { until } from '../../harness/wait';
import { DISK_MARGIN_BYTES } from '../../agent/gnoi/package-store';
import { generateKeyPair } from '../../agent/images/signing';

type Resp = InstallResp;

describe('gNOI OS.Install: limits and package checks', function () {
  this.timeout(60_000);
  const dir = tempDir('gnoi-inst');
  let agent: AgentHandle;
  let os: AnyClient;
  const incoming = () => fs.readdirSync(path.join(agent.stateDir, 'images')).filter((f) => f.startsWith('.incoming-'));
  const tarOf = (name: string, setup: (d: string) => void): Buffer => {
    const d = path.join(dir, name);
    fs.mkdirSync(d);
    setup(d);
    const out = path.join(dir, `${name}.tar`);
    execFileSync('tar', ['-cf', out, '-C', d, '.']);
    return fs.readFileSync(out);
  };

  before(async () => {
    agent = await startAgent({ args: ['--max-package-bytes', '200000'] });
    os = rawClient('gnoi.os.OS', agent.socket);
  });
  after(async () => {
    os?.close();
    await stopAllAgents();
    if (agent) fs.rmSync(agent.stateDir, { recursive: true, force: true });
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('refuses a second concurrent Install with INSTALL_IN_PROGRESS', async () => {
    const a = install(os);
    a.call.write({ transferRequest: { version: '3.0.0' } });
    assert.equal((await a.next()).response, 'transferReady');
    const b = install(os);
    b.call.write({ transferRequest: { version: '3.0.1' } });
    const r = await b.next();
    assert.equal(r.response, 'installError');
    assert.equal((r.installError as { type: string }).type, 'INSTALL_IN_PROGRESS');
    await b.done;
    // The first one's client goes away mid-transfer: its partial package is removed.
    a.call.write({ transferContent: Buffer.alloc(1024) });
    a.call.cancel();
    await until('partial package removed', async () => incoming().length === 0, 10_000, 50);
  });

  it('TOO_LARGE by package_size and by bytes received; partial files removed', async () => {
    const a = install(os);
    a.call.write({ transferRequest: { version: '3.0.0', packageSize: 300000 } });
    const r = await a.next();
    assert.equal((r.installError as { type: string }).type, 'TOO_LARGE');
    assert.match((r.installError as { detail: string }).detail, /--max-package-bytes/);
    const b = install(os);
    b.call.write({ transferRequest: { version: '3.0.0' } });
    assert.equal((await b.next()).response, 'transferReady');
    const big = tarOf('big', (d) => fs.writeFileSync(path.join(d, 'rootfs.ext4'), Buffer.alloc(250_000, 1)));
    for (let i = 0; i < big.length; i += 32768) b.call.write({ transferContent: big.subarray(i, i + 32768) });
    let e: Resp;
    do e = await b.next();
    while (e.response === 'transferProgress');
    assert.equal((e.installError as { type: string }).type, 'TOO_LARGE');
    await b.done;
    assert.deepEqual(incoming(), []);
  });

  it('PARSE_FAIL for links and nested paths, and for data that is not a tar', async () => {
    const cases: [string, Buffer][] = [
      ['symlink', tarOf('sym', (d) => fs.symlinkSync('/etc/passwd', path.join(d, 'manifest.json')))],
      [
        'nested',
        tarOf('nest', (d) => {
          fs.mkdirSync(path.join(d, 'a', 'b'), { recursive: true });
          fs.writeFileSync(path.join(d, 'a', 'b', 'x'), 'x');
        }),
      ],
      ['garbage', Buffer.alloc(4096, 7)],
    ];
    for (const [what, tar] of cases) {
      const a = install(os);
      a.call.write({ transferRequest: { version: '' } });
      assert.equal((await a.next()).response, 'transferReady', what);
      a.call.write({ transferContent: tar });
      a.call.write({ transferEnd: {} });
      let e: Resp;
      do e = await a.next();
      while (e.response === 'transferProgress');
      assert.equal((e.installError as { type: string }).type, 'PARSE_FAIL', `${what}: ${JSON.stringify(e)}`);
      await a.done;
    }
    assert.deepEqual(incoming(), []);
  });

  it('a version that is not a version string is refused before anything touches the disk', async () => {
    const a = install(os);
    a.call.write({ transferRequest: { version: '../../etc' } });
    const r = await a.next();
    assert.equal(r.response, 'installError');
    assert.match((r.installError as { detail: string }).detail, /not a valid bundle version/);
    assert.deepEqual(fs.readdirSync(path.join(agent.stateDir, 'images')), []);
  });
});

/**
 * Disk space, for real: <state-dir>/images is a tmpfs of DISK_MARGIN_BYTES + 16 MiB (the agent
 * keeps the margin free, so 16 MiB is what packages may use), and the packages are small signed
 * bundles (test/helpers/gnoi.ts) that pass verification. The tests run in order and share the
 * file system: each one's starting point is what the previous ones installed.
 *
 * gNOI semantics checked (os.proto, TransferRequest.package_size and InstallError.TOO_LARGE):
 * a declared package_size that does not fit is TOO_LARGE before TransferReady, but only once
 * the target cannot release older packages; the last installed one is never released (nor the
 * running one or an upgrade's, which needs VMs and is not exercised here).
 */
describe('gNOI OS.Install: disk space on a small file system (tmpfs)', function () {
  this.timeout(60_000);
  const MiB = 1024 * 1024;
  const FS_BYTES = DISK_MARGIN_BYTES + 16 * MiB;
  const work = tempDir('gnoi-disk');
  const stateDir = path.join(work, 'state');
  const images = path.join(stateDir, 'images');
  const trust = path.join(work, 'trust');
  const key = generateKeyPair();
  let mounted = false;
  let agent: AgentHandle;
  let os: AnyClient;
  const entries = () => fs.readdirSync(images).sort();
  const free = () => {
    const st = fs.statfsSync(images);
    return Number(st.bavail) * Number(st.bsize);
  };
  const pkg = async (version: string, rootfsBytes: number) =>
    tarBundle(await fakeBundle(path.join(work, `b-${version}`), version, rootfsBytes, key.privateKeyPem));

  before(async function () {
    if (process.getuid?.() !== 0) {
      // Mounting needs root; CI (.ci/run) runs as root, so there this always runs.
      process.stderr.write('      (skipped: mounting a tmpfs needs root)\n');
      this.skip();
    }
    fs.mkdirSync(images, { recursive: true });
    fs.mkdirSync(trust);
    fs.writeFileSync(path.join(trust, 'vendor.pub'), key.publicKeyPem);
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${FS_BYTES}`, 'tmpfs', images]);
    mounted = true;
    agent = await startAgent({ stateDir, args: ['--trust-dir', trust] });
    os = rawClient('gnoi.os.OS', agent.socket);
  });
  after(async () => {
    os?.close();
    await stopAllAgents(); // before unmounting: nothing may hold files on it
    if (mounted) {
      try {
        execFileSync('umount', [images]);
      } catch {
        execFileSync('umount', ['-l', images]);
      }
    }
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('a package_size larger than the whole file system: TOO_LARGE before TransferReady, naming the free bytes; nothing written', async () => {
    const { final, transferred } = await installPackage(os, Buffer.alloc(0), { version: '1.0.0', packageSize: FS_BYTES + 1 });
    assert.equal(transferred, false);
    const e = final.installError as InstallErrorMsg;
    assert.equal(e.type, 'TOO_LARGE', JSON.stringify(final));
    assert.match(e.detail, new RegExp(`not enough disk space in ${images}: \\d+ bytes free, the package needs ${FS_BYTES + 1} bytes`));
    assert.deepEqual(entries(), [], 'no partial package, not even an empty .incoming- directory');
  });

  it('packages that fit (with the margin kept free) are stored', async () => {
    for (const v of ['1.0.0', '1.0.1']) {
      const tar = await pkg(v, 5 * MiB);
      const { final } = await installPackage(os, tar, { version: v, packageSize: tar.length });
      assert.equal(final.response, 'validated', JSON.stringify(final));
      assert.equal((final.validated as { version: string }).version, v);
    }
    assert.deepEqual(entries(), ['1.0.0', '1.0.1']);
    assert.ok(free() >= DISK_MARGIN_BYTES, `the margin is still free (${free()} bytes)`);
  });

  it('TOO_LARGE when even releasing every older package would not make room: nothing is released', async () => {
    // 1.0.0 could be released (1.0.1 is the last installed, kept), but 5 MiB would not be enough.
    const size = free() - DISK_MARGIN_BYTES + 8 * MiB;
    const { final, transferred } = await installPackage(os, Buffer.alloc(0), { version: '2.0.0', packageSize: size });
    assert.equal(transferred, false);
    const e = final.installError as InstallErrorMsg;
    assert.equal(e.type, 'TOO_LARGE', JSON.stringify(final));
    assert.match(e.detail, /no older installed version can be released/);
    assert.deepEqual(entries(), ['1.0.0', '1.0.1'], 'both installed packages are still there');
  });

  it('a package that fits only without the oldest package: the oldest is released, the last installed kept', async () => {
    const before = free();
    const tar = await pkg('1.0.2', 8 * MiB);
    assert.ok(tar.length + DISK_MARGIN_BYTES > before, `precondition: ${tar.length} bytes do not fit in ${before - DISK_MARGIN_BYTES} usable`);
    const { final } = await installPackage(os, tar, { version: '1.0.2', packageSize: tar.length });
    assert.equal(final.response, 'validated', JSON.stringify(final));
    assert.deepEqual(entries(), ['1.0.1', '1.0.2'], '1.0.0 (oldest) released; 1.0.1 kept');
    assert.ok(fs.existsSync(path.join(images, '1.0.1', 'rootfs.ext4')));
  });

  it('a package of undeclared size (package_size 0) that outgrows the free space: TOO_LARGE mid-transfer, partial removed', async () => {
    const tar = await pkg('1.0.3', 8 * MiB);
    const { final, transferred } = await installPackage(os, tar, { version: '1.0.3', packageSize: 0 });
    assert.equal(transferred, true, 'without a declared size the transfer starts');
    const e = final.installError as InstallErrorMsg;
    assert.equal(e.type, 'TOO_LARGE', JSON.stringify(final));
    assert.match(e.detail, /disk space ran short while receiving the package.*declare package_size/);
    await until('partial package removed', () => entries().every((f) => !f.startsWith('.incoming-')), 10_000, 50);
    assert.deepEqual(entries(), ['1.0.1', '1.0.2'], 'nothing released for a package of unknown size');
  });
});
