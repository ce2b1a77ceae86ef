import type { GuestMemoryDescriptor } from '../memory/guest-memory.js';
import { EntryFlag, PAGE_SHIFT } from '../pagetable/format.js';
import { emptyLeafInfo, type LeafInfo, type TableReader } from '../pagetable/walk.js';
import { X86Fault, X86_READ, emptyX86WalkResult, walkX86, type X86FaultValue, type X86WalkResult } from '../pagetable/x86-64.js';
import type { Stage1View } from './stage1-record.js';

/**
 * Nested translation: the guest's x86-64 stage-1 table over a stage-2 IOAS, as a 2-D walk. Every
 * stage-1 entry is read at a guest-physical address that stage 2 translates first; the output
 * address goes through stage 2 too. The result is one combined translation (IOVA → guest memory),
 * as large as the smaller of the two leaves, with the permissions of both stages.
 *
 * Requests are user requests without execute unless asked (VT-d treats requests without PASID,
 * and PASID requests with the privilege bit clear, as user requests): a page is reachable only if
 * U/S is set at every stage-1 level. Accessed and dirty flags are not written (docs/nested.md).
 */

/**
 * Flag bits of a combined translation, beside EntryFlag.READ / WRITE in LeafInfo.flags (and in the
 * IOTLB). They never appear in a page table. READ, WRITE and EXEC are what both stages allow; the
 * S1_ bits what stage 1 alone allows, so a refused access can be blamed on the right stage.
 */
export const NestedFlag = {
  EXEC: 1 << 8,
  S1_READ: 1 << 9,
  S1_WRITE: 1 << 10,
  S1_EXEC: 1 << 11,
} as const;

/** Outcome of a nested walk. */
export const NestedResult = {
  OK: 0,
  /** Stage 1 has no translation: an entry not present, a reserved bit set, a non-canonical IOVA. */
  STAGE1: 1,
  /** Stage 2 does not map (or let stage 1 read) a stage-1 table page. */
  STAGE2: 2,
  /**
   * Stage 1 translated, stage 2 does not map the output page. leaf.flags holds the stage-1 rights
   * (NestedFlag.S1_*): stage 1 refusing the access is reported first, as hardware checks stage 1
   * before it translates the output address.
   */
  OUTPUT: 3,
} as const;
export type NestedResultValue = (typeof NestedResult)[keyof typeof NestedResult];

/** Stage-2 lookup of one page frame of the address space at `header`, filling `leaf` like walk(). */
export type Stage2Lookup = (header: number, pfn: number, leaf: LeafInfo) => boolean;

/**
 * Guest memory as aligned 32-bit words, read with Atomics: what a stage-1 walk needs, without the
 * allocations of GuestMemory.locate(). Built from a descriptor, so it works in any thread.
 */
export class GuestWords {
  private readonly bases: readonly number[];
  private readonly ends: readonly number[];
  private readonly views: readonly Int32Array[];

  constructor(descriptor: GuestMemoryDescriptor) {
    const regions = [...descriptor.regions].sort((a, b) => a.base - b.base);
    this.bases = regions.map((r) => r.base);
    this.ends = regions.map((r) => r.base + r.buffer.byteLength);
    this.views = regions.map((r) => new Int32Array(r.buffer, 0, r.buffer.byteLength >>> 2));
  }

  /** The 8-byte-aligned entry at guest address `address` into out[0] (low) and out[1]; false outside RAM. */
  read64(address: number, out: Uint32Array): boolean {
    if (address % 8 !== 0) return false;
    const bases = this.bases;
    for (let i = 0; i < bases.length; i++) {
      if (address >= bases[i]! && address + 8 <= this.ends[i]!) {
        const view = this.views[i]!;
        const w = (address - bases[i]!) / 4;
        out[0] = Atomics.load(view, w);
        out[1] = Atomics.load(view, w + 1);
        return true;
      }
    }
    return false;
  }
}

const PAGE = 2 ** PAGE_SHIFT;
/** Stage-1 outputs are 52-bit guest-physical addresses (VT-d first stage, MAXPHYADDR 52). */
const STAGE1_PHYS_BITS = 52;

/**
 * The 2-D walker, shared by the owner's reader (Context.translate) and device workers' Translator.
 * Allocation-free after construction; not reentrant (one per thread, or per translator).
 */
export class NestedWalker {
  /** The last walk: stage-1 details (fault code, level, entry GPA) for diagnostics. */
  readonly x86: X86WalkResult;
  /** Guest-physical address stage 2 failed on (after a STAGE2 result). */
  stage2FaultGpa: number;
  /** After an OK or OUTPUT walk: the guest-physical page stage 1 produced. */
  stage1Pfn: number;

  private readonly stage1: { root: number; levels: 4 | 5; physBits: number; nxe: boolean };
  private readonly s2leaf: LeafInfo;
  private readonly readStage2: (gpa: number, out: Uint32Array) => boolean;
  private stage2Header: number;

  constructor(
    private readonly memory: GuestWords,
    private readonly stage2: Stage2Lookup,
  ) {
    this.x86 = emptyX86WalkResult();
    this.stage2FaultGpa = 0;
    this.stage1Pfn = 0;
    this.stage1 = { root: 0, levels: 4, physBits: STAGE1_PHYS_BITS, nxe: true };
    this.s2leaf = emptyLeafInfo();
    this.stage2Header = 0;
    // One closure for the walker's table reads: stage 2 (read permission), then guest memory.
    this.readStage2 = (gpa, out) => {
      const pfn = Math.floor(gpa / PAGE);
      const leaf = this.s2leaf;
      if (!this.stage2(this.stage2Header, pfn, leaf) || (leaf.flags & EntryFlag.READ) === 0) {
        this.stage2FaultGpa = gpa;
        return false;
      }
      return this.memory.read64(leaf.guestPfn * PAGE + (gpa - pfn * PAGE), out);
    };
  }

  /** A walker whose stage-2 lookups are plain walks of the shared tables (no cache). */
  static direct(tables: TableReader, memory: GuestWords): NestedWalker {
    return new NestedWalker(memory, (header, pfn, leaf) => tables.walk(header, pfn, leaf));
  }

  /**
   * Translates IOVA page `iovaPfn` through `config`. On OK, `leaf` holds the combined translation
   * (flags: EntryFlag.READ / WRITE and NestedFlag bits, for a user request); the caller checks the
   * access against them. Never throws for any table contents.
   */
  walk(config: Stage1View, iovaPfn: number, leaf: LeafInfo): NestedResultValue {
    const s1 = this.stage1;
    s1.root = config.root;
    s1.levels = config.levels;
    this.stage2Header = config.stage2;
    const out = this.x86;
    // A supervisor read never fails the permission check: the leaf's effective rights come back
    // in `out` and are turned into flags below, so one cached translation serves every access.
    const code: X86FaultValue = walkX86(s1, iovaPfn, X86_READ, this.readStage2, out);
    if (code === X86Fault.STAGE2) return NestedResult.STAGE2;
    if (code !== X86Fault.NONE) return NestedResult.STAGE1;
    // The stage-1 output page: stage 2's input, which dirty tracking marks (the combined leaf only
    // keeps the final page).
    this.stage1Pfn = Math.floor(out.gpa / PAGE);
    const s1Read = out.user;
    const s1Write = out.user && out.writable;
    const s1Exec = out.user && out.executable;
    let flags = EntryFlag.PRESENT | EntryFlag.LEAF;
    if (s1Read) flags |= NestedFlag.S1_READ;
    if (s1Write) flags |= NestedFlag.S1_WRITE;
    if (s1Exec) flags |= NestedFlag.S1_EXEC;
    const s2 = this.s2leaf;
    if (!this.stage2(config.stage2, Math.floor(out.gpa / PAGE), s2)) {
      this.stage2FaultGpa = out.gpa;
      leaf.flags = flags;
      return NestedResult.OUTPUT;
    }
    const s2Read = (s2.flags & EntryFlag.READ) !== 0;
    const s2Write = (s2.flags & EntryFlag.WRITE) !== 0;
    if (s1Read && s2Read) flags |= EntryFlag.READ;
    if (s1Write && s2Write) flags |= EntryFlag.WRITE;
    if (s1Exec && s2Read) flags |= NestedFlag.EXEC;
    // The combined leaf is the smaller of the two; both are aligned in IOVA, GPA and guest memory.
    const shift = out.pageShift < s2.pageShift ? out.pageShift : s2.pageShift;
    const pages = 2 ** (shift - PAGE_SHIFT);
    const inLeaf = iovaPfn % pages;
    leaf.guestPfn = s2.guestPfn;
    leaf.leafPfn = iovaPfn - inLeaf;
    leaf.leafGuestPfn = s2.guestPfn - inLeaf;
    leaf.pageShift = shift;
    leaf.flags = flags;
    return NestedResult.OK;
  }
}

/**
 * The flag bits an access needs in a combined translation (read: READ, write: WRITE, fetch: EXEC)
 * and, when they are missing, whether stage 1 is to blame.
 */
export function nestedNeed(read: boolean, write: boolean, exec: boolean): number {
  return (read ? EntryFlag.READ : 0) | (write ? EntryFlag.WRITE : 0) | (exec ? NestedFlag.EXEC : 0);
}

/** True when stage 1 alone already refuses what `need` (from nestedNeed) asks for. */
export function stage1Refuses(flags: number, need: number): boolean {
  const s1 =
    ((need & EntryFlag.READ) !== 0 ? NestedFlag.S1_READ : 0) |
    ((need & EntryFlag.WRITE) !== 0 ? NestedFlag.S1_WRITE : 0) |
    ((need & NestedFlag.EXEC) !== 0 ? NestedFlag.S1_EXEC : 0);
  return (flags & s1) !== s1;
}
