// A device worker for tests and benches of the data plane: it translates through the shared page
// tables with a Translator, holds DMAs open on command, or floods the fault queue. One start
// message in workerData; results go back in shared counters and one final postMessage.
import { parentPort, threadId, workerData } from 'node:worker_threads';
import { FaultProducer } from '../src/ioasid/fault-queue.js';
import { QuiescenceError, QuiescenceGlobal, QuiescenceWorker } from '../src/ioasid/quiescence.js';
import { FixedAttachments, TranslationKind, Translator } from '../src/ioasid/translator.js';
import { PAGE_SIZE, emptyLeafInfo, walk } from '../src/pagetable/index.js';
import {
  HoldCommand,
  HoldControl,
  StressControl,
  StressCounter,
  VOLATILE_ROUND_PAGES,
  type StressResult,
  type TranslateWorkerStart,
} from '../src/runtime/translate-worker-protocol.js';

const start = workerData as TranslateWorkerStart;
if (parentPort === null) throw new Error('translate-worker must run as a worker thread');
const port = parentPort;

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

function runStress(s: Extract<TranslateWorkerStart, { mode: 'stress' }>): void {
  const ctl = new Int32Array(s.control);
  const base = StressControl.WORKERS_BASE + s.index * StressCounter.STRIDE;
  const { layout: L } = s;
  const next = rng(s.seed);
  const faults = new FaultProducer(s.faults, new Int32Array(s.wake), 0);
  const q = QuiescenceWorker.register(s.quiescence, threadId);
  const t = new Translator({
    pool: s.pool,
    attachments: new FixedAttachments().set(s.index, -1, TranslationKind.PAGING, L.header),
    quiescence: q,
    faults,
  });
  // The broken device of the control experiment: caches walks forever.
  const naive = new Map<number, number>();
  const words = new Int32Array(s.pool);
  const leaf = emptyLeafInfo();
  Atomics.add(ctl, StressControl.READY, 1);
  let iterations = 0;
  while (Atomics.load(ctl, StressControl.STOP) === 0) {
    t.beginDma();
    // Read after entering the DMA: any round already reported done was unmapped before this DMA.
    const done = Atomics.load(ctl, StressControl.DONE_ROUND);
    const r = next();
    if ((r & 1) === 0) {
      // Stable range: up to three pages at any offset; always one span, always right.
      const first = L.stablePfn * PAGE_SIZE + (r >>> 1) % ((L.stablePages - 3) * PAGE_SIZE);
      const length = 1 + (next() % (3 * PAGE_SIZE));
      const status = t.translate(s.index, undefined, first, length, 1);
      const want = (L.stableGuest - L.stablePfn) * PAGE_SIZE + first;
      if (status !== 0 || t.spans.count !== 1 || t.spans.gpa[0] !== want || t.spans.bytes[0] !== length) {
        Atomics.add(ctl, base + StressCounter.STABLE_FAILURES, 1);
      }
    } else {
      // Volatile range: mostly the first pages (mapped in every round), sometimes anywhere.
      const page = (r & 6) !== 0 ? (r >>> 3) % 48 : (r >>> 3) % L.volatilePages;
      const pfn = L.volatilePfn + page;
      let guestPfn = -1;
      if (s.cache === 'naive') {
        const cachedPfn = naive.get(pfn);
        if (cachedPfn !== undefined) guestPfn = cachedPfn;
        else if (walk(words, L.header, pfn, leaf)) naive.set(pfn, (guestPfn = leaf.guestPfn));
      } else if (t.translate(s.index, undefined, pfn * PAGE_SIZE + (r >>> 20), 64, 2) === 0) {
        guestPfn = Math.floor(t.spans.gpa[0]! / PAGE_SIZE);
      } else {
        Atomics.add(ctl, base + StressCounter.FAULTS, 1);
      }
      if (guestPfn >= 0) {
        const rel = guestPfn - L.volatileGuest;
        const round = Math.floor(rel / VOLATILE_ROUND_PAGES);
        if (rel - round * VOLATILE_ROUND_PAGES !== page) Atomics.add(ctl, base + StressCounter.WRONG_PAGE, 1);
        if (round <= done) Atomics.add(ctl, base + StressCounter.VIOLATIONS, 1);
        Atomics.add(ctl, base + StressCounter.VOLATILE_OK, 1);
      }
    }
    t.endDma();
    Atomics.store(ctl, base + StressCounter.ITERATIONS, ++iterations);
  }
  const stats = t.stats();
  q.unregister();
  const result: StressResult = {
    translations: stats.translations,
    epochChanges: stats.epochChanges,
    iotlbHits: stats.iotlb.hits,
    iotlbMisses: stats.iotlb.misses,
  };
  port.postMessage(result);
}

function runHold(s: Extract<TranslateWorkerStart, { mode: 'hold' }>): void {
  const ctl = new Int32Array(s.control);
  const q = QuiescenceWorker.register(s.quiescence, s.tag);
  const global = new Int32Array(s.quiescence);
  Atomics.store(ctl, HoldControl.SLOT, q.slot);
  let seen = 0;
  for (;;) {
    Atomics.wait(ctl, HoldControl.SEQ, seen);
    seen = Atomics.load(ctl, HoldControl.SEQ);
    const command = Atomics.load(ctl, HoldControl.COMMAND);
    let result = 0;
    try {
      if (command === HoldCommand.BEGIN) result = q.beginDma();
      else if (command === HoldCommand.END) q.endDma();
      else if (command === HoldCommand.UNREGISTER) q.unregister();
      else if (command === HoldCommand.BEGIN_END_WHEN_WAITED) {
        result = q.beginDma();
        // Report first: the owner bumps the epoch and waits only once this DMA is open.
        Atomics.store(ctl, HoldControl.RESULT, result);
        Atomics.store(ctl, HoldControl.DONE, seen);
        Atomics.notify(ctl, HoldControl.DONE);
        while (Atomics.load(global, QuiescenceGlobal.WAITING) === 0) Atomics.wait(global, QuiescenceGlobal.WAITING, 0, 1);
        q.endDma();
        continue;
      }
    } catch (e) {
      if (!(e instanceof QuiescenceError)) throw e;
      result = -1;
    }
    Atomics.store(ctl, HoldControl.RESULT, result);
    Atomics.store(ctl, HoldControl.DONE, seen);
    Atomics.notify(ctl, HoldControl.DONE);
    if (command === HoldCommand.EXIT) return;
  }
}

/** Appends `count` records whose fields check each other, so a torn record would show. */
function runFaults(s: Extract<TranslateWorkerStart, { mode: 'faults' }>): void {
  const producer = new FaultProducer(s.faults, new Int32Array(s.wake), 0);
  const go = new Int32Array(s.go);
  while (Atomics.load(go, 0) === 0) Atomics.wait(go, 0, 0, 5);
  let appended = 0;
  for (let i = 0; i < s.count; i++) {
    const lo = i;
    const hi = (s.index << 24) | (i & 0xffffff);
    if (producer.append(s.index, (i * 7 + s.index) & 0xfffff, lo, hi ^ 0x5a5a5a5a, 1 + (i % 3), 1 + (i % 3), i ^ s.index)) appended++;
  }
  port.postMessage({ appended });
}

if (start.mode === 'stress') runStress(start);
else if (start.mode === 'hold') runHold(start);
else runFaults(start);
