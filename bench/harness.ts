import { once } from 'node:events';
import { cpus, loadavg } from 'node:os';
import { Worker } from 'node:worker_threads';
import { ALL_METRICS, metricSpec, type MetricSpec, type Target } from './metrics.js';

export interface BenchOptions {
  readonly quick: boolean;
  readonly json: boolean;
  /** Metric-name prefixes to run; empty runs everything. */
  readonly only: readonly string[];
}

export interface MetricValue {
  readonly value: number;
  readonly unit: string;
}

/** A group whose piece is missing at run time (not an error: its rows are reported as not measured). */
export class Unavailable extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'Unavailable';
  }
}

/** What a group sees: the run's mode, where to put figures, and fixtures shared between groups. */
export class BenchContext {
  readonly metrics = new Map<string, MetricValue>();
  readonly env: Record<string, unknown> = {};
  readonly notes: string[] = [];
  private readonly fixtures = new Map<string, Promise<unknown>>();

  constructor(readonly options: BenchOptions) {}

  get quick(): boolean {
    return this.options.quick;
  }

  /** Whether `name` passes --only. */
  wants(name: string): boolean {
    return this.options.only.length === 0 || this.options.only.some((p) => name.startsWith(p));
  }

  /** Records a figure; its unit comes from the catalogue, so a name not in it is a bug. */
  record(name: string, value: number): void {
    const spec = metricSpec(name);
    if (spec === undefined) throw new Error(`metric ${name} is not in bench/metrics.ts`);
    if (!Number.isFinite(value)) throw new Error(`metric ${name} is not finite: ${value}`);
    if (this.wants(name)) this.metrics.set(name, { value, unit: spec.unit });
  }

  note(text: string): void {
    this.notes.push(text);
  }

  /** Builds a fixture once per run, whichever group asks first. */
  fixture<T>(key: string, build: () => Promise<T>): Promise<T> {
    let f = this.fixtures.get(key) as Promise<T> | undefined;
    if (f === undefined) {
      f = build();
      this.fixtures.set(key, f);
    }
    return f;
  }

  /** Progress on stderr, so stdout stays one JSON object in --json mode. */
  progress(text: string): void {
    process.stderr.write(`bench: ${text}\n`);
  }
}

export interface BenchGroup {
  /** Prefix shared by the group's metrics. */
  readonly name: string;
  /** Every metric the group may emit, for --only. */
  readonly emits: readonly string[];
  run(ctx: BenchContext): Promise<void>;
}

// ---- statistics ----

/** The q-quantile (0..1) of `values`, nearest rank; sorts a copy. */
export function quantile(values: ArrayLike<number>, q: number): number {
  const sorted = Float64Array.from(values).sort();
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[rank]!;
}

export function median(values: ArrayLike<number>): number {
  return quantile(values, 0.5);
}

/** Keeps results alive so the JIT cannot drop the loops that computed them. */
let sink = 0;
export function consume(value: number): void {
  sink = (sink + value) | 0;
}
export function sinkValue(): number {
  return sink;
}

export interface LoopOptions {
  /** Iterations per sample. */
  readonly iterations: number;
  /** Samples kept (the median is reported). */
  readonly samples: number;
  /** Samples run and thrown away first, so the code is optimised before it is timed. */
  readonly warmup: number;
}

/**
 * Median nanoseconds per iteration of `loop(n)`, which must run n iterations and return a value
 * that depends on them. Each sample is one timed call, so timer cost is spread over n.
 */
export function nsPerOp(loop: (n: number) => number, options: LoopOptions): number {
  for (let i = 0; i < options.warmup; i++) consume(loop(options.iterations));
  const samples = new Float64Array(options.samples);
  for (let s = 0; s < options.samples; s++) {
    const t0 = performance.now();
    consume(loop(options.iterations));
    samples[s] = ((performance.now() - t0) * 1e6) / options.iterations;
  }
  return median(samples);
}

export interface TimedLoop {
  /** Runs n iterations; returns a value that depends on them. */
  readonly loop: (n: number) => number;
  readonly iterations: number;
}

/**
 * Median ns per iteration of several loops sampled in turn (A, B, A, B, ...), so a figure and the
 * limit it is compared to see the same machine: on a shared host, load changes within seconds.
 */
export function interleaved(cases: readonly TimedLoop[], samples: number, warmup: number): number[] {
  for (let w = 0; w < warmup; w++) for (const c of cases) consume(c.loop(c.iterations));
  const series = cases.map(() => new Float64Array(samples));
  for (let s = 0; s < samples; s++) {
    cases.forEach((c, k) => {
      const t0 = performance.now();
      consume(c.loop(c.iterations));
      series[k]![s] = ((performance.now() - t0) * 1e6) / c.iterations;
    });
  }
  return series.map((x) => median(x));
}

/** Cost of one performance.now() call, in ns. */
export function timerCost(): number {
  return nsPerOp(
    (n) => {
      let acc = 0;
      for (let i = 0; i < n; i++) acc += performance.now();
      return acc;
    },
    { iterations: 100_000, samples: 5, warmup: 2 },
  );
}

/** xorshift32: the same pseudo-random sequence in every run and every thread. */
export function xorshift(seed: number): () => number {
  let x = seed | 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

/** A spread of guest page frames for IOVA page i: neighbours land far apart, as after long uptime. */
export function scatteredFrame(i: number, frames: number): number {
  return (Math.imul(i, 0x9e3779b1) >>> 0) % frames;
}

// ---- workers ----

/** A compiled bench worker: dist/bench/workers/NAME.js, next to this module's compiled form. */
export function benchWorkerUrl(name: string): URL {
  const here = import.meta.url;
  if (here.endsWith('.ts')) return new URL(`../dist/bench/workers/${name}.js`, here);
  return new URL(`./workers/${name}.js`, here);
}

/** Starts a bench worker and waits until it runs. */
export async function startWorker(name: string, workerData: unknown): Promise<Worker> {
  const worker = new Worker(benchWorkerUrl(name), { workerData, name: `bench:${name}` });
  await once(worker, 'online');
  return worker;
}

/** Runs a worker that posts one result and ends; terminates it in every case. */
export async function runWorker<T>(name: string, workerData: unknown): Promise<T> {
  const worker = new Worker(benchWorkerUrl(name), { workerData, name: `bench:${name}` });
  try {
    return await new Promise<T>((resolve, reject) => {
      worker.once('message', (m: T) => resolve(m));
      worker.once('error', reject);
      worker.once('exit', (code) => reject(new Error(`bench worker ${name} exited with code ${code} before answering`)));
    });
  } finally {
    await worker.terminate();
  }
}

// ---- output ----

export function environment(options: BenchOptions): Record<string, unknown> {
  const list = cpus();
  return {
    node: process.version,
    cpu: list[0]?.model ?? 'unknown',
    cores: list.length,
    date: new Date().toISOString(),
    quick: options.quick,
    // Other work on a shared host shows here; read every figure with it.
    loadavg_1m: Number(loadavg()[0]!.toFixed(2)),
  };
}

function formatValue(value: number): string {
  const abs = Math.abs(value);
  if (abs >= 1e6) return value.toExponential(3);
  if (abs >= 100) return value.toFixed(0);
  if (abs >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

function targetText(t: Target): string {
  return t.ref === undefined ? `${t.op} ${formatValue(t.factor)}` : `${t.op} ${t.factor}× ${t.ref}`;
}

/** Whether `target` holds; undefined when its reference was not measured. */
export function targetMet(t: Target, value: number, metrics: ReadonlyMap<string, MetricValue>): boolean | undefined {
  let bound = t.factor;
  if (t.ref !== undefined) {
    const ref = metrics.get(t.ref);
    if (ref === undefined) return undefined;
    bound *= ref.value;
  }
  return t.op === '>=' ? value >= bound : value <= bound;
}

/** The human table: each figure beside what it is compared to, the ratio, and its targets. */
export function formatTable(ctx: BenchContext): string {
  const rows: string[][] = [['metric', 'value', 'unit', 'compared to', 'ratio', 'target', 'met']];
  const specs: MetricSpec[] = [...ALL_METRICS];
  for (const spec of specs) {
    if (!ctx.wants(spec.name)) continue;
    const m = ctx.metrics.get(spec.name);
    if (m === undefined) {
      const why = spec.implemented ? 'not measured in this run' : `not measured yet: needs ${spec.needs ?? 'its piece'}`;
      rows.push([spec.name, '—', spec.unit, why, '', '', '']);
      continue;
    }
    let compared = '';
    let ratio = '';
    if (spec.compareTo !== undefined) {
      const ref = ctx.metrics.get(spec.compareTo);
      compared = ref === undefined ? `${spec.compareTo} (not measured)` : `${spec.compareTo} = ${formatValue(ref.value)} ${ref.unit}`;
      if (ref !== undefined && ref.value !== 0) ratio = `${formatValue(m.value / ref.value)}×`;
    }
    const targets = spec.targets ?? [];
    const met = targets.map((t) => {
      const ok = targetMet(t, m.value, ctx.metrics);
      return ok === undefined ? '?' : ok ? 'yes' : 'NO';
    });
    rows.push([spec.name, formatValue(m.value), m.unit, compared, ratio, targets.map(targetText).join('; '), met.join('; ')]);
  }
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  const lines = rows.map((r) => r.map((cell, c) => (c === 1 || c === 4 ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!))).join('  ').trimEnd());
  lines.splice(1, 0, widths.map((w) => '-'.repeat(w)).join('  '));
  return lines.join('\n');
}
