import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { Iotlb, type GenerationSource, type RangeVisitor } from '../src/ioasid/iotlb.js';
import { EntryFlag, emptyLeafInfo, type LeafInfo } from '../src/pagetable/index.js';
import { fuzzParams } from './support/fuzz.js';

/*
 * The IOTLB's nested entries: filed under a stage-1 tag with two generations, dropped by range
 * when only the stage-1 generation moved, whole when stage 2 moved or the ranges are unknown.
 */

const TAG = 1024;
const OTHER = 2048;
const STAGE2 = 8;
const FLAGS = EntryFlag.PRESENT | EntryFlag.LEAF | EntryFlag.READ;

function leaf(pfn: number, shift: 12 | 21 | 30, guest = 0x1000): LeafInfo {
  const pages = 2 ** (shift - 12);
  const start = pfn - (pfn % pages);
  return { guestPfn: guest + (pfn - start), leafPfn: start, leafGuestPfn: guest, pageShift: shift, flags: FLAGS };
}

/** A generation source over plain maps, with a ring of ranges per tag (or none: unknown). */
class FakeSource implements GenerationSource {
  readonly generations = new Map<number, number>();
  readonly ranges = new Map<number, [number, number][]>();
  known = true;

  generation(header: number): number {
    return this.generations.get(header) ?? 0;
  }

  invalidations(tag: number, from: number, to: number, visit: RangeVisitor): boolean {
    if (!this.known) return false;
    const list = this.ranges.get(tag) ?? [];
    for (let g = from; g < to; g++) {
      const r = list[g];
      if (r === undefined) return false;
      visit(r[0], r[1]);
    }
    return true;
  }

  invalidate(tag: number, first: number, last: number): void {
    const list = this.ranges.get(tag) ?? [];
    list.push([first, last]);
    this.ranges.set(tag, list);
    this.generations.set(tag, list.length);
  }
}

function present(iotlb: Iotlb, tag: number, pfn: number): boolean {
  return iotlb.lookup(tag, pfn, emptyLeafInfo());
}

describe('IOTLB entries of nested spaces', () => {
  it('a range drops the entries it overlaps, of its tag only, whatever their size', () => {
    const iotlb = new Iotlb();
    const src = new FakeSource();
    iotlb.insertNested(TAG, 0, STAGE2, 0, leaf(0x100, 12));
    iotlb.insertNested(TAG, 0, STAGE2, 0, leaf(0x101, 12));
    iotlb.insertNested(TAG, 0, STAGE2, 0, leaf(0x400, 21));
    iotlb.insertNested(TAG, 0, STAGE2, 0, leaf(0x40000, 30));
    iotlb.insertNested(OTHER, 0, STAGE2, 0, leaf(0x100, 12));
    iotlb.insert(STAGE2, 0, leaf(0x100, 12));
    src.invalidate(TAG, 0x101, 0x101);
    src.invalidate(TAG, 0x5ff, 0x5ff);
    expect(iotlb.revalidate(src)).toBe(0);
    expect(present(iotlb, TAG, 0x100)).toBe(true);
    expect(present(iotlb, TAG, 0x101)).toBe(false);
    expect(present(iotlb, TAG, 0x400)).toBe(false);
    expect(present(iotlb, TAG, 0x40000)).toBe(true);
    expect(present(iotlb, OTHER, 0x100)).toBe(true);
    expect(present(iotlb, STAGE2, 0x100)).toBe(true);
    expect(iotlb.stats()).toMatchObject({ flushes: 0, rangeInvalidations: 2 });
    // A range inside the 1 GiB entry drops it; later fills under the new generation stay.
    src.invalidate(TAG, 0x40000 + 77, 0x40000 + 77);
    iotlb.revalidate(src);
    expect(present(iotlb, TAG, 0x40000)).toBe(false);
    expect(present(iotlb, TAG, 0x100)).toBe(true);
  });

  it('stage 2 moving, unknown ranges, or a source without invalidations drop the whole space', () => {
    const src = new FakeSource();
    const fill = (): Iotlb => {
      const iotlb = new Iotlb();
      iotlb.insertNested(TAG, 0, STAGE2, 0, leaf(0x100, 12));
      iotlb.insertNested(OTHER, 0, STAGE2 + 4, 0, leaf(0x100, 12));
      return iotlb;
    };
    let iotlb = fill();
    src.generations.set(STAGE2, 1);
    expect(iotlb.revalidate(src)).toBe(1);
    expect(present(iotlb, TAG, 0x100)).toBe(false);
    expect(present(iotlb, OTHER, 0x100)).toBe(true);
    src.generations.set(STAGE2, 0);

    iotlb = fill();
    src.invalidate(TAG, 0x9999, 0x9999);
    src.known = false;
    expect(iotlb.revalidate(src)).toBe(1);
    expect(present(iotlb, TAG, 0x100)).toBe(false);

    iotlb = fill();
    expect(iotlb.revalidate({ generation: (h) => src.generation(h) })).toBe(1);
    expect(present(iotlb, TAG, 0x100)).toBe(false);
    expect(present(iotlb, OTHER, 0x100)).toBe(true);
  });

  it('a fill under a newer generation drops what the tag had (no ranges needed mid-DMA)', () => {
    const iotlb = new Iotlb();
    iotlb.insertNested(TAG, 0, STAGE2, 0, leaf(0x100, 12));
    iotlb.insertNested(TAG, 1, STAGE2, 0, leaf(0x200, 12));
    expect(present(iotlb, TAG, 0x100)).toBe(false);
    expect(present(iotlb, TAG, 0x200)).toBe(true);
    iotlb.insertNested(TAG, 1, STAGE2, 1, leaf(0x300, 12));
    expect(present(iotlb, TAG, 0x200)).toBe(false);
    // sync() drops stage-2 entries filed under another generation.
    iotlb.insert(STAGE2, 0, leaf(0x10, 12));
    iotlb.sync(STAGE2, 0);
    expect(present(iotlb, STAGE2, 0x10)).toBe(true);
    iotlb.sync(STAGE2, 3);
    expect(present(iotlb, STAGE2, 0x10)).toBe(false);
  });

  it('model: after random fills and ranges, exactly the cached entries that overlap no range remain', () => {
    const ENTRY = fc.record({ pfn: fc.integer({ min: 0, max: 2 ** 22 }), shift: fc.constantFrom(12 as const, 12 as const, 21 as const, 30 as const), tag: fc.constantFrom(TAG, OTHER) });
    const RANGE = fc
      .tuple(fc.integer({ min: 0, max: 2 ** 22 }), fc.oneof(fc.integer({ min: 0, max: 4 }), fc.integer({ min: 0, max: 5000 }), fc.integer({ min: 0, max: 2 ** 21 })))
      .map(([first, span]) => [first, first + span] as [number, number]);
    fc.assert(
      fc.property(fc.array(ENTRY, { maxLength: 300 }), fc.array(RANGE, { maxLength: 6 }), (entries, ranges) => {
        const iotlb = new Iotlb({ smallEntries: 256, mediumEntries: 16, largeEntries: 4 });
        const src = new FakeSource();
        // Per tag, leaves do not overlap (as in one page table), so a lookup names one entry.
        const block = (e: { pfn: number; shift: number }): [number, number] => {
          const pages = 2 ** (e.shift - 12);
          const start = e.pfn - (e.pfn % pages);
          return [start, start + pages - 1];
        };
        const accepted: typeof entries = [];
        for (const e of entries) {
          const [a, b] = block(e);
          if (accepted.some((o) => o.tag === e.tag && block(o)[0] <= b && block(o)[1] >= a)) continue;
          accepted.push(e);
          iotlb.insertNested(e.tag, 0, STAGE2, 0, leaf(e.pfn, e.shift));
        }
        // What is cached now (later fills may have evicted earlier ones from their set).
        const cached = accepted.filter((e) => present(iotlb, e.tag, e.pfn));
        for (const [first, last] of ranges) src.invalidate(TAG, first, last);
        iotlb.revalidate(src);
        expect(cached.length).toBeGreaterThanOrEqual(accepted.length / 4);
        for (const e of cached) {
          const [start, end] = block(e);
          const hit = e.tag === TAG && ranges.some(([first, last]) => first <= end && last >= start);
          expect(present(iotlb, e.tag, e.pfn), `${e.tag} pfn 0x${e.pfn.toString(16)} shift ${e.shift}`).toBe(!hit);
        }
      }),
      fuzzParams(0x107b, 150),
    );
  });
});
