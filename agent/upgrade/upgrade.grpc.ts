/**
 * gRPC transport of hitless.v1.Upgrade: maps requests onto UpgradeService and its results onto
 * the proto messages. Long commands (LoadVersion, ChangeVersion) answer when done; progress goes
 * to every Events stream meanwhile.
 */
import * as grpc from '@grpc/grpc-js';
import { invalidArgument, notFound } from '../common/errors';
import { Logger } from '../common/logger';
import { unary } from '../grpc/status';
import { UpgradeRecord, UpgradeStore } from './upgrade-store';
import { UpgradeEvent, UpgradeService, UpgradeStatusView } from './upgrade.service';
import type { DataPlaneChanges, DataPlaneStatusView } from '../dataplane/fib.service';

function info(r: UpgradeRecord & { timerRemainingMs?: number }) {
  return {
    id: r.id,
    phase: r.phase,
    fromVm: r.fromVm,
    fromImage: r.fromImage,
    fromVersion: r.fromVersion,
    toVm: r.toVm,
    toImage: r.toImage,
    toVersion: r.toVersion,
    startedAtMs: r.startedAt,
    updatedAtMs: r.updatedAt,
    timerRemainingMs: r.timerRemainingMs ?? 0,
    result: r.result,
    freezeMs: r.freezeMs,
    processes: Object.entries(r.processes).map(([process, p]) => ({ process, fromInstance: p.from, toInstance: p.to, freezeMs: r.freezes?.[process] ?? 0 })),
    dataplaneChanges: (r.dataplane ?? []).map(changesMsg),
    agentLoopMaxMs: r.loopMaxMs ?? {},
  };
}

function changesMsg(c: DataPlaneChanges) {
  return { atMs: c.at, cause: c.cause, routes: c.routes, added: c.added, replaced: c.replaced, deleted: c.deleted, failed: c.failed, ms: c.ms, error: c.error };
}

function dataplaneMsg(d: DataPlaneStatusView) {
  return { ...d, lastReconcile: d.lastReconcile ? changesMsg(d.lastReconcile) : undefined };
}

/** Upgrade ids as loadVersion makes them. */
const UPGRADE_ID_RE = /^u-\d{14}-[0-9a-f]{4}$/;

export function upgradeReport(store: UpgradeStore, id: string) {
  if (id && !UPGRADE_ID_RE.test(id))
    throw invalidArgument(`'${id}' is not an upgrade id (they look like u-20261128093000-1a2b); issu status lists the recent ones`);
  const rec = id ? store.get(id) : (store.current() ?? store.history(1)[0] ?? null);
  if (!rec) throw notFound(id ? `no upgrade '${id}' is in the journal; issu status lists the recent ones` : 'no upgrade has run on this agent yet');
  return {
    upgrade: info(rec),
    journal: store.journal(rec.id).map((j) => ({ atMs: j.at, phase: j.phase, note: j.note })),
    lag: store.lagSamples(rec.id).map((x) => ({ atMs: x.at, process: x.process, instance: x.instance, lag: x.lag, ready: x.ready })),
    audits: store.audits(rec.id).map((a) => ({
      atMs: a.at,
      phase: a.phase,
      process: a.process,
      instances: a.instances,
      recordsVerified: a.verified,
      recordsLost: a.lost,
      consistent: a.consistent,
      detail: a.detail,
    })),
    sessions: store.sessions(rec.id).map((x) => ({
      atMs: x.at,
      process: x.process,
      instance: x.instance,
      session: x.session,
      outcome: x.outcome,
      durationMs: x.durationMs,
      detail: x.detail,
    })),
  };
}

export function toStatusMessage(v: UpgradeStatusView, store: UpgradeStore) {
  const latest = v.current ?? v.history[0];
  return {
    current: v.current ? info(v.current) : undefined,
    processes: v.processes,
    history: v.history.map((h) => info(h)),
    journal: latest ? store.journal(latest.id).map((j) => ({ atMs: j.at, phase: j.phase, note: j.note })) : [],
    dataplane: dataplaneMsg(v.dataplane),
  };
}

export function upgradeHandlers(svc: UpgradeService, store: UpgradeStore, log: Logger): grpc.UntypedServiceImplementation {
  const image = (req: { imageDir: string }) => {
    if (!req.imageDir) throw invalidArgument('image_dir is empty: give the absolute path of an image bundle directory on the agent host');
    return req.imageDir;
  };
  const wrap = (name: string, fn: (req: { imageDir: string; reason: string }) => Promise<UpgradeStatusView> | UpgradeStatusView) =>
    unary<{ imageDir: string; reason: string }, unknown>(log, name, async (req) => toStatusMessage(await fn(req), store));
  return {
    LoadVersion: wrap('LoadVersion', (r) => svc.loadVersion(image(r))),
    RunVersion: wrap('RunVersion', () => svc.runVersion()),
    AcceptVersion: wrap('AcceptVersion', () => svc.acceptVersion()),
    CommitVersion: wrap('CommitVersion', () => svc.commitVersion()),
    AbortVersion: wrap('AbortVersion', (r) => svc.abortVersion(r.reason ? `abortversion: ${r.reason}` : 'abortversion by the operator')),
    ChangeVersion: wrap('ChangeVersion', (r) => svc.changeVersion(image(r))),
    Status: wrap('Status', () => svc.status()),
    ShowUpgrade: unary<{ id: string }, unknown>(log, 'ShowUpgrade', (req) => upgradeReport(store, req.id)),
    ShowCompatibility: unary<{ imageDir: string }, unknown>(log, 'ShowCompatibility', (req) => {
      const c = svc.compatibility(image(req));
      return {
        runningVersion: c.running,
        candidateVersion: c.candidate,
        compatible: c.compatible,
        reason: c.reason,
        rows: c.matrix.map((m) => ({
          process: m.process,
          change: m.change,
          fromVersion: m.fromVersion ?? '',
          toVersion: m.toVersion ?? '',
          fromWrites: m.fromWrites ?? 0,
          toWrites: m.toWrites ?? 0,
          fromReads: m.fromReads ?? [],
          toReads: m.toReads ?? [],
          forward: m.forward,
          backward: m.backward,
          via: m.via ?? '',
          reason: m.reason ?? '',
        })),
      };
    }),
    Events: (call: grpc.ServerWritableStream<unknown, unknown>) => {
      const on = (e: UpgradeEvent) =>
        call.write({
          type: e.type,
          upgradeId: e.upgradeId,
          phase: e.phase,
          message: e.message,
          done: e.done,
          total: e.total,
          atMs: e.at,
          step: e.step,
          unit: e.unit,
          dataplane: e.dataplane ? changesMsg(e.dataplane) : undefined,
        });
      svc.events.on('event', on);
      const off = () => svc.events.off('event', on);
      call.on('cancelled', off);
      call.on('close', off);
      call.on('error', off);
      // Headers now: a client that waits for them knows it will see every event from here on.
      call.sendMetadata(new grpc.Metadata());
    },
  } as grpc.UntypedServiceImplementation;
}
