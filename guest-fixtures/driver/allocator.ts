/** Raised when a guest allocation cannot be satisfied. */
export class GuestOutOfMemoryError extends Error {
  constructor(
    readonly size: number,
    readonly align: number,
  ) {
    super(`guest allocator: no free block of ${size} bytes aligned to ${align}`);
    this.name = 'GuestOutOfMemoryError';
  }
}

interface Block {
  start: number;
  end: number;
}

/**
 * A first-fit free-list allocator of guest-physical (or IOVA) space, as a guest kernel would hand
 * out DMA memory: `alloc` carves an aligned block, `free` returns it and merges neighbours.
 * It only does bookkeeping; it never touches memory.
 */
export class GuestAllocator {
  /** Free blocks sorted by address, never adjacent (merged on free). */
  private readonly freeList: Block[];
  private readonly live = new Map<number, number>();

  constructor(
    readonly base: number,
    readonly size: number,
  ) {
    if (!Number.isSafeInteger(base) || base < 0 || !Number.isSafeInteger(size) || size <= 0) {
      throw new RangeError(`guest allocator range ${base}+${size} is not valid`);
    }
    this.freeList = [{ start: base, end: base + size }];
  }

  /** Bytes currently free (possibly fragmented). */
  get available(): number {
    let total = 0;
    for (const b of this.freeList) total += b.end - b.start;
    return total;
  }

  /** Number of blocks handed out and not freed. */
  get liveBlocks(): number {
    return this.live.size;
  }

  /** An address of `size` bytes (at least 1) aligned to `align` (a power of two). Throws when exhausted. */
  alloc(size: number, align = 8): number {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`allocation size ${size} is not valid`);
    if (!Number.isSafeInteger(align) || align < 1 || (align & (align - 1)) !== 0) {
      throw new RangeError(`alignment ${align} is not a power of two`);
    }
    const want = Math.max(size, 1);
    for (let i = 0; i < this.freeList.length; i++) {
      const b = this.freeList[i]!;
      const start = Math.ceil(b.start / align) * align;
      const end = start + want;
      if (end > b.end) continue;
      const pieces: Block[] = [];
      if (start > b.start) pieces.push({ start: b.start, end: start });
      if (end < b.end) pieces.push({ start: end, end: b.end });
      this.freeList.splice(i, 1, ...pieces);
      this.live.set(start, want);
      return start;
    }
    throw new GuestOutOfMemoryError(size, align);
  }

  /** Returns a block from alloc(). Throws for an address that is not a live allocation. */
  free(addr: number): void {
    const len = this.live.get(addr);
    if (len === undefined) throw new RangeError(`guest allocator: ${addr} is not an allocated block`);
    this.live.delete(addr);
    const block: Block = { start: addr, end: addr + len };
    let i = 0;
    while (i < this.freeList.length && this.freeList[i]!.start < block.start) i++;
    this.freeList.splice(i, 0, block);
    const next = this.freeList[i + 1];
    if (next !== undefined && next.start === block.end) {
      block.end = next.end;
      this.freeList.splice(i + 1, 1);
    }
    const prev = this.freeList[i - 1];
    if (prev !== undefined && prev.end === block.start) {
      prev.end = block.end;
      this.freeList.splice(i, 1);
    }
  }
}
