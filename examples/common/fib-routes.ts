/**
 * The forwarding entries an example routing daemon publishes with --fib N: half of them IPv4 /24s
 * from 198.18.0.0/15, half IPv6 /64s from 2001:db8:100::/40 (benchmarking and documentation
 * ranges), each with one next hop on one data-plane port. With the defaults they point at the
 * receiver of the test network (harness/netlab.ts), which accepts every address of both ranges:
 * traffic to `trafficTargets(N)` is forwarded by these routes and by nothing else.
 *
 * The set is fixed (no churn): a route that does not change must not be touched by an upgrade,
 * and the traffic through it must not see one.
 */
import { FibEntry, encodeFibEntry } from '../../agent/dataplane/fib-entry';

/** The largest --fib: 512 IPv4 /24s fill 198.18.0.0/15. */
export const MAX_FIB_ROUTES = 1024;

export interface FibRouteOptions {
  via4: string;
  via6: string;
  dev: string;
}

export const DEFAULT_FIB_ROUTE_OPTIONS: FibRouteOptions = { via4: '198.51.100.2', via6: '2001:db8:2::2', dev: 'port2' };

/** Prefix i of the set: even i IPv4, odd i IPv6. */
function prefix(i: number): string {
  const n = i >> 1;
  // Canonical text (checkpoint.proto): the zero group before "::" is folded into it.
  return i % 2 === 0 ? `198.${18 + (n >> 8)}.${n & 255}.0/24` : n === 0 ? '2001:db8:100::/64' : `2001:db8:100:${n.toString(16)}::/64`;
}

export function* fibRoutes(count: number, o: FibRouteOptions = DEFAULT_FIB_ROUTE_OPTIONS): Generator<{ key: string; value: Buffer }> {
  if (count > MAX_FIB_ROUTES) throw new Error(`--fib ${count}: at most ${MAX_FIB_ROUTES} routes`);
  for (let i = 0; i < count; i++) {
    const entry: FibEntry = { nextHops: [{ gateway: i % 2 === 0 ? o.via4 : o.via6, interface: o.dev, weight: 1 }] };
    yield { key: prefix(i), value: encodeFibEntry(entry) };
  }
}

/** One address inside each route of fibRoutes(count): where test traffic goes. */
export function trafficTargets(count: number): string[] {
  const out: string[] = [];
  for (let i = 0; i < count; i++) {
    const p = prefix(i);
    out.push(p.includes(':') ? p.replace('/64', '1') : p.replace('.0/24', '.1'));
  }
  return out;
}
