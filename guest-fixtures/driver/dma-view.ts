import type { GuestMemory, QueueMemory } from '../../src/memory/index.js';
import { GuestMemoryError } from '../../src/memory/index.js';

interface Window {
  readonly iova: number;
  readonly gpa: number;
  readonly length: number;
}

/**
 * The guest's CPU view of memory it has handed to a device at DMA addresses, as a kernel's
 * dma_alloc_coherent() returns both a CPU pointer and a dma_addr_t: the driver writes rings and
 * buffers at the IOVA it gives the device, and this view turns each IOVA back into the GPA the
 * guest mapped there. It is the guest's own bookkeeping, not the IOMMU: forgetting a window
 * here is separate from unmapping it in the IOMMU (tests unmap behind the driver's back).
 *
 * Without an IOMMU (or in bypass) one identity window makes IOVA = GPA.
 */
export class GuestDmaView implements QueueMemory {
  private windows: Window[] = [];

  constructor(readonly memory: GuestMemory) {}

  /** An identity view over all of guest memory. */
  static identity(memory: GuestMemory): GuestDmaView {
    const view = new GuestDmaView(memory);
    for (const r of memory.regions) view.map(r.base, r.base, r.size);
    return view;
  }

  /** Records that [iova, iova + length) reaches guest memory at gpa. Windows may not overlap. */
  map(iova: number, gpa: number, length: number): void {
    if (!Number.isSafeInteger(iova) || iova < 0 || !Number.isSafeInteger(length) || length <= 0) {
      throw new RangeError(`DMA window ${iova}+${length} is not valid`);
    }
    if (!this.memory.contains(gpa, length)) throw new GuestMemoryError(gpa, length, 'DMA window is not guest RAM');
    for (const w of this.windows) {
      if (iova < w.iova + w.length && w.iova < iova + length) throw new RangeError(`DMA window at IOVA 0x${iova.toString(16)} overlaps another`);
    }
    this.windows.push({ iova, gpa, length });
    this.windows.sort((a, b) => a.iova - b.iova);
  }

  /** Forgets the window that starts at `iova`. */
  unmap(iova: number): void {
    this.windows = this.windows.filter((w) => w.iova !== iova);
  }

  /** The GPA behind an IOVA range inside one window; throws when the guest never mapped it. */
  gpaOf(iova: number, length = 1): number {
    for (const w of this.windows) {
      if (iova >= w.iova && iova + length <= w.iova + w.length) return w.gpa + (iova - w.iova);
    }
    throw new GuestMemoryError(iova, length, 'not inside one DMA window of the guest');
  }

  contains(addr: number, length: number): boolean {
    for (const w of this.windows) if (addr >= w.iova && addr + length <= w.iova + w.length) return true;
    return false;
  }

  readU16(addr: number): number {
    return this.memory.readU16(this.gpaOf(addr, 2));
  }
  readU32(addr: number): number {
    return this.memory.readU32(this.gpaOf(addr, 4));
  }
  readU64Address(addr: number): number {
    return this.memory.readU64Address(this.gpaOf(addr, 8));
  }
  writeU16(addr: number, value: number): void {
    this.memory.writeU16(this.gpaOf(addr, 2), value);
  }
  writeU32(addr: number, value: number): void {
    this.memory.writeU32(this.gpaOf(addr, 4), value);
  }
  atomicLoadU16(addr: number): number {
    return this.memory.atomicLoadU16(this.gpaOf(addr, 2));
  }
  atomicStoreU16(addr: number, value: number): void {
    this.memory.atomicStoreU16(this.gpaOf(addr, 2), value);
  }
  read(addr: number, into: Uint8Array): void {
    this.memory.read(this.gpaOf(addr, into.length), into);
  }
  write(addr: number, from: Uint8Array): void {
    this.memory.write(this.gpaOf(addr, from.length), from);
  }
}
