import type { GuestMemory } from '../memory/guest-memory.js';

/**
 * Guest-owned x86-64 stage-1 page tables: the 4-level (and 5-level, LA57) paging format the CPU
 * uses and VT-d uses for first-stage translation, and a walker for nested translation. The guest
 * writes these tables in its own memory; every table read goes through stage 2 (the guest-physical
 * IOAS), so a walk is two-dimensional. See docs/nested.md.
 *
 * A table is 512 entries of 8 bytes (4 KiB). The walker reads an entry as two little-endian 32-bit
 * words, so the layout below is given per word: `lo` holds bits 0..31, `hi` bits 32..63.
 */

/** Paging-structure entry bits (Intel SDM vol. 3, "4-level paging and 5-level paging", entry formats). */
export const X86Pte = {
  SIZE: 8,
  // lo word
  PRESENT: 1 << 0,
  /** R/W: writes allowed when set at every level. */
  WRITABLE: 1 << 1,
  /** U/S: user-mode accesses allowed when set at every level. */
  USER: 1 << 2,
  PWT: 1 << 3,
  PCD: 1 << 4,
  ACCESSED: 1 << 5,
  /** Leaves only; ignored in entries that reference a table. */
  DIRTY: 1 << 6,
  /** PS at levels 2 and 3 (2 MiB / 1 GiB leaf); reserved at levels 4 and 5; PAT in a 4 KiB leaf. */
  PAGE_SIZE: 1 << 7,
  PAT_4K: 1 << 7,
  /** Leaves only; ignored elsewhere. */
  GLOBAL: 1 << 8,
  /** PAT of a 2 MiB / 1 GiB leaf: the one address bit below the page size that is not reserved. */
  PAT_LARGE: 1 << 12,
  /** Address bits 12..31. */
  ADDRESS_LO: 0xfffff000,
  /** Address bits 32..51 (as bits 0..19 of the hi word). */
  ADDRESS_HI: 0x000fffff,
  /** Bits 52..62: ignored by the walk, free for software (and protection keys on CPUs). */
  IGNORED_HI: 0x7ff00000,
  /** XD, bit 63: no instruction fetch through this entry. Reserved when NXE is off. */
  XD_HI: 0x80000000,
  /** Bits 13..20 of a 2 MiB leaf: the frame is 2 MiB aligned (bit 12 is PAT). */
  RESERVED_2M: 0x001fe000,
  /** Bits 13..29 of a 1 GiB leaf: the frame is 1 GiB aligned (bit 12 is PAT). */
  RESERVED_1G: 0x3fffe000,
} as const;

/** Level numbers as the SDM counts them: 1 holds 4 KiB leaves. */
export const X86Level = {
  PT: 1,
  PD: 2,
  PDPT: 3,
  PML4: 4,
  PML5: 5,
} as const;

/** Why a walk failed; NONE (0) is success. */
export const X86Fault = {
  NONE: 0,
  /** An entry on the path has P clear (faultLevel says where). */
  NOT_PRESENT: 1,
  /** A present entry has a reserved bit set. */
  RESERVED_BIT: 2,
  /** The walk found a leaf, but the access is not allowed by the effective permissions. */
  PERMISSION: 3,
  /** The input address is not sign-extended from bit 47 (57 with 5 levels). */
  NON_CANONICAL: 4,
  /** A table entry's guest-physical address could not be read (or updated) through stage 2. */
  STAGE2: 5,
} as const;
export type X86FaultValue = (typeof X86Fault)[keyof typeof X86Fault];

export const X86FaultName: Readonly<Record<X86FaultValue, string>> = {
  0: 'none',
  1: 'not-present',
  2: 'reserved-bit',
  3: 'permission',
  4: 'non-canonical',
  5: 'stage2',
};

export const X86_PAGE_4K = 0x1000;
export const X86_PAGE_2M = 0x20_0000;
export const X86_PAGE_1G = 0x4000_0000;
/** IOVA page frames are IOVA >> 12: below 2^52 for every 64-bit address. */
export const X86_PFN_LIMIT = 2 ** 52;

/** 4 KiB pages covered by one entry at level L (index L). */
const LEVEL_PAGES = [0, 1, 2 ** 9, 2 ** 18, 2 ** 27, 2 ** 36] as const;
/** Sign-extension checks: pfn / 2^35 (4 levels) or 2^44 (5 levels) is 0 or all ones. */
const CANONICAL_DIV_4 = 2 ** 35;
const CANONICAL_HIGH_4 = 2 ** 17 - 1;
const CANONICAL_DIV_5 = 2 ** 44;
const CANONICAL_HIGH_5 = 2 ** 8 - 1;
const TWO_32 = 2 ** 32;
/** Frame masks of the lo word for 2 MiB and 1 GiB leaves (the address bits above the page size). */
const FRAME_LO_2M = 0xffe00000;
const FRAME_LO_1G = 0xc0000000;

/**
 * Reads the 8-byte entry at guest-physical `gpa` through stage 2 into out[0] (bits 0..31) and out[1]
 * (bits 32..63). Returns false when stage 2 does not translate `gpa` for reading.
 */
export type Stage2Read = (gpa: number, out: Uint32Array) => boolean;
/**
 * Sets `bits` (in the lo word) of the entry at guest-physical `gpa` through stage 2, atomically as
 * hardware's locked update does. Returns false when stage 2 does not allow the write.
 */
export type Stage2SetBits = (gpa: number, bits: number) => boolean;

/** What points at a stage-1 table: the PASID entry's first-stage pointer, or a guest's CR3. */
export interface X86Stage1 {
  /** Guest-physical address of the top table (PML4 or PML5); bits below 4 KiB are ignored. */
  readonly root: number;
  readonly levels: 4 | 5;
  /**
   * Physical-address width of stage-1 outputs (MAXPHYADDR, VT-d's address width), 32..52; address
   * bits at and above it are reserved. Default 52.
   */
  readonly physBits?: number;
  /** IA32_EFER.NXE: XD is meaningful; when false bit 63 is reserved. Default true. */
  readonly nxe?: boolean;
  /**
   * Set accessed and dirty flags like hardware does (optional on VT-d first stage, so off unless
   * given): after a successful walk, A on every entry used that lacks it, and D on the leaf for a
   * write. A failed update is a STAGE2 fault.
   */
  readonly accessedDirty?: Stage2SetBits;
}

/** The request being translated. Callers keep constant objects; the walker never stores them. */
export interface X86Access {
  readonly write: boolean;
  /** A user-mode request (VT-d: PASID with privilege clear); supervisor requests skip the U/S check. */
  readonly user?: boolean;
  /** An instruction fetch (VT-d execute request). */
  readonly exec?: boolean;
}

export const X86_READ: X86Access = Object.freeze({ write: false });
export const X86_WRITE: X86Access = Object.freeze({ write: true });

/** The walker's output, reused across walks so a walk allocates nothing. */
export interface X86WalkResult {
  /** Guest-physical address of the 4 KiB page holding the IOVA (stage-2 input of the final access). */
  gpa: number;
  /** Guest-physical address where the leaf begins (aligned to its size). */
  leafGpa: number;
  /** IOVA page frame where the leaf begins. */
  leafPfn: number;
  /** 12, 21 or 30. */
  pageShift: number;
  /** 4 KiB, 2 MiB or 1 GiB. */
  pageSize: number;
  /** AND of R/W along the walk. */
  writable: boolean;
  /** AND of U/S along the walk. */
  user: boolean;
  /** No entry on the path had XD. */
  executable: boolean;
  fault: X86FaultValue;
  /** Level of the entry that faulted (the leaf's level for PERMISSION); 0 for NON_CANONICAL. */
  faultLevel: number;
  /** Guest-physical address of that entry; 0 for NON_CANONICAL. */
  faultGpa: number;
  /** Stage-1 entries read by this walk (each one a stage-2 translation). */
  reads: number;
  /** The last entry read: lo, hi. Scratch for Stage2Read. */
  readonly entry: Uint32Array;
  /** Guest-physical address of the entry used at level L, at index L - 1 (valid for levels walked). */
  readonly pathGpa: Float64Array;
  /** Its lo word. */
  readonly pathLo: Uint32Array;
}

export function emptyX86WalkResult(): X86WalkResult {
  return {
    gpa: 0,
    leafGpa: 0,
    leafPfn: 0,
    pageShift: 12,
    pageSize: X86_PAGE_4K,
    writable: false,
    user: false,
    executable: false,
    fault: X86Fault.NONE,
    faultLevel: 0,
    faultGpa: 0,
    reads: 0,
    entry: new Uint32Array(2),
    pathGpa: new Float64Array(5),
    pathLo: new Uint32Array(5),
  };
}

/** Throws RangeError for a stage-1 description the walker cannot take. Call once, at attach time. */
export function validateX86Stage1(stage1: X86Stage1): void {
  if (stage1.levels !== 4 && stage1.levels !== 5) throw new RangeError(`x86-64 stage 1 has 4 or 5 levels, not ${String(stage1.levels)}`);
  const bits = stage1.physBits ?? 52;
  if (!Number.isInteger(bits) || bits < 32 || bits > 52) throw new RangeError(`physical-address width ${bits} is not in 32..52`);
  if (!(Number.isSafeInteger(stage1.root) && stage1.root >= 0 && stage1.root < 2 ** bits)) {
    throw new RangeError(`stage-1 root ${stage1.root} is not a guest-physical address below 2^${bits}`);
  }
}

/** IOVA → IOVA page frame, the walker's input. Throws for values that are not 64-bit addresses. */
export function x86IovaPfn(iova: number | bigint): number {
  if (typeof iova === 'bigint') {
    if (iova < 0n || iova >= 1n << 64n) throw new RangeError(`IOVA ${iova} is not a 64-bit address`);
    return Number(iova >> 12n);
  }
  if (!(Number.isSafeInteger(iova) && iova >= 0)) throw new RangeError(`IOVA ${iova} is not a safe non-negative integer`);
  return Math.floor(iova / X86_PAGE_4K);
}

/** True when the IOVA page frame is canonical for `levels` (Intel SDM vol. 3, "canonical addressing"). */
export function isCanonicalPfn(iovaPfn: number, levels: 4 | 5): boolean {
  if (!(iovaPfn >= 0 && iovaPfn < X86_PFN_LIMIT && Number.isInteger(iovaPfn))) return false;
  const top = levels === 5 ? Math.floor(iovaPfn / CANONICAL_DIV_5) : Math.floor(iovaPfn / CANONICAL_DIV_4);
  return top === 0 || top === (levels === 5 ? CANONICAL_HIGH_5 : CANONICAL_HIGH_4);
}

function fail(out: X86WalkResult, fault: X86FaultValue, level: number, gpa: number): X86FaultValue {
  out.fault = fault;
  out.faultLevel = level;
  out.faultGpa = gpa;
  return fault;
}

/**
 * Translates IOVA page frame `iovaPfn` (IOVA >> 12) through a guest's x86-64 stage-1 table, reading
 * each entry through stage 2 with `readStage2`. Fills `out` and returns out.fault: NONE, or why the
 * access faults. On success and on PERMISSION the translation fields describe the leaf; the caller
 * does the final stage-2 walk of out.gpa. Allocates nothing; never throws for any table contents.
 *
 * Order of checks, per level from the top: stage-2 read, P, reserved bits; a leaf ends the walk;
 * then the access is checked against the effective permissions (write needs R/W at every level,
 * WP on; a user request needs U/S at every level; a fetch needs no XD on the path).
 */
export function walkX86(stage1: X86Stage1, iovaPfn: number, access: X86Access, readStage2: Stage2Read, out: X86WalkResult): X86FaultValue {
  const levels = stage1.levels === 5 ? 5 : 4;
  out.reads = 0;
  if (!isCanonicalPfn(iovaPfn, levels)) return fail(out, X86Fault.NON_CANONICAL, 0, 0);

  const physBits = stage1.physBits ?? 52;
  // Address bits at and above the physical-address width are reserved (SDM "reserved bits").
  let reservedHi = X86Pte.ADDRESS_HI & ~((1 << (physBits - 32)) - 1);
  if (stage1.nxe === false) reservedHi |= X86Pte.XD_HI;
  const entry = out.entry;
  let table = stage1.root - (stage1.root % X86_PAGE_4K);
  let writable = true;
  let user = true;
  let executable = true;

  for (let level = levels; level >= 1; level--) {
    const span = LEVEL_PAGES[level]!;
    const gpa = table + (Math.floor(iovaPfn / span) % 512) * X86Pte.SIZE;
    out.reads++;
    out.pathGpa[level - 1] = gpa;
    if (!readStage2(gpa, entry)) return fail(out, X86Fault.STAGE2, level, gpa);
    const lo = entry[0]!;
    const hi = entry[1]!;
    out.pathLo[level - 1] = lo;
    if ((lo & X86Pte.PRESENT) === 0) return fail(out, X86Fault.NOT_PRESENT, level, gpa);
    const large = (level === 2 || level === 3) && (lo & X86Pte.PAGE_SIZE) !== 0;
    let reservedLo = 0;
    // PS is reserved in a PML4E / PML5E (SDM "4-level paging" entry formats); a large leaf's frame is size-aligned.
    if (level >= 4) reservedLo = X86Pte.PAGE_SIZE;
    else if (large) reservedLo = level === 2 ? X86Pte.RESERVED_2M : X86Pte.RESERVED_1G;
    if ((lo & reservedLo) !== 0 || (hi & reservedHi) !== 0) return fail(out, X86Fault.RESERVED_BIT, level, gpa);
    if ((lo & X86Pte.WRITABLE) === 0) writable = false;
    if ((lo & X86Pte.USER) === 0) user = false;
    if ((hi & X86Pte.XD_HI) !== 0) executable = false;

    const high = (hi & X86Pte.ADDRESS_HI) * TWO_32;
    if (level === 1 || large) {
      const frameLo = level === 1 ? X86Pte.ADDRESS_LO : level === 2 ? FRAME_LO_2M : FRAME_LO_1G;
      const inLeaf = iovaPfn % span;
      out.leafGpa = high + ((lo & frameLo) >>> 0);
      out.leafPfn = iovaPfn - inLeaf;
      out.gpa = out.leafGpa + inLeaf * X86_PAGE_4K;
      out.pageShift = 12 + 9 * (level - 1);
      out.pageSize = span * X86_PAGE_4K;
      out.writable = writable;
      out.user = user;
      out.executable = executable;
      if ((access.write && !writable) || (access.user === true && !user) || (access.exec === true && !executable)) {
        return fail(out, X86Fault.PERMISSION, level, gpa);
      }
      const setBits = stage1.accessedDirty;
      if (setBits !== undefined) {
        const fault = updateAccessedDirty(out, levels, level, access.write, setBits);
        if (fault !== X86Fault.NONE) return fault;
      }
      out.fault = X86Fault.NONE;
      out.faultLevel = 0;
      out.faultGpa = 0;
      return X86Fault.NONE;
    }
    table = high + ((lo & X86Pte.ADDRESS_LO) >>> 0);
  }
  // Unreachable: level 1 always ends the walk.
  return fail(out, X86Fault.NOT_PRESENT, 1, 0);
}

/** A on each entry used, top first, then D on the leaf for a write; only where the flag is clear. */
function updateAccessedDirty(out: X86WalkResult, levels: number, leafLevel: number, write: boolean, setBits: Stage2SetBits): X86FaultValue {
  for (let level = levels; level >= leafLevel; level--) {
    const lo = out.pathLo[level - 1]!;
    let bits = (lo & X86Pte.ACCESSED) === 0 ? X86Pte.ACCESSED : 0;
    if (level === leafLevel && write && (lo & X86Pte.DIRTY) === 0) bits |= X86Pte.DIRTY;
    if (bits === 0) continue;
    const gpa = out.pathGpa[level - 1]!;
    if (!setBits(gpa, bits)) return fail(out, X86Fault.STAGE2, level, gpa);
    out.pathLo[level - 1] = (lo | bits) >>> 0;
  }
  return X86Fault.NONE;
}

/** A 64-bit entry from its words (for builders and tests; the walker never builds bigints). */
export function packX86Entry(lo: number, hi: number): bigint {
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
}

/** Stage-2 access to guest memory for tests and for simple hosts. */
export interface Stage2Access {
  readonly read: Stage2Read;
  /** For X86Stage1.accessedDirty. */
  readonly setBits: Stage2SetBits;
}

const wordViews = new WeakMap<SharedArrayBuffer, Int32Array>();

function atomicOr(memory: GuestMemory, address: number, bits: number): void {
  const { buffer, offset } = memory.locate(address, 4);
  let words = wordViews.get(buffer);
  if (words === undefined) {
    words = new Int32Array(buffer, 0, buffer.byteLength >>> 2);
    wordViews.set(buffer, words);
  }
  Atomics.or(words, offset >>> 2, bits);
}

/** Stage 2 as identity: GPA is the address in `memory`. Reads fail outside guest RAM. */
export function identityStage2(memory: GuestMemory): Stage2Access {
  return translatedStage2(memory, (gpa) => gpa);
}

/**
 * Stage 2 through a translation function: `translate(gpa)` gives the address in `memory` of
 * guest-physical byte `gpa`, or a negative number (or NaN) when stage 2 does not map it. Entries are
 * 8-byte aligned, so one never straddles two stage-2 pages.
 */
export function translatedStage2(memory: GuestMemory, translate: (gpa: number) => number): Stage2Access {
  return {
    read(gpa: number, out: Uint32Array): boolean {
      const address = translate(gpa);
      if (!(address >= 0) || !memory.contains(address, 8)) return false;
      out[0] = memory.readU32(address);
      out[1] = memory.readU32(address + 4);
      return true;
    },
    setBits(gpa: number, bits: number): boolean {
      const address = translate(gpa);
      if (!(address >= 0) || !memory.contains(address, 8) || address % 4 !== 0) return false;
      atomicOr(memory, address, bits);
      return true;
    },
  };
}
