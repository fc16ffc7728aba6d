/**
 * The options every issu command takes, before the command or after it (image commands accept
 * and ignore them: they need no agent). One definition for issu's front parser, its command
 * parser and the image commands.
 */
export const GLOBAL_OPTIONS = {
  socket: { type: 'string' },
  address: { type: 'string' },
  json: { type: 'boolean' },
  'timeout-ms': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const;

/**
 * Splits `argv` into the global options in front of the command and the rest (the command and
 * everything after it), so a command group's own flags never meet the global parser: `issu
 * --socket S image keygen --out D` gives `--out` to `image`. Throws `usage(message)` for an
 * option before the command that is not a global one, or one that lacks its value.
 */
export function splitGlobalOptions(argv: string[], usage: (m: string) => Error): { globals: string[]; rest: string[] } {
  const flags = new Map<string, 'string' | 'boolean'>();
  for (const [name, o] of Object.entries(GLOBAL_OPTIONS)) {
    flags.set(`--${name}`, o.type);
    if ('short' in o) flags.set(`-${o.short}`, o.type);
  }
  let i = 0;
  while (i < argv.length && argv[i].startsWith('-') && argv[i] !== '-') {
    const a = argv[i];
    if (a === '--') {
      i++;
      break;
    }
    const type = flags.get(a.split('=')[0]);
    if (!type) {
      throw usage(`unknown option '${a}' before the command; the options that go there are --socket PATH, --address H:P, --json, --timeout-ms N and --help`);
    }
    i += type === 'string' && !a.includes('=') ? 2 : 1;
  }
  if (i > argv.length) throw usage(`option '${argv[argv.length - 1]}' needs a value`);
  return { globals: argv.slice(0, i), rest: argv.slice(i) };
}
