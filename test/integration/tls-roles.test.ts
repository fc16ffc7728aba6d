/**
 * The TLS listener: mutual TLS with a CA the test generates, and roles from --tls-roles.
 * operator may call everything, viewer only read-only RPCs; a client without a certificate or
 * with one from another CA does not get past the handshake.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { AgentHandle, startAgent, stopAllAgents, tempDir } from '../../harness/agent-process';
import { AnyClient, expectStatus, rawClient, tlsClient, unaryCall } from '../../harness/grpc-client';
import { TestCa, tlsAgentArgs } from '../helpers/tls-ca';

describe('TLS listener: mutual TLS and roles', function () {
  this.timeout(60_000);
  const dir = tempDir('tls');
  let agent: AgentHandle;
  let ca: TestCa;
  let addr = '';
  const clients: AnyClient[] = [];
  const client = (service: string, who: { cert: string; key: string } | null, caCert = ca.ca.cert) => {
    const c = tlsClient(service, addr, caCert, who);
    clients.push(c);
    return c;
  };

  before(async () => {
    ca = new TestCa(dir, 'main');
    const server = ca.issue('hitlessd.test', { server: true });
    agent = await startAgent({
      args: tlsAgentArgs(ca, server, { 'ops-alice': 'operator', 'noc.example': 'viewer' }, dir),
    });
    addr = agent.ready.grpcTls as string;
    assert.match(addr, /^127\.0\.0\.1:\d+$/);
  });

  after(async () => {
    for (const c of clients) c.close();
    await stopAllAgents();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('operator: status and mutating RPCs reach the services (domain errors, not PERMISSION_DENIED)', async () => {
    const op = ca.issue('ops-alice');
    const up = client('hitless.v1.Upgrade', op);
    const st = await unaryCall<{ history: unknown[] }>(up, 'Status', {});
    assert.ok(Array.isArray(st.history));
    await expectStatus(unaryCall(up, 'RunVersion', {}), grpc.status.FAILED_PRECONDITION, /no version is loaded/);
    const ck = client('hitless.v1.Checkpoint', op);
    const err = await unaryCall(ck, 'Switchover', { process: 'bgp', toInstance: 'bgp@nowhere' }).then(
      () => null,
      (e: grpc.ServiceError) => e,
    );
    assert.ok(err, 'a switchover of an unknown process fails');
    assert.notEqual(err.code, grpc.status.PERMISSION_DENIED, err.details);
    assert.notEqual(err.code, grpc.status.UNAVAILABLE, err.details);
  });

  it('viewer (matched by SAN): read-only RPCs work, everything else is PERMISSION_DENIED naming role and RPC', async () => {
    const viewer = ca.issue('noc-bob', { san: ['DNS:noc.example'] });
    const up = client('hitless.v1.Upgrade', viewer);
    await unaryCall(up, 'Status', {});
    await unaryCall(client('hitless.v1.Checkpoint', viewer), 'Status', { process: '' });
    await unaryCall(client('hitless.v1.Vm', viewer), 'List', {});
    await unaryCall(client('gnoi.os.OS', viewer), 'Verify', {});
    await unaryCall(client('gnoi.system.System', viewer), 'RebootStatus', {});
    await expectStatus(
      unaryCall(up, 'AbortVersion', { reason: 'x' }),
      grpc.status.PERMISSION_DENIED,
      /role 'viewer' .*may not call \/hitless\.v1\.Upgrade\/AbortVersion/,
    );
    await expectStatus(
      unaryCall(client('gnoi.os.OS', viewer), 'Activate', { version: '2.0.0' }),
      grpc.status.PERMISSION_DENIED,
      /viewer.*gnoi\.os\.OS\/Activate/,
    );
    // A streaming RPC is refused the same way.
    const ck = client('hitless.v1.Checkpoint', viewer);
    const session = (ck.Session as () => grpc.ClientDuplexStream<unknown, unknown>).call(ck);
    const e = await new Promise<grpc.ServiceError>((resolve) => {
      session.on('error', resolve);
      session.on('data', () => undefined);
    });
    assert.equal(e.code, grpc.status.PERMISSION_DENIED);
    assert.match(e.details, /viewer.*Checkpoint\/Session/);
  });

  it('a certificate of the right CA without a role is denied every RPC', async () => {
    const stranger = ca.issue('mallory');
    await expectStatus(unaryCall(client('hitless.v1.Upgrade', stranger), 'Status', {}), grpc.status.PERMISSION_DENIED, /mallory has no role/);
  });

  it('no client certificate, or one from another CA: the handshake fails (UNAVAILABLE), no response', async () => {
    const deadline = () => ({ deadline: Date.now() + 5000 });
    const call = (c: AnyClient) =>
      new Promise<unknown>((resolve, reject) =>
        (c.Status as (r: unknown, md: grpc.Metadata, o: unknown, cb: (e: grpc.ServiceError | null, v: unknown) => void) => void).call(
          c,
          {},
          new grpc.Metadata(),
          deadline(),
          (e, v) => (e ? reject(e) : resolve(v)),
        ),
      );
    await expectStatus(call(client('hitless.v1.Upgrade', null)), grpc.status.UNAVAILABLE);
    const other = new TestCa(dir, 'other');
    const forged = other.issue('ops-alice');
    await expectStatus(call(client('hitless.v1.Upgrade', forged)), grpc.status.UNAVAILABLE);
    // ... and the agent logged no RPC for them (nothing reached a handler).
    assert.ok(!/RPC denied.*"who":"ops-alice".*other/.test(agent.stderr()));
  });

  it('the unix socket stays local-operator and unchanged', async () => {
    const up = rawClient('hitless.v1.Upgrade', agent.socket);
    clients.push(up);
    await unaryCall(up, 'AbortVersion', {}); // nothing in progress: succeeds, no role check
    assert.equal(fs.statSync(agent.socket).mode & 0o777, 0o660);
  });
});
