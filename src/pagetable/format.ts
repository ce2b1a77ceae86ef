/**
 * The backend's I/O page-table format, shared by the writer (the owner of a context) and by readers
 * in other threads. Everything a reader needs is in this file and in ./walk.ts: the numbers here are
 * the contract between threads.
 *
 * A table is 512 entries of 8 bytes (4 KiB). An entry is two 32-bit words:
 *   word 0  flags  (EntryFlag bits; PRESENT clear means the whole entry is empty)
 *   word 1  frame  a leaf's guest page frame (GPA >> 12), or the pool index of the next-level table
 * Level 0 tables hold 4 KiB leaves; an entry at level L covers 512^L pages, so LEAF at level 1 is a
 * 2 MiB page and at level 2 a 1 GiB page. Roots start at 4 levels (48-bit IOVA) and grow upward to 5
 * (57-bit) and 6 (64-bit) only when a mapping needs it.
 */

export const PAGE_SHIFT = 12;
export const PAGE_SIZE = 1 << PAGE_SHIFT;
export const PAGE_SIZE_N = BigInt(PAGE_SIZE);
export const ENTRIES_PER_TABLE = 512;
export const LEVEL_BITS = 9;
/** Int32 words per table (512 entries of two words). */
export const TABLE_WORDS = ENTRIES_PER_TABLE * 2;
export const TABLE_BYTES = TABLE_WORDS * 4;

/** One table entry: the wire layout every reader and writer takes offsets from. */
export const Entry = {
  flags: { offset: 0, size: 4 },
  frame: { offset: 4, size: 4 },
  SIZE: 8,
  /** Int32 words per entry. */
  WORDS: 2,
  /** Word index of the flags word inside an entry. */
  FLAGS_WORD: 0,
  /** Word index of the frame word inside an entry. */
  FRAME_WORD: 1,
} as const;

/** Bits of an entry's flags word. */
export const EntryFlag = {
  PRESENT: 1 << 0,
  READ: 1 << 1,
  WRITE: 1 << 2,
  /** A translation: 4 KiB at level 0, 2 MiB at level 1, 1 GiB at level 2. Clear: next-level table. */
  LEAF: 1 << 3,
  /** First page of an IOAS area. An area runs until the next AREA_START or the next hole. */
  AREA_START: 1 << 4,
  /** Reserved for device writers: set when a DMA wrote through this leaf (dirty tracking). */
  DIRTY: 1 << 5,
  /** Reserved for device readers: set when a DMA used this leaf. */
  ACCESSED: 1 << 6,
  /** Permission bits a leaf carries. */
  PERM_MASK: (1 << 1) | (1 << 2),
} as const;

/** Level count range. 4 levels cover IOVA < 2^48, 5 cover < 2^57, 6 cover the whole 64-bit space. */
export const MIN_LEVELS = 4;
export const MAX_LEVELS = 6;
/** Highest level at which a LEAF may appear (1 GiB pages). */
export const MAX_LEAF_LEVEL = 2;

/** Pages covered by one entry at each level: 512^level (exact doubles up to level 5). */
export const LEVEL_PAGES: readonly number[] = [1, 512, 512 ** 2, 512 ** 3, 512 ** 4, 512 ** 5];
/** Pages covered by a whole table at each level: 512^(level+1). 2^54 for the 6th level is exact. */
export const TABLE_PAGES: readonly number[] = [512, 512 ** 2, 512 ** 3, 512 ** 4, 512 ** 5, 512 ** 6];
/** Largest IOVA page frame: (2^64 - 1) >> 12. */
export const MAX_IOVA_PFN = 2 ** 52 - 1;
/** Guest frames are 32-bit in the frame word: GPAs below 16 TiB. */
export const MAX_GUEST_PFN = 2 ** 32 - 1;

/** Levels needed for a page frame number: smallest n >= 4 with pfn < 512^n. */
export function levelsFor(pfn: number): number {
  let n = MIN_LEVELS;
  while (n < MAX_LEVELS && pfn >= TABLE_PAGES[n - 1]!) n++;
  return n;
}

/** Entry index of `pfn` inside the table at `level`. Division by a power of two is exact. */
export function entryIndex(pfn: number, level: number): number {
  return Math.floor(pfn / LEVEL_PAGES[level]!) % ENTRIES_PER_TABLE;
}

/** Int32 word index of entry `entry`'s flags word in table `table`. */
export function entryWord(table: number, entry: number): number {
  return table * TABLE_WORDS + entry * Entry.WORDS;
}

/**
 * Header slot of an address space (one per IOAS), 16 bytes inside a pool header page. Readers find
 * the current root here; the owner replaces ROOT in one atomic store when the root grows.
 */
export const HeaderSlot = {
  /** (levels << ROOT_LEVELS_SHIFT) | root table index. */
  ROOT: 0,
  /** Bumped whenever a translation is removed or narrowed (unmap): for IOTLBs to notice. */
  GENERATION: 1,
  /** HeaderFlag bits. */
  FLAGS: 2,
  /** The IOAS object ID in its context, for diagnostics. */
  OWNER_ID: 3,
  WORDS: 4,
} as const;

export const ROOT_LEVELS_SHIFT = 28;
export const ROOT_INDEX_MASK = (1 << ROOT_LEVELS_SHIFT) - 1;

export function packRoot(rootTable: number, levels: number): number {
  return (levels << ROOT_LEVELS_SHIFT) | rootTable;
}

export const HeaderFlag = {
  /** The slot is in use by a live address space. */
  LIVE: 1 << 0,
} as const;

/** Header slots per header page. */
export const HEADER_SLOTS_PER_PAGE = TABLE_WORDS / HeaderSlot.WORDS;

/**
 * Pool page 0: identifies the pool. Table index 0 is never a table, so a zero frame word in a
 * non-leaf entry can never point at live data.
 */
export const PoolInfo = {
  MAGIC: 0,
  VERSION: 1,
  /** Tables handed out so far (high-water mark), for diagnostics. */
  HIGH_WATER: 2,
  WORDS: 3,
} as const;

export const POOL_MAGIC = 0x494f5054; // 'IOPT'
export const POOL_VERSION = 1;
