/**
 * x86-64 platform: qemu-system-x86_64, q35 machine (ACPI power button, so system_powerdown
 * reaches the guest's init), 16550 serial console ttyS0, virtio-blk/net on PCIe.
 * -cpu max under TCG (host is not available there), host under KVM.
 */
import type { Accelerator, PlatformProfile, VmPaths, VmSpec } from '../../agent/vm/hypervisor';
import { commonArgs, kernelArgs } from '../../agent/vm/qemu-argv';

export const x86KvmPlatform: PlatformProfile = {
  id: 'x86-kvm',
  arch: 'x86_64',
  qemuBinary: 'qemu-system-x86_64',
  consoleDevice: 'ttyS0',
  buildArgv(spec: VmSpec, paths: VmPaths, accel: Accelerator): string[] {
    return [
      '-machine',
      'q35',
      '-accel',
      accel,
      '-cpu',
      accel === 'kvm' ? 'host' : 'max',
      // pvpanic: a guest kernel panic becomes a GUEST_PANICKED QMP event instead of silence.
      '-device',
      'pvpanic',
      ...kernelArgs(spec, 'ttyS0'),
      ...commonArgs(spec, paths),
    ];
  },
};

export default x86KvmPlatform;
