/**
 * The checkpoint domain: process sessions and roles, the authoritative table replicas, writes,
 * subscriptions, acknowledgements, readiness and switchover. Transports (gRPC) call this; it
 * reaches the outside only through the CheckpointStore port and the BulkServer.
 *
 * This class wires the parts and answers for them. The data path reads top to bottom through
 * them: sessions.ts (register, who may write which schema) -> write-path.ts (validate, store,
 * apply to the replica, hand to subscribers) -> the store's writer thread
 * (store/batch-log-writer.ts) -> replication.ts (standbys subscribe, snapshots over the bulk
 * socket, acks, READY) -> sync-acks.ts (SYNC batches wait for the in-sync standbys). Beside
 * them: process-group.ts (the state), role-changes.ts (switchover, failover, audit),
 * compaction.ts (trimming the store's log), status.ts.
 *
 * Invariants:
 * - At most one ACTIVE session per process name. Only the agent changes roles (switchover).
 * - A batch is acknowledged only after it is in the store and applied here; SYNC batches also wait
 *   for every in-sync standby. A rejected batch changes nothing.
 * - Per table the sequence grows by exactly one per batch; the log in the store holds every batch
 *   since the last snapshot, so standbys and restarts replay from it.
 */
import { Logger } from '../common/logger';
import { CheckpointStore } from '../store/checkpoint-store';
import { BulkServer } from './bulk-server';
import {
  AckRequest,
  AuditResponse,
  CommandResult,
  ProcessStatus,
  Register,
  Registered,
  SessionNotice,
  SubscribeRequest,
  SwitchoverResponse,
  WriteAck,
  WriteRequest,
} from './messages';
import { CheckpointObserver, NO_CHECKPOINT_OBSERVER } from './checkpoint-observer';
import { CheckpointOptions, DEFAULT_CHECKPOINT_OPTIONS } from './checkpoint-options';
import { Compactor } from './compaction';
import { CheckpointState, PeerSession, ProcessGroup, SessionChannel, durabilityName, groupOf, kindName, sessionFor } from './process-group';
import { ForwardingSink, NO_FORWARDING_SINK } from './forwarding-sink';
import { Replication } from './replication';
import { RoleChanges, SwitchoverHooks } from './role-changes';
import { ReportedSession, Sessions } from './sessions';
import { processStatus } from './status';
import { SubscriberStream, Subscription } from './subscription';
import { TableReplica } from './table-replica';
import { WritePath } from './write-path';

export { CheckpointOptions, DEFAULT_CHECKPOINT_OPTIONS } from './checkpoint-options';
export { SessionChannel } from './process-group';
export { ReportedSession } from './sessions';

export class CheckpointService {
  private readonly groups = new Map<string, ProcessGroup>();
  private readonly sessions = new Map<string, PeerSession>();
  private readonly st: CheckpointState;
  private readonly roles: RoleChanges;
  private readonly compactor: Compactor;
  private readonly writes: WritePath;
  private readonly peers: Sessions;
  private readonly replication: Replication;

  constructor(
    private readonly store: CheckpointStore,
    bulk: BulkServer,
    log: Logger,
    readonly opts: CheckpointOptions = DEFAULT_CHECKPOINT_OPTIONS,
  ) {
    this.st = { groups: this.groups, sessions: this.sessions, store, log, opts, observer: NO_CHECKPOINT_OBSERVER, forwarding: NO_FORWARDING_SINK };
    this.roles = new RoleChanges(this.st);
    this.compactor = new Compactor(this.st);
    this.writes = new WritePath(this.st, this.compactor);
    this.peers = new Sessions(this.st, this.writes);
    this.replication = new Replication(this.st, bulk);
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
      const g = groupOf(this.st, t.process);
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
      replica.lastWriter = replica.handedWriter = t.lastWriter;
      replica.table.forEach((_k, schema) => replica.schemas.add(schema));
      g.tables.set(t.name, { replica, durability: durabilityName(t.durability), kind: kindName(t.kind) });
      if (t.kind === 1) this.st.forwarding.claim(t.process, t.name, replica);
      records += replica.records;
    }
    return { tables: tables.length, records };
  }

  // ---------------------------------------------------------------- sessions (sessions.ts)

  /**
   * Registers a process instance. `peerVm` is the VM the connection provably comes from (per-VM
   * socket), or null for host-local connections, which may claim any VM.
   */
  register(reg: Register, channel: SessionChannel, peerVm: string | null): Registered {
    return this.peers.register(reg, channel, peerVm);
  }

  /** Throws unless `sessionId` is a live session that a connection from `peerVm` may act for. */
  checkSession(sessionId: string, peerVm: string | null): void {
    sessionFor(this.st, sessionId, peerVm);
  }

  /** The session stream ended: the process is gone (or will reconnect with a new session). */
  unregister(sessionId: string, reason: string): void {
    this.peers.unregister(sessionId, reason);
  }

  /** A process's account of one of its protocol sessions (hitless.v1.SessionNotice). */
  sessionNotice(sessionId: string, n: SessionNotice): void {
    this.peers.sessionNotice(sessionId, n);
  }

  /** Registers a listener for every SessionNotice (see sessionNotice). */
  onSessionNotice(l: (r: ReportedSession) => void): void {
    this.peers.onSessionNotice(l);
  }

  commandResult(sessionId: string, r: CommandResult): void {
    this.peers.commandResult(sessionId, r);
  }

  // ---------------------------------------------------------------- writes (write-path.ts)

  /**
   * Validates, stores and applies one batch. Resolves with the ack when the batch's durability is
   * met; rejects when the store refused it (nothing of it applied). Throws (synchronously, before
   * changing anything) on bad input.
   */
  write(req: WriteRequest, peerVm: string | null): Promise<WriteAck> {
    return this.writes.write(req, peerVm);
  }

  // ---------------------------------------------------------------- standbys (replication.ts)

  subscribe(req: SubscribeRequest, stream: SubscriberStream, peerVm: string | null): Subscription {
    return this.replication.subscribe(req, stream, peerVm);
  }

  ack(req: AckRequest, peerVm: string | null): void {
    this.replication.ack(req, peerVm);
  }

  status(process: string): ProcessStatus[] {
    return processStatus(this.st, process);
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

  /** Ends every session (agent shutdown). */
  closeAll(): void {
    for (const s of [...this.sessions.values()]) {
      s.subscription?.end();
      s.channel.close();
      this.unregister(s.id, 'agent shutting down');
    }
  }
}
