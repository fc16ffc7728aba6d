/**
 * gRPC transport of hitless.v1.Vm and hitless.v1.Platform: parses calls into VmSupervisor
 * operations and maps results and errors (VmError = HitlessError with a gRPC code and a
 * sentence) back. Host listeners only; guests never see these services. No domain logic here.
 */
import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { invalidArgument } from '../common/errors';
import { Logger } from '../common/logger';
import { failStream, unary } from '../grpc/status';
import { ACTIVE_STATES, VmError, type VmEvent } from './hypervisor';
import type { PlatformReport, VmSupervisor } from './vm-supervisor';
import { checkVmName, type VmInfo } from './vm.service';
import type {
  ConsoleInput,
  ConsoleLogRequest,
  ConsoleLogResponse,
  ConsoleOutput,
  ListVmsResponse,
  PlatformInfo,
  StartVmRequest,
  StopVmRequest,
  StopVmResponse,
  VmEventMessage,
  VmEventsRequest,
  VmInfoMessage,
  VmRef,
} from './vm.messages';

/** ConsoleLog answers at most this much (the server's message limit is 8 MiB). */
export const MAX_CONSOLE_LOG_BYTES = 4 * 1024 * 1024;
const DEFAULT_CONSOLE_LOG_BYTES = 64 * 1024;
const MAX_STOP_TIMEOUT_S = 3600;

export function toVmInfoMessage(v: VmInfo): VmInfoMessage {
  return {
    name: v.name,
    arch: v.arch,
    state: v.state,
    pid: v.pid ?? 0,
    accelerator: v.accelerator ?? '',
    imageVersion: v.imageVersion ?? '',
    imageDir: v.imageDir ?? '',
    memoryMib: v.memoryMiB,
    cpus: v.cpus,
    consoleSocket: v.paths.consoleSocket,
    consoleLog: v.paths.consoleLog,
    agentSocket: v.paths.agentSocket,
    bulkSocket: v.paths.bulkSocket ?? '',
    lastExit: v.lastExit ?? '',
    createdAtMs: v.createdAt,
    updatedAtMs: v.updatedAt,
  };
}

export function toPlatformInfo(p: PlatformReport): PlatformInfo {
  return {
    cpuModel: p.cpuModel,
    cpus: p.cpus,
    physicalCores: p.physicalCores,
    virtualizationFlags: p.virtualizationFlags,
    kvm: p.kvm.usable,
    kvmDevicePresent: p.kvm.devicePresent,
    kvmReason: p.kvm.reason,
    memoryTotalMib: p.memory.totalMiB,
    memoryAvailableMib: p.memory.availableMiB,
    stateDisk: p.stateDisk
      ? { path: p.stateDisk.path, mount: p.stateDisk.mount, totalMib: p.stateDisk.totalMiB, availableMib: p.stateDisk.availableMiB }
      : null,
    accelerators: p.accelerators,
    hostArch: p.hostArch,
  };
}

function uintField(what: string, v: unknown, max: number): number {
  const n = Number(v ?? 0);
  if (!Number.isInteger(n) || n < 0 || n > max) throw invalidArgument(`${what} must be an integer from 0 to ${max}, got ${String(v)}`);
  return n;
}

export function vmHandlers(sup: VmSupervisor, log: Logger): grpc.UntypedServiceImplementation {
  const info = (name: string) => toVmInfoMessage(sup.get(name));
  return {
    List: unary<unknown, ListVmsResponse>(log, 'List', () => ({ vms: sup.list().map(toVmInfoMessage) })),
    Get: unary<VmRef, VmInfoMessage>(log, 'Get', (req) => info(req.name)),
    Start: unary<StartVmRequest, VmInfoMessage>(log, 'Start', async (req) => {
      const memoryMiB = uintField('memory_mib', req.memoryMib, 16 * 1024 * 1024);
      const cpus = uintField('cpus', req.cpus, 255);
      const v = await sup.start({ name: req.name, imageDir: req.imageDir, memoryMiB, cpus, cmdlineExtra: req.cmdlineExtra });
      return toVmInfoMessage(v);
    }),
    Stop: unary<StopVmRequest, StopVmResponse>(log, 'Stop', async (req) => {
      const timeoutS = uintField('timeout_s', req.timeoutS, MAX_STOP_TIMEOUT_S) || 30;
      const r = await sup.stop(req.name, timeoutS * 1000);
      return { method: r.method, elapsedMs: r.elapsedMs, vm: info(req.name) };
    }),
    Kill: unary<VmRef, VmInfoMessage>(log, 'Kill', async (req) => {
      await sup.kill(req.name);
      return info(req.name);
    }),
    Pause: unary<VmRef, VmInfoMessage>(log, 'Pause', async (req) => {
      await sup.pause(req.name);
      return info(req.name);
    }),
    Resume: unary<VmRef, VmInfoMessage>(log, 'Resume', async (req) => {
      await sup.resume(req.name);
      return info(req.name);
    }),
    ConsoleLog: unary<ConsoleLogRequest, ConsoleLogResponse>(log, 'ConsoleLog', async (req) => {
      const bytes = uintField('bytes', req.bytes, MAX_CONSOLE_LOG_BYTES) || DEFAULT_CONSOLE_LOG_BYTES;
      return { data: await sup.consoleLog(req.name, bytes) };
    }),
    Console: (call: grpc.ServerDuplexStream<ConsoleInput, ConsoleOutput>) => consoleStream(sup, log, call),
    Events: (call: grpc.ServerWritableStream<VmEventsRequest, VmEventMessage>) => {
      const name = call.request.name;
      try {
        if (name) sup.get(name); // NOT_FOUND / INVALID_ARGUMENT before subscribing
      } catch (e) {
        failStream(call, e, log, 'Events');
        return;
      }
      const off = sup.onEvent((e: VmEvent) => {
        if (name && e.vm !== name) return;
        let state: VmInfoMessage['state'] = 'VM_STATE_UNSPECIFIED';
        try {
          state = sup.get(e.vm).state;
        } catch {
          // record deleted meanwhile
        }
        call.write({ vm: e.vm, type: e.type, atMs: e.at, state, dataJson: JSON.stringify(e.data ?? {}) });
      });
      call.on('cancelled', off);
      call.on('close', off);
      call.on('error', off);
    },
  };
}

/**
 * Console: bridges the call to the VM's console.sock (QEMU serves one client at a time; a
 * second one waits until the first detaches). The first input message names the VM.
 */
function consoleStream(sup: VmSupervisor, log: Logger, call: grpc.ServerDuplexStream<ConsoleInput, ConsoleOutput>): void {
  let sock: net.Socket | null = null;
  let done = false;
  const finish = (err?: unknown) => {
    if (done) return;
    done = true;
    sock?.destroy();
    if (err) failStream(call, err, log, 'Console');
    else call.end();
  };
  call.on('data', (msg: ConsoleInput) => {
    if (done) return;
    if (!sock) {
      try {
        const v = sup.get(checkVmName(msg.name));
        if (!ACTIVE_STATES.includes(v.state))
          throw new VmError('FAILED_PRECONDITION', `VM ${v.name} is ${v.state}; its console exists only while it runs. Start it first.`);
        if (!fs.existsSync(v.paths.consoleSocket))
          throw new VmError('UNAVAILABLE', `VM ${v.name} has no console socket at ${v.paths.consoleSocket}; check 'issu vm list' and retry.`);
        sock = net.connect(v.paths.consoleSocket);
      } catch (e) {
        finish(e);
        return;
      }
      sock.on('data', (d: Buffer) => call.write({ data: d }));
      sock.on('error', (e) => finish(new VmError('UNAVAILABLE', `console connection failed: ${e.message}`)));
      sock.on('close', () => finish());
    }
    if (msg.data?.length) sock.write(msg.data);
  });
  call.on('end', () => finish());
  call.on('cancelled', () => finish());
  call.on('error', () => finish());
}

export function platformHandlers(sup: VmSupervisor, log: Logger): grpc.UntypedServiceImplementation {
  return {
    Get: unary<unknown, PlatformInfo>(log, 'Get', async () => toPlatformInfo(await sup.platform())),
  };
}
