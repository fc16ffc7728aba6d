/**
 * hitlessd as a process: flags and help, listeners, grpc.health.v1 and server reflection on every
 * listener, graceful shutdown, and the issu CLI against it.
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import assert from 'node:assert/strict';
import { ChildProcess, execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { CheckpointClient } from '../../agent/sdk/checkpoint-client';
import { AGENT_MAIN, agentNodeFlags, startAgent, stopAllAgents, tempDir } from '../../harness/agent-process';
import { rawClient } from '../../harness/grpc-client';
import { until } from '../../harness/wait';

const run = promisify(execFile);
const ISSU = path.resolve(__dirname, '../../agent/cli/issu.js');
const NM = path.resolve(__dirname, '../../../node_modules');

function loadService(file: string, includeDir: string, name: string): grpc.ServiceClientConstructor {
  const def = protoLoader.loadSync(file, { includeDirs: [includeDir], keepCase: true, defaults: true, enums: String });
  let node: unknown = grpc.loadPackageDefinition(def);
  for (const p of name.split('.')) node = (node as Record<string, unknown>)[p];
  return node as grpc.ServiceClientConstructor;
}

describe('agent: process, listeners and standard services', function () {
  this.timeout(60_000);
  after(stopAllAgents);

  it('prints complete --help and exits 0', async () => {
    const { stdout } = await run(process.execPath, [AGENT_MAIN, '--help']);
    for (const flag of ['--grpc-socket', '--grpc-tcp', '--state-dir', '--fsync', '--max-key-bytes', '--stall-timeout-ms', '--log-level'])
      assert.match(stdout, new RegExp(flag));
  });

  it('refuses plaintext TCP on a non-loopback address with a message saying what to use', async () => {
    const dir = tempDir('agent');
    await assert.rejects(run(process.execPath, [AGENT_MAIN, '--state-dir', dir, '--grpc-tcp', '0.0.0.0:0']), (e: { stderr: string; code: number }) => {
      assert.equal(e.code, 1);
      assert.match(e.stderr, /refusing plaintext gRPC on non-loopback address 0\.0\.0\.0; use 127\.0\.0\.1 or ::1/);
      return true;
    });
  });

  it('serves grpc.health.v1 and server reflection on the unix socket and on TCP', async () => {
    const agent = await startAgent({ tcp: true });
    const Health = loadService(
      path.join(NM, 'grpc-health-check/proto/health/v1/health.proto'),
      path.join(NM, 'grpc-health-check/proto'),
      'grpc.health.v1.Health',
    );
    const Reflection = loadService(
      path.join(NM, '@grpc/reflection/build/proto/grpc/reflection/v1alpha/reflection.proto'),
      path.join(NM, '@grpc/reflection/build/proto'),
      'grpc.reflection.v1alpha.ServerReflection',
    );
    for (const addr of [`unix:${agent.socket}`, agent.tcp!]) {
      const h = new Health(addr, grpc.credentials.createInsecure());
      for (const service of ['', 'hitless.v1.Checkpoint']) {
        const r = await new Promise<{ status: string }>((res, rej) => h.Check({ service }, (e: Error | null, v: { status: string }) => (e ? rej(e) : res(v))));
        assert.equal(r.status, 'SERVING', `${addr} health of '${service}'`);
      }
      h.close();
      const refl = new Reflection(addr, grpc.credentials.createInsecure());
      const names = await new Promise<string[]>((res, rej) => {
        const call = refl.ServerReflectionInfo();
        call.on('data', (m: { list_services_response?: { service: { name: string }[] } }) => {
          res((m.list_services_response?.service ?? []).map((s) => s.name));
          call.end();
        });
        call.on('error', rej);
        call.write({ list_services: '' });
      });
      assert.ok(names.includes('hitless.v1.Checkpoint'), `${addr} lists hitless.v1.Checkpoint: ${names}`);
      assert.ok(names.includes('grpc.health.v1.Health'));
      refl.close();
    }
  });

  it('shuts down gracefully on SIGTERM and keeps its data for the next start', async () => {
    const agent = await startAgent();
    const a = new CheckpointClient({
      address: agent.socket,
      process: 'bgp',
      instanceId: 'bgp@vm1',
      vmId: 'vm1',
      softwareVersion: '1',
      schema: 1,
      tables: [{ name: 'rib', durability: 'ASYNC' }],
      role: 'ACTIVE',
      reconnect: false,
    });
    await a.start();
    await a.batch('rib').put('10.0.0.0/8', Buffer.from('x')).commit();
    await a.close();
    await agent.stop();
    assert.equal(agent.proc.exitCode, 0);
    const again = await startAgent({ stateDir: agent.stateDir });
    const { stdout } = await run(process.execPath, [ISSU, '--socket', again.socket, '--json', 'checkpoint', 'status']);
    const st = JSON.parse(stdout);
    assert.equal(st.processes[0].tables[0].records, 1);
    assert.equal(st.processes[0].tables[0].seq, 1);
  });

  it('ends cleanly (exit 0) on a SIGTERM sent the moment its ready line is read, several agents starting at once', async function () {
    // A stop that arrives before the agent installs its handlers ends it with the kernel's
    // default action, without closing its store. The window sits right at the ready line, so each
    // agent here is stopped from the same callback that reads it; four start together on the
    // two cores, so that an agent is often descheduled right after writing the line (alone, 1
    // start in 10 lost the race; four at once, about 1 in 2).
    this.timeout(120_000);
    const started = new Set<ChildProcess>();
    const once = async (): Promise<string> => {
      const dir = tempDir('stop-at-ready');
      const proc = spawn(process.execPath, [...agentNodeFlags(), AGENT_MAIN, '--state-dir', dir, '--grpc-socket', path.join(dir, 'agent.sock')], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      started.add(proc);
      let out = '';
      let err = '';
      proc.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        if (/"event":"ready"/.test(out) && proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      });
      proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
      const end = await new Promise<string>((resolve) => proc.once('exit', (code, signal) => resolve(signal ?? `exit ${code}`)));
      assert.match(out, /"event":"ready"/, `the agent started; stderr: ${err.slice(-2000)}`);
      if (end === 'exit 0') assert.match(err, /"msg":"stopping"/, 'the stop is logged');
      return end;
    };
    try {
      for (let round = 0; round < 3; round++) {
        const ends = await Promise.all([once(), once(), once(), once()]);
        assert.deepEqual(ends, ['exit 0', 'exit 0', 'exit 0', 'exit 0'], `round ${round + 1}: how each agent ended`);
      }
    } finally {
      for (const p of started) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    }
  });

  it('issu reports an unreachable agent with exit status 3 and what to do', async () => {
    await assert.rejects(
      run(process.execPath, [ISSU, '--socket', '/nonexistent/agent.sock', '--timeout-ms', '2000', 'checkpoint', 'status']),
      (e: { code: number; stderr: string }) => {
        assert.equal(e.code, 3);
        assert.match(e.stderr, /cannot reach the agent .* Is hitlessd running\?/);
        return true;
      },
    );
    await assert.rejects(
      run(process.execPath, [ISSU, 'frobnicate']),
      (e: { code: number; stderr: string }) => e.code === 2 && /unknown command 'frobnicate'/.test(e.stderr),
    );
  });

  it('issu takes the global options before every command group, and after the command too', async () => {
    const agent = await startAgent();
    const keys = tempDir('issu-keys');
    const globals = ['--socket', agent.socket, '--json', '--timeout-ms', '20000'];
    const groups: [string[], (out: Record<string, unknown>) => void][] = [
      [['checkpoint', 'status'], (o) => assert.deepEqual(o.processes, [])],
      [['vm', 'list'], (o) => assert.deepEqual(o.vms, [])],
      [['show', 'platform'], (o) => assert.equal(typeof o.cpus, 'number')],
      [['status'], (o) => assert.equal(o.current, null)],
      [['image', 'keygen', '--out', keys], (o) => assert.match(String(o.keyId), /^[0-9a-f]{16}$/)],
    ];
    for (const [cmd, check] of groups) {
      for (const args of [
        [...globals, ...cmd],
        [...cmd, ...globals],
      ]) {
        if (cmd[0] === 'image') fs.rmSync(keys, { recursive: true, force: true });
        const { stdout } = await run(process.execPath, [ISSU, ...args]);
        check(JSON.parse(stdout));
      }
    }
    // show upgrade reaches this agent either way: it answers NOT_FOUND (no upgrade has run), and
    // the page is not written.
    const page = path.join(tempDir('issu-page'), 'report.html');
    for (const args of [
      [...globals, 'show', 'upgrade', '--html', page],
      ['show', 'upgrade', '--html', page, ...globals],
    ]) {
      await assert.rejects(run(process.execPath, [ISSU, ...args]), (e: { code: number; stderr: string }) => {
        assert.equal(e.code, 1);
        assert.match(e.stderr, /NOT_FOUND: no upgrade has run on this agent yet/);
        return true;
      });
      assert.ok(!fs.existsSync(page));
    }
    // --name=value works as well; an option that is not a global one is refused before the command.
    JSON.parse((await run(process.execPath, [ISSU, `--socket=${agent.socket}`, '--json', 'vm', 'list'])).stdout);
    await assert.rejects(run(process.execPath, [ISSU, '--out', keys, 'image', 'keygen']), (e: { code: number; stderr: string }) => {
      assert.equal(e.code, 2);
      assert.match(e.stderr, /unknown option '--out' before the command/);
      return true;
    });
    await assert.rejects(
      run(process.execPath, [ISSU, '--socket']),
      (e: { code: number; stderr: string }) => e.code === 2 && /'--socket' needs a value/.test(e.stderr),
    );
  });

  it("tags every RPC with a request id: the client's own or a new one, in the response header and the log", async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const call = (md: grpc.Metadata) =>
      new Promise<{ err: grpc.ServiceError; header: grpc.Metadata }>((resolve) => {
        let header = new grpc.Metadata();
        const req = (c.Switchover as (...a: unknown[]) => grpc.ClientUnaryCall).call(c, {}, md, (err: grpc.ServiceError) => resolve({ err, header }));
        req.on('metadata', (m: grpc.Metadata) => (header = m));
      });
    const mine = new grpc.Metadata();
    mine.set('x-request-id', 'nms-4711.a');
    const r1 = await call(mine);
    assert.equal(r1.err.code, grpc.status.INVALID_ARGUMENT);
    assert.deepEqual(r1.header.get('x-request-id'), ['nms-4711.a']);
    // An unusable id (spaces, too long) is replaced by one of the agent's own.
    const bad = new grpc.Metadata();
    bad.set('x-request-id', 'not an id');
    const r2 = await call(bad);
    const own = String(r2.header.get('x-request-id')[0]);
    assert.match(own, /^[0-9a-f]{6}-[0-9a-z]+$/);
    const logged = (rid: string) =>
      agent
        .stderr()
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Record<string, unknown>)
        .find((l) => l.rid === rid && l.msg === 'RPC failed');
    await until('both failures logged with their request ids', async () => Boolean(logged('nms-4711.a') && logged(own)), 5_000);
    const line = logged('nms-4711.a')!;
    assert.equal(line.method, '/hitless.v1.Checkpoint/Switchover');
    assert.equal(line.code, 'INVALID_ARGUMENT');
    assert.match(String(line.details), /Switchover needs process/);
    c.close();
  });

  it('issu shows process status as text and as JSON', async () => {
    const agent = await startAgent();
    const a = new CheckpointClient({
      address: agent.socket,
      process: 'ospf',
      instanceId: 'ospf@vm1',
      vmId: 'vm1',
      softwareVersion: '1.2.0',
      schema: 1,
      tables: [{ name: 'lsdb', durability: 'SYNC' }],
      role: 'ACTIVE',
    });
    await a.start();
    try {
      const text = (await run(process.execPath, [ISSU, '--socket', agent.socket, 'checkpoint', 'status'])).stdout;
      assert.match(text, /process ospf/);
      assert.match(text, /table lsdb .* SYNC/);
      assert.match(text, /ACTIVE\s+ospf@vm1\s+vm vm1\s+v1\.2\.0/);
      const json = JSON.parse((await run(process.execPath, [ISSU, '--socket', agent.socket, '--json', 'checkpoint', 'status', 'ospf'])).stdout);
      assert.equal(json.processes[0].peers[0].role, 'ACTIVE');
    } finally {
      await a.close();
    }
  });
});
