import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NetTraffic, type NetTrafficStart } from '../guest-fixtures/workers/net-traffic-protocol.js';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { DmaEngineDriver } from '../guest-fixtures/driver/dma-engine-driver.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import { encodeAttach, encodeMap, encodeUnmap, type EncodedRequest } from '../guest-fixtures/driver/iommu-requests.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { DmaEngineCommand, DmaEngineReg, DmaEngineStatus } from '../src/devices/dma-engine.js';
import { MapFlag, Status } from '../src/iommu/layout.js';
import { driverArena } from '../src/replay/local-machine.js';
import type { MmioBus, PciBus } from '../src/virtio/bus.js';
import { IommuMachine } from '../src/vmm/iommu-machine.js';

// Strict unmap under traffic from two devices in their own workers: the DMA engine fills a
// two-page IOVA window over and over, and a virtio-net device, kept busy by a second guest vCPU,
// receives frames into a buffer on the window's second page. Meanwhile this vCPU maps and unmaps
// that page, each time onto another guest page. Once an UNMAP's used buffer is seen, the guest
// poisons the page it unmapped; if any DMA reached that page afterwards, the poison is gone.
// `STRESS_CYCLES=100000 npm run stress` runs the long version.

const CYCLES = Number(process.env.STRESS_CYCLES ?? 1500);
const EP = 0x40;
const NET = 0x48;
const NET_ARENA = { iova: 0x6000_0000, gpa: 0x80_0000, size: 1 << 20 };
const WINDOW = 0x5000_0000n;
const PAGE = 0x1000;
const SCRATCH_GPA = 0x10_0000;
/** Guest pages the cycling slot is mapped to, in turn; each is checked before it is used again. */
const POOL_GPA = 0x20_0000;
const POOL_PAGES = 256;
const FILL = 0xd5;
const POISON = 0x11;

describe('strict unmap while the DMA engine writes continuously', () => {
  let machine: IommuMachine;
  let iommu: IommuGuestDriver;
  let engine: DmaEngineDriver;
  const traffic = new SharedArrayBuffer(NetTraffic.WORDS * 4);
  const trafficCtl = new Int32Array(traffic);
  let trafficWorker: Worker | undefined;
  let trafficDone: Promise<unknown> | undefined;
  const ok = (req: EncodedRequest): void => {
    const status = iommu.request(req).status;
    if (status !== Status.OK) throw new Error(`request failed with status ${String(status)}`);
  };

  beforeAll(async () => {
    machine = await IommuMachine.create({
      memorySize: 32 << 20,
      transport: 'mmio',
      endpoints: [{ id: EP, kind: 'dma-engine' }, { id: NET, kind: 'virtio-net' }],
      device: { bootBypass: false },
    });
    const arena = driverArena(32 << 20);
    iommu = IommuGuestDriver.open({
      transport: new MmioDriverTransport(machine.iommu.bus as MmioBus),
      memory: machine.memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: machine.iommu.interrupts,
      // A fault per pass while the page is unmapped: the guest keeps no event buffers for them.
      eventBuffers: 0,
    });
    engine = DmaEngineDriver.probe(machine.dmaEngines.get(EP)!.bus as PciBus, { bar0Address: 0xd000_0000 });
    ok(encodeAttach(1, EP));
    ok(encodeAttach(1, NET));
    ok(encodeMap(1, WINDOW, WINDOW + BigInt(PAGE - 1), BigInt(SCRATCH_GPA), MapFlag.READ | MapFlag.WRITE));
    ok(encodeMap(1, BigInt(NET_ARENA.iova), BigInt(NET_ARENA.iova + NET_ARENA.size - 1), BigInt(NET_ARENA.gpa), MapFlag.READ | MapFlag.WRITE));
    const start: NetTrafficStart = {
      memory: machine.memory.describe(),
      signals: machine.netDevices.get(NET)!.signals,
      arena: NET_ARENA,
      slotIova: Number(WINDOW) + PAGE,
      control: traffic,
    };
    trafficWorker = new Worker(new URL('../dist/guest-fixtures/workers/net-traffic.js', import.meta.url), { workerData: start });
    trafficDone = new Promise((resolve, reject) => {
      trafficWorker!.once('message', resolve);
      trafficWorker!.once('error', reject);
    });
    for (const deadline = Date.now() + 10_000; Atomics.load(trafficCtl, NetTraffic.READY) === 0 && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 5));
  });
  afterAll(async () => {
    Atomics.store(trafficCtl, NetTraffic.STOP, 1);
    await trafficWorker?.terminate();
    await machine?.close();
  });

  it(`${CYCLES} map/unmap cycles: no write reaches a page after its UNMAP completed`, { timeout: Math.max(60_000, CYCLES * 10) }, async () => {
    const mem = machine.memory;
    mem.fill(POOL_GPA, POOL_PAGES * PAGE, POISON);
    engine.setReg(DmaEngineReg.DST_LO, Number(WINDOW & 0xffff_ffffn));
    engine.setReg(DmaEngineReg.DST_HI, Number(WINDOW >> 32n));
    engine.setReg(DmaEngineReg.SRC_LO, FILL);
    engine.setReg(DmaEngineReg.LENGTH, 2 * PAGE);
    engine.setReg(DmaEngineReg.PASID, 0);
    engine.setReg(DmaEngineReg.COMMAND, DmaEngineCommand.FILL | DmaEngineCommand.REPEAT);
    expect(engine.reg(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.BUSY);

    const slot = WINDOW + BigInt(PAGE);
    const poisoned = (gpa: number): boolean => mem.view(gpa, PAGE).every((b) => b === POISON);
    let violations = 0;
    let reached = 0;
    expect(Atomics.load(trafficCtl, NetTraffic.READY)).toBe(1);
    for (let i = 0; i < CYCLES; i++) {
      const gpa = POOL_GPA + (i % POOL_PAGES) * PAGE;
      // The page was poisoned when it was unmapped last time round: it must still be.
      if (!poisoned(gpa)) violations++;
      ok(encodeMap(1, slot, slot + BigInt(PAGE - 1), BigInt(gpa), MapFlag.READ | MapFlag.WRITE));
      // Let the engine run over the mapped page now and then, so unmaps race real traffic.
      if (i % 8 === 0) {
        const passes = engine.reg(DmaEngineReg.PASSES);
        for (const deadline = Date.now() + 2000; ((engine.reg(DmaEngineReg.PASSES) - passes) >>> 0) < 2 && Date.now() < deadline; );
        if (!poisoned(gpa)) reached++;
      }
      ok(encodeUnmap(1, slot, slot + BigInt(PAGE - 1)));
      mem.fill(gpa, PAGE, POISON);
    }
    // Give any straggling write time to land, then check every page once more.
    const passes = engine.reg(DmaEngineReg.PASSES);
    for (const deadline = Date.now() + 2000; ((engine.reg(DmaEngineReg.PASSES) - passes) >>> 0) < 4 && Date.now() < deadline; );
    for (let p = 0; p < POOL_PAGES; p++) if (!poisoned(POOL_GPA + p * PAGE)) violations++;
    engine.setReg(DmaEngineReg.COMMAND, DmaEngineCommand.STOP);
    Atomics.store(trafficCtl, NetTraffic.STOP, 1);
    const net = (await trafficDone) as { delivered: number; refused: number };

    expect(violations).toBe(0);
    // Both devices really used the cycling page: frames landed in it while it was mapped, and
    // receive buffers were refused while it was not.
    expect(net.delivered).toBeGreaterThan(0);
    expect(net.refused).toBeGreaterThan(0);
    if (CYCLES > 10_000) process.stderr.write(`stress: ${CYCLES} cycles, engine passes ${engine.reg(DmaEngineReg.PASSES)}, net frames delivered ${net.delivered}, refused ${net.refused}\n`);
    // The test is not vacuous: the engine did write the mapped page in the cycles that waited.
    expect(reached).toBe(Math.ceil(CYCLES / 8));
    expect(mem.view(SCRATCH_GPA, PAGE).every((b) => b === FILL)).toBe(true);
    expect(engine.reg(DmaEngineReg.PASS_FAULTS)).toBeGreaterThan(0);
  });
});
