/**
 * TypeScript shapes of the hitless.v1.Vm and hitless.v1.Platform messages (proto/hitless/v1/
 * vm.proto) as @grpc/proto-loader hands them over with the options in agent/grpc/proto.ts:
 * camelCase fields, enums as strings, uint64 as number, defaults filled, bytes as Buffer.
 */
export type VmStateName = 'VM_STATE_UNSPECIFIED' | 'STARTING' | 'RUNNING' | 'PAUSED' | 'STOPPING' | 'STOPPED' | 'CRASHED';

export interface VmInfoMessage {
  name: string;
  arch: string;
  state: VmStateName;
  pid: number;
  accelerator: string;
  imageVersion: string;
  imageDir: string;
  memoryMib: number;
  cpus: number;
  consoleSocket: string;
  consoleLog: string;
  agentSocket: string;
  bulkSocket: string;
  lastExit: string;
  createdAtMs: number;
  updatedAtMs: number;
}

export type ListVmsRequest = Record<string, never>;
export interface ListVmsResponse {
  vms: VmInfoMessage[];
}

export interface VmRef {
  name: string;
}

export interface StartVmRequest {
  name: string;
  imageDir: string;
  memoryMib: number;
  cpus: number;
  cmdlineExtra: string;
}

export interface StopVmRequest {
  name: string;
  timeoutS: number;
}
export interface StopVmResponse {
  method: string;
  elapsedMs: number;
  vm: VmInfoMessage;
}

export interface ConsoleLogRequest {
  name: string;
  bytes: number;
}
export interface ConsoleLogResponse {
  data: Buffer;
}

export interface ConsoleInput {
  name: string;
  data: Buffer;
}
export interface ConsoleOutput {
  data: Buffer;
}

export interface VmEventsRequest {
  name: string;
}
export interface VmEventMessage {
  vm: string;
  type: string;
  atMs: number;
  state: VmStateName;
  dataJson: string;
}

export type PlatformRequest = Record<string, never>;

export interface StateDiskMessage {
  path: string;
  mount: string;
  totalMib: number;
  availableMib: number;
}

export interface ArchAcceleratorMessage {
  arch: string;
  platformId: string;
  accelerator: string;
}

export interface PlatformInfo {
  cpuModel: string;
  cpus: number;
  physicalCores: number;
  virtualizationFlags: string[];
  kvm: boolean;
  kvmDevicePresent: boolean;
  kvmReason: string;
  memoryTotalMib: number;
  memoryAvailableMib: number;
  /** Absent (null) when the state dir's filesystem is unknown. */
  stateDisk: StateDiskMessage | null;
  accelerators: ArchAcceleratorMessage[];
  hostArch: string;
}
