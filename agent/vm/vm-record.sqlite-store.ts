/**
 * VmRecordStore over better-sqlite3. Owns the table `vm_records` (created if missing) in the
 * Database it is given; spec and paths are JSON text columns (read whole, never queried into).
 */
import type Database from 'better-sqlite3';
import { storeWrite } from '../store/database';
import type { Accelerator, Arch, VmPaths, VmSpec, VmState } from './hypervisor';
import type { VmRecord, VmRecordStore } from './vm-record-store';

interface Row {
  name: string;
  arch: string;
  spec_json: string;
  pid: number | null;
  paths_json: string;
  state: string;
  accelerator: string | null;
  created_at: number;
  updated_at: number;
  last_exit: string | null;
}

export class SqliteVmRecordStore implements VmRecordStore {
  private readonly upsert: Database.Statement;
  private readonly selectOne: Database.Statement;
  private readonly selectAll: Database.Statement;
  private readonly remove: Database.Statement;

  constructor(private readonly db: Database.Database) {
    db.exec(`CREATE TABLE IF NOT EXISTS vm_records (
      name        TEXT PRIMARY KEY,
      arch        TEXT NOT NULL,
      spec_json   TEXT NOT NULL,
      pid         INTEGER,
      paths_json  TEXT NOT NULL,
      state       TEXT NOT NULL,
      accelerator TEXT,
      created_at  INTEGER NOT NULL,
      updated_at  INTEGER NOT NULL,
      last_exit   TEXT
    )`);
    this.upsert = db.prepare(`INSERT INTO vm_records (name, arch, spec_json, pid, paths_json, state, accelerator, created_at, updated_at, last_exit)
      VALUES (@name, @arch, @spec_json, @pid, @paths_json, @state, @accelerator, @created_at, @updated_at, @last_exit)
      ON CONFLICT(name) DO UPDATE SET arch=excluded.arch, spec_json=excluded.spec_json, pid=excluded.pid,
        paths_json=excluded.paths_json, state=excluded.state, accelerator=excluded.accelerator,
        created_at=excluded.created_at, updated_at=excluded.updated_at, last_exit=excluded.last_exit`);
    this.selectOne = db.prepare('SELECT * FROM vm_records WHERE name = ?');
    this.selectAll = db.prepare('SELECT * FROM vm_records ORDER BY name');
    this.remove = db.prepare('DELETE FROM vm_records WHERE name = ?');
  }

  put(r: VmRecord): void {
    const row: Row = {
      name: r.name,
      arch: r.arch,
      spec_json: JSON.stringify(r.spec),
      pid: r.pid,
      paths_json: JSON.stringify(r.paths),
      state: r.state,
      accelerator: r.accelerator,
      created_at: r.createdAt,
      updated_at: r.updatedAt,
      last_exit: r.lastExit,
    };
    storeWrite(
      this.db,
      () => `retry; the record of VM ${r.name} was not updated (state ${r.state} not stored)`,
      () => this.upsert.run(row),
    );
  }

  get(name: string): VmRecord | undefined {
    const row = this.selectOne.get(name) as Row | undefined;
    return row ? fromRow(row) : undefined;
  }

  list(): VmRecord[] {
    return (this.selectAll.all() as Row[]).map(fromRow);
  }

  delete(name: string): boolean {
    return storeWrite(
      this.db,
      () => `retry; the record of VM ${name} was not removed`,
      () => this.remove.run(name).changes > 0,
    );
  }
}

function fromRow(row: Row): VmRecord {
  return {
    name: row.name,
    arch: row.arch as Arch,
    spec: JSON.parse(row.spec_json) as VmSpec,
    pid: row.pid,
    paths: JSON.parse(row.paths_json) as VmPaths,
    state: row.state as VmState,
    accelerator: row.accelerator as Accelerator | null,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
    lastExit: row.last_exit,
  };
}
