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

/**
 * A DmaSpace for a device bound to a context: translation through the shared page tables by the
 * worker's Translator (per-worker IOTLB, quiescence slot, fault queue) for one device-table row
 * and optional PASID, then bounds-checked copies in guest memory.
 */
export class TranslatorDmaSpace implements DmaSpace {
  constructor(
    private readonly translator: Translator,
    private readonly memory: GuestMemory,
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
}
