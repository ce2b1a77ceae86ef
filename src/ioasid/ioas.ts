import { EntryFlag, MAX_GUEST_PFN, MAX_IOVA_PFN, PAGE_SHIFT, PAGE_SIZE_N, TABLE_PAGES } from '../pagetable/format.js';
import type { TablePool } from '../pagetable/pool.js';
import { IoPageTable } from '../pagetable/radix.js';
import type { PinAccounting } from './accounting.js';
import type { Access } from './access.js';
import type { IovaRange } from './device.js';
import { IommufdError } from './errors.js';
import type { HwptPaging } from './hwpt.js';
import type { ContextObject } from './objects.js';
import { U64_MAX } from './uapi.js';

const SHIFT = BigInt(PAGE_SHIFT);

/** A reserved IOVA range and the device (context object ID) whose attachment put it there. */
export interface ReservedRange extends IovaRange {
  readonly owner: number;
}

/** One contiguous piece of guest memory to become an area. */
export interface AreaSlice {
  readonly pfn: number;
  readonly pages: number;
  readonly guestPfn: number;
  /** EntryFlag.READ / WRITE. */
  readonly perms: number;
}

/** Part of an existing area, as found by contiguous-area iteration (iopt_area_contig_*). */
export interface AreaPart extends AreaSlice {
  /** First page of the area the part belongs to. */
  readonly areaStart: number;
}

export function pfnOf(iova: bigint): number {
  return Number(iova >> SHIFT);
}

export function iovaOf(pfn: number): bigint {
  return BigInt(pfn) << SHIFT;
}

function roundUpPow2(v: bigint): bigint {
  let p = 1n;
  while (p < v) p <<= 1n;
  return p;
}

function lowestSetBit(v: bigint): bigint {
  return v & -v;
}

function alignUp(v: bigint, align: bigint): bigint {
  return (v + align - 1n) & ~(align - 1n);
}

/**
 * An I/O address space (IOMMUFD_OBJ_IOAS, the kernel's io_pagetable). Areas live only in the radix
 * table; this object keeps the rare things beside it: reserved and allowed ranges, per-area access
 * pin counts, and who refers to it.
 */
export class Ioas implements ContextObject {
  readonly type = 'IOAS' as const;
  readonly table: IoPageTable;
  /** IOMMU_OPTION_HUGE_PAGES: new maps may use 2 MiB / 1 GiB leaves. */
  hugePages = true;
  reserved: ReservedRange[] = [];
  /** IOMMU_IOAS_ALLOW_IOVAS list, sorted by start. Empty: no restriction. */
  allowed: IovaRange[] = [];
  readonly hwpts = new Set<HwptPaging>();
  readonly accesses = new Set<Access>();
  /** Access pins per area (area start page → count), the kernel's area->num_accesses. */
  readonly areaPins = new Map<number, number>();
  /** Areas being unmapped while accesses are told to unpin: new pins there fail (prevent_access). */
  readonly preventAccess = new Set<number>();

  constructor(
    readonly id: number,
    private readonly pool: TablePool,
    private readonly pins: PinAccounting,
  ) {
    this.table = new IoPageTable(pool, id);
  }

  /** HWPTs and accesses referring to this IOAS: destroy answers EBUSY while any exist. */
  get users(): number {
    return this.hwpts.size + this.accesses.size;
  }

  /** IOAS_IOVA_RANGES: the holes between reserved ranges over the whole 64-bit space. */
  iovaRanges(): IovaRange[] {
    const sorted = [...this.reserved].sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
    const out: IovaRange[] = [];
    let cursor = 0n;
    let done = false;
    for (const r of sorted) {
      if (r.start > cursor) out.push({ start: cursor, last: r.start - 1n });
      if (r.last >= cursor) {
        if (r.last === U64_MAX) {
          done = true;
          break;
        }
        cursor = r.last + 1n;
      }
    }
    if (!done) out.push({ start: cursor, last: U64_MAX });
    return out;
  }

  reservedHit(start: bigint, last: bigint): ReservedRange | undefined {
    return this.reserved.find((r) => r.start <= last && r.last >= start);
  }

  allowedHit(start: bigint, last: bigint): boolean {
    return this.allowed.some((r) => r.start <= last && r.last >= start);
  }

  /** Any area page inside byte range [start, last]. */
  areaHit(start: bigint, last: bigint): boolean {
    return this.table.nextMapped(pfnOf(start), pfnOf(last)) >= 0;
  }

  /**
   * iopt_alloc_iova: the lowest free IOVA for `length` bytes, aligned to the smaller of length
   * rounded up to a power of two and the lowest set bit of the GPA (so huge leaves stay possible),
   * inside the allowed ranges (or [PAGE_SIZE, U64_MAX - PAGE_SIZE]), avoiding reserved ranges and
   * areas. Never returns 0.
   */
  allocIova(length: bigint, gpa: number): bigint {
    // iopt_alloc_iova: protects roundup_pow_of_two() from overflow with -EOVERFLOW.
    if (length >= 1n << 63n) throw new IommufdError('EOVERFLOW', `length 0x${length.toString(16)} too large to place`, 'length');
    let align = roundUpPow2(length);
    if (gpa !== 0) {
      const low = lowestSetBit(BigInt(gpa));
      if (low < align) align = low;
    }
    // iopt_alloc_iova: an alignment below the IOAS's iova_alignment is -EINVAL.
    if (align < PAGE_SIZE_N) throw new IommufdError('EINVAL', `gpa 0x${gpa.toString(16)} is not page aligned`, 'gpa');
    const windowLo = PAGE_SIZE_N;
    const windowHi = U64_MAX - PAGE_SIZE_N;
    const windows: IovaRange[] =
      this.allowed.length === 0
        ? [{ start: windowLo, last: windowHi }]
        : this.allowed
            .map((r) => ({ start: r.start > windowLo ? r.start : windowLo, last: r.last < windowHi ? r.last : windowHi }))
            .filter((r) => r.start <= r.last);
    for (const w of windows) {
      let cursor = w.start;
      for (;;) {
        const a = alignUp(cursor, align);
        const last = a + length - 1n;
        if (last > w.last) break;
        const r = this.reservedHit(a, last);
        if (r !== undefined) {
          if (r.last >= w.last) break;
          cursor = r.last + 1n;
          continue;
        }
        const mapped = this.table.nextMapped(pfnOf(a), pfnOf(last));
        if (mapped >= 0) {
          const hole = this.table.nextUnmapped(mapped, MAX_IOVA_PFN);
          if (hole < 0) break;
          cursor = iovaOf(hole);
          continue;
        }
        return a;
      }
    }
    // iopt_alloc_iova: no hole fits.
    throw new IommufdError('ENOSPC', `no free IOVA range of 0x${length.toString(16)} bytes`, 'length');
  }

  /** iopt_check_iova for a FIXED_IOVA map of [iova, iova+length). */
  checkFixedIova(iova: bigint, length: bigint): void {
    // iopt_check_iova: iova must meet the IOAS alignment (PAGE_SIZE here).
    if (iova % PAGE_SIZE_N !== 0n) throw new IommufdError('EINVAL', `iova 0x${iova.toString(16)} is not page aligned`, 'iova');
    const last = iova + length - 1n;
    // iopt_check_iova: check_add_overflow(iova, length - 1).
    if (last > U64_MAX) throw new IommufdError('EOVERFLOW', 'iova + length overflows 64 bits', 'length');
    // iopt_check_iova: a reserved range in the way is -EINVAL.
    const r = this.reservedHit(iova, last);
    if (r !== undefined) {
      throw new IommufdError('EINVAL', `iova range crosses reserved 0x${r.start.toString(16)}-0x${r.last.toString(16)}`, 'iova');
    }
    // iopt_check_iova: an existing mapping in the way is -EEXIST.
    if (this.areaHit(iova, last)) throw new IommufdError('EEXIST', `iova 0x${iova.toString(16)} overlaps a mapped area`, 'iova');
  }

  /**
   * Inserts areas whose IOVA ranges were checked free: reserves table capacity and charges the
   * pages first, so a failure (ENOMEM) changes nothing.
   */
  insertAreas(slices: readonly AreaSlice[]): void {
    let tables = 0;
    for (const s of slices) {
      if (s.guestPfn + s.pages - 1 > MAX_GUEST_PFN) {
        throw new IommufdError('EFAULT', 'guest memory above 16 TiB cannot be mapped by this table format', 'gpa');
      }
      tables += this.table.tablesForMap(s.pfn, s.pages, s.guestPfn, this.hugePages);
    }
    // Table memory is kernel memory too: running out is -ENOMEM, as a failed kzalloc would be.
    if (!this.pool.ensure(tables)) throw new IommufdError('ENOMEM', 'page-table pool exhausted', 'length');
    // do_update_pinned / incr_user_locked_vm: over RLIMIT_MEMLOCK is -ENOMEM.
    if (!this.pins.pinAll(slices.map((s) => [s.guestPfn, s.pages] as const))) {
      throw new IommufdError('ENOMEM', `locked-memory limit of ${this.pins.limitPages} pages reached`, 'length');
    }
    for (const s of slices) this.table.map(s.pfn, s.pages, s.guestPfn, s.perms, this.hugePages);
  }

  /**
   * iopt_area_contig_*: the parts of the areas covering pages [firstPfn, lastPfn] in order, up to
   * the first gap; `complete` is false when a gap (or the end of the mappings) comes before lastPfn.
   */
  contiguousParts(firstPfn: number, lastPfn: number): { parts: AreaPart[]; complete: boolean } {
    const parts: AreaPart[] = [];
    let expect = firstPfn;
    this.table.forEachArea(firstPfn, lastPfn, (start, pages, guestPfn, flags) => {
      if (start > expect) return false;
      const from = Math.max(start, firstPfn);
      const to = Math.min(start + pages - 1, lastPfn);
      parts.push({ areaStart: start, pfn: from, pages: to - from + 1, guestPfn: guestPfn + (from - start), perms: flags & EntryFlag.PERM_MASK });
      expect = start + pages;
      return expect <= lastPfn;
    });
    return { parts, complete: expect > lastPfn };
  }

  /**
   * Validates IOAS_UNMAP of byte range [start, last]: every area it touches must lie wholly
   * inside (no splitting). Returns the areas as [start page, pages].
   */
  areasToUnmap(start: bigint, last: bigint): [number, number][] {
    const areas: [number, number][] = [];
    let cut: [number, number] | undefined;
    this.table.forEachArea(pfnOf(start), pfnOf(last), (s, n) => {
      if (iovaOf(s) < start || iovaOf(s + n) - 1n > last) {
        cut = [s, n];
        return false;
      }
      areas.push([s, n]);
      return true;
    });
    // iopt_unmap_iova_range: an area not fully inside the range is -ENOENT (no splitting).
    if (cut !== undefined) {
      throw new IommufdError(
        'ENOENT',
        `range would split the area at 0x${iovaOf(cut[0]).toString(16)} (+0x${iovaOf(cut[1]).toString(16)})`,
        'length',
      );
    }
    // iopt_unmap_iova_range: nothing mapped in the range is -ENOENT.
    if (areas.length === 0) throw new IommufdError('ENOENT', `nothing mapped in 0x${start.toString(16)}-0x${last.toString(16)}`, 'iova');
    return areas;
  }

  /** Removes validated areas from the table and drops their page references. Returns bytes. */
  removeAreas(areas: readonly [number, number][]): bigint {
    let pages = 0;
    const unpin = (guestPfn: number, count: number) => this.pins.unpin(guestPfn, count);
    // Adjacent areas go in one table walk: the areas are in IOVA order, whole, and nothing else is
    // mapped between them.
    for (let i = 0; i < areas.length; ) {
      const [start] = areas[i]!;
      let end = start + areas[i]![1];
      for (i++; i < areas.length && areas[i]![0] === end; i++) end += areas[i]![1];
      pages += this.table.unmap(start, end - 1, unpin);
    }
    return iovaOf(pages);
  }

  /** Every area as [start page, pages, guest page, perms], in IOVA order. */
  listAreas(): [number, number, number, number][] {
    const out: [number, number, number, number][] = [];
    this.table.forEachArea(0, MAX_IOVA_PFN, (s, n, g, flags) => {
      out.push([s, n, g, flags & EntryFlag.PERM_MASK]);
    });
    return out;
  }

  /** Whether the area at [startPfn, startPfn + pages) uses a 2 MiB or 1 GiB leaf. */
  hasHugeLeaf(startPfn: number, pages: number): boolean {
    let huge = false;
    this.table.forEachLeaf(startPfn, startPfn + pages - 1, (_pfn, n) => {
      huge = n > 1;
      return !huge;
    });
    return huge;
  }

  /**
   * Restore of a saved IOAS: grows the empty table to `levels`. Roots never shrink, so a saved table
   * may have more levels than its areas need; mapping one page at the first IOVA that needs them and
   * unmapping it again leaves exactly the root such a table has. Nothing is pinned: no device
   * translates through a table that is being restored.
   */
  growLevels(levels: number): void {
    if (this.table.mappedPages !== 0) throw new Error('growLevels needs an empty table');
    if (this.table.levelCount >= levels) return;
    const pfn = TABLE_PAGES[levels - 2]!;
    // Table memory is kernel memory: running out is -ENOMEM.
    if (!this.pool.ensure(this.table.tablesForMap(pfn, 1, 0, false))) throw new IommufdError('ENOMEM', 'page-table pool exhausted', 'levels');
    this.table.map(pfn, 1, 0, EntryFlag.READ, false);
    this.table.unmap(pfn, pfn);
  }

  /** Drops everything (IOAS destroy): areas unpinned, table and header released. */
  destroy(): void {
    const all = this.listAreas().map(([s, n]) => [s, n] as [number, number]);
    this.removeAreas(all);
    this.table.destroy();
  }
}
