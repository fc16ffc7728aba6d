/**
 * The product end to end under TCG: a real hitlessd, real QEMU, the real guest bundles (v1: kernel
 * 6.1.0-47, bgp 1.0.0 writing schema 1; v2: kernel 6.1.0-50, bgp 2.0.0 writing schema 2 with
 * transforms), signed with a key the test generates, and the real issu CLI. The guest bgp daemon
 * loads 20,000 routes and churns 2,000 changes/s throughout. Every check of "nothing lost" is an
 * audit: the active frozen for a moment, then the agent's table and every instance's own copy
 * (old and new version) compared by digest.
 *
 * The agent programs a real data plane (a network namespace of harness/netlab.ts) from the
 * daemon's FIB table (1,000 routes, IPv4 and IPv6), and every VM has a control-plane NIC on that
 * data plane's bridge. Through the rollback, the crash of the new active and the commit below,
 * 5,000 UDP packets/s go from the sender namespace to the receiver through those routes: none may
 * be lost, and no switchover may change a route.
 *
 * BIRD 2 beside the receiver (AS 65000, 20,000 IPv4 and 2,000 IPv6 prefixes) peers with the
 * active guest's BGP speaker over its control-plane NIC. Its routes are in the FIB too, and
 * 1,000 packets/s go back from its side to our prefix through the routes it learned from us.
 * Every switchover moves the session with TCP repair (nonstop routing): BIRD sees no reset and
 * withdraws nothing, and the report says NONSTOP for each. When the new active crashes there is
 * nothing to move: the old version takes over by graceful restart, BIRD reports that reset
 * (asserted: it is not hidden), keeps our routes, and the report says GRACEFUL_RESTART.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { expectStatus, rawClient, unaryCall } from '../../harness/grpc-client';
import { until } from '../../harness/wait';
import { signedVariant, printAgentLogIfFailed } from '../../harness/guest-images';
import { UpgradeHarness, signedUpgradePair } from '../helpers/upgrade-harness';
import { figures, renderedDom } from '../helpers/chromium';
import { UpgradeReport, reportFigures } from '../../agent/report/upgrade-report';
import { NetLab, createNetLab, netLabAvailable } from '../../harness/netlab';
import { Traffic, startTraffic } from '../../harness/traffic';
import { BirdPeer, birdPrefixes, startBird, watchBird } from '../../harness/bird-peer';
import { trafficTargets } from '../../examples/common/fib-routes';
import { DataPlaneChangesMsg, assertNoDataPlaneChanges, cpNicsAnswering } from '../helpers/dataplane-proof';

/** The example daemon's static FIB in the guest images (--fib 1000), and what BGP adds from BIRD. */
const STATIC_ROUTES = 1000;
const BIRD_ROUTES = 20_000;
const FIB_ROUTES = STATIC_ROUTES + BIRD_ROUTES + BIRD_ROUTES / 10;

const measure = (what: string, v: number | string) => process.stderr.write(`      MEASURE ${what}: ${v}\n`);

describe('issu: hitless upgrade of the control-plane VM (real QEMU under TCG)', function () {
  this.timeout(600_000);
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hiu-'));
  const stateDir = path.join(work, 'state');
  let v1 = '';
  let v2 = '';
  let key = '';
  let h: UpgradeHarness;
  let lab: NetLab | null = null;
  let traffic: Traffic | null = null;
  let back: Traffic | null = null;
  let bird: BirdPeer | null = null;
  /**
   * While `fn` runs: traffic through the FIB (static and BGP-learned routes) and back through
   * BIRD's routes to us, and BIRD's view of the session. No packet lost either way, no route
   * withdrawn by BIRD; returns the session resets BIRD saw.
   */
  const withTraffic = async (fn: () => Promise<void>): Promise<{ resets: number; resetMs: number[] }> => {
    const peerTargets = birdPrefixes(BIRD_ROUTES)
      .v4.slice(0, 500)
      .map((p) => p.replace('.0/24', '.1'));
    traffic = await startTraffic(lab!, [...trafficTargets(STATIC_ROUTES / 2), ...peerTargets], 5000);
    back = await startTraffic(lab!, ['192.0.2.2', '2001:db8:1::2'], 1000, 9998, true);
    const watch = await watchBird(bird!);
    await fn();
    const t = await traffic.stop();
    const b = await back.stop();
    traffic = back = null;
    const seen = await watch.stop();
    measure('traffic through the data plane', JSON.stringify(t));
    measure('traffic back through the routes BIRD learned', JSON.stringify(b));
    measure("BIRD's view", JSON.stringify(seen));
    assert.ok(t.packetsSent > 10_000, `packets sent (${t.packetsSent})`);
    assert.equal(t.packetsLost, 0, `packets lost: ${JSON.stringify(t)}`);
    assert.equal(b.packetsLost, 0, `packets lost on the way back: ${JSON.stringify(b)}`);
    assert.equal(seen.withdrawsReceived, 0, 'BIRD received no withdrawal');
    assert.deepEqual([seen.importedBefore, seen.importedAfter], [2, 2], 'BIRD holds our two prefixes before and after');
    return seen;
  };
  const upgradeChanges = async (): Promise<DataPlaneChangesMsg[] | undefined> =>
    (JSON.parse((await h.issu(['--json', 'status'])).stdout) as { history: { dataplaneChanges?: DataPlaneChangesMsg[] }[] }).history[0].dataplaneChanges;

  before(async function () {
    this.timeout(1_200_000);
    const can = netLabAvailable();
    if (!can.ok) throw new Error(`the upgrade tests program a data plane of network namespaces: ${can.reason}`);
    lab = createNetLab();
    bird = await startBird({
      netns: lab.receiver,
      dir: path.join(work, 'bird'),
      routerId: '198.51.100.2',
      localAddress: '198.51.100.2',
      localAs: 65000,
      neighbor: lab.cp.guest,
      neighborAs: 65001,
      routes: BIRD_ROUTES,
      nextHop6: '2001:db8:2::2',
      multihop: true,
    });
    const pair = await signedUpgradePair('x86_64', work);
    ({ v1, v2, key } = pair);
    h = new UpgradeHarness({ stateDir, trustDir: pair.trustDir, minRecords: 15_000, agentArgs: lab.agentArgs() });
    await h.startAgent();
    const bootMs = await h.boot('cp-1', v1, 20_000, 180_000);
    measure('x86_64 v1 boot to active with 20000 routes', `${bootMs} ms`);
    await until(
      'the FIB programmed',
      async () => {
        const d = JSON.parse((await h.issu(['--json', 'status'])).stdout).dataplane as {
          routes: number;
          tableSeq: number;
          programmedSeq: number;
          failureCount: number;
        };
        return d.routes === FIB_ROUTES && d.programmedSeq === d.tableSeq && d.failureCount === 0;
      },
      120_000,
      200,
    );
    const p = await bird.protocol();
    assert.deepEqual([p.state, p.imported, p.exported], ['Established', 2, BIRD_ROUTES + BIRD_ROUTES / 10]);
  });

  afterEach(function () {
    printAgentLogIfFailed(this, h?.agent);
  });

  after(async function () {
    this.timeout(120_000);
    traffic?.kill();
    back?.kill();
    try {
      await h?.close();
      await bird?.stop();
    } finally {
      lab?.remove();
    }
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('refuses an untrusted image, an incompatible schema and a second upgrade, leaving v1 untouched', async () => {
    const unsigned = path.join(work, 'unsigned');
    fs.mkdirSync(unsigned);
    for (const f of fs.readdirSync(v2)) if (f !== 'manifest.sig') fs.linkSync(path.join(v2, f), path.join(unsigned, f));
    const r1 = await h.issu(['loadversion', unsigned]);
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
    const r2 = await h.issu(['loadversion', v3]);
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /FAILED_PRECONDITION: incompatible schema .* process bgp/);
    const shown = await h.issu(['--json', 'show', 'compatibility', v3]);
    assert.equal(JSON.parse(shown.stdout).compatible, false);
    const ok = JSON.parse((await h.issu(['--json', 'show', 'compatibility', v2])).stdout);
    assert.equal(ok.compatible, true);
    assert.equal((await h.active())?.vmId, 'cp-1');
    assert.equal((await h.vms()).filter((v) => v.state === 'RUNNING').length, 1, 'no second VM was started');
  });

  it('loadversion, runversion, then abortversion rolls back to v1 with every change made under v2', async () => {
    assert.deepEqual(await cpNicsAnswering(lab!, ['cp-1']), ['cp-1'], "v1's control-plane NIC answers");
    let toVm = '';
    const seen = await withTraffic(async () => {
      toVm = await loadRunAbort();
    });
    assertNoDataPlaneChanges(await upgradeChanges(), [/^switchover to /, /^rollback to cp-1$/], FIB_ROUTES);
    // Nonstop routing both ways: BIRD saw no reset, and each handover is reported as such.
    assert.equal(seen.resets, 0, `BIRD saw no session reset (${JSON.stringify(seen)})`);
    await assertSessions(['NONSTOP', 'NONSTOP']);
    assert.deepEqual(await cpNicsAnswering(lab!, ['cp-1', toVm]), ['cp-1'], "after the rollback only v1's NIC answers");
  });

  /** The latest upgrade's session outcomes, as reported, are `want` (in order). */
  async function assertSessions(want: string[]): Promise<void> {
    const rep = await until<UpgradeReport | null>('every session outcome reported', async () => {
      const r = JSON.parse((await h.issu(['--json', 'show', 'upgrade'])).stdout) as UpgradeReport;
      return (r.sessions ?? []).length >= want.length ? r : null;
    });
    const got = rep!.sessions ?? [];
    measure('session outcomes', JSON.stringify(got.map((x) => ({ outcome: x.outcome, ms: x.durationMs, detail: x.detail }))));
    assert.deepEqual(
      got.map((x) => [x.session, x.outcome]),
      want.map((o) => ['bgp 198.51.100.2', o]),
    );
    const text = (await h.issu(['show', 'upgrade'])).stdout;
    for (const o of want) assert.match(text, o === 'NONSTOP' ? /no reset \(nonstop routing\)/ : /session reset \(graceful restart\), back after/);
  }

  /** The rollback test's upgrade; returns the VM of the new version. */
  async function loadRunAbort(): Promise<string> {
    const t0 = Date.now();
    const loaded = await h.cli('loadversion', v2);
    measure('loadversion (verify, boot v2 standby, bulk sync to READY)', `${Date.now() - t0} ms`);
    assert.equal(loaded.current?.phase, 'LOADED');
    await h.trackAll();
    // A second upgrade cannot start while this one is in progress.
    const again = await h.issu(['loadversion', v1]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already in progress/);
    const sw = await h.cli('runversion');
    assert.equal(sw.current?.phase, 'SWITCHED');
    measure('write freeze at runversion (demo table, churning)', `${sw.current!.freezeMs.toFixed(2)} ms`);
    assert.ok(sw.current!.timerRemainingMs > 0, 'the rollback timer runs');
    const now = await h.active();
    assert.equal(now?.vmId, sw.current!.toVm);
    assert.equal(now?.softwareVersion, '2.0.0');
    assert.deepEqual(await cpNicsAnswering(lab!, ['cp-1', sw.current!.toVm]), [sw.current!.toVm], "after runversion only v2's NIC answers");
    await new Promise((r) => setTimeout(r, 1500)); // v2 churns the table
    const { rib: underV2 } = await h.assertAudit('after runversion');
    const back = await h.cli('abortversion', '--reason', 'test rollback');
    assert.ok(!back.current, 'no upgrade in progress');
    assert.equal(back.history[0].phase, 'ROLLED_BACK');
    assert.equal((await h.active())?.vmId, 'cp-1', 'v1 is active again');
    const { rib: afterRollback } = await h.assertAudit('after rollback');
    assert.ok(afterRollback.seq >= underV2.seq, 'the changes made under v2 are in v1');
    await until('v2 VM stopped', async () => !(await h.vms()).some((v) => v.name === sw.current!.toVm && v.state === 'RUNNING'), 60_000);
    // The upgrade's report: the lag of v2's standby before the switchover (READY by then: it is
    // sampled at every phase boundary) and of v1's after it, and the closing audit of v1 alone,
    // taken before ROLLED_BACK was journaled.
    const shown = await h.issu(['--json', 'show', 'upgrade', back.history[0].id]);
    assert.equal(shown.code, 0, shown.stderr);
    const rep = JSON.parse(shown.stdout) as UpgradeReport;
    assert.equal(rep.upgrade.phase, 'ROLLED_BACK');
    const standbys = [...new Set(rep.lag.map((x) => x.instance))];
    assert.deepEqual(standbys, [`bgp@${sw.current!.toVm}`, 'bgp@cp-1'], 'the new version standby first, then the demoted old one');
    assert.ok(rep.lag.some((x) => x.instance === `bgp@${sw.current!.toVm}` && x.ready && x.atMs <= rep.journal.find((j) => j.phase === 'SWITCHING')!.atMs));
    assert.equal(rep.audits.length, 1);
    assert.deepEqual(
      [rep.audits[0].phase, rep.audits[0].instances, rep.audits[0].consistent, rep.audits[0].recordsLost],
      ['ROLLED_BACK', ['bgp@cp-1'], true, 0],
    );
    // The table churns around 20,000 routes (deletes and adds): at least what every audit here expects.
    assert.ok(rep.audits[0].recordsVerified >= 15_000, `records verified (${rep.audits[0].recordsVerified})`);
    assert.ok(rep.audits[0].atMs <= rep.journal.at(-1)!.atMs, 'audited before the ending was journaled');
    return sw.current!.toVm;
  }

  it('abortversion after loadversion stops the standby and leaves v1 active', async () => {
    const loaded = await h.cli('loadversion', v2);
    await h.trackAll();
    assert.equal(loaded.current?.phase, 'LOADED');
    const ab = await h.cli('abortversion');
    assert.equal(ab.history[0].phase, 'ABORTED');
    assert.equal((await h.active())?.vmId, 'cp-1');
    await h.assertAudit('after abort at LOADED');
  });

  it('after an abort the old version is the control plane the agent keeps: when its VM crashes, it is started again', async () => {
    const before = await h.assertAudit('before the crash');
    const vm = (await h.vms()).find((v) => v.name === 'cp-1')!;
    process.kill(vm.pid, 'SIGKILL');
    await until(
      'cp-1 runs again',
      async () => {
        const again = (await h.vms()).find((v) => v.name === 'cp-1');
        return again?.state === 'RUNNING' && again.pid !== vm.pid;
      },
      60_000,
      250,
    );
    await h.trackAll();
    await until('its bgp is active again', async () => (await h.active())?.vmId === 'cp-1', 180_000, 250);
    const after = await h.assertAudit('after the restart');
    assert.ok(after.rib.seq >= before.rib.seq, 'nothing acknowledged before the crash was lost');
  });

  it('the standby VM dying before runversion aborts the upgrade by itself', async () => {
    const loaded = await h.cli('loadversion', v2);
    await h.trackAll();
    const v = (await h.vms()).find((x) => x.name === loaded.current!.toVm)!;
    process.kill(v.pid, 'SIGKILL');
    await until('upgrade aborted', async () => (await h.cli('status')).history[0]?.phase === 'ABORTED' && !(await h.cli('status')).current, 60_000, 250);
    assert.equal((await h.active())?.vmId, 'cp-1');
  });

  it('the new active dying after runversion rolls back to v1 without losing an acknowledged change, or a packet', async () => {
    const seen = await withTraffic(async () => {
      await h.cli('loadversion', v2);
      await h.trackAll();
      const sw = await h.cli('runversion');
      // The crash comes once v2 holds the BGP session: it has reported taking it over (NONSTOP).
      // A kill at a fixed time after runversion could come before that report, and the outcome
      // would then depend on the guest's speed.
      await assertSessions(['NONSTOP']);
      const v = (await h.vms()).find((x) => x.name === sw.current!.toVm)!;
      process.kill(v.pid, 'SIGKILL');
      await until('rolled back', async () => (await h.cli('status')).history[0]?.phase === 'ROLLED_BACK', 90_000, 250);
      assert.equal((await h.active())?.vmId, 'cp-1');
    });
    await h.assertAudit('after the new active died');
    assertNoDataPlaneChanges(await upgradeChanges(), [/^switchover to /, /^rollback to cp-1$/], FIB_ROUTES);
    // runversion moved the session (nonstop); the crash left nothing to move: v1 took over by
    // graceful restart, BIRD saw that reset, and the report says so.
    assert.equal(seen.resets, 1, `BIRD reported the one reset, the crash's (${JSON.stringify(seen)})`);
    await assertSessions(['NONSTOP', 'GRACEFUL_RESTART']);
    assert.deepEqual(await cpNicsAnswering(lab!, ['cp-1']), ['cp-1'], "v1's NIC answers again");
  });

  it('an agent SIGKILL during loadversion and during runversion recovers to a consistent state', async () => {
    // During loadversion (standby booting/syncing): the restarted agent aborts the load.
    const loading = h.issu(['loadversion', v2]);
    await until('LOADING', async () => (await h.cli('status')).current?.phase === 'LOADING', 60_000, 100);
    await new Promise((r) => setTimeout(r, 2000));
    await h.agent.kill9();
    await loading;
    await h.startAgent();
    await until(
      'load aborted after restart',
      async () => {
        const s = await h.cli('status');
        return !s.current && s.history[0].phase === 'ABORTED';
      },
      120_000,
      250,
    );
    await until('v1 active again after restart', async () => (await h.active())?.vmId === 'cp-1', 60_000, 200);
    await h.assertAudit('after a kill during loadversion');

    // During runversion: whatever the kill interrupted, the restarted agent ends consistent.
    await h.cli('loadversion', v2);
    await h.trackAll();
    const running = h.issu(['runversion']);
    await until('SWITCHING or later', async () => (await h.cli('status')).current?.phase !== 'LOADED', 30_000, 5);
    await h.agent.kill9();
    await running;
    await h.startAgent();
    const settled = await until(
      'a consistent phase after restart',
      async () => {
        const s = await h.cli('status');
        const phase = s.current?.phase ?? s.history[0].phase;
        return ['LOADED', 'SWITCHED', 'ROLLED_BACK'].includes(phase) ? phase : undefined;
      },
      120_000,
      250,
    );
    measure('phase after a kill during runversion', String(settled));
    await until('exactly one active', async () => (await h.bgp()).peers.filter((p) => p.role === 'ACTIVE').length === 1, 60_000, 200);
    await h.assertAudit('after a kill during runversion');
    if (settled !== 'ROLLED_BACK') await h.cli('abortversion');
    await until('v1 active', async () => (await h.active())?.vmId === 'cp-1', 60_000, 200);
  });

  it('changeversion runs the whole flow: v2 active, v1 stopped, tables exact', async () => {
    assert.deepEqual(
      (await h.bgp()).tables.find((t) => t.name === 'rib')!.schemas,
      [1],
      'before the commit only schema 1 was written (v1 must read everything)',
    );
    const t0 = Date.now();
    let r = { code: -1, stdout: '', stderr: '' };
    const seen = await withTraffic(async () => {
      r = await h.issu(['--json', 'changeversion', v2]);
    });
    assert.equal(r.code, 0, r.stderr);
    const done = JSON.parse(r.stdout) as Awaited<ReturnType<typeof h.cli>>;
    measure('changeversion end to end', `${Date.now() - t0} ms`);
    // Progress came as NDJSON on stderr: every line an event; the image's bytes counted to the
    // end, then bgp's bulk snapshot in records to its total, and each counted step ends complete.
    const events = r.stderr
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { type: string; step: string; unit: string; done: number; total: number; phase: string });
    const steps = new Map<string, { unit: string; last: { done: number; total: number } }>();
    for (const e of events) if (e.step && Number(e.total) > 0) steps.set(e.step, { unit: e.unit, last: { done: Number(e.done), total: Number(e.total) } });
    assert.equal(steps.get('verify image')?.unit, 'bytes');
    assert.equal(steps.get('snapshot bgp')?.unit, 'records');
    for (const [step, { last }] of steps) assert.equal(last.done, last.total, `step '${step}' ended complete`);
    assert.ok(steps.get('snapshot bgp')!.last.total >= 20_000, 'the snapshot holds the routes');
    assert.deepEqual(
      events.filter((e) => e.type === 'PHASE').map((e) => e.phase),
      ['LOADING', 'LOADED', 'SWITCHING', 'SWITCHED', 'ACCEPTED', 'COMMITTING', 'COMMITTED'],
    );
    assert.ok(!done.current, 'no upgrade in progress');
    assert.equal(done.history[0].phase, 'COMMITTED');
    assertNoDataPlaneChanges(await upgradeChanges(), [/^switchover to /], FIB_ROUTES);
    // Nonstop routing: BIRD saw no reset, and the report says so.
    assert.equal(seen.resets, 0, `BIRD saw no session reset (${JSON.stringify(seen)})`);
    await assertSessions(['NONSTOP']);
    // The Upgrade events said so too, as the switchover happened.
    assert.ok(events.some((e) => /data plane: 0 route change\(s\) at switchover to /.test((e as { message?: string }).message ?? '')));
    await h.trackAll();
    const a = await h.active();
    assert.equal(a?.softwareVersion, '2.0.0');
    await until('v1 VM stopped', async () => !(await h.vms()).some((v) => v.name === 'cp-1' && v.state === 'RUNNING'), 60_000);
    await h.assertAudit('after commit');
    // With v1 gone nothing needs schema 1 any more: v2 writes its own schema 2 from the commit on.
    const after = await h.bgp();
    assert.equal(after.peers.find((p) => p.role === 'ACTIVE')?.schemaWrites, 2);
    await until('schema-2 records in the table', async () => (await h.bgp()).tables.find((t) => t.name === 'rib')!.schemas.includes(2), 30_000);
    await h.assertAudit('after v2 wrote schema 2');
    // Idempotent: committing again is not an error.
    assert.equal((await h.cli('commitversion')).history[0].phase, 'COMMITTED');

    // The report page of this upgrade, rendered by headless Chromium, shows the JSON's figures.
    const shown = await h.issu(['--json', 'show', 'upgrade']);
    assert.equal(shown.code, 0, shown.stderr);
    const rep = JSON.parse(shown.stdout) as UpgradeReport;
    assert.equal(rep.upgrade.id, done.history[0].id);
    assert.deepEqual(
      rep.journal.map((j) => j.phase),
      ['LOADING', 'LOADED', 'SWITCHING', 'SWITCHED', 'ACCEPTED', 'COMMITTING', 'COMMITTED'],
    );
    assert.ok(rep.lag.length > 0, 'the standby lag was sampled');
    // The agent's longest event-loop stall was kept for every phase that ended, and only those.
    assert.deepEqual(Object.keys(rep.upgrade.agentLoopMaxMs ?? {}).sort(), ['ACCEPTED', 'COMMITTING', 'LOADED', 'LOADING', 'SWITCHED', 'SWITCHING']);
    assert.ok(Object.values(rep.upgrade.agentLoopMaxMs!).every((ms) => ms >= 0));
    assert.equal(rep.upgrade.processes[0].freezeMs, rep.upgrade.freezeMs, 'one process: its freeze is the upgrade freeze');
    assert.deepEqual([rep.audits.length, rep.audits[0].phase, rep.audits[0].consistent, rep.audits[0].recordsLost], [1, 'COMMITTED', true, 0]);
    const page = path.join(work, 'report.html');
    const wrote = await h.issu(['show', 'upgrade', rep.upgrade.id, '--html', page]);
    assert.equal(wrote.code, 0, wrote.stderr);
    assert.match(wrote.stdout, /report page written to/);
    const f = figures(await renderedDom(page, path.join(work, 'chromium')));
    const want = reportFigures(rep);
    assert.deepEqual(
      [
        'id',
        'phase',
        'from-version',
        'to-version',
        'duration-s',
        'freeze-ms',
        'records-verified',
        'records-lost',
        'lag-samples',
        'max-lag',
        'phase-count',
        'loop-max-ms',
      ].map((k) => f.get(k)),
      [
        rep.upgrade.id,
        'COMMITTED',
        '1.0.0',
        '2.0.0',
        want.durationS.toFixed(1),
        rep.upgrade.freezeMs.toFixed(2),
        String(rep.audits[0].recordsVerified),
        '0',
        String(rep.lag.length),
        String(want.maxLag),
        '7',
        want.loopMaxMs.toFixed(1),
      ],
    );
  });

  it('the old version dying after runversion leaves the new one in charge: the upgrade commits itself', async () => {
    // v2 runs alone now (committed above); v3 is the same software under a new version number.
    const v3 = await signedVariant(v2, path.join(work, 'v3-same'), key, { edit: (m) => void (m.version = '3.0.0') });
    const loaded = await h.cli('loadversion', v3);
    await h.trackAll();
    const from = loaded.current!.fromVm;
    const sw = await h.cli('runversion');
    assert.equal(sw.current?.phase, 'SWITCHED');
    const old = (await h.vms()).find((v) => v.name === from)!;
    process.kill(old.pid, 'SIGKILL');
    const done = await until(
      'committed by itself',
      async () => {
        const s = await h.cli('status');
        return !s.current && s.history[0].phase === 'COMMITTED' ? s : undefined;
      },
      90_000,
      250,
    );
    assert.match(done!.history[0].result, /nothing to roll back to/);
    // (The daemons report their own version, 2.0.0: v3 differs from v2 only in its manifest.)
    assert.equal((await h.active())?.vmId, sw.current!.toVm);
    assert.deepEqual(
      (await h.vms()).filter((v) => v.state === 'RUNNING').map((v) => v.name),
      [sw.current!.toVm],
    );
    await h.assertAudit('after the old version died');

    // The committed VM is now the only control plane: when it crashes, the agent starts it again
    // and its processes take their table back from the agent.
    const before = await h.assertAudit('before the crash');
    const vm = (await h.vms()).find((v) => v.name === sw.current!.toVm)!;
    process.kill(vm.pid, 'SIGKILL');
    await until(
      'the control-plane VM runs again',
      async () => {
        const again = (await h.vms()).find((v) => v.name === vm.name);
        return again?.state === 'RUNNING' && again.pid !== vm.pid;
      },
      60_000,
      250,
    );
    await h.trackAll();
    await until('its bgp is active again', async () => (await h.active())?.vmId === vm.name, 180_000, 250);
    const after = await h.assertAudit('after the restart');
    assert.ok(after.rib.seq >= before.rib.seq, 'nothing acknowledged before the crash was lost');
  });

  it('refuses bad requests over gRPC with the right status', async () => {
    const up = rawClient('hitless.v1.Upgrade', h.agent.socket);
    try {
      await expectStatus(unaryCall(up, 'LoadVersion', { imageDir: '' }), grpc.status.INVALID_ARGUMENT, /image_dir is empty/);
      await expectStatus(unaryCall(up, 'LoadVersion', { imageDir: 'relative' }), grpc.status.INVALID_ARGUMENT, /absolute path/);
      await expectStatus(unaryCall(up, 'RunVersion', {}), grpc.status.FAILED_PRECONDITION, /no version is loaded/);
      await expectStatus(unaryCall(up, 'ShowUpgrade', { id: '../../etc/passwd' }), grpc.status.INVALID_ARGUMENT, /not an upgrade id/);
      await expectStatus(unaryCall(up, 'ShowUpgrade', { id: 'u-20000101000000-0000' }), grpc.status.NOT_FOUND, /issu status lists/);
    } finally {
      up.close();
    }
  });
});
