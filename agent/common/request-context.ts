/**
 * Request ids. Every RPC gets one (the caller's `x-request-id` when usable, else the agent's
 * own), returned in the `x-request-id` response header and written on the agent's log lines
 * about that call, so an operator can quote it and find what the agent did.
 *
 * The id is attached to the call object rather than carried in AsyncLocalStorage: on Node 20
 * that turns on promise hooks for the whole process, which measurably slowed the checkpoint
 * data path (about 5-10% fewer records/s and +0.1 ms median SYNC latency in bench/).
 */
import crypto from 'node:crypto';

/** Ids a client may pass in `x-request-id` (NMS correlation ids); anything else is replaced. */
const CLIENT_ID = /^[A-Za-z0-9._:-]{1,64}$/;
/** Per agent run, so ids from two runs never collide in one log file. */
const RUN = crypto.randomBytes(3).toString('hex');
let next = 0;
const ids = new WeakMap<object, string>();

export function requestIdFor(clientSupplied: unknown): string {
  if (typeof clientSupplied === 'string' && CLIENT_ID.test(clientSupplied)) return clientSupplied;
  return `${RUN}-${(++next).toString(36)}`;
}

export function tagCall(call: object, rid: string): void {
  ids.set(call, rid);
}

/** The request id of a call being served (undefined for calls that did not pass the server's wrapper). */
export function requestIdOf(call: object | undefined): string | undefined {
  return call ? ids.get(call) : undefined;
}
