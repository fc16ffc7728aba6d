/**
 * The data-plane port: what forwards packets while the control plane (the VMs) changes. The
 * agent is its only writer of routes; the FIB service (fib.service.ts) decides what to program
 * and talks to the data plane only through this interface, as the upgrade talks to QEMU only
 * through the Hypervisor port.
 *
 * The implementation here programs a Linux network namespace (or the host's own) with iproute2
 * (linux-data-plane.ts). A hardware router would implement the same port over its switch SDK or
 * let switchdev offload the kernel FIB it programs; nothing in fib.service.ts changes.
 */
import type { FibEntry } from './fib-entry';

export interface InterfaceAddress {
  family: 4 | 6;
  /** Address bytes (4 or 16) and prefix length of the subnet it is configured with. */
  bytes: Buffer;
  length: number;
  /** "198.51.100.1/24" */
  text: string;
}

export interface DataPlaneInterface {
  name: string;
  up: boolean;
  addresses: InterfaceAddress[];
}

/** One route to program: `entry` null removes the prefix. */
export interface RouteChange {
  prefix: string;
  entry: FibEntry | null;
}

export interface ApplyResult {
  /** Changes the data plane took (a removal of a route it did not hold counts as taken). */
  applied: number;
  /** Changes it refused, with its reason, in input order. */
  failed: { prefix: string; error: string }[];
}

export interface DataPlaneProbe {
  usable: boolean;
  /** Why not, in words an operator can act on; '' when usable. */
  reason: string;
}

export interface DataPlane {
  /** "network namespace hl-dp" or "host network namespace": for logs and status. */
  readonly target: string;
  /** Whether the agent can program it here (privileges, the namespace exists, iproute2). */
  probe(): Promise<DataPlaneProbe>;
  /** Its ports and their addresses (next hops are checked against them). */
  interfaces(): Promise<DataPlaneInterface[]>;
  /**
   * Calls `onChange` whenever a port or an address may have changed (the kernel's own
   * notifications), until the returned function is called: writes are validated against the
   * ports without reading them on the write path.
   */
  watchInterfaces(onChange: () => void): () => void;
  /**
   * Every route the agent programmed (and only those): canonical prefix -> its next hops as
   * nextHopsKey (fib-entry.ts) gives them.
   */
  readRoutes(): Promise<Map<string, string>>;
  /** Applies the changes in order; never partially silent: every refused change is in `failed`. */
  apply(changes: RouteChange[]): Promise<ApplyResult>;
  /**
   * Moves a control-plane VM's tap interface from the namespace of process `ownerPid` (QEMU's)
   * into the data plane and enslaves it to `bridge` (created when missing), up.
   */
  adoptTap(ownerPid: number, tap: string, bridge: string): Promise<void>;
}
