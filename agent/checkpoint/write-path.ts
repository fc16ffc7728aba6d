/**
 * The write path: a batch from the active is validated, handed to the store, and once the store
 * committed it, applied to the agent's replica (and the data plane), handed to the subscribers,
 * and acknowledged (a SYNC batch once the in-sync standbys applied it, sync-acks.ts).
 *
 * Invariants:
 * - A batch is acknowledged only after it is in the store and applied here. A rejected batch
 *   changes nothing.
 * - Per table the sequence grows by exactly one per batch; batches are applied in that order.
 */
import { alreadyExists, failedPrecondition, invalidArgument, notFound, outOfRange } from '../common/errors';
import { Compactor } from './compaction';
import { Durability, TableKind, WriteAck, WriteRequest } from './messages';
import { CheckpointState, GroupTable, ProcessGroup, groupOf, sessionFor } from './process-group';
import { RecordFormatError, validateRecords } from './records';
import { syncAck } from './sync-acks';
import { TableReplica } from './table-replica';

export class WritePath {
  constructor(
    private readonly st: CheckpointState,
    private readonly compactor: Compactor,
  ) {}

  /**
   * Stored first: a table the store refused (full disk) must not take batches, or they would be
   * acknowledged and then missing after a restart. An unchanged declaration writes nothing, so
   * a re-registering active is not refused for want of space it does not need.
   */
  declareTable(g: ProcessGroup, name: string, durability: Durability, kind: TableKind): void {
    const d: Durability = durability === 'SYNC' ? 'SYNC' : 'ASYNC';
    const t = g.tables.get(name);
    if (t?.durability === d && t.kind === kind) return;
    if (t && t.kind !== kind && t.replica.seq > 0) {
      throw failedPrecondition(
        `table '${name}' of process '${g.name}' holds ${t.kind === 'FIB' ? 'FIB entries' : 'opaque records'} (seq ${t.replica.seq}); it cannot become ${kind === 'FIB' ? 'a FIB table' : 'an opaque table'}: declare a table under another name`,
      );
    }
    const replica = t?.replica ?? new TableReplica(g.name, name);
    // The data plane first: a second FIB table is refused before anything is stored.
    if (kind === 'FIB') this.st.forwarding.claim(g.name, name, replica);
    this.st.store.upsertTable(g.name, name, d === 'SYNC' ? 2 : 1, kind === 'FIB' ? 1 : 0);
    if (t) {
      t.durability = d;
      t.kind = kind;
    } else {
      g.tables.set(name, { replica, durability: d, kind });
      for (const s of g.sessions) s.subscription?.addTable(name);
    }
  }

  /**
   * Validates, stores and applies one batch. Resolves with the ack when the batch's durability is
   * met; rejects when the store refused it (nothing of it applied). Throws (synchronously, before
   * changing anything) on bad input.
   */
  write(req: WriteRequest, peerVm: string | null): Promise<WriteAck> {
    const received = performance.now();
    const s = sessionFor(this.st, req.sessionId, peerVm);
    const g = groupOf(this.st, s.reg.process);
    if (s.role !== 'ACTIVE' || g.active !== s) {
      throw failedPrecondition(`'${s.reg.instanceId}' is ${s.role} for process '${s.reg.process}'; only the active instance writes`);
    }
    const t = g.tables.get(req.table);
    if (s.frozenAt && req.seq > (s.frozenAt[req.table] ?? 0)) {
      throw failedPrecondition(`'${s.reg.instanceId}' is frozen for a switchover; writes resume after UNFREEZE or go to the new active`);
    }
    if (!t) {
      throw notFound(
        `unknown table '${req.table}' for process '${s.reg.process}'; declare it in Register.tables (known: ${[...g.tables.keys()].join(', ') || 'none'})`,
      );
    }
    const r = t.replica;
    // Sent again while the first copy is still being stored (the writer lost its connection and
    // registered again meanwhile, told the applied sequence): acknowledged with the first copy.
    const first = r.inFlight.get(req.seq);
    if (first) {
      if (!first.records.equals(req.records)) {
        throw alreadyExists(`batch seq ${req.seq} of table '${req.table}' is being stored with other contents; nothing changed`);
      }
      return first.applied.then(() => this.ackOf(g, t, req, received));
    }
    // Against the last batch handed to the store, not the last applied: a pipelining writer's
    // next batches arrive while earlier ones are still being stored.
    if (req.seq <= r.accepted) {
      throw alreadyExists(`batch seq ${req.seq} of table '${req.table}' is already applied (table is at ${r.accepted}); nothing changed`);
    }
    if (req.seq !== r.accepted + 1) {
      throw outOfRange(`batch seq ${req.seq} of table '${req.table}' leaves a gap: the table is at ${r.accepted}, the next batch must be ${r.accepted + 1}`);
    }
    if (req.records.length > this.st.opts.maxBatchBytes) {
      throw invalidArgument(`batch of ${req.records.length} bytes exceeds the limit of ${this.st.opts.maxBatchBytes}; split it`);
    }
    let summary;
    try {
      summary = validateRecords(req.records, req.count, this.st.opts.limits);
    } catch (e) {
      if (e instanceof RecordFormatError) throw invalidArgument(`table '${req.table}' batch ${req.seq}: ${e.message}; nothing was applied`);
      throw e;
    }
    for (const sc of summary.schemas) {
      if (sc !== s.writeSchema && !s.reg.schemaCanWrite.includes(sc) && sc !== s.reg.schemaWrites) {
        throw invalidArgument(
          `table '${req.table}' batch ${req.seq} holds values of schema ${sc}, but '${s.reg.instanceId}' registered to write schema ${s.writeSchema}`,
        );
      }
    }
    // A FIB batch must also hold only entries the data plane can take (INVALID_ARGUMENT otherwise).
    if (t.kind === 'FIB') this.st.forwarding.validate(req.table, req.seq, req.records);
    // Durable first, then visible: an ack must never cover a batch the store does not hold. The
    // store answers in the order batches were handed over, so they are applied in sequence.
    r.accepted = req.seq;
    const schemas = summary.schemas;
    // Who wrote the table's last batch goes into the store with the first batch of a new writer.
    const writer = s.reg.instanceId;
    const newWriter = r.handedWriter !== writer ? writer : undefined;
    r.handedWriter = writer;
    const applied = this.st.store.appendBatch(g.name, req.table, req.seq, req.records, req.count, newWriter).then(
      () => {
        r.inFlight.delete(req.seq);
        r.lastWriter = writer;
        this.applyStored(g, t, req, schemas);
      },
      (e: unknown) => {
        // Refused (a full disk): this batch and the later ones handed over are not stored, and
        // the writer sends them again from here. (Batches before it were answered first.)
        r.inFlight.delete(req.seq);
        if (r.accepted >= req.seq) r.accepted = req.seq - 1;
        r.handedWriter = r.lastWriter;
        throw e;
      },
    );
    applied.catch(() => undefined); // handled by whoever awaits it; settled() must not see it unhandled
    r.inFlight.set(req.seq, { records: req.records, applied });
    return applied.then(() => this.ackOf(g, t, req, received));
  }

  /**
   * A stored batch becomes visible: applied to the replica (and the data plane) and handed to the
   * subscribers. Runs even when the writer's session ended meanwhile: the store holds the batch,
   * so the replica must too.
   */
  private applyStored(g: ProcessGroup, t: GroupTable, req: WriteRequest, schemas: Iterable<number>): void {
    const r = t.replica;
    r.applyBatch(req.seq, req.records, schemas);
    if (t.kind === 'FIB') this.st.forwarding.applied(req.seq, req.records);
    for (const peer of g.sessions) peer.subscription?.onBatch(req.table, req.seq, req.records, req.count);
    this.compactor.maybeCompact(g.name, r);
    g.wakeProgressWaiters();
    this.st.observer.recordsWritten(g.name, req.table, req.count);
  }

  /** The ack of an applied batch: at once, or for a SYNC table once the in-sync standbys applied it. */
  private ackOf(g: ProcessGroup, t: GroupTable, req: WriteRequest, received: number): Promise<WriteAck> | WriteAck {
    const ack: WriteAck = { table: req.table, seq: req.seq };
    if (t.durability !== 'SYNC') return ack;
    const acked = () => this.st.observer.syncAck(g.name, req.table, (performance.now() - received) / 1000);
    return syncAck(this.st, g, req.table, req.seq, ack, acked);
  }
}
