import { afterEach, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { Worker } from 'node:worker_threads';
import {
  FaultAccess,
  FaultCell,
  FaultConsumer,
  FaultProducer,
  FaultQueueHeader,
  FaultReason,
  NO_PASID,
  createFaultQueueBuffer,
  emptyFaultRecord,
  faultIova,
  type FaultRecord,
} from '../src/ioasid/fault-queue.js';
import { workerUrl } from '../src/runtime/worker-url.js';
import type { TranslateWorkerStart } from '../src/runtime/translate-worker-protocol.js';
import { DeviceSignal, createSignalBuffer } from '../src/virtio/signals.js';
import { fuzzParams } from './support/fuzz.js';

function drainAll(consumer: FaultConsumer): FaultRecord[] {
  const out: FaultRecord[] = [];
  consumer.drain((r) => out.push({ ...r }));
  return out;
}

describe('fault queue: one thread', () => {
  it('delivers records in order with every field, 64-bit IOVAs included', () => {
    const buffer = createFaultQueueBuffer(8);
    const producer = new FaultProducer(buffer);
    const consumer = new FaultConsumer(buffer);
    const out = emptyFaultRecord();
    expect(consumer.poll(out)).toBe(false);
    expect(producer.append(3, NO_PASID, 0xdeadb000, 0xffffffff, FaultAccess.WRITE, FaultReason.MAPPING, 4096)).toBe(true);
    expect(producer.append(4, 0xfffff, 0x1000, 0, FaultAccess.READ | FaultAccess.EXEC, FaultReason.PERMISSION, 2 ** 40)).toBe(true);
    const got = drainAll(consumer);
    expect(got).toEqual([
      { device: 3, pasid: NO_PASID, iovaLo: 0xdeadb000, iovaHi: 0xffffffff, access: FaultAccess.WRITE, reason: FaultReason.MAPPING, length: 4096 },
      { device: 4, pasid: 0xfffff, iovaLo: 0x1000, iovaHi: 0, access: 5, reason: FaultReason.PERMISSION, length: 0x7fffffff },
    ]);
    expect(faultIova(got[0]!)).toBe(0xffffffffdeadb000n);
    expect(consumer.stats()).toEqual({ appended: 2, dropped: 0, pending: 0 });
  });

  it('drops and counts records when full, never blocking the producer, and recovers once drained', () => {
    const buffer = createFaultQueueBuffer(4);
    const producer = new FaultProducer(buffer);
    const consumer = new FaultConsumer(buffer);
    const accepted = Array.from({ length: 7 }, (_, i) => producer.append(1, NO_PASID, i, 0, 1, 2, 1));
    expect(accepted).toEqual([true, true, true, true, false, false, false]);
    expect(consumer.stats()).toEqual({ appended: 4, dropped: 3, pending: 4 });
    expect(drainAll(consumer).map((r) => r.iovaLo)).toEqual([0, 1, 2, 3]);
    expect(producer.append(1, NO_PASID, 9, 0, 1, 2, 1)).toBe(true);
    expect(drainAll(consumer).map((r) => r.iovaLo)).toEqual([9]);
  });

  it('drain() honours its limit', () => {
    const buffer = createFaultQueueBuffer(8);
    const producer = new FaultProducer(buffer);
    for (let i = 0; i < 5; i++) producer.append(0, NO_PASID, i, 0, 1, 2, 1);
    const consumer = new FaultConsumer(buffer);
    const seen: number[] = [];
    expect(consumer.drain((r) => seen.push(r.iovaLo), 3)).toBe(3);
    expect(seen).toEqual([0, 1, 2]);
  });

  it('never hands out a reserved record before its producer publishes it', () => {
    const buffer = createFaultQueueBuffer(4);
    const words = new Int32Array(buffer);
    const consumer = new FaultConsumer(buffer);
    // A producer that reserved position 0 and is still writing the record.
    expect(Atomics.compareExchange(words, FaultQueueHeader.TAIL, 0, 1)).toBe(0);
    const cell = FaultQueueHeader.STRIDE;
    Atomics.store(words, cell + FaultCell.DEVICE, 42);
    // Another producer completes position 1 meanwhile.
    new FaultProducer(buffer).append(7, NO_PASID, 1, 0, 1, 2, 1);
    expect(drainAll(consumer)).toEqual([]);
    Atomics.store(words, cell + FaultCell.IOVA_LO, 0xabc);
    Atomics.store(words, cell + FaultCell.SEQ, 1);
    expect(drainAll(consumer).map((r) => [r.device, r.iovaLo])).toEqual([
      [42, 0xabc],
      [7, 1],
    ]);
  });

  it('bumps the wake word it was given for the record the consumer waits at, not for the ones behind it', () => {
    const signals = new Int32Array(createSignalBuffer());
    const buffer = createFaultQueueBuffer(4);
    const producer = new FaultProducer(buffer, signals, DeviceSignal.WAKE);
    producer.append(0, NO_PASID, 0, 0, 1, 2, 1);
    producer.append(0, NO_PASID, 0, 0, 1, 2, 1);
    expect(signals[DeviceSignal.WAKE]).toBe(1);
    const consumer = new FaultConsumer(buffer);
    expect(consumer.drain(() => undefined)).toBe(2);
    producer.append(0, NO_PASID, 0, 0, 1, 2, 1);
    expect(signals[DeviceSignal.WAKE]).toBe(2);
    expect(signals[DeviceSignal.IRQ_COUNT]).toBe(0);
  });

  it('rejects capacities that are not powers of two and foreign buffers', () => {
    expect(() => createFaultQueueBuffer(6)).toThrow(RangeError);
    expect(() => createFaultQueueBuffer(1)).toThrow(RangeError);
    expect(() => new FaultConsumer(new SharedArrayBuffer(1024))).toThrow();
  });

  it('property: interleaved appends and polls behave like a bounded FIFO that drops when full', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 4 }), fc.array(fc.boolean(), { maxLength: 300 }), (capLog, ops) => {
        const capacity = 1 << capLog;
        const buffer = createFaultQueueBuffer(capacity);
        const producer = new FaultProducer(buffer);
        const consumer = new FaultConsumer(buffer);
        const model: number[] = [];
        let dropped = 0;
        let next = 0;
        let wrong = 0;
        const out = emptyFaultRecord();
        for (const append of ops) {
          if (append) {
            const ok = producer.append(1, NO_PASID, next, 0, 1, 2, 1);
            if (model.length < capacity) {
              if (!ok) wrong++;
              model.push(next);
            } else {
              if (ok) wrong++;
              dropped++;
            }
            next++;
          } else {
            const got = consumer.poll(out);
            const want = model.shift();
            if (got !== (want !== undefined) || (got && out.iovaLo !== want)) wrong++;
          }
        }
        expect(wrong).toBe(0);
        expect(consumer.stats().dropped).toBe(dropped);
      }),
      fuzzParams(0xfa017, 200),
    );
  });
});

describe('fault queue: producers in four workers', () => {
  const workers: Worker[] = [];
  afterEach(async () => {
    await Promise.all(workers.splice(0).map((w) => w.terminate()));
  });

  it('delivers every record whole, in each producer’s order; drained + dropped = appended', async () => {
    const faults = createFaultQueueBuffer(64);
    const wake = createSignalBuffer();
    const go = new SharedArrayBuffer(4);
    const count = 4000;
    const done: Promise<{ appended: number }>[] = [];
    for (let index = 0; index < 4; index++) {
      const start: TranslateWorkerStart = { mode: 'faults', index, count, faults, wake, go };
      const worker = new Worker(workerUrl('translate-worker'), { workerData: start });
      workers.push(worker);
      done.push(new Promise((resolve, reject) => (worker.once('message', resolve), worker.once('error', reject))));
    }
    const consumer = new FaultConsumer(faults);
    const wakeWords = new Int32Array(wake);
    const lastSeen = [-1, -1, -1, -1];
    let drained = 0;
    let torn = 0;
    let outOfOrder = 0;
    const check = (r: FaultRecord): void => {
      const i = r.iovaLo;
      const index = r.device;
      const hi = ((index << 24) | (i & 0xffffff)) ^ 0x5a5a5a5a;
      if (
        !(index >= 0 && index < 4) ||
        r.iovaHi !== hi >>> 0 ||
        r.pasid !== ((i * 7 + index) & 0xfffff) ||
        r.access !== 1 + (i % 3) ||
        r.reason !== 1 + (i % 3) ||
        r.length !== (i ^ index)
      ) {
        torn++;
        return;
      }
      if (i <= lastSeen[index]!) outOfOrder++;
      lastSeen[index] = i;
      drained++;
    };
    let finished = false;
    void Promise.all(done).then(() => (finished = true));
    Atomics.store(new Int32Array(go), 0, 1);
    Atomics.notify(new Int32Array(go), 0);
    // Drain while they produce; sleep on the wake word between batches, as the owner would.
    while (!finished) {
      const wakeValue = Atomics.load(wakeWords, DeviceSignal.WAKE);
      consumer.drain(check);
      await new Promise((resolve) => setImmediate(resolve));
      if (consumer.stats().pending === 0) await Atomics.waitAsync(wakeWords, DeviceSignal.WAKE, wakeValue, 5).value;
    }
    const results = await Promise.all(done);
    consumer.drain(check);
    const appended = results.reduce((sum, r) => sum + r.appended, 0);
    const stats = consumer.stats();
    expect(torn).toBe(0);
    expect(outOfOrder).toBe(0);
    expect(drained).toBe(appended);
    expect(stats.appended).toBe(appended);
    expect(appended + stats.dropped).toBe(4 * count);
    expect(stats.pending).toBe(0);
  });
});
