#!/bin/sh
# Installed as /etc/acpi/PWRF/00000080 in the initramfs. busybox acpid maps
# the input event EV_KEY/KEY_POWER to the action "PWRF/00000080" and execs
# this path relative to its config dir (/etc/acpi). The actual shutdown logic
# lives in /init (PID 1), which traps SIGUSR1.
kill -USR1 1
