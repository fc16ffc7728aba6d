/**
 * The VM layer inside the running agent, end to end under TCG: a real hitlessd process, real
 * QEMU, the real guest image bundle (scripts/build-guest-images.sh) whose bgp daemon registers
 * with the agent THROUGH the per-VM guest channel, and the real issu CLI where an operator
 * would use it. One x86-64 VM (r1) serves the whole x86 part, including an agent kill -9 and
 * re-attach; one arm64 VM (a1) checks the same registration on arm64.
 *
 * Cleanup, also on failure: agents are SIGKILLed (stopAllAgents), then every QEMU pid the test
 * saw, or that a VM's qemu.pid names, gets its process group SIGKILLed.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { AnyClient, expectStatus, rawClient, registerRaw, unaryCall } from '../../harness/grpc-client';
import { until } from '../../harness/wait';
import { pidAlive } from '../../agent/vm/qemu-hypervisor';
import type { StatusResponse } from '../../agent/checkpoint/messages';
import type { ConsoleLogResponse, ListVmsResponse, PlatformInfo, VmEventMessage, VmInfoMessage } from '../../agent/vm/vm.messages';
import { QemuReaper } from '../../harness/qemu-reaper';
import { buildGuestImages, runIssu as issu } from '../../harness/guest-images';

const measure = (what: string, ms: number) => process.stderr.write(`      MEASURE ${what}: ${ms} ms\n`);

describe('VMs in the running agent: gRPC, issu and the guest channel (real QEMU under TCG)', function () {
  this.timeout(300_000);
  const reaper = new QemuReaper();
  const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'hav-'));
  let images: Record<string, string>;
  let agent: AgentHandle;
  let vm: AnyClient;
  let platform: AnyClient;
  let checkpoint: AnyClient;
  let r1Pid = 0;

  const connect = () => {
    for (const c of [vm, platform, checkpoint]) c?.close();
    vm = rawClient('hitless.v1.Vm', agent.socket);
    platform = rawClient('hitless.v1.Platform', agent.socket);
    checkpoint = rawClient('hitless.v1.Checkpoint', agent.socket);
  };
  const peerOf = async (instanceId: string) => {
    const s = await unaryCall<StatusResponse>(checkpoint, 'Status', { process: '' });
    for (const p of s.processes) {
      const peer = p.peers.find((x) => x.instanceId === instanceId);
      if (peer) return { process: p, peer };
    }
    return null;
  };
  const track = (v: VmInfoMessage) => reaper.track(v.pid);

  before(async function () {
    this.timeout(1_200_000); // first run builds the bundles
    images = buildGuestImages();
    agent = await startAgent({ stateDir });
    connect();
  });

  after(async function () {
    this.timeout(60_000);
    for (const c of [vm, platform, checkpoint]) c?.close();
    await stopAllAgents();
    // Whatever QEMU the test or the agent started, by the pids seen and by the pid files.
    reaper.trackStateDir(stateDir);
    const killed = reaper.reap();
    if (killed) process.stderr.write(`      cleanup: killed ${killed} leftover QEMU process(es)\n`);
    fs.rmSync(stateDir, { recursive: true, force: true });
  });

  it('issu show platform --json: kvm false here (no usable /dev/kvm), numeric memory, an accelerator per arch', async () => {
    const r = await issu(agent.socket, ['show', 'platform', '--json']);
    assert.equal(r.code, 0, r.stderr);
    const p = JSON.parse(r.stdout) as PlatformInfo;
    assert.equal(p.kvm, process.env.HITLESS_TEST_KVM === '1');
    assert.equal(typeof p.memoryTotalMib, 'number');
    assert.ok(p.memoryTotalMib > 0 && p.memoryAvailableMib > 0 && p.memoryAvailableMib <= p.memoryTotalMib);
    assert.ok(p.cpus >= 1 && p.cpuModel.length > 0);
    assert.deepEqual(p.accelerators.map((a) => a.arch).sort(), ['aarch64', 'x86_64']);
    if (!p.kvm) assert.ok(p.accelerators.every((a) => a.accelerator === 'tcg'));
    assert.ok(p.stateDisk && p.stateDisk.totalMib > 0);
    const rpc = await unaryCall<PlatformInfo>(platform, 'Get', {});
    assert.equal(rpc.kvm, p.kvm);
  });

  it('refuses bad Start requests with the right status and an actionable message', async () => {
    const img = images['x86_64-1.0.0'];
    const err = await expectStatus(
      unaryCall(vm, 'Start', { name: 'huge', imageDir: img, memoryMib: 16 * 1024 * 1024 }),
      grpc.status.RESOURCE_EXHAUSTED,
      /needs 16777216 MiB .* \d+ MiB available/,
    );
    assert.match(err.details, /less memory/);
    await expectStatus(unaryCall(vm, 'Start', { name: '../etc', imageDir: img }), grpc.status.INVALID_ARGUMENT, /VM name '\.\.\/etc' is invalid/);
    await expectStatus(unaryCall(vm, 'Start', { name: 'x1', imageDir: 'relative/dir' }), grpc.status.INVALID_ARGUMENT, /absolute path/);
    await expectStatus(unaryCall(vm, 'Start', { name: 'x1', imageDir: stateDir }), grpc.status.FAILED_PRECONDITION, /no manifest\.json/);
    await expectStatus(
      unaryCall(vm, 'Start', { name: 'x1', imageDir: img, cmdlineExtra: 'hitless.vm=r9' }),
      grpc.status.INVALID_ARGUMENT,
      /must not set hitless\.vm=/,
    );
    // A bundle whose file does not match its manifest (size) is refused before anything runs.
    const broken = fs.mkdtempSync(path.join(os.tmpdir(), 'hav-img-'));
    try {
      const m = JSON.parse(fs.readFileSync(path.join(img, 'manifest.json'), 'utf8')) as { files: { path: string }[] };
      fs.writeFileSync(path.join(broken, 'manifest.json'), JSON.stringify(m));
      for (const f of m.files) fs.writeFileSync(path.join(broken, f.path), 'short');
      await expectStatus(unaryCall(vm, 'Start', { name: 'x1', imageDir: broken }), grpc.status.INVALID_ARGUMENT, /is 5 bytes but the manifest says/);
    } finally {
      fs.rmSync(broken, { recursive: true, force: true });
    }
    await expectStatus(unaryCall(vm, 'Get', { name: 'nope' }), grpc.status.NOT_FOUND, /No VM named nope/);
    const list = await unaryCall<ListVmsResponse>(vm, 'List', {});
    assert.deepEqual(
      list.vms.map((v) => v.name),
      [],
      'refused starts leave no VM record behind',
    );
    const cli = await issu(agent.socket, ['vm', 'start', 'x1']);
    assert.equal(cli.code, 2, 'missing --image is a usage error');
  });

  it('Vm.Start boots the x86-64 v1 bundle; its bgp daemon registers through the guest channel and checkpoints', async () => {
    const events: VmEventMessage[] = [];
    const stream = (vm.Events as (r: unknown) => grpc.ClientReadableStream<VmEventMessage>).call(vm, { name: '' });
    stream.on('data', (e: VmEventMessage) => events.push(e));
    stream.on('error', () => undefined);
    try {
      const t0 = Date.now();
      const v = await unaryCall<VmInfoMessage>(vm, 'Start', { name: 'r1', imageDir: images['x86_64-1.0.0'] });
      track(v);
      r1Pid = v.pid;
      assert.equal(v.state, 'RUNNING');
      assert.equal(v.arch, 'x86_64');
      assert.equal(v.imageVersion, '1.0.0');
      assert.equal(v.agentSocket, path.join(stateDir, 'vms', 'r1', 'agent.sock'));
      assert.equal(v.bulkSocket, path.join(stateDir, 'vms', 'r1', 'bulk.sock'));
      measure('x86_64 Start rpc (verify bundle + launch QEMU)', Date.now() - t0);
      // Both guest channels were open before QEMU ran, and QEMU forwards 7000 and 7001 to them.
      const argv = fs.readFileSync(`/proc/${v.pid}/cmdline`, 'utf8');
      assert.match(argv, /guestfwd=tcp:10\.0\.2\.100:7000-cmd:socat -,,setsockopt-int=6:1:1 UNIX-CONNECT:'[^']*\/vms\/r1\/agent\.sock'/);
      assert.match(argv, /guestfwd=tcp:10\.0\.2\.100:7001-cmd:socat -,,setsockopt-int=6:1:1 UNIX-CONNECT:'[^']*\/vms\/r1\/bulk\.sock'/);
      assert.match(argv, /hitless\.vm=r1 hitless\.agent=10\.0\.2\.100:7000/);
      // QEMU runs in a network namespace of its own (this suite runs as root): loopback only,
      // with ACKs that leave at once (guest-netns.ts), and no route to the host's networks.
      assert.notEqual(fs.readlinkSync(`/proc/${v.pid}/ns/net`), fs.readlinkSync('/proc/self/ns/net'));
      const ifaces = fs
        .readFileSync(`/proc/${v.pid}/net/dev`, 'utf8')
        .split('\n')
        .slice(2)
        .map((l) => l.split(':')[0].trim())
        .filter(Boolean);
      assert.deepEqual(ifaces, ['lo']);
      const routes = execFileSync('nsenter', ['-t', String(v.pid), '-n', 'ip', 'route', 'show', 'table', 'local'], { encoding: 'utf8' });
      assert.match(routes, /^local 127\.0\.0\.1 dev lo .*quickack 1/m);
      await new Promise<void>((resolve, reject) =>
        net
          .connect(v.bulkSocket)
          .once('connect', function (this: net.Socket) {
            this.destroy();
            resolve();
          })
          .once('error', reject),
      );

      const found = (await until('bgp@r1 registered via the guest channel', () => peerOf('bgp@r1'), 120_000, 100))!;
      const registeredMs = Date.now() - t0;
      measure('x86_64 boot-to-registered (Start -> peer bgp@r1 in Checkpoint.Status)', registeredMs);
      assert.equal(found.peer.vmId, 'r1');
      assert.equal(found.peer.role, 'ACTIVE');
      assert.equal(found.peer.softwareVersion, '1.0.0');
      const table = (await until(
        'rib checkpointed',
        async () => {
          const p = await peerOf('bgp@r1');
          const t = p?.process.tables.find((x) => x.name === 'rib');
          return t && t.seq > 0 && t.records >= 20000 ? t : null;
        },
        60_000,
        100,
      ))!;
      assert.ok(table.seq > 0 && table.records > 0);
      measure('x86_64 boot-to-checkpointed (20000 records)', Date.now() - t0);
      assert.ok(events.some((e) => e.vm === 'r1' && e.type === 'STATE' && JSON.parse(e.dataJson).state === 'RUNNING' && e.atMs >= t0));
    } finally {
      stream.cancel();
    }
  });

  it('the console log shows the boot marker (ConsoleLog rpc and issu vm log)', async () => {
    const r = await unaryCall<ConsoleLogResponse>(vm, 'ConsoleLog', { name: 'r1', bytes: 0 });
    assert.match(r.data.toString('utf8'), /HITLESS-INIT version=1\.0\.0 arch=x86_64 kernel=6\.1\.0-47-cloud-amd64/);
    assert.match(r.data.toString('utf8'), /HITLESS-READY/);
    const cli = await issu(agent.socket, ['vm', 'log', 'r1', '--bytes', '100000']);
    assert.equal(cli.code, 0, cli.stderr);
    assert.match(cli.stdout, /HITLESS-INIT version=1\.0\.0/);
    assert.match(cli.stdout, /\[bgp\] \{"event":"loaded","records":20000/);
    const tail = await unaryCall<ConsoleLogResponse>(vm, 'ConsoleLog', { name: 'r1', bytes: 10 });
    assert.equal(tail.data.length, 10);
    await expectStatus(unaryCall(vm, 'ConsoleLog', { name: 'r1', bytes: 64 * 1024 * 1024 }), grpc.status.INVALID_ARGUMENT, /bytes must be/);
  });

  it('a process on the VM socket claiming another VM is refused with PERMISSION_DENIED', async () => {
    const c = rawClient('hitless.v1.Checkpoint', path.join(stateDir, 'vms', 'r1', 'agent.sock'));
    try {
      await expectStatus(
        registerRaw(c, {
          process: 'ospf',
          instanceId: 'ospf@other',
          vmId: 'other',
          softwareVersion: '1.0.0',
          schemaWrites: 1,
          schemaReads: [1],
          wantedRole: 'ACTIVE',
          tables: [{ name: 'lsdb', durability: 'ASYNC' }],
        }),
        grpc.status.PERMISSION_DENIED,
        /comes from VM 'r1' but the process claims VM 'other'/,
      );
      // The guest socket serves Checkpoint only: the VM API is not reachable from a guest.
      const g = rawClient('hitless.v1.Vm', path.join(stateDir, 'vms', 'r1', 'agent.sock'));
      try {
        await expectStatus(unaryCall(g, 'List', {}), grpc.status.UNIMPLEMENTED);
      } finally {
        g.close();
      }
    } finally {
      c.close();
    }
  });

  it('issu vm list shows r1 running; duplicate start is ALREADY_EXISTS; the Console rpc bridges the serial console', async () => {
    const cli = await issu(agent.socket, ['vm', 'list', '--json']);
    assert.equal(cli.code, 0, cli.stderr);
    const r1 = (JSON.parse(cli.stdout) as ListVmsResponse).vms.find((v) => v.name === 'r1');
    assert.equal(r1?.state, 'RUNNING');
    assert.equal(r1?.pid, r1Pid);
    await expectStatus(unaryCall(vm, 'Start', { name: 'r1', imageDir: images['x86_64-1.0.0'] }), grpc.status.ALREADY_EXISTS, /already exists and is RUNNING/);
    assert.ok(pidAlive(r1Pid), 'a refused duplicate start leaves the running VM alone');
    const dup = await issu(agent.socket, ['vm', 'start', 'r1', '--image', images['x86_64-1.0.0'], '--json']);
    assert.equal(dup.code, 1);
    assert.equal(JSON.parse(dup.stdout).error.code, 'ALREADY_EXISTS');
    const con = (vm.Console as () => grpc.ClientDuplexStream<unknown, unknown>).call(vm);
    const err = await new Promise<grpc.ServiceError>((resolve) => {
      con.on('error', resolve);
      con.on('data', () => undefined);
      con.write({ name: 'nope' });
    });
    assert.equal(err.code, grpc.status.NOT_FOUND);
    // The same console issu vm console attaches to, through the agent: typed bytes reach the
    // guest tty (it echoes them), guest output comes back.
    const live = (vm.Console as () => grpc.ClientDuplexStream<unknown, { data: Buffer }>).call(vm);
    let rx = '';
    live.on('data', (m) => (rx += m.data.toString('utf8')));
    live.on('error', () => undefined);
    try {
      live.write({ name: 'r1' });
      await new Promise((r) => setTimeout(r, 300));
      live.write({ name: '', data: Buffer.from('typed-through-grpc\r') });
      await until('echo over the Console rpc', () => rx.includes('typed-through-grpc'), 10_000, 50);
    } finally {
      live.end();
    }
  });

  it('after kill -9 of the agent, a new agent re-attaches to the running VM and the guest daemon reconnects', async () => {
    await agent.kill9();
    assert.ok(pidAlive(r1Pid), 'QEMU outlives the agent');
    const t0 = Date.now();
    agent = await startAgent({ stateDir });
    connect();
    const list = await unaryCall<ListVmsResponse>(vm, 'List', {});
    const r1 = list.vms.find((v) => v.name === 'r1');
    assert.equal(r1?.state, 'RUNNING');
    assert.equal(r1?.pid, r1Pid, 'same QEMU, re-attached');
    await until('bgp@r1 reconnected', () => peerOf('bgp@r1'), 60_000, 100);
    measure('x86_64 agent restart -> guest daemon re-registered', Date.now() - t0);
  });

  it('issu vm stop powers r1 down gracefully and closes its guest channels', async () => {
    const events: VmEventMessage[] = [];
    const stream = (vm.Events as (r: unknown) => grpc.ClientReadableStream<VmEventMessage>).call(vm, { name: 'r1' });
    stream.on('data', (e: VmEventMessage) => events.push(e));
    stream.on('error', () => undefined);
    try {
      await new Promise((r) => setTimeout(r, 200)); // the subscription is in place
      const t0 = Date.now();
      const cli = await issu(agent.socket, ['vm', 'stop', 'r1', '--timeout', '60', '--json']);
      assert.equal(cli.code, 0, cli.stderr);
      const r = JSON.parse(cli.stdout) as { method: string; elapsedMs: number; vm: VmInfoMessage };
      measure('x86_64 graceful powerdown (issu vm stop)', r.elapsedMs);
      measure('x86_64 issu vm stop wall time', Date.now() - t0);
      assert.equal(r.method, 'guest');
      assert.equal(r.vm.state, 'STOPPED');
      assert.ok(!pidAlive(r1Pid));
      const log = await unaryCall<ConsoleLogResponse>(vm, 'ConsoleLog', { name: 'r1', bytes: 4096 });
      assert.match(log.data.toString('utf8'), /HITLESS-POWERDOWN/);
      await until(
        'guest channel closed',
        () =>
          !fs.existsSync(path.join(stateDir, 'vms', 'r1', 'agent.sock')) ||
          new Promise<boolean>((res) =>
            net
              .connect(path.join(stateDir, 'vms', 'r1', 'agent.sock'))
              .once('connect', function (this: net.Socket) {
                this.destroy();
                res(false);
              })
              .once('error', () => res(true)),
          ),
        5000,
      );
      await until('EXITED event', () => events.some((e) => e.type === 'EXITED'), 5000);
      const states = events.filter((e) => e.type === 'STATE').map((e) => JSON.parse(e.dataJson).state as string);
      assert.ok(states.indexOf('STOPPING') >= 0 && states.indexOf('STOPPING') < states.indexOf('STOPPED'), `state events: ${states.join(' ')}`);
    } finally {
      stream.cancel();
    }
  });

  it('arm64: the aarch64 bundle boots and its bgp daemon registers through the guest channel', async function () {
    if (process.env.HITLESS_SKIP_ARM64 === '1') this.skip();
    const t0 = Date.now();
    const cli = await issu(agent.socket, ['vm', 'start', 'a1', '--image', images['aarch64-1.0.0'], '--wait-s', '200', '--json'], 240_000);
    const started = cli.stdout ? (JSON.parse(cli.stdout) as { vm: VmInfoMessage; bootMarkerMs: number | null; readyMs: number | null }) : null;
    if (started?.vm) track(started.vm);
    assert.equal(cli.code, 0, cli.stderr + cli.stdout);
    assert.equal(started!.vm.arch, 'aarch64');
    assert.ok(started!.bootMarkerMs !== null && started!.readyMs !== null);
    const found = (await until('bgp@a1 registered', () => peerOf('bgp@a1'), 120_000, 200))!;
    measure('aarch64 boot-to-registered (issu vm start -> peer bgp@a1)', Date.now() - t0);
    assert.equal(found.peer.vmId, 'a1');
    const stop = await issu(agent.socket, ['vm', 'stop', 'a1', '--json']);
    assert.equal(stop.code, 0, stop.stderr);
    const r = JSON.parse(stop.stdout) as { method: string; elapsedMs: number };
    measure('aarch64 graceful powerdown', r.elapsedMs);
    assert.equal(r.method, 'guest');
  });
});
