/**
 * Tunables of the checkpoint service, with the defaults hitlessd uses (flags override some, see
 * agent/config.ts), and the fixed sizes of its data path.
 */
import { DEFAULT_LIMITS, RecordLimits } from './records';

/** Bulk snapshot frames, bytes. */
export const SNAPSHOT_FRAME_BYTES = 1024 * 1024;
/**
 * Stored snapshot chunks, bytes: one is written per event-loop turn during store compaction, so
 * its size bounds the pause that compaction adds to acknowledgements (~1 ms here).
 */
export const STORE_CHUNK_BYTES = 256 * 1024;
/** Longest a switchover waits for the active's next batch before it freezes it, ms (see switchover). */
export const FREEZE_ALIGN_MS = 100;

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
  /**
   * OpenChannel serves frame channels (checkpoint.frames.ts); false answers UNIMPLEMENTED, as an
   * agent from before them did, and clients use the gRPC streams.
   */
  frameChannels: boolean;
}

export const DEFAULT_CHECKPOINT_OPTIONS: CheckpointOptions = {
  limits: DEFAULT_LIMITS,
  maxBatchBytes: 4 * 1024 * 1024 - 1024,
  stallTimeoutMs: 30_000,
  syncTimeoutMs: 5_000,
  commandTimeoutMs: 5_000,
  compactMinBytes: 256 * 1024 * 1024,
  subscriberWindowBytes: 32 * 1024 * 1024,
  frameChannels: true,
};
