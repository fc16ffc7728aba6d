#!/usr/bin/env node
/**
 * hitlessd entry point: parse flags, build the Nest application context, open listeners, print
 * the ready line, and shut down gracefully on SIGTERM/SIGINT.
 */
import 'reflect-metadata';
import { NestFactory } from '@nestjs/core';
import { AgentLifecycle, AppModule } from './app.module';
import { HITLESSD_HELP, parseAgentArgs } from './config';
import { createLogger } from './common/logger';
import { hostCommands } from './host/command-runner';

async function main(): Promise<void> {
  let config;
  try {
    config = parseAgentArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`hitlessd: ${(e as Error).message}\nRun 'hitlessd --help' for the options.\n`);
    process.exit(2);
  }
  if (config === 'help') {
    process.stdout.write(HITLESSD_HELP);
    return;
  }
  // The helper that starts the agent's commands, forked while the agent is still small (why:
  // host/command-runner.ts).
  hostCommands.start();
  const log = createLogger(config.logLevel);
  const app = await NestFactory.createApplicationContext(AppModule.forConfig(config, log), { logger: false, abortOnError: false });
  await app.init();
  process.stdout.write(JSON.stringify(app.get(AgentLifecycle).readyInfo) + '\n');
  // Own signal handling rather than Nest's shutdown hooks, which re-raise the signal: a clean
  // stop must exit 0 so service managers do not count it as a failure.
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'stopping');
    app.close().then(
      () => process.exit(0),
      (e) => {
        log.error({ err: (e as Error).message }, 'unclean shutdown');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

main().catch((e) => {
  process.stderr.write(`hitlessd: failed to start: ${(e as Error).message}\n`);
  process.exit(1);
});
