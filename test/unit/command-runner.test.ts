/**
 * The agent's command runner: a real helper process starting real commands (sh, cat, sleep).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CommandRunner, type DetachedProcess } from '../../agent/host/command-runner';
import { pidAlive as alive } from '../../agent/vm/qemu-hypervisor';
import { until } from '../../harness/wait';

const exitOf = (p: DetachedProcess) => new Promise<[number | null, string | null]>((resolve) => p.once('exit', (c, s) => resolve([c, s])));

describe('command runner (a helper process starts the commands)', function () {
  this.timeout(20_000);
  let runner: CommandRunner;
  let dir: string;
  const leftover: number[] = [];

  beforeEach(() => {
    runner = new CommandRunner();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-runner-'));
  });

  afterEach(() => {
    runner.stop();
    for (const pid of leftover.splice(0)) if (alive(pid)) process.kill(pid, 'SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('returns what a command printed and how it ended, and says when a command does not exist', async () => {
    const ok = await runner.run('sh', ['-c', 'printf "a\\nb"; printf oops >&2']);
    assert.deepEqual([ok.code, ok.stdout, ok.stderr, ok.error], [0, 'a\nb', 'oops', '']);
    const bad = await runner.run('sh', ['-c', 'echo "no such table" >&2; exit 4']);
    assert.equal(bad.code, 4);
    await assert.rejects(runner.output('sh', ['-c', 'echo "no such table" >&2; exit 4']), /^Error: sh -c .*: no such table$/);
    const missing = await runner.run('hitless-no-such-command', []);
    assert.equal(missing.errno, 'ENOENT');
    assert.equal(missing.code, null);
  });

  it('feeds stdin in order, waits for each part to be taken, and streams stdout back', async () => {
    const got: Buffer[] = [];
    const cmd = runner.stream('cat', [], { stdin: true, onStdout: (c) => got.push(c) });
    let sent = '';
    for (let i = 0; i < 200; i++) {
      const line = `line ${i} ${'x'.repeat(1000)}\n`;
      sent += line;
      await cmd.write(line);
    }
    cmd.end();
    const r = await cmd.done;
    assert.equal(r.code, 0);
    assert.equal(Buffer.concat(got).toString(), sent);
  });

  it('kills a command past its time limit and says so', async () => {
    const r = await runner.run('sleep', ['30'], { timeoutMs: 200 });
    assert.equal(r.timedOut, true);
    assert.equal(r.signal, 'SIGKILL');
  });

  it('reports a detached command exit, and its log holds what it printed', async () => {
    const log = path.join(dir, 'out.log');
    const p = await runner.launchDetached('sh', ['-c', 'echo started; exit 3'], { logPath: log, cwd: dir });
    assert.ok(p.pid > 0);
    const [code] = p.exitCode !== null ? [p.exitCode] : await exitOf(p);
    assert.equal(code, 3);
    assert.equal(fs.readFileSync(log, 'utf8'), 'started\n');
  });

  it('when the helper dies: waiting commands fail saying so, detached ones live on, the next command works', async () => {
    const detached = await runner.launchDetached('sleep', ['30'], { logPath: path.join(dir, 'sleep.log') });
    leftover.push(detached.pid);
    let waitingPid = 0;
    const waiting = runner.stream('sh', ['-c', 'echo $$; exec sleep 30'], { onStdout: (c) => (waitingPid = Number(c.toString().trim())) });
    await until('the waiting command runs', () => waitingPid > 0, 5000, 10);
    leftover.push(waitingPid);
    runner.stop();
    const r = await waiting.done;
    assert.match(r.error, /command runner process ended .* it is started again for the next command/);
    assert.ok(alive(detached.pid), 'the detached command still runs');
    // A command the agent waited for does not outlive the helper (nothing would ever end it).
    await until('the waiting command ended', () => !alive(waitingPid), 5000, 10);
    const next = await runner.run('sh', ['-c', 'echo again']);
    assert.equal(next.stdout, 'again\n');
  });
});
