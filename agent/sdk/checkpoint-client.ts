/**
 * CheckpointClient: the library a routing process embeds to replicate its tables through the agent.
 *
 * It owns the process's local copy of every table (`tables`), so an active's writes and a
 * standby's received state live in one place the daemon reads from. What it does:
 * - registers on a Session stream and follows the agent's role commands (promote, demote, freeze,
 *   unfreeze);
 * - active: packs batches, applies them locally, sends them pipelined on a write channel (a frame
 *   channel on the agent's bulk socket, or gRPC WriteStream; see frame-channel.ts) with
 *   contiguous sequences, and resolves each when the agent acknowledges it; keeps unacknowledged
 *   batches in an outbox and resends them after a reconnect, so nothing is lost;
 * - restarted active: reloads its tables from the agent (Subscribe RECOVER) before writing;
 * - standby: applies the bulk snapshot (raw socket) and the changes after it, in order,
 *   transforming values of other schema versions with registered transforms, and acknowledges;
 * - reconnects with backoff when the agent restarts, resuming from what it holds;
 * - when the agent has no room to store a batch (RESOURCE_EXHAUSTED: its state disk is full),
 *   keeps the outbox and resends it with backoff until the agent stores it again, emitting
 *   'storage-full' once per episode and 'storage-resumed' when it is over.
 *
 * Keys are bytes; as JS strings they are latin1 (one char per byte), like the agent holds them.
 */
import * as grpc from '@grpc/grpc-js';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { clientCtor, loadCheckpointProto } from '../grpc/proto';
import { Logger, silentLogger } from '../common/logger';
import {
  AckRequest,
  BulkTicket,
  CommandResult,
  Registered,
  Role,
  RoleCommand,
  SessionNotice,
  SessionRequest,
  SessionResponse,
  SubscribeEvent,
  SubscribeRequest,
  TableSpec,
  WriteAck,
  WriteRequest,
} from '../checkpoint/messages';
import { DEFAULT_LIMITS, RecordBuilder, validateRecords } from '../checkpoint/records';
import { sharedArenaPool } from '../checkpoint/arena-pool';
import { RecordTable, tableDigest, tableDigestSliced } from '../checkpoint/record-table';
import { AckSink, ChannelOpener, FrameSubscribeCall, FrameWriteCall, SubscribeCall, WriteCall } from './frame-channel';

/**
 * How long a promoted standby waits for the changes up to the handover sequence to arrive; well
 * under the agent's role-command timeout, so a standby that cannot catch up refuses PROMOTE in
 * time for the agent to put the old active back in charge.
 */
const PROMOTE_CATCH_UP_MS = 2_000;
/** After PROMOTE the agent ends the old subscription; past this the client cancels it itself. */
const FOLLOW_END_GRACE_MS = 5_000;
/** Resending batches the agent had no room to store: first after this, doubling up to the max. */
const WRITE_RETRY_MIN_MS = 100;
const WRITE_RETRY_MAX_MS = 2_000;
/**
 * A standby whose subscription ended (the agent dropped it, or a snapshot could not be loaded)
 * follows again after this, doubling while it keeps failing (a bulk socket it has no route to
 * fails every time) up to the max; reset once a subscription caught up.
 */
const FOLLOW_RETRY_MIN_MS = 200;
const FOLLOW_RETRY_MAX_MS = 30_000;
/**
 * A running instance whose start after a new registration failed (an active that must reload
 * its tables, and the snapshot could not be loaded) registers again after this, doubling while
 * it keeps failing, up to the max; reset once a start succeeded. Not while start() is pending:
 * that failure goes to its caller.
 */
const RESTART_RETRY_MIN_MS = 200;
const RESTART_RETRY_MAX_MS = 30_000;
/**
 * Largest packed batch the client sends: the gRPC limit on both ends is 8 MiB per message. A
 * larger one would be refused by gRPC itself with RESOURCE_EXHAUSTED, which here means "retry
 * later", so it is refused before it touches the local table.
 */
const MAX_SEND_BATCH_BYTES = 8 * 1024 * 1024 - 1024;

/**
 * Most bytes of a bulk snapshot one socket read takes, and so most records one turn of the event
 * loop applies: 128 KiB is ~1,000 records of a full table, 1-2 ms. Applied whole, in the read
 * that completed it, a 1 MiB frame (~8,000 records) held the loop for 10-50 ms with the CPUs busy.
 */
const SNAPSHOT_READ_BYTES = 128 * 1024;
/** Most bytes of a bulk snapshot read in one turn of the event loop (see loadSnapshot). */
const SNAPSHOT_TURN_BYTES = 4 * SNAPSHOT_READ_BYTES;

/** Converts a value from one schema version to another (e.g. 1 -> 2 when reading old records). */
export type Transform = (value: Buffer) => Buffer;

export interface CheckpointClientOptions {
  /** 'unix:/path/agent.sock', a socket path, or 'host:port'. */
  address: string;
  process: string;
  instanceId: string;
  vmId: string;
  softwareVersion: string;
  /** Schema version this build writes natively. */
  schema: number;
  /** Further versions read natively (besides `schema` and the sources of transforms). */
  reads?: number[];
  /** Transforms keyed "from->to"; sources become readable, targets writable. */
  transforms?: Record<string, Transform>;
  tables: TableSpec[];
  /**
   * Tables whose values keep one format across this process's schema versions: never passed
   * through `transforms` (FIB tables never are: their values are FibEntry messages).
   */
  untransformedTables?: string[];
  role: 'ACTIVE' | 'STANDBY';
  logger?: Logger;
  /** Reconnect when the agent goes away (default true). */
  reconnect?: boolean;
  /**
   * This instance ran before (a process manager restarted it): when it asks for ACTIVE and
   * another instance holds the role, it follows that one instead of being refused (see
   * Register.rejoin). Reconnections after a lost agent always rejoin.
   */
  rejoin?: boolean;
  /**
   * host:port where this process reaches the agent's bulk snapshot socket, when it differs from
   * what the agent advertises (inside a guest: the per-VM bulk channel, e.g. 10.0.2.100:7001).
   */
  bulkAddress?: string;
  /** gRPC client interceptors for every call to the agent (tracing, metrics). */
  interceptors?: grpc.Interceptor[];
  /**
   * What carries batches, changes and acks: 'frames' (default), the agent's frame channels
   * (OpenChannel; falls back to gRPC by itself with an agent that lacks them), or 'grpc', the
   * WriteStream, Subscribe and Ack streams. Registration and role commands are gRPC either way.
   */
  channels?: 'frames' | 'grpc';
}

/** The client's copy of one table: the same RecordTable the agent uses, plus its sequence. */
export class LocalTable {
  // Pooled arenas (see ArenaPool): get() copies, forEach() views are valid during the callback.
  readonly records = new RecordTable({ pool: sharedArenaPool });
  seq = 0;
  constructor(
    readonly name: string,
    private readonly toNative: (schema: number, value: Buffer) => Buffer,
  ) {}
  get size(): number {
    return this.records.size;
  }
  /**
   * Value of a key in this build's native schema (transformed when written in another), or
   * undefined. A copy: the table's own bytes are reused once compaction retires them.
   */
  get(key: Buffer | string): Buffer | undefined {
    const r = this.records.get(key);
    return r && Buffer.from(this.toNative(r.schema, r.value));
  }
  /** Applies packed records (validated by the writer or the agent); the log compacts itself. */
  append(records: Buffer): void {
    this.records.append(records);
  }
  /** Visits live records; values as stored (with their schema), valid during the callback only. */
  forEach(cb: (key: string, schema: number, value: Buffer) => void): void {
    this.records.forEach(cb);
  }
  /**
   * forEach in slices, for tables too large to visit in one turn: visits the records in index
   * slots [from, from + slots) and returns where the next slice starts (-1: done); begin at 0.
   * A pass visits every record once only if the table does not change between its slices:
   * compare `version` before and after, and start over when it moved.
   */
  forEachIn(from: number, slots: number, cb: (key: string, schema: number, value: Buffer) => void): number {
    return this.records.forEachIn(from, slots, cb);
  }
  /** Changes with every change of the records (not with compaction). */
  get version(): number {
    return this.records.version;
  }
}

interface OutboxEntry {
  req: WriteRequest;
  resolve: (seq: number) => void;
  reject: (e: Error) => void;
  sent: boolean;
}

export class CheckpointError extends Error {
  constructor(
    readonly code: grpc.status,
    message: string,
  ) {
    super(message);
  }
}

/** A batch under construction; values are given in the build's native schema. */
export class Batch {
  // Starts small (from Node's buffer pool) and grows: a fresh 64 KiB buffer per batch made V8
  // collect far more often at thousands of small SYNC batches per second.
  readonly builder = new RecordBuilder(2048);
  /** FIB values (FibEntry messages) and untransformedTables keep their format in every schema. */
  private readonly untransformed: boolean;
  constructor(
    private readonly client: CheckpointClient,
    readonly table: string,
  ) {
    this.untransformed = client.isUntransformed(table);
  }
  put(key: Buffer | string, value: Buffer): this {
    this.builder.put(key, this.client.writeSchema, this.untransformed ? value : this.client.toWriteSchema(value));
    return this;
  }
  delete(key: Buffer | string): this {
    this.builder.delete(key);
    return this;
  }
  clear(): this {
    this.builder.clear();
    return this;
  }
  get count(): number {
    return this.builder.count;
  }
  commit(): Promise<number> {
    return this.client.submit(this.table, this.builder, true);
  }
}

/**
 * Runs `fn` once a reply just handed to HTTP/2 is on the socket: the session writes queued data
 * from a native immediate, which runs before the JavaScript immediates of the same turn. Role
 * commands use it for the work that follows an answer (listeners, logging), which in a slow guest
 * would otherwise hold the answer back by milliseconds while the writers are frozen.
 */
function afterReply(fn: () => void): void {
  setImmediate(fn);
}

export class CheckpointClient extends EventEmitter {
  readonly tables = new Map<string, LocalTable>();
  role: Role = 'ROLE_UNSPECIFIED';
  sessionId = '';
  /** Schema version values are written in; may be lower than `schema` while old standbys exist. */
  writeSchema: number;
  frozen = false;

  private readonly stub: grpc.Client & Record<string, (...args: unknown[]) => unknown>;
  private readonly log: Logger;
  private session: grpc.ClientDuplexStream<SessionRequest, SessionResponse> | null = null;
  private readonly channels: ChannelOpener;
  private writeStream: WriteCall | null = null;
  /**
   * A standby keeps one idle write channel open (it writes nothing on it; the agent checks the
   * role per batch). PROMOTE then only switches to it: opening one is the costliest part of
   * taking over in a guest under software emulation (first-time code, a connection through
   * QEMU's relay or an HTTP/2 stream to set up), and it is paid while the writers are frozen if
   * it waits for PROMOTE.
   */
  private spareWriteStream: WriteCall | null = null;
  private ackStream: AckSink | null = null;
  private sub: SubscribeCall | null = null;
  private readonly outbox: OutboxEntry[] = [];
  private unfrozenWaiters: (() => void)[] = [];
  private closed = false;
  private connected = false;
  private backoffMs = 100;
  private writeRetryMs = WRITE_RETRY_MIN_MS;
  private writeRetryTimer: NodeJS.Timeout | null = null;
  /** Set from the agent's first refusal for lack of space until it acknowledges a batch again. */
  private storageFull = false;
  private readonly readable: Set<number>;
  private readyWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private ready = false;
  /** Serializes subscription events: a snapshot must be applied before the changes after it. */
  private eventChain: Promise<void> = Promise.resolve();
  /**
   * Settles once a registered active has reloaded its tables from the agent (or failed to): until
   * then its tables are not its state, and a REPORT waits for it.
   */
  private recovered: Promise<void> = Promise.resolve();
  private pendingAcks = new Map<string, number>();
  private ackScheduled = false;
  private queuedEvents = 0;
  private followRetryMs = FOLLOW_RETRY_MIN_MS;
  private restartRetryMs = RESTART_RETRY_MIN_MS;

  constructor(readonly opts: CheckpointClientOptions) {
    super();
    this.log = opts.logger ?? silentLogger;
    const address = opts.address.startsWith('/') ? `unix:${opts.address}` : opts.address;
    const Ctor = clientCtor('hitless.v1.Checkpoint', loadCheckpointProto());
    this.stub = new Ctor(address, grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': 8 * 1024 * 1024,
      'grpc.max_send_message_length': 8 * 1024 * 1024,
      // A dead agent connection must be noticed in seconds: inside a guest the connection runs
      // through QEMU's user network, and after a kill -9 of the agent the guest kept its dead
      // connection until the default 20 s ping timeout (re-registering 26-28 s after the restart).
      // Not shorter: a ping answer waits for this process's event loop, which a digest of a 1M
      // record table blocks for about 3.5 s, and a timeout then would drop a healthy session.
      'grpc.keepalive_time_ms': 2_000,
      'grpc.keepalive_timeout_ms': 10_000,
      // 16 MiB HTTP/2 windows: with the default 64 KiB a 120 KB batch waits for window updates.
      'grpc-node.flow_control_window': 16 * 1024 * 1024,
      // One connection per client. grpc-js otherwise shares a connection between clients with the
      // same target; with wide windows an active writing and a standby reading tens of MB over
      // one shared HTTP/2 session in the same process stalled both (seen with 18 MB each way).
      'grpc.use_local_subchannel_pool': 1,
      'grpc.initial_reconnect_backoff_ms': 100,
      'grpc.max_reconnect_backoff_ms': 1000,
      ...(opts.interceptors ? { interceptors: opts.interceptors } : {}),
    }) as unknown as grpc.Client & Record<string, (...args: unknown[]) => unknown>;
    this.channels = new ChannelOpener(this.stub, { address: opts.address, bulkAddress: opts.bulkAddress, frames: opts.channels !== 'grpc' });
    this.writeSchema = opts.schema;
    this.readable = new Set([opts.schema, ...(opts.reads ?? [])]);
    for (const k of Object.keys(opts.transforms ?? {})) {
      const [from, to] = k.split('->').map(Number);
      if (to === opts.schema) this.readable.add(from);
    }
    for (const t of opts.tables) this.table(t.name);
  }

  /** Schemas this build can write: its own and those it can convert its values to. */
  private canWrite(): number[] {
    const out = new Set([this.opts.schema]);
    for (const k of Object.keys(this.opts.transforms ?? {})) {
      const [from, to] = k.split('->').map(Number);
      if (from === this.opts.schema) out.add(to);
    }
    return [...out];
  }

  table(name: string): LocalTable {
    let t = this.tables.get(name);
    if (!t) {
      // FIB values are FibEntry messages whatever the process's schema: never transformed.
      t = this.isUntransformed(name) ? new LocalTable(name, (_schema, value) => value) : new LocalTable(name, (schema, value) => this.toNative(schema, value));
      this.tables.set(name, t);
    }
    return t;
  }

  /** Registers, recovers (active) or starts following (standby). Resolves when usable. */
  start(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.readyWaiters.push({ resolve, reject });
      this.connect();
    });
  }

  private settleReady(err: Error | null): void {
    if (!err) this.ready = true;
    const w = this.readyWaiters;
    this.readyWaiters = [];
    for (const x of w) {
      if (err) x.reject(err);
      else x.resolve();
    }
  }

  private connect(): void {
    if (this.closed) return;
    const wanted: Role = this.role === 'ROLE_UNSPECIFIED' ? this.opts.role : this.role;
    const call = (this.stub.Session as () => grpc.ClientDuplexStream<SessionRequest, SessionResponse>)();
    this.session = call;
    call.on('data', (msg: SessionResponse) => {
      if (msg.registered) void this.onRegistered(msg.registered);
      else if (msg.command) void this.onCommand(msg.command);
    });
    // Only while it is the current session: a session ended by restartSession() reports its end
    // after a new one may have started.
    call.on('error', (err: grpc.ServiceError) => this.session === call && this.onSessionLost(err));
    call.on('end', () => this.session === call && this.onSessionLost(null));
    call.write({
      register: {
        process: this.opts.process,
        instanceId: this.opts.instanceId,
        vmId: this.opts.vmId,
        softwareVersion: this.opts.softwareVersion,
        schemaWrites: this.opts.schema,
        schemaReads: [...this.readable],
        wantedRole: wanted,
        tables: this.opts.tables,
        schemaCanWrite: this.canWrite(),
        rejoin: this.opts.rejoin === true || this.sessionId !== '',
      },
    });
  }

  private onSessionLost(err: grpc.ServiceError | null): void {
    if (!this.session) return;
    this.session = null;
    this.connected = false;
    // Cancelled on the next turn, not from inside this callback: when the connection itself went
    // (the agent dropped it after this process's event loop had stalled for ~15 s), this runs
    // within Node's HTTP/2 teardown, and an RST_STREAM submitted there for a stream with queued
    // data made Node's HTTP/2 session loop copying pending output: the process grew to 23 GB
    // and was OOM-killed. A turn later the streams are closed (the cancel does nothing) or it is
    // an ordinary RST_STREAM. (test/integration/checkpoint-client-stall.test.ts)
    const gone = [this.writeStream, this.sub];
    setImmediate(() => {
      for (const call of gone) call?.cancel();
    });
    this.writeStream = null;
    this.cancelWriteRetry(); // the next registration resends the outbox
    this.dropSpareWriteStream();
    this.sub = null;
    this.ackStream?.end();
    this.ackStream = null;
    if (this.closed) return;
    const fatal =
      err && [grpc.status.INVALID_ARGUMENT, grpc.status.FAILED_PRECONDITION, grpc.status.PERMISSION_DENIED, grpc.status.ALREADY_EXISTS].includes(err.code);
    if (fatal && !this.ready) {
      this.settleReady(new CheckpointError(err.code, err.details));
      this.closed = true;
      return;
    }
    if (this.opts.reconnect === false) {
      const e = new CheckpointError(err?.code ?? grpc.status.UNAVAILABLE, err?.details ?? 'agent closed the session');
      this.settleReady(e);
      this.emit('disconnected', e);
      return;
    }
    this.log.warn({ err: err?.details ?? 'session ended', retryMs: this.backoffMs }, 'agent session lost; reconnecting');
    this.emit('disconnected', err);
    setTimeout(() => this.connect(), this.backoffMs);
    this.backoffMs = Math.min(this.backoffMs * 2, 2000);
  }

  /**
   * A frame channel broke (UNAVAILABLE) while the session stood: the bulk socket can fail on its
   * own (a guest's relay, a listener not up yet after an agent restart). What the agent received
   * of that channel is unknown, so the session starts over: the new registration tells which
   * batches the agent holds (the outbox resends the rest), a standby resumes from what it holds,
   * and whatever of the old channel the agent still reads belongs to a session that is gone and
   * is refused. A gRPC stream's UNAVAILABLE is its connection's, so its session is ending anyway.
   */
  private restartSession(reason: string): void {
    const s = this.session;
    if (!s) return;
    this.log.warn({ reason }, 'a channel to the agent broke while the session stood; registering again');
    this.onSessionLost(null);
    s.cancel();
  }

  private async onRegistered(r: Registered): Promise<void> {
    const wasActive = this.role === 'ACTIVE';
    this.sessionId = r.sessionId;
    this.role = r.role;
    this.connected = true;
    this.backoffMs = 100;
    if (r.writeSchema) this.writeSchema = r.writeSchema;
    // A freeze belongs to the session that received it; a new session starts unfrozen (the agent
    // that froze this instance is gone, and the one it talks to now never froze it).
    this.unfreeze();
    this.emit('registered', r);
    try {
      if (r.role === 'ACTIVE') {
        const reload = this.tablesToReload(r);
        if (Object.keys(reload).length) {
          const recovery = this.recover(this.supersededBy(reload));
          this.recovered = recovery.catch(() => undefined);
          await recovery;
        }
        this.openWriteStream(r.tableSeqs);
      } else if (wasActive) {
        this.rejoinAsStandby();
      } else {
        this.follow();
      }
      this.restartRetryMs = RESTART_RETRY_MIN_MS;
      if (!this.ready) this.settleReady(null);
      this.emit('role', this.role);
    } catch (e) {
      if (e instanceof CheckpointError && e.code === grpc.status.UNAVAILABLE) return this.restartSession(e.message);
      this.log.error({ err: (e as Error).message, retryMs: this.ready ? this.restartRetryMs : undefined }, 'start after registration failed');
      if (!this.ready) return this.settleReady(e as Error);
      this.emit('error', e);
      this.registerAgainLater();
    }
  }

  /**
   * A running instance could not start in the role it registered for: it must not stay
   * registered without writing (an active's commits would wait for a write stream that never
   * opens) or following. Its session ends, and it registers again after the retry delay, which
   * doubles while it keeps failing.
   */
  private registerAgainLater(): void {
    const s = this.session;
    if (!s) return;
    this.backoffMs = this.restartRetryMs; // onSessionLost waits this long before registering
    this.restartRetryMs = Math.min(this.restartRetryMs * 2, RESTART_RETRY_MAX_MS);
    this.onSessionLost(null);
    s.cancel();
  }

  // ------------------------------------------------------------------ active side

  /** Whether `table`'s values bypass the schema transforms (a FIB table, or one named so). */
  isUntransformed(table: string): boolean {
    return this.opts.tables.some((t) => t.name === table && t.kind === 'FIB') || (this.opts.untransformedTables ?? []).includes(table);
  }

  /** Values in the native schema -> the schema the agent asked this active to write. */
  toWriteSchema(value: Buffer): Buffer {
    if (this.writeSchema === this.opts.schema) return value;
    return this.writerTo(this.writeSchema)(value);
  }

  /** The transform from the native schema to `schema`; throws when none is registered. */
  private writerTo(schema: number): Transform {
    const f = this.opts.transforms?.[`${this.opts.schema}->${schema}`];
    if (!f) throw new Error(`no transform ${this.opts.schema}->${schema} registered`);
    return f;
  }

  /**
   * Tells the agent how one of this process's protocol sessions fared when the active instance
   * changed (hitless.v1.SessionNotice); it goes in the upgrade's report. Dropped when not
   * connected: it is an account for operators, not state.
   */
  notice(n: SessionNotice): void {
    this.session?.write({ notice: n });
  }

  batch(table: string): Batch {
    if (!this.tables.has(table)) throw new Error(`table '${table}' was not declared`);
    return new Batch(this, table);
  }

  /** Packs what `builder` holds into the next batch of `table`; resolves with its sequence once acknowledged. */
  async submit(table: string, builder: RecordBuilder, owned = false): Promise<number> {
    while (this.frozen) await new Promise<void>((r) => this.unfrozenWaiters.push(r));
    if (this.role !== 'ACTIVE') throw new CheckpointError(grpc.status.FAILED_PRECONDITION, `'${this.opts.instanceId}' is ${this.role}; only the active writes`);
    const { records, count } = owned ? builder.takeOwned() : builder.take();
    if (count === 0) return this.table(table).seq;
    if (records.length > MAX_SEND_BATCH_BYTES) {
      throw new CheckpointError(
        grpc.status.INVALID_ARGUMENT,
        `batch of ${records.length} bytes exceeds the ${MAX_SEND_BATCH_BYTES} a message may carry; split it`,
      );
    }
    validateRecords(records, count, DEFAULT_LIMITS);
    const local = this.table(table);
    const seq = local.seq + 1;
    local.append(records);
    local.seq = seq;
    const req: WriteRequest = { sessionId: this.sessionId, table, seq, records, count };
    return new Promise<number>((resolve, reject) => {
      const e: OutboxEntry = { req, resolve, reject, sent: false };
      this.outbox.push(e);
      if (this.writeStream) {
        e.sent = true;
        this.writeStream.write(req);
      }
    });
  }

  /** Number of batches sent but not yet acknowledged. */
  get inFlight(): number {
    return this.outbox.length;
  }

  private openWriteStream(agentSeqs: Record<string, number>): void {
    // Anything the agent already holds was acknowledged before the connection broke.
    while (this.outbox.length && this.outbox[0].req.seq <= (agentSeqs[this.outbox[0].req.table] ?? 0)) {
      const e = this.outbox.shift()!;
      e.resolve(e.req.seq);
    }
    const call = this.spareWriteStream ?? this.newWriteCall();
    this.spareWriteStream = null;
    this.writeStream = call;
    for (const e of this.outbox) {
      e.req.sessionId = this.sessionId;
      e.sent = true;
      call.write(e.req);
    }
  }

  /** Opens the idle WriteStream a standby holds for its promotion (see spareWriteStream). */
  private prepareSpareWriteStream(): void {
    if (this.spareWriteStream || this.closed || !this.session || this.role !== 'STANDBY') return;
    this.spareWriteStream = this.newWriteCall();
  }

  private dropSpareWriteStream(): void {
    const spare = this.spareWriteStream;
    this.spareWriteStream = null;
    spare?.end();
  }

  /**
   * A WriteStream call whose acks settle the outbox while it is `this.writeStream`. Until then
   * (a spare) it ignores everything; an error on a spare just drops it.
   */
  private newWriteCall(): WriteCall {
    const grpcCall = () => (this.stub.WriteStream as () => grpc.ClientDuplexStream<WriteRequest, WriteAck>)();
    const call: WriteCall = this.channels.frames ? new FrameWriteCall(this.channels, this.sessionId, grpcCall) : grpcCall();
    call.on('data', (ack: WriteAck) => {
      if (this.writeStream !== call) return; // demoted: DEMOTE settled the outbox
      const head = this.outbox[0];
      if (!head || head.req.table !== ack.table || head.req.seq !== ack.seq) {
        this.emit('error', new Error(`ack ${ack.table}/${ack.seq} does not match the oldest outstanding batch`));
        return;
      }
      this.outbox.shift();
      this.writeRetryMs = WRITE_RETRY_MIN_MS;
      if (this.storageFull) {
        this.storageFull = false;
        this.log.info({ table: ack.table, seq: ack.seq }, 'the agent stores batches again');
        this.emit('storage-resumed');
      }
      head.resolve(ack.seq);
    });
    call.on('error', (err: grpc.ServiceError) => {
      if (this.spareWriteStream === call) this.spareWriteStream = null;
      if (this.writeStream !== call) return;
      this.writeStream = null;
      if (err.code === grpc.status.CANCELLED) return; // session loss or demotion: handled there
      if (err.code === grpc.status.UNAVAILABLE) return this.restartSession(err.details);
      if (err.code === grpc.status.RESOURCE_EXHAUSTED) return this.resendLater(err);
      // The agent refused a batch: the local table already holds it, so this instance must not
      // keep writing from a state the agent does not have.
      const e = new CheckpointError(err.code, err.details);
      for (const x of this.outbox.splice(0)) x.reject(e);
      this.emit('error', e);
    });
    return call;
  }

  /**
   * The agent had no room to store the outbox's first batch. It refuses a WriteStream batch
   * before applying anything and answers in order, so every ack before the refusal has arrived
   * and the outbox holds exactly what the agent lacks; the local table is ahead of the agent by
   * that outbox, as during a reconnect. Keep it and resend it all on a new stream, with backoff,
   * until the agent stores it (new batches queue behind it meanwhile).
   */
  private resendLater(err: grpc.ServiceError): void {
    for (const e of this.outbox) e.sent = false;
    if (!this.storageFull) {
      this.storageFull = true;
      this.log.warn({ err: err.details, unacknowledged: this.outbox.length }, 'the agent cannot store batches; keeping them and resending until it can');
      this.emit('storage-full', new CheckpointError(err.code, err.details));
    }
    const delay = this.writeRetryMs;
    this.writeRetryMs = Math.min(delay * 2, WRITE_RETRY_MAX_MS);
    this.cancelWriteRetry();
    this.writeRetryTimer = setTimeout(() => {
      this.writeRetryTimer = null;
      // A lost session, a demotion or a close took over in between (a new registration resends).
      if (this.closed || !this.connected || this.role !== 'ACTIVE' || this.writeStream) return;
      this.openWriteStream({});
    }, delay);
  }

  private cancelWriteRetry(): void {
    if (this.writeRetryTimer) clearTimeout(this.writeRetryTimer);
    this.writeRetryTimer = null;
  }

  private localSeqs(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [n, t] of this.tables) out[n] = t.seq;
    return out;
  }

  // ------------------------------------------------------------------ role commands

  private async onCommand(cmd: RoleCommand): Promise<void> {
    const received = performance.now();
    const reply = (ok: boolean, error = '', tableSeqs: Record<string, number> = {}, digests: CommandResult['digests'] = []) => {
      const handledMicros = Math.min(0xffffffff, Math.round((performance.now() - received) * 1000));
      const result: CommandResult = { commandId: cmd.commandId, ok, error, tableSeqs, digests, handledMicros };
      this.session?.write({ result });
    };
    try {
      switch (cmd.kind) {
        case 'FREEZE':
          // Answer with the last sequence handed to the agent, without waiting for the acks of
          // batches still in flight: the agent waits for those itself (they are ahead of this
          // answer on the same connection), which keeps a round trip out of the freeze window.
          // 'freezing' handlers run before the answer and may still write: what they commit now
          // is part of what the new active starts from. With `handover` (a switchover follows,
          // not an audit) a routing process captures its TCP connections here. They must not throw.
          this.emit('freezing', cmd.handover === true);
          this.frozen = true;
          reply(true, '', this.localSeqs());
          afterReply(() => this.emit('frozen'));
          break;
        case 'UNFREEZE':
          this.unfreeze();
          reply(true);
          break;
        case 'SET_WRITE_SCHEMA':
          if (cmd.writeSchema !== this.opts.schema) this.writerTo(cmd.writeSchema); // refuse what it cannot write
          this.writeSchema = cmd.writeSchema;
          reply(true);
          break;
        case 'REPORT': {
          // A standby reports what it applied, not what is queued; the digests run on the event
          // chain so no change is applied to a table while its digest is computed in slices. An
          // active that is still reloading its tables (it registered moments ago) reports them
          // once reloaded: an audit asks at once, and empty tables would read as lost ones. (It
          // joins the chain only then: the reload's own events are applied on the chain.)
          await this.recovered;
          const report = this.eventChain.then(() => this.digestAll());
          this.eventChain = report.then(
            () => undefined,
            () => undefined,
          );
          const digests = await report;
          reply(true, '', Object.fromEntries(digests.map((d) => [d.table, d.seq])), digests);
          break;
        }
        case 'PROMOTE': {
          // The agent promotes without waiting for this standby's acks: the changes up to
          // tableSeqs are on the subscription (capped there), so apply them before taking over.
          // A refusal keeps the subscription: the agent then leaves this instance a standby.
          await this.reachSeqs(cmd.tableSeqs, PROMOTE_CATCH_UP_MS);
          for (const [t, s] of Object.entries(cmd.tableSeqs)) {
            if (this.table(t).seq !== s) throw new Error(`table '${t}' is at ${this.table(t).seq}, not at ${s}`);
          }
          // Stop following without cancelling the call: the agent capped the subscription at
          // tableSeqs and ends it once this answer arrives (events after the cap would be ignored,
          // see consume). A client-side cancel ran ~60 ms of first-time code in a guest under
          // software emulation, all of it inside the freeze window.
          const followed = this.sub;
          this.sub = null;
          this.role = 'ACTIVE';
          if (cmd.writeSchema) this.writeSchema = cmd.writeSchema;
          this.openWriteStream(cmd.tableSeqs); // the spare, when there is one: no new call
          this.unfreeze();
          // 'promoting' handlers run before the answer, with every table at the handover
          // sequences: what must exist before the agent hands this instance the network (restored
          // TCP connections, when `handover`: a switchover, not a failover) is made here. They must
          // not throw; 'role' follows after the answer.
          this.emit('promoting', cmd.handover === true);
          reply(true);
          afterReply(() => {
            this.emit('role', this.role);
            // An agent that never ends it (gone, restarting): a cancel of an ended call does nothing.
            if (followed) setTimeout(() => followed.cancel(), FOLLOW_END_GRACE_MS).unref();
          });
          break;
        }
        case 'DEMOTE':
          if (this.role === 'STANDBY' && this.sub) {
            reply(true); // already a following standby (the agent undoing a refused promotion)
            break;
          }
          this.role = 'STANDBY';
          this.writeStream?.end();
          this.writeStream = null;
          // The agent holds every batch up to tableSeqs (it applied them before promoting the new
          // active), acked or not yet; later ones never reached it.
          for (const e of this.outbox.splice(0)) {
            if (e.req.seq <= (cmd.tableSeqs[e.req.table] ?? 0)) e.resolve(e.req.seq);
            else e.reject(new CheckpointError(grpc.status.FAILED_PRECONDITION, 'demoted before the agent accepted the batch'));
          }
          this.unfreeze();
          this.follow();
          reply(true);
          afterReply(() => this.emit('role', this.role));
          break;
        default:
          reply(false, `unknown command ${cmd.kind}`);
      }
    } catch (e) {
      reply(false, (e as Error).message);
    }
  }

  /** Waits (at most `timeoutMs`) until every table applied the given sequence from the subscription. */
  private async reachSeqs(seqs: Record<string, number>, timeoutMs: number): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      await this.eventChain;
      if (Object.entries(seqs).every(([t, q]) => this.table(t).seq >= q)) return;
      const left = deadline - performance.now();
      if (left <= 0 || !this.sub) return; // the caller's check names what is missing
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.off('change', done);
          resolve();
        };
        const timer = setTimeout(done, left);
        this.on('change', done);
      });
    }
  }

  /** Ends a freeze; 'unfrozen' tells a process that was frozen (role already updated). */
  private unfreeze(): void {
    const was = this.frozen;
    this.frozen = false;
    if (was) this.emit('unfrozen');
    const w = this.unfrozenWaiters;
    this.unfrozenWaiters = [];
    for (const r of w) r();
  }

  /**
   * This instance was active, came back after losing the agent, and found another instance in
   * the role (Register.rejoin). What the agent never acknowledged may not be in its table (another
   * writer may even have used those sequences), so those batches fail, and each table that held
   * some is taken again whole from the agent; the others resume from the log.
   */
  private rejoinAsStandby(): void {
    const err = new CheckpointError(
      grpc.status.ABORTED,
      'the agent restarted before acknowledging this batch and another instance is active now; the change may be lost, write it again through the active',
    );
    const unacked = this.rejectOutbox(null, () => err);
    this.log.warn({ tables: [...unacked] }, 'another instance is active after the agent restarted; following it as a standby');
    this.follow(this.seqsToReloadFrom(unacked));
  }

  /**
   * Rejects the outbox's batches of `tables` (every table: null) with `err`: the agent may not
   * hold them, and the application writes those changes again. Returns the tables they were
   * for, whose local copies hold changes the agent may not have.
   */
  private rejectOutbox(tables: Set<string> | null, err: (e: OutboxEntry) => CheckpointError): Set<string> {
    const rejected = new Set<string>();
    const kept: OutboxEntry[] = [];
    for (const e of this.outbox.splice(0)) {
      if (tables && !tables.has(e.req.table)) {
        kept.push(e);
        continue;
      }
      rejected.add(e.req.table);
      e.reject(err(e));
    }
    this.outbox.push(...kept);
    return rejected;
  }

  /** What to subscribe from: what this instance holds, except `reload`, taken again whole (0). */
  private seqsToReloadFrom(reload: Set<string>): Record<string, number> {
    const have = this.localSeqs();
    for (const t of reload) have[t] = 0;
    return have;
  }

  // ------------------------------------------------------------------ standby side

  private follow(have: Record<string, number> = this.localSeqs()): void {
    const req: SubscribeRequest = { sessionId: this.sessionId, have, mode: 'FOLLOW' };
    const grpcAcks = () =>
      (this.stub.Ack as (cb: (e: grpc.ServiceError | null) => void) => grpc.ClientWritableStream<AckRequest>)((err) => {
        if (err && err.code !== grpc.status.CANCELLED && err.code !== grpc.status.UNAVAILABLE) this.emit('error', new CheckpointError(err.code, err.details));
      });
    let call: SubscribeCall;
    if (this.channels.frames) {
      const framed = new FrameSubscribeCall(this.channels, req, () => ({ call: this.grpcSubscribe(req), acks: grpcAcks() }));
      this.ackStream = framed.acks;
      call = framed;
    } else {
      this.ackStream = grpcAcks();
      call = this.grpcSubscribe(req);
    }
    this.sub = call;
    this.consume(
      call,
      () => undefined,
      () => this.sub === call,
    );
    setImmediate(() => this.prepareSpareWriteStream());
  }

  /**
   * Tables (name -> the agent's sequence) an active registering again must load before it writes:
   * those the agent holds more of than this instance (it restarted, or another instance wrote
   * while it was cut off), and those whose last batch another instance wrote at or after the first
   * batch this one still waits to see acknowledged (overtaken: that batch is not the table's).
   */
  private tablesToReload(r: Registered): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [t, seq] of Object.entries(r.tableSeqs)) {
      const writer = r.tableWriters?.[t] ?? '';
      const firstUnacked = this.outbox.find((e) => e.req.table === t)?.req.seq;
      const overtaken = writer !== '' && writer !== this.opts.instanceId && firstUnacked !== undefined && seq >= firstUnacked;
      if (seq > this.table(t).seq || overtaken) out[t] = seq;
    }
    return out;
  }

  /**
   * The agent holds tables (name -> its sequence) that this instance must load (tablesToReload):
   * another instance may have written them while this one was cut off. Batches of them
   * still in the outbox may have been stored or may have been overtaken, and the local table holds
   * them either way, so they are rejected (write the change again) and those tables are reloaded
   * whole. Returns what to recover from: per table, what this instance holds that the agent has.
   */
  private supersededBy(agentSeqs: Record<string, number>): Record<string, number> {
    const rejected = this.rejectOutbox(
      new Set(Object.keys(agentSeqs)),
      (e) =>
        new CheckpointError(
          grpc.status.ABORTED,
          `another instance wrote table '${e.req.table}' (to batch ${agentSeqs[e.req.table]}) while this one was cut off from the agent; batch ${e.req.seq} was not acknowledged and may be lost: write the change again`,
        ),
    );
    // A restarted instance holds nothing yet: it is behind, not superseded.
    const held = Object.keys(agentSeqs).filter((t) => this.table(t).seq > 0);
    if (held.length) this.log.warn({ tables: held, agentSeqs }, 'another instance wrote while this one was cut off; loading what it wrote');
    return this.seqsToReloadFrom(rejected);
  }

  /** Reloads tables from the agent, after what `have` says this instance holds (a restarted or superseded active). */
  private recover(have: Record<string, number>): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const req: SubscribeRequest = { sessionId: this.sessionId, have, mode: 'RECOVER' };
      const call: SubscribeCall = this.channels.frames
        ? new FrameSubscribeCall(this.channels, req, () => ({ call: this.grpcSubscribe(req), acks: { write: () => undefined, end: () => undefined } }))
        : this.grpcSubscribe(req);
      let done = false;
      this.consume(call, (err) => {
        if (done) return;
        done = true;
        if (err) reject(err);
        else resolve();
      });
    });
  }

  private grpcSubscribe(req: SubscribeRequest): grpc.ClientReadableStream<SubscribeEvent> {
    return (this.stub.Subscribe as (r: SubscribeRequest) => grpc.ClientReadableStream<SubscribeEvent>)(req);
  }

  /**
   * Applies a subscription's events in order. `current`: false once the instance stopped following
   * this call (promoted); its events are dropped. `finished` gets the first failure to apply an
   * event (a recovery fails with it instead of leaving a partial table) or null when the call
   * caught up or ended.
   */
  private consume(call: SubscribeCall, finished: (err: Error | null) => void, current: () => boolean = () => true): void {
    // Set once an event could not be applied: the events queued behind it would be applied on top
    // of a table that lacks it, so they are dropped, and a follower subscribes again.
    let failed = false;
    call.on('data', (ev: SubscribeEvent) => {
      if (!current()) return;
      this.queuedEvents++;
      if (this.queuedEvents > 2048) call.pause();
      this.eventChain = this.eventChain.then(async () => {
        try {
          if (!failed) await this.applyEvent(ev);
          if (ev.caughtUp && this.sub === call) this.followRetryMs = FOLLOW_RETRY_MIN_MS;
        } catch (e) {
          failed = true;
          this.eventFailed(call, e as Error, finished);
        }
        if (--this.queuedEvents < 512 && call.isPaused()) call.resume();
        if (ev.caughtUp) finished(null);
      });
    });
    call.on('error', (err: grpc.ServiceError) => {
      if (err.code === grpc.status.CANCELLED) return finished(null);
      finished(new CheckpointError(err.code, err.details));
      if (this.sub === call && err.code === grpc.status.UNAVAILABLE) return this.restartSession(err.details);
      if (this.sub === call) {
        // Dropped by the agent (stalled, snapshot failed): resubscribe from what we hold.
        this.log.warn({ err: err.details, retryMs: this.followRetryMs }, 'subscription ended by the agent; resubscribing');
        this.followAgain();
      }
    });
    call.on('end', () => void this.eventChain.then(() => finished(null)));
  }

  /**
   * An event of `call` could not be applied: the call ends, a recovery fails with the error (its
   * caller reports it: registration fails), a follower reports it and subscribes again.
   */
  private eventFailed(call: SubscribeCall, e: Error, finished: (err: Error | null) => void): void {
    const following = this.sub === call;
    this.log.error(
      { err: e.message, retryMs: following ? this.followRetryMs : undefined },
      following ? 'applying a subscription event failed; subscribing again from what this instance holds' : 'applying a subscription event failed',
    );
    finished(e);
    call.cancel();
    if (!following) return;
    this.followAgain();
    this.emit('error', e);
  }

  /** Stops following the current subscription and follows again after the retry delay (which then doubles). */
  private followAgain(): void {
    this.sub = null;
    const delay = this.followRetryMs;
    this.followRetryMs = Math.min(this.followRetryMs * 2, FOLLOW_RETRY_MAX_MS);
    setTimeout(() => this.role === 'STANDBY' && this.connected && !this.sub && this.follow(), delay).unref();
  }

  private async applyEvent(ev: SubscribeEvent): Promise<void> {
    if (ev.change) {
      const c = ev.change;
      const t = this.table(c.table);
      if (c.seq !== t.seq + 1) throw new Error(`change ${c.table}/${c.seq} does not follow local sequence ${t.seq}`);
      t.append(c.records);
      t.seq = c.seq;
      this.queueAck(c.table, c.seq);
      this.emit('change', c.table, c.seq, c.count);
    } else if (ev.snapshot) {
      this.emit('snapshot-begin', ev.snapshot.table, ev.snapshot.seq, ev.snapshot.records);
      await this.loadSnapshot(ev.snapshot);
      this.queueAck(ev.snapshot.table, ev.snapshot.seq);
      this.emit('snapshot', ev.snapshot.table, ev.snapshot.seq, ev.snapshot.records);
    } else if (ev.reset) {
      const t = this.table(ev.reset.table);
      t.records.clear();
      t.seq = ev.reset.seq;
      this.queueAck(ev.reset.table, ev.reset.seq);
    } else if (ev.caughtUp) {
      this.emit('caughtUp', ev.caughtUp.tableSeqs);
    }
  }

  /** Acks are coalesced per table and sent once the queued events are applied. */
  private queueAck(table: string, seq: number): void {
    if (!this.ackStream) return;
    this.pendingAcks.set(table, seq);
    if (this.ackScheduled) return;
    this.ackScheduled = true;
    setImmediate(() => {
      this.ackScheduled = false;
      for (const [t, s] of this.pendingAcks) this.ackStream?.write({ sessionId: this.sessionId, table: t, seq: s });
      this.pendingAcks.clear();
    });
  }

  private async loadSnapshot(ticket: BulkTicket): Promise<void> {
    const t = this.table(ticket.table);
    t.records.clear();
    // The table holds nothing now: if the load fails, the next subscription must not resume from
    // the sequence it had (it would apply later batches to an empty table).
    t.seq = 0;
    // Sized and paged in before the first byte is asked for (see RecordTable.presize).
    await t.records.presize(ticket.records);
    return new Promise<void>((resolve, reject) => {
      // The socket reads straight into the table: each frame's header into `header`, its records
      // into the room the table reserved for them at the end of its log (Node's onread: the
      // kernel copies there, with no buffer of the socket's own in between, which cost a copy of
      // the whole table and ~2,000 64 KiB allocations per million records for the GC to find).
      // Records are applied as they arrive, a read of at most SNAPSHOT_READ_BYTES at a time and
      // at most SNAPSHOT_TURN_BYTES in one turn of the event loop; applying overlaps receiving.
      const header = Buffer.alloc(8);
      let headerFilled = 0;
      let frame: Buffer | null = null;
      let frameCount = 0;
      let filled = 0;
      let received = 0;
      let done = false;
      let failed = false;
      /** Bytes read since the socket last paused (see the read callback). */
      let sinceTurn = 0;
      const fail = (e: Error) => {
        failed = true;
        sock.destroy();
        reject(e);
      };
      /** Where the next read goes: the rest of the frame being filled, else of the next header. */
      const nextRoom = (): Buffer => (frame ? frame.subarray(filled, Math.min(frame.length, filled + SNAPSHOT_READ_BYTES)) : header.subarray(headerFilled));
      /** `n` bytes arrived in nextRoom(). */
      const arrived = (n: number): void => {
        if (done) return; // bytes after the end frame: nothing sane sends them; close decides
        if (frame) {
          filled += n;
          try {
            if (filled < frame.length) return t.records.appendReservedPart(filled);
            t.records.appendReserved(frame.length);
          } catch (e) {
            done = true;
            return fail(new Error(`applying the snapshot of '${ticket.table}' failed: ${(e as Error).message}`));
          }
          received += frameCount;
          frame = null;
          return;
        }
        headerFilled += n;
        if (headerFilled < header.length) return;
        headerFilled = 0;
        const len = header.readUInt32BE(0);
        frameCount = header.readUInt32BE(4);
        if (len === 0) {
          done = true;
          if (frameCount !== received || received !== ticket.records) {
            fail(new Error(`snapshot of '${ticket.table}' ended after ${received} records, expected ${ticket.records}`));
          }
          return;
        }
        try {
          frame = t.records.reserveAppend(len);
        } catch (e) {
          done = true; // a length no buffer can take (RangeError): nothing sane follows
          return fail(new Error(`snapshot of '${ticket.table}' sent a frame of ${len} bytes: ${(e as Error).message}`));
        }
        filled = 0;
      };
      let sock: net.Socket;
      try {
        sock = this.channels.connect(ticket.unixPath, ticket.tcpAddress, {
          buffer: nextRoom,
          callback: (n) => {
            arrived(n);
            // libuv reads on while the kernel has more (up to 32 reads in one go): past
            // SNAPSHOT_TURN_BYTES the socket pauses until the next turn, so timers and other
            // sockets get theirs (false pauses it).
            sinceTurn += n;
            if (sinceTurn < SNAPSHOT_TURN_BYTES) return true;
            sinceTurn = 0;
            setImmediate(() => {
              if (!sock.destroyed) sock.resume();
            });
            return false;
          },
        });
      } catch (e) {
        return reject(e as Error);
      }
      sock.on('connect', () => sock.write(ticket.token));
      sock.on('error', (e) => fail(new Error(`bulk snapshot connection failed: ${e.message}`)));
      sock.on('close', () => {
        if (!done) return fail(new Error(`bulk snapshot of '${ticket.table}' closed after ${received} of ${ticket.records} records`));
        if (failed) return; // the table keeps sequence 0: the next subscription loads it again
        t.seq = ticket.seq;
        resolve();
      });
    });
  }

  /** Values of other schema versions -> native, through a registered transform when there is one. */
  private toNative(schema: number, value: Buffer): Buffer {
    if (schema === this.opts.schema) return value;
    const f = this.opts.transforms?.[`${schema}->${this.opts.schema}`];
    return f ? f(value) : value; // without a transform the version is readable as is (`reads`)
  }

  // ------------------------------------------------------------------ queries

  /** sha256 over the table's records (key, schema, value) in key order: equal digests mean equal tables. */
  digest(table: string): { records: number; seq: number; sha256: string } {
    return { ...tableDigest(this.table(table).records), seq: this.table(table).seq };
  }

  /**
   * digest(), computed a few milliseconds at a time: the event loop keeps serving meanwhile (a
   * synchronous digest of a 2M-record table held it for about 7 s, long enough for the agent to
   * drop the connection). The table must not change meanwhile; if it does, the digest starts over.
   */
  async digestInSlices(table: string): Promise<{ records: number; seq: number; sha256: string }> {
    const t = this.table(table);
    const d = await tableDigestSliced(t.records);
    return { ...d, seq: t.seq }; // read on resuming: the sequence of the state digested
  }

  /** digest() of every table, computed in slices (the event loop keeps serving meanwhile). */
  private async digestAll(): Promise<{ table: string; records: number; seq: number; sha256: string }[]> {
    const out = [];
    for (const [name, t] of this.tables) {
      const d = await tableDigestSliced(t.records);
      // Read on resuming, before any I/O callback could apply a change: the sequence of the
      // state the digest describes (a change during the digest made it start over).
      out.push({ table: name, seq: t.seq, ...d });
    }
    return out;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.cancelWriteRetry();
    this.writeStream?.end();
    this.dropSpareWriteStream();
    this.ackStream?.end();
    this.sub?.cancel();
    this.session?.end();
    this.session = null;
    this.stub.close();
  }
}
