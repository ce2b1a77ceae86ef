import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { setTimeout as sleep } from 'node:timers/promises';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import { encodeAttach, encodeDetach, encodeMap, encodeUnmap, type EncodedRequest } from '../guest-fixtures/driver/iommu-requests.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { MapFlag, Status } from '../src/iommu/layout.js';
import { driverArena } from '../src/replay/local-machine.js';
import { DmaHold } from '../src/runtime/endpoint-worker-protocol.js';
import type { MmioBus } from '../src/virtio/bus.js';
import { IommuMachine } from '../src/vmm/iommu-machine.js';

// UNMAP and DETACH complete only once no device worker can still use the translation they
// remove: an endpoint worker holds a DMA open on the mapping while the guest unmaps it.

const EP = 0x10;
const IOVA = 0x4000_0000n;
const GPA = 0x20_0000n;

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('condition not reached');
    await sleep(1);
  }
}

describe('strict unmap through the virtio-iommu worker and an endpoint worker', () => {
  let machine: IommuMachine;
  let driver: IommuGuestDriver;
  const ok = (req: EncodedRequest): void => expect(driver.request(req).status).toBe(Status.OK);

  beforeEach(async () => {
    machine = await IommuMachine.create({ memorySize: 16 << 20, transport: 'mmio', endpoints: [EP], device: { bootBypass: false }, quiescenceTimeoutMs: 5000 });
    const arena = driverArena(16 << 20);
    driver = IommuGuestDriver.open({
      transport: new MmioDriverTransport(machine.iommu.bus as MmioBus),
      memory: machine.memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: machine.iommu.interrupts,
    });
    ok(encodeAttach(1, EP));
    ok(encodeMap(1, IOVA, IOVA + 0xfffn, GPA, MapFlag.READ | MapFlag.WRITE));
  });
  afterEach(async () => {
    await machine.close();
  });

  it.each([
    ['UNMAP', () => encodeUnmap(1, IOVA, IOVA + 0xfffn)],
    ['DETACH', () => encodeDetach(1, EP)],
  ] as const)('%s is not used until the DMA that began before it ends; DMAs after it fault', async (_name, request) => {
    const hold = new SharedArrayBuffer(4);
    const word = new Int32Array(hold);
    const held = machine.dma(EP, { iova: IOVA, length: 64, access: 'write', data: Uint8Array.of(0xc3), hold });
    await waitFor(() => Atomics.load(word, 0) === DmaHold.INSIDE);

    const posted = driver.post([request()]);
    // The device has the request (it was notified) but must not complete it while the DMA is open.
    await sleep(150);
    expect(driver.completions()).toBe(0);

    Atomics.store(word, 0, DmaHold.RELEASE);
    Atomics.notify(word, 0);
    expect((await held).outcome).toBe('ok');
    const [result] = driver.wait(posted);
    expect(result!.status).toBe(Status.OK);
    // The held DMA wrote through the old translation, before the unmap completed.
    expect(machine.memory.view(Number(GPA), 64).every((b) => b === 0xc3)).toBe(true);

    const after = await machine.dma(EP, { iova: IOVA, length: 64, access: 'read' });
    expect(after.outcome).toBe('fault');
  });

  it('without a DMA in flight, UNMAP completes at once and the page faults right after', async () => {
    ok(encodeUnmap(1, IOVA, IOVA + 0xfffn));
    const r = await machine.dma(EP, { iova: IOVA, length: 8, access: 'write' });
    expect(r).toMatchObject({ outcome: 'fault', reason: 'MAPPING', iova: IOVA });
    await machine.iommu.control.flushFaults();
    const fault = driver.takeFault();
    expect(fault).toMatchObject({ endpoint: EP, address: IOVA });
  });
});
