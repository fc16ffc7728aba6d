/**
 * The persistence port for VM records: what the agent must remember to find its VMs again
 * after a restart (spec, QEMU pid, runtime paths, last known state). Synchronous on purpose:
 * VmService checks invariants and writes the STARTING record in one tick, so two concurrent
 * start() calls cannot both pass the uniqueness checks.
 */
import type { Accelerator, Arch, VmPaths, VmSpec, VmState } from './hypervisor';

export interface VmRecord {
  name: string;
  arch: Arch;
  spec: VmSpec;
  /** QEMU pid while a process exists; null before launch and after exit. */
  pid: number | null;
  paths: VmPaths;
  state: VmState;
  accelerator: Accelerator | null;
  /** ms since epoch */
  createdAt: number;
  updatedAt: number;
  /** Why the VM last left the running states (e.g. 'guest powerdown', 'crashed'). */
  lastExit: string | null;
}

export interface VmRecordStore {
  /** Insert or replace by name. */
  put(record: VmRecord): void;
  get(name: string): VmRecord | undefined;
  /** Sorted by name. */
  list(): VmRecord[];
  /** True when a record was deleted. */
  delete(name: string): boolean;
}

/** For tests and tools that do not need durability. */
export class InMemoryVmRecordStore implements VmRecordStore {
  private readonly records = new Map<string, VmRecord>();
  put(record: VmRecord): void {
    this.records.set(record.name, structuredClone(record));
  }
  get(name: string): VmRecord | undefined {
    const r = this.records.get(name);
    return r ? structuredClone(r) : undefined;
  }
  list(): VmRecord[] {
    return [...this.records.values()].sort((a, b) => a.name.localeCompare(b.name)).map((r) => structuredClone(r));
  }
  delete(name: string): boolean {
    return this.records.delete(name);
  }
}
