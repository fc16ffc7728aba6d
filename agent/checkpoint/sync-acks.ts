/**
 * SYNC durability: a SYNC batch is acknowledged to the active only once every in-sync standby
 * applied it, so a standby holds a change before the active acts on it.
 *
 * Invariants:
 * - Acks leave in sequence order per table: a later batch is never acknowledged before an
 *   earlier one.
 * - A standby that does not apply a batch within syncTimeoutMs leaves the in-sync set (the
 *   writer is not held hostage); it joins again once it caught up (checkReady).
 */
import { WriteAck } from './messages';
import { CheckpointState, PeerSession, ProcessGroup, SyncWait } from './process-group';

/**
 * The ack of SYNC batch `seq` of `table`: at once when no in-sync standby lacks it, else a
 * promise that resolves when they all applied it or left the in-sync set. `acked` runs when the
 * ack is given (metrics).
 */
export function syncAck(st: CheckpointState, g: ProcessGroup, table: string, seq: number, ack: WriteAck, acked: () => void): Promise<WriteAck> | WriteAck {
  const waitFor = new Set(
    g
      .standbys()
      .filter((p) => p.inSync && (p.acked.get(table) ?? 0) < seq)
      .map((p) => p.id),
  );
  if (waitFor.size === 0) {
    acked();
    return ack;
  }
  return new Promise<WriteAck>((resolve) => {
    const list = g.syncWaits.get(table) ?? [];
    g.syncWaits.set(table, list);
    const w: SyncWait = {
      seq,
      waitFor,
      resolve: () => {
        acked();
        resolve(ack);
      },
      timer: setTimeout(() => syncTimeout(st, g, table, w), st.opts.syncTimeoutMs),
    };
    list.push(w);
  });
}

/** Standby `sessionId` applied `table` up to `seq`: the SYNC writes it held back may be acknowledged. */
export function standbyApplied(g: ProcessGroup, table: string, seq: number, sessionId: string): void {
  const list = g.syncWaits.get(table);
  if (!list) return;
  for (const w of list) if (w.seq <= seq) w.waitFor.delete(sessionId);
  releaseSyncWaits(g, table);
}

/** Removes a standby from every SYNC wait (it left, or fell out of sync). */
export function leaveInSync(g: ProcessGroup, s: PeerSession): void {
  s.inSync = false;
  for (const [table, list] of g.syncWaits) {
    for (const w of list) w.waitFor.delete(s.id);
    releaseSyncWaits(g, table);
  }
}

function syncTimeout(st: CheckpointState, g: ProcessGroup, table: string, w: SyncWait): void {
  for (const id of [...w.waitFor]) {
    const s = st.sessions.get(id);
    if (!s) continue;
    st.log.warn(
      { process: g.name, table, seq: w.seq, standby: s.reg.instanceId, timeoutMs: st.opts.syncTimeoutMs },
      'standby did not apply a SYNC batch in time; it leaves the in-sync set until it catches up again',
    );
    leaveInSync(g, s);
  }
}

function releaseSyncWaits(g: ProcessGroup, table: string): void {
  const list = g.syncWaits.get(table);
  if (!list) return;
  // Acks leave in sequence order: a later batch is never acknowledged before an earlier one.
  while (list.length && list[0].waitFor.size === 0) {
    const w = list.shift()!;
    clearTimeout(w.timer);
    w.resolve();
  }
}
