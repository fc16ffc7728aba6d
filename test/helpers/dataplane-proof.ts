/**
 * What the VM tests check of the data plane during upgrades: which control-plane VM's NIC passes
 * traffic, and what each switchover changed in the data plane.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpTapName } from '../../agent/vm/vm-supervisor';
import type { DataPlaneChangesMsg } from '../../agent/report/upgrade-report';
import type { NetLab } from '../../harness/netlab';
import { until } from '../../harness/wait';

function tapRxPackets(lab: NetLab, vm: string): number | null {
  try {
    const j = JSON.parse(
      execFileSync('ip', ['-n', lab.dataplane, '-j', '-s', 'link', 'show', cpTapName(vm)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }),
    ) as {
      stats64: { rx: { packets: number } };
    }[];
    return j[0].stats64.rx.packets;
  } catch {
    return null; // no such tap (the VM is gone)
  }
}

/**
 * The VMs among `vms` whose control-plane NIC answers: the data plane forgets the guest's MAC,
 * sends one UDP datagram to the guest address (so it asks for it by ARP on the bridge), and
 * counts the frames each VM's tap then received from its guest. Only a guest whose link is up
 * can answer; every version has the same address and MAC, so exactly one should.
 */
export async function cpNicsAnswering(lab: NetLab, vms: string[]): Promise<string[]> {
  execFileSync('ip', ['-n', lab.dataplane, 'neigh', 'flush', 'to', lab.cp.guest]);
  const before = new Map(vms.map((v) => [v, tapRxPackets(lab, v)]));
  execFileSync('ip', ['netns', 'exec', lab.dataplane, 'bash', '-c', `echo probe > /dev/udp/${lab.cp.guest}/9`]);
  await until(
    `an answer from ${lab.cp.guest}`,
    async () => /lladdr/.test(execFileSync('ip', ['-n', lab.dataplane, 'neigh', 'show', 'to', lab.cp.guest], { encoding: 'utf8' })),
    10_000,
    50,
  ).catch(() => undefined); // none answering is a result too
  await new Promise((r) => setTimeout(r, 200));
  return vms.filter((v) => {
    const b = before.get(v);
    const a = tapRxPackets(lab, v);
    return b !== null && b !== undefined && a !== null && a > b;
  });
}

export type { DataPlaneChangesMsg };

/** Every reconciliation an upgrade recorded changed nothing, over `routes` routes. */
export function assertNoDataPlaneChanges(changes: DataPlaneChangesMsg[] | undefined, causes: RegExp[], routes: number): void {
  assert.ok(changes, 'the upgrade recorded its data-plane changes');
  assert.equal(changes.length, causes.length, JSON.stringify(changes));
  changes.forEach((c, i) => {
    assert.match(c.cause, causes[i]);
    assert.deepEqual([c.routes, c.added, c.replaced, c.deleted, c.failed, c.error], [routes, 0, 0, 0, 0, ''], JSON.stringify(c));
  });
}
