import { describe, expect, it } from 'vitest';
import type { EndpointFault } from '../src/iommu/device.js';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import { encodeAttach, encodeMap, encodeUnmap } from '../guest-fixtures/driver/iommu-requests.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { FaultFlag, FaultReason, MapFlag, Status } from '../src/iommu/layout.js';
import { LocalIommuMachine, driverArena } from '../src/replay/local-machine.js';
import type { MmioBus } from '../src/virtio/bus.js';
import { IommuMachine } from '../src/vmm/iommu-machine.js';

// The event queue when the guest is slow to give buffers back: records wait in a bounded list,
// oldest first; repeats of a waiting record are counted, not queued; beyond the bound the newest
// are counted and dropped, so memory stays bounded and the guest learns about the first faults.

const EP = 0x10;
const fault = (i: number): EndpointFault => ({ reason: 'MAPPING', endpoint: EP, address: BigInt(i) * 0x1000n, write: true });

describe('fault records while the event queue is full', () => {
  it('delivers the oldest first, coalesces repeats of a waiting record, drops and counts the newest beyond the bound', () => {
    const m = new LocalIommuMachine({ memorySize: 16 << 20, endpoints: [EP], driverFeatures: ['MAP_UNMAP', 'PROBE', 'BYPASS_CONFIG'], device: { maxPendingFaults: 32 } });
    // The driver posted 8 event buffers: the first 8 faults are delivered at once.
    for (let i = 0; i < 8 + 32 + 10; i++) m.device.reportFault(fault(i));
    for (let k = 0; k < 5; k++) m.device.reportFault(fault(20));
    // A repeat of a record already delivered is a new record, but the list is full: dropped.
    m.device.reportFault(fault(0));
    expect(m.device.stats()).toMatchObject({ faultsReported: 8, faultsPending: 32, faultsDropped: 11, faultsCoalesced: 5 });

    // Each buffer the guest gives back carries the next oldest record, in order.
    const seen: bigint[] = [];
    for (let f = m.driver.takeFault(); f !== undefined; f = m.driver.takeFault()) {
      expect(f).toMatchObject({ reason: FaultReason.MAPPING, endpoint: EP, flags: FaultFlag.WRITE | FaultFlag.ADDRESS });
      seen.push(f.address);
    }
    expect(seen).toEqual(Array.from({ length: 40 }, (_, i) => BigInt(i) * 0x1000n));
    expect(m.device.stats()).toMatchObject({ faultsReported: 40, faultsPending: 0 });

    // Once delivered, the same fault is reported again.
    m.device.reportFault(fault(20));
    expect(m.driver.takeFault()?.address).toBe(20n * 0x1000n);
  });
});

describe('bounded passes over the request queue', () => {
  it('serves a batch larger than one pass completely, in order, in several passes', async () => {
    const machine = await IommuMachine.create({ memorySize: 32 << 20, transport: 'mmio', endpoints: [EP], device: { maxRequestsPerPass: 64 } });
    try {
      const arena = driverArena(32 << 20);
      const driver = IommuGuestDriver.open({
        transport: new MmioDriverTransport(machine.iommu.bus as MmioBus),
        memory: machine.memory,
        allocator: new GuestAllocator(arena.base, arena.size),
        interrupts: machine.iommu.interrupts,
        queueSize: 1024,
      });
      expect(driver.request(encodeAttach(1, EP)).status).toBe(Status.OK);
      // 400 MAPs behind one notification; every tenth overlaps the one before it: INVAL, in order.
      const requests = Array.from({ length: 400 }, (_, i) => {
        const page = i % 10 === 9 ? i - 1 : i;
        const iova = 0x4000_0000n + BigInt(page) * 0x1000n;
        return encodeMap(1, iova, iova + 0xfffn, BigInt(i % 1024) * 0x1000n, MapFlag.READ);
      });
      const results = driver.batch(requests, 20_000);
      expect(results.map((r) => r.status)).toEqual(requests.map((_, i) => (i % 10 === 9 ? Status.INVAL : Status.OK)));
      const stats = await machine.iommu.control.stats();
      expect(stats.device.deferredPasses).toBeGreaterThanOrEqual(400 / 64 - 1);
    } finally {
      await machine.close();
    }
  });
});

describe('per-domain mapping limit', () => {
  it('refuses a MAP beyond the bound with NOMEM and nothing mapped, and frees room on UNMAP', () => {
    const m = new LocalIommuMachine({ memorySize: 16 << 20, endpoints: [EP], driverFeatures: ['MAP_UNMAP'], device: { maxMappingsPerDomain: 3 } });
    const status = (req: ReturnType<typeof encodeMap>) => m.driver.request(req).status;
    expect(status(encodeAttach(1, EP))).toBe(Status.OK);
    const map = (i: number) => encodeMap(1, 0x4000_0000n + BigInt(i) * 0x1000n, 0x4000_0fffn + BigInt(i) * 0x1000n, BigInt(i) * 0x1000n, MapFlag.READ);
    expect([0, 1, 2].map((i) => status(map(i)))).toEqual([Status.OK, Status.OK, Status.OK]);
    expect(status(map(3))).toBe(Status.NOMEM);
    expect(m.host.inspect().contexts[0]!.ioas[0]!.areas).toHaveLength(3);
    expect(status(encodeUnmap(1, 0x4000_0000n, 0x4000_1fffn))).toBe(Status.OK);
    expect([3, 4].map((i) => status(map(i)))).toEqual([Status.OK, Status.OK]);
    expect(status(map(5))).toBe(Status.NOMEM);
  });

  it('checks its queue-size option', () => {
    expect(() => new LocalIommuMachine({ memorySize: 16 << 20, endpoints: [EP], driverFeatures: [], device: { requestQueueSize: 1000 } })).toThrow(/power of two/);
  });
});
