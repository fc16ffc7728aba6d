/**
 * Host inventory and admission control: what this router host has (CPU, virtualization,
 * KVM, memory, state-dir disk) and whether one more VM fits. The VM layer asks admit() before
 * every launch; a refusal is a RESOURCE_EXHAUSTED HitlessError whose message has the numbers.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as si from 'systeminformation';
import { resourceExhausted } from '../common/errors';
import { probeKvm } from './kvm-probe';

/** memoryMiB in MiB, cpus in (v)CPUs. */
export interface ResourceAmount {
  memoryMiB: number;
  cpus: number;
}

export interface HostInventory {
  cpuModel: string;
  /** Logical CPUs (hardware threads) the OS schedules on. */
  cpus: number;
  physicalCores: number;
  /** vmx (Intel VT-x) / svm (AMD-V) when the CPU exposes them; empty in most nested VMs. */
  virtualizationFlags: string[];
  kvm: { devicePresent: boolean; usable: boolean; reason: string };
  memory: { totalMiB: number; availableMiB: number };
  stateDisk: { path: string; mount: string; totalMiB: number; availableMiB: number } | null;
}

export interface AdmissionDecision {
  want: ResourceAmount;
  reserve: ResourceAmount;
  committed: ResourceAmount;
  availableMemoryMiB: number;
  totalMemoryMiB: number;
  vcpuCapacity: number;
}

export interface HostProbe {
  inventory(): Promise<HostInventory>;
  /**
   * Resolves when a VM of size `want` fits next to the VMs already `committed`, keeping
   * `reserve` for the host itself (agent, routing daemons); throws RESOURCE_EXHAUSTED otherwise.
   */
  admit(want: ResourceAmount, reserve: ResourceAmount, committed?: ResourceAmount): Promise<AdmissionDecision>;
}

export interface SystemInformationHostProbeOptions {
  /** Directory whose filesystem holds VM runtime files and images. */
  stateDir: string;
  /**
   * vCPUs admitted per host CPU. Default 4: control-plane VMs are mostly idle, and under TCG a
   * vCPU is one host thread that mostly sleeps; 4:1 still lets 2 host cores run 8 vCPUs of
   * idle routers while refusing obviously absurd requests. Set 1 for strict pinning-style sizing.
   */
  vcpuPerHostCpu?: number;
  /** QEMU binary for the KVM usability probe; defaults to the host's native arch. */
  qemuBinary?: string;
}

const MiB = 1024 * 1024;

export class SystemInformationHostProbe implements HostProbe {
  private readonly vcpuPerHostCpu: number;
  private readonly qemuBinary: string;
  /**
   * The CPU's model and counts, read once: systeminformation runs lscpu and more for them, and
   * starting processes from the agent holds its event loop (host/command-runner.ts), here at
   * every admission in the middle of an upgrade. They do not change while the agent runs.
   */
  private cpuInfo: Promise<si.Systeminformation.CpuData> | null = null;

  private cpu(): Promise<si.Systeminformation.CpuData> {
    this.cpuInfo ??= si.cpu().catch((e: unknown) => {
      this.cpuInfo = null;
      throw e;
    });
    return this.cpuInfo;
  }

  constructor(private readonly opts: SystemInformationHostProbeOptions) {
    this.vcpuPerHostCpu = opts.vcpuPerHostCpu ?? 4;
    this.qemuBinary = opts.qemuBinary ?? (process.arch === 'arm64' ? 'qemu-system-aarch64' : 'qemu-system-x86_64');
  }

  async inventory(): Promise<HostInventory> {
    const [cpu, flags, mem, disks, kvm] = await Promise.all([this.cpu(), si.cpuFlags(), si.mem(), si.fsSize(), probeKvm(this.qemuBinary)]);
    const flagSet = new Set(flags.split(/\s+/));
    return {
      cpuModel: `${cpu.manufacturer} ${cpu.brand}`.trim(),
      cpus: cpu.cores,
      physicalCores: cpu.physicalCores,
      virtualizationFlags: ['vmx', 'svm'].filter((f) => flagSet.has(f)),
      kvm: { devicePresent: kvm.devicePresent, usable: kvm.usable, reason: kvm.reason },
      memory: { totalMiB: Math.floor(mem.total / MiB), availableMiB: Math.floor(mem.available / MiB) },
      stateDisk: this.stateDisk(disks),
    };
  }

  private stateDisk(disks: si.Systeminformation.FsSizeData[]): HostInventory['stateDisk'] {
    let dir = this.opts.stateDir;
    try {
      dir = fs.realpathSync(dir);
    } catch {
      // not created yet: its parent's filesystem is the best answer we have
      dir = path.resolve(dir);
    }
    const within = (m: string) => dir === m || dir.startsWith(m.endsWith('/') ? m : `${m}/`);
    const best = disks.filter((d) => within(d.mount)).sort((a, b) => b.mount.length - a.mount.length)[0];
    if (!best) return null;
    return { path: dir, mount: best.mount, totalMiB: Math.floor(best.size / MiB), availableMiB: Math.floor(best.available / MiB) };
  }

  async admit(want: ResourceAmount, reserve: ResourceAmount, committed: ResourceAmount = { memoryMiB: 0, cpus: 0 }): Promise<AdmissionDecision> {
    const [mem, cpu] = await Promise.all([si.mem(), this.cpu()]);
    const totalMiB = Math.floor(mem.total / MiB);
    const availableMiB = Math.floor(mem.available / MiB);
    const vcpuCapacity = Math.max(0, cpu.cores - reserve.cpus) * this.vcpuPerHostCpu;
    const decision: AdmissionDecision = { want, reserve, committed, availableMemoryMiB: availableMiB, totalMemoryMiB: totalMiB, vcpuCapacity };

    // Guest RAM is allocated lazily by QEMU, so "available" alone would let us overcommit:
    // also require the sum of all VMs' memory to fit in total minus the reserve.
    if (want.memoryMiB > availableMiB - reserve.memoryMiB) {
      throw resourceExhausted(
        `VM needs ${want.memoryMiB} MiB of memory but the host has ${availableMiB} MiB available minus a ${reserve.memoryMiB} MiB reserve = ${availableMiB - reserve.memoryMiB} MiB (total ${totalMiB} MiB). Give the VM less memory or stop another VM.`,
      );
    }
    if (want.memoryMiB + committed.memoryMiB > totalMiB - reserve.memoryMiB) {
      throw resourceExhausted(
        `VM needs ${want.memoryMiB} MiB of memory; running VMs already hold ${committed.memoryMiB} MiB of the host's ${totalMiB} MiB total minus a ${reserve.memoryMiB} MiB reserve = ${totalMiB - reserve.memoryMiB - committed.memoryMiB} MiB left. Give the VM less memory or stop another VM.`,
      );
    }
    if (want.cpus + committed.cpus > vcpuCapacity) {
      throw resourceExhausted(
        `VM needs ${want.cpus} vCPUs; running VMs already hold ${committed.cpus} of a capacity of ${vcpuCapacity} (${cpu.cores} host CPUs minus a reserve of ${reserve.cpus}, times ${this.vcpuPerHostCpu} vCPUs per host CPU). Give the VM fewer vCPUs or stop another VM.`,
      );
    }
    return decision;
  }
}
