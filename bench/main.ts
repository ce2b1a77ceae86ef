// npm run bench [-- --quick] [-- --json] [-- --only PREFIX[,PREFIX]]: every figure of the project
// beside the physical limit or the naive baseline it is read against. See BENCHMARKS.md.
import { loadavg } from 'node:os';
import { baseline } from './baseline.js';
import { BenchContext, Unavailable, environment, formatTable, type BenchGroup, type BenchOptions } from './harness.js';
import { limits } from './limits.js';
import { migration } from './migration.js';
import { ALL_METRICS } from './metrics.js';
import { scale } from './scale.js';
import { nested, translate } from './translate.js';
import { virtio } from './virtio.js';
import { strictUnmapGroup, viommu } from './viommu.js';

/** In run order: limits first, so later groups run on a machine in the same state as theirs. */
const GROUPS: readonly BenchGroup[] = [limits, baseline, virtio, viommu, strictUnmapGroup, scale, translate, nested, migration];

const USAGE = 'usage: node dist/bench/main.js [--quick] [--json] [--only PREFIX[,PREFIX...]]';

function parseArgs(argv: readonly string[]): BenchOptions {
  let quick = false;
  let json = false;
  const only: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--quick') quick = true;
    else if (arg === '--json') json = true;
    else if (arg === '--only' || arg.startsWith('--only=')) {
      const value = arg === '--only' ? argv[++i] : arg.slice('--only='.length);
      if (value === undefined || value === '') throw new Error('--only needs a metric-name prefix');
      only.push(...value.split(',').filter((p) => p !== ''));
    } else if (arg === '--help' || arg === '-h') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    } else {
      throw new Error(`unknown argument ${arg}`);
    }
  }
  return { quick, json, only };
}

async function main(): Promise<number> {
  let options: BenchOptions;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const ctx = new BenchContext(options);
  Object.assign(ctx.env, environment(options));
  const started = performance.now();
  let failed = false;
  for (const group of GROUPS) {
    if (!group.emits.some((name) => ctx.wants(name))) continue;
    try {
      await group.run(ctx);
    } catch (err) {
      if (err instanceof Unavailable) {
        ctx.note(`${group.name}: not measured: ${err.message}`);
        continue;
      }
      failed = true;
      process.stderr.write(`bench: group ${group.name} failed: ${(err as Error).stack ?? String(err)}\n`);
    }
  }
  ctx.env.seconds = Number(((performance.now() - started) / 1000).toFixed(1));
  ctx.env.loadavg_1m_end = Number(loadavg()[0]!.toFixed(2));
  if (ctx.notes.length > 0) ctx.env.notes = ctx.notes;

  if (options.json) {
    const metrics: Record<string, { value: number; unit: string }> = {};
    // Catalogue order, so runs diff cleanly.
    for (const spec of ALL_METRICS) {
      const m = ctx.metrics.get(spec.name);
      if (m !== undefined) metrics[spec.name] = { value: Number(m.value.toPrecision(6)), unit: m.unit };
    }
    process.stdout.write(`${JSON.stringify({ metrics, env: ctx.env }, null, 2)}\n`);
  } else {
    const e = ctx.env;
    process.stdout.write(
      `node ${String(e.node)} on ${String(e.cpu)}, ${String(e.cores)} cores, ${options.quick ? 'quick' : 'full'} run, ${String(e.seconds)} s, ` +
        `load average ${String(e.loadavg_1m)} → ${String(e.loadavg_1m_end)}\n\n`,
    );
    process.stdout.write(`${formatTable(ctx)}\n`);
    if (ctx.notes.length > 0) process.stdout.write('\n');
    for (const note of ctx.notes) process.stdout.write(`note: ${note}\n`);
  }
  return failed ? 1 : 0;
}

process.exitCode = await main();
