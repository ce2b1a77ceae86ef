// Nested translation misses: a guest x86-64 stage-1 walk whose every table read, and the final
// data address, go through the backend's stage-2 radix table. No cache at either stage.
import { parentPort, workerData } from 'node:worker_threads';
import { GuestMemory } from '../../src/memory/index.js';
import { EntryFlag, PAGE_SIZE, emptyLeafInfo, walk } from '../../src/pagetable/index.js';
import { X86Fault, X86_READ, emptyX86WalkResult, translatedStage2, walkX86, type X86Stage1 } from '../../src/pagetable/x86-64.js';
import { nsPerOp } from '../harness.js';
import { SEQUENCE_LENGTH, randomPages } from '../plain-radix.js';
import type { NestedResult, NestedStart } from '../protocol.js';

const start = workerData as NestedStart;
if (parentPort === null) throw new Error('nested must run as a worker thread');

const memory = GuestMemory.fromDescriptor(start.memory);
// The pool is complete before this worker starts, so a fixed-length view stays valid.
const words = new Int32Array(start.pool, 0, start.pool.byteLength >>> 2);
const leaf = emptyLeafInfo();
/** Stage 2: guest-physical address → address in `memory`, or -1. */
function stage2(gpa: number): number {
  const pfn = Math.floor(gpa / PAGE_SIZE);
  if (!walk(words, start.header, pfn, leaf) || (leaf.flags & EntryFlag.READ) === 0) return -1;
  return leaf.guestPfn * PAGE_SIZE + (gpa - pfn * PAGE_SIZE);
}
const { read } = translatedStage2(memory, stage2);
const stage1: X86Stage1 = { root: start.root, levels: 4 };
const out = emptyX86WalkResult();
const pages = randomPages(start.seed, start.pages);
const mask = SEQUENCE_LENGTH - 1;

for (let i = 0; i < 64; i++) {
  if (walkX86(stage1, start.basePfn + pages[i]!, X86_READ, read, out) !== X86Fault.NONE) throw new Error(`stage-1 walk faulted: ${out.fault}`);
  if (stage2(out.gpa) < 0) throw new Error('stage-2 miss on a mapped page');
}
const missNs = nsPerOp(
  (n) => {
    let acc = 0;
    for (let i = 0; i < n; i++) {
      walkX86(stage1, start.basePfn + pages[i & mask]!, X86_READ, read, out);
      acc += stage2(out.gpa);
    }
    return acc;
  },
  { iterations: start.quick ? 1 << 15 : 1 << 17, samples: start.quick ? 5 : 11, warmup: 2 },
);
const result: NestedResult = { missNs, reads: out.reads + 1 };
parentPort.postMessage(result);
