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

/** Where revalidate() reads an address space's GENERATION word (TableReader fits). */
export interface GenerationSource {
  generation(header: number): number;
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
    this.track(header, generation);
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

  private track(header: number, generation: number): void {
    const th = this.trackHeader;
    for (let t = 0; t < this.tracked; t++) {
      if (th[t] === header) {
        if (this.trackGeneration[t] !== generation) {
          this.dropEntries(header);
          this.trackGeneration[t] = generation;
        }
        return;
      }
    }
    if (this.tracked === th.length) {
      // Full: forget the oldest address space (slot 0) together with its entries.
      this.dropEntries(th[0]!);
      th.copyWithin(0, 1, this.tracked);
      this.trackGeneration.copyWithin(0, 1, this.tracked);
      this.tracked--;
    }
    th[this.tracked] = header;
    this.trackGeneration[this.tracked] = generation;
    this.tracked++;
  }

  private untrack(t: number): void {
    this.tracked--;
    this.trackHeader[t] = this.trackHeader[this.tracked]!;
    this.trackGeneration[t] = this.trackGeneration[this.tracked]!;
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
   * entries of each that moved. Called when the quiescence epoch moved. Returns the number of
   * address spaces dropped.
   */
  revalidate(source: GenerationSource): number {
    let dropped = 0;
    for (let t = 0; t < this.tracked; ) {
      const header = this.trackHeader[t]!;
      if (source.generation(header) !== this.trackGeneration[t]) {
        this.dropEntries(header);
        this.untrack(t);
        dropped++;
      } else {
        t++;
      }
    }
    return dropped;
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
    };
  }
}
