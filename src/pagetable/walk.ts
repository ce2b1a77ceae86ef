import {
  Entry,
  EntryFlag,
  HeaderSlot,
  LEVEL_PAGES,
  PAGE_SHIFT,
  LEVEL_BITS,
  ROOT_INDEX_MASK,
  ROOT_LEVELS_SHIFT,
  TABLE_PAGES,
  entryIndex,
  entryWord,
} from './format.js';

/** A translation found by walk(). Reused by callers on hot paths to avoid allocation. */
export interface LeafInfo {
  /** Guest page frame backing the 4 KiB page that was looked up. */
  guestPfn: number;
  /** IOVA page frame where the leaf begins (aligned to its size). */
  leafPfn: number;
  /** Guest page frame where the leaf begins. */
  leafGuestPfn: number;
  /** 12, 21 or 30. */
  pageShift: number;
  /** The leaf's flags word (EntryFlag bits). */
  flags: number;
}

export function emptyLeafInfo(): LeafInfo {
  return { guestPfn: 0, leafPfn: 0, leafGuestPfn: 0, pageShift: PAGE_SHIFT, flags: 0 };
}

/** walkWords() results. */
export const WalkResult = {
  MISS: 0,
  HIT: 1,
  /** An index fell outside `words`: a fixed-length view made before the pool grew. Refresh it. */
  STALE_VIEW: -1,
} as const;

/**
 * Walks one address space for IOVA page `iovaPfn`, reading shared memory only: `words` is an Int32Array
 * over the table pool's buffer, `header` the Int32 index of the address space's header slot. Safe
 * from any thread while the owner mutates: the root is read in one atomic load, each flags word is
 * loaded atomically before its frame word (the owner writes the frame first, then publishes flags),
 * and tables are never reused while a reader may hold them.
 */
export function walkWords(words: Int32Array, header: number, iovaPfn: number, out: LeafInfo): number {
  for (;;) {
    const r = walkOnce(words, header, iovaPfn, out);
    if (r !== RETRY) return r;
  }
}

/** walkOnce(): the leaf changed under the reader; walk again. */
const RETRY = -2;

function walkOnce(words: Int32Array, header: number, iovaPfn: number, out: LeafInfo): number {
  if (header + HeaderSlot.WORDS > words.length) return WalkResult.STALE_VIEW;
  const root = Atomics.load(words, header + HeaderSlot.ROOT);
  const levels = root >>> ROOT_LEVELS_SHIFT;
  if (levels === 0 || !(iovaPfn >= 0 && iovaPfn < TABLE_PAGES[levels - 1]!)) return WalkResult.MISS;
  let table = root & ROOT_INDEX_MASK;
  for (let level = levels - 1; level >= 0; level--) {
    const w = entryWord(table, entryIndex(iovaPfn, level));
    if (w + Entry.WORDS > words.length) return WalkResult.STALE_VIEW;
    const flags = Atomics.load(words, w + Entry.FLAGS_WORD);
    if ((flags & EntryFlag.PRESENT) === 0) return WalkResult.MISS;
    const frame = words[w + Entry.FRAME_WORD]! >>> 0;
    // The frame belongs to these flags only if they still hold after it was read: an entry
    // cleared and set again in between (a leaf remapped, a table replaced by a huge leaf) would pair
    // a frame with flags it never had. Within a DMA bracket the owner cannot clear and set an entry
    // twice (narrowing changes wait for quiescence), so one re-check suffices.
    if (Atomics.load(words, w + Entry.FLAGS_WORD) !== flags) return RETRY;
    if (level === 0 || (flags & EntryFlag.LEAF) !== 0) {
      const offset = iovaPfn % LEVEL_PAGES[level]!;
      out.guestPfn = frame + offset;
      out.leafPfn = iovaPfn - offset;
      out.leafGuestPfn = frame;
      out.pageShift = PAGE_SHIFT + LEVEL_BITS * level;
      out.flags = flags;
      return WalkResult.HIT;
    }
    // A table pointer needs no second look: a table is never reused before reclaim(), so the
    // table read here, stale or not, is intact.
    table = frame;
  }
  return WalkResult.MISS;
}

/**
 * walkWords() for a view that cannot go stale (a length-tracking view, or the owner's current view).
 * Returns false for a miss (not mapped, or beyond the table's current reach).
 */
export function walk(words: Int32Array, header: number, iovaPfn: number, out: LeafInfo): boolean {
  return walkWords(words, header, iovaPfn, out) === WalkResult.HIT;
}

/** A fixed-length Int32Array over all of a (possibly growable) shared buffer as it is now. */
export function fixedView(buffer: SharedArrayBuffer): Int32Array {
  return new Int32Array(buffer, 0, buffer.byteLength >>> 2);
}

/**
 * A reader's handle on a table pool from another thread. It keeps a fixed-length view (Atomics on
 * length-tracking views of growable buffers are several times slower in V8) and re-maps it when
 * a walk reaches past it, which only happens after the owner grew the pool.
 */
export class TableReader {
  words: Int32Array;

  constructor(readonly buffer: SharedArrayBuffer) {
    this.words = fixedView(buffer);
  }

  /** Re-maps the view to the buffer's current length. False when it had not grown. */
  refresh(): boolean {
    if (this.buffer.byteLength >>> 2 === this.words.length) return false;
    this.words = fixedView(this.buffer);
    return true;
  }

  walk(header: number, iovaPfn: number, out: LeafInfo): boolean {
    for (;;) {
      const r = walkWords(this.words, header, iovaPfn, out);
      if (r !== WalkResult.STALE_VIEW) return r === WalkResult.HIT;
      if (!this.refresh()) return false;
    }
  }

  /** markLeafDirty() through this view, re-mapped when the pool grew. */
  markDirty(header: number, iovaPfn: number): void {
    while (!markLeafDirty(this.words, header, iovaPfn)) {
      if (!this.refresh()) return;
    }
  }

  generation(header: number): number {
    if (header + HeaderSlot.WORDS > this.words.length) this.refresh();
    return Atomics.load(this.words, header + HeaderSlot.GENERATION);
  }
}

/** The generation word of an address space: changes whenever a translation is removed. */
export function headerGeneration(words: Int32Array, header: number): number {
  return Atomics.load(words, header + HeaderSlot.GENERATION);
}

/** leafFlagsWord() when nothing is mapped at the page. */
export const NO_LEAF = -1;

/**
 * The Int32 index of the flags word of the leaf that maps IOVA page `iovaPfn` (NO_LEAF when none;
 * WalkResult.STALE_VIEW when `words` is older than the pool). The same lock-free walk as walkWords().
 */
export function leafFlagsWord(words: Int32Array, header: number, iovaPfn: number): number {
  if (header + HeaderSlot.WORDS > words.length) return WalkResult.STALE_VIEW;
  const root = Atomics.load(words, header + HeaderSlot.ROOT);
  const levels = root >>> ROOT_LEVELS_SHIFT;
  if (levels === 0 || !(iovaPfn >= 0 && iovaPfn < TABLE_PAGES[levels - 1]!)) return NO_LEAF;
  let table = root & ROOT_INDEX_MASK;
  for (let level = levels - 1; level >= 0; level--) {
    const w = entryWord(table, entryIndex(iovaPfn, level));
    if (w + Entry.WORDS > words.length) return WalkResult.STALE_VIEW;
    const flags = Atomics.load(words, w + Entry.FLAGS_WORD);
    if ((flags & EntryFlag.PRESENT) === 0) return NO_LEAF;
    if (level === 0 || (flags & EntryFlag.LEAF) !== 0) return w + Entry.FLAGS_WORD;
    table = words[w + Entry.FRAME_WORD]! >>> 0;
    // A table pointer is only good with the flags it was read under (see walkOnce).
    if (Atomics.load(words, w + Entry.FLAGS_WORD) !== flags) return leafFlagsWord(words, header, iovaPfn);
  }
  return NO_LEAF;
}

/**
 * Dirty tracking, device side: sets EntryFlag.DIRTY on the leaf that maps `iovaPfn`, with a
 * compare-and-swap so that a leaf the owner cleared (unmap) in the meantime is left alone. One
 * atomic operation when the bit is clear, none when it is already set. Returns false when the
 * view is stale (refresh and call again); true otherwise, mapped or not.
 */
export function markLeafDirty(words: Int32Array, header: number, iovaPfn: number): boolean {
  const w = leafFlagsWord(words, header, iovaPfn);
  if (w === WalkResult.STALE_VIEW) return false;
  if (w === NO_LEAF) return true;
  for (;;) {
    const flags = Atomics.load(words, w);
    if ((flags & EntryFlag.PRESENT) === 0 || (flags & EntryFlag.DIRTY) !== 0) return true;
    if (Atomics.compareExchange(words, w, flags, flags | EntryFlag.DIRTY) === flags) return true;
  }
}
