import {
  DMA_ENGINE_DEVICE_ID,
  DMA_ENGINE_ID,
  DMA_ENGINE_VENDOR_ID,
  DmaEngineCap,
  DmaEngineCommand,
  DmaEngineIrq,
  DmaEnginePasid,
  DmaEngineReg,
  DmaEngineStatus,
} from '../../src/devices/dma-engine.js';
import type { PciBus } from '../../src/virtio/bus.js';
import { PciCommand, PciHeader } from '../../src/virtio/pci.js';

export interface DmaEngineResult {
  /** DmaEngineStatus name. */
  readonly status: 'DONE' | 'FAULT_READ' | 'FAULT_WRITE' | 'INVALID' | 'IDLE';
  /** IOVA of the faulting access (FAULT_READ / FAULT_WRITE). */
  readonly faultAddress?: bigint;
  readonly doneBytes: number;
}

const STATUS_NAMES = Object.fromEntries(Object.entries(DmaEngineStatus).map(([k, v]) => [v, k])) as Record<number, DmaEngineResult['status']>;

/**
 * The guest's driver for the DMA engine, as a kernel driver would do it: find the function, place
 * BAR 0, enable memory decoding and bus mastering, then program transfers by IOVA.
 */
export class DmaEngineDriver {
  readonly pasidCapable: boolean;

  private constructor(private readonly bus: PciBus) {
    this.pasidCapable = (this.reg(DmaEngineReg.CAPS) & DmaEngineCap.PASID) !== 0;
  }

  static probe(bus: PciBus, options: { bar0Address: number }): DmaEngineDriver {
    const vendor = bus.configRead(PciHeader.vendorId.offset, 2);
    const device = bus.configRead(PciHeader.deviceId.offset, 2);
    if (vendor !== DMA_ENGINE_VENDOR_ID || device !== DMA_ENGINE_DEVICE_ID) {
      throw new Error(`not a DMA engine: ${vendor.toString(16)}:${device.toString(16)}`);
    }
    bus.configWrite(PciHeader.bar0.offset, 4, options.bar0Address >>> 0);
    bus.configWrite(PciHeader.bar1.offset, 4, Math.floor(options.bar0Address / 0x1_0000_0000));
    bus.configWrite(PciHeader.command.offset, 2, PciCommand.MEMORY_SPACE | PciCommand.BUS_MASTER);
    const driver = new DmaEngineDriver(bus);
    if (driver.reg(DmaEngineReg.ID) !== DMA_ENGINE_ID) throw new Error('DMA engine BAR 0 does not answer');
    driver.setReg(DmaEngineReg.IRQ_ENABLE, DmaEngineIrq.DONE | DmaEngineIrq.ERROR);
    return driver;
  }

  reg(offset: number): number {
    return this.bus.barRead(0, offset, 4) >>> 0;
  }

  setReg(offset: number, value: number): void {
    this.bus.barWrite(0, offset, 4, value >>> 0);
  }

  /** Turns bus mastering on or off (off: the engine must refuse to DMA). */
  setBusMaster(on: boolean): void {
    const command = this.bus.configRead(PciHeader.command.offset, 2);
    this.bus.configWrite(PciHeader.command.offset, 2, on ? command | PciCommand.BUS_MASTER : command & ~PciCommand.BUS_MASTER);
  }

  copy(src: bigint, dst: bigint, length: number, pasid?: number): DmaEngineResult {
    this.setReg(DmaEngineReg.SRC_LO, Number(src & 0xffff_ffffn));
    this.setReg(DmaEngineReg.SRC_HI, Number(src >> 32n));
    return this.run(DmaEngineCommand.COPY, dst, length, pasid);
  }

  fill(dst: bigint, length: number, byte: number, pasid?: number): DmaEngineResult {
    this.setReg(DmaEngineReg.SRC_LO, byte & 0xff);
    this.setReg(DmaEngineReg.SRC_HI, 0);
    return this.run(DmaEngineCommand.FILL, dst, length, pasid);
  }

  private run(command: number, dst: bigint, length: number, pasid: number | undefined): DmaEngineResult {
    this.setReg(DmaEngineReg.DST_LO, Number(dst & 0xffff_ffffn));
    this.setReg(DmaEngineReg.DST_HI, Number(dst >> 32n));
    this.setReg(DmaEngineReg.LENGTH, length);
    this.setReg(DmaEngineReg.PASID, pasid === undefined ? 0 : DmaEnginePasid.ENABLE | (pasid & DmaEnginePasid.MASK));
    // The write returns once the engine has finished or stopped; the status is final.
    this.setReg(DmaEngineReg.COMMAND, command);
    const status = STATUS_NAMES[this.reg(DmaEngineReg.STATUS)] ?? 'INVALID';
    const irq = this.reg(DmaEngineReg.IRQ_STATUS);
    this.setReg(DmaEngineReg.IRQ_ACK, irq);
    const doneBytes = this.reg(DmaEngineReg.DONE_BYTES);
    if (status === 'FAULT_READ' || status === 'FAULT_WRITE') {
      const faultAddress = (BigInt(this.reg(DmaEngineReg.FAULT_HI)) << 32n) | BigInt(this.reg(DmaEngineReg.FAULT_LO));
      return { status, faultAddress, doneBytes };
    }
    return { status, doneBytes };
  }
}
