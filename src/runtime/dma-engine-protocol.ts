import type { SharedTranslation } from '../ioasid/index.js';
import type { TranslatorStats } from '../ioasid/translator.js';
import type { DmaEngineState, DmaEngineStats } from '../devices/dma-engine.js';
import type { GuestMemoryDescriptor } from '../memory/index.js';

/** How a consumer device worker reaches its translation: plain data from the iommu worker. */
export interface ConsumerTranslation {
  readonly shared: SharedTranslation;
  /** The device's row in the context's device table. */
  readonly row: number;
  /** The context's quiescence block (strict unmap). */
  readonly quiescence: SharedArrayBuffer;
  /** Fault ring drained by the iommu worker onto the virtio-iommu event queue. */
  readonly faults: SharedArrayBuffer;
  /** The iommu worker's signal block: faults wake it through DeviceSignal.WAKE. */
  readonly iommuSignals: SharedArrayBuffer;
}

/** A paused DMA-engine worker's state (saveState()), plain data; no translation in it. */
export type DmaEngineWorkerState = {
  readonly engine: DmaEngineState;
};

/** The one start message of a DMA-engine worker. */
export interface DmaEngineWorkerStart {
  readonly name: string;
  readonly memory: GuestMemoryDescriptor;
  /** The function's signal block: register mailbox and interrupt output. */
  readonly signals: SharedArrayBuffer;
  readonly translation: ConsumerTranslation;
  readonly pasidCapable?: boolean;
  /** Rest between passes of a repeating transfer, in microseconds (default 50; 0: none). */
  readonly repeatGapMicros?: number;
  readonly maxSpinMicros?: number;
  /**
   * Start from a paused worker's saveState(): registers, counters and a repeating transfer, which
   * goes on from its next pass. A state that does not fit fails the start.
   */
  readonly restore?: DmaEngineWorkerState;
}

export interface DmaEngineWorkerStats {
  readonly engine: DmaEngineStats;
  readonly translator: TranslatorStats;
  readonly registerAccesses: number;
  readonly wakeups: number;
}

/** Control plane of a DMA-engine worker (comlink); the guest uses the register mailbox. */
export interface DmaEngineWorkerApi {
  stats(): DmaEngineWorkerStats;
  /** Function-level reset, as the VMM does on a machine reset. */
  reset(): void;
  stop(): Promise<void>;
  /**
   * Stops serving and resolves once the engine does nothing: no register access served half-way,
   * a repeating transfer suspended between passes, no DMA in flight.
   */
  pause(): Promise<void>;
  /** Serves again after pause(); a suspended repeating transfer continues. */
  resume(): void;
  /** The engine's state, for a worker started with `restore`. Only while paused (throws otherwise). */
  saveState(): DmaEngineWorkerState;
}
