/**
 * gnoi.system.System (SwitchControlProcessor, Reboot, RebootStatus) and gnoi.os.OS Activate/Verify
 * without any VM: what a gNOI client gets when nothing is activated or running. These are the
 * answers an operator sees first (a fresh box, a wrong order of calls), so each must name the
 * right gRPC status and say what to do. The paths with a running control plane are in
 * test/vm/gnoi-python.test.ts.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { AgentHandle, startAgent, stopAllAgents, tempDir } from '../../harness/agent-process';
import { AnyClient, expectStatus, rawClient, unaryCall } from '../../harness/grpc-client';
import { fakeBundle, installPackage, tarBundle } from '../helpers/gnoi';
import { generateKeyPair } from '../../agent/images/signing';

type RebootStatusResp = {
  active: boolean;
  wait: number;
  when: number;
  reason: string;
  count: number;
  method: string;
  status: { status: string; message: string };
};
type VerifyResp = { version: string; activationFailMessage: string; imageName: string; verifyStandby: { state: string; standbyState?: { state: string } } };
type ActivateResp = { response: string; activateError?: { type: string; detail: string } };

const cp = (name: string) => ({
  origin: '',
  elem: [
    { name: 'components', key: {} },
    { name: 'component', key: { name } },
  ],
});

describe('gNOI System and OS.Activate with nothing activated (no VMs)', function () {
  this.timeout(60_000);
  const work = tempDir('gnoi-sys');
  const trust = path.join(work, 'trust');
  const key = generateKeyPair();
  let agent: AgentHandle;
  let sys: AnyClient;
  let os: AnyClient;
  let up: AnyClient;
  const rebootStatus = () => unaryCall<RebootStatusResp>(sys, 'RebootStatus', {});
  const idleRebootStatus = async () => {
    const s = await rebootStatus();
    assert.equal(s.active, false);
    assert.equal(s.count, 0);
    assert.equal(s.method, 'UNKNOWN');
    assert.equal(s.status.status, 'STATUS_UNKNOWN');
    assert.equal(s.when, 0);
  };

  before(async () => {
    fs.mkdirSync(trust);
    fs.writeFileSync(path.join(trust, 'vendor.pub'), key.publicKeyPem);
    agent = await startAgent({ args: ['--trust-dir', trust] });
    sys = rawClient('gnoi.system.System', agent.socket);
    os = rawClient('gnoi.os.OS', agent.socket);
    up = rawClient('hitless.v1.Upgrade', agent.socket);
  });
  after(async () => {
    for (const c of [sys, os, up]) c?.close();
    await stopAllAgents();
    if (agent) fs.rmSync(agent.stateDir, { recursive: true, force: true });
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('Verify reports no running version and no standby; RebootStatus reports no reboot ever', async () => {
    const v = await unaryCall<VerifyResp>(os, 'Verify', {});
    assert.equal(v.version, '');
    assert.equal(v.imageName, '');
    assert.equal(v.activationFailMessage, '');
    assert.equal(v.verifyStandby.state, 'standbyState');
    assert.equal(v.verifyStandby.standbyState?.state, 'NON_EXISTENT');
    await idleRebootStatus();
  });

  it('SwitchControlProcessor: FAILED_PRECONDITION telling to Activate(no_reboot=true) first, with or without a target', async () => {
    for (const req of [{}, { controlProcessor: cp('cp-2') }]) {
      await expectStatus(
        unaryCall(sys, 'SwitchControlProcessor', req),
        grpc.status.FAILED_PRECONDITION,
        /no standby control processor: activate a version with OS\.Activate\(no_reboot=true\) first/,
      );
    }
  });

  it('Reboot COLD, WARM or NSF: FAILED_PRECONDITION telling to Activate(no_reboot=true) first; the control plane is never cold-restarted', async () => {
    for (const method of ['COLD', 'WARM', 'NSF']) {
      await expectStatus(
        unaryCall(sys, 'Reboot', { method, message: 'test' }),
        grpc.status.FAILED_PRECONDITION,
        /no version is activated: use OS\.Activate\(no_reboot=true\) first/,
      );
    }
    await idleRebootStatus(); // a refused reboot is not counted
  });

  it('Reboot with an unsupported method, a delay or subcomponents: INVALID_ARGUMENT saying what is supported', async () => {
    // gNOI: "A target should return INVALID_ARGUMENT if UNKNOWN or any other unsupported method
    // is called"; these are checked before anything else, so the answer does not depend on state.
    for (const method of ['UNKNOWN', 'POWERDOWN', 'HALT', 'POWERUP']) {
      await expectStatus(
        unaryCall(sys, 'Reboot', { method }),
        grpc.status.INVALID_ARGUMENT,
        new RegExp(`reboot method ${method} is not supported; use COLD, WARM or NSF`),
      );
    }
    await expectStatus(
      unaryCall(sys, 'Reboot', { method: 'WARM', delay: 5_000_000_000 }),
      grpc.status.INVALID_ARGUMENT,
      /delayed reboots are not supported; send delay 0/,
    );
    await expectStatus(
      unaryCall(sys, 'Reboot', { method: 'NSF', subcomponents: [cp('cp-1')] }),
      grpc.status.INVALID_ARGUMENT,
      /rebooting subcomponents is not supported/,
    );
    await idleRebootStatus();
  });

  it('published System RPCs the agent does not serve answer UNIMPLEMENTED', async () => {
    // Time is in the published gnoi.system.System but not in our system.proto (see there); a
    // client built from the published protos calls it by path.
    const client = new grpc.Client(`unix:${agent.socket}`, grpc.credentials.createInsecure());
    try {
      const err = await new Promise<grpc.ServiceError>((resolve, reject) =>
        client.makeUnaryRequest(
          '/gnoi.system.System/Time',
          (b: Buffer) => b,
          (b: Buffer) => b,
          Buffer.alloc(0),
          (e) => (e ? resolve(e) : reject(new Error('Time succeeded'))),
        ),
      );
      assert.equal(err.code, grpc.status.UNIMPLEMENTED, err.details);
    } finally {
      client.close();
    }
  });

  it('Activate: NON_EXISTENT_VERSION for a version not installed or empty; NOT_SUPPORTED_ON_BACKUP for standby_supervisor', async () => {
    for (const version of ['9.9.9', '']) {
      const r = await unaryCall<ActivateResp>(os, 'Activate', { version, noReboot: true });
      assert.equal(r.response, 'activateError');
      assert.equal(r.activateError?.type, 'NON_EXISTENT_VERSION');
      assert.match(r.activateError!.detail, /is not installed; Install it first/);
    }
    const r = await unaryCall<ActivateResp>(os, 'Activate', { version: '9.9.9', standbySupervisor: true });
    assert.equal(r.activateError?.type, 'NOT_SUPPORTED_ON_BACKUP');
  });

  it('Activate(no_reboot=true) of an installed version with no control plane running: an ActivateError saying to start one; nothing loaded', async () => {
    const tar = tarBundle(await fakeBundle(path.join(work, 'b'), '2.0.0', 64 * 1024, key.privateKeyPem));
    const { final } = await installPackage(os, tar, { version: '2.0.0', packageSize: tar.length });
    assert.equal(final.response, 'validated', JSON.stringify(final));
    for (const noReboot of [true, false]) {
      const r = await unaryCall<ActivateResp>(os, 'Activate', { version: '2.0.0', noReboot });
      assert.equal(r.response, 'activateError', JSON.stringify(r));
      assert.equal(r.activateError?.type, 'UNSPECIFIED');
      assert.match(r.activateError!.detail, /^FAILED_PRECONDITION: no process is ACTIVE.*start the control-plane VM first/);
    }
    const st = await unaryCall<{ current: unknown; history: unknown[] }>(up, 'Status', {});
    assert.equal(st.current ?? null, null, 'no upgrade started');
    assert.deepEqual(st.history, []);
    await expectStatus(unaryCall(sys, 'Reboot', { method: 'WARM' }), grpc.status.FAILED_PRECONDITION, /no version is activated/);
    const v = await unaryCall<VerifyResp>(os, 'Verify', {});
    assert.equal(v.verifyStandby.standbyState?.state, 'NON_EXISTENT');
  });
});
