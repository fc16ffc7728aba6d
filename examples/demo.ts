#!/usr/bin/env node
/**
 * npm run demo: a hitless upgrade of a router control plane, end to end, on real QEMU.
 *
 * 1. Builds (or takes from the cache) two guest images that differ in kernel and daemon version:
 *    v1.0.0 (linux 6.1.0-47, bgp 1.0.0 writing schema 1) and v2.0.0 (linux 6.1.0-50, bgp 2.0.0
 *    writing schema 2, with transforms both ways), signs them with a fresh ed25519 key and trusts
 *    that key on the agent.
 * 2. Builds the router's network from network namespaces (harness/netlab.ts): a data plane that
 *    the agent programs from the daemon's FIB table, a sender and a receiver beside it, and the
 *    bridge the control-plane VMs' NICs join. Starts hitlessd on it and boots v1; its BGP-like
 *    daemon loads 20,000 routes, keeps changing 2,000 of them per second for the whole run, and
 *    publishes 1,000 forwarding entries (IPv4 and IPv6) that the agent programs.
 *    BIRD 2 runs beside the receiver (AS 65000, 20,000 IPv4 and 2,000 IPv6 prefixes) and peers
 *    with the active daemon over its control-plane NIC; what BIRD announces becomes FIB entries,
 *    what we announce (192.0.2.0/24, 2001:db8:1::/64) goes into BIRD's kernel table.
 *    From before loadversion until after commit the sender sends 5,000 sequence-numbered UDP
 *    packets/s through the FIB to the receiver (the static routes and BIRD's), and 1,000/s go
 *    back from BIRD's side to the sender through the routes BIRD learned from us.
 * 3. loadversion v2 (verify, compatibility, admission, standby VM, bulk sync), runversion
 *    (switchover), an audit while both versions run, acceptversion, commitversion (v1 stops),
 *    and a final audit: the agent's table and the new active's own table compared by digest.
 * 4. Prints a short report; with --json the last line is one JSON object with from_version,
 *    to_version, records_verified, records_lost, freeze_ms, agent_loop_max_ms (the agent's longest
 *    event-loop stall during the upgrade, and _by_phase), phases (name, seconds), report_html,
 *    and the network's view: packets_sent, packets_lost, max_gap_ms (longest time between two
 *    packets received), fib_routes and fib_changes_at_switchover, and the BGP peer's view:
 *    bgp_peer, bgp_session_resets, peer_routes_withdrawn, peer_routes_before, peer_routes_after
 *    (read from BIRD with birdc), and bgp_handovers: how the daemon says each session changed
 *    hands (NONSTOP with TCP repair, or GRACEFUL_RESTART). The exit status is 1 when a packet was
 *    lost, BIRD saw a session reset or a withdrawal, or an audit found a difference.
 * 5. Writes the agent's upgrade report beside that JSON, in --report-dir (default ./demo-report):
 *    upgrade-ID.json (the summary above and the agent's ShowUpgrade answer) and upgrade-ID.html,
 *    the page `issu show upgrade ID --html FILE` writes.
 *
 * Everything runs under a private state directory and is stopped at the end.
 */
import { progressView } from '../agent/cli/progress';
import { showUpgradeEvents } from '../agent/cli/upgrade-commands';
import { writeReportHtml } from '../agent/cli/report-commands';
import { reportFigures, type UpgradeReport } from '../agent/report/upgrade-report';
import { sessionOutcomeText } from '../agent/report/session-outcome';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { startAgent, stopAllAgents, AgentHandle } from '../harness/agent-process';
import { rawClient, unaryCall, AnyClient } from '../harness/grpc-client';
import { generateKeyPair } from '../agent/images/signing';
import { buildGuestImages, signedVariant } from '../harness/guest-images';
import { until } from '../harness/wait';
import { phaseRecorder } from './common/phases';
import { NetLab, createNetLab, netLabAvailable } from '../harness/netlab';
import { Traffic, TrafficResult, startTraffic } from '../harness/traffic';
import { trafficTargets } from './common/fib-routes';
import { BIRD_MAX_ROUTES, BirdPeer, BirdWatch, birdPrefixes, birdTargets, startBird, watchBird } from '../harness/bird-peer';

import type { DataPlaneStatusView } from '../agent/dataplane/fib.service';

/** The daemon's FIB in the guest images (--fib 1000). */
const FIB_ROUTES = 1000;
import type { AuditResponse, StatusResponse } from '../agent/checkpoint/messages';

const { values } = parseArgs({
  options: {
    json: { type: 'boolean', default: false },
    'report-dir': { type: 'string', default: 'demo-report' },
    keep: { type: 'boolean', default: false },
    'bird-routes': { type: 'string', default: '20000' },
    help: { type: 'boolean', short: 'h' },
  },
});
/** BIRD's table: this many IPv4 prefixes and a tenth as many IPv6 ones (see birdPrefixes). */
const BIRD_ROUTES = Number(values['bird-routes']);
if (!Number.isInteger(BIRD_ROUTES) || BIRD_ROUTES < 1 || BIRD_ROUTES > BIRD_MAX_ROUTES) {
  process.stderr.write(`demo: --bird-routes must be a whole number from 1 to ${BIRD_MAX_ROUTES}, not '${values['bird-routes']}'\n`);
  process.exit(2);
}
const BIRD_LEARNED = ((p) => p.v4.length + p.v6.length)(birdPrefixes(BIRD_ROUTES));
if (values.help) {
  process.stdout.write(`Usage: npm run demo [-- [--json] [--keep] [--report-dir DIR] [--bird-routes N]]
  Boots v1 of the control plane under QEMU and upgrades it hitlessly to v2.
  --json             the summary as one JSON object on the last line of stdout
  --keep             keep the work directory (agent state and log, VM consoles, BIRD's files)
                     and say where it is
  --report-dir DIR   where the upgrade report goes (default ./demo-report): upgrade-ID.json and
                     upgrade-ID.html, a self-contained page to open in a browser
  --bird-routes N    IPv4 prefixes BIRD announces, and a tenth as many IPv6 ones (default 20000,
                     at most ${BIRD_MAX_ROUTES}). The guest learns and checkpoints them all: the
                     example images have 256 MiB, enough for the default; at 100000 (110000
                     routes learned) their daemons stalled for seconds and a VM died during the
                     audit. Larger tables need images with more (build-image.sh --memory MiB).
`);
  process.exit(0);
}

const { phases, say, phase } = phaseRecorder('demo');

interface UpgradeStatusMsg {
  current?: { phase: string; freezeMs: number; toVm: string };
  history: { phase: string; freezeMs: number; toVm: string }[];
}

async function main(): Promise<void> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-demo-'));
  const trust = path.join(work, 'trusted-keys');
  let agent: AgentHandle | null = null;
  let lab: NetLab | null = null;
  let traffic: Traffic | null = null;
  let reverse: Traffic | null = null;
  let bird: BirdPeer | null = null;
  let birdWatch: BirdWatch | null = null;
  const clients: AnyClient[] = [];
  const started: string[] = [];
  try {
    const images = await phase('build guest images v1.0.0 and v2.0.0 (cached)', async () => {
      return buildGuestImages(['x86_64-1.0.0', 'x86_64-2.0.0']);
    });
    const { v1, v2 } = await phase('sign both images and trust the key', async () => {
      const pair = generateKeyPair();
      fs.mkdirSync(trust, { recursive: true });
      fs.writeFileSync(path.join(trust, 'vendor.pub'), pair.publicKeyPem);
      return {
        v1: await signedVariant(images['x86_64-1.0.0'], path.join(work, 'cp-1.0.0'), pair.privateKeyPem),
        v2: await signedVariant(images['x86_64-2.0.0'], path.join(work, 'cp-2.0.0'), pair.privateKeyPem),
      };
    });
    const can = netLabAvailable();
    if (can.ok) {
      lab = await phase('build the network: data plane, sender, receiver (namespaces)', async () => createNetLab());
      const l = lab;
      bird = await phase(`start BIRD beside the receiver: AS 65000, ${BIRD_LEARNED} prefixes`, () =>
        startBird({
          netns: l.receiver,
          dir: path.join(work, 'bird'),
          routerId: '198.51.100.2',
          localAddress: '198.51.100.2',
          localAs: 65000,
          neighbor: l.cp.guest,
          neighborAs: 65001,
          routes: BIRD_ROUTES,
          nextHop6: '2001:db8:2::2',
          multihop: true,
        }),
      );
    } else say(`no network namespaces here (${can.reason}): the upgrade runs without a data plane, BGP peer or traffic`);
    agent = await phase('start hitlessd', () =>
      startAgent({ stateDir: path.join(work, 'state'), args: ['--trust-dir', trust, ...(lab ? lab.agentArgs() : [])] }),
    );
    const sock = agent.socket;
    const vm = rawClient('hitless.v1.Vm', sock);
    const ck = rawClient('hitless.v1.Checkpoint', sock);
    const up = rawClient('hitless.v1.Upgrade', sock);
    clients.push(vm, ck, up);
    const bgp = async () => (await unaryCall<StatusResponse>(ck, 'Status', { process: 'bgp' })).processes[0];

    await phase('boot v1 and load 20,000 routes (churning 2,000/s)', async () => {
      await unaryCall(vm, 'Start', { name: 'cp-1', imageDir: v1 });
      started.push('cp-1');
      await until(
        'bgp v1 active with its table',
        async () => {
          const b = await bgp();
          return b.peers.some((p) => p.role === 'ACTIVE') && (b.tables.find((t) => t.name === 'rib')?.records ?? 0) >= 20_000;
        },
        300_000,
        200,
      );
    });

    const dpStatus = async () => (await unaryCall<{ dataplane: DataPlaneStatusView }>(up, 'Status', {})).dataplane;
    if (lab && bird) {
      const b = bird;
      await phase('BGP: v1 and BIRD exchange routes', () =>
        until(
          'BIRD Established with our 2 prefixes',
          async () => {
            const p = await b.protocol();
            return p.state === 'Established' && p.imported === 2;
          },
          120_000,
          200,
        ),
      );
      await phase(`the agent programs the FIB (${FIB_ROUTES} static + ${BIRD_LEARNED} learned routes)`, () =>
        until(
          'the FIB programmed',
          async () => {
            const d = await dpStatus();
            if (d.routes === FIB_ROUTES + BIRD_LEARNED && d.programmedSeq === d.tableSeq && d.pending === 0) return d;
            // Said if it times out: how far it got.
            throw new Error(
              `${d.routes} of ${FIB_ROUTES + BIRD_LEARNED} routes in the FIB table, programmed up to seq ${d.programmedSeq} of ${d.tableSeq}, ${d.pending} pending, ${d.failureCount} refused${d.failures.length ? ` (${d.failures[0]})` : ''}`,
            );
          },
          120_000,
          100,
        ),
      );
      const l = lab;
      // Forward: to the static FIB's destinations and to BIRD's (through routes learned by BGP).
      const peerTargets = birdTargets(BIRD_ROUTES, 500);
      traffic = await phase('start traffic: 5,000 packets/s through the FIB', () => startTraffic(l, [...trafficTargets(FIB_ROUTES / 2), ...peerTargets], 5000));
      // Reverse: from BIRD's side to our prefix, through BIRD's kernel table (gone if it withdraws).
      reverse = await phase('start traffic back: 1,000 packets/s through the routes BIRD learned from us', () =>
        startTraffic(l, ['192.0.2.2', '2001:db8:1::2'], 1000, 9998, true),
      );
      birdWatch = await watchBird(b);
    }

    // Progress from the agent's event stream, as an NMS would see it.
    // Shown like `issu` shows it: bars on a terminal, a few lines on a pipe (stderr).
    const view = progressView({ json: false, tty: !!process.stderr.isTTY, out: process.stderr, prefix: 'demo:   ' });
    const stopEvents = await showUpgradeEvents(up, view);

    const loaded = await phase('loadversion v2 (verify, boot standby, sync)', () => unaryCall<UpgradeStatusMsg>(up, 'LoadVersion', { imageDir: v2 }));
    started.push(loaded.current!.toVm);
    const switched = await phase('runversion (switchover)', () => unaryCall<UpgradeStatusMsg>(up, 'RunVersion', {}));
    const freezeMs = switched.current!.freezeMs;
    await new Promise((r) => setTimeout(r, 2000)); // v2 writes, v1 follows as standby
    const mid = await phase('audit: agent, v2 active and v1 standby', () => unaryCall<AuditResponse>(ck, 'Audit', { process: 'bgp' }));
    await phase('acceptversion', () => unaryCall(up, 'AcceptVersion', {}));
    await phase('commitversion (stop v1)', () => unaryCall(up, 'CommitVersion', {}));
    const end = await phase('audit: agent and v2 active', () => unaryCall<AuditResponse>(ck, 'Audit', { process: 'bgp' }));
    stopEvents();
    let flow: TrafficResult | null = null;
    let back: TrafficResult | null = null;
    if (traffic) {
      const t = traffic;
      flow = await phase('stop traffic, count what arrived', () => t.stop());
      traffic = null;
    }
    if (reverse) {
      const t = reverse;
      back = await phase('stop the traffic back, count what arrived', () => t.stop());
      reverse = null;
    }
    const peerView = birdWatch ? await birdWatch.stop() : null;
    const dp = await dpStatus();

    const agentReport = await phase('fetch the upgrade report', () => unaryCall<UpgradeReport>(up, 'ShowUpgrade', { id: '' }));
    const rib = end.agent.find((t) => t.table === 'rib')!;
    const newActive = end.peers.find((p) => p.role === 'ACTIVE')!;
    const mine = newActive.digests.find((d) => d.table === 'rib')!;
    const consistent = mid.consistent && end.consistent;
    const report = {
      from_version: '1.0.0',
      to_version: newActive ? (await bgp()).peers.find((p) => p.role === 'ACTIVE')!.softwareVersion : '?',
      kernels: { from: '6.1.0-47-cloud-amd64', to: '6.1.0-50-cloud-amd64' },
      records_verified: consistent ? rib.records : 0,
      records_lost: consistent ? 0 : Math.abs(rib.records - mine.records) || -1,
      freeze_ms: freezeMs,
      // The agent's longest event-loop stall in each upgrade phase, ms (from its report), and the
      // longest of them.
      agent_loop_max_ms: reportFigures(agentReport).loopMaxMs,
      agent_loop_max_ms_by_phase: agentReport.upgrade.agentLoopMaxMs ?? {},
      table_seq: rib.seq,
      digest: rib.sha256,
      audit_detail: consistent ? '' : `${mid.detail} ${end.detail}`.trim(),
      phases,
      report_html: '',
      // Both directions: to the FIB's destinations, and back through the routes BIRD learned.
      packets_sent: flow ? flow.packetsSent + (back?.packetsSent ?? 0) : null,
      packets_lost: flow ? flow.packetsLost + (back?.packetsLost ?? 0) : null,
      max_gap_ms: flow ? Math.max(flow.maxGapMs, back?.maxGapMs ?? 0) : null,
      // The sender's own longest pause between sends: a gap as long as this one is the sender's.
      max_send_gap_ms: flow?.maxSendGapMs ?? null,
      fib_routes: lab ? dp.routes : null,
      // The BGP peer's own view (birdc), read before, during and after the upgrade.
      bgp_peer: bird ? `BIRD ${await bird.version()}` : null,
      bgp_session_resets: peerView?.resets ?? null,
      // How long each reset lasted, from BIRD's log (closed -> established again), ms.
      bgp_reset_ms: peerView?.resetMs ?? null,
      peer_routes_withdrawn: peerView?.withdrawsReceived ?? null,
      peer_routes_before: peerView?.importedBefore ?? null,
      peer_routes_after: peerView?.importedAfter ?? null,
      // How each routing session changed hands, as the bgp daemon reported it to the agent:
      // NONSTOP (TCP repair; ms = capture + restore, inside the freeze window) or
      // GRACEFUL_RESTART (ms = until the peer's End-of-RIB).
      bgp_handovers: (agentReport.sessions ?? []).map((x) => ({ session: x.session, outcome: x.outcome, ms: x.durationMs, detail: x.detail })),
      traffic: flow ? { forward: flow, back } : null,
      // What the switchover itself changed in the data plane (0 when no route changed).
      fib_changes_at_switchover: lab
        ? (agentReport.upgrade.dataplaneChanges ?? [])
            .filter((c) => c.cause.startsWith('switchover'))
            .reduce((n, c) => n + Number(c.added) + Number(c.replaced) + Number(c.deleted), 0)
        : null,
    };
    const dir = path.resolve(values['report-dir']!);
    fs.mkdirSync(dir, { recursive: true });
    const base = path.join(dir, `upgrade-${agentReport.upgrade.id}`);
    report.report_html = writeReportHtml(`${base}.html`, agentReport);
    fs.writeFileSync(`${base}.json`, JSON.stringify({ demo: report, agent: agentReport }, null, 2) + '\n');
    if (values.json) {
      console.log(JSON.stringify(report));
    } else {
      console.log(`hitless upgrade: control plane ${report.from_version} -> ${report.to_version} (kernel ${report.kernels.from} -> ${report.kernels.to})`);
      for (const p of phases) console.log(`  ${p.name.padEnd(50)} ${p.seconds.toFixed(2)} s`);
      console.log(`  write freeze at switchover: ${freezeMs.toFixed(2)} ms`);
      const stall = reportFigures(agentReport);
      if (stall.loopMaxPhase) console.log(`  agent event loop during the upgrade: longest stall ${stall.loopMaxMs.toFixed(1)} ms (${stall.loopMaxPhase})`);
      console.log(`  records verified: ${report.records_verified} (table seq ${rib.seq}), lost: ${report.records_lost}`);
      if (flow) {
        console.log(
          `  traffic through the data plane: ${flow.packetsSent} packets sent, ${flow.packetsLost} lost, longest gap ${flow.maxGapMs} ms (sender's own longest pause ${flow.maxSendGapMs} ms)`,
        );
        console.log(`  FIB: ${report.fib_routes} routes, ${report.fib_changes_at_switchover} data-plane changes at the switchover`);
        if (back) console.log(`  traffic back through BIRD's routes: ${back.packetsSent} packets sent, ${back.packetsLost} lost`);
      }
      if (peerView) {
        console.log(
          `  BGP peer (${report.bgp_peer}): ${peerView.resets} session reset(s)${peerView.resets ? ` (down ${peerView.resetMs.join(', ')} ms)` : ''}, ${peerView.withdrawsReceived} routes withdrawn, our routes before ${peerView.importedBefore}, after ${peerView.importedAfter}`,
        );
      }
      for (const x of agentReport.sessions ?? []) console.log(`  handover of ${sessionOutcomeText(x)}`);
      if (!consistent) console.log(`  AUDIT FAILED: ${report.audit_detail}`);
      console.log(`  upgrade report: ${report.report_html} (and ${base}.json)`);
    }
    // Hitless is what the network saw: a lost packet, a session reset or a withdrawn route fails it.
    if (!consistent || (flow && flow.packetsLost !== 0) || (back && back.packetsLost !== 0)) process.exitCode = 1;
    if (peerView && (peerView.resets !== 0 || peerView.withdrawsReceived !== 0)) process.exitCode = 1;
    for (const name of started) await unaryCall(vm, 'Stop', { name, timeoutS: 20 }).catch(() => undefined);
  } finally {
    for (const c of clients) c.close();
    if (agent) {
      // Anything still running (a failure midway) is stopped with the agent's help first.
      const vm = rawClient('hitless.v1.Vm', agent.socket);
      for (const name of started) await unaryCall(vm, 'Kill', { name }).catch(() => undefined);
      vm.close();
    }
    traffic?.kill();
    reverse?.kill();
    await bird?.stop();

    // A clean stop, so that the agent gives its session's CPU priority back (hitlessd --nice:
    // the session may be the operator's shell); SIGKILL if it takes over 10 s.
    if (agent) {
      const a = agent;
      const stopped = await Promise.race([a.stop().then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 10_000).unref())]);
      if (!stopped) await a.kill9();
    }
    await stopAllAgents();
    lab?.remove();
    if (values.keep && agent) fs.writeFileSync(path.join(work, 'agent.log'), agent.stderr());
    if (values.keep) say(`work directory kept: ${work}`);
    else fs.rmSync(work, { recursive: true, force: true });
  }
}

main().catch(async (e) => {
  say(`failed: ${(e as Error).message}`);
  await stopAllAgents();
  process.exit(1);
});
