import { EntryFlag, HeaderSlot, MAX_IOVA_PFN } from '../pagetable/format.js';
import type { IoPageTable } from '../pagetable/radix.js';

/**
 * Dirty tracking, owner side: reading and clearing the DIRTY bits device writers set on the leaves
 * of an IOAS table (translator.ts sets them, one compare-and-swap per leaf per clear).
 */

/** Where read-and-clear reports: one bit per `pageSize` bytes from `basePfn`'s IOVA. */
export interface DirtyBitmapTarget {
  /** Bit i is bit (i & 31) of word i >> 5: the same bits as a little-endian u64 bitmap. */
  readonly words: Uint32Array;
  readonly basePfn: number;
  /** Table pages per bitmap bit (pageSize ≥ 4 KiB), or 0 when a page spans several bits. */
  readonly pagesPerBit: number;
  /** Bitmap bits per table page (pageSize < 4 KiB), or 0. */
  readonly bitsPerPage: number;
}

/** Sets bits [from, to) of a bitmap. */
function setBits(words: Uint32Array, from: number, to: number): void {
  let i = from;
  while (i < to && (i & 31) !== 0) {
    words[i >>> 5]! |= 1 << (i & 31);
    i++;
  }
  while (i + 32 <= to) {
    words[i >>> 5] = 0xffffffff;
    i += 32;
  }
  while (i < to) {
    words[i >>> 5]! |= 1 << (i & 31);
    i++;
  }
}

function record(target: DirtyBitmapTarget, firstPfn: number, lastPfn: number): void {
  const a = firstPfn - target.basePfn;
  const b = lastPfn - target.basePfn;
  if (target.pagesPerBit > 0) setBits(target.words, Math.floor(a / target.pagesPerBit), Math.floor(b / target.pagesPerBit) + 1);
  else setBits(target.words, a * target.bitsPerPage, (b + 1) * target.bitsPerPage);
}

/**
 * Reads the DIRTY bits of the leaves over [firstPfn, lastPfn], reporting every page of a dirty leaf
 * that lies in the range (a huge leaf is dirty as a whole, as the kernel reports a huge IOPTE), and
 * clears them unless `noClear`. A leaf that reaches past the range is reported but not cleared (the
 * kernel's drivers clear the whole IOPTE and so forget the pages outside the range).
 *
 * The clear is one atomic AND per dirty leaf: a writer's compare-and-swap that lands before it is
 * reported now, one that lands after it stays set for the next read. A leaf whose bit reads clear
 * is left alone, so a bit set meanwhile is never lost. Returns how many leaves were cleared; the
 * caller must then bump the generation (bumpDirtyGeneration) and wait for device workers, so that
 * none keeps a cached "already dirty" leaf.
 */
export function readAndClearDirty(
  table: IoPageTable,
  words: Int32Array,
  firstPfn: number,
  lastPfn: number,
  noClear: boolean,
  target: DirtyBitmapTarget | undefined,
): number {
  let cleared = 0;
  table.forEachLeaf(firstPfn, lastPfn, (pfn, pages, _guest, flags, flagsWord) => {
    if ((flags & EntryFlag.DIRTY) === 0) return;
    const inside = pfn >= firstPfn && pfn + pages - 1 <= lastPfn;
    let dirty = true;
    if (!noClear && inside) {
      dirty = (Atomics.and(words, flagsWord, ~EntryFlag.DIRTY) & EntryFlag.DIRTY) !== 0;
      if (dirty) cleared++;
    }
    if (dirty && target !== undefined) record(target, Math.max(pfn, firstPfn), Math.min(pfn + pages - 1, lastPfn));
  });
  return cleared;
}

/**
 * After clearing DIRTY bits: moves the address space's GENERATION so that device workers drop
 * the leaves they cached as already dirty (the kernel flushes the IOTLB after clearing for the
 * same reason: hardware that caches the dirty state would not set it again).
 */
export function bumpDirtyGeneration(words: Int32Array, header: number): void {
  Atomics.add(words, header + HeaderSlot.GENERATION, 1);
}

/** Every dirty leaf of a table as [first page, pages] runs in IOVA order, adjacent leaves merged. */
export function dirtyRuns(table: IoPageTable): [number, number][] {
  const runs: [number, number][] = [];
  table.forEachLeaf(0, MAX_IOVA_PFN, (pfn, pages, _guest, flags) => {
    if ((flags & EntryFlag.DIRTY) === 0) return;
    const last = runs[runs.length - 1];
    if (last !== undefined && last[0] + last[1] === pfn) last[1] += pages;
    else runs.push([pfn, pages]);
  });
  return runs;
}

/**
 * Restore of saved dirty bits: marks every leaf of pages [firstPfn, lastPfn] dirty, as a device
 * write through it would. Returns false, marking nothing, unless the range is exactly a run of whole
 * mapped leaves (a saved run always is).
 */
export function markDirtyRun(table: IoPageTable, words: Int32Array, firstPfn: number, lastPfn: number): boolean {
  const flagsWords: number[] = [];
  let expect = firstPfn;
  let whole = true;
  table.forEachLeaf(firstPfn, lastPfn, (pfn, pages, _guest, _flags, flagsWord) => {
    if (pfn !== expect || pfn + pages - 1 > lastPfn) {
      whole = false;
      return false;
    }
    flagsWords.push(flagsWord);
    expect = pfn + pages;
    return true;
  });
  if (!whole || expect !== lastPfn + 1) return false;
  for (const w of flagsWords) Atomics.or(words, w, EntryFlag.DIRTY);
  return true;
}
