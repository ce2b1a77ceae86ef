import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { GuestMemory, GuestMemoryError } from '../src/memory/index.js';
import { fuzzParams } from './support/fuzz.js';

describe('GuestMemory', () => {
  it('reads and writes little-endian values at every width', () => {
    const mem = GuestMemory.create(4096);
    mem.writeU32(0x10, 0x11223344);
    expect([...mem.view(0x10, 4)]).toEqual([0x44, 0x33, 0x22, 0x11]);
    expect(mem.readU16(0x10)).toBe(0x3344);
    expect(mem.readU8(0x13)).toBe(0x11);
    mem.writeU64(0x20, 0x0102030405060708n);
    expect(mem.readU64(0x20)).toBe(0x0102030405060708n);
    expect(mem.readU32(0x24)).toBe(0x01020304);
    mem.writeU64(0x28, -1);
    expect(mem.readU64(0x28)).toBe(0xffffffffffffffffn);
  });

  it('returns u64 addresses of 2^53 and above as Infinity so range checks reject them', () => {
    const mem = GuestMemory.create(4096);
    mem.writeU64(0, 0x1f_ffff_ffff_ffffn);
    expect(mem.readU64Address(0)).toBe(Number.MAX_SAFE_INTEGER);
    mem.writeU64(0, 0x20_0000_0000_0000n);
    expect(mem.readU64Address(0)).toBe(Number.POSITIVE_INFINITY);
    expect(mem.contains(mem.readU64Address(0), 1)).toBe(false);
  });

  it('rejects ranges that leave a region, with a typed error naming the range', () => {
    const mem = GuestMemory.create(8192);
    expect(() => mem.readU32(8190)).toThrow(GuestMemoryError);
    expect(() => mem.view(-1, 2)).toThrow(/gpa=-0x1/);
    expect(() => mem.view(0, 8193)).toThrow(GuestMemoryError);
    expect(() => mem.view(Number.NaN, 1)).toThrow(GuestMemoryError);
    expect(() => mem.view(1.5, 1)).toThrow(GuestMemoryError);
    expect(mem.tryView(8192, 1)).toBeUndefined();
    expect(mem.tryView(8192, 0)?.length).toBe(0);
    try {
      mem.readU8(9000);
    } catch (err) {
      expect((err as GuestMemoryError).code).toBe('EFAULT');
    }
  });

  it('keeps several regions apart and refuses a range that straddles two', () => {
    const mem = GuestMemory.create([
      { base: 0, size: 4096 },
      { base: 0x10000, size: 8192 },
    ]);
    mem.writeU32(0x10ffc, 0xdeadbeef);
    expect(mem.readU32(0x10ffc)).toBe(0xdeadbeef);
    expect(mem.contains(0x1000, 1)).toBe(false);
    expect(mem.contains(0xfff, 2)).toBe(false);
    expect(mem.size).toBe(12288);
    expect(() => GuestMemory.create([{ base: 0, size: 8192 }, { base: 4096, size: 4096 }])).toThrow(/overlap/);
  });

  it('rebuilds the same memory from its descriptor (as another worker does)', () => {
    const a = GuestMemory.create([{ base: 0x100000, size: 4096 }]);
    const b = GuestMemory.fromDescriptor(a.describe());
    a.writeU16(0x100002, 0xbeef);
    expect(b.readU16(0x100002)).toBe(0xbeef);
    expect(b.regions).toEqual([{ base: 0x100000, size: 4096 }]);
  });

  it('copies within and across regions, overlapping ranges included', () => {
    const mem = GuestMemory.create([
      { base: 0, size: 4096 },
      { base: 0x2000, size: 4096 },
    ]);
    mem.write(0, Uint8Array.from([1, 2, 3, 4, 5]));
    mem.copy(1, 0, 4);
    expect([...mem.view(0, 5)]).toEqual([1, 1, 2, 3, 4]);
    mem.copy(0x2000, 0, 5);
    expect([...mem.view(0x2000, 5)]).toEqual([1, 1, 2, 3, 4]);
  });

  it('atomic ring-index accessors require natural alignment', () => {
    const mem = GuestMemory.create(4096);
    mem.atomicStoreU16(6, 0xffff);
    expect(mem.atomicLoadU16(6)).toBe(0xffff);
    expect(mem.readU16(6)).toBe(0xffff);
    expect(() => mem.atomicLoadU16(7)).toThrow(/aligned/);
    mem.atomicStoreU32(8, 0x80000001);
    expect(mem.atomicLoadU32(8)).toBe(0x80000001);
  });

  it('never touches bytes outside a checked range (property)', () => {
    fc.assert(
      fc.property(
        fc.oneof(fc.integer({ min: -8, max: 4200 }), fc.constantFrom(Number.NaN, Infinity, 2 ** 60, 0.5)),
        fc.integer({ min: 0, max: 64 }),
        (gpa, length) => {
          const mem = GuestMemory.create(4096);
          const inside = Number.isInteger(gpa) && gpa >= 0 && gpa + length <= 4096;
          expect(mem.contains(gpa, length)).toBe(inside);
          if (inside) {
            mem.fill(gpa, length, 0xaa);
            const bytes = mem.view(0, 4096);
            let wrong = 0;
            for (let i = 0; i < 4096; i++) if (bytes[i] !== (i >= gpa && i < gpa + length ? 0xaa : 0)) wrong++;
            expect(wrong).toBe(0);
          } else {
            expect(() => mem.fill(gpa, length, 0xaa)).toThrow(GuestMemoryError);
          }
        },
      ),
      fuzzParams(0x5eed, 300),
    );
  });
});
