/**
 * Nest wiring: each outside system (database, bulk sockets, gRPC listeners) is a provider built
 * from the AgentConfig; domain services get them injected. Lifecycle hooks open the listeners
 * after everything is constructed and close them in reverse order on shutdown.
 */
import { Inject, Injectable, Module, OnApplicationBootstrap, OnApplicationShutdown, DynamicModule } from '@nestjs/common';
import path from 'node:path';
import { CheckpointService } from './checkpoint/checkpoint.service';
import { checkpointHandlers } from './checkpoint/checkpoint.grpc';
import { BulkServer } from './checkpoint/bulk-server';
import { AgentConfig } from './config';
import { Logger } from './common/logger';
import { Db, openDatabase } from './store/database';
import { SqliteCheckpointStore } from './store/checkpoint-store';
import { GrpcServer } from './grpc/grpc-server';

export const AGENT_CONFIG = 'AGENT_CONFIG';
export const LOGGER = 'LOGGER';
export const DATABASE = 'DATABASE';

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
  ) {}

  async onApplicationBootstrap(): Promise<void> {
    const t0 = Date.now();
    const recovered = this.checkpoint.recover();
    this.log.info({ ...recovered, ms: Date.now() - t0 }, 'checkpoint tables recovered from the store');
    await this.bulk.listen();
    await this.grpc.listenUnix(this.config.grpcSocket);
    if (this.config.grpcTcp) await this.grpc.listenTcp(this.config.grpcTcp);
    this.readyInfo = {
      event: 'ready',
      pid: process.pid,
      grpcSocket: this.config.grpcSocket,
      grpcTcp: this.grpc.tcpAddress || null,
      stateDir: this.config.stateDir,
      recoveredTables: recovered.tables,
      recoveredRecords: recovered.records,
    };
  }

  async onApplicationShutdown(signal?: string): Promise<void> {
    this.log.info({ signal }, 'agent shutting down');
    this.checkpoint.closeAll();
    await this.grpc.close();
    await this.bulk.close();
    this.db.close();
  }
}

@Module({})
export class AppModule {
  static forConfig(config: AgentConfig, log: Logger): DynamicModule {
    return {
      module: AppModule,
      providers: [
        { provide: AGENT_CONFIG, useValue: config },
        { provide: LOGGER, useValue: log },
        { provide: DATABASE, useFactory: () => openDatabase(config.stateDir, { fsync: config.fsync }) },
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
          provide: CheckpointService,
          inject: [DATABASE, BulkServer],
          useFactory: (db: Db, bulk: BulkServer) =>
            new CheckpointService(new SqliteCheckpointStore(db), bulk, log.child({ mod: 'checkpoint' }), config.checkpoint),
        },
        {
          provide: GrpcServer,
          inject: [CheckpointService],
          useFactory: (checkpoint: CheckpointService) =>
            new GrpcServer(
              [{ name: 'hitless.v1.Checkpoint', guest: true, handlers: (vm) => checkpointHandlers(checkpoint, log.child({ mod: 'grpc' }), vm) }],
              log.child({ mod: 'grpc' }),
            ),
        },
        AgentLifecycle,
      ],
    };
  }
}

export const defaultSocketFor = (stateDir: string) => path.join(stateDir, 'agent.sock');
