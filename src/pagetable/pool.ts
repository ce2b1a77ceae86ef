import {
  Entry,
  EntryFlag,
  HEADER_SLOTS_PER_PAGE,
  HeaderSlot,
  POOL_MAGIC,
  POOL_VERSION,
  PoolInfo,
  ROOT_INDEX_MASK,
  TABLE_BYTES,
  TABLE_WORDS,
} from './format.js';

export interface TablePoolOptions {
  /** Tables the buffer holds at first (page 0 included). Default 16 (64 KiB). */
  readonly initialTables?: number;
  /** Most tables the buffer may grow to. Default 262144 (1 GiB of address space reserved, not committed). */
  readonly maxTables?: number;
}

/** What another thread needs to walk the tables: the growable shared buffer itself. */
export interface TablePoolDescriptor {
  readonly buffer: SharedArrayBuffer;
}

export interface TablePoolStats {
  /** Tables holding live entries or header slots. */
  readonly tablesInUse: number;
  /** Tables freed but not yet reusable (waiting for reclaim()). */
  readonly pendingFree: number;
  /** Tables ready for reuse. */
  readonly freeTables: number;
  /** Bytes the shared buffer spans now. */
  readonly bytes: number;
}

/**
 * A growable SharedArrayBuffer of 4 KiB tables, written only by the owner thread. Views made with
 * no length track growth, so readers in other threads keep one Int32Array for the buffer's life.
 *
 * Freed tables (and header slots) are not reused at once: a reader may still be walking them. They
 * wait in a pending list until reclaim(), which the caller invokes once no reader can hold an old
 * pointer; reclaim zeroes them and makes them allocatable.
 */
export class TablePool {
  readonly buffer: SharedArrayBuffer;
  /**
   * Fixed-length view over the whole pool, replaced when the pool grows (Atomics on length-tracking
   * views of growable buffers are several times slower in V8). Re-read it after ensure().
   */
  private view: Int32Array;
  private readonly maxTables: number;
  private capacity: number;
  /** Next table index never handed out. Index 0 is the pool info page. */
  private highWater = 1;
  private readonly freeList: number[] = [];
  private readonly pendingTables: number[] = [];
  /** Freed tables whose flag words are all zero already (see release()). */
  private readonly pendingClean: number[] = [];
  private readonly freeHeaders: number[] = [];
  /** 1: a free table whose frame words may be stale (freed flags-clear, not zeroed). */
  private staleFrames: Uint8Array;
  private readonly pendingHeaders: number[] = [];
  /**
   * Owner-side bookkeeping per table: entries present, entries that are "full" (a leaf, or a child
   * with no hole), and the span [lo, hi) of present entries, so scans skip the empty ends.
   */
  present: Uint16Array;
  full: Uint16Array;
  lo: Uint16Array;
  hi: Uint16Array;
  private inUse = 0;

  constructor(options: TablePoolOptions = {}) {
    const maxTables = options.maxTables ?? 262144;
    const initial = Math.min(Math.max(options.initialTables ?? 16, 2), maxTables);
    if (!Number.isInteger(maxTables) || maxTables < 2 || maxTables > ROOT_INDEX_MASK) {
      throw new RangeError(`maxTables must be an integer in [2, ${ROOT_INDEX_MASK}], got ${maxTables}`);
    }
    this.maxTables = maxTables;
    this.capacity = initial;
    this.buffer = new SharedArrayBuffer(initial * TABLE_BYTES, { maxByteLength: maxTables * TABLE_BYTES });
    this.view = new Int32Array(this.buffer, 0, this.buffer.byteLength >>> 2);
    this.staleFrames = new Uint8Array(initial);
    this.present = new Uint16Array(initial);
    this.full = new Uint16Array(initial);
    this.lo = new Uint16Array(initial);
    this.hi = new Uint16Array(initial);
    this.words[PoolInfo.MAGIC] = POOL_MAGIC;
    this.words[PoolInfo.VERSION] = POOL_VERSION;
    Atomics.store(this.words, PoolInfo.HIGH_WATER, this.highWater);
  }

  /** The current view of the pool (see `view`): valid until the next ensure() that grows it. */
  get words(): Int32Array {
    return this.view;
  }

  describe(): TablePoolDescriptor {
    return { buffer: this.buffer };
  }

  /** Tables allocatable right now without growing past the maximum. */
  private available(): number {
    return this.freeList.length + (this.maxTables - this.highWater);
  }

  /**
   * Makes sure `count` more tables can be allocated (growing the buffer if needed). Returns false,
   * changing nothing, when the pool's maximum would be exceeded: callers check before they mutate.
   */
  ensure(count: number): boolean {
    if (count <= this.freeList.length) return true;
    if (count > this.available()) return false;
    const needed = this.highWater + (count - this.freeList.length);
    if (needed > this.capacity) this.grow(needed);
    return true;
  }

  private grow(needed: number): void {
    const target = Math.min(this.maxTables, Math.max(needed, this.capacity * 2));
    this.buffer.grow(target * TABLE_BYTES);
    this.view = new Int32Array(this.buffer, 0, this.buffer.byteLength >>> 2);
    const widen = (old: Uint16Array) => {
      const next = new Uint16Array(target);
      next.set(old);
      return next;
    };
    const stale = new Uint8Array(target);
    stale.set(this.staleFrames);
    this.staleFrames = stale;
    this.present = widen(this.present);
    this.full = widen(this.full);
    this.lo = widen(this.lo);
    this.hi = widen(this.hi);
    this.capacity = target;
  }

  /**
   * A table whose words are all zero. Callers ensure() first; alloc() never grows the buffer, so
   * views taken after ensure() stay valid through an operation; running out is a caller's bug. With `flagsOnly`, a table whose flag words are zero but whose
   * frame words may still hold stale values (a radix table: entries are read only when present),
   * which spares zeroing the tables that unmaps emptied.
   */
  alloc(options?: { readonly flagsOnly?: boolean }): number {
    let table = this.freeList.pop();
    if (table !== undefined && this.staleFrames[table] === 1) {
      this.staleFrames[table] = 0;
      if (options?.flagsOnly !== true) this.words.fill(0, table * TABLE_WORDS, (table + 1) * TABLE_WORDS);
    }
    if (table === undefined) {
      if (this.highWater >= this.capacity) throw new Error('table pool alloc() without ensure()');
      table = this.highWater++;
      Atomics.store(this.words, PoolInfo.HIGH_WATER, this.highWater);
    }
    this.present[table] = 0;
    this.full[table] = 0;
    this.lo[table] = 0;
    this.hi[table] = 0;
    this.inUse++;
    return table;
  }

  /** Records that entry `idx` of `table` became present. */
  markSet(table: number, idx: number): void {
    if (this.present[table]!++ === 0) {
      this.lo[table] = idx;
      this.hi[table] = idx + 1;
    } else {
      if (idx < this.lo[table]!) this.lo[table] = idx;
      if (idx >= this.hi[table]!) this.hi[table] = idx + 1;
    }
  }

  /** Records that entry `idx` of `table` was cleared, narrowing the present span. */
  markClear(table: number, idx: number): void {
    const left = --this.present[table]!;
    if (left === 0) {
      this.lo[table] = 0;
      this.hi[table] = 0;
      return;
    }
    const words = this.words;
    const base = table * TABLE_WORDS + Entry.FLAGS_WORD;
    if (idx === this.lo[table]) {
      let i = idx + 1;
      while ((words[base + i * Entry.WORDS]! & EntryFlag.PRESENT) === 0) i++;
      this.lo[table] = i;
    }
    if (idx + 1 === this.hi[table]) {
      let i = idx - 1;
      while ((words[base + i * Entry.WORDS]! & EntryFlag.PRESENT) === 0) i--;
      this.hi[table] = i + 1;
    }
  }

  /**
   * Frees a table once readers are quiescent (see reclaim()). `flagsClear`: every entry's flags
   * word is already zero (the caller cleared them one by one, as unmap does), so reclaim need not
   * zero the table; its frame words are zeroed only if a caller other than a radix table gets it.
   */
  release(table: number, flagsClear = false): void {
    (flagsClear ? this.pendingClean : this.pendingTables).push(table);
    this.inUse--;
  }

  /** Whether a header slot can be handed out (a new header page may be needed). */
  canAllocHeader(): boolean {
    return this.freeHeaders.length > 0 || this.ensure(1);
  }

  /** A header slot's Int32 word index; its words are zero. Callers check canAllocHeader() first. */
  allocHeader(): number {
    let slot = this.freeHeaders.pop();
    if (slot === undefined) {
      const page = this.alloc();
      for (let i = HEADER_SLOTS_PER_PAGE - 1; i >= 1; i--) this.freeHeaders.push(page * TABLE_WORDS + i * HeaderSlot.WORDS);
      slot = page * TABLE_WORDS;
    }
    return slot;
  }

  releaseHeader(slot: number): void {
    this.pendingHeaders.push(slot);
  }

  /**
   * Makes freed tables and header slots reusable. Only safe when no reader can still hold a pointer
   * taken before the frees (after worker quiescence). Returns the number of tables reclaimed.
   */
  reclaim(): number {
    const n = this.pendingTables.length + this.pendingClean.length;
    for (const table of this.pendingTables) {
      this.words.fill(0, table * TABLE_WORDS, (table + 1) * TABLE_WORDS);
      this.present[table] = 0;
      this.full[table] = 0;
      this.lo[table] = 0;
      this.hi[table] = 0;
      this.freeList.push(table);
    }
    this.pendingTables.length = 0;
    // Zeroing a table on shared memory is element by element in V8: the flags-clear ones skip it.
    for (const table of this.pendingClean) {
      this.staleFrames[table] = 1;
      this.present[table] = 0;
      this.full[table] = 0;
      this.lo[table] = 0;
      this.hi[table] = 0;
      this.freeList.push(table);
    }
    this.pendingClean.length = 0;
    for (const slot of this.pendingHeaders) {
      this.words.fill(0, slot, slot + HeaderSlot.WORDS);
      this.freeHeaders.push(slot);
    }
    this.pendingHeaders.length = 0;
    return n;
  }

  stats(): TablePoolStats {
    return {
      tablesInUse: this.inUse,
      pendingFree: this.pendingTables.length + this.pendingClean.length,
      freeTables: this.freeList.length,
      bytes: this.buffer.byteLength,
    };
  }
}
