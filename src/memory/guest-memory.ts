import { GuestMemoryError } from './errors.js';

/** Largest guest-physical address plus one that a region may end at: every GPA stays a safe integer. */
export const GPA_LIMIT = Number.MAX_SAFE_INTEGER;

/** One contiguous range of guest RAM, backed by shared memory so every worker sees the same bytes. */
export interface GuestRegionDescriptor {
  /** Guest-physical address of the first byte. */
  readonly base: number;
  readonly buffer: SharedArrayBuffer;
}

/** What crosses a thread boundary to rebuild the same guest memory in another worker. */
export interface GuestMemoryDescriptor {
  readonly regions: readonly GuestRegionDescriptor[];
}

class Region {
  readonly end: number;
  readonly bytes: Uint8Array;
  readonly data: DataView;
  readonly u16: Uint16Array;
  readonly u32: Uint32Array;
  constructor(
    readonly base: number,
    readonly buffer: SharedArrayBuffer,
  ) {
    this.end = base + buffer.byteLength;
    this.bytes = new Uint8Array(buffer);
    this.data = new DataView(buffer);
    this.u16 = new Uint16Array(buffer, 0, buffer.byteLength >>> 1);
    this.u32 = new Uint32Array(buffer, 0, buffer.byteLength >>> 2);
  }
}

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * Guest-physical memory: one or more non-overlapping regions. Every accessor checks that the whole
 * range lies inside one region; a guest-supplied address never indexes memory unchecked.
 * Multi-byte values are little-endian, as virtio and x86 page tables require.
 */
export class GuestMemory {
  private readonly regionList: Region[];
  /** Single-region fast path: most machines have one RAM region at GPA 0. */
  private readonly only: Region | undefined;

  private constructor(regions: Region[]) {
    if (!LITTLE_ENDIAN_HOST) {
      // Atomic ring-index accessors use host byte order; virtio rings are little-endian.
      throw new Error('guest memory requires a little-endian host');
    }
    this.regionList = regions.sort((a, b) => a.base - b.base);
    for (let i = 1; i < this.regionList.length; i++) {
      const prev = this.regionList[i - 1]!;
      const cur = this.regionList[i]!;
      if (cur.base < prev.end) {
        throw new RangeError(`guest memory regions overlap at gpa 0x${cur.base.toString(16)}`);
      }
    }
    this.only = this.regionList.length === 1 ? this.regionList[0] : undefined;
  }

  /** Allocates fresh zeroed regions. `layout` is a size (one region at GPA 0) or a list of regions. */
  static create(layout: number | readonly { base: number; size: number }[]): GuestMemory {
    const specs = typeof layout === 'number' ? [{ base: 0, size: layout }] : layout;
    if (specs.length === 0) throw new RangeError('guest memory needs at least one region');
    return new GuestMemory(
      specs.map(({ base, size }) => {
        if (!Number.isSafeInteger(base) || base < 0 || base % 4096 !== 0) {
          throw new RangeError(`region base must be a 4 KiB aligned non-negative integer, got ${base}`);
        }
        if (!Number.isSafeInteger(size) || size <= 0 || size % 4096 !== 0) {
          throw new RangeError(`region size must be a positive multiple of 4 KiB, got ${size}`);
        }
        if (base + size > GPA_LIMIT) throw new RangeError('region ends beyond the largest supported GPA');
        return new Region(base, new SharedArrayBuffer(size));
      }),
    );
  }

  /** Rebuilds a view of memory created elsewhere (another worker's `describe()`). */
  static fromDescriptor(descriptor: GuestMemoryDescriptor): GuestMemory {
    return new GuestMemory(descriptor.regions.map((r) => new Region(r.base, r.buffer)));
  }

  describe(): GuestMemoryDescriptor {
    return { regions: this.regionList.map((r) => ({ base: r.base, buffer: r.buffer })) };
  }

  get regions(): readonly { base: number; size: number }[] {
    return this.regionList.map((r) => ({ base: r.base, size: r.buffer.byteLength }));
  }

  /** Total bytes of RAM over all regions. */
  get size(): number {
    let total = 0;
    for (const r of this.regionList) total += r.buffer.byteLength;
    return total;
  }

  /** The region holding [gpa, gpa+length), or undefined. Rejects non-integers, negatives and overflow. */
  private find(gpa: number, length: number): Region | undefined {
    const only = this.only;
    if (only !== undefined) {
      // `gpa >= base` and `gpa + length <= end` both fail for NaN; Infinity fails the end check.
      if (gpa >= only.base && length >= 0 && gpa + length <= only.end && Number.isInteger(gpa) && Number.isInteger(length)) {
        return only;
      }
      return undefined;
    }
    if (!Number.isInteger(gpa) || !Number.isInteger(length) || length < 0) return undefined;
    for (const r of this.regionList) {
      if (gpa >= r.base && gpa + length <= r.end) return r;
    }
    return undefined;
  }

  private region(gpa: number, length: number): Region {
    const r = this.find(gpa, length);
    if (r === undefined) throw new GuestMemoryError(gpa, length);
    return r;
  }

  /** True when [gpa, gpa+length) lies inside one region. */
  contains(gpa: number, length: number): boolean {
    return this.find(gpa, length) !== undefined;
  }

  /** A live view of guest bytes; throws GuestMemoryError if the range is not inside one region. */
  view(gpa: number, length: number): Uint8Array {
    const r = this.region(gpa, length);
    return r.bytes.subarray(gpa - r.base, gpa - r.base + length);
  }

  /** Like view(), but returns undefined instead of throwing: for hot paths that report their own status. */
  tryView(gpa: number, length: number): Uint8Array | undefined {
    const r = this.find(gpa, length);
    return r === undefined ? undefined : r.bytes.subarray(gpa - r.base, gpa - r.base + length);
  }

  /** The shared buffer and offset behind a range: for Atomics on fields that live in guest RAM. */
  locate(gpa: number, length: number): { buffer: SharedArrayBuffer; offset: number } {
    const r = this.region(gpa, length);
    return { buffer: r.buffer, offset: gpa - r.base };
  }

  readU8(gpa: number): number {
    const r = this.region(gpa, 1);
    return r.bytes[gpa - r.base]!;
  }
  readU16(gpa: number): number {
    const r = this.region(gpa, 2);
    return r.data.getUint16(gpa - r.base, true);
  }
  readU32(gpa: number): number {
    const r = this.region(gpa, 4);
    return r.data.getUint32(gpa - r.base, true);
  }
  readU64(gpa: number): bigint {
    const r = this.region(gpa, 8);
    return r.data.getBigUint64(gpa - r.base, true);
  }
  /**
   * A u64 guest address as a number. Values at or above 2^53 cannot be a GPA of this memory, so they
   * come back as Infinity, which every range check rejects.
   */
  readU64Address(gpa: number): number {
    const r = this.region(gpa, 8);
    const lo = r.data.getUint32(gpa - r.base, true);
    const hi = r.data.getUint32(gpa - r.base + 4, true);
    return hi >= 0x200000 ? Number.POSITIVE_INFINITY : hi * 0x1_0000_0000 + lo;
  }

  writeU8(gpa: number, value: number): void {
    const r = this.region(gpa, 1);
    r.bytes[gpa - r.base] = value;
  }
  writeU16(gpa: number, value: number): void {
    const r = this.region(gpa, 2);
    r.data.setUint16(gpa - r.base, value, true);
  }
  writeU32(gpa: number, value: number): void {
    const r = this.region(gpa, 4);
    r.data.setUint32(gpa - r.base, value >>> 0, true);
  }
  writeU64(gpa: number, value: bigint | number): void {
    const r = this.region(gpa, 8);
    r.data.setBigUint64(gpa - r.base, BigInt.asUintN(64, BigInt(value)), true);
  }

  /** Copies guest bytes at gpa into `into` (its whole length). */
  read(gpa: number, into: Uint8Array): void {
    into.set(this.view(gpa, into.length));
  }
  /** Copies `from` into guest memory at gpa. */
  write(gpa: number, from: Uint8Array): void {
    this.view(gpa, from.length).set(from);
  }
  fill(gpa: number, length: number, byte: number): void {
    this.view(gpa, length).fill(byte);
  }
  /** Guest-to-guest copy; ranges may lie in different regions and may overlap. */
  copy(dstGpa: number, srcGpa: number, length: number): void {
    const src = this.view(srcGpa, length);
    const dst = this.view(dstGpa, length);
    if (src.buffer === dst.buffer) {
      const r = this.region(dstGpa, length);
      r.bytes.copyWithin(dstGpa - r.base, srcGpa - r.base, srcGpa - r.base + length);
    } else {
      dst.set(src);
    }
  }

  /** Sequentially consistent load of a naturally aligned u16 (virtqueue ring indices). */
  atomicLoadU16(gpa: number): number {
    const r = this.alignedRegion(gpa, 2);
    return Atomics.load(r.u16, (gpa - r.base) >>> 1);
  }
  atomicStoreU16(gpa: number, value: number): void {
    const r = this.alignedRegion(gpa, 2);
    Atomics.store(r.u16, (gpa - r.base) >>> 1, value);
  }
  atomicLoadU32(gpa: number): number {
    const r = this.alignedRegion(gpa, 4);
    return Atomics.load(r.u32, (gpa - r.base) >>> 2);
  }
  atomicStoreU32(gpa: number, value: number): void {
    const r = this.alignedRegion(gpa, 4);
    Atomics.store(r.u32, (gpa - r.base) >>> 2, value >>> 0);
  }

  private alignedRegion(gpa: number, size: 2 | 4): Region {
    const r = this.region(gpa, size);
    if ((gpa - r.base) % size !== 0) throw new GuestMemoryError(gpa, size, `not ${size}-byte aligned`);
    return r;
  }
}
