import type { SharedTranslation } from '../ioasid/index.js';
import type { TranslatorStats } from '../ioasid/translator.js';
import type { GuestMemoryDescriptor } from '../memory/index.js';

/**
 * The one start message of a test endpoint worker: a DMA-capable device behind the IOMMU that
 * translates its own DMA through the context's shared page tables, as every consumer device does.
 */
export interface EndpointWorkerStart {
  readonly name: string;
  /** Endpoint ID the guest uses for this device. */
  readonly endpoint: number;
  /** Its device-table row in the context (the translation's `deviceSlot`). */
  readonly row: number;
  readonly shared: SharedTranslation;
  readonly memory: GuestMemoryDescriptor;
  /** The context's quiescence block: every DMA is bracketed in it (strict unmap). */
  readonly quiescence: SharedArrayBuffer;
  /** The fault ring the iommu worker drains onto the virtio-iommu event queue. */
  readonly faults: SharedArrayBuffer;
  /** The iommu worker's signal block: a fault wakes it through DeviceSignal.WAKE. */
  readonly iommuSignals: SharedArrayBuffer;
}

export type DmaAccess = 'read' | 'write';

/** One DMA as the device issues it. */
export interface DmaRequest {
  readonly iova: bigint;
  readonly length: number;
  readonly access: DmaAccess;
  readonly pasid?: number;
  /** Bytes a write puts in memory (repeated to `length`); default 0x5a. */
  readonly data?: Uint8Array;
  /**
   * Keeps the DMA open after its transfer, as a slow device does: the worker stores
   * DmaHold.INSIDE in word 0 of this buffer and stays inside the DMA until someone stores
   * DmaHold.RELEASE there (or 10 s pass). Unmaps meanwhile must wait for it (strict unmap).
   */
  readonly hold?: SharedArrayBuffer;
}

/** Values of a held DMA's control word. */
export const DmaHold = { IDLE: 0, INSIDE: 1, RELEASE: 2 } as const;

/** Longest a DMA stays held, so a forgotten release cannot wedge the worker. */
export const MAX_HOLD_MS = 10_000;

/** What the device saw. A fault stops the DMA at the first page that did not translate. */
export type DmaResult =
  | { readonly outcome: 'ok'; readonly spans: number; readonly data?: Uint8Array }
  | { readonly outcome: 'fault'; readonly reason: 'DOMAIN' | 'MAPPING' | 'PERMISSION' | 'OUTSIDE_RAM'; readonly iova: bigint };

export interface EndpointWorkerStats {
  readonly endpoint: number;
  readonly dmas: number;
  readonly faults: number;
  readonly bytes: number;
  readonly translator: TranslatorStats;
}

/** Control plane of a test endpoint (comlink). Each DMA is one call: tests and replay drive it. */
export interface EndpointWorkerApi {
  dma(request: DmaRequest): DmaResult;
  stats(): EndpointWorkerStats;
  stop(): Promise<void>;
}
