#!/usr/bin/env node
/**
 * issu: the operator CLI. A thin gRPC client of the agent: it parses a command, calls the agent,
 * and prints the result for a person or, with --json, one JSON object for tooling.
 *
 * The agent is found through --socket PATH, then HITLESS_GRPC_SOCKET, then
 * <HITLESS_STATE_DIR or /var/lib/hitless>/agent.sock; --address HOST:PORT uses TCP instead.
 */
import * as grpc from '@grpc/grpc-js';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { GLOBAL_OPTIONS, splitGlobalOptions } from './global-options';
import { amount } from './progress';
import { clientCtor } from '../grpc/proto';
import { imageCommand } from './image-commands';
import { UPGRADE_COMMANDS, UPGRADE_HELP, showCompatibility, upgradeCommand } from './upgrade-commands';
import { ProcessStatus, StatusResponse, SwitchoverResponse } from '../checkpoint/messages';
import type { ConsoleLogResponse, ListVmsResponse, PlatformInfo, StopVmResponse, VmInfoMessage } from '../vm/vm.messages';
import { REPORT_HELP, showUpgrade } from './report-commands';
import { Stub, call } from './rpc';

const HELP = `issu - hitless in-service software upgrade, operator CLI

Usage: issu [global options] COMMAND [args]

Upgrade commands
${UPGRADE_HELP}
${REPORT_HELP}

Other commands
  image keygen|sign|verify|inspect ...   offline field-upgrade tooling; 'issu image help'
  checkpoint status [PROCESS]            tables, sequences, peers with role, lag and readiness
  checkpoint switchover PROCESS INSTANCE hand the active role of PROCESS to the READY standby
                                         INSTANCE (freeze, drain, promote, demote, unfreeze)
  show platform                          host inventory: CPU, virtualization flags, KVM (kvm is
                                         true only when /dev/kvm exists and really runs a vCPU),
                                         memory, state-dir disk, accelerator per guest arch
  vm list                                VMs with state, QEMU pid, accelerator, image, size
  vm start NAME --image DIR [--memory MiB] [--cpus N] [--cmdline ARGS] [--wait-s S] [--no-wait]
                                         boot image bundle DIR (manifest.json, vmlinuz, ...) as
                                         VM NAME; shows progress: launched, boot marker
                                         (HITLESS-INIT), processes started (HITLESS-READY).
                                         Waits up to --wait-s (default 180) for the boot
  vm stop NAME [--timeout S]             graceful powerdown (guest power button); after S seconds
                                         (default 30) QMP quit, then SIGKILL
  vm kill NAME                           SIGKILL the VM's QEMU at once
  vm pause NAME | vm resume NAME         stop / continue the VM's vCPUs
  vm log NAME [--bytes N]                the last N bytes (default 65536) of the serial console
  wait-ready                             wait (up to --timeout-ms) until the agent answers on its
                                         socket; exit 0 then, 3 if it never does. The systemd
                                         unit's readiness check
  vm console NAME                        interactive serial console; Ctrl-] detaches. On the
                                         agent's host it attaches to the console socket directly;
                                         elsewhere (--address) it goes through the agent
  help                                   this text

Global options (before the command or after it)
  --socket PATH      agent unix socket (env HITLESS_GRPC_SOCKET;
                     default <HITLESS_STATE_DIR or /var/lib/hitless>/agent.sock)
  --address H:P      agent TCP address instead of the socket (env HITLESS_GRPC_ADDRESS)
  --json             print one JSON object instead of text
  --timeout-ms N     give up on the agent after N ms (default 30000)
  -h, --help         this text

VM names: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit.

Exit status: 0 done, 1 the agent refused or failed (the message says why and what to do),
2 bad usage, 3 the agent is not reachable.
`;

class UsageError extends Error {}

function printStatus(processes: ProcessStatus[]): void {
  if (!processes.length) {
    console.log('No process has registered with the agent yet.');
    return;
  }
  for (const p of processes) {
    console.log(`process ${p.process}`);
    for (const t of p.tables) {
      console.log(
        `  table ${t.name.padEnd(16)} seq ${String(t.seq).padStart(8)}  records ${String(t.records).padStart(9)}  ${(t.bytes / 2 ** 20).toFixed(1)} MiB  ${t.durability}`,
      );
    }
    for (const s of p.peers) {
      const state =
        s.role === 'ACTIVE'
          ? s.frozen
            ? 'frozen'
            : 'writing'
          : s.ready
            ? 'READY'
            : s.snapshotRecordsTotal > 0
              ? `bulk snapshot, ${amount(s.snapshotRecordsSent, 'records')} of ${amount(s.snapshotRecordsTotal)}`
              : `catching up, lag ${s.lag}`;
      console.log(
        `  ${s.role.padEnd(8)} ${s.instanceId.padEnd(20)} vm ${s.vmId.padEnd(10)} v${s.softwareVersion.padEnd(8)} schema ${s.schemaWrites}  ${state}`,
      );
    }
  }
}

/** Options of the agent commands (vm, show, checkpoint, upgrade); `image` parses its own. */
const COMMAND_OPTIONS = {
  image: { type: 'string' },
  memory: { type: 'string' },
  cpus: { type: 'string' },
  cmdline: { type: 'string' },
  'wait-s': { type: 'string' },
  'no-wait': { type: 'boolean' },
  timeout: { type: 'string' },
  bytes: { type: 'string' },
  reason: { type: 'string' },
  html: { type: 'string' },
} as const;

/** parseArgs's own errors ("Unknown option '--x'") are usage errors (exit status 2). */
function asUsage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

async function main(argv: string[]): Promise<number> {
  const { globals, rest: commandArgs } = splitGlobalOptions(argv, (m) => new UsageError(m));
  const front = asUsage(() => parseArgs({ args: globals, options: GLOBAL_OPTIONS, strict: true })).values;
  // Field-upgrade tooling works offline, without an agent, and has flags of its own.
  if (commandArgs[0] === 'image') {
    const json = !!front.json || commandArgs.includes('--json');
    try {
      return await imageCommand(
        commandArgs
          .slice(1)
          .filter((a) => a !== '--json')
          .concat(json ? ['--json'] : []),
        {
          json,
          out: (obj, text) => (json ? console.log(JSON.stringify(obj)) : text()),
        },
      );
    } catch (e) {
      if ((e as Error).name === 'UsageError') throw new UsageError((e as Error).message);
      throw e;
    }
  }
  // Global options may also follow the command; given twice, the later one counts.
  const after = asUsage(() => parseArgs({ args: commandArgs, options: { ...GLOBAL_OPTIONS, ...COMMAND_OPTIONS }, allowPositionals: true, strict: true }));
  const parsed = {
    values: {
      ...front,
      ...after.values,
      json: !!(after.values.json ?? front.json),
      'timeout-ms': after.values['timeout-ms'] ?? front['timeout-ms'] ?? '30000',
      'no-wait': !!after.values['no-wait'],
      help: after.values.help ?? front.help,
    },
    positionals: after.positionals,
  };
  const { values, positionals } = parsed;
  const [cmd, sub, ...rest] = positionals;
  if (values.help || !cmd || cmd === 'help') {
    process.stdout.write(HELP);
    return cmd || values.help ? 0 : 2;
  }
  const address =
    values.address ??
    process.env.HITLESS_GRPC_ADDRESS ??
    `unix:${path.resolve(values.socket ?? process.env.HITLESS_GRPC_SOCKET ?? path.join(process.env.HITLESS_STATE_DIR ?? '/var/lib/hitless', 'agent.sock'))}`;
  const timeoutMs = Number(values['timeout-ms']);
  if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) throw new UsageError(`--timeout-ms must be a positive integer, got '${values['timeout-ms']}'`);
  const out = (obj: unknown, text: () => void) => (values.json ? console.log(JSON.stringify(obj)) : text());
  if (UPGRADE_COMMANDS.has(cmd)) {
    return upgradeCommand(
      address,
      cmd,
      [sub, ...rest].filter((x): x is string => x !== undefined),
      { json: values.json, reason: values.reason, timeoutMs },
      out,
      (m) => new UsageError(m),
    );
  }
  if (cmd === 'show' && sub === 'upgrade')
    return showUpgrade(address, rest, { json: values.json, html: values.html, timeoutMs }, out, (m) => new UsageError(m));
  if (cmd === 'show' && sub === 'compatibility') return showCompatibility(address, rest[0], { json: values.json, timeoutMs }, out, (m) => new UsageError(m));
  if (cmd === 'show' || cmd === 'vm') return vmCommands(address, cmd, sub, rest, values, timeoutMs, out);
  const stub = new (clientCtor('hitless.v1.Checkpoint'))(address, grpc.credentials.createInsecure()) as unknown as Stub;
  try {
    if (cmd === 'wait-ready') {
      if (sub !== undefined) throw new UsageError(`wait-ready takes no arguments, got '${[sub, ...rest].join(' ')}'`);
      // A missing or refused socket (the agent still recovering its state, or not started yet)
      // is retried until the deadline instead of failing the call at once.
      const started = Date.now();
      await call(stub, 'Status', { process: '' }, timeoutMs, { waitForReady: true });
      const waitedMs = Date.now() - started;
      out({ ready: true, address, waitedMs }, () => console.log(`The agent at ${address} answers (waited ${waitedMs} ms).`));
    } else if (cmd === 'checkpoint' && sub === 'status') {
      const r = await call<StatusResponse>(stub, 'Status', { process: rest[0] ?? '' }, timeoutMs);
      out(r, () => printStatus(r.processes));
    } else if (cmd === 'checkpoint' && sub === 'switchover') {
      if (rest.length !== 2) throw new UsageError('checkpoint switchover needs PROCESS and INSTANCE, e.g. issu checkpoint switchover bgp bgp@vm2');
      const r = await call<SwitchoverResponse>(stub, 'Switchover', { process: rest[0], toInstanceId: rest[1] }, timeoutMs);
      out(r, () => console.log(`${rest[0]}: ${rest[1]} is active; writers were frozen for ${(r.freezeMicros / 1000).toFixed(2)} ms`));
    } else {
      throw new UsageError(`unknown command '${[cmd, sub].filter(Boolean).join(' ')}'`);
    }
    return 0;
  } finally {
    stub.close();
  }
}

type Values = {
  json: boolean;
  image?: string;
  memory?: string;
  cpus?: string;
  cmdline?: string;
  'wait-s'?: string;
  'no-wait': boolean;
  timeout?: string;
  bytes?: string;
};
type Out = (obj: unknown, text: () => void) => void;

function positiveInt(flag: string, v: string | undefined, def: number, min = 1): number {
  if (v === undefined) return def;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new UsageError(`${flag} must be an integer >= ${min}, got '${v}'`);
  return n;
}

function vmName(cmd: string, name: string | undefined): string {
  if (!name) throw new UsageError(`vm ${cmd} needs a VM name, e.g. issu vm ${cmd} r1`);
  return name;
}

function printVms(vms: VmInfoMessage[]): void {
  if (!vms.length) {
    console.log("No VMs. Start one with 'issu vm start NAME --image DIR'.");
    return;
  }
  console.log(`${'NAME'.padEnd(16)} ${'STATE'.padEnd(9)} ${'PID'.padStart(7)}  ${'ARCH'.padEnd(7)} ACCEL ${'MEM'.padStart(6)} CPUS  IMAGE`);
  for (const v of vms) {
    const last = v.state === 'STOPPED' || v.state === 'CRASHED' ? `  (${v.lastExit})` : '';
    console.log(
      `${v.name.padEnd(16)} ${v.state.padEnd(9)} ${String(v.pid || '-').padStart(7)}  ${v.arch.padEnd(7)} ${(v.accelerator || '-').padEnd(5)} ${`${v.memoryMib}M`.padStart(6)} ${String(v.cpus).padStart(4)}  v${v.imageVersion} ${v.imageDir}${last}`,
    );
  }
}

function printPlatform(p: PlatformInfo): void {
  console.log(`CPU        ${p.cpuModel} (${p.cpus} logical, ${p.physicalCores} physical; host arch ${p.hostArch})`);
  console.log(`Virt flags ${p.virtualizationFlags.join(' ') || 'none (no vmx/svm exposed)'}`);
  console.log(`KVM        ${p.kvm ? 'usable' : 'NOT usable'}: ${p.kvmReason}${p.kvmDevicePresent ? '' : ' (no /dev/kvm)'}`);
  console.log(`Memory     ${p.memoryAvailableMib} MiB available of ${p.memoryTotalMib} MiB`);
  if (p.stateDisk) console.log(`State disk ${p.stateDisk.path} on ${p.stateDisk.mount}: ${p.stateDisk.availableMib} MiB free of ${p.stateDisk.totalMib} MiB`);
  for (const a of p.accelerators)
    console.log(
      `Guest ${a.arch.padEnd(8)} platform ${a.platformId.padEnd(10)} accelerator ${a.accelerator}${a.accelerator === 'tcg' ? ' (software emulation, slow)' : ''}`,
    );
}

async function vmCommands(address: string, cmd: string, sub: string | undefined, rest: string[], values: Values, timeoutMs: number, out: Out): Promise<number> {
  if (cmd === 'show') {
    if (sub !== 'platform') throw new UsageError(`unknown command 'show ${sub ?? ''}'; the show commands are platform, upgrade and compatibility (issu help)`);
    const stub = new (clientCtor('hitless.v1.Platform'))(address, grpc.credentials.createInsecure()) as unknown as Stub;
    try {
      const p = await call<PlatformInfo>(stub, 'Get', {}, timeoutMs);
      out(p, () => printPlatform(p));
      return 0;
    } finally {
      stub.close();
    }
  }
  const stub = new (clientCtor('hitless.v1.Vm'))(address, grpc.credentials.createInsecure()) as unknown as Stub;
  try {
    switch (sub) {
      case 'list': {
        const r = await call<ListVmsResponse>(stub, 'List', {}, timeoutMs);
        out(r, () => printVms(r.vms));
        return 0;
      }
      case 'start':
        return await vmStart(stub, vmName('start', rest[0]), values, timeoutMs, out);
      case 'stop': {
        const name = vmName('stop', rest[0]);
        const timeoutS = positiveInt('--timeout', values.timeout, 30);
        if (!values.json) process.stderr.write(`${name}: powering down (guest power button; QMP quit after ${timeoutS} s)...\n`);
        const r = await call<StopVmResponse>(stub, 'Stop', { name, timeoutS }, timeoutMs + timeoutS * 1000 + 15_000);
        out(r, () =>
          console.log(
            r.method === 'already-exited'
              ? `${name} was not running (${r.vm.state}).`
              : `${name} stopped in ${(r.elapsedMs / 1000).toFixed(1)} s (${r.method === 'guest' ? 'guest powerdown' : r.method}).`,
          ),
        );
        return 0;
      }
      case 'kill': {
        const name = vmName('kill', rest[0]);
        const r = await call<VmInfoMessage>(stub, 'Kill', { name }, timeoutMs);
        out(r, () => console.log(`${name} killed; it is ${r.state}.`));
        return 0;
      }
      case 'pause':
      case 'resume': {
        const name = vmName(sub, rest[0]);
        const r = await call<VmInfoMessage>(stub, sub === 'pause' ? 'Pause' : 'Resume', { name }, timeoutMs);
        out(r, () => console.log(`${name} is ${r.state}.`));
        return 0;
      }
      case 'log': {
        const name = vmName('log', rest[0]);
        const bytes = positiveInt('--bytes', values.bytes, 65536);
        const r = await call<ConsoleLogResponse>(stub, 'ConsoleLog', { name, bytes }, timeoutMs);
        if (values.json) console.log(JSON.stringify({ name, bytes: r.data.length, text: r.data.toString('utf8') }));
        else process.stdout.write(r.data);
        return 0;
      }
      case 'console':
        return await vmConsole(stub, vmName('console', rest[0]), timeoutMs);
      default:
        throw new UsageError(`unknown command 'vm ${sub ?? ''}' (list, start, stop, kill, pause, resume, log, console)`);
    }
  } finally {
    stub.close();
  }
}

async function vmStart(stub: Stub, name: string, values: Values, timeoutMs: number, out: Out): Promise<number> {
  if (!values.image) throw new UsageError('vm start needs --image DIR (an image bundle directory with manifest.json)');
  const imageDir = path.resolve(values.image);
  const memoryMib = positiveInt('--memory', values.memory, 0, 0);
  const cpus = positiveInt('--cpus', values.cpus, 0, 0);
  const waitS = positiveInt('--wait-s', values['wait-s'], 180);
  const progress = (m: string) => {
    if (!values.json) process.stderr.write(`${m}\n`);
  };
  const t0 = Date.now();
  progress(`${name}: verifying ${imageDir} and launching...`);
  const vm = await call<VmInfoMessage>(stub, 'Start', { name, imageDir, memoryMib, cpus, cmdlineExtra: values.cmdline ?? '' }, timeoutMs);
  const launchedMs = Date.now() - t0;
  progress(
    `${name}: launched: QEMU pid ${vm.pid}, ${vm.arch} ${vm.accelerator}, ${vm.memoryMib} MiB, ${vm.cpus} vCPU, image v${vm.imageVersion} (${launchedMs} ms)`,
  );
  const result: Record<string, unknown> = { vm, launchedMs, bootMarkerMs: null, readyMs: null };
  if (values['no-wait']) {
    out(result, () => console.log(`${name} launched; follow the boot with 'issu vm log ${name}'.`));
    return 0;
  }
  const deadline = Date.now() + waitS * 1000;
  let text = '';
  while (Date.now() < deadline) {
    const r = await call<ConsoleLogResponse>(stub, 'ConsoleLog', { name, bytes: 1024 * 1024 }, timeoutMs);
    text = r.data.toString('utf8');
    if (result.bootMarkerMs === null && /HITLESS-INIT /.test(text)) {
      result.bootMarkerMs = Date.now() - t0;
      progress(`${name}: boot marker seen: ${/HITLESS-INIT [^\r\n]*/.exec(text)![0]} (${result.bootMarkerMs} ms)`);
    }
    if (/HITLESS-FATAL/.test(text)) {
      const line = /HITLESS-FATAL[^\r\n]*/.exec(text)![0];
      process.stderr.write(`issu: ${name} failed to boot: ${line}. See 'issu vm log ${name}'.\n`);
      if (values.json) console.log(JSON.stringify({ ...result, error: { code: 'BOOT_FAILED', message: line } }));
      return 1;
    }
    if (/HITLESS-READY/.test(text)) {
      result.readyMs = Date.now() - t0;
      progress(`${name}: processes started (HITLESS-READY) (${result.readyMs} ms)`);
      break;
    }
    const v = await call<VmInfoMessage>(stub, 'Get', { name }, timeoutMs);
    if (v.state === 'STOPPED' || v.state === 'CRASHED') {
      process.stderr.write(`issu: ${name} is ${v.state} during boot (${v.lastExit}). See 'issu vm log ${name}'.\n`);
      if (values.json) console.log(JSON.stringify({ ...result, vm: v, error: { code: 'BOOT_FAILED', message: v.lastExit } }));
      return 1;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  if (result.readyMs === null) {
    const what = result.bootMarkerMs === null ? 'no boot marker (HITLESS-INIT)' : 'no HITLESS-READY';
    process.stderr.write(
      `issu: ${name} is running but showed ${what} within ${waitS} s; look at 'issu vm log ${name}' (a TCG guest may just be slow: raise --wait-s).\n`,
    );
    if (values.json) console.log(JSON.stringify({ ...result, error: { code: 'DEADLINE_EXCEEDED', message: what } }));
    return 1;
  }
  out(result, () => console.log(`${name} is up: booted in ${((result.readyMs as number) / 1000).toFixed(1)} s.`));
  return 0;
}

/** Same host: attach to the console socket through node-pty; else bridge over the Console rpc. */
async function vmConsole(stub: Stub, name: string, timeoutMs: number): Promise<number> {
  const vm = await call<VmInfoMessage>(stub, 'Get', { name }, timeoutMs);
  if (!['RUNNING', 'PAUSED', 'STARTING', 'STOPPING'].includes(vm.state)) {
    process.stderr.write(`issu: VM ${name} is ${vm.state}; its console exists only while it runs.\n`);
    return 1;
  }
  if (fs.existsSync(vm.consoleSocket)) {
    const { attachConsole } = await import('../vm/console-attach');
    const r = await attachConsole(vm.consoleSocket, { stdin: process.stdin, stdout: process.stdout });
    process.stderr.write(r.reason === 'escape' ? `\r\nDetached from ${name}.\r\n` : `\r\nConsole of ${name} closed.\r\n`);
    return 0;
  }
  // Remote: the agent bridges the console over gRPC.
  const stream = (stub.Console as () => grpc.ClientDuplexStream<unknown, { data: Buffer }>).call(stub);
  const stdin = process.stdin as NodeJS.ReadStream;
  const raw = stdin.isTTY;
  if (raw) stdin.setRawMode(true);
  process.stdout.write(`Connected to ${name} through the agent. Escape character is ^]\r\n`);
  return new Promise<number>((resolve) => {
    let done = false;
    const finish = (code: number, msg: string) => {
      if (done) return;
      done = true;
      if (raw) stdin.setRawMode(false);
      stdin.pause();
      stdin.removeListener('data', onInput);
      stream.end();
      process.stderr.write(msg);
      resolve(code);
    };
    const onInput = (d: Buffer) => {
      const i = d.indexOf(0x1d);
      if (i < 0) return void stream.write({ data: d });
      if (i > 0) stream.write({ data: d.subarray(0, i) });
      finish(0, `\r\nDetached from ${name}.\r\n`);
    };
    stream.on('data', (m) => process.stdout.write(m.data));
    stream.on('end', () => finish(0, `\r\nConsole of ${name} closed.\r\n`));
    stream.on('error', (e: grpc.ServiceError) => finish(1, `\r\nissu: console: ${e.details ?? e.message}\r\n`));
    stream.write({ name, data: Buffer.alloc(0) });
    stdin.on('data', onInput);
    stdin.resume();
  });
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: Error & { code?: number; details?: string }) => {
    if (e instanceof UsageError) {
      process.stderr.write(`issu: ${e.message}\nRun 'issu --help' for the commands.\n`);
      process.exit(2);
    }
    if (e.code === grpc.status.UNAVAILABLE || e.code === grpc.status.DEADLINE_EXCEEDED) {
      process.stderr.write(`issu: cannot reach the agent (${e.details}). Is hitlessd running? Point at it with --socket PATH or HITLESS_GRPC_SOCKET.\n`);
      process.exit(3);
    }
    const name = e.code !== undefined ? grpc.status[e.code] : 'ERROR';
    process.stderr.write(`issu: ${name}: ${e.details ?? e.message}\n`);
    if (process.argv.includes('--json')) console.log(JSON.stringify({ error: { code: name, message: e.details ?? e.message } }));
    process.exit(1);
  },
);
