/**
 * Building blocks shared by every platform's QEMU argv: control sockets, console chardev,
 * read-only rootfs, the restricted guest channel to the agent. Platforms (platform/<id>/)
 * add machine, CPU and console device; nothing platform-specific lives here.
 */
import { CP_NIC_ID, type VmPaths, type VmSpec } from './hypervisor';

/** QEMU option values use ',' as separator; a literal comma is written ',,'. */
export function qemuOptValue(s: string): string {
  return s.replace(/,/g, ',,');
}

/** Single-quote for the g_shell_parse_argv() that slirp applies to guestfwd cmd:. */
function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Guest-visible address of the agent channel; exists only inside QEMU's user network. */
export const AGENT_GUEST_ADDR = '10.0.2.100';
export const AGENT_GUEST_PORT = 7000;
/** Guest-visible port of the agent's bulk snapshot channel (same address). */
export const BULK_GUEST_PORT = 7001;

export interface CommonArgvOptions {
  /** Device model for PCI devices; both q35 and arm virt have PCIe. */
  virtioBlkDevice?: string;
  virtioNetDevice?: string;
}

/** -kernel/-initrd/-append: direct kernel boot, no firmware boot menu, no bootloader. */
export function kernelArgs(spec: VmSpec, consoleDevice: string): string[] {
  const append = [`console=${consoleDevice}`, spec.cmdlineExtra ?? ''].join(' ').trim();
  return ['-kernel', spec.kernelPath, '-initrd', spec.initrdPath, '-append', append];
}

export function commonArgs(spec: VmSpec, paths: VmPaths, opts: CommonArgvOptions = {}): string[] {
  const blk = opts.virtioBlkDevice ?? 'virtio-blk-pci';
  const netDev = opts.virtioNetDevice ?? 'virtio-net-pci';
  const ro = spec.rootfsWritable ? 'off' : 'on';
  // Only the agent's per-VM socket is reachable: restrict=on cuts every other route to the
  // host and outside; guestfwd makes QEMU run socat per guest connection to 10.0.2.100:7000.
  // socat's standard input and output are a TCP connection to QEMU on 127.0.0.1:
  // setsockopt-int=6:1:1 is TCP_NODELAY (IPPROTO_TCP 6, option 1) on socat's end, so a small
  // message after a large one is not held back by Nagle's algorithm (see guest-netns.ts).
  const relay = (socket: string) => `cmd:socat -,setsockopt-int=6:1:1 UNIX-CONNECT:${shellQuote(socket)}`;
  const guestfwd = `tcp:${AGENT_GUEST_ADDR}:${AGENT_GUEST_PORT}-${relay(paths.agentSocket)}`;
  // Second channel, same address, port 7001: raw bulk snapshot streams (standbys in guests).
  const bulkfwd = paths.bulkSocket ? `,guestfwd=${qemuOptValue(`tcp:${AGENT_GUEST_ADDR}:${BULK_GUEST_PORT}-${relay(paths.bulkSocket)}`)}` : '';
  return [
    '-name',
    `guest=${qemuOptValue(spec.name)}`,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-m',
    `${spec.memoryMiB}M`,
    '-smp',
    String(spec.cpus),
    '-pidfile',
    paths.pidFile,
    '-msg',
    'timestamp=on',
    '-qmp',
    `unix:${qemuOptValue(paths.qmpSocket)},server=on,wait=off`,
    // One chardev, two sinks: every byte the guest writes goes to console.log (whether or not
    // someone is attached), and console.sock serves one interactive client at a time.
    '-chardev',
    `socket,id=con0,path=${qemuOptValue(paths.consoleSocket)},server=on,wait=off,logfile=${qemuOptValue(paths.consoleLog)},logappend=on`,
    '-serial',
    'chardev:con0',
    '-drive',
    `file=${qemuOptValue(spec.rootfsPath)},if=none,id=root,format=raw,readonly=${ro}`,
    '-device',
    `${blk},drive=root`,
    '-netdev',
    `user,id=n0,restrict=on,guestfwd=${qemuOptValue(guestfwd)}${bulkfwd}`,
    // romfile= : no iPXE option ROM, we never netboot (and the ROM package may be absent).
    '-device',
    `${netDev},netdev=n0,romfile=`,
    // The control-plane NIC, second: the guest's eth1. QEMU creates the tap (script=no: the
    // agent, not a script, puts it into the data plane).
    ...(spec.cpNic
      ? [
          '-netdev',
          `tap,id=cp0,ifname=${qemuOptValue(spec.cpNic.tap)},script=no,downscript=no`,
          '-device',
          `${netDev},netdev=cp0,id=${CP_NIC_ID},mac=${spec.cpNic.mac},romfile=`,
        ]
      : []),
  ];
}
