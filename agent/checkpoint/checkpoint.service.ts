/**
 * The checkpoint domain: process sessions and roles, the authoritative table replicas, writes,
 * subscriptions, acknowledgements, readiness and switchover. Transports (gRPC) call this; it
 * reaches the outside only through the CheckpointStore port and the BulkServer.
 *
 * The data path reads top to bottom in this file: register (sessions) -> write (validate, store,
 * apply to the replica, hand to subscribers) -> SYNC acks (sync-acks.ts) -> subscribe and ack
 * (standbys follow, snapshots over the bulk socket) -> status. Its parts live beside it:
 * process-group.ts (the state), schema-agreement.ts (who may register, which schema an active
 * writes), role-changes.ts (switchover, failover, audit), compaction.ts (trimming the store's log).
 *
 * Invariants:
 * - At most one ACTIVE session per process name. Only the agent changes roles (switchover).
 * - A batch is acknowledged only after it is in the store and applied here; SYNC batches also wait
 *   for every in-sync standby. A rejected batch changes nothing.
 * - Per table the sequence grows by exactly one per batch; the log in the store holds every batch
 *   since the last snapshot, so standbys and restarts replay from it.
 */
import crypto from 'node:crypto';
import { Logger } from '../common/logger';
import { alreadyExists, failedPrecondition, invalidArgument, notFound, outOfRange, permissionDenied, unavailable } from '../common/errors';
import { CheckpointStore } from '../store/checkpoint-store';
import { BulkServer } from './bulk-server';
import {
  AckRequest,
  AuditResponse,
  CommandResult,
  Durability,
  ProcessStatus,
  Register,
  Registered,
  SessionNotice,
  SubscribeEvent,
  SubscribeRequest,
  SwitchoverResponse,
  TableKind,
  WriteAck,
  WriteRequest,
} from './messages';
import { CheckpointObserver, NO_CHECKPOINT_OBSERVER } from './checkpoint-observer';
import { CheckpointOptions, DEFAULT_CHECKPOINT_OPTIONS, SNAPSHOT_FRAME_BYTES } from './checkpoint-options';
import { Compactor } from './compaction';
import { CheckpointState, GroupTable, PeerSession, ProcessGroup, SessionChannel, durabilityName, kindName } from './process-group';
import { ForwardingSink, NO_FORWARDING_SINK } from './forwarding-sink';
import { snapshotFrames } from './record-table';
import { RecordFormatError, validateRecords } from './records';
import { RoleChanges, SwitchoverHooks } from './role-changes';
import { agreeWriteSchema, checkReadsTables, pickWriteSchema, validateRegister } from './schema-agreement';
import { SubscriberStream, Subscription, SubscriptionHost, SnapshotProgress } from './subscription';
import { leaveInSync, standbyApplied, syncAck } from './sync-acks';
import { TableReplica } from './table-replica';

export { CheckpointOptions, DEFAULT_CHECKPOINT_OPTIONS } from './checkpoint-options';
export { SessionChannel } from './process-group';

/** A SessionNotice as received: when, and from which process instance in which VM. */
export interface ReportedSession extends SessionNotice {
  at: number;
  process: string;
  instance: string;
  vm: string;
}

export class CheckpointService {
  private readonly groups = new Map<string, ProcessGroup>();
  private readonly sessions = new Map<string, PeerSession>();
  private readonly st: CheckpointState;
  private readonly roles: RoleChanges;
  private readonly compactor: Compactor;
  private readonly noticeListeners: ((r: ReportedSession) => void)[] = [];

  constructor(
    private readonly store: CheckpointStore,
    private readonly bulk: BulkServer,
    private readonly log: Logger,
    readonly opts: CheckpointOptions = DEFAULT_CHECKPOINT_OPTIONS,
  ) {
    this.st = { groups: this.groups, sessions: this.sessions, store, log, opts, observer: NO_CHECKPOINT_OBSERVER, forwarding: NO_FORWARDING_SINK };
    this.roles = new RoleChanges(this.st);
    this.compactor = new Compactor(this.st);
  }

  /** Where durations and counts go (metrics); set once at wiring, no-ops until then. */
  get observer(): CheckpointObserver {
    return this.st.observer;
  }

  set observer(o: CheckpointObserver) {
    this.st.observer = o;
  }

  /** Where FIB tables go (the FIB service); set once at wiring, before recover(). */
  set forwarding(f: ForwardingSink) {
    this.st.forwarding = f;
  }

  /** Rebuilds every table from the store: latest snapshot, then the batches after it. */
  recover(): { tables: number; records: number } {
    let records = 0;
    const tables = this.store.listTables();
    for (const t of tables) {
      const g = this.group(t.process);
      const replica = new TableReplica(t.process, t.name);
      for (const chunk of this.store.snapshotChunks(t.process, t.name)) replica.table.append(chunk);
      replica.seq = t.snapSeq;
      let after = t.snapSeq;
      for (;;) {
        const batches = this.store.readBatches(t.process, t.name, after, 256);
        if (batches.length === 0) break;
        for (const b of batches) {
          if (b.seq !== after + 1) {
            throw new Error(`store is inconsistent: table ${t.process}/${t.name} jumps from ${after} to ${b.seq}`);
          }
          replica.applyBatch(b.seq, b.records, []);
          after = b.seq;
        }
      }
      replica.accepted = replica.seq;
      replica.table.forEach((_k, schema) => replica.schemas.add(schema));
      g.tables.set(t.name, { replica, durability: durabilityName(t.durability), kind: kindName(t.kind) });
      if (t.kind === 1) this.st.forwarding.claim(t.process, t.name, replica);
      records += replica.records;
    }
    return { tables: tables.length, records };
  }

  // ---------------------------------------------------------------- sessions and registration

  /**
   * Registers a process instance. `peerVm` is the VM the connection provably comes from (per-VM
   * socket), or null for host-local connections, which may claim any VM.
   */
  register(reg: Register, channel: SessionChannel, peerVm: string | null): Registered {
    validateRegister(reg);
    if (peerVm !== null && reg.vmId !== peerVm) {
      throw permissionDenied(
        `this connection comes from VM '${peerVm}' but the process claims VM '${reg.vmId}'; a process may only register for the VM it runs in`,
      );
    }
    for (const s of this.sessions.values()) {
      if (s.reg.instanceId === reg.instanceId) {
        throw alreadyExists(
          `instance '${reg.instanceId}' is already registered (session ${s.id}); use a unique instance id, or wait until the old session's stream closes`,
        );
      }
    }
    const g = this.group(reg.process);
    if (reg.wantedRole === 'ACTIVE' && reg.rejoin && g.active) {
      // Two instances may both believe they are active after an agent restart in the middle of a
      // switchover (the old one was frozen, the new one promoted). The first one back keeps the
      // role; the other follows it (see Register.rejoin) and the upgrade's recovery decides.
      this.log.warn(
        { process: reg.process, instance: reg.instanceId, active: g.active.reg.instanceId },
        'a returning instance asked for ACTIVE but another instance holds it; it joins as STANDBY',
      );
      reg.wantedRole = 'STANDBY';
      reg.tables = [];
    }
    const reads = new Set(reg.schemaReads);
    const canWrite = reg.schemaCanWrite.length ? reg.schemaCanWrite : [reg.schemaWrites];
    let writeSchema = 0;

    if (reg.wantedRole === 'ACTIVE') {
      if (g.active) {
        throw failedPrecondition(
          `process '${reg.process}' already has an active instance '${g.active.reg.instanceId}' in VM '${g.active.reg.vmId}'; register as STANDBY, the agent promotes standbys on switchover`,
        );
      }
      checkReadsTables(g, reg, reads);
      writeSchema = pickWriteSchema(this.st, g, reg, canWrite);
    } else {
      const active = g.active;
      if (active && !reads.has(active.writeSchema)) {
        throw failedPrecondition(
          `standby '${reg.instanceId}' (version ${reg.softwareVersion || '?'}) reads schema versions [${[...reads].join(', ')}] but the active '${active.reg.instanceId}' (version ${active.reg.softwareVersion || '?'}) writes schema ${active.writeSchema}; install a version that reads ${active.writeSchema} or register a transform ${active.writeSchema}->${reg.schemaWrites}`,
        );
      }
      checkReadsTables(g, reg, reads);
    }

    const session = new PeerSession(`s-${crypto.randomBytes(6).toString('hex')}`, reg, channel);
    session.writeSchema = writeSchema || reg.schemaWrites;
    if (reg.wantedRole === 'ACTIVE') {
      agreeWriteSchema(this.store, g, writeSchema);
      for (const t of reg.tables) this.declareTable(g, t.name, t.durability, t.kind === 'FIB' ? 'FIB' : 'TABLE_KIND_UNSPECIFIED');
      g.active = session;
    }
    g.sessions.add(session);
    this.sessions.set(session.id, session);
    this.log.info(
      { process: reg.process, instance: reg.instanceId, vm: reg.vmId, role: session.role, session: session.id, version: reg.softwareVersion },
      'process registered',
    );
    return {
      sessionId: session.id,
      role: session.role,
      tableSeqs: g.tableSeqs(),
      activeSchema: g.active ? g.active.writeSchema : 0,
      writeSchema,
    };
  }

  /** The session stream ended: the process is gone (or will reconnect with a new session). */
  unregister(sessionId: string, reason: string): void {
    const s = this.sessions.get(sessionId);
    if (!s) return;
    this.sessions.delete(sessionId);
    const g = this.group(s.reg.process);
    g.sessions.delete(s);
    if (g.active === s) g.active = null;
    s.subscription?.cancelled();
    for (const p of s.pending.values()) {
      clearTimeout(p.timer);
      // A status of its own, not INTERNAL: the caller (an audit, a switchover) learns that the
      // process went away, which is a fact about the process, not a bug here.
      p.reject(unavailable(`process '${s.reg.instanceId}' disconnected (${reason}) before it answered; check the process (issu vm log), then try again`));
    }
    leaveInSync(g, s);
    this.log.info({ process: s.reg.process, instance: s.reg.instanceId, session: sessionId, reason }, 'process session ended');
  }

  /**
   * A process's account of one of its protocol sessions (hitless.v1.SessionNotice): validated,
   * logged, and handed to the listeners (the upgrade service records it in the upgrade).
   */
  sessionNotice(sessionId: string, n: SessionNotice): void {
    const s = this.sessions.get(sessionId);
    if (!s) return;
    if (!n.session || Buffer.byteLength(n.session) > 200)
      throw invalidArgument('SessionNotice.session must name the session in 1 to 200 bytes, e.g. "bgp 198.51.100.2"');
    if (Buffer.byteLength(n.detail ?? '') > 1000) throw invalidArgument('SessionNotice.detail is over 1,000 bytes; shorten it');
    if (!['NONSTOP', 'GRACEFUL_RESTART', 'RESET'].includes(n.outcome)) {
      throw invalidArgument(`SessionNotice.outcome must be NONSTOP, GRACEFUL_RESTART or RESET, not ${n.outcome}`);
    }
    const r: ReportedSession = { ...n, detail: n.detail ?? '', at: Date.now(), process: s.reg.process, instance: s.reg.instanceId, vm: s.reg.vmId };
    this.log[n.outcome === 'NONSTOP' ? 'info' : 'warn'](
      { process: r.process, instance: r.instance, vm: r.vm, session: r.session, outcome: r.outcome, durationMs: r.durationMs, detail: r.detail },
      'a protocol session changed hands',
    );
    for (const l of this.noticeListeners) l(r);
  }

  /** Registers a listener for every SessionNotice (see sessionNotice). */
  onSessionNotice(l: (r: ReportedSession) => void): void {
    this.noticeListeners.push(l);
  }

  commandResult(sessionId: string, r: CommandResult): void {
    const s = this.sessions.get(sessionId);
    const p = s?.pending.get(r.commandId);
    if (!s || !p) return;
    s.pending.delete(r.commandId);
    clearTimeout(p.timer);
    p.resolve(r);
  }

  // ---------------------------------------------------------------- writes

  /**
   * Stored first: a table the store refused (full disk) must not take batches, or they would be
   * acknowledged and then missing after a restart. An unchanged declaration writes nothing, so
   * a re-registering active is not refused for want of space it does not need.
   */
  private declareTable(g: ProcessGroup, name: string, durability: Durability, kind: TableKind): void {
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
    this.store.upsertTable(g.name, name, d === 'SYNC' ? 2 : 1, kind === 'FIB' ? 1 : 0);
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
    const s = this.sessions.get(req.sessionId);
    if (!s) throw failedPrecondition(`unknown session '${req.sessionId}': register on the Session stream first and use the session_id it returns`);
    if (peerVm !== null && s.reg.vmId !== peerVm)
      throw permissionDenied(`session '${req.sessionId}' belongs to VM '${s.reg.vmId}', not to this connection's VM '${peerVm}'`);
    const g = this.group(s.reg.process);
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
    // Against the last batch handed to the store, not the last applied: a pipelining writer's
    // next batches arrive while earlier ones are still being stored.
    if (req.seq <= r.accepted) {
      throw alreadyExists(`batch seq ${req.seq} of table '${req.table}' is already applied (table is at ${r.accepted}); nothing changed`);
    }
    if (req.seq !== r.accepted + 1) {
      throw outOfRange(`batch seq ${req.seq} of table '${req.table}' leaves a gap: the table is at ${r.accepted}, the next batch must be ${r.accepted + 1}`);
    }
    if (req.records.length > this.opts.maxBatchBytes) {
      throw invalidArgument(`batch of ${req.records.length} bytes exceeds the limit of ${this.opts.maxBatchBytes}; split it`);
    }
    let summary;
    try {
      summary = validateRecords(req.records, req.count, this.opts.limits);
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
    return this.store.appendBatch(g.name, req.table, req.seq, req.records, req.count).then(
      () => this.applyStored(g, t, req, schemas, received),
      (e: unknown) => {
        // Refused (a full disk): this batch and the later ones handed over are not stored, and
        // the writer sends them again from here.
        if (r.accepted >= req.seq) r.accepted = req.seq - 1;
        throw e;
      },
    );
  }

  /**
   * A stored batch becomes visible: applied to the replica (and the data plane), handed to the
   * subscribers, then acknowledged (a SYNC one once the in-sync standbys applied it). Runs even
   * when the writer's session ended meanwhile: the store holds the batch, so the replica must too.
   */
  private applyStored(g: ProcessGroup, t: GroupTable, req: WriteRequest, schemas: Iterable<number>, received: number): Promise<WriteAck> | WriteAck {
    const r = t.replica;
    r.applyBatch(req.seq, req.records, schemas);
    if (t.kind === 'FIB') this.st.forwarding.applied(req.seq, req.records);
    for (const peer of g.sessions) peer.subscription?.onBatch(req.table, req.seq, req.records, req.count);
    this.compactor.maybeCompact(g.name, r);
    g.wakeProgressWaiters();
    this.observer.recordsWritten(g.name, req.table, req.count);
    const ack: WriteAck = { table: req.table, seq: req.seq };
    if (t.durability !== 'SYNC') return ack;
    const acked = () => this.observer.syncAck(g.name, req.table, (performance.now() - received) / 1000);
    return syncAck(this.st, g, req.table, req.seq, ack, acked);
  }

  // ---------------------------------------------------------------- subscriptions and acks

  subscribe(req: SubscribeRequest, stream: SubscriberStream, peerVm: string | null): Subscription {
    const s = this.sessions.get(req.sessionId);
    if (!s) throw failedPrecondition(`unknown session '${req.sessionId}': register on the Session stream first`);
    if (peerVm !== null && s.reg.vmId !== peerVm) throw permissionDenied(`session '${req.sessionId}' belongs to VM '${s.reg.vmId}'`);
    const mode = req.mode === 'RECOVER' ? 'RECOVER' : 'FOLLOW';
    if (mode === 'FOLLOW' && s.role !== 'STANDBY') {
      throw failedPrecondition(`'${s.reg.instanceId}' is ${s.role}; only standbys follow changes (an active recovers with mode RECOVER)`);
    }
    for (const [t, seq] of Object.entries(req.have)) {
      if (!Number.isSafeInteger(seq) || seq < 0) throw invalidArgument(`have[${t}] = ${seq} is not a valid sequence`);
    }
    const g = this.group(s.reg.process);
    s.subscription?.cancelled();
    s.inSync = false;
    for (const [t, seq] of Object.entries(req.have)) s.acked.set(t, seq);
    const host: SubscriptionHost = {
      stallTimeoutMs: this.opts.stallTimeoutMs,
      windowBytes: this.opts.subscriberWindowBytes,
      tableSeq: (t) => g.tables.get(t)?.replica.seq ?? 0,
      readLog: (t, after, limit) => {
        const seq = g.tables.get(t)?.replica.seq ?? 0;
        if (after === seq) return [];
        if (after < this.store.logFloor(g.name, t)) return null;
        return limit > 0 ? this.store.readBatches(g.name, t, after, limit) : [];
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
        this.observer.bulkSnapshot(g.name, table, (performance.now() - issued) / 1000, snap.records, !err);
        onDone(err);
      },
      () => snap.release(),
    );
    this.log.debug({ process: g.name, table, seq: snap.seq, records: snap.records, live: snap.liveRecords }, 'bulk snapshot issued');
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
    const s = this.sessions.get(req.sessionId);
    if (!s) throw failedPrecondition(`unknown session '${req.sessionId}'`);
    if (peerVm !== null && s.reg.vmId !== peerVm) throw permissionDenied(`session '${req.sessionId}' belongs to VM '${s.reg.vmId}'`);
    const g = this.group(s.reg.process);
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
      this.log.info({ process: g.name, standby: s.reg.instanceId }, 'standby is READY (applied everything the active wrote)');
    }
  }

  // ---------------------------------------------------------------- status

  status(process: string): ProcessStatus[] {
    const names = process ? [process] : [...this.groups.keys()].sort();
    if (process && !this.groups.has(process)) throw notFound(`no process '${process}' is known to the agent`);
    return names.map((name) => {
      const g = this.groups.get(name)!;
      return {
        process: name,
        tables: [...g.tables].map(([tn, t]) => ({
          name: tn,
          seq: t.replica.seq,
          records: t.replica.records,
          bytes: t.replica.bytes,
          durability: t.durability,
          schemas: [...t.replica.schemas].sort((a, b) => a - b),
          kind: t.kind,
        })),
        peers: [...g.sessions].map((s) => ({
          sessionId: s.id,
          instanceId: s.reg.instanceId,
          vmId: s.reg.vmId,
          softwareVersion: s.reg.softwareVersion,
          schemaWrites: s.writeSchema,
          schemaReads: s.reg.schemaReads,
          role: s.role,
          frozen: s.frozenAt !== null,
          // READY: caught up with the active once and following since; `lag` says how far
          // behind it is at this instant (a few batches while the active writes).
          ready: s.role === 'ACTIVE' || s.inSync,
          acked: Object.fromEntries(s.acked),
          lag: s.role === 'ACTIVE' ? 0 : g.lagOf(s),
          ...snapshotFields(s.subscription?.snapshotProgress()),
        })),
      };
    });
  }

  // ---------------------------------------------------------------- role changes (role-changes.ts)

  switchover(process: string, toInstance: string, hooks?: SwitchoverHooks): Promise<SwitchoverResponse> {
    return this.roles.switchover(process, toInstance, hooks);
  }

  failover(process: string, toInstance: string): Promise<SwitchoverResponse> {
    return this.roles.failover(process, toInstance);
  }

  audit(process: string): Promise<AuditResponse> {
    return this.roles.audit(process);
  }

  raiseWriteSchema(process: string, leavingVm: string): Promise<number> {
    return this.roles.raiseWriteSchema(process, leavingVm);
  }

  /** Trims the store's log of `r` into a snapshot now (compaction.ts). */
  compact(process: string, r: TableReplica): Promise<void> {
    return this.compactor.compact(process, r);
  }

  // ---------------------------------------------------------------- helpers

  private group(name: string): ProcessGroup {
    let g = this.groups.get(name);
    if (!g) {
      g = new ProcessGroup(name);
      this.groups.set(name, g);
    }
    return g;
  }

  /** Ends every session (agent shutdown). */
  closeAll(): void {
    for (const s of [...this.sessions.values()]) {
      s.subscription?.end();
      s.channel.close();
      this.unregister(s.id, 'agent shutting down');
    }
  }
}

/** A standby's bulk snapshot progress as PeerStatus fields (0 of 0 when none is streaming). */
function snapshotFields(p: SnapshotProgress | undefined): { snapshotRecordsSent: number; snapshotRecordsTotal: number } {
  return { snapshotRecordsSent: p?.sent ?? 0, snapshotRecordsTotal: p?.total ?? 0 };
}
