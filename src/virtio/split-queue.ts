import type { QueueMemory } from '../memory/index.js';

/** Where the driver placed a queue, and which ring features were negotiated. */
export interface SplitQueueConfig {
  /** Number of entries; a power of two between 1 and 32768 (checked by the transport). */
  readonly size: number;
  /** Descriptor table address (16-byte aligned). */
  readonly descAddr: number;
  /** Driver area (available ring) address (2-byte aligned). */
  readonly driverAddr: number;
  /** Device area (used ring) address (4-byte aligned). */
  readonly deviceAddr: number;
  /** VIRTIO_F_EVENT_IDX negotiated. */
  readonly eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated. */
  readonly indirect: boolean;
}

/** IMPLEMENTATION PENDING: see the queue module task. */
export class SplitQueue {
  constructor(
    readonly memory: QueueMemory,
    readonly config: SplitQueueConfig,
  ) {}
}
