import { afterEach, describe, expect, it } from 'vitest';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { DmaEngineDriver } from '../guest-fixtures/driver/dma-engine-driver.js';
import { GuestDmaView } from '../guest-fixtures/driver/dma-view.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import { encodeAttach, encodeDetach, encodeMap, encodeUnmap, type EncodedRequest } from '../guest-fixtures/driver/iommu-requests.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import { NetDriver } from '../guest-fixtures/driver/net-driver.js';
import { DmaEngineCommand, DmaEngineReg, DmaEngineStatus } from '../src/devices/dma-engine.js';
import { MapFlag, Status } from '../src/iommu/layout.js';
import { driverArena } from '../src/replay/local-machine.js';
import type { MmioBus, PciBus } from '../src/virtio/bus.js';
import { DeviceTimeoutError } from '../src/virtio/mailbox.js';
import { IommuMachine } from '../src/vmm/iommu-machine.js';

// A consumer device whose worker dies in the middle of a DMA takes down only itself: the unmap
// that would wait for its DMA goes on at once, the guest sees its registers fail, and the
// virtio-iommu and the other device keep working.

const ENGINE = 0x10;
const NET = 0x18;
const WINDOW = 0x4000_0000n;
const ARENA = { iova: 0x6000_0000, gpa: 0x80_0000, size: 1 << 20 };

let machine: IommuMachine | undefined;
afterEach(async () => {
  await machine?.close();
  machine = undefined;
});

describe('a consumer worker that dies mid-traffic', () => {
  it('is detached and forgotten; unmaps do not wait for it; the rest of the machine works', async () => {
    // A long quiescence timeout: without the machine freeing the dead worker's slot, the UNMAP
    // below would wait all of it.
    const m = (machine = await IommuMachine.create({
      memorySize: 32 << 20,
      transport: 'mmio',
      endpoints: [{ id: ENGINE, kind: 'dma-engine', repeatGapMicros: 0 }, { id: NET, kind: 'virtio-net' }],
      device: { bootBypass: false },
      quiescenceTimeoutMs: 60_000,
    }));
    const arena = driverArena(32 << 20);
    const iommu = IommuGuestDriver.open({
      transport: new MmioDriverTransport(m.iommu.bus as MmioBus),
      memory: m.memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: m.iommu.interrupts,
    });
    const ok = (req: EncodedRequest): void => expect(iommu.request(req, 20_000).status).toBe(Status.OK);
    ok(encodeAttach(1, ENGINE));
    ok(encodeAttach(1, NET));
    ok(encodeMap(1, WINDOW, WINDOW + 0xfffffn, 0x20_0000n, MapFlag.READ | MapFlag.WRITE));
    ok(encodeMap(1, BigInt(ARENA.iova), BigInt(ARENA.iova + ARENA.size - 1), BigInt(ARENA.gpa), MapFlag.READ | MapFlag.WRITE));

    const engine = DmaEngineDriver.probe(m.dmaEngines.get(ENGINE)!.bus as PciBus, { bar0Address: 0xd000_0000 });
    engine.setReg(DmaEngineReg.DST_LO, Number(WINDOW));
    engine.setReg(DmaEngineReg.SRC_LO, 0x3c);
    engine.setReg(DmaEngineReg.LENGTH, 0x100000);
    engine.setReg(DmaEngineReg.COMMAND, DmaEngineCommand.FILL | DmaEngineCommand.REPEAT);
    expect(engine.reg(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.BUSY);
    const passes = engine.reg(DmaEngineReg.PASSES);
    for (const deadline = Date.now() + 2000; engine.reg(DmaEngineReg.PASSES) === passes && Date.now() < deadline; );

    await m.dmaEngines.get(ENGINE)!.worker.terminate();
    await m.settled();
    expect(m.failures.get(ENGINE)).toMatch(/exited/);

    // The guest's unmap completes promptly although the engine died inside its loop of DMAs.
    const t0 = Date.now();
    ok(encodeUnmap(1, WINDOW, WINDOW + 0xfffffn));
    expect(Date.now() - t0).toBeLessThan(10_000);
    // The guest sees its device fail, quickly rather than at the access timeout.
    expect(() => engine.reg(DmaEngineReg.STATUS)).toThrow(DeviceTimeoutError);
    // Its attachments can still be changed by the guest (nothing reaches the backend for it).
    ok(encodeDetach(1, ENGINE));

    // The other device keeps working through the same domain.
    const view = new GuestDmaView(m.memory);
    view.map(ARENA.iova, ARENA.gpa, ARENA.size);
    const net = NetDriver.open({
      transport: new MmioDriverTransport(m.netDevices.get(NET)!.bus as MmioBus),
      memory: view,
      allocator: new GuestAllocator(ARENA.iova, ARENA.size),
      interrupts: m.netDevices.get(NET)!.interrupts,
      queueSize: 64,
    });
    net.postReceiveBuffers(2);
    const frame = new Uint8Array(100).fill(0x5a);
    net.send(frame);
    const back = net.receive();
    expect(back.kind === 'packet' ? back.frame : back).toEqual(frame);
    const stats = await m.iommu.control.stats();
    expect(stats.device.requests).toBeGreaterThanOrEqual(6);
  });
});

describe('an iommu worker that dies', () => {
  it('is reported by the machine, and the guest driver fails at once instead of waiting out its timeouts', async () => {
    const m = (machine = await IommuMachine.create({ memorySize: 16 << 20, transport: 'pci', endpoints: [ENGINE] }));
    const arena = driverArena(16 << 20);
    const iommu = IommuGuestDriver.open({
      transport: new PciDriverTransport(m.iommu.bus as PciBus, { bar0Address: 0xe000_0000 }),
      memory: m.memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: m.iommu.interrupts,
    });
    expect(iommu.request(encodeAttach(1, ENGINE)).status).toBe(Status.OK);
    expect(m.iommuFailure).toBeUndefined();
    await m.iommu.worker.terminate();
    expect(m.iommuFailure?.message).toMatch(/virtio-iommu: worker exited with code/);
    const t0 = Date.now();
    expect(() => iommu.request(encodeDetach(1, ENGINE), 30_000)).toThrow(/stopped/);
    expect(Date.now() - t0).toBeLessThan(2000);
  });
});
