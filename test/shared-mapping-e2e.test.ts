import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { DmaEngineDriver } from '../guest-fixtures/driver/dma-engine-driver.js';
import { GuestDmaView } from '../guest-fixtures/driver/dma-view.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import { encodeAttach, encodeMap, encodeUnmap, type DecodedFault, type EncodedRequest } from '../guest-fixtures/driver/iommu-requests.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { NetDriver, VIRTIO_NET } from '../guest-fixtures/driver/net-driver.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import { DEFAULT_MAC, type VirtioNetStats } from '../src/devices/virtio-net.js';
import { FaultFlag, FaultReason, MapFlag, Status } from '../src/iommu/layout.js';
import { driverArena } from '../src/replay/local-machine.js';
import type { MmioBus, PciBus } from '../src/virtio/bus.js';
import { endpointDeviceName, IommuMachine } from '../src/vmm/iommu-machine.js';

// The seed's point, end to end: a VFIO-style DMA engine and a vDPA-style virtio-net device, each
// in its own worker, attached to one domain by the guest's virtio-iommu driver. One MAP makes a
// buffer usable by both; one UNMAP takes it from both.

const ENGINE = 0x10;
const NET = 0x18;
const MEMORY = 64 << 20;
const PAGE = 4096;
const ARENA_IOVA = 0x8000_0000;
const ARENA_GPA = 0x10_0000;
const ARENA_SIZE = 1 << 20;
const SHARED_IOVA = 0x9000_0000;
const SHARED_GPA = 0x40_0000;
const SOURCE_IOVA = 0xa000_0000;
const SOURCE_GPA = 0x50_0000;
const POISON = 0xee;
const RW = MapFlag.READ | MapFlag.WRITE;

describe('one mapping shared by a DMA engine and a virtio-net device', () => {
  let machine: IommuMachine;
  let iommu: IommuGuestDriver;
  let engine: DmaEngineDriver;
  let net: NetDriver;
  let view: GuestDmaView;
  const ok = (req: EncodedRequest): void => expect(iommu.request(req).status).toBe(Status.OK);
  const netStats = async (): Promise<VirtioNetStats> => (await machine.netDevices.get(NET)!.control.stats()).model as unknown as VirtioNetStats;

  beforeAll(async () => {
    machine = await IommuMachine.create({
      memorySize: MEMORY,
      transport: 'pci',
      endpoints: [
        { id: ENGINE, kind: 'dma-engine' },
        { id: NET, kind: 'virtio-net', transport: 'mmio' },
      ],
      device: { bootBypass: false },
    });
    const arena = driverArena(MEMORY);
    iommu = IommuGuestDriver.open({
      transport: new PciDriverTransport(machine.iommu.bus as PciBus, { bar0Address: 0xe000_0000 }),
      memory: machine.memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: machine.iommu.interrupts,
    });
    engine = DmaEngineDriver.probe(machine.dmaEngines.get(ENGINE)!.bus as PciBus, { bar0Address: 0xd000_0000 });

    // Both endpoints in one domain; the net device's rings and buffers in an arena it reaches by IOVA.
    ok(encodeAttach(1, ENGINE));
    ok(encodeAttach(1, NET));
    ok(encodeMap(1, BigInt(ARENA_IOVA), BigInt(ARENA_IOVA + ARENA_SIZE - 1), BigInt(ARENA_GPA), RW));
    view = new GuestDmaView(machine.memory);
    view.map(ARENA_IOVA, ARENA_GPA, ARENA_SIZE);
    net = NetDriver.open({
      transport: new MmioDriverTransport(machine.netDevices.get(NET)!.bus as MmioBus),
      memory: view,
      allocator: new GuestAllocator(ARENA_IOVA, ARENA_SIZE),
      interrupts: machine.netDevices.get(NET)!.interrupts,
      queueSize: 64,
    });
  });
  afterAll(async () => {
    await machine?.close();
  });

  it('a buffer mapped once is written by the engine, sent and received back by the net device; pages counted once', async () => {
    expect(net.accessPlatform).toBe(true);
    ok(encodeMap(1, BigInt(SHARED_IOVA), BigInt(SHARED_IOVA + PAGE - 1), BigInt(SHARED_GPA), RW));
    ok(encodeMap(1, BigInt(SOURCE_IOVA), BigInt(SOURCE_IOVA + PAGE - 1), BigInt(SOURCE_GPA), MapFlag.READ));
    view.map(SHARED_IOVA, SHARED_GPA, PAGE);

    // The guest CPU writes a packet (header + frame) into the source page; the engine copies it
    // into the shared buffer by IOVA.
    const frame = Uint8Array.from({ length: 600 }, (_, i) => (i * 11 + 5) & 0xff);
    frame.set(DEFAULT_MAC, 0);
    const packet = new Uint8Array(VIRTIO_NET.HDR_SIZE + frame.length);
    packet.set(frame, VIRTIO_NET.HDR_SIZE);
    machine.memory.write(SOURCE_GPA, packet);
    machine.memory.fill(SHARED_GPA, PAGE, 0);
    expect(engine.copy(BigInt(SOURCE_IOVA), BigInt(SHARED_IOVA), packet.length)).toEqual({ status: 'DONE', doneBytes: packet.length });

    // virtio-net transmits straight from the shared buffer and loops the frame back.
    net.postReceiveBuffers(4);
    net.device.submit(VIRTIO_NET.TX, { readable: [{ addr: SHARED_IOVA, len: packet.length }], writable: [] }, { token: { addr: SHARED_IOVA, size: 0 } });
    const received = net.receive();
    expect(received.kind).toBe('packet');
    if (received.kind === 'packet') expect(received.frame).toEqual(frame);
    net.waitTransmitted(1);

    // The engine is a bound device on the domain's HWPT; the net device is no device at all but an
    // iommufd access on that HWPT's IOAS: one address space, two kinds of consumer.
    const ctx = (await machine.iommu.control.inspect()).contexts[0]!;
    const engineDevice = ctx.devices.find((d) => d.name === endpointDeviceName(ENGINE))!;
    const hwpt = engineDevice.attachments.find((a) => a.pasid === 0)!.target as number;
    const ioas = ctx.hwpts.find((h) => h.id === hwpt)!.ioas;
    expect(ctx.devices.map((d) => d.name)).toEqual([endpointDeviceName(ENGINE)]);
    expect(ctx.accesses.map((a) => a.ioas)).toEqual([ioas]);

    // Every guest page is pinned and counted once: the arena, the shared page, the source page.
    const stats = await machine.iommu.control.stats();
    expect(stats.backend.pinnedPages).toBe(ARENA_SIZE / PAGE + 2);
    expect(stats.backend.accountedPages).toBe(stats.backend.pinnedPages);
  });

  it('one UNMAP takes the buffer from both devices: faults on the event queue, engine error, net chains returned untouched', async () => {
    ok(encodeUnmap(1, BigInt(SHARED_IOVA), BigInt(SHARED_IOVA + PAGE - 1)));
    machine.memory.fill(SHARED_GPA, PAGE, POISON);
    const before = await netStats();

    expect(engine.copy(BigInt(SOURCE_IOVA), BigInt(SHARED_IOVA), 64)).toMatchObject({ status: 'FAULT_WRITE', faultAddress: BigInt(SHARED_IOVA) });
    // Transmit from the unmapped buffer: returned with length 0, nothing sent.
    net.device.submit(VIRTIO_NET.TX, { readable: [{ addr: SHARED_IOVA, len: 100 }], writable: [] }, { token: { addr: SHARED_IOVA, size: 0 } });
    net.waitTransmitted(1);
    // A receive buffer at the unmapped IOVA, behind the three still posted: the fourth frame
    // must not land there.
    net.postReceiveBufferAt(SHARED_IOVA, PAGE);
    net.device.kick(VIRTIO_NET.RX);
    const frames = [1, 2, 3, 4].map((k) => new Uint8Array(64).fill(0x40 + k));
    for (const f of frames) net.send(f);
    const got = [net.receive(), net.receive(), net.receive(), net.receive()];
    expect(got.slice(0, 3).map((r) => r.kind)).toEqual(['packet', 'packet', 'packet']);
    expect(got[3]).toMatchObject({ kind: 'error', len: 0, addr: SHARED_IOVA });
    net.waitTransmitted(4);
    expect(machine.memory.view(SHARED_GPA, PAGE).every((b) => b === POISON)).toBe(true);

    const after = await netStats();
    expect(after.txFaults - before.txFaults).toBe(1);
    expect(after.rxFaults - before.rxFaults).toBe(1);
    await machine.iommu.control.flushFaults();
    const faults: DecodedFault[] = [];
    for (let f = iommu.takeFault(); f !== undefined; f = iommu.takeFault()) faults.push(f);
    const byEndpoint = (ep: number) => faults.filter((f) => f.endpoint === ep && f.reason === FaultReason.MAPPING && f.address === BigInt(SHARED_IOVA));
    expect(byEndpoint(ENGINE).map((f) => f.flags)).toEqual([FaultFlag.WRITE | FaultFlag.ADDRESS]);
    expect(byEndpoint(NET).map((f) => f.flags & (FaultFlag.READ | FaultFlag.WRITE)).sort()).toEqual([FaultFlag.READ, FaultFlag.WRITE]);
  });
});
