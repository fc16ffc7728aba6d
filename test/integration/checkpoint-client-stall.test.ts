/**
 * A routing process whose event loop stalls for longer than the agent's keepalive allows (20 s)
 * while batches are in flight: the agent drops its connection; when the process runs again it
 * registers anew, its batches are stored, and nothing is lost. Before the SDK deferred its
 * cancels, the process's memory ran away in Node's HTTP/2 layer (23 GB, OOM-killed); the test
 * stops it at 1.5 GB. Real agent, real separate writer process, real sockets.
 */
import assert from 'node:assert/strict';
import { ChildProcess, fork } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { rawClient, unaryCall } from '../../harness/grpc-client';

const STALL_MS = 20_000;
const RSS_LIMIT_KB = 1.5 * 1024 * 1024;

interface Report {
  event: string;
  seq?: number;
  records?: number;
  rssMb?: number;
  message?: string;
  sha256?: string;
  slicedSha256?: string;
  slicedSeq?: number;
}

describe('checkpoint: a writer whose event loop stalls past the keepalive', function () {
  this.timeout(120_000);
  let child: ChildProcess | null = null;

  after(async () => {
    if (child && child.exitCode === null) child.kill('SIGKILL');
    await stopAllAgents();
  });

  it('comes back, stores every batch, and its memory stays bounded', async () => {
    const agent: AgentHandle = await startAgent();
    const proc = fork(path.join(__dirname, 'fixtures', 'stalling-writer.js'), [agent.socket, String(STALL_MS)], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    child = proc;
    const reports: Report[] = [];
    let peakKb = 0;
    const watch = setInterval(() => {
      try {
        const kb = Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${proc.pid}/status`, 'utf8'))![1]);
        peakKb = Math.max(peakKb, kb);
        if (kb > RSS_LIMIT_KB) proc.kill('SIGKILL');
      } catch {
        // gone
      }
    }, 200);
    try {
      const done = await new Promise<Report>((resolve, reject) => {
        proc.on('message', (m: Report) => {
          reports.push(m);
          if (m.event === 'done') resolve(m);
          if (m.event === 'error') reject(new Error(`writer: ${m.message}`));
        });
        proc.on('exit', (code, signal) => reject(new Error(`writer exited (${code ?? signal}) before it was done; peak RSS ${Math.round(peakKb / 1024)} MB`)));
      });
      assert.ok(peakKb < RSS_LIMIT_KB, `peak RSS ${Math.round(peakKb / 1024)} MB`);
      assert.equal(done.seq, 62, 'every batch acknowledged: 20, a burst of 32 across the stall, then 10');
      assert.deepEqual([done.slicedSha256, done.slicedSeq], [done.sha256, 62], 'the digest computed in slices is the digest');
      const c = rawClient('hitless.v1.Checkpoint', agent.socket);
      try {
        const st = await unaryCall<{ processes: { tables: { name: string; seq: number; records: number }[]; peers: unknown[] }[] }>(c, 'Status', {
          process: 'bgp',
        });
        const rib = st.processes[0].tables.find((t) => t.name === 'rib')!;
        assert.deepEqual([rib.seq, rib.records], [62, done.records], "the agent's table equals the writer's");
      } finally {
        c.close();
      }
      // The stall really cost the connection: the agent saw the session end and a new one begin.
      const log = agent.stderr() + agent.stdout();
      assert.equal((log.match(/"process registered"/g) ?? []).length, 2, 'registered again after the stall');
    } finally {
      clearInterval(watch);
    }
  });
});
