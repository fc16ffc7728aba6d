/**
 * Interactive attach to a VM's serial console (console.sock, served by QEMU's chardev) through
 * node-pty: socat runs under a pty and bridges it to the socket, the operator's terminal goes
 * raw, and Ctrl-] (like virsh console) detaches. QEMU serves one console client at a time; a
 * second attach waits until the first one detaches.
 */
import * as pty from 'node-pty';

/** Ctrl-] */
export const DEFAULT_ESCAPE = 0x1d;

export interface ConsolePtyOptions {
  cols?: number;
  rows?: number;
  /** socat binary; must be on PATH by default. */
  socat?: string;
}

/**
 * Spawns socat under a pty connected to the console socket and returns the pty: whatever the
 * guest writes is readable with onData, whatever is written goes to the guest. Tests use this.
 * `rawer` keeps the pty from echoing or translating (the guest's tty does that).
 */
export function openConsolePty(consoleSockPath: string, opts: ConsolePtyOptions = {}): pty.IPty {
  return pty.spawn(opts.socat ?? 'socat', ['-,rawer', `UNIX-CONNECT:${consoleSockPath}`], {
    name: 'xterm-256color',
    cols: opts.cols ?? 80,
    rows: opts.rows ?? 24,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin' },
  });
}

export interface AttachConsoleOptions {
  stdin: NodeJS.ReadableStream & { isTTY?: boolean; setRawMode?: (mode: boolean) => unknown };
  stdout: NodeJS.WritableStream & { isTTY?: boolean; columns?: number; rows?: number };
  /** Byte that detaches; default Ctrl-] (0x1d). */
  escape?: number;
  /** Print the "escape character is ^]" banner; default true. */
  banner?: boolean;
  socat?: string;
}

export interface AttachResult {
  /** 'escape': the operator detached; 'closed': the console connection ended (VM gone). */
  reason: 'escape' | 'closed';
}

/** The CLI's `issu console <vm>`: resolves when the operator detaches or the VM goes away. */
export function attachConsole(consoleSockPath: string, opts: AttachConsoleOptions): Promise<AttachResult> {
  const escape = opts.escape ?? DEFAULT_ESCAPE;
  const { stdin, stdout } = opts;
  const term = openConsolePty(consoleSockPath, {
    cols: stdout.columns,
    rows: stdout.rows,
    socat: opts.socat,
  });
  const wasRaw = stdin.isTTY && typeof stdin.setRawMode === 'function';
  if (wasRaw) stdin.setRawMode?.(true);
  if (opts.banner !== false) {
    const caret = escape < 0x20 ? `^${String.fromCharCode(escape + 0x40)}` : String.fromCharCode(escape);
    stdout.write(`Connected to ${consoleSockPath}. Escape character is ${caret}\r\n`);
  }

  return new Promise<AttachResult>((resolve) => {
    let done = false;
    const onResize = () => {
      if (stdout.columns && stdout.rows) term.resize(stdout.columns, stdout.rows);
    };
    const finish = (reason: AttachResult['reason']) => {
      if (done) return;
      done = true;
      stdin.removeListener('data', onInput);
      stdout.removeListener('resize', onResize);
      if (wasRaw) stdin.setRawMode?.(false);
      dataSub.dispose();
      exitSub.dispose();
      if (reason === 'escape') {
        try {
          term.kill();
        } catch {
          // already exited
        }
      }
      resolve({ reason });
    };
    const onInput = (chunk: Buffer | string) => {
      const buf = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk;
      const i = buf.indexOf(escape);
      if (i < 0) {
        term.write(buf); // bytes as typed: a raw terminal may send non-UTF-8 sequences
        return;
      }
      if (i > 0) term.write(buf.subarray(0, i));
      finish('escape');
    };
    const dataSub = term.onData((d) => stdout.write(d));
    const exitSub = term.onExit(() => finish('closed'));
    stdin.on('data', onInput);
    stdout.on('resize', onResize);
    stdin.resume();
  });
}
