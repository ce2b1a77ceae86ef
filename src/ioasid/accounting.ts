import type { GuestMemory } from '../memory/index.js';
import { PAGE_SIZE } from '../pagetable/format.js';

/** Locked-memory numbers of one host (all contexts together: one process, one user). */
export interface PinStats {
  /** Distinct guest pages with at least one reference. */
  readonly pinnedPages: number;
  /** Pages charged against the locked-memory limit: each distinct page once, so equal to pinnedPages. */
  readonly accountedPages: number;
  /** Sum of the per-page reference counts (areas and access pins each hold one per page). */
  readonly pinReferences: number;
}

interface RegionIndex {
  readonly basePfn: number;
  readonly pages: number;
  /** Index of the region's first page in the reference array. */
  readonly offset: number;
}

/**
 * Per-guest-page pin reference counts, in one typed array over all of guest RAM. A page is charged
 * when its count goes 0 → 1 and uncharged on 1 → 0, so a page costs the limit once however many
 * IOASes, areas, copies or access pins hold it (the kernel charges per iopt_pages instead; this is
 * a deliberate tightening).
 */
export class PinAccounting {
  private readonly refs: Uint32Array;
  private readonly regions: RegionIndex[];
  private pinned = 0;
  private references = 0;
  /** Locked-memory limit in pages; Infinity when unlimited. */
  limitPages = Number.POSITIVE_INFINITY;

  constructor(memory: GuestMemory) {
    let offset = 0;
    this.regions = memory.regions.map(({ base, size }) => {
      const r = { basePfn: base / PAGE_SIZE, pages: size / PAGE_SIZE, offset };
      offset += r.pages;
      return r;
    });
    this.refs = new Uint32Array(offset);
  }

  /** Reference-array index of guest page `pfn`, or -1 outside RAM. */
  private slot(pfn: number): number {
    for (const r of this.regions) {
      if (pfn >= r.basePfn && pfn < r.basePfn + r.pages) return r.offset + (pfn - r.basePfn);
    }
    return -1;
  }

  /** True when guest pages [pfn, pfn+pages) all lie in one RAM region. */
  covers(pfn: number, pages: number): boolean {
    for (const r of this.regions) {
      if (pfn >= r.basePfn && pfn + pages <= r.basePfn + r.pages) return true;
    }
    return false;
  }

  /** Adds one reference to each page of [pfn, pfn+pages) (one RAM region). Returns pages newly pinned. */
  pin(pfn: number, pages: number): number {
    const first = this.slot(pfn);
    if (first < 0 || !this.covers(pfn, pages)) throw new Error(`pin outside guest RAM at pfn ${pfn}`);
    const refs = this.refs;
    let fresh = 0;
    for (let i = first, end = first + pages; i < end; i++) {
      if (refs[i]!++ === 0) fresh++;
    }
    this.pinned += fresh;
    this.references += pages;
    return fresh;
  }

  /** Drops one reference from each page of [pfn, pfn+pages). Returns pages no longer pinned. */
  unpin(pfn: number, pages: number): number {
    const first = this.slot(pfn);
    if (first < 0 || !this.covers(pfn, pages)) throw new Error(`unpin outside guest RAM at pfn ${pfn}`);
    const refs = this.refs;
    let released = 0;
    for (let i = first, end = first + pages; i < end; i++) {
      const n = refs[i]!;
      if (n === 0) throw new Error(`unpin of an unpinned page at pfn ${pfn + (i - first)}`);
      refs[i] = n - 1;
      if (n === 1) released++;
    }
    this.pinned -= released;
    this.references -= pages;
    return released;
  }

  /**
   * Pins several ranges as one charge: if the pages newly pinned take the total over the limit,
   * every range is unpinned again and false is returned (nothing changed).
   */
  pinAll(ranges: readonly (readonly [pfn: number, pages: number])[]): boolean {
    const before = this.pinned;
    for (const [pfn, pages] of ranges) this.pin(pfn, pages);
    if (this.pinned > this.limitPages && this.pinned > before) {
      for (const [pfn, pages] of ranges) this.unpin(pfn, pages);
      return false;
    }
    return true;
  }

  /** References held on guest page `pfn` (0 outside RAM). */
  referencesOf(pfn: number): number {
    const i = this.slot(pfn);
    return i < 0 ? 0 : this.refs[i]!;
  }

  stats(): PinStats {
    return { pinnedPages: this.pinned, accountedPages: this.pinned, pinReferences: this.references };
  }

  /** Runs of pinned pages as [gpa, pages, references], for snapshots. Cost: all of guest RAM. */
  runs(): [gpa: number, pages: number, references: number][] {
    const out: [number, number, number][] = [];
    for (const r of this.regions) {
      let i = 0;
      while (i < r.pages) {
        const n = this.refs[r.offset + i]!;
        if (n === 0) {
          i++;
          continue;
        }
        let j = i + 1;
        while (j < r.pages && this.refs[r.offset + j] === n) j++;
        out.push([(r.basePfn + i) * PAGE_SIZE, j - i, n]);
        i = j;
      }
    }
    return out;
  }
}
