import { describe, expect, it } from 'vitest';
import type { EndpointFault } from '../src/iommu/device.js';
import { FaultFlag, FaultReason } from '../src/iommu/layout.js';
import { LocalIommuMachine } from '../src/replay/local-machine.js';

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
