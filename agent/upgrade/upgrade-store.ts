/**
 * The upgrade journal in the agent's embedded database.
 *
 * `upgrades` holds one row per upgrade with its current phase; `upgrade_journal` every phase
 * transition in order. A transition is written (in one transaction with the row) before the
 * action it announces starts, so a restarted agent knows exactly what may have been under way.
 *
 * What the upgrade report shows beside the journal is kept here too: `upgrade_lag` holds the
 * standbys' lag sampled over the upgrade (LagRecorder), `upgrade_audits` the audits the agent ran
 * at its milestones (records verified in every copy, records lost).
 */
import { Db, storeWrite } from '../store/database';
import type { DataPlaneChanges } from '../dataplane/fib.service';

export type Phase = 'LOADING' | 'LOADED' | 'SWITCHING' | 'SWITCHED' | 'ACCEPTED' | 'COMMITTING' | 'COMMITTED' | 'ABORTING' | 'ABORTED' | 'ROLLED_BACK';

export const TERMINAL: readonly Phase[] = ['COMMITTED', 'ABORTED', 'ROLLED_BACK'];

export interface UpgradeRecord {
  id: string;
  phase: Phase;
  fromVm: string;
  fromImage: string;
  fromVersion: string;
  toVm: string;
  toImage: string;
  toVersion: string;
  startedAt: number;
  updatedAt: number;
  /** Epoch ms when the rollback timer fires (SWITCHED only), else 0. */
  timerDeadline: number;
  /** Process -> instance ids: { bgp: { from: 'bgp@cp-1', to: 'bgp@cp-2' } }. */
  processes: Record<string, { from: string; to: string }>;
  /** Why it ended (abort reason, failure), or ''. */
  result: string;
  /** Longest write freeze of any process at the switchover, ms. */
  freezeMs: number;
  /** Write freeze of each process at the switchover, ms (absent in upgrades journaled before it was kept). */
  freezes?: Record<string, number>;
  /** What each change of the active instances changed in the data plane (absent without one). */
  dataplane?: DataPlaneChanges[];
  /**
   * The agent's longest event-loop stall in each phase that has ended, ms (LoopStallWatch; absent
   * in upgrades journaled before it was kept).
   */
  loopMaxMs?: Partial<Record<Phase, number>>;
}

/** One standby's lag at one moment: batches the agent holds that it has not acknowledged. */
export interface LagSample {
  at: number;
  process: string;
  instance: string;
  lag: number;
  ready: boolean;
}

/** One audit the agent ran during the upgrade, for one process. */
export interface AuditRecord {
  at: number;
  /** The upgrade phase it was run in (SWITCHED, COMMITTED, ROLLED_BACK, ABORTED). */
  phase: Phase;
  process: string;
  /** The instances whose copies were compared with the agent's. */
  instances: string[];
  /** Records of the agent's tables found identical in every audited copy (0 when one differs). */
  verified: number;
  /** Records the agent holds that a copy lacks (the largest shortfall of any copy). */
  lost: number;
  consistent: boolean;
  /** What differed, or why the audit could not run; '' when consistent. */
  detail: string;
}

export interface JournalEntry {
  id: string;
  n: number;
  at: number;
  phase: Phase;
  note: string;
}

export interface UpgradeStore {
  current(): UpgradeRecord | null;
  history(limit: number): UpgradeRecord[];
  journal(id: string): JournalEntry[];
  create(r: UpgradeRecord, note: string): void;
  /** Writes the new phase (and other fields) and its journal entry atomically. */
  transition(id: string, phase: Phase, note: string, fields?: Partial<UpgradeRecord>): UpgradeRecord;
  get(id: string): UpgradeRecord | null;
  /** Appends in one transaction; a refusal (full disk) stores none of them. */
  addLagSamples(id: string, samples: LagSample[]): void;
  lagSamples(id: string): LagSample[];
  lagSampleCount(id: string): number;
  addAudit(id: string, a: AuditRecord): void;
  audits(id: string): AuditRecord[];
  addSession(id: string, s: SessionRecord): void;
  sessions(id: string): SessionRecord[];
}

/** How one protocol session fared at a change of active instance, as its process reported it. */
export interface SessionRecord {
  at: number;
  process: string;
  instance: string;
  session: string;
  outcome: 'NONSTOP' | 'GRACEFUL_RESTART' | 'RESET';
  durationMs: number;
  detail: string;
}

interface Row {
  id: string;
  phase: Phase;
  data: string;
}

export class SqliteUpgradeStore implements UpgradeStore {
  constructor(private readonly db: Db) {
    db.exec(`
      CREATE TABLE IF NOT EXISTS upgrades (
        id TEXT PRIMARY KEY, phase TEXT NOT NULL, started_at INTEGER NOT NULL, data TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS upgrade_journal (
        id TEXT NOT NULL, n INTEGER NOT NULL, at INTEGER NOT NULL, phase TEXT NOT NULL, note TEXT NOT NULL,
        PRIMARY KEY (id, n));
      CREATE TABLE IF NOT EXISTS upgrade_lag (
        id TEXT NOT NULL, at INTEGER NOT NULL, process TEXT NOT NULL, instance TEXT NOT NULL, lag INTEGER NOT NULL, ready INTEGER NOT NULL);
      CREATE INDEX IF NOT EXISTS upgrade_lag_id ON upgrade_lag (id, at);
      CREATE TABLE IF NOT EXISTS upgrade_audits (id TEXT NOT NULL, at INTEGER NOT NULL, data TEXT NOT NULL);
      CREATE INDEX IF NOT EXISTS upgrade_audits_id ON upgrade_audits (id, at);
      CREATE TABLE IF NOT EXISTS upgrade_sessions (id TEXT NOT NULL, at INTEGER NOT NULL, data TEXT NOT NULL);
      CREATE INDEX IF NOT EXISTS upgrade_sessions_id ON upgrade_sessions (id, at);
    `);
  }

  private decode(row: Row | undefined): UpgradeRecord | null {
    return row ? { ...(JSON.parse(row.data) as UpgradeRecord), phase: row.phase } : null;
  }

  current(): UpgradeRecord | null {
    const placeholders = TERMINAL.map(() => '?').join(',');
    const row = this.db
      .prepare(`SELECT id, phase, data FROM upgrades WHERE phase NOT IN (${placeholders}) ORDER BY started_at DESC LIMIT 1`)
      .get(...TERMINAL) as Row | undefined;
    return this.decode(row);
  }

  history(limit: number): UpgradeRecord[] {
    const rows = this.db.prepare('SELECT id, phase, data FROM upgrades ORDER BY started_at DESC LIMIT ?').all(limit) as Row[];
    return rows.map((r) => this.decode(r)!);
  }

  journal(id: string): JournalEntry[] {
    return this.db.prepare('SELECT id, n, at, phase, note FROM upgrade_journal WHERE id = ? ORDER BY n').all(id) as JournalEntry[];
  }

  create(r: UpgradeRecord, note: string): void {
    storeWrite(this.db, 'run the command again; no upgrade was started', () =>
      this.db.transaction(() => {
        this.db.prepare('INSERT INTO upgrades (id, phase, started_at, data) VALUES (?, ?, ?, ?)').run(r.id, r.phase, r.startedAt, JSON.stringify(r));
        this.db.prepare('INSERT INTO upgrade_journal (id, n, at, phase, note) VALUES (?, 1, ?, ?, ?)').run(r.id, Date.now(), r.phase, note);
      })(),
    );
  }

  /**
   * A refusal (full disk) leaves the phase as it was: the action it announces must not start.
   *
   * BEGIN IMMEDIATE: the transaction reads the record and then writes. Begun as a read (SQLite's
   * default), it could not become a write once another connection had committed in between (the
   * store's writer thread commits batches all through an upgrade): SQLite then answers "database
   * is locked" at once, without waiting. Taking the write lock first waits for that writer instead.
   */
  transition(id: string, phase: Phase, note: string, fields: Partial<UpgradeRecord> = {}): UpgradeRecord {
    const then = () => `run the command again; upgrade ${id} stays in its phase (not ${phase})`;
    return storeWrite(this.db, then, () =>
      this.db
        .transaction(() => {
          const cur = this.get(id);
          if (!cur) throw new Error(`upgrade ${id} is not in the journal`);
          const next: UpgradeRecord = { ...cur, ...fields, phase, updatedAt: Date.now() };
          this.db.prepare('UPDATE upgrades SET phase = ?, data = ? WHERE id = ?').run(phase, JSON.stringify(next), id);
          const n = (this.db.prepare('SELECT COALESCE(MAX(n), 0) + 1 AS n FROM upgrade_journal WHERE id = ?').get(id) as { n: number }).n;
          this.db.prepare('INSERT INTO upgrade_journal (id, n, at, phase, note) VALUES (?, ?, ?, ?, ?)').run(id, n, Date.now(), phase, note);
          return next;
        })
        .immediate(),
    );
  }

  get(id: string): UpgradeRecord | null {
    return this.decode(this.db.prepare('SELECT id, phase, data FROM upgrades WHERE id = ?').get(id) as Row | undefined);
  }

  addLagSamples(id: string, samples: LagSample[]): void {
    if (samples.length === 0) return;
    storeWrite(this.db, 'lag samples are dropped until there is room; the upgrade goes on', () =>
      this.db.transaction(() => {
        const ins = this.db.prepare('INSERT INTO upgrade_lag (id, at, process, instance, lag, ready) VALUES (?, ?, ?, ?, ?, ?)');
        for (const x of samples) ins.run(id, x.at, x.process, x.instance, x.lag, x.ready ? 1 : 0);
      })(),
    );
  }

  lagSamples(id: string): LagSample[] {
    const rows = this.db.prepare('SELECT at, process, instance, lag, ready FROM upgrade_lag WHERE id = ? ORDER BY at, rowid').all(id) as (Omit<
      LagSample,
      'ready'
    > & {
      ready: number;
    })[];
    return rows.map((r) => ({ ...r, ready: r.ready === 1 }));
  }

  lagSampleCount(id: string): number {
    return (this.db.prepare('SELECT COUNT(*) AS n FROM upgrade_lag WHERE id = ?').get(id) as { n: number }).n;
  }

  addAudit(id: string, a: AuditRecord): void {
    this.addRow('upgrade_audits', id, a, 'this audit result is not kept in the upgrade report (hitless.v1.Checkpoint/Audit runs it again)');
  }

  audits(id: string): AuditRecord[] {
    return this.rows<AuditRecord>('upgrade_audits', id);
  }

  addSession(id: string, x: SessionRecord): void {
    this.addRow('upgrade_sessions', id, x, 'this session outcome is not kept in the upgrade report (the agent log has it)');
  }

  sessions(id: string): SessionRecord[] {
    return this.rows<SessionRecord>('upgrade_sessions', id);
  }

  /** Appends one record (JSON) to a per-upgrade table (upgrade_audits, upgrade_sessions). */
  private addRow(table: string, id: string, x: { at: number }, then: string): void {
    storeWrite(this.db, then, () => this.db.prepare(`INSERT INTO ${table} (id, at, data) VALUES (?, ?, ?)`).run(id, x.at, JSON.stringify(x)));
  }

  /** One upgrade's records of a per-upgrade table, oldest first. */
  private rows<T>(table: string, id: string): T[] {
    return (this.db.prepare(`SELECT data FROM ${table} WHERE id = ? ORDER BY at, rowid`).all(id) as { data: string }[]).map((r) => JSON.parse(r.data) as T);
  }
}
