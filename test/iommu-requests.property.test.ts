import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import type { EncodedRequest } from '../guest-fixtures/driver/iommu-requests.js';
import type { HostSnapshot } from '../src/ioasid/index.js';
import type { IommuFeatureName } from '../src/iommu/layout.js';
import { driverArena, LocalIommuMachine } from '../src/replay/local-machine.js';
import type { MmioBus, PciBus } from '../src/virtio/bus.js';
import { WorkerState, DeviceSignal } from '../src/virtio/signals.js';
import { endpointDeviceName, IommuMachine } from '../src/vmm/iommu-machine.js';
import { type MFeatureName, type ModelOutcome, VirtioIommuModel } from './models/virtio-iommu-model.js';
import { FUZZ_SCALE, fuzzParams } from './support/fuzz.js';

// Random request streams, valid and malformed, through the real request queue: every request
// must get the reference model's outcome, and the backend's state afterwards (which endpoint
// reaches which I/O address space, each space's mappings, the pinned pages) must be the model's.

const ENDPOINTS = [0x10, 0x11, 0x12];
const MEMORY = 64 << 20;
const MSI: readonly [bigint, bigint] = [0xfee00000n, 0xfeefffffn];
const DEVICE = { domainRange: [1, 31] as [number, number], inputRange: [0n, (1n << 48n) - 1n] as [bigint, bigint], maxDomains: 4 };
const OFFERED: MFeatureName[] = ['INPUT_RANGE', 'DOMAIN_RANGE', 'MAP_UNMAP', 'PROBE', 'MMIO', 'BYPASS_CONFIG'];
const PROBE_SIZE = 512;
const PAGE = 4096n;

type Op = { kind: 'request'; batch: EncodedRequest[] } | { kind: 'bypass'; value: number };

function bytes(size: number, fill: (v: DataView) => void): Uint8Array {
  const b = new Uint8Array(size);
  fill(new DataView(b.buffer));
  return b;
}

const domainArb = fc.oneof(
  { weight: 8, arbitrary: fc.integer({ min: 1, max: 2 }) },
  { weight: 2, arbitrary: fc.integer({ min: 3, max: 6 }) },
  { weight: 1, arbitrary: fc.constantFrom(0, 32, 0xffff_ffff) },
);
const endpointArb = fc.oneof({ weight: 8, arbitrary: fc.constantFrom(...ENDPOINTS) }, { weight: 1, arbitrary: fc.constantFrom(0x99, 0xffff_ffff) });
const iovaArb = fc.oneof(
  { weight: 10, arbitrary: fc.integer({ min: 0, max: 31 }).map((p) => 0x100000n + BigInt(p) * PAGE) },
  { weight: 1, arbitrary: fc.constantFrom(MSI[0], MSI[0] - PAGE, 1n << 48n, (1n << 64n) - PAGE, 0x100800n) },
);
const pagesArb = fc.oneof({ weight: 6, arbitrary: fc.integer({ min: 1, max: 4 }).map(BigInt) }, { weight: 1, arbitrary: fc.constantFrom(0n, 16n, 1n << 20n) });
const physArb = fc.oneof(
  { weight: 10, arbitrary: fc.integer({ min: 0, max: 31 }).map((p) => BigInt(p) * PAGE) },
  { weight: 1, arbitrary: fc.constantFrom(BigInt(MEMORY) - PAGE, BigInt(MEMORY), 0x800n, 1n << 53n, (1n << 64n) - PAGE) },
);
const endAdjust = fc.oneof({ weight: 12, arbitrary: fc.constant(0n) }, { weight: 1, arbitrary: fc.constantFrom(1n, -2n) });

const attachArb = fc
  .record({ d: domainArb, e: endpointArb, flags: fc.oneof({ weight: 6, arbitrary: fc.constant(0) }, { weight: 2, arbitrary: fc.constant(1) }, { weight: 1, arbitrary: fc.constant(4) }), reserved: fc.oneof({ weight: 12, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.constant(1) }) })
  .map(({ d, e, flags, reserved }) => bytes(20, (v) => {
    v.setUint8(0, 1); v.setUint32(4, d, true); v.setUint32(8, e, true); v.setUint32(12, flags, true); v.setUint32(16, reserved, true);
  }));
const detachArb = fc.record({ d: domainArb, e: endpointArb }).map(({ d, e }) => bytes(20, (v) => {
  v.setUint8(0, 2); v.setUint32(4, d, true); v.setUint32(8, e, true);
}));
const mapArb = fc
  .record({ d: domainArb, iova: iovaArb, pages: pagesArb, adj: endAdjust, phys: physArb, flags: fc.oneof({ weight: 8, arbitrary: fc.constant(3) }, { weight: 4, arbitrary: fc.integer({ min: 0, max: 7 }) }, { weight: 1, arbitrary: fc.constant(0x11) }) })
  .map(({ d, iova, pages, adj, phys, flags }) => bytes(36, (v) => {
    v.setUint8(0, 3); v.setUint32(4, d, true);
    v.setBigUint64(8, iova, true);
    v.setBigUint64(16, (iova + pages * PAGE - 1n + adj) & ((1n << 64n) - 1n), true);
    v.setBigUint64(24, phys, true); v.setUint32(32, flags, true);
  }));
const unmapPagesArb = fc.oneof({ weight: 6, arbitrary: fc.integer({ min: 1, max: 16 }).map(BigInt) }, { weight: 1, arbitrary: fc.constantFrom(0n, 1n << 20n) });
const unmapArb = fc.record({ d: domainArb, iova: iovaArb, pages: unmapPagesArb, adj: endAdjust, all: fc.oneof({ weight: 6, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }) }).map(({ d, iova, pages, adj, all }) => bytes(28, (v) => {
  v.setUint8(0, 4); v.setUint32(4, d, true);
  const start = all ? 0n : iova;
  const end = all ? (1n << 64n) - 1n : (iova + pages * PAGE - 1n + adj) & ((1n << 64n) - 1n);
  v.setBigUint64(8, start, true); v.setBigUint64(16, end, true);
}));
const probeArb = endpointArb.map((e) => bytes(72, (v) => {
  v.setUint8(0, 5); v.setUint32(4, e, true);
}));

/** A well-formed request of a random kind, or one mangled the way a hostile guest would. */
const requestArb: fc.Arbitrary<EncodedRequest> = fc
  .record({
    body: fc.oneof(
      { weight: 3, arbitrary: attachArb },
      { weight: 1, arbitrary: detachArb },
      { weight: 8, arbitrary: mapArb },
      { weight: 4, arbitrary: unmapArb },
      { weight: 1, arbitrary: probeArb },
      {
        weight: 1,
        arbitrary: fc
          .tuple(fc.oneof({ weight: 3, arbitrary: fc.integer({ min: 0, max: 6 }) }, { weight: 1, arbitrary: fc.integer({ min: 7, max: 255 }) }), fc.uint8Array({ minLength: 0, maxLength: 80 }))
          .map(([type, rest]) => Uint8Array.from([type, ...rest])),
      },
    ),
    cut: fc.oneof({ weight: 10, arbitrary: fc.constant(-1) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 40 }) }),
    extra: fc.oneof({ weight: 10, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 64 }) }),
    writable: fc.oneof({ weight: 10, arbitrary: fc.constant(-1) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: PROBE_SIZE + 8 }) }),
  })
  .map(({ body, cut, extra, writable }) => {
    let readable = cut >= 0 ? body.slice(0, cut) : body;
    if (extra > 0) readable = Uint8Array.from([...readable, ...new Uint8Array(extra).fill(0xee)]);
    const natural = readable[0] === 5 ? PROBE_SIZE + 4 : 4;
    // A chain needs at least one descriptor: a guest cannot queue an empty one.
    const w = writable >= 0 ? writable : natural;
    return { readable, writable: readable.length === 0 && w === 0 ? 4 : w };
  });

/** Two domains with an endpoint each, so most later requests find something to act on. */
const PRELUDE: Op = {
  kind: 'request',
  batch: [
    [1, ENDPOINTS[0]!],
    [2, ENDPOINTS[1]!],
  ].map(([d, e]) => ({
    readable: bytes(20, (v) => {
      v.setUint8(0, 1);
      v.setUint32(4, d!, true);
      v.setUint32(8, e!, true);
    }),
    writable: 4,
  })),
};

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 16, arbitrary: fc.array(requestArb, { minLength: 1, maxLength: 6 }).map((batch) => ({ kind: 'request' as const, batch })) },
  { weight: 1, arbitrary: fc.constantFrom(0, 1, 2).map((value) => ({ kind: 'bypass' as const, value })) },
);
const opsArb = fc.array(opArb, { minLength: 4, maxLength: 30, size: 'medium' }).map((ops) => [PRELUDE, ...ops]);

/** What the driver accepts: MAP_UNMAP nearly always (without it most requests are UNSUPP), the rest at random. */
const featuresArb = fc
  .record({ others: fc.subarray(OFFERED.filter((f) => f !== 'MAP_UNMAP')), mapUnmap: fc.oneof({ weight: 9, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }) })
  .map(({ others, mapUnmap }): MFeatureName[] => (mapUnmap ? [...others, 'MAP_UNMAP'] : others));

interface Rig {
  driver: IommuGuestDriver;
  inspect(): Promise<HostSnapshot>;
}

function statusName(o: ModelOutcome): string {
  return o === 'NONE' ? 'NONE' : (Object.entries({ OK: 0, IOERR: 1, UNSUPP: 2, DEVERR: 3, INVAL: 4, RANGE: 5, NOENT: 6, FAULT: 7, NOMEM: 8 }).find(([, v]) => v === o)?.[0] ?? String(o));
}

function hexBytes(b: Uint8Array): string {
  return Buffer.from(b).toString('hex');
}

/** Requests sent through the queue by this file (reported by `npm run fuzz`). */
let requestsSent = 0;
afterAll(() => {
  if (FUZZ_SCALE > 1) process.stderr.write(`fuzz: ${requestsSent} requests checked against the model\n`);
});

/** Runs the ops through the rig's driver; throws at the first divergence from the model. */
async function runAgainstModel(rig: Rig, model: VirtioIommuModel, ops: readonly Op[]): Promise<void> {
  for (const op of ops) {
    if (op.kind === 'bypass') {
      rig.driver.writeBypass(op.value);
      model.writeBypass(op.value);
      continue;
    }
    const results = rig.driver.batch(op.batch);
    requestsSent += op.batch.length;
    op.batch.forEach((req, i) => {
      const want = model.apply(req.readable, req.writable);
      const got = results[i]!.status;
      const gotName = got === 'NONE' ? 'NONE' : statusName(got);
      if (gotName !== statusName(want)) {
        throw new Error(`request ${hexBytes(req.readable)} (writable ${req.writable}): device ${gotName}, model ${statusName(want)}`);
      }
      if (want === 0 && req.readable[0] === 5) {
        // An OK PROBE lists the endpoint's MSI window as its first RESV_MEM property.
        const p = new DataView(results[i]!.writable.buffer);
        expect([p.getUint16(0, true), p.getUint8(4), p.getBigUint64(8, true), p.getBigUint64(16, true)]).toEqual([1, 1, MSI[0], MSI[1]]);
      }
    });
  }
  compareState(await rig.inspect(), model);
}

function compareState(snap: HostSnapshot, model: VirtioIommuModel): void {
  const ctx = snap.contexts[0]!;
  const hwptIoas = new Map(ctx.hwpts.map((h) => [h.id, h.ioas]));
  const ioasById = new Map(ctx.ioas.map((i) => [i.id, i]));
  const ioasOfDomain = new Map<number, number>();
  for (const ep of ENDPOINTS) {
    const dev = ctx.devices.find((d) => d.name === endpointDeviceName(ep))!;
    const target = dev.attachments.find((a) => a.pasid === 0)?.target;
    const backend = target === undefined ? 'blocked' : target === 'identity' ? 'identity' : `ioas ${hwptIoas.get(target)}`;
    const domainId = model.attached.get(ep);
    const domain = domainId !== undefined ? model.domains.get(domainId) : undefined;
    if (domain === undefined) {
      expect(backend, `endpoint ${ep} (unattached)`).toBe(model.unattachedMode());
    } else if (domain.bypass) {
      expect(backend, `endpoint ${ep} (bypass domain ${domain.id})`).toBe('identity');
    } else {
      expect(backend, `endpoint ${ep} (domain ${domain.id})`).toMatch(/^ioas \d+$/);
      const ioas = hwptIoas.get(target as number)!;
      // Endpoints of one domain share one IOAS; different domains never do.
      const known = ioasOfDomain.get(domain.id);
      if (known !== undefined) expect(ioas).toBe(known);
      else {
        expect([...ioasOfDomain.values()]).not.toContain(ioas);
        ioasOfDomain.set(domain.id, ioas);
      }
      const areas = ioasById.get(ioas)!.areas.map((a) => ({ start: a.iova, end: a.iova + a.length - 1n, phys: BigInt(a.gpa), read: a.readable, write: a.writeable }));
      const sort = <T extends { start: bigint }>(l: T[]): T[] => [...l].sort((a, b) => (a.start < b.start ? -1 : 1));
      expect(sort(areas), `mappings of domain ${domain.id}`).toEqual(sort(domain.mappings.map((m) => ({ ...m }))));
    }
  }
  // No IOAS outlives its domain, and every page is pinned and accounted once.
  const pagingDomains = [...model.domains.values()].filter((d) => !d.bypass).length;
  expect(ctx.ioas.length, 'IOAS objects').toBe(pagingDomains);
  expect(snap.stats.pinnedPages, 'pinned pages').toBe(model.pinnedPages());
  expect(snap.stats.accountedPages).toBe(snap.stats.pinnedPages);
}

function modelFor(negotiated: readonly MFeatureName[], bootBypass: boolean): VirtioIommuModel {
  return new VirtioIommuModel({
    endpoints: ENDPOINTS,
    offered: OFFERED,
    negotiated,
    bootBypass,
    domainRange: DEVICE.domainRange,
    inputRange: DEVICE.inputRange,
    maxDomains: DEVICE.maxDomains,
    probeSize: PROBE_SIZE,
    ramBytes: MEMORY,
    reserved: MSI,
  });
}

describe('virtio-iommu requests against the reference model', () => {
  it('in-thread machine: statuses and backend state match the model', async () => {
    await fc.assert(
      fc.asyncProperty(featuresArb, fc.boolean(), opsArb, async (features, bootBypass, ops) => {
        const m = new LocalIommuMachine({ memorySize: MEMORY, endpoints: ENDPOINTS, driverFeatures: features as IommuFeatureName[], device: { ...DEVICE, bootBypass } });
        await runAgainstModel({ driver: m.driver, inspect: async () => m.host.inspect() }, modelFor(features, bootBypass), ops);
      }),
      fuzzParams(undefined, 500),
    );
  });

  describe.each(['mmio', 'pci'] as const)('device in its worker over virtio-%s', (transport) => {
    let machine: IommuMachine;
    beforeAll(async () => {
      machine = await IommuMachine.create({ memorySize: MEMORY, transport, endpoints: ENDPOINTS, device: { ...DEVICE, bootBypass: true } });
    });
    afterAll(async () => {
      await machine.close();
    });

    it('statuses and backend state match the model; the worker never fails', async () => {
      const arena = driverArena(MEMORY);
      await fc.assert(
        fc.asyncProperty(featuresArb, opsArb, async (features, ops) => {
          // Each run starts from a machine reset: no domains, bypass back to its boot value.
          await machine.iommu.control.systemReset();
          const bus = machine.iommu.bus;
          const driver = IommuGuestDriver.open({
            transport: transport === 'mmio' ? new MmioDriverTransport(bus as MmioBus) : new PciDriverTransport(bus as PciBus, { bar0Address: 0xe000_0000 }),
            memory: machine.memory,
            allocator: new GuestAllocator(arena.base, arena.size),
            interrupts: machine.iommu.interrupts,
            features: features as IommuFeatureName[],
          });
          await runAgainstModel({ driver, inspect: () => machine.iommu.control.inspect() }, modelFor(features, true), ops);
        }),
        fuzzParams(undefined, 150),
      );
      const state = Atomics.load(new Int32Array(machine.iommu.signals), DeviceSignal.WORKER_STATE);
      expect([WorkerState.RUNNING, WorkerState.SLEEPING]).toContain(state);
      const stats = await machine.iommu.control.stats();
      expect(stats.device.requests).toBeGreaterThan(100);
    });
  });
});
