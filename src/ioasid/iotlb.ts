import { LEVEL_BITS, PAGE_SHIFT } from '../pagetable/format.js';
import type { LeafInfo } from '../pagetable/walk.js';

/**
 * One IOTLB entry inside the entry array (Float64 indices: IOVA page frames reach 2^52, beyond an
 * Int32). Not shared: each device worker has its own IOTLB, filled from its own walks.
 */
export const IotlbEntry = {
  /** IOVA page frame where the cached leaf begins. */
  PFN: 0,
  /** Header slot of the address space the leaf belongs to; 0 marks an empty entry. */
  HEADER: 1,
  /** Guest page frame where the leaf begins. */
  GUEST: 2,
  /** The leaf's flags word (EntryFlag bits). */
  FLAGS: 3,
  STRIDE: 4,
} as const;

export interface IotlbOptions {
  /** Entries for 4 KiB leaves: a power of two (default 1024, 4 MiB of reach). */
  readonly smallEntries?: number;
  /** Entries for 2 MiB leaves (default 64, 128 MiB of reach). */
  readonly mediumEntries?: number;
  /** Entries for 1 GiB leaves (default 16). */
  readonly largeEntries?: number;
  /** Address spaces whose generation is tracked at once (default 8); the oldest is evicted. */
  readonly trackedSpaces?: number;
}

/** Called with each invalidated range of IOVA page frames, [first, last] inclusive. */
export type RangeVisitor = (first: number, last: number) => void;

/** Where revalidate() reads an address space's GENERATION word (TableReader fits). */
export interface GenerationSource {
  generation(header: number): number;
  /**
   * For a nested space (a stage-1 record): visits the IOVA ranges invalidated by generations
   * [from, to) and returns true, or returns false when they are no longer known. Without it, a
   * nested space whose generation moved loses all its entries.
   */
  invalidations?(tag: number, from: number, to: number, visit: RangeVisitor): boolean;
}

export interface IotlbStats {
  readonly hits: number;
  readonly misses: number;
  readonly fills: number;
  /** Full flushes (epoch moved with a flush, or flush() called). */
  readonly flushes: number;
  /** Address spaces whose entries were dropped because their generation moved (or on request). */
  readonly invalidations: number;
  /** Valid entries overwritten by a fill that hashed to the same set. */
  readonly evictions: number;
  /** Invalidated IOVA ranges applied to nested spaces (each drops only the entries it overlaps). */
  readonly rangeInvalidations: number;
}

// IotlbEntry as plain numbers: the hit path then does no property loads on the layout table.
const STRIDE = IotlbEntry.STRIDE;
const E_PFN = IotlbEntry.PFN;
const E_HEADER = IotlbEntry.HEADER;
const E_GUEST = IotlbEntry.GUEST;
const E_FLAGS = IotlbEntry.FLAGS;
const SHIFT_4K = PAGE_SHIFT;
const SHIFT_2M = PAGE_SHIFT + LEVEL_BITS;
const SHIFT_1G = PAGE_SHIFT + 2 * LEVEL_BITS;
const PAGES_2M = 1 << LEVEL_BITS;
const PAGES_1G = 1 << (2 * LEVEL_BITS);

/** Spreads header slots (multiples of 4, often adjacent) over the sets: Fibonacci hashing. */
function spaceHash(header: number): number {
  return Math.imul(header, 0x9e3779b1) >>> 12;
}

function powerOfTwo(name: string, value: number): number {
  if (!Number.isInteger(value) || value < 1 || value > 1 << 20 || (value & (value - 1)) !== 0) {
    throw new RangeError(`${name} must be a power of two in [1, 2^20], got ${value}`);
  }
  return value;
}

/**
 * A per-worker translation cache: three direct-mapped arrays, one per leaf size, keyed by
 * (address-space header, IOVA page frame). A hit costs one index computation and two compares on
 * one cache line; one 2 MiB or 1 GiB entry serves every 4 KiB page of its leaf. Misses are not
 * cached (a later map makes them valid without any invalidation).
 *
 * Invalidation follows the page table's contract: an address space's GENERATION word moves
 * whenever a translation in it is removed or narrowed. The IOTLB remembers, per address space, the
 * generation its entries were filled under, and drops exactly that space's entries when it moves
 * (revalidate(), or a fill under a newer generation). flush() drops everything.
 *
 * A nested space (combined stage-1 + stage-2 translations, tagged with the stage-1 record) is
 * tracked under two generations: stage 2's, whose move drops the space, and the record's, whose
 * move drops only the entries overlapping the IOVA ranges the record's invalidation ring names.
 */
export class Iotlb {
  // Fields are declared, not initialised, and all set in the constructor: V8 then gives every one
  // a fixed representation from its first store (an emitted `x;` would start each as undefined),
  // which keeps the hit path to plain loads.
  /** Plain (unshared) entry array: small sets, then medium, then large. */
  private declare readonly entries: Float64Array;
  private declare readonly smallMask: number;
  private declare nHits: number;
  private declare nMisses: number;
  private declare readonly mediumBase: number;
  private declare readonly mediumMask: number;
  private declare readonly largeBase: number;
  private declare readonly largeMask: number;
  /** Valid 2 MiB / 1 GiB entries: while zero a small-set miss is final (one probe per miss). */
  private declare hugeValid: number;
  private declare readonly trackHeader: Int32Array;
  private declare readonly trackGeneration: Int32Array;
  private declare tracked: number;
  private declare nFills: number;
  private declare nFlushes: number;
  private declare nInvalidations: number;
  private declare nEvictions: number;
  /** Nested spaces: the stage-2 header each tracked space depends on (0 for a plain space) ... */
  private declare readonly trackParent: Int32Array;
  /** ... and that header's generation when the space's entries were filled. */
  private declare readonly trackParentGeneration: Int32Array;
  private declare nRangeInvalidations: number;
  /** Tag of the space a RangeVisitor call applies to, and the visitor itself (made once). */
  private declare rangeTag: number;
  private declare readonly rangeVisitor: RangeVisitor;

  constructor(options: IotlbOptions = {}) {
    const small = powerOfTwo('smallEntries', options.smallEntries ?? 1024);
    const medium = powerOfTwo('mediumEntries', options.mediumEntries ?? 64);
    const large = powerOfTwo('largeEntries', options.largeEntries ?? 16);
    const spaces = options.trackedSpaces ?? 8;
    if (!Number.isInteger(spaces) || spaces < 1 || spaces > 1024) throw new RangeError(`trackedSpaces must be in [1, 1024], got ${spaces}`);
    this.entries = new Float64Array((small + medium + large) * IotlbEntry.STRIDE);
    this.smallMask = small - 1;
    this.nHits = 0;
    this.nMisses = 0;
    this.mediumBase = small;
    this.mediumMask = medium - 1;
    this.largeBase = small + medium;
    this.largeMask = large - 1;
    this.hugeValid = 0;
    this.trackHeader = new Int32Array(spaces);
    this.trackGeneration = new Int32Array(spaces);
    this.tracked = 0;
    this.nFills = 0;
    this.nFlushes = 0;
    this.nInvalidations = 0;
    this.nEvictions = 0;
    this.trackParent = new Int32Array(spaces);
    this.trackParentGeneration = new Int32Array(spaces);
    this.nRangeInvalidations = 0;
    this.rangeTag = 0;
    this.rangeVisitor = (first, last) => this.dropRange(this.rangeTag, first, last);
  }

  /**
   * Looks up IOVA page `pfn` of the address space at `header` (never 0). On a hit fills `out` as
   * walk() would and returns true. The hot path: no allocation, no shared-memory access.
   */
  lookup(header: number, pfn: number, out: LeafInfo): boolean {
    const e = this.entries;
    // The low bits of pfn pick the set (ToInt32 keeps them exactly for any pfn below 2^53), so
    // consecutive pages never collide; a multiplicative hash of the header offsets each space.
    const i = ((pfn ^ spaceHash(header)) & this.smallMask) * STRIDE;
    if (e[i + E_PFN] === pfn && e[i + E_HEADER] === header) {
      this.nHits++;
      const guest = e[i + E_GUEST]!;
      out.guestPfn = guest;
      out.leafPfn = pfn;
      out.leafGuestPfn = guest;
      out.pageShift = SHIFT_4K;
      out.flags = e[i + E_FLAGS]!;
      return true;
    }
    if (this.hugeValid !== 0 && this.lookupHuge(header, pfn, out)) {
      this.nHits++;
      return true;
    }
    this.nMisses++;
    return false;
  }

  private lookupHuge(header: number, pfn: number, out: LeafInfo): boolean {
    const e = this.entries;
    const h = spaceHash(header);
    // pfn & (PAGES - 1) keeps the exact low bits, so pfn minus it is the leaf start.
    let leaf = pfn - (pfn & (PAGES_2M - 1));
    let i = (this.mediumBase + (((pfn / PAGES_2M) ^ h) & this.mediumMask)) * STRIDE;
    let shift = SHIFT_2M;
    if (e[i + E_PFN] !== leaf || e[i + E_HEADER] !== header) {
      leaf = pfn - (pfn & (PAGES_1G - 1));
      i = (this.largeBase + (((pfn / PAGES_1G) ^ h) & this.largeMask)) * STRIDE;
      shift = SHIFT_1G;
      if (e[i + E_PFN] !== leaf || e[i + E_HEADER] !== header) return false;
    }
    const guest = e[i + E_GUEST]!;
    out.guestPfn = guest + (pfn - leaf);
    out.leafPfn = leaf;
    out.leafGuestPfn = guest;
    out.pageShift = shift;
    out.flags = e[i + E_FLAGS]!;
    return true;
  }

  /**
   * Caches a leaf found by walk(). `generation` is the address space's GENERATION loaded before
   * the walk began: if it moved since earlier fills, those fills are dropped first, and if it
   * moves after, the next revalidate() drops this one.
   */
  insert(header: number, generation: number, leaf: LeafInfo): void {
    if (!(header > 0)) throw new RangeError(`IOTLB header must be positive, got ${header}`);
    this.track(header, generation, 0, 0);
    this.store(header, leaf);
  }

  /**
   * Caches a combined nested translation under `tag` (its stage-1 record). `generation` is the
   * record's GENERATION and `parentGeneration` stage 2's (`parent`), both loaded before the walk:
   * a later stage-1 invalidation drops the entries in its ranges, any stage-2 change all of them.
   */
  insertNested(tag: number, generation: number, parent: number, parentGeneration: number, leaf: LeafInfo): void {
    if (!(tag > 0) || !(parent > 0)) throw new RangeError(`IOTLB tags must be positive, got ${tag} over ${parent}`);
    this.track(tag, generation, parent, parentGeneration);
    this.store(tag, leaf);
  }

  /**
   * Makes the entries of plain space `header` at least as new as `generation` (drops them if they
   * were filled under another one). A nested fill calls it for stage 2 before walking, so the
   * stage-2 entries it reuses are no older than the generation it files the result under.
   */
  sync(header: number, generation: number): void {
    this.track(header, generation, 0, 0);
  }

  private store(header: number, leaf: LeafInfo): void {
    const e = this.entries;
    const h = spaceHash(header);
    let i: number;
    let huge = true;
    if (leaf.pageShift === PAGE_SHIFT) {
      i = ((leaf.leafPfn ^ h) & this.smallMask) * IotlbEntry.STRIDE;
      huge = false;
    } else if (leaf.pageShift === SHIFT_2M) {
      i = (this.mediumBase + (((leaf.leafPfn / PAGES_2M) ^ h) & this.mediumMask)) * IotlbEntry.STRIDE;
    } else if (leaf.pageShift === SHIFT_1G) {
      i = (this.largeBase + (((leaf.leafPfn / PAGES_1G) ^ h) & this.largeMask)) * IotlbEntry.STRIDE;
    } else {
      throw new RangeError(`IOTLB cannot hold a leaf of page shift ${leaf.pageShift}`);
    }
    if (e[i + IotlbEntry.HEADER] !== 0) this.nEvictions++;
    else if (huge) this.hugeValid++;
    e[i + IotlbEntry.PFN] = leaf.leafPfn;
    e[i + IotlbEntry.HEADER] = header;
    e[i + IotlbEntry.GUEST] = leaf.leafGuestPfn;
    e[i + IotlbEntry.FLAGS] = leaf.flags;
    this.nFills++;
  }

  private track(header: number, generation: number, parent: number, parentGeneration: number): void {
    const th = this.trackHeader;
    for (let t = 0; t < this.tracked; t++) {
      if (th[t] === header) {
        if (this.trackGeneration[t] !== generation || this.trackParent[t] !== parent || this.trackParentGeneration[t] !== parentGeneration) {
          this.dropEntries(header);
          this.trackGeneration[t] = generation;
          this.trackParent[t] = parent;
          this.trackParentGeneration[t] = parentGeneration;
        }
        return;
      }
    }
    if (this.tracked === th.length) {
      // Full: forget the oldest address space (slot 0) together with its entries.
      this.dropEntries(th[0]!);
      th.copyWithin(0, 1, this.tracked);
      this.trackGeneration.copyWithin(0, 1, this.tracked);
      this.trackParent.copyWithin(0, 1, this.tracked);
      this.trackParentGeneration.copyWithin(0, 1, this.tracked);
      this.tracked--;
    }
    th[this.tracked] = header;
    this.trackGeneration[this.tracked] = generation;
    this.trackParent[this.tracked] = parent;
    this.trackParentGeneration[this.tracked] = parentGeneration;
    this.tracked++;
  }

  private untrack(t: number): void {
    this.tracked--;
    this.trackHeader[t] = this.trackHeader[this.tracked]!;
    this.trackGeneration[t] = this.trackGeneration[this.tracked]!;
    this.trackParent[t] = this.trackParent[this.tracked]!;
    this.trackParentGeneration[t] = this.trackParentGeneration[this.tracked]!;
  }

  /** Clears every entry of one address space. */
  private dropEntries(header: number): void {
    const e = this.entries;
    const hugeStart = this.mediumBase * IotlbEntry.STRIDE;
    for (let i = 0; i < e.length; i += IotlbEntry.STRIDE) {
      if (e[i + IotlbEntry.HEADER] === header) {
        e[i + IotlbEntry.HEADER] = 0;
        if (i >= hugeStart) this.hugeValid--;
      }
    }
    this.nInvalidations++;
  }

  /**
   * Compares every tracked address space's current generation (read from shared memory through
   * `source`, e.g. a TableReader) with the one its entries were filled under, and drops the
   * entries of each that moved. A nested space whose stage 2 is unchanged drops only the entries
   * in the ranges its stage-1 invalidations name, when `source` can still list them. Called when
   * the quiescence epoch moved. Returns the number of address spaces dropped whole.
   */
  revalidate(source: GenerationSource): number {
    let dropped = 0;
    for (let t = 0; t < this.tracked; ) {
      const header = this.trackHeader[t]!;
      const parent = this.trackParent[t]!;
      const generation = source.generation(header);
      const old = this.trackGeneration[t]!;
      let whole = false;
      if (parent !== 0 && source.generation(parent) !== this.trackParentGeneration[t]) {
        whole = true;
      } else if (generation !== old) {
        this.rangeTag = header;
        whole = parent === 0 || source.invalidations === undefined || !source.invalidations(header, old, generation, this.rangeVisitor);
      }
      if (whole) {
        this.dropEntries(header);
        this.untrack(t);
        dropped++;
      } else {
        this.trackGeneration[t] = generation;
        t++;
      }
    }
    return dropped;
  }

  /**
   * Drops the entries of space `header` that overlap IOVA pages [first, last]: each page (and 2 MiB
   * / 1 GiB frame) of a short range is probed at the one set it can live in; a long range is a scan.
   */
  dropRange(header: number, first: number, last: number): void {
    this.nRangeInvalidations++;
    if (!(first <= last)) return;
    const h = spaceHash(header);
    this.dropSized(header, first, last, 0, 1, this.smallMask, h);
    if (this.hugeValid === 0) return;
    this.dropSized(header, Math.floor(first / PAGES_2M), Math.floor(last / PAGES_2M), this.mediumBase, PAGES_2M, this.mediumMask, h);
    this.dropSized(header, Math.floor(first / PAGES_1G), Math.floor(last / PAGES_1G), this.largeBase, PAGES_1G, this.largeMask, h);
  }

  /** dropRange() for one array: frames [lo, hi] of `pages` pages each. */
  private dropSized(header: number, lo: number, hi: number, base: number, pages: number, mask: number, h: number): void {
    const e = this.entries;
    const huge = base !== 0;
    if (hi - lo < mask) {
      for (let frame = lo; frame <= hi; frame++) {
        const i = (base + ((frame ^ h) & mask)) * STRIDE;
        if (e[i + E_HEADER] === header && e[i + E_PFN] === frame * pages) {
          e[i + E_HEADER] = 0;
          if (huge) this.hugeValid--;
        }
      }
      return;
    }
    for (let i = base * STRIDE; i < (base + mask + 1) * STRIDE; i += STRIDE) {
      const frame = e[i + E_PFN]! / pages;
      if (e[i + E_HEADER] === header && frame >= lo && frame <= hi) {
        e[i + E_HEADER] = 0;
        if (huge) this.hugeValid--;
      }
    }
  }

  /** Drops one address space's entries (e.g. it was destroyed). */
  invalidateAddressSpace(header: number): void {
    for (let t = 0; t < this.tracked; t++) {
      if (this.trackHeader[t] === header) {
        this.untrack(t);
        break;
      }
    }
    this.dropEntries(header);
  }

  /** Drops everything. */
  flush(): void {
    this.entries.fill(0);
    this.hugeValid = 0;
    this.tracked = 0;
    this.nFlushes++;
  }

  /** Valid entries right now (a scan: for tests and diagnostics). */
  get size(): number {
    let n = 0;
    for (let i = IotlbEntry.HEADER; i < this.entries.length; i += IotlbEntry.STRIDE) if (this.entries[i] !== 0) n++;
    return n;
  }

  stats(): IotlbStats {
    return {
      hits: this.nHits,
      misses: this.nMisses,
      fills: this.nFills,
      flushes: this.nFlushes,
      invalidations: this.nInvalidations,
      evictions: this.nEvictions,
      rangeInvalidations: this.nRangeInvalidations,
    };
  }
}
