/**
 * One WAL checkpoint, started only when the filesystem has room to finish it.
 *
 * Why: a checkpoint copies WAL frames into the database file, which grows by every page the WAL
 * added. On a nearly full disk such a checkpoint writes page after page until ENOSPC and then
 * fails: the WAL is not reset (nothing counts as copied), yet the pages it did write keep the
 * space. That space is exactly what the agent needs to append acknowledged batches to the WAL,
 * so an operator who frees a little room would see it eaten by a checkpoint that could never
 * finish and the writes refused again. A checkpoint therefore starts only when it can finish and
 * still leave WRITE_RESERVE_BYTES for the writes that run meanwhile.
 */
import type Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { freeBytes } from '../common/disk-space';

/**
 * Room (bytes) a checkpoint leaves for the agent's own WAL appends while it copies. A few
 * seconds of a busy writer (batches of tens of KB at thousands per second would be more, but such
 * a writer fills any small remainder anyway; this keeps the last megabytes for acknowledgements).
 */
export const WRITE_RESERVE_BYTES = 4 * 1024 * 1024;

export type CheckpointOutcome =
  /** Ran; `complete` when every frame of the WAL is now in the database (the next write may start the WAL over). */
  | { ran: true; complete: boolean }
  /** Skipped: the database must grow by `growBytes`, but only `freeBytes` are free. */
  | { ran: false; growBytes: number; freeBytes: number };

/**
 * Runs a PASSIVE checkpoint on `db` (a connection of its own to `file`) when the room allows.
 * The growth is the database size the newest WAL commit describes minus the file's size now; a
 * checkpoint that only rewrites pages inside the file needs no room and always runs.
 */
export function checkpointIfRoom(db: Database.Database, file: string): CheckpointOutcome {
  const pageSize = db.pragma('page_size', { simple: true }) as number;
  const pages = db.pragma('page_count', { simple: true }) as number;
  const growBytes = Math.max(0, pages * pageSize - fs.statSync(file).size);
  if (growBytes > 0) {
    const free = freeBytes(path.dirname(file));
    if (free < growBytes + WRITE_RESERVE_BYTES) return { ran: false, growBytes, freeBytes: free };
  }
  const [r] = db.pragma('wal_checkpoint(PASSIVE)') as { busy: number; log: number; checkpointed: number }[];
  return { ran: true, complete: r.busy === 0 && r.checkpointed === r.log };
}
