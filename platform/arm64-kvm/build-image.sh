#!/usr/bin/env bash
# Build a hitless guest bundle for arm64 (QEMU virt, KVM or TCG).
# See platform/README.md; all logic is in platform/common/lib.sh.
# Needs the arm64 foreign architecture in apt:
#   dpkg --add-architecture arm64 && apt-get update
ARCH=aarch64
DEB_ARCH=arm64
TRIPLET=aarch64-linux-gnu
# Not the -cloud- flavour: on the virt machine (booted with -kernel, i.e.
# device tree, no ACPI) system_powerdown pulses PL061 GPIO 3, which only the
# gpio-keys driver turns into KEY_POWER. The cloud arm64 kernel has
# CONFIG_KEYBOARD_GPIO unset, so it can boot but never sees the power button.
DEFAULT_KERNEL=linux-image-6.1.0-47-arm64
CONSOLE=ttyAMA0
# The generic flavour builds ext4 as a module (cloud: built in); ext4 only
# soft-depends on crc32c, so it is listed explicitly before it.
WANTED_MODULES="virtio_mmio virtio_pci virtio_blk virtio_console virtio_net virtio-rng crc32c_generic ext4 evdev gpio_keys"
NODE_SOURCE=debian
HITLESS_SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
. "$(dirname "$HITLESS_SCRIPT")/../common/lib.sh"
hitless_build "$@"
