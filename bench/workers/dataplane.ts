// A device worker's data plane under the clock: IOTLB hits, misses that walk the shared table,
// and 64 KiB DMA copies through translation, each sampled in turn with the limit it is read
// against. One start message, one result message.
import { parentPort, threadId, workerData } from 'node:worker_threads';
import { emptyRowValue, readRow } from '../../src/ioasid/device-table.js';
import { FaultAccess } from '../../src/ioasid/fault-queue.js';
import { QuiescenceWorker } from '../../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../../src/ioasid/translator.js';
import { GuestMemory } from '../../src/memory/index.js';
import { PAGE_SIZE, TableReader, emptyLeafInfo } from '../../src/pagetable/index.js';
import { interleaved, type TimedLoop } from '../harness.js';
import { arrayReadLoop, memcpyLoop, radixWalkLoop } from '../limit-loops.js';
import { SEQUENCE_LENGTH, randomPages } from '../plain-radix.js';
import { COPY_BLOCK } from '../sizes.js';
import type { DataPlaneResult, DataPlaneStart } from '../protocol.js';

const start = workerData as DataPlaneStart;
if (parentPort === null) throw new Error('dataplane must run as a worker thread');

const memory = GuestMemory.fromDescriptor(start.memory);
const t = new Translator({
  pool: start.pool,
  attachments: new DeviceTableAttachments({ pool: { buffer: start.pool }, devices: { buffer: start.devices } }),
  quiescence: QuiescenceWorker.register(start.quiescence, threadId),
});
const row = start.row;
const mask = SEQUENCE_LENGTH - 1;
const quick = start.quick;
const samples = quick ? 5 : 11;

/** IOVAs (page start + 64) of a page sequence, precomputed so the loops only index an array. */
function iovas(pages: Int32Array): Float64Array {
  const out = new Float64Array(pages.length);
  for (let i = 0; i < pages.length; i++) out[i] = (start.basePfn + pages[i]!) * PAGE_SIZE + 64;
  return out;
}

function check(status: number, what: string): void {
  if (status !== 0) throw new Error(`${what}: translation fault ${status}`);
}

/** Translations of `addresses` in order; with `oneDma`, all inside one DMA (the per-translation cost). */
function translateLoop(addresses: Float64Array, iterations: number, oneDma: boolean): TimedLoop {
  return {
    iterations,
    loop(n) {
      if (oneDma) t.beginDma();
      let acc = 0;
      for (let i = 0; i < n; i++) {
        t.translate(row, undefined, addresses[i & mask]!, 64, FaultAccess.READ);
        acc += t.spans.gpa[0]!;
      }
      if (oneDma) t.endDma();
      return acc;
    },
  };
}

// Hits: 512 pages, well inside the 1024-entry 4 KiB set array, warmed first.
const hot = iovas(randomPages(0x401, 512));
for (let i = 0; i < hot.length; i++) check(t.translate(row, undefined, hot[i]!, 64, FaultAccess.READ), 'warm-up');
const hitIterations = quick ? 1 << 19 : 1 << 21;
// copyOnly (the dirty-tracking run): only the memcpy limit and the 8 MiB-window copy.
const [arrayReadNs, hitNs, hitDmaNs] = start.copyOnly ? [NaN, NaN, NaN] : interleaved(
  [arrayReadLoop(quick ? 1 << 20 : 1 << 22), translateLoop(hot, hitIterations, true), translateLoop(hot, hitIterations, false)],
  samples,
  2,
);

// Misses: random pages over every mapping, the sequence the plain radix limit walks; and the
// table walk alone over the same pages, through a TableReader as the translator does.
const sequence = randomPages(start.seed, start.pages);
const cold = iovas(sequence);
const reader = new TableReader(start.pool);
const header = readRow(new Int32Array(start.devices), row, emptyRowValue()).header;
const leaf = emptyLeafInfo();
const walkLoop: TimedLoop = {
  iterations: quick ? 1 << 16 : 1 << 18,
  loop(n) {
    let acc = 0;
    for (let i = 0; i < n; i++) {
      reader.walk(header, start.basePfn + sequence[i & mask]!, leaf);
      acc += leaf.guestPfn;
    }
    return acc;
  },
};
const before = t.stats().iotlb;
const [radixWalkNs, missNs, walkNs] = start.copyOnly ? [NaN, NaN, NaN] : interleaved(
  [radixWalkLoop(start.pages, quick ? 1 << 18 : 1 << 20), translateLoop(cold, quick ? 1 << 16 : 1 << 18, true), walkLoop],
  samples,
  2,
);
const after = t.stats().iotlb;
const missRate = (after.misses - before.misses) / (after.misses - before.misses + after.hits - before.hits);
check(t.translate(row, undefined, cold[0]!, 64, FaultAccess.READ), 'miss loop');

// DMA copies: one DMA translates 64 KiB of source and of destination, then copies span by span.
const srcGpa = new Float64Array(64);
const srcLen = new Float64Array(64);
function dmaCopy(src: number, dst: number, length: number): void {
  t.beginDma();
  try {
    check(t.translate(row, undefined, src, length, FaultAccess.READ), 'DMA source');
    const count = t.spans.count;
    for (let i = 0; i < count; i++) {
      srcGpa[i] = t.spans.gpa[i]!;
      srcLen[i] = t.spans.bytes[i]!;
    }
    check(t.translate(row, undefined, dst, length, FaultAccess.WRITE), 'DMA destination');
    let si = 0;
    let soff = 0;
    for (let di = 0; di < t.spans.count; di++) {
      let dgpa = t.spans.gpa[di]!;
      let left = t.spans.bytes[di]!;
      while (left > 0) {
        const chunk = Math.min(left, srcLen[si]! - soff);
        memory.copy(dgpa, srcGpa[si]! + soff, chunk);
        dgpa += chunk;
        left -= chunk;
        soff += chunk;
        if (soff === srcLen[si]) {
          si++;
          soff = 0;
        }
      }
    }
  } finally {
    t.endDma();
  }
}
/** 64 KiB DMAs cycling over the first `bytes` of each window. */
function copyLoop(bytes: number): TimedLoop {
  const blocks = bytes / COPY_BLOCK;
  return {
    iterations: quick ? 300 : 1000,
    loop(n) {
      for (let i = 0; i < n; i++) {
        const at = (i % blocks) * COPY_BLOCK;
        dmaCopy(start.srcIova + at, start.dstIova + at, COPY_BLOCK);
      }
      return t.spans.count;
    },
  };
}
// Whole windows: 2 × 2048 pages cycle through a 1024-entry IOTLB, so most pages walk the table.
// 1 MiB of each: 512 pages in all, every translation an IOTLB hit.
const [memcpyNs, copyColdNs, copyHotNs = NaN] = interleaved(
  start.copyOnly ? [memcpyLoop(quick ? 300 : 1000), copyLoop(start.windowBytes)] : [memcpyLoop(quick ? 300 : 1000), copyLoop(start.windowBytes), copyLoop(1 << 20)],
  quick ? 5 : 15,
  2,
);

// The copies moved the right bytes.
check(t.translate(row, undefined, start.srcIova, COPY_BLOCK, FaultAccess.READ), 'check');
const copied = memory.view(t.spans.gpa[0]!, COPY_BLOCK).slice();
check(t.translate(row, undefined, start.dstIova, COPY_BLOCK, FaultAccess.READ), 'check');
if (!memory.view(t.spans.gpa[0]!, COPY_BLOCK).every((b, i) => b === copied[i])) throw new Error('DMA copy moved the wrong bytes');

const result: DataPlaneResult = {
  arrayReadNs: arrayReadNs!,
  hitNs: hitNs!,
  hitDmaNs: hitDmaNs!,
  radixWalkNs: radixWalkNs!,
  missNs: missNs!,
  walkNs: walkNs!,
  memcpyGbps: COPY_BLOCK / memcpyNs!,
  copyGbps: COPY_BLOCK / copyColdNs!,
  copyHotGbps: COPY_BLOCK / copyHotNs,
  missRate,
};
parentPort.postMessage(result);
