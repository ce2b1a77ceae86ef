import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { DmaEngineDriver } from '../guest-fixtures/driver/dma-engine-driver.js';
import { GuestDmaView } from '../guest-fixtures/driver/dma-view.js';
import { IommuGuestDriver, type PostedRequests } from '../guest-fixtures/driver/iommu-driver.js';
import { encodeAttach, encodeMap, encodeUnmap } from '../guest-fixtures/driver/iommu-requests.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { NetDriver } from '../guest-fixtures/driver/net-driver.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import { DmaEngineCommand, DmaEngineReg, DmaEngineStatus } from '../src/devices/dma-engine.js';
import { MapFlag, Status } from '../src/iommu/layout.js';
import { GuestMemory } from '../src/memory/index.js';
import { driverArena } from '../src/replay/local-machine.js';
import type { MmioBus, PciBus } from '../src/virtio/bus.js';
import type { InterruptWaiter } from '../src/virtio/interrupt-waiter.js';
import { decodeImage, encodeImage, isMigrationImageError, type ImageSection, type PlainValue } from '../src/migration/image.js';
import { DeviceHandle } from '../src/vmm/device-handle.js';
import { IommuMachine, MigrationError } from '../src/vmm/iommu-machine.js';
import { MemoryPrecopy } from '../src/vmm/precopy.js';

// Live migration end to end: a DMA engine repeating a copy, a virtio-net device looping frames and
// the guest mapping and unmapping, all running while memory is pre-copied with the IOMMU's dirty
// bitmaps; then stop, save, restore into new workers over the copied memory, and go on. The guest
// is this test: its view of memory, buses and interrupts switches to the destination at the
// switch-over, as a vCPU resumes on the destination host.

const ENGINE = 0x10;
const NET = 0x18;
const MEMORY = 32 << 20;
const PAGE = 4096;
const ARENA_IOVA = 0x8000_0000;
const ARENA_GPA = 0x10_0000;
const ARENA_SIZE = 1 << 20;
const SRC_IOVA = 0x9000_0000;
const SRC_GPA = 0x40_0000;
const DST_IOVA = 0xa000_0000;
const DST_GPA = 0x50_0000;
const COPY = 16 * PAGE;
const SCRATCH_IOVA = 0xc000_0000n;
const SCRATCH_GPA = 0x80_0000n;
const RW = MapFlag.READ | MapFlag.WRITE;

/** An object whose every property is read from whatever `current()` returns now. */
function follow<T extends object>(current: () => T): T {
  return new Proxy({} as T, {
    get(_t, key) {
      const target = current();
      const v = Reflect.get(target, key, target) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

function pattern(seed: number): Uint8Array {
  return Uint8Array.from({ length: COPY }, (_, i) => (i * 31 + seed * 7 + (i >> 9)) & 0xff);
}

describe('live migration of a machine with both consumers busy', () => {
  const machines: IommuMachine[] = [];
  afterAll(async () => {
    for (const m of machines) await m.close();
  });

  it('pre-copies with dirty bitmaps, stops, saves, restores into new workers on a copy; traffic resumes, memory equal, no request lost or answered twice', async () => {
    const source = await IommuMachine.create({
      memorySize: MEMORY,
      transport: 'pci',
      endpoints: [
        { id: ENGINE, kind: 'dma-engine' },
        { id: NET, kind: 'virtio-net', transport: 'mmio' },
      ],
      device: { bootBypass: false },
    });
    machines.push(source);
    let live = source;
    const memory = follow<GuestMemory>(() => live.memory);
    const iommuBus = follow<PciBus>(() => live.iommu.bus as PciBus);
    const iommuIrq = follow<InterruptWaiter>(() => live.iommu.interrupts);
    const engineBus = follow<PciBus>(() => live.dmaEngines.get(ENGINE)!.bus as PciBus);
    const netBus = follow<MmioBus>(() => live.netDevices.get(NET)!.bus as MmioBus);
    const netIrq = follow<InterruptWaiter>(() => live.netDevices.get(NET)!.interrupts);

    const arena = driverArena(MEMORY);
    const iommu = IommuGuestDriver.open({
      transport: new PciDriverTransport(iommuBus, { bar0Address: 0xe000_0000 }),
      memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: iommuIrq,
    });
    // Every request the guest ever posted, to check each is served exactly once across the move.
    let posted = 0;
    const post = (reqs: Parameters<IommuGuestDriver['post']>[0]): PostedRequests => {
      posted += reqs.length;
      return iommu.post(reqs);
    };
    const ok = (p: PostedRequests): void => expect(iommu.wait(p).map((r) => r.status)).toEqual(p.placed.map(() => Status.OK));
    ok(post([encodeAttach(1, ENGINE), encodeAttach(1, NET)]));
    ok(
      post([
        encodeMap(1, BigInt(ARENA_IOVA), BigInt(ARENA_IOVA + ARENA_SIZE - 1), BigInt(ARENA_GPA), RW),
        encodeMap(1, BigInt(SRC_IOVA), BigInt(SRC_IOVA + COPY - 1), BigInt(SRC_GPA), MapFlag.READ),
        encodeMap(1, BigInt(DST_IOVA), BigInt(DST_IOVA + COPY - 1), BigInt(DST_GPA), RW),
      ]),
    );
    const view = new GuestDmaView(memory);
    view.map(ARENA_IOVA, ARENA_GPA, ARENA_SIZE);
    const net = NetDriver.open({ transport: new MmioDriverTransport(netBus), memory: view, allocator: new GuestAllocator(ARENA_IOVA, ARENA_SIZE), interrupts: netIrq, queueSize: 64 });
    net.postReceiveBuffers(32);

    // The engine copies SRC to DST pass after pass, on its own.
    const engine = DmaEngineDriver.probe(engineBus, { bar0Address: 0xd000_0000 });
    memory.write(SRC_GPA, pattern(0));
    engine.setReg(DmaEngineReg.SRC_LO, SRC_IOVA);
    engine.setReg(DmaEngineReg.SRC_HI, 0);
    engine.setReg(DmaEngineReg.DST_LO, DST_IOVA);
    engine.setReg(DmaEngineReg.DST_HI, 0);
    engine.setReg(DmaEngineReg.LENGTH, COPY);
    engine.setReg(DmaEngineReg.PASID, 0);
    engine.setReg(DmaEngineReg.COMMAND, DmaEngineCommand.COPY | DmaEngineCommand.REPEAT);
    expect(engine.reg(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.BUSY);
    const waitPasses = (n: number): void => {
      const start = engine.reg(DmaEngineReg.PASSES);
      for (const deadline = Date.now() + 5000; ((engine.reg(DmaEngineReg.PASSES) - start) >>> 0) < n && Date.now() < deadline; );
      expect((engine.reg(DmaEngineReg.PASSES) - start) >>> 0).toBeGreaterThanOrEqual(n);
    };

    let frameSeq = 0;
    const frame = (): Uint8Array => {
      const f = new Uint8Array(120).fill(0);
      f.set([0x52, 0x54, 0, 0x12, 0x34, 0x56], 0);
      new DataView(f.buffer).setUint32(60, ++frameSeq, true);
      return f;
    };
    const seqOf = (f: Uint8Array): number => new DataView(f.buffer, f.byteOffset).getUint32(60, true);
    let scratch = 0;
    const traffic = (seed: number): void => {
      memory.write(SRC_GPA, pattern(seed));
      // The guest maps and unmaps while the devices work.
      const iova = SCRATCH_IOVA + BigInt(scratch * PAGE);
      ok(post([encodeMap(1, iova, iova + BigInt(PAGE) - 1n, SCRATCH_GPA + BigInt(scratch * PAGE), RW)]));
      if (scratch % 2 === 1) ok(post([encodeUnmap(1, iova - BigInt(PAGE), iova - 1n)]));
      scratch++;
      for (let i = 0; i < 4; i++) net.send(frame());
      for (let i = 0; i < 4; i++) {
        const got = net.receive();
        expect(got.kind).toBe('packet');
      }
      net.reclaimTransmitted();
      waitPasses(2);
    };

    // Pre-copy: everything once, then rounds of what was dirtied meanwhile.
    const destination = GuestMemory.create(MEMORY);
    const precopy = new MemoryPrecopy(source.memory, destination, source);
    await precopy.begin();
    for (let round = 1; round <= 3; round++) {
      traffic(round);
      const r = await precopy.round();
      // The engine rewrote DST with the new pattern: the IOMMU's bitmap says so, page by page.
      for (let p = 0; p < COPY / PAGE; p++) expect(r.dma).toContain(DST_GPA / PAGE + p);
      // DMA's pages are a handful, not the whole memory.
      expect(r.copied).toBeLessThan(MEMORY / PAGE / 4);
    }

    // Stop-and-copy. Requests and frames are in flight at the stop: posted, not yet collected.
    traffic(9);
    // The devices fall behind the guest: what it posts now waits in the rings, unserved, when the
    // machine stops (the virtio-iommu and virtio-net workers stop first, the vCPU a moment later).
    await source.iommu.control.pause();
    await source.netDevices.get(NET)!.control.pause();
    const inFlight = post(
      Array.from({ length: 24 }, (_, i) => {
        const iova = SCRATCH_IOVA + 0x100_0000n + BigInt(i * PAGE);
        return encodeMap(1, iova, iova + BigInt(PAGE) - 1n, SCRATCH_GPA + BigInt(i * PAGE), RW);
      }),
    );
    const sentAtStop = [frame(), frame(), frame()];
    for (const f of sentAtStop) net.send(f);
    const passesBeforeStop = engine.reg(DmaEngineReg.PASSES) >>> 0;
    // vCPUs are stopped from here on: no register access until the destination runs.
    await source.pause();
    const image = await source.saveImage();
    const last = await precopy.round();
    expect(last.dma).toContain(DST_GPA / PAGE);
    // Nothing runs on the source now: the copy is complete and stays so.
    expect(Buffer.compare(Buffer.from(destination.view(0, MEMORY)), Buffer.from(source.memory.view(0, MEMORY)))).toBe(0);
    const sourceStats = await source.iommu.control.stats();
    await source.close();

    // Switch-over: new workers over the copy.
    const dest = await IommuMachine.restore(image, { memory: destination });
    machines.push(dest);
    live = dest;

    // Every request in flight is answered once, OK; nothing more is answered.
    ok(inFlight);
    expect(iommu.completions()).toBe(0);
    // The counters travelled: the device served every request the guest posted, once.
    const destStats = await dest.iommu.control.stats();
    expect(destStats.device.requests).toBe(posted);
    expect(destStats.device.byStatus.OK).toBe(posted);
    expect(sourceStats.device.requests).toBeLessThanOrEqual(posted);
    // The mappings of the in-flight batch exist once each in the restored backend.
    const ctx = (await dest.iommu.control.inspect()).contexts[0]!;
    const areas = ctx.ioas.flatMap((i) => i.areas).filter((a) => a.iova >= SCRATCH_IOVA + 0x100_0000n);
    expect(areas.map((a) => a.iova)).toEqual(inFlight.placed.map((_, i) => SCRATCH_IOVA + 0x100_0000n + BigInt(i * PAGE)));

    // Frames sent at the stop arrive once, in order; then traffic goes on.
    const after = [net.receive(), net.receive(), net.receive()];
    expect(after.map((r) => (r.kind === 'packet' ? seqOf(r.frame) : -1))).toEqual(sentAtStop.map(seqOf));
    expect(net.poll()).toBeUndefined();
    net.reclaimTransmitted();

    // The engine's repeating copy continues from where it was, and copies what the guest writes now.
    expect(engine.reg(DmaEngineReg.PASSES) >>> 0).toBeGreaterThanOrEqual(passesBeforeStop);
    expect(engine.reg(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.BUSY);
    traffic(42);
    for (const deadline = Date.now() + 5000; Date.now() < deadline; ) {
      if (Buffer.compare(Buffer.from(dest.memory.view(DST_GPA, COPY)), Buffer.from(pattern(42))) === 0) break;
    }
    expect(Buffer.from(dest.memory.view(DST_GPA, COPY)).equals(Buffer.from(pattern(42)))).toBe(true);
    engine.setReg(DmaEngineReg.COMMAND, DmaEngineCommand.STOP);
  }, 60_000);
});

/** Every leaf of a plain value, as a path and the value there. */
function leaves(v: PlainValue, path: (string | number)[] = []): { path: (string | number)[]; value: PlainValue }[] {
  if (Array.isArray(v)) return v.flatMap((x, i) => leaves(x as PlainValue, [...path, i]));
  if (typeof v === 'object' && v !== null && !(v instanceof Uint8Array)) return Object.entries(v).flatMap(([k, x]) => leaves(x, [...path, k]));
  return [{ path, value: v }];
}

function replaced(v: PlainValue, path: readonly (string | number)[], value: PlainValue): PlainValue {
  if (path.length === 0) return value;
  const [head, ...rest] = path;
  if (Array.isArray(v)) return v.map((x, i) => (i === head ? replaced(x as PlainValue, rest, value) : x)) as PlainValue;
  const o = v as Record<string, PlainValue>;
  return { ...o, [head as string]: replaced(o[head as string]!, rest, value) };
}

describe('a migration image that does not fit is refused whole', () => {
  it('damaged bytes never start a worker; hostile contents in a valid container fail cleanly and leave no worker running', async () => {
    const source = await IommuMachine.create({
      memorySize: 4 << 20,
      transport: 'mmio',
      endpoints: [{ id: ENGINE, kind: 'dma-engine' }, { id: NET, kind: 'virtio-net' }, 0x20],
      device: { bootBypass: false },
    });
    const arena = driverArena(4 << 20);
    const iommu = IommuGuestDriver.open({
      transport: new MmioDriverTransport(source.iommu.bus as MmioBus),
      memory: source.memory,
      allocator: new GuestAllocator(arena.base, arena.size),
      interrupts: source.iommu.interrupts,
    });
    expect(iommu.batch([encodeAttach(1, ENGINE), encodeAttach(1, NET), encodeAttach(2, 0x20), encodeMap(1, 0x1000n, 0x4fffn, 0x20_0000n, RW), encodeMap(2, 0x8000n, 0x8fffn, 0x21_0000n, MapFlag.READ)]).map((r) => r.status)).toEqual([
      Status.OK,
      Status.OK,
      Status.OK,
      Status.OK,
      Status.OK,
    ]);
    await source.pause();
    const image = await source.saveImage();
    await source.close();
    const baseline = DeviceHandle.liveWorkers;
    const memory = GuestMemory.create(4 << 20);

    // Damaged bytes: the container's checks refuse them before anything starts.
    await fc.assert(
      fc.asyncProperty(fc.nat(image.length - 1), fc.integer({ min: 1, max: 255 }), fc.boolean(), async (at, xor, truncate) => {
        const bad = truncate ? image.slice(0, at) : image.slice();
        if (!truncate) bad[at]! ^= xor;
        const err = await IommuMachine.restore(bad, { memory }).then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(isMigrationImageError(err)).toBe(true);
        expect(DeviceHandle.liveWorkers).toBe(baseline);
      }),
      { numRuns: 60 },
    );

    // Valid containers with hostile contents: one leaf changed in one section.
    const sections = decodeImage(image);
    const waitForNoWorkers = async (): Promise<void> => {
      for (const deadline = Date.now() + 3000; DeviceHandle.liveWorkers > baseline && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 10));
    };
    const hostile: PlainValue[] = [null, -1, 0, 1, 7, 0xffff_ffff, 2 ** 53, 1.5, 'x', true, 1n << 70n, new Uint8Array(3), [], {}];
    let refused = 0;
    await fc.assert(
      fc.asyncProperty(fc.nat(sections.length - 1), fc.nat(), fc.constantFrom(...hostile), async (which, leafPick, value) => {
        const all = leaves(sections[which]!.payload);
        const leaf = all[leafPick % all.length]!;
        const mutated: ImageSection[] = sections.map((sec, i) => (i === which ? { ...sec, payload: replaced(sec.payload, leaf.path, value) } : sec));
        let restored: IommuMachine | undefined;
        try {
          restored = await IommuMachine.restore(encodeImage(mutated), { memory: GuestMemory.create(4 << 20) });
        } catch (err) {
          refused++;
          expect(err, String(err)).toBeInstanceOf(MigrationError);
        } finally {
          await restored?.close();
        }
        await waitForNoWorkers();
        expect(DeviceHandle.liveWorkers).toBe(baseline);
      }),
      { numRuns: 25 },
    );
    expect(refused).toBeGreaterThan(0);

    // The image itself still restores, and the restored guest view is the source's.
    const dest = await IommuMachine.restore(image, { memory });
    const ctx = (await dest.iommu.control.inspect()).contexts[0]!;
    expect(ctx.ioas.map((i) => i.areas.map((a) => [a.iova, a.gpa]))).toEqual([[[0x1000n, 0x20_0000]], [[0x8000n, 0x21_0000]]]);
    await dest.close();
    await waitForNoWorkers();
    expect(DeviceHandle.liveWorkers).toBe(baseline);
  }, 120_000);
});
