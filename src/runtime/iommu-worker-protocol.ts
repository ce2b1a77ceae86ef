import type { HostSnapshot, SharedTranslation } from '../ioasid/index.js';
import type { VirtioIommuOptions, VirtioIommuStats } from '../iommu/device.js';
import type { GuestMemoryDescriptor } from '../memory/index.js';
import type { TransportKind } from './device-worker-protocol.js';

/** An endpoint behind the virtio-iommu, and the backend device it is. Plain data. */
export interface EndpointSpec {
  /** Endpoint ID the guest uses (PCI requester ID). */
  readonly id: number;
  /** Name of the physical device in the backend. */
  readonly device: string;
  /** Isolation group; endpoints sharing one must share a domain. */
  readonly group: number | string;
  /** Reserved IOVA ranges [start, last] (e.g. the x86 MSI window). */
  readonly reservedRegions: readonly (readonly [bigint, bigint])[];
  readonly pasidBits?: number;
  /** 'access': a software consumer (no bound device; an iommufd access on its domain's IOAS). */
  readonly consumer?: 'device' | 'access';
}

/** The one start message of the iommu worker. */
export interface IommuWorkerStart {
  readonly name: string;
  readonly transport: TransportKind;
  readonly memory: GuestMemoryDescriptor;
  /** The device's signal block (src/virtio/signals.ts). */
  readonly signals: SharedArrayBuffer;
  readonly endpoints: readonly EndpointSpec[];
  readonly device: Omit<VirtioIommuOptions, 'endpoints' | 'log'>;
  readonly memlockLimitPages?: number;
  /** Device workers' DMA brackets: the strict-unmap handshake. */
  readonly quiescence: SharedArrayBuffer;
  /** Fault records from device workers. */
  readonly faults: SharedArrayBuffer;
  readonly quiescenceTimeoutMs?: number;
  readonly maxSpinMicros?: number;
  /**
   * Migration: start from a saved state (saveState() of a worker configured the same, over a copy
   * of its guest memory) instead of a fresh device. Checked whole: a state that does not fit makes
   * the worker fail to start, saying why; nothing runs half restored.
   */
  readonly restore?: IommuWorkerState;
}

/**
 * Everything the iommu worker holds, as plain data: the iommufd context (objects with their IDs,
 * areas, attachments, dirty bits), which backend objects are whose, the virtio-iommu model and
 * its transport (registers, negotiated features, queue positions).
 */
export type IommuWorkerState = {
  readonly backend: unknown;
  readonly adapter: unknown;
  readonly device: unknown;
  readonly transport: unknown;
};

/** What a consumer device worker needs to translate an endpoint's DMA itself. */
export interface EndpointTranslation {
  readonly endpoint: number;
  readonly shared: SharedTranslation;
  /** The endpoint's device-table row: the `deviceSlot` of its translations and fault records. */
  readonly row: number;
}

export interface IommuWorkerStats {
  readonly device: VirtioIommuStats;
  readonly transport: Record<string, unknown>;
  readonly backend: { readonly pinnedPages: number; readonly accountedPages: number; readonly pinReferences: number };
  readonly faultQueue: { readonly drained: number; readonly dropped: number };
  readonly doorbells: number;
  readonly wakeups: number;
}

/** Control plane of the iommu worker (comlink); never used per request. */
export interface IommuWorkerApi {
  stats(): IommuWorkerStats;
  /** Device reset as the host does it (the guest resets through the status register). */
  reset(): void;
  /** Machine reset: device reset and config `bypass` back to its boot value. */
  systemReset(): void;
  /** Moves every fault record device workers queued so far onto the event queue; returns how many. */
  flushFaults(): number;
  endpointTranslation(endpoint: number): EndpointTranslation;
  /**
   * The device behind `endpoint` is gone (its worker died): detach it in the backend and ignore
   * its later attachment changes. The VMM calls this after freeing the worker's quiescence slots.
   */
  consumerGone(endpoint: number): void;
  /**
   * What another process opening /dev/iommu on this host gets when it binds `device`: 'OK' (then
   * it lets go again) or the errno, e.g. EBUSY while this machine's context owns the device's group.
   */
  foreignBind(device: string): string;
  /**
   * Stops serving the guest (requests, register accesses and event buffers wait) until resume();
   * resolves once no pass is running. Fault records keep queueing in the shared fault queue.
   */
  pause(): Promise<void>;
  resume(): void;
  /** The worker's state for a migration; only while paused. Drains pending fault records first. */
  saveState(): IommuWorkerState;
  /**
   * Dirty tracking on every paging HWPT (and those made while it is on), for a migration's
   * pre-copy; switching it on starts a clean log.
   */
  setDirtyTracking(enable: boolean): void;
  /** Guest page frames (GPA / 4 KiB) DMA by bound devices wrote since the last call; clears the log. */
  dirtyPages(): number[];
  /** The backend's full state (objects, areas, pins): for tests and diagnostics. */
  inspect(): HostSnapshot;
  stop(): Promise<void>;
}
