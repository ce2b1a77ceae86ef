import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import type { DmaSpace } from '../memory/dma-space.js';
import type { InterruptLine } from '../virtio/device.js';
import { allOnes, isAligned, truncateValue, type AccessSize } from '../virtio/bus.js';
import { PCI_BAR_MEM_64, PciCommand, PciHeader, PciStatus } from '../virtio/pci.js';
import { stateArray, stateCount, stateInteger, stateRecord, stateBytes, stateU32 } from '../virtio/saved-state.js';

/**
 * A VFIO-style consumer device: a PCI DMA engine in the spirit of QEMU's `edu` teaching device.
 * The guest programs source and destination IOVAs, a length and optionally a PASID in BAR 0, then
 * writes a command; the engine copies (or fills) through its DmaSpace — its own walk of the HWPT it
 * is attached to — and reports completion or the first fault in STATUS and with an interrupt.
 */

/** PCI identity: the vendor ID QEMU uses for its test devices, a device ID of our own. */
export const DMA_ENGINE_VENDOR_ID = 0x1234;
export const DMA_ENGINE_DEVICE_ID = 0x11e9;
/** Class code: system peripheral, DMA controller (08 01 00). */
export const DMA_ENGINE_CLASS = 0x080100;
export const DMA_ENGINE_BAR_SIZE = 0x1000;

/** BAR 0 registers, 32 bits each, little-endian. */
export const DmaEngineReg = {
  /** Read-only: 'DMAE'. */
  ID: 0x00,
  /** Read-only DmaEngineCap bits. */
  CAPS: 0x04,
  SRC_LO: 0x08,
  SRC_HI: 0x0c,
  DST_LO: 0x10,
  DST_HI: 0x14,
  /** Bytes to move, 1 .. DMA_ENGINE_MAX_LENGTH. */
  LENGTH: 0x18,
  /** DmaEnginePasid: bit 31 enables the PASID in bits 0..19 for the next command. */
  PASID: 0x1c,
  /** Write a DmaEngineCommand to run it. Reads back the last command. */
  COMMAND: 0x20,
  /** Read-only DmaEngineStatus of the last command. */
  STATUS: 0x24,
  /** Read-only: IOVA of the access that faulted (valid with FAULT_READ / FAULT_WRITE). */
  FAULT_LO: 0x28,
  FAULT_HI: 0x2c,
  /** Read-only pending interrupt causes (DmaEngineIrq). */
  IRQ_STATUS: 0x30,
  /** Write 1s to clear interrupt causes. */
  IRQ_ACK: 0x34,
  /** Interrupt causes allowed to raise the line. */
  IRQ_ENABLE: 0x38,
  /** Read-only: commands completed without error since reset. */
  COMPLETED: 0x3c,
  /** Read-only: bytes moved by the last command (up to the fault, if it faulted). */
  DONE_BYTES: 0x40,
  /** Read-only: passes of the repeating transfer since it started. */
  PASSES: 0x44,
  /** Read-only: passes of the repeating transfer that stopped at a fault. */
  PASS_FAULTS: 0x48,
} as const;

export const DMA_ENGINE_ID = 0x45414d44; // 'DMAE' little-endian

export const DmaEngineCap = {
  /** The engine can tag DMA with a PASID. */
  PASID: 1 << 0,
} as const;

export const DmaEnginePasid = { ENABLE: 1 << 31, MASK: 0xfffff } as const;

export const DmaEngineCommand = {
  /** Copy LENGTH bytes from SRC to DST. */
  COPY: 1,
  /** Fill LENGTH bytes at DST with the low byte of SRC_LO. */
  FILL: 2,
  /** Stops a repeating transfer after its current pass. */
  STOP: 3,
  /**
   * Flag on COPY or FILL: repeat the transfer pass after pass, in the engine's own time, until
   * STOP — through faults, which are counted (a traffic generator for strict-unmap testing).
   */
  REPEAT: 0x100,
} as const;

export const DmaEngineStatus = {
  IDLE: 0,
  DONE: 1,
  /** A read from the source IOVA faulted; FAULT_LO/HI say where. */
  FAULT_READ: 2,
  /** A write to the destination IOVA faulted. */
  FAULT_WRITE: 3,
  /** The command could not start: unknown command, bad length, PASID unsupported, bus mastering off. */
  INVALID: 4,
  /** A repeating transfer is running. */
  BUSY: 5,
} as const;

export const DmaEngineIrq = { DONE: 1 << 0, ERROR: 1 << 1 } as const;

/** Largest single command, so one guest write cannot keep the worker busy for long. */
export const DMA_ENGINE_MAX_LENGTH = 1 << 20;
/** The engine moves data in bursts of this size; a fault stops it at a burst boundary. */
const BURST = 4096;

export interface DmaEngineOptions {
  /** The I/O address space for a DMA without PASID (undefined) or with one. */
  readonly spaceFor: (pasid: number | undefined) => DmaSpace;
  readonly irq: InterruptLine;
  readonly pasidCapable?: boolean;
  readonly log?: Logger;
}

export interface DmaEngineStats {
  readonly commands: number;
  readonly passes: number;
  readonly completed: number;
  readonly faults: number;
  readonly invalid: number;
  readonly bytes: number;
}

const CONFIG_SIZE = 256;
/** Registers that hold state: ID up to PASS_FAULTS; the rest of BAR 0 reads as zero. */
const REGISTER_COUNT = DmaEngineReg.PASS_FAULTS / 4 + 1;
const COUNTER_NAMES = ['commands', 'passes', 'completed', 'faults', 'invalid', 'bytes'] as const satisfies readonly (keyof DmaEngineStats)[];

/**
 * The engine's state as saveState() gives it: plain data for a migration. The interrupt line is
 * not stored: it follows from IRQ_STATUS, IRQ_ENABLE and the command register.
 */
export type DmaEngineState = {
  /** PCI configuration space (256 bytes). */
  readonly config: Uint8Array;
  /** BAR 0 registers from ID (0x00) to PASS_FAULTS (0x48), one u32 each. */
  readonly registers: readonly number[];
  readonly counters: { readonly [K in keyof DmaEngineStats]: number };
  /** The repeating transfer in progress (STATUS reads BUSY), which the restored engine continues. */
  readonly repeating: {
    readonly op: number;
    readonly src: number;
    readonly dst: number;
    readonly length: number;
    /** The PASID its DMA carries, or null. */
    readonly pasid: number | null;
  } | null;
};

interface Transfer {
  readonly op: number;
  readonly src: number;
  readonly dst: number;
  readonly length: number;
  readonly pasid: number | undefined;
}

interface TransferOutcome {
  readonly status: number;
  /** Where it stopped (faults only). */
  readonly iova: number;
  readonly done: number;
}

/** One function of the engine: PCI configuration space, BAR 0 and the DMA itself. */
export class DmaEngine {
  private readonly config = new Uint8Array(CONFIG_SIZE);
  private readonly configView = new DataView(this.config.buffer);
  private readonly writeMask = new Uint8Array(CONFIG_SIZE);
  private readonly regs = new Uint32Array(DMA_ENGINE_BAR_SIZE / 4);
  private readonly log: Logger;
  private readonly burst = new Uint8Array(BURST);
  private readonly counters = { commands: 0, passes: 0, completed: 0, faults: 0, invalid: 0, bytes: 0 };
  /** The transfer a REPEAT command keeps running, fixed when it was started. */
  private repeating: Transfer | undefined;

  constructor(private readonly options: DmaEngineOptions) {
    this.log = options.log ?? silentLogger;
    this.reset();
  }

  /** Function-level reset: registers cleared, bus mastering and decoding off, interrupt lowered. */
  reset(): void {
    this.config.fill(0);
    this.writeMask.fill(0);
    const v = this.configView;
    v.setUint16(PciHeader.vendorId.offset, DMA_ENGINE_VENDOR_ID, true);
    v.setUint16(PciHeader.deviceId.offset, DMA_ENGINE_DEVICE_ID, true);
    v.setUint32(PciHeader.revisionId.offset, (DMA_ENGINE_CLASS << 8) | 1, true);
    v.setUint32(PciHeader.bar0.offset, PCI_BAR_MEM_64, true);
    v.setUint8(PciHeader.interruptPin.offset, 1);
    // Writable: command (memory decode, bus master, INTx disable), BAR 0/1 address bits, interrupt line.
    v.setUint16(PciHeader.command.offset, 0, true);
    this.mask(PciHeader.command.offset, 2, PciCommand.MEMORY_SPACE | PciCommand.BUS_MASTER | PciCommand.INTX_DISABLE);
    this.mask(PciHeader.bar0.offset, 4, ~(DMA_ENGINE_BAR_SIZE - 1) >>> 0);
    this.mask(PciHeader.bar1.offset, 4, 0xffff_ffff);
    this.mask(PciHeader.interruptLine.offset, 1, 0xff);
    this.repeating = undefined;
    this.regs.fill(0);
    this.regs[DmaEngineReg.ID / 4] = DMA_ENGINE_ID;
    this.regs[DmaEngineReg.CAPS / 4] = this.options.pasidCapable === true ? DmaEngineCap.PASID : 0;
    this.updateIrq();
  }

  private mask(offset: number, size: number, bits: number): void {
    for (let i = 0; i < size; i++) this.writeMask[offset + i] = (bits >>> (8 * i)) & 0xff;
  }

  private get command(): number {
    return this.configView.getUint16(PciHeader.command.offset, true);
  }

  // ---- PCI configuration space --------------------------------------------------------------

  configRead(offset: number, size: 1 | 2 | 4): number {
    if (!isAligned(offset, size) || offset + size > CONFIG_SIZE) return allOnes(size);
    const pending = this.regs[DmaEngineReg.IRQ_STATUS / 4]! & this.regs[DmaEngineReg.IRQ_ENABLE / 4]!;
    this.configView.setUint16(PciHeader.status.offset, pending !== 0 ? PciStatus.INTERRUPT : 0, true);
    const v = this.configView;
    return size === 1 ? v.getUint8(offset) : size === 2 ? v.getUint16(offset, true) : v.getUint32(offset, true);
  }

  configWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    if (!isAligned(offset, size) || offset + size > CONFIG_SIZE) return;
    const v = truncateValue(value, size);
    for (let i = 0; i < size; i++) {
      const m = this.writeMask[offset + i]!;
      this.config[offset + i] = (this.config[offset + i]! & ~m) | (((v >>> (8 * i)) & 0xff) & m);
    }
    this.updateIrq();
  }

  // ---- BAR 0 --------------------------------------------------------------------------------

  barRead(bar: number, offset: number, size: AccessSize): number {
    // Registers are 32-bit; other widths and BARs read as all-ones, as an absent target does.
    if (bar !== 0 || size !== 4 || !isAligned(offset, 4) || offset + 4 > DMA_ENGINE_BAR_SIZE || (this.command & PciCommand.MEMORY_SPACE) === 0) {
      return size === 8 ? 0 : allOnes(size);
    }
    return this.regs[offset / 4]!;
  }

  barWrite(bar: number, offset: number, size: AccessSize, value: number): void {
    if (bar !== 0 || size !== 4 || !isAligned(offset, 4) || offset + 4 > DMA_ENGINE_BAR_SIZE || (this.command & PciCommand.MEMORY_SPACE) === 0) {
      this.log.debug({ bar, offset, size }, 'DMA engine: ignored register write (width, offset or decoding)');
      return;
    }
    const v = value >>> 0;
    switch (offset) {
      case DmaEngineReg.SRC_LO:
      case DmaEngineReg.SRC_HI:
      case DmaEngineReg.DST_LO:
      case DmaEngineReg.DST_HI:
      case DmaEngineReg.LENGTH:
      case DmaEngineReg.PASID:
        this.regs[offset / 4] = v;
        return;
      case DmaEngineReg.IRQ_ENABLE:
        this.regs[offset / 4] = v & (DmaEngineIrq.DONE | DmaEngineIrq.ERROR);
        this.updateIrq();
        return;
      case DmaEngineReg.IRQ_ACK:
        this.regs[DmaEngineReg.IRQ_STATUS / 4] = this.regs[DmaEngineReg.IRQ_STATUS / 4]! & ~v;
        this.updateIrq();
        return;
      case DmaEngineReg.COMMAND:
        this.regs[offset / 4] = v;
        this.run(v);
        return;
      default:
        this.log.debug({ offset }, 'DMA engine: write to a read-only or unknown register ignored');
    }
  }

  // ---- the DMA ------------------------------------------------------------------------------

  private run(command: number): void {
    this.counters.commands++;
    const r = this.regs;
    if (command === DmaEngineCommand.STOP) {
      if (this.repeating !== undefined) {
        this.repeating = undefined;
        this.finish(DmaEngineStatus.DONE);
      }
      return;
    }
    if (this.repeating !== undefined) {
      this.counters.invalid++;
      this.log.warn({ command }, 'DMA engine: command refused: a repeating transfer is running (STOP it first)');
      r[DmaEngineReg.STATUS / 4] = DmaEngineStatus.BUSY;
      return;
    }
    r[DmaEngineReg.FAULT_LO / 4] = 0;
    r[DmaEngineReg.FAULT_HI / 4] = 0;
    r[DmaEngineReg.DONE_BYTES / 4] = 0;
    const op = command & ~DmaEngineCommand.REPEAT;
    const length = r[DmaEngineReg.LENGTH / 4]!;
    const pasidReg = r[DmaEngineReg.PASID / 4]!;
    const pasid = (pasidReg & DmaEnginePasid.ENABLE) !== 0 ? pasidReg & DmaEnginePasid.MASK : undefined;
    let invalid: string | undefined;
    if (op !== DmaEngineCommand.COPY && op !== DmaEngineCommand.FILL) invalid = `unknown command ${command}`;
    else if (length === 0 || length > DMA_ENGINE_MAX_LENGTH) invalid = `length ${length} outside 1..${DMA_ENGINE_MAX_LENGTH}`;
    else if (pasid !== undefined && this.options.pasidCapable !== true) invalid = 'PASID requested but the engine has no PASID support';
    // A function whose bus mastering is off must not issue memory requests (PCI Local Bus spec, Command register bit 2).
    else if ((this.command & PciCommand.BUS_MASTER) === 0) invalid = 'bus mastering is disabled';
    if (invalid !== undefined) {
      this.counters.invalid++;
      this.log.warn({ command, length, pasid }, `DMA engine: command refused: ${invalid}`);
      this.finish(DmaEngineStatus.INVALID);
      return;
    }
    const transfer: Transfer = {
      op,
      src: r[DmaEngineReg.SRC_HI / 4]! * 0x1_0000_0000 + r[DmaEngineReg.SRC_LO / 4]!,
      dst: r[DmaEngineReg.DST_HI / 4]! * 0x1_0000_0000 + r[DmaEngineReg.DST_LO / 4]!,
      length,
      pasid,
    };
    if ((command & DmaEngineCommand.REPEAT) !== 0) {
      this.repeating = transfer;
      r[DmaEngineReg.PASSES / 4] = 0;
      r[DmaEngineReg.PASS_FAULTS / 4] = 0;
      r[DmaEngineReg.STATUS / 4] = DmaEngineStatus.BUSY;
      return;
    }
    const outcome = this.transfer(transfer);
    if (outcome.status === DmaEngineStatus.DONE) {
      this.counters.completed++;
      r[DmaEngineReg.COMPLETED / 4] = (r[DmaEngineReg.COMPLETED / 4]! + 1) >>> 0;
    } else {
      this.faultAt(outcome);
    }
    this.finish(outcome.status);
  }

  /** One pass of a repeating transfer; false when none is running. Called by the worker's loop. */
  pump(): boolean {
    const t = this.repeating;
    if (t === undefined) return false;
    const outcome = this.transfer(t);
    const r = this.regs;
    r[DmaEngineReg.PASSES / 4] = (r[DmaEngineReg.PASSES / 4]! + 1) >>> 0;
    if (outcome.status !== DmaEngineStatus.DONE) {
      r[DmaEngineReg.PASS_FAULTS / 4] = (r[DmaEngineReg.PASS_FAULTS / 4]! + 1) >>> 0;
      this.faultAt(outcome, false);
    }
    return true;
  }

  /** Moves the data in bursts inside one DMA bracket; stops at the first fault. */
  private transfer(t: Transfer): TransferOutcome {
    this.counters.passes++;
    const { op, src, dst, length } = t;
    // IOVAs from 2^53 up cannot be named by the engine's address arithmetic: it treats them as
    // unreachable (a fault without a record, logged) rather than risk an inexact address.
    if (op === DmaEngineCommand.COPY && src + length > Number.MAX_SAFE_INTEGER) return { status: DmaEngineStatus.FAULT_READ, iova: src, done: 0 };
    if (dst + length > Number.MAX_SAFE_INTEGER) return { status: DmaEngineStatus.FAULT_WRITE, iova: dst, done: 0 };
    const space = this.options.spaceFor(t.pasid);
    space.begin();
    try {
      let done = 0;
      if (op === DmaEngineCommand.FILL) this.burst.fill(src & 0xff);
      while (done < length) {
        // Bursts end at page boundaries of the destination (and source), as a real engine's would.
        const n = Math.min(BURST - ((dst + done) % BURST), op === DmaEngineCommand.COPY ? BURST - ((src + done) % BURST) : BURST, length - done);
        const chunk = this.burst.subarray(0, n);
        if (op === DmaEngineCommand.COPY && !space.read(src + done, chunk)) return { status: DmaEngineStatus.FAULT_READ, iova: src + done, done };
        if (!space.write(dst + done, chunk)) return { status: DmaEngineStatus.FAULT_WRITE, iova: dst + done, done };
        done += n;
      }
      this.counters.bytes += done;
      this.regs[DmaEngineReg.DONE_BYTES / 4] = done;
      return { status: DmaEngineStatus.DONE, iova: 0, done };
    } finally {
      space.end();
    }
  }

  /** Records where a transfer stopped (the DmaSpace has reported the fault itself). */
  private faultAt(outcome: TransferOutcome, log = true): void {
    this.counters.faults++;
    this.counters.bytes += outcome.done;
    const r = this.regs;
    r[DmaEngineReg.FAULT_LO / 4] = outcome.iova >>> 0;
    r[DmaEngineReg.FAULT_HI / 4] = Math.floor(outcome.iova / 0x1_0000_0000) >>> 0;
    r[DmaEngineReg.DONE_BYTES / 4] = outcome.done;
    if (log) this.log.info({ iova: `0x${outcome.iova.toString(16)}`, done: outcome.done, status: outcome.status }, 'DMA engine: transfer stopped by a fault');
  }

  private finish(status: number): void {
    this.regs[DmaEngineReg.STATUS / 4] = status;
    const cause = status === DmaEngineStatus.DONE ? DmaEngineIrq.DONE : DmaEngineIrq.ERROR;
    this.regs[DmaEngineReg.IRQ_STATUS / 4] = this.regs[DmaEngineReg.IRQ_STATUS / 4]! | cause;
    this.updateIrq();
  }

  private updateIrq(): void {
    const pending = this.regs[DmaEngineReg.IRQ_STATUS / 4]! & this.regs[DmaEngineReg.IRQ_ENABLE / 4]!;
    // INTx disable masks the line, not the status bit.
    const raised = pending !== 0 && (this.command & PciCommand.INTX_DISABLE) === 0;
    this.options.irq.set(raised ? pending : 0);
  }

  stats(): DmaEngineStats {
    return { ...this.counters };
  }

  // ---- saved state --------------------------------------------------------------------------

  saveState(): DmaEngineState {
    const t = this.repeating;
    return {
      config: this.config.slice(),
      registers: Array.from(this.regs.subarray(0, REGISTER_COUNT)),
      counters: { ...this.counters },
      repeating: t === undefined ? null : { op: t.op, src: t.src, dst: t.dst, length: t.length, pasid: t.pasid ?? null },
    };
  }

  /**
   * Takes state from saveState() of an engine with the same capabilities, possibly saved in another
   * worker; a repeating transfer then goes on from its next pass. The state may be hostile: one
   * that does not fit is refused whole (RangeError or TypeError naming the field) and nothing
   * changes.
   */
  restoreState(state: unknown): void {
    const s = stateRecord(state, 'dma-engine', ['config', 'registers', 'counters', 'repeating']);
    const config = stateBytes(s.config, 'dma-engine.config', CONFIG_SIZE);
    // Only the bits the guest can write may differ from a function just reset; the status
    // register is computed on every read.
    const fresh = new DmaEngine({ spaceFor: this.options.spaceFor, irq: { set: () => undefined }, ...(this.options.pasidCapable !== undefined ? { pasidCapable: this.options.pasidCapable } : {}) });
    for (let i = 0; i < CONFIG_SIZE; i++) {
      if (i === PciHeader.status.offset || i === PciHeader.status.offset + 1) continue;
      const readOnly = ~fresh.writeMask[i]! & 0xff;
      if ((config[i]! & readOnly) !== (fresh.config[i]! & readOnly)) {
        throw new RangeError(`dma-engine.config[0x${i.toString(16)}] = 0x${config[i]!.toString(16)} changes read-only bits of this function`);
      }
    }
    const list = stateArray(s.registers, 'dma-engine.registers', REGISTER_COUNT);
    if (list.length !== REGISTER_COUNT) throw new RangeError(`dma-engine.registers must hold ${REGISTER_COUNT} registers, got ${list.length}`);
    const regs = list.map((v, i) => stateU32(v, `dma-engine.registers[0x${(i * 4).toString(16)}]`));
    const reg = (offset: number): number => regs[offset / 4]!;
    const name = (offset: number): string => `dma-engine.registers[0x${offset.toString(16)}]`;
    for (const offset of [DmaEngineReg.ID, DmaEngineReg.CAPS]) {
      if (reg(offset) !== fresh.regs[offset / 4]) throw new RangeError(`${name(offset)} = 0x${reg(offset).toString(16)}, this function has 0x${fresh.regs[offset / 4]!.toString(16)}`);
    }
    const causes = DmaEngineIrq.DONE | DmaEngineIrq.ERROR;
    for (const offset of [DmaEngineReg.IRQ_STATUS, DmaEngineReg.IRQ_ENABLE]) {
      if ((reg(offset) & ~causes) !== 0) throw new RangeError(`${name(offset)} = 0x${reg(offset).toString(16)} has bits beyond DONE and ERROR`);
    }
    // IRQ_ACK is write-only: a write clears IRQ_STATUS bits and nothing is stored.
    if (reg(DmaEngineReg.IRQ_ACK) !== 0) throw new RangeError(`${name(DmaEngineReg.IRQ_ACK)} must be 0, got ${reg(DmaEngineReg.IRQ_ACK)}`);
    const status = stateInteger(reg(DmaEngineReg.STATUS), name(DmaEngineReg.STATUS), DmaEngineStatus.IDLE, DmaEngineStatus.BUSY);
    const c = stateRecord(s.counters, 'dma-engine.counters', COUNTER_NAMES);
    const counters = {} as { -readonly [K in keyof DmaEngineStats]: number };
    for (const counter of COUNTER_NAMES) counters[counter] = stateCount(c[counter], `dma-engine.counters.${counter}`);
    let repeating: Transfer | undefined;
    if (s.repeating !== null) {
      const t = stateRecord(s.repeating, 'dma-engine.repeating', ['op', 'src', 'dst', 'length', 'pasid']);
      const op = stateInteger(t.op, 'dma-engine.repeating.op', DmaEngineCommand.COPY, DmaEngineCommand.FILL);
      // Addresses come from two u32 halves, so below 2^64; those past 2^53 fault in transfer().
      const src = stateInteger(t.src, 'dma-engine.repeating.src', 0, 2 ** 64 - 1);
      const dst = stateInteger(t.dst, 'dma-engine.repeating.dst', 0, 2 ** 64 - 1);
      const length = stateInteger(t.length, 'dma-engine.repeating.length', 1, DMA_ENGINE_MAX_LENGTH);
      let pasid: number | undefined;
      if (t.pasid !== null) {
        pasid = stateInteger(t.pasid, 'dma-engine.repeating.pasid', 0, DmaEnginePasid.MASK);
        if (this.options.pasidCapable !== true) throw new RangeError('dma-engine.repeating.pasid: this function has no PASID support');
      }
      repeating = { op, src, dst, length, pasid };
    }
    // STATUS reads BUSY exactly while a repeating transfer runs (a refused command sets it then too).
    if ((status === DmaEngineStatus.BUSY) !== (repeating !== undefined)) {
      throw new RangeError(`${name(DmaEngineReg.STATUS)} = ${status} does not fit dma-engine.repeating (${repeating === undefined ? 'none' : 'running'})`);
    }
    this.config.set(config);
    this.regs.fill(0);
    this.regs.set(regs);
    Object.assign(this.counters, counters);
    this.repeating = repeating;
    this.updateIrq();
  }
}
