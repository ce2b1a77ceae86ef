import type { GuestMemoryDescriptor } from '../memory/index.js';
import type { LoopbackOptions } from '../devices/loopback.js';

export type TransportKind = 'mmio' | 'pci';

/** Which device model a device worker hosts. Plain data: it crosses the thread boundary. */
export type DeviceModelSpec = { readonly kind: 'loopback'; readonly options?: LoopbackOptions };

/** The one start message a device worker receives (as workerData). */
export interface DeviceWorkerStart {
  readonly name: string;
  readonly model: DeviceModelSpec;
  readonly transport: TransportKind;
  readonly memory: GuestMemoryDescriptor;
  /** The device's signal block (src/virtio/signals.ts). */
  readonly signals: SharedArrayBuffer;
  readonly maxSpinMicros?: number;
}

export interface DeviceWorkerStats {
  readonly name: string;
  readonly doorbells: number;
  readonly mailboxAccesses: number;
  readonly wakeups: number;
  readonly status: number;
  readonly transport: Record<string, unknown>;
}

/** The control plane of a device worker (comlink). Never used per request. */
export interface DeviceWorkerApi {
  stats(): DeviceWorkerStats;
  /** Host-initiated device reset (as a VMM does on a machine reset). */
  reset(): void;
  /** Stops serving; resolves when the worker loop has exited. */
  stop(): Promise<void>;
}
