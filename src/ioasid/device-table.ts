import type { GuestMemoryDescriptor } from '../memory/guest-memory.js';
import { Entry, EntryFlag, LEVEL_BITS, ENTRIES_PER_TABLE, entryWord } from '../pagetable/format.js';
import type { TablePool } from '../pagetable/pool.js';
import { TableReader, fixedView, walk, type LeafInfo } from '../pagetable/walk.js';
import { GuestWords, NestedResult, NestedWalker, nestedNeed, stage1Refuses } from './nested.js';
import { emptyStage1View, readStage1 } from './stage1-record.js';

/**
 * The per-context device table: how a device's DMA is translated right now, in shared memory so
 * device workers find it without asking the owner. One row per bound device (its RID, PASID 0) and
 * one per PASID attachment. Rows are 8 Int32 words, written only by the owner under a sequence
 * lock: SEQ is odd while a row changes, and every change adds 2, so it doubles as the row's
 * generation for IOTLBs.
 */
export const DeviceRow = {
  /** Sequence / generation: odd while the owner rewrites the row. */
  SEQ: 0,
  /** AttachKind. */
  KIND: 1,
  /** PAGING: Int32 index, in the table pool, of the IOAS header slot to walk. NESTED: of the stage-1 record. */
  HEADER: 2,
  /** DeviceRowFlag bits. */
  FLAGS: 3,
  /** Pool table index of the PASID directory root; 0 when the device has no PASID attachments. */
  PASID_ROOT: 4,
  /** Levels of the PASID directory (9 PASID bits per level). */
  PASID_LEVELS: 5,
  /** Context object ID of the device, for diagnostics. */
  DEVICE_ID: 6,
  /** Context object ID of the attached HWPT (0 for blocked / identity), for diagnostics. */
  HWPT_ID: 7,
  WORDS: 8,
} as const;

/** What a row's translation is. */
export const AttachKind = {
  /** No attachment: every DMA faults. */
  BLOCKED: 0,
  /** Bypass: IOVA is GPA. */
  IDENTITY: 1,
  /** Walk the IOAS table named by HEADER. */
  PAGING: 2,
  /** A guest's stage-1 table over a paging parent: HEADER names the stage-1 record (stage1-record.ts). */
  NESTED: 3,
} as const;
export type AttachKindValue = (typeof AttachKind)[keyof typeof AttachKind];

export const DeviceRowFlag = {
  /** The row belongs to a bound device (clear once the slot is released). */
  BOUND: 1 << 0,
  /** The attached HWPT tracks dirty pages: writers should set EntryFlag.DIRTY. */
  DIRTY_TRACKING: 1 << 1,
  /** The row is a PASID row, not a device's RID row. */
  PASID: 1 << 2,
} as const;

export interface RowValue {
  kind: number;
  header: number;
  flags: number;
  seq: number;
  hwptId: number;
}

export function emptyRowValue(): RowValue {
  return { kind: AttachKind.BLOCKED, header: 0, flags: 0, seq: 0, hwptId: 0 };
}

/**
 * Reads a row consistently (retrying while the owner is mid-update). Pure: shared memory only.
 */
export function readRow(rows: Int32Array, row: number, out: RowValue): RowValue {
  const base = row * DeviceRow.WORDS;
  for (;;) {
    const seq = Atomics.load(rows, base + DeviceRow.SEQ);
    if ((seq & 1) !== 0) continue;
    out.kind = Atomics.load(rows, base + DeviceRow.KIND);
    out.header = Atomics.load(rows, base + DeviceRow.HEADER);
    out.flags = Atomics.load(rows, base + DeviceRow.FLAGS);
    out.hwptId = Atomics.load(rows, base + DeviceRow.HWPT_ID);
    if (Atomics.load(rows, base + DeviceRow.SEQ) === seq) {
      out.seq = seq;
      return out;
    }
  }
}

/** findPasidRowWords() result when the pool view is older than the pool: refresh and retry. */
const STALE_POOL_VIEW = -2;

function findPasidRowWords(rows: Int32Array, pool: Int32Array, row: number, pasid: number): number {
  if (pasid === 0) return row;
  const base = row * DeviceRow.WORDS;
  let table = Atomics.load(rows, base + DeviceRow.PASID_ROOT);
  const levels = Atomics.load(rows, base + DeviceRow.PASID_LEVELS);
  if (table === 0 || !(pasid > 0 && pasid < 2 ** (LEVEL_BITS * levels))) return -1;
  for (let level = levels - 1; level >= 0; level--) {
    const w = entryWord(table, Math.floor(pasid / 2 ** (LEVEL_BITS * level)) % ENTRIES_PER_TABLE);
    if (w + Entry.WORDS > pool.length) return STALE_POOL_VIEW;
    const flags = Atomics.load(pool, w + Entry.FLAGS_WORD);
    if ((flags & EntryFlag.PRESENT) === 0) return -1;
    table = pool[w + Entry.FRAME_WORD]! >>> 0;
    // The frame goes with these flags only if they still hold (the entry may have been replaced).
    if (Atomics.load(pool, w + Entry.FLAGS_WORD) !== flags) return findPasidRowWords(rows, pool, row, pasid);
  }
  return table;
}

/**
 * The row that translates (device row `row`, `pasid`): the row itself for PASID 0, otherwise the
 * PASID row found through the device's PASID directory in the table pool; -1 when that PASID has no
 * attachment (the DMA is blocked). Pure: shared memory only (length-tracking views).
 */
export function findPasidRow(rows: Int32Array, pool: Int32Array, row: number, pasid: number): number {
  const r = findPasidRowWords(rows, pool, row, pasid);
  return r === STALE_POOL_VIEW ? -1 : r;
}

/** Outcome of translating one page for a device. */
export const PageResult = {
  OK: 0,
  /** No translation for the device/PASID (blocked). */
  DOMAIN: 1,
  /** The IOAS has no mapping there. */
  MAPPING: 2,
  /** Mapped without the permission the access needs. */
  PERMISSION: 3,
  /** Identity translation: IOVA is GPA (out.guestPfn = iovaPfn). */
  IDENTITY: 4,
  /** Nested: stage 2 does not map (or allow) a guest-physical address the translation needs. */
  STAGE2: 5,
} as const;

/** The page outcome once the row is read; `walked` is the walk's result (only looked at for PAGING). */
function resolvePage(rowOut: RowValue, iovaPfn: number, write: boolean, leaf: LeafInfo, walked: boolean): number {
  if (rowOut.kind === AttachKind.IDENTITY) {
    leaf.guestPfn = iovaPfn;
    leaf.leafPfn = iovaPfn;
    leaf.leafGuestPfn = iovaPfn;
    leaf.pageShift = 12;
    leaf.flags = EntryFlag.PRESENT | EntryFlag.READ | EntryFlag.WRITE | EntryFlag.LEAF;
    return PageResult.IDENTITY;
  }
  if (rowOut.kind !== AttachKind.PAGING) return PageResult.DOMAIN;
  if (!walked) return PageResult.MAPPING;
  if ((leaf.flags & (write ? EntryFlag.WRITE : EntryFlag.READ)) === 0) return PageResult.PERMISSION;
  return PageResult.OK;
}

/**
 * Translates one IOVA page for (row, pasid) from shared memory alone: the reader path device
 * workers use (with length-tracking views; TranslationReader does the same with faster fixed
 * views). `write` selects the permission checked. Fills `leaf` for OK and IDENTITY. Without guest
 * memory this function cannot walk a stage 1: NESTED rows answer DOMAIN (TranslationReader walks them).
 */
export function translatePage(
  rows: Int32Array,
  pool: Int32Array,
  row: number,
  pasid: number,
  iovaPfn: number,
  write: boolean,
  rowOut: RowValue,
  leaf: LeafInfo,
): number {
  const r = findPasidRow(rows, pool, row, pasid);
  if (r < 0) return PageResult.DOMAIN;
  readRow(rows, r, rowOut);
  const walked = rowOut.kind === AttachKind.PAGING && walk(pool, rowOut.header, iovaPfn, leaf);
  return resolvePage(rowOut, iovaPfn, write, leaf, walked);
}

export interface DeviceTableDescriptor {
  readonly buffer: SharedArrayBuffer;
}

/**
 * What a device worker keeps to translate on its own: fixed-length views of the context's table
 * pool and device table, re-mapped when a read reaches past them (after the owner grew a buffer),
 * and, given guest memory, a walker for nested rows' stage-1 tables.
 */
export class TranslationReader {
  readonly tables: TableReader;
  private readonly devices: SharedArrayBuffer;
  private rowView: Int32Array;
  private readonly nested: NestedWalker | undefined;
  private readonly stage1 = emptyStage1View();

  constructor(shared: {
    readonly pool: { readonly buffer: SharedArrayBuffer };
    readonly devices: DeviceTableDescriptor;
    readonly memory?: GuestMemoryDescriptor;
  }) {
    this.tables = new TableReader(shared.pool.buffer);
    this.devices = shared.devices.buffer;
    this.rowView = fixedView(this.devices);
    this.nested = shared.memory === undefined ? undefined : NestedWalker.direct(this.tables, new GuestWords(shared.memory));
  }

  /** The stage-1 walk of the last NESTED page translated (fault code and level, for diagnostics). */
  get nestedWalker(): NestedWalker | undefined {
    return this.nested;
  }

  private rows(row: number): Int32Array {
    if ((row + 1) * DeviceRow.WORDS > this.rowView.length) this.rowView = fixedView(this.devices);
    return this.rowView;
  }

  readRow(row: number, out: RowValue): RowValue {
    return readRow(this.rows(row), row, out);
  }

  findPasidRow(row: number, pasid: number): number {
    for (;;) {
      const r = findPasidRowWords(this.rows(row), this.tables.words, row, pasid);
      if (r !== STALE_POOL_VIEW) return r;
      if (!this.tables.refresh()) return -1;
    }
  }

  /** translatePage() through these views: a PageResult, with `leaf` filled for OK / IDENTITY. */
  translatePage(row: number, pasid: number, iovaPfn: number, write: boolean, rowOut: RowValue, leaf: LeafInfo): number {
    const r = this.findPasidRow(row, pasid);
    if (r < 0) return PageResult.DOMAIN;
    this.readRow(r, rowOut);
    if (rowOut.kind === AttachKind.NESTED) return this.translateNested(rowOut.header, iovaPfn, write, leaf);
    const walked = rowOut.kind === AttachKind.PAGING && this.tables.walk(rowOut.header, iovaPfn, leaf);
    return resolvePage(rowOut, iovaPfn, write, leaf, walked);
  }

  /** A NESTED row: the 2-D walk, then the access against both stages (a user request). */
  private translateNested(record: number, iovaPfn: number, write: boolean, leaf: LeafInfo): number {
    if (this.nested === undefined) return PageResult.DOMAIN;
    if (record + 16 > this.tables.words.length) this.tables.refresh();
    if (!readStage1(this.tables.words, record, this.stage1)) return PageResult.DOMAIN;
    const r = this.nested.walk(this.stage1, iovaPfn, leaf);
    if (r === NestedResult.STAGE1) return PageResult.MAPPING;
    if (r === NestedResult.STAGE2) return PageResult.STAGE2;
    const need = nestedNeed(!write, write, false);
    if (r === NestedResult.OK && (leaf.flags & need) === need) return PageResult.OK;
    // Refused, or the output page is not in stage 2: stage 1's verdict comes first.
    return stage1Refuses(leaf.flags, need) ? PageResult.PERMISSION : PageResult.STAGE2;
  }
}

/** Owner side of the device table: row allocation with deferred reuse, and row writes. */
export class DeviceTable {
  readonly buffer: SharedArrayBuffer;
  /** Fixed-length view, replaced when the table grows (see TablePool.words). */
  private view: Int32Array;
  private capacity: number;
  private next = 0;
  private readonly freeRows: number[] = [];
  private readonly pendingRows: number[] = [];
  private live = 0;

  constructor(initialRows = 64, maxRows = 1 << 16) {
    initialRows = Math.max(1, Math.min(initialRows, maxRows));
    this.capacity = initialRows;
    this.buffer = new SharedArrayBuffer(initialRows * DeviceRow.WORDS * 4, { maxByteLength: maxRows * DeviceRow.WORDS * 4 });
    this.view = fixedView(this.buffer);
  }

  get rows(): Int32Array {
    return this.view;
  }

  describe(): DeviceTableDescriptor {
    return { buffer: this.buffer };
  }

  /** Whether `count` rows can be allocated. */
  canAlloc(count: number): boolean {
    const maxRows = this.buffer.maxByteLength / (DeviceRow.WORDS * 4);
    return this.freeRows.length + (maxRows - this.next) >= count;
  }

  /** A fresh BLOCKED row. Callers check canAlloc() first. */
  alloc(deviceId: number, flags: number): number {
    let row = this.freeRows.pop();
    if (row === undefined) {
      row = this.next++;
      if (row >= this.capacity) {
        const maxRows = this.buffer.maxByteLength / (DeviceRow.WORDS * 4);
        this.capacity = Math.min(maxRows, this.capacity * 2);
        this.buffer.grow(this.capacity * DeviceRow.WORDS * 4);
        this.view = fixedView(this.buffer);
      }
    }
    const base = row * DeviceRow.WORDS;
    const seq = Atomics.load(this.rows, base + DeviceRow.SEQ);
    Atomics.store(this.rows, base + DeviceRow.SEQ, seq + 1);
    Atomics.store(this.rows, base + DeviceRow.KIND, AttachKind.BLOCKED);
    Atomics.store(this.rows, base + DeviceRow.HEADER, 0);
    Atomics.store(this.rows, base + DeviceRow.FLAGS, flags | DeviceRowFlag.BOUND);
    Atomics.store(this.rows, base + DeviceRow.PASID_ROOT, 0);
    Atomics.store(this.rows, base + DeviceRow.PASID_LEVELS, 0);
    Atomics.store(this.rows, base + DeviceRow.DEVICE_ID, deviceId);
    Atomics.store(this.rows, base + DeviceRow.HWPT_ID, 0);
    Atomics.store(this.rows, base + DeviceRow.SEQ, seq + 2);
    this.live++;
    return row;
  }

  /** Rewrites a row's translation in one sequence-locked update: readers see old or new, never a mix. */
  write(row: number, kind: AttachKindValue, header: number, hwptId: number, dirty: boolean): void {
    const base = row * DeviceRow.WORDS;
    const seq = Atomics.load(this.rows, base + DeviceRow.SEQ);
    Atomics.store(this.rows, base + DeviceRow.SEQ, seq + 1);
    Atomics.store(this.rows, base + DeviceRow.KIND, kind);
    Atomics.store(this.rows, base + DeviceRow.HEADER, header);
    const flags = Atomics.load(this.rows, base + DeviceRow.FLAGS);
    Atomics.store(
      this.rows,
      base + DeviceRow.FLAGS,
      dirty ? flags | DeviceRowFlag.DIRTY_TRACKING : flags & ~DeviceRowFlag.DIRTY_TRACKING,
    );
    Atomics.store(this.rows, base + DeviceRow.HWPT_ID, hwptId);
    Atomics.store(this.rows, base + DeviceRow.SEQ, seq + 2);
  }

  /** Publishes a device's PASID directory root (set once, when its first PASID attaches). */
  setPasidDirectory(row: number, table: number, levels: number): void {
    const base = row * DeviceRow.WORDS;
    const seq = Atomics.load(this.rows, base + DeviceRow.SEQ);
    Atomics.store(this.rows, base + DeviceRow.SEQ, seq + 1);
    Atomics.store(this.rows, base + DeviceRow.PASID_LEVELS, levels);
    Atomics.store(this.rows, base + DeviceRow.PASID_ROOT, table);
    Atomics.store(this.rows, base + DeviceRow.SEQ, seq + 2);
  }

  read(row: number): RowValue {
    return readRow(this.rows, row, emptyRowValue());
  }

  /** Blocks the row and frees it once readers are quiescent (see reclaim()). */
  release(row: number): void {
    this.write(row, AttachKind.BLOCKED, 0, 0, false);
    const base = row * DeviceRow.WORDS;
    Atomics.store(this.rows, base + DeviceRow.FLAGS, 0);
    this.pendingRows.push(row);
    this.live--;
  }

  reclaim(): void {
    for (const row of this.pendingRows) this.freeRows.push(row);
    this.pendingRows.length = 0;
  }

  get liveRows(): number {
    return this.live;
  }
}

/**
 * A device's PASID directory, owner side: a small radix in the table pool mapping PASID → row
 * index, using the page-table entry format (PRESENT; frame = next table, or the row at level 0).
 */
export class PasidDirectory {
  readonly root: number;
  readonly levels: number;
  private readonly owned: number[] = [];

  /** Tables a directory of `pasidBits` needs at most for one PASID. */
  static tablesFor(pasidBits: number): number {
    return Math.max(1, Math.ceil(pasidBits / LEVEL_BITS));
  }

  /** The caller checked pool.ensure(tablesFor(pasidBits)). */
  constructor(
    private readonly pool: TablePool,
    pasidBits: number,
  ) {
    this.levels = PasidDirectory.tablesFor(pasidBits);
    this.root = pool.alloc();
    this.owned.push(this.root);
  }

  /** Tables set() would add for this PASID. */
  tablesToSet(pasid: number): number {
    let table = this.root;
    const words = this.pool.words;
    for (let level = this.levels - 1; level >= 1; level--) {
      const w = entryWord(table, Math.floor(pasid / 2 ** (LEVEL_BITS * level)) % ENTRIES_PER_TABLE);
      if ((words[w]! & EntryFlag.PRESENT) === 0) return level;
      table = words[w + Entry.FRAME_WORD]! >>> 0;
    }
    return 0;
  }

  /** Points `pasid` at `row`. The caller checked pool.ensure(tablesToSet(pasid)). */
  set(pasid: number, row: number): void {
    const words = this.pool.words;
    let table = this.root;
    for (let level = this.levels - 1; level >= 1; level--) {
      const w = entryWord(table, Math.floor(pasid / 2 ** (LEVEL_BITS * level)) % ENTRIES_PER_TABLE);
      if ((words[w]! & EntryFlag.PRESENT) === 0) {
        const child = this.pool.alloc();
        this.owned.push(child);
        words[w + Entry.FRAME_WORD] = child;
        Atomics.store(words, w, EntryFlag.PRESENT);
      }
      table = words[w + Entry.FRAME_WORD]! >>> 0;
    }
    const w = entryWord(table, pasid % ENTRIES_PER_TABLE);
    words[w + Entry.FRAME_WORD] = row;
    Atomics.store(words, w, EntryFlag.PRESENT | EntryFlag.LEAF);
  }

  /** Removes `pasid` (its inner tables stay until the directory is destroyed). */
  clear(pasid: number): void {
    const words = this.pool.words;
    let table = this.root;
    for (let level = this.levels - 1; level >= 1; level--) {
      const w = entryWord(table, Math.floor(pasid / 2 ** (LEVEL_BITS * level)) % ENTRIES_PER_TABLE);
      if ((words[w]! & EntryFlag.PRESENT) === 0) return;
      table = words[w + Entry.FRAME_WORD]! >>> 0;
    }
    const w = entryWord(table, pasid % ENTRIES_PER_TABLE);
    // Flags only: a reader racing this clear reads the old row index, never row 0 (a real device).
    Atomics.store(words, w, 0);
  }

  destroy(): void {
    for (const t of this.owned) this.pool.release(t);
    this.owned.length = 0;
  }

  get tableCount(): number {
    return this.owned.length;
  }
}
