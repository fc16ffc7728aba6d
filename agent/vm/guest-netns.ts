/**
 * Runs QEMU in a network namespace of its own whose loopback routes carry `quickack 1`.
 *
 * Why: a guest reaches the agent through slirp's guestfwd, which starts socat per guest
 * connection and joins it to QEMU over a TCP connection on 127.0.0.1 (slirp wants a socket that
 * carries out-of-band data, so not a unix socket pair). Both ends of that connection have Nagle's
 * algorithm on, and Linux delays ACKs by up to 40 ms: a small message (a role command, or its
 * answer) written while the previous write was still unacknowledged waited for that delayed ACK.
 * Under TCG about a third of the role-command round trips took 35-45 ms longer than the rest, and
 * a switchover makes two of them while the writers are frozen.
 *
 * socat's end gets TCP_NODELAY from the guestfwd command (qemu-argv.ts). QEMU's end cannot be
 * configured, so the namespace's loopback routes make every ACK leave at once: Nagle then never
 * waits longer than a loopback round trip. The namespace has nothing but loopback, so QEMU also
 * cannot open any connection to the host's networks (on top of slirp's restrict=on). Unix
 * sockets with a path (QMP, console, the agent's per-VM sockets) work across namespaces.
 *
 * Needs CAP_SYS_ADMIN and CAP_NET_ADMIN (root), util-linux's unshare and iproute2's ip. Without
 * them QEMU runs in the agent's namespace as before, and the agent says why once.
 */
import { failureText, hostCommands } from '../host/command-runner';
import type { VmLogger } from './hypervisor';

/** Shell run inside the new namespace before QEMU; `exec` keeps the pid (pid file, process group). */
const SETUP = [
  'ip link set lo up',
  // Both routes: 127.0.0.1 has its own host route, which wins over the /8.
  'ip route change local 127.0.0.0/8 dev lo table local quickack 1',
  'ip route change local 127.0.0.1 dev lo table local quickack 1',
].join(' && ');

export interface GuestNetnsProbe {
  usable: boolean;
  reason: string;
}

let probe: Promise<GuestNetnsProbe> | null = null;
const told = new WeakSet<VmLogger>();

/** Whether a private namespace can be set up on this host; tried once per agent process. */
export function probeGuestNetns(): Promise<GuestNetnsProbe> {
  probe ??= hostCommands
    .run('unshare', ['--net', 'sh', '-c', SETUP], { timeoutMs: 5000 })
    .then((r) => (r.code === 0 && !r.error ? { usable: true, reason: '' } : { usable: false, reason: failureText(r).split('\n').pop() ?? '' }));
  return probe;
}

/**
 * The command and arguments that start `qemuBinary argv` in a private namespace, or QEMU
 * directly when that cannot be done here.
 */
export async function guestLaunchCommand(qemuBinary: string, argv: string[], logger: VmLogger): Promise<{ command: string; args: string[]; netns: boolean }> {
  const direct = { command: qemuBinary, args: argv, netns: false };
  const p = await probeGuestNetns();
  if (!p.usable) {
    if (!told.has(logger)) {
      told.add(logger);
      logger.warn(
        { reason: p.reason },
        'QEMU runs in the host network namespace: a private one could not be set up (needs root, unshare and ip). Guest-agent messages may then wait up to 40 ms for delayed ACKs, which lengthens switchover freezes',
      );
    }
    return direct;
  }
  // sh -c SCRIPT $0 $@: the binary and its arguments reach exec unchanged, without quoting.
  return { command: 'unshare', args: ['--net', 'sh', '-c', `${SETUP} && exec "$0" "$@"`, qemuBinary, ...argv], netns: true };
}
