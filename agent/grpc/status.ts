/**
 * Maps thrown errors onto gRPC statuses. A HitlessError keeps its code and sentence; a full disk
 * that reached here unexplained still answers RESOURCE_EXHAUSTED (the operator can fix it, and a
 * client may retry); anything else is a bug on our side and answers INTERNAL without a stack
 * trace (the stack goes to the log).
 */
import * as grpc from '@grpc/grpc-js';
import { HitlessError, diskFull, isDiskFull } from '../common/errors';
import { Logger } from '../common/logger';
import { requestIdOf } from '../common/request-context';

export function toServiceError(err: unknown, log: Logger, method: string, call?: object): Partial<grpc.StatusObject> {
  if (err instanceof HitlessError) return { code: err.code, details: err.message };
  if (isDiskFull(err)) {
    // Node names the file it could not write; SQLite errors that were not mapped where they
    // happened do not, and the agent's files are all under its state directory.
    const where = (err as NodeJS.ErrnoException).path ?? "the agent's state directory";
    const e = diskFull(where, `retry ${method}`);
    return { code: e.code, details: e.message };
  }
  const rid = requestIdOf(call);
  log.error({ rid, method, err: err instanceof Error ? { message: err.message, stack: err.stack } : String(err) }, 'unexpected error in RPC handler');
  const msg = err instanceof Error ? err.message : String(err);
  return { code: grpc.status.INTERNAL, details: `internal error in ${method}: ${msg}; the agent log has details${rid ? ` (request id ${rid})` : ''}` };
}

/** Wraps a unary handler: exceptions and rejections become statuses; values become responses. */
export function unary<Req, Res>(
  log: Logger,
  method: string,
  fn: (req: Req, call: grpc.ServerUnaryCall<Req, Res>) => Res | Promise<Res>,
): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    let result: Res | Promise<Res>;
    try {
      result = fn(call.request, call);
    } catch (e) {
      callback(toServiceError(e, log, method, call) as grpc.ServiceError);
      return;
    }
    Promise.resolve(result).then(
      (res) => callback(null, res),
      (e) => callback(toServiceError(e, log, method, call) as grpc.ServiceError),
    );
  };
}

/** Ends a server stream with an error status. */
export function failStream(
  call: grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>,
  err: unknown,
  log: Logger,
  method: string,
): void {
  call.emit('error', toServiceError(err, log, method, call));
}
