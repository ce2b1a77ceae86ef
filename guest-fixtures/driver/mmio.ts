import type { MmioBus } from '../../src/virtio/bus.js';
import type { DriverTransport, QueueLayout } from './transport.js';
import { featureWord } from './transport.js';

/** virtio-mmio v2 register offsets (virtio 1.2 §4.2.2), the guest's own copy. */
export const VIRTIO_MMIO = {
  MAGIC_VALUE: 0x000,
  VERSION: 0x004,
  DEVICE_ID: 0x008,
  VENDOR_ID: 0x00c,
  DEVICE_FEATURES: 0x010,
  DEVICE_FEATURES_SEL: 0x014,
  DRIVER_FEATURES: 0x020,
  DRIVER_FEATURES_SEL: 0x024,
  QUEUE_SEL: 0x030,
  QUEUE_NUM_MAX: 0x034,
  QUEUE_NUM: 0x038,
  QUEUE_READY: 0x044,
  QUEUE_NOTIFY: 0x050,
  INTERRUPT_STATUS: 0x060,
  INTERRUPT_ACK: 0x064,
  STATUS: 0x070,
  QUEUE_DESC_LOW: 0x080,
  QUEUE_DESC_HIGH: 0x084,
  QUEUE_DRIVER_LOW: 0x090,
  QUEUE_DRIVER_HIGH: 0x094,
  QUEUE_DEVICE_LOW: 0x0a0,
  QUEUE_DEVICE_HIGH: 0x0a4,
  SHM_SEL: 0x0ac,
  SHM_LEN_LOW: 0x0b0,
  SHM_LEN_HIGH: 0x0b4,
  SHM_BASE_LOW: 0x0b8,
  SHM_BASE_HIGH: 0x0bc,
  QUEUE_RESET: 0x0c0,
  CONFIG_GENERATION: 0x0fc,
  CONFIG: 0x100,
} as const;

const MAGIC = 0x7472_6976; // "virt"
/** Feature words the driver reads and writes (bits 0..127). */
const FEATURE_WORDS = 4;
/** Queues probed when counting: QueueNumMax reads 0 past the last one. */
const MAX_PROBED_QUEUES = 1024;
const RESET_POLL_LIMIT = 1000;

/** Why probing found no usable virtio-mmio device. */
export class MmioProbeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MmioProbeError';
  }
}

/**
 * A guest's virtio-mmio driver (the part Linux keeps in virtio_mmio.c): probes the window, then
 * implements DriverTransport with 32-bit register accesses only (virtio 1.2 §4.2.2.2).
 */
export class MmioDriverTransport implements DriverTransport {
  readonly kind = 'mmio' as const;
  readonly deviceType: number;
  readonly vendorId: number;

  /** Probes as virtio 1.2 §4.2.3.1.1 requires: magic, version 2, then a non-zero device ID. */
  constructor(private readonly bus: MmioBus) {
    const magic = bus.read(VIRTIO_MMIO.MAGIC_VALUE, 4);
    if (magic !== MAGIC) throw new MmioProbeError(`bad virtio-mmio magic 0x${magic.toString(16)}`);
    const version = bus.read(VIRTIO_MMIO.VERSION, 4);
    if (version !== 2) throw new MmioProbeError(`unsupported virtio-mmio version ${version} (need 2)`);
    const deviceType = bus.read(VIRTIO_MMIO.DEVICE_ID, 4);
    if (deviceType === 0) throw new MmioProbeError('placeholder virtio-mmio device (ID 0)');
    this.deviceType = deviceType;
    this.vendorId = bus.read(VIRTIO_MMIO.VENDOR_ID, 4);
  }

  reset(): void {
    this.bus.write(VIRTIO_MMIO.STATUS, 4, 0);
    for (let i = 0; i < RESET_POLL_LIMIT; i++) {
      if (this.getStatus() === 0) return;
    }
    throw new Error('virtio-mmio device did not complete reset');
  }

  getStatus(): number {
    return this.bus.read(VIRTIO_MMIO.STATUS, 4) & 0xff;
  }

  setStatus(status: number): void {
    this.bus.write(VIRTIO_MMIO.STATUS, 4, status & 0xff);
  }

  readDeviceFeatures(): bigint {
    let features = 0n;
    for (let word = 0; word < FEATURE_WORDS; word++) {
      this.bus.write(VIRTIO_MMIO.DEVICE_FEATURES_SEL, 4, word);
      features |= BigInt(this.bus.read(VIRTIO_MMIO.DEVICE_FEATURES, 4)) << BigInt(32 * word);
    }
    return features;
  }

  writeDriverFeatures(features: bigint): void {
    for (let word = 0; word < FEATURE_WORDS; word++) {
      this.bus.write(VIRTIO_MMIO.DRIVER_FEATURES_SEL, 4, word);
      this.bus.write(VIRTIO_MMIO.DRIVER_FEATURES, 4, featureWord(features, word));
    }
  }

  numQueues(): number {
    let n = 0;
    while (n < MAX_PROBED_QUEUES && this.queueMaxSize(n) !== 0) n++;
    return n;
  }

  queueMaxSize(index: number): number {
    this.bus.write(VIRTIO_MMIO.QUEUE_SEL, 4, index);
    return this.bus.read(VIRTIO_MMIO.QUEUE_NUM_MAX, 4);
  }

  /** virtio 1.2 §4.2.3.2: select, check not in use, size, then the three area addresses. */
  setupQueue(index: number, layout: QueueLayout): void {
    const b = this.bus;
    b.write(VIRTIO_MMIO.QUEUE_SEL, 4, index);
    if (b.read(VIRTIO_MMIO.QUEUE_READY, 4) !== 0) throw new Error(`virtio-mmio queue ${index} is already in use`);
    b.write(VIRTIO_MMIO.QUEUE_NUM, 4, layout.size);
    writeAddress(b, VIRTIO_MMIO.QUEUE_DESC_LOW, layout.desc);
    writeAddress(b, VIRTIO_MMIO.QUEUE_DRIVER_LOW, layout.driver);
    writeAddress(b, VIRTIO_MMIO.QUEUE_DEVICE_LOW, layout.device);
  }

  enableQueue(index: number): void {
    this.bus.write(VIRTIO_MMIO.QUEUE_SEL, 4, index);
    this.bus.write(VIRTIO_MMIO.QUEUE_READY, 4, 1);
  }

  queueEnabled(index: number): boolean {
    this.bus.write(VIRTIO_MMIO.QUEUE_SEL, 4, index);
    return this.bus.read(VIRTIO_MMIO.QUEUE_READY, 4) === 1;
  }

  /** virtio 1.2 §4.2.2.2: write 0 to QueueReady and read it back to stop using a queue. */
  disableQueue(index: number): void {
    this.bus.write(VIRTIO_MMIO.QUEUE_SEL, 4, index);
    this.bus.write(VIRTIO_MMIO.QUEUE_READY, 4, 0);
    if (this.bus.read(VIRTIO_MMIO.QUEUE_READY, 4) !== 0) throw new Error(`virtio-mmio queue ${index} did not stop`);
  }

  resetQueue(index: number): void {
    this.bus.write(VIRTIO_MMIO.QUEUE_SEL, 4, index);
    this.bus.write(VIRTIO_MMIO.QUEUE_RESET, 4, 1);
    for (let i = 0; i < RESET_POLL_LIMIT; i++) {
      if (this.bus.read(VIRTIO_MMIO.QUEUE_RESET, 4) === 0) return;
    }
    throw new Error(`virtio-mmio queue ${index} reset did not complete`);
  }

  notify(index: number): void {
    this.bus.write(VIRTIO_MMIO.QUEUE_NOTIFY, 4, index);
  }

  configGeneration(): number {
    return this.bus.read(VIRTIO_MMIO.CONFIG_GENERATION, 4);
  }

  configRead(offset: number, size: 1 | 2 | 4): number {
    return this.bus.read(VIRTIO_MMIO.CONFIG + offset, size);
  }

  configWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    this.bus.write(VIRTIO_MMIO.CONFIG + offset, size, value);
  }

  takeInterrupts(): number {
    const pending = this.bus.read(VIRTIO_MMIO.INTERRUPT_STATUS, 4);
    if (pending !== 0) this.bus.write(VIRTIO_MMIO.INTERRUPT_ACK, 4, pending);
    return pending;
  }
}

function writeAddress(bus: MmioBus, lowOffset: number, address: number): void {
  bus.write(lowOffset, 4, address % 0x1_0000_0000);
  bus.write(lowOffset + 4, 4, Math.floor(address / 0x1_0000_0000));
}
