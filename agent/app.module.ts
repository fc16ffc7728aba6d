/**
 * Nest wiring: each outside system (database, bulk sockets, gRPC listeners) is a provider built
 * from the AgentConfig; domain services get them injected. Lifecycle hooks open the listeners
 * after everything is constructed and close them in reverse order on shutdown.
 */
import { Inject, Injectable, Module, OnApplicationBootstrap, OnApplicationShutdown, DynamicModule } from '@nestjs/common';
import fs from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { CheckpointService } from './checkpoint/checkpoint.service';
import { checkpointHandlers } from './checkpoint/checkpoint.grpc';
import { FrameChannels } from './checkpoint/checkpoint.frames';
import { BulkServer } from './checkpoint/bulk-server';
import { AgentConfig } from './config';
import { Logger } from './common/logger';
import { closeDatabase, Db, openDatabase } from './store/database';
import { SqliteCheckpointStore } from './store/checkpoint-store';
import { GrpcServer } from './grpc/grpc-server';
import { HostProbe, SystemInformationHostProbe } from './host/host-probe';
import type { Hypervisor } from './vm/hypervisor';
import { QemuHypervisor } from './vm/qemu-hypervisor';
import { SqliteVmRecordStore } from './vm/vm-record.sqlite-store';
import { VmService } from './vm/vm.service';
import { VmSupervisor } from './vm/vm-supervisor';
import { platformHandlers, vmHandlers } from './vm/vm.grpc';
import { x86KvmPlatform } from '../platform/x86-kvm';
import { arm64KvmPlatform } from '../platform/arm64-kvm';
import { SqliteUpgradeStore } from './upgrade/upgrade-store';
import { UpgradeService } from './upgrade/upgrade.service';
import { upgradeHandlers } from './upgrade/upgrade.grpc';
import { verifyBundle } from './images/signing';
import { loadRoles } from './grpc/authz';
import { Metrics, PhaseEvent } from './metrics/metrics';
import { PackageStore } from './gnoi/package-store';
import { osHandlers, systemHandlers } from './gnoi/gnoi.grpc';
import { FibService } from './dataplane/fib.service';
import { LinuxDataPlane, controlPlaneMac } from './dataplane/linux-data-plane';
import type { ControlPlaneNics } from './vm/vm-supervisor';

export const AGENT_CONFIG = 'AGENT_CONFIG';
export const LOGGER = 'LOGGER';
export const DATABASE = 'DATABASE';
export const HOST_PROBE = 'HOST_PROBE';

@Injectable()
export class AgentLifecycle implements OnApplicationBootstrap, OnApplicationShutdown {
  readyInfo: Record<string, unknown> = {};

  constructor(
    @Inject(AGENT_CONFIG) private readonly config: AgentConfig,
    @Inject(LOGGER) private readonly log: Logger,
    @Inject(DATABASE) private readonly db: Db,
    private readonly checkpoint: CheckpointService,
    private readonly bulk: BulkServer,
    private readonly grpc: GrpcServer,
    private readonly vms: VmSupervisor,
    private readonly upgrade: UpgradeService,
    private readonly metrics: Metrics,
    private readonly fib: FibService,
  ) {}

  private loopTimer: NodeJS.Timeout | null = null;

  /**
   * Watches the agent's own event loop: every acknowledgement and switchover waits on it, so a
   * stall is worth a warning (and its figures are at debug level every 5 s).
   */
  private watchEventLoop(): void {
    const h = monitorEventLoopDelay({ resolution: 1 });
    h.enable();
    this.loopTimer = setInterval(() => {
      const p99 = h.percentile(99) / 1e6;
      const max = h.max / 1e6;
      if (max > 100) this.log.warn({ p99Ms: p99, maxMs: max }, 'the agent event loop stalled');
      else this.log.debug({ p99Ms: p99, maxMs: max }, 'event loop delay');
      h.reset();
    }, 5000);
    this.loopTimer.unref();
  }

  async onApplicationBootstrap(): Promise<void> {
    this.watchEventLoop();
    const t0 = Date.now();
    const recovered = this.checkpoint.recover();
    this.log.info({ ...recovered, ms: Date.now() - t0 }, 'checkpoint tables recovered from the store');
    // Before any process can write: the data plane is reconciled with the recovered FIB (the
    // routes stayed in the kernel while the agent was down; normally nothing changes).
    await this.fib.start();
    await this.bulk.listen();
    // VMs that outlived a previous agent process: their guest channels open before the
    // re-attach, so their daemons reconnect as soon as the agent is back.
    const t1 = Date.now();
    const vms = await this.vms.recover();
    this.log.info({ ...vms, ms: Date.now() - t1 }, 'VMs recovered');
    await this.grpc.listenUnix(this.config.grpcSocket);
    if (this.config.grpcTcp) await this.grpc.listenTcp(this.config.grpcTcp);
    if (this.config.grpcTls) {
      const t = this.config.grpcTls;
      const read = (f: string, flag: string) => {
        try {
          return fs.readFileSync(f, 'utf8');
        } catch (e) {
          throw new Error(`${flag} ${f}: ${(e as Error).message}`);
        }
      };
      await this.grpc.listenTls(t.address, {
        cert: read(t.certFile, '--tls-cert'),
        key: read(t.keyFile, '--tls-key'),
        clientCa: read(t.clientCaFile, '--tls-client-ca'),
        roles: loadRoles(t.rolesFile),
      });
    }
    if (this.config.metrics) await this.metrics.listen(this.config.metrics);
    // After the listeners: an interrupted upgrade needs its processes to reconnect first.
    const upgradeRecovery = this.upgrade.recover().then(
      (what) => this.log.info({ what }, 'upgrade journal checked'),
      (e) => this.log.error({ err: (e as Error).message }, 'recovering the interrupted upgrade failed; see issu status'),
    );
    void upgradeRecovery;
    this.readyInfo = {
      event: 'ready',
      pid: process.pid,
      grpcSocket: this.config.grpcSocket,
      grpcTcp: this.grpc.tcpAddress || null,
      grpcTls: this.grpc.tlsAddress || null,
      metrics: this.metrics.address || null,
      stateDir: this.config.stateDir,
      recoveredTables: recovered.tables,
      recoveredRecords: recovered.records,
      vmsReattached: vms.reattached,
      vmsMarkedStopped: vms.markedStopped.map((v) => v.name),
      vmsUnreachable: vms.unreachable.map((v) => v.name),
    };
  }

  async onApplicationShutdown(signal?: string): Promise<void> {
    this.log.info({ signal }, 'agent shutting down');
    if (this.loopTimer) clearInterval(this.loopTimer);
    // Let go of the VMs without stopping them: they carry the router and outlive the agent.
    this.upgrade.close();
    this.fib.stop();
    this.vms.close();
    this.checkpoint.closeAll();
    await this.grpc.close();
    await this.metrics.close();
    await this.bulk.close();
    await closeDatabase(this.db);
  }
}

@Module({})
export class AppModule {
  static forConfig(config: AgentConfig, log: Logger): DynamicModule {
    // One hypervisor per guest arch; the image manifest's arch picks one. Each probes KVM once
    // (for its own QEMU binary) and falls back to TCG.
    const vmLog = log.child({ mod: 'vm' });
    const hypervisors: Hypervisor[] = [new QemuHypervisor(x86KvmPlatform, { logger: vmLog }), new QemuHypervisor(arm64KvmPlatform, { logger: vmLog })];
    // The data plane: programmed by the FIB service; control-plane VMs' taps join its bridge.
    const dataPlane = config.dataplane ? new LinuxDataPlane(config.dataplane.netns) : null;
    const cpNic = config.cpNic;
    const cpNics: ControlPlaneNics | undefined =
      cpNic && dataPlane
        ? {
            mac: controlPlaneMac(cpNic.bridge),
            cmdline: [cpNic.addresses && `hitless.cpnet=${cpNic.addresses}`, cpNic.gateway && `hitless.cpgw=${cpNic.gateway}`].filter(Boolean).join(' '),
            adopt: (pid, tap) => dataPlane.adoptTap(pid, tap, cpNic.bridge),
          }
        : undefined;
    return {
      module: AppModule,
      providers: [
        { provide: AGENT_CONFIG, useValue: config },
        { provide: LOGGER, useValue: log },
        { provide: DATABASE, useFactory: () => openDatabase(config.stateDir, { fsync: config.fsync, log: log.child({ mod: 'store' }) }) },
        {
          provide: BulkServer,
          useFactory: () =>
            new BulkServer(
              {
                unixPath: `${config.grpcSocket}.bulk`,
                tcpHost: config.grpcTcp ? config.grpcTcp.replace(/:\d+$/, '').replace(/^\[|\]$/g, '') || '127.0.0.1' : undefined,
                ticketTtlMs: 30_000,
                stallTimeoutMs: config.checkpoint.stallTimeoutMs,
              },
              log.child({ mod: 'bulk' }),
            ),
        },
        {
          provide: FibService,
          useFactory: () => new FibService(dataPlane, log.child({ mod: 'dataplane' })),
        },
        {
          provide: CheckpointService,
          inject: [DATABASE, BulkServer, FibService],
          useFactory: (db: Db, bulk: BulkServer, fib: FibService) => {
            const svc = new CheckpointService(new SqliteCheckpointStore(db), bulk, log.child({ mod: 'checkpoint' }), config.checkpoint);
            svc.forwarding = fib;
            return svc;
          },
        },
        {
          provide: GrpcServer,
          inject: [CheckpointService, BulkServer],
          useFactory: (checkpoint: CheckpointService, bulk: BulkServer) => {
            const channels = new FrameChannels(checkpoint, bulk, log.child({ mod: 'frames' }));
            const server = new GrpcServer(
              [{ name: 'hitless.v1.Checkpoint', guest: true, handlers: (vm) => checkpointHandlers(checkpoint, channels, log.child({ mod: 'grpc' }), vm) }],
              log.child({ mod: 'grpc' }),
            );
            // Ended frame channels are counted with the calls (server.onCall is wired with the metrics).
            channels.onEnd = (method, code) => server.onCall?.(method, code);
            return server;
          },
        },
        {
          provide: HOST_PROBE,
          useFactory: () => new SystemInformationHostProbe({ stateDir: config.stateDir, vcpuPerHostCpu: config.vm.cpuOvercommit }),
        },
        {
          provide: VmService,
          inject: [DATABASE, HOST_PROBE],
          useFactory: (db: Db, host: HostProbe) =>
            new VmService({
              hypervisors,
              store: new SqliteVmRecordStore(db),
              host,
              logger: vmLog,
              stateDir: config.stateDir,
              reserve: { memoryMiB: config.vm.hostReserveMiB, cpus: 0 },
            }),
        },
        {
          // Also binds hitless.v1.Vm and hitless.v1.Platform on the host listeners (not on guest
          // sockets), before any listener opens (AgentLifecycle depends on this provider).
          provide: VmSupervisor,
          inject: [VmService, HOST_PROBE, GrpcServer, BulkServer],
          useFactory: (vms: VmService, host: HostProbe, grpc: GrpcServer, bulk: BulkServer) => {
            const grpcLog = log.child({ mod: 'grpc' });
            const sup = new VmSupervisor(vms, {
              hypervisors,
              host,
              stateDir: config.stateDir,
              logger: vmLog,
              cpNics,
              channels: {
                // The bulk socket first: a guest that can register may open frame channels at once.
                open: async (vm, agentSocket, bulkSocket) => {
                  await bulk.listenUnixExtra(bulkSocket);
                  await grpc.closeVm(vm);
                  await grpc.listenVm(vm, agentSocket);
                },
                close: async (vm, _agentSocket, bulkSocket) => {
                  await grpc.closeVm(vm);
                  await bulk.closeExtra(bulkSocket);
                },
              },
            });
            grpc.addService({ name: 'hitless.v1.Vm', guest: false, handlers: () => vmHandlers(sup, grpcLog) });
            grpc.addService({ name: 'hitless.v1.Platform', guest: false, handlers: () => platformHandlers(sup, grpcLog) });
            return sup;
          },
        },
        {
          provide: UpgradeService,
          inject: [DATABASE, VmSupervisor, CheckpointService, GrpcServer, FibService],
          useFactory: (db: Db, sup: VmSupervisor, checkpoint: CheckpointService, grpc: GrpcServer, fib: FibService) => {
            const store = new SqliteUpgradeStore(db);
            const svc = new UpgradeService(
              store,
              {
                start: (req) => sup.start(req),
                stop: (name, timeoutMs) => sup.stop(name, timeoutMs),
                kill: (name) => sup.kill(name),
                find: (name) => sup.list().find((v) => v.name === name),
                onEvent: (cb) => sup.vms.onEvent(cb),
                setControlLink: (name, up) => sup.setControlLink(name, up),
              },
              checkpoint,
              { verify: async (dir, onProgress) => (await verifyBundle(dir, config.upgrade.trustDir, onProgress)).manifest },
              log.child({ mod: 'upgrade' }),
              config.upgrade.options,
              fib,
            );
            grpc.addService({ name: 'hitless.v1.Upgrade', guest: false, handlers: () => upgradeHandlers(svc, store, log.child({ mod: 'grpc' })) });
            const packages = new PackageStore(config.stateDir, config.upgrade.trustDir, config.maxPackageBytes);
            const gnoiLog = log.child({ mod: 'gnoi' });
            const osImpl = osHandlers(packages, svc, gnoiLog);
            const systemImpl = systemHandlers(svc, sup, gnoiLog);
            grpc.addService({ name: 'gnoi.os.OS', guest: false, handlers: () => osImpl });
            grpc.addService({ name: 'gnoi.system.System', guest: false, handlers: () => systemImpl });
            return svc;
          },
        },
        {
          provide: Metrics,
          inject: [CheckpointService, UpgradeService, VmSupervisor, GrpcServer],
          useFactory: (checkpoint: CheckpointService, upgrade: UpgradeService, sup: VmSupervisor, grpc: GrpcServer) => {
            const m = new Metrics(
              {
                checkpoint: () => checkpoint.status(''),
                upgradePhase: () => {
                  const s = upgrade.status();
                  const r = s.current ?? s.history[0];
                  return r ? { phase: r.phase, id: r.id } : null;
                },
                vms: () => sup.list(),
              },
              log.child({ mod: 'metrics' }),
            );
            // Fed only when there is an endpoint: no per-batch or per-call work for nobody.
            if (config.metrics) {
              grpc.onCall = (method, code, seconds) => m.countCall(method, code, seconds);
              checkpoint.observer = m.checkpointObserver();
              upgrade.events.on('event', (ev: PhaseEvent) => m.upgradeEvent(ev));
            }
            return m;
          },
        },
        AgentLifecycle,
      ],
    };
  }
}
