/**
 * The checkpoint service's state: a ProcessGroup per process name (its tables' replicas, its
 * sessions, who is active, SYNC writes waiting for standbys), a PeerSession per registered
 * instance, and CheckpointState, what the service's parts (write path, SYNC acks, role changes,
 * compaction) share. Only these parts change it, on the agent's one event loop.
 */
import { HitlessError, failedPrecondition, permissionDenied } from '../common/errors';
import { Logger } from '../common/logger';
import { CheckpointStore } from '../store/checkpoint-store';
import { CheckpointObserver } from './checkpoint-observer';
import { CheckpointOptions } from './checkpoint-options';
import { CommandResult, Durability, Register, Role, RoleCommand, TableKind } from './messages';
import { ForwardingSink } from './forwarding-sink';
import { Subscription } from './subscription';
import { TableReplica } from './table-replica';

/** How the service talks back to a process over its session stream. */
export interface SessionChannel {
  send(cmd: RoleCommand): void;
  close(err?: HitlessError): void;
}

export interface PendingCommand {
  resolve: (r: CommandResult) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/** The schemas of `canWrite` that every one of `readers` reads, newest first. */
export function readableBy(canWrite: number[], readers: Iterable<PeerSession>): number[] {
  const rs = [...readers];
  return canWrite.filter((v) => rs.every((r) => r.reg.schemaReads.includes(v))).sort((a, b) => b - a);
}

export class PeerSession {
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

export interface GroupTable {
  replica: TableReplica;
  durability: Durability;
  /** FIB: validated on write and programmed into the data plane (ForwardingSink). */
  kind: TableKind;
}

export interface SyncWait {
  seq: number;
  waitFor: Set<string>;
  resolve: () => void;
  timer: NodeJS.Timeout;
}

export class ProcessGroup {
  readonly tables = new Map<string, GroupTable>();
  readonly sessions = new Set<PeerSession>();
  active: PeerSession | null = null;
  /** SYNC writes waiting for standbys, per table, in sequence order. */
  readonly syncWaits = new Map<string, SyncWait[]>();
  /** Re-checked after every standby ack and every applied batch (switchover and audit waits). */
  progressWaiters: (() => void)[] = [];
  private roleChange = false;
  private quietWaiters: (() => void)[] = [];

  /** A role change (switchover, failover, audit) is in progress; at most one at a time. */
  get switching(): boolean {
    return this.roleChange;
  }

  set switching(v: boolean) {
    this.roleChange = v;
    if (v) return;
    const waiters = this.quietWaiters;
    this.quietWaiters = [];
    for (const w of waiters) w();
  }

  /**
   * Settles once no role change is in progress. Background store work (compaction) waits for it
   * between its writes, so that the batches a freeze waits for are not queued on the store's
   * writer thread behind snapshot chunks and the WAL restarts they bring.
   */
  whenQuiet(): Promise<void> {
    return this.roleChange ? new Promise((resolve) => this.quietWaiters.push(resolve)) : Promise.resolve();
  }

  constructor(readonly name: string) {}

  standbys(): PeerSession[] {
    return [...this.sessions].filter((s) => s.role === 'STANDBY');
  }

  /** Per table, the instance that wrote its last applied batch ('' when not known). */
  tableWriters(): Record<string, string> {
    const out: Record<string, string> = {};
    for (const [n, t] of this.tables) out[n] = t.replica.lastWriter;
    return out;
  }

  /** Every table's current sequence. */
  tableSeqs(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [n, t] of this.tables) out[n] = t.replica.seq;
    return out;
  }

  /**
   * Settles once every batch of the process handed to the store so far is applied (or refused):
   * then tableSeqs() counts every batch that can still be acknowledged.
   */
  storesSettled(): Promise<void> {
    return Promise.all([...this.tables.values()].map((t) => t.replica.settled())).then(() => undefined);
  }

  /** Batches `s` has not acknowledged, summed over the tables. */
  lagOf(s: PeerSession): number {
    let lag = 0;
    for (const [name, t] of this.tables) lag += Math.max(0, t.replica.seq - (s.acked.get(name) ?? 0));
    return lag;
  }

  /** Runs the progress waiters (switchover and audit waits); each re-registers if not done. */
  wakeProgressWaiters(): void {
    if (this.progressWaiters.length === 0) return;
    const waiters = this.progressWaiters;
    this.progressWaiters = [];
    for (const w of waiters) w();
  }
}

/** What the parts of the checkpoint service share. `observer` is set once at wiring. */
export interface CheckpointState {
  readonly groups: Map<string, ProcessGroup>;
  readonly sessions: Map<string, PeerSession>;
  readonly store: CheckpointStore;
  readonly log: Logger;
  readonly opts: CheckpointOptions;
  observer: CheckpointObserver;
  /** Where FIB tables go (the data plane); set once at wiring, a no-op until then. */
  forwarding: ForwardingSink;
}

/**
 * The live session `sessionId`, which a connection from `peerVm` (null: host-local, any VM) may
 * act for; FAILED_PRECONDITION when there is none, PERMISSION_DENIED when it is another VM's.
 */
export function sessionFor(st: Pick<CheckpointState, 'sessions'>, sessionId: string, peerVm: string | null): PeerSession {
  const s = st.sessions.get(sessionId);
  if (!s) throw failedPrecondition(`unknown session '${sessionId}': register on the Session stream first and use the session_id it returns`);
  if (peerVm !== null && s.reg.vmId !== peerVm) {
    throw permissionDenied(`session '${sessionId}' belongs to VM '${s.reg.vmId}', not to this connection's VM '${peerVm}'`);
  }
  return s;
}

/** The group of process `name`, made on first mention. */
export function groupOf(st: Pick<CheckpointState, 'groups'>, name: string): ProcessGroup {
  let g = st.groups.get(name);
  if (!g) {
    g = new ProcessGroup(name);
    st.groups.set(name, g);
  }
  return g;
}

export function kindName(k: number): TableKind {
  return k === 1 ? 'FIB' : 'TABLE_KIND_UNSPECIFIED';
}

export function durabilityName(d: number): Durability {
  return d === 2 ? 'SYNC' : 'ASYNC';
}
