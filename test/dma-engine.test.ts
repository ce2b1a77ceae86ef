import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { DmaEngineDriver } from '../guest-fixtures/driver/dma-engine-driver.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import { encodeAttach, encodeDetach, encodeMap, encodeUnmap, type EncodedRequest } from '../guest-fixtures/driver/iommu-requests.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import {
  DMA_ENGINE_ID,
  DmaEngine,
  DmaEngineCommand,
  DmaEngineIrq,
  DmaEngineReg,
  DmaEngineStatus,
} from '../src/devices/dma-engine.js';
import { FaultFlag, FaultReason, MapFlag, Status } from '../src/iommu/layout.js';
import type { DmaSpace } from '../src/memory/dma-space.js';
import { GuestMemory } from '../src/memory/index.js';
import { driverArena } from '../src/replay/local-machine.js';
import type { MmioBus, PciBus } from '../src/virtio/bus.js';
import { PciCommand, PciHeader } from '../src/virtio/pci.js';
import { endpointDeviceName, IommuMachine } from '../src/vmm/iommu-machine.js';

/** IOVA = GPA + OFFSET inside [WINDOW_START, WINDOW_END) of IOVA space; anything else faults. */
const OFFSET = 0x4000_0000;
const WINDOW: readonly [number, number] = [OFFSET + 0x10_0000, OFFSET + 0x20_0000];

class OffsetSpace implements DmaSpace {
  depth = 0;
  faults: number[] = [];
  constructor(private readonly memory: GuestMemory) {}
  begin(): void {
    this.depth++;
  }
  end(): void {
    this.depth--;
  }
  private ok(iova: number, n: number): boolean {
    if (this.depth === 0) throw new Error('access outside a DMA bracket');
    if (iova >= WINDOW[0] && iova + n <= WINDOW[1]) return true;
    this.faults.push(iova);
    return false;
  }
  read(iova: number, into: Uint8Array): boolean {
    if (!this.ok(iova, into.length)) return false;
    this.memory.read(iova - OFFSET, into);
    return true;
  }
  write(iova: number, from: Uint8Array): boolean {
    if (!this.ok(iova, from.length)) return false;
    this.memory.write(iova - OFFSET, from);
    return true;
  }
}

describe('DMA engine registers and transfers (in-thread)', () => {
  let memory: GuestMemory;
  let space: OffsetSpace;
  let irq: number[];
  let engine: DmaEngine;
  const bar = (o: number): number => engine.barRead(0, o, 4);
  const set = (o: number, v: number): void => engine.barWrite(0, o, 4, v);
  const enable = (command = PciCommand.MEMORY_SPACE | PciCommand.BUS_MASTER): void => engine.configWrite(PciHeader.command.offset, 2, command);
  const program = (src: number, dst: number, length: number): void => {
    set(DmaEngineReg.SRC_LO, src);
    set(DmaEngineReg.SRC_HI, 0);
    set(DmaEngineReg.DST_LO, dst);
    set(DmaEngineReg.DST_HI, 0);
    set(DmaEngineReg.LENGTH, length);
  };

  beforeEach(() => {
    memory = GuestMemory.create(4 << 20);
    space = new OffsetSpace(memory);
    irq = [];
    engine = new DmaEngine({ spaceFor: () => space, irq: { set: (s) => irq.push(s) } });
  });

  it('decodes BAR 0 only with memory space enabled; identity registers are read-only', () => {
    expect(bar(DmaEngineReg.ID)).toBe(0xffff_ffff);
    enable();
    expect(bar(DmaEngineReg.ID)).toBe(DMA_ENGINE_ID);
    set(DmaEngineReg.ID, 0);
    set(DmaEngineReg.STATUS, DmaEngineStatus.DONE);
    expect(bar(DmaEngineReg.ID)).toBe(DMA_ENGINE_ID);
    expect(bar(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.IDLE);
    expect(engine.barRead(0, DmaEngineReg.ID, 2)).toBe(0xffff);
    expect(bar(0x1000)).toBe(0xffff_ffff);
  });

  it('copies across page boundaries and fills, counting completions and raising DONE', () => {
    enable();
    set(DmaEngineReg.IRQ_ENABLE, DmaEngineIrq.DONE | DmaEngineIrq.ERROR);
    const data = Uint8Array.from({ length: 10_000 }, (_, i) => (i * 7 + 3) & 0xff);
    memory.write(0x10_0800, data);
    program(OFFSET + 0x10_0800, OFFSET + 0x15_0100, data.length);
    set(DmaEngineReg.COMMAND, DmaEngineCommand.COPY);
    expect(bar(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.DONE);
    expect(bar(DmaEngineReg.DONE_BYTES)).toBe(data.length);
    expect(memory.view(0x15_0100, data.length)).toEqual(data);
    expect(bar(DmaEngineReg.IRQ_STATUS)).toBe(DmaEngineIrq.DONE);
    expect(irq.at(-1)).toBe(DmaEngineIrq.DONE);
    set(DmaEngineReg.IRQ_ACK, DmaEngineIrq.DONE);
    expect(irq.at(-1)).toBe(0);

    program(0xab, OFFSET + 0x18_0000, 300);
    set(DmaEngineReg.COMMAND, DmaEngineCommand.FILL);
    expect(memory.view(0x18_0000, 300).every((b) => b === 0xab)).toBe(true);
    expect(memory.view(0x18_0000 + 300, 1)[0]).toBe(0);
    expect(bar(DmaEngineReg.COMPLETED)).toBe(2);
  });

  it('stops at the first faulting page: status, fault address and bytes done; nothing written past it', () => {
    enable();
    memory.fill(0x1f_f000, 0x1000, 0x11);
    // Destination runs off the end of the window after one page.
    program(OFFSET + 0x10_0000, WINDOW[1] - 0x1000, 0x3000);
    set(DmaEngineReg.COMMAND, DmaEngineCommand.COPY);
    expect(bar(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.FAULT_WRITE);
    expect(bar(DmaEngineReg.FAULT_LO)).toBe(WINDOW[1]);
    expect(bar(DmaEngineReg.DONE_BYTES)).toBe(0x1000);
    // Source outside the window: nothing moves at all.
    program(OFFSET + 0x8_0000, OFFSET + 0x10_0000, 64);
    set(DmaEngineReg.COMMAND, DmaEngineCommand.COPY);
    expect(bar(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.FAULT_READ);
    expect(bar(DmaEngineReg.FAULT_LO)).toBe(OFFSET + 0x8_0000);
    expect(bar(DmaEngineReg.DONE_BYTES)).toBe(0);
    expect(bar(DmaEngineReg.IRQ_STATUS) & DmaEngineIrq.ERROR).toBe(DmaEngineIrq.ERROR);
    expect(space.depth).toBe(0);
  });

  it('refuses commands it must not run: bus mastering off, bad length, unknown command, PASID unsupported', () => {
    enable(PciCommand.MEMORY_SPACE);
    program(OFFSET + 0x10_0000, OFFSET + 0x11_0000, 16);
    set(DmaEngineReg.COMMAND, DmaEngineCommand.COPY);
    expect(bar(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.INVALID);
    enable();
    for (const [length, command, pasid] of [
      [0, DmaEngineCommand.COPY, 0],
      [(1 << 20) + 1, DmaEngineCommand.COPY, 0],
      [16, 9, 0],
      [16, DmaEngineCommand.COPY, (1 << 31) | 5],
    ] as const) {
      set(DmaEngineReg.LENGTH, length);
      set(DmaEngineReg.PASID, pasid);
      set(DmaEngineReg.COMMAND, command);
      expect(bar(DmaEngineReg.STATUS), `length ${length} command ${command}`).toBe(DmaEngineStatus.INVALID);
    }
    expect(space.faults).toEqual([]);
    expect(engine.stats()).toMatchObject({ invalid: 5, completed: 0 });
  });

  it('INTx disable masks the line but not the status; reset clears registers and decoding', () => {
    enable(PciCommand.MEMORY_SPACE | PciCommand.BUS_MASTER | PciCommand.INTX_DISABLE);
    set(DmaEngineReg.IRQ_ENABLE, DmaEngineIrq.DONE);
    program(OFFSET + 0x10_0000, OFFSET + 0x11_0000, 16);
    set(DmaEngineReg.COMMAND, DmaEngineCommand.COPY);
    expect(irq.at(-1)).toBe(0);
    expect(engine.configRead(PciHeader.status.offset, 2) & 0x8).toBe(0x8);
    enable();
    expect(irq.at(-1)).toBe(DmaEngineIrq.DONE);
    engine.reset();
    expect(irq.at(-1)).toBe(0);
    expect(engine.configRead(PciHeader.command.offset, 2)).toBe(0);
    enable();
    expect(bar(DmaEngineReg.LENGTH)).toBe(0);
    expect(bar(DmaEngineReg.COMPLETED)).toBe(0);
  });
});

describe('DMA engine in its worker behind the virtio-iommu', () => {
  const EP = 0x20;
  const SRC = 0x1000_0000n;
  const DST = 0x2000_0000n;
  const SRC_GPA = 0x10_0000n;
  const DST_GPA = 0x20_0000n;
  let machine: IommuMachine;
  let iommu: IommuGuestDriver;
  let engine: DmaEngineDriver;
  const ok = (req: EncodedRequest): void => expect(iommu.request(req).status).toBe(Status.OK);
  const nextFault = async () => {
    await machine.iommu.control.flushFaults();
    return iommu.takeFault();
  };

  beforeEach(async () => {
    machine = await IommuMachine.create({ memorySize: 16 << 20, transport: 'mmio', endpoints: [{ id: EP, kind: 'dma-engine' }], device: { bootBypass: false } });
    const arena = driverArena(16 << 20);
    iommu = IommuGuestDriver.open({
      transport: new MmioDriverTransport(machine.iommu.bus as MmioBus),
      memory: machine.memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: machine.iommu.interrupts,
    });
    engine = DmaEngineDriver.probe(machine.dmaEngines.get(EP)!.bus as PciBus, { bar0Address: 0xd000_0000 });
  });
  afterEach(async () => {
    await machine.close();
  });

  it('blocked before ATTACH (DOMAIN fault), copies once mapped, faults with a record after UNMAP and writes nothing', async () => {
    const payload = Uint8Array.from({ length: 8192 }, (_, i) => (i * 13) & 0xff);
    machine.memory.write(Number(SRC_GPA), payload);

    const blocked = engine.copy(SRC, DST, payload.length);
    expect(blocked).toMatchObject({ status: 'FAULT_READ', faultAddress: SRC, doneBytes: 0 });
    expect(await nextFault()).toMatchObject({ reason: FaultReason.DOMAIN, endpoint: EP });

    ok(encodeAttach(1, EP));
    ok(encodeMap(1, SRC, SRC + 0x1fffn, SRC_GPA, MapFlag.READ));
    ok(encodeMap(1, DST, DST + 0x1fffn, DST_GPA, MapFlag.READ | MapFlag.WRITE));
    expect(engine.copy(SRC, DST, payload.length)).toEqual({ status: 'DONE', doneBytes: payload.length });
    expect(machine.memory.view(Number(DST_GPA), payload.length)).toEqual(payload);

    // Writing into the read-only source mapping is a permission fault, reported as MAPPING + WRITE.
    const denied = engine.copy(DST, SRC, 16);
    expect(denied).toMatchObject({ status: 'FAULT_WRITE', faultAddress: SRC });
    expect(await nextFault()).toMatchObject({ reason: FaultReason.MAPPING, endpoint: EP, address: SRC, flags: FaultFlag.WRITE | FaultFlag.ADDRESS });

    ok(encodeUnmap(1, DST, DST + 0x1fffn));
    machine.memory.fill(Number(DST_GPA), payload.length, 0xee);
    const after = engine.copy(SRC, DST, payload.length);
    expect(after).toMatchObject({ status: 'FAULT_WRITE', faultAddress: DST, doneBytes: 0 });
    expect(await nextFault()).toMatchObject({ reason: FaultReason.MAPPING, endpoint: EP, address: DST });
    expect(machine.memory.view(Number(DST_GPA), payload.length).every((b) => b === 0xee)).toBe(true);

    const stats = await machine.dmaEngines.get(EP)!.control.stats();
    expect(stats.engine).toMatchObject({ completed: 1, faults: 3 });
  });
});

describe('two DMA-engine functions in one isolation group', () => {
  const FN0 = 0x28;
  const FN1 = 0x29;
  const OTHER = 0x30;
  let machine: IommuMachine;
  let iommu: IommuGuestDriver;
  const status = (req: EncodedRequest): number | 'NONE' => iommu.request(req).status;

  beforeEach(async () => {
    machine = await IommuMachine.create({
      memorySize: 16 << 20,
      transport: 'pci',
      endpoints: [{ id: FN0, kind: 'dma-engine', group: 'card0' }, { id: FN1, kind: 'dma-engine', group: 'card0' }, OTHER],
      device: { bootBypass: false },
    });
    const arena = driverArena(16 << 20);
    iommu = IommuGuestDriver.open({
      transport: new PciDriverTransport(machine.iommu.bus as PciBus, { bar0Address: 0xe000_0000 }),
      memory: machine.memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: machine.iommu.interrupts,
    });
  });
  afterEach(async () => {
    await machine.close();
  });

  it('the group is owned by this context, shares one translation, and cannot be split across domains', async () => {
    // Another process cannot bind either function while this machine's context owns the group.
    expect(await machine.iommu.control.foreignBind(endpointDeviceName(FN1))).toBe('EBUSY');
    expect(await machine.iommu.control.foreignBind(endpointDeviceName(FN0))).toBe('EBUSY');

    const fn0 = DmaEngineDriver.probe(machine.dmaEngines.get(FN0)!.bus as PciBus, { bar0Address: 0xd000_0000 });
    const fn1 = DmaEngineDriver.probe(machine.dmaEngines.get(FN1)!.bus as PciBus, { bar0Address: 0xd000_1000 });
    const IOVA = 0x3000_0000n;
    expect(status(encodeAttach(1, FN0))).toBe(Status.OK);
    expect(status(encodeMap(1, IOVA, IOVA + 0xfffn, 0x30_0000n, MapFlag.READ | MapFlag.WRITE))).toBe(Status.OK);
    // FN1 was never attached, yet it cannot be isolated from FN0: it follows its sibling.
    expect(fn1.fill(IOVA, 64, 0x5c).status).toBe('DONE');
    expect(machine.memory.view(0x30_0000, 64).every((b) => b === 0x5c)).toBe(true);

    // Spec: the device MUST reject an ATTACH it cannot perform with UNSUPP.
    expect(status(encodeAttach(2, FN1))).toBe(Status.UNSUPP);
    expect(status(encodeAttach(2, OTHER))).toBe(Status.OK);
    expect(status(encodeAttach(1, FN1))).toBe(Status.OK);

    // Detaching one function while its sibling stays attached leaves it in the group's domain.
    expect(status(encodeDetach(1, FN0))).toBe(Status.OK);
    expect(fn0.fill(IOVA, 64, 0x6d).status).toBe('DONE');
    // Once no function of the group is attached, both are blocked (bypass is off).
    expect(status(encodeDetach(1, FN1))).toBe(Status.OK);
    expect(fn0.fill(IOVA, 64, 0x7e)).toMatchObject({ status: 'FAULT_WRITE', faultAddress: IOVA });
    expect(fn1.fill(IOVA, 64, 0x7e)).toMatchObject({ status: 'FAULT_WRITE', faultAddress: IOVA });
    expect(machine.memory.view(0x30_0000, 64).every((b) => b === 0x6d)).toBe(true);
    await machine.iommu.control.flushFaults();
    const faults = [iommu.takeFault(), iommu.takeFault()];
    expect(faults.map((f) => [f?.reason, f?.endpoint])).toEqual([
      [FaultReason.DOMAIN, FN0],
      [FaultReason.DOMAIN, FN1],
    ]);
  });
});
