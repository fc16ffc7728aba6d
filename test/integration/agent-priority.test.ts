/**
 * hitlessd --nice: every thread of the agent takes the priority and, where the kernel shares the
 * CPU between sessions first (autogroups), so does the agent's session: VMs run in sessions of
 * their own, and without it each busy guest got as much CPU as the agent's whole session. The
 * helper that starts commands and VMs keeps the start priority, and a clean stop gives the
 * session its value back.
 *
 * The agent runs in a session made for the test by a shell that stays in it after the agent
 * ends (so this process's own session is not touched, and the session's value after the stop
 * can be read); the test ends the shell. Needs
 * root (a negative nice) and a kernel with autogroups; skipped otherwise.
 */
import assert from 'node:assert/strict';
import { spawn, ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AGENT_MAIN, tempDir } from '../../harness/agent-process';
import { pidAlive } from '../../agent/vm/qemu-hypervisor';
import { until } from '../../harness/wait';

const autogroupNice = (pid: number): number => Number(/nice\s+(-?\d+)/.exec(fs.readFileSync(`/proc/${pid}/autogroup`, 'utf8'))![1]);

describe('hitlessd --nice: the agent ahead of its VMs', function () {
  this.timeout(60_000);
  let shell: ChildProcess | null = null;
  let agentPid = 0;
  const dir = tempDir('nice');

  before(function () {
    if (process.getuid?.() !== 0 || !fs.existsSync('/proc/self/autogroup')) this.skip();
  });
  after(() => {
    if (agentPid && pidAlive(agentPid)) process.kill(agentPid, 'SIGKILL');
    if (shell?.pid && pidAlive(shell.pid)) process.kill(-shell.pid, 'SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("sets its threads and its session to N, leaves its helper at the start priority, and gives the session's value back at a clean stop", async () => {
    const socket = path.join(dir, 'agent.sock');
    const cmd = `"${process.execPath}" "${AGENT_MAIN}" --state-dir "${dir}" --grpc-socket "${socket}" --nice=-3 & echo "agent $!"; wait; exec sleep 60`;
    shell = spawn('sh', ['-c', cmd], { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    shell.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    let err = '';
    shell.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    const sessionBefore = (await until(
      'the shell in its own session',
      () => (fs.existsSync(`/proc/${shell!.pid}/autogroup`) ? { nice: autogroupNice(shell!.pid!) } : null),
      10_000,
    ))!.nice;
    assert.notEqual(sessionBefore, -3, 'the session starts elsewhere');
    await until('the agent ready', () => /"event":"ready"/.test(out), 30_000).catch((e: Error) => {
      throw new Error(`${e.message}; its output: ${out} ${err.slice(-2000)}`);
    });
    agentPid = Number(/^agent (\d+)$/m.exec(out)![1]);

    assert.equal(autogroupNice(agentPid), -3, "the agent's session");
    const threads = fs.readdirSync(`/proc/${agentPid}/task`).map(Number);
    assert.ok(threads.length > 4, 'V8 and libuv threads exist');
    for (const tid of threads) assert.equal(os.getPriority(tid), -3, `thread ${tid}`);
    const helper = Number(fs.readFileSync(`/proc/${agentPid}/task/${agentPid}/children`, 'utf8').trim().split(/\s+/)[0]);
    assert.ok(helper > 0, 'the command helper runs');
    assert.equal(os.getPriority(helper), os.getPriority(), 'the helper is back at the start priority');

    process.kill(agentPid, 'SIGTERM');
    await until('the agent stopped', () => !pidAlive(agentPid), 30_000);
    assert.equal(autogroupNice(shell.pid!), sessionBefore, "the session's value is back");
  });
});
