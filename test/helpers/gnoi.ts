/**
 * gNOI test helpers: drive OS.Install as a stream (step by step, or a whole package), and make
 * small signed image bundles that pass the agent's verification without being bootable (for
 * tests that never start a VM: storage, limits, activation errors).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { signBundle } from '../../agent/images/signing';
import { AnyClient } from '../../harness/grpc-client';
import { writeTestBundle } from './test-bundle';

export type InstallResp = Record<string, unknown> & { response: string };
export type InstallErrorMsg = { type: string; detail: string };

/** Opens an Install stream; `next()` yields responses in order, `done` resolves when it ends. */
export function install(c: AnyClient) {
  const call = (c.Install as () => grpc.ClientDuplexStream<unknown, InstallResp>).call(c);
  const got: InstallResp[] = [];
  const waiters: (() => void)[] = [];
  let ended = false;
  call.on('data', (m: InstallResp) => {
    got.push(m);
    waiters.splice(0).forEach((w) => w());
  });
  const done = new Promise<void>((resolve) => {
    const end = () => {
      ended = true;
      resolve();
      waiters.splice(0).forEach((w) => w());
    };
    call.on('end', end);
    call.on('error', end);
  });
  const next = async (): Promise<InstallResp> => {
    while (got.length === 0) {
      if (ended) throw new Error('stream ended without a response');
      await new Promise<void>((r) => waiters.push(r));
    }
    return got.shift()!;
  };
  return { call, next, done };
}

/**
 * One whole Install: TransferRequest, then (if TransferReady) the package in chunks and
 * TransferEnd. Resolves with the final response (validated or installError), skipping
 * transferProgress, and whether the transfer was started.
 */
export async function installPackage(
  c: AnyClient,
  pkg: Buffer,
  opts: { version?: string; packageSize?: number; chunk?: number } = {},
): Promise<{ final: InstallResp; transferred: boolean }> {
  const s = install(c);
  s.call.write({ transferRequest: { version: opts.version ?? '', packageSize: opts.packageSize ?? 0 } });
  const first = await s.next();
  if (first.response !== 'transferReady') {
    await s.done;
    return { final: first, transferred: false };
  }
  const chunk = opts.chunk ?? 64 * 1024;
  for (let i = 0; i < pkg.length; i += chunk) s.call.write({ transferContent: pkg.subarray(i, i + chunk) });
  s.call.write({ transferEnd: {} });
  let r: InstallResp;
  do r = await s.next();
  while (r.response === 'transferProgress');
  s.call.end();
  await s.done;
  return { final: r, transferred: true };
}

/**
 * A signed bundle directory in `dir` whose rootfs.ext4 is `rootfsBytes` of random data: valid
 * manifest (x86_64, one bgp process with schema 1 unless `processes` says otherwise), sha256s
 * and ed25519 signature, so the agent's Install accepts it; it does not boot.
 */
export async function fakeBundle(
  dir: string,
  version: string,
  rootfsBytes: number,
  privateKeyPem: string,
  over: { arch?: string; processes?: unknown[] } = {},
): Promise<string> {
  writeTestBundle(dir, { version, rootfsBytes, ...over });
  await signBundle(dir, privateKeyPem);
  return dir;
}

/** A ustar archive of a bundle directory's files at its top level (what a gNOI client sends). */
export function tarBundle(dir: string): Buffer {
  const out = `${dir}.tar`;
  execFileSync('tar', ['--format=ustar', '-cf', out, '-C', dir, '.']);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}
