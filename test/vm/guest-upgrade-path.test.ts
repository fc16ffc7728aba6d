/**
 * The guest upgrade path end to end under TCG: a real hitlessd process, two real QEMU VMs booted
 * through the hitless.v1.Vm gRPC service from the real bundles of scripts/build-guest-images.sh.
 *
 *   u1  x86_64 image 1.0.0, no role on the cmdline: its bgp (schema 1) registers ACTIVE, loads
 *       20000 routes and churns 2000 changes/s.
 *   u2  x86_64 image 2.0.0, cmdline_extra "hitless.role=standby": its bgp (schema 2, transforms
 *       1->2 and 2->1) registers STANDBY, gets the rib as a bulk snapshot THROUGH the guest bulk
 *       channel (10.0.2.100:7001 -> <state>/vms/u2/bulk.sock; restrict=on leaves no other way),
 *       then the changes over gRPC.
 *   Checkpoint.Switchover(bgp -> bgp@u2): u2 ACTIVE and churning, u1 STANDBY and following.
 *
 * Measurements go to stderr as "MEASURE ...": boot-to-registered of u2, the bulk snapshot time
 * inside the guest (the daemon's {"event":"snapshot",...,"ms":N} console line), freeze_micros and
 * the wall time of the whole suite.
 *
 * Cleanup, also on failure: both VMs are stopped gracefully by the last test; `after` SIGKILLs
 * the agent and then every QEMU the test saw or that a VM's qemu.pid names (process group).
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { AnyClient, rawClient, unaryCall } from '../../harness/grpc-client';
import { until } from '../../harness/wait';
import { pidAlive } from '../../agent/vm/qemu-hypervisor';
import type { PeerStatus, ProcessStatus, StatusResponse, SwitchoverResponse } from '../../agent/checkpoint/messages';
import type { ConsoleLogResponse, StopVmResponse, VmInfoMessage } from '../../agent/vm/vm.messages';
import { QemuReaper } from '../../harness/qemu-reaper';
import { buildGuestImages } from '../../harness/guest-images';

const measure = (what: string, value: number, unit = 'ms') => process.stderr.write(`      MEASURE ${what}: ${value} ${unit}\n`);
const RECORDS = 20_000;

/** The daemon's JSON lines as the guest init prints them on the console: "[bgp] {...}". */
function bgpEvents(consoleText: string): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  for (const line of consoleText.split(/\r?\n/)) {
    const i = line.indexOf('[bgp] {');
    if (i < 0) continue;
    try {
      out.push(JSON.parse(line.slice(i + 6)) as Record<string, unknown>);
    } catch {
      // a line cut by the console log window or interleaved with kernel output
    }
  }
  return out;
}

describe('guest upgrade path: v1 ACTIVE in one VM, v2 STANDBY (schema 2) in another, switchover (real QEMU under TCG)', function () {
  this.timeout(600_000);
  const suiteT0 = Date.now();
  const reaper = new QemuReaper();
  const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'hup-'));
  let images: Record<string, string>;
  let agent: AgentHandle;
  let vm: AnyClient;
  let checkpoint: AnyClient;

  const status = async (): Promise<ProcessStatus | undefined> =>
    (await unaryCall<StatusResponse>(checkpoint, 'Status', { process: 'bgp' })).processes.find((p) => p.process === 'bgp');
  const peer = (p: ProcessStatus | null | undefined, instanceId: string): PeerStatus | undefined => p?.peers.find((x) => x.instanceId === instanceId);
  const rib = (p: ProcessStatus | null | undefined) => p?.tables.find((t) => t.name === 'rib');
  const consoleOf = async (name: string) => (await unaryCall<ConsoleLogResponse>(vm, 'ConsoleLog', { name, bytes: 4 * 1024 * 1024 })).data.toString('utf8');
  const startVm = async (name: string, image: string, cmdlineExtra = ''): Promise<VmInfoMessage> => {
    const v = await unaryCall<VmInfoMessage>(vm, 'Start', { name, imageDir: image, cmdlineExtra });
    reaper.track(v.pid);
    return v;
  };
  /** On failure: what the guests and the agent said, to tell why. */
  const diagnostics = async () => {
    const parts: string[] = [];
    for (const n of ['u1', 'u2']) {
      try {
        parts.push(`--- console ${n} (tail) ---\n${(await consoleOf(n)).slice(-3000)}`);
      } catch {
        // VM never started
      }
    }
    parts.push(`--- agent stderr (tail) ---\n${agent?.stderr().slice(-3000) ?? ''}`);
    return parts.join('\n');
  };
  const withDiagnostics = async <T>(what: Promise<T>): Promise<T> => {
    try {
      return await what;
    } catch (e) {
      (e as Error).message += `\n${await diagnostics()}`;
      throw e;
    }
  };

  before(async function () {
    this.timeout(1_200_000); // the first run builds the bundles
    images = buildGuestImages(['x86_64-1.0.0', 'x86_64-2.0.0']);
    // debug: the agent logs 'bulk snapshot issued' for every snapshot it hands out.
    agent = await startAgent({ stateDir, args: ['--log-level', 'debug'] });
    vm = rawClient('hitless.v1.Vm', agent.socket);
    checkpoint = rawClient('hitless.v1.Checkpoint', agent.socket);
  });

  after(async function () {
    this.timeout(60_000);
    for (const c of [vm, checkpoint]) c?.close();
    await stopAllAgents();
    reaper.trackStateDir(stateDir);
    const killed = reaper.reap();
    if (killed) process.stderr.write(`      cleanup: killed ${killed} leftover QEMU process(es)\n`);
    fs.rmSync(stateDir, { recursive: true, force: true });
    measure('suite wall time (build check + agent + both VMs + switchover + stops)', Date.now() - suiteT0);
  });

  it('u1 (v1.0.0, no hitless.role=): bgp registers ACTIVE from VM u1 with schema 1 and loads the rib', async () => {
    await withDiagnostics(
      (async () => {
        const t0 = Date.now();
        const v = await startVm('u1', images['x86_64-1.0.0']);
        assert.equal(v.imageVersion, '1.0.0');
        const p = await until('bgp@u1 registered', async () => (peer(await status(), 'bgp@u1') ? status() : null), 180_000, 100);
        measure('u1 (v1) boot-to-registered', Date.now() - t0);
        const me = peer(p, 'bgp@u1')!;
        assert.equal(me.role, 'ACTIVE');
        assert.equal(me.vmId, 'u1');
        assert.equal(me.softwareVersion, '1.0.0');
        assert.equal(me.schemaWrites, 1);
        assert.deepEqual(me.schemaReads, [1]);
        await until(
          'rib loaded (20000 routes)',
          async () => {
            const t = rib(await status());
            return t && t.records >= RECORDS * 0.9 && t.seq >= RECORDS / 1000 ? t : null;
          },
          180_000,
          200,
        );
        const loaded = (await until(
          '"loaded" on the u1 console',
          async () => bgpEvents(await consoleOf('u1')).find((e) => e.event === 'loaded'),
          60_000,
          200,
        ))!;
        assert.equal(loaded.records, RECORDS);
        // No hitless.role= on the cmdline: HITLESS_ROLE unset, the daemon's default (active).
        assert.ok(bgpEvents(await consoleOf('u1')).some((e) => e.event === 'started' && e.role === 'ACTIVE'));
        measure('u1 (v1) boot-to-loaded (20000 routes)', Date.now() - t0);
        measure('u1 (v1) load inside the guest', Number(loaded.ms));
        // The churn runs: the table sequence grows on its own.
        const s0 = rib(await status())!.seq;
        await until('u1 churn advances the rib', async () => rib(await status())!.seq > s0 + 5, 60_000, 200);
      })(),
    );
  });

  it('u2 (v2.0.0, hitless.role=standby): bgp registers STANDBY with schema 2 and gets the bulk snapshot through the guest bulk channel', async () => {
    await withDiagnostics(
      (async () => {
        const t0 = Date.now();
        const v = await startVm('u2', images['x86_64-2.0.0'], 'hitless.role=standby');
        assert.equal(v.imageVersion, '2.0.0');
        assert.equal(v.bulkSocket, path.join(stateDir, 'vms', 'u2', 'bulk.sock'));
        const argv = fs.readFileSync(`/proc/${v.pid}/cmdline`, 'utf8');
        assert.match(argv, /hitless\.vm=u2 hitless\.agent=10\.0\.2\.100:7000 hitless\.bulk=10\.0\.2\.100:7001/);
        assert.match(argv, /hitless\.role=standby/);
        assert.match(argv, /guestfwd=tcp:10\.0\.2\.100:7001-cmd:socat -,,setsockopt-int=6:1:1 UNIX-CONNECT:'[^']*\/vms\/u2\/bulk\.sock'/);

        const p = await until(
          'bgp@u2 registered',
          async () => {
            const s = await status();
            return peer(s, 'bgp@u2') ? s : null;
          },
          180_000,
          100,
        );
        const registeredMs = Date.now() - t0;
        measure('u2 (v2) boot-to-registered (Start rpc -> bgp@u2 in Checkpoint.Status)', registeredMs);
        const me = peer(p, 'bgp@u2')!;
        assert.equal(me.role, 'STANDBY');
        assert.equal(me.vmId, 'u2');
        assert.equal(me.softwareVersion, '2.0.0');
        assert.equal(me.schemaWrites, 2);
        assert.deepEqual([...me.schemaReads].sort(), [1, 2]);
        assert.equal(peer(p, 'bgp@u1')!.role, 'ACTIVE', 'u1 stays the active');

        // Caught up: ready, lag 0 and acked == table seq in one Status answer (u1 keeps churning,
        // so this is a moment, polled for).
        const caught = (await until(
          'bgp@u2 ready with lag 0 and acked rib == table seq',
          async () => {
            const s = await status();
            const m = peer(s, 'bgp@u2');
            const t = rib(s);
            return m && t && m.ready && m.lag === 0 && m.acked.rib === t.seq ? { seq: t.seq, records: t.records } : null;
          },
          240_000,
          20,
        ))!;
        measure('u2 (v2) boot-to-caught-up (ready, lag 0)', Date.now() - t0);
        assert.ok(caught.seq > 0 && caught.records > 0);

        // The snapshot went through the guest: the daemon printed it on the console (init prefixes
        // "[bgp] "), and the agent issued it.
        const snap = (await until(
          '{"event":"snapshot"} on the u2 console',
          async () => bgpEvents(await consoleOf('u2')).find((e) => e.event === 'snapshot' && e.table === 'rib'),
          60_000,
          200,
        ))!;
        assert.ok(Number(snap.seq) > 0 && Number(snap.records) > 0, JSON.stringify(snap));
        assert.equal(typeof snap.ms, 'number', 'the daemon reports the snapshot time');
        measure('u2 (v2) bulk snapshot inside the guest (snapshot-begin -> snapshot applied)', Number(snap.ms));
        measure('u2 (v2) bulk snapshot size (records incl. log entries, seq)', Number(snap.records), `records at seq ${snap.seq}`);
        const log = await consoleOf('u2');
        assert.match(log, /\[bgp\] \{"event":"snapshot","table":"rib","seq":\d+/);
        assert.match(log, /\[bgp\] \{"event":"started","role":"STANDBY"/);
        assert.ok(!/\[bgp\] \{"event":"loaded"/.test(log), 'a standby does not load its own table');
        assert.match(agent.stderr(), /"process":"bgp","table":"rib".*bulk snapshot issued/);
      })(),
    );
  });

  it('Checkpoint.Switchover(bgp -> bgp@u2) succeeds; then u2 is ACTIVE and churning, u1 STANDBY and ready', async () => {
    await withDiagnostics(
      (async () => {
        const before = rib(await status())!.seq;
        const t0 = Date.now();
        const r = await unaryCall<SwitchoverResponse>(checkpoint, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@u2' });
        measure('Switchover rpc wall time', Date.now() - t0);
        measure('switchover freeze_micros', r.freezeMicros, 'us');
        assert.ok(r.freezeMicros > 0, `freeze_micros ${r.freezeMicros}`);
        assert.ok(r.tableSeqs.rib >= before, `table_seqs ${JSON.stringify(r.tableSeqs)}`);

        const s = await status();
        assert.equal(peer(s, 'bgp@u2')?.role, 'ACTIVE');
        assert.equal(peer(s, 'bgp@u1')?.role, 'STANDBY');

        // u2's churn runs (its timer idled while it was standby): the sequence keeps growing
        // past the switchover point, and u1 follows: ready (lag 0) again and again.
        const atSwitch = r.tableSeqs.rib;
        let readySeen = 0;
        let maxLag = 0;
        const grown = (await until(
          'rib seq grows under u2 with u1 ready',
          async () => {
            const x = await status();
            const u1 = peer(x, 'bgp@u1');
            const u2 = peer(x, 'bgp@u2');
            assert.ok(u1 && u2, 'both peers stay registered');
            assert.equal(u2.role, 'ACTIVE');
            assert.equal(u1.role, 'STANDBY');
            maxLag = Math.max(maxLag, u1.lag);
            if (u1.ready) readySeen++;
            const t = rib(x)!;
            return t.seq > atSwitch + 50 && readySeen >= 3 ? t : null;
          },
          180_000,
          50,
        ))!;
        measure('after switchover: rib seq growth observed', grown.seq - atSwitch, 'batches');
        measure('after switchover: u1 max lag seen', maxLag, 'batches');
        const cons2 = bgpEvents(await consoleOf('u2'));
        assert.ok(
          cons2.some((e) => e.event === 'role' && e.role === 'ACTIVE'),
          'u2 daemon saw PROMOTE',
        );
        const cons1 = bgpEvents(await consoleOf('u1'));
        assert.ok(
          cons1.some((e) => e.event === 'role' && e.role === 'STANDBY'),
          'u1 daemon saw DEMOTE',
        );
        assert.ok(!cons1.concat(cons2).some((e) => e.event === 'write-failed' || e.event === 'fatal'), 'no failed writes');
        const final = (await until(
          'u1 ready at the end',
          async () => {
            const x = await status();
            return peer(x, 'bgp@u1')?.ready ? x : null;
          },
          60_000,
          20,
        ))!;
        assert.ok(rib(final)!.seq >= grown.seq);
      })(),
    );
  });

  it('both VMs power down gracefully (Vm.Stop)', async () => {
    for (const name of ['u1', 'u2']) {
      const t0 = Date.now();
      const r = await unaryCall<StopVmResponse>(vm, 'Stop', { name, timeoutS: 60 });
      measure(`${name} graceful powerdown`, Date.now() - t0);
      assert.equal(r.method, 'guest', `${name} stopped by ${r.method}`);
      assert.equal(r.vm?.state, 'STOPPED');
      assert.ok(!pidAlive(r.vm!.pid) || r.vm!.pid === 0);
      assert.match(await consoleOf(name), /HITLESS-POWERDOWN/);
    }
  });
});
