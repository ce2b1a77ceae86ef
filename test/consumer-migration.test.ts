import { afterEach, describe, expect, expectTypeOf, it } from 'vitest';
import fc from 'fast-check';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { DmaEngineDriver } from '../guest-fixtures/driver/dma-engine-driver.js';
import { GuestDmaView } from '../guest-fixtures/driver/dma-view.js';
import { GuestDevice } from '../guest-fixtures/driver/guest-device.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { NET_DRIVER_FEATURES, NetDriver, VIRTIO_NET, type Received } from '../guest-fixtures/driver/net-driver.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import type { DriverTransport } from '../guest-fixtures/driver/transport.js';
import {
  DMA_ENGINE_ID,
  DmaEngine,
  DmaEngineCommand,
  DmaEngineIrq,
  DmaEngineReg,
  DmaEngineStatus,
  type DmaEngineState,
} from '../src/devices/dma-engine.js';
import { LoopbackConfig, LoopbackDevice, type LoopbackState } from '../src/devices/loopback.js';
import { DEFAULT_MAC, VirtioNetDevice, type VirtioNetState, type VirtioNetStats } from '../src/devices/virtio-net.js';
import type { Context } from '../src/ioasid/context.js';
import { createFaultQueueBuffer } from '../src/ioasid/fault-queue.js';
import { IommufdHost } from '../src/ioasid/host.js';
import { QuiescenceOwner, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { IoasMapFlag } from '../src/ioasid/uapi.js';
import { PhysicalDmaSpace, type DmaSpace } from '../src/memory/dma-space.js';
import { GuestMemory } from '../src/memory/index.js';
import type { DeviceIommuSpec, DeviceWorkerState, TransportKind } from '../src/runtime/device-worker-protocol.js';
import type { DmaEngineWorkerApi, DmaEngineWorkerStart, DmaEngineWorkerState } from '../src/runtime/dma-engine-protocol.js';
import type { AccessSize, MmioBus, PciBus } from '../src/virtio/bus.js';
import { FeatureBit, featureMask } from '../src/virtio/constants.js';
import type { MigrationState } from '../src/virtio/device.js';
import { MmioTransport } from '../src/virtio/mmio.js';
import { PciCommand, PciHeader } from '../src/virtio/pci.js';
import { DeviceRunner } from '../src/virtio/device-runner.js';
import { ControlRequest, DeviceSignal, MailboxOp, WorkerState, createSignalBuffer, postControl, ringDoorbell } from '../src/virtio/signals.js';
import { DeviceHandle, DeviceWorkerError } from '../src/vmm/device-handle.js';
import { fuzzParams } from './support/fuzz.js';

// Live migration of the consumer devices: a paused worker saves its state as plain data, a new
// worker over the same guest memory starts from it, the guest's driver switches to the new bus,
// and traffic goes on: nothing the guest posted is lost or served twice.
// Workers run the compiled code in dist/: `npm run build` first.

const irq = { set: () => undefined };
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
/** Lets the event loop run until `done()` holds (or 5 s pass). */
async function until(done: () => boolean): Promise<void> {
  const deadline = Date.now() + 5000;
  while (!done() && Date.now() < deadline) await sleep(1);
}

// ---- hostile mutations of a saved state ----------------------------------------------------------

type Path = readonly (string | number)[];
type Mutation =
  | { readonly kind: 'replace'; readonly path: Path; readonly value: unknown }
  | { readonly kind: 'byte'; readonly path: Path; readonly value: number }
  | { readonly kind: 'delete'; readonly path: Path }
  | { readonly kind: 'extra'; readonly path: Path };

/** Every node of a state (containers included), and the first bytes of each Uint8Array. */
function nodes(value: unknown, path: Path = [], out: { path: Path; bytes: boolean; object: boolean }[] = []) {
  const object = typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof Uint8Array);
  out.push({ path, bytes: false, object });
  if (value instanceof Uint8Array) {
    for (let i = 0; i < Math.min(value.length, 8); i++) out.push({ path: [...path, i], bytes: true, object: false });
  } else if (Array.isArray(value)) {
    value.slice(0, 24).forEach((v, i) => nodes(v, [...path, i], out));
  } else if (object) {
    for (const [k, v] of Object.entries(value as object)) nodes(v, [...path, k], out);
  }
  return out;
}

const hostileValue = fc.oneof(
  fc.constantFrom<unknown>(undefined, null, -1, 1.5, Number.NaN, Infinity, 2 ** 53, 2 ** 64, 'x', true, 0n, [], {}, new Uint8Array(3), new Map()),
  fc.integer(),
  fc.nat(),
  fc.array(fc.nat(0xff), { maxLength: 3 }),
);

function mutation(state: unknown): fc.Arbitrary<Mutation> {
  const all = nodes(state);
  const objects = all.filter((n) => n.object);
  const fields = all.filter((n) => !n.bytes && n.path.length > 0 && typeof n.path[n.path.length - 1] === 'string');
  return fc.oneof(
    fc.record({ kind: fc.constant('replace' as const), path: fc.constantFrom(...all.filter((n) => !n.bytes).map((n) => n.path)), value: hostileValue }),
    ...(all.some((n) => n.bytes)
      ? [fc.record({ kind: fc.constant('byte' as const), path: fc.constantFrom(...all.filter((n) => n.bytes).map((n) => n.path)), value: fc.nat(0xff) })]
      : []),
    fc.record({ kind: fc.constant('delete' as const), path: fc.constantFrom(...fields.map((n) => n.path)) }),
    fc.record({ kind: fc.constant('extra' as const), path: fc.constantFrom(...objects.map((n) => n.path)) }),
  );
}

function applyMutation(state: unknown, m: Mutation): unknown {
  const root = { value: structuredClone(state) } as Record<string | number, unknown>;
  const path: Path = ['value', ...m.path];
  let parent = root as Record<string | number, unknown>;
  for (const key of path.slice(0, -1)) parent = parent[key] as Record<string | number, unknown>;
  const last = path[path.length - 1]!;
  switch (m.kind) {
    case 'replace':
    case 'byte':
      parent[last] = m.value;
      break;
    case 'delete':
      delete parent[last];
      break;
    case 'extra':
      (parent[last] as Record<string, unknown>).unexpected = 0;
      break;
  }
  return root.value;
}

interface Restorable {
  saveState(): unknown;
  restoreState(state: unknown): void;
}

/**
 * A mutated state is refused with a RangeError or TypeError and leaves the model as it was, or is
 * taken whole (saveState() gives it back exactly). Returns how many were refused.
 */
function checkMutations(saved: unknown, make: () => Restorable, seed: number): number {
  let refused = 0;
  fc.assert(
    fc.property(mutation(saved), (m) => {
      const mutated = applyMutation(saved, m);
      const target = make();
      const before = target.saveState();
      let error: unknown;
      try {
        target.restoreState(mutated);
      } catch (err) {
        error = err;
      }
      if (error === undefined) {
        expect(target.saveState()).toStrictEqual(mutated);
      } else {
        refused++;
        expect(error instanceof RangeError || error instanceof TypeError, String(error)).toBe(true);
        expect(target.saveState()).toStrictEqual(before);
      }
    }),
    fuzzParams(seed, 300),
  );
  return refused;
}

// ---- in-thread: each model's state round trip ----------------------------------------------------

/** A guest bus that forwards to whichever transport (or worker) is current: the switch-over point. */
class SwitchBus implements MmioBus, PciBus {
  constructor(public current: MmioBus | PciBus) {}
  read(o: number, s: AccessSize): number {
    return (this.current as MmioBus).read(o, s);
  }
  write(o: number, s: AccessSize, v: number): void {
    (this.current as MmioBus).write(o, s, v);
  }
  configRead(o: number, s: 1 | 2 | 4): number {
    return (this.current as PciBus).configRead(o, s);
  }
  configWrite(o: number, s: 1 | 2 | 4, v: number): void {
    (this.current as PciBus).configWrite(o, s, v);
  }
  barRead(b: number, o: number, s: AccessSize): number {
    return (this.current as PciBus).barRead(b, o, s);
  }
  barWrite(b: number, o: number, s: AccessSize, v: number): void {
    (this.current as PciBus).barWrite(b, o, s, v);
  }
}

function driverTransport(kind: TransportKind, bus: SwitchBus): DriverTransport {
  return kind === 'mmio' ? new MmioDriverTransport(bus) : new PciDriverTransport(bus, { bar0Address: 0xe000_0000 });
}

function frameOf(length: number, seed: number): Uint8Array {
  const f = new Uint8Array(length);
  for (let i = 0; i < length; i++) f[i] = (seed * 13 + i * 5) & 0xff;
  f.set(DEFAULT_MAC, 0);
  return f;
}

function expectPacket(received: Received, frame: Uint8Array): void {
  expect(received.kind).toBe('packet');
  if (received.kind === 'packet') expect(received.frame).toEqual(frame);
}

describe('saved state of the models (in one thread)', () => {
  it('loopback: served and scratch round trip; a hostile state is refused and changes nothing', () => {
    const memory = GuestMemory.create(1 << 20);
    const model = new LoopbackDevice({ queueSize: 16 });
    const transport = new MmioTransport(model, memory, { irq });
    const dev = GuestDevice.open({ transport: new MmioDriverTransport(transport), memory, allocator: new GuestAllocator(0x1000, 0x8_0000), wantedFeatures: featureMask(FeatureBit.VERSION_1), queueSize: 16 });
    for (let i = 0; i < 7; i++) {
      dev.submit(0, { readable: [{ addr: 0x9_0000, len: 8 }], writable: [{ addr: 0x9_1000, len: 8 }] });
      dev.waitUsed(0);
    }
    transport.write(0x100 + LoopbackConfig.scratch.offset, 4, 0xfeedf00d);
    const saved = model.saveState();
    expect(saved).toStrictEqual({ served: 7, scratch: 0xfeedf00d });
    expectTypeOf(saved).toMatchTypeOf<MigrationState>();
    const restored = new LoopbackDevice({ queueSize: 16 });
    restored.restoreState(saved);
    expect(restored.saveState()).toStrictEqual(saved);
    expect(restored.readConfig(LoopbackConfig.served.offset, 4)).toBe(7);

    const fresh = new LoopbackDevice();
    expect(() => fresh.restoreState({ served: -1, scratch: 0 })).toThrow(/loopback\.served/);
    expect(() => fresh.restoreState({ served: 1, scratch: 2 ** 32 })).toThrow(/loopback\.scratch/);
    expect(() => fresh.restoreState({ served: 1 })).toThrow(TypeError);
    expect(() => fresh.restoreState(new Map())).toThrow(TypeError);
    expect(fresh.saveState()).toStrictEqual({ served: 0, scratch: 0 } satisfies LoopbackState);
    expect(checkMutations(saved, () => new LoopbackDevice(), 11)).toBeGreaterThan(0);
  });

  describe('virtio-net', () => {
    function machine() {
      const memory = GuestMemory.create(4 << 20);
      const make = () => new VirtioNetDevice({ dma: new PhysicalDmaSpace(memory), behindIommu: false, rxBacklog: 8 });
      const model = make();
      const transport = new MmioTransport(model, memory, { irq });
      const bus = new SwitchBus(transport);
      const net = NetDriver.open({ transport: new MmioDriverTransport(bus), memory: GuestDmaView.identity(memory), allocator: new GuestAllocator(0x1_0000, 2 << 20), wantedFeatures: NET_DRIVER_FEATURES, queueSize: 16 });
      return { memory, make, model, transport, bus, net };
    }

    /** The model and transport state moved into a new pair over the same memory; the bus switches. */
    function migrate(m: ReturnType<typeof machine>): { model: VirtioNetDevice; transport: MmioTransport } {
      const modelState = m.model.saveState();
      const snapshot = m.transport.snapshot();
      const model = m.make();
      const transport = new MmioTransport(model, m.memory, { irq });
      model.restoreState(modelState);
      transport.restore(snapshot);
      m.bus.current = transport;
      expect(model.saveState()).toStrictEqual(modelState);
      return { model, transport };
    }

    it('a backlog of frames waiting for receive buffers moves with the device and arrives in order', () => {
      const m = machine();
      const frames = [60, 14, 1514, 200].map((n, i) => frameOf(n, i));
      for (const f of frames) m.net.send(f);
      m.net.waitTransmitted(frames.length);
      const saved = m.model.saveState();
      expect(saved.backlog).toEqual(frames);
      expect(saved.counters).toMatchObject({ txPackets: 4, rxPackets: 0 });
      const next = migrate(m);
      m.net.postReceiveBuffers(8);
      for (const f of frames) expectPacket(m.net.receive(), f);
      expect(next.model.stats()).toMatchObject({ txPackets: 4, rxPackets: 4, backlog: 0, dropsNoRxBuffer: 0 } satisfies Partial<VirtioNetStats>);
      // The old model was left behind with its copy: nothing it holds is shared with the new one.
      expect(m.model.stats().backlog).toBe(4);
    });

    it('a receive chain held for the next frame is used by the destination, not lost', () => {
      const m = machine();
      // Room for a header and an Ethernet header, not for 100 bytes: held, and the frame dropped.
      const small = m.net.postReceiveBuffers(1, VIRTIO_NET.HDR_SIZE + 14)[0]!;
      m.net.send(frameOf(100, 1));
      m.net.waitTransmitted(1);
      const saved = m.model.saveState();
      expect(saved.heldRx).not.toBeNull();
      expect(saved.counters.dropsRxTooSmall).toBe(1);
      migrate(m);
      const tiny = frameOf(14, 2);
      m.net.send(tiny);
      const received = m.net.receive();
      expectPacket(received, tiny);
      expect(received.addr).toBe(small);
    });

    it('a state with everything in it round trips; mutations are refused whole or taken exactly', () => {
      const m = machine();
      const full: VirtioNetState = {
        mac: Uint8Array.from([0x02, 1, 2, 3, 4, 5]),
        status: 1,
        behindIommu: false,
        failed: false,
        counters: { txPackets: 9, txBytes: 900, rxPackets: 7, rxBytes: 700, txMalformed: 1, rxMalformed: 2, dropsNoRxBuffer: 3, dropsRxTooSmall: 4, txFaults: 5, rxFaults: 6 },
        backlog: [frameOf(14, 1), frameOf(99, 2)],
        heldRx: { head: 3, readable: [], writable: [{ addr: 0x2_0000, len: 100 }, { addr: 0x3_0000, len: 1600 }] },
      };
      const model = m.make();
      model.restoreState(full);
      expect(model.saveState()).toStrictEqual(full);
      expect(model.readConfig(0, 4)).toBe(0x03020102);

      const before = m.make().saveState();
      const refuse = (state: unknown, pattern: RegExp) => {
        const fresh = m.make();
        expect(() => fresh.restoreState(state)).toThrow(pattern);
        expect(fresh.saveState()).toStrictEqual(before);
      };
      refuse({ ...full, mac: Uint8Array.from([1, 2, 3, 4, 5, 6]) }, /unicast/);
      refuse({ ...full, behindIommu: true }, /behindIommu/);
      refuse({ ...full, backlog: Array.from({ length: 9 }, (_, i) => frameOf(20, i)) }, /backlog has 9 entries/);
      refuse({ ...full, backlog: [new Uint8Array(1515)] }, /backlog\[0\]/);
      refuse({ ...full, heldRx: { head: 40000, readable: [], writable: [] } }, /heldRx\.head/);
      refuse({ ...full, heldRx: { head: 1, readable: [], writable: [{ addr: 0, len: 4 }] } }, /less than any packet/);
      refuse({ ...full, counters: { ...full.counters, rxBytes: -5 } }, /counters\.rxBytes/);
      refuse({ ...full, status: 0 }, /status/);
      expect(checkMutations(full, m.make, 12)).toBeGreaterThan(0);
    });
  });

  describe('DMA engine', () => {
    /** IOVA = GPA. */
    class IdentitySpace implements DmaSpace {
      constructor(private readonly memory: GuestMemory) {}
      begin(): void {}
      end(): void {}
      read(iova: number, into: Uint8Array): boolean {
        if (iova + into.length > this.memory.size) return false;
        this.memory.read(iova, into);
        return true;
      }
      write(iova: number, from: Uint8Array): boolean {
        if (iova + from.length > this.memory.size) return false;
        this.memory.write(iova, from);
        return true;
      }
    }

    function setup() {
      const memory = GuestMemory.create(1 << 20);
      const lines: number[] = [];
      const make = (line?: number[]) => new DmaEngine({ spaceFor: () => new IdentitySpace(memory), irq: { set: (s) => line?.push(s) } });
      const engine = make(lines);
      const set = (o: number, v: number) => engine.barWrite(0, o, 4, v);
      engine.configWrite(PciHeader.bar0.offset, 4, 0xd000_0000);
      engine.configWrite(PciHeader.command.offset, 2, PciCommand.MEMORY_SPACE | PciCommand.BUS_MASTER);
      set(DmaEngineReg.IRQ_ENABLE, DmaEngineIrq.DONE | DmaEngineIrq.ERROR);
      return { memory, make, engine, set, lines };
    }

    it('a repeating copy in progress moves to a new engine, which continues the passes', () => {
      const { memory, make, engine, set, lines } = setup();
      memory.write(0x1_0000, Uint8Array.from({ length: 5000 }, (_, i) => i & 0xff));
      set(DmaEngineReg.SRC_LO, 0x1_0000);
      set(DmaEngineReg.DST_LO, 0x3_0000);
      set(DmaEngineReg.LENGTH, 5000);
      set(DmaEngineReg.COMMAND, DmaEngineCommand.COPY | DmaEngineCommand.REPEAT);
      for (let i = 0; i < 3; i++) engine.pump();
      // A refused command while repeating raises nothing but leaves an interrupt pending from before.
      set(DmaEngineReg.COMMAND, DmaEngineCommand.FILL);
      const saved = engine.saveState();
      expect(saved.repeating).toStrictEqual({ op: DmaEngineCommand.COPY, src: 0x1_0000, dst: 0x3_0000, length: 5000, pasid: null });
      expect(saved.registers[DmaEngineReg.PASSES / 4]).toBe(3);
      expect(saved.registers[DmaEngineReg.STATUS / 4]).toBe(DmaEngineStatus.BUSY);

      const line: number[] = [];
      const next = make(line);
      next.restoreState(saved);
      expect(next.saveState()).toStrictEqual(saved);
      expect(next.stats()).toStrictEqual(engine.stats());
      memory.fill(0x3_0000, 5000, 0);
      expect(next.pump()).toBe(true);
      expect(memory.view(0x3_0000, 5000)).toEqual(memory.view(0x1_0000, 5000));
      expect(next.barRead(0, DmaEngineReg.PASSES, 4)).toBe(4);
      next.barWrite(0, DmaEngineReg.COMMAND, 4, DmaEngineCommand.STOP);
      expect(next.barRead(0, DmaEngineReg.STATUS, 4)).toBe(DmaEngineStatus.DONE);
      expect(line.at(-1)).toBe(DmaEngineIrq.DONE);
      expect(lines.length).toBeGreaterThan(0);
    });

    it('interrupt state moves: a pending, enabled cause raises the new engine\'s line at once', () => {
      const { make, engine, set } = setup();
      set(DmaEngineReg.SRC_LO, 0x1000);
      set(DmaEngineReg.DST_LO, 0x2000);
      set(DmaEngineReg.LENGTH, 64);
      set(DmaEngineReg.COMMAND, DmaEngineCommand.COPY);
      const line: number[] = [];
      const next = make(line);
      next.restoreState(engine.saveState());
      expect(line.at(-1)).toBe(DmaEngineIrq.DONE);
      expect(next.configRead(PciHeader.status.offset, 2) & 0x8).toBe(0x8);
      expect(next.barRead(0, DmaEngineReg.COMPLETED, 4)).toBe(1);
    });

    it('a hostile state is refused with the field named, and the engine is unchanged', () => {
      const { make, engine, set } = setup();
      set(DmaEngineReg.SRC_LO, 0x1000);
      set(DmaEngineReg.DST_LO, 0x2000);
      set(DmaEngineReg.LENGTH, 64);
      set(DmaEngineReg.COMMAND, DmaEngineCommand.FILL | DmaEngineCommand.REPEAT);
      engine.pump();
      const saved: DmaEngineState = engine.saveState();
      const before = make().saveState();
      const refuse = (state: unknown, pattern: RegExp) => {
        const fresh = make();
        expect(() => fresh.restoreState(state)).toThrow(pattern);
        expect(fresh.saveState()).toStrictEqual(before);
      };
      const withReg = (offset: number, value: number) => ({ ...saved, registers: saved.registers.map((v, i) => (i === offset / 4 ? value : v)) });
      refuse(withReg(DmaEngineReg.ID, 0), /registers\[0x0\]/);
      refuse(withReg(DmaEngineReg.CAPS, 1), /registers\[0x4\]/);
      refuse(withReg(DmaEngineReg.STATUS, DmaEngineStatus.DONE), /does not fit dma-engine\.repeating/);
      refuse(withReg(DmaEngineReg.IRQ_STATUS, 4), /beyond DONE and ERROR/);
      refuse({ ...saved, registers: saved.registers.slice(1) }, /must hold 19 registers/);
      refuse({ ...saved, repeating: { ...saved.repeating!, pasid: 5 } }, /no PASID support/);
      refuse({ ...saved, repeating: { ...saved.repeating!, length: 0 } }, /repeating\.length/);
      refuse({ ...saved, repeating: { ...saved.repeating!, op: DmaEngineCommand.STOP } }, /repeating\.op/);
      const config = saved.config.slice();
      config[PciHeader.vendorId.offset] = 0;
      refuse({ ...saved, config }, /read-only bits/);
      refuse({ ...saved, config: saved.config.subarray(0, 64) }, /256 bytes/);
      expect(make().barRead(0, DmaEngineReg.ID, 4)).toBe(0xffff_ffff);
      expect(checkMutations(saved, () => make(), 13)).toBeGreaterThan(0);
    });
  });
});

describe('DeviceRunner pause and resume (in one thread)', () => {
  it('a paused runner takes no step; doorbells and register accesses wait for resume; STOP ends it while paused', async () => {
    const signals = createSignalBuffer();
    const s = new Int32Array(signals);
    const notified: number[] = [];
    let accesses = 0;
    const runner = new DeviceRunner(signals, { access: () => ++accesses, notifyQueue: (q) => notified.push(q), reset: () => undefined }, { maxSpinMicros: 0 });
    const running = runner.run();
    ringDoorbell(s, 1);
    await until(() => notified.length === 1);
    expect(notified).toEqual([1]);
    await runner.pause();
    expect(runner.paused).toBe(true);
    expect(Atomics.load(s, DeviceSignal.WORKER_STATE)).toBe(WorkerState.PAUSED);
    ringDoorbell(s, 3);
    ringDoorbell(s, 40);
    // A register access posted by hand, as a vCPU thread's MailboxClient would.
    Atomics.store(s, DeviceSignal.MB_OP, MailboxOp.MMIO_READ);
    Atomics.store(s, DeviceSignal.MB_SEQ, 1);
    Atomics.add(s, DeviceSignal.WAKE, 1);
    Atomics.notify(s, DeviceSignal.WAKE);
    await sleep(10);
    expect(notified).toEqual([1]);
    expect(Atomics.load(s, DeviceSignal.MB_DONE)).toBe(0);
    expect(Atomics.load(s, DeviceSignal.QUEUE_PENDING + 0)).toBe(1 << 3);
    expect(Atomics.load(s, DeviceSignal.QUEUE_PENDING + 1)).toBe(1 << 8);
    runner.resume();
    await until(() => notified.length === 3 && Atomics.load(s, DeviceSignal.MB_DONE) === 1);
    expect(notified).toEqual([1, 3, 40]);
    expect(Atomics.load(s, DeviceSignal.MB_DONE)).toBe(1);
    expect(accesses).toBe(1);
    await runner.pause();
    postControl(s, ControlRequest.STOP);
    await running;
    expect(runner.paused).toBe(false);
    expect(Atomics.load(s, DeviceSignal.WORKER_STATE)).toBe(WorkerState.STOPPED);
    await runner.pause();
  });
});

// ---- real workers ------------------------------------------------------------------------------

const handles: { close(): Promise<void> }[] = [];
afterEach(async () => {
  await Promise.all(handles.splice(0).map((h) => h.close()));
});

function track<T extends { close(): Promise<void> }>(handle: T): T {
  handles.push(handle);
  return handle;
}

describe.each(['mmio', 'pci'] as const)('loopback device worker over virtio-%s: pause, save, restore', (kind) => {
  async function setup() {
    const memory = GuestMemory.create(4 << 20);
    const handle = track(await DeviceHandle.spawn({ name: `loop-${kind}`, model: { kind: 'loopback', options: { queueSize: 64 } }, transport: kind, memory, queues: 1 }));
    const bus = new SwitchBus(handle.bus);
    const allocator = new GuestAllocator(0x1000, (4 << 20) - 0x1000);
    const dev = GuestDevice.open({ transport: driverTransport(kind, bus), memory, allocator, wantedFeatures: featureMask(FeatureBit.VERSION_1) | featureMask(FeatureBit.EVENT_IDX), queueSize: 64 });
    const sent = new Map<number, { dst: number; payload: Uint8Array }>();
    let serial = 0;
    const submit = () => {
      const payload = Uint8Array.from({ length: 40 }, (_, i) => (serial * 7 + i) & 0xff);
      serial++;
      const src = allocator.alloc(64, 8);
      const dst = allocator.alloc(64, 8);
      memory.write(src, payload);
      const head = dev.submit(0, { readable: [{ addr: src, len: payload.length }], writable: [{ addr: dst, len: 64 }] });
      expect(sent.has(head)).toBe(false);
      sent.set(head, { dst, payload });
    };
    /** Takes `count` used buffers: each answers a request in flight, once, with its own bytes. */
    const collect = (count: number) => {
      for (const used of dev.waitUsedMany(0, count, 5000)) {
        const request = sent.get(used.head);
        expect(request, `head ${used.head} was not in flight`).toBeDefined();
        expect(used.len).toBe(40);
        expect(memory.view(request!.dst, 40)).toEqual(request!.payload);
        sent.delete(used.head);
      }
    };
    return { memory, handle, bus, dev, submit, collect, sent };
  }

  it('paused mid-traffic and restored into a new worker: every request served once, the rings go on', async () => {
    const s = await setup();
    for (let i = 0; i < 20; i++) {
      s.submit();
      s.collect(1);
    }
    // A burst the device is still working through when it is paused (two descriptors a request,
    // so 29 fit the 64-entry ring with the 5 below).
    for (let i = 0; i < 24; i++) s.submit();
    await s.handle.pause();
    // Kicked into the paused source: its doorbell bits stay behind in the old signal block.
    for (let i = 0; i < 5; i++) s.submit();
    const state = await s.handle.saveState();
    expectTypeOf(state).toEqualTypeOf<DeviceWorkerState>();
    // Plain data the migration image can carry as it is.
    expectTypeOf<DeviceWorkerState>().toMatchTypeOf<MigrationState>();
    expect(state).toMatchObject({ modelKind: 'loopback', transportKind: kind });
    const position = state.transport.queuePositions[0]!;
    const servedAtSource = (state.model as LoopbackState).served;
    expect(position.nextAvail).toBe(servedAtSource);
    expect(position.nextUsed).toBe(servedAtSource);
    expect(servedAtSource).toBeGreaterThanOrEqual(20);
    expect(servedAtSource).toBeLessThanOrEqual(44);
    // Paused means paused: the source serves nothing more.
    await sleep(20);
    expect(await s.handle.saveState()).toStrictEqual(state);

    const next = track(await DeviceHandle.spawn({ name: `loop-${kind}-dst`, model: { kind: 'loopback', options: { queueSize: 64 } }, transport: kind, memory: s.memory, queues: 1, restore: state }));
    s.bus.current = next.bus;
    await s.handle.close();
    // The 49 requests ever submitted less the 20 already collected: answered once each, in any split
    // between the source (before the pause) and the destination.
    s.collect(29);
    expect(s.sent.size).toBe(0);
    await sleep(20);
    expect(s.dev.queue(0).pendingUsed()).toBe(0);
    for (let i = 0; i < 100; i++) {
      s.submit();
      s.collect(1);
    }
    await next.pause();
    const after = await next.saveState();
    expect(after.transport.queuePositions[0]).toStrictEqual({ nextAvail: 149, nextUsed: 149 });
    expect(after.model).toStrictEqual({ served: 149, scratch: 0 });
    await next.resume();
    expect(s.bus.current).toBe(next.bus);
    expect(driverTransport(kind, s.bus).configRead(LoopbackConfig.served.offset, 4)).toBe(149);
  });

  it('pause holds doorbells for resume; saveState() is refused while the device runs', async () => {
    const s = await setup();
    await expect(s.handle.saveState()).rejects.toThrow(/paused device: call pause\(\) first/);
    await s.handle.pause();
    await s.handle.pause();
    for (let i = 0; i < 3; i++) s.submit();
    await sleep(30);
    expect(s.dev.queue(0).pendingUsed()).toBe(0);
    expect((await s.handle.control.stats()).doorbells).toBe(0);
    await s.handle.resume();
    s.collect(3);
    await expect(s.handle.saveState()).rejects.toThrow(/call pause\(\) first/);
  });

  it('a restore state that does not fit fails the start with the reason', async () => {
    const s = await setup();
    s.submit();
    s.collect(1);
    await s.handle.pause();
    const state = await s.handle.saveState();
    const spawn = (restore: unknown, model: 'loopback' | 'virtio-net' = 'loopback') =>
      DeviceHandle.spawn({ name: `bad-${kind}`, model: { kind: model }, transport: kind, memory: s.memory, queues: 1, restore: restore as DeviceWorkerState });
    await expect(spawn({ ...state, model: { served: -1, scratch: 0 } })).rejects.toThrow(DeviceWorkerError);
    await expect(spawn({ ...state, model: { served: -1, scratch: 0 } })).rejects.toThrow(/failed to start: restore refused: loopback\.served/);
    await expect(spawn(state, 'virtio-net')).rejects.toThrow(/restore\.modelKind is loopback, this worker hosts virtio-net/);
    await expect(spawn({ ...state, transportKind: kind === 'mmio' ? 'pci' : 'mmio' })).rejects.toThrow(/restore\.transportKind/);
    await expect(spawn({ ...state, transport: { ...state.transport, queuePositions: 'x' } })).rejects.toThrow(/queuePositions/);
  });
});

// A context owned by the test thread, as the iommu worker would own it, with one device mapped at
// IOVA = GPA + IOVA_OFFSET; the consumers translate through its shared tables.
const PAGE = 4096;
const IOVA_OFFSET = 0x8000_0000;
const RW = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;

function iommuContext(memory: GuestMemory, device: string) {
  const host = new IommufdHost(memory, { devices: [{ name: device, group: device }], autoReclaim: false });
  const ctx: Context = host.open();
  const quiescence = createQuiescenceBuffer(8);
  ctx.attachQuiescence(new QuiescenceOwner(quiescence), { timeoutMs: 2000 });
  const ioas = ctx.ioasAlloc();
  const dev = ctx.deviceBind(device);
  ctx.deviceAttach(dev, ioas);
  const view = new GuestDmaView(memory);
  const map = (gpa: number, length: number) => {
    ctx.ioasMap(ioas, { gpa, length: BigInt(length), iova: BigInt(gpa + IOVA_OFFSET), flags: RW });
    view.map(gpa + IOVA_OFFSET, gpa, length);
  };
  return { ctx, quiescence, faults: createFaultQueueBuffer(64), row: ctx.deviceRow(dev), view, map };
}

describe.each(['mmio', 'pci'] as const)('virtio-net worker behind the IOMMU over virtio-%s: pause, save, restore', (kind) => {
  it('frames waiting on the cable and in flight arrive once, in order, from the new worker', async () => {
    const memory = GuestMemory.create(16 << 20);
    const io = iommuContext(memory, 'net0');
    io.map(0x10_0000, 4 << 20);
    // Fresh for each worker, as a destination's iommu worker would hand them out.
    const iommu = (): DeviceIommuSpec => ({ shared: io.ctx.describeShared(), row: io.row, quiescence: io.quiescence, faults: io.faults, wake: new SharedArrayBuffer(4), wakeIndex: 0 });
    const spawn = async (name: string, restore?: DeviceWorkerState) =>
      track(await DeviceHandle.spawn({ name, model: { kind: 'virtio-net', options: { iommu: iommu() } }, transport: kind, memory, queues: 2, ...(restore !== undefined ? { restore } : {}) }));
    const source = await spawn(`net-${kind}`);
    const bus = new SwitchBus(source.bus);
    const net = NetDriver.open({ transport: driverTransport(kind, bus), memory: io.view, allocator: new GuestAllocator(0x10_0000 + IOVA_OFFSET, 4 << 20), queueSize: 64 });
    expect(net.accessPlatform).toBe(true);

    const frames = Array.from({ length: 40 }, (_, i) => frameOf(14 + ((i * 97) % 1500), i));
    let transmitted = 0;
    net.postReceiveBuffers(8);
    for (let i = 0; i < 8; i++) net.send(frames[i]!);
    for (let i = 0; i < 8; i++) expectPacket(net.receive(), frames[i]!);
    // No receive buffers now: frames wait on the cable, and the last ones are still in flight when
    // the device is paused.
    for (let i = 8; i < 14; i++) net.send(frames[i]!);
    net.waitTransmitted(6 + 8);
    transmitted += 14;
    for (let i = 14; i < 20; i++) net.send(frames[i]!, { kick: false });
    await source.pause();
    // Rung on the paused source: the doorbell stays behind with it, the frames in the ring.
    expect(net.device.kick(VIRTIO_NET.TX)).toBe(true);
    const state = await source.saveState();
    const saved = state.model as VirtioNetState;
    expect(saved.behindIommu).toBe(true);
    expect(saved.counters).toMatchObject({ txPackets: 14, rxPackets: 8 });
    expect(saved.backlog).toEqual(frames.slice(8, 14));
    expect(state.transport.queuePositions[VIRTIO_NET.TX]).toMatchObject({ nextAvail: 14, nextUsed: 14 });
    // Only the device's own state: no rows, no shared buffers.
    expect(JSON.stringify(state, (_k, v: unknown) => (v instanceof SharedArrayBuffer ? 'SAB' : typeof v === 'bigint' ? String(v) : v))).not.toContain('SAB');

    const destination = await spawn(`net-${kind}-dst`, state);
    bus.current = destination.bus;
    await source.close();
    net.postReceiveBuffers(32);
    for (let i = 8; i < 20; i++) expectPacket(net.receive(), frames[i]!);
    net.waitTransmitted(6);
    transmitted += 6;
    for (let i = 20; i < 40; i++) {
      net.send(frames[i]!);
      expectPacket(net.receive(), frames[i]!);
      net.postReceiveBuffers(1);
    }
    net.waitTransmitted(20);
    transmitted += 20;
    await sleep(20);
    expect(net.poll()).toBeUndefined();
    const stats = (await destination.control.stats()).model as unknown as VirtioNetStats;
    expect(stats).toMatchObject({ txPackets: 40, rxPackets: 40, backlog: 0, dropsNoRxBuffer: 0, txFaults: 0, rxFaults: 0 });
    expect(transmitted).toBe(40);
  });

  it('a state saved behind an IOMMU does not start a device without one', async () => {
    const memory = GuestMemory.create(16 << 20);
    const io = iommuContext(memory, 'net0');
    const iommu: DeviceIommuSpec = { shared: io.ctx.describeShared(), row: io.row, quiescence: io.quiescence, faults: io.faults, wake: new SharedArrayBuffer(4), wakeIndex: 0 };
    const source = track(await DeviceHandle.spawn({ name: 'net-src', model: { kind: 'virtio-net', options: { iommu } }, transport: kind, memory, queues: 2 }));
    await source.pause();
    const state = await source.saveState();
    await expect(DeviceHandle.spawn({ name: 'net-plain', model: { kind: 'virtio-net' }, transport: kind, memory, queues: 2, restore: state })).rejects.toThrow(
      /restore refused: virtio-net\.behindIommu/,
    );
  });
});

describe('DMA engine worker: pause, save, restore', () => {
  async function launch(memory: GuestMemory, io: ReturnType<typeof iommuContext>, name: string, restore?: DmaEngineWorkerState) {
    const start: DmaEngineWorkerStart = {
      name,
      memory: memory.describe(),
      signals: createSignalBuffer(),
      translation: { shared: io.ctx.describeShared(), row: io.row, quiescence: io.quiescence, faults: io.faults, iommuSignals: createSignalBuffer() },
      repeatGapMicros: 200,
    };
    return track(
      await DeviceHandle.launch<DmaEngineWorkerApi, DmaEngineWorkerStart>({ entry: 'dma-engine-worker', name, transport: 'pci', start, queues: 0, ...(restore !== undefined ? { restore } : {}) }),
    );
  }

  it('a repeating copy suspended on the source continues on the destination', async () => {
    const memory = GuestMemory.create(16 << 20);
    const io = iommuContext(memory, 'dma0');
    const SRC = 0x10_0000;
    const DST = 0x20_0000;
    const LENGTH = 3 * PAGE + 100;
    io.map(SRC, 4 * PAGE);
    io.map(DST, 4 * PAGE);
    memory.write(SRC, Uint8Array.from({ length: LENGTH }, (_, i) => (i * 3) & 0xff));
    const source = await launch(memory, io, 'dma0');
    const bus = new SwitchBus(source.bus);
    const engine = DmaEngineDriver.probe(bus, { bar0Address: 0xd000_0000 });
    expect(engine.copy(BigInt(SRC + IOVA_OFFSET), BigInt(DST + IOVA_OFFSET), 64)).toEqual({ status: 'DONE', doneBytes: 64 });
    engine.setReg(DmaEngineReg.LENGTH, LENGTH);
    engine.setReg(DmaEngineReg.COMMAND, DmaEngineCommand.COPY | DmaEngineCommand.REPEAT);
    while (engine.reg(DmaEngineReg.PASSES) < 5) await sleep(1);

    await source.pause();
    const state = await source.saveState();
    const passes = state.engine.registers[DmaEngineReg.PASSES / 4]!;
    expect(passes).toBeGreaterThanOrEqual(5);
    expect(state.engine.repeating).toStrictEqual({ op: DmaEngineCommand.COPY, src: SRC + IOVA_OFFSET, dst: DST + IOVA_OFFSET, length: LENGTH, pasid: null });
    // Suspended: no pass runs on the paused source.
    const engineStats = (await source.control.stats()).engine;
    await sleep(20);
    expect((await source.control.stats()).engine).toStrictEqual(engineStats);
    expect(engineStats.passes).toBe(state.engine.counters.passes);

    // New source bytes and a cleared destination: only passes on the new worker can bring them over.
    memory.write(SRC, Uint8Array.from({ length: LENGTH }, (_, i) => (i * 5 + 1) & 0xff));
    memory.fill(DST, LENGTH, 0);
    const destination = await launch(memory, io, 'dma0-dst', state);
    bus.current = destination.bus;
    await source.close();
    const deadline = Date.now() + 5000;
    while (engine.reg(DmaEngineReg.PASSES) < passes + 3 && Date.now() < deadline) await sleep(1);
    expect(engine.reg(DmaEngineReg.PASSES)).toBeGreaterThanOrEqual(passes + 3);
    expect(engine.reg(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.BUSY);
    expect(engine.reg(DmaEngineReg.ID)).toBe(DMA_ENGINE_ID);
    expect(engine.reg(DmaEngineReg.LENGTH)).toBe(LENGTH);
    expect(engine.reg(DmaEngineReg.COMPLETED)).toBe(1);
    engine.setReg(DmaEngineReg.COMMAND, DmaEngineCommand.STOP);
    expect(engine.reg(DmaEngineReg.STATUS)).toBe(DmaEngineStatus.DONE);
    expect(memory.view(DST, LENGTH)).toEqual(memory.view(SRC, LENGTH));
    expect(engine.reg(DmaEngineReg.PASS_FAULTS)).toBe(0);
    const after = (await destination.control.stats()).engine;
    expect(after.passes).toBeGreaterThan(state.engine.counters.passes);
    expect(after.faults).toBe(0);
    // The config space came along: the BAR is where the guest put it, bus mastering on.
    expect((bus.configRead(PciHeader.bar0.offset, 4) & ~0xf) >>> 0).toBe(0xd000_0000);
    expect(bus.configRead(PciHeader.command.offset, 2) & PciCommand.BUS_MASTER).toBe(PciCommand.BUS_MASTER);
  });

  it('a restore state that does not fit fails the start; saveState() needs a paused engine', async () => {
    const memory = GuestMemory.create(4 << 20);
    const io = iommuContext(memory, 'dma0');
    const source = await launch(memory, io, 'dma0');
    await expect(source.saveState()).rejects.toThrow(/paused engine: call pause\(\) first/);
    await source.pause();
    const state = await source.saveState();
    expectTypeOf(state).toEqualTypeOf<DmaEngineWorkerState>();
    expectTypeOf<DmaEngineWorkerState>().toMatchTypeOf<MigrationState>();
    const bad = { engine: { ...state.engine, repeating: { op: DmaEngineCommand.COPY, src: 0, dst: 0, length: 8, pasid: 3 } } };
    await expect(launch(memory, io, 'bad', bad)).rejects.toThrow(/failed to start: restore refused: dma-engine\.repeating\.pasid/);
    await expect(launch(memory, io, 'bad', {} as DmaEngineWorkerState)).rejects.toThrow(/restore\.engine is missing/);
    await source.resume();
    expect((await source.control.stats()).engine.commands).toBe(0);
  });
});
