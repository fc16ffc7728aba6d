/**
 * TypeScript shapes of the hitless.v1.Checkpoint messages as @grpc/proto-loader hands them over
 * with the options in agent/grpc/proto.ts (camelCase fields, enums as strings, uint64 as number,
 * defaults filled, oneofs named by their `msg` field). Sequences stay far below 2^53.
 */
export type Role = 'ROLE_UNSPECIFIED' | 'ACTIVE' | 'STANDBY';
export type Durability = 'DURABILITY_UNSPECIFIED' | 'ASYNC' | 'SYNC';
export type CommandKind = 'KIND_UNSPECIFIED' | 'PROMOTE' | 'DEMOTE' | 'FREEZE' | 'UNFREEZE' | 'REPORT' | 'SET_WRITE_SCHEMA';

export type TableKind = 'TABLE_KIND_UNSPECIFIED' | 'FIB';

export interface TableSpec {
  name: string;
  durability: Durability;
  /** Absent or TABLE_KIND_UNSPECIFIED: opaque records. */
  kind?: TableKind;
}

export interface Register {
  process: string;
  instanceId: string;
  vmId: string;
  softwareVersion: string;
  schemaWrites: number;
  schemaReads: number[];
  wantedRole: Role;
  tables: TableSpec[];
  schemaCanWrite: number[];
  /** Registered before (agent restart, lost connection): join as STANDBY when another is ACTIVE. */
  rejoin: boolean;
}

export interface TableDigest {
  table: string;
  seq: number;
  records: number;
  sha256: string;
}

export interface CommandResult {
  commandId: number;
  ok: boolean;
  error: string;
  tableSeqs: Record<string, number>;
  digests: TableDigest[];
  /** Time the process spent on the command (µs), as it reports it; 0 from older processes. */
  handledMicros?: number;
}

export interface PeerDigests {
  instanceId: string;
  vmId: string;
  role: Role;
  digests: TableDigest[];
}

export interface AuditResponse {
  agent: TableDigest[];
  peers: PeerDigests[];
  consistent: boolean;
  detail: string;
}

export type SessionOutcome = 'OUTCOME_UNSPECIFIED' | 'NONSTOP' | 'GRACEFUL_RESTART' | 'RESET';

/** hitless.v1.SessionNotice: how a protocol session fared at a change of active instance. */
export interface SessionNotice {
  session: string;
  outcome: SessionOutcome;
  durationMs: number;
  detail: string;
}

export interface SessionRequest {
  register?: Register;
  result?: CommandResult;
  heartbeat?: Record<string, never>;
  notice?: SessionNotice;
  msg?: 'register' | 'result' | 'heartbeat' | 'notice';
}

export interface Registered {
  sessionId: string;
  role: Role;
  tableSeqs: Record<string, number>;
  activeSchema: number;
  writeSchema: number;
  /** Per table, the instance that wrote its last batch ('' unknown); absent from an older agent. */
  tableWriters?: Record<string, string>;
}

export interface RoleCommand {
  commandId: number;
  kind: CommandKind;
  reason: string;
  tableSeqs: Record<string, number>;
  writeSchema: number;
  /** FREEZE: a switchover follows (see the proto). */
  handover?: boolean;
}

export interface SessionResponse {
  registered?: Registered;
  command?: RoleCommand;
}

export interface WriteRequest {
  sessionId: string;
  table: string;
  seq: number;
  records: Buffer;
  count: number;
}

export interface WriteAck {
  table: string;
  seq: number;
}

export type SubscribeMode = 'MODE_UNSPECIFIED' | 'FOLLOW' | 'RECOVER';

export interface SubscribeRequest {
  sessionId: string;
  have: Record<string, number>;
  mode: SubscribeMode;
}

export interface BulkTicket {
  table: string;
  seq: number;
  records: number;
  unixPath: string;
  tcpAddress: string;
  token: Buffer;
}

export interface ChangeBatch {
  table: string;
  seq: number;
  records: Buffer;
  count: number;
}

export interface SubscribeEvent {
  snapshot?: BulkTicket;
  change?: ChangeBatch;
  reset?: { table: string; seq: number };
  caughtUp?: { tableSeqs: Record<string, number> };
  msg?: 'snapshot' | 'change' | 'reset' | 'caughtUp';
}

/** OpenChannel's request: one of the two kinds (see checkpoint.frames.ts). */
export interface ChannelRequest {
  write?: { sessionId: string };
  subscribe?: SubscribeRequest;
  kind?: 'write' | 'subscribe';
}

export interface ChannelTicket {
  unixPath: string;
  tcpAddress: string;
  token: Buffer;
}

export interface AckRequest {
  sessionId: string;
  table: string;
  seq: number;
}

export interface TableStatus {
  name: string;
  seq: number;
  records: number;
  bytes: number;
  durability: Durability;
  schemas: number[];
  kind: TableKind;
}

export interface PeerStatus {
  sessionId: string;
  instanceId: string;
  vmId: string;
  softwareVersion: string;
  schemaWrites: number;
  schemaReads: number[];
  role: Role;
  frozen: boolean;
  ready: boolean;
  acked: Record<string, number>;
  lag: number;
  /** Standby: records of its bulk snapshots written to it so far, of the total (0 of 0 when none streams). */
  snapshotRecordsSent: number;
  snapshotRecordsTotal: number;
}

export interface ProcessStatus {
  process: string;
  tables: TableStatus[];
  peers: PeerStatus[];
}

export interface SwitchoverResponse {
  freezeMicros: number;
  tableSeqs: Record<string, number>;
}

export interface StatusResponse {
  processes: ProcessStatus[];
}
