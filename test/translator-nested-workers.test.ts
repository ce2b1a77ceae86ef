import { afterEach, describe, expect, it } from 'vitest';
import { Worker } from 'node:worker_threads';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { X86PageTableBuilder, pagesFromAllocator, type IovaRange } from '../guest-fixtures/pagetable/x86-64-builder.js';
import { FaultConsumer, FaultReason, createFaultQueueBuffer, faultIova, type FaultRecord } from '../src/ioasid/fault-queue.js';
import { HwptAllocFlag, HwptDataType, IommufdHost, IoasMapFlag, encodeVtdS1, type Context } from '../src/ioasid/index.js';
import { QuiescenceOwner, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { GuestMemory } from '../src/memory/index.js';
import type { NestedStressLayout, NestedStressResult, NestedStressStart } from '../src/runtime/nested-translate-protocol.js';
import { StressControl, StressCounter, stressControlWords } from '../src/runtime/translate-worker-protocol.js';
import { workerUrl } from '../src/runtime/worker-url.js';
import { createSignalBuffer } from '../src/virtio/signals.js';
import { X86_PAGE_4K } from '../src/pagetable/x86-64.js';

/*
 * Strict invalidation with four device workers translating through a nested attachment (two on
 * the RID, two on a PASID of the same nested HWPT): every round the test thread, as the guest,
 * remaps or unmaps the volatile pages of its stage-1 table and calls hwptInvalidate for exactly
 * those pages. No DMA begun after hwptInvalidate returned may use the old entries; the stable
 * pages keep translating (and stay cached: range invalidations, not flushes).
 */

const MIB = 1 << 20;
const GUEST_RAM = 32 * MIB;
const HOST_BASE = 32 * MIB;
const PASID = 7;
const ROUND_PAGES = 64;
const LAYOUT: NestedStressLayout = {
  stableIova: 0x4000_0000,
  stablePages: 64,
  stableGpa: 4 * MIB,
  volatileIova: 0x4020_0000,
  volatilePages: 48,
  volatileGpa: 8 * MIB,
  roundPages: ROUND_PAGES,
  hostBase: HOST_BASE,
};
const USER_RW = { writable: true, user: true, executable: false };

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
  ctx: Context;
  nested: number;
  builder: X86PageTableBuilder;
  ctl: Int32Array;
  faults: FaultConsumer;
  results: Promise<NestedStressResult>[];
  counter(worker: number, field: number): number;
  sum(field: number): number;
  mapRound(round: number): IovaRange[];
  unmapVolatile(): IovaRange[];
}

function setup(count: number): Setup {
  const memory = GuestMemory.create(HOST_BASE + GUEST_RAM);
  const host = new IommufdHost(memory, { devices: [{ name: 'dev0', group: 'g0', pasidBits: 20 }], autoReclaim: false });
  const ctx = host.open();
  const quiescence = createQuiescenceBuffer(8);
  ctx.attachQuiescence(new QuiescenceOwner(quiescence), { timeoutMs: 10_000 });
  const ioas = ctx.ioasAlloc();
  ctx.ioasMap(ioas, { gpa: HOST_BASE, length: BigInt(GUEST_RAM), iova: 0n, flags: IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE | IoasMapFlag.FIXED_IOVA });
  const dev = ctx.deviceBind('dev0');
  const parent = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT | HwptAllocFlag.PASID });
  const builder = new X86PageTableBuilder({
    allocator: pagesFromAllocator(new GuestAllocator(28 * MIB, 4 * MIB)),
    write: (gpa, value) => memory.writeU64(HOST_BASE + gpa, value),
  });
  const nested = ctx.hwptAlloc(dev, parent, { flags: HwptAllocFlag.PASID, dataType: HwptDataType.VTD_S1, data: encodeVtdS1(BigInt(builder.root), 48) });
  ctx.deviceAttach(dev, nested);
  ctx.deviceAttach(dev, nested, PASID);
  for (let i = 0; i < LAYOUT.stablePages; i++) builder.map(LAYOUT.stableIova + i * X86_PAGE_4K, LAYOUT.stableGpa + i * X86_PAGE_4K, X86_PAGE_4K, USER_RW);

  // Large enough to keep every fault of the run: the check below needs both kinds, not the first 256.
  const faultBuffer = createFaultQueueBuffer(1 << 16);
  const control = new SharedArrayBuffer(stressControlWords(count) * 4);
  const ctl = new Int32Array(control);
  Atomics.store(ctl, StressControl.DONE_ROUND, -1);
  const wake = createSignalBuffer();
  const results: Promise<NestedStressResult>[] = [];
  for (let index = 0; index < count; index++) {
    const start: NestedStressStart = {
      index,
      seed: 0x5eed + index * 7919,
      shared: ctx.describeShared(),
      row: ctx.deviceRow(dev),
      pasid: index % 2 === 0 ? undefined : PASID,
      quiescence,
      faults: faultBuffer,
      wake,
      control,
      layout: LAYOUT,
    };
    const worker = new Worker(workerUrl('nested-translate-worker'), { workerData: start });
    workers.push(worker);
    results.push(new Promise((resolve, reject) => (worker.once('message', resolve), worker.once('error', reject))));
  }
  const counter = (worker: number, field: number): number => Atomics.load(ctl, StressControl.WORKERS_BASE + worker * StressCounter.STRIDE + field);
  return {
    ctx,
    nested,
    builder,
    ctl,
    faults: new FaultConsumer(faultBuffer),
    results,
    counter,
    sum: (field) => Array.from({ length: count }, (_, i) => counter(i, field)).reduce((a, b) => a + b, 0),
    mapRound(round) {
      const ranges: IovaRange[] = [];
      for (let i = 0; i < LAYOUT.volatilePages; i++) {
        const gpa = LAYOUT.volatileGpa + (round * ROUND_PAGES + i) * X86_PAGE_4K;
        ranges.push(...builder.map(LAYOUT.volatileIova + i * X86_PAGE_4K, gpa, X86_PAGE_4K, USER_RW));
      }
      return ranges;
    },
    unmapVolatile: () => builder.unmap(LAYOUT.volatileIova, LAYOUT.volatilePages * X86_PAGE_4K),
  };
}

function snapshot(s: Setup, count: number, field: number): number[] {
  return Array.from({ length: count }, (_, i) => s.counter(i, field));
}

function allAdvanced(s: Setup, before: number[], field: number, n: number): boolean {
  return before.every((b, i) => s.counter(i, field) >= b + n);
}

async function stop(s: Setup): Promise<NestedStressResult[]> {
  Atomics.store(s.ctl, StressControl.STOP, 1);
  return Promise.all(s.results);
}

/**
 * Runs `rounds` rounds: each maps the volatile pages to the round's frames (odd rounds arrive
 * already mapped by the previous round's remap), lets every worker use them, then unmaps (even
 * rounds) or remaps to the next round's frames (odd rounds), invalidates unless told not to, and
 * reports the round done.
 */
function runRounds(s: Setup, count: number, rounds: number, invalidate: boolean, stopEarly: () => boolean): number {
  let progressMissed = 0;
  let mapped = false;
  for (let round = 0; round < rounds && !stopEarly(); round++) {
    const okBefore = snapshot(s, count, StressCounter.VOLATILE_OK);
    if (!mapped) s.mapRound(round);
    if (!waitFor(() => allAdvanced(s, okBefore, StressCounter.VOLATILE_OK, 3), 2000)) progressMissed++;
    const ranges = s.unmapVolatile();
    if (round % 2 === 1) {
      ranges.push(...s.mapRound(round + 1));
      mapped = true;
    } else {
      mapped = false;
    }
    if (invalidate) {
      const handled = s.ctx.hwptInvalidate(
        s.nested,
        ranges.map((r) => ({ addr: r.iova, npages: r.size >> 12n, flags: 0 })),
      );
      expect(handled).toBe(ranges.length);
    }
    Atomics.store(s.ctl, StressControl.DONE_ROUND, round);
    // Let every worker run DMAs that began after the invalidation: the ones that must not see it.
    const itBefore = snapshot(s, count, StressCounter.ITERATIONS);
    if (!waitFor(() => allAdvanced(s, itBefore, StressCounter.ITERATIONS, 20), 2000)) progressMissed++;
  }
  return progressMissed;
}

describe('strict hwptInvalidate with four workers on one nested HWPT (RID and PASID)', () => {
  it('no DMA begun after hwptInvalidate returned uses an invalidated stage-1 entry; stable pages stay right and cached', async () => {
    const WORKERS = 4;
    const ROUNDS = 40;
    const s = setup(WORKERS);
    expect(waitFor(() => Atomics.load(s.ctl, StressControl.READY) === WORKERS, 10_000)).toBe(true);
    const progressMissed = runRounds(s, WORKERS, ROUNDS, true, () => false);
    const drained: FaultRecord[] = [];
    const results = await stop(s);
    s.faults.drain((r) => void drained.push({ ...r }));

    expect(s.sum(StressCounter.VIOLATIONS)).toBe(0);
    expect(s.sum(StressCounter.STABLE_FAILURES)).toBe(0);
    expect(s.sum(StressCounter.WRONG_PAGE)).toBe(0);
    expect(progressMissed).toBe(0);
    expect(s.sum(StressCounter.VOLATILE_OK)).toBeGreaterThan(ROUNDS * 3);
    for (const r of results) {
      expect(r.epochChanges).toBeGreaterThan(0);
      expect(r.rangeInvalidations).toBeGreaterThan(0);
      // Invalidations of the volatile pages never flushed the IOTLB: the stable pages kept hitting.
      expect(r.flushes).toBe(0);
      expect(r.iotlbHits).toBeGreaterThan(r.iotlbMisses);
    }
    // Faults come from the volatile pages of the unmapped rounds, on the RID and on the PASID.
    const vStart = BigInt(LAYOUT.volatileIova);
    const vEnd = vStart + BigInt(LAYOUT.volatilePages * X86_PAGE_4K);
    const bad = drained.filter((r) => faultIova(r) < vStart || faultIova(r) >= vEnd || r.reason !== FaultReason.MAPPING || (r.pasid !== -1 && r.pasid !== PASID));
    expect(bad).toEqual([]);
    expect(new Set(drained.map((r) => r.pasid))).toEqual(new Set([-1, PASID]));
  });

  it('control: the same workers use invalidated stage-1 entries when the guest does not invalidate', async () => {
    const WORKERS = 2;
    const s = setup(WORKERS);
    expect(waitFor(() => Atomics.load(s.ctl, StressControl.READY) === WORKERS, 10_000)).toBe(true);
    runRounds(s, WORKERS, 20, false, () => s.sum(StressCounter.VIOLATIONS) > 0);
    await stop(s);
    expect(s.sum(StressCounter.VIOLATIONS)).toBeGreaterThan(0);
  });
});
