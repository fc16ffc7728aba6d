#!/usr/bin/env bash
# Build a hitless guest bundle for x86-64 (QEMU q35/pc, KVM or TCG).
# See platform/README.md; all logic is in platform/common/lib.sh.
ARCH=x86_64
DEB_ARCH=amd64
TRIPLET=x86_64-linux-gnu
DEFAULT_KERNEL=linux-image-6.1.0-47-cloud-amd64
CONSOLE=ttyS0
# virtio_pci pulls in virtio, virtio_ring, virtio_pci_{modern,legacy}_dev;
# virtio_net pulls in net_failover/failover. button+evdev turn the ACPI power
# button (QMP system_powerdown) into /dev/input/event* for busybox acpid.
# ext4 (+ its crc32c soft dependency) is built into the cloud kernels; listed
# so that a non-cloud --kernel works too (names not present are skipped).
WANTED_MODULES="virtio_pci virtio_blk virtio_console virtio_net virtio-rng crc32c_generic ext4 evdev button"
# nodesource node on the host = same Node as the agent; Debian's is 18.x.
NODE_SOURCE=host
HITLESS_SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
. "$(dirname "$HITLESS_SCRIPT")/../common/lib.sh"
hitless_build "$@"
