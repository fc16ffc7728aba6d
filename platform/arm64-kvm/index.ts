/**
 * arm64 platform: qemu-system-aarch64 -M virt with a GICv3, PL011 serial
 * console ttyAMA0, virtio-blk/net on PCIe. -cpu cortex-a57 under TCG (-cpu max is ~3x slower
 * to emulate: pointer auth etc.), host under KVM. system_powerdown arrives as a GPIO power
 * key (DT boot) so the guest kernel needs gpio-keys for a graceful stop.
 */
import type { Accelerator, PlatformProfile, VmPaths, VmSpec } from '../../agent/vm/hypervisor';
import { commonArgs, kernelArgs } from '../../agent/vm/qemu-argv';

export const arm64KvmPlatform: PlatformProfile = {
  id: 'arm64-kvm',
  arch: 'aarch64',
  qemuBinary: 'qemu-system-aarch64',
  consoleDevice: 'ttyAMA0',
  buildArgv(spec: VmSpec, paths: VmPaths, accel: Accelerator): string[] {
    return [
      // GIC: whatever the host has under KVM; v3 under TCG (v2 caps at 8 vCPUs).
      '-machine',
      `virt,gic-version=${accel === 'kvm' ? 'host' : '3'}`,
      '-accel',
      accel,
      '-cpu',
      accel === 'kvm' ? 'host' : 'cortex-a57',
      '-device',
      'pvpanic-pci',
      ...kernelArgs(spec, 'ttyAMA0'),
      ...commonArgs(spec, paths),
    ];
  },
};

export default arm64KvmPlatform;
