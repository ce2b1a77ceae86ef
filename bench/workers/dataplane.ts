// A device worker's data plane under the clock: IOTLB hits, misses that walk the shared table,
// and 64 KiB DMA copies through translation. One start message, one result message.
import { parentPort, threadId, workerData } from 'node:worker_threads';
import { emptyRowValue, readRow } from '../../src/ioasid/device-table.js';
import { FaultAccess, NO_PASID } from '../../src/ioasid/fault-queue.js';
import { QuiescenceWorker } from '../../src/ioasid/quiescence.js';
import { TranslationKind, Translator, type Attachment, type AttachmentSource } from '../../src/ioasid/translator.js';
import { GuestMemory } from '../../src/memory/index.js';
import { PAGE_SIZE, emptyLeafInfo, walk } from '../../src/pagetable/index.js';
import { nsPerOp } from '../harness.js';
import { SEQUENCE_LENGTH, randomPages } from '../plain-radix.js';
import { COPY_BLOCK } from '../sizes.js';
import type { DataPlaneResult, DataPlaneStart } from '../protocol.js';

const start = workerData as DataPlaneStart;
if (parentPort === null) throw new Error('dataplane must run as a worker thread');

/** Attachments read from the context's shared device table, as a device worker finds them. */
class DeviceTableAttachments implements AttachmentSource {
  private readonly rows: Int32Array;
  private readonly value = emptyRowValue();
  constructor(buffer: SharedArrayBuffer) {
    this.rows = new Int32Array(buffer);
  }
  resolve(row: number, pasid: number, out: Attachment): void {
    if (pasid !== NO_PASID) {
      out.kind = TranslationKind.BLOCKED;
      out.header = 0;
      return;
    }
    readRow(this.rows, row, this.value);
    // The device table's attachment kinds and the translator's share their values.
    out.kind = this.value.kind;
    out.header = this.value.header;
  }
}

const memory = GuestMemory.fromDescriptor(start.memory);
const t = new Translator({
  pool: start.pool,
  attachments: new DeviceTableAttachments(start.devices),
  quiescence: QuiescenceWorker.register(start.quiescence, threadId),
});
const row = start.row;
const mask = SEQUENCE_LENGTH - 1;
const samples = start.quick ? 5 : 11;

/** IOVAs (page start + 64) of a page sequence, precomputed so the loops only index an array. */
function iovas(pages: Int32Array): Float64Array {
  const out = new Float64Array(pages.length);
  for (let i = 0; i < pages.length; i++) out[i] = (start.basePfn + pages[i]!) * PAGE_SIZE + 64;
  return out;
}

function check(status: number, what: string): void {
  if (status !== 0) throw new Error(`${what}: translation fault ${status}`);
}

// Hits: 512 pages, well inside the 1024-entry 4 KiB set array, warmed first.
const hot = iovas(randomPages(0x401, 512));
for (let i = 0; i < hot.length; i++) check(t.translate(row, undefined, hot[i]!, 64, FaultAccess.READ), 'warm-up');
const hitLoop = (n: number): number => {
  let acc = 0;
  for (let i = 0; i < n; i++) {
    t.translate(row, undefined, hot[i & mask]!, 64, FaultAccess.READ);
    acc += t.spans.gpa[0]!;
  }
  return acc;
};
const hitIterations = start.quick ? 1 << 19 : 1 << 21;
t.beginDma();
const hitNs = nsPerOp(hitLoop, { iterations: hitIterations, samples, warmup: 2 });
t.endDma();
// The same loop with each translation its own DMA (translate() brackets itself).
const hitDmaNs = nsPerOp(hitLoop, { iterations: hitIterations, samples, warmup: 2 });

// Misses: random pages over every mapping, the sequence the plain radix limit walks.
const sequence = randomPages(start.seed, start.pages);
const cold = iovas(sequence);
const before = t.stats().iotlb;
t.beginDma();
const missNs = nsPerOp(
  (n) => {
    let acc = 0;
    for (let i = 0; i < n; i++) {
      t.translate(row, undefined, cold[i & mask]!, 64, FaultAccess.READ);
      acc += t.spans.gpa[0]!;
    }
    return acc;
  },
  { iterations: start.quick ? 1 << 16 : 1 << 18, samples, warmup: 2 },
);
t.endDma();
const after = t.stats().iotlb;
const missRate = (after.misses - before.misses) / (after.misses - before.misses + after.hits - before.hits);
check(t.translate(row, undefined, cold[0]!, 64, FaultAccess.READ), 'miss loop');

// walk() alone, over the same pages, through a fixed-length view as a table reader keeps one (the
// pool is complete before this worker starts, so the view cannot go stale here).
const words = new Int32Array(start.pool, 0, start.pool.byteLength >>> 2);
const header = readRow(new Int32Array(start.devices), row, emptyRowValue()).header;
const leaf = emptyLeafInfo();
const walkNs = nsPerOp(
  (n) => {
    let acc = 0;
    for (let i = 0; i < n; i++) {
      walk(words, header, start.basePfn + sequence[i & mask]!, leaf);
      acc += leaf.guestPfn;
    }
    return acc;
  },
  { iterations: start.quick ? 1 << 16 : 1 << 18, samples, warmup: 2 },
);

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
/** ns per 64 KiB DMA cycling over the first `bytes` of each window. */
function copyNs(bytes: number): number {
  const blocks = bytes / COPY_BLOCK;
  return nsPerOp(
    (n) => {
      for (let i = 0; i < n; i++) {
        const at = (i % blocks) * COPY_BLOCK;
        dmaCopy(start.srcIova + at, start.dstIova + at, COPY_BLOCK);
      }
      return t.spans.count;
    },
    { iterations: start.quick ? 500 : 2000, samples: start.quick ? 5 : 15, warmup: 2 },
  );
}
// Whole windows: 2 × 2048 pages cycle through a 1024-entry IOTLB, so most pages walk the table.
const copyColdNs = copyNs(start.windowBytes);
// 1 MiB of each: 512 pages in all, every translation an IOTLB hit.
const copyHotNs = copyNs(1 << 20);

// The copies moved the right bytes.
check(t.translate(row, undefined, start.srcIova, COPY_BLOCK, FaultAccess.READ), 'check');
const copied = memory.view(t.spans.gpa[0]!, COPY_BLOCK).slice();
check(t.translate(row, undefined, start.dstIova, COPY_BLOCK, FaultAccess.READ), 'check');
if (!memory.view(t.spans.gpa[0]!, COPY_BLOCK).every((b, i) => b === copied[i])) throw new Error('DMA copy moved the wrong bytes');

const result: DataPlaneResult = { hitNs, hitDmaNs, missNs, walkNs, copyGbps: COPY_BLOCK / copyColdNs, copyHotGbps: COPY_BLOCK / copyHotNs, missRate };
parentPort.postMessage(result);
