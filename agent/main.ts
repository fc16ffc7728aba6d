#!/usr/bin/env -S node --v8-pool-size=1
/**
 * hitlessd entry point: parse flags, build the Nest application context, open listeners, print
 * the ready line, and shut down gracefully on SIGTERM/SIGINT.
 *
 * The Node flags on the first line are hitlessd's: scripts/install.sh and the test harness
 * (harness/agent-process.ts) read them from there, so every way of starting it uses the same.
 * --v8-pool-size=1: one V8 helper thread instead of Node's default four. The agent's heap is
 * ~20 MB (tables live in shared memory outside it), so its collections need no more; the other
 * three only competed for the CPU with the agent itself, its store threads, the guests and the
 * routing processes. On 2 cores, 6 alternated runs each of 1M records: the longest stall of the
 * agent's event loop while loading went from 20.4 to 15.7 ms (medians), SYNC ack p99 at 50k
 * records/s from 4.35 to 3.99 ms, loading from 527k to 543k records/s.
 */
import 'reflect-metadata';
import fs from 'node:fs';
import os from 'node:os';
import { INestApplicationContext } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { AgentLifecycle, AppModule } from './app.module';
import { HITLESSD_HELP, parseAgentArgs } from './config';
import { createLogger } from './common/logger';
import { hostCommands } from './host/command-runner';

/** Sets the priority of every thread of this process (Linux: setpriority() takes one thread id). */
function setProcessPriority(nice: number): void {
  os.setPriority(nice);
  let tids: string[] = [];
  try {
    tids = fs.readdirSync('/proc/self/task');
  } catch {
    return; // no procfs: the main thread has it, the threads made from now on too
  }
  for (const tid of tids) {
    try {
      os.setPriority(Number(tid), nice);
    } catch {
      // ended meanwhile
    }
  }
}

/**
 * Gives the agent's session the priority too, where the kernel groups processes by session
 * (autogroups: CONFIG_SCHED_AUTOGROUP, used when no cpu cgroup controller is over the agent).
 * There the CPU is shared between sessions first, whatever their processes' own nice values,
 * and each VM runs in a session of its own (it outlives the agent): two busy guests under TCG
 * each got as much CPU as the whole of the agent's session, and the agent waited up to 96 ms
 * for a CPU in a switchover. Returns the session's previous value, to be put back when the
 * agent stops (the session may be an operator's shell); null where there are no autogroups.
 */
function setSessionPriority(nice: number): number | null {
  let text: string;
  try {
    text = fs.readFileSync('/proc/self/autogroup', 'utf8'); // "/autogroup-25 nice 0"
  } catch {
    return null;
  }
  const m = /nice\s+(-?\d+)/.exec(text);
  // Already there (another agent of this session set it, or an earlier run): nothing to give back.
  if (!m || Number(m[1]) === nice) return null;
  fs.writeFileSync('/proc/self/autogroup', String(nice));
  return Number(m[1]);
}

/** Puts the session's priority back (see setSessionPriority); best effort at exit. */
function restoreSessionPriority(was: number | null): void {
  if (was === null) return;
  try {
    fs.writeFileSync('/proc/self/autogroup', String(was));
  } catch {
    // the session keeps the agent's priority
  }
}

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
  // Priority first, so that every thread started from here on has it (Linux gives each thread
  // its own; new ones take their creator's), and for the threads already running (V8's, which
  // mark and sweep the heap concurrently: left behind the guests, the collector finished its
  // work in the main thread's pauses). The command runner's helper goes back to the start
  // priority, and so does everything it starts: VMs, ip.
  const startNice = os.getPriority();
  let niceRefused = '';
  let sessionNiceWas: number | null = null;
  if (config.nice !== startNice) {
    try {
      setProcessPriority(config.nice);
      sessionNiceWas = setSessionPriority(config.nice);
    } catch (e) {
      niceRefused = (e as Error).message;
    }
  }
  // The helper that starts the agent's commands, forked while the agent is still small (why:
  // host/command-runner.ts).
  hostCommands.start(startNice);
  const log = createLogger(config.logLevel);
  if (niceRefused) {
    log.warn(
      { nice: config.nice, runningAt: startNice, err: niceRefused },
      'the agent could not raise its CPU priority (needs root or CAP_SYS_NICE); it runs at its start priority, and busy guests may delay it. Run it as root, or pass --nice to say which priority it should have',
    );
  }
  // The signal handlers go in before anything can see the agent: until a process installs one, a
  // SIGTERM ends it at once (the kernel's default action), without closing the store or giving
  // the session its priority back. Installed after the ready line, a stop sent by whoever read
  // that line could arrive first (1 start in 10 on an idle 2-core host, 1 in 2 under load).
  // A stop asked for while the agent is starting waits for the start to finish, then closes it
  // without printing the ready line; a second one ends it at once (a start that hangs).
  // Own handling rather than Nest's shutdown hooks, which re-raise the signal: a clean stop must
  // exit 0 so service managers do not count it as a failure.
  let app: INestApplicationContext | null = null;
  let stopSignal: string | null = null;
  const close = (ctx: INestApplicationContext) =>
    ctx.close().then(
      () => {
        restoreSessionPriority(sessionNiceWas);
        process.exit(0);
      },
      (e) => {
        log.error({ err: (e as Error).message }, 'unclean shutdown');
        restoreSessionPriority(sessionNiceWas);
        process.exit(1);
      },
    );
  const stop = (signal: string) => {
    if (stopSignal) {
      if (app) return; // closing already
      log.warn({ signal }, 'stopped again before the start finished: exiting now, without closing the store (it recovers on the next start)');
      restoreSessionPriority(sessionNiceWas);
      process.exit(1);
    }
    stopSignal = signal;
    log.info({ signal, starting: app === null }, 'stopping');
    if (app) void close(app);
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  try {
    const ctx = await NestFactory.createApplicationContext(AppModule.forConfig(config, log), { logger: false, abortOnError: false });
    await ctx.init();
    app = ctx;
  } catch (e) {
    restoreSessionPriority(sessionNiceWas);
    throw e;
  }
  if (stopSignal) {
    void close(app);
    return;
  }
  process.stdout.write(JSON.stringify(app.get(AgentLifecycle).readyInfo) + '\n');
}

main().catch((e) => {
  process.stderr.write(`hitlessd: failed to start: ${(e as Error).message}\n`);
  process.exit(1);
});
