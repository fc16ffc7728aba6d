/**
 * npm run bench:fib — programming a FIB through the agent, beside plain `ip -batch`, in one run.
 *
 * Each side gets its own fresh test network (harness/netlab.ts; root needed). ROUTES (default
 * 1,000,000) IPv4 /24s from 240.0.0.0/4 (reserved, never routed anywhere: the routes exist only
 * in these namespaces and no packet is sent to them), each via the receiver on port2.
 *
 *   fib-program    a routing process (this one, through the SDK) writes the routes to its FIB
 *                  table in batches of 1,000; timed from the first write to the agent's status
 *                  saying every route is programmed. Peer: the same routes as an `ip -batch` file
 *                  (`route replace P proto 201 via G dev port2` per line), timed in the same run.
 *   fib-reconcile  the agent is killed; 1% of the routes change behind its back (half deleted,
 *                  half pointed at another next hop); it starts again and reconciles: the line
 *                  gives what it applied (only those changes) and how long that took.
 *
 * Prints one JSON line per measurement; `agent_loop_max_ms` is the agent's longest event-loop
 * delay while it worked (from its own log, 5 s windows).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { encodeFibEntry } from '../agent/dataplane/fib-entry';
import type { DataPlaneStatusView } from '../agent/dataplane/fib.service';
import { ROUTE_PROTO } from '../agent/dataplane/linux-data-plane';
import { silentLogger } from '../agent/common/logger';
import { CheckpointClient } from '../agent/sdk/checkpoint-client';
import { startAgent, stopAllAgents, AgentHandle } from '../harness/agent-process';
import { rawClient, unaryCall } from '../harness/grpc-client';
import { createNetLab, NetLab } from '../harness/netlab';

const ROUTES = Number(process.env.ROUTES ?? 1_000_000);
const BATCH = 1000;
const CHANGED = Math.round(ROUTES / 100);

function prefix(i: number): string {
  return `${240 + (i >> 16)}.${(i >> 8) & 255}.${i & 255}.0/24`;
}

async function dpStatus(agent: AgentHandle): Promise<DataPlaneStatusView> {
  const c = rawClient('hitless.v1.Upgrade', agent.socket);
  try {
    return (await unaryCall<{ dataplane: DataPlaneStatusView }>(c, 'Status', {})).dataplane;
  } finally {
    c.close();
  }
}

/** The agent's longest event-loop delay logged since `from` (it logs it every 5 s at debug). */
function loopMax(agent: AgentHandle, from: number): number {
  let max = 0;
  for (const line of agent.stderr().slice(from).split('\n')) {
    const m = /"maxMs":([\d.]+)/.exec(line);
    if (m) max = Math.max(max, Number(m[1]));
  }
  return Math.round(max * 10) / 10;
}

function peerProgram(lab: NetLab, dir: string): number {
  const file = path.join(dir, 'routes.batch');
  const lines: string[] = [];
  for (let i = 0; i < ROUTES; i++) lines.push(`route replace ${prefix(i)} proto ${ROUTE_PROTO} via ${lab.nextHop4} dev port2`);
  fs.writeFileSync(file, lines.join('\n') + '\n');
  const t0 = process.hrtime.bigint();
  const r = spawnSync('ip', ['-n', lab.dataplane, '-batch', file], { stdio: ['ignore', 'ignore', 'pipe'] });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`ip -batch failed: ${r.stderr.toString().slice(0, 500)}`);
  return s;
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-bench-fib-'));
  const peerLab = createNetLab();
  const lab = createNetLab();
  try {
    const peerSeconds = peerProgram(peerLab, dir);
    peerLab.remove();

    const args = ['--dataplane', `netns:${lab.dataplane}`, '--log-level', 'debug'];
    let agent = await startAgent({ stateDir: path.join(dir, 'state'), args });
    const client = new CheckpointClient({
      address: agent.socket,
      process: 'bgp',
      instanceId: 'bgp@bench',
      vmId: 'host',
      softwareVersion: '1.0.0',
      schema: 1,
      tables: [{ name: 'fib', durability: 'ASYNC', kind: 'FIB' }],
      role: 'ACTIVE',
      logger: silentLogger,
      reconnect: false,
    });
    await client.start();
    const value = encodeFibEntry({ nextHops: [{ gateway: lab.nextHop4, interface: 'port2', weight: 1 }] });
    const logFrom = agent.stderr().length;
    const t0 = process.hrtime.bigint();
    const inFlight: Promise<number>[] = [];
    for (let i = 0; i < ROUTES; i += BATCH) {
      const b = client.batch('fib');
      for (let j = i; j < Math.min(ROUTES, i + BATCH); j++) b.put(prefix(j), value);
      inFlight.push(b.commit());
      if (inFlight.length >= 64) await inFlight.shift();
    }
    await Promise.all(inFlight);
    const written = Number(process.hrtime.bigint() - t0) / 1e9;
    for (;;) {
      const d = await dpStatus(agent);
      if (d.routes === ROUTES && d.programmedSeq === d.tableSeq && d.pending === 0) {
        if (d.failureCount) throw new Error(`the data plane refused ${d.failureCount} routes: ${d.failures.join('; ')}`);
        break;
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const held = Number(execFileSync('sh', ['-c', `ip -n ${lab.dataplane} route show proto ${ROUTE_PROTO} | wc -l`], { encoding: 'utf8' }));
    console.log(
      JSON.stringify({
        bench: 'fib-program',
        routes: ROUTES,
        seconds: +seconds.toFixed(3),
        written_seconds: +written.toFixed(3),
        kernel_routes: held,
        peer: 'ip-batch',
        peer_seconds: +peerSeconds.toFixed(3),
        ratio: +(seconds / peerSeconds).toFixed(2),
        agent_loop_max_ms: loopMax(agent, logFrom),
      }),
    );

    // 1% changed while the agent is down: half deleted, half pointed at the sender side.
    await client.close();
    await agent.kill9();
    const lines: string[] = [];
    for (let k = 0; k < CHANGED; k++) {
      const i = Math.floor((k * ROUTES) / CHANGED);
      lines.push(k % 2 === 0 ? `route del ${prefix(i)} proto ${ROUTE_PROTO}` : `route replace ${prefix(i)} proto ${ROUTE_PROTO} via 192.0.2.2 dev port1`);
    }
    const file = path.join(dir, 'drift.batch');
    fs.writeFileSync(file, lines.join('\n') + '\n');
    execFileSync('ip', ['-n', lab.dataplane, '-batch', file]);
    const t1 = process.hrtime.bigint();
    agent = await startAgent({ stateDir: path.join(dir, 'state'), args });
    const startSeconds = Number(process.hrtime.bigint() - t1) / 1e9;
    const r = (await dpStatus(agent)).lastReconcile!;
    console.log(
      JSON.stringify({
        bench: 'fib-reconcile',
        routes: r.routes,
        changed_behind_its_back: CHANGED,
        applied: r.added + r.replaced + r.deleted,
        added: r.added,
        replaced: r.replaced,
        deleted: r.deleted,
        seconds: +(r.ms / 1000).toFixed(3),
        agent_start_seconds: +startSeconds.toFixed(3),
      }),
    );
  } finally {
    await stopAllAgents();
    lab.remove();
    peerLab.remove();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
