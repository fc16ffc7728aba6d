/**
 * hitlessd configuration: command-line flags, with environment variables as fallbacks, so tests,
 * benchmarks and service managers can start the agent anywhere.
 */
import { parseArgs } from 'node:util';
import path from 'node:path';
import { DEFAULT_CHECKPOINT_OPTIONS, CheckpointOptions } from './checkpoint/checkpoint.service';
import { DEFAULT_UPGRADE_OPTIONS, UpgradeOptions } from './upgrade/upgrade.service';

export interface AgentConfig {
  grpcSocket: string;
  grpcTcp: string | null;
  /** Remote listener with mutual TLS and roles (all four files are required with it). */
  grpcTls: { address: string; certFile: string; keyFile: string; clientCaFile: string; rolesFile: string } | null;
  /** Prometheus text exposition on HOST:PORT (GET /metrics); null: off. */
  metrics: string | null;
  /** gNOI OS.Install: largest package (tar of a bundle) accepted, bytes. */
  maxPackageBytes: number;
  stateDir: string;
  fsync: boolean;
  logLevel: string;
  /**
   * The agent's CPU scheduling priority (nice, -20..19); the commands and VMs it starts keep the
   * priority it was started with.
   */
  nice: number;
  checkpoint: CheckpointOptions;
  vm: VmOptions;
  upgrade: { trustDir: string; options: UpgradeOptions };
  /**
   * The data plane the agent programs from FIB tables: a named network namespace, the agent's
   * own ('host'), or none (null: FIB tables are replicated, nothing is programmed).
   */
  dataplane: { netns: string | null } | null;
  /**
   * Control-plane NICs: the data plane's bridge they join, and the addresses (A/LEN, comma
   * separated) and default gateway every version's guest gives its NIC; null: no such NIC.
   */
  cpNic: { bridge: string; addresses: string; gateway: string } | null;
}

export interface VmOptions {
  /** Memory kept free for the host (agent, routing daemons) when admitting VMs, MiB. */
  hostReserveMiB: number;
  /** vCPUs admitted per host CPU. */
  cpuOvercommit: number;
}

export const HITLESSD_HELP = `hitlessd - the hitless upgrade agent

Usage: hitlessd [options]

Listeners
  --grpc-socket PATH     unix socket for local processes and the issu CLI
                         (env HITLESS_GRPC_SOCKET; default <state-dir>/agent.sock)
  --grpc-tcp HOST:PORT   also listen on TCP; loopback only (127.0.0.1, ::1); port 0 picks one
                         (env HITLESS_GRPC_TCP; default: no TCP listener)
  --grpc-tls HOST:PORT   remote listener with mutual TLS (any address; port 0 picks one); needs
                         --tls-cert F --tls-key F (server certificate chain and key, PEM),
                         --tls-client-ca F (CA that signs client certificates; a client without
                         one fails the handshake) and --tls-roles F (JSON: {"<cert CN or SAN>":
                         "viewer"|"operator"}). viewer: read-only RPCs; operator: everything.
  --metrics HOST:PORT    Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to
                         127.0.0.1; default: off)
State
  --state-dir DIR        embedded database and runtime files
                         (env HITLESS_STATE_DIR; default /var/lib/hitless)
  --fsync                flush every commit to disk (survives power loss; slower). Without it,
                         acknowledged data survives a crash of the agent process.
Checkpoint limits
  --max-key-bytes N      largest key (default ${DEFAULT_CHECKPOINT_OPTIONS.limits.maxKeyBytes})
  --max-value-bytes N    largest value (default ${DEFAULT_CHECKPOINT_OPTIONS.limits.maxValueBytes})
  --stall-timeout-ms N   drop a subscriber that stops reading for N ms (default ${DEFAULT_CHECKPOINT_OPTIONS.stallTimeoutMs})
  --sync-timeout-ms N    a SYNC write waits at most N ms for a standby (default ${DEFAULT_CHECKPOINT_OPTIONS.syncTimeoutMs})
  --command-timeout-ms N time a process has to answer a role command (default ${DEFAULT_CHECKPOINT_OPTIONS.commandTimeoutMs})
  --subscriber-window-bytes N
                         unacknowledged change bytes in flight to one standby before the agent
                         waits for its acks (default ${DEFAULT_CHECKPOINT_OPTIONS.subscriberWindowBytes})
  --no-frame-channels    answer OpenChannel with UNIMPLEMENTED: processes then send batches, changes
                         and acks on the gRPC streams (WriteStream, Subscribe, Ack) instead of
                         frame channels on the bulk socket (default: frame channels on)
VMs (QEMU; KVM when /dev/kvm works, else TCG)
  --host-reserve-mib N   memory kept free for the host when admitting a VM (default 512)
  --cpu-overcommit N     vCPUs admitted per host CPU (default 4)
                         VM runtime files, consoles and guest sockets: <state-dir>/vms/<name>/
Data plane
  --dataplane WHERE      program the routes of FIB tables (TableSpec.kind FIB) into WHERE:
                         netns:NAME (a namespace made with 'ip netns add NAME') or host (the
                         agent's own namespace); needs root. Default: none (FIB tables are
                         replicated and validated, nothing is programmed). Env HITLESS_DATAPLANE
  --cp-bridge NAME       give every control-plane VM a virtio NIC on a tap in the data plane,
                         joined to bridge NAME (created when missing); every version has the
                         same MAC and addresses, and only the active version's NIC passes
                         traffic (QMP set_link). Needs --dataplane. Default: none
  --cp-address A/LEN[,A/LEN]  the guest's addresses on that NIC (kernel cmdline hitless.cpnet=)
  --cp-gateway A         the guest's default route through that NIC (hitless.cpgw=)
Upgrades
  --trust-dir DIR        public keys (*.pub, ed25519) trusted to sign image bundles
                         (env HITLESS_TRUST_DIR; default <state-dir>/trusted-keys)
  --rollback-timeout-s N after runversion, roll back by itself unless acceptversion or
                         commitversion comes within N seconds (default 2700 = 45 minutes)
  --load-timeout-s N     loadversion gives the standby VM N seconds to boot and sync (default 600)
  --max-package-bytes N  gNOI OS.Install: largest package accepted (default 2147483648 = 2 GiB);
                         installed bundles go to <state-dir>/images/<version>/
Other
  --nice N               the agent's CPU priority, -20..19 (default -5). Every acknowledgement
                         and switchover step waits for the agent, and guests under TCG keep the
                         CPUs busy: ahead of them, the agent gets a CPU when it has work. Its VMs,
                         and the commands it runs, keep the priority it was started with. Where
                         the kernel shares the CPU by session (autogroups), the agent's session
                         gets N too, until the agent stops. Lowering the value needs root
                         (CAP_SYS_NICE); without it the agent says so and runs at its start
                         priority. A negative N goes with '=': --nice=-10
  --log-level LEVEL      trace|debug|info|warn|error (env HITLESS_LOG_LEVEL; default info)
  -h, --help             this text

On start the agent prints one JSON line on stdout: {"event":"ready", "grpcSocket", "grpcTcp", ...}.
Logs are JSON lines on stderr. SIGTERM or SIGINT shut it down gracefully.
`;

/** The default agent priority: ahead of its VMs and the routing daemons (nice 0), far from realtime. */
const DEFAULT_NICE = -5;

function niceValue(v: string | undefined): number {
  if (v === undefined) return DEFAULT_NICE;
  const n = Number(v);
  if (!Number.isInteger(n) || n < -20 || n > 19) throw new Error(`--nice must be an integer from -20 to 19, got '${v}'`);
  return n;
}

export function parseAgentArgs(argv: string[], env: NodeJS.ProcessEnv = process.env): AgentConfig | 'help' {
  const { values } = parseArgs({
    args: argv,
    options: {
      'grpc-socket': { type: 'string' },
      'grpc-tcp': { type: 'string' },
      'grpc-tls': { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'tls-client-ca': { type: 'string' },
      'tls-roles': { type: 'string' },
      metrics: { type: 'string' },
      'max-package-bytes': { type: 'string' },
      'state-dir': { type: 'string' },
      fsync: { type: 'boolean' },
      'max-key-bytes': { type: 'string' },
      'max-value-bytes': { type: 'string' },
      'stall-timeout-ms': { type: 'string' },
      'sync-timeout-ms': { type: 'string' },
      'command-timeout-ms': { type: 'string' },
      'subscriber-window-bytes': { type: 'string' },
      'no-frame-channels': { type: 'boolean' },
      'host-reserve-mib': { type: 'string' },
      'cpu-overcommit': { type: 'string' },
      'trust-dir': { type: 'string' },
      dataplane: { type: 'string' },
      'cp-bridge': { type: 'string' },
      'cp-address': { type: 'string' },
      'cp-gateway': { type: 'string' },
      'rollback-timeout-s': { type: 'string' },
      'load-timeout-s': { type: 'string' },
      'log-level': { type: 'string' },
      nice: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help) return 'help';
  const stateDir = path.resolve(values['state-dir'] ?? env.HITLESS_STATE_DIR ?? '/var/lib/hitless');
  const int = (name: string, v: string | undefined, def: number): number => {
    if (v === undefined) return def;
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new Error(`--${name} must be a positive integer, got '${v}'`);
    return n;
  };
  const nonNegative = (name: string, v: string | undefined, def: number): number => {
    if (v === undefined) return def;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`--${name} must be a non-negative integer, got '${v}'`);
    return n;
  };
  const d = DEFAULT_CHECKPOINT_OPTIONS;
  let grpcTls: AgentConfig['grpcTls'] = null;
  const tlsFiles = ['tls-cert', 'tls-key', 'tls-client-ca', 'tls-roles'] as const;
  if (values['grpc-tls']) {
    const missing = tlsFiles.filter((f) => !values[f]);
    if (missing.length) throw new Error(`--grpc-tls needs ${missing.map((m) => `--${m}`).join(', ')} (mutual TLS is the only remote transport)`);
    grpcTls = {
      address: values['grpc-tls'],
      certFile: path.resolve(values['tls-cert']!),
      keyFile: path.resolve(values['tls-key']!),
      clientCaFile: path.resolve(values['tls-client-ca']!),
      rolesFile: path.resolve(values['tls-roles']!),
    };
  } else {
    const given = tlsFiles.filter((f) => values[f]);
    if (given.length) throw new Error(`${given.map((g) => `--${g}`).join(', ')} given without --grpc-tls HOST:PORT`);
  }
  const dpArg = values.dataplane ?? env.HITLESS_DATAPLANE;
  let dataplane: AgentConfig['dataplane'] = null;
  if (dpArg === 'host') dataplane = { netns: null };
  else if (dpArg?.startsWith('netns:') && /^[A-Za-z0-9_.-]{1,64}$/.test(dpArg.slice(6))) dataplane = { netns: dpArg.slice(6) };
  else if (dpArg !== undefined && dpArg !== '' && dpArg !== 'none') {
    throw new Error(`--dataplane must be netns:NAME (letters, digits, _ . -) or host, got '${dpArg}'`);
  }
  const cpBridge = values['cp-bridge'] ?? null;
  if (cpBridge !== null && !/^[A-Za-z0-9_.-]{1,15}$/.test(cpBridge))
    throw new Error(`--cp-bridge must be an interface name (at most 15 of letters, digits, _ . -), got '${cpBridge}'`);
  if (cpBridge !== null && !dataplane) throw new Error('--cp-bridge needs --dataplane (the bridge lives in the data plane)');
  const cpAddress = values['cp-address'] ?? '';
  const cpGateway = values['cp-gateway'] ?? '';
  if ((cpAddress || cpGateway) && cpBridge === null) throw new Error('--cp-address and --cp-gateway need --cp-bridge');
  if (cpAddress && !cpAddress.split(',').every((a) => /^[0-9a-fA-F.:]+\/\d{1,3}$/.test(a)))
    throw new Error(`--cp-address must be A/LEN[,A/LEN], got '${cpAddress}'`);
  if (cpGateway && !/^[0-9a-fA-F.:]+$/.test(cpGateway)) throw new Error(`--cp-gateway must be an address, got '${cpGateway}'`);
  const cpNic = cpBridge === null ? null : { bridge: cpBridge, addresses: cpAddress, gateway: cpGateway };
  let metrics: string | null = null;
  if (values.metrics !== undefined) metrics = /^\d+$/.test(values.metrics) ? `127.0.0.1:${values.metrics}` : values.metrics;
  return {
    dataplane,
    cpNic,
    grpcTls,
    metrics,
    maxPackageBytes: int('max-package-bytes', values['max-package-bytes'], 2 * 1024 ** 3),
    grpcSocket: path.resolve(values['grpc-socket'] ?? env.HITLESS_GRPC_SOCKET ?? path.join(stateDir, 'agent.sock')),
    grpcTcp: values['grpc-tcp'] ?? env.HITLESS_GRPC_TCP ?? null,
    stateDir,
    fsync: values.fsync ?? false,
    logLevel: values['log-level'] ?? env.HITLESS_LOG_LEVEL ?? 'info',
    nice: niceValue(values.nice),
    checkpoint: {
      ...d,
      limits: {
        maxKeyBytes: Math.min(65535, int('max-key-bytes', values['max-key-bytes'], d.limits.maxKeyBytes)),
        maxValueBytes: int('max-value-bytes', values['max-value-bytes'], d.limits.maxValueBytes),
      },
      stallTimeoutMs: int('stall-timeout-ms', values['stall-timeout-ms'], d.stallTimeoutMs),
      syncTimeoutMs: int('sync-timeout-ms', values['sync-timeout-ms'], d.syncTimeoutMs),
      commandTimeoutMs: int('command-timeout-ms', values['command-timeout-ms'], d.commandTimeoutMs),
      subscriberWindowBytes: int('subscriber-window-bytes', values['subscriber-window-bytes'], d.subscriberWindowBytes),
      frameChannels: !values['no-frame-channels'],
    },
    vm: {
      hostReserveMiB: nonNegative('host-reserve-mib', values['host-reserve-mib'], 512),
      cpuOvercommit: int('cpu-overcommit', values['cpu-overcommit'], 4),
    },
    upgrade: {
      trustDir: path.resolve(values['trust-dir'] ?? env.HITLESS_TRUST_DIR ?? path.join(stateDir, 'trusted-keys')),
      options: {
        ...DEFAULT_UPGRADE_OPTIONS,
        rollbackTimeoutMs: 1000 * int('rollback-timeout-s', values['rollback-timeout-s'], DEFAULT_UPGRADE_OPTIONS.rollbackTimeoutMs / 1000),
        loadTimeoutMs: 1000 * int('load-timeout-s', values['load-timeout-s'], DEFAULT_UPGRADE_OPTIONS.loadTimeoutMs / 1000),
      },
    },
  };
}
