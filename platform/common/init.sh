#!/bin/sh
# /init of the hitless guest initramfs. Runs as PID 1 (busybox ash) for the
# whole life of the VM and is the only supervisor in the guest:
#   1. basic mounts, console marker HITLESS-INIT
#   2. insmod the virtio/input modules in the order computed at build time
#   3. mount rootfs.ext4 (/dev/vda) read-only at /newroot
#   4. eth0 = 10.0.2.15/24 (QEMU user net; the agent is 10.0.2.100 via guestfwd)
#   5. start every process of the manifest chroot'ed into /newroot, output
#      prefixed "[name] " on the console, then print HITLESS-READY
#   6. wait; on the power button (QMP system_powerdown): SIGTERM all, wait
#      up to 5 s, SIGKILL the rest, HITLESS-POWERDOWN, sync, poweroff -f.
# A process that exits is reported as "HITLESS-EXIT name=N status=S" and
# started again a second later (see hitless_start), except during powerdown.
# hitless.faults=1 (fault-injection images only) also reads console lines
# "HITLESS-FAULT kill NAME" and SIGKILLs that process (see the fault port).
#
# Console lines starting with HITLESS- are a protocol read by the agent:
#   HITLESS-INIT version=V arch=A kernel=R   init started (before modules)
#   HITLESS-NODE vX.Y.Z                      node runs inside the rootfs
#   HITLESS-START name=N pid=P restarts=R    process started (R: restarts so far)
#   HITLESS-READY                            all processes started
#   HITLESS-EXIT name=N status=S             a process exited
#   HITLESS-STOPPING                         power button seen, SIGTERM sent
#   HITLESS-POWERDOWN                        processes gone, powering off now
#   HITLESS-FAULT killed name=N pid=P        fault port: process SIGKILLed
#   HITLESS-WARN ... / HITLESS-FATAL ...     problems (FATAL powers off)

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev /run /tmp
# Applet symlinks are created here rather than at build time so the build
# host never has to run a foreign-arch busybox.
/bin/busybox --install -s

mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node (no mknod at build time), so the
# kernel started us without stdio: attach it now.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755,size=16m tmpfs /run

. /etc/hitless/bundle.env
KREL="$(uname -r)"
# Leading newline: firmware (SeaBIOS) leaves escape sequences without a line
# end on the serial console; this keeps our marker at the start of a line.
echo
echo "HITLESS-INIT version=$HITLESS_VERSION arch=$HITLESS_ARCH kernel=$KREL"

fatal() {
  echo "HITLESS-FATAL $*"
  sync
  poweroff -f
  sleep 10
}

# ---- kernel command line: hitless.vm=NAME hitless.agent=IP:PORT hitless.bulk=IP:PORT
# hitless.role=active|standby. Role and bulk reach every process as env HITLESS_ROLE and
# HITLESS_BULK; without hitless.role= HITLESS_ROLE stays unset (the command's own default).
HITLESS_VM=""
HITLESS_AGENT=""
HITLESS_BULK=""
HITLESS_ROLE=""
HITLESS_IP="10.0.2.15/24"
HITLESS_ROOT="/dev/vda"
HITLESS_NODECHECK=1
HITLESS_FAULTS=0
HITLESS_CPNET=""
HITLESS_CPGW=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    hitless.vm=*) HITLESS_VM="${arg#hitless.vm=}" ;;
    hitless.agent=*) HITLESS_AGENT="${arg#hitless.agent=}" ;;
    hitless.bulk=*) HITLESS_BULK="${arg#hitless.bulk=}" ;;
    hitless.role=*) HITLESS_ROLE="${arg#hitless.role=}" ;;
    hitless.ip=*) HITLESS_IP="${arg#hitless.ip=}" ;;
    hitless.root=*) HITLESS_ROOT="${arg#hitless.root=}" ;;
    hitless.nodecheck=*) HITLESS_NODECHECK="${arg#hitless.nodecheck=}" ;;
    hitless.faults=*) HITLESS_FAULTS="${arg#hitless.faults=}" ;;
    hitless.cpnet=*) HITLESS_CPNET="${arg#hitless.cpnet=}" ;;
    hitless.cpgw=*) HITLESS_CPGW="${arg#hitless.cpgw=}" ;;
  esac
done
case "$HITLESS_ROLE" in
  ""|active|standby) ;;
  *) echo "HITLESS-WARN ignoring hitless.role=$HITLESS_ROLE (want active or standby)"; HITLESS_ROLE="" ;;
esac

# ---- modules. There is no modules.dep, and busybox insmod does not resolve
# dependencies: modules.list is already in dependency order (build time).
while read -r m; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$KREL/$m.ko" 2>/dev/null || echo "HITLESS-WARN insmod $m failed"
done < /etc/hitless/modules.list

# ---- rootfs. virtio-blk probes asynchronously after insmod: poll briefly.
i=0
while [ ! -b "$HITLESS_ROOT" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
[ -b "$HITLESS_ROOT" ] || fatal "root device $HITLESS_ROOT not found"
mount -t ext4 -o ro "$HITLESS_ROOT" /newroot || fatal "cannot mount $HITLESS_ROOT"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mount -t tmpfs -o mode=1777,size=32m tmpfs /newroot/tmp
mount -t tmpfs -o mode=0755,size=16m tmpfs /newroot/run

# ---- network (QEMU user networking: gateway 10.0.2.2, we are 10.0.2.15)
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.05; i=$((i + 1)); done
if [ -e /sys/class/net/eth0 ]; then
  ip addr add "$HITLESS_IP" dev eth0
  ip link set eth0 up
  ip route add default via 10.0.2.2 2>/dev/null
else
  echo "HITLESS-WARN no eth0"
fi
# The control-plane NIC (hitlessd --cp-bridge): eth1, on the data plane's bridge. Every version
# of the control plane gets the same MAC and addresses (hitless.cpnet=A/LEN[,A/LEN]); only the
# active version's link is up (the agent sets it with QMP set_link), so the neighbours see one
# router whichever VM is active. hitless.cpgw= makes it the default route.
if [ -n "$HITLESS_CPNET" ]; then
  i=0
  while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 50 ]; do sleep 0.05; i=$((i + 1)); done
  if [ -e /sys/class/net/eth1 ]; then
    for a in $(echo "$HITLESS_CPNET" | tr ',' ' '); do ip addr add "$a" dev eth1; done
    ip link set eth1 up
    if [ -n "$HITLESS_CPGW" ]; then ip route replace default via "$HITLESS_CPGW" dev eth1; fi
    echo "HITLESS-NET eth1 $HITLESS_CPNET"
  else
    echo "HITLESS-WARN hitless.cpnet given but no eth1"
  fi
fi

# ---- power button. busybox acpid reads /dev/input/event* (the ACPI power
# button on x86 via button.ko, gpio-keys on arm64 virt) and runs
# /etc/acpi/PWRF/00000080, which sends us SIGUSR1. acpid scans the event
# devices only at start-up, so it must start after the modules are loaded.
POWERING_DOWN=""
powerdown() {
  [ -z "$POWERING_DOWN" ] || return 0
  POWERING_DOWN=1
  : > /run/hitless/stopping # no process is restarted from here on
  echo "HITLESS-STOPPING"
  pids=""
  for f in /run/hitless/*.pid; do
    [ -f "$f" ] || continue
    p="$(cat "$f")"
    kill -TERM "$p" 2>/dev/null && pids="$pids $p"
  done
  i=0
  while [ $i -lt 50 ]; do
    alive=""
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
    [ -n "$alive" ] || break
    sleep 0.1
    i=$((i + 1))
  done
  for p in $alive; do kill -KILL "$p" 2>/dev/null && echo "HITLESS-WARN SIGKILL pid=$p"; done
  echo "HITLESS-POWERDOWN"
  sync
  poweroff -f
}
trap powerdown USR1 TERM

pl061_power_line() { # echo the sysfs gpio number of PL061 line 3, if any
  for c in /sys/class/gpio/gpiochip*; do
    [ -f "$c/label" ] || continue
    case "$(cat "$c/label")" in *pl061*) echo $(($(cat "$c/base") + 3)); return ;; esac
  done
}
if ls /dev/input/event* >/dev/null 2>&1; then
  acpid -f -c /etc/acpi -l /run/acpid.log &
elif n="$(pl061_power_line)" && [ -n "$n" ] && echo "$n" > /sys/class/gpio/export 2>/dev/null; then
  # Fallback for arm64 kernels without gpio-keys (e.g. the -cloud- flavour):
  # QEMU's virt machine raises PL061 line 3 for ~100 ms on system_powerdown.
  # sysfs gpio cannot be poll()ed from a shell, so sample it every 20 ms.
  echo "HITLESS-WARN no power-button input device; polling PL061 gpio $n"
  (
    while :; do
      read -r v < "/sys/class/gpio/gpio$n/value"
      [ "$v" = 1 ] && { kill -USR1 1; break; }
      sleep 0.02
    done
  ) &
else
  echo "HITLESS-WARN no power button: graceful powerdown unavailable (kernel lacks button/gpio-keys?)"
fi

# ---- node check (runs the real runtime once; hitless.nodecheck=0 skips it)
if [ "$HITLESS_NODECHECK" != 0 ]; then
  if nv="$(chroot /newroot /opt/hitless/node -e 'process.stdout.write(process.version)' 2>&1)"; then
    echo "HITLESS-NODE $nv"
  else
    echo "HITLESS-WARN node does not run: $nv"
  fi
fi

# ---- processes
mkdir -p /run/hitless
# hitless_start NAME ARGV...  (called from the generated processes.sh)
# A process that dies is started again after a second, as a router's process manager does, with
# HITLESS_RESTARTS=n in its environment (a restarted process takes ACTIVE if nobody holds it,
# else follows the instance that does). Powerdown creates /run/hitless/stopping first, so the
# processes it stops stay stopped.
hitless_start() {
  name="$1"; shift
  # HITLESS_ROLE only when the cmdline set it: an empty value would not mean "default".
  # chroot (busybox) does chdir("/"): daemons start with cwd=/ in the rootfs.
  set -- PATH=/opt/hitless:/usr/bin:/bin HOME=/tmp TMPDIR=/tmp \
    HITLESS_VM="$HITLESS_VM" HITLESS_AGENT="$HITLESS_AGENT" HITLESS_BULK="$HITLESS_BULK" \
    HITLESS_PROCESS="$name" HITLESS_VERSION="$HITLESS_VERSION" \
    ${HITLESS_ROLE:+HITLESS_ROLE="$HITLESS_ROLE"} \
    chroot /newroot "$@"
  # Subshell = per-process supervisor, so PID 1 itself never blocks on one child.
  (
    restarts=0
    while [ ! -f /run/hitless/stopping ]; do
      fifo="/run/hitless/$name.out"
      rm -f "$fifo"; mkfifo "$fifo"
      # One prefixer per run; it ends when the process closes its output.
      # awk+fflush because busybox sed block-buffers even on a tty.
      awk -v p="[$name] " '{ print p $0; fflush() }' < "$fifo" &
      env -i HITLESS_RESTARTS="$restarts" "$@" > "$fifo" 2>&1 < /dev/null &
      pid=$!
      echo "HITLESS-START name=$name pid=$pid restarts=$restarts"
      echo "$pid" > "/run/hitless/$name.pid"
      wait "$pid"
      echo "HITLESS-EXIT name=$name status=$?"
      rm -f "/run/hitless/$name.pid"
      restarts=$((restarts + 1))
      sleep 1
    done
  ) &
  # Wait until the pid file exists so a power-down right after READY sees it.
  while [ ! -f "/run/hitless/$name.pid" ]; do sleep 0.01; done
}
# ---- fault port (hitless.faults=1 only: images made for the fault campaign). One command,
# read from the console: "HITLESS-FAULT kill NAME" SIGKILLs process NAME, as a crash would.
# Anything else typed there is ignored; production images never start this reader.
if [ "$HITLESS_FAULTS" = 1 ]; then
  echo "HITLESS-WARN fault port open on the console (hitless.faults=1)"
  (
    while read -r word cmd arg; do
      [ "$word" = HITLESS-FAULT ] && [ "$cmd" = kill ] || continue
      case "$arg" in ""|*[!A-Za-z0-9_-]*) echo "HITLESS-WARN fault port: bad process name"; continue ;; esac
      if p="$(cat "/run/hitless/$arg.pid" 2>/dev/null)" && kill -KILL "$p" 2>/dev/null; then
        echo "HITLESS-FAULT killed name=$arg pid=$p"
      else
        echo "HITLESS-WARN fault port: no process $arg"
      fi
    done < /dev/console
  ) &
fi

[ -f /newroot/etc/hitless/processes.sh ] || fatal "rootfs has no /etc/hitless/processes.sh"
. /newroot/etc/hitless/processes.sh
echo "HITLESS-READY"

# ---- idle. `wait` returns early when a trapped signal arrives, which runs
# the trap; it also reaps orphans re-parented to PID 1.
while :; do
  sleep 3600 &
  wait $!
done
