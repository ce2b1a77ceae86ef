import {
  ENTRIES_PER_TABLE,
  Entry,
  EntryFlag,
  HeaderFlag,
  HeaderSlot,
  LEVEL_PAGES,
  MAX_IOVA_PFN,
  MAX_LEAF_LEVEL,
  MIN_LEVELS,
  TABLE_PAGES,
  entryWord,
  levelsFor,
  packRoot,
} from './format.js';
import type { TablePool } from './pool.js';
import { walk, type LeafInfo } from './walk.js';

/** A leaf as the iterators report it: always whole, even when it straddles the range asked for. */
export interface LeafVisitor {
  /** Return false to stop. */
  (pfn: number, pages: number, guestPfn: number, flags: number, flagsWord: number): boolean | void;
}

/** An IOAS area read back from the table. */
export interface AreaVisitor {
  /** Return false to stop. */
  (startPfn: number, pages: number, guestPfn: number, flags: number): boolean | void;
}

const { PRESENT, LEAF, AREA_START } = EntryFlag;
const FLAGS = Entry.FLAGS_WORD;
const FRAME = Entry.FRAME_WORD;

/**
 * One I/O address space's radix table, owner side. Mutations keep two per-table counters in the
 * pool (entries present, entries "full" = a leaf or a child with no hole) so searches skip empty
 * and full subtrees: their cost follows what is mapped, not the size of the range asked about.
 *
 * Callers guarantee the preconditions (map into an empty range, unmap whole leaves, capacity
 * reserved with pool.ensure(tablesForMap())); violations are bugs and throw plain Errors.
 */
export class IoPageTable {
  readonly header: number;
  private root: number;
  private levels = MIN_LEVELS;
  private mapped = 0;
  private owned = 1;
  private destroyed = false;

  /** Tables a new table needs: its root plus possibly a header page. */
  static readonly CREATE_TABLES = 2;

  /** Creates an empty 4-level table. The caller checked pool.ensure(CREATE_TABLES). */
  constructor(
    private readonly pool: TablePool,
    ownerId: number,
  ) {
    this.header = pool.allocHeader();
    this.root = pool.alloc();
    this.words[this.header + HeaderSlot.OWNER_ID] = ownerId;
    this.words[this.header + HeaderSlot.FLAGS] = HeaderFlag.LIVE;
    Atomics.store(this.words, this.header + HeaderSlot.ROOT, packRoot(this.root, this.levels));
  }

  /** The pool's current view (it changes when the pool grows, between operations). */
  private get words(): Int32Array {
    return this.pool.words;
  }

  get levelCount(): number {
    return this.levels;
  }
  /** 4 KiB pages currently mapped. */
  get mappedPages(): number {
    return this.mapped;
  }
  /** Tables this address space holds (root included). */
  get tableCount(): number {
    return this.owned;
  }

  lookup(pfn: number, out: LeafInfo): boolean {
    return walk(this.words, this.header, pfn, out);
  }

  /**
   * The tables map() will allocate for this range, counted on the current table (exact), or an
   * upper bound when the root must grow first (maps above 2^48 and 2^57 only).
   */
  tablesForMap(startPfn: number, pages: number, guestPfn: number, huge: boolean): number {
    const last = startPfn + pages - 1;
    const levels = levelsFor(last);
    const hugeLevel = huge ? MAX_LEAF_LEVEL : 0;
    if (levels <= this.levels) return this.countNew(this.root, this.levels - 1, 0, startPfn, startPfn + pages, startPfn, guestPfn, hugeLevel);
    let total = levels - this.levels;
    for (let level = 0; level < levels - 1; level++) {
      const aligned = huge && level < MAX_LEAF_LEVEL && (startPfn - guestPfn) % LEVEL_PAGES[level + 1]! === 0;
      const span = Math.floor(last / TABLE_PAGES[level]!) - Math.floor(startPfn / TABLE_PAGES[level]!) + 1;
      total += aligned ? Math.min(2, span) : span;
    }
    return total;
  }

  /** Dry run of mapIn(): tables it would allocate below `table` (-1: a table that does not exist yet). */
  private countNew(
    table: number,
    level: number,
    base: number,
    start: number,
    end: number,
    areaStart: number,
    areaGuest: number,
    hugeLevel: number,
  ): number {
    let count = table < 0 ? 1 : 0;
    if (level === 0) return count;
    const words = this.words;
    const span = LEVEL_PAGES[level]!;
    const lastIdx = Math.floor((end - 1 - base) / span);
    for (let idx = Math.floor((start - base) / span); idx <= lastIdx; idx++) {
      const childBase = base + idx * span;
      const cs = Math.max(start, childBase);
      const ce = Math.min(end, childBase + span);
      const flags = table < 0 ? 0 : words[entryWord(table, idx) + FLAGS]!;
      if ((flags & PRESENT) !== 0) {
        if ((flags & LEAF) === 0) count += this.countNew(words[entryWord(table, idx) + FRAME]! >>> 0, level - 1, childBase, cs, ce, areaStart, areaGuest, hugeLevel);
        continue;
      }
      const guest = areaGuest + (cs - areaStart);
      if (level <= hugeLevel && cs === childBase && ce === childBase + span && guest % span === 0) continue;
      count += this.countNew(-1, level - 1, childBase, cs, ce, areaStart, areaGuest, hugeLevel);
    }
    return count;
  }

  /**
   * Maps IOVA pages [startPfn, startPfn+pages) to guest frames from guestPfn with `perms`
   * (EntryFlag.READ/WRITE), marking the first page AREA_START. The range must be empty.
   * `huge` allows 2 MiB / 1 GiB leaves where IOVA, GPA and length line up.
   */
  map(startPfn: number, pages: number, guestPfn: number, perms: number, huge: boolean): void {
    this.assertLive();
    const end = startPfn + pages;
    if (pages <= 0 || end - 1 > MAX_IOVA_PFN) throw new Error(`bad map range pfn ${startPfn} + ${pages}`);
    this.growTo(levelsFor(end - 1));
    const leafFlags = (perms & EntryFlag.PERM_MASK) | PRESENT | LEAF;
    this.mapIn(this.root, this.levels - 1, 0, startPfn, end, startPfn, guestPfn, leafFlags, huge ? MAX_LEAF_LEVEL : 0);
    this.mapped += pages;
  }

  private growTo(levels: number): void {
    while (this.levels < levels) {
      const next = this.pool.alloc({ flagsOnly: true });
      this.owned++;
      const old = this.root;
      if (this.pool.present[old] === 0) {
        // Nothing below the old root: drop it rather than hang an empty subtree under entry 0.
        this.pool.release(old);
        this.owned--;
      } else {
        const w = entryWord(next, 0);
        this.words[w + FRAME] = old;
        Atomics.store(this.words, w + FLAGS, PRESENT);
        this.pool.markSet(next, 0);
        this.pool.full[next] = this.pool.full[old] === ENTRIES_PER_TABLE ? 1 : 0;
      }
      this.root = next;
      this.levels++;
      // One store publishes root and level count together.
      Atomics.store(this.words, this.header + HeaderSlot.ROOT, packRoot(this.root, this.levels));
    }
  }

  private mapIn(
    table: number,
    level: number,
    base: number,
    start: number,
    end: number,
    areaStart: number,
    areaGuest: number,
    leafFlags: number,
    hugeLevel: number,
  ): void {
    const { words, pool } = this;
    const span = LEVEL_PAGES[level]!;
    const lastIdx = Math.floor((end - 1 - base) / span);
    for (let idx = Math.floor((start - base) / span); idx <= lastIdx; idx++) {
      const childBase = base + idx * span;
      const cs = Math.max(start, childBase);
      const ce = Math.min(end, childBase + span);
      const guest = areaGuest + (cs - areaStart);
      const w = entryWord(table, idx);
      const flags = words[w + FLAGS]!;
      const wholeSpan = cs === childBase && ce === childBase + span;
      if (level === 0 || (level <= hugeLevel && wholeSpan && guest % span === 0 && (flags & PRESENT) === 0)) {
        if ((flags & PRESENT) !== 0) throw new Error(`map over a present entry at pfn ${childBase}`);
        words[w + FRAME] = guest;
        Atomics.store(words, w + FLAGS, cs === areaStart ? leafFlags | AREA_START : leafFlags);
        pool.markSet(table, idx);
        pool.full[table]!++;
        continue;
      }
      if ((flags & PRESENT) !== 0) {
        if ((flags & LEAF) !== 0) throw new Error(`map over a leaf at pfn ${childBase}`);
        const child = words[w + FRAME]! >>> 0;
        const wasFull = pool.full[child] === ENTRIES_PER_TABLE;
        this.mapIn(child, level - 1, childBase, cs, ce, areaStart, areaGuest, leafFlags, hugeLevel);
        if (!wasFull && pool.full[child] === ENTRIES_PER_TABLE) pool.full[table]!++;
      } else {
        // Fill the new table before linking it, so a reader never sees it half built.
        const child = pool.alloc({ flagsOnly: true });
        this.owned++;
        this.mapIn(child, level - 1, childBase, cs, ce, areaStart, areaGuest, leafFlags, hugeLevel);
        words[w + FRAME] = child;
        Atomics.store(words, w + FLAGS, PRESENT);
        pool.markSet(table, idx);
        if (pool.full[child] === ENTRIES_PER_TABLE) pool.full[table]!++;
      }
    }
  }

  /**
   * Removes every leaf in [startPfn, lastPfn] (which must not cut a leaf), calling onLeaf for each,
   * frees tables left empty (deferred: see TablePool.reclaim) and bumps the header generation.
   * Returns the pages removed.
   */
  unmap(startPfn: number, lastPfn: number, onLeaf?: (guestPfn: number, pages: number) => void): number {
    this.assertLive();
    const reach = TABLE_PAGES[this.levels - 1]!;
    if (startPfn >= reach) return 0;
    const removed = this.unmapIn(this.root, this.levels - 1, 0, startPfn, Math.min(lastPfn + 1, reach), onLeaf);
    if (removed > 0) {
      this.mapped -= removed;
      Atomics.add(this.words, this.header + HeaderSlot.GENERATION, 1);
    }
    return removed;
  }

  private unmapIn(
    table: number,
    level: number,
    base: number,
    start: number,
    end: number,
    onLeaf: ((guestPfn: number, pages: number) => void) | undefined,
  ): number {
    const { words, pool } = this;
    if (pool.present[table] === 0) return 0;
    const span = LEVEL_PAGES[level]!;
    const lastIdx = Math.min(pool.hi[table]! - 1, Math.floor((end - 1 - base) / span));
    let removed = 0;
    for (let idx = Math.max(pool.lo[table]!, Math.floor((start - base) / span)); idx <= lastIdx; idx++) {
      const w = entryWord(table, idx);
      const flags = words[w + FLAGS]!;
      if ((flags & PRESENT) === 0) continue;
      const childBase = base + idx * span;
      if (level === 0 || (flags & LEAF) !== 0) {
        if (childBase < start || childBase + span > end) throw new Error(`unmap would cut the leaf at pfn ${childBase}`);
        const guest = words[w + FRAME]! >>> 0;
        // Only the flags word is cleared: a reader that loaded the old flags and reads the frame
        // next gets the old frame, and its re-check of the flags sends it round again.
        Atomics.store(words, w + FLAGS, 0);
        pool.markClear(table, idx);
        pool.full[table]!--;
        removed += span;
        onLeaf?.(guest, span);
        continue;
      }
      const child = words[w + FRAME]! >>> 0;
      const wasFull = pool.full[child] === ENTRIES_PER_TABLE;
      removed += this.unmapIn(child, level - 1, childBase, Math.max(start, childBase), Math.min(end, childBase + span), onLeaf);
      if (wasFull && pool.full[child] !== ENTRIES_PER_TABLE) pool.full[table]!--;
      if (pool.present[child] === 0) {
        // The frame word keeps pointing at the freed table: a reader that loaded the old flags
        // follows it into that table, which stays intact until reclaim() (after quiescence). A
        // zeroed frame would send it into pool page 0, which is not a table.
        Atomics.store(words, w + FLAGS, 0);
        pool.markClear(table, idx);
        // Every entry of the child was cleared on the way: its flag words are all zero.
        pool.release(child, true);
        this.owned--;
      }
    }
    return removed;
  }

  /** First mapped page in [from, last], or -1. */
  nextMapped(from: number, last: number): number {
    const reach = TABLE_PAGES[this.levels - 1]!;
    if (from > last || from >= reach) return -1;
    return this.findMapped(this.root, this.levels - 1, 0, from, Math.min(last, reach - 1));
  }

  private findMapped(table: number, level: number, base: number, from: number, last: number): number {
    const { words, pool } = this;
    if (pool.present[table] === 0) return -1;
    const span = LEVEL_PAGES[level]!;
    const lastIdx = Math.min(pool.hi[table]! - 1, Math.floor((last - base) / span));
    for (let idx = Math.max(pool.lo[table]!, Math.floor((from - base) / span)); idx <= lastIdx; idx++) {
      const w = entryWord(table, idx);
      const flags = words[w + FLAGS]!;
      if ((flags & PRESENT) === 0) continue;
      const childBase = base + idx * span;
      if (level === 0 || (flags & LEAF) !== 0) return Math.max(from, childBase);
      const found = this.findMapped(words[w + FRAME]! >>> 0, level - 1, childBase, Math.max(from, childBase), Math.min(last, childBase + span - 1));
      if (found >= 0) return found;
    }
    return -1;
  }

  /** First unmapped page in [from, last], or -1 when all of it is mapped. */
  nextUnmapped(from: number, last: number): number {
    if (from > last) return -1;
    const reach = TABLE_PAGES[this.levels - 1]!;
    if (from >= reach) return from;
    const found = this.findHole(this.root, this.levels - 1, 0, from, Math.min(last, reach - 1));
    if (found >= 0) return found;
    return last >= reach ? reach : -1;
  }

  private findHole(table: number, level: number, base: number, from: number, last: number): number {
    const { words, pool } = this;
    const span = LEVEL_PAGES[level]!;
    const lastIdx = Math.min(ENTRIES_PER_TABLE - 1, Math.floor((last - base) / span));
    const fromIdx = Math.floor((from - base) / span);
    const lo = pool.lo[table]!;
    const hi = pool.hi[table]!;
    if (pool.full[table] === hi - lo) {
      // Every entry of [lo, hi) is a leaf or a full subtree and nothing lies outside it (the usual
      // shape after contiguous maps): the first hole is `from` itself, or the entry at `hi`.
      const idx = fromIdx < lo || fromIdx >= hi ? fromIdx : hi;
      return idx > lastIdx ? -1 : Math.max(from, base + idx * span);
    }
    for (let idx = fromIdx; idx <= lastIdx; idx++) {
      const w = entryWord(table, idx);
      const flags = words[w + FLAGS]!;
      const childBase = base + idx * span;
      if ((flags & PRESENT) === 0) return Math.max(from, childBase);
      if (level === 0 || (flags & LEAF) !== 0) continue;
      const child = words[w + FRAME]! >>> 0;
      if (pool.full[child] === ENTRIES_PER_TABLE) continue;
      const found = this.findHole(child, level - 1, childBase, Math.max(from, childBase), Math.min(last, childBase + span - 1));
      if (found >= 0) return found;
    }
    return -1;
  }

  /** Visits present leaves that intersect [from, last] in ascending order. Returns false if stopped. */
  forEachLeaf(from: number, last: number, visit: LeafVisitor): boolean {
    const reach = TABLE_PAGES[this.levels - 1]!;
    if (from > last || from >= reach) return true;
    return this.visitUp(this.root, this.levels - 1, 0, from, Math.min(last, reach - 1), visit);
  }

  private visitUp(table: number, level: number, base: number, from: number, last: number, visit: LeafVisitor): boolean {
    const { words, pool } = this;
    if (pool.present[table] === 0) return true;
    const span = LEVEL_PAGES[level]!;
    const lastIdx = Math.min(pool.hi[table]! - 1, Math.floor((last - base) / span));
    for (let idx = Math.max(pool.lo[table]!, Math.floor((from - base) / span)); idx <= lastIdx; idx++) {
      const w = entryWord(table, idx);
      const flags = words[w + FLAGS]!;
      if ((flags & PRESENT) === 0) continue;
      const childBase = base + idx * span;
      if (level === 0 || (flags & LEAF) !== 0) {
        if (visit(childBase, span, words[w + FRAME]! >>> 0, flags, w + FLAGS) === false) return false;
        continue;
      }
      const child = words[w + FRAME]! >>> 0;
      if (!this.visitUp(child, level - 1, childBase, Math.max(from, childBase), Math.min(last, childBase + span - 1), visit)) return false;
    }
    return true;
  }

  /** Visits present leaves that intersect [low, from] in descending order. Returns false if stopped. */
  forEachLeafDown(from: number, low: number, visit: LeafVisitor): boolean {
    const reach = TABLE_PAGES[this.levels - 1]!;
    if (low > from || low >= reach) return true;
    return this.visitDown(this.root, this.levels - 1, 0, Math.min(from, reach - 1), low, visit);
  }

  private visitDown(table: number, level: number, base: number, from: number, low: number, visit: LeafVisitor): boolean {
    const { words, pool } = this;
    if (pool.present[table] === 0) return true;
    const span = LEVEL_PAGES[level]!;
    const lowIdx = Math.max(pool.lo[table]!, Math.floor((low - base) / span));
    for (let idx = Math.min(pool.hi[table]! - 1, Math.floor((from - base) / span)); idx >= lowIdx; idx--) {
      const w = entryWord(table, idx);
      const flags = words[w + FLAGS]!;
      if ((flags & PRESENT) === 0) continue;
      const childBase = base + idx * span;
      if (level === 0 || (flags & LEAF) !== 0) {
        if (visit(childBase, span, words[w + FRAME]! >>> 0, flags, w + FLAGS) === false) return false;
        continue;
      }
      const child = words[w + FRAME]! >>> 0;
      if (!this.visitDown(child, level - 1, childBase, Math.min(from, childBase + span - 1), Math.max(low, childBase), visit)) return false;
    }
    return true;
  }

  /** Start page of the area holding mapped page `pfn` (walks back to its AREA_START leaf). */
  areaStartOf(pfn: number): number {
    let start = -1;
    let expectEnd = pfn;
    this.forEachLeafDown(pfn, 0, (leafPfn, pages, _guest, flags) => {
      if (leafPfn + pages - 1 < expectEnd) return false; // a hole: the table is inconsistent
      if ((flags & AREA_START) !== 0) {
        start = leafPfn;
        return false;
      }
      expectEnd = leafPfn - 1;
      return true;
    });
    if (start < 0) throw new Error(`no AREA_START before pfn ${pfn}`);
    return start;
  }

  /**
   * Visits, in order, every area that intersects [from, last], each whole (its true start and
   * length, even past the range). Cost follows the leaves of those areas.
   */
  forEachArea(from: number, last: number, visit: AreaVisitor): void {
    const first = this.nextMapped(from, last);
    if (first < 0) return;
    let curStart = this.areaStartOf(first);
    let curPages = 0;
    let curGuest = 0;
    let curFlags = 0;
    let stopped = false;
    this.forEachLeaf(curStart, MAX_IOVA_PFN, (pfn, pages, guest, flags) => {
      const contiguous = curPages > 0 && pfn === curStart + curPages;
      if (curPages > 0 && (!contiguous || (flags & AREA_START) !== 0)) {
        if (visit(curStart, curPages, curGuest, curFlags) === false) {
          stopped = true;
          return false;
        }
        curPages = 0;
      }
      if (curPages === 0) {
        if (pfn > last) return false;
        curStart = pfn;
        curGuest = guest;
        curFlags = flags;
      }
      curPages += pages;
      return true;
    });
    if (!stopped && curPages > 0 && curStart <= last) visit(curStart, curPages, curGuest, curFlags);
  }

  /** Releases every table and the header slot (deferred until the pool's reclaim()). */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    Atomics.store(this.words, this.header + HeaderSlot.ROOT, 0);
    Atomics.add(this.words, this.header + HeaderSlot.GENERATION, 1);
    this.words[this.header + HeaderSlot.FLAGS] = 0;
    this.releaseTree(this.root, this.levels - 1);
    this.pool.releaseHeader(this.header);
    this.mapped = 0;
    this.owned = 0;
  }

  private releaseTree(table: number, level: number): void {
    if (level > 0 && this.pool.present[table] !== 0) {
      for (let idx = 0; idx < ENTRIES_PER_TABLE; idx++) {
        const w = entryWord(table, idx);
        const flags = this.words[w + FLAGS]!;
        if ((flags & PRESENT) !== 0 && (flags & LEAF) === 0) this.releaseTree(this.words[w + FRAME]! >>> 0, level - 1);
      }
    }
    this.pool.release(table);
  }

  private assertLive(): void {
    if (this.destroyed) throw new Error('page table used after destroy');
  }
}
