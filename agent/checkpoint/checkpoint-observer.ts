/**
 * What the checkpoint path reports as it works, for metrics: the port through which the
 * checkpoint service reaches agent/metrics without knowing it. Durations are in seconds.
 */
export interface CheckpointObserver {
  /** A batch of a SYNC table was acknowledged to its writer: received -> every in-sync standby applied it. */
  syncAck(process: string, table: string, seconds: number): void;
  /** A batch was stored and applied (any durability). */
  recordsWritten(process: string, table: string, records: number): void;
  /** A switchover ended: its whole duration, the writers' freeze window inside it, and whether it succeeded. */
  switchover(process: string, seconds: number, freezeSeconds: number, ok: boolean): void;
  /** A bulk snapshot transfer to a standby ended. */
  bulkSnapshot(process: string, table: string, seconds: number, records: number, ok: boolean): void;
}

export const NO_CHECKPOINT_OBSERVER: CheckpointObserver = {
  syncAck: () => undefined,
  recordsWritten: () => undefined,
  switchover: () => undefined,
  bulkSnapshot: () => undefined,
};
