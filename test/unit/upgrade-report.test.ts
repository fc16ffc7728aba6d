/**
 * The upgrade report: what the agent keeps of an upgrade besides its journal (lag samples and
 * closing audits, in the real embedded database), the figures computed from it, and the page,
 * rendered by headless Chromium and compared with the JSON it was made from.
 *
 * The LagRecorder here reads a scripted checkpoint status (a function standing in for the
 * CheckpointService port), so that each of its rules can be driven exactly; the recorder reading
 * the real service, with real standbys, is covered by the VM test of changeversion.
 */
import assert from 'node:assert/strict';
import Database from 'better-sqlite3';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { silentLogger } from '../../agent/common/logger';
import { diskFull, notFound } from '../../agent/common/errors';
import { ProcessStatus } from '../../agent/checkpoint/messages';
import { closeDatabase, openDatabase, Db } from '../../agent/store/database';
import { auditRecord } from '../../agent/upgrade/audit-record';
import { LagRecorder } from '../../agent/upgrade/lag-recorder';
import { SqliteUpgradeStore, UpgradeRecord } from '../../agent/upgrade/upgrade-store';
import { upgradeReport } from '../../agent/upgrade/upgrade.grpc';
import { UpgradeReport, reportFigures, reportText } from '../../agent/report/upgrade-report';
import { upgradeReportHtml } from '../../agent/report/upgrade-report-html';
import { CHROMIUM, figures, renderedDom, screenshot } from '../helpers/chromium';

function record(id: string): UpgradeRecord {
  return {
    id,
    phase: 'LOADING',
    fromVm: 'cp-1',
    fromImage: '/img/1',
    fromVersion: '1.0.0',
    toVm: 'cp-2',
    toImage: '/img/2',
    toVersion: '2.0.0',
    startedAt: Date.now(),
    updatedAt: Date.now(),
    timerDeadline: 0,
    processes: { bgp: { from: 'bgp@cp-1', to: 'bgp@cp-2' } },
    result: '',
    freezeMs: 0,
  };
}

/** A checkpoint status with one active and one standby whose name, lag and readiness the test sets. */
function scriptedStatus() {
  const s = { standby: 'bgp@cp-2', lag: 0, ready: false };
  const status = (): ProcessStatus[] => [
    {
      process: 'bgp',
      peers: [
        { instanceId: s.standby === 'bgp@cp-2' ? 'bgp@cp-1' : 'bgp@cp-2', role: 'ACTIVE', lag: 0, ready: true },
        { instanceId: s.standby, role: 'STANDBY', lag: s.lag, ready: s.ready },
      ],
    } as unknown as ProcessStatus,
  ];
  return { s, status };
}

describe('upgrade report', function () {
  let dir = '';
  let db: Db;
  let store: SqliteUpgradeStore;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-report-'));
    db = openDatabase(dir);
    store = new SqliteUpgradeStore(db);
  });

  afterEach(async () => {
    await closeDatabase(db);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('a phase transition holds when another connection commits between its read and its write', () => {
    // The store's writer thread has a connection of its own and commits batches all through an
    // upgrade. Here a second connection commits at the worst moment: right after the transition
    // read the record. Begun as a read, the transition could not write any more ("database is
    // locked" at once); begun with the write lock, it goes through and the other writer waits.
    store.create(record('u-20261129010000-cccc'), 'loadversion');
    const other = new Database(path.join(dir, 'hitless.db'));
    other.pragma('busy_timeout = 0');
    other.exec('CREATE TABLE IF NOT EXISTS other_writer (n INTEGER)');
    let otherCommitted: boolean | null = null;
    const read = store.get.bind(store);
    store.get = (id: string) => {
      const r = read(id);
      try {
        other.prepare('INSERT INTO other_writer (n) VALUES (1)').run();
        otherCommitted = true;
      } catch {
        otherCommitted = false; // it waits for the transition (here: gives up at once)
      }
      return r;
    };
    try {
      const next = store.transition('u-20261129010000-cccc', 'LOADED', 'every standby process is READY');
      assert.equal(next.phase, 'LOADED');
      assert.equal(otherCommitted, false, 'the other writer could not commit inside the transition');
    } finally {
      store.get = read;
      other.close();
    }
    assert.deepEqual(
      store.journal('u-20261129010000-cccc').map((j) => j.phase),
      ['LOADING', 'LOADED'],
    );
  });

  it('keeps lag samples and audits per upgrade, in order, across a reopen of the database', async () => {
    store.create(record('u-20261128080000-aaaa'), 'load');
    store.create({ ...record('u-20261128090000-bbbb'), startedAt: Date.now() + 1 }, 'load');
    store.addLagSamples('u-20261128080000-aaaa', [
      { at: 1000, process: 'bgp', instance: 'bgp@cp-2', lag: 5, ready: false },
      { at: 2000, process: 'bgp', instance: 'bgp@cp-2', lag: 0, ready: true },
    ]);
    store.addLagSamples('u-20261128090000-bbbb', [{ at: 1500, process: 'bgp', instance: 'bgp@cp-9', lag: 1, ready: false }]);
    store.addAudit('u-20261128080000-aaaa', {
      at: 3000,
      phase: 'COMMITTED',
      process: 'bgp',
      instances: ['bgp@cp-2'],
      verified: 20_000,
      lost: 0,
      consistent: true,
      detail: '',
    });
    await closeDatabase(db);
    db = openDatabase(dir);
    store = new SqliteUpgradeStore(db);
    assert.deepEqual(
      store.lagSamples('u-20261128080000-aaaa').map((x) => [x.at, x.lag, x.ready]),
      [
        [1000, 5, false],
        [2000, 0, true],
      ],
    );
    assert.equal(store.lagSamples('u-20261128090000-bbbb').length, 1);
    assert.deepEqual(store.audits('u-20261128080000-aaaa')[0].verified, 20_000);
    assert.deepEqual(store.audits('u-20261128090000-bbbb'), []);
    assert.equal(store.get('u-20261128080000-aaaa')?.toVersion, '2.0.0');
    assert.equal(store.get('u-20260101000000-0000'), null);
  });

  it('keeps session outcomes per upgrade and words them as the network saw them, never better', () => {
    const id = 'u-20261128080000-aaaa';
    store.create(record(id), 'load');
    store.addSession(id, {
      at: 2000,
      process: 'bgp',
      instance: 'bgp@cp-2',
      session: 'bgp 198.51.100.2',
      outcome: 'NONSTOP',
      durationMs: 39,
      detail: 'TCP repair',
    });
    store.addSession(id, {
      at: 3000,
      process: 'bgp',
      instance: 'bgp@cp-1',
      session: 'bgp 198.51.100.2',
      outcome: 'GRACEFUL_RESTART',
      durationMs: 5379,
      detail: '',
    });
    store.addSession(id, { at: 4000, process: 'bgp', instance: 'bgp@cp-1', session: 'bgp 192.0.2.9', outcome: 'RESET', durationMs: 800, detail: '' });
    const rep = upgradeReport(store, id) as unknown as UpgradeReport;
    assert.deepEqual(
      rep.sessions!.map((x) => [x.outcome, x.durationMs]),
      [
        ['NONSTOP', 39],
        ['GRACEFUL_RESTART', 5379],
        ['RESET', 800],
      ],
    );
    const text = reportText(rep);
    assert.match(text, /bgp 198\.51\.100\.2: no reset \(nonstop routing\), moved in 39 ms \(TCP repair\)/);
    assert.match(text, /bgp 198\.51\.100\.2: session reset \(graceful restart\), back after 5\.4 s/);
    assert.match(text, /bgp 192\.0\.2\.9: session reset, the peer dropped our routes; back after 800 ms/);
    assert.deepEqual(store.sessions('u-20261128090000-bbbb'), []);
  });

  it('ShowUpgrade answers INVALID_ARGUMENT for a malformed id, NOT_FOUND for an unknown one or when none ran, the latest by default', () => {
    const code = (fn: () => unknown) => {
      try {
        fn();
        return 'OK';
      } catch (e) {
        return (e as { code: number }).code;
      }
    };
    assert.equal(
      code(() => upgradeReport(store, '')),
      5,
    ); // NOT_FOUND: no upgrade yet
    store.create(record('u-20261128080000-aaaa'), 'load');
    assert.equal(
      code(() => upgradeReport(store, 'drop table upgrades')),
      3,
    ); // INVALID_ARGUMENT
    assert.equal(
      code(() => upgradeReport(store, 'u-20261128080000-ffff')),
      5,
    );
    assert.equal(upgradeReport(store, '').upgrade.id, 'u-20261128080000-aaaa');
    assert.equal(upgradeReport(store, 'u-20261128080000-aaaa').journal[0].note, 'load');
  });

  // The recorder's timer is set beyond the test (intervalMs 1e9): the test drives tick(now) with
  // explicit times, so what is kept depends on the rules alone, not on the machine's load.
  const NO_TIMER = 1e9;

  it('LagRecorder keeps a sample when lag or readiness changes and every keepalive, flushes in batches, and stops at its cap', () => {
    const rec = record('u-20261128080000-aaaa');
    store.create(rec, 'load');
    const { s, status } = scriptedStatus();
    const lag = new LagRecorder(store, status, silentLogger, { intervalMs: NO_TIMER, keepaliveMs: 5000, flushMs: 2000, maxSamples: 8 });
    const t = Date.now();
    s.lag = 7;
    lag.start(rec, t); // the first sample at once
    lag.tick(t + 500); // unchanged: not kept
    lag.tick(t + 1000);
    assert.equal(store.lagSamples(rec.id).length, 0, 'nothing is written before flushMs');
    s.lag = 3;
    lag.tick(t + 2000); // changed: kept, and the flush writes both
    assert.deepEqual(
      store.lagSamples(rec.id).map((x) => x.lag),
      [7, 3],
    );
    s.lag = 0;
    s.ready = true;
    lag.tick(t + 2500);
    lag.tick(t + 7000); // unchanged for 4.5 s: not kept
    lag.tick(t + 7600); // 5.1 s: a keepalive sample
    lag.stop(t + 7700);
    s.lag = 42;
    lag.tick(t + 20_000); // stopped: samples nothing
    assert.deepEqual(
      store.lagSamples(rec.id).map((x) => [x.at - t, x.lag, x.ready]),
      [
        [0, 7, false],
        [2000, 3, false],
        [2500, 0, true],
        [7600, 0, true],
      ],
    );
    // After the switchover the old version's instance is the standby; the active is never sampled.
    s.standby = 'bgp@cp-1';
    const again = new LagRecorder(store, status, silentLogger, { intervalMs: NO_TIMER, keepaliveMs: 0, flushMs: 0, maxSamples: 8 });
    again.start(rec, t + 8000);
    for (let i = 1; i <= 10; i++) again.tick(t + 8000 + i * 100);
    again.stop(t + 9500);
    const all = store.lagSamples(rec.id);
    assert.equal(all.length, 8, 'never more than maxSamples per upgrade, counting what was stored before (an agent restart)');
    assert.deepEqual([...new Set(all.map((x) => x.instance))], ['bgp@cp-2', 'bgp@cp-1']);
  });

  it('LagRecorder drops samples on a full state disk without throwing, and goes on when there is room', () => {
    const rec = record('u-20261128080000-aaaa');
    store.create(rec, 'load');
    // Fault injection: the store refuses writes as it does when statfs finds the disk full.
    let full = true;
    const refusing = {
      lagSampleCount: (id: string) => store.lagSampleCount(id),
      addLagSamples: (id: string, xs: Parameters<SqliteUpgradeStore['addLagSamples']>[1]) => {
        if (full) throw diskFull(dir, 'lag samples are dropped until there is room');
        store.addLagSamples(id, xs);
      },
    };
    const { s, status } = scriptedStatus();
    const lag = new LagRecorder(refusing, status, silentLogger, { intervalMs: NO_TIMER, keepaliveMs: 5000, flushMs: 0, maxSamples: 100 });
    const t = Date.now();
    lag.start(rec, t);
    for (let i = 1; i <= 5; i++) {
      s.lag = i;
      assert.doesNotThrow(() => lag.tick(t + i * 500));
    }
    assert.equal(store.lagSamples(rec.id).length, 0);
    full = false;
    s.lag = 99;
    lag.tick(t + 3000);
    lag.stop(t + 3100);
    assert.deepEqual(
      store.lagSamples(rec.id).map((x) => x.lag),
      [99],
    );
  });

  it('LagRecorder samples nothing, and throws nothing, for a process the checkpoint service does not know yet', () => {
    const rec = record('u-20261128080000-aaaa');
    store.create(rec, 'load');
    // After an agent restart a process without a stored table is unknown until it re-registers:
    // the service's status() answers NOT_FOUND, as it does here.
    let known = false;
    const { s, status } = scriptedStatus();
    const lag = new LagRecorder(
      store,
      (p) => {
        if (!known) throw notFound(`no process '${p}' is known to the agent`);
        return status();
      },
      silentLogger,
      { intervalMs: NO_TIMER, keepaliveMs: 5000, flushMs: 0, maxSamples: 100 },
    );
    const t = Date.now();
    assert.doesNotThrow(() => lag.start(rec, t));
    assert.doesNotThrow(() => lag.tick(t + 500));
    known = true;
    s.lag = 4;
    lag.tick(t + 1000);
    lag.stop(t + 1100);
    assert.deepEqual(
      store.lagSamples(rec.id).map((x) => [x.at - t, x.lag]),
      [[1000, 4]],
    );
  });

  it('an audit counts records verified only where every copy matches, and the largest shortfall as lost', () => {
    const agent = [
      { table: 'rib', seq: 10, records: 1000, sha256: 'aa' },
      { table: 'nbr', seq: 4, records: 50, sha256: 'bb' },
    ];
    const same = auditRecord('bgp', 'COMMITTED', {
      agent,
      peers: [{ instanceId: 'bgp@cp-2', vmId: 'cp-2', role: 'ACTIVE', digests: agent }],
      consistent: true,
      detail: '',
    });
    assert.deepEqual([same.verified, same.lost, same.consistent], [1050, 0, true]);
    const short = auditRecord('bgp', 'ROLLED_BACK', {
      agent,
      peers: [
        { instanceId: 'bgp@cp-1', vmId: 'cp-1', role: 'ACTIVE', digests: [agent[0], { table: 'nbr', seq: 3, records: 47, sha256: 'cc' }] },
        { instanceId: 'bgp@cp-2', vmId: 'cp-2', role: 'STANDBY', digests: [agent[0]] },
      ],
      consistent: false,
      detail: 'nbr differs',
    });
    assert.deepEqual([short.verified, short.lost, short.consistent, short.detail], [1000, 50, false, 'nbr differs']);
    const nobody = auditRecord('bgp', 'ABORTED', { agent, peers: [], consistent: true, detail: '' });
    assert.deepEqual([nobody.verified, nobody.consistent], [0, false], 'nothing is verified without a copy to compare');
    assert.match(nobody.detail, /no instance/);
  });

  describe('the page, in headless Chromium', function () {
    this.timeout(180_000);
    const t = Date.parse('2026-11-28T08:00:00Z');
    const report: UpgradeReport = {
      upgrade: {
        id: 'u-20261128080000-abcd',
        phase: 'ROLLED_BACK',
        fromVm: 'cp-1',
        fromVersion: '1.0.0',
        toVm: 'cp-2',
        toVersion: '2.0.0',
        startedAtMs: t,
        updatedAtMs: t + 30_000,
        timerRemainingMs: 0,
        result: 'rollback: abortversion: <script>alert(1)</script> & "quotes"',
        freezeMs: 31.25,
        processes: [
          { process: 'bgp', fromInstance: 'bgp@cp-1', toInstance: 'bgp@cp-2', freezeMs: 31.25 },
          { process: 'ospf', fromInstance: 'ospf@cp-1', toInstance: 'ospf@cp-2', freezeMs: 12.5 },
        ],
        agentLoopMaxMs: { LOADING: 14.2, LOADED: 3.1, SWITCHING: 17.8, SWITCHED: 2.5, ABORTING: 6 },
      },
      journal: [
        { atMs: t, phase: 'LOADING', note: 'loadversion /img/2' },
        { atMs: t + 9_400, phase: 'LOADED', note: 'every standby process is READY' },
        { atMs: t + 12_000, phase: 'SWITCHING', note: 'switching' },
        { atMs: t + 12_050, phase: 'SWITCHED', note: 'new version active' },
        { atMs: t + 20_000, phase: 'ABORTING', note: 'abortversion: <img src=x onerror="document.title=1">' },
        { atMs: t + 23_260, phase: 'ROLLED_BACK', note: 'back on 1.0.0' },
      ],
      lag: [
        ...[0, 1500, 3000, 4500, 6000, 9000].map((dt, i) => ({
          atMs: t + 4000 + dt,
          process: 'bgp',
          instance: 'bgp@cp-2',
          lag: [0, 120, 260, 90, 4, 0][i],
          ready: i === 5,
        })),
        ...[0, 5000].map((dt) => ({ atMs: t + 12_100 + dt, process: 'bgp', instance: 'bgp@cp-1', lag: 1, ready: true })),
        { atMs: t + 6000, process: 'ospf', instance: 'ospf@cp-2', lag: 3, ready: false },
      ],
      audits: [
        // An earlier audit of bgp, as one interrupted by an agent restart leaves: the later one counts.
        {
          atMs: t + 22_000,
          phase: 'ROLLED_BACK',
          process: 'bgp',
          instances: [],
          recordsVerified: 0,
          recordsLost: 0,
          consistent: false,
          detail: 'the audit could not run',
        },
        {
          atMs: t + 23_000,
          phase: 'ROLLED_BACK',
          process: 'bgp',
          instances: ['bgp@cp-1'],
          recordsVerified: 20_000,
          recordsLost: 0,
          consistent: true,
          detail: '',
        },
        {
          atMs: t + 23_100,
          phase: 'ROLLED_BACK',
          process: 'ospf',
          instances: ['ospf@cp-1'],
          recordsVerified: 0,
          recordsLost: 3,
          consistent: false,
          detail: 'ospf@cp-1 table lsdb: seq 7',
        },
      ],
    };

    before(function () {
      if (!CHROMIUM) throw new Error('chromium is not installed; run scripts/setup.sh (it installs Debian chromium)');
    });

    it('shows the figures of the JSON, escapes what came from the journal, and renders a non-blank page', async () => {
      const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-page-'));
      try {
        const file = path.join(work, 'report.html');
        fs.writeFileSync(file, upgradeReportHtml(report));
        const dom = await renderedDom(file, path.join(work, 'profile'));
        const f = figures(dom);
        const want = reportFigures(report);
        assert.equal(f.get('id'), report.upgrade.id);
        assert.equal(f.get('phase'), 'ROLLED_BACK');
        assert.equal(f.get('from-version'), '1.0.0');
        assert.equal(f.get('to-version'), '2.0.0');
        assert.equal(f.get('duration-s'), '23.3');
        assert.equal(f.get('freeze-ms'), '31.25');
        assert.equal(f.get('freeze-ms:ospf'), '12.50');
        assert.equal(f.get('records-verified'), '20000');
        assert.equal(f.get('records-lost'), '3');
        assert.equal(f.get('verified:bgp'), '20000');
        assert.equal(f.get('lost:ospf'), '3');
        assert.equal(f.get('audit'), 'a copy differs');
        assert.equal(f.get('phase-count'), '6');
        assert.equal(f.get('lag-samples'), '9');
        assert.equal(f.get('max-lag'), '260');
        assert.equal(f.get('max-lag:bgp@cp-2'), '260');
        assert.equal(f.get('loop-max-ms'), '17.8');
        assert.equal(f.get('loop-max-ms:LOADING'), '14.2');
        assert.equal(f.get('loop-max-ms:ROLLED_BACK'), undefined, 'no figure for the phase that did not end');
        assert.deepEqual([want.durationS, want.recordsVerified, want.recordsLost, want.maxLag], [23.3, 20_000, 3, 260]);
        // One line per standby instance, one point per sample.
        const lines = [...dom.matchAll(/<polyline data-instance="([^"]+)" data-points="(\d+)"[^>]*points="([^"]*)"/g)].map((m) => [
          m[1],
          Number(m[2]),
          m[3].trim().split(/\s+/).length,
        ]);
        assert.deepEqual(lines, [
          ['bgp@cp-2', 6, 6],
          ['bgp@cp-1', 2, 2],
          ['ospf@cp-2', 1, 1],
        ]);
        // The journal's text is shown as text: no element was made of it, no script ran.
        assert.ok(!/<script/i.test(dom), 'no script element in the page');
        assert.ok(!/<img/i.test(dom), 'no img element made of a note');
        assert.match(dom, /abortversion: &lt;img src=x onerror="document.title=1"&gt;/);
        assert.match(dom, /<title>hitless upgrade u-20261128080000-abcd: 1\.0\.0 to 2\.0\.0<\/title>/);
        const png = await screenshot(file, path.join(work, 'page.png'), path.join(work, 'profile'));
        assert.ok(png > 20_000, `the screenshot holds a drawn page (${png} bytes)`);
        assert.match(reportText(report), /records verified 20000, lost 3 \(AUDIT FOUND A DIFFERENCE\)/);
        assert.match(reportText(report), /agent event loop: longest stall 17\.8 ms \(SWITCHING\)/);
        assert.match(reportText(report), /SWITCHING +0\.1 s {2}stall {2}17\.8 ms {2}switching/);
      } finally {
        fs.rmSync(work, { recursive: true, force: true });
      }
    });
  });
});
