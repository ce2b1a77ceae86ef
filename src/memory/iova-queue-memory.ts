import { FeatureBit, hasFeature } from '../virtio/constants.js';
import { isIovaRange, type DmaAccess, type GpaSpan, type TranslatingDmaSpace } from './dma-space.js';
import { formatAddress } from './errors.js';
import type { QueueMemory } from './queue-memory.js';

/**
 * An access through the IOMMU that did not translate (or landed outside RAM). The fault record is
 * already in the fault queue when this is thrown: it only tells the caller the access did not happen.
 */
export class IovaFaultError extends Error {
  readonly code = 'EFAULT' as const;
  constructor(
    readonly iova: number,
    readonly length: number,
    readonly access: DmaAccess,
  ) {
    super(`DMA ${access} of ${length} bytes at IOVA ${formatAddress(iova)} faulted`);
    this.name = 'IovaFaultError';
  }
}

/**
 * Virtqueue memory for a device that negotiated VIRTIO_F_ACCESS_PLATFORM: every ring address is an
 * IOVA, translated through the device's DmaSpace on every access, each access a DMA of its own (or
 * part of the caller's, when the caller has one open).
 *
 * A fault throws IovaFaultError after the translator has recorded it; SplitQueue catches it and
 * marks the queue broken ('memory-fault'), and the device model then sets DEVICE_NEEDS_RESET: a
 * device that cannot reach its rings cannot even hand buffers back, which is the case virtio 1.2
 * §2.1.2 covers ("The device SHOULD set DEVICE_NEEDS_RESET when it enters an error state that a
 * reset is needed"). Buffers are another matter: a device reads and writes them through its
 * DmaSpace, sees a fault as a false return, and can give the buffer back unwritten.
 *
 * contains() only says whether the range is one an IOVA can name: whether it is mapped can change
 * between any two accesses (the guest's IOMMU driver unmaps whenever it likes), so that is learnt
 * at the access itself, where the fault is reported against the address that was really used.
 */
export class IovaQueueMemory implements QueueMemory {
  private readonly scratch = new Uint8Array(8);
  private readonly view = new DataView(this.scratch.buffer);
  /** Reused by the atomic accessors: one span, never more (a naturally aligned u16 sits in one page). */
  private readonly spans: GpaSpan[] = [];

  constructor(readonly dma: TranslatingDmaSpace) {}

  contains(addr: number, length: number): boolean {
    return isIovaRange(addr, length);
  }

  readU16(addr: number): number {
    this.load(addr, 2);
    return this.view.getUint16(0, true);
  }

  readU32(addr: number): number {
    this.load(addr, 4);
    return this.view.getUint32(0, true);
  }

  readU64Address(addr: number): number {
    this.load(addr, 8);
    const lo = this.view.getUint32(0, true);
    const hi = this.view.getUint32(4, true);
    // Same convention as GuestMemory: an address a number cannot hold exactly is never accessible.
    return hi >= 0x20_0000 ? Number.POSITIVE_INFINITY : hi * 0x1_0000_0000 + lo;
  }

  writeU16(addr: number, value: number): void {
    this.view.setUint16(0, value, true);
    this.store(addr, 2);
  }

  writeU32(addr: number, value: number): void {
    this.view.setUint32(0, value >>> 0, true);
    this.store(addr, 4);
  }

  atomicLoadU16(addr: number): number {
    const dma = this.dma;
    dma.begin();
    try {
      // The translation and the load sit in one DMA, so an unmap cannot complete between them.
      return dma.memory.atomicLoadU16(this.gpaOf(addr, 2, 'read'));
    } finally {
      dma.end();
    }
  }

  atomicStoreU16(addr: number, value: number): void {
    const dma = this.dma;
    dma.begin();
    try {
      dma.memory.atomicStoreU16(this.gpaOf(addr, 2, 'write'), value);
    } finally {
      dma.end();
    }
  }

  read(addr: number, into: Uint8Array): void {
    if (!isIovaRange(addr, into.length) || !this.dma.read(addr, into)) throw new IovaFaultError(addr, into.length, 'read');
  }

  write(addr: number, from: Uint8Array): void {
    if (!isIovaRange(addr, from.length) || !this.dma.write(addr, from)) throw new IovaFaultError(addr, from.length, 'write');
  }

  private load(addr: number, size: number): void {
    this.read(addr, this.scratch.subarray(0, size));
  }

  private store(addr: number, size: number): void {
    this.write(addr, this.scratch.subarray(0, size));
  }

  /** The GPA of a naturally aligned field; throws IovaFaultError when it does not translate. */
  private gpaOf(addr: number, size: number, access: DmaAccess): number {
    // Page offsets survive translation, so an aligned IOVA is an aligned GPA inside one page.
    if (!isIovaRange(addr, size) || addr % size !== 0) throw new IovaFaultError(addr, size, access);
    const spans = this.spans;
    spans.length = 0;
    if (!this.dma.translate(addr, size, access, spans) || spans.length !== 1) throw new IovaFaultError(addr, size, access);
    return spans[0]!.gpa;
  }
}

/**
 * The TransportOptions.queueMemory hook of a device whose DMA goes through `dma`: IOVAs when
 * VIRTIO_F_ACCESS_PLATFORM is negotiated, guest-physical addresses (guest memory itself) otherwise,
 * as virtio 1.2 §6 says of the bit: "If this feature bit is set to 0, then the device has same
 * access to memory addresses supplied to it as the driver has."
 */
export function queueMemoryFor(dma: TranslatingDmaSpace): (negotiated: bigint) => QueueMemory {
  return (negotiated) => (hasFeature(negotiated, FeatureBit.ACCESS_PLATFORM) ? new IovaQueueMemory(dma) : dma.memory);
}
