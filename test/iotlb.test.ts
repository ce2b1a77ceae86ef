import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { Iotlb } from '../src/ioasid/iotlb.js';
import { EntryFlag, HeaderSlot, IoPageTable, LEVEL_PAGES, TablePool, TableReader, emptyLeafInfo, walk, type LeafInfo } from '../src/pagetable/index.js';
import { fuzzParams } from './support/fuzz.js';

const RW = EntryFlag.READ | EntryFlag.WRITE;
const PAGES_2M = LEVEL_PAGES[1]!;
const PAGES_1G = LEVEL_PAGES[2]!;

function space(pool: TablePool, id: number): IoPageTable {
  expect(pool.ensure(IoPageTable.CREATE_TABLES)).toBe(true);
  return new IoPageTable(pool, id);
}

function map(pool: TablePool, t: IoPageTable, pfn: number, pages: number, guest: number, perms = RW, huge = true): void {
  expect(pool.ensure(t.tablesForMap(pfn, pages, guest, huge))).toBe(true);
  t.map(pfn, pages, guest, perms, huge);
}

/** Lookup through the IOTLB, walking and filling on a miss, as the translator does. */
function cached(tlb: Iotlb, words: Int32Array, header: number, pfn: number, out: LeafInfo): boolean {
  if (tlb.lookup(header, pfn, out)) return true;
  const generation = Atomics.load(words, header + HeaderSlot.GENERATION);
  if (!walk(words, header, pfn, out)) return false;
  tlb.insert(header, generation, out);
  return true;
}

describe('IOTLB lookups', () => {
  it('misses when empty, hits after a fill with the guest frame and flags of the walk', () => {
    const pool = new TablePool();
    const t = space(pool, 1);
    map(pool, t, 0x1234, 4, 0x777, EntryFlag.READ);
    const tlb = new Iotlb();
    const out = emptyLeafInfo();
    expect(tlb.lookup(t.header, 0x1235, out)).toBe(false);
    expect(cached(tlb, pool.words, t.header, 0x1235, out)).toBe(true);
    expect(tlb.lookup(t.header, 0x1235, out)).toBe(true);
    expect(out.guestPfn).toBe(0x778);
    expect(out.pageShift).toBe(12);
    expect(out.flags & RW).toBe(EntryFlag.READ);
    // The neighbouring page was never filled.
    expect(tlb.lookup(t.header, 0x1236, out)).toBe(false);
    expect(tlb.stats()).toMatchObject({ hits: 1, misses: 3, fills: 1 });
  });

  it('serves every 4 KiB page of a 2 MiB and of a 1 GiB leaf from one entry', () => {
    const pool = new TablePool();
    const t = space(pool, 1);
    map(pool, t, 5 * PAGES_2M, PAGES_2M, 9 * PAGES_2M);
    map(pool, t, 3 * PAGES_1G, PAGES_1G, PAGES_1G);
    const tlb = new Iotlb();
    const out = emptyLeafInfo();
    expect(cached(tlb, pool.words, t.header, 5 * PAGES_2M + 3, out)).toBe(true);
    expect(cached(tlb, pool.words, t.header, 3 * PAGES_1G + 77, out)).toBe(true);
    expect(tlb.stats().fills).toBe(2);
    for (const page of [0, 1, 255, 511]) {
      expect(tlb.lookup(t.header, 5 * PAGES_2M + page, out)).toBe(true);
      expect(out.guestPfn).toBe(9 * PAGES_2M + page);
      expect(out.pageShift).toBe(21);
      expect(out.leafPfn).toBe(5 * PAGES_2M);
    }
    for (const page of [0, 511, 512, PAGES_1G - 1]) {
      expect(tlb.lookup(t.header, 3 * PAGES_1G + page, out)).toBe(true);
      expect(out.guestPfn).toBe(PAGES_1G + page);
      expect(out.pageShift).toBe(30);
    }
    expect(tlb.lookup(t.header, 6 * PAGES_2M, out)).toBe(false);
    expect(tlb.lookup(t.header, 4 * PAGES_1G, out)).toBe(false);
    expect(tlb.size).toBe(2);
  });

  it('keeps address spaces apart: the same IOVA in two spaces', () => {
    const pool = new TablePool();
    const a = space(pool, 1);
    const b = space(pool, 2);
    map(pool, a, 100, 1, 1000);
    map(pool, b, 100, 1, 2000);
    const tlb = new Iotlb();
    const out = emptyLeafInfo();
    cached(tlb, pool.words, a.header, 100, out);
    expect(tlb.lookup(b.header, 100, out)).toBe(false);
    cached(tlb, pool.words, b.header, 100, out);
    expect(tlb.lookup(a.header, 100, out) && out.guestPfn).toBe(1000);
    expect(tlb.lookup(b.header, 100, out) && out.guestPfn).toBe(2000);
  });

  it('handles IOVA frames beyond 2^32 and 2^48 exactly', () => {
    const pool = new TablePool();
    const t = space(pool, 1);
    const far = 2 ** 51 + 5 * PAGES_2M + 7;
    map(pool, t, far, 1, 3);
    map(pool, t, 2 ** 40, PAGES_2M, PAGES_2M);
    const tlb = new Iotlb({ smallEntries: 16 });
    const out = emptyLeafInfo();
    expect(cached(tlb, pool.words, t.header, far, out)).toBe(true);
    expect(tlb.lookup(t.header, far, out) && out.guestPfn).toBe(3);
    // Same low 32 bits, different frame: must miss.
    expect(tlb.lookup(t.header, far - 2 ** 32, out)).toBe(false);
    expect(cached(tlb, pool.words, t.header, 2 ** 40 + 9, out)).toBe(true);
    expect(tlb.lookup(t.header, 2 ** 40 + 500, out) && out.guestPfn).toBe(PAGES_2M + 500);
    expect(tlb.lookup(t.header, 2 ** 40 + 512 + 2 ** 32, out)).toBe(false);
  });

  it('evicts on a set conflict and still answers correctly', () => {
    const pool = new TablePool();
    const t = space(pool, 1);
    map(pool, t, 0, 64, 500, RW, false);
    const tlb = new Iotlb({ smallEntries: 8 });
    const out = emptyLeafInfo();
    for (let p = 0; p < 64; p++) expect(cached(tlb, pool.words, t.header, p, out) && out.guestPfn).toBe(500 + p);
    expect(tlb.stats().evictions).toBe(56);
    expect(tlb.size).toBe(8);
    for (let p = 0; p < 64; p++) expect(cached(tlb, pool.words, t.header, p, out) && out.guestPfn).toBe(500 + p);
  });
});

describe('IOTLB invalidation', () => {
  it('keeps serving a removed translation until revalidate() sees the generation move, then drops only that space', () => {
    const pool = new TablePool();
    const a = space(pool, 1);
    const b = space(pool, 2);
    map(pool, a, 10, 2, 100);
    map(pool, b, 10, 2, 200);
    const tlb = new Iotlb();
    const out = emptyLeafInfo();
    for (const t of [a, b]) for (const p of [10, 11]) cached(tlb, pool.words, t.header, p, out);
    a.unmap(10, 10);
    // Stale until told: this is why a DMA must begin after the epoch moved.
    expect(tlb.lookup(a.header, 10, out)).toBe(true);
    expect(tlb.revalidate(new TableReader(pool.buffer))).toBe(1);
    expect(tlb.lookup(a.header, 10, out)).toBe(false);
    expect(tlb.lookup(a.header, 11, out)).toBe(false);
    expect(tlb.lookup(b.header, 10, out) && out.guestPfn).toBe(200);
    expect(tlb.revalidate(new TableReader(pool.buffer))).toBe(0);
    expect(tlb.stats().invalidations).toBe(1);
  });

  it('drops a space whose generation moved when a newer fill arrives', () => {
    const pool = new TablePool();
    const t = space(pool, 1);
    map(pool, t, 10, 2, 100);
    const tlb = new Iotlb();
    const out = emptyLeafInfo();
    cached(tlb, pool.words, t.header, 10, out);
    t.unmap(10, 10);
    map(pool, t, 10, 1, 300);
    // Page 11 is filled under the new generation: page 10's old entry goes with it.
    cached(tlb, pool.words, t.header, 11, out);
    expect(tlb.lookup(t.header, 10, out)).toBe(false);
    expect(cached(tlb, pool.words, t.header, 10, out) && out.guestPfn).toBe(300);
  });

  it('forgets the oldest space when more spaces are used than it tracks', () => {
    const pool = new TablePool();
    const spaces = [1, 2, 3].map((id) => space(pool, id));
    for (const t of spaces) map(pool, t, 7, 1, t.header);
    const tlb = new Iotlb({ trackedSpaces: 2 });
    const out = emptyLeafInfo();
    for (const t of spaces) cached(tlb, pool.words, t.header, 7, out);
    expect(tlb.lookup(spaces[0]!.header, 7, out)).toBe(false);
    expect(tlb.lookup(spaces[1]!.header, 7, out)).toBe(true);
    expect(tlb.lookup(spaces[2]!.header, 7, out)).toBe(true);
  });

  it('flush() and invalidateAddressSpace() empty what they should', () => {
    const pool = new TablePool();
    const a = space(pool, 1);
    const b = space(pool, 2);
    map(pool, a, 0, PAGES_2M, 0);
    map(pool, b, 0, 1, 5);
    const tlb = new Iotlb();
    const out = emptyLeafInfo();
    cached(tlb, pool.words, a.header, 3, out);
    cached(tlb, pool.words, b.header, 0, out);
    tlb.invalidateAddressSpace(a.header);
    expect(tlb.lookup(a.header, 3, out)).toBe(false);
    expect(tlb.lookup(b.header, 0, out)).toBe(true);
    tlb.flush();
    expect(tlb.size).toBe(0);
    expect(tlb.lookup(b.header, 0, out)).toBe(false);
    expect(tlb.stats().flushes).toBe(1);
  });

  it('rejects bad geometry and leaves it cannot hold', () => {
    expect(() => new Iotlb({ smallEntries: 1000 })).toThrow(RangeError);
    expect(() => new Iotlb({ trackedSpaces: 0 })).toThrow(RangeError);
    const tlb = new Iotlb();
    expect(() => tlb.insert(0, 0, emptyLeafInfo())).toThrow(RangeError);
    expect(() => tlb.insert(1024, 0, { ...emptyLeafInfo(), pageShift: 39 })).toThrow(RangeError);
  });
});

describe('IOTLB property: cached answers equal a fresh walk', () => {
  type Op =
    | { op: 'map'; space: number; pfn: number; pages: number; guest: number; perms: number; huge: boolean }
    | { op: 'unmap'; space: number; pfn: number; pages: number }
    | { op: 'lookup'; space: number; pfn: number }
    | { op: 'epoch' };
  // A small IOVA window with 2 MiB-aligned choices so huge leaves and conflicts both happen.
  // Few distinct pages, so lookups keep returning to what was cached, mapped and unmapped.
  const pfnArb = fc
    .tuple(fc.integer({ min: 0, max: 3 }), fc.oneof(fc.integer({ min: 0, max: 47 }), fc.constantFrom(0, 300, PAGES_2M - 1)))
    .map(([region, page]) => region * PAGES_2M + page);
  const opArb: fc.Arbitrary<Op> = fc.oneof(
    { weight: 2, arbitrary: fc.record({ op: fc.constant('map' as const), space: fc.integer({ min: 0, max: 1 }), pfn: pfnArb, pages: fc.oneof(fc.integer({ min: 1, max: 24 }), fc.constant(PAGES_2M)), guest: fc.integer({ min: 0, max: 64 }).map((g) => g * PAGES_2M), perms: fc.constantFrom(EntryFlag.READ, RW), huge: fc.boolean() }) },
    { weight: 2, arbitrary: fc.record({ op: fc.constant('unmap' as const), space: fc.integer({ min: 0, max: 1 }), pfn: pfnArb, pages: fc.oneof(fc.integer({ min: 1, max: 24 }), fc.constant(PAGES_2M)) }) },
    { weight: 6, arbitrary: fc.record({ op: fc.constant('lookup' as const), space: fc.integer({ min: 0, max: 1 }), pfn: pfnArb }) },
    { weight: 1, arbitrary: fc.constant({ op: 'epoch' as const }) },
  );

  it('holds over random map / unmap / lookup sequences when every unmap is followed by revalidate()', () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 1, maxLength: 120 }), (ops) => {
        const pool = new TablePool();
        const spaces = [space(pool, 1), space(pool, 2)];
        const tlb = new Iotlb({ smallEntries: 32, mediumEntries: 2, largeEntries: 1 });
        const got = emptyLeafInfo();
        const want = emptyLeafInfo();
        let mismatches = 0;
        const seen = [new Set<number>(), new Set<number>()];
        const agrees = (header: number, pfn: number): boolean => {
          const hit = cached(tlb, pool.words, header, pfn, got);
          const expected = walk(pool.words, header, pfn, want);
          if (hit !== expected) return false;
          return !hit || (got.guestPfn === want.guestPfn && got.flags === want.flags && got.pageShift === want.pageShift);
        };
        for (const o of ops) {
          if (o.op === 'epoch') {
            tlb.revalidate(new TableReader(pool.buffer));
            continue;
          }
          const t = spaces[o.space]!;
          if (o.op === 'map') {
            // Only into an empty range, and keeping IOVA/GPA congruent so huge leaves can form.
            if (t.nextMapped(o.pfn, o.pfn + o.pages - 1) >= 0) continue;
            map(pool, t, o.pfn, o.pages, o.guest + (o.pfn % PAGES_2M), o.perms, o.huge);
          } else if (o.op === 'unmap') {
            // Widen to whole leaves, as the IOAS does (an unmap never cuts a leaf).
            let first = o.pfn;
            let last = o.pfn + o.pages - 1;
            t.forEachLeaf(first, last, (pfn, pages) => {
              first = Math.min(first, pfn);
              last = Math.max(last, pfn + pages - 1);
            });
            t.unmap(first, last);
            // The owner's epoch bump: every DMA after it starts with a revalidated IOTLB.
            tlb.revalidate(new TableReader(pool.buffer));
            // Any hit now, before a fill could hide it, must match the table.
            for (const pfn of seen[o.space]!) {
              if (tlb.lookup(t.header, pfn, got) && !(walk(pool.words, t.header, pfn, want) && got.guestPfn === want.guestPfn && got.flags === want.flags)) mismatches++;
            }
          } else {
            seen[o.space]!.add(o.pfn);
            if (!agrees(t.header, o.pfn)) mismatches++;
          }
        }
        expect(mismatches).toBe(0);
      }),
      fuzzParams(0x10718, 150),
    );
  });
});
