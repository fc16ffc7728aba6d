/**
 * The checkpoint domain: process sessions and roles, the authoritative table replicas, writes,
 * subscriptions, acknowledgements, readiness and switchover. Transports (gRPC) call this; it
 * reaches the outside only through the CheckpointStore port and the BulkServer.
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
import {
  HitlessError,
  alreadyExists,
  deadlineExceeded,
  failedPrecondition,
  invalidArgument,
  notFound,
  outOfRange,
  permissionDenied,
  unavailable,
} from '../common/errors';
import { CheckpointStore } from '../store/checkpoint-store';
import { BulkServer } from './bulk-server';
import {
  AckRequest,
  CommandKind,
  CommandResult,
  Durability,
  ProcessStatus,
  Register,
  Registered,
  Role,
  RoleCommand,
  SubscribeEvent,
  SubscribeRequest,
  SwitchoverResponse,
  AuditResponse,
  PeerDigests,
  TableDigest,
  WriteAck,
  WriteRequest,
} from './messages';
import { CheckpointObserver, NO_CHECKPOINT_OBSERVER } from './checkpoint-observer';
import { snapshotFrames, tableDigestSliced } from './record-table';
import { DEFAULT_LIMITS, RecordFormatError, RecordLimits, validateRecords } from './records';
import { SubscriberStream, Subscription, SubscriptionHost, SnapshotProgress } from './subscription';
import { TableReplica } from './table-replica';

/** Bulk snapshot frames, bytes. */
const SNAPSHOT_FRAME_BYTES = 1024 * 1024;
/**
 * Stored snapshot chunks, bytes: one is written per event-loop turn during store compaction, so
 * its size bounds the pause that compaction adds to acknowledgements (~1 ms here).
 */
const STORE_CHUNK_BYTES = 256 * 1024;
/** Longest a switchover waits for the active's next batch before it freezes it, ms (see switchover). */
const FREEZE_ALIGN_MS = 100;

export interface CheckpointOptions {
  limits: RecordLimits;
  /** Largest packed batch accepted, bytes. */
  maxBatchBytes: number;
  /** A subscriber that does not read for this long is dropped. */
  stallTimeoutMs: number;
  /** A SYNC write waits at most this long for a standby before that standby leaves the in-sync set. */
  syncTimeoutMs: number;
  /** Time a process gets to answer a role command. */
  commandTimeoutMs: number;
  /** Compact a table's log once it exceeds max(this, 2 x the table's size), bytes. */
  compactMinBytes: number;
  /** Unacknowledged change bytes in flight to one subscriber before the agent waits for acks. */
  subscriberWindowBytes: number;
}

export const DEFAULT_CHECKPOINT_OPTIONS: CheckpointOptions = {
  limits: DEFAULT_LIMITS,
  maxBatchBytes: 4 * 1024 * 1024 - 1024,
  stallTimeoutMs: 30_000,
  syncTimeoutMs: 5_000,
  commandTimeoutMs: 5_000,
  compactMinBytes: 256 * 1024 * 1024,
  subscriberWindowBytes: 32 * 1024 * 1024,
};

/** How the service talks back to a process over its session stream. */
export interface SessionChannel {
  send(cmd: RoleCommand): void;
  close(err?: HitlessError): void;
}

interface PendingCommand {
  resolve: (r: CommandResult) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/** The schemas of `canWrite` that every one of `readers` reads, newest first. */
function readableBy(canWrite: number[], readers: Iterable<PeerSession>): number[] {
  const rs = [...readers];
  return canWrite.filter((v) => rs.every((r) => r.reg.schemaReads.includes(v))).sort((a, b) => b - a);
}

class PeerSession {
  role: Role;
  /**
   * Set while the peer is frozen (switchover, audit): per table, the last sequence it sent before
   * it stopped writing. Batches up to it are still accepted (they were in flight when the FREEZE
   * was answered); anything later is refused.
   */
  frozenAt: Record<string, number> | null = null;
  /** Highest sequence the peer acknowledged as applied, per table. */
  readonly acked = new Map<string, number>();
  /** In the set SYNC writes wait for: set once the standby caught up, cleared on timeout/leave. */
  inSync = false;
  subscription: Subscription | null = null;
  writeSchema = 0;
  readonly pending = new Map<number, PendingCommand>();

  constructor(
    readonly id: string,
    readonly reg: Register,
    readonly channel: SessionChannel,
  ) {
    this.role = reg.wantedRole;
  }
}

interface GroupTable {
  replica: TableReplica;
  durability: Durability;
}

interface SyncWait {
  seq: number;
  waitFor: Set<string>;
  resolve: () => void;
  timer: NodeJS.Timeout;
}

class ProcessGroup {
  readonly tables = new Map<string, GroupTable>();
  readonly sessions = new Set<PeerSession>();
  active: PeerSession | null = null;
  /** SYNC writes waiting for standbys, per table, in sequence order. */
  readonly syncWaits = new Map<string, SyncWait[]>();
  /** Re-checked after every standby ack and every applied batch (switchover and audit waits). */
  progressWaiters: (() => void)[] = [];
  switching = false;

  constructor(readonly name: string) {}

  standbys(): PeerSession[] {
    return [...this.sessions].filter((s) => s.role === 'STANDBY');
  }
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$/;

export class CheckpointService {
  private readonly groups = new Map<string, ProcessGroup>();
  private readonly sessions = new Map<string, PeerSession>();
  private nextCommandId = 1;
  private compacting = new Set<string>();

  /** Where durations and counts go (metrics); set once at wiring, no-ops until then. */
  observer: CheckpointObserver = NO_CHECKPOINT_OBSERVER;

  constructor(
    private readonly store: CheckpointStore,
    private readonly bulk: BulkServer,
    private readonly log: Logger,
    readonly opts: CheckpointOptions = DEFAULT_CHECKPOINT_OPTIONS,
  ) {}

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
      replica.table.forEach((_k, schema) => replica.schemas.add(schema));
      g.tables.set(t.name, { replica, durability: durabilityName(t.durability) });
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
    this.validateRegister(reg);
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
      this.checkReadsTables(g, reg, reads);
      writeSchema = this.pickWriteSchema(g, reg, canWrite);
    } else {
      const active = g.active;
      if (active && !reads.has(active.writeSchema)) {
        throw failedPrecondition(
          `standby '${reg.instanceId}' (version ${reg.softwareVersion || '?'}) reads schema versions [${[...reads].join(', ')}] but the active '${active.reg.instanceId}' (version ${active.reg.softwareVersion || '?'}) writes schema ${active.writeSchema}; install a version that reads ${active.writeSchema} or register a transform ${active.writeSchema}->${reg.schemaWrites}`,
        );
      }
      this.checkReadsTables(g, reg, reads);
    }

    const session = new PeerSession(`s-${crypto.randomBytes(6).toString('hex')}`, reg, channel);
    session.writeSchema = writeSchema || reg.schemaWrites;
    if (reg.wantedRole === 'ACTIVE') {
      this.agreeWriteSchema(g, writeSchema);
      for (const t of reg.tables) this.declareTable(g, t.name, t.durability);
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
      tableSeqs: this.tableSeqs(g),
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
    this.leaveInSync(g, s);
    this.log.info({ process: s.reg.process, instance: s.reg.instanceId, session: sessionId, reason }, 'process session ended');
  }

  commandResult(sessionId: string, r: CommandResult): void {
    const s = this.sessions.get(sessionId);
    const p = s?.pending.get(r.commandId);
    if (!s || !p) return;
    s.pending.delete(r.commandId);
    clearTimeout(p.timer);
    p.resolve(r);
  }

  private validateRegister(reg: Register): void {
    if (!NAME_RE.test(reg.process)) {
      throw invalidArgument(`process name '${reg.process}' is not valid: 1-128 characters of letters, digits and _.:@- , starting with a letter or digit`);
    }
    if (!NAME_RE.test(reg.instanceId)) throw invalidArgument(`instance_id '${reg.instanceId}' is not valid: 1-128 characters of letters, digits and _.:@-`);
    if (!reg.vmId) throw invalidArgument('vm_id is empty: say which VM or slot the process runs in');
    if (!reg.schemaWrites || reg.schemaWrites > 65535) throw invalidArgument(`schema_writes must be 1..65535, got ${reg.schemaWrites}`);
    if (!reg.schemaReads.includes(reg.schemaWrites)) reg.schemaReads = [...reg.schemaReads, reg.schemaWrites];
    if (reg.wantedRole !== 'ACTIVE' && reg.wantedRole !== 'STANDBY') {
      throw invalidArgument(`wanted_role must be ACTIVE or STANDBY, got ${reg.wantedRole}`);
    }
    const seen = new Set<string>();
    for (const t of reg.tables) {
      if (!NAME_RE.test(t.name)) throw invalidArgument(`table name '${t.name}' is not valid`);
      if (seen.has(t.name)) throw invalidArgument(`table '${t.name}' is declared twice`);
      seen.add(t.name);
    }
    if (reg.wantedRole === 'STANDBY' && reg.tables.length) {
      // Standbys follow the active's declaration; ignore theirs rather than letting them change it.
      reg.tables = [];
    }
  }

  private checkReadsTables(g: ProcessGroup, reg: Register, reads: Set<number>): void {
    for (const [name, t] of g.tables) {
      const unreadable = [...t.replica.schemas].filter((s) => !reads.has(s));
      if (unreadable.length) {
        throw failedPrecondition(
          `'${reg.instanceId}' (version ${reg.softwareVersion || '?'}) reads schema versions [${[...reads].join(', ')}] but table '${name}' of process '${reg.process}' holds records of schema ${unreadable.join(', ')}; install a version that reads them or register a transform`,
        );
      }
    }
  }

  /**
   * The schema a registering active writes: the one the agent agreed on before (stored), when it
   * can write it and every current standby reads it; otherwise the highest it can write that every
   * current standby reads.
   *
   * The agreed schema wins over "highest" because the standbys present at registration are not
   * all the readers: after an agent restart in the middle of an upgrade, the new version's active
   * may re-register before the old version's instances do, and it must go on writing what they
   * read, or they could not follow it (and the rollback would not be hitless). Only an explicit
   * decision changes it: a switchover, a failover, or raiseWriteSchema after a commit.
   */
  private pickWriteSchema(g: ProcessGroup, reg: Register, canWrite: number[]): number {
    const standbys = g.standbys();
    const ok = readableBy(canWrite, standbys);
    if (!ok.length) {
      const sb = standbys.map((s) => `${s.reg.instanceId} reads [${s.reg.schemaReads.join(', ')}]`).join('; ');
      throw failedPrecondition(
        `'${reg.instanceId}' can write schema versions [${canWrite.join(', ')}] but not every standby can read any of them (${sb}); register a transform to a version the standbys read`,
      );
    }
    const agreed = this.store.writeSchema(g.name);
    if (agreed === 0 || ok.includes(agreed)) return agreed || ok[0];
    this.log.warn(
      { process: g.name, instance: reg.instanceId, agreed, canWrite, chosen: ok[0] },
      'the registering active cannot write the schema agreed before (or a standby cannot read it); it writes another',
    );
    return ok[0];
  }

  /** Records the schema the active of `g` writes from now on, before the active is told. */
  private agreeWriteSchema(g: ProcessGroup, schema: number): void {
    if (this.store.writeSchema(g.name) !== schema) this.store.setWriteSchema(g.name, schema);
  }

  // ---------------------------------------------------------------- writes

  /**
   * Stored first: a table the store refused (full disk) must not take batches, or they would be
   * acknowledged and then missing after a restart. An unchanged declaration writes nothing, so
   * a re-registering active is not refused for want of space it does not need.
   */
  private declareTable(g: ProcessGroup, name: string, durability: Durability): void {
    const d: Durability = durability === 'SYNC' ? 'SYNC' : 'ASYNC';
    const t = g.tables.get(name);
    if (t?.durability === d) return;
    this.store.upsertTable(g.name, name, d === 'SYNC' ? 2 : 1);
    if (t) {
      t.durability = d;
    } else {
      g.tables.set(name, { replica: new TableReplica(g.name, name), durability: d });
      for (const s of g.sessions) s.subscription?.addTable(name);
    }
  }

  /**
   * Validates, stores and applies one batch. Resolves with the ack when the batch's durability is
   * met. Throws (synchronously, before changing anything) on bad input.
   */
  write(req: WriteRequest, peerVm: string | null): Promise<WriteAck> | WriteAck {
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
    if (req.seq <= r.seq) {
      throw alreadyExists(`batch seq ${req.seq} of table '${req.table}' is already applied (table is at ${r.seq}); nothing changed`);
    }
    if (req.seq !== r.seq + 1) {
      throw outOfRange(`batch seq ${req.seq} of table '${req.table}' leaves a gap: the table is at ${r.seq}, the next batch must be ${r.seq + 1}`);
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
    // Durable first, then visible: an ack must never cover a batch the store does not hold.
    this.store.appendBatch(g.name, req.table, req.seq, req.records, req.count);
    r.applyBatch(req.seq, req.records, summary.schemas);
    for (const peer of g.sessions) peer.subscription?.onBatch(req.table, req.seq, req.records, req.count);
    this.maybeCompact(g.name, r);
    this.wakeProgressWaiters(g);
    this.observer.recordsWritten(g.name, req.table, req.count);
    const ack: WriteAck = { table: req.table, seq: req.seq };
    if (t.durability !== 'SYNC') return ack;
    const acked = () => this.observer.syncAck(g.name, req.table, (performance.now() - received) / 1000);
    const waitFor = new Set(
      g
        .standbys()
        .filter((p) => p.inSync && (p.acked.get(req.table) ?? 0) < req.seq)
        .map((p) => p.id),
    );
    if (waitFor.size === 0) {
      acked();
      return ack;
    }
    return new Promise<WriteAck>((resolve) => {
      const list = g.syncWaits.get(req.table) ?? [];
      g.syncWaits.set(req.table, list);
      const w: SyncWait = {
        seq: req.seq,
        waitFor,
        resolve: () => {
          acked();
          resolve(ack);
        },
        timer: setTimeout(() => this.syncTimeout(g, req.table, w), this.opts.syncTimeoutMs),
      };
      list.push(w);
    });
  }

  private syncTimeout(g: ProcessGroup, table: string, w: SyncWait): void {
    for (const id of [...w.waitFor]) {
      const s = this.sessions.get(id);
      if (!s) continue;
      this.log.warn(
        { process: g.name, table, seq: w.seq, standby: s.reg.instanceId, timeoutMs: this.opts.syncTimeoutMs },
        'standby did not apply a SYNC batch in time; it leaves the in-sync set until it catches up again',
      );
      this.leaveInSync(g, s);
    }
  }

  /** Removes a standby from every SYNC wait (it left, or fell out of sync). */
  private leaveInSync(g: ProcessGroup, s: PeerSession): void {
    s.inSync = false;
    for (const [table, list] of g.syncWaits) {
      for (const w of list) w.waitFor.delete(s.id);
      this.releaseSyncWaits(g, table);
    }
  }

  private releaseSyncWaits(g: ProcessGroup, table: string): void {
    const list = g.syncWaits.get(table);
    if (!list) return;
    // Acks leave in sequence order: a later batch is never acknowledged before an earlier one.
    while (list.length && list[0].waitFor.size === 0) {
      const w = list.shift()!;
      clearTimeout(w.timer);
      w.resolve();
    }
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
    const list = g.syncWaits.get(req.table);
    if (list) {
      for (const w of list) if (w.seq <= req.seq) w.waitFor.delete(s.id);
      this.releaseSyncWaits(g, req.table);
    }
    this.checkReady(g, s);
    this.wakeProgressWaiters(g);
  }

  private wakeProgressWaiters(g: ProcessGroup): void {
    if (g.progressWaiters.length === 0) return;
    const waiters = g.progressWaiters;
    g.progressWaiters = [];
    for (const w of waiters) w();
  }

  private lagOf(g: ProcessGroup, s: PeerSession): number {
    let lag = 0;
    for (const [name, t] of g.tables) lag += Math.max(0, t.replica.seq - (s.acked.get(name) ?? 0));
    return lag;
  }

  private checkReady(g: ProcessGroup, s: PeerSession): void {
    if (s.role === 'STANDBY' && !s.inSync && s.subscription && this.lagOf(g, s) === 0) {
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
          lag: s.role === 'ACTIVE' ? 0 : this.lagOf(g, s),
          ...snapshotFields(s.subscription?.snapshotProgress()),
        })),
      };
    });
  }

  // ---------------------------------------------------------------- role changes

  private command(s: PeerSession, kind: CommandKind, extra: Partial<RoleCommand> = {}): Promise<CommandResult> {
    const id = this.nextCommandId++;
    const cmd: RoleCommand = { commandId: id, kind, reason: extra.reason ?? '', tableSeqs: extra.tableSeqs ?? {}, writeSchema: extra.writeSchema ?? 0 };
    // A digest of a million records takes a while: REPORT gets a longer answer time.
    const timeoutMs = kind === 'REPORT' ? Math.max(this.opts.commandTimeoutMs, 60_000) : this.opts.commandTimeoutMs;
    return new Promise<CommandResult>((resolve, reject) => {
      const timer = setTimeout(() => {
        s.pending.delete(id);
        reject(deadlineExceeded(`'${s.reg.instanceId}' did not answer ${kind} within ${timeoutMs} ms`));
      }, timeoutMs);
      s.pending.set(id, { resolve, reject, timer });
      s.channel.send(cmd);
    }).then((r) => {
      if (!r.ok) throw failedPrecondition(`'${s.reg.instanceId}' refused ${kind}: ${r.error}`);
      return r;
    });
  }

  /** Resolves when `done()` holds, re-checked after every ack and applied batch of the group. */
  private waitProgress(g: ProcessGroup, s: PeerSession, done: () => boolean, timeoutMs: number, what: () => string): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (done()) return resolve();
      // Once settled (here or by the timer) the check stops re-registering itself.
      let settled = false;
      const timer = setTimeout(() => {
        settled = true;
        reject(deadlineExceeded(`${what()} within ${timeoutMs} ms`));
      }, timeoutMs);
      const check = () => {
        if (settled) return;
        if (!this.sessions.has(s.id)) {
          settled = true;
          clearTimeout(timer);
          return reject(failedPrecondition(`'${s.reg.instanceId}' disconnected while the agent waited for it`));
        }
        if (done()) {
          settled = true;
          clearTimeout(timer);
          return resolve();
        }
        g.progressWaiters.push(check);
      };
      g.progressWaiters.push(check);
    });
  }

  private waitAcked(g: ProcessGroup, s: PeerSession, seqs: Record<string, number>, timeoutMs: number): Promise<void> {
    return this.waitProgress(
      g,
      s,
      () => Object.entries(seqs).every(([t, q]) => (s.acked.get(t) ?? 0) >= q),
      timeoutMs,
      () => `standby '${s.reg.instanceId}' did not drain to zero lag (lag ${this.lagOf(g, s)} batches)`,
    );
  }

  /**
   * Freezes the active `s`: it stops writing and answers with the last sequence it sent per
   * table; the agent then waits until it applied those batches (they were in flight when the
   * process answered; it does not wait for their acks before answering, which keeps one
   * round trip out of the freeze window). Returns the tables' sequences at the freeze.
   */
  private async freeze(g: ProcessGroup, s: PeerSession, reason: string): Promise<{ seqs: Record<string, number>; reply: CommandResult }> {
    const reply = await this.command(s, 'FREEZE', { reason });
    s.frozenAt = { ...this.tableSeqs(g), ...reply.tableSeqs };
    const want = s.frozenAt;
    await this.waitProgress(
      g,
      s,
      () => Object.entries(want).every(([t, q]) => (g.tables.get(t)?.replica.seq ?? 0) >= q),
      this.opts.commandTimeoutMs,
      () =>
        `the agent did not receive the batches '${s.reg.instanceId}' sent before it froze (${JSON.stringify(want)} vs ${JSON.stringify(this.tableSeqs(g))})`,
    );
    return { seqs: this.tableSeqs(g), reply };
  }

  /**
   * Hands the active role of `process` to the READY standby `toInstance`: freeze the active's
   * writers, promote the standby at the freeze sequences, demote the old active (it becomes a
   * standby that resumes from the log, so a switch back is hitless too).
   *
   * The freeze window is kept to two round trips, one to each instance: the agent does not wait
   * for the standby's acks before PROMOTE. Instead the standby's subscription is capped at the
   * freeze sequences and the standby applies everything up to them before it takes over (it
   * checks that it holds exactly those sequences). Until the new active acknowledged PROMOTE any
   * failure puts the old active back in charge: the agent refuses writes from whoever it does not
   * consider active, so a late promotion cannot fork the table.
   */
  async switchover(process: string, toInstance: string): Promise<SwitchoverResponse> {
    const g = this.groups.get(process);
    if (!g) throw notFound(`no process '${process}' is known to the agent`);
    if (g.switching) throw failedPrecondition(`a switchover of '${process}' is already in progress`);
    const target = [...g.sessions].find((s) => s.reg.instanceId === toInstance);
    if (!target) throw notFound(`no instance '${toInstance}' of process '${process}' is registered`);
    const old = g.active;
    if (!old) throw failedPrecondition(`process '${process}' has no active instance to switch from`);
    if (target === old) throw failedPrecondition(`'${toInstance}' is already the active instance`);
    if (target.role !== 'STANDBY' || !target.inSync) {
      throw failedPrecondition(`standby '${toInstance}' is not READY (lag ${this.lagOf(g, target)} batches); wait until it caught up`);
    }
    if (!old.reg.schemaReads.includes(target.reg.schemaWrites) && !target.reg.schemaCanWrite.some((v) => old.reg.schemaReads.includes(v))) {
      throw failedPrecondition(
        `after the switch '${old.reg.instanceId}' could not read what '${toInstance}' writes (schema ${target.reg.schemaWrites}); a rollback would not be hitless`,
      );
    }
    g.switching = true;
    let rolesSwapped = false;
    const started = performance.now();
    try {
      // Best effort: start the freeze when the standby is (nearly) caught up, so what it must
      // apply inside the freeze window is short.
      await this.waitAcked(g, target, this.tableSeqs(g), 1000).catch(() => undefined);
      // One no-op command to each side first (UNFREEZE of a process that is not frozen): the
      // command path of both processes is then warm (in a slow guest, code run for the first
      // time costs tens of ms), and that cost is paid before the writers stop, not inside.
      await Promise.all([old, target].map((s) => this.command(s, 'UNFREEZE', { reason: 'switchover: checking the command path' })));
      // Freeze right after the active handed over a batch (waiting at most FREEZE_ALIGN_MS): a
      // writer has then just finished a burst of work and answers at once. A FREEZE that lands
      // in the middle of a burst waits for it, in a slow guest for tens of ms.
      const before = this.tableSeqs(g);
      const wrote = () => Object.entries(this.tableSeqs(g)).some(([t, q]) => q > (before[t] ?? 0));
      await this.waitProgress(g, old, wrote, FREEZE_ALIGN_MS, () => 'no batch from the active').catch(() => undefined); // then freeze anyway
      const t0 = process_hrtime();
      const { seqs, reply: frozen } = await this.freeze(g, old, `switchover to ${toInstance}`);
      const tFrozen = process_hrtime();
      // The old active will be a standby: the new active must write what it reads.
      const writeSchema = this.pickWriteSchemaFor(target, [old]);
      this.agreeWriteSchema(g, writeSchema);
      target.subscription?.capAt(seqs);
      target.role = 'ACTIVE';
      target.writeSchema = writeSchema;
      old.role = 'STANDBY';
      g.active = target;
      rolesSwapped = true;
      const promoted = await this.command(target, 'PROMOTE', { tableSeqs: seqs, writeSchema, reason: `switchover from ${old.reg.instanceId}` });
      const tPromoted = process_hrtime();
      rolesSwapped = false; // committed: no way back from here but another switchover
      target.subscription?.end();
      old.inSync = true; // it holds everything up to `seqs`, exactly what the new active starts from
      for (const [t, q] of Object.entries(seqs)) old.acked.set(t, q);
      old.frozenAt = null;
      const freezeMicros = Math.round(tPromoted - t0);
      await this.command(old, 'DEMOTE', { tableSeqs: seqs, reason: `switchover to ${toInstance}` });
      this.log.info(
        {
          process,
          from: old.reg.instanceId,
          to: toInstance,
          freezeMicros,
          freezeAckMicros: Math.round(tFrozen - t0),
          freezeHandledMicros: frozen.handledMicros ?? 0,
          promoteMicros: Math.round(tPromoted - tFrozen),
          promoteHandledMicros: promoted.handledMicros ?? 0,
        },
        'switchover done',
      );
      this.observer.switchover(process, (performance.now() - started) / 1000, freezeMicros / 1e6, true);
      return { freezeMicros, tableSeqs: seqs };
    } catch (e) {
      this.observer.switchover(process, (performance.now() - started) / 1000, 0, false);
      if (rolesSwapped) {
        // PROMOTE was refused or not answered: the old active takes over again. Tell the target
        // it is a standby, in case it promoted itself late; its writes are refused meanwhile.
        target.role = 'STANDBY';
        target.subscription?.uncap();
        if (this.sessions.has(old.id)) {
          old.role = 'ACTIVE';
          g.active = old;
          try {
            this.agreeWriteSchema(g, old.writeSchema);
          } catch (se) {
            // Go on and unfreeze the old active below: left frozen, it could never write again.
            this.log.error({ process, err: (se as Error).message }, 'could not store the write schema while undoing a switchover');
          }
        } else {
          // The old active died in the window: nobody is active until it comes back (it
          // re-registers) or a failover promotes a standby; a dead session never holds the role.
          g.active = null;
        }
        if (this.sessions.has(target.id))
          void this.command(target, 'DEMOTE', { tableSeqs: this.tableSeqs(g), reason: 'switchover failed' }).catch(() => undefined);
      }
      if (this.sessions.has(old.id) && old.role === 'ACTIVE') {
        old.frozenAt = null;
        await this.command(old, 'UNFREEZE', { reason: 'switchover failed' }).catch(() => undefined);
      }
      throw e;
    } finally {
      g.switching = false;
    }
  }

  /**
   * Promotes the READY standby `toInstance` when the process has no active (it died): the standby
   * first applies everything the agent holds, so no acknowledged change is lost.
   */
  async failover(process: string, toInstance: string): Promise<SwitchoverResponse> {
    const g = this.groups.get(process);
    if (!g) throw notFound(`no process '${process}' is known to the agent`);
    if (g.active) throw failedPrecondition(`process '${process}' still has an active instance '${g.active.reg.instanceId}'; use a switchover`);
    if (g.switching) throw failedPrecondition(`a role change of '${process}' is already in progress`);
    const target = [...g.sessions].find((s) => s.reg.instanceId === toInstance && s.role === 'STANDBY');
    if (!target) throw notFound(`no standby instance '${toInstance}' of process '${process}' is registered`);
    g.switching = true;
    const t0 = process_hrtime();
    try {
      const seqs = this.tableSeqs(g);
      await this.waitAcked(g, target, seqs, this.opts.commandTimeoutMs);
      const writeSchema = this.pickWriteSchemaFor(
        target,
        g.standbys().filter((s) => s !== target),
      );
      this.agreeWriteSchema(g, writeSchema);
      target.role = 'ACTIVE';
      target.writeSchema = writeSchema;
      g.active = target;
      target.subscription?.end();
      await this.command(target, 'PROMOTE', { tableSeqs: seqs, writeSchema, reason: 'failover: the active instance is gone' });
      this.log.warn({ process, to: toInstance }, 'failover: promoted a standby because the process had no active');
      return { freezeMicros: Math.round(process_hrtime() - t0), tableSeqs: seqs };
    } finally {
      g.switching = false;
    }
  }

  /**
   * Compares every copy of a process's tables at one moment: freezes the active, waits until the
   * in-sync standbys applied everything, asks each instance for its digests (REPORT), and
   * computes the agent's own. The active is unfrozen in every case.
   */
  async audit(process: string): Promise<AuditResponse> {
    const g = this.groups.get(process);
    if (!g) throw notFound(`no process '${process}' is known to the agent`);
    if (g.switching) throw failedPrecondition(`a role change of '${process}' is in progress; audit afterwards`);
    g.switching = true;
    const active = g.active;
    try {
      if (active) await this.freeze(g, active, 'audit');
      const seqs = this.tableSeqs(g);
      for (const s of g.standbys()) if (s.inSync) await this.waitAcked(g, s, seqs, this.opts.commandTimeoutMs);
      // Sliced: a big table must not stall the agent's event loop (acks of other processes).
      const agent: TableDigest[] = [];
      for (const [table, t] of g.tables) {
        const d = await tableDigestSliced(t.replica.table);
        agent.push({ table, seq: t.replica.seq, ...d }); // read on resuming: the digested state's sequence
      }
      const peers: PeerDigests[] = [];
      for (const s of g.sessions) {
        const r = await this.command(s, 'REPORT', { reason: 'audit' });
        peers.push({ instanceId: s.reg.instanceId, vmId: s.reg.vmId, role: s.role, digests: r.digests });
      }
      const problems: string[] = [];
      for (const a of agent) {
        for (const p of peers) {
          const d = p.digests.find((x) => x.table === a.table);
          if (!d) problems.push(`${p.instanceId} has no table '${a.table}'`);
          else if (d.sha256 !== a.sha256 || d.seq !== a.seq) {
            problems.push(
              `${p.instanceId} table '${a.table}': seq ${d.seq}, ${d.records} records, sha256 ${d.sha256.slice(0, 12)} vs agent seq ${a.seq}, ${a.records} records, sha256 ${a.sha256.slice(0, 12)}`,
            );
          }
        }
      }
      return { agent, peers, consistent: problems.length === 0, detail: problems.join('; ') };
    } finally {
      if (active && this.sessions.has(active.id)) {
        active.frozenAt = null;
        await this.command(active, 'UNFREEZE', { reason: 'audit done' }).catch(() => undefined);
      }
      g.switching = false;
    }
  }

  /**
   * Lets the active of `process` write the newest schema it can once no standby needs an older
   * one, leaving out standbys on `leavingVm` (stopped, their sessions may not have ended yet).
   * After an upgrade is committed the new version otherwise keeps writing the schema its
   * predecessor read. Returns the schema the active writes.
   */
  async raiseWriteSchema(process: string, leavingVm: string): Promise<number> {
    const g = this.groups.get(process);
    const a = g?.active;
    if (!g || !a) throw notFound(`process '${process}' has no active instance`);
    if (g.switching) throw failedPrecondition(`a role change of '${process}' is in progress`);
    const want = this.pickWriteSchemaFor(
      a,
      g.standbys().filter((s) => s.reg.vmId !== leavingVm),
    );
    if (want === a.writeSchema) return want;
    const was = a.writeSchema;
    // Batches of either schema are accepted from the active (see write()), so the order in which
    // this takes effect on both sides does not matter. Stored first: a refusal changes nothing.
    this.agreeWriteSchema(g, want);
    a.writeSchema = want;
    await this.command(a, 'SET_WRITE_SCHEMA', { writeSchema: want, reason: `no standby reads only schema ${was} any more` });
    this.log.info({ process, instance: a.reg.instanceId, from: was, to: want }, 'active writes a newer schema');
    return want;
  }

  private pickWriteSchemaFor(target: PeerSession, readers: PeerSession[]): number {
    const canWrite = target.reg.schemaCanWrite.length ? target.reg.schemaCanWrite : [target.reg.schemaWrites];
    return readableBy(canWrite, readers)[0] ?? target.reg.schemaWrites;
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

  private tableSeqs(g: ProcessGroup): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [n, t] of g.tables) out[n] = t.replica.seq;
    return out;
  }

  /**
   * Trims the store's batch log once it outgrew max(compactMinBytes, 2 x the table): writes the
   * replica's current log (compacted in memory as needed) as a new snapshot generation, then in
   * one transaction makes it current and drops the batches it covers.
   */
  private maybeCompact(process: string, r: TableReplica): void {
    const key = `${process}\u0000${r.name}`;
    if (this.compacting.has(key) || r.seq % 64 !== 0) return; // measuring the log costs a query
    const logBytes = this.store.logBytesSinceSnapshot(process, r.name);
    if (logBytes < Math.max(this.opts.compactMinBytes, 2 * r.bytes)) return;
    this.compacting.add(key);
    void this.compact(process, r)
      .catch((e) => {
        // A HitlessError (a full disk) explains itself and what to do; anything else is a bug.
        this.log[e instanceof HitlessError ? 'warn' : 'error'](
          { process, table: r.name, err: (e as Error).message },
          'store compaction failed; the log keeps everything',
        );
      })
      .finally(() => this.compacting.delete(key));
  }

  async compact(process: string, r: TableReplica): Promise<void> {
    const snap = r.snapshot();
    const gen = this.store.beginSnapshot(process, r.name);
    try {
      let chunk = 0;
      // One chunk per event-loop turn: writes and acks go on in between.
      for (const f of snapshotFrames(snap, STORE_CHUNK_BYTES)) {
        this.store.writeSnapshotChunk(process, r.name, gen, chunk++, f.records);
        await new Promise((res) => setImmediate(res));
      }
      this.store.commitSnapshot(process, r.name, gen, snap.seq);
      this.log.info({ process, table: r.name, seq: snap.seq, records: snap.liveRecords, chunks: chunk }, 'table log compacted into a snapshot');
    } catch (e) {
      // The log and the current snapshot are untouched until commitSnapshot's transaction; the
      // new generation's chunks are never current, and when even their deletion finds no room
      // (a full disk) they are dropped by the next start or the next compaction's commit.
      try {
        this.store.abortSnapshot(process, r.name, gen);
      } catch (ae) {
        this.log.warn(
          { process, table: r.name, gen, err: (ae as Error).message },
          'could not drop the chunks of an unfinished snapshot; they are dropped later',
        );
      }
      throw e;
    } finally {
      snap.release(); // SQLite copied every chunk it was given
    }
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

function durabilityName(d: number): Durability {
  return d === 2 ? 'SYNC' : 'ASYNC';
}

/** Monotonic microseconds. */
function process_hrtime(): number {
  return Number(process.hrtime.bigint() / 1000n);
}

/** A standby's bulk snapshot progress as PeerStatus fields (0 of 0 when none is streaming). */
function snapshotFields(p: SnapshotProgress | undefined): { snapshotRecordsSent: number; snapshotRecordsTotal: number } {
  return { snapshotRecordsSent: p?.sent ?? 0, snapshotRecordsTotal: p?.total ?? 0 };
}
