import { afterEach, describe, expect, it } from 'vitest';
import { Worker } from 'node:worker_threads';
import { FaultConsumer, FaultReason, createFaultQueueBuffer, faultIova, type FaultRecord } from '../src/ioasid/fault-queue.js';
import { QuiescenceOwner, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { EntryFlag, IoPageTable, LEVEL_PAGES, PAGE_SIZE, TablePool } from '../src/pagetable/index.js';
import {
  StressControl,
  StressCounter,
  VOLATILE_ROUND_PAGES,
  stressControlWords,
  type StressLayout,
  type StressResult,
  type TranslateWorkerStart,
} from '../src/runtime/translate-worker-protocol.js';
import { workerUrl } from '../src/runtime/worker-url.js';
import { createSignalBuffer } from '../src/virtio/signals.js';

const RW = EntryFlag.READ | EntryFlag.WRITE;
const PAGES_2M = LEVEL_PAGES[1]!;
/** Pages of the volatile range mapped in the 4 KiB rounds (the workers aim there most). */
const SMALL_ROUND_PAGES = 48;

const workers: Worker[] = [];
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.terminate()));
});

const pause = new Int32Array(new SharedArrayBuffer(4));
/** Sleeps in 1 ms steps until `done()` or `limit` steps: leaves the cores to the workers. */
function waitFor(done: () => boolean, limit: number): boolean {
  for (let i = 0; i < limit; i++) {
    if (done()) return true;
    Atomics.wait(pause, 0, 0, 1);
  }
  return done();
}

interface Setup {
  pool: TablePool;
  table: IoPageTable;
  owner: QuiescenceOwner;
  faults: FaultConsumer;
  ctl: Int32Array;
  layout: StressLayout;
  results: Promise<StressResult>[];
  counter(worker: number, field: number): number;
  sum(field: number): number;
  mapRound(round: number): void;
}

function setup(count: number): Setup {
  const pool = new TablePool({ maxTables: 1024 });
  expect(pool.ensure(IoPageTable.CREATE_TABLES)).toBe(true);
  const table = new IoPageTable(pool, 1);
  const map = (pfn: number, pages: number, guest: number, huge: boolean): void => {
    expect(pool.ensure(table.tablesForMap(pfn, pages, guest, huge))).toBe(true);
    table.map(pfn, pages, guest, RW, huge);
  };
  const layout: StressLayout = {
    header: table.header,
    // One 2 MiB leaf followed by 64 small pages, guest-contiguous: every stable DMA is one span.
    stablePfn: 2 * PAGES_2M,
    stablePages: PAGES_2M + 64,
    stableGuest: 16 * PAGES_2M,
    volatilePfn: 8 * PAGES_2M,
    volatilePages: VOLATILE_ROUND_PAGES,
    volatileGuest: 64 * PAGES_2M,
  };
  map(layout.stablePfn, layout.stablePages, layout.stableGuest, true);
  const quiescence = createQuiescenceBuffer(8);
  const faultBuffer = createFaultQueueBuffer(256);
  const control = new SharedArrayBuffer(stressControlWords(count) * 4);
  const ctl = new Int32Array(control);
  Atomics.store(ctl, StressControl.DONE_ROUND, -1);
  const wake = createSignalBuffer();
  const results: Promise<StressResult>[] = [];
  for (let index = 0; index < count; index++) {
    const start: TranslateWorkerStart = {
      mode: 'stress',
      index,
      seed: 0x5eed + index * 7919,
      pool: pool.buffer,
      quiescence,
      faults: faultBuffer,
      wake,
      control,
      layout,
      cache: 'translator',
    };
    const worker = new Worker(workerUrl('translate-worker'), { workerData: start });
    workers.push(worker);
    results.push(new Promise((resolve, reject) => (worker.once('message', resolve), worker.once('error', reject))));
  }
  const counter = (worker: number, field: number): number => Atomics.load(ctl, StressControl.WORKERS_BASE + worker * StressCounter.STRIDE + field);
  return {
    pool,
    table,
    owner: new QuiescenceOwner(quiescence),
    faults: new FaultConsumer(faultBuffer),
    ctl,
    layout,
    results,
    counter,
    sum: (field) => Array.from({ length: count }, (_, i) => counter(i, field)).reduce((a, b) => a + b, 0),
    // Odd rounds: one 2 MiB leaf over the whole range; even rounds: the first pages, 4 KiB each.
    mapRound(round: number): void {
      const guest = layout.volatileGuest + round * VOLATILE_ROUND_PAGES;
      if (round % 2 === 1) map(layout.volatilePfn, VOLATILE_ROUND_PAGES, guest, true);
      else map(layout.volatilePfn, SMALL_ROUND_PAGES, guest, false);
    },
  };
}

/** Every worker did at least `n` more of `field` than in `before`. */
function allAdvanced(s: Setup, before: number[], field: number, n: number): boolean {
  return before.every((b, i) => s.counter(i, field) >= b + n);
}

function snapshot(s: Setup, count: number, field: number): number[] {
  return Array.from({ length: count }, (_, i) => s.counter(i, field));
}

async function stop(s: Setup): Promise<StressResult[]> {
  Atomics.store(s.ctl, StressControl.STOP, 1);
  return Promise.all(s.results);
}

describe('strict unmap with four translating workers', () => {
  it('no DMA begun after an unmap returned uses the removed range; stable pages always translate', async () => {
    const WORKERS = 4;
    const ROUNDS = 60;
    const s = setup(WORKERS);
    expect(waitFor(() => Atomics.load(s.ctl, StressControl.READY) === WORKERS, 10_000)).toBe(true);
    const drained: FaultRecord[] = [];
    const keep = (r: FaultRecord): void => void drained.push({ ...r });
    const stragglers: unknown[] = [];
    let progressMissed = 0;
    let tablesReclaimed = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const okBefore = snapshot(s, WORKERS, StressCounter.VOLATILE_OK);
      s.mapRound(round);
      // Let every worker use (and cache) this round's mapping before it goes away.
      if (!waitFor(() => allAdvanced(s, okBefore, StressCounter.VOLATILE_OK, 3), 2000)) progressMissed++;
      s.table.unmap(s.layout.volatilePfn, s.layout.volatilePfn + VOLATILE_ROUND_PAGES - 1);
      const result = s.owner.waitQuiescent(s.owner.bumpEpoch(), { timeoutMs: 10_000 });
      stragglers.push(...result.stragglers);
      // Safe only now: no walker can still hold a table freed by the unmap.
      tablesReclaimed += s.pool.reclaim();
      Atomics.store(s.ctl, StressControl.DONE_ROUND, round);
      // Let every worker run DMAs that began after the unmap: the ones that must not see it.
      const itBefore = snapshot(s, WORKERS, StressCounter.ITERATIONS);
      if (!waitFor(() => allAdvanced(s, itBefore, StressCounter.ITERATIONS, 20), 2000)) progressMissed++;
      s.faults.drain(keep);
    }
    const results = await stop(s);
    s.faults.drain(keep);

    expect(stragglers).toEqual([]);
    expect(s.sum(StressCounter.VIOLATIONS)).toBe(0);
    expect(s.sum(StressCounter.STABLE_FAILURES)).toBe(0);
    expect(s.sum(StressCounter.WRONG_PAGE)).toBe(0);
    // The experiment really ran: workers translated the volatile range, cached, and saw epochs.
    expect(progressMissed).toBe(0);
    expect(s.sum(StressCounter.VOLATILE_OK)).toBeGreaterThan(ROUNDS * 3);
    expect(tablesReclaimed).toBeGreaterThan(0);
    for (const r of results) {
      expect(r.epochChanges).toBeGreaterThan(0);
      expect(r.iotlbHits).toBeGreaterThan(0);
    }
    // Every fault was a volatile-range MAPPING fault, delivered or counted as dropped.
    const vStart = BigInt(s.layout.volatilePfn * PAGE_SIZE);
    const vEnd = vStart + BigInt((VOLATILE_ROUND_PAGES + 1) * PAGE_SIZE);
    const bad = drained.filter((r) => r.reason !== FaultReason.MAPPING || !(r.device >= 0 && r.device < WORKERS) || faultIova(r) < vStart || faultIova(r) >= vEnd);
    expect(bad).toEqual([]);
    const stats = s.faults.stats();
    expect(drained.length).toBe(stats.appended);
    expect(stats.appended + stats.dropped).toBe(s.sum(StressCounter.FAULTS));
  });

  it('control: the same workers do use removed translations when the owner skips the epoch bump', async () => {
    const WORKERS = 2;
    const s = setup(WORKERS);
    expect(waitFor(() => Atomics.load(s.ctl, StressControl.READY) === WORKERS, 10_000)).toBe(true);
    for (let round = 0; round < 40 && s.sum(StressCounter.VIOLATIONS) === 0; round++) {
      const okBefore = snapshot(s, WORKERS, StressCounter.VOLATILE_OK);
      s.mapRound(round);
      waitFor(() => allAdvanced(s, okBefore, StressCounter.VOLATILE_OK, 3), 2000);
      // Broken owner: unmaps but neither bumps the epoch nor waits.
      s.table.unmap(s.layout.volatilePfn, s.layout.volatilePfn + VOLATILE_ROUND_PAGES - 1);
      Atomics.store(s.ctl, StressControl.DONE_ROUND, round);
      const itBefore = snapshot(s, WORKERS, StressCounter.ITERATIONS);
      waitFor(() => allAdvanced(s, itBefore, StressCounter.ITERATIONS, 20), 2000);
    }
    await stop(s);
    expect(s.sum(StressCounter.VIOLATIONS)).toBeGreaterThan(0);
  });
});
