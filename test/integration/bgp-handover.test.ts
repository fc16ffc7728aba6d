/**
 * The example bgp daemon speaking BGP through the agent, on a real test network: BIRD 2 in the
 * receiver namespace peers with the active daemon (running in the data-plane namespace, as
 * 198.51.100.1); the routes BIRD announces become FIB entries the agent programs, and traffic
 * from the sender to BIRD's prefixes flows through them. A switchover through the agent hands the
 * session to the standby without TCP repair: the graceful-restart fallback. BIRD sees the reset
 * (reported, never hidden) but withdraws nothing, and no packet and no data-plane route is lost.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { StatusResponse } from '../../agent/checkpoint/messages';
import type { DataPlaneStatusView } from '../../agent/dataplane/fib.service';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { BirdPeer, birdPrefixes, startBird } from '../../harness/bird-peer';
import { DaemonHandle, startDaemon, stopAllDaemons } from '../../harness/daemon-process';
import { AnyClient, rawClient, unaryCall } from '../../harness/grpc-client';
import { NetLab, createNetLab, netLabAvailable } from '../../harness/netlab';
import { Traffic, startTraffic } from '../../harness/traffic';
import { until } from '../../harness/wait';

const BIRD_ROUTES = 2000;
/** Learned: 2,000 IPv4 and 200 IPv6 prefixes. */
const LEARNED = BIRD_ROUTES + BIRD_ROUTES / 10;

describe('BGP through the agent: FIB from BIRD, handover by graceful restart (namespaces, real packets)', function () {
  this.timeout(120_000);
  let lab: NetLab | null = null;
  let bird: BirdPeer | null = null;
  let agent: AgentHandle;
  let ck: AnyClient;
  let up: AnyClient;
  let traffic: Traffic | null = null;
  const daemons: DaemonHandle[] = [];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-bgp-'));
  const dp = async () => (await unaryCall<{ dataplane: DataPlaneStatusView }>(up, 'Status', {})).dataplane;
  const bgpArgs = (vm: string, role: string) => [
    '--agent',
    agent.socket,
    '--vm',
    vm,
    '--role',
    role,
    '--records',
    '100',
    '--json-only',
    '--bgp-peer',
    '198.51.100.2:65000',
    '--bgp-as',
    '65001',
    '--bgp-router-id',
    '198.51.100.1',
    '--bgp-announce',
    '192.0.2.0/24,2001:db8:1::/64',
    '--bgp-next-hop',
    '198.51.100.1,2001:db8:2::1',
  ];

  before(async function () {
    if (!netLabAvailable().ok) this.skip();
    lab = createNetLab();
    bird = await startBird({
      netns: lab.receiver,
      dir,
      routerId: '198.51.100.2',
      localAddress: '198.51.100.2',
      localAs: 65000,
      neighbor: '198.51.100.1',
      neighborAs: 65001,
      routes: BIRD_ROUTES,
      nextHop6: '2001:db8:2::2',
    });
    agent = await startAgent({ args: ['--dataplane', `netns:${lab.dataplane}`] });
    ck = rawClient('hitless.v1.Checkpoint', agent.socket);
    up = rawClient('hitless.v1.Upgrade', agent.socket);
  });

  after(async () => {
    try {
      traffic?.kill();
      await stopAllDaemons();
      await stopAllAgents();
      await bird?.stop();
    } finally {
      lab?.remove();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('the active speaks BGP with BIRD: what BIRD announces is in the FIB, and packets follow it', async () => {
    daemons.push(startDaemon('bgp-rib', bgpArgs('a', 'active'), {}, lab!.dataplane));
    await until(
      'BIRD Established with our 2 routes',
      async () => {
        const p = await bird!.protocol();
        return p.state === 'Established' && p.imported === 2;
      },
      30_000,
      100,
    );
    await until(
      'the learned routes programmed',
      async () => {
        const d = await dp();
        return d.routes === LEARNED && d.programmedSeq === d.tableSeq && d.pending === 0;
      },
      30_000,
      100,
    );
    const kernel = execFileSync('ip', ['-n', lab!.dataplane, 'route', 'show', '10.0.5.0/24'], { encoding: 'utf8' });
    assert.match(kernel, /10\.0\.5\.0\/24 via 198\.51\.100\.2 dev port2 proto 201/);
    // BIRD put ours into its kernel table, next hop the data plane.
    assert.match(execFileSync('ip', ['-n', lab!.receiver, 'route', 'show', '192.0.2.0/24'], { encoding: 'utf8' }), /via 198\.51\.100\.1/);
    // The RIBs and the session are the process's tables, held by the agent.
    const st = (await unaryCall<StatusResponse>(ck, 'Status', { process: 'bgp' })).processes[0];
    const t = (n: string) => st.tables.find((x) => x.name === n)?.records;
    assert.deepEqual([t('bgp-adj-in'), t('bgp-loc-rib'), t('bgp-adj-out'), t('bgp-sessions')], [LEARNED, LEARNED, 2, 1]);

    const { v4 } = birdPrefixes(BIRD_ROUTES);
    traffic = await startTraffic(
      lab!,
      v4.slice(0, 500).map((p) => p.replace('.0/24', '.1')),
      5000,
    );
    await new Promise((r) => setTimeout(r, 1000));
    const tr = await traffic.stop();
    traffic = null;
    assert.ok(tr.packetsSent > 3000);
    assert.equal(tr.packetsLost, 0, JSON.stringify(tr));
  });

  it('a switchover hands the session to the standby by graceful restart: BIRD withdraws nothing, no packet is lost, no route changes', async () => {
    daemons.push(startDaemon('bgp-rib', bgpArgs('b', 'standby'), {}, lab!.dataplane));
    await until(
      'the standby READY',
      async () => {
        const st = (await unaryCall<StatusResponse>(ck, 'Status', { process: 'bgp' })).processes[0];
        return st.peers.some((p) => p.instanceId === 'bgp@b' && p.ready);
      },
      30_000,
      100,
    );
    const before = await bird!.protocol();
    const programmedBefore = (await dp()).changesProgrammed;
    const { v4 } = birdPrefixes(BIRD_ROUTES);
    traffic = await startTraffic(
      lab!,
      v4.slice(0, 500).map((p) => p.replace('.0/24', '.1')),
      5000,
    );
    await new Promise((r) => setTimeout(r, 500));
    await unaryCall(ck, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@b' });
    const b = daemons[1];
    await b.waitFor((e) => e.event === 'bgp-established', 30_000);
    await b.waitFor((e) => e.event === 'bgp-end-of-rib' && e.afi === 1, 30_000);
    await until('BIRD Established again', async () => (await bird!.protocol()).state === 'Established', 30_000, 100);
    await new Promise((r) => setTimeout(r, 1000));
    const tr = await traffic.stop();
    traffic = null;
    const after = await bird!.protocol();
    assert.notEqual(after.since, before.since, 'BIRD saw the session reset: no nonstop routing is claimed without TCP repair');
    assert.equal(after.withdrawsReceived, before.withdrawsReceived, 'BIRD received no withdrawal');
    assert.equal(after.imported, 2);
    assert.equal(tr.packetsLost, 0, JSON.stringify(tr));
    const d = await dp();
    assert.equal(d.routes, LEARNED);
    assert.equal(d.changesProgrammed, programmedBefore, 'the new active relearned the same routes: no data-plane change');
    const est = b.events.find((e) => e.event === 'bgp-established')!;
    assert.equal(est.restored, LEARNED, 'the new active started from the checkpointed Adj-RIB-In');
  });
});
