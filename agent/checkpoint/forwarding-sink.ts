/**
 * How the checkpoint service hands FIB tables (TableSpec.kind FIB) to whoever programs the data
 * plane, without knowing it: the port agent/dataplane/fib.service.ts implements. The checkpoint
 * service calls it on its one event loop, in this order for a batch: validate (before anything is
 * stored), then applied (after the batch is stored and in the replica).
 */
import type { TableReplica } from './table-replica';

export interface ForwardingSink {
  /**
   * `process` owns FIB table `table` (declared by its active, or recovered from the store).
   * Throws (FAILED_PRECONDITION) when another process's table already feeds the data plane.
   */
  claim(process: string, table: string, replica: TableReplica): void;
  /** Checks every record of a batch; throws INVALID_ARGUMENT naming the first bad entry. */
  validate(table: string, seq: number, records: Buffer): void;
  /** The batch is stored and applied to the replica: program it. */
  applied(seq: number, records: Buffer): void;
}

/** No data plane: FIB tables are replicated like any other (their records still validated by format). */
export const NO_FORWARDING_SINK: ForwardingSink = {
  claim: () => undefined,
  validate: () => undefined,
  applied: () => undefined,
};
