import type { GuestMemory } from '../memory/index.js';

const PAGE = 4096;

/** What one pass of a pre-copy moved, and which log found it. */
export interface PrecopyRound {
  /** Pages the IOMMU's dirty bitmaps reported (DMA by bound devices). */
  readonly dmaPages: number;
  /** Pages the page log found changed (every other writer). */
  readonly otherPages: number;
  /** Distinct pages copied. */
  readonly copied: number;
}

/** Where the dirty pages of DMA come from: a machine with dirty tracking on (IommuMachine). */
export interface DmaDirtyLog {
  setDirtyTracking(enable: boolean): Promise<void>;
  dirtyPages(): Promise<number[]>;
}

/**
 * Iterative pre-copy of guest memory to a destination copy. DMA by bound devices is logged by the
 * IOMMU (iommufd dirty bitmaps, harvested before every unmap). Every other writer — the guest's
 * vCPUs, emulated devices writing their rings, software consumers such as virtio-net — logs
 * nothing here (a VMM on KVM would read KVM's dirty log for vCPUs and vhost's for vDPA), so a
 * page log stands in for those: two 32-bit hashes per page, compared with what was last sent.
 */
export class MemoryPrecopy {
  private readonly hashes: Uint32Array;
  private readonly pages: number;

  constructor(
    private readonly source: GuestMemory,
    private readonly destination: GuestMemory,
    private readonly dma: DmaDirtyLog,
  ) {
    if (source.size !== destination.size || source.size % PAGE !== 0) throw new RangeError('source and destination memory must have the same size, a multiple of 4 KiB');
    this.pages = source.size / PAGE;
    this.hashes = new Uint32Array(this.pages * 2);
  }

  /** Starts the DMA log, then copies everything (what is written meanwhile shows up in the next round). */
  async begin(): Promise<PrecopyRound> {
    await this.dma.setDirtyTracking(true);
    for (let p = 0; p < this.pages; p++) this.copyPage(p);
    return { dmaPages: 0, otherPages: this.pages, copied: this.pages };
  }

  /** One more pass: the pages either log reports since the last pass. */
  async round(): Promise<PrecopyRound & { readonly dma: readonly number[] }> {
    const dma = await this.dma.dirtyPages();
    const copy = new Set<number>();
    for (const p of dma) if (p >= 0 && p < this.pages) copy.add(p);
    let otherPages = 0;
    for (let p = 0; p < this.pages; p++) {
      if (this.changed(p)) {
        otherPages++;
        copy.add(p);
      }
    }
    for (const p of copy) this.copyPage(p);
    return { dmaPages: dma.length, otherPages, copied: copy.size, dma };
  }

  /** Tracking off; the destination is complete once the last round ran with the machine paused. */
  async end(): Promise<void> {
    await this.dma.setDirtyTracking(false);
  }

  private changed(page: number): boolean {
    const [a, b] = this.hash(page);
    return this.hashes[page * 2] !== a || this.hashes[page * 2 + 1] !== b;
  }

  private copyPage(page: number): void {
    const gpa = page * PAGE;
    const bytes = this.source.view(gpa, PAGE).slice();
    this.destination.write(gpa, bytes);
    const [a, b] = hashBytes(bytes);
    this.hashes[page * 2] = a;
    this.hashes[page * 2 + 1] = b;
  }

  private hash(page: number): [number, number] {
    return hashBytes(this.source.view(page * PAGE, PAGE));
  }
}

/** Two independent multiplicative hashes over the page's 32-bit words. */
function hashBytes(bytes: Uint8Array): [number, number] {
  const words = new Int32Array(bytes.buffer, bytes.byteOffset, bytes.length >> 2);
  let a = 0x811c9dc5 | 0;
  let b = 0x9e3779b9 | 0;
  for (let i = 0; i < words.length; i++) {
    const w = words[i]!;
    a = Math.imul(a ^ w, 0x01000193);
    b = Math.imul(b + w, 0x85ebca6b) ^ (b >>> 13);
  }
  return [a >>> 0, b >>> 0];
}
