/**
 * Replication to the standbys: a standby subscribes (a bulk snapshot over the bulk socket when
 * the log no longer reaches back far enough, then the batches as they are applied), acknowledges
 * what it applied, and is READY once it caught up with the active.
 */
import { failedPrecondition, invalidArgument, notFound, outOfRange } from '../common/errors';
import { BulkServer } from './bulk-server';
import { SNAPSHOT_FRAME_BYTES } from './checkpoint-options';
import { AckRequest, SubscribeEvent, SubscribeRequest } from './messages';
import { CheckpointState, PeerSession, ProcessGroup, groupOf, sessionFor } from './process-group';
import { snapshotFrames } from './record-table';
import { SnapshotProgress, SubscriberStream, Subscription, SubscriptionHost } from './subscription';
import { standbyApplied } from './sync-acks';

export class Replication {
  constructor(
    private readonly st: CheckpointState,
    private readonly bulk: BulkServer,
  ) {}

  subscribe(req: SubscribeRequest, stream: SubscriberStream, peerVm: string | null): Subscription {
    const s = sessionFor(this.st, req.sessionId, peerVm);
    const mode = req.mode === 'RECOVER' ? 'RECOVER' : 'FOLLOW';
    if (mode === 'FOLLOW' && s.role !== 'STANDBY') {
      throw failedPrecondition(`'${s.reg.instanceId}' is ${s.role}; only standbys follow changes (an active recovers with mode RECOVER)`);
    }
    for (const [t, seq] of Object.entries(req.have)) {
      if (!Number.isSafeInteger(seq) || seq < 0) throw invalidArgument(`have[${t}] = ${seq} is not a valid sequence`);
    }
    const g = groupOf(this.st, s.reg.process);
    s.subscription?.cancelled();
    s.inSync = false;
    for (const [t, seq] of Object.entries(req.have)) s.acked.set(t, seq);
    const host: SubscriptionHost = {
      stallTimeoutMs: this.st.opts.stallTimeoutMs,
      windowBytes: this.st.opts.subscriberWindowBytes,
      tableSeq: (t) => g.tables.get(t)?.replica.seq ?? 0,
      readLog: (t, after, limit) => {
        const seq = g.tables.get(t)?.replica.seq ?? 0;
        if (after === seq) return [];
        if (after < this.st.store.logFloor(g.name, t)) return null;
        return limit > 0 ? this.st.store.readBatches(g.name, t, after, limit) : [];
      },
      startSnapshot: (t, onDone) => this.startSnapshot(g, t, onDone),
    };
    const sub = new Subscription(s.id, mode, host, stream, (closed) => {
      if (s.subscription === closed) s.subscription = null;
    });
    s.subscription = sub;
    sub.start([...g.tables.keys()], req.have);
    this.checkReady(g, s);
    return sub;
  }

  private startSnapshot(
    g: ProcessGroup,
    table: string,
    onDone: (err: Error | null) => void,
  ): { event: SubscribeEvent; seq: number; empty: boolean; progress?: SnapshotProgress } {
    const replica = g.tables.get(table)!.replica;
    if (replica.records === 0) {
      return { event: { reset: { table, seq: replica.seq } }, seq: replica.seq, empty: true };
    }
    const snap = replica.snapshot();
    const progress: SnapshotProgress = { sent: 0, total: snap.records };
    const issued = performance.now();
    const token = this.bulk.issue(
      async (out) => {
        let sent = 0;
        // The log's bytes go out as they are (only record headers are read to cut frames).
        for (const f of snapshotFrames(snap, SNAPSHOT_FRAME_BYTES)) {
          await out.frame(f.records, f.count);
          sent += f.count;
          progress.sent = sent;
        }
        return sent;
      },
      (err) => {
        this.st.observer.bulkSnapshot(g.name, table, (performance.now() - issued) / 1000, snap.records, !err);
        onDone(err);
      },
      () => snap.release(),
    );
    this.st.log.debug({ process: g.name, table, seq: snap.seq, records: snap.records, live: snap.liveRecords }, 'bulk snapshot issued');
    return {
      event: {
        snapshot: {
          table,
          seq: snap.seq,
          records: snap.records,
          unixPath: this.bulk.unixPath,
          tcpAddress: this.bulk.tcpAddress,
          token,
        },
      },
      seq: snap.seq,
      empty: false,
      progress,
    };
  }

  ack(req: AckRequest, peerVm: string | null): void {
    const s = sessionFor(this.st, req.sessionId, peerVm);
    const g = groupOf(this.st, s.reg.process);
    const t = g.tables.get(req.table);
    if (!t) throw notFound(`unknown table '${req.table}' for process '${s.reg.process}'`);
    if (req.seq > t.replica.seq) {
      throw outOfRange(`ack of seq ${req.seq} for table '${req.table}' is beyond the table's sequence ${t.replica.seq}`);
    }
    const prev = s.acked.get(req.table) ?? 0;
    if (req.seq < prev) return; // acks are cumulative; a late one changes nothing
    s.acked.set(req.table, req.seq);
    s.subscription?.onAck(req.table, req.seq);
    standbyApplied(g, req.table, req.seq, s.id);
    this.checkReady(g, s);
    g.wakeProgressWaiters();
  }

  private checkReady(g: ProcessGroup, s: PeerSession): void {
    if (s.role === 'STANDBY' && !s.inSync && s.subscription && g.lagOf(s) === 0) {
      s.inSync = true;
      this.st.log.info({ process: g.name, standby: s.reg.instanceId }, 'standby is READY (applied everything the active wrote)');
    }
  }
}
