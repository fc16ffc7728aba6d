/**
 * The product end to end under TCG: a real hitlessd, real QEMU, the real guest bundles (v1: kernel
 * 6.1.0-47, bgp 1.0.0 writing schema 1; v2: kernel 6.1.0-50, bgp 2.0.0 writing schema 2 with
 * transforms), signed with a key the test generates, and the real issu CLI. The guest bgp daemon
 * loads 20,000 routes and churns 2,000 changes/s throughout. Every check of "nothing lost" is an
 * audit: the active frozen for a moment, then the agent's table and every instance's own copy
 * (old and new version) compared by digest.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { AgentHandle, startAgent, stopAllAgents } from '../helpers/agent-process';
import { AnyClient, expectStatus, rawClient, unaryCall } from '../helpers/grpc-client';
import { until } from '../helpers/wait';
import type { AuditResponse, StatusResponse } from '../../agent/checkpoint/messages';
import type { ListVmsResponse } from '../../agent/vm/vm.messages';
import { generateKeyPair } from '../../agent/images/signing';
import { buildGuestImages, runIssu as issu, signedVariant, bootControlPlane, printAgentLogIfFailed } from '../helpers/guest-images';
import { QemuReaper } from './fixtures';

const measure = (what: string, v: number | string) => process.stderr.write(`      MEASURE ${what}: ${v}\n`);

interface UpgradeStatus {
  current?: { id: string; phase: string; toVm: string; fromVm: string; freezeMs: number; timerRemainingMs: number };
  history: { phase: string; result: string }[];
}




describe('issu: hitless upgrade of the control-plane VM (real QEMU under TCG)', function () {
  this.timeout(600_000);
  const reaper = new QemuReaper();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hiu-'));
  const stateDir = path.join(work, 'state');
  const trustDir = path.join(work, 'trust');
  let v1 = '';
  let v2 = '';
  let key = '';
  let agent: AgentHandle;
  let ck: AnyClient;
  let vmc: AnyClient;

  const args = () => ['--trust-dir', trustDir, '--rollback-timeout-s', '900', '--load-timeout-s', '240'];
  const connect = () => {
    ck?.close();
    vmc?.close();
    ck = rawClient('hitless.v1.Checkpoint', agent.socket);
    vmc = rawClient('hitless.v1.Vm', agent.socket);
  };
  const bgp = async () => (await unaryCall<StatusResponse>(ck, 'Status', { process: 'bgp' })).processes[0];
  const active = async () => (await bgp()).peers.find((p) => p.role === 'ACTIVE');
  const audit = () => unaryCall<AuditResponse>(ck, 'Audit', { process: 'bgp' });
  const cli = async (...a: string[]) => {
    const r = await issu(agent.socket, ['--json', ...a]);
    if (r.code !== 0) throw new Error(`issu ${a.join(' ')} exited ${r.code}: ${r.stderr} ${r.stdout}`);
    return JSON.parse(r.stdout.trim().split('\n').pop()!) as UpgradeStatus;
  };
  const vms = async () => (await unaryCall<ListVmsResponse>(vmc, 'List', {})).vms;
  const trackAll = async () => {
    for (const v of await vms()) reaper.track(v.pid);
  };
  const assertAudit = async (what: string) => {
    const a = await audit();
    assert.ok(a.consistent, `${what}: tables differ: ${a.detail}`);
    const rib = a.agent.find((t) => t.table === 'rib')!;
    assert.ok(rib.records >= 15_000, `${what}: the table holds the routes (${rib.records})`);
    return { a, rib };
  };

  before(async function () {
    this.timeout(1_200_000);
    const built = buildGuestImages(['x86_64-1.0.0', 'x86_64-2.0.0']);
    const pair = generateKeyPair();
    fs.mkdirSync(trustDir, { recursive: true });
    fs.writeFileSync(path.join(trustDir, 'vendor.pub'), pair.publicKeyPem);
    key = pair.privateKeyPem;
    // Signed copies (files hard-linked): the cached bundles stay untouched.
    v1 = await signedVariant(built['x86_64-1.0.0'], path.join(work, 'v1'), key);
    v2 = await signedVariant(built['x86_64-2.0.0'], path.join(work, 'v2'), key);
    agent = await startAgent({ stateDir, args: args() });
    connect();
    const boot = await bootControlPlane(vmc, ck, 'cp-1', v1, 20_000, 180_000);
    reaper.track(boot.pid);
    measure('x86_64 v1 boot to active with 20000 routes', `${boot.ms} ms`);
  });

  afterEach(function () {
    printAgentLogIfFailed(this, agent);
  });

  after(async function () {
    this.timeout(120_000);
    await trackAll().catch(() => undefined);
    ck?.close();
    vmc?.close();
    await stopAllAgents();
    reaper.trackStateDir(stateDir); // also when the agent died before it could list them
    reaper.reap();
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('refuses an untrusted image, an incompatible schema and a second upgrade, leaving v1 untouched', async () => {
    const unsigned = path.join(work, 'unsigned');
    fs.mkdirSync(unsigned);
    for (const f of fs.readdirSync(v2)) if (f !== 'manifest.sig') fs.linkSync(path.join(v2, f), path.join(unsigned, f));
    const r1 = await issu(agent.socket, ['loadversion', unsigned]);
    assert.equal(r1.code, 1);
    assert.match(r1.stderr, /PERMISSION_DENIED: .*(not signed|signature)/i);
    const v3 = await signedVariant(v2, path.join(work, 'v3'), key, {
      edit: (m) => {
      m.version = '3.0.0';
      for (const p of m.processes as { schemaWrites: number; schemaReads: number[]; transforms?: string[] }[]) {
        p.schemaWrites = 3;
        p.schemaReads = [3];
        p.transforms = [];
      }
      },
    });
    const r2 = await issu(agent.socket, ['loadversion', v3]);
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /FAILED_PRECONDITION: incompatible schema .* process bgp/);
    const shown = await issu(agent.socket, ['--json', 'show', 'compatibility', v3]);
    assert.equal(JSON.parse(shown.stdout).compatible, false);
    const ok = JSON.parse((await issu(agent.socket, ['--json', 'show', 'compatibility', v2])).stdout);
    assert.equal(ok.compatible, true);
    assert.equal((await active())?.vmId, 'cp-1');
    assert.equal((await vms()).filter((v) => v.state === 'RUNNING').length, 1, 'no second VM was started');
  });

  it('loadversion, runversion, then abortversion rolls back to v1 with every change made under v2', async () => {
    const t0 = Date.now();
    const loaded = await cli('loadversion', v2);
    measure('loadversion (verify, boot v2 standby, bulk sync to READY)', `${Date.now() - t0} ms`);
    assert.equal(loaded.current?.phase, 'LOADED');
    await trackAll();
    // A second upgrade cannot start while this one is in progress.
    const again = await issu(agent.socket, ['loadversion', v1]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already in progress/);
    const sw = await cli('runversion');
    assert.equal(sw.current?.phase, 'SWITCHED');
    measure('write freeze at runversion (demo table, churning)', `${sw.current!.freezeMs.toFixed(2)} ms`);
    assert.ok(sw.current!.timerRemainingMs > 0, 'the rollback timer runs');
    const now = await active();
    assert.equal(now?.vmId, sw.current!.toVm);
    assert.equal(now?.softwareVersion, '2.0.0');
    await new Promise((r) => setTimeout(r, 1500)); // v2 churns the table
    const { rib: underV2 } = await assertAudit('after runversion');
    const back = await cli('abortversion', '--reason', 'test rollback');
    assert.ok(!back.current, 'no upgrade in progress');
    assert.equal(back.history[0].phase, 'ROLLED_BACK');
    assert.equal((await active())?.vmId, 'cp-1', 'v1 is active again');
    const { rib: afterRollback } = await assertAudit('after rollback');
    assert.ok(afterRollback.seq >= underV2.seq, 'the changes made under v2 are in v1');
    await until('v2 VM stopped', async () => !(await vms()).some((v) => v.name === sw.current!.toVm && v.state === 'RUNNING'), 60_000);
  });

  it('abortversion after loadversion stops the standby and leaves v1 active', async () => {
    const loaded = await cli('loadversion', v2);
    await trackAll();
    assert.equal(loaded.current?.phase, 'LOADED');
    const ab = await cli('abortversion');
    assert.equal(ab.history[0].phase, 'ABORTED');
    assert.equal((await active())?.vmId, 'cp-1');
    await assertAudit('after abort at LOADED');
  });

  it('the standby VM dying before runversion aborts the upgrade by itself', async () => {
    const loaded = await cli('loadversion', v2);
    await trackAll();
    const v = (await vms()).find((x) => x.name === loaded.current!.toVm)!;
    process.kill(v.pid, 'SIGKILL');
    await until('upgrade aborted', async () => (await cli('status')).history[0]?.phase === 'ABORTED' && !(await cli('status')).current, 60_000, 250);
    assert.equal((await active())?.vmId, 'cp-1');
  });

  it('the new active dying after runversion rolls back to v1 without losing an acknowledged change', async () => {
    await cli('loadversion', v2);
    await trackAll();
    const sw = await cli('runversion');
    await new Promise((r) => setTimeout(r, 1000));
    const v = (await vms()).find((x) => x.name === sw.current!.toVm)!;
    process.kill(v.pid, 'SIGKILL');
    await until('rolled back', async () => (await cli('status')).history[0]?.phase === 'ROLLED_BACK', 90_000, 250);
    assert.equal((await active())?.vmId, 'cp-1');
    await assertAudit('after the new active died');
  });

  it('an agent SIGKILL during loadversion and during runversion recovers to a consistent state', async () => {
    // During loadversion (standby booting/syncing): the restarted agent aborts the load.
    const loading = issu(agent.socket, ['loadversion', v2]);
    await until('LOADING', async () => (await cli('status')).current?.phase === 'LOADING', 60_000, 100);
    await new Promise((r) => setTimeout(r, 2000));
    await agent.kill9();
    await loading;
    agent = await startAgent({ stateDir, args: args() });
    connect();
    await until('load aborted after restart', async () => {
      const s = await cli('status');
      return !s.current && s.history[0].phase === 'ABORTED';
    }, 120_000, 250);
    await until('v1 active again after restart', async () => (await active())?.vmId === 'cp-1', 60_000, 200);
    await assertAudit('after a kill during loadversion');

    // During runversion: whatever the kill interrupted, the restarted agent ends consistent.
    await cli('loadversion', v2);
    await trackAll();
    const running = issu(agent.socket, ['runversion']);
    await until('SWITCHING or later', async () => (await cli('status')).current?.phase !== 'LOADED', 30_000, 5);
    await agent.kill9();
    await running;
    agent = await startAgent({ stateDir, args: args() });
    connect();
    const settled = await until('a consistent phase after restart', async () => {
      const s = await cli('status');
      const phase = s.current?.phase ?? s.history[0].phase;
      return ['LOADED', 'SWITCHED', 'ROLLED_BACK'].includes(phase) ? phase : undefined;
    }, 120_000, 250);
    measure('phase after a kill during runversion', String(settled));
    await until('exactly one active', async () => (await bgp()).peers.filter((p) => p.role === 'ACTIVE').length === 1, 60_000, 200);
    await assertAudit('after a kill during runversion');
    if (settled !== 'ROLLED_BACK') await cli('abortversion');
    await until('v1 active', async () => (await active())?.vmId === 'cp-1', 60_000, 200);
  });

  it('changeversion runs the whole flow: v2 active, v1 stopped, tables exact', async () => {
    assert.deepEqual((await bgp()).tables[0].schemas, [1], 'before the commit only schema 1 was written (v1 must read everything)');
    const t0 = Date.now();
    const done = await cli('changeversion', v2);
    measure('changeversion end to end', `${Date.now() - t0} ms`);
    assert.ok(!done.current, 'no upgrade in progress');
    assert.equal(done.history[0].phase, 'COMMITTED');
    await trackAll();
    const a = await active();
    assert.equal(a?.softwareVersion, '2.0.0');
    await until('v1 VM stopped', async () => !(await vms()).some((v) => v.name === 'cp-1' && v.state === 'RUNNING'), 60_000);
    await assertAudit('after commit');
    // With v1 gone nothing needs schema 1 any more: v2 writes its own schema 2 from the commit on.
    const after = await bgp();
    assert.equal(after.peers.find((p) => p.role === 'ACTIVE')?.schemaWrites, 2);
    await until('schema-2 records in the table', async () => (await bgp()).tables[0].schemas.includes(2), 30_000);
    await assertAudit('after v2 wrote schema 2');
    // Idempotent: committing again is not an error.
    assert.equal((await cli('commitversion')).history[0].phase, 'COMMITTED');
  });

  it('refuses bad requests over gRPC with the right status', async () => {
    const up = rawClient('hitless.v1.Upgrade', agent.socket);
    try {
      await expectStatus(unaryCall(up, 'LoadVersion', { imageDir: '' }), grpc.status.INVALID_ARGUMENT, /image_dir is empty/);
      await expectStatus(unaryCall(up, 'LoadVersion', { imageDir: 'relative' }), grpc.status.INVALID_ARGUMENT, /absolute path/);
      await expectStatus(unaryCall(up, 'RunVersion', {}), grpc.status.FAILED_PRECONDITION, /no version is loaded/);
    } finally {
      up.close();
    }
  });
});
