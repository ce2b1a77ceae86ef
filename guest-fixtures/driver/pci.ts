import type { PciBus } from '../../src/virtio/bus.js';
import type { DriverTransport, QueueLayout } from './transport.js';
import { featureWord } from './transport.js';

/** PCI configuration header offsets the driver uses (type 0 header), the guest's own copy. */
export const PCI_CFG = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION_ID: 0x08,
  CLASS_PROG: 0x09,
  BAR0: 0x10,
  BAR1: 0x14,
  SUBSYSTEM_VENDOR_ID: 0x2c,
  SUBSYSTEM_ID: 0x2e,
  CAPABILITY_LIST: 0x34,
  INTERRUPT_PIN: 0x3d,
} as const;
export const PCI_COMMAND_MEMORY = 0x2;
export const PCI_COMMAND_MASTER = 0x4;
export const PCI_STATUS_CAP_LIST = 0x10;
export const PCI_CAP_ID_VNDR = 0x09;

/** virtio_pci_cap fields and cfg_type values (virtio 1.2 §4.1.4). */
export const VIRTIO_PCI_CAP = {
  CFG_TYPE: 3,
  BAR: 4,
  ID: 5,
  OFFSET: 8,
  LENGTH: 12,
  NOTIFY_OFF_MULTIPLIER: 16,
  PCI_CFG_DATA: 16,
} as const;
export const VIRTIO_PCI_CAP_TYPE = {
  COMMON_CFG: 1,
  NOTIFY_CFG: 2,
  ISR_CFG: 3,
  DEVICE_CFG: 4,
  PCI_CFG: 5,
} as const;

/** virtio_pci_common_cfg offsets (virtio 1.2 §4.1.4.3). */
export const VIRTIO_PCI_COMMON = {
  DFSELECT: 0x00,
  DF: 0x04,
  GFSELECT: 0x08,
  GF: 0x0c,
  MSIX: 0x10,
  NUMQ: 0x12,
  STATUS: 0x14,
  CFGGENERATION: 0x15,
  Q_SELECT: 0x16,
  Q_SIZE: 0x18,
  Q_MSIX: 0x1a,
  Q_ENABLE: 0x1c,
  Q_NOFF: 0x1e,
  Q_DESCLO: 0x20,
  Q_DESCHI: 0x24,
  Q_AVAILLO: 0x28,
  Q_AVAILHI: 0x2c,
  Q_USEDLO: 0x30,
  Q_USEDHI: 0x34,
  Q_NDATA: 0x38,
  Q_RESET: 0x3a,
} as const;

const FEATURE_WORDS = 4;
const RESET_POLL_LIMIT = 1000;
/** Bound on the capability walk: a looping list from a hostile device must not hang the guest. */
const MAX_CAPABILITIES = 48;

/** Where one virtio structure was found: which BAR and where in it. */
export interface VirtioPciRegion {
  readonly bar: number;
  readonly offset: number;
  readonly length: number;
  /** Offset of the capability in configuration space. */
  readonly capOffset: number;
}

export interface PciDriverOptions {
  /** Guest-physical address to place BAR 0 at; must be aligned to the BAR's size. */
  readonly bar0Address: number;
  /** Reach every structure through the VIRTIO_PCI_CAP_PCI_CFG window instead of the BAR. */
  readonly useConfigWindow?: boolean;
}

export class PciProbeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PciProbeError';
  }
}

/**
 * A guest's virtio-pci modern driver (Linux's virtio_pci_modern): checks the IDs, walks the
 * capability list for the virtio structures, sizes and places BAR 0, enables memory decoding and
 * bus mastering, then implements DriverTransport through the structures.
 */
export class PciDriverTransport implements DriverTransport {
  readonly kind = 'pci' as const;
  readonly deviceType: number;
  readonly common: VirtioPciRegion;
  readonly notifyRegion: VirtioPciRegion;
  readonly notifyOffMultiplier: number;
  readonly isr: VirtioPciRegion;
  readonly device: VirtioPciRegion | undefined;
  /** The PCI configuration access capability, if present. */
  readonly cfgWindow: VirtioPciRegion | undefined;
  /** Every vendor capability seen, in list order (for tests that check the layout). */
  readonly capabilities: readonly (VirtioPciRegion & { readonly type: number })[];
  readonly barSize: number;
  readonly bar0Address: number;
  private readonly viaWindow: boolean;
  /** Notify offsets read at queue setup, as a kernel caches them (no queue_select churn per kick). */
  private readonly notifyOffsets = new Map<number, number>();

  constructor(
    private readonly bus: PciBus,
    options: PciDriverOptions,
  ) {
    const vendor = bus.configRead(PCI_CFG.VENDOR_ID, 2);
    const deviceId = bus.configRead(PCI_CFG.DEVICE_ID, 2);
    // virtio 1.2 §4.1.2.2: vendor 0x1af4, modern device IDs 0x1040..0x107f.
    if (vendor !== 0x1af4) throw new PciProbeError(`not a virtio device: vendor 0x${vendor.toString(16)}`);
    if (deviceId < 0x1040 || deviceId > 0x107f) throw new PciProbeError(`not a modern virtio device: device 0x${deviceId.toString(16)}`);
    this.deviceType = deviceId - 0x1040;
    if ((bus.configRead(PCI_CFG.STATUS, 2) & PCI_STATUS_CAP_LIST) === 0) {
      throw new PciProbeError('no capability list: a legacy device, which this driver does not handle');
    }

    const caps = this.walkCapabilities();
    this.capabilities = caps;
    const first = (type: number) => caps.find((c) => c.type === type);
    const common = first(VIRTIO_PCI_CAP_TYPE.COMMON_CFG);
    const notify = first(VIRTIO_PCI_CAP_TYPE.NOTIFY_CFG);
    const isr = first(VIRTIO_PCI_CAP_TYPE.ISR_CFG);
    if (common === undefined || notify === undefined || isr === undefined) {
      throw new PciProbeError('missing a common, notify or ISR capability');
    }
    if (common.length < 0x38) throw new PciProbeError(`common config of ${common.length} bytes is too small`);
    this.common = common;
    this.notifyRegion = notify;
    this.notifyOffMultiplier = bus.configRead(notify.capOffset + VIRTIO_PCI_CAP.NOTIFY_OFF_MULTIPLIER, 4);
    this.isr = isr;
    this.device = first(VIRTIO_PCI_CAP_TYPE.DEVICE_CFG);
    this.cfgWindow = first(VIRTIO_PCI_CAP_TYPE.PCI_CFG);
    for (const region of [common, notify, isr, this.device]) {
      if (region !== undefined && region.bar !== 0) throw new PciProbeError(`structure in BAR ${region.bar}: this driver maps only BAR 0`);
    }

    this.barSize = this.sizeBar0();
    if (options.bar0Address % this.barSize !== 0) {
      throw new PciProbeError(`BAR 0 address 0x${options.bar0Address.toString(16)} is not aligned to its size 0x${this.barSize.toString(16)}`);
    }
    bus.configWrite(PCI_CFG.BAR0, 4, options.bar0Address % 0x1_0000_0000);
    bus.configWrite(PCI_CFG.BAR1, 4, Math.floor(options.bar0Address / 0x1_0000_0000));
    this.bar0Address = options.bar0Address;
    const command = bus.configRead(PCI_CFG.COMMAND, 2);
    bus.configWrite(PCI_CFG.COMMAND, 2, command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    this.viaWindow = options.useConfigWindow ?? false;
    if (this.viaWindow && this.cfgWindow === undefined) throw new PciProbeError('no PCI_CFG capability to use');
    for (const region of [common, notify, isr, this.device]) {
      if (region !== undefined && region.offset + region.length > this.barSize) {
        throw new PciProbeError(`structure at 0x${region.offset.toString(16)}+${region.length} runs past BAR 0`);
      }
    }
  }

  /** Follows the capability pointers, collecting vendor-specific (virtio) capabilities. */
  private walkCapabilities(): (VirtioPciRegion & { type: number })[] {
    const bus = this.bus;
    const found: (VirtioPciRegion & { type: number })[] = [];
    let ptr = bus.configRead(PCI_CFG.CAPABILITY_LIST, 1) & 0xfc;
    const seen = new Set<number>();
    while (ptr !== 0) {
      if (seen.has(ptr) || seen.size >= MAX_CAPABILITIES || ptr < 0x40) throw new PciProbeError('malformed capability list');
      seen.add(ptr);
      const id = bus.configRead(ptr, 1);
      const next = bus.configRead(ptr + 1, 1) & 0xfc;
      if (id === PCI_CAP_ID_VNDR) {
        const type = bus.configRead(ptr + VIRTIO_PCI_CAP.CFG_TYPE, 1);
        const bar = bus.configRead(ptr + VIRTIO_PCI_CAP.BAR, 1);
        // virtio 1.2 §4.1.4.1: ignore capabilities naming a reserved BAR.
        if (bar <= 5) {
          found.push({
            type,
            bar,
            offset: bus.configRead(ptr + VIRTIO_PCI_CAP.OFFSET, 4),
            length: bus.configRead(ptr + VIRTIO_PCI_CAP.LENGTH, 4),
            capOffset: ptr,
          });
        }
      }
      ptr = next;
    }
    return found;
  }

  /** Standard BAR sizing: decode off, write all-ones, read the mask back, restore. */
  private sizeBar0(): number {
    const bus = this.bus;
    const command = bus.configRead(PCI_CFG.COMMAND, 2);
    bus.configWrite(PCI_CFG.COMMAND, 2, command & ~PCI_COMMAND_MEMORY);
    const lo = bus.configRead(PCI_CFG.BAR0, 4);
    if ((lo & 1) !== 0) throw new PciProbeError('BAR 0 is an I/O BAR');
    const is64 = ((lo >>> 1) & 3) === 2;
    const hi = is64 ? bus.configRead(PCI_CFG.BAR1, 4) : 0;
    bus.configWrite(PCI_CFG.BAR0, 4, 0xffff_ffff);
    if (is64) bus.configWrite(PCI_CFG.BAR1, 4, 0xffff_ffff);
    const maskLo = BigInt((bus.configRead(PCI_CFG.BAR0, 4) & ~0xf) >>> 0);
    const maskHi = is64 ? BigInt(bus.configRead(PCI_CFG.BAR1, 4)) : 0xffff_ffffn;
    bus.configWrite(PCI_CFG.BAR0, 4, lo);
    if (is64) bus.configWrite(PCI_CFG.BAR1, 4, hi);
    bus.configWrite(PCI_CFG.COMMAND, 2, command);
    const mask = (maskHi << 32n) | maskLo;
    if (mask === 0n) throw new PciProbeError('BAR 0 is not implemented');
    const size = BigInt.asUintN(64, ~mask + 1n);
    return Number(size);
  }

  // ---- structure access ---------------------------------------------------------------------------

  private read(region: VirtioPciRegion, offset: number, size: 1 | 2 | 4): number {
    return this.viaWindow ? this.windowRead(region.bar, region.offset + offset, size) : this.bus.barRead(region.bar, region.offset + offset, size);
  }

  private write(region: VirtioPciRegion, offset: number, size: 1 | 2 | 4, value: number): void {
    if (this.viaWindow) this.windowWrite(region.bar, region.offset + offset, size, value);
    else this.bus.barWrite(region.bar, region.offset + offset, size, value);
  }

  private setWindow(bar: number, offset: number, size: 1 | 2 | 4): number {
    const cap = this.cfgWindow!.capOffset;
    this.bus.configWrite(cap + VIRTIO_PCI_CAP.BAR, 1, bar);
    this.bus.configWrite(cap + VIRTIO_PCI_CAP.OFFSET, 4, offset);
    this.bus.configWrite(cap + VIRTIO_PCI_CAP.LENGTH, 4, size);
    return cap + VIRTIO_PCI_CAP.PCI_CFG_DATA;
  }

  /** virtio 1.2 §4.1.4.9: a BAR access through the configuration access capability. */
  windowRead(bar: number, offset: number, size: 1 | 2 | 4): number {
    const data = this.setWindow(bar, offset, size);
    return this.bus.configRead(data, size);
  }

  windowWrite(bar: number, offset: number, size: 1 | 2 | 4, value: number): void {
    const data = this.setWindow(bar, offset, size);
    this.bus.configWrite(data, size, value);
  }

  // ---- DriverTransport ----------------------------------------------------------------------------

  reset(): void {
    this.setStatus(0);
    // virtio 1.2 §4.1.4.3.2: wait for device_status to read 0 before reinitializing.
    for (let i = 0; i < RESET_POLL_LIMIT; i++) {
      if (this.getStatus() === 0) return;
    }
    throw new Error('virtio-pci device did not complete reset');
  }

  getStatus(): number {
    return this.read(this.common, VIRTIO_PCI_COMMON.STATUS, 1);
  }

  setStatus(status: number): void {
    this.write(this.common, VIRTIO_PCI_COMMON.STATUS, 1, status & 0xff);
  }

  readDeviceFeatures(): bigint {
    let features = 0n;
    for (let word = 0; word < FEATURE_WORDS; word++) {
      this.write(this.common, VIRTIO_PCI_COMMON.DFSELECT, 4, word);
      features |= BigInt(this.read(this.common, VIRTIO_PCI_COMMON.DF, 4)) << BigInt(32 * word);
    }
    return features;
  }

  writeDriverFeatures(features: bigint): void {
    for (let word = 0; word < FEATURE_WORDS; word++) {
      this.write(this.common, VIRTIO_PCI_COMMON.GFSELECT, 4, word);
      this.write(this.common, VIRTIO_PCI_COMMON.GF, 4, featureWord(features, word));
    }
  }

  numQueues(): number {
    return this.read(this.common, VIRTIO_PCI_COMMON.NUMQ, 2);
  }

  queueMaxSize(index: number): number {
    this.write(this.common, VIRTIO_PCI_COMMON.Q_SELECT, 2, index);
    return this.read(this.common, VIRTIO_PCI_COMMON.Q_SIZE, 2);
  }

  setupQueue(index: number, layout: QueueLayout): void {
    const c = this.common;
    this.write(c, VIRTIO_PCI_COMMON.Q_SELECT, 2, index);
    if (this.read(c, VIRTIO_PCI_COMMON.Q_ENABLE, 2) !== 0) throw new Error(`virtio-pci queue ${index} is already enabled`);
    this.write(c, VIRTIO_PCI_COMMON.Q_SIZE, 2, layout.size);
    this.writeAddress(VIRTIO_PCI_COMMON.Q_DESCLO, layout.desc);
    this.writeAddress(VIRTIO_PCI_COMMON.Q_AVAILLO, layout.driver);
    this.writeAddress(VIRTIO_PCI_COMMON.Q_USEDLO, layout.device);
    this.notifyOffsets.set(index, this.notifyAddress(index));
  }

  private writeAddress(lowOffset: number, address: number): void {
    this.write(this.common, lowOffset, 4, address % 0x1_0000_0000);
    this.write(this.common, lowOffset + 4, 4, Math.floor(address / 0x1_0000_0000));
  }

  enableQueue(index: number): void {
    this.write(this.common, VIRTIO_PCI_COMMON.Q_SELECT, 2, index);
    this.write(this.common, VIRTIO_PCI_COMMON.Q_ENABLE, 2, 1);
  }

  queueEnabled(index: number): boolean {
    this.write(this.common, VIRTIO_PCI_COMMON.Q_SELECT, 2, index);
    return this.read(this.common, VIRTIO_PCI_COMMON.Q_ENABLE, 2) === 1;
  }

  resetQueue(index: number): void {
    this.write(this.common, VIRTIO_PCI_COMMON.Q_SELECT, 2, index);
    this.write(this.common, VIRTIO_PCI_COMMON.Q_RESET, 2, 1);
    for (let i = 0; i < RESET_POLL_LIMIT; i++) {
      if (this.read(this.common, VIRTIO_PCI_COMMON.Q_RESET, 2) === 0) return;
    }
    throw new Error(`virtio-pci queue ${index} reset did not complete`);
  }

  /** Offset in BAR 0 of queue `index`'s notify address (virtio 1.2 §4.1.4.4). */
  notifyAddress(index: number): number {
    this.write(this.common, VIRTIO_PCI_COMMON.Q_SELECT, 2, index);
    const notifyOff = this.read(this.common, VIRTIO_PCI_COMMON.Q_NOFF, 2);
    return this.notifyRegion.offset + notifyOff * this.notifyOffMultiplier;
  }

  notify(index: number): void {
    const at = this.notifyOffsets.get(index) ?? this.notifyAddress(index);
    if (this.viaWindow) this.windowWrite(this.notifyRegion.bar, at, 2, index);
    else this.bus.barWrite(this.notifyRegion.bar, at, 2, index);
  }

  configGeneration(): number {
    return this.read(this.common, VIRTIO_PCI_COMMON.CFGGENERATION, 1);
  }

  configRead(offset: number, size: 1 | 2 | 4): number {
    if (this.device === undefined) throw new Error('device has no device-specific configuration');
    return this.read(this.device, offset, size);
  }

  configWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    if (this.device === undefined) throw new Error('device has no device-specific configuration');
    this.write(this.device, offset, size, value);
  }

  /** virtio 1.2 §4.1.4.5: reading the ISR returns the causes and acknowledges them. */
  takeInterrupts(): number {
    return this.read(this.isr, 0, 1);
  }
}
