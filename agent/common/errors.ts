/**
 * Domain errors carry the gRPC status code that transports answer with and a sentence for a
 * person: what was wrong and what to do next. Domain code throws these; transports map them.
 */
import { status } from '@grpc/grpc-js';
import { freeBytes } from './disk-space';

export type StatusName = keyof typeof status;

export class HitlessError extends Error {
  constructor(
    readonly code: status,
    message: string,
  ) {
    super(message);
    this.name = 'HitlessError';
  }

  get codeName(): string {
    return status[this.code];
  }
}

export const invalidArgument = (m: string) => new HitlessError(status.INVALID_ARGUMENT, m);
export const failedPrecondition = (m: string) => new HitlessError(status.FAILED_PRECONDITION, m);
export const notFound = (m: string) => new HitlessError(status.NOT_FOUND, m);
export const alreadyExists = (m: string) => new HitlessError(status.ALREADY_EXISTS, m);
export const outOfRange = (m: string) => new HitlessError(status.OUT_OF_RANGE, m);
export const resourceExhausted = (m: string) => new HitlessError(status.RESOURCE_EXHAUSTED, m);
export const permissionDenied = (m: string) => new HitlessError(status.PERMISSION_DENIED, m);
export const deadlineExceeded = (m: string) => new HitlessError(status.DEADLINE_EXCEEDED, m);
export const unavailable = (m: string) => new HitlessError(status.UNAVAILABLE, m);
export const aborted = (m: string) => new HitlessError(status.ABORTED, m);

/**
 * The refusal for a write the agent's state disk has no room for. The sentence names the
 * directory, so an operator knows which filesystem to free, and says what happens after.
 */
export const diskFull = (dir: string, then: string) => resourceExhausted(`the agent's state disk is full (${dir}): free space, then ${then}`);

/** SQLite I/O errors that a write into a full filesystem can also surface as (see isDiskFull). */
const SQLITE_WRITE_IOERRS = new Set(['SQLITE_IOERR_WRITE', 'SQLITE_IOERR_SHMSIZE', 'SQLITE_IOERR_TRUNCATE', 'SQLITE_IOERR_FSYNC']);

/**
 * Whether `err` means that the filesystem under `dir` ran out of space (or quota). Node reports
 * ENOSPC/EDQUOT; SQLite reports SQLITE_FULL for a write that hit ENOSPC, but extending its
 * shared-memory index or a file through other calls fails as an SQLITE_IOERR_* code, and
 * better-sqlite3 does not expose the errno behind it: those count when the filesystem has no
 * space left at that moment.
 */
export function isDiskFull(err: unknown, dir?: string): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'SQLITE_FULL') return true;
  if (typeof code !== 'string' || !SQLITE_WRITE_IOERRS.has(code) || !dir) return false;
  try {
    return freeBytes(dir) < 1024 * 1024;
  } catch {
    return false;
  }
}
