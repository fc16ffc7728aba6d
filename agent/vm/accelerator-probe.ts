/**
 * The accelerator a VM of one QEMU binary gets: KVM where the host probe (host/kvm-probe.ts)
 * shows it really runs a vCPU, TCG software emulation otherwise, with one warning per logger.
 */
import { probeKvm } from '../host/kvm-probe';
import type { Accelerator, VmLogger } from './hypervisor';

/** One TCG warning per logger and binary (a logger is one agent/component instance). */
const warned = new WeakMap<VmLogger, Set<string>>();

export async function probeAccelerator(qemuBinary: string, logger?: VmLogger, probeArgs?: string[]): Promise<Accelerator> {
  const r = await probeKvm(qemuBinary, probeArgs);
  if (r.usable) return 'kvm';
  const seen = logger ? (warned.get(logger) ?? new Set<string>()) : undefined;
  if (logger && seen && !seen.has(qemuBinary)) {
    seen.add(qemuBinary);
    warned.set(logger, seen);
    logger.warn({ qemuBinary, reason: r.reason }, `KVM not usable for ${qemuBinary} (${r.reason}); falling back to TCG software emulation (~10-50x slower)`);
  }
  return 'tcg';
}
