/**
 * The upgrade journal in the agent's embedded database.
 *
 * `upgrades` holds one row per upgrade with its current phase; `upgrade_journal` every phase
 * transition in order. A transition is written (in one transaction with the row) before the
 * action it announces starts, so a restarted agent knows exactly what may have been under way.
 */
import { Db, storeWrite } from '../store/database';

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
  freezeMs: number;
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

  /** A refusal (full disk) leaves the phase as it was: the action it announces must not start. */
  transition(id: string, phase: Phase, note: string, fields: Partial<UpgradeRecord> = {}): UpgradeRecord {
    const then = () => `run the command again; upgrade ${id} stays in its phase (not ${phase})`;
    return storeWrite(this.db, then, () =>
      this.db.transaction(() => {
        const cur = this.decode(this.db.prepare('SELECT id, phase, data FROM upgrades WHERE id = ?').get(id) as Row | undefined);
        if (!cur) throw new Error(`upgrade ${id} is not in the journal`);
        const next: UpgradeRecord = { ...cur, ...fields, phase, updatedAt: Date.now() };
        this.db.prepare('UPDATE upgrades SET phase = ?, data = ? WHERE id = ?').run(phase, JSON.stringify(next), id);
        const n = (this.db.prepare('SELECT COALESCE(MAX(n), 0) + 1 AS n FROM upgrade_journal WHERE id = ?').get(id) as { n: number }).n;
        this.db.prepare('INSERT INTO upgrade_journal (id, n, at, phase, note) VALUES (?, ?, ?, ?, ?)').run(id, n, Date.now(), phase, note);
        return next;
      })(),
    );
  }
}
