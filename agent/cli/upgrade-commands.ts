/**
 * issu upgrade commands: loadversion, runversion, acceptversion, commitversion, abortversion,
 * changeversion, status, show compatibility. Clients of hitless.v1.Upgrade. While a command
 * runs, the agent's event stream is shown as progress on stderr (phases, image verification,
 * snapshot and catch-up of each standby); the result is printed as text, or as one JSON object
 * with --json (progress events are then NDJSON on stderr).
 */
import * as grpc from '@grpc/grpc-js';
import path from 'node:path';
import { clientCtor } from '../grpc/proto';
import { ProcessStatus } from '../checkpoint/messages';
import { ProgressEvent, ProgressView, progressView } from './progress';
import { Stub, call } from './rpc';
import { type DataPlaneChangesMsg, type UpgradeInfoMsg, dataPlaneChangesText } from '../report/upgrade-report';
import type { DataPlaneStatusView } from '../dataplane/fib.service';

type Out = (obj: unknown, text: () => void) => void;

interface StatusMsg {
  current?: UpgradeInfoMsg;
  processes: ProcessStatus[];
  history: UpgradeInfoMsg[];
  journal: { atMs: number; phase: string; note: string }[];
  dataplane?: DataPlaneStatusMsg;
}

/** hitless.v1.DataPlaneStatus: the FIB service's view, its last reconciliation as on the wire. */
type DataPlaneStatusMsg = Omit<DataPlaneStatusView, 'lastReconcile'> & { lastReconcile?: DataPlaneChangesMsg };

function printDataPlane(d: DataPlaneStatusMsg | undefined, upgrade: UpgradeInfoMsg | undefined): void {
  if (!d || !d.target) return;
  if (!d.available) {
    console.log(`  data plane: ${d.target} NOT PROGRAMMED: ${d.detail}`);
    return;
  }
  const behind = d.tableSeq - d.programmedSeq;
  const state = d.failureCount ? `${d.failureCount} route(s) REFUSED` : behind > 0 || d.pending ? `programming (${d.pending} pending)` : 'in step';
  console.log(`  data plane: ${d.target}, ${d.table || 'no FIB table yet'}, ${d.routes} routes, ${state}${d.detail ? ` (${d.detail})` : ''}`);
  for (const f of d.failures) console.log(`    refused ${f}`);
  for (const c of upgrade?.dataplaneChanges ?? []) console.log(`    ${dataPlaneChangesText(c)}`);
  if (d.lastReconcile && !upgrade) console.log(`    last reconciliation: ${dataPlaneChangesText(d.lastReconcile)}`);
}

export const UPGRADE_COMMANDS = new Set(['loadversion', 'runversion', 'acceptversion', 'commitversion', 'abortversion', 'changeversion', 'status']);

export const UPGRADE_HELP = `  loadversion IMAGE                      verify IMAGE (sha256, ed25519 signature), check schema
                                         compatibility and host capacity, boot it in a standby VM
                                         and wait until every process is READY
  runversion                             switch over to the loaded version; starts the rollback timer
  acceptversion                          stop the rollback timer
  commitversion                          stop the old version's VM; the upgrade is done
  abortversion [--reason TEXT]           go back to the running version from any phase before commit
  changeversion IMAGE                    all of the above in one command
  status                                 phase, VMs and versions, every process's role, lag and
                                         readiness, the rollback timer, the last upgrades, the
                                         data plane (routes, what each switchover changed there)
  show compatibility IMAGE               the schema compatibility matrix; changes nothing`;

function fmtTime(ms: number): string {
  return new Date(ms).toISOString().replace('T', ' ').slice(0, 19);
}

function printStatus(s: StatusMsg): void {
  const c = s.current;
  if (c) {
    console.log(`upgrade ${c.id}: ${c.fromVersion} (${c.fromVm}) -> ${c.toVersion} (${c.toVm})  phase ${c.phase}`);
    if (c.timerRemainingMs) console.log(`  rollback timer: ${Math.ceil(c.timerRemainingMs / 1000)} s left (acceptversion stops it)`);
    if (c.freezeMs) console.log(`  write freeze at switchover: ${c.freezeMs.toFixed(2)} ms`);
    const stalls = Object.entries(c.agentLoopMaxMs ?? {});
    if (stalls.length) console.log(`  agent event loop, longest stall per phase: ${stalls.map(([p, ms]) => `${p} ${ms.toFixed(1)} ms`).join(', ')}`);
  } else {
    console.log('no upgrade in progress');
  }
  printDataPlane(s.dataplane, c);
  for (const p of s.processes) {
    for (const peer of p.peers) {
      const state = peer.role === 'ACTIVE' ? (peer.frozen ? 'frozen' : 'active') : peer.ready ? 'READY' : `syncing, lag ${peer.lag}`;
      console.log(`  ${p.process.padEnd(6)} ${peer.role.padEnd(8)} ${peer.instanceId.padEnd(24)} v${peer.softwareVersion.padEnd(8)} ${state}`);
    }
  }
  if (s.journal.length) {
    console.log('  journal:');
    for (const j of s.journal) console.log(`    ${fmtTime(j.atMs)}  ${j.phase.padEnd(11)} ${j.note}`);
  }
  if (s.history.length) {
    console.log('  last upgrades:');
    for (const h of s.history) console.log(`    ${fmtTime(h.startedAtMs)}  ${h.fromVersion} -> ${h.toVersion}  ${h.phase}${h.result ? `  (${h.result})` : ''}`);
  }
}

/**
 * Shows the agent's events on stderr while `run` is under way (see progress.ts: bars on a
 * terminal, sparse lines on a pipe, NDJSON with --json; stdout keeps the result alone).
 */
async function withProgress<T>(stub: Stub, json: boolean, run: () => Promise<T>): Promise<T> {
  const view = progressView({ json, tty: !json && !!process.stderr.isTTY, out: process.stderr, prefix: 'issu: ' });
  const stop = await showUpgradeEvents(stub, view);
  try {
    return await run();
  } finally {
    stop();
  }
}

/**
 * Feeds the agent's Upgrade.Events into `view`; resolves once the subscription is live (the
 * agent sends headers then), so no event of a command sent afterwards is missed. If Events
 * fails there is no progress, but the command still runs. Call the result to stop.
 */
export async function showUpgradeEvents(stub: grpc.Client, view: ProgressView): Promise<() => void> {
  const events = ((stub as Stub).Events as (r: unknown) => grpc.ClientReadableStream<ProgressEvent>).call(stub, {});
  events.on('data', (e: ProgressEvent) => view.event(e));
  events.on('error', () => undefined);
  await new Promise<void>((resolve) => {
    events.once('metadata', () => resolve());
    events.once('error', () => resolve());
  });
  return () => {
    events.cancel();
    view.close();
  };
}

export async function upgradeCommand(
  address: string,
  cmd: string,
  rest: string[],
  opts: { json: boolean; reason?: string; timeoutMs: number },
  out: Out,
  usage: (m: string) => Error,
): Promise<number> {
  const stub = new (clientCtor('hitless.v1.Upgrade'))(address, grpc.credentials.createInsecure()) as unknown as Stub;
  const image = () => {
    if (!rest[0]) throw usage(`${cmd} needs an image bundle directory, e.g. issu ${cmd} /var/lib/hitless/images/cp-2.0.0`);
    return path.resolve(rest[0]);
  };
  // Loading boots a VM and syncs tables: allow far more than the default RPC timeout.
  const longMs = Math.max(opts.timeoutMs, 30 * 60_000);
  try {
    let r: StatusMsg;
    switch (cmd) {
      case 'loadversion':
        r = await withProgress(stub, opts.json, () => call<StatusMsg>(stub, 'LoadVersion', { imageDir: image() }, longMs));
        break;
      case 'changeversion':
        r = await withProgress(stub, opts.json, () => call<StatusMsg>(stub, 'ChangeVersion', { imageDir: image() }, longMs));
        break;
      case 'runversion':
        r = await withProgress(stub, opts.json, () => call<StatusMsg>(stub, 'RunVersion', {}, longMs));
        break;
      case 'acceptversion':
        r = await call<StatusMsg>(stub, 'AcceptVersion', {}, opts.timeoutMs);
        break;
      case 'commitversion':
        r = await withProgress(stub, opts.json, () => call<StatusMsg>(stub, 'CommitVersion', {}, longMs));
        break;
      case 'abortversion':
        r = await withProgress(stub, opts.json, () => call<StatusMsg>(stub, 'AbortVersion', { reason: opts.reason ?? '' }, longMs));
        break;
      case 'status':
        r = await call<StatusMsg>(stub, 'Status', {}, opts.timeoutMs);
        break;
      default:
        throw usage(`unknown command '${cmd}'`);
    }
    out(r, () => printStatus(r));
    return 0;
  } finally {
    stub.close();
  }
}

export async function showCompatibility(
  address: string,
  imageDir: string | undefined,
  opts: { json: boolean; timeoutMs: number },
  out: Out,
  usage: (m: string) => Error,
): Promise<number> {
  if (!imageDir) throw usage('show compatibility needs an image bundle directory');
  const stub = new (clientCtor('hitless.v1.Upgrade'))(address, grpc.credentials.createInsecure()) as unknown as Stub;
  try {
    const r = await call<{
      runningVersion: string;
      candidateVersion: string;
      compatible: boolean;
      reason: string;
      rows: {
        process: string;
        change: string;
        fromWrites: number;
        toWrites: number;
        fromReads: number[];
        toReads: number[];
        forward: boolean;
        backward: boolean;
        via: string;
        reason: string;
      }[];
    }>(stub, 'ShowCompatibility', { imageDir: path.resolve(imageDir) }, opts.timeoutMs);
    out(r, () => {
      console.log(`running ${r.runningVersion} -> candidate ${r.candidateVersion}: ${r.compatible ? 'compatible' : 'NOT compatible'}`);
      console.log('  process  change  writes      reads (running | new)   upgrade  rollback  via');
      for (const x of r.rows) {
        console.log(
          `  ${x.process.padEnd(8)} ${x.change.padEnd(7)} ${`${x.fromWrites}->${x.toWrites}`.padEnd(11)} ${`[${x.fromReads.join(',')}] | [${x.toReads.join(',')}]`.padEnd(23)} ${(x.forward ? 'yes' : 'NO').padEnd(8)} ${(x.backward ? 'yes' : 'NO').padEnd(9)} ${x.via}${x.reason ? `  ${x.reason}` : ''}`,
        );
      }
      if (!r.compatible) console.log(`  ${r.reason}`);
    });
    return r.compatible ? 0 : 1;
  } finally {
    stub.close();
  }
}
