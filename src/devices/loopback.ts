import { FeatureBit, featureMask } from '../virtio/constants.js';
import type { DeviceEnvironment, VirtioDeviceModel } from '../virtio/device.js';
import { stateCount, stateRecord, stateU32 } from '../virtio/saved-state.js';
import { ChainReader, ChainWriter, QueueError } from '../virtio/split-queue.js';

/**
 * Device ID of the loopback test device: 63, the last ID a modern virtio-pci device can carry
 * (PCI device IDs 0x1040..0x107f) and not assigned by the virtio specification. The device exists
 * so the queue, transport and worker machinery can be exercised without any device meaning.
 */
export const LOOPBACK_DEVICE_TYPE = 63;

/** Config space of the loopback device. */
export const LoopbackConfig = {
  /** Chains served since reset (read-only). */
  served: { offset: 0, size: 4 },
  /** A register the driver may write and read back. */
  scratch: { offset: 4, size: 4 },
  SIZE: 8,
} as const;

/** The loopback device's own state (its config space), as saveState() gives it. */
export type LoopbackState = {
  /** Chains served since reset; config shows the low 32 bits. */
  readonly served: number;
  readonly scratch: number;
};

export interface LoopbackOptions {
  readonly queueSize?: number;
}

/**
 * A one-queue device that copies each chain's device-readable bytes into its device-writable
 * buffers and returns the number of bytes written.
 */
export class LoopbackDevice implements VirtioDeviceModel {
  readonly deviceType = LOOPBACK_DEVICE_TYPE;
  readonly queueMaxSizes: readonly number[];
  readonly offeredFeatures =
    featureMask(FeatureBit.VERSION_1) | featureMask(FeatureBit.EVENT_IDX) | featureMask(FeatureBit.INDIRECT_DESC);
  readonly configSize = LoopbackConfig.SIZE;

  private env: DeviceEnvironment | undefined;
  private served = 0;
  private scratch = 0;
  private scratchBuffer = new Uint8Array(4096);

  constructor(options: LoopbackOptions = {}) {
    this.queueMaxSizes = [options.queueSize ?? 256];
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    const bytes = new Uint8Array(LoopbackConfig.SIZE);
    const view = new DataView(bytes.buffer);
    view.setUint32(LoopbackConfig.served.offset, this.served >>> 0, true);
    view.setUint32(LoopbackConfig.scratch.offset, this.scratch >>> 0, true);
    if (offset < 0 || offset + size > LoopbackConfig.SIZE) return 0;
    return size === 1 ? view.getUint8(offset) : size === 2 ? view.getUint16(offset, true) : view.getUint32(offset, true);
  }

  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    // Only whole-register writes of `scratch` are meaningful; everything else is read-only.
    if (offset === LoopbackConfig.scratch.offset && size === 4) this.scratch = value >>> 0;
  }

  activate(env: DeviceEnvironment): void {
    this.env = env;
  }

  notify(queueIndex: number): void {
    const env = this.env;
    const queue = env?.queues[queueIndex];
    if (env === undefined || queue === undefined) return;
    for (;;) {
      const chain = queue.pop();
      if (chain === null) {
        // Re-arm notifications, then look once more: a buffer may have slipped in meanwhile.
        if (!queue.enableNotifications()) break;
        continue;
      }
      if (chain instanceof QueueError) {
        env.needsReset(`loopback queue: ${chain.reason}`);
        return;
      }
      const reader = new ChainReader(env.memory, chain.readable);
      const writer = new ChainWriter(env.memory, chain.writable);
      let written = 0;
      while (reader.remaining > 0 && writer.remaining > 0) {
        const n = Math.min(reader.remaining, writer.remaining, this.scratchBuffer.length);
        const part = this.scratchBuffer.subarray(0, n);
        reader.read(part);
        written += writer.write(part);
      }
      queue.addUsed(chain.head, written);
      this.served++;
    }
    queue.flushUsed();
    env.notifyUsed(queueIndex);
  }

  reset(): void {
    this.env = undefined;
    this.served = 0;
    this.scratch = 0;
  }

  saveState(): LoopbackState {
    return { served: this.served, scratch: this.scratch };
  }

  restoreState(state: unknown): void {
    const s = stateRecord(state, 'loopback', ['served', 'scratch']);
    const served = stateCount(s.served, 'loopback.served');
    const scratch = stateU32(s.scratch, 'loopback.scratch');
    this.served = served;
    this.scratch = scratch;
  }
}
