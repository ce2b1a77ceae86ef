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

/**
 * Walks one address space for IOVA page `iovaPfn`, reading shared memory only: `words` is an Int32Array
 * over the table pool's buffer, `header` the Int32 index of the address space's header slot. Safe
 * from any thread while the owner mutates: the root is read in one atomic load, each flags word is
 * loaded atomically before its frame word (the owner writes the frame first, then publishes flags),
 * and tables are never reused while a reader may hold them.
 *
 * Returns false for a miss (not mapped, or beyond the table's current reach).
 */
export function walk(words: Int32Array, header: number, iovaPfn: number, out: LeafInfo): boolean {
  const root = Atomics.load(words, header + HeaderSlot.ROOT);
  const levels = root >>> ROOT_LEVELS_SHIFT;
  if (levels === 0 || !(iovaPfn >= 0 && iovaPfn < TABLE_PAGES[levels - 1]!)) return false;
  let table = root & ROOT_INDEX_MASK;
  for (let level = levels - 1; level >= 0; level--) {
    const w = entryWord(table, entryIndex(iovaPfn, level));
    const flags = Atomics.load(words, w + Entry.FLAGS_WORD);
    if ((flags & EntryFlag.PRESENT) === 0) return false;
    const frame = words[w + Entry.FRAME_WORD]! >>> 0;
    if (level === 0 || (flags & EntryFlag.LEAF) !== 0) {
      const offset = iovaPfn % LEVEL_PAGES[level]!;
      out.guestPfn = frame + offset;
      out.leafPfn = iovaPfn - offset;
      out.leafGuestPfn = frame;
      out.pageShift = PAGE_SHIFT + LEVEL_BITS * level;
      out.flags = flags;
      return true;
    }
    table = frame;
  }
  return false;
}

/** The generation word of an address space: changes whenever a translation is removed. */
export function headerGeneration(words: Int32Array, header: number): number {
  return Atomics.load(words, header + HeaderSlot.GENERATION);
}
