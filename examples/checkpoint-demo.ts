#!/usr/bin/env node
/**
 * npm run demo:checkpoint: the checkpoint path end to end on the host, with real processes. hitlessd starts
 * on a private state directory; a BGP-like daemon v1.0.0 loads a full-size table and keeps
 * changing it; a v2.0.0 standby joins (bulk snapshot, then changes); the agent switches over
 * (freeze, drain, promote, demote); the new active keeps writing and the old one follows; both
 * tables are compared exactly. Prints a short report; with --json the last line is one object.
 *
 * Options: --records N (default 200000)  --churn RATE (records/s, default 20000)  --json
 */
import { parseArgs } from 'node:util';
import { startAgent, stopAllAgents } from '../harness/agent-process';
import { startDaemon, stopAllDaemons, DaemonHandle } from '../harness/daemon-process';
import { rawClient, unaryCall } from '../harness/grpc-client';
import { phaseRecorder } from './common/phases';

const { values } = parseArgs({
  options: {
    records: { type: 'string', default: '200000' },
    churn: { type: 'string', default: '20000' },
    json: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h' },
  },
});
if (values.help) {
  process.stdout.write('Usage: npm run demo:checkpoint -- [--records N] [--churn RATE] [--json]\n');
  process.exit(0);
}

const { phases, say, phase } = phaseRecorder('demo');

async function quiesce(d: DaemonHandle): Promise<number> {
  const n = d.events.length;
  d.send('stop');
  return (await d.waitFor((e) => e.event === 'stopped', 60_000, n)).seq as number;
}

async function main(): Promise<void> {
  const records = Number(values.records);
  const churn = String(Number(values.churn));
  const agent = await phase('start agent', () => startAgent());
  const c = rawClient('hitless.v1.Checkpoint', agent.socket);
  const status = async () =>
    (await unaryCall<{ processes: { peers: { instanceId: string; ready: boolean; lag: number }[] }[] }>(c, 'Status', { process: 'bgp' })).processes[0];
  try {
    const v1 = await phase('v1 active loads its table', async () => {
      const d = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'slot-a', '--version', '1.0.0', '--records', String(records), '--churn', churn]);
      await d.waitFor((e) => e.event === 'loaded', 300_000);
      return d;
    });
    const v2 = await phase('v2 standby syncs (bulk snapshot + changes)', async () => {
      const d = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'slot-b', '--role', 'standby', '--version', '2.0.0', '--churn', churn]);
      let last = '';
      for (;;) {
        const peer = (await status()).peers.find((p) => p.instanceId === 'bgp@slot-b');
        if (peer?.ready) break;
        const line = peer ? `standby lag ${peer.lag} batches` : 'standby registering';
        if (line !== last) say(`  ${line}`);
        last = line;
        await new Promise((r) => setTimeout(r, 100));
      }
      return d;
    });
    await phase('changes flow while both run', () => new Promise((r) => setTimeout(r, 1000)));
    const sw = await phase('switchover to v2', () =>
      unaryCall<{ freezeMicros: number; tableSeqs: Record<string, number> }>(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@slot-b' }),
    );
    await phase('v2 active writes, v1 follows as standby', () => new Promise((r) => setTimeout(r, 1000)));
    const verified = await phase('verify tables', async () => {
      const seq = await quiesce(v2);
      v1.send('stop');
      for (;;) {
        const d = await v1.digest();
        if (d.seq === seq) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      const [a, b] = [await v2.digest(), await v1.digest()];
      return {
        equal: a.sha256 === b.sha256,
        records: a.records as number,
        sha256: a.sha256 as string,
        failedV1: v1.events.filter((e) => e.event === 'write-failed').length,
        failedV2: v2.events.filter((e) => e.event === 'write-failed').length,
      };
    });
    await phase('stop v1', () => v1.stop());
    const report = {
      from_version: '1.0.0',
      to_version: '2.0.0',
      records_verified: verified.equal ? verified.records : 0,
      records_lost: verified.equal && verified.failedV1 + verified.failedV2 === 0 ? 0 : -1,
      freeze_ms: sw.freezeMicros / 1000,
      digest: verified.sha256,
      phases,
    };
    if (!values.json) {
      console.log(`hitless demo: bgp ${report.from_version} -> ${report.to_version}`);
      for (const p of phases) console.log(`  ${p.name.padEnd(44)} ${p.seconds.toFixed(3)} s`);
      console.log(`  records verified: ${report.records_verified}, lost: ${report.records_lost === 0 ? 0 : 'UNKNOWN (tables differ)'}`);
      console.log(`  write freeze at switchover: ${report.freeze_ms.toFixed(2)} ms`);
    } else {
      console.log(JSON.stringify(report));
    }
    if (report.records_lost !== 0) process.exitCode = 1;
  } finally {
    c.close();
    await stopAllDaemons();
    await stopAllAgents();
  }
}

main().catch(async (e) => {
  say(`failed: ${(e as Error).message}`);
  await stopAllDaemons();
  await stopAllAgents();
  process.exit(1);
});
