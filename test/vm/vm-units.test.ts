/**
 * The VM layer without booting a guest: sqlite record store, platform argv, KVM probe, QMP
 * client against a guest-less QEMU (-machine none), host inventory, and VmService invariants
 * over a fake Hypervisor (races, refusals, recovery of dead VMs).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { SystemInformationHostProbe, type HostProbe } from '../../agent/host/host-probe';
import { probeKvm } from '../../agent/host/kvm-probe';
import { probeAccelerator } from '../../agent/vm/accelerator-probe';
import {
  VmError,
  VmEventBus,
  type Accelerator,
  type Hypervisor,
  type PowerdownResult,
  type VmAttachRecord,
  type VmHandle,
  type VmPaths,
  type VmSpec,
} from '../../agent/vm/hypervisor';
import { QmpClient, QmpError, QmpTransportError, type QmpEvent } from '../../agent/vm/qmp-client';
import { InMemoryVmRecordStore } from '../../agent/vm/vm-record-store';
import { SqliteVmRecordStore } from '../../agent/vm/vm-record.sqlite-store';
import { VmService } from '../../agent/vm/vm.service';
import { arm64KvmPlatform } from '../../platform/arm64-kvm';
import { x86KvmPlatform } from '../../platform/x86-kvm';
import { MemoryLogger, makeStateDir } from './fixtures';
import { QemuReaper } from '../../harness/qemu-reaper';

const hostHasVirt = /\b(vmx|svm)\b/.test(fs.readFileSync('/proc/cpuinfo', 'utf8'));

const paths = (dir: string): VmPaths => ({
  runDir: dir,
  qmpSocket: `${dir}/qmp.sock`,
  consoleSocket: `${dir}/console.sock`,
  consoleLog: `${dir}/console.log`,
  qemuLog: `${dir}/qemu.log`,
  pidFile: `${dir}/qemu.pid`,
  agentSocket: `${dir}/agent,1.sock`,
});

const baseSpec = (dir: string, name = 'v1'): VmSpec => ({
  name,
  arch: 'x86_64',
  kernelPath: `${dir}/vmlinuz`,
  initrdPath: `${dir}/initrd.img`,
  rootfsPath: `${dir}/rootfs.ext4`,
  memoryMiB: 256,
  cpus: 1,
  agentSocketPath: `${dir}/${name}.agent.sock`,
});

describe('VM layer units (no guest boot)', function () {
  this.timeout(60_000);
  let dir: string;
  const reaper = new QemuReaper();

  before(() => {
    dir = makeStateDir();
    for (const f of ['vmlinuz', 'initrd.img', 'rootfs.ext4']) fs.writeFileSync(path.join(dir, f), '');
  });
  after(() => {
    reaper.reap();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('SqliteVmRecordStore: creates vm_records, round-trips, lists sorted, deletes', () => {
    const db = new Database(':memory:');
    const store = new SqliteVmRecordStore(db);
    new SqliteVmRecordStore(db); // idempotent table creation
    const rec = {
      name: 'b',
      arch: 'x86_64' as const,
      spec: baseSpec(dir, 'b'),
      pid: 42,
      paths: paths(dir),
      state: 'RUNNING' as const,
      accelerator: 'tcg' as const,
      createdAt: 1,
      updatedAt: 2,
      lastExit: null,
    };
    store.put(rec);
    store.put({ ...rec, name: 'a', pid: null, state: 'STOPPED' });
    assert.deepEqual(store.get('b'), rec);
    assert.deepEqual(
      store.list().map((r) => r.name),
      ['a', 'b'],
    );
    store.put({ ...rec, state: 'PAUSED' });
    assert.equal(store.get('b')?.state, 'PAUSED');
    assert.equal(store.delete('b'), true);
    assert.equal(store.delete('b'), false);
    assert.equal(store.get('b'), undefined);
    db.close();
  });

  it('platform argv: x86 q35/max/ttyS0 under TCG, host under KVM; arm64 virt/cortex-a57/ttyAMA0', () => {
    const spec = { ...baseSpec(dir), cmdlineExtra: 'quiet' };
    const p = paths(dir);
    const x = x86KvmPlatform.buildArgv(spec, p, 'tcg');
    const opt = (argv: string[], flag: string) => argv.filter((_, i) => argv[i - 1] === flag);
    assert.deepEqual(opt(x, '-machine'), ['q35']);
    assert.deepEqual(opt(x, '-cpu'), ['max']);
    assert.deepEqual(opt(x86KvmPlatform.buildArgv(spec, p, 'kvm'), '-cpu'), ['host']);
    assert.deepEqual(opt(x, '-append'), ['console=ttyS0 quiet']);
    for (const f of ['-nodefaults', '-no-user-config']) assert.ok(x.includes(f), f);
    assert.deepEqual(opt(x, '-display'), ['none']);
    assert.deepEqual(opt(x, '-qmp'), [`unix:${p.qmpSocket},server=on,wait=off`]);
    assert.ok(opt(x, '-drive')[0].endsWith('readonly=on'));
    assert.ok(opt(x, '-chardev')[0].includes(`logfile=${p.consoleLog}`));
    // a comma in a path is doubled inside QEMU option strings
    assert.ok(
      opt(x, '-netdev')[0].includes(
        "restrict=on,guestfwd=tcp:10.0.2.100:7000-cmd:socat -,,setsockopt-int=6:1:1 UNIX-CONNECT:'" + p.agentSocket.replace(',', ',,') + "'",
      ),
    );
    const a = arm64KvmPlatform.buildArgv(spec, p, 'tcg');
    assert.deepEqual(opt(a, '-machine'), ['virt,gic-version=3']);
    assert.deepEqual(opt(a, '-cpu'), ['cortex-a57']);
    assert.deepEqual(opt(arm64KvmPlatform.buildArgv(spec, p, 'kvm'), '-cpu'), ['host']);
    assert.deepEqual(opt(a, '-append'), ['console=ttyAMA0 quiet']);
  });

  it('KVM probe: usable only when a KVM vCPU really runs; TCG fallback warns once', async () => {
    const r = await probeKvm('qemu-system-x86_64');
    if (!hostHasVirt) assert.equal(r.usable, false, `KVM claimed usable without vmx/svm: ${r.reason}`);
    const aarch = await probeKvm('qemu-system-aarch64');
    if (process.arch === 'x64') assert.equal(aarch.usable, false, 'no KVM for a foreign arch');
    const logger = new MemoryLogger();
    await probeAccelerator('qemu-system-aarch64', logger);
    await probeAccelerator('qemu-system-aarch64', logger);
    if (!aarch.usable) assert.equal(logger.lines.filter((l) => l.startsWith('warn')).length, 1);
  });

  it('QmpClient: handshake, results, QMP errors with class/desc, events, close', async () => {
    const sock = path.join(dir, 'bare-qmp.sock');
    const q = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${sock},server=on,wait=off`], {
      stdio: 'ignore',
      detached: true,
    });
    reaper.track(q.pid);
    const deadline = Date.now() + 5000;
    while (!fs.existsSync(sock) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    const c = await QmpClient.connect(sock);
    assert.ok('version' in c.greeting);
    const v = await c.execute<{ qemu: { major: number } }>('query-version');
    assert.ok(v.qemu.major >= 7);
    await assert.rejects(
      c.execute('no-such-command'),
      (e: unknown) => e instanceof QmpError && e.errorClass === 'CommandNotFound' && /no-such-command/.test(e.message),
    );
    const events: QmpEvent[] = [];
    c.on('event', (e: QmpEvent) => events.push(e));
    await c.execute('stop');
    const closed = new Promise<void>((r) => c.once('close', () => r()));
    await c.execute('quit');
    await closed;
    assert.ok(events.some((e) => e.event === 'STOP'));
    assert.ok(events.some((e) => e.event === 'SHUTDOWN'));
    await assert.rejects(c.execute('query-status'), QmpTransportError);
  });

  it('SystemInformationHostProbe.inventory reports CPU, memory, KVM and the state disk', async () => {
    const inv = await new SystemInformationHostProbe({ stateDir: dir }).inventory();
    assert.ok(inv.cpus >= 1 && inv.memory.totalMiB > 0 && inv.memory.availableMiB > 0);
    assert.equal(inv.virtualizationFlags.length > 0, hostHasVirt);
    assert.ok(inv.stateDisk && inv.stateDisk.totalMiB > 0, JSON.stringify(inv.stateDisk));
    if (!hostHasVirt) assert.equal(inv.kvm.usable, false);
  });

  describe('VmService invariants over a fake hypervisor', () => {
    /** Launch takes a tick, like QEMU's; pids are fake (never alive). */
    class FakeHandle implements VmHandle {
      readonly events = new VmEventBus();
      readonly accelerator: Accelerator = 'tcg';
      readonly exited = new Promise<'EXITED' | 'CRASHED'>(() => undefined);
      constructor(
        readonly name: string,
        readonly pid: number,
        readonly paths: VmPaths,
        readonly arch = 'x86_64' as const,
      ) {}
      status() {
        return Promise.resolve({ pid: this.pid, alive: true, runState: 'running', qmpConnected: true });
      }
      powerdown(): Promise<PowerdownResult> {
        this.events.emit({ vm: this.name, type: 'SHUTDOWN', at: Date.now() });
        this.events.emit({ vm: this.name, type: 'EXITED', at: Date.now() });
        return Promise.resolve({ method: 'guest', elapsedMs: 1 });
      }
      kill() {
        return Promise.resolve();
      }
      pause() {
        return Promise.resolve();
      }
      resume() {
        return Promise.resolve();
      }
      setLink() {
        return Promise.resolve();
      }
      detach() {}
    }
    class FakeHypervisor implements Hypervisor {
      readonly arch = 'x86_64' as const;
      readonly platformId = 'fake';
      launches = 0;
      accelerator() {
        return Promise.resolve('tcg' as const);
      }
      async launch(spec: VmSpec, p: VmPaths) {
        this.launches++;
        await new Promise((r) => setTimeout(r, 10));
        return new FakeHandle(spec.name, 999_999_000 + this.launches, p);
      }
      /** Names listed here are "alive but QMP unreachable". */
      readonly hung = new Set<string>();
      attach(r: VmAttachRecord): Promise<VmHandle> {
        if (this.hung.has(r.name)) return Promise.reject(new VmError('UNAVAILABLE', `QMP of ${r.name} does not answer`));
        return Promise.reject(new VmError('NOT_FOUND', `QEMU pid ${r.pid} of VM ${r.name} is not running`));
      }
      readonly killed: string[] = [];
      killRecorded(r: VmAttachRecord): Promise<boolean> {
        this.killed.push(r.name);
        this.hung.delete(r.name);
        return Promise.resolve(true);
      }
    }
    const generousHost: HostProbe = {
      inventory: () => Promise.reject(new Error('unused')),
      admit: (want, reserve, committed = { memoryMiB: 0, cpus: 0 }) => {
        if (want.cpus + committed.cpus > 4) return Promise.reject(new VmError('RESOURCE_EXHAUSTED', `${want.cpus}+${committed.cpus} > 4`));
        return Promise.resolve({ want, reserve, committed, availableMemoryMiB: 1e6, totalMemoryMiB: 1e6, vcpuCapacity: 4 });
      },
    };
    const make = (store = new InMemoryVmRecordStore()) => {
      const hv = new FakeHypervisor();
      const svc = new VmService({ hypervisors: [hv], store, host: generousHost, logger: new MemoryLogger(), stateDir: dir });
      return { hv, svc, store };
    };
    const code = (c: string) => (e: unknown) => e instanceof VmError && e.grpcCode === c;

    it('two concurrent starts of one name: one wins, the other gets ALREADY_EXISTS', async () => {
      const { hv, svc } = make();
      const results = await Promise.allSettled([
        svc.start(baseSpec(dir, 'same')),
        svc.start({ ...baseSpec(dir, 'same'), agentSocketPath: `${dir}/other.sock` }),
      ]);
      assert.deepEqual(results.map((r) => r.status).sort(), ['fulfilled', 'rejected']);
      const rej = results.find((r) => r.status === 'rejected') as PromiseRejectedResult;
      assert.ok(code('ALREADY_EXISTS')(rej.reason));
      assert.equal(hv.launches, 1);
    });

    it('refuses bad specs with INVALID_ARGUMENT / FAILED_PRECONDITION and what to do', async () => {
      const { svc } = make();
      await assert.rejects(svc.start({ ...baseSpec(dir), name: 'bad name!' }), code('INVALID_ARGUMENT'));
      await assert.rejects(svc.start({ ...baseSpec(dir), kernelPath: 'relative/vmlinuz' }), code('INVALID_ARGUMENT'));
      await assert.rejects(svc.start({ ...baseSpec(dir), memoryMiB: 1.5 }), code('INVALID_ARGUMENT'));
      await assert.rejects(
        svc.start({ ...baseSpec(dir), agentSocketPath: `/tmp/${'x'.repeat(120)}.sock` }),
        (e: unknown) => code('INVALID_ARGUMENT')(e) && /107 bytes/.test((e as Error).message),
      );
      await assert.rejects(
        svc.start({ ...baseSpec(dir), kernelPath: `${dir}/missing` }),
        (e: unknown) => code('FAILED_PRECONDITION')(e) && /does not exist/.test((e as Error).message),
      );
      await assert.rejects(svc.start({ ...baseSpec(dir), arch: 'aarch64' }), code('FAILED_PRECONDITION'));
      assert.deepEqual(svc.list(), []);
      assert.throws(() => svc.get('nope'), code('NOT_FOUND'));
      await assert.rejects(svc.stop('nope'), code('NOT_FOUND'));
    });

    it('counts committed vCPUs of running VMs in admission, frees them on stop', async () => {
      const { svc } = make();
      await svc.start({ ...baseSpec(dir, 'c1'), cpus: 3 });
      await assert.rejects(svc.start({ ...baseSpec(dir, 'c2'), cpus: 2 }), code('RESOURCE_EXHAUSTED'));
      assert.throws(() => svc.get('c2'), code('NOT_FOUND'), 'refused VM leaves no record');
      assert.equal((await svc.stop('c1')).method, 'guest');
      assert.equal(svc.get('c1').state, 'STOPPED');
      await svc.start({ ...baseSpec(dir, 'c2'), cpus: 2 });
      // a stopped VM's name can be started again
      await svc.start({ ...baseSpec(dir, 'c1'), cpus: 1 });
      assert.deepEqual(
        svc.list().map((v) => [v.name, v.state]),
        [
          ['c1', 'RUNNING'],
          ['c2', 'RUNNING'],
        ],
      );
    });

    it('recover() marks VMs whose QEMU is gone STOPPED, keeps unreachable ones taken', async () => {
      const store = new InMemoryVmRecordStore();
      const first = make(store);
      await first.svc.start(baseSpec(dir, 'gone'));
      await first.svc.start(baseSpec(dir, 'hung'));
      first.svc.close();
      const second = make(store);
      second.hv.hung.add('hung');
      const report = await second.svc.recover();
      assert.deepEqual(report.reattached, []);
      assert.deepEqual(
        report.markedStopped.map((m) => m.name),
        ['gone'],
      );
      assert.deepEqual(
        report.unreachable.map((m) => m.name),
        ['hung'],
      );
      assert.equal(second.svc.get('gone').state, 'STOPPED');
      assert.match(second.svc.get('gone').lastExit ?? '', /agent restart/);
      // the unreachable VM still holds its name; stop says UNAVAILABLE, kill works
      assert.equal(second.svc.get('hung').state, 'RUNNING');
      await assert.rejects(second.svc.start(baseSpec(dir, 'hung')), code('ALREADY_EXISTS'));
      await assert.rejects(second.svc.stop('hung'), code('UNAVAILABLE'));
      await second.svc.kill('hung');
      assert.deepEqual(second.hv.killed, ['hung']);
      assert.equal(second.svc.get('hung').state, 'STOPPED');
    });
  });
});
