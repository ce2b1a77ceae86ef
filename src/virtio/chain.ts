import type { QueueMemory } from '../memory/index.js';

/** One buffer of a descriptor chain: `len` bytes at `addr` in the queue's address space. */
export interface BufferSegment {
  readonly addr: number;
  readonly len: number;
}

/** A descriptor chain the device took from the available ring, already checked against the spec. */
export interface DescriptorChain {
  /** Head descriptor index: the id the device writes to the used ring when it is done. */
  readonly head: number;
  /** Device-readable buffers, in chain order. */
  readonly readable: readonly BufferSegment[];
  /** Device-writable buffers, in chain order (virtio 1.2 §2.7.4.2: they all follow the readable ones). */
  readonly writable: readonly BufferSegment[];
  readonly readableLength: number;
  readonly writableLength: number;
}

/**
 * Sequential reads across a chain's device-readable segments. Reads never run past the segments;
 * a read that needs more bytes than remain consumes nothing and reports it (0 or undefined).
 *
 * The segments were checked accessible when the chain was popped. If the queue memory's mappings
 * change afterwards (an IOMMU unmap), the memory's own error (GuestMemoryError, or a fault with a
 * `code`) propagates from the read.
 */
/**
 * One scratch word per thread for the typed reads and writes below: each use fills and reads it
 * within one synchronous call, and a reader or writer per request should not cost two typed-array
 * allocations it rarely needs.
 */
const SCRATCH = new Uint8Array(8);
const SCRATCH_VIEW = new DataView(SCRATCH.buffer);

export class ChainReader {
  private index = 0;
  private offset = 0;
  private left: number;
  private readonly scratch = SCRATCH;
  private readonly scratchView = SCRATCH_VIEW;

  constructor(
    private readonly memory: QueueMemory,
    private readonly segments: readonly BufferSegment[],
  ) {
    let total = 0;
    for (const s of segments) total += s.len;
    this.left = total;
  }

  /** Bytes not yet read. */
  get remaining(): number {
    return this.left;
  }

  /** Fills `into` from the chain, or as much of it as remains; returns the bytes copied. */
  read(into: Uint8Array): number {
    const want = Math.min(into.length, this.left);
    let done = 0;
    while (done < want) {
      const seg = this.segments[this.index]!;
      const n = Math.min(seg.len - this.offset, want - done);
      if (n > 0) this.memory.read(seg.addr + this.offset, into.subarray(done, done + n));
      done += n;
      this.advance(n);
    }
    return done;
  }

  /** The next `length` bytes as a new array, or undefined (nothing consumed) if fewer remain. */
  readBytes(length: number): Uint8Array | undefined {
    if (!Number.isInteger(length) || length < 0 || length > this.left) return undefined;
    const out = new Uint8Array(length);
    this.read(out);
    return out;
  }

  /** Skips `length` bytes; returns false (nothing skipped) if fewer remain. */
  skip(length: number): boolean {
    if (!Number.isInteger(length) || length < 0 || length > this.left) return false;
    let todo = length;
    while (todo > 0) {
      const seg = this.segments[this.index]!;
      const n = Math.min(seg.len - this.offset, todo);
      todo -= n;
      this.advance(n);
    }
    return true;
  }

  /** Little-endian scalars; undefined (nothing consumed) when the chain is too short. */
  readU8(): number | undefined {
    return this.fill(1) ? this.scratch[0] : undefined;
  }
  readU16(): number | undefined {
    return this.fill(2) ? this.scratchView.getUint16(0, true) : undefined;
  }
  readU32(): number | undefined {
    return this.fill(4) ? this.scratchView.getUint32(0, true) : undefined;
  }
  readU64(): bigint | undefined {
    return this.fill(8) ? this.scratchView.getBigUint64(0, true) : undefined;
  }

  private fill(size: number): boolean {
    if (this.left < size) return false;
    this.read(this.scratch.subarray(0, size));
    return true;
  }

  /** Moves the cursor `n` bytes forward inside the current segment, stepping over finished (or empty) ones. */
  private advance(n: number): void {
    this.offset += n;
    this.left -= n;
    while (this.index < this.segments.length && this.offset >= this.segments[this.index]!.len) {
      this.offset = 0;
      this.index++;
    }
  }
}

/**
 * Sequential writes across a chain's device-writable segments. `written` is what the device reports
 * as the used length (virtio 1.2 §2.7.8.2: at least that many bytes were written, from the first
 * writable buffer on). Same memory-fault caveat as ChainReader.
 */
export class ChainWriter {
  private index = 0;
  private offset = 0;
  private left: number;
  private count = 0;
  private readonly scratch = SCRATCH;
  private readonly scratchView = SCRATCH_VIEW;

  constructor(
    private readonly memory: QueueMemory,
    private readonly segments: readonly BufferSegment[],
  ) {
    let total = 0;
    for (const s of segments) total += s.len;
    this.left = total;
  }

  /** Writable bytes left. */
  get remaining(): number {
    return this.left;
  }

  /** Bytes written so far. */
  get written(): number {
    return this.count;
  }

  /** Writes `from`, or as much of it as fits; returns the bytes written. */
  write(from: Uint8Array): number {
    const want = Math.min(from.length, this.left);
    let done = 0;
    while (done < want) {
      const seg = this.segments[this.index]!;
      const n = Math.min(seg.len - this.offset, want - done);
      if (n > 0) this.memory.write(seg.addr + this.offset, from.subarray(done, done + n));
      done += n;
      this.advance(n);
    }
    this.count += done;
    return done;
  }

  /** Writes all of `from` or nothing; returns whether it fit. */
  writeAll(from: Uint8Array): boolean {
    if (from.length > this.left) return false;
    this.write(from);
    return true;
  }

  /** Little-endian scalars; false (nothing written) when the chain has no room. */
  writeU8(value: number): boolean {
    this.scratch[0] = value;
    return this.writeAll(this.scratch.subarray(0, 1));
  }
  writeU16(value: number): boolean {
    this.scratchView.setUint16(0, value, true);
    return this.writeAll(this.scratch.subarray(0, 2));
  }
  writeU32(value: number): boolean {
    this.scratchView.setUint32(0, value >>> 0, true);
    return this.writeAll(this.scratch.subarray(0, 4));
  }
  writeU64(value: bigint): boolean {
    this.scratchView.setBigUint64(0, BigInt.asUintN(64, value), true);
    return this.writeAll(this.scratch.subarray(0, 8));
  }

  private advance(n: number): void {
    this.offset += n;
    this.left -= n;
    while (this.index < this.segments.length && this.offset >= this.segments[this.index]!.len) {
      this.offset = 0;
      this.index++;
    }
  }
}
