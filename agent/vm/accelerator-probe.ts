/**
 * Decides KVM vs TCG for a QEMU binary, once per binary per process. /dev/kvm existing is not
 * enough (a host without vmx/svm still has the node, and a cross-arch QEMU cannot use it), so
 * KVM is chosen only when /dev/kvm opens read-write AND `<qemu> -accel kvm -machine none`
 * reports `query-kvm: {enabled: true}` over QMP on stdio.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import type { Accelerator, VmLogger } from './hypervisor';

export interface KvmProbeResult {
  devicePresent: boolean;
  deviceOpens: boolean;
  /** QEMU could initialise the KVM accelerator for this binary. */
  usable: boolean;
  reason: string;
}

const cache = new Map<string, Promise<KvmProbeResult>>();
const warned = new Set<string>();

/** Cached per binary; a probe takes < 1 s (QEMU exits right after query-kvm). */
export function probeKvm(qemuBinary: string, kvmDevice = '/dev/kvm'): Promise<KvmProbeResult> {
  const key = `${qemuBinary}|${kvmDevice}`;
  let p = cache.get(key);
  if (!p) {
    p = runProbe(qemuBinary, kvmDevice);
    cache.set(key, p);
  }
  return p;
}

export async function probeAccelerator(qemuBinary: string, logger?: VmLogger): Promise<Accelerator> {
  const r = await probeKvm(qemuBinary);
  if (r.usable) return 'kvm';
  if (logger && !warned.has(qemuBinary)) {
    warned.add(qemuBinary);
    logger.warn({ qemuBinary, reason: r.reason }, `KVM not usable for ${qemuBinary} (${r.reason}); falling back to TCG software emulation (~10-50x slower)`);
  }
  return 'tcg';
}

async function runProbe(qemuBinary: string, kvmDevice: string): Promise<KvmProbeResult> {
  const devicePresent = fs.existsSync(kvmDevice);
  if (!devicePresent) return { devicePresent, deviceOpens: false, usable: false, reason: `${kvmDevice} does not exist` };
  try {
    fs.closeSync(fs.openSync(kvmDevice, 'r+'));
  } catch (e) {
    return { devicePresent, deviceOpens: false, usable: false, reason: `cannot open ${kvmDevice}: ${(e as Error).message}` };
  }
  const { ok, detail } = await qemuSaysKvmWorks(qemuBinary);
  return { devicePresent, deviceOpens: true, usable: ok, reason: detail };
}

function qemuSaysKvmWorks(qemuBinary: string): Promise<{ ok: boolean; detail: string }> {
  return new Promise((resolve) => {
    let out = '';
    let err = '';
    let done = false;
    const finish = (ok: boolean, detail: string) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (child.exitCode === null) child.kill('SIGKILL');
      resolve({ ok, detail });
    };
    const child = spawn(
      qemuBinary,
      ['-accel', 'kvm', '-machine', 'none', '-nodefaults', '-no-user-config', '-display', 'none', '-S', '-qmp', 'stdio'],
      { stdio: ['pipe', 'pipe', 'pipe'] },
    );
    const timer = setTimeout(() => finish(false, 'probe timed out after 5 s'), 5000);
    child.on('error', (e) => finish(false, `cannot run ${qemuBinary}: ${e.message}`));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      const m = /"return":\s*\{[^}]*"enabled":\s*(true|false)/.exec(out);
      if (m) finish(m[1] === 'true', m[1] === 'true' ? 'KVM enabled' : 'QEMU reports KVM not enabled');
    });
    child.on('exit', (code) => finish(false, (err.trim().split('\n').pop() ?? '') || `QEMU exited with code ${code}`));
    child.stdin.on('error', () => undefined);
    child.stdin.write('{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n{"execute":"quit"}\n');
  });
}
