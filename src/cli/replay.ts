import { readFile, rename, writeFile } from 'node:fs/promises';
import type { TransportKind } from '../runtime/device-worker-protocol.js';
import { isBackendFixtureDocument, parseBackendFixture, type BackendFixture } from '../replay/backend-fixture.js';
import { replayBackendFixture } from '../replay/backend-runner.js';
import { parseGuestFixture, type GuestFixture } from '../replay/guest-fixture.js';
import { rememberSource, replayGuestFixture, type ReplayResult, type StepResult } from '../replay/guest-runner.js';
import { FixtureError } from '../replay/values.js';
import { WorkerReplayMachine } from '../replay/worker-machine.js';

export interface ReplayOptions {
  readonly files: readonly string[];
  readonly json: boolean;
  readonly record: boolean;
  readonly transport: TransportKind;
  readonly write?: (line: string) => void;
}

const hex = (_k: string, v: unknown): unknown => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v);

/** A list of acceptable statuses with one entry reads as that status. */
function simplify(value: unknown): unknown {
  if (!Array.isArray(value)) return value;
  if (value.length === 1 && typeof value[0] === 'string') return value[0];
  return value.map(simplify);
}

function show(raw: unknown): string {
  const value = simplify(raw);
  if (value === null || value === undefined) return '-';
  return typeof value === 'string' ? value : JSON.stringify(value, hex);
}

/** One line per step: index, op, what was expected, what happened, the verdict. */
export function stepLine(s: StepResult & { readonly skipReason?: string }): string {
  const verdict = s.skipped ? 'skipped' : s.ok ? 'ok' : 'FAIL';
  const note = s.skipped ? ` (${s.skipReason ?? 'this machine cannot issue device DMA'})` : '';
  return `${String(s.index).padStart(4)} ${s.op.padEnd(11)} expect ${show(s.expect).padEnd(10)} actual ${show(s.actual).padEnd(10)} ${verdict}${note}`;
}

/** The summary line of the fixture format: `N passed, N failed` (`, N skipped` when any were). */
export function summaryLine(r: Pick<ReplayResult, 'passed' | 'failed' | 'skipped'>): string {
  return `${r.passed} passed, ${r.failed} failed${r.skipped > 0 ? `, ${r.skipped} skipped` : ''}`;
}

/** A fixture file, of either kind: the `format` field tells them apart. */
type Loaded = { readonly kind: 'guest'; readonly fixture: GuestFixture } | { readonly kind: 'backend'; readonly fixture: BackendFixture; readonly doc: Record<string, unknown> };

async function load(file: string): Promise<Loaded> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new FixtureError('$', `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new FixtureError('$', `${file} is not JSON: ${(err as Error).message}`);
  }
  if (isBackendFixtureDocument(doc)) return { kind: 'backend', fixture: parseBackendFixture(doc), doc: doc as Record<string, unknown> };
  const fixture = parseGuestFixture(doc);
  rememberSource(fixture, doc as Record<string, unknown>);
  return { kind: 'guest', fixture };
}

/**
 * `viommu replay`: each fixture on a fresh machine (the virtio-iommu worker behind the chosen
 * transport, one DMA endpoint worker per endpoint). Exit code 0 only when every step of every
 * file matched; a file that cannot be read or parsed counts as failed.
 */
export async function runReplay(options: ReplayOptions): Promise<number> {
  const write = options.write ?? ((line: string) => process.stdout.write(`${line}\n`));
  let allOk = true;
  for (const file of options.files) {
    let loaded: Loaded;
    try {
      loaded = await load(file);
    } catch (err) {
      if (!(err instanceof FixtureError)) throw err;
      allOk = false;
      if (options.json) write(JSON.stringify({ file, error: err.message }));
      else write(`${file}: invalid fixture: ${err.message}`);
      continue;
    }
    let result: ReplayResult;
    if (loaded.kind === 'backend') {
      // A backend fixture drives the ioasid backend directly: no virtio, so no transport.
      if (!options.json) write(`== ${loaded.fixture.name} (${file}, ioasid backend)`);
      result = await replayBackendFixture(loaded.fixture, { source: loaded.doc });
    } else {
      const { fixture } = loaded;
      const machine = await WorkerReplayMachine.forFixture(fixture, options.transport);
      try {
        if (!options.json) write(`== ${fixture.name} (${file}, virtio-${options.transport})`);
        result = await replayGuestFixture(fixture, machine);
      } finally {
        await machine.close();
      }
    }
    if (result.failed > 0) allOk = false;
    if (options.json) {
      const steps = result.steps.map(({ index, op, expect, actual, ok, skipped }) => ({ index, op, expect, actual, ok, skipped }));
      write(JSON.stringify({ name: result.name, file, steps, passed: result.passed, failed: result.failed, skipped: result.skipped }, hex));
    } else {
      for (const s of result.steps) write(stepLine(s));
      write(summaryLine(result));
    }
    if (options.record) {
      // Written beside and renamed over, so an interrupted run never leaves half a fixture.
      const tmp = `${file}.recording`;
      await writeFile(tmp, `${JSON.stringify(result.recorded, hex, 2)}\n`);
      await rename(tmp, file);
      if (!options.json) write(`recorded ${file}`);
    }
  }
  return allOk ? 0 : 1;
}
