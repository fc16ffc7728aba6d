/**
 * What the VM tests that upgrade a control plane end to end with the real issu CLI share: a
 * signed 1.0.0/2.0.0 bundle pair of one arch, a real hitlessd with its gRPC clients, the CLI,
 * the audit every step is checked with, and cleanup of every VM and agent, also after a failure.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { AuditResponse, PeerStatus, ProcessStatus, StatusResponse, TableDigest } from '../../agent/checkpoint/messages';
import { generateKeyPair } from '../../agent/images/signing';
import type { Arch } from '../../agent/vm/hypervisor';
import type { ListVmsResponse, VmInfoMessage } from '../../agent/vm/vm.messages';
import { QemuReaper } from '../../harness/qemu-reaper';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { AnyClient, rawClient, unaryCall } from '../../harness/grpc-client';
import { bootControlPlane, buildGuestImages, runIssu, signedVariant } from '../../harness/guest-images';

/** The parts of `issu --json` output (hitless.v1.UpgradeStatus) the tests read. */
export interface UpgradeStatus {
  current?: { id: string; phase: string; toVm: string; fromVm: string; freezeMs: number; timerRemainingMs: number };
  history: { id: string; phase: string; result: string }[];
}

export interface UpgradePair {
  v1: string;
  v2: string;
  /** The private key the pair is signed with, for more variants. */
  key: string;
  /** Holds the matching public key; give it to the agent as --trust-dir. */
  trustDir: string;
}

/**
 * The `arch` 1.0.0 and 2.0.0 bundles of scripts/build-guest-images.sh (built or from its cache),
 * signed under `work` with a fresh key. Files are hard-linked, so the cached bundles stay as built.
 */
export async function signedUpgradePair(arch: Arch, work: string): Promise<UpgradePair> {
  const built = buildGuestImages([`${arch}-1.0.0`, `${arch}-2.0.0`]);
  const pair = generateKeyPair();
  const trustDir = path.join(work, 'trust');
  fs.mkdirSync(trustDir, { recursive: true });
  fs.writeFileSync(path.join(trustDir, 'vendor.pub'), pair.publicKeyPem);
  return {
    v1: await signedVariant(built[`${arch}-1.0.0`], path.join(work, 'v1'), pair.privateKeyPem),
    v2: await signedVariant(built[`${arch}-2.0.0`], path.join(work, 'v2'), pair.privateKeyPem),
    key: pair.privateKeyPem,
    trustDir,
  };
}

/**
 * One agent on `stateDir` (restartable: `startAgent` again after a kill) driving the upgrades of
 * the bgp control plane. Methods are arrow properties so a test may destructure them.
 */
export class UpgradeHarness {
  agent!: AgentHandle;
  readonly reaper = new QemuReaper();
  private ck?: AnyClient;
  private vmc?: AnyClient;

  constructor(
    private readonly opts: {
      stateDir: string;
      trustDir: string;
      /** The rib holds at least this many routes whenever it is audited. */
      minRecords: number;
      /** More hitlessd flags (the data plane's). */
      agentArgs?: string[];
    },
  ) {}

  /** Starts hitlessd (again) on the state dir and connects to it. */
  startAgent = async (): Promise<AgentHandle> => {
    // A rollback timer must not fire during a test, and loads under TCG on a busy host are slow.
    this.agent = await startAgent({
      stateDir: this.opts.stateDir,
      args: ['--trust-dir', this.opts.trustDir, '--rollback-timeout-s', '900', '--load-timeout-s', '240', ...(this.opts.agentArgs ?? [])],
    });
    this.ck?.close();
    this.vmc?.close();
    this.ck = rawClient('hitless.v1.Checkpoint', this.agent.socket);
    this.vmc = rawClient('hitless.v1.Vm', this.agent.socket);
    return this.agent;
  };

  /** Boots `imageDir` as VM `name`; resolves once its bgp is ACTIVE with `records` routes. */
  boot = async (name: string, imageDir: string, records: number, timeoutMs: number): Promise<number> => {
    const b = await bootControlPlane(this.vmc!, this.ck!, name, imageDir, records, timeoutMs);
    this.reaper.track(b.pid);
    return b.ms;
  };

  bgp = async (): Promise<ProcessStatus> => (await unaryCall<StatusResponse>(this.ck!, 'Status', { process: 'bgp' })).processes[0];
  active = async (): Promise<PeerStatus | undefined> => (await this.bgp()).peers.find((p) => p.role === 'ACTIVE');
  audit = (): Promise<AuditResponse> => unaryCall<AuditResponse>(this.ck!, 'Audit', { process: 'bgp' });
  vms = async (): Promise<VmInfoMessage[]> => (await unaryCall<ListVmsResponse>(this.vmc!, 'List', {})).vms;
  trackAll = async (): Promise<void> => {
    for (const v of await this.vms()) this.reaper.track(v.pid);
  };

  /** Runs issu with `args` against the agent; never rejects. */
  issu = (args: string[], timeoutMs?: number): Promise<{ code: number; stdout: string; stderr: string }> => runIssu(this.agent.socket, args, timeoutMs);

  /** Runs issu --json with `args`; the last line of its output, or throws with what it printed. */
  cli = async (...args: string[]): Promise<UpgradeStatus> => {
    const r = await this.issu(['--json', ...args]);
    if (r.code !== 0) throw new Error(`issu ${args.join(' ')} exited ${r.code}: ${r.stderr} ${r.stdout}`);
    return JSON.parse(r.stdout.trim().split('\n').pop()!) as UpgradeStatus;
  };

  /**
   * Audits bgp: the agent's table and every instance's own copy agree by digest, and the rib holds
   * the routes. With `vms`, the copies compared are exactly those of the bgp instances in them.
   */
  assertAudit = async (what: string, vms?: string[]): Promise<{ a: AuditResponse; rib: TableDigest }> => {
    const a = await this.audit();
    assert.ok(a.consistent, `${what}: tables differ: ${a.detail}`);
    if (vms) assert.deepEqual(a.peers.map((p) => p.vmId).sort(), [...vms].sort(), `${what}: the instances audited`);
    const rib = a.agent.find((t) => t.table === 'rib')!;
    assert.ok(rib.records >= this.opts.minRecords, `${what}: the table holds the routes (${rib.records})`);
    return { a, rib };
  };

  /** For `after`: stops every agent and SIGKILLs every QEMU seen or named by a pid file. */
  close = async (): Promise<void> => {
    if (this.agent) await this.trackAll().catch(() => undefined);
    this.ck?.close();
    this.vmc?.close();
    await stopAllAgents();
    this.reaper.trackStateDir(this.opts.stateDir); // also when the agent died before it could list them
    this.reaper.reap();
  };
}
