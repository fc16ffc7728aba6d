/**
 * The request id of the RPC being served, carried through its async work with AsyncLocalStorage,
 * so every log line a call causes (in the transport or deep in a domain service) names it, and
 * the caller gets the same id back in the `x-request-id` response header to quote in a report.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import crypto from 'node:crypto';

export interface RequestContext {
  rid: string;
  method: string;
}

export const requestContext = new AsyncLocalStorage<RequestContext>();

/** Ids a client may pass in `x-request-id` (NMS correlation ids); anything else is replaced. */
const CLIENT_ID = /^[A-Za-z0-9._:-]{1,64}$/;
/** Per agent run, so ids from two runs never collide in one log file. */
const RUN = crypto.randomBytes(3).toString('hex');
let next = 0;

export function requestIdFor(clientSupplied: unknown): string {
  if (typeof clientSupplied === 'string' && CLIENT_ID.test(clientSupplied)) return clientSupplied;
  return `${RUN}-${(++next).toString(36)}`;
}

export function currentRequestId(): string | undefined {
  return requestContext.getStore()?.rid;
}
