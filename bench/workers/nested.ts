// Nested translation in a device worker: Translator misses (the 2-D walk of the guest's x86-64
// stage 1, stage-2 lookups through the IOTLB) and hits over a nested attachment, and the uncached
// 2-D walk alone (walkX86 with a stage-2 walk() per table read and for the data page).
import { parentPort, threadId, workerData } from 'node:worker_threads';
import { FaultAccess } from '../../src/ioasid/fault-queue.js';
import { QuiescenceWorker } from '../../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../../src/ioasid/translator.js';
import { GuestMemory } from '../../src/memory/index.js';
import { EntryFlag, PAGE_SIZE, emptyLeafInfo, walk } from '../../src/pagetable/index.js';
import { X86Fault, X86_READ, emptyX86WalkResult, translatedStage2, walkX86, type X86Stage1 } from '../../src/pagetable/x86-64.js';
import { interleaved, type TimedLoop } from '../harness.js';
import { SEQUENCE_LENGTH, randomPages } from '../plain-radix.js';
import type { NestedResult, NestedStart } from '../protocol.js';

const start = workerData as NestedStart;
if (parentPort === null) throw new Error('nested must run as a worker thread');

const memory = GuestMemory.fromDescriptor(start.memory);
const t = new Translator({
  pool: start.pool,
  attachments: new DeviceTableAttachments({ pool: { buffer: start.pool }, devices: { buffer: start.devices }, memory: start.memory }),
  quiescence: QuiescenceWorker.register(start.quiescence, threadId),
});
const row = start.row;
const mask = SEQUENCE_LENGTH - 1;
const samples = start.quick ? 5 : 11;

function iovas(pages: Int32Array): Float64Array {
  const out = new Float64Array(pages.length);
  for (let i = 0; i < pages.length; i++) out[i] = (start.basePfn + pages[i]!) * PAGE_SIZE + 64;
  return out;
}

function translateLoop(addresses: Float64Array, iterations: number): TimedLoop {
  return {
    iterations,
    loop(n) {
      t.beginDma();
      let acc = 0;
      for (let i = 0; i < n; i++) {
        t.translate(row, undefined, addresses[i & mask]!, 64, FaultAccess.READ);
        acc += t.spans.gpa[0]!;
      }
      t.endDma();
      return acc;
    },
  };
}

// The uncached 2-D walk, as before the translator had a nested path: a fixed-length pool view
// (the pool is complete before this worker starts) and a stage-2 walk() per lookup.
const words = new Int32Array(start.pool, 0, start.pool.byteLength >>> 2);
const leaf = emptyLeafInfo();
function stage2(gpa: number): number {
  const pfn = Math.floor(gpa / PAGE_SIZE);
  if (!walk(words, start.header, pfn, leaf) || (leaf.flags & EntryFlag.READ) === 0) return -1;
  return leaf.guestPfn * PAGE_SIZE + (gpa - pfn * PAGE_SIZE);
}
const { read } = translatedStage2(memory, stage2);
const stage1: X86Stage1 = { root: start.root, levels: 4 };
const out = emptyX86WalkResult();
const sequence = randomPages(start.seed, start.pages);
const cold = iovas(sequence);
for (let i = 0; i < 64; i++) {
  if (walkX86(stage1, start.basePfn + sequence[i]!, X86_READ, read, out) !== X86Fault.NONE) throw new Error(`stage-1 walk faulted: ${out.fault}`);
  if (stage2(out.gpa) < 0) throw new Error('stage-2 miss on a mapped page');
  if (t.translate(row, undefined, cold[i]!, 64, FaultAccess.READ) !== 0) throw new Error(`nested translation faulted: ${t.faultReason}`);
}
const walkLoop: TimedLoop = {
  iterations: start.quick ? 1 << 15 : 1 << 17,
  loop(n) {
    let acc = 0;
    for (let i = 0; i < n; i++) {
      walkX86(stage1, start.basePfn + sequence[i & mask]!, X86_READ, read, out);
      acc += stage2(out.gpa);
    }
    return acc;
  },
};

// Hits: 512 hot pages, warmed first.
const hot = iovas(randomPages(0x402, 512));
for (let i = 0; i < hot.length; i++) if (t.translate(row, undefined, hot[i]!, 64, FaultAccess.READ) !== 0) throw new Error('warm-up fault');
const [missNs = NaN, hitNs = NaN, walkNs = NaN] = interleaved(
  [translateLoop(cold, start.quick ? 1 << 15 : 1 << 17), translateLoop(hot, start.quick ? 1 << 19 : 1 << 21), walkLoop],
  samples,
  2,
);
// The cold sequence once more, counted: how often a nested translation found its entry anyway.
const before = t.stats().iotlb;
translateLoop(cold, SEQUENCE_LENGTH).loop(SEQUENCE_LENGTH);
const after = t.stats().iotlb;
const nestedMisses = after.fills - before.fills;
const result: NestedResult = { missNs, hitNs, walkNs, reads: out.reads + 1, missRate: nestedMisses / SEQUENCE_LENGTH };
parentPort.postMessage(result);
