import type { GuestMemoryDescriptor } from '../memory/index.js';
import type { LoopbackOptions } from '../devices/loopback.js';
import type { SharedTranslation } from '../ioasid/index.js';
import type { MigrationState } from '../virtio/device.js';
import type { MmioTransport } from '../virtio/mmio.js';
import type { PciSnapshot } from '../virtio/pci.js';

export type TransportKind = 'mmio' | 'pci';

/**
 * What a device worker needs to translate its DMA through a context's shared page tables, as the
 * endpoint worker does: the context's shared buffers and the device's row (Context.describeShared(),
 * Context.deviceRow()), the quiescence block every DMA is bracketed in (strict unmap), and the fault
 * ring with the word to bump when a record lands (the iommu worker's DeviceSignal.WAKE).
 */
export interface DeviceIommuSpec {
  readonly shared: SharedTranslation;
  /** The device's row in the context's device table. */
  readonly row: number;
  /** PASID its DMA carries; none by default. */
  readonly pasid?: number;
  readonly quiescence: SharedArrayBuffer;
  readonly faults: SharedArrayBuffer;
  /** Int32 words; `wakeIndex` is bumped and notified when a fault is appended. */
  readonly wake: SharedArrayBuffer;
  readonly wakeIndex: number;
}

/** Options of the virtio-net device in a worker. */
export interface VirtioNetSpecOptions {
  /** Six bytes (default 52:54:00:12:34:56). */
  readonly mac?: readonly number[];
  readonly queueSize?: number;
  /** Frames held while the receive queue is empty (default 64). */
  readonly rxBacklog?: number;
  /**
   * The IOMMU in front of the device: ACCESS_PLATFORM is offered and required, and every ring and
   * buffer address is an IOVA. Without it addresses are guest-physical and the bit is not offered.
   */
  readonly iommu?: DeviceIommuSpec;
}

/** Which device model a device worker hosts. Plain data: it crosses the thread boundary. */
export type DeviceModelSpec =
  | { readonly kind: 'loopback'; readonly options?: LoopbackOptions }
  | { readonly kind: 'virtio-net'; readonly options?: VirtioNetSpecOptions };

export type MmioSnapshot = ReturnType<MmioTransport['snapshot']>;

/**
 * A paused device worker's state (saveState()), plain data: what a worker started with it as
 * `restore` needs to go on where this one stopped. It carries no translation (device-table rows,
 * shared buffers): the destination's start message brings its own.
 */
export type DeviceWorkerState =
  | { readonly modelKind: DeviceModelSpec['kind']; readonly transportKind: 'mmio'; readonly transport: MmioSnapshot; readonly model: MigrationState | null }
  | { readonly modelKind: DeviceModelSpec['kind']; readonly transportKind: 'pci'; readonly transport: PciSnapshot; readonly model: MigrationState | null };

/** The one start message a device worker receives (as workerData). */
export interface DeviceWorkerStart {
  readonly name: string;
  readonly model: DeviceModelSpec;
  readonly transport: TransportKind;
  readonly memory: GuestMemoryDescriptor;
  /** The device's signal block (src/virtio/signals.ts). */
  readonly signals: SharedArrayBuffer;
  readonly maxSpinMicros?: number;
  /**
   * Start from a paused worker's saveState() instead of a device just reset: the model takes its
   * state, the transport resumes (queues at their saved positions), and every live queue is
   * treated as notified once. A state that does not fit fails the start.
   */
  readonly restore?: DeviceWorkerState;
}

export interface DeviceWorkerStats {
  readonly name: string;
  readonly doorbells: number;
  readonly mailboxAccesses: number;
  readonly wakeups: number;
  readonly status: number;
  readonly transport: Record<string, unknown>;
  /** The model's own counters, for models that keep any (virtio-net: VirtioNetStats). */
  readonly model?: Record<string, number>;
}

/** The control plane of a device worker (comlink). Never used per request. */
export interface DeviceWorkerApi {
  stats(): DeviceWorkerStats;
  /** Host-initiated device reset (as a VMM does on a machine reset). */
  reset(): void;
  /** Stops serving; resolves when the worker loop has exited. */
  stop(): Promise<void>;
  /**
   * Stops taking work and resolves once the device does none: no register access, doorbell or
   * DMA in progress. Doorbells and register accesses that arrive meanwhile wait.
   */
  pause(): Promise<void>;
  /** Serves again after pause(), starting with what arrived meanwhile. */
  resume(): void;
  /** The device's state, for a worker started with `restore`. Only while paused (throws otherwise). */
  saveState(): DeviceWorkerState;
}
