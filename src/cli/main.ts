#!/usr/bin/env node
import { parseArgs, UsageError } from './args.js';
import { runDemo } from './demo.js';
import { runInfo } from './info.js';
import { runReplay } from './replay.js';

const HELP = `viommu — a virtio-iommu device model over an emulated iommufd, in Node.js workers

Usage:
  viommu demo [--json]        run a scripted guest and narrate what happens
  viommu info [--json]        features, config, formats and limits of the emulated IOMMU
  viommu replay [--json] [--record] [--transport mmio|pci] FILE...
                              replay guest or backend fixtures
  viommu --help               this text; every command also takes --help

Environment:
  VIOMMU_LOG=level            log level on stderr (trace, debug, info, warn, error, silent;
                              default warn, error for demo)
  VIOMMU_LOG_FORMAT=pretty|json   readable lines or JSON (default: pretty on a terminal)`;

const COMMAND_HELP: Record<string, string> = {
  demo: `viommu demo [--json]

Starts a machine (guest memory and device workers), drives it from a scripted guest driver and
prints what happens at each step. --json prints one JSON document instead.`,
  info: `viommu info [--json]

Prints what the emulated IOMMU offers: the virtio-iommu features, config and PROBE properties
(read from a live device model), the backend's page sizes and limits, the consumer devices and the
fixture format versions. --json prints one JSON object.`,
  replay: `viommu replay [--json] [--record] [--transport mmio|pci] FILE...

Replays fixtures (docs/fixtures.md); each file's "format" says which kind. A guest fixture runs on
a fresh machine: the virtio-iommu in its worker behind the transport (default mmio) and one DMA
endpoint worker per endpoint, driven by the guest driver through the real queues. A backend
fixture drives the iommufd-style backend directly, translations in a consumer worker. Prints one
line per step and "N passed, N failed".
  --json       one JSON object per file instead
  --record     write each file back with every expectation replaced by what was observed
Exit code: 0 when every step of every file matched, 1 otherwise, 2 for a bad command line.`,
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
      // The story provokes faults on purpose; device warnings about them would only interleave
      // with it. VIOMMU_LOG=warn (or lower) shows them.
      process.env.VIOMMU_LOG ??= 'error';
      if (args.positionals.length > 0) throw new UsageError(`demo takes no arguments, got ${args.positionals[0]}`);
      return runDemo({ json: args.flags.has('--json') });
    }
    case 'info': {
      const args = parseArgs(rest, { flags: ['--json'] });
      if (args.positionals.length > 0) throw new UsageError(`info takes no arguments, got ${args.positionals[0]}`);
      return runInfo({ json: args.flags.has('--json') });
    }
    case 'replay': {
      const args = parseArgs(rest, { flags: ['--json', '--record'], values: ['--transport'] });
      if (args.positionals.length === 0) throw new UsageError('replay needs at least one fixture file');
      const transport = args.values.get('--transport') ?? 'mmio';
      if (transport !== 'mmio' && transport !== 'pci') throw new UsageError(`--transport must be mmio or pci, got ${transport}`);
      return runReplay({ files: args.positionals, json: args.flags.has('--json'), record: args.flags.has('--record'), transport });
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
