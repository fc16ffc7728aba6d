/**
 * Clients of one process 'bgp' (one SYNC table 'rib') and a relay to the agent's bulk socket
 * that can break connections, for the tests of broken connections to the agent.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { CheckpointClient, CheckpointClientOptions } from '../../agent/sdk/checkpoint-client';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { TcpRelay, tcpRelay } from '../../harness/tcp-relay';

/** `channels: 'grpc'` so the bulk socket carries only snapshots. */
export function bgpClient(
  agent: AgentHandle,
  instance: 'vm1' | 'vm2' | 'vm3',
  role: 'ACTIVE' | 'STANDBY',
  extra: Partial<CheckpointClientOptions> = {},
): CheckpointClient {
  return new CheckpointClient({
    address: agent.socket,
    process: 'bgp',
    instanceId: `bgp@${instance}`,
    vmId: instance,
    role,
    softwareVersion: '1.0.0',
    schema: 1,
    tables: [{ name: 'rib', durability: 'SYNC' }],
    channels: 'grpc',
    ...extra,
  });
}

/** Batches `from`..`to` of 10 records each; each must be acknowledged with its number. */
export async function writeBatches(c: CheckpointClient, from: number, to: number): Promise<void> {
  for (let i = from; i <= to; i++) {
    const b = c.batch('rib');
    for (let j = 0; j < 10; j++) b.put(`10.${i}.${j}.0/24`, Buffer.from(`nh-${i}-${j}`));
    assert.equal(await b.commit(), i);
  }
}

/**
 * An agent, and a relay to its bulk socket (the caller closes it): `drop` its first connections,
 * as a guest's relay does when it restarts; `pieces`, `delayMs`: see tcpRelay.
 */
export async function agentAndBulkRelay(opts: { drop?: number; pieces?: number[]; delayMs?: number } = {}): Promise<[AgentHandle, TcpRelay]> {
  const agent = await startAgent();
  const relay = await tcpRelay(() => net.connect(`${agent.socket}.bulk`), opts);
  return [agent, relay];
}

/** Batches `from`..`to` of 1,000 records of 100 bytes each (~120 KB a batch): a table big enough to take several snapshot frames. */
export async function writeBigBatches(c: CheckpointClient, from: number, to: number): Promise<void> {
  const value = Buffer.alloc(100, 7);
  for (let i = from; i <= to; i++) {
    const b = c.batch('rib');
    for (let j = 0; j < 1000; j++) b.put(`10.${i}.${j >> 8}.${j & 255}/32`, value);
    assert.equal(await b.commit(), i);
  }
}

/**
 * Lists for the clients and relays a test opens: after each test (in the calling describe) they
 * are closed, and every agent is stopped.
 */
export function closedAfterEach(): { open: CheckpointClient[]; relays: TcpRelay[] } {
  const held = { open: [] as CheckpointClient[], relays: [] as TcpRelay[] };
  afterEach(async () => {
    for (const c of held.open.splice(0)) await c.close();
    for (const r of held.relays.splice(0)) r.close();
    await stopAllAgents();
  });
  return held;
}
