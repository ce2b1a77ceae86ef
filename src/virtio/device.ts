import type { GuestMemory } from '../memory/index.js';
import type { Logger } from '../log/logger.js';
import type { PlainValue } from '../migration/image.js';
import type { SplitQueue } from './split-queue.js';

/**
 * A virtio device model, written once and served by any transport (virtio-mmio, virtio-pci).
 * The transport owns status, feature negotiation and queue configuration; the model owns the
 * device-type specific parts: its queues' meaning, its config space and its feature bits.
 */
export interface VirtioDeviceModel {
  /** Virtio device ID (DeviceType). */
  readonly deviceType: number;
  /** Maximum size of each queue; the array length is the number of queues. */
  readonly queueMaxSizes: readonly number[];
  /** Every feature bit the device offers, transport-generic ones (VERSION_1, EVENT_IDX, ...) included. */
  readonly offeredFeatures: bigint;
  /** Bytes of device-specific configuration space. */
  readonly configSize: number;

  /**
   * Reads `size` bytes of device config at `offset` (little-endian; the transport has checked that
   * the access lies inside configSize). 8-byte fields are read as two 4-byte halves.
   */
  readConfig(offset: number, size: 1 | 2 | 4): number;
  /** A driver write to device config; read-only fields ignore it. */
  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void;

  /**
   * Called when the driver sets FEATURES_OK: return false to refuse the subset (the transport then
   * leaves FEATURES_OK clear, as virtio 1.2 §3.1.1 requires). Optional: default accepts.
   */
  validateFeatures?(negotiated: bigint): boolean;

  /** DRIVER_OK was set: the queues the driver enabled are live. */
  activate(env: DeviceEnvironment): void;
  /** The driver notified queue `queueIndex` (a doorbell). Only called while active. */
  notify(queueIndex: number): void;
  /** Device reset (status written 0, or the host resets the device): drop all driver-visible state. */
  reset(): void;

  /**
   * The model's own state beyond what its transport holds (config, counters, work taken from the
   * rings but not finished), as plain data. Called only while the device does no work (its worker
   * is paused). Optional: a model without state of its own leaves it out.
   */
  saveState?(): MigrationState;
  /**
   * Takes state from saveState() of a model of the same kind and configuration, possibly saved in
   * another worker. Called on a fresh model before the transport's restore() activates it. The
   * state may be hostile: a value that does not fit is refused whole (RangeError or TypeError
   * naming the field) and the model is left as it was.
   */
  restoreState?(state: unknown): void;
}

/** What a device model gets from its transport when it is activated. */
export interface DeviceEnvironment {
  readonly memory: GuestMemory;
  /** Negotiated features. */
  readonly features: bigint;
  /** One entry per queue; undefined when the driver did not enable that queue. */
  readonly queues: readonly (SplitQueue | undefined)[];
  /** Signals a used-buffer notification for `queueIndex` if the queue's suppression rules allow it. */
  notifyUsed(queueIndex: number): void;
  /** Signals a configuration change notification (config generation is bumped by the transport). */
  notifyConfigChange(): void;
  /**
   * The device hit an error it cannot recover from without a reset (virtio 1.2 §2.1.1: sets
   * DEVICE_NEEDS_RESET and sends a configuration change notification). Queue processing stops.
   */
  needsReset(reason: string): void;
  readonly log: Logger;
}

/**
 * The device's interrupt output as a transport drives it. `status` holds the pending causes, the
 * same bits on both transports: bit 0 used buffer (virtio-mmio InterruptStatus, virtio-pci ISR bit 0),
 * bit 1 configuration change. Called whenever the bits change; a set bit that was clear before is
 * an interrupt the guest must see.
 */
export interface InterruptLine {
  set(status: number): void;
}

export const InterruptCause = {
  USED_BUFFER: 1,
  CONFIG_CHANGE: 2,
} as const;

/**
 * A value that can cross to another machine as saved device state: plain data only, no undefined
 * values, Maps or class instances besides Uint8Array (the migration image's PlainValue).
 */
export type MigrationState = PlainValue;
