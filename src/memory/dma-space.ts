import { FaultAccess } from '../ioasid/fault-queue.js';
import type { Translator } from '../ioasid/translator.js';
import type { GuestMemory } from './guest-memory.js';

/**
 * Memory as one device sees it through the IOMMU: every address is an IOVA, every access is
 * translated and may fault. The implementation reports faults (to the fault queue the virtio-iommu
 * drains); callers only learn that the access did not happen, and must not touch memory then.
 *
 * begin()/end() bracket one DMA for strict unmap: translations made inside stay usable until end(),
 * and an unmap that completes before begin() is never seen. Brackets nest. An access outside any
 * bracket is a DMA of its own.
 */
export interface DmaSpace {
  begin(): void;
  end(): void;
  /** Copies [iova, iova + into.length) into `into`; false when any of it faulted (nothing copied). */
  read(iova: number, into: Uint8Array): boolean;
  /** Copies `from` to [iova, iova + from.length); false when any of it faulted (nothing written). */
  write(iova: number, from: Uint8Array): boolean;
}

/** One contiguous guest-physical range behind part of a DMA. */
export interface GpaSpan {
  readonly gpa: number;
  readonly length: number;
}

export type DmaAccess = 'read' | 'write';

/**
 * A DmaSpace that can also say where a range lands in guest memory, for accesses a plain copy
 * cannot express: atomics on ring indices, and transfers that must check every part of a
 * scatter-gather list before writing any of it.
 */
export interface TranslatingDmaSpace extends DmaSpace {
  /** The guest memory the spans point into. */
  readonly memory: GuestMemory;
  /**
   * Appends the guest-physical spans behind [iova, iova + length) for `access` to `out`. False when
   * any of it faults (reported like read/write) or lies outside RAM; `out` is then unchanged. The
   * spans may be used until the enclosing end(): an unmap that removes them waits for it.
   */
  translate(iova: number, length: number, access: DmaAccess, out: GpaSpan[]): boolean;
}

/** Whether [iova, iova + length) is a range a number can carry (IOVAs at or above 2^53 never are). */
export function isIovaRange(iova: number, length: number): boolean {
  return Number.isSafeInteger(iova) && iova >= 0 && Number.isSafeInteger(length) && length >= 0 && iova + length <= Number.MAX_SAFE_INTEGER;
}

/**
 * A DmaSpace for a device bound to a context: translation through the shared page tables by the
 * worker's Translator (per-worker IOTLB, quiescence slot, fault queue) for one device-table row
 * and optional PASID, then bounds-checked copies in guest memory.
 */
export class TranslatorDmaSpace implements TranslatingDmaSpace {
  constructor(
    private readonly translator: Translator,
    readonly memory: GuestMemory,
    /** The device's row in the context's device table (its translation slot). */
    readonly row: number,
    readonly pasid?: number,
  ) {}

  begin(): void {
    this.translator.beginDma();
  }

  end(): void {
    this.translator.endDma();
  }

  read(iova: number, into: Uint8Array): boolean {
    if (into.length === 0) return true;
    if (this.translator.translate(this.row, this.pasid, iova, into.length, FaultAccess.READ) !== 0) return false;
    const spans = this.translator.spans;
    // Identity translations can reach past RAM: check every span before copying any.
    for (let i = 0; i < spans.count; i++) if (!this.memory.contains(spans.gpa[i]!, spans.bytes[i]!)) return false;
    let at = 0;
    for (let i = 0; i < spans.count; i++) {
      const n = spans.bytes[i]!;
      this.memory.read(spans.gpa[i]!, into.subarray(at, at + n));
      at += n;
    }
    return true;
  }

  write(iova: number, from: Uint8Array): boolean {
    if (from.length === 0) return true;
    if (this.translator.translate(this.row, this.pasid, iova, from.length, FaultAccess.WRITE) !== 0) return false;
    const spans = this.translator.spans;
    for (let i = 0; i < spans.count; i++) if (!this.memory.contains(spans.gpa[i]!, spans.bytes[i]!)) return false;
    let at = 0;
    for (let i = 0; i < spans.count; i++) {
      const n = spans.bytes[i]!;
      this.memory.write(spans.gpa[i]!, from.subarray(at, at + n));
      at += n;
    }
    return true;
  }

  translate(iova: number, length: number, access: DmaAccess, out: GpaSpan[]): boolean {
    // Addresses no device could emit are refused here, without a fault record (read/write throw).
    if (!isIovaRange(iova, length)) return false;
    if (length === 0) return true;
    const bits = access === 'write' ? FaultAccess.WRITE : FaultAccess.READ;
    if (this.translator.translate(this.row, this.pasid, iova, length, bits) !== 0) return false;
    const spans = this.translator.spans;
    for (let i = 0; i < spans.count; i++) if (!this.memory.contains(spans.gpa[i]!, spans.bytes[i]!)) return false;
    for (let i = 0; i < spans.count; i++) out.push({ gpa: spans.gpa[i]!, length: spans.bytes[i]! });
    return true;
  }
}

/**
 * The DmaSpace of a device with no IOMMU in front of it: an IOVA is the guest-physical address,
 * and an access outside RAM fails (a bus error: there is no IOMMU to record a fault). What a
 * device uses when VIRTIO_F_ACCESS_PLATFORM is not negotiated.
 */
export class PhysicalDmaSpace implements TranslatingDmaSpace {
  constructor(readonly memory: GuestMemory) {}

  begin(): void {}

  end(): void {}

  read(iova: number, into: Uint8Array): boolean {
    if (!this.memory.contains(iova, into.length)) return false;
    this.memory.read(iova, into);
    return true;
  }

  write(iova: number, from: Uint8Array): boolean {
    if (!this.memory.contains(iova, from.length)) return false;
    this.memory.write(iova, from);
    return true;
  }

  translate(iova: number, length: number, _access: DmaAccess, out: GpaSpan[]): boolean {
    if (!this.memory.contains(iova, length)) return false;
    if (length > 0) out.push({ gpa: iova, length });
    return true;
  }
}
