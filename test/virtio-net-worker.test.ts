import { afterEach, describe, expect, it } from 'vitest';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { GuestDmaView } from '../guest-fixtures/driver/dma-view.js';
import { GuestDeviceError } from '../guest-fixtures/driver/guest-device.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { NET_DRIVER_FEATURES, NetDriver, VIRTIO_NET, type Received } from '../guest-fixtures/driver/net-driver.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import type { DriverTransport } from '../guest-fixtures/driver/transport.js';
import { STATUS, VirtioInitError, initializeDevice } from '../guest-fixtures/driver/virtio-driver.js';
import { DEFAULT_MAC, type VirtioNetStats } from '../src/devices/virtio-net.js';
import type { Context } from '../src/ioasid/context.js';
import { FaultAccess, FaultConsumer, FaultReason, createFaultQueueBuffer, faultIova, type FaultRecord } from '../src/ioasid/fault-queue.js';
import { IommufdHost } from '../src/ioasid/host.js';
import { QuiescenceOwner, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { IoasMapFlag } from '../src/ioasid/uapi.js';
import { GuestMemory } from '../src/memory/index.js';
import type { DeviceIommuSpec, TransportKind } from '../src/runtime/device-worker-protocol.js';
import type { MmioBus, PciBus } from '../src/virtio/bus.js';
import { FeatureBit, featureMask } from '../src/virtio/constants.js';
import { DeviceHandle } from '../src/vmm/device-handle.js';

// Workers run the compiled code in dist/: `npm run build` first.

const PAGE = 4096;
const MEMORY_SIZE = 16 << 20;
const MAIN_GPA = 0x10_0000;
const MAIN_IOVA = 0x8000_0000;
const MAIN_SIZE = 4 << 20;
const SPARE_GPA = 0x80_0000;
const SPARE_IOVA = 0xc000_0000;
const RW = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
const POISON = 0xee;

const handles: DeviceHandle[] = [];
afterEach(async () => {
  await Promise.all(handles.splice(0).map((h) => h.close()));
});

interface Machine {
  memory: GuestMemory;
  ctx: Context;
  ioas: number;
  row: number;
  faults: FaultConsumer;
  /** The word the device worker bumps when it appends a fault. */
  wake: Int32Array;
  handle: DeviceHandle;
  transport: DriverTransport;
  view: GuestDmaView;
  allocator: GuestAllocator;
  map(iova: number, gpa: number, pages: number): void;
  open(features?: bigint): NetDriver;
  stats(): Promise<VirtioNetStats>;
}

/**
 * The test thread owns the iommufd context (as the iommu worker would) and plays the guest; the
 * virtio-net device runs in a device worker that translates through the context's shared tables.
 */
async function machine(kind: TransportKind): Promise<Machine> {
  const memory = GuestMemory.create(MEMORY_SIZE);
  const host = new IommufdHost(memory, { devices: [{ name: 'net0', group: 'net0' }], autoReclaim: false });
  const ctx = host.open();
  const quiescence = createQuiescenceBuffer(8);
  ctx.attachQuiescence(new QuiescenceOwner(quiescence), { timeoutMs: 2000 });
  const faultBuffer = createFaultQueueBuffer(256);
  const wake = new SharedArrayBuffer(4);
  const ioas = ctx.ioasAlloc();
  const dev = ctx.deviceBind('net0');
  ctx.deviceAttach(dev, ioas);
  const row = ctx.deviceRow(dev);
  const iommu: DeviceIommuSpec = { shared: ctx.describeShared(), row, quiescence, faults: faultBuffer, wake, wakeIndex: 0 };
  const handle = await DeviceHandle.spawn({ name: `net-${kind}`, model: { kind: 'virtio-net', options: { iommu } }, transport: kind, memory, queues: 2 });
  handles.push(handle);
  const transport =
    kind === 'mmio' ? new MmioDriverTransport(handle.bus as MmioBus) : new PciDriverTransport(handle.bus as PciBus, { bar0Address: 0xe000_0000 });
  const view = new GuestDmaView(memory);
  const m: Machine = {
    memory,
    ctx,
    ioas,
    row,
    faults: new FaultConsumer(faultBuffer),
    wake: new Int32Array(wake),
    handle,
    transport,
    view,
    allocator: new GuestAllocator(MAIN_IOVA, MAIN_SIZE),
    map(iova, gpa, pages) {
      ctx.ioasMap(ioas, { gpa, length: BigInt(pages * PAGE), iova: BigInt(iova), flags: RW });
      view.map(iova, gpa, pages * PAGE);
    },
    open(features = NET_DRIVER_FEATURES) {
      return NetDriver.open({ transport, memory: view, allocator: m.allocator, wantedFeatures: features, interrupts: handle.interrupts, queueSize: 64 });
    },
    async stats() {
      return (await handle.control.stats()).model as unknown as VirtioNetStats;
    },
  };
  m.map(MAIN_IOVA, MAIN_GPA, MAIN_SIZE / PAGE);
  return m;
}

function frameOf(length: number, seed: number): Uint8Array {
  const f = new Uint8Array(length);
  for (let i = 0; i < length; i++) f[i] = (seed * 13 + i * 5) & 0xff;
  f.set(DEFAULT_MAC, 0);
  return f;
}

function expectPacket(received: Received, frame: Uint8Array): void {
  expect(received.kind).toBe('packet');
  if (received.kind === 'packet') {
    expect(received.numBuffers).toBe(1);
    expect(received.frame).toEqual(frame);
  }
}

function drainFaults(m: Machine): FaultRecord[] {
  const out: FaultRecord[] = [];
  m.faults.drain((rec) => out.push({ ...rec }));
  return out;
}

describe.each(['mmio', 'pci'] as const)('virtio-net in a device worker over virtio-%s, behind the IOMMU', (kind) => {
  it('loops frames back byte-identical through IOVAs only', async () => {
    const m = await machine(kind);
    const net = m.open();
    expect(net.accessPlatform).toBe(true);
    expect([...(net.mac() ?? [])]).toEqual([...DEFAULT_MAC]);
    net.postReceiveBuffers(32, VIRTIO_NET.RX_BUFFER_SIZE, 2);
    const frames = Array.from({ length: 64 }, (_, i) => frameOf(14 + ((i * 211) % 1501), i));
    for (let i = 0; i < frames.length; i++) {
      net.send(frames[i]!, { pieces: 1 + (i % 3) });
      expectPacket(net.receive(), frames[i]!);
      net.postReceiveBuffers(1);
      net.reclaimTransmitted();
    }
    const stats = await m.stats();
    expect(stats).toMatchObject({ txPackets: 64, rxPackets: 64, txFaults: 0, rxFaults: 0 });
    expect(drainFaults(m)).toEqual([]);
    expect((await m.handle.control.stats()).doorbells).toBeGreaterThan(0);
  });

  it('a receive buffer unmapped while posted faults in the worker: record in the fault ring, the wake word bumped, the poisoned page untouched', async () => {
    const m = await machine(kind);
    const net = m.open();
    m.map(SPARE_IOVA, SPARE_GPA, 1);
    m.memory.fill(SPARE_GPA, PAGE, POISON);
    net.postReceiveBufferAt(SPARE_IOVA, VIRTIO_NET.RX_BUFFER_SIZE);
    net.device.kick(VIRTIO_NET.RX);
    // Strict unmap: when this returns, the worker can no longer reach the page.
    m.ctx.ioasUnmap(m.ioas, BigInt(SPARE_IOVA), BigInt(PAGE));
    const wakesBefore = Atomics.load(m.wake, 0);

    net.send(frameOf(200, 1));
    expect(net.receive()).toEqual({ kind: 'error', len: 0, addr: SPARE_IOVA });
    expect(m.memory.view(SPARE_GPA, PAGE).every((b) => b === POISON)).toBe(true);
    const faults = drainFaults(m);
    expect(faults).toHaveLength(1);
    expect(faults[0]).toMatchObject({ device: m.row, access: FaultAccess.WRITE, reason: FaultReason.MAPPING });
    expect(faultIova(faults[0]!)).toBe(BigInt(SPARE_IOVA));
    expect(Atomics.load(m.wake, 0)).not.toBe(wakesBefore);
    expect(await m.stats()).toMatchObject({ rxFaults: 1, txPackets: 1, rxPackets: 0 });

    // The device carries on with mapped buffers.
    net.postReceiveBuffers(1);
    const next = frameOf(300, 2);
    net.send(next);
    expectPacket(net.receive(), next);
  });

  it('rings unmapped under the worker: DEVICE_NEEDS_RESET and the worker stays up', async () => {
    const m = await machine(kind);
    const net = m.open();
    net.postReceiveBuffers(4);
    m.ctx.ioasUnmap(m.ioas, BigInt(MAIN_IOVA), BigInt(MAIN_SIZE));
    net.send(frameOf(64, 3));
    // The driver learns it through the config change interrupt (virtio 1.2 §2.1.2).
    expect(() => net.device.waitUsed(VIRTIO_NET.TX, 3000)).toThrow(GuestDeviceError);
    expect(m.transport.getStatus() & STATUS.DEVICE_NEEDS_RESET).toBe(STATUS.DEVICE_NEEDS_RESET);
    expect(m.handle.failure).toBeUndefined();
    expect(drainFaults(m).length).toBeGreaterThan(0);

    // Mapped again and reset, it serves from scratch.
    m.ctx.ioasMap(m.ioas, { gpa: MAIN_GPA, length: BigInt(MAIN_SIZE), iova: BigInt(MAIN_IOVA), flags: RW });
    m.allocator = new GuestAllocator(MAIN_IOVA, MAIN_SIZE);
    const again = m.open();
    again.postReceiveBuffers(1);
    const frame = frameOf(128, 4);
    again.send(frame);
    expectPacket(again.receive(), frame);
  });

  it('refuses FEATURES_OK to a driver that does not accept ACCESS_PLATFORM', async () => {
    const m = await machine(kind);
    const withoutIommu = NET_DRIVER_FEATURES & ~featureMask(FeatureBit.ACCESS_PLATFORM);
    expect(() => initializeDevice(m.transport, { wantedFeatures: withoutIommu })).toThrow(VirtioInitError);
    expect(m.transport.getStatus() & STATUS.FEATURES_OK).toBe(0);
  });
});

describe.each(['mmio', 'pci'] as const)('virtio-net in a device worker over virtio-%s, no IOMMU', (kind) => {
  it('does not offer ACCESS_PLATFORM and loops frames at guest-physical addresses', async () => {
    const memory = GuestMemory.create(MEMORY_SIZE);
    const handle = await DeviceHandle.spawn({ name: `net-plain-${kind}`, model: { kind: 'virtio-net', options: { rxBacklog: 8 } }, transport: kind, memory, queues: 2 });
    handles.push(handle);
    const transport =
      kind === 'mmio' ? new MmioDriverTransport(handle.bus as MmioBus) : new PciDriverTransport(handle.bus as PciBus, { bar0Address: 0xe000_0000 });
    const net = NetDriver.open({
      transport,
      memory: GuestDmaView.identity(memory),
      allocator: new GuestAllocator(MAIN_GPA, MAIN_SIZE),
      interrupts: handle.interrupts,
      queueSize: 64,
    });
    expect(net.accessPlatform).toBe(false);
    // Sent before any receive buffer: the backlog holds them until buffers come.
    const frames = [frameOf(60, 1), frameOf(1514, 2), frameOf(700, 3)];
    for (const f of frames) net.send(f);
    net.waitTransmitted(3);
    net.postReceiveBuffers(3);
    for (const f of frames) expectPacket(net.receive(), f);
    const model = (await handle.control.stats()).model;
    expect(model).toMatchObject({ txPackets: 3, rxPackets: 3, backlog: 0 });
  });
});
