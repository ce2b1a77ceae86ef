import { describe, expect, it } from 'vitest';
import { GuestMemory } from '../src/memory/index.js';
import {
  X86Fault,
  X86Pte,
  X86_PAGE_1G,
  X86_PAGE_2M,
  X86_PAGE_4K,
  X86_READ,
  X86_WRITE,
  emptyX86WalkResult,
  identityStage2,
  isCanonicalPfn,
  packX86Entry,
  translatedStage2,
  validateX86Stage1,
  walkX86,
  x86IovaPfn,
  type Stage2Read,
  type X86Access,
  type X86Stage1,
} from '../src/pagetable/x86-64.js';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import {
  X86BuilderError,
  X86PageTableBuilder,
  memoryEntryWriter,
  pagesFromAllocator,
  type X86Permissions,
} from '../guest-fixtures/pagetable/x86-64-builder.js';

const RWX: X86Permissions = { writable: true, user: true, executable: true };
const RO: X86Permissions = { writable: false, user: true, executable: true };
const USER_WRITE: X86Access = { write: true, user: true };
const USER_READ: X86Access = { write: false, user: true };
const FETCH: X86Access = { write: false, exec: true };

/** Guest RAM of 4 MiB with tables allocated from 1 MiB up; stage 2 is identity unless a test says otherwise. */
function setup(levels: 4 | 5 = 4, options: { physBits?: number; nxe?: boolean; presetAccessedDirty?: boolean } = {}) {
  const memory = GuestMemory.create(4 << 20);
  const allocator = new GuestAllocator(1 << 20, 3 << 20);
  const builder = new X86PageTableBuilder({ allocator: pagesFromAllocator(allocator), write: memoryEntryWriter(memory), levels, ...options });
  const s2 = identityStage2(memory);
  const stage1: X86Stage1 = { root: builder.root, levels, ...(options.physBits !== undefined ? { physBits: options.physBits } : {}), ...(options.nxe !== undefined ? { nxe: options.nxe } : {}) };
  const out = emptyX86WalkResult();
  const walk = (iova: number | bigint, access: X86Access = X86_READ, s1: X86Stage1 = stage1, read: Stage2Read = s2.read) =>
    walkX86(s1, x86IovaPfn(iova), access, read, out);
  /** ORs bits into the 64-bit entry at a GPA (identity stage 2). */
  const setBits = (gpa: number, bits: bigint) => memory.writeU64(gpa, memory.readU64(gpa) | bits);
  const clearBits = (gpa: number, bits: bigint) => memory.writeU64(gpa, memory.readU64(gpa) & ~bits);
  const entryAt = (iova: number | bigint, level: number) => {
    const e = builder.lookup(iova).find((x) => x.level === level);
    if (e === undefined) throw new Error(`no entry at level ${level}`);
    return e.entryGpa;
  };
  return { memory, allocator, builder, s2, stage1, out, walk, setBits, clearBits, entryAt };
}

describe('x86-64 stage-1 format', () => {
  it('keeps the SDM bit positions', () => {
    expect(X86Pte.PRESENT).toBe(1);
    expect(X86Pte.WRITABLE).toBe(2);
    expect(X86Pte.USER).toBe(4);
    expect(X86Pte.ACCESSED).toBe(0x20);
    expect(X86Pte.DIRTY).toBe(0x40);
    expect(X86Pte.PAGE_SIZE).toBe(0x80);
    expect(X86Pte.GLOBAL).toBe(0x100);
    expect(packX86Entry(0, X86Pte.XD_HI)).toBe(1n << 63n);
    expect(packX86Entry(X86Pte.ADDRESS_LO, X86Pte.ADDRESS_HI)).toBe(((1n << 52n) - 1n) & ~0xfffn);
    // The reserved field of a large leaf is the address bits below the page size, minus PAT (bit 12).
    expect(X86Pte.RESERVED_2M).toBe((X86_PAGE_2M - 1) & ~0x1fff);
    expect(X86Pte.RESERVED_1G).toBe((X86_PAGE_1G - 1) & ~0x1fff);
  });

  it('checks canonical addresses for 48- and 57-bit inputs', () => {
    const pfn = (v: bigint) => x86IovaPfn(v);
    expect(isCanonicalPfn(pfn(0x0000_7fff_ffff_f000n), 4)).toBe(true);
    expect(isCanonicalPfn(pfn(0x0000_8000_0000_0000n), 4)).toBe(false);
    expect(isCanonicalPfn(pfn(0xffff_7fff_ffff_f000n), 4)).toBe(false);
    expect(isCanonicalPfn(pfn(0xffff_8000_0000_0000n), 4)).toBe(true);
    expect(isCanonicalPfn(pfn(0xffff_ffff_ffff_f000n), 4)).toBe(true);
    expect(isCanonicalPfn(pfn(0x0000_8000_0000_0000n), 5)).toBe(true);
    expect(isCanonicalPfn(pfn(0x00ff_ffff_ffff_f000n), 5)).toBe(true);
    expect(isCanonicalPfn(pfn(0x0100_0000_0000_0000n), 5)).toBe(false);
    expect(isCanonicalPfn(pfn(0xfe00_0000_0000_0000n), 5)).toBe(false);
    expect(isCanonicalPfn(pfn(0xff00_0000_0000_0000n), 5)).toBe(true);
    expect(isCanonicalPfn(pfn(0xff80_0000_0000_0000n), 5)).toBe(true);
    expect(isCanonicalPfn(2 ** 52, 4)).toBe(false);
    expect(isCanonicalPfn(-1, 4)).toBe(false);
    expect(isCanonicalPfn(0.5, 4)).toBe(false);
    expect(() => x86IovaPfn(1n << 64n)).toThrow(RangeError);
    expect(() => x86IovaPfn(-1)).toThrow(RangeError);
    expect(x86IovaPfn(0x1fff)).toBe(1);
  });

  it('validates stage-1 descriptions', () => {
    expect(() => validateX86Stage1({ root: 0x1000, levels: 4 })).not.toThrow();
    expect(() => validateX86Stage1({ root: 0x1000, levels: 3 as 4 })).toThrow(/4 or 5/);
    expect(() => validateX86Stage1({ root: 0x1000, levels: 4, physBits: 53 })).toThrow(/32\.\.52/);
    expect(() => validateX86Stage1({ root: 2 ** 40, levels: 4, physBits: 40 })).toThrow(/below 2\^40/);
  });
});

describe('walkX86: leaves', () => {
  it('translates a 4 KiB leaf with four reads', () => {
    const t = setup();
    t.builder.map(0x1234_5000, 0x8_7654_3000, X86_PAGE_4K, RWX);
    expect(t.walk(0x1234_5fff, X86_WRITE)).toBe(X86Fault.NONE);
    expect(t.out).toMatchObject({ gpa: 0x8_7654_3000, leafGpa: 0x8_7654_3000, leafPfn: 0x12345, pageShift: 12, pageSize: X86_PAGE_4K });
    expect(t.out).toMatchObject({ writable: true, user: true, executable: true, reads: 4, fault: X86Fault.NONE });
    // PAT (bit 7) is a 4 KiB leaf's own bit, not PS.
    t.setBits(t.entryAt(0x1234_5000, 1), 0x80n);
    expect(t.walk(0x1234_5000)).toBe(X86Fault.NONE);
    expect(t.out.gpa).toBe(0x8_7654_3000);
  });

  it('translates a 2 MiB leaf with three reads, ignoring PAT in bit 12', () => {
    const t = setup();
    t.builder.map(0x4020_0000, 0x1_0060_0000, X86_PAGE_2M, RWX);
    expect(t.walk(0x4020_0000 + 0x5_3000)).toBe(X86Fault.NONE);
    expect(t.out).toMatchObject({ gpa: 0x1_0065_3000, leafGpa: 0x1_0060_0000, leafPfn: 0x40200, pageShift: 21, pageSize: X86_PAGE_2M, reads: 3 });
    t.setBits(t.entryAt(0x4020_0000, 2), BigInt(X86Pte.PAT_LARGE));
    expect(t.walk(0x4020_0000 + 0x5_3000)).toBe(X86Fault.NONE);
    expect(t.out.leafGpa).toBe(0x1_0060_0000);
  });

  it('translates a 1 GiB leaf with two reads', () => {
    const t = setup();
    t.builder.map(0x7f_c000_0000, 0xf_4000_0000, X86_PAGE_1G, RWX);
    expect(t.walk(0x7f_c000_0000 + 0x1234_5678)).toBe(X86Fault.NONE);
    expect(t.out).toMatchObject({ gpa: 0xf_5234_5000, leafGpa: 0xf_4000_0000, pageShift: 30, pageSize: X86_PAGE_1G, reads: 2 });
  });

  it('translates canonical high-half addresses', () => {
    const t = setup();
    t.builder.map(0xffff_8000_0000_0000n, 0x20_0000, X86_PAGE_2M, RWX);
    t.builder.map(0xffff_ffff_ffff_f000n, 0x3000, X86_PAGE_4K, RWX);
    expect(t.walk(0xffff_8000_001f_f000n)).toBe(X86Fault.NONE);
    expect(t.out.gpa).toBe(0x3f_f000);
    expect(t.walk(0xffff_ffff_ffff_f000n)).toBe(X86Fault.NONE);
    expect(t.out.gpa).toBe(0x3000);
    // The low-half twin of the same table indices is a different address.
    expect(t.walk(0x0000_7fff_ffff_f000n)).toBe(X86Fault.NOT_PRESENT);
  });

  it('masks the root pointer to 4 KiB and takes GPAs up to 2^52', () => {
    const t = setup();
    t.builder.map(0x5000, 2 ** 52 - X86_PAGE_4K, X86_PAGE_4K, RWX);
    expect(t.walk(0x5000, X86_READ, { root: t.builder.root + 0x18, levels: 4 })).toBe(X86Fault.NONE);
    expect(t.out.gpa).toBe(2 ** 52 - X86_PAGE_4K);
  });
});

describe('walkX86: faults', () => {
  it('reports NON_CANONICAL before reading anything', () => {
    const t = setup();
    let reads = 0;
    const counting: Stage2Read = (gpa, out) => (reads++, t.s2.read(gpa, out));
    expect(t.walk(0x0000_8000_0000_0000n, X86_READ, t.stage1, counting)).toBe(X86Fault.NON_CANONICAL);
    expect(t.walk(0xfff0_0000_0000_0000n, X86_READ, t.stage1, counting)).toBe(X86Fault.NON_CANONICAL);
    expect(walkX86(t.stage1, 2 ** 52, X86_READ, counting, t.out)).toBe(X86Fault.NON_CANONICAL);
    expect(reads).toBe(0);
    expect(t.out).toMatchObject({ fault: X86Fault.NON_CANONICAL, faultLevel: 0, reads: 0 });
  });

  it('reports NOT_PRESENT at the level of the first empty entry', () => {
    const t = setup();
    expect(t.walk(0x1000)).toBe(X86Fault.NOT_PRESENT);
    expect(t.out).toMatchObject({ faultLevel: 4, faultGpa: t.builder.root, reads: 1 });
    t.builder.map(0x20_0000, 0x1000, X86_PAGE_4K, RWX);
    expect(t.walk(0x20_1000)).toBe(X86Fault.NOT_PRESENT);
    expect(t.out).toMatchObject({ faultLevel: 1, faultGpa: t.entryAt(0x20_0000, 1) + 8 });
    expect(t.walk(0x40_0000)).toBe(X86Fault.NOT_PRESENT);
    expect(t.out.faultLevel).toBe(2);
    expect(t.walk(0x4000_0000)).toBe(X86Fault.NOT_PRESENT);
    expect(t.out.faultLevel).toBe(3);
    // Reserved bits of a not-present entry are ignored: P wins.
    t.memory.writeU64(t.entryAt(0x20_0000, 1) + 8, 0xfff0_0000_0000_0080n);
    expect(t.walk(0x20_1000)).toBe(X86Fault.NOT_PRESENT);
  });

  it('reports RESERVED_BIT for PS at level 4 and level 5', () => {
    for (const levels of [4, 5] as const) {
      const t = setup(levels);
      t.builder.map(0x1000, 0x1000, X86_PAGE_4K, RWX);
      t.setBits(t.entryAt(0x1000, levels), 0x80n);
      expect(t.walk(0x1000)).toBe(X86Fault.RESERVED_BIT);
      expect(t.out).toMatchObject({ faultLevel: levels, faultGpa: t.builder.root });
    }
  });

  it('reports RESERVED_BIT for misaligned large-leaf frames (bits 13..20 / 13..29), not for PAT', () => {
    const t = setup();
    t.builder.map(0x20_0000, 0x40_0000, X86_PAGE_2M, RWX);
    t.builder.map(0x4000_0000, 0x8000_0000, X86_PAGE_1G, RWX);
    const pd = t.entryAt(0x20_0000, 2);
    const pdpt = t.entryAt(0x4000_0000, 3);
    for (let bit = 12; bit < 32; bit++) {
      for (const [gpa, iova, top, level] of [
        [pd, 0x20_0000, 21, 2],
        [pdpt, 0x4000_0000, 30, 3],
      ] as const) {
        const before = t.memory.readU64(gpa);
        t.setBits(gpa, 1n << BigInt(bit));
        const expected = bit >= 13 && bit < top ? X86Fault.RESERVED_BIT : X86Fault.NONE;
        expect(t.walk(iova), `bit ${bit} at level ${level}`).toBe(expected);
        if (expected === X86Fault.RESERVED_BIT) expect(t.out.faultLevel).toBe(level);
        t.memory.writeU64(gpa, before);
      }
    }
  });

  it('reserves address bits at and above the physical-address width; ignores bits 52..62', () => {
    const t = setup(4, { physBits: 40 });
    t.builder.map(0x1000, 0x1000, X86_PAGE_4K, RWX);
    for (const level of [4, 3, 2, 1]) {
      const gpa = t.entryAt(0x1000, level);
      const before = t.memory.readU64(gpa);
      for (let bit = 40; bit < 63; bit++) {
        t.memory.writeU64(gpa, before | (1n << BigInt(bit)));
        const expected = bit < 52 ? X86Fault.RESERVED_BIT : X86Fault.NONE;
        expect(t.walk(0x1000), `bit ${bit} at level ${level}`).toBe(expected);
        if (expected !== X86Fault.NONE) expect(t.out.faultLevel).toBe(level);
      }
      t.memory.writeU64(gpa, before);
    }
    // With the full 52-bit width, bit 51 is an address bit.
    const wide = { root: t.builder.root, levels: 4 } as const;
    t.setBits(t.entryAt(0x1000, 1), 1n << 51n);
    expect(t.walk(0x1000, X86_READ, wide)).toBe(X86Fault.NONE);
    expect(t.out.gpa).toBe(2 ** 51 + 0x1000);
  });

  it('treats XD as reserved when NXE is off', () => {
    const t = setup(4, { nxe: false });
    t.builder.map(0x1000, 0x1000, X86_PAGE_4K, { writable: true, user: true, executable: false });
    // The builder never writes XD without NXE; set it by hand.
    expect(t.walk(0x1000, FETCH)).toBe(X86Fault.NONE);
    t.setBits(t.entryAt(0x1000, 2), 1n << 63n);
    expect(t.walk(0x1000)).toBe(X86Fault.RESERVED_BIT);
    expect(t.out.faultLevel).toBe(2);
  });

  it('ANDs R/W along the walk: a read-only table entry makes every page below it read-only', () => {
    const t = setup();
    t.builder.map(0x1000, 0x1000, X86_PAGE_4K, RWX);
    expect(t.walk(0x1000, X86_WRITE)).toBe(X86Fault.NONE);
    for (const level of [4, 3, 2, 1]) {
      const gpa = t.entryAt(0x1000, level);
      t.clearBits(gpa, 2n);
      expect(t.walk(0x1000, X86_READ)).toBe(X86Fault.NONE);
      expect(t.out.writable).toBe(false);
      expect(t.walk(0x1000, X86_WRITE)).toBe(X86Fault.PERMISSION);
      expect(t.out).toMatchObject({ faultLevel: 1, faultGpa: t.entryAt(0x1000, 1), gpa: 0x1000, writable: false });
      t.setBits(gpa, 2n);
    }
  });

  it('ANDs U/S along the walk for user requests; supervisor requests pass', () => {
    const t = setup();
    t.builder.map(0x20_0000, 0x20_0000, X86_PAGE_2M, RWX);
    for (const level of [4, 3, 2]) {
      const gpa = t.entryAt(0x20_0000, level);
      t.clearBits(gpa, 4n);
      expect(t.walk(0x20_0000, USER_READ)).toBe(X86Fault.PERMISSION);
      expect(t.out).toMatchObject({ faultLevel: 2, user: false });
      expect(t.walk(0x20_0000, USER_WRITE)).toBe(X86Fault.PERMISSION);
      expect(t.walk(0x20_0000, X86_WRITE)).toBe(X86Fault.NONE);
      t.setBits(gpa, 4n);
    }
    expect(t.walk(0x20_0000, USER_WRITE)).toBe(X86Fault.NONE);
  });

  it('denies fetches when any entry on the path has XD', () => {
    const t = setup();
    t.builder.map(0x4000_0000, 0x4000_0000, X86_PAGE_1G, RWX);
    expect(t.walk(0x4000_0000, FETCH)).toBe(X86Fault.NONE);
    expect(t.out.executable).toBe(true);
    for (const level of [4, 3]) {
      const gpa = t.entryAt(0x4000_0000, level);
      t.setBits(gpa, 1n << 63n);
      expect(t.walk(0x4000_0000, FETCH)).toBe(X86Fault.PERMISSION);
      expect(t.out).toMatchObject({ faultLevel: 3, executable: false });
      expect(t.walk(0x4000_0000, X86_WRITE)).toBe(X86Fault.NONE);
      t.clearBits(gpa, 1n << 63n);
    }
  });

  it('reports STAGE2 when a table read does not translate, with the entry GPA', () => {
    const t = setup();
    t.builder.map(0x1000, 0x1000, X86_PAGE_4K, RWX);
    const pdEntry = t.entryAt(0x1000, 2);
    const pdPage = pdEntry - (pdEntry % X86_PAGE_4K);
    const holed = translatedStage2(t.memory, (gpa) => (gpa >= pdPage && gpa < pdPage + X86_PAGE_4K ? -1 : gpa));
    expect(t.walk(0x1000, X86_READ, t.stage1, holed.read)).toBe(X86Fault.STAGE2);
    expect(t.out).toMatchObject({ faultLevel: 2, faultGpa: pdEntry, reads: 3 });
    // A root outside guest RAM faults at the top level.
    expect(t.walk(0x1000, X86_READ, { root: 64 << 20, levels: 4 })).toBe(X86Fault.STAGE2);
    expect(t.out.faultLevel).toBe(4);
  });

  it('walks tables that stage 2 places anywhere in memory', () => {
    // The guest sees its tables at GPA g; stage 2 puts page g at memory page (g + 7 pages) mod 1024.
    const memory = GuestMemory.create(4 << 20);
    const pages = 1024;
    const s2 = (gpa: number) => {
      const page = Math.floor(gpa / X86_PAGE_4K);
      if (page >= pages) return -1;
      return ((page + 7) % pages) * X86_PAGE_4K + (gpa % X86_PAGE_4K);
    };
    const allocator = new GuestAllocator(0x10_0000, 0x10_0000);
    const builder = new X86PageTableBuilder({
      allocator: pagesFromAllocator(allocator),
      write: (gpa, value) => memory.writeU64(s2(gpa), value),
    });
    builder.map(0xdead_b000, 0xbeef_0000, X86_PAGE_4K, RO);
    const out = emptyX86WalkResult();
    const stage1 = { root: builder.root, levels: 4 } as const;
    expect(walkX86(stage1, x86IovaPfn(0xdead_b000), X86_READ, translatedStage2(memory, s2).read, out)).toBe(X86Fault.NONE);
    expect(out.gpa).toBe(0xbeef_0000);
    expect(out.writable).toBe(false);
    // Read directly (stage 2 as identity) the same GPAs hold nothing.
    expect(walkX86(stage1, x86IovaPfn(0xdead_b000), X86_READ, identityStage2(memory).read, out)).toBe(X86Fault.NOT_PRESENT);
  });
});

describe('walkX86: 5-level paging', () => {
  it('uses a PML5 for 57-bit inputs', () => {
    const t = setup(5);
    t.builder.map(0x00ab_cdef_0123_4000n, 0x5000, X86_PAGE_4K, RWX);
    t.builder.map(0xff80_0000_0000_0000n, 0x4000_0000, X86_PAGE_1G, RWX);
    expect(t.walk(0x00ab_cdef_0123_4000n)).toBe(X86Fault.NONE);
    expect(t.out).toMatchObject({ gpa: 0x5000, reads: 5 });
    expect(t.walk(0xff80_0000_3000_0000n)).toBe(X86Fault.NONE);
    expect(t.out).toMatchObject({ gpa: 0x7000_0000, reads: 3, pageSize: X86_PAGE_1G });
    expect(t.walk(0x0100_0000_0000_0000n)).toBe(X86Fault.NON_CANONICAL);
    // The same table read as 4-level sees a different address space.
    expect(t.walk(0x00ab_cdef_0123_4000n, X86_READ, { root: t.builder.root, levels: 4 })).toBe(X86Fault.NON_CANONICAL);
  });
});

describe('walkX86: accessed and dirty flags', () => {
  it('leaves tables untouched by default', () => {
    const t = setup();
    t.builder.map(0x1000, 0x1000, X86_PAGE_4K, RWX);
    const before = t.builder.lookup(0x1000).map((e) => t.memory.readU64(e.entryGpa));
    expect(t.walk(0x1000, X86_WRITE)).toBe(X86Fault.NONE);
    expect(t.builder.lookup(0x1000).map((e) => t.memory.readU64(e.entryGpa))).toEqual(before);
  });

  it('sets A on the path on success, D on the leaf for writes, only where clear', () => {
    const t = setup();
    t.builder.map(0x20_0000, 0x20_0000, X86_PAGE_2M, RWX);
    t.builder.map(0x40_0000, 0x40_0000, X86_PAGE_2M, RO);
    const calls: [number, number][] = [];
    const stage1: X86Stage1 = { ...t.stage1, accessedDirty: (gpa, bits) => (calls.push([gpa, bits]), t.s2.setBits(gpa, bits)) };
    const flags = (iova: number) => t.builder.lookup(iova).map((e) => Number(t.memory.readU64(e.entryGpa) & 0x60n));

    expect(t.walk(0x20_0000, X86_READ, stage1)).toBe(X86Fault.NONE);
    expect(flags(0x20_0000)).toEqual([0x20, 0x20, 0x20]);
    expect(calls.length).toBe(3);
    expect(t.walk(0x20_0000, X86_WRITE, stage1)).toBe(X86Fault.NONE);
    expect(flags(0x20_0000)).toEqual([0x20, 0x20, 0x60]);
    expect(calls.length).toBe(4);
    expect(calls[3]).toEqual([t.entryAt(0x20_0000, 2), X86Pte.DIRTY]);
    expect(t.walk(0x20_0000, X86_WRITE, stage1)).toBe(X86Fault.NONE);
    expect(calls.length).toBe(4);

    // A permission fault sets nothing (the leaf at 4 MiB is read-only; its PML4E and PDPTE already have A).
    expect(t.walk(0x40_0000, X86_WRITE, stage1)).toBe(X86Fault.PERMISSION);
    expect(flags(0x40_0000)).toEqual([0x20, 0x20, 0]);
    expect(calls.length).toBe(4);
    // The returned entry words record what was set.
    expect(t.walk(0x40_0000, X86_READ, stage1)).toBe(X86Fault.NONE);
    expect(t.out.pathLo[1]! & X86Pte.ACCESSED).toBe(X86Pte.ACCESSED);
  });

  it('faults STAGE2 when stage 2 refuses the update', () => {
    const t = setup();
    t.builder.map(0x1000, 0x1000, X86_PAGE_4K, RWX);
    const pt = t.entryAt(0x1000, 1);
    const stage1: X86Stage1 = { ...t.stage1, accessedDirty: (gpa, bits) => gpa !== pt && t.s2.setBits(gpa, bits) };
    expect(t.walk(0x1000, X86_WRITE, stage1)).toBe(X86Fault.STAGE2);
    expect(t.out).toMatchObject({ faultLevel: 1, faultGpa: pt });
  });

  it('skips hardware updates when the builder presets A and D', () => {
    const t = setup(4, { presetAccessedDirty: true });
    t.builder.map(0x1000, 0x1000, X86_PAGE_4K, RWX);
    let calls = 0;
    const stage1: X86Stage1 = { ...t.stage1, accessedDirty: () => (calls++, true) };
    expect(t.walk(0x1000, X86_WRITE, stage1)).toBe(X86Fault.NONE);
    expect(calls).toBe(0);
  });
});

describe('X86PageTableBuilder', () => {
  it('zeroes table pages it gets from the allocator', () => {
    const memory = GuestMemory.create(1 << 20);
    memory.fill(0, 1 << 20, 0xff);
    const allocator = new GuestAllocator(0, 1 << 20);
    const builder = new X86PageTableBuilder({ allocator: pagesFromAllocator(allocator), write: memoryEntryWriter(memory) });
    builder.map(0x1000, 0x1000, X86_PAGE_4K, RWX);
    const out = emptyX86WalkResult();
    expect(walkX86({ root: builder.root, levels: 4 }, 1, X86_READ, identityStage2(memory).read, out)).toBe(X86Fault.NONE);
    expect(walkX86({ root: builder.root, levels: 4 }, 2, X86_READ, identityStage2(memory).read, out)).toBe(X86Fault.NOT_PRESENT);
    expect(builder.tableCount).toBe(4);
  });

  it('refuses overlapping maps and leaves the table unchanged', () => {
    const t = setup();
    t.builder.map(0x20_0000, 0x20_0000, X86_PAGE_2M, RWX);
    t.builder.map(0x4000_0000, 0x4000_0000, X86_PAGE_1G, RWX);
    t.builder.map(0x8000_1000, 0x1000, X86_PAGE_4K, RWX);
    const snapshot = () => ({ entries: t.builder.entries(), tables: t.builder.tableCount, free: t.allocator.available });
    const before = snapshot();
    const refuse = (fn: () => unknown) => {
      expect(fn).toThrow(X86BuilderError);
      try {
        fn();
      } catch (e) {
        expect((e as X86BuilderError).reason).toBe('overlap');
      }
      expect(snapshot()).toEqual(before);
    };
    refuse(() => t.builder.map(0x20_0000, 0x60_0000, X86_PAGE_2M, RWX)); // same 2 MiB
    refuse(() => t.builder.map(0x2f_f000, 0x9000, X86_PAGE_4K, RWX)); // 4 KiB inside the 2 MiB
    refuse(() => t.builder.map(0x0, 0x0, X86_PAGE_1G, RWX)); // 1 GiB over a table holding the 2 MiB
    refuse(() => t.builder.map(0x5fe0_0000, 0x0, X86_PAGE_2M, RWX)); // 2 MiB inside the 1 GiB
    refuse(() => t.builder.map(0x8000_0000, 0x0, X86_PAGE_2M, RWX)); // 2 MiB over the table holding the 4 KiB
    refuse(() => t.builder.map(0x8000_1000, 0x0, X86_PAGE_4K, RWX)); // the same 4 KiB
    expect(() => t.builder.map(0x8000_1000, 0x0, X86_PAGE_4K, RWX)).toThrow(/overlaps/);
  });

  it('refuses misaligned, non-canonical and out-of-range maps', () => {
    const t = setup(4, { physBits: 40 });
    const reason = (fn: () => unknown) => {
      try {
        fn();
      } catch (e) {
        return (e as X86BuilderError).reason;
      }
      return 'none';
    };
    expect(reason(() => t.builder.map(0x1800, 0x1000, X86_PAGE_4K, RWX))).toBe('alignment');
    expect(reason(() => t.builder.map(0x1000, 0x1800, X86_PAGE_4K, RWX))).toBe('alignment');
    expect(reason(() => t.builder.map(0x10_0000, 0x20_0000, X86_PAGE_2M, RWX))).toBe('alignment');
    expect(reason(() => t.builder.map(0x20_0000, 0x1000, X86_PAGE_2M, RWX))).toBe('alignment');
    expect(reason(() => t.builder.map(0x1000, 0x1000, 0x8000 as typeof X86_PAGE_4K, RWX))).toBe('alignment');
    expect(reason(() => t.builder.map(0x8000_0000_0000n, 0x1000, X86_PAGE_4K, RWX))).toBe('range');
    expect(reason(() => t.builder.map(0x1000, 2 ** 40, X86_PAGE_4K, RWX))).toBe('range');
    expect(t.builder.tableCount).toBe(1);
  });

  it('reports the IOVA ranges each change affects', () => {
    const t = setup();
    expect(t.builder.map(0xffff_ffff_fff0_0000n, 0x1000, X86_PAGE_4K, RWX)).toEqual([{ iova: 0xffff_ffff_fff0_0000n, size: 0x1000n }]);
    t.builder.map(0x20_0000, 0x20_0000, X86_PAGE_2M, RWX);
    t.builder.map(0x40_0000, 0x0, X86_PAGE_4K, RWX);
    t.builder.map(0x40_2000, 0x0, X86_PAGE_4K, RWX);
    expect(t.builder.protect(0x0, 0x80_0000, RO)).toEqual([
      { iova: 0x20_0000n, size: 0x20_1000n },
      { iova: 0x40_2000n, size: 0x1000n },
    ]);
    expect(t.walk(0x40_2000, X86_WRITE)).toBe(X86Fault.PERMISSION);
    expect(t.walk(0x20_0000, X86_READ)).toBe(X86Fault.NONE);
    expect(t.builder.unmap(0x40_0000, 0x1000)).toEqual([{ iova: 0x40_0000n, size: 0x1000n }]);
    expect(t.builder.unmap(0x40_0000, 0x1000)).toEqual([]);
    expect(t.builder.protect(0xffff_ffff_fff0_0000n, 0x10_0000, { writable: false, user: false, executable: false })).toEqual([
      { iova: 0xffff_ffff_fff0_0000n, size: 0x1000n },
    ]);
    expect(t.walk(0xffff_ffff_fff0_0000n, FETCH)).toBe(X86Fault.PERMISSION);
    expect(t.builder.leaves().map((l) => [l.iova, l.size, l.permissions.writable])).toEqual([
      [0x20_0000n, X86_PAGE_2M, false],
      [0x40_2000n, X86_PAGE_4K, false],
      [0xffff_ffff_fff0_0000n, X86_PAGE_4K, false],
    ]);
  });

  it('refuses to cut a leaf and changes nothing', () => {
    const t = setup();
    t.builder.map(0x20_0000, 0x20_0000, X86_PAGE_2M, RWX);
    t.builder.map(0x40_0000, 0x40_0000, X86_PAGE_4K, RWX);
    const before = t.builder.entries();
    expect(() => t.builder.unmap(0x21_0000, 0x1000)).toThrow(/cuts the 2 MiB mapping/);
    expect(() => t.builder.unmap(0x30_0000, 0x10_1000)).toThrow(X86BuilderError);
    expect(() => t.builder.protect(0x20_0000, 0x10_0000, RO)).toThrow(X86BuilderError);
    expect(() => t.builder.unmap(0x20_0000, 0x800)).toThrow(/4 KiB pages/);
    expect(() => t.builder.unmap(0x7fff_ffff_f000, 0x2000)).toThrow(/canonical half/);
    expect(t.builder.entries()).toEqual(before);
  });

  it('unlinks and frees tables that unmap leaves empty', () => {
    const t = setup();
    const free = t.allocator.available;
    t.builder.map(0x1000, 0x1000, X86_PAGE_4K, RWX);
    t.builder.map(0x2000, 0x2000, X86_PAGE_4K, RWX);
    t.builder.map(0x7f_0000_0000, 0x0, X86_PAGE_1G, RWX);
    // One PML4E covers all three: root, PDPT, PD, PT.
    expect(t.builder.tableCount).toBe(4);
    expect(t.builder.unmap(0x1000, 0x1000)).toEqual([{ iova: 0x1000n, size: 0x1000n }]);
    expect(t.builder.tableCount).toBe(4);
    expect(t.builder.unmap(0x0, 0x80_0000_0000)).toEqual([
      { iova: 0x2000n, size: 0x1000n },
      { iova: 0x7f_0000_0000n, size: 0x4000_0000n },
    ]);
    expect(t.builder.tableCount).toBe(1);
    expect(t.allocator.available).toBe(free);
    expect(t.walk(0x2000)).toBe(X86Fault.NOT_PRESENT);
    expect(t.out.faultLevel).toBe(4);
    // A 1 GiB leaf fits where the emptied tables were.
    t.builder.map(0x0, 0x4000_0000, X86_PAGE_1G, RWX);
    expect(t.walk(0x2000)).toBe(X86Fault.NONE);
    expect(t.out.gpa).toBe(0x4000_2000);
  });

  it('builds 5-level tables', () => {
    const t = setup(5);
    t.builder.map(0x0080_0000_0000_0000n, 0x1000, X86_PAGE_4K, RWX);
    expect(t.builder.lookup(0x0080_0000_0000_0000n).map((e) => e.level)).toEqual([5, 4, 3, 2, 1]);
    expect(() => t.builder.map(0x0100_0000_0000_0000n, 0x1000, X86_PAGE_4K, RWX)).toThrow(/not canonical for 5-level/);
    expect(t.builder.unmap(0x0080_0000_0000_0000n, 0x1000)).toEqual([{ iova: 0x0080_0000_0000_0000n, size: 0x1000n }]);
    expect(t.builder.tableCount).toBe(1);
  });
});
