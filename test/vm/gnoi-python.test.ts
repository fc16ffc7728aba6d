/**
 * gNOI end to end under TCG: a real hitlessd with a mutual-TLS listener (test CA), real QEMU
 * running the v1 control plane, and a Python gNOI client (test/python/gnoi_client.py, stubs
 * generated from proto/ by grpc_tools.protoc at test time) that installs the signed v2 bundle as
 * a tar package, activates it (no_reboot=false: the whole hitless upgrade, see
 * agent/gnoi/gnoi.grpc.ts) and verifies it. The TypeScript side checks the upgrade through
 * hitless.v1.Upgrade/Checkpoint on the unix socket.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AgentHandle, startAgent, stopAllAgents } from '../helpers/agent-process';
import { AnyClient, rawClient, unaryCall } from '../helpers/grpc-client';
import { until } from '../helpers/wait';
import { Pem, TestCa, tlsAgentArgs } from '../helpers/tls-ca';
import type { StatusResponse } from '../../agent/checkpoint/messages';
import type { VmInfoMessage, ListVmsResponse } from '../../agent/vm/vm.messages';
import { generateKeyPair } from '../../agent/images/signing';
import { QemuReaper } from './fixtures';
import { buildGuestImages, signedVariant, bootControlPlane, printAgentLogIfFailed } from '../helpers/guest-images';

const REPO = path.resolve(__dirname, '..', '..', '..');
const CLIENT = path.join(REPO, 'test/python/gnoi_client.py');
// Debian's python3 carries python3-grpcio and python3-grpc-tools (scripts/setup.sh).
const PYTHON = fs.existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const measure = (what: string, v: number | string) => process.stderr.write(`      MEASURE ${what}: ${v}\n`);

type Line = Record<string, unknown> & { event: string };



describe('gNOI OS/System from a Python client over mTLS (real QEMU under TCG)', function () {
  this.timeout(900_000);
  const reaper = new QemuReaper();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hgn-'));
  const trustDir = path.join(work, 'trust');
  let v1 = '';
  let v2 = '';
  let tampered = '';
  let agent: AgentHandle;
  let ca: TestCa;
  let operator: Pem;
  let viewer: Pem;
  let ck: AnyClient;
  let vmc: AnyClient;
  let up: AnyClient;

  const py = (who: Pem, args: string[], timeoutMs = 600_000): Promise<Line[]> =>
    new Promise((resolve, reject) => {
      const argv = [CLIENT, '--proto-dir', path.join(REPO, 'proto'), '--address', agent.ready.grpcTls as string, '--ca', ca.ca.certFile, '--cert', who.certFile, '--key', who.keyFile, ...args];
      execFile(PYTHON, argv, { timeout: timeoutMs, encoding: 'utf8', maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
        if (err) return reject(new Error(`gnoi_client.py ${args.join(' ')} failed: ${err.message}\n${stderr}\n${stdout}`));
        resolve(stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as Line));
      });
    });
  const bgp = async () => (await unaryCall<StatusResponse>(ck, 'Status', { process: 'bgp' })).processes[0];
  const active = async () => (await bgp()).peers.find((p) => p.role === 'ACTIVE');
  const vms = async () => (await unaryCall<ListVmsResponse>(vmc, 'List', {})).vms;
  const trackAll = async () => {
    for (const v of await vms()) reaper.track(v.pid);
  };
  const incomingLeft = () => fs.readdirSync(path.join(agent.stateDir, 'images')).filter((f) => f.startsWith('.incoming-'));

  before(async function () {
    this.timeout(1_200_000);
    const built = buildGuestImages(['x86_64-1.0.0', 'x86_64-2.0.0']);
    const pair = generateKeyPair();
    fs.mkdirSync(trustDir, { recursive: true });
    fs.writeFileSync(path.join(trustDir, 'vendor.pub'), pair.publicKeyPem);
    v1 = await signedVariant(built['x86_64-1.0.0'], path.join(work, 'v1'), pair.privateKeyPem);
    v2 = await signedVariant(built['x86_64-2.0.0'], path.join(work, 'v2'), pair.privateKeyPem);
    // Same signed manifest as v2, but one byte of the kernel changed after signing.
    tampered = await signedVariant(built['x86_64-2.0.0'], path.join(work, 'tampered'), pair.privateKeyPem, { copy: ['vmlinuz'] });
    const fd = fs.openSync(path.join(tampered, 'vmlinuz'), 'r+');
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, 4096);
    b[0] ^= 0xff;
    fs.writeSync(fd, b, 0, 1, 4096);
    fs.closeSync(fd);
    ca = new TestCa(path.join(work, 'ca'), 'gnoi');
    const server = ca.issue('hitlessd', { server: true });
    operator = ca.issue('netops');
    viewer = ca.issue('noc-viewer');
    agent = await startAgent({
      args: ['--trust-dir', trustDir, '--load-timeout-s', '300', ...tlsAgentArgs(ca, server, { netops: 'operator', 'noc-viewer': 'viewer' }, work)],
    });
    ck = rawClient('hitless.v1.Checkpoint', agent.socket);
    vmc = rawClient('hitless.v1.Vm', agent.socket);
    up = rawClient('hitless.v1.Upgrade', agent.socket);
    const boot = await bootControlPlane(vmc, ck, 'cp-1', v1, 20_000, 240_000);
    reaper.track(boot.pid);
    measure('x86_64 v1 boot to active with 20000 routes', `${boot.ms} ms`);
  });

  afterEach(function () {
    printAgentLogIfFailed(this, agent);
  });

  after(async function () {
    this.timeout(120_000);
    if (vmc) await trackAll().catch(() => undefined);
    ck?.close();
    vmc?.close();
    up?.close();
    await stopAllAgents();
    reaper.reap();
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('Verify (viewer) reports v1 running and no standby; a viewer may not Activate', async () => {
    const [ver] = await py(viewer, ['verify']);
    assert.equal(ver.event, 'verify');
    assert.equal(ver.version, '1.0.0');
    assert.equal(ver.standby_kind, 'standby_state');
    assert.equal(ver.standby_state, 'NON_EXISTENT');
    const [denied] = await py(viewer, ['activate', '--version', '2.0.0']);
    assert.equal(denied.event, 'rpc_error');
    assert.equal(denied.code, 'PERMISSION_DENIED');
    assert.match(denied.details as string, /role 'viewer'.*gnoi\.os\.OS\/Activate/);
  });

  it('Install of a tampered bundle: transferred, then InstallError INTEGRITY_FAIL, nothing kept', async () => {
    const lines = await py(operator, ['install', '--bundle', tampered, '--version', '2.0.0']);
    const events = lines.map((l) => l.event);
    assert.ok(events.includes('transfer_ready'), events.join(','));
    const err = lines.find((l) => l.event === 'install_error');
    assert.ok(err, `an InstallError: ${JSON.stringify(lines.slice(-3))}`);
    assert.equal(err.type, 'INTEGRITY_FAIL');
    assert.match(err.detail as string, /vmlinuz/);
    assert.ok(!fs.existsSync(path.join(agent.stateDir, 'images', '2.0.0')), 'no bundle stored');
    assert.deepEqual(incomingLeft(), [], 'the partial package was removed');
  });

  it('Install of the signed v2 bundle: TransferReady, chunks, TransferProgress, Validated; again: Validated without a transfer', async () => {
    const t0 = Date.now();
    const lines = await py(operator, ['install', '--bundle', v2, '--version', '2.0.0']);
    const ms = Date.now() - t0;
    const packed = lines.find((l) => l.event === 'packed')!;
    measure(`Install of the v2 package (${packed.bytes} bytes tar, Python client, mTLS)`, `${ms} ms`);
    const events = lines.map((l) => l.event);
    assert.equal(events[1], 'transfer_ready');
    const sent = lines.find((l) => l.event === 'sent')!;
    assert.ok((sent.chunks as number) > 100, 'sent in chunks');
    const progress = lines.filter((l) => l.event === 'transfer_progress');
    assert.ok(progress.length >= 2, 'progress while transferring');
    assert.equal(progress[progress.length - 1].bytes_received, packed.bytes);
    const validated = lines[lines.length - 1];
    assert.equal(validated.event, 'validated');
    assert.equal(validated.version, '2.0.0');
    assert.ok(fs.existsSync(path.join(agent.stateDir, 'images', '2.0.0', 'manifest.json')));
    assert.deepEqual(incomingLeft(), []);

    const again = await py(operator, ['install', '--bundle', v2, '--version', '2.0.0']);
    assert.deepEqual(again.map((l) => l.event), ['packed', 'validated']);
    assert.equal(again[1].version, '2.0.0');
  });

  it('Activate (no_reboot=false) runs the hitless upgrade to v2; Verify reports it', async () => {
    const t0 = Date.now();
    const [res] = await py(operator, ['activate', '--version', '2.0.0']);
    measure('Activate 2.0.0 (load, switch, commit under TCG)', `${Date.now() - t0} ms`);
    assert.equal(res.event, 'activate_ok', JSON.stringify(res));
    await trackAll();
    const st = await unaryCall<{ current?: { phase: string }; history: { phase: string; toVersion: string; toImage: string; freezeMs: number }[] }>(up, 'Status', {});
    assert.ok(!st.current, 'no upgrade left in progress');
    assert.equal(st.history[0].phase, 'COMMITTED');
    assert.equal(st.history[0].toVersion, '2.0.0');
    assert.equal(st.history[0].toImage, path.join(agent.stateDir, 'images', '2.0.0'));
    measure('write freeze at the switchover', `${st.history[0].freezeMs.toFixed(2)} ms`);
    assert.equal((await active())?.softwareVersion, '2.0.0');
    await until('v1 VM stopped', async () => !(await vms()).some((v) => v.name === 'cp-1' && v.state === 'RUNNING'), 60_000);
    const [ver] = await py(viewer, ['verify']);
    assert.equal(ver.version, '2.0.0');
    assert.equal(ver.image_name, '2.0.0');
    assert.equal(ver.standby_state, 'NON_EXISTENT');
    // Activating the running version again is a no-op.
    const [again] = await py(operator, ['activate', '--version', '2.0.0']);
    assert.equal(again.event, 'activate_ok');
    const [missing] = await py(operator, ['activate', '--version', '9.9.9']);
    assert.equal(missing.event, 'activate_error');
    assert.equal(missing.type, 'NON_EXISTENT_VERSION');
  });
});
