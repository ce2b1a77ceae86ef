/** A bad command line: printed as one line, exit code 2. */
export class UsageError extends Error {
  readonly code = 'EUSAGE' as const;
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

export interface ParsedArgs {
  readonly flags: ReadonlySet<string>;
  readonly values: ReadonlyMap<string, string>;
  readonly positionals: readonly string[];
}

/**
 * Parses `--flag`, `--name value` / `--name=value` and positionals against the options a command
 * declares; anything else is a UsageError naming it.
 */
export function parseArgs(argv: readonly string[], spec: { flags?: readonly string[]; values?: readonly string[] }): ParsedArgs {
  const flags = new Set<string>();
  const values = new Map<string, string>();
  const positionals: string[] = [];
  const knownFlags = new Set(spec.flags ?? []);
  const knownValues = new Set(spec.values ?? []);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith('-') || arg === '-') {
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq >= 0 ? arg.slice(0, eq) : arg;
    if (knownFlags.has(name)) {
      if (eq >= 0) throw new UsageError(`${name} takes no value`);
      flags.add(name);
    } else if (knownValues.has(name)) {
      const value = eq >= 0 ? arg.slice(eq + 1) : argv[++i];
      if (value === undefined || value === '') throw new UsageError(`${name} needs a value`);
      values.set(name, value);
    } else {
      throw new UsageError(`unknown option ${name}`);
    }
  }
  return { flags, values, positionals };
}
