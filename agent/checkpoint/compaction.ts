/**
 * Compaction of the store: a table's batch log, which standbys and restarts replay, is trimmed
 * into a snapshot once it outgrew the table, a chunk per event-loop turn so that writes and acks
 * go on meanwhile; what the new snapshot replaced is then removed the same way.
 */
import { HitlessError } from '../common/errors';
import { STORE_CHUNK_BYTES } from './checkpoint-options';
import { CheckpointState } from './process-group';
import { snapshotFrames } from './record-table';
import { TableReplica } from './table-replica';

/**
 * Rows of replaced snapshots and batches removed per event-loop turn: 256 KiB snapshot chunks and
 * batches of up to a few hundred KiB, so a turn frees about 1 MiB.
 */
const DROP_ROWS_PER_TURN = 4;

export class Compactor {
  private readonly compacting = new Set<string>();

  constructor(private readonly st: Pick<CheckpointState, 'store' | 'log' | 'opts'>) {}

  /**
   * Trims the store's batch log once it outgrew max(compactMinBytes, 2 x the table): writes the
   * replica's current log (compacted in memory as needed) as a new snapshot generation, makes it
   * current in one small transaction, then drops what it replaced a few rows at a time.
   */
  maybeCompact(process: string, r: TableReplica): void {
    const key = `${process}\u0000${r.name}`;
    if (this.compacting.has(key) || r.seq % 64 !== 0) return; // measuring the log costs a query
    const logBytes = this.st.store.logBytesSinceSnapshot(process, r.name);
    if (logBytes < Math.max(this.st.opts.compactMinBytes, 2 * r.bytes)) return;
    this.compacting.add(key);
    void this.compact(process, r)
      .catch((e) => {
        // A HitlessError (a full disk) explains itself and what to do; anything else is a bug.
        this.st.log[e instanceof HitlessError ? 'warn' : 'error'](
          { process, table: r.name, err: (e as Error).message },
          'store compaction failed; the log keeps everything',
        );
      })
      .finally(() => this.compacting.delete(key));
  }

  async compact(process: string, r: TableReplica): Promise<void> {
    const snap = r.snapshot();
    const gen = this.st.store.beginSnapshot(process, r.name);
    try {
      let chunk = 0;
      // One chunk per event-loop turn: writes and acks go on in between.
      for (const f of snapshotFrames(snap, STORE_CHUNK_BYTES)) {
        this.st.store.writeSnapshotChunk(process, r.name, gen, chunk++, f.records);
        await new Promise((res) => setImmediate(res));
      }
      this.st.store.commitSnapshot(process, r.name, gen, snap.seq);
      // What it replaced goes a few rows per event-loop turn (each row up to a chunk or a batch).
      let dropped = 0;
      for (let n; (n = this.st.store.dropReplaced(process, r.name, DROP_ROWS_PER_TURN)) > 0;) {
        dropped += n;
        await new Promise((res) => setImmediate(res));
      }
      this.st.log.info({ process, table: r.name, seq: snap.seq, records: snap.liveRecords, chunks: chunk, dropped }, 'table log compacted into a snapshot');
    } catch (e) {
      // The log and the current snapshot are untouched until commitSnapshot's transaction; the
      // new generation's chunks are never current, and when even their deletion finds no room
      // (a full disk) they are dropped by the next start or the next compaction's commit.
      try {
        this.st.store.abortSnapshot(process, r.name, gen);
      } catch (ae) {
        this.st.log.warn(
          { process, table: r.name, gen, err: (ae as Error).message },
          'could not drop the chunks of an unfinished snapshot; they are dropped later',
        );
      }
      throw e;
    } finally {
      snap.release(); // SQLite copied every chunk it was given
    }
  }
}
