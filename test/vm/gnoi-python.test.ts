/**
 * gNOI end to end under TCG: a real hitlessd with a mutual-TLS listener (test CA), real QEMU
 * running the v1 control plane, and a Python gNOI client (test/python/gnoi_client.py, stubs
 * generated from proto/ by grpc_tools.protoc at test time) that installs signed bundles as tar
 * packages, activates and verifies them; gnoi.system.System is driven from TypeScript over the
 * same mTLS listener (operator and viewer certificates). The TypeScript side checks every step
 * through hitless.v1.Upgrade/Checkpoint/Vm on the unix socket.
 *
 * The tests form one story on one agent and must run in this order (each starts from the state
 * the previous one left). VM boots are what costs time under TCG, so there are three: v1 at the
 * start, v2 as the standby of a step-by-step upgrade (Activate(no_reboot=true) ->
 * SwitchControlProcessor -> Reboot), and 2.0.1 (v2's files, another version) as the standby of
 * the one-call upgrade (Activate(no_reboot=false)). Refusals (INCOMPATIBLE, INTEGRITY_FAIL, roles)
 * happen before anything boots.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { AnyClient, expectStatus, rawClient, tlsClient, unaryCall } from '../../harness/grpc-client';
import { until } from '../../harness/wait';
import { Pem, TestCa, tlsAgentArgs } from '../helpers/tls-ca';
import type { StatusResponse } from '../../agent/checkpoint/messages';
import type { ListVmsResponse } from '../../agent/vm/vm.messages';
import { generateKeyPair } from '../../agent/images/signing';
import { QemuReaper } from '../../harness/qemu-reaper';
import { buildGuestImages, signedVariant, bootControlPlane, printAgentLogIfFailed } from '../../harness/guest-images';

const REPO = path.resolve(__dirname, '..', '..', '..');
const CLIENT = path.join(REPO, 'test/python/gnoi_client.py');
// Debian's python3 carries python3-grpcio and python3-grpc-tools (scripts/setup.sh).
const PYTHON = fs.existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const measure = (what: string, v: number | string) => process.stderr.write(`      MEASURE ${what}: ${v}\n`);

type Line = Record<string, unknown> & { event: string };
type UpgradeStatus = {
  current?: { phase: string; toVm: string; fromVm: string; toVersion: string } | null;
  history: { phase: string; toVersion: string; toImage: string; freezeMs: number }[];
};
type RebootStatusResp = { active: boolean; count: number; method: string; reason: string; when: number; status: { status: string; message: string } };
type CpResp = { controlProcessor: { elem: { name: string; key: Record<string, string> }[] }; version: string; uptime: number };

/** gNOI names a control processor by path; the agent's are its VMs (see agent/gnoi/gnoi.grpc.ts). */
const cp = (name: string) => ({
  origin: '',
  elem: [
    { name: 'components', key: {} },
    { name: 'component', key: { name } },
  ],
});
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('gNOI OS/System from a Python client over mTLS (real QEMU under TCG)', function () {
  this.timeout(900_000);
  const reaper = new QemuReaper();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hgn-'));
  const trustDir = path.join(work, 'trust');
  let v1 = '';
  let v2 = '';
  let v201 = '';
  let tampered = '';
  let arm = '';
  let schema3 = '';
  let sysOp: AnyClient;
  let sysView: AnyClient;
  /** The standby VM of the step-by-step upgrade (set once Activate(no_reboot=true) loaded it). */
  let standbyVm = '';
  let agent: AgentHandle;
  let ca: TestCa;
  let operator: Pem;
  let viewer: Pem;
  let ck: AnyClient;
  let vmc: AnyClient;
  let up: AnyClient;

  const py = (who: Pem, args: string[], timeoutMs = 600_000): Promise<Line[]> =>
    new Promise((resolve, reject) => {
      const argv = [
        CLIENT,
        '--proto-dir',
        path.join(REPO, 'proto'),
        '--address',
        agent.ready.grpcTls as string,
        '--ca',
        ca.ca.certFile,
        '--cert',
        who.certFile,
        '--key',
        who.keyFile,
        ...args,
      ];
      execFile(PYTHON, argv, { timeout: timeoutMs, encoding: 'utf8', maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
        if (err) return reject(new Error(`gnoi_client.py ${args.join(' ')} failed: ${err.message}\n${stderr}\n${stdout}`));
        resolve(
          stdout
            .trim()
            .split('\n')
            .filter(Boolean)
            .map((l) => JSON.parse(l) as Line),
        );
      });
    });
  const bgp = async () => (await unaryCall<StatusResponse>(ck, 'Status', { process: 'bgp' })).processes[0];
  const active = async () => (await bgp()).peers.find((p) => p.role === 'ACTIVE');
  const vms = async () => (await unaryCall<ListVmsResponse>(vmc, 'List', {})).vms;
  const trackAll = async () => {
    for (const v of await vms()) reaper.track(v.pid);
  };
  const incomingLeft = () => fs.readdirSync(path.join(agent.stateDir, 'images')).filter((f) => f.startsWith('.incoming-'));
  const upgradeStatus = () => unaryCall<UpgradeStatus>(up, 'Status', {});
  const rebootStatus = () => unaryCall<RebootStatusResp>(sysView, 'RebootStatus', {});

  before(async function () {
    this.timeout(1_200_000);
    const built = buildGuestImages(['x86_64-1.0.0', 'x86_64-2.0.0', 'aarch64-1.0.0']);
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
    // Never booted, only offered to Install: the arm64 bundle as a new version (a version the
    // agent does not have, so the package is transferred and checked), and v2 turned into a
    // version whose bgp neither reads schema 1 nor can write it (no transforms).
    arm = await signedVariant(built['aarch64-1.0.0'], path.join(work, 'arm'), pair.privateKeyPem, { edit: (m) => void (m.version = '2.1.0') });
    schema3 = await signedVariant(built['x86_64-2.0.0'], path.join(work, 'schema3'), pair.privateKeyPem, {
      edit: (m) => {
        m.version = '2.2.0';
        for (const p of m.processes as Record<string, unknown>[]) Object.assign(p, { schemaWrites: 3, schemaReads: [3], transforms: [] });
      },
    });
    // Booted by the last test: v2's files under another version, so that one more upgrade
    // needs neither another image build nor a downgrade.
    v201 = await signedVariant(built['x86_64-2.0.0'], path.join(work, 'v201'), pair.privateKeyPem, { edit: (m) => void (m.version = '2.0.1') });
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
    sysOp = tlsClient('gnoi.system.System', agent.ready.grpcTls as string, ca.ca.cert, operator);
    sysView = tlsClient('gnoi.system.System', agent.ready.grpcTls as string, ca.ca.cert, viewer);
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
    for (const c of [ck, vmc, up, sysOp, sysView]) c?.close();
    await stopAllAgents();
    if (agent) reaper.trackStateDir(agent.stateDir); // also when the agent died before it could list them
    reaper.reap();
    if (agent) fs.rmSync(agent.stateDir, { recursive: true, force: true });
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

  it('Install of bundles this control plane cannot run: INCOMPATIBLE at TransferEnd (other arch, unreadable schema); no VM booted, nothing kept', async () => {
    const vmsBefore = (await vms()).map((v) => v.name).sort();
    for (const [bundle, version, why] of [
      [arm, '2.1.0', /the package is for aarch64; this target runs x86_64/],
      [schema3, '2.2.0', /incompatible schema 1->3 for process bgp/],
    ] as const) {
      const lines = await py(operator, ['install', '--bundle', bundle, '--version', version]);
      const events = lines.map((l) => l.event);
      assert.ok(events.includes('sent'), `the package was transferred: ${events.join(',')}`);
      const err = lines[lines.length - 1];
      assert.equal(err.event, 'install_error', JSON.stringify(lines.slice(-2)));
      assert.equal(err.type, 'INCOMPATIBLE', JSON.stringify(err));
      assert.match(err.detail as string, why);
      assert.ok(!fs.existsSync(path.join(agent.stateDir, 'images', version)), `${version} not stored`);
      assert.deepEqual(incomingLeft(), []);
    }
    // Found at Install: no standby VM was started to find out, no upgrade was attempted.
    assert.deepEqual((await vms()).map((v) => v.name).sort(), vmsBefore);
    const st = await upgradeStatus();
    assert.ok(!st.current);
    assert.deepEqual(st.history, []);
    // And a client that activates it anyway is told it is not installed.
    const [res] = await py(operator, ['activate', '--version', '2.1.0', '--no-reboot']);
    assert.equal(res.event, 'activate_error');
    assert.equal(res.type, 'NON_EXISTENT_VERSION');
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
    assert.deepEqual(
      again.map((l) => l.event),
      ['packed', 'validated'],
    );
    assert.equal(again[1].version, '2.0.0');
  });

  it('Activate(no_reboot=true) loads v2 into a standby VM and switches nothing; Verify reports it as the standby', async () => {
    const t0 = Date.now();
    const [res] = await py(operator, ['activate', '--version', '2.0.0', '--no-reboot']);
    measure('Activate 2.0.0 no_reboot=true (verify, boot the standby, sync under TCG)', `${Date.now() - t0} ms`);
    assert.equal(res.event, 'activate_ok', JSON.stringify(res));
    await trackAll();
    const st = await upgradeStatus();
    assert.equal(st.current?.phase, 'LOADED');
    assert.equal(st.current?.toVersion, '2.0.0');
    standbyVm = st.current!.toVm;
    assert.equal((await vms()).find((v) => v.name === standbyVm)?.state, 'RUNNING');
    const a = await active();
    assert.equal(a?.vmId, 'cp-1', 'v1 still active');
    assert.equal(a?.softwareVersion, '1.0.0');
    assert.ok(
      (await bgp()).peers.some((p) => p.vmId === standbyVm && p.role === 'STANDBY' && p.ready),
      'the v2 standby is READY',
    );

    const [ver] = await py(viewer, ['verify']);
    assert.equal(ver.version, '1.0.0');
    assert.equal(ver.standby_kind, 'verify_response');
    assert.equal(ver.standby_id, standbyVm);
    assert.equal(ver.standby_version, '2.0.0');
    // Activating what is already loaded is idempotent: same standby, nothing new booted.
    const [again] = await py(operator, ['activate', '--version', '2.0.0', '--no-reboot']);
    assert.equal(again.event, 'activate_ok');
    assert.equal((await upgradeStatus()).current?.toVm, standbyVm);
    // Nothing rebooted yet.
    const rs = await rebootStatus();
    assert.equal(rs.active, false);
    assert.equal(rs.count, 0);
    assert.equal(rs.status.status, 'STATUS_UNKNOWN');
  });

  it('SwitchControlProcessor: viewer refused, unknown target NOT_FOUND, the active a no-op, the standby takes over (v2 active, v1 following)', async () => {
    await expectStatus(unaryCall(sysView, 'SwitchControlProcessor', { controlProcessor: cp(standbyVm) }), grpc.status.PERMISSION_DENIED, /role 'viewer'/);
    await expectStatus(
      unaryCall(sysOp, 'SwitchControlProcessor', { controlProcessor: cp('cp-9') }),
      grpc.status.NOT_FOUND,
      new RegExp(`'cp-9' does not exist; the standby is '${standbyVm}' and the active 'cp-1'`),
    );
    const same = await unaryCall<CpResp>(sysOp, 'SwitchControlProcessor', { controlProcessor: cp('cp-1') });
    assert.equal(same.version, '1.0.0');
    assert.equal(same.controlProcessor.elem[1].key.name, 'cp-1');
    assert.equal((await upgradeStatus()).current?.phase, 'LOADED', 'naming the active one switched nothing');

    const t0 = Date.now();
    const r = await unaryCall<CpResp>(sysOp, 'SwitchControlProcessor', { controlProcessor: cp(standbyVm) });
    measure('SwitchControlProcessor to the v2 standby', `${Date.now() - t0} ms`);
    assert.deepEqual(
      r.controlProcessor.elem.map((e) => e.name),
      ['components', 'component'],
    );
    assert.equal(r.controlProcessor.elem[1].key.name, standbyVm);
    assert.equal(r.version, '2.0.0');
    assert.ok(r.uptime > 0, 'uptime of the new control processor');
    assert.equal((await upgradeStatus()).current?.phase, 'SWITCHED');
    const a = await active();
    assert.equal(a?.vmId, standbyVm);
    assert.equal(a?.softwareVersion, '2.0.0');
    assert.ok(
      (await bgp()).peers.some((p) => p.vmId === 'cp-1' && p.role === 'STANDBY'),
      'v1 follows as standby until commit',
    );

    const [ver] = await py(viewer, ['verify']);
    assert.equal(ver.version, '2.0.0');
    assert.equal(ver.standby_kind, 'verify_response');
    assert.equal(ver.standby_id, 'cp-1');
    assert.equal(ver.standby_version, '1.0.0');
    // Going back is an abort, which gNOI has no RPC for: refused with what to do instead.
    await expectStatus(
      unaryCall(sysOp, 'SwitchControlProcessor', { controlProcessor: cp('cp-1') }),
      grpc.status.FAILED_PRECONDITION,
      /switching back is an abort: run 'issu abortversion'/,
    );
    const again = await unaryCall<CpResp>(sysOp, 'SwitchControlProcessor', { controlProcessor: cp(standbyVm) });
    assert.equal(again.version, '2.0.0');
    assert.equal((await upgradeStatus()).current?.phase, 'SWITCHED');
  });

  it('Reboot(WARM) commits v2 hitlessly: RebootStatus active while it runs, then SUCCESS; v1 stopped; Verify reports v2 alone', async () => {
    await expectStatus(unaryCall(sysView, 'Reboot', { method: 'WARM' }), grpc.status.PERMISSION_DENIED, /role 'viewer'/);
    const seen: RebootStatusResp[] = [];
    let finished = false;
    const t0 = Date.now();
    const reboot = unaryCall(sysOp, 'Reboot', { method: 'WARM', delay: 0, message: 'gnoi test: commit 2.0.0' }).finally(() => {
      finished = true;
    });
    // The commit stops the v1 VM gracefully (hundreds of ms under TCG); polling meanwhile sees it.
    while (!finished) {
      seen.push(await rebootStatus());
      await sleep(5);
    }
    assert.deepEqual(await reboot, {});
    measure('Reboot(WARM) at SWITCHED (commit: stop v1)', `${Date.now() - t0} ms`);
    const during = seen.find((s) => s.active);
    assert.ok(during, `RebootStatus reported the reboot while it ran (${seen.length} polls)`);
    assert.equal(during.method, 'WARM');
    assert.equal(during.reason, 'gnoi test: commit 2.0.0');
    assert.ok(during.when > 0);

    const after = await rebootStatus();
    assert.equal(after.active, false);
    assert.equal(after.count, 1);
    assert.equal(after.method, 'WARM');
    assert.equal(after.status.status, 'STATUS_SUCCESS');
    assert.match(after.status.message, /2\.0\.0 running/);
    const st = await upgradeStatus();
    assert.ok(!st.current, 'no upgrade left in progress');
    assert.equal(st.history[0].phase, 'COMMITTED');
    assert.equal(st.history[0].toVersion, '2.0.0');
    await until('v1 VM stopped', async () => !(await vms()).some((v) => v.name === 'cp-1' && v.state === 'RUNNING'), 60_000);
    assert.equal((await active())?.vmId, standbyVm);
    const [ver] = await py(viewer, ['verify']);
    assert.equal(ver.version, '2.0.0');
    assert.equal(ver.image_name, '2.0.0');
    assert.equal(ver.standby_state, 'NON_EXISTENT');
    // Committed: there is nothing activated left to reboot into.
    await expectStatus(unaryCall(sysOp, 'Reboot', { method: 'NSF' }), grpc.status.FAILED_PRECONDITION, /no version is activated/);
  });

  it('Activate (no_reboot=false) runs the whole hitless upgrade in one call (to 2.0.1); Verify reports it', async () => {
    const inst = await py(operator, ['install', '--bundle', v201, '--version', '2.0.1']);
    assert.equal(inst[inst.length - 1].event, 'validated', JSON.stringify(inst.slice(-2)));
    const t0 = Date.now();
    const [res] = await py(operator, ['activate', '--version', '2.0.1']);
    measure('Activate 2.0.1 (load, switch, commit under TCG)', `${Date.now() - t0} ms`);
    assert.equal(res.event, 'activate_ok', JSON.stringify(res));
    await trackAll();
    const st = await upgradeStatus();
    assert.ok(!st.current, 'no upgrade left in progress');
    assert.equal(st.history[0].phase, 'COMMITTED');
    assert.equal(st.history[0].toVersion, '2.0.1');
    assert.equal(st.history[0].toImage, path.join(agent.stateDir, 'images', '2.0.1'));
    measure('write freeze at the switchover', `${st.history[0].freezeMs.toFixed(2)} ms`);
    const a = await active();
    assert.ok(a && a.vmId !== standbyVm, `the new VM's bgp is active (${a?.vmId})`);
    assert.equal((await vms()).find((v) => v.name === a.vmId)?.imageVersion, '2.0.1');
    await until('the 2.0.0 VM stopped', async () => !(await vms()).some((v) => v.name === standbyVm && v.state === 'RUNNING'), 60_000);
    const [ver] = await py(viewer, ['verify']);
    assert.equal(ver.version, '2.0.1');
    assert.equal(ver.image_name, '2.0.1');
    assert.equal(ver.standby_state, 'NON_EXISTENT');
    // Activating the running version again is a no-op.
    const [again] = await py(operator, ['activate', '--version', '2.0.1']);
    assert.equal(again.event, 'activate_ok');
    const [missing] = await py(operator, ['activate', '--version', '9.9.9']);
    assert.equal(missing.event, 'activate_error');
    assert.equal(missing.type, 'NON_EXISTENT_VERSION');
    // Not a System.Reboot: RebootStatus still shows the one reboot of the previous test.
    assert.equal((await rebootStatus()).count, 1);
  });
});
