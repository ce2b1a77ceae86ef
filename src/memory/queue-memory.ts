/**
 * The address space a virtqueue's rings and buffers live in. Without VIRTIO_F_ACCESS_PLATFORM it is
 * guest-physical memory itself (GuestMemory implements this interface); with it, addresses are IOVAs
 * and an implementation translates them through the IOMMU before touching guest memory.
 *
 * Every method throws (GuestMemoryError, or a translation fault error with a `code`) when the range
 * is not accessible; callers that must not throw check with `contains` or catch.
 */
export interface QueueMemory {
  /** True when [addr, addr+length) is accessible (for the access a caller is about to make). */
  contains(addr: number, length: number): boolean;
  readU16(addr: number): number;
  readU32(addr: number): number;
  /** A u64 address field; values at or above 2^53 are returned as Infinity (never accessible). */
  readU64Address(addr: number): number;
  writeU16(addr: number, value: number): void;
  writeU32(addr: number, value: number): void;
  /** Sequentially consistent accessors for ring indices (naturally aligned). */
  atomicLoadU16(addr: number): number;
  atomicStoreU16(addr: number, value: number): void;
  /** Copies bytes at addr into `into`, which may span several translations. */
  read(addr: number, into: Uint8Array): void;
  /** Copies `from` to addr. */
  write(addr: number, from: Uint8Array): void;
}
