/**
 * Guest image bundles for VM tests and the demo: build (or take from the cache) the example
 * bundles, and make signed variants of them without touching the cache (files hard-linked).
 */
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { signBundle } from '../agent/images/signing';
import type { StatusResponse } from '../agent/checkpoint/messages';
import type { AgentHandle } from './agent-process';
import { AnyClient, unaryCall } from './grpc-client';
import { until } from './wait';

const REPO = path.resolve(__dirname, '..', '..');
const ISSU = path.resolve(__dirname, '../agent/cli/issu.js');

/** Bundle dirs by "arch-version" (e.g. "x86_64-1.0.0"); `only` limits which are built. */
export function buildGuestImages(only?: string[]): Record<string, string> {
  const args = [path.join(REPO, 'scripts/build-guest-images.sh'), ...(only ? ['--only', only.join(',')] : [])];
  const out = execFileSync('bash', args, { cwd: REPO, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 20 * 60_000 });
  return JSON.parse(out.trim().split('\n').pop()!) as Record<string, string>;
}

/**
 * A signed copy of bundle `src` in `dir`: files hard-linked (those in `copy` copied, so a test
 * may alter them), manifest rewritten by `edit` when given, signed with `privateKeyPem`.
 */
export async function signedVariant(
  src: string,
  dir: string,
  privateKeyPem: string,
  opts: { edit?: (manifest: Record<string, unknown>) => void; copy?: string[] } = {},
): Promise<string> {
  fs.mkdirSync(dir, { recursive: true });
  for (const f of fs.readdirSync(src)) {
    if (f === 'manifest.sig' || (f === 'manifest.json' && opts.edit)) continue;
    if (opts.copy?.includes(f)) fs.copyFileSync(path.join(src, f), path.join(dir, f));
    else fs.linkSync(path.join(src, f), path.join(dir, f));
  }
  if (opts.edit) {
    const m = JSON.parse(fs.readFileSync(path.join(src, 'manifest.json'), 'utf8')) as Record<string, unknown>;
    opts.edit(m);
    fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(m, null, 2));
  }
  await signBundle(dir, privateKeyPem, { checkFiles: false });
  return dir;
}

/** Runs the compiled issu CLI against an agent socket; never rejects. */
export function runIssu(socket: string, args: string[], timeoutMs = 300_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [ISSU, '--socket', socket, ...args], { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/**
 * Boots `imageDir` as VM `name` through the agent and waits until its bgp daemon is ACTIVE with
 * at least `records` routes checkpointed. Returns QEMU's pid (for cleanup) and the time taken.
 */
export async function bootControlPlane(
  vm: AnyClient,
  ck: AnyClient,
  name: string,
  imageDir: string,
  records: number,
  timeoutMs: number,
): Promise<{ pid: number; ms: number }> {
  const t0 = Date.now();
  const v = await unaryCall<{ pid: number }>(vm, 'Start', { name, imageDir });
  await until(
    `bgp in ${name} active with ${records} routes`,
    async () => {
      const b = (await unaryCall<StatusResponse>(ck, 'Status', { process: 'bgp' }).catch(() => undefined))?.processes[0];
      return b?.peers.some((p) => p.vmId === name && p.role === 'ACTIVE') && (b.tables.find((t) => t.name === 'rib')?.records ?? 0) >= records;
    },
    timeoutMs,
    200,
  );
  return { pid: v.pid, ms: Date.now() - t0 };
}

/** For afterEach: when the test failed, print the agent's last log lines (what it was doing). */
export function printAgentLogIfFailed(ctx: Mocha.Context, agent: AgentHandle | undefined): void {
  if (ctx.currentTest?.state === 'failed' && agent) {
    process.stderr.write(
      `      agent log (last lines):\n${agent
        .stderr()
        .split('\n')
        .slice(-25)
        .map((l) => `        ${l}`)
        .join('\n')}\n`,
    );
  }
}
