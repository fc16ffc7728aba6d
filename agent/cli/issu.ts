#!/usr/bin/env node
/**
 * issu: the operator CLI. A thin gRPC client of the agent: it parses a command, calls the agent,
 * and prints the result for a person or, with --json, one JSON object for tooling.
 *
 * The agent is found through --socket PATH, then HITLESS_GRPC_SOCKET, then
 * <HITLESS_STATE_DIR or /var/lib/hitless>/agent.sock; --address HOST:PORT uses TCP instead.
 */
import * as grpc from '@grpc/grpc-js';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { clientCtor } from '../grpc/proto';
import { ProcessStatus, StatusResponse, SwitchoverResponse } from '../checkpoint/messages';

const HELP = `issu - hitless in-service software upgrade, operator CLI

Usage: issu [global options] COMMAND [args]

Commands
  checkpoint status [PROCESS]            tables, sequences, peers with role, lag and readiness
  checkpoint switchover PROCESS INSTANCE hand the active role of PROCESS to the READY standby
                                         INSTANCE (freeze, drain, promote, demote, unfreeze)
  help                                   this text

Global options
  --socket PATH      agent unix socket (env HITLESS_GRPC_SOCKET;
                     default <HITLESS_STATE_DIR or /var/lib/hitless>/agent.sock)
  --address H:P      agent TCP address instead of the socket (env HITLESS_GRPC_ADDRESS)
  --json             print one JSON object instead of text
  --timeout-ms N     give up on the agent after N ms (default 30000)
  -h, --help         this text

Exit status: 0 done, 1 the agent refused or failed (the message says why and what to do),
2 bad usage, 3 the agent is not reachable.
`;

type Stub = grpc.Client & Record<string, (...a: unknown[]) => unknown>;

class UsageError extends Error {}

function call<T>(stub: Stub, method: string, req: unknown, timeoutMs: number): Promise<T> {
  return new Promise<T>((resolve, reject) =>
    (stub[method] as (r: unknown, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, v: T) => void) => void).call(
      stub,
      req,
      { deadline: Date.now() + timeoutMs },
      (e, v) => (e ? reject(e) : resolve(v)),
    ),
  );
}

function printStatus(processes: ProcessStatus[]): void {
  if (!processes.length) {
    console.log('No process has registered with the agent yet.');
    return;
  }
  for (const p of processes) {
    console.log(`process ${p.process}`);
    for (const t of p.tables) {
      console.log(`  table ${t.name.padEnd(16)} seq ${String(t.seq).padStart(8)}  records ${String(t.records).padStart(9)}  ${(t.bytes / 2 ** 20).toFixed(1)} MiB  ${t.durability}`);
    }
    for (const s of p.peers) {
      const state = s.role === 'ACTIVE' ? (s.frozen ? 'frozen' : 'writing') : s.ready ? 'READY' : `syncing, lag ${s.lag}`;
      console.log(`  ${s.role.padEnd(8)} ${s.instanceId.padEnd(20)} vm ${s.vmId.padEnd(10)} v${s.softwareVersion.padEnd(8)} schema ${s.schemaWrites}  ${state}`);
    }
  }
}

async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      socket: { type: 'string' },
      address: { type: 'string' },
      json: { type: 'boolean', default: false },
      'timeout-ms': { type: 'string', default: '30000' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
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
  const stub = new (clientCtor('hitless.v1.Checkpoint'))(address, grpc.credentials.createInsecure()) as unknown as Stub;
  const out = (obj: unknown, text: () => void) => (values.json ? console.log(JSON.stringify(obj)) : text());
  try {
    if (cmd === 'checkpoint' && sub === 'status') {
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
