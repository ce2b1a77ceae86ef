import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Worker } from 'node:worker_threads';
import {
  EpochChange,
  QuiescenceError,
  QuiescenceGlobal,
  QuiescenceOwner,
  QuiescenceSlot,
  QuiescenceWorker,
  SlotState,
  createQuiescenceBuffer,
  slotBase,
} from '../src/ioasid/quiescence.js';
import { workerUrl } from '../src/runtime/worker-url.js';
import { HoldCommand, HoldControl, type TranslateWorkerStart } from '../src/runtime/translate-worker-protocol.js';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

function words(buffer: SharedArrayBuffer): Int32Array {
  return new Int32Array(buffer);
}

describe('quiescence: registration', () => {
  it('hands out distinct slots, reports them, frees them on unregister, and refuses when full', () => {
    const buffer = createQuiescenceBuffer(3);
    const owner = new QuiescenceOwner(buffer);
    const a = QuiescenceWorker.register(buffer, 11);
    const b = QuiescenceWorker.register(buffer, 12);
    const c = QuiescenceWorker.register(buffer, 13);
    expect(new Set([a.slot, b.slot, c.slot]).size).toBe(3);
    expect(() => QuiescenceWorker.register(buffer)).toThrow(QuiescenceError);
    expect(owner.registered().map((r) => r.tag)).toEqual([11, 12, 13]);
    b.unregister();
    expect(owner.registered().map((r) => r.tag)).toEqual([11, 13]);
    const d = QuiescenceWorker.register(buffer, 14);
    expect(d.slot).toBe(b.slot);
  });

  it('rejects a buffer that is not a quiescence block and bad slot counts', () => {
    expect(() => new QuiescenceOwner(new SharedArrayBuffer(4096))).toThrow(QuiescenceError);
    expect(() => createQuiescenceBuffer(0)).toThrow(RangeError);
    expect(() => new QuiescenceOwner(createQuiescenceBuffer(2)).clearSlot(2)).toThrow(RangeError);
  });
});

describe('quiescence: epochs seen by a worker', () => {
  it('tells the worker to revalidate after a bump, to flush after a full-flush bump, and nothing otherwise', () => {
    const buffer = createQuiescenceBuffer(4);
    const owner = new QuiescenceOwner(buffer);
    const w = QuiescenceWorker.register(buffer);
    expect(w.beginDma()).toBe(EpochChange.NONE);
    w.endDma();
    owner.bumpEpoch();
    expect(w.beginDma()).toBe(EpochChange.REVALIDATE);
    w.endDma();
    expect(w.beginDma()).toBe(EpochChange.NONE);
    w.endDma();
    owner.bumpEpoch();
    owner.bumpEpoch({ fullFlush: true });
    owner.bumpEpoch();
    // Two bumps later, the full flush in between still counts.
    expect(w.beginDma()).toBe(EpochChange.FLUSH);
    w.endDma();
    expect(w.observedEpoch).toBe(owner.epoch);
    w.heartbeat();
    expect(words(buffer)[slotBase(w.slot) + QuiescenceSlot.DMA_COUNT]).toBe(4);
  });

  it('compares epochs across the 32-bit wrap', () => {
    const buffer = createQuiescenceBuffer(2);
    Atomics.store(words(buffer), QuiescenceGlobal.EPOCH, 0x7ffffffe);
    const owner = new QuiescenceOwner(buffer);
    const w = QuiescenceWorker.register(buffer);
    const e1 = owner.bumpEpoch();
    const e2 = owner.bumpEpoch({ fullFlush: true });
    expect(e2).toBeLessThan(0);
    // A DMA that began after both bumps observed e2, which is later than e1 although smaller.
    expect(w.beginDma()).toBe(EpochChange.FLUSH);
    expect(owner.waitQuiescent(e1, { timeoutMs: 0, spinRounds: 1 }).stragglers).toEqual([]);
    w.endDma();
    w.beginDma();
    owner.bumpEpoch();
    expect(owner.waitQuiescent(owner.epoch, { timeoutMs: 0, spinRounds: 1 }).stragglers.length).toBe(1);
  });
});

describe('quiescence: the owner waits for exactly the DMAs that may hold old translations', () => {
  it('returns at once when no worker is registered or none is inside a DMA', () => {
    const buffer = createQuiescenceBuffer(4);
    const owner = new QuiescenceOwner(buffer);
    expect(owner.waitQuiescent(owner.bumpEpoch())).toEqual({ stragglers: [], slept: false });
    const w = QuiescenceWorker.register(buffer);
    w.beginDma();
    w.endDma();
    expect(owner.waitQuiescent(owner.bumpEpoch())).toEqual({ stragglers: [], slept: false });
  });

  it('does not wait for a DMA that began after the bump (it observed the new epoch)', () => {
    const buffer = createQuiescenceBuffer(4);
    const owner = new QuiescenceOwner(buffer);
    const w = QuiescenceWorker.register(buffer);
    const epoch = owner.bumpEpoch();
    expect(w.beginDma()).toBe(EpochChange.REVALIDATE);
    expect(owner.waitQuiescent(epoch, { timeoutMs: 0 }).stragglers).toEqual([]);
    w.endDma();
  });

  it('reports a DMA begun before the bump that never ends, marks its worker dead, and revives it with a flush', () => {
    const buffer = createQuiescenceBuffer(4);
    const owner = new QuiescenceOwner(buffer);
    const idle = QuiescenceWorker.register(buffer, 1);
    const stuck = QuiescenceWorker.register(buffer, 2);
    stuck.beginDma();
    const epoch = owner.bumpEpoch();
    const result = owner.waitQuiescent(epoch, { timeoutMs: 20, spinRounds: 10 });
    expect(result.slept).toBe(true);
    expect(result.stragglers).toEqual([{ slot: stuck.slot, tag: 2, observed: epoch - 1, progressed: false }]);
    const w = words(buffer);
    expect(w[slotBase(stuck.slot) + QuiescenceSlot.STATE]).toBe(SlotState.DEAD);
    // A dead worker no longer holds up the owner.
    expect(owner.waitQuiescent(owner.bumpEpoch(), { timeoutMs: 0 }).stragglers).toEqual([]);
    // When it comes back it trusts nothing it cached, and it is waited for again.
    stuck.endDma();
    expect(stuck.beginDma()).toBe(EpochChange.FLUSH);
    expect(w[slotBase(stuck.slot) + QuiescenceSlot.STATE]).toBe(SlotState.LIVE);
    expect(w[slotBase(stuck.slot) + QuiescenceSlot.REVIVALS]).toBe(1);
    stuck.endDma();
    stuck.beginDma();
    expect(owner.waitQuiescent(owner.bumpEpoch(), { timeoutMs: 5, spinRounds: 1 }).stragglers.map((s) => s.slot)).toEqual([stuck.slot]);
    // The idle worker was never reported.
    expect(w[slotBase(idle.slot) + QuiescenceSlot.STATE]).toBe(SlotState.LIVE);
  });

  it('forces a revoked worker through its slow path even if it had already seen the latest epoch', () => {
    const buffer = createQuiescenceBuffer(2);
    const owner = new QuiescenceOwner(buffer);
    const w = QuiescenceWorker.register(buffer);
    w.beginDma();
    owner.bumpEpoch();
    // It reached the new epoch too late for this wait (the owner reads OBSERVED before it was published).
    expect(owner.waitQuiescent(owner.epoch + 1, { timeoutMs: 0, spinRounds: 1 }).stragglers.length).toBe(1);
    w.endDma();
    expect(w.beginDma()).toBe(EpochChange.FLUSH);
    w.endDma();
  });

  it('throws in the worker whose slot the owner cleared, at its next epoch change', () => {
    const buffer = createQuiescenceBuffer(2);
    const owner = new QuiescenceOwner(buffer);
    const w = QuiescenceWorker.register(buffer);
    owner.clearSlot(w.slot);
    expect(owner.registered()).toEqual([]);
    owner.bumpEpoch();
    expect(() => w.beginDma()).toThrow(QuiescenceError);
    expect(words(buffer)[slotBase(w.slot) + QuiescenceSlot.IN_DMA]).toBe(0);
  });
});

describe('quiescence across threads', () => {
  const started: Worker[] = [];
  beforeAll(() => {
    const path = fileURLToPath(workerUrl('translate-worker'));
    if (!existsSync(path)) throw new Error(`${path} is missing: run npx tsc -p tsconfig.build.json`);
  });
  afterEach(async () => {
    await Promise.all(started.splice(0).map((w) => w.terminate()));
  });

  function holdWorker(quiescence: SharedArrayBuffer, tag: number): { command(op: number): number; slot(): number } {
    const control = new SharedArrayBuffer(HoldControl.FIELD_COUNT * 4);
    const ctl = new Int32Array(control);
    Atomics.store(ctl, HoldControl.SLOT, -1);
    const start: TranslateWorkerStart = { mode: 'hold', quiescence, control, tag };
    const worker = new Worker(workerUrl('translate-worker'), { workerData: start });
    started.push(worker);
    let seq = 0;
    return {
      command(op: number): number {
        Atomics.store(ctl, HoldControl.COMMAND, op);
        Atomics.store(ctl, HoldControl.SEQ, ++seq);
        Atomics.notify(ctl, HoldControl.SEQ);
        const deadline = Date.now() + 10_000;
        while (Atomics.load(ctl, HoldControl.DONE) !== seq) {
          if (Date.now() > deadline) throw new Error('hold worker did not answer');
          Atomics.wait(ctl, HoldControl.DONE, Atomics.load(ctl, HoldControl.DONE), 50);
        }
        return Atomics.load(ctl, HoldControl.RESULT);
      },
      slot: () => Atomics.load(ctl, HoldControl.SLOT),
    };
  }

  it('sleeps while a worker finishes a DMA begun before the bump, and is woken by it', () => {
    const buffer = createQuiescenceBuffer(8);
    const owner = new QuiescenceOwner(buffer);
    const worker = holdWorker(buffer, 77);
    expect(worker.command(HoldCommand.BEGIN_END_WHEN_WAITED)).toBe(EpochChange.NONE);
    const epoch = owner.bumpEpoch();
    const ackBefore = Atomics.load(words(buffer), QuiescenceGlobal.ACK);
    const result = owner.waitQuiescent(epoch, { timeoutMs: 10_000, spinRounds: 10 });
    expect(result).toEqual({ stragglers: [], slept: true });
    // The worker ended its DMA only once the owner waited, and acknowledged it.
    expect(Atomics.load(words(buffer), QuiescenceGlobal.ACK)).toBeGreaterThan(ackBefore);
    expect(Atomics.load(words(buffer), QuiescenceGlobal.WAITING)).toBe(0);
    expect(worker.command(HoldCommand.BEGIN)).toBe(EpochChange.REVALIDATE);
    worker.command(HoldCommand.END);
  });

  it('reports a worker terminated inside a DMA; the owner clears its slot and waits no more', async () => {
    const buffer = createQuiescenceBuffer(8);
    const owner = new QuiescenceOwner(buffer);
    const healthy = holdWorker(buffer, 1);
    const doomed = holdWorker(buffer, 2);
    healthy.command(HoldCommand.BEGIN);
    healthy.command(HoldCommand.END);
    doomed.command(HoldCommand.BEGIN);
    await started[1]!.terminate();
    const result = owner.waitQuiescent(owner.bumpEpoch(), { timeoutMs: 30, spinRounds: 10 });
    expect(result.stragglers.map((s) => s.tag)).toEqual([2]);
    owner.clearSlot(doomed.slot());
    expect(owner.registered().map((r) => r.tag)).toEqual([1]);
    expect(owner.waitQuiescent(owner.bumpEpoch(), { timeoutMs: 0 }).stragglers).toEqual([]);
    // Giving up on a worker forces a full flush on everyone.
    expect(healthy.command(HoldCommand.BEGIN)).toBe(EpochChange.FLUSH);
    healthy.command(HoldCommand.EXIT);
  });
});
