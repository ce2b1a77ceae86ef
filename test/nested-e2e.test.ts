import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { DmaEngineDriver } from '../guest-fixtures/driver/dma-engine-driver.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import {
  encodeAttach,
  encodeAttachTable,
  encodeInvalidate,
  encodeMap,
  encodeProbe,
  parseProbeProperties,
  type EncodedRequest,
} from '../guest-fixtures/driver/iommu-requests.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import { X86PageTableBuilder, memoryEntryWriter, pagesFromAllocator } from '../guest-fixtures/pagetable/x86-64-builder.js';
import { FaultFlag, FaultReason, MapFlag, Status } from '../src/iommu/layout.js';
import { X86_PAGE_4K } from '../src/pagetable/x86-64.js';
import { driverArena } from '../src/replay/local-machine.js';
import type { PciBus } from '../src/virtio/bus.js';
import { IommuMachine } from '../src/vmm/iommu-machine.js';

// The seed's third guest event, end to end through workers: the guest builds a process page table,
// binds it to PASID 1 of the DMA engine with ATTACH_TABLE, and the engine's PASID-tagged DMA goes
// through both stages; the guest edits its table and sends INVALIDATE, and the next DMA sees the
// edit; an unbound PASID faults with the PASID in the record; RID traffic keeps its own domain.

const ENGINE = 0x10;
const MEMORY = 64 << 20;
const SRC_VA = 0x40_0000n;
const DST_VA = 0x50_0000n;
const SRC_GPA = 0x20_0000;
const DST_GPA = 0x30_0000;
const DST2_GPA = 0x31_0000;
const RID_IOVA = 0x1000_0000n;
const RID_GPA = 0x10_0000;
const rw = { writable: true, user: true, executable: false };
const ro = { writable: false, user: true, executable: false };

describe('a guest process page table bound to a PASID of the DMA engine', () => {
  let machine: IommuMachine;
  let iommu: IommuGuestDriver;
  let engine: DmaEngineDriver;
  let table: X86PageTableBuilder;
  const ok = (req: EncodedRequest): void => expect(iommu.request(req).status).toBe(Status.OK);
  const nextFault = async () => {
    await machine.iommu.control.flushFaults();
    return iommu.takeFault();
  };

  beforeAll(async () => {
    machine = await IommuMachine.create({
      memorySize: MEMORY,
      transport: 'pci',
      endpoints: [{ id: ENGINE, kind: 'dma-engine', pasidCapable: true, pasidBits: 8 }],
      device: { bootBypass: false, attachTable: true },
    });
    const arena = driverArena(MEMORY);
    iommu = IommuGuestDriver.open({
      transport: new PciDriverTransport(machine.iommu.bus as PciBus, { bar0Address: 0xe000_0000 }),
      memory: machine.memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: machine.iommu.interrupts,
    });
    engine = DmaEngineDriver.probe(machine.dmaEngines.get(ENGINE)!.bus as PciBus, { bar0Address: 0xd000_0000 });
    // The guest's page-table pages come from its own memory.
    table = new X86PageTableBuilder({ allocator: pagesFromAllocator(new GuestAllocator(0x80_0000, 1 << 20)), write: memoryEntryWriter(machine.memory) });
  });
  afterAll(async () => {
    await machine?.close();
  });

  it('negotiates the extension and PROBE reports the PASID width', () => {
    expect(iommu.offeredNames()).toContain('ATTACH_TABLE');
    const probeSize = iommu.readConfig().probeSize;
    const reply = iommu.request(encodeProbe(ENGINE, probeSize));
    expect(parseProbeProperties(reply.writable.subarray(0, probeSize))).toContainEqual({ type: 'HW_INTEL_VTD', pasidBits: 8, addrWidths: 3 });
  });

  it('DMA with PASID 1 goes through the guest table and stage 2; an edit plus INVALIDATE is seen by the next DMA', async () => {
    ok(encodeAttach(1, ENGINE));
    ok(encodeMap(1, RID_IOVA, RID_IOVA + 0xfffn, BigInt(RID_GPA), MapFlag.READ | MapFlag.WRITE));
    table.map(SRC_VA, SRC_GPA, X86_PAGE_4K, ro);
    table.map(DST_VA, DST_GPA, X86_PAGE_4K, rw);
    ok(encodeAttachTable(2, ENGINE, { root: BigInt(table.root), addrWidth: 48, pasid: 1 }));

    const payload = Uint8Array.from({ length: 4096 }, (_, i) => (i * 29 + 1) & 0xff);
    machine.memory.write(SRC_GPA, payload);
    machine.memory.fill(DST_GPA, 4096, 0);
    expect(engine.copy(SRC_VA, DST_VA, 4096, 1)).toEqual({ status: 'DONE', doneBytes: 4096 });
    expect(machine.memory.view(DST_GPA, 4096)).toEqual(payload);

    // Stage 1 says read-only: a write through it faults, and the record names the PASID.
    expect(engine.copy(DST_VA, SRC_VA, 64, 1)).toMatchObject({ status: 'FAULT_WRITE', faultAddress: SRC_VA });
    const denied = await nextFault();
    expect(denied).toMatchObject({ reason: FaultReason.MAPPING, endpoint: ENGINE, pasid: 1, address: SRC_VA });
    expect(denied!.flags & FaultFlag.PASID).toBe(FaultFlag.PASID);

    // The guest moves its destination page, then tells the IOMMU.
    table.unmap(DST_VA, 4096);
    table.map(DST_VA, DST2_GPA, X86_PAGE_4K, rw);
    ok(encodeInvalidate(2, { scope: 'address', address: DST_VA, pages: 1n, leaf: true }));
    machine.memory.fill(DST_GPA, 4096, 0xee);
    expect(engine.copy(SRC_VA, DST_VA, 4096, 1).status).toBe('DONE');
    expect(machine.memory.view(DST2_GPA, 4096)).toEqual(payload);
    expect(machine.memory.view(DST_GPA, 4096).every((b) => b === 0xee)).toBe(true);
  });

  it('an unbound PASID faults with the PASID in the record; RID traffic keeps its own domain', async () => {
    expect(engine.copy(SRC_VA, DST_VA, 64, 2)).toMatchObject({ status: 'FAULT_READ', faultAddress: SRC_VA });
    const fault = await nextFault();
    expect(fault).toMatchObject({ reason: FaultReason.DOMAIN, endpoint: ENGINE, pasid: 2 });
    expect(fault!.flags & FaultFlag.PASID).toBe(FaultFlag.PASID);

    expect(engine.fill(RID_IOVA, 64, 0xab)).toEqual({ status: 'DONE', doneBytes: 64 });
    expect(machine.memory.view(RID_GPA, 64).every((b) => b === 0xab)).toBe(true);
    // Without a PASID the process table does not apply.
    expect(engine.fill(SRC_VA, 64, 0xab)).toMatchObject({ status: 'FAULT_WRITE' });
    expect(await nextFault()).toMatchObject({ reason: FaultReason.MAPPING, endpoint: ENGINE, address: SRC_VA });
  });
});
