/**
 * A router's network on this host, from network namespaces and veth pairs, for the demo, the
 * tests and the FIB benchmark:
 *
 *   sender ns            data-plane ns (forwards IPv4 and IPv6)            receiver ns
 *   eth0 192.0.2.2/24 -- port1 192.0.2.1/24        port2 198.51.100.1/24 -- eth0 198.51.100.2/24
 *        2001:db8:1::2/64    2001:db8:1::1/64            2001:db8:2::1/64        2001:db8:2::2/64
 *
 * The receiver accepts every address of 198.18.0.0/15 and 2001:db8:100::/40 (local routes on its
 * loopback): the destinations the example routing daemon publishes in its FIB, next hop the
 * receiver on port2. The data plane has no route to them until the agent programs one, so
 * traffic that arrives proves the routes are there. The sender's default routes point at the
 * data plane.
 *
 * The control plane's link: bridge `cpbr` in the data plane, 203.0.113.1/24, which the agent joins
 * every control-plane VM's tap to (hitlessd --cp-bridge); the active guest is 203.0.113.2
 * (agentArgs() gives the flags).
 *
 * Every address is from the documentation and benchmarking ranges (RFC 5737, RFC 2544, RFC 3849)
 * and exists only inside these namespaces. Names carry a random suffix, so runs do not collide;
 * remove() deletes the namespaces (and with them every veth); call it in `finally`.
 */
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import { onInterrupt } from './interrupt-cleanup';

export interface NetLab {
  /** The data-plane namespace: give it to the agent as --dataplane netns:NAME. */
  dataplane: string;
  sender: string;
  receiver: string;
  /** Front-panel ports of the data plane. */
  ports: { toSender: string; toReceiver: string };
  /** The receiver's addresses on port2's link: next hops of the FIB. */
  nextHop4: string;
  nextHop6: string;
  /** The control plane's link (see the header). */
  cp: { bridge: string; gateway: string; guest: string };
  /** hitlessd flags that make the agent program this data plane and give VMs their NIC here. */
  agentArgs(): string[];
  remove(): void;
}

/** What the example routing daemon's --fib flag publishes by default (see examples/common/fib-routes.ts). */
export const LAB_DEST4 = '198.18.0.0/15';
export const LAB_DEST6 = '2001:db8:100::/40';
/** What the BGP peer in the receiver namespace announces (harness/bird-peer.ts birdPrefixes). */
export const LAB_PEER_DEST4 = '10.0.0.0/8';
export const LAB_PEER_DEST6 = '2001:db8:f000::/36';

function ip(args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 });
}

function sysctl(ns: string, key: string, value: string): void {
  execFileSync('ip', ['netns', 'exec', ns, 'sysctl', '-q', '-w', `${key}=${value}`], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 });
}

/** Whether namespaces and veths can be made here (root, iproute2). */
export function netLabAvailable(): { ok: boolean; reason: string } {
  if (process.getuid && process.getuid() !== 0) return { ok: false, reason: 'needs root (network namespaces)' };
  const probe = `hl-probe-${crypto.randomBytes(3).toString('hex')}`;
  try {
    ip(['netns', 'add', probe]);
    ip(['-n', probe, 'link', 'add', 'probe0', 'type', 'veth', 'peer', 'name', 'probe1']);
    return { ok: true, reason: '' };
  } catch (e) {
    return { ok: false, reason: ((e as { stderr?: Buffer }).stderr?.toString() || (e as Error).message).trim() };
  } finally {
    try {
      ip(['netns', 'del', probe]);
    } catch {
      // it was not created
    }
  }
}

export function createNetLab(): NetLab {
  const id = crypto.randomBytes(3).toString('hex');
  // Stopped by a signal: the namespaces go (their veths with them).
  const unregister = onInterrupt(() => lab.remove());
  const lab: NetLab = {
    dataplane: `hl-dp-${id}`,
    sender: `hl-tx-${id}`,
    receiver: `hl-rx-${id}`,
    ports: { toSender: 'port1', toReceiver: 'port2' },
    nextHop4: '198.51.100.2',
    nextHop6: '2001:db8:2::2',
    cp: { bridge: 'cpbr', gateway: '203.0.113.1', guest: '203.0.113.2' },
    agentArgs: () => [
      '--dataplane',
      `netns:${lab.dataplane}`,
      '--cp-bridge',
      lab.cp.bridge,
      '--cp-address',
      `${lab.cp.guest}/24`,
      '--cp-gateway',
      lab.cp.gateway,
    ],
    remove: () => {
      unregister();
      for (const ns of [lab.sender, lab.receiver, lab.dataplane]) {
        try {
          ip(['netns', 'del', ns]);
        } catch {
          // already gone, or never made
        }
      }
    },
  };
  try {
    for (const ns of [lab.dataplane, lab.sender, lab.receiver]) {
      ip(['netns', 'add', ns]);
      ip(['-n', ns, 'link', 'set', 'lo', 'up']);
      // No duplicate address detection on links made from here on (link-local addresses too):
      // an address is usable at once, and traffic started right after setup is not dropped
      // while neighbours wait a second for their addresses to become valid.
      sysctl(ns, 'net.ipv6.conf.default.accept_dad', '0');
      sysctl(ns, 'net.ipv6.conf.all.accept_dad', '0');
    }
    const dp = lab.dataplane;
    // A veth made in the data plane with its peer moved straight into the neighbour.
    ip(['-n', dp, 'link', 'add', 'port1', 'type', 'veth', 'peer', 'name', 'eth0', 'netns', lab.sender]);
    ip(['-n', dp, 'link', 'add', 'port2', 'type', 'veth', 'peer', 'name', 'eth0', 'netns', lab.receiver]);
    sysctl(dp, 'net.ipv4.ip_forward', '1');
    sysctl(dp, 'net.ipv6.conf.all.forwarding', '1');
    // A port that goes down keeps its IPv6 addresses, as IPv4 ones are kept (routers want this:
    // the port's subnet comes back with its link).
    sysctl(dp, 'net.ipv6.conf.all.keep_addr_on_down', '1');
    const addr = (ns: string, dev: string, a: string) => ip(['-n', ns, 'addr', 'add', a, 'dev', dev, ...(a.includes(':') ? ['nodad'] : [])]);
    addr(dp, 'port1', '192.0.2.1/24');
    addr(dp, 'port1', '2001:db8:1::1/64');
    addr(dp, 'port2', '198.51.100.1/24');
    addr(dp, 'port2', '2001:db8:2::1/64');
    addr(lab.sender, 'eth0', '192.0.2.2/24');
    addr(lab.sender, 'eth0', '2001:db8:1::2/64');
    addr(lab.receiver, 'eth0', '198.51.100.2/24');
    addr(lab.receiver, 'eth0', '2001:db8:2::2/64');
    for (const [ns, dev] of [
      [dp, 'port1'],
      [dp, 'port2'],
      [lab.sender, 'eth0'],
      [lab.receiver, 'eth0'],
    ]) {
      ip(['-n', ns, 'link', 'set', dev, 'up']);
    }
    ip(['-n', dp, 'link', 'add', lab.cp.bridge, 'type', 'bridge']);
    addr(dp, lab.cp.bridge, `${lab.cp.gateway}/24`);
    ip(['-n', dp, 'link', 'set', lab.cp.bridge, 'up']);
    ip(['-n', lab.sender, 'route', 'add', 'default', 'via', '192.0.2.1']);
    ip(['-n', lab.sender, '-6', 'route', 'add', 'default', 'via', '2001:db8:1::1']);
    // No default route in the receiver: it reaches the sender's network only through what a BGP
    // peer there (BIRD) learns from the router, so traffic that way proves those routes. It does
    // reach the control plane's link (the BGP session of a guest runs over it).
    ip(['-n', lab.receiver, 'route', 'add', '203.0.113.0/24', 'via', '198.51.100.1']);
    ip(['-n', lab.receiver, 'route', 'add', 'local', LAB_DEST4, 'dev', 'lo']);
    ip(['-n', lab.receiver, '-6', 'route', 'add', 'local', LAB_DEST6, 'dev', 'lo']);
    // And the prefixes a BGP peer there announces (harness/bird-peer.ts): traffic to them ends here.
    ip(['-n', lab.receiver, 'route', 'add', 'local', LAB_PEER_DEST4, 'dev', 'lo']);
    ip(['-n', lab.receiver, '-6', 'route', 'add', 'local', LAB_PEER_DEST6, 'dev', 'lo']);
    return lab;
  } catch (e) {
    lab.remove();
    const stderr = (e as { stderr?: Buffer }).stderr?.toString().trim();
    throw new Error(`could not build the test network: ${stderr || (e as Error).message}`);
  }
}
