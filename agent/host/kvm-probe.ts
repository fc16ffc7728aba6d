/**
 * Whether KVM really works for a QEMU binary on this host, probed once per binary per process
 * (the VM layer picks KVM or TCG from it; `issu show platform` reports it). /dev/kvm existing is not
 * enough (a host without vmx/svm still has the node, and a cross-arch QEMU cannot use it), so
 * KVM is chosen only when /dev/kvm opens read-write AND a real machine with `-cpu host` comes
 * up under KVM and reports `query-kvm: {enabled: true}` over QMP on stdio. `-machine none` is
 * not enough: it creates no vCPU, and some hosts (nested/sandboxed) accept KVM_CREATE_VM but
 * abort at vCPU setup ("failed to set MSR 0x10a"), which is exactly what this host does.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';

export interface KvmProbeResult {
  devicePresent: boolean;
  deviceOpens: boolean;
  /** QEMU could initialise the KVM accelerator for this binary. */
  usable: boolean;
  reason: string;
}

const cache = new Map<string, Promise<KvmProbeResult>>();

/** Machine + CPU arguments that create and reset one KVM vCPU, per QEMU binary. */
export function defaultKvmProbeArgs(qemuBinary: string): string[] {
  if (qemuBinary.endsWith('x86_64')) return ['-machine', 'q35', '-cpu', 'host'];
  if (qemuBinary.endsWith('aarch64')) return ['-machine', 'virt,gic-version=host', '-cpu', 'host'];
  return ['-machine', 'none'];
}

/** Cached per binary; a probe takes < 1 s (QEMU quits right after query-kvm). */
export function probeKvm(qemuBinary: string, probeArgs?: string[], kvmDevice = '/dev/kvm'): Promise<KvmProbeResult> {
  const args = probeArgs ?? defaultKvmProbeArgs(qemuBinary);
  const key = `${qemuBinary}|${args.join(' ')}|${kvmDevice}`;
  let p = cache.get(key);
  if (!p) {
    p = runProbe(qemuBinary, args, kvmDevice);
    cache.set(key, p);
  }
  return p;
}

async function runProbe(qemuBinary: string, probeArgs: string[], kvmDevice: string): Promise<KvmProbeResult> {
  const devicePresent = fs.existsSync(kvmDevice);
  if (!devicePresent) return { devicePresent, deviceOpens: false, usable: false, reason: `${kvmDevice} does not exist` };
  try {
    fs.closeSync(fs.openSync(kvmDevice, 'r+'));
  } catch (e) {
    return { devicePresent, deviceOpens: false, usable: false, reason: `cannot open ${kvmDevice}: ${(e as Error).message}` };
  }
  const { ok, detail } = await qemuSaysKvmWorks(qemuBinary, probeArgs);
  return { devicePresent, deviceOpens: true, usable: ok, reason: detail };
}

function qemuSaysKvmWorks(qemuBinary: string, probeArgs: string[]): Promise<{ ok: boolean; detail: string }> {
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
      // No -S: the vCPU must really be created, reset and run (no disk: it spins in firmware).
      ['-accel', 'kvm', ...probeArgs, '-m', '64', '-nodefaults', '-no-user-config', '-display', 'none', '-qmp', 'stdio'],
      { stdio: ['pipe', 'pipe', 'pipe'] },
    );
    const timer = setTimeout(() => finish(false, 'probe timed out after 5 s'), 5000);
    child.on('error', (e) => finish(false, `cannot run ${qemuBinary}: ${e.message}`));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    let kvmEnabled = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (!kvmEnabled) {
        const m = /"return":\s*\{[^}]*"enabled":\s*(true|false)/.exec(out);
        if (!m) return;
        if (m[1] !== 'true') return finish(false, 'QEMU reports KVM not enabled');
        kvmEnabled = true;
        // Give the vCPU time to run guest code; a broken KVM aborts QEMU right here.
        setTimeout(() => child.stdin.write('{"execute":"query-status"}\n'), 300);
        return;
      }
      if (/"running":\s*true/.test(out)) {
        finish(true, 'KVM enabled and a vCPU runs');
        child.stdin.write('{"execute":"quit"}\n');
      }
    });
    child.on('exit', (code, signal) => finish(false, (err.trim().split('\n').pop() ?? '') || `QEMU exited with code ${code} signal ${signal}`));
    child.stdin.on('error', () => undefined);
    child.stdin.write('{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n');
  });
}
