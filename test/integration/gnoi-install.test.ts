/**
 * gnoi.os.OS/Install limits without VMs: one Install at a time, the size limit, tar entries that
 * are not plain bundle files, bad version strings, and partial packages removed on any failure.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { AgentHandle, startAgent, stopAllAgents, tempDir } from '../helpers/agent-process';
import { AnyClient, rawClient } from '../helpers/grpc-client';
import { until } from '../helpers/wait';

type Resp = Record<string, unknown> & { response: string };

function install(c: AnyClient) {
  const call = (c.Install as () => grpc.ClientDuplexStream<unknown, Resp>).call(c);
  const got: Resp[] = [];
  const waiters: (() => void)[] = [];
  let ended = false;
  call.on('data', (m: Resp) => {
    got.push(m);
    waiters.splice(0).forEach((w) => w());
  });
  const done = new Promise<void>((resolve) => {
    call.on('end', () => {
      ended = true;
      resolve();
      waiters.splice(0).forEach((w) => w());
    });
    call.on('error', () => resolve());
  });
  const next = async (): Promise<Resp> => {
    while (got.length === 0) {
      if (ended) throw new Error('stream ended without a response');
      await new Promise<void>((r) => waiters.push(r));
    }
    return got.shift()!;
  };
  return { call, next, done };
}

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
      ['nested', tarOf('nest', (d) => {
        fs.mkdirSync(path.join(d, 'a', 'b'), { recursive: true });
        fs.writeFileSync(path.join(d, 'a', 'b', 'x'), 'x');
      })],
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
