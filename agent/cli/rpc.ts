/**
 * The unary call every issu command makes: a deadline of `timeoutMs`, the answer or the gRPC
 * error. With `waitForReady`, an agent that is not listening yet (starting, recovering) is
 * waited for until the deadline instead of failing the call at once.
 */
import * as grpc from '@grpc/grpc-js';

export type Stub = grpc.Client & Record<string, (...a: unknown[]) => unknown>;

export function call<T>(stub: Stub, method: string, req: unknown, timeoutMs: number, opts: { waitForReady?: boolean } = {}): Promise<T> {
  return new Promise<T>((resolve, reject) =>
    (stub[method] as (r: unknown, m: grpc.Metadata, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, v: T) => void) => void).call(
      stub,
      req,
      new grpc.Metadata({ waitForReady: !!opts.waitForReady }),
      { deadline: Date.now() + timeoutMs },
      (e, v) => (e ? reject(e) : resolve(v)),
    ),
  );
}
