import type { GuestMemory } from '../../src/memory/index.js';
import { X86Pte, X86_PAGE_1G, X86_PAGE_2M, X86_PAGE_4K } from '../../src/pagetable/x86-64.js';
import type { GuestAllocator } from '../driver/allocator.js';

/**
 * What a guest kernel's x86-64 page-table code does for a process address space or a guest IOMMU
 * domain: allocates 4 KiB tables from its own guest-physical pages, writes entries through its own
 * view of memory, and tells the caller which IOVA ranges each change touched so it can invalidate
 * them. It keeps a shadow of what it wrote (a kernel reads its own tables; the shadow stands in for
 * that) and never splits or joins leaves: a map that overlaps a live mapping is refused.
 */

export type X86PageSize = typeof X86_PAGE_4K | typeof X86_PAGE_2M | typeof X86_PAGE_1G;

/** Source of zeroable guest-physical 4 KiB pages for tables. */
export interface GuestPageAllocator {
  /** A 4 KiB aligned guest-physical address. */
  allocPage(): number;
  /** Takes back a table the builder no longer uses; without it such pages are simply dropped. */
  freePage?(gpa: number): void;
}

/** Table pages carved from a GuestAllocator. */
export function pagesFromAllocator(allocator: GuestAllocator): GuestPageAllocator {
  return {
    allocPage: () => allocator.alloc(X86_PAGE_4K, X86_PAGE_4K),
    freePage: (gpa) => allocator.free(gpa),
  };
}

/** Writes one 8-byte entry at a guest-physical address, through whatever view the guest has. */
export type EntryWriter = (gpa: number, value: bigint) => void;

/** Writes straight into guest memory (stage 2 as identity). */
export function memoryEntryWriter(memory: GuestMemory): EntryWriter {
  return (gpa, value) => memory.writeU64(gpa, value);
}

export interface X86Permissions {
  readonly writable: boolean;
  readonly user: boolean;
  readonly executable: boolean;
  readonly global?: boolean;
}

/** An IOVA range a change affected: [iova, iova + size), iova in canonical 64-bit form. */
export interface IovaRange {
  readonly iova: bigint;
  readonly size: bigint;
}

export type X86BuilderErrorReason = 'overlap' | 'alignment' | 'range' | 'partial';

export class X86BuilderError extends Error {
  constructor(
    readonly reason: X86BuilderErrorReason,
    message: string,
  ) {
    super(message);
    this.name = 'X86BuilderError';
  }
}

export interface X86PageTableBuilderOptions {
  readonly allocator: GuestPageAllocator;
  readonly write: EntryWriter;
  readonly levels?: 4 | 5;
  /** Physical-address width of the GPAs mapped (32..52, default 52). */
  readonly physBits?: number;
  /** IA32_EFER.NXE of the walker: when false XD is never written (everything is executable). */
  readonly nxe?: boolean;
  /**
   * Write A on every entry and D on writable leaves up front, as Linux's Intel first-stage code does,
   * so hardware never needs to update them. Default false.
   */
  readonly presetAccessedDirty?: boolean;
}

/** One present entry, for inspection and for tests that corrupt tables on purpose. */
export interface X86EntryInfo {
  readonly level: number;
  readonly tableGpa: number;
  readonly index: number;
  readonly entryGpa: number;
  readonly value: bigint;
  /** True for a leaf (level 1, or PS at level 2 / 3). */
  readonly leaf: boolean;
}

/** One mapping as the builder wrote it. */
export interface X86Leaf {
  readonly iova: bigint;
  readonly gpa: number;
  readonly size: X86PageSize;
  readonly permissions: X86Permissions;
}

interface Table {
  readonly gpa: number;
  readonly level: number;
  /** Index-space IOVA (sign extension stripped) where the table's reach begins. */
  readonly base: bigint;
  readonly entries: BigUint64Array;
  present: number;
  readonly parent: Table | undefined;
  readonly parentIndex: number;
}

interface LeafSlot {
  readonly table: Table;
  readonly index: number;
  readonly start: bigint;
  readonly span: bigint;
}

const U64 = (1n << 64n) - 1n;
const PRESENT = BigInt(X86Pte.PRESENT);
const WRITABLE = BigInt(X86Pte.WRITABLE);
const USER = BigInt(X86Pte.USER);
const ACCESSED = BigInt(X86Pte.ACCESSED);
const DIRTY = BigInt(X86Pte.DIRTY);
const PAGE_SIZE_BIT = BigInt(X86Pte.PAGE_SIZE);
const GLOBAL = BigInt(X86Pte.GLOBAL);
const XD = 1n << 63n;
/** Address bits 12..51 of an entry. */
const ADDRESS = ((1n << 52n) - 1n) & ~0xfffn;

function leafLevelOf(size: number): number {
  if (size === X86_PAGE_4K) return 1;
  if (size === X86_PAGE_2M) return 2;
  if (size === X86_PAGE_1G) return 3;
  throw new X86BuilderError('alignment', `page size ${size} is not 4 KiB, 2 MiB or 1 GiB`);
}

function hex(value: bigint | number): string {
  return `0x${value.toString(16)}`;
}

/** A guest's x86-64 page table under construction (4-level, or 5-level with LA57). */
export class X86PageTableBuilder {
  readonly levels: 4 | 5;
  /** Guest-physical address of the top table: what goes into the PASID entry or CR3. */
  readonly root: number;
  private readonly allocator: GuestPageAllocator;
  private readonly write: EntryWriter;
  private readonly physBits: number;
  private readonly nxe: boolean;
  private readonly presetAD: boolean;
  /** Input bits: 48 or 57. */
  private readonly inputBits: bigint;
  private readonly tables = new Map<number, Table>();
  private readonly rootTable: Table;

  constructor(options: X86PageTableBuilderOptions) {
    this.levels = options.levels ?? 4;
    if (this.levels !== 4 && this.levels !== 5) throw new RangeError(`levels must be 4 or 5, got ${String(this.levels)}`);
    this.physBits = options.physBits ?? 52;
    if (!Number.isInteger(this.physBits) || this.physBits < 32 || this.physBits > 52) {
      throw new RangeError(`physical-address width ${this.physBits} is not in 32..52`);
    }
    this.allocator = options.allocator;
    this.write = options.write;
    this.nxe = options.nxe ?? true;
    this.presetAD = options.presetAccessedDirty ?? false;
    this.inputBits = BigInt(12 + 9 * this.levels);
    this.rootTable = this.newTable(this.levels, 0n, undefined, 0);
    this.root = this.rootTable.gpa;
  }

  /** Tables in use, the root included. */
  get tableCount(): number {
    return this.tables.size;
  }

  /**
   * Maps [iova, iova + size) to [gpa, gpa + size) with one leaf. Refuses (X86BuilderError, nothing
   * changed) a misaligned or non-canonical IOVA, a GPA beyond the physical-address width, and any
   * overlap with a live mapping.
   */
  map(iova: number | bigint, gpa: number, size: X86PageSize, permissions: X86Permissions): IovaRange[] {
    const leafLevel = leafLevelOf(size);
    const start = this.indexSpace(iova);
    const span = BigInt(size);
    if (start % span !== 0n) throw new X86BuilderError('alignment', `IOVA ${hex(this.canonical(start))} is not aligned to ${hex(size)}`);
    if (!Number.isSafeInteger(gpa) || gpa < 0 || gpa % size !== 0) {
      throw new X86BuilderError('alignment', `GPA ${gpa} is not a non-negative multiple of ${hex(size)}`);
    }
    if (gpa + size > 2 ** this.physBits) throw new X86BuilderError('range', `GPA ${hex(gpa)} is beyond ${this.physBits} physical-address bits`);

    // Check first: a refused map must leave the table as it was.
    let table: Table | undefined = this.rootTable;
    for (let level = this.levels; level > leafLevel && table !== undefined; level--) {
      const value: bigint = table.entries[this.index(start, level)]!;
      if ((value & PRESENT) === 0n) {
        table = undefined;
      } else if (this.isLeaf(value, level)) {
        throw new X86BuilderError('overlap', `${hex(this.canonical(start))}+${hex(size)} overlaps the ${this.sizeName(level)} mapping at ${hex(this.canonical(this.slotStart(start, level)))}`);
      } else {
        table = this.tables.get(Number(value & ADDRESS))!;
      }
    }
    if (table !== undefined) {
      const value = table.entries[this.index(start, leafLevel)]!;
      if ((value & PRESENT) !== 0n) {
        throw new X86BuilderError('overlap', `${hex(this.canonical(start))}+${hex(size)} overlaps a live mapping (or its tables) at level ${leafLevel}`);
      }
    }

    let current = this.rootTable;
    for (let level = this.levels; level > leafLevel; level--) {
      const index = this.index(start, level);
      const value = current.entries[index]!;
      if ((value & PRESENT) !== 0n) {
        current = this.tables.get(Number(value & ADDRESS))!;
        continue;
      }
      const child = this.newTable(level - 1, this.slotStart(start, level), current, index);
      this.setEntry(current, index, this.tableEntry(child.gpa));
      current = child;
    }
    this.setEntry(current, this.index(start, leafLevel), this.leafEntry(gpa, leafLevel, permissions));
    return [{ iova: this.canonical(start), size: span }];
  }

  /**
   * Removes every mapping inside [iova, iova + size). A leaf that is only partly inside is refused
   * (no splitting; nothing changed). Tables left empty are unlinked and returned to the allocator:
   * they are reachable only through the returned ranges, so invalidating those (paging-structure
   * caches included) covers them. Returns the ranges that were mapped, merged.
   */
  unmap(iova: number | bigint, size: number | bigint): IovaRange[] {
    const slots = this.leavesIn(iova, size);
    for (const slot of slots) {
      this.setEntry(slot.table, slot.index, 0n);
      this.prune(slot.table);
    }
    return this.merge(slots);
  }

  /** Rewrites the permissions of every leaf inside [iova, iova + size); partial leaves are refused. */
  protect(iova: number | bigint, size: number | bigint, permissions: X86Permissions): IovaRange[] {
    const slots = this.leavesIn(iova, size);
    for (const slot of slots) {
      const value = slot.table.entries[slot.index]!;
      const level = slot.table.level;
      this.setEntry(slot.table, slot.index, this.leafEntry(this.leafAddress(value, level), level, permissions));
    }
    return this.merge(slots);
  }

  /** The entries a walk of `iova` uses, top first, ending at a leaf or a not-present entry. */
  lookup(iova: number | bigint): X86EntryInfo[] {
    const start = this.indexSpace(iova);
    const path: X86EntryInfo[] = [];
    let table: Table | undefined = this.rootTable;
    while (table !== undefined) {
      const index = this.index(start, table.level);
      const value: bigint = table.entries[index]!;
      const leaf: boolean = (value & PRESENT) !== 0n && this.isLeaf(value, table.level);
      path.push({ level: table.level, tableGpa: table.gpa, index, entryGpa: table.gpa + index * 8, value, leaf });
      table = (value & PRESENT) === 0n || leaf ? undefined : this.tables.get(Number(value & ADDRESS));
    }
    return path;
  }

  /** Every present entry, tables in allocation order. */
  entries(): X86EntryInfo[] {
    const out: X86EntryInfo[] = [];
    for (const table of this.tables.values()) {
      table.entries.forEach((value, index) => {
        if ((value & PRESENT) === 0n) return;
        out.push({ level: table.level, tableGpa: table.gpa, index, entryGpa: table.gpa + index * 8, value, leaf: this.isLeaf(value, table.level) });
      });
    }
    return out;
  }

  /** Every mapping, in IOVA index order (low half first). */
  leaves(): X86Leaf[] {
    const out: X86Leaf[] = [];
    const visit = (table: Table): void => {
      table.entries.forEach((value, index) => {
        if ((value & PRESENT) === 0n) return;
        const level = table.level;
        if (!this.isLeaf(value, level)) {
          visit(this.tables.get(Number(value & ADDRESS))!);
          return;
        }
        const span = this.span(level);
        out.push({
          iova: this.canonical(table.base + BigInt(index) * span),
          gpa: this.leafAddress(value, level),
          size: Number(span) as X86PageSize,
          permissions: {
            writable: (value & WRITABLE) !== 0n,
            user: (value & USER) !== 0n,
            executable: (value & XD) === 0n,
            global: (value & GLOBAL) !== 0n,
          },
        });
      });
    };
    visit(this.rootTable);
    return out;
  }

  // --- internals ---------------------------------------------------------------------------------

  private newTable(level: number, base: bigint, parent: Table | undefined, parentIndex: number): Table {
    const gpa = this.allocator.allocPage();
    if (!Number.isSafeInteger(gpa) || gpa < 0 || gpa % X86_PAGE_4K !== 0 || gpa >= 2 ** this.physBits) {
      throw new RangeError(`allocator returned ${gpa}, not a 4 KiB aligned GPA below 2^${this.physBits}`);
    }
    if (this.tables.has(gpa)) throw new RangeError(`allocator returned table page ${hex(gpa)} twice`);
    // Pages come from the guest allocator dirty: a table starts all not-present.
    for (let i = 0; i < 512; i++) this.write(gpa + i * 8, 0n);
    const table: Table = { gpa, level, base, entries: new BigUint64Array(512), present: 0, parent, parentIndex };
    this.tables.set(gpa, table);
    return table;
  }

  private setEntry(table: Table, index: number, value: bigint): void {
    const was = table.entries[index]! & PRESENT;
    table.entries[index] = value;
    table.present += Number(value & PRESENT) - Number(was);
    this.write(table.gpa + index * 8, value);
  }

  /** Unlinks `table` and then its ancestors while they are empty; the root stays. */
  private prune(table: Table): void {
    let current: Table | undefined = table;
    while (current !== undefined && current.present === 0 && current.parent !== undefined) {
      const parent: Table = current.parent;
      this.setEntry(parent, current.parentIndex, 0n);
      this.tables.delete(current.gpa);
      this.allocator.freePage?.(current.gpa);
      current = parent;
    }
  }

  private tableEntry(gpa: number): bigint {
    // Intermediate entries grant everything; leaves carry the restrictions.
    return BigInt(gpa) | PRESENT | WRITABLE | USER | (this.presetAD ? ACCESSED : 0n);
  }

  private leafEntry(gpa: number, level: number, p: X86Permissions): bigint {
    let value = BigInt(gpa) | PRESENT;
    if (level > 1) value |= PAGE_SIZE_BIT;
    if (p.writable) value |= WRITABLE;
    if (p.user) value |= USER;
    if (p.global === true) value |= GLOBAL;
    if (!p.executable && this.nxe) value |= XD;
    if (this.presetAD) value |= ACCESSED | (p.writable ? DIRTY : 0n);
    return value;
  }

  private leafAddress(value: bigint, level: number): number {
    // A large leaf's bit 12 is PAT, not address (SDM "4-level paging", 2 MiB / 1 GiB entry formats).
    return Number(value & ADDRESS & ~(this.span(level) - 1n));
  }

  private isLeaf(value: bigint, level: number): boolean {
    return level === 1 || ((level === 2 || level === 3) && (value & PAGE_SIZE_BIT) !== 0n);
  }

  private span(level: number): bigint {
    return 1n << BigInt(12 + 9 * (level - 1));
  }

  private index(start: bigint, level: number): number {
    return Number((start >> BigInt(12 + 9 * (level - 1))) & 511n);
  }

  /** Start of the slot covering `start` in a table at `level`. */
  private slotStart(start: bigint, level: number): bigint {
    const span = this.span(level);
    return start - (start % span);
  }

  private sizeName(level: number): string {
    return level === 3 ? '1 GiB' : level === 2 ? '2 MiB' : '4 KiB';
  }

  /** A canonical 64-bit IOVA without its sign extension (Intel SDM vol. 3, "canonical addressing"). */
  private indexSpace(iova: number | bigint): bigint {
    if (typeof iova === 'number' && !(Number.isSafeInteger(iova) && iova >= 0)) {
      throw new X86BuilderError('range', `IOVA ${iova} is not a safe non-negative integer`);
    }
    const value = BigInt(iova);
    if (value < 0n || value > U64) throw new X86BuilderError('range', `IOVA ${value} is not a 64-bit address`);
    const top = value >> (this.inputBits - 1n);
    if (top !== 0n && top !== (1n << (65n - this.inputBits)) - 1n) {
      throw new X86BuilderError('range', `IOVA ${hex(value)} is not canonical for ${this.levels}-level paging`);
    }
    return value & ((1n << this.inputBits) - 1n);
  }

  private canonical(start: bigint): bigint {
    return (start >> (this.inputBits - 1n)) === 0n ? start : start | (U64 & ~((1n << this.inputBits) - 1n));
  }

  /** Leaves inside a range, checked before anything is changed. */
  private leavesIn(iova: number | bigint, size: number | bigint): LeafSlot[] {
    const length = BigInt(size);
    const start = this.indexSpace(iova);
    if (length <= 0n || length % BigInt(X86_PAGE_4K) !== 0n || start % BigInt(X86_PAGE_4K) !== 0n) {
      throw new X86BuilderError('alignment', `range ${hex(this.canonical(start))}+${hex(length)} is not a positive whole number of 4 KiB pages`);
    }
    const end = start + length;
    // The range may not run into or across the non-canonical hole.
    const half = 1n << (this.inputBits - 1n);
    if (end > 1n << this.inputBits || (start < half && end > half)) {
      throw new X86BuilderError('range', `range ${hex(this.canonical(start))}+${hex(length)} leaves the canonical half it starts in`);
    }
    const slots: LeafSlot[] = [];
    const visit = (table: Table): void => {
      const span = this.span(table.level);
      const first = start > table.base ? Number((start - table.base) / span) : 0;
      for (let index = first; index < 512; index++) {
        const slot = table.base + BigInt(index) * span;
        if (slot >= end) break;
        const value = table.entries[index]!;
        if ((value & PRESENT) === 0n) continue;
        if (!this.isLeaf(value, table.level)) {
          visit(this.tables.get(Number(value & ADDRESS))!);
          continue;
        }
        if (slot < start || slot + span > end) {
          throw new X86BuilderError('partial', `range ${hex(this.canonical(start))}+${hex(length)} cuts the ${this.sizeName(table.level)} mapping at ${hex(this.canonical(slot))}`);
        }
        slots.push({ table, index, start: slot, span });
      }
    };
    visit(this.rootTable);
    return slots;
  }

  private merge(slots: readonly LeafSlot[]): IovaRange[] {
    const out: { iova: bigint; size: bigint; end: bigint }[] = [];
    for (const slot of slots) {
      const last = out[out.length - 1];
      if (last !== undefined && last.end === slot.start) {
        last.size += slot.span;
        last.end += slot.span;
      } else {
        out.push({ iova: slot.start, size: slot.span, end: slot.start + slot.span });
      }
    }
    return out.map((r) => ({ iova: this.canonical(r.iova), size: r.size }));
  }
}
