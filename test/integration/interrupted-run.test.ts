/**
 * A run stopped by a signal ends what it started. A test run, the demo or a benchmark cleans up
 * in `after` hooks and `finally` blocks, which SIGTERM or SIGINT skip: agents, their guests (they
 * outlive the agent by design), daemons and the test network's namespaces were left running.
 * The run here is a separate process (fixtures/interrupted-run.ts); its guest is a stand-in,
 * named as such there.
 */
import assert from 'node:assert/strict';
import { execFileSync, fork } from 'node:child_process';
import path from 'node:path';
import { netLabAvailable } from '../../harness/netlab';
import { pidAlive as alive } from '../../agent/vm/qemu-hypervisor';
import { until } from '../../harness/wait';

const namespaces = () => execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' });

describe('a run stopped by a signal', function () {
  this.timeout(120_000);
  const started: { agent: number; guest: number; daemon: number; namespaces: string[] }[] = [];

  before(function () {
    if (!netLabAvailable().ok) this.skip();
  });

  after(() => {
    // Whatever the assertions found still running.
    for (const s of started) {
      for (const pid of [s.agent, s.guest, s.daemon]) if (alive(pid)) process.kill(pid, 'SIGKILL');
      for (const ns of s.namespaces) {
        try {
          execFileSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
        } catch {
          // gone, as it should be
        }
      }
    }
  });

  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    it(`${signal} ends its agent, the agent's guests, its daemon and its namespaces, and exits as the signal would`, async () => {
      const run = fork(path.join(__dirname, 'fixtures', 'interrupted-run.js'), [], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
      let stderr = '';
      run.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<number | null>((resolve) => run.once('exit', (code) => resolve(code)));
      const s = await new Promise<(typeof started)[number]>((resolve, reject) => {
        run.once('message', (m) => resolve(m as (typeof started)[number]));
        run.once('exit', (code) => reject(new Error(`the run ended before it started everything (${code}): ${stderr}`)));
      });
      started.push(s);
      assert.ok([s.agent, s.guest, s.daemon].every(alive), 'all of it runs');
      run.kill(signal);
      assert.equal(await exited, signal === 'SIGTERM' ? 143 : 130, stderr);
      await until('the agent, the guest and the daemon gone', () => ![s.agent, s.guest, s.daemon].some(alive), 10_000, 20);
      const left = namespaces();
      for (const ns of s.namespaces) assert.ok(!left.includes(ns), `namespace ${ns} removed`);
    });
  }
});
