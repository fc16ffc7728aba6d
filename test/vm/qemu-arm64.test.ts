/**
 * arm64 (virt, cortex-a57) under TCG: one boot to the init marker, then stop (graceful when
 * the guest kernel has gpio-keys, as the test guest's does, else the QMP quit fallback).
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SystemInformationHostProbe } from '../../agent/host/host-probe';
import { QemuHypervisor, pidAlive } from '../../agent/vm/qemu-hypervisor';
import { InMemoryVmRecordStore } from '../../agent/vm/vm-record-store';
import { VmService } from '../../agent/vm/vm.service';
import { arm64KvmPlatform } from '../../platform/arm64-kvm';
import { INIT_MARKER, MemoryLogger, guestImage, makeStateDir, waitForText, type GuestImage } from './fixtures';
import { QemuReaper } from '../../harness/qemu-reaper';

describe('VM layer, arm64 under TCG (real QEMU)', function () {
  this.timeout(240_000);
  const reaper = new QemuReaper();
  const logger = new MemoryLogger();
  let img: GuestImage;
  let stateDir: string;
  let service: VmService;

  before(function () {
    this.timeout(600_000);
    img = guestImage('aarch64');
    stateDir = makeStateDir();
    service = new VmService({
      hypervisors: [new QemuHypervisor(arm64KvmPlatform, { logger })],
      store: new InMemoryVmRecordStore(),
      host: new SystemInformationHostProbe({ stateDir }),
      logger,
      stateDir,
    });
  });

  after(() => {
    service?.close();
    reaper.reap();
    if (stateDir) fs.rmSync(stateDir, { recursive: true, force: true });
  });

  it('boots to the init marker on ttyAMA0 and stops', async () => {
    const t0 = Date.now();
    const info = await service.start({
      name: 'a1',
      arch: 'aarch64',
      kernelPath: img.kernel,
      initrdPath: img.initrd,
      rootfsPath: img.rootfs,
      memoryMiB: 256,
      cpus: 1,
      imageVersion: img.version,
      agentSocketPath: path.join(stateDir, 'a1.agent.sock'),
    });
    reaper.track(info.pid);
    const ms = await waitForText(
      () => {
        try {
          return fs.readFileSync(info.paths.consoleLog, 'utf8');
        } catch {
          return '';
        }
      },
      INIT_MARKER,
      180_000,
      t0,
    );
    process.stderr.write(`      MEASURE aarch64 boot-to-marker (console.log): ${ms} ms\n`);
    assert.match(await service.consoleLog('a1', 8192), /arch=aarch64/);
    // The powerdown right after boot also exercises the re-press: the first press may come
    // before the guest's power-key handler listens.
    const result = await service.stop('a1', { timeoutMs: 15_000 });
    process.stderr.write(`      MEASURE aarch64 stop (${result.method}): ${result.elapsedMs} ms\n`);
    // The test guest loads gpio-keys, so the virt machine's GPIO power key reaches its init.
    if (img.source === 'testguest') assert.equal(result.method, 'guest');
    else assert.ok(['guest', 'quit'].includes(result.method), result.method);
    assert.equal(service.get('a1').state, 'STOPPED');
    assert.equal(pidAlive(info.pid!), false);
  });
});
