/**
 * Domain errors carry the gRPC status code that transports answer with and a sentence for a
 * person: what was wrong and what to do next. Domain code throws these; transports map them.
 */
import { status } from '@grpc/grpc-js';

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
