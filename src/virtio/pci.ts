import type { GuestMemory } from '../memory/index.js';
import { formatAddress } from '../memory/index.js';
import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import { DeviceType } from './constants.js';
import type { InterruptLine, VirtioDeviceModel } from './device.js';
import type { AccessSize, PciBus } from './bus.js';
import { allOnes, isAligned, joinU64, splitU64, truncateValue } from './bus.js';
import type { QueueArea, TransportOptions, TransportSnapshot, TransportStats } from './transport.js';
import { VirtioTransportCore } from './transport.js';

/** Type 0 configuration header (PCI Local Bus 3.0 §6.1). */
export const PciHeader = {
  vendorId: { offset: 0x00, size: 2 },
  deviceId: { offset: 0x02, size: 2 },
  command: { offset: 0x04, size: 2 },
  status: { offset: 0x06, size: 2 },
  revisionId: { offset: 0x08, size: 1 },
  classCode: { offset: 0x09, size: 3 },
  cacheLineSize: { offset: 0x0c, size: 1 },
  latencyTimer: { offset: 0x0d, size: 1 },
  headerType: { offset: 0x0e, size: 1 },
  bist: { offset: 0x0f, size: 1 },
  bar0: { offset: 0x10, size: 4 },
  bar1: { offset: 0x14, size: 4 },
  bar2: { offset: 0x18, size: 4 },
  bar3: { offset: 0x1c, size: 4 },
  bar4: { offset: 0x20, size: 4 },
  bar5: { offset: 0x24, size: 4 },
  cardbusCis: { offset: 0x28, size: 4 },
  subsystemVendorId: { offset: 0x2c, size: 2 },
  subsystemId: { offset: 0x2e, size: 2 },
  expansionRom: { offset: 0x30, size: 4 },
  capabilitiesPointer: { offset: 0x34, size: 1 },
  interruptLine: { offset: 0x3c, size: 1 },
  interruptPin: { offset: 0x3d, size: 1 },
  minGrant: { offset: 0x3e, size: 1 },
  maxLatency: { offset: 0x3f, size: 1 },
  SIZE: 0x40,
} as const;

export const PciCommand = {
  IO_SPACE: 0x0001,
  MEMORY_SPACE: 0x0002,
  BUS_MASTER: 0x0004,
  INTX_DISABLE: 0x0400,
} as const;

export const PciStatus = {
  /** INTx is pending inside the function (whether or not INTX_DISABLE masks it). */
  INTERRUPT: 0x0008,
  CAPABILITIES_LIST: 0x0010,
} as const;

/** Memory BAR flag bits: 64-bit, non-prefetchable (ISR reads have side effects). */
export const PCI_BAR_MEM_64 = 0x4;

/** struct virtio_pci_cap and the fields some types append (virtio 1.2 §4.1.4). */
export const VirtioPciCap = {
  capVndr: { offset: 0, size: 1 },
  capNext: { offset: 1, size: 1 },
  capLen: { offset: 2, size: 1 },
  cfgType: { offset: 3, size: 1 },
  bar: { offset: 4, size: 1 },
  id: { offset: 5, size: 1 },
  padding: { offset: 6, size: 2 },
  offset: { offset: 8, size: 4 },
  length: { offset: 12, size: 4 },
  SIZE: 16,
  /** struct virtio_pci_notify_cap. */
  notifyOffMultiplier: { offset: 16, size: 4 },
  NOTIFY_SIZE: 20,
  /** struct virtio_pci_cfg_cap. */
  pciCfgData: { offset: 16, size: 4 },
  CFG_SIZE: 20,
} as const;

export const VirtioPciCapType = {
  COMMON_CFG: 1,
  NOTIFY_CFG: 2,
  ISR_CFG: 3,
  DEVICE_CFG: 4,
  PCI_CFG: 5,
  SHARED_MEMORY_CFG: 8,
  VENDOR_CFG: 9,
} as const;

export const PCI_CAP_ID_VENDOR = 0x09;
export const PCI_CAP_ID_EXPRESS = 0x10;

/** struct virtio_pci_common_cfg (virtio 1.2 §4.1.4.3). 64-bit fields take two 32-bit accesses. */
export const PciCommonCfg = {
  deviceFeatureSelect: { offset: 0x00, size: 4 },
  deviceFeature: { offset: 0x04, size: 4 },
  driverFeatureSelect: { offset: 0x08, size: 4 },
  driverFeature: { offset: 0x0c, size: 4 },
  configMsixVector: { offset: 0x10, size: 2 },
  numQueues: { offset: 0x12, size: 2 },
  deviceStatus: { offset: 0x14, size: 1 },
  configGeneration: { offset: 0x15, size: 1 },
  queueSelect: { offset: 0x16, size: 2 },
  queueSize: { offset: 0x18, size: 2 },
  queueMsixVector: { offset: 0x1a, size: 2 },
  queueEnable: { offset: 0x1c, size: 2 },
  queueNotifyOff: { offset: 0x1e, size: 2 },
  queueDesc: { offset: 0x20, size: 8 },
  queueDriver: { offset: 0x28, size: 8 },
  queueDevice: { offset: 0x30, size: 8 },
  queueNotifyData: { offset: 0x38, size: 2 },
  queueReset: { offset: 0x3a, size: 2 },
  SIZE: 0x3c,
} as const;

/** virtio 1.2 §4.1.5.1.2: the vector value meaning "no MSI-X vector". */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;
export const PCI_VENDOR_ID_VIRTIO = 0x1af4;
/** virtio 1.2 §4.1.2: modern device IDs are 0x1040 + virtio device ID. */
export const PCI_DEVICE_ID_MODERN_BASE = 0x1040;
/** virtio 1.2 §4.1.2.1: non-transitional devices have revision 1 or higher. */
export const PCI_REVISION_MODERN = 1;

/** Where each structure lives in BAR 0: one 4 KiB page each, notifications last (QEMU's layout). */
export const PciBarLayout = {
  common: { offset: 0x0000, size: 0x1000 },
  isr: { offset: 0x1000, size: 0x1000 },
  device: { offset: 0x2000, size: 0x1000 },
  notify: { offset: 0x3000 },
} as const;

/** The BAR holding every virtio structure, notifications included. */
export const PCI_NOTIFY_BAR = 0;
/** Bytes between queue notify addresses; 4 allows VIRTIO_F_NOTIFICATION_DATA (virtio 1.2 §4.1.4.4.1). */
export const PCI_NOTIFY_OFF_MULTIPLIER = 4;

/** Offset within BAR PCI_NOTIFY_BAR of queue `queueIndex`'s notify address (queue_notify_off = index). */
export function pciNotifyOffset(queueIndex: number): number {
  return PciBarLayout.notify.offset + queueIndex * PCI_NOTIFY_OFF_MULTIPLIER;
}

/** Size of BAR 0 for a device with `numQueues` queues: a power of two, at least 16 KiB. */
export function pciBarSize(numQueues: number): number {
  const end = PciBarLayout.notify.offset + Math.ceil(Math.max(1, numQueues * PCI_NOTIFY_OFF_MULTIPLIER) / 0x1000) * 0x1000;
  let size = 0x4000;
  while (size < end) size *= 2;
  return size;
}

/**
 * Class codes as QEMU presents its virtio devices. QEMU registers virtio-iommu-pci (and rng) with
 * class id PCI_CLASS_OTHERS (0xff) in its 16-bit class/subclass field, which guests see as base
 * class 0x00, subclass 0xff: "Unclassified device [00ff]".
 */
const CLASS_CODE_BY_TYPE: Readonly<Record<number, number>> = {
  [DeviceType.NET]: 0x02_00_00, // network controller, ethernet
  [DeviceType.BLOCK]: 0x01_00_00, // mass storage, SCSI
  [DeviceType.CONSOLE]: 0x07_80_00, // communication controller, other
  [DeviceType.ENTROPY]: 0x00_ff_00,
  [DeviceType.IOMMU]: 0x00_ff_00,
};
const DEFAULT_CLASS_CODE = 0x00_ff_00;

/** Capability placement in configuration space. */
const CAP = {
  common: 0x40,
  notify: 0x50,
  isr: 0x64,
  device: 0x74,
  pciCfg: 0x84,
  express: 0x98,
} as const;
/** PCI Express capability register offsets used here (PCIe Base 4.0 §7.5.3). */
const PcieCap = {
  capabilities: { offset: 0x02, size: 2 },
  deviceControl: { offset: 0x08, size: 2 },
  deviceControl2: { offset: 0x28, size: 2 },
} as const;

export interface PciTransportOptions extends TransportOptions {
  /** 256 bytes (conventional PCI, the default) or 4096 (PCI Express, with an Express capability). */
  readonly configSpaceSize?: 256 | 4096;
  /** PCI Express device/port type when configSpaceSize is 4096 (default: endpoint). */
  readonly pcieType?: 'endpoint' | 'integrated';
  /** 24-bit class code; default by device type, as QEMU. */
  readonly classCode?: number;
  readonly subsystemVendorId?: number;
  /** virtio 1.2 §4.1.2.1: SHOULD be 0x40 or higher for non-transitional devices (default 0x1100, as QEMU). */
  readonly subsystemId?: number;
  /** Called when BAR 0 starts or stops decoding, or moves: address, or undefined when not decoding. */
  readonly onBarMapping?: (bar: number, address: number | undefined) => void;
}

export type PciSnapshot = TransportSnapshot & {
  readonly pci: { readonly config: Uint8Array };
};

/**
 * virtio-pci modern (non-transitional), device side (virtio 1.2 §4.1): a configuration space with
 * the virtio vendor capabilities, one 64-bit memory BAR holding the common, ISR, device and notify
 * structures, INTx through the ISR (no MSI-X yet: vectors read VIRTIO_MSI_NO_VECTOR).
 */
export class PciTransport implements PciBus {
  readonly core: VirtioTransportCore;
  readonly barSize: number;
  readonly configSpaceSize: 256 | 4096;
  private readonly log: Logger;
  private readonly irq: InterruptLine;
  private readonly onBarMapping: ((bar: number, address: number | undefined) => void) | undefined;
  /** Configuration space image; writable bits per byte in `writeMask`. */
  private readonly config: Uint8Array;
  private readonly writeMask: Uint8Array;
  private readonly configView: DataView;
  private readonly notifyLength: number;
  private readonly options: PciTransportOptions;
  private readonly device: VirtioDeviceModel;
  private mapped: number | undefined;

  constructor(device: VirtioDeviceModel, memory: GuestMemory, options: PciTransportOptions) {
    const log = (options.log ?? silentLogger).child({ transport: 'pci' });
    this.irq = options.irq;
    // The core's line goes through INTX_DISABLE before it reaches the machine.
    const line: InterruptLine = { set: (status) => this.forwardInterrupt(status) };
    this.core = new VirtioTransportCore(device, memory, { ...options, irq: line, log });
    this.log = this.core.log;
    this.onBarMapping = options.onBarMapping;
    if (this.core.numQueues > 0xffff) throw new RangeError('virtio-pci num_queues is 16 bits');
    // virtio 1.2 §4.1.2: modern PCI device IDs stop at 0x107f.
    if (!Number.isInteger(device.deviceType) || device.deviceType < 1 || device.deviceType > 0x3f) {
      throw new RangeError(`virtio device ID ${device.deviceType} has no modern PCI device ID`);
    }
    if (this.core.configSize > PciBarLayout.device.size) {
      throw new RangeError(`device config of ${this.core.configSize} bytes does not fit its ${PciBarLayout.device.size}-byte window`);
    }
    this.configSpaceSize = options.configSpaceSize ?? 256;
    this.barSize = pciBarSize(this.core.numQueues);
    this.notifyLength = Math.max(1, this.core.numQueues) * PCI_NOTIFY_OFF_MULTIPLIER;
    this.config = new Uint8Array(this.configSpaceSize);
    this.writeMask = new Uint8Array(this.configSpaceSize);
    this.configView = new DataView(this.config.buffer);
    this.device = device;
    this.options = options;
    this.buildConfigSpace(device, options);
  }

  // ---- configuration space -----------------------------------------------------------------------

  private put(offset: number, size: 1 | 2 | 4, value: number, writable = 0): void {
    const v = this.configView;
    if (size === 1) v.setUint8(offset, value);
    else if (size === 2) v.setUint16(offset, value, true);
    else v.setUint32(offset, value >>> 0, true);
    for (let i = 0; i < size; i++) this.writeMask[offset + i] = (writable >>> (8 * i)) & 0xff;
  }

  private buildConfigSpace(device: VirtioDeviceModel, options: PciTransportOptions): void {
    const H = PciHeader;
    this.put(H.vendorId.offset, 2, PCI_VENDOR_ID_VIRTIO);
    this.put(H.deviceId.offset, 2, PCI_DEVICE_ID_MODERN_BASE + device.deviceType);
    this.put(H.command.offset, 2, 0, PciCommand.MEMORY_SPACE | PciCommand.BUS_MASTER | PciCommand.INTX_DISABLE);
    this.put(H.status.offset, 2, PciStatus.CAPABILITIES_LIST);
    this.put(H.revisionId.offset, 1, PCI_REVISION_MODERN);
    const classCode = (options.classCode ?? CLASS_CODE_BY_TYPE[device.deviceType] ?? DEFAULT_CLASS_CODE) & 0xff_ffff;
    this.put(H.classCode.offset, 1, classCode & 0xff);
    this.put(H.classCode.offset + 1, 2, classCode >>> 8);
    this.put(H.cacheLineSize.offset, 1, 0, 0xff);
    // BAR 0/1: one 64-bit memory BAR; the low size bits read 0 so all-ones sizing works.
    this.put(H.bar0.offset, 4, PCI_BAR_MEM_64, ~(this.barSize - 1) & ~0xf);
    this.put(H.bar1.offset, 4, 0, 0xffff_ffff);
    this.put(H.subsystemVendorId.offset, 2, options.subsystemVendorId ?? PCI_VENDOR_ID_VIRTIO);
    this.put(H.subsystemId.offset, 2, options.subsystemId ?? 0x1100);
    this.put(H.capabilitiesPointer.offset, 1, CAP.common);
    this.put(H.interruptLine.offset, 1, 0, 0xff);
    this.put(H.interruptPin.offset, 1, 1); // INTA#

    const hasDeviceCfg = this.core.configSize > 0;
    const express = this.configSpaceSize === 4096;
    this.putVirtioCap(CAP.common, CAP.notify, VirtioPciCap.SIZE, VirtioPciCapType.COMMON_CFG, PciBarLayout.common.offset, PciCommonCfg.SIZE);
    this.putVirtioCap(CAP.notify, CAP.isr, VirtioPciCap.NOTIFY_SIZE, VirtioPciCapType.NOTIFY_CFG, PciBarLayout.notify.offset, this.notifyLength);
    this.put(CAP.notify + VirtioPciCap.notifyOffMultiplier.offset, 4, PCI_NOTIFY_OFF_MULTIPLIER);
    // virtio 1.2 §4.1.4.6: a DEVICE_CFG capability only for devices that have device config.
    this.putVirtioCap(CAP.isr, hasDeviceCfg ? CAP.device : CAP.pciCfg, VirtioPciCap.SIZE, VirtioPciCapType.ISR_CFG, PciBarLayout.isr.offset, 1);
    if (hasDeviceCfg) {
      this.putVirtioCap(CAP.device, CAP.pciCfg, VirtioPciCap.SIZE, VirtioPciCapType.DEVICE_CFG, PciBarLayout.device.offset, this.core.configSize);
    }
    this.putVirtioCap(CAP.pciCfg, express ? CAP.express : 0, VirtioPciCap.CFG_SIZE, VirtioPciCapType.PCI_CFG, 0, 0);
    // virtio 1.2 §4.1.4.9: bar, offset, length and pci_cfg_data are read-write for the driver.
    this.put(CAP.pciCfg + VirtioPciCap.bar.offset, 1, 0, 0xff);
    this.put(CAP.pciCfg + VirtioPciCap.offset.offset, 4, 0, 0xffff_ffff);
    this.put(CAP.pciCfg + VirtioPciCap.length.offset, 4, 0, 0xffff_ffff);
    this.put(CAP.pciCfg + VirtioPciCap.pciCfgData.offset, 4, 0, 0xffff_ffff);

    if (express) {
      // A minimal PCI Express capability (version 2) so guests use the extended space; it has no
      // extended capabilities (the header at 0x100 reads 0).
      this.put(CAP.express, 1, PCI_CAP_ID_EXPRESS);
      this.put(CAP.express + 1, 1, 0);
      const portType = options.pcieType === 'integrated' ? 0x9 : 0x0;
      this.put(CAP.express + PcieCap.capabilities.offset, 2, 0x2 | (portType << 4));
      this.put(CAP.express + PcieCap.deviceControl.offset, 2, 0x2810, 0xffff);
      this.put(CAP.express + PcieCap.deviceControl2.offset, 2, 0, 0xffff);
    }
  }

  private putVirtioCap(at: number, next: number, length: number, type: number, barOffset: number, structLength: number): void {
    const C = VirtioPciCap;
    this.put(at + C.capVndr.offset, 1, PCI_CAP_ID_VENDOR);
    this.put(at + C.capNext.offset, 1, next);
    this.put(at + C.capLen.offset, 1, length);
    this.put(at + C.cfgType.offset, 1, type);
    this.put(at + C.bar.offset, 1, 0);
    this.put(at + C.offset.offset, 4, barOffset);
    this.put(at + C.length.offset, 4, structLength);
  }

  private get command(): number {
    return this.configView.getUint16(PciHeader.command.offset, true);
  }

  private overlaps(offset: number, size: number, field: { offset: number; size: number }): boolean {
    return offset < field.offset + field.size && field.offset < offset + size;
  }

  configRead(offset: number, size: 1 | 2 | 4): number {
    if (!this.configAccessOk(offset, size, 'read')) return allOnes(size);
    // Live bits: the interrupt status bit mirrors the ISR (virtio 1.2 §4.1.4.5.1).
    const status = PciStatus.CAPABILITIES_LIST | (this.core.interruptStatus !== 0 ? PciStatus.INTERRUPT : 0);
    this.configView.setUint16(PciHeader.status.offset, status, true);
    const data = { offset: CAP.pciCfg + VirtioPciCap.pciCfgData.offset, size: 4 };
    if (this.overlaps(offset, size, data)) this.windowRead();
    return this.readImage(offset, size);
  }

  configWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    if (!this.configAccessOk(offset, size, 'write')) return;
    const v = truncateValue(value, size);
    const commandBefore = this.command;
    for (let i = 0; i < size; i++) {
      const mask = this.writeMask[offset + i]!;
      const byte = (v >>> (8 * i)) & 0xff;
      this.config[offset + i] = (this.config[offset + i]! & ~mask) | (byte & mask);
    }
    const data = { offset: CAP.pciCfg + VirtioPciCap.pciCfgData.offset, size: 4 };
    if (this.overlaps(offset, size, data)) this.windowWrite();
    if ((this.command ^ commandBefore) & PciCommand.INTX_DISABLE) this.forwardInterrupt(this.core.interruptStatus);
    if (this.overlaps(offset, size, PciHeader.command) || this.overlaps(offset, size, { offset: PciHeader.bar0.offset, size: 8 })) {
      this.updateMapping();
    }
  }

  private configAccessOk(offset: number, size: number, what: string): boolean {
    // PCI configuration accesses are naturally aligned and inside the function's space.
    if ((size !== 1 && size !== 2 && size !== 4) || !isAligned(offset, size) || offset + size > this.configSpaceSize) {
      this.log.debug({ offset, size, what }, 'PCI configuration access outside config space or misaligned');
      return false;
    }
    return true;
  }

  private readImage(offset: number, size: 1 | 2 | 4): number {
    const v = this.configView;
    return size === 1 ? v.getUint8(offset) : size === 2 ? v.getUint16(offset, true) : v.getUint32(offset, true);
  }

  /** Guest-programmed BAR address while memory decoding is enabled (and below 2^53), else undefined. */
  barAddress(bar: number): number | undefined {
    if (bar !== 0 || (this.command & PciCommand.MEMORY_SPACE) === 0) return undefined;
    const lo = (this.configView.getUint32(PciHeader.bar0.offset, true) & ~0xf) >>> 0;
    const hi = this.configView.getUint32(PciHeader.bar1.offset, true);
    // A BAR placed at or above 2^53 cannot be named by a number; no guest RAM map reaches it.
    return hi >= 0x20_0000 ? undefined : hi * 0x1_0000_0000 + lo;
  }

  private updateMapping(): void {
    const now = this.barAddress(0);
    if (now === this.mapped) return;
    this.mapped = now;
    this.log.debug({ bar: 0, address: now === undefined ? null : formatAddress(now) }, 'BAR 0 mapping changed');
    try {
      this.onBarMapping?.(0, now);
    } catch (err) {
      this.log.error({ err }, 'BAR mapping callback threw');
    }
  }

  // ---- PCI configuration access capability (virtio 1.2 §4.1.4.9) -----------------------------------

  /** The window's target, or undefined (logged) when bar/offset/length do not name a valid access. */
  private windowTarget(): { bar: number; offset: number; size: 1 | 2 | 4 } | undefined {
    const v = this.configView;
    const bar = v.getUint8(CAP.pciCfg + VirtioPciCap.bar.offset);
    const offset = v.getUint32(CAP.pciCfg + VirtioPciCap.offset.offset, true);
    const length = v.getUint32(CAP.pciCfg + VirtioPciCap.length.offset, true);
    // virtio 1.2 §4.1.4.9.2: length 1, 2 or 4, offset a multiple of it, inside a BAR.
    if ((length !== 1 && length !== 2 && length !== 4) || offset % length !== 0 || bar !== 0 || offset + length > this.barSize) {
      this.log.debug({ bar, offset, length }, 'PCI_CFG window access with invalid bar, offset or length; ignored');
      return undefined;
    }
    return { bar, offset, size: length };
  }

  private windowRead(): void {
    const target = this.windowTarget();
    if (target === undefined) return;
    const value = this.barAccessRead(target.offset, target.size);
    const at = CAP.pciCfg + VirtioPciCap.pciCfgData.offset;
    for (let i = 0; i < target.size; i++) this.config[at + i] = (value >>> (8 * i)) & 0xff;
  }

  private windowWrite(): void {
    const target = this.windowTarget();
    if (target === undefined) return;
    const at = CAP.pciCfg + VirtioPciCap.pciCfgData.offset;
    const value = truncateValue(this.configView.getUint32(at, true), target.size);
    this.barAccessWrite(target.offset, target.size, value);
  }

  // ---- BAR 0 -------------------------------------------------------------------------------------

  barRead(bar: number, offset: number, size: AccessSize): number {
    if (!this.barAccessOk(bar, offset, size, 'read')) return size === 8 ? 0 : allOnes(size);
    if (size === 8) return this.read64(offset);
    return this.barAccessRead(offset, size);
  }

  barWrite(bar: number, offset: number, size: AccessSize, value: number): void {
    if (!this.barAccessOk(bar, offset, size, 'write')) return;
    if (size === 8) {
      this.write64(offset, value);
      return;
    }
    this.barAccessWrite(offset, size, value);
  }

  /** Decoding rules a real function applies before any register sees the access. */
  private barAccessOk(bar: number, offset: number, size: number, what: string): boolean {
    if (bar !== 0) {
      this.log.debug({ bar, offset, what }, 'access to an unimplemented BAR');
      return false;
    }
    if ((this.command & PciCommand.MEMORY_SPACE) === 0) {
      this.log.debug({ offset, what }, 'BAR access while memory space decoding is disabled');
      return false;
    }
    if ((size !== 1 && size !== 2 && size !== 4 && size !== 8) || !isAligned(offset, size) || offset + size > this.barSize) {
      this.log.debug({ offset, size, what }, 'BAR access misaligned or outside the BAR');
      return false;
    }
    return true;
  }

  /** 8-byte accesses: only the common config's 64-bit fields and device config (see ./bus.ts). */
  private read64(offset: number): number {
    if (!this.allows64(offset)) return 0;
    const value = joinU64(this.barAccessRead(offset, 4), this.barAccessRead(offset + 4, 4));
    if (value === undefined) this.log.warn({ offset }, '8-byte BAR read of a value >= 2^53 returns 0; use two 4-byte reads');
    return value ?? 0;
  }

  private write64(offset: number, value: number): void {
    const halves = splitU64(value);
    if (!this.allows64(offset) || halves === undefined) {
      this.log.debug({ offset, value }, '8-byte BAR write not at a 64-bit field or not a safe integer; ignored');
      return;
    }
    this.barAccessWrite(offset, 4, halves.lo);
    this.barAccessWrite(offset + 4, 4, halves.hi);
  }

  private allows64(offset: number): boolean {
    const C = PciCommonCfg;
    const rel = offset - PciBarLayout.device.offset;
    if (offset === C.queueDesc.offset || offset === C.queueDriver.offset || offset === C.queueDevice.offset) return true;
    if (rel >= 0 && rel + 8 <= this.core.configSize) return true;
    this.log.debug({ offset }, '8-byte BAR access outside a 64-bit field');
    return false;
  }

  /** A decoded BAR 0 read of 1, 2 or 4 bytes (also reached through the PCI_CFG window). */
  private barAccessRead(offset: number, size: 1 | 2 | 4): number {
    const L = PciBarLayout;
    if (offset < L.common.offset + L.common.size) return this.commonRead(offset - L.common.offset, size);
    if (offset < L.isr.offset + L.isr.size) {
      // virtio 1.2 §4.1.4.5: reading the ISR byte returns the causes and clears them.
      return offset === L.isr.offset ? this.core.takeInterruptStatus() : 0;
    }
    if (offset < L.device.offset + L.device.size) return this.core.readConfig(offset - L.device.offset, size);
    // Notification addresses are write-only.
    return 0;
  }

  private barAccessWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    const L = PciBarLayout;
    const v = truncateValue(value, size);
    if (offset < L.common.offset + L.common.size) {
      this.commonWrite(offset - L.common.offset, size, v);
    } else if (offset < L.isr.offset + L.isr.size) {
      this.log.debug({ offset, value: v }, 'write to the read-only ISR status; ignored');
    } else if (offset < L.device.offset + L.device.size) {
      this.core.writeConfig(offset - L.device.offset, size, v);
    } else {
      this.notifyWrite(offset - L.notify.offset, size, v);
    }
  }

  /** virtio 1.2 §4.1.5.2: the notify address identifies the queue; the value is its index (or data). */
  private notifyWrite(rel: number, size: number, value: number): void {
    const queue = rel / PCI_NOTIFY_OFF_MULTIPLIER;
    if (!Number.isInteger(queue) || queue >= this.core.numQueues || (size !== 2 && size !== 4)) {
      this.log.debug({ offset: rel, size, value }, 'write to the notify area that is no queue notify address; ignored');
      return;
    }
    this.core.notifyQueue(queue);
  }

  // ---- common configuration ----------------------------------------------------------------------

  /** The common config field an access addresses: exact field width, or one half of a 64-bit field. */
  private commonField(offset: number, size: number): CommonFieldAccess | undefined {
    const field = COMMON_FIELD_BY_ACCESS.get(offset * 8 + size);
    // virtio 1.2 §4.1.3.1: each field is accessed at its own width.
    if (field === undefined) this.log.debug({ offset, size }, 'common config access does not match a field; ignored');
    return field;
  }

  private commonRead(offset: number, size: 1 | 2 | 4): number {
    const field = this.commonField(offset, size);
    if (field === undefined) return 0;
    const core = this.core;
    const q = core.queueSelect;
    switch (field.name) {
      case 'deviceFeatureSelect':
        return core.deviceFeatureSelect;
      case 'deviceFeature':
        return core.readDeviceFeatures();
      case 'driverFeatureSelect':
        return core.driverFeatureSelect;
      case 'driverFeature':
        return core.readDriverFeatures();
      case 'configMsixVector':
      case 'queueMsixVector':
        return VIRTIO_MSI_NO_VECTOR;
      case 'numQueues':
        return core.numQueues;
      case 'deviceStatus':
        return core.status;
      case 'configGeneration':
        return core.configGeneration & 0xff;
      case 'queueSelect':
        return q;
      case 'queueSize':
        // virtio 1.2 §4.1.4.3.1: 0 for a queue that is unavailable.
        return core.queue(q)?.size ?? 0;
      case 'queueEnable':
        return core.queueReady(q) ? 1 : 0;
      case 'queueNotifyOff':
      case 'queueNotifyData':
        // Queue i notifies at pciNotifyOffset(i); with NOTIF_CONFIG_DATA the data is its index.
        return core.queue(q) === undefined ? 0 : q;
      case 'queueReset':
        // Queue resets complete synchronously (virtio 1.2 §4.1.4.3.1: 0 once done).
        return 0;
      case 'queueDesc':
      case 'queueDriver':
      case 'queueDevice':
        return core.readQueueAddress(q, areaOf(field.name), field.half!);
      default:
        return 0;
    }
  }

  private commonWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    const field = this.commonField(offset, size);
    if (field === undefined) return;
    const core = this.core;
    const q = core.queueSelect;
    switch (field.name) {
      case 'deviceFeatureSelect':
        core.deviceFeatureSelect = value;
        return;
      case 'driverFeatureSelect':
        core.driverFeatureSelect = value;
        return;
      case 'driverFeature':
        core.writeDriverFeatures(value);
        return;
      case 'configMsixVector':
      case 'queueMsixVector':
        // No MSI-X capability: every mapping fails and reads back NO_VECTOR (virtio 1.2 §4.1.5.1.2.1).
        return;
      case 'deviceStatus':
        core.writeStatus(value);
        return;
      case 'queueSelect':
        core.queueSelect = value & 0xffff;
        return;
      case 'queueSize':
        core.setQueueSize(q, value);
        return;
      case 'queueEnable':
        if (value === 1) core.enableQueue(q);
        // virtio 1.2 §4.1.4.3.2: the driver MUST NOT write 0 to queue_enable.
        else this.log.warn({ queue: q, value }, 'queue_enable takes only 1; ignored');
        return;
      case 'queueReset':
        if (value === 1) core.resetQueue(q);
        else this.log.debug({ queue: q, value }, 'queue_reset takes 1; ignored');
        return;
      case 'queueDesc':
      case 'queueDriver':
      case 'queueDevice':
        core.setQueueAddress(q, areaOf(field.name), field.half!, value);
        return;
      default:
        // device_feature, num_queues, config_generation, queue_notify_off, queue_notify_data are read-only.
        this.log.debug({ field: field.name, value }, 'write to a read-only common config field; ignored');
        return;
    }
  }

  // ---- interrupts, lifecycle ---------------------------------------------------------------------

  private forwardInterrupt(status: number): void {
    // PCI: INTX_DISABLE masks the pin but not the function's pending state.
    const level = (this.command & PciCommand.INTX_DISABLE) !== 0 ? 0 : status;
    try {
      this.irq.set(level);
    } catch (err) {
      this.log.error({ err, status }, 'interrupt line threw');
    }
  }

  /** The doorbell path: an available-buffer notification for queue `index`. */
  notifyQueue(index: number): void {
    this.core.notifyQueue(index);
  }

  /**
   * Host-initiated reset of the virtio device. Configuration space (BAR, command) is the PCI
   * function's and survives, as a virtio reset does not reset the PCI function.
   */
  reset(): void {
    this.core.reset();
  }

  /**
   * Function-level reset (a machine reset or PCIe FLR): configuration space back to its power-on
   * values (BAR unassigned, decoding off), then a virtio reset.
   */
  resetFunction(): void {
    this.config.fill(0);
    this.writeMask.fill(0);
    this.buildConfigSpace(this.device, this.options);
    this.core.reset();
    this.forwardInterrupt(this.core.interruptStatus);
    this.updateMapping();
  }

  stats(): TransportStats {
    return this.core.stats();
  }

  snapshot(): PciSnapshot {
    return { ...this.core.snapshot(), pci: { config: this.config.slice() } };
  }

  /** Resumes from snapshot() of a transport of the same device: config space, BAR placement, queues. */
  restore(snapshot: PciSnapshot): void {
    if (snapshot.pci.config.length !== this.config.length) throw new RangeError(`config space of ${snapshot.pci.config.length} bytes, this function has ${this.config.length}`);
    this.core.restore(snapshot);
    this.config.set(snapshot.pci.config);
    // The line again, now under the restored command register (INTx disable).
    this.forwardInterrupt(this.core.interruptStatus);
    this.updateMapping();
  }
}

type CommonFieldName = Exclude<keyof typeof PciCommonCfg, 'SIZE'>;
interface CommonFieldAccess {
  readonly name: CommonFieldName;
  readonly half?: 'lo' | 'hi';
}

/** Every valid common config access, keyed by offset * 8 + size: fields at their width, 64-bit ones as halves. */
const COMMON_FIELD_BY_ACCESS: ReadonlyMap<number, CommonFieldAccess> = (() => {
  const map = new Map<number, CommonFieldAccess>();
  for (const [key, field] of Object.entries(PciCommonCfg)) {
    if (typeof field === 'number') continue;
    const name = key as CommonFieldName;
    if (field.size === 8) {
      map.set(field.offset * 8 + 4, { name, half: 'lo' });
      map.set((field.offset + 4) * 8 + 4, { name, half: 'hi' });
    } else {
      map.set(field.offset * 8 + field.size, { name });
    }
  }
  return map;
})();

function areaOf(name: 'queueDesc' | 'queueDriver' | 'queueDevice'): QueueArea {
  return name === 'queueDesc' ? 'desc' : name === 'queueDriver' ? 'driver' : 'device';
}
