// A device worker translating through a nested attachment (the guest's stage 1 over stage 2) while
// the test thread remaps the guest's table and invalidates: counts translations that used a
// mapping whose invalidation had completed before the DMA began. Results in shared counters and
// one final postMessage.
import { parentPort, threadId, workerData } from 'node:worker_threads';
import { FaultAccess, FaultProducer } from '../src/ioasid/fault-queue.js';
import { QuiescenceWorker } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../src/ioasid/translator.js';
import type { NestedStressResult, NestedStressStart } from '../src/runtime/nested-translate-protocol.js';
import { StressControl, StressCounter } from '../src/runtime/translate-worker-protocol.js';

const start = workerData as NestedStressStart;
if (parentPort === null) throw new Error('nested-translate-worker must run as a worker thread');
const PAGE = 4096;

/** xorshift32: reproducible per worker. */
function rng(seed: number): () => number {
  let x = seed | 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

const ctl = new Int32Array(start.control);
const base = StressControl.WORKERS_BASE + start.index * StressCounter.STRIDE;
const L = start.layout;
const next = rng(start.seed);
const q = QuiescenceWorker.register(start.quiescence, threadId);
const t = new Translator({
  pool: start.shared.pool.buffer,
  attachments: new DeviceTableAttachments(start.shared),
  quiescence: q,
  faults: new FaultProducer(start.faults, new Int32Array(start.wake), 0),
});
const stableHost = L.hostBase + L.stableGpa - L.stableIova;
const volatileFirst = (L.hostBase + L.volatileGpa) / PAGE;

Atomics.add(ctl, StressControl.READY, 1);
let iterations = 0;
while (Atomics.load(ctl, StressControl.STOP) === 0) {
  t.beginDma();
  // Read inside the DMA: any round reported done was invalidated before this DMA began.
  const done = Atomics.load(ctl, StressControl.DONE_ROUND);
  const r = next();
  if ((r & 1) === 0) {
    // Stable pages: up to two pages at any offset, always one span, always right.
    const first = L.stableIova + ((r >>> 1) % ((L.stablePages - 2) * PAGE));
    const length = 1 + (next() % (2 * PAGE));
    const status = t.translate(start.row, start.pasid, first, length, FaultAccess.READ);
    if (status !== 0 || t.spans.count !== 1 || t.spans.gpa[0] !== stableHost + first || t.spans.bytes[0] !== length) {
      Atomics.add(ctl, base + StressCounter.STABLE_FAILURES, 1);
    }
  } else {
    const page = (r >>> 1) % L.volatilePages;
    if (t.translate(start.row, start.pasid, L.volatileIova + page * PAGE + ((r >>> 20) & 0xff8), 8, FaultAccess.WRITE) === 0) {
      const rel = Math.floor(t.spans.gpa[0]! / PAGE) - volatileFirst;
      const round = Math.floor(rel / L.roundPages);
      if (rel - round * L.roundPages !== page) Atomics.add(ctl, base + StressCounter.WRONG_PAGE, 1);
      if (round <= done) Atomics.add(ctl, base + StressCounter.VIOLATIONS, 1);
      Atomics.add(ctl, base + StressCounter.VOLATILE_OK, 1);
    } else {
      Atomics.add(ctl, base + StressCounter.FAULTS, 1);
    }
  }
  t.endDma();
  Atomics.store(ctl, base + StressCounter.ITERATIONS, ++iterations);
}
const stats = t.stats();
q.unregister();
const result: NestedStressResult = {
  translations: stats.translations,
  epochChanges: stats.epochChanges,
  iotlbHits: stats.iotlb.hits,
  iotlbMisses: stats.iotlb.misses,
  rangeInvalidations: stats.iotlb.rangeInvalidations,
  flushes: stats.iotlb.flushes,
};
parentPort.postMessage(result);
