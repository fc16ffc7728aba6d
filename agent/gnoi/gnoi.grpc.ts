/**
 * gNOI (github.com/openconfig/gnoi) on top of the agent's upgrade flow: gnoi.os.OS (Install,
 * Activate, Verify) and gnoi.system.System (SwitchControlProcessor, Reboot, RebootStatus).
 *
 *   Install    receives a tar of a signed bundle (see package-store.ts), verifies it and stores
 *              it as <state-dir>/images/<version>/. A version already installed (or running)
 *              answers Validated without a transfer. One Install at a time. Before
 *              TransferReady it makes room for package_size (releasing older installed versions,
 *              never one in use) or answers TOO_LARGE. After TransferEnd, a bundle for another
 *              architecture than the running control plane's, or whose processes cannot take
 *              over the running ones' checkpoint state, is INCOMPATIBLE (checked here, so no VM
 *              is ever booted for it).
 *   Activate   no_reboot=true: loadversion (the new version boots in a standby VM and syncs;
 *              the running version is not switched). no_reboot=false: changeversion - load,
 *              run (switchover), accept and commit: the new version runs, the old VM is
 *              stopped; any failure leaves the old version running (gNOI's "falls back to the
 *              previously running OS"). ActivateError NON_EXISTENT_VERSION when not installed.
 *   Verify     the running version (of the VM whose processes are active), and the standby:
 *              the loaded new version (LOADED), the old version still following (SWITCHED,
 *              ACCEPTED), UNAVAILABLE while it boots/switches, NON_EXISTENT otherwise.
 *   SwitchControlProcessor  runversion: the loaded standby becomes active (rollback timer
 *              armed; finish with Reboot, issu acceptversion/commitversion or abortversion).
 *              Control processors are named by VM: /components/component[name=<vm>]; an empty
 *              path means the standby. Naming the active one is a no-op. Naming the previous
 *              version's VM after the switch is FAILED_PRECONDITION: going back is an abort
 *              (issu abortversion), which gNOI has no RPC for.
 *   Reboot     methods COLD, WARM, NSF with delay 0: boots what Activate(no_reboot=true)
 *              loaded, hitlessly - runversion if still LOADED, then commitversion. Without an
 *              activated version: FAILED_PRECONDITION (the agent never cold-restarts the
 *              control plane). Other methods, a delay or subcomponents: INVALID_ARGUMENT.
 *   RebootStatus  active while a Reboot runs; otherwise the outcome of the last upgrade.
 */
import * as grpc from '@grpc/grpc-js';
import path from 'node:path';
import { HitlessError, failedPrecondition, invalidArgument, notFound } from '../common/errors';
import { Logger } from '../common/logger';
import { unary } from '../grpc/status';
import { Manifest } from '../images/manifest';
import { UpgradeService } from '../upgrade/upgrade.service';
import { Incoming, InstallFailure, PackageStore, validVersion } from './package-store';

export interface GnoiVms {
  list(): { name: string; state: string; imageVersion: string | null; createdAt: number }[];
}

const PROGRESS_EVERY = 4 * 1024 * 1024;
const nsSinceEpoch = (ms: number) => (BigInt(Math.round(ms)) * 1_000_000n).toString();
const cpPath = (vm: string) => ({
  origin: '',
  elem: [
    { name: 'components', key: {} },
    { name: 'component', key: { name: vm } },
  ],
});

export function osHandlers(store: PackageStore, upgrade: UpgradeService, log: Logger): grpc.UntypedServiceImplementation {
  const describe = (m: Manifest) =>
    `${m.name} ${m.version} (${m.arch}, kernel ${m.kernel.release}; processes ${m.processes.map((p) => `${p.name} schema ${p.schemaWrites}`).join(', ')})`;

  /** Bundle directories being activated right now: verified by the upgrade, not yet journaled. */
  const activating = new Set<string>();
  /** Installed bundles that Install must neither release nor replace: in use or about to be. */
  const inUse = (dir: string) => {
    const cur = upgrade.status().current;
    return dir === upgrade.running()?.imageDir || dir === cur?.toImage || dir === cur?.fromImage || activating.has(dir);
  };

  /** The bundle for `version`: installed under images/, or the running one. */
  const find = (version: string): { dir: string; manifest: Manifest } | null => {
    const installed = store.present(version);
    if (installed) return installed;
    const running = upgrade.running();
    if (running && running.manifest.version === version) return { dir: running.imageDir, manifest: running.manifest };
    return null;
  };

  return {
    Install: (call: grpc.ServerDuplexStream<Record<string, unknown>, unknown>) => {
      let incoming: Incoming | null = null;
      let requested = '';
      let state: 'start' | 'transfer' | 'verifying' | 'done' = 'start';
      let lastProgress = 0;
      const finish = (msg: unknown) => {
        if (state === 'done') return;
        state = 'done';
        call.write(msg);
        call.end();
      };
      const fail = (type: string, detail: string) => {
        if (incoming) incoming.abort();
        incoming = null;
        log.warn({ type, detail, version: requested }, 'gNOI Install failed');
        finish({ installError: { type, detail } });
      };
      const failWith = (e: unknown) => {
        if (e instanceof InstallFailure) fail(e.type, e.message);
        else fail('UNSPECIFIED', `internal error: ${(e as Error).message}`);
      };
      let cancelled = false;
      const cleanup = () => {
        cancelled = true;
        if (state === 'verifying') return; // the verification ends and cleans up
        if (incoming) incoming.abort();
        incoming = null;
        state = 'done';
      };
      call.on('cancelled', cleanup);
      call.on('error', cleanup);
      call.on('end', () => {
        if (state === 'start' || state === 'transfer') fail('UNSPECIFIED', 'the client closed the stream before TransferEnd; nothing was installed');
      });
      call.on('data', (req: Record<string, unknown>) => {
        if (state === 'done' || state === 'verifying') return;
        try {
          if (state === 'start') {
            const tr = req.transferRequest as { version: string; standbySupervisor: boolean; packageSize: number } | undefined;
            if (req.request !== 'transferRequest' || !tr) throw new InstallFailure('UNSPECIFIED', 'the first Install message must be a TransferRequest');
            if (tr.standbySupervisor)
              throw new InstallFailure('NOT_SUPPORTED_ON_BACKUP', 'this target installs the whole system with one Install; do not set standby_supervisor');
            requested = tr.version;
            if (requested) {
              if (!validVersion(requested))
                throw new InstallFailure('UNSPECIFIED', `'${requested}' is not a valid bundle version (MAJOR.MINOR.PATCH[-pre][+build])`);
              const have = find(requested);
              if (have) {
                log.info({ version: requested, dir: have.dir }, 'gNOI Install: version already present');
                finish({ validated: { version: have.manifest.version, description: describe(have.manifest) } });
                return;
              }
            }
            incoming = store.begin(Number(tr.packageSize) || 0, inUse);
            state = 'transfer';
            call.write({ transferReady: {} });
            return;
          }
          if (req.request === 'transferContent') {
            const buf = req.transferContent as Buffer;
            incoming!.push(buf);
            if (incoming!.received - lastProgress >= PROGRESS_EVERY) {
              lastProgress = incoming!.received;
              call.write({ transferProgress: { bytesReceived: incoming!.received } });
            }
            return;
          }
          if (req.request === 'transferEnd') {
            const inc = incoming!;
            inc.finish();
            call.write({ transferProgress: { bytesReceived: inc.received } });
            state = 'verifying';
            void (async () => {
              try {
                const manifest = await store.verify(inc.dir);
                if (cancelled) throw new InstallFailure('UNSPECIFIED', 'the client went away before the package was stored');
                const running = upgrade.running();
                if (running) {
                  if (running.manifest.arch !== manifest.arch) {
                    throw new InstallFailure('INCOMPATIBLE', `the package is for ${manifest.arch}; this target runs ${running.manifest.arch}`);
                  }
                  if (!requested && running.manifest.version === manifest.version) {
                    throw new InstallFailure('INSTALL_RUN_PACKAGE', `version ${manifest.version} is the one running; nothing to install`);
                  }
                  if (running.manifest.version !== manifest.version) {
                    const c = upgrade.compatibility(inc.dir);
                    if (!c.compatible) throw new InstallFailure('INCOMPATIBLE', c.reason);
                  }
                }
                const dest = store.commit(inc, manifest.version, inUse);
                incoming = null;
                log.info({ version: manifest.version, dir: dest, bytes: inc.received }, 'gNOI Install: package validated and stored');
                state = 'transfer';
                finish({ validated: { version: manifest.version, description: describe(manifest) } });
              } catch (e) {
                state = 'transfer';
                if (e instanceof HitlessError) failWith(new InstallFailure('INCOMPATIBLE', e.message));
                else failWith(e);
              }
            })();
            return;
          }
          throw new InstallFailure('UNSPECIFIED', 'a second TransferRequest in one Install; send transfer_content then transfer_end');
        } catch (e) {
          failWith(e);
        }
      });
    },

    Activate: unary<{ version: string; standbySupervisor: boolean; noReboot: boolean }, unknown>(log, 'gnoi.os.OS/Activate', async (req) => {
      if (req.standbySupervisor)
        return {
          activateError: { type: 'NOT_SUPPORTED_ON_BACKUP', detail: 'this target activates the whole system with one Activate; do not set standby_supervisor' },
        };
      const have = req.version ? find(req.version) : null;
      if (!have) return { activateError: { type: 'NON_EXISTENT_VERSION', detail: `version '${req.version}' is not installed; Install it first` } };
      const running = upgrade.running();
      if (running?.manifest.version === req.version && !upgrade.status().current) return { activateOk: {} };
      activating.add(have.dir);
      try {
        if (req.noReboot) await upgrade.loadVersion(have.dir);
        else await upgrade.changeVersion(have.dir);
      } catch (e) {
        if (e instanceof HitlessError) return { activateError: { type: 'UNSPECIFIED', detail: `${e.codeName}: ${e.message}` } };
        throw e;
      } finally {
        activating.delete(have.dir);
      }
      return { activateOk: {} };
    }),

    Verify: unary<unknown, unknown>(log, 'gnoi.os.OS/Verify', () => {
      const running = upgrade.running();
      const st = upgrade.status();
      const cur = st.current;
      let verifyStandby: unknown;
      if (!cur) verifyStandby = { standbyState: { state: 'NON_EXISTENT' } };
      else if (cur.phase === 'LOADED')
        verifyStandby = { verifyResponse: { id: cur.toVm, version: cur.toVersion, activationFailMessage: '', imageName: path.basename(cur.toImage) } };
      else if (cur.phase === 'SWITCHED' || cur.phase === 'ACCEPTED')
        verifyStandby = { verifyResponse: { id: cur.fromVm, version: cur.fromVersion, activationFailMessage: '', imageName: path.basename(cur.fromImage) } };
      else verifyStandby = { standbyState: { state: 'UNAVAILABLE' } };
      const last = st.history[0];
      const failed = !cur && last && (last.phase === 'ROLLED_BACK' || last.phase === 'ABORTED') && last.toVersion !== running?.manifest.version;
      return {
        version: running?.manifest.version ?? '',
        activationFailMessage: failed ? `activating ${last.toVersion} failed (${last.phase}): ${last.result}` : '',
        verifyStandby,
        individualSupervisorInstall: false,
        imageName: running ? path.basename(running.imageDir) : '',
      };
    }),
  } as grpc.UntypedServiceImplementation;
}

export function systemHandlers(upgrade: UpgradeService, vms: GnoiVms, log: Logger): grpc.UntypedServiceImplementation {
  let rebooting: { since: number; method: string; reason: string } | null = null;
  let last: { method: string; ok: boolean; message: string } | null = null;
  let count = 0;
  const cpOf = (vm: string) => {
    const v = vms.list().find((x) => x.name === vm);
    return { controlProcessor: cpPath(vm), version: v?.imageVersion ?? '', uptime: v ? nsSinceEpoch(Date.now() - v.createdAt) : '0' };
  };
  const targetName = (p: { elem?: { name: string; key?: Record<string, string> }[] } | null | undefined) => {
    const elems = p?.elem ?? [];
    for (let i = elems.length - 1; i >= 0; i--) if (elems[i].key?.name) return elems[i].key!.name;
    return elems.length ? elems[elems.length - 1].name : '';
  };
  return {
    SwitchControlProcessor: unary<{ controlProcessor: { elem?: { name: string; key?: Record<string, string> }[] } | null }, unknown>(
      log,
      'gnoi.system.System/SwitchControlProcessor',
      async (req) => {
        const want = targetName(req.controlProcessor);
        const running = upgrade.running();
        if (want && running && want === running.vm) return cpOf(running.vm); // already there: a no-op
        const cur = upgrade.status().current;
        if (!cur) throw failedPrecondition('there is no standby control processor: activate a version with OS.Activate(no_reboot=true) first');
        const switched = cur.phase === 'SWITCHED' || cur.phase === 'ACCEPTED';
        if (want && switched && want === cur.fromVm) {
          throw failedPrecondition(
            `'${want}' runs the previous version ${cur.fromVersion} and follows '${cur.toVm}' as its standby until the upgrade is committed; ` +
              `switching back is an abort: run 'issu abortversion' (or let the rollback timer do it), or commit ${cur.toVersion} with System.Reboot`,
          );
        }
        if (want && want !== cur.toVm)
          throw notFound(
            `control processor '${want}' does not exist; the standby is '${switched ? cur.fromVm : cur.toVm}' and the active '${running?.vm ?? cur.fromVm}'`,
          );
        await upgrade.runVersion();
        return cpOf(cur.toVm);
      },
    ),
    Reboot: unary<{ method: string; delay: number; message: string; subcomponents: unknown[]; force: boolean }, unknown>(
      log,
      'gnoi.system.System/Reboot',
      async (req) => {
        if (!['COLD', 'WARM', 'NSF'].includes(req.method))
          throw invalidArgument(`reboot method ${req.method} is not supported; use COLD, WARM or NSF (all of them switch to the activated version hitlessly)`);
        if (Number(req.delay) > 0) throw invalidArgument('delayed reboots are not supported; send delay 0');
        if (req.subcomponents?.length) throw invalidArgument('rebooting subcomponents is not supported; send none');
        if (rebooting) throw failedPrecondition(`a reboot is already in progress since ${new Date(rebooting.since).toISOString()}`);
        const cur = upgrade.status().current;
        if (!cur)
          throw failedPrecondition('no version is activated: use OS.Activate(no_reboot=true) first; the agent never cold-restarts the running control plane');
        rebooting = { since: Date.now(), method: req.method, reason: req.message };
        try {
          if (cur.phase === 'LOADED') await upgrade.runVersion();
          await upgrade.commitVersion();
          last = { method: req.method, ok: true, message: `${cur.toVersion} running` };
          count++;
        } catch (e) {
          last = { method: req.method, ok: false, message: (e as Error).message };
          throw e;
        } finally {
          rebooting = null;
        }
        return {};
      },
    ),
    RebootStatus: unary<unknown, unknown>(log, 'gnoi.system.System/RebootStatus', () => {
      if (rebooting)
        return {
          active: true,
          wait: 0,
          when: nsSinceEpoch(rebooting.since),
          reason: rebooting.reason,
          count,
          method: rebooting.method,
          status: { status: 'STATUS_UNKNOWN', message: '' },
        };
      return {
        active: false,
        wait: 0,
        when: 0,
        reason: '',
        count,
        method: last?.method ?? 'UNKNOWN',
        status: last ? { status: last.ok ? 'STATUS_SUCCESS' : 'STATUS_FAILURE', message: last.message } : { status: 'STATUS_UNKNOWN', message: '' },
      };
    }),
  } as grpc.UntypedServiceImplementation;
}
