/**
 * Running as a service: scripts/install.sh installs the built tree, the hitlessd and issu
 * commands and the systemd unit into temporary directories; `systemd-analyze verify` checks the
 * unit; then the unit's own ExecStart and ExecStartPost (readiness) command lines are run with the
 * state and socket paths pointed at temporary directories. systemd itself is not PID 1 on this
 * machine, so starting the unit through systemctl is the one part not exercised here.
 */
import assert from 'node:assert/strict';
import { ChildProcess, execFile, execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { agentNodeFlags, tempDir } from '../../harness/agent-process';

const run = promisify(execFile);
const REPO = path.resolve(__dirname, '../../..');

/** The command line of `key=` in a unit file, split on spaces (the unit uses no quoting). */
function unitCommand(unit: string, key: string): string[] {
  const line = unit.split('\n').find((l) => l.startsWith(`${key}=`));
  assert.ok(line, `the unit has ${key}=`);
  return line
    .slice(key.length + 1)
    .split(' ')
    .filter((w) => w && w !== '$HITLESSD_OPTS');
}

describe('running as a service: install script and systemd unit', function () {
  this.timeout(120_000);
  let root: string;
  const procs: ChildProcess[] = [];

  before(async () => {
    root = tempDir('install');
    const group = execFileSync('id', ['-gn']).toString().trim();
    await run(
      'bash',
      [
        path.join(REPO, 'scripts/install.sh'),
        '--prefix',
        `${root}/opt`,
        '--bin-dir',
        `${root}/bin`,
        '--unit-dir',
        `${root}/units`,
        '--group',
        group,
        '--no-start',
      ],
      { cwd: REPO },
    );
  });

  after(() => {
    for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('installs a unit that systemd-analyze verify accepts (and a broken copy it does not)', async () => {
    const unitFile = `${root}/units/hitlessd.service`;
    const unit = fs.readFileSync(unitFile, 'utf8');
    assert.doesNotMatch(unit, /@[A-Z]+@/, 'every placeholder is filled in');
    assert.match(unit, /^KillMode=process$/m, 'a stop leaves the VMs running');
    assert.match(unit, /^Restart=on-failure$/m);
    const verify = await run('systemd-analyze', ['verify', unitFile]);
    assert.equal(verify.stderr.trim(), '', verify.stderr);
    // The check is real: a misspelt key and a missing binary are each reported.
    const broken = `${root}/units/broken.service`;
    const verifyOutput = async (text: string) => {
      fs.writeFileSync(broken, text);
      return run('systemd-analyze', ['verify', broken]).then(
        (r) => r.stderr,
        (e: { stderr: string }) => e.stderr,
      );
    };
    assert.match(await verifyOutput(unit.replace(/^KillMode=process$/m, 'KilMode=process')), /Unknown key 'KilMode'/);
    assert.match(await verifyOutput(unit.replace(`${root}/bin/hitlessd`, `${root}/bin/nothing`)), /bin\/nothing is not executable/);
    fs.rmSync(broken);
  });

  it("the unit's readiness command waits for the agent the unit starts, which serves on a 0660 socket and stops cleanly on SIGTERM", async () => {
    const unit = fs.readFileSync(`${root}/units/hitlessd.service`, 'utf8');
    const state = `${root}/state`;
    const runDir = `${root}/run`;
    fs.mkdirSync(runDir);
    const paths = (argv: string[]) => argv.map((a) => a.replace('/var/lib/hitless', state).replace('/run/hitless', runDir));
    const start = paths(unitCommand(unit, 'ExecStart'));
    const ready = paths(unitCommand(unit, 'ExecStartPost'));
    assert.equal(start[0], `${root}/bin/hitlessd`);
    assert.equal(ready[0], `${root}/bin/issu`);

    // Readiness first: it must wait for an agent that is not there yet.
    const waiting = run(ready[0], ready.slice(1));
    const agent = spawn(start[0], start.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    procs.push(agent);
    const { stdout } = await waiting;
    assert.match(stdout, /The agent at unix:.*agent\.sock answers/);
    assert.equal(fs.statSync(`${runDir}/agent.sock`).mode & 0o777, 0o660);
    // The installed agent runs with the Node flags on hitlessd's first line, as the tests' agents do.
    const argv = fs.readFileSync(`/proc/${agent.pid}/cmdline`, 'utf8').split('\0');
    const flags = agentNodeFlags();
    assert.ok(flags.length > 0, 'hitlessd names its Node flags on its first line');
    for (const f of flags) assert.ok(argv.includes(f), `installed hitlessd runs with ${f}: ${argv.join(' ')}`);

    // The installed issu finds the agent through HITLESS_GRPC_SOCKET (its default otherwise is
    // the unit's /run/hitless/agent.sock).
    const status = await run(`${root}/bin/issu`, ['--json', 'checkpoint', 'status'], { env: { ...process.env, HITLESS_GRPC_SOCKET: `${runDir}/agent.sock` } });
    assert.deepEqual(JSON.parse(status.stdout).processes, []);
    assert.match(fs.readFileSync(`${root}/bin/issu`, 'utf8'), /HITLESS_GRPC_SOCKET:-\/run\/hitless\/agent\.sock/);

    const exited = new Promise<number | null>((resolve) => agent.on('exit', (code) => resolve(code)));
    agent.kill('SIGTERM');
    assert.equal(await exited, 0, 'a clean stop exits 0, so systemd does not count it as a failure');

    // With no agent, readiness gives up after its timeout with exit status 3.
    await assert.rejects(run(ready[0], [ready[1], ready[2], '--timeout-ms', '1500', 'wait-ready']), (e: { code: number; stderr: string }) => {
      assert.equal(e.code, 3);
      assert.match(e.stderr, /cannot reach the agent/);
      return true;
    });
  });
});
