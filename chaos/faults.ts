/**
 * The faults the campaign injects, and the upgrade phases it injects them in.
 *
 * A phase names the operator command that is running (or, for `switched`, the state that lasts)
 * when the fault strikes; `windowMs` is the span after the command starts in which the moment is
 * drawn, chosen from what each phase takes under TCG on this machine (a draw past the end of a
 * short phase lands just after it, which is a moment worth testing too; the round records
 * whether the command had already returned).
 */
import type { ChaosWorld } from './world';

export const PHASES = ['loadversion', 'runversion', 'switched', 'acceptversion', 'commitversion', 'abortversion'] as const;
export type ChaosPhase = (typeof PHASES)[number];

/** Milliseconds after the phase's command starts within which the fault moment is drawn. */
export const PHASE_WINDOW_MS: Record<ChaosPhase, number> = {
  loadversion: 12_000, // verify ~1 s, boot ~4 s, bulk sync of 20,000 routes ~3 s
  runversion: 250, // warm-up round trips, next batch (<= 100 ms), freeze, promote, demote
  switched: 3_000, // nothing runs: the new version writes, the old follows
  acceptversion: 20,
  commitversion: 400, // graceful stop of the old VM
  abortversion: 1_500, // switchover back, then stopping the new VM
};

export interface Fault {
  name: string;
  what: string;
  inject(w: ChaosWorld): Promise<void>;
  /** The round puts the agent's state directory on a tmpfs of this many MiB. */
  stateTmpfsMiB?: number;
}

/** How long the disk-full fault keeps the state disk full, ms. */
const DISK_FULL_MS = 3_000;

export const FAULTS: Fault[] = [
  {
    name: 'agent-kill',
    what: 'SIGKILL of hitlessd, restarted at once on the same state directory',
    inject: (w) => w.restartAgent(),
  },
  {
    name: 'old-vm-kill',
    what: "SIGKILL of the old version's QEMU",
    inject: (w) => w.killVm('from'),
  },
  {
    name: 'new-vm-kill',
    what: "SIGKILL of the new version's QEMU",
    inject: (w) => w.killVm('to'),
  },
  {
    name: 'process-kill',
    what: "SIGKILL of the active bgp process inside its guest (the guest's init restarts it)",
    inject: (w) => w.killActiveProcess('bgp'),
  },
  {
    name: 'disk-full',
    what: `the agent's state disk (a 256 MiB tmpfs) full for ${DISK_FULL_MS / 1000} s, then space back`,
    inject: (w) => w.fillStateDisk(DISK_FULL_MS),
    stateTmpfsMiB: 256,
  },
];

export function cellName(fault: string, phase: ChaosPhase): string {
  return `${fault}@${phase}`;
}
