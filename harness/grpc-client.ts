/**
 * Raw gRPC access to the agent for tests that must send what the SDK never would (bad input),
 * and promise wrappers for unary calls.
 */
import * as grpc from '@grpc/grpc-js';
import { clientCtor } from '../agent/grpc/proto';

export type AnyClient = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

export function rawClient(service: string, socket: string): AnyClient {
  const Ctor = clientCtor(service);
  return new Ctor(`unix:${socket}`, grpc.credentials.createInsecure()) as unknown as AnyClient;
}

export function unaryCall<T>(client: AnyClient, method: string, req: unknown): Promise<T> {
  return new Promise<T>((resolve, reject) =>
    (client[method] as (r: unknown, cb: (e: grpc.ServiceError | null, v: T) => void) => void).call(client, req, (e, v) => (e ? reject(e) : resolve(v))),
  );
}

/** Resolves with the error of a call expected to fail. */
export async function expectStatus(p: Promise<unknown>, code: grpc.status, match?: RegExp): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (e) {
    const err = e as grpc.ServiceError;
    if (err.code !== code) throw new Error(`expected ${grpc.status[code]}, got ${grpc.status[err.code]}: ${err.details}`);
    if (match && !match.test(err.details)) throw new Error(`status message '${err.details}' does not match ${match}`);
    return err;
  }
  throw new Error(`expected ${grpc.status[code]}, but the call succeeded`);
}

/**
 * A Register message for raw Session calls: bgp@vm1, version 1.0.0 writing and reading schema 1,
 * ACTIVE with one ASYNC table 'rib'; `over` replaces any field.
 */
export const registration = (over: Record<string, unknown> = {}): Record<string, unknown> => ({
  process: 'bgp',
  instanceId: 'bgp@vm1',
  vmId: 'vm1',
  softwareVersion: '1.0.0',
  schemaWrites: 1,
  schemaReads: [1],
  wantedRole: 'ACTIVE',
  tables: [{ name: 'rib', durability: 'ASYNC' }],
  ...over,
});

/** Opens a Session stream and registers; resolves with the Registered message and the stream. */
export function registerRaw(
  client: AnyClient,
  reg: Record<string, unknown>,
): Promise<{ registered: Record<string, unknown> & { sessionId: string }; call: grpc.ClientDuplexStream<unknown, Record<string, unknown>> }> {
  const call = (client.Session as () => grpc.ClientDuplexStream<unknown, Record<string, unknown>>).call(client);
  return new Promise((resolve, reject) => {
    call.once('data', (m) => resolve({ registered: m.registered as Record<string, unknown> & { sessionId: string }, call }));
    call.once('error', reject);
    call.write({ register: reg });
  });
}

/** A client of `service` over mutual TLS; `client` null connects without a certificate. */
export function tlsClient(service: string, address: string, caCert: string, client: { cert: string; key: string } | null): AnyClient {
  const Ctor = clientCtor(service);
  const creds = client
    ? grpc.credentials.createSsl(Buffer.from(caCert), Buffer.from(client.key), Buffer.from(client.cert))
    : grpc.credentials.createSsl(Buffer.from(caCert));
  // The test server certificate names localhost (and 127.0.0.1).
  return new Ctor(address, creds, { 'grpc.ssl_target_name_override': 'localhost' }) as unknown as AnyClient;
}
