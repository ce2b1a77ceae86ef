/**
 * Shared-word layouts and start messages of the bench workers. Plain data: the groups and the
 * workers both import this, never each other.
 */
import type { GuestMemoryDescriptor } from '../src/memory/index.js';

/** The ping-pong block of the round-trip limits. */
export const PingPong = {
  /** Sequence number posted by the main thread. */
  PING: 0,
  /** Sequence number echoed by the worker. */
  PONG: 1,
  /** Nonzero: the worker leaves its loop at the next PING. */
  STOP: 2,
  FIELD_COUNT: 3,
} as const;

export interface PingPongStart {
  readonly buffer: SharedArrayBuffer;
  /** 'wait': sleep in Atomics.wait and answer with notify. 'spin': poll with Atomics.load. */
  readonly mode: 'wait' | 'spin';
}

/** Start message of the data-plane worker (translate / DMA copy figures). */
export interface DataPlaneStart {
  /** The context's table pool and device table. */
  readonly pool: SharedArrayBuffer;
  readonly devices: SharedArrayBuffer;
  /** Device-table row of the device this worker plays. */
  readonly row: number;
  readonly quiescence: SharedArrayBuffer;
  readonly memory: GuestMemoryDescriptor;
  /** First IOVA page of the 4 KiB mappings, and how many there are. */
  readonly basePfn: number;
  readonly pages: number;
  /** DMA windows: IOVA of the source and destination, each `windowBytes` long and mapped 4 KiB. */
  readonly srcIova: number;
  readonly dstIova: number;
  readonly windowBytes: number;
  /** Seed of the random page sequence (the same one the radix limit walks). */
  readonly seed: number;
  readonly quick: boolean;
  /** Measure only the memcpy limit and the 8 MiB-window copy (the dirty-tracking run). */
  readonly copyOnly?: boolean;
}

/** What the data-plane worker reports, in ns per operation or GB/s. */
export interface DataPlaneResult {
  /** The single-thread limits, sampled in turn with the figures below. */
  readonly arrayReadNs: number;
  readonly radixWalkNs: number;
  readonly memcpyGbps: number;
  readonly hitNs: number;
  readonly hitDmaNs: number;
  readonly missNs: number;
  readonly walkNs: number;
  /** 64 KiB DMAs over 8 MiB windows (IOTLB misses) and over 1 MiB of them (IOTLB hits). */
  readonly copyGbps: number;
  readonly copyHotGbps: number;
  /** IOTLB misses / translations in the miss loop, to show it really missed. */
  readonly missRate: number;
}

/** Start message of the comlink baseline backend. */
export interface ComlinkBackendStart {
  readonly memory: GuestMemoryDescriptor;
}

/** The naive backend API: one call per map and per unmap. */
export interface ComlinkBackendApi {
  /** Which backend serves the calls: the real iommufd context, or a Map stand-in. */
  kind(): string;
  map(iova: number, gpa: number, length: number): void;
  unmap(iova: number, length: number): void;
}

/** Start message of the nested-translation worker. */
export interface NestedStart {
  readonly memory: GuestMemoryDescriptor;
  /** The context's table pool and device table; the device's row is attached to the nested HWPT. */
  readonly pool: SharedArrayBuffer;
  readonly devices: SharedArrayBuffer;
  readonly row: number;
  readonly quiescence: SharedArrayBuffer;
  /** Stage 2 (for the uncached walk figure): the header slot of the IOAS that maps guest RAM. */
  readonly header: number;
  /** Guest-physical address of the stage-1 PML4. */
  readonly root: number;
  readonly basePfn: number;
  readonly pages: number;
  readonly seed: number;
  readonly quick: boolean;
}

export interface NestedResult {
  readonly missNs: number;
  readonly hitNs: number;
  /** The uncached 2-D walk alone. */
  readonly walkNs: number;
  /** Stage-2 translations per uncached nested walk (stage-1 entries read, plus the data page). */
  readonly reads: number;
  readonly missRate: number;
}

/** Start message of the virtio-iommu bench worker. */
export interface ViommuStart {
  readonly memory: GuestMemoryDescriptor;
  /** The device's signal block (src/virtio/signals.ts). */
  readonly signals: SharedArrayBuffer;
  /** The one endpoint behind the IOMMU. */
  readonly endpoint: number;
  /**
   * Device workers that will translate through the backend's context: when nonzero, the context
   * gets a quiescence block with this many slots, so every UNMAP is a strict unmap.
   */
  readonly dmaWorkers: number;
}

/** What device workers need from the virtio-iommu worker's context to translate on their own. */
export interface ViommuShared {
  readonly pool: SharedArrayBuffer;
  readonly devices: SharedArrayBuffer;
  readonly quiescence: SharedArrayBuffer;
  /** Device-table row of the endpoint's device. */
  readonly row: number;
}

/** Control plane of the virtio-iommu bench worker (comlink). */
export interface ViommuControl {
  /** Answers once the device is built: readiness. */
  ready(): boolean;
  /** Requests the model handled, by status name. */
  stats(): Record<string, unknown>;
  /** The shared buffers for device workers (only with dmaWorkers > 0). */
  shared(): ViommuShared;
  stop(): Promise<void>;
}

/** Control words of the DMA-loop workers. */
export const DmaLoop = {
  /** Nonzero: finish the current DMA and exit. */
  STOP: 0,
  /** Workers that have registered and started their loop. */
  READY: 1,
  /** Worker i's DMA count is at COUNTS + i (updated every 256 DMAs). */
  COUNTS: 8,
} as const;

export interface DmaLoopStart {
  readonly index: number;
  readonly shared: ViommuShared;
  readonly memory: GuestMemoryDescriptor;
  readonly control: SharedArrayBuffer;
  /** IOVA of the first page the guest keeps mapped for these workers, and how many pages. */
  readonly iova: number;
  readonly pages: number;
}
