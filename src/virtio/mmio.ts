import type { GuestMemory } from '../memory/index.js';
import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import { FeatureBit, hasFeature } from './constants.js';
import type { VirtioDeviceModel } from './device.js';
import type { AccessSize, MmioBus } from './bus.js';
import { joinU64, splitU64 } from './bus.js';
import type { TransportOptions, TransportSnapshot, TransportStats } from './transport.js';
import { VirtioTransportCore } from './transport.js';

/** virtio-mmio version 2 register layout (virtio 1.2 §4.2.2). Every register is 32 bits wide. */
export const MmioRegister = {
  magicValue: { offset: 0x000, size: 4 },
  version: { offset: 0x004, size: 4 },
  deviceId: { offset: 0x008, size: 4 },
  vendorId: { offset: 0x00c, size: 4 },
  deviceFeatures: { offset: 0x010, size: 4 },
  deviceFeaturesSel: { offset: 0x014, size: 4 },
  driverFeatures: { offset: 0x020, size: 4 },
  driverFeaturesSel: { offset: 0x024, size: 4 },
  queueSel: { offset: 0x030, size: 4 },
  queueNumMax: { offset: 0x034, size: 4 },
  queueNum: { offset: 0x038, size: 4 },
  queueReady: { offset: 0x044, size: 4 },
  queueNotify: { offset: 0x050, size: 4 },
  interruptStatus: { offset: 0x060, size: 4 },
  interruptAck: { offset: 0x064, size: 4 },
  status: { offset: 0x070, size: 4 },
  queueDescLow: { offset: 0x080, size: 4 },
  queueDescHigh: { offset: 0x084, size: 4 },
  queueDriverLow: { offset: 0x090, size: 4 },
  queueDriverHigh: { offset: 0x094, size: 4 },
  queueDeviceLow: { offset: 0x0a0, size: 4 },
  queueDeviceHigh: { offset: 0x0a4, size: 4 },
  shmSel: { offset: 0x0ac, size: 4 },
  shmLenLow: { offset: 0x0b0, size: 4 },
  shmLenHigh: { offset: 0x0b4, size: 4 },
  shmBaseLow: { offset: 0x0b8, size: 4 },
  shmBaseHigh: { offset: 0x0bc, size: 4 },
  queueReset: { offset: 0x0c0, size: 4 },
  configGeneration: { offset: 0x0fc, size: 4 },
  /** Device-specific configuration starts here and runs for the model's configSize bytes. */
  config: { offset: 0x100, size: 0 },
} as const;

/** "virt" in little-endian (virtio 1.2 §4.2.2). */
export const MMIO_MAGIC_VALUE = 0x7472_6976;
export const MMIO_VERSION = 2;
/** Offset of QueueNotify: a VMM may route writes here straight to the doorbell path. */
export const MMIO_QUEUE_NOTIFY_OFFSET = MmioRegister.queueNotify.offset;

/** Bytes of MMIO window a device with `configSize` bytes of config needs (at least the usual 0x200). */
export function mmioRegionSize(configSize: number): number {
  const end = MmioRegister.config.offset + configSize;
  return Math.max(0x200, Math.ceil(end / 0x100) * 0x100);
}

const R = MmioRegister;

export interface MmioTransportOptions extends TransportOptions {
  /** VendorID register (default 0x1af4, the virtio PCI vendor; Linux does not check it). */
  readonly vendorId?: number;
}

/**
 * virtio-mmio version 2, device side (virtio 1.2 §4.2). Registers are 32-bit wide and aligned;
 * device-specific config at 0x100 takes 8-, 16- and 32-bit accesses (and 8-byte ones, split, per
 * ./bus.ts).
 */
export class MmioTransport implements MmioBus {
  readonly core: VirtioTransportCore;
  readonly vendorId: number;
  private readonly log: Logger;
  private shmSel = 0;

  constructor(device: VirtioDeviceModel, memory: GuestMemory, options: MmioTransportOptions) {
    const log = (options.log ?? silentLogger).child({ transport: 'mmio' });
    this.core = new VirtioTransportCore(device, memory, { ...options, log });
    this.log = this.core.log;
    this.vendorId = (options.vendorId ?? 0x1af4) >>> 0;
  }

  read(offset: number, size: AccessSize): number {
    if (Number.isSafeInteger(offset) && offset >= R.config.offset) return this.readConfig(offset - R.config.offset, size);
    if (!this.registerAccessOk(offset, size, 'read')) return 0;
    const core = this.core;
    switch (offset) {
      case R.magicValue.offset:
        return MMIO_MAGIC_VALUE;
      case R.version.offset:
        return MMIO_VERSION;
      case R.deviceId.offset:
        return core.device.deviceType >>> 0;
      case R.vendorId.offset:
        return this.vendorId;
      case R.deviceFeatures.offset:
        return core.readDeviceFeatures();
      case R.queueNumMax.offset:
        // virtio 1.2 §4.2.2: 0 for a queue that is not available.
        return core.queueMaxSize(core.queueSelect);
      case R.queueReady.offset:
        return core.queueReady(core.queueSelect) ? 1 : 0;
      case R.interruptStatus.offset:
        return core.interruptStatus;
      case R.status.offset:
        return core.status;
      case R.shmLenLow.offset:
      case R.shmLenHigh.offset:
      case R.shmBaseLow.offset:
      case R.shmBaseHigh.offset:
        // virtio 1.2 §4.2.2: this device has no shared memory regions; a missing region reads as -1.
        return 0xffff_ffff;
      case R.queueReset.offset:
        // Queue resets complete synchronously (virtio 1.2 §4.2.2.1: 0 once the reset is done).
        return 0;
      case R.configGeneration.offset:
        return core.configGeneration >>> 0;
      case R.deviceFeaturesSel.offset:
      case R.driverFeatures.offset:
      case R.driverFeaturesSel.offset:
      case R.queueSel.offset:
      case R.queueNum.offset:
      case R.queueNotify.offset:
      case R.interruptAck.offset:
      case R.queueDescLow.offset:
      case R.queueDescHigh.offset:
      case R.queueDriverLow.offset:
      case R.queueDriverHigh.offset:
      case R.queueDeviceLow.offset:
      case R.queueDeviceHigh.offset:
      case R.shmSel.offset:
        // virtio 1.2 §4.2.2.2: the driver MUST NOT read write-only registers.
        this.log.debug({ offset }, 'read of a write-only virtio-mmio register');
        return 0;
      default:
        this.log.debug({ offset }, 'read of an undefined virtio-mmio register');
        return 0;
    }
  }

  write(offset: number, size: AccessSize, value: number): void {
    if (Number.isSafeInteger(offset) && offset >= R.config.offset) {
      this.writeConfig(offset - R.config.offset, size, value);
      return;
    }
    if (!this.registerAccessOk(offset, size, 'write')) return;
    const core = this.core;
    const v = value >>> 0;
    const q = core.queueSelect;
    switch (offset) {
      case R.deviceFeaturesSel.offset:
        core.deviceFeatureSelect = v;
        return;
      case R.driverFeatures.offset:
        core.writeDriverFeatures(v);
        return;
      case R.driverFeaturesSel.offset:
        core.driverFeatureSelect = v;
        return;
      case R.queueSel.offset:
        core.queueSelect = v;
        return;
      case R.queueNum.offset:
        core.setQueueSize(q, v);
        return;
      case R.queueReady.offset:
        if (v === 1) core.enableQueue(q);
        else if (v === 0) core.disableQueue(q);
        else this.log.warn({ queue: q, value: v }, 'QueueReady takes 0 or 1; ignored');
        return;
      case R.queueNotify.offset:
        this.notifyQueue(this.notifiedQueue(v));
        return;
      case R.interruptAck.offset:
        core.ackInterrupt(v);
        return;
      case R.status.offset:
        core.writeStatus(v);
        return;
      case R.queueDescLow.offset:
        core.setQueueAddress(q, 'desc', 'lo', v);
        return;
      case R.queueDescHigh.offset:
        core.setQueueAddress(q, 'desc', 'hi', v);
        return;
      case R.queueDriverLow.offset:
        core.setQueueAddress(q, 'driver', 'lo', v);
        return;
      case R.queueDriverHigh.offset:
        core.setQueueAddress(q, 'driver', 'hi', v);
        return;
      case R.queueDeviceLow.offset:
        core.setQueueAddress(q, 'device', 'lo', v);
        return;
      case R.queueDeviceHigh.offset:
        core.setQueueAddress(q, 'device', 'hi', v);
        return;
      case R.shmSel.offset:
        this.shmSel = v;
        return;
      case R.queueReset.offset:
        if (v === 1) core.resetQueue(q);
        else this.log.debug({ queue: q, value: v }, 'QueueReset takes 1; ignored');
        return;
      default:
        // Read-only and undefined registers: virtio 1.2 §4.2.2.2 forbids the write, the device drops it.
        this.log.debug({ offset, value: v }, 'write to a read-only or undefined virtio-mmio register; ignored');
        return;
    }
  }

  /** The doorbell path: an available-buffer notification for queue `index`. */
  notifyQueue(index: number): void {
    this.core.notifyQueue(index);
  }

  /** Host-initiated device reset. */
  reset(): void {
    this.core.reset();
  }

  stats(): TransportStats {
    return this.core.stats();
  }

  snapshot(): TransportSnapshot & { readonly mmio: { readonly shmSel: number } } {
    return { ...this.core.snapshot(), mmio: { shmSel: this.shmSel } };
  }

  /** Resumes from snapshot() of a transport of the same device (see TransportCore.restore()). */
  restore(snapshot: TransportSnapshot & { readonly mmio: { readonly shmSel: number } }): void {
    this.core.restore(snapshot);
    this.shmSel = snapshot.mmio.shmSel >>> 0;
  }

  /** virtio 1.2 §4.2.3.3: with NOTIFICATION_DATA the queue index is the low 16 bits of the value. */
  private notifiedQueue(value: number): number {
    return hasFeature(this.core.negotiated, FeatureBit.NOTIFICATION_DATA) ? value & 0xffff : value;
  }

  private registerAccessOk(offset: number, size: number, what: string): boolean {
    // virtio 1.2 §4.2.2.2: control registers take only 32-bit wide, aligned accesses.
    if (size !== 4 || !Number.isSafeInteger(offset) || offset < 0 || offset % 4 !== 0) {
      this.log.debug({ offset, size, what }, 'virtio-mmio register access is not 32-bit aligned; ignored');
      return false;
    }
    return true;
  }

  private readConfig(offset: number, size: AccessSize): number {
    if (size === 8) {
      if (offset % 8 !== 0) return this.badConfigSize(offset, size);
      const value = joinU64(this.core.readConfig(offset, 4), this.core.readConfig(offset + 4, 4));
      if (value === undefined) this.log.warn({ offset }, '8-byte config read of a value >= 2^53 returns 0; use two 4-byte reads');
      return value ?? 0;
    }
    if (size !== 1 && size !== 2 && size !== 4) return this.badConfigSize(offset, size);
    return this.core.readConfig(offset, size);
  }

  private writeConfig(offset: number, size: AccessSize, value: number): void {
    if (size === 8) {
      const halves = splitU64(value);
      if (offset % 8 !== 0 || halves === undefined) {
        this.badConfigSize(offset, size);
        return;
      }
      this.core.writeConfig(offset, 4, halves.lo);
      this.core.writeConfig(offset + 4, 4, halves.hi);
      return;
    }
    if (size !== 1 && size !== 2 && size !== 4) {
      this.badConfigSize(offset, size);
      return;
    }
    this.core.writeConfig(offset, size, value);
  }

  private badConfigSize(offset: number, size: number): number {
    this.log.debug({ offset, size }, 'virtio-mmio config access of unsupported width or alignment; ignored');
    return 0;
  }
}
