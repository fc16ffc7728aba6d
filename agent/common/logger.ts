/**
 * Structured JSON logs (pino) on stderr, one object per line. Components take a child logger
 * with their name bound, so every line says where it came from.
 */
import pino from 'pino';

export type Logger = pino.Logger;

export function createLogger(level: string = process.env.HITLESS_LOG_LEVEL ?? 'info'): Logger {
  return pino({ level, base: { svc: 'hitlessd', pid: process.pid } }, pino.destination(2));
}

/** A logger that drops everything, for library users (SDK) that did not pass one. */
export const silentLogger: Logger = pino({ level: 'silent' });
