/**
 * Compaction of the store: a table's batch log, which standbys and restarts replay, is trimmed
 * into a snapshot once it outgrew the table. Every write of it runs on the store's writer thread
 * (in order with the batches), a chunk at a time, so the agent's event loop only cuts the frames;
 * what the new snapshot replaced is then removed a few rows per transaction.
 */
import { HitlessError } from '../common/errors';
import { WRITER_STOPPED } from '../store/batch-log-writer';
import { STORE_CHUNK_BYTES } from './checkpoint-options';
import { CheckpointState } from './process-group';
import { snapshotFrames } from './record-table';
import { TableReplica } from './table-replica';

/**
 * Rows of replaced snapshots and batches removed per transaction: 256 KiB snapshot chunks and
 * batches of up to a few hundred KiB, so one frees about 1 MiB and batches queued behind it wait
 * a few ms at most.
 */
const DROP_ROWS_PER_CALL = 4;

export class Compactor {
  private readonly compacting = new Set<string>();

  constructor(private readonly st: Pick<CheckpointState, 'store' | 'log' | 'opts' | 'groups'>) {}

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
        // Cut short by the agent stopping: the unfinished generation is never current, and the
        // next start drops it.
        if ((e as { code?: unknown }).code === WRITER_STOPPED) {
          this.st.log.info({ process, table: r.name }, 'store compaction stopped with the agent; the log keeps everything');
          return;
        }
        // A HitlessError (a full disk) explains itself and what to do; anything else is a bug.
        this.st.log[e instanceof HitlessError ? 'warn' : 'error'](
          { process, table: r.name, err: (e as Error).message },
          'store compaction failed; the log keeps everything',
        );
      })
      .finally(() => this.compacting.delete(key));
  }

  async compact(process: string, r: TableReplica): Promise<void> {
    // Paused while the process's role changes: a switchover's freeze waits for the batches ahead
    // of it, which must not queue behind this table's chunks and the WAL restarts they bring (on
    // a 5M-record table, switchovers during its compaction froze writers for 23-45 ms, 2.3 ms
    // without one).
    const quiet = () => this.st.groups.get(process)?.whenQuiet();
    await quiet();
    const gen = await this.st.store.beginSnapshot(process, r.name);
    const snap = r.snapshot(); // taken once its generation exists: nothing to release if that failed
    let committed = false;
    try {
      let chunk = 0;
      // The arenas' bytes as they are (the snapshot pins them until release), one chunk per
      // request: batches queued on the writer thread meanwhile wait for one chunk at most.
      for (const f of snapshotFrames(snap, STORE_CHUNK_BYTES)) {
        await quiet();
        await this.st.store.writeSnapshotChunk(process, r.name, gen, chunk++, f.records);
      }
      await quiet();
      await this.st.store.commitSnapshot(process, r.name, gen, snap.seq);
      committed = true;
      let dropped = 0;
      for (;;) {
        await quiet();
        const n = await this.st.store.dropReplaced(process, r.name, DROP_ROWS_PER_CALL);
        if (n === 0) break;
        dropped += n;
      }
      this.st.log.info({ process, table: r.name, seq: snap.seq, records: snap.liveRecords, chunks: chunk, dropped }, 'table log compacted into a snapshot');
    } catch (e) {
      // Once committed, the new generation is the table's snapshot: a removal that failed leaves
      // garbage that the next compaction removes, and nothing of the new generation may go.
      if (committed) throw e;
      // The log and the current snapshot are untouched until commitSnapshot's transaction; the
      // new generation's chunks are never current, and when even their deletion finds no room
      // (a full disk) they are dropped by the next start or the next compaction's commit.
      try {
        await this.st.store.abortSnapshot(process, r.name, gen);
      } catch (ae) {
        this.st.log.warn(
          { process, table: r.name, gen, err: (ae as Error).message },
          'could not drop the chunks of an unfinished snapshot; they are dropped later',
        );
      }
      throw e;
    } finally {
      snap.release(); // every chunk is in the database, or the snapshot was abandoned
    }
  }
}
