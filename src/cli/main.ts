#!/usr/bin/env node
import { parseArgs, UsageError } from './args.js';
import { runDemo } from './demo.js';

const HELP = `viommu — a virtio-iommu device model over an emulated iommufd, in Node.js workers

Usage:
  viommu demo [--json]        run a scripted guest and narrate what happens
  viommu --help               this text; every command also takes --help

Environment:
  VIOMMU_LOG=level            JSON logs on stderr (trace, debug, info, warn, error, silent)`;

const COMMAND_HELP: Record<string, string> = {
  demo: `viommu demo [--json]

Starts a machine (guest memory and device workers), drives it from a scripted guest driver and
prints what happens at each step. --json prints one JSON document instead.`,
};

export async function main(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(`${HELP}\n`);
    return command === undefined ? 2 : 0;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    const help = COMMAND_HELP[command];
    if (help === undefined) throw new UsageError(`unknown command ${JSON.stringify(command)} (try viommu --help)`);
    process.stdout.write(`${help}\n`);
    return 0;
  }
  switch (command) {
    case 'demo': {
      const args = parseArgs(rest, { flags: ['--json'] });
      if (args.positionals.length > 0) throw new UsageError(`demo takes no arguments, got ${args.positionals[0]}`);
      return runDemo({ json: args.flags.has('--json') });
    }
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)} (try viommu --help)`);
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    if (err instanceof UsageError) {
      process.stderr.write(`viommu: ${err.message}\n`);
      process.exitCode = 2;
    } else {
      process.stderr.write(`viommu: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exitCode = 1;
    }
  },
);
