import { MAX_IOVA_PFN, TABLE_WORDS } from '../pagetable/format.js';
import type { TablePool } from '../pagetable/pool.js';

/**
 * The shared record of a nested HWPT: what a device worker needs to translate through a guest's
 * stage-1 table, in one 4 KiB table of the context's table pool. A device-table row of kind NESTED
 * names the record by its Int32 word index (the row's HEADER word).
 *
 * Words 0..15 describe the stage 1; they are written once, before any row points at the record,
 * except GENERATION and LOG_SEQ. Then a ring of invalidation records: hwptInvalidate() appends the
 * IOVA page ranges the guest invalidated and moves GENERATION by the number appended, so a worker
 * that cached translations under an older generation can drop exactly the entries in those ranges
 * (or everything, when the ring no longer holds all the records it missed).
 *
 * GENERATION sits at the same offset as an address space's header slot (HeaderSlot.GENERATION), so
 * anything that reads a header's generation reads a record's the same way.
 */
export const Stage1Record = {
  /** Stage-1 root page frame (root GPA >> 12), low 32 bits. */
  ROOT_LO: 0,
  /** Invalidation records appended so far (wrapping). */
  GENERATION: 1,
  /** Stage1RecordFlag bits. */
  FLAGS: 2,
  /** Stage-1 root page frame, bits 32 and up. */
  ROOT_HI: 3,
  /** 4 or 5. */
  LEVELS: 4,
  /** Header slot of the parent's IOAS: stage 2. */
  STAGE2: 5,
  /** The nested HWPT's object ID (diagnostics). */
  HWPT_ID: 6,
  /** Odd while the owner appends to the log; +2 per append. */
  LOG_SEQ: 7,
  /** First word of the invalidation ring. */
  LOG: 16,
  /** Records in the ring (a power of two). */
  LOG_ENTRIES: 128,
  /** Words per record: first IOVA page (lo, hi 32 bits), last IOVA page (lo, hi), inclusive. */
  LOG_STRIDE: 4,
} as const;

export const Stage1RecordFlag = {
  /** The record belongs to a live nested HWPT. */
  LIVE: 1 << 0,
} as const;

/** An inclusive range of IOVA page frames, [first, last]. */
export interface PfnRange {
  readonly first: number;
  readonly last: number;
}

/** The whole IOVA space, as appended for a full invalidation. */
export const ALL_PFNS: PfnRange = Object.freeze({ first: 0, last: MAX_IOVA_PFN });

const TWO_32 = 2 ** 32;
const LOG_MASK = Stage1Record.LOG_ENTRIES - 1;

export interface Stage1Config {
  /** Guest-physical address of the stage-1 top table (4 KiB aligned, below 2^52). */
  readonly root: number;
  readonly levels: 4 | 5;
  /** Header slot of the stage-2 IOAS. */
  readonly stage2: number;
  readonly hwptId: number;
}

/** Stage-1 description read back by a worker. */
export interface Stage1View {
  root: number;
  levels: 4 | 5;
  stage2: number;
}

export function emptyStage1View(): Stage1View {
  return { root: 0, levels: 4, stage2: 0 };
}

/** Int32 word index of the record that lives in pool table `table`. */
export function recordOfTable(table: number): number {
  return table * TABLE_WORDS;
}

/**
 * Owner side: fills a fresh (zeroed) pool table as the record of a nested HWPT and returns its word
 * index. The caller reserved the table with pool.ensure(1).
 */
export function createStage1Record(pool: TablePool, config: Stage1Config): number {
  const record = recordOfTable(pool.alloc());
  const words = pool.words;
  const pfn = Math.floor(config.root / 4096);
  Atomics.store(words, record + Stage1Record.ROOT_LO, pfn % TWO_32);
  Atomics.store(words, record + Stage1Record.ROOT_HI, Math.floor(pfn / TWO_32));
  Atomics.store(words, record + Stage1Record.LEVELS, config.levels);
  Atomics.store(words, record + Stage1Record.STAGE2, config.stage2);
  Atomics.store(words, record + Stage1Record.HWPT_ID, config.hwptId);
  Atomics.store(words, record + Stage1Record.FLAGS, Stage1RecordFlag.LIVE);
  return record;
}

/**
 * Owner side: appends invalidated page ranges and publishes them with one GENERATION store. More
 * ranges than the ring holds become one full-space record. Readers notice a concurrent append
 * through LOG_SEQ.
 */
export function appendInvalidations(words: Int32Array, record: number, ranges: readonly PfnRange[]): void {
  if (ranges.length === 0) return;
  const list = ranges.length > Stage1Record.LOG_ENTRIES ? [ALL_PFNS] : ranges;
  const seq = Atomics.load(words, record + Stage1Record.LOG_SEQ);
  Atomics.store(words, record + Stage1Record.LOG_SEQ, (seq + 1) | 0);
  const generation = Atomics.load(words, record + Stage1Record.GENERATION);
  for (let i = 0; i < list.length; i++) {
    const r = list[i]!;
    const at = record + Stage1Record.LOG + (((generation + i) & LOG_MASK) * Stage1Record.LOG_STRIDE);
    Atomics.store(words, at, r.first % TWO_32);
    Atomics.store(words, at + 1, Math.floor(r.first / TWO_32));
    Atomics.store(words, at + 2, r.last % TWO_32);
    Atomics.store(words, at + 3, Math.floor(r.last / TWO_32));
  }
  Atomics.store(words, record + Stage1Record.GENERATION, (generation + list.length) | 0);
  Atomics.store(words, record + Stage1Record.LOG_SEQ, (seq + 2) | 0);
}

/** Owner side: retires the record; its table is reused only after the pool's next reclaim(). */
export function releaseStage1Record(pool: TablePool, record: number): void {
  const words = pool.words;
  Atomics.store(words, record + Stage1Record.FLAGS, 0);
  Atomics.add(words, record + Stage1Record.GENERATION, 1);
  pool.release(record / TABLE_WORDS);
}

/**
 * Reader side: the stage-1 description of `record`. False when the record is not a live one (the
 * caller treats the attachment as blocked). `words` must reach past the record.
 */
export function readStage1(words: Int32Array, record: number, out: Stage1View): boolean {
  if (!(record > 0) || record + Stage1Record.LOG > words.length) return false;
  if ((Atomics.load(words, record + Stage1Record.FLAGS) & Stage1RecordFlag.LIVE) === 0) return false;
  const levels = Atomics.load(words, record + Stage1Record.LEVELS);
  if (levels !== 4 && levels !== 5) return false;
  out.root = ((Atomics.load(words, record + Stage1Record.ROOT_HI) >>> 0) * TWO_32 + (Atomics.load(words, record + Stage1Record.ROOT_LO) >>> 0)) * 4096;
  out.levels = levels;
  out.stage2 = Atomics.load(words, record + Stage1Record.STAGE2);
  return true;
}

/**
 * Reader side: calls `visit(first, last)` for each range invalidated by the records of generations
 * [from, to) and returns true, or returns false when they cannot all be read any more (the ring
 * wrapped, or the owner appended meanwhile): the caller then drops everything cached for the
 * record. Ranges visited before a false return may be garbage; dropping them is harmless.
 */
export function readInvalidations(
  words: Int32Array,
  record: number,
  from: number,
  to: number,
  visit: (first: number, last: number) => void,
): boolean {
  const count = (to - from) | 0;
  if (count === 0) return true;
  if (count < 0 || count > Stage1Record.LOG_ENTRIES || record + Stage1Record.LOG + Stage1Record.LOG_ENTRIES * Stage1Record.LOG_STRIDE > words.length) return false;
  const seq = Atomics.load(words, record + Stage1Record.LOG_SEQ);
  if ((seq & 1) !== 0) return false;
  // Records older than the ring's reach may have been overwritten before `seq` was read.
  if (((Atomics.load(words, record + Stage1Record.GENERATION) - from) | 0) > Stage1Record.LOG_ENTRIES) return false;
  for (let g = from; g !== to; g = (g + 1) | 0) {
    const at = record + Stage1Record.LOG + ((g & LOG_MASK) * Stage1Record.LOG_STRIDE);
    const first = (Atomics.load(words, at + 1) >>> 0) * TWO_32 + (Atomics.load(words, at) >>> 0);
    const last = (Atomics.load(words, at + 3) >>> 0) * TWO_32 + (Atomics.load(words, at + 2) >>> 0);
    visit(first, last);
  }
  return Atomics.load(words, record + Stage1Record.LOG_SEQ) === seq;
}
