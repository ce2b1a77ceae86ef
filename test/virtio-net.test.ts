import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { GuestDmaView } from '../guest-fixtures/driver/dma-view.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { NET_DRIVER_FEATURES, NetDriver, VIRTIO_NET } from '../guest-fixtures/driver/net-driver.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import type { DriverTransport } from '../guest-fixtures/driver/transport.js';
import { initializeDevice, STATUS, VirtioInitError } from '../guest-fixtures/driver/virtio-driver.js';
import { DEFAULT_MAC, MAX_FRAME_SIZE, NetConfig, NetFeatureBit, NetHeader, NetQueue, VirtioNetDevice } from '../src/devices/virtio-net.js';
import { FaultAccess, FaultConsumer, FaultProducer, FaultReason, createFaultQueueBuffer, faultIova, type FaultRecord } from '../src/ioasid/fault-queue.js';
import { IommufdHost } from '../src/ioasid/host.js';
import type { Context } from '../src/ioasid/context.js';
import { QuiescenceOwner, QuiescenceWorker, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../src/ioasid/translator.js';
import { IoasMapFlag } from '../src/ioasid/uapi.js';
import { PhysicalDmaSpace, TranslatorDmaSpace, type TranslatingDmaSpace } from '../src/memory/dma-space.js';
import { IovaFaultError, IovaQueueMemory, queueMemoryFor } from '../src/memory/iova-queue-memory.js';
import { GuestMemory } from '../src/memory/index.js';
import { DeviceType, FeatureBit, featureMask } from '../src/virtio/constants.js';
import { MmioTransport } from '../src/virtio/mmio.js';
import { PciTransport } from '../src/virtio/pci.js';
import { fuzzParams } from './support/fuzz.js';
import type { VirtioTransportCore } from '../src/virtio/transport.js';

const PAGE = 4096;
const MEMORY_SIZE = 16 << 20;
/** Rings and driver-allocated buffers: GPA 1 MiB.. mapped at an IOVA far outside RAM. */
const MAIN_GPA = 0x10_0000;
const MAIN_IOVA = 0x8000_0000;
const MAIN_SIZE = 4 << 20;
/** Pages a test maps, unmaps and poisons on its own, away from the main window. */
const SPARE_GPA = 0x80_0000;
const SPARE_IOVA = 0xc000_0000;
const RW = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
const POISON = 0xee;
const ACCESS_PLATFORM = featureMask(FeatureBit.ACCESS_PLATFORM);

interface Rig {
  memory: GuestMemory;
  ctx: Context;
  ioas: number;
  row: number;
  faults: FaultConsumer;
  device: VirtioNetDevice;
  core: VirtioTransportCore;
  transport: DriverTransport;
  view: GuestDmaView;
  allocator: GuestAllocator;
  dma: TranslatingDmaSpace;
  /** Maps `pages` pages of guest memory at GPA `gpa` to `iova`, in the IOMMU and in the guest's view. */
  map(iova: number, gpa: number, pages: number): void;
  unmap(iova: number, pages: number): void;
  open(features?: bigint): NetDriver;
}

function frameOf(length: number, seed: number): Uint8Array {
  const f = new Uint8Array(length);
  for (let i = 0; i < length; i++) f[i] = (seed * 31 + i * 7) & 0xff;
  // Destination MAC: the device's own, as a frame to ourselves would carry.
  f.set(DEFAULT_MAC, 0);
  return f;
}

/**
 * A machine in one thread: iommufd context with the device bound and attached to one IOAS, the
 * device's translator (with quiescence and the fault ring), the virtio-net model behind a
 * transport, and a guest whose rings and buffers live at IOVAs far from their GPAs.
 */
function rig(kind: 'mmio' | 'pci' = 'mmio', options: { rxBacklog?: number } = {}): Rig {
  const memory = GuestMemory.create(MEMORY_SIZE);
  const host = new IommufdHost(memory, { devices: [{ name: 'net0', group: 'net0' }] });
  const ctx = host.open();
  const quiescence = createQuiescenceBuffer(4);
  ctx.attachQuiescence(new QuiescenceOwner(quiescence), { timeoutMs: 200 });
  const faultBuffer = createFaultQueueBuffer(256);
  const ioas = ctx.ioasAlloc();
  const dev = ctx.deviceBind('net0');
  ctx.deviceAttach(dev, ioas);
  const row = ctx.deviceRow(dev);
  const shared = ctx.describeShared();
  const translator = new Translator({
    pool: shared.pool.buffer,
    attachments: new DeviceTableAttachments(shared),
    quiescence: QuiescenceWorker.register(quiescence),
    faults: new FaultProducer(faultBuffer),
  });
  const dma = new TranslatorDmaSpace(translator, memory, row);
  const device = new VirtioNetDevice({ dma, behindIommu: true, ...options });
  const irq = { set: () => undefined };
  const queueMemory = queueMemoryFor(dma);
  let core: VirtioTransportCore;
  let transport: DriverTransport;
  if (kind === 'mmio') {
    const t = new MmioTransport(device, memory, { irq, queueMemory });
    core = t.core;
    transport = new MmioDriverTransport(t);
  } else {
    const t = new PciTransport(device, memory, { irq, queueMemory });
    core = t.core;
    transport = new PciDriverTransport(t, { bar0Address: 0xe000_0000 });
  }
  const view = new GuestDmaView(memory);
  const r: Rig = {
    memory,
    ctx,
    ioas,
    row,
    faults: new FaultConsumer(faultBuffer),
    device,
    core,
    transport,
    view,
    allocator: new GuestAllocator(MAIN_IOVA, MAIN_SIZE),
    dma,
    map(iova, gpa, pages) {
      ctx.ioasMap(ioas, { gpa, length: BigInt(pages * PAGE), iova: BigInt(iova), flags: RW });
      view.map(iova, gpa, pages * PAGE);
    },
    unmap(iova, pages) {
      ctx.ioasUnmap(ioas, BigInt(iova), BigInt(pages * PAGE));
    },
    open(features = NET_DRIVER_FEATURES) {
      return NetDriver.open({ transport, memory: view, allocator: r.allocator, wantedFeatures: features, queueSize: 64 });
    },
  };
  r.map(MAIN_IOVA, MAIN_GPA, MAIN_SIZE / PAGE);
  return r;
}

function drainFaults(r: Rig): FaultRecord[] {
  const out: FaultRecord[] = [];
  r.faults.drain((rec) => out.push({ ...rec }));
  return out;
}

function expectPacket(received: ReturnType<NetDriver['receive']>, frame: Uint8Array): void {
  expect(received.kind).toBe('packet');
  if (received.kind !== 'packet') return;
  expect(received.numBuffers).toBe(1);
  expect(received.frame).toEqual(frame);
}

describe('virtio-net in one thread, every address an IOVA', () => {
  it('lays out its header and config as virtio 1.2 §5.1 and the Linux uapi header do', () => {
    // The guest driver keeps its own copy of the constants; both must agree.
    expect(NetHeader.SIZE).toBe(VIRTIO_NET.HDR_SIZE);
    expect(NetHeader.numBuffers.offset).toBe(VIRTIO_NET.HDR_NUM_BUFFERS);
    expect(NetHeader.gsoType.offset).toBe(VIRTIO_NET.HDR_GSO_TYPE);
    expect(NetConfig.mac.offset).toBe(VIRTIO_NET.CONFIG_MAC);
    expect(NetConfig.status.offset).toBe(VIRTIO_NET.CONFIG_STATUS);
    expect(featureMask(NetFeatureBit.MAC)).toBe(VIRTIO_NET.F_MAC);
    expect(featureMask(NetFeatureBit.STATUS)).toBe(VIRTIO_NET.F_STATUS);
    expect(NetQueue).toEqual({ RX: VIRTIO_NET.RX, TX: VIRTIO_NET.TX });
    expect(DeviceType.NET).toBe(VIRTIO_NET.DEVICE_ID);
  });

  it.each(['mmio', 'pci'] as const)('over %s: negotiates ACCESS_PLATFORM and loops frames back byte-identical', (kind) => {
    const r = rig(kind);
    const net = r.open();
    expect(r.transport.deviceType).toBe(DeviceType.NET);
    expect(net.accessPlatform).toBe(true);
    expect([...(net.mac() ?? [])]).toEqual([...DEFAULT_MAC]);
    expect(net.linkUp()).toBe(true);
    // The rings really are at IOVAs that are not guest RAM.
    const rings = net.device.queue(VIRTIO_NET.TX).descAddr;
    expect(rings).toBeGreaterThanOrEqual(MAIN_IOVA);
    expect(r.memory.contains(rings, 16)).toBe(false);

    net.postReceiveBuffers(16);
    const sent: Uint8Array[] = [];
    for (let i = 0; i < 40; i++) {
      const frame = frameOf(14 + ((i * 97) % (MAX_FRAME_SIZE - 13)), i);
      sent.push(frame);
      net.send(frame, { pieces: 1 + (i % 4) });
      expectPacket(net.receive(), frame);
      net.postReceiveBuffers(1, VIRTIO_NET.RX_BUFFER_SIZE, 1 + (i % 3));
      net.reclaimTransmitted();
    }
    expect(r.device.stats()).toMatchObject({ txPackets: 40, rxPackets: 40, txFaults: 0, rxFaults: 0, dropsNoRxBuffer: 0 });
    expect(r.device.stats().rxBytes).toBe(sent.reduce((n, f) => n + f.length, 0));
    expect(drainFaults(r)).toEqual([]);
    expect(r.transport.getStatus() & STATUS.DEVICE_NEEDS_RESET).toBe(0);
  });

  it('holds frames sent before any receive buffer and delivers them in order when buffers arrive', () => {
    const r = rig('mmio', { rxBacklog: 3 });
    const net = r.open();
    const frames = [0, 1, 2, 3, 4].map((i) => frameOf(60 + i, i));
    for (const f of frames) net.send(f);
    // Three wait, the other two found the backlog full.
    expect(r.device.stats()).toMatchObject({ backlog: 3, dropsNoRxBuffer: 2 });
    net.postReceiveBuffers(3);
    for (const f of frames.slice(0, 3)) expectPacket(net.receive(), f);
    expect(r.device.stats().backlog).toBe(0);
  });

  it('keeps a receive buffer too small for a frame for the next one and drops the frame', () => {
    const r = rig();
    const net = r.open();
    net.postReceiveBuffers(1, VIRTIO_NET.HDR_SIZE + 100);
    net.send(frameOf(200, 1));
    expect(net.poll()).toBeUndefined();
    expect(r.device.stats().dropsRxTooSmall).toBe(1);
    const small = frameOf(100, 2);
    net.send(small);
    expectPacket(net.receive(), small);
  });

  it('drops transmit chains that are not one header and one Ethernet frame, and returns them', () => {
    const r = rig();
    const net = r.open();
    net.postReceiveBuffers(4);
    net.send(new Uint8Array(5)); // shorter than an Ethernet header
    net.send(frameOf(MAX_FRAME_SIZE + 1, 3)); // longer than any frame without GSO
    const gso = r.allocator.alloc(VIRTIO_NET.HDR_SIZE + 64);
    const packet = new Uint8Array(VIRTIO_NET.HDR_SIZE + 64);
    packet[VIRTIO_NET.HDR_GSO_TYPE] = 1; // VIRTIO_NET_HDR_GSO_TCPV4, never negotiated
    r.view.write(gso, packet);
    net.device.submit(VIRTIO_NET.TX, { readable: [{ addr: gso, len: packet.length }], writable: [] });
    net.waitTransmitted(3);
    expect(net.poll()).toBeUndefined();
    expect(r.device.stats()).toMatchObject({ txMalformed: 3, txPackets: 0, rxPackets: 0 });
    const ok = frameOf(64, 4);
    net.send(ok);
    expectPacket(net.receive(), ok);
  });

  it('a receive buffer unmapped behind the driver faults: record in the fault queue, old GPA untouched, buffer back with len 0', () => {
    const r = rig();
    const net = r.open();
    r.map(SPARE_IOVA, SPARE_GPA, 1);
    r.memory.fill(SPARE_GPA, PAGE, POISON);
    net.postReceiveBufferAt(SPARE_IOVA, VIRTIO_NET.RX_BUFFER_SIZE);
    net.device.kick(VIRTIO_NET.RX);
    // The guest's IOMMU driver unmaps the page while the buffer is still posted.
    r.unmap(SPARE_IOVA, 1);

    net.send(frameOf(100, 7));
    const got = net.receive();
    expect(got).toEqual({ kind: 'error', len: 0, addr: SPARE_IOVA });
    expect(r.memory.view(SPARE_GPA, PAGE).every((b) => b === POISON)).toBe(true);
    const faults = drainFaults(r);
    expect(faults).toHaveLength(1);
    expect(faults[0]).toMatchObject({ device: r.row, access: FaultAccess.WRITE, reason: FaultReason.MAPPING });
    expect(faultIova(faults[0]!)).toBe(BigInt(SPARE_IOVA));
    expect(r.device.stats()).toMatchObject({ rxFaults: 1, rxPackets: 0, txPackets: 1 });
    // Not a device failure: the next frame goes through a mapped buffer.
    expect(r.transport.getStatus() & STATUS.DEVICE_NEEDS_RESET).toBe(0);
    net.postReceiveBuffers(1);
    const next = frameOf(80, 8);
    net.send(next);
    expectPacket(net.receive(), next);
  });

  it('a receive buffer whose second part is unmapped is not written at all', () => {
    const r = rig();
    const net = r.open();
    r.map(SPARE_IOVA, SPARE_GPA, 1);
    r.map(SPARE_IOVA + PAGE, SPARE_GPA + PAGE, 1);
    r.memory.fill(SPARE_GPA, 2 * PAGE, POISON);
    // Four 1 KiB descriptors: the first at the end of the first page, the others in the second.
    net.postReceiveBufferAt(SPARE_IOVA + PAGE - 1024, 4096, 4);
    net.device.kick(VIRTIO_NET.RX);
    r.unmap(SPARE_IOVA + PAGE, 1);
    net.send(frameOf(MAX_FRAME_SIZE, 9)); // header + frame reach into the second page
    expect(net.receive()).toMatchObject({ kind: 'error', len: 0 });
    expect(r.memory.view(SPARE_GPA, 2 * PAGE).every((b) => b === POISON)).toBe(true);
    const faults = drainFaults(r);
    expect(faults.map((f) => faultIova(f))).toEqual([BigInt(SPARE_IOVA + PAGE)]);
  });

  it('a transmit buffer unmapped before the kick faults on read: chain returned, nothing sent', () => {
    const r = rig();
    const net = r.open();
    net.postReceiveBuffers(2);
    r.map(SPARE_IOVA, SPARE_GPA, 1);
    net.send(frameOf(300, 5), { addr: SPARE_IOVA, kick: false });
    r.unmap(SPARE_IOVA, 1);
    net.device.kick(VIRTIO_NET.TX);
    net.waitTransmitted(1);
    expect(net.poll()).toBeUndefined();
    const faults = drainFaults(r);
    expect(faults).toHaveLength(1);
    expect(faults[0]).toMatchObject({ access: FaultAccess.READ, reason: FaultReason.MAPPING });
    expect(faultIova(faults[0]!)).toBe(BigInt(SPARE_IOVA));
    expect(r.device.stats()).toMatchObject({ txFaults: 1, txPackets: 0 });
    expect(r.transport.getStatus() & STATUS.DEVICE_NEEDS_RESET).toBe(0);
  });

  it('rings unmapped under a live device: DEVICE_NEEDS_RESET, never an exception, then a reset brings it back', () => {
    const r = rig();
    const net = r.open();
    net.postReceiveBuffers(2);
    const txRing = net.device.queue(VIRTIO_NET.TX);
    r.unmap(MAIN_IOVA, MAIN_SIZE / PAGE);
    // The driver still reaches its memory by GPA; the device only by IOVA.
    expect(() => net.send(frameOf(64, 1))).not.toThrow();
    const status = r.transport.getStatus();
    expect(status & STATUS.DEVICE_NEEDS_RESET).toBe(STATUS.DEVICE_NEEDS_RESET);
    expect(r.core.stats().lastNeedsResetReason).toMatch(/transmit queue/);
    // Config change interrupt pending (virtio 1.2 §2.1.2).
    expect(r.core.interruptStatus & 2).toBe(2);
    const faults = drainFaults(r);
    expect(faults.length).toBeGreaterThan(0);
    // The first access that faulted was the device reading avail.idx of the transmit queue.
    expect(faultIova(faults[0]!)).toBe(BigInt(txRing.driverAddr + 2));
    expect(faults[0]!.access).toBe(FaultAccess.READ);
    // More kicks change nothing and throw nothing.
    expect(() => r.transport.notify(VIRTIO_NET.TX)).not.toThrow();
    expect(() => r.transport.notify(VIRTIO_NET.RX)).not.toThrow();

    // The guest maps its memory again and resets the device: it works from scratch.
    r.ctx.ioasMap(r.ioas, { gpa: MAIN_GPA, length: BigInt(MAIN_SIZE), iova: BigInt(MAIN_IOVA), flags: RW });
    r.allocator = new GuestAllocator(MAIN_IOVA, MAIN_SIZE);
    const again = r.open();
    again.postReceiveBuffers(1);
    const frame = frameOf(99, 3);
    again.send(frame);
    expectPacket(again.receive(), frame);
  });

  it('refuses FEATURES_OK when the driver does not accept ACCESS_PLATFORM', () => {
    const r = rig();
    expect(() => initializeDevice(r.transport, { wantedFeatures: NET_DRIVER_FEATURES & ~ACCESS_PLATFORM })).toThrow(VirtioInitError);
    expect(r.transport.getStatus() & STATUS.FEATURES_OK).toBe(0);
    // A driver that accepts it is fine after a reset.
    expect(r.open().accessPlatform).toBe(true);
  });

  it('without an IOMMU: ACCESS_PLATFORM is not offered and addresses are guest-physical', () => {
    const memory = GuestMemory.create(MEMORY_SIZE);
    const dma = new PhysicalDmaSpace(memory);
    const device = new VirtioNetDevice({ dma, behindIommu: false });
    expect(device.offeredFeatures & ACCESS_PLATFORM).toBe(0n);
    const t = new MmioTransport(device, memory, { irq: { set: () => undefined }, queueMemory: queueMemoryFor(dma) });
    const net = NetDriver.open({
      transport: new MmioDriverTransport(t),
      memory: GuestDmaView.identity(memory),
      allocator: new GuestAllocator(MAIN_GPA, MAIN_SIZE),
    });
    expect(net.accessPlatform).toBe(false);
    net.postReceiveBuffers(2);
    const frame = frameOf(1000, 11);
    net.send(frame, { pieces: 3 });
    expectPacket(net.receive(), frame);
    // The receive buffer is where the driver put it, in guest-physical memory.
    expect(device.stats().rxPackets).toBe(1);
  });
});

describe('IovaQueueMemory', () => {
  it('translates every access, and a fault throws IovaFaultError after the translator recorded it', () => {
    const r = rig();
    const q = new IovaQueueMemory(r.dma);
    r.memory.writeU32(MAIN_GPA + 0x100, 0xdeadbeef);
    expect(q.readU32(MAIN_IOVA + 0x100)).toBe(0xdeadbeef);
    q.atomicStoreU16(MAIN_IOVA + 0x200, 0x1234);
    expect(r.memory.atomicLoadU16(MAIN_GPA + 0x200)).toBe(0x1234);
    expect(q.atomicLoadU16(MAIN_IOVA + 0x200)).toBe(0x1234);
    // Any IOVA is "contained": whether it is mapped is only known at the access.
    expect(q.contains(SPARE_IOVA, 16)).toBe(true);
    expect(q.contains(-1, 1)).toBe(false);
    expect(q.contains(Number.POSITIVE_INFINITY, 1)).toBe(false);
    expect(() => q.readU16(SPARE_IOVA)).toThrow(IovaFaultError);
    expect(() => q.atomicStoreU16(SPARE_IOVA, 1)).toThrow(IovaFaultError);
    // A misaligned ring index is refused before any translation.
    expect(() => q.atomicLoadU16(MAIN_IOVA + 1)).toThrow(IovaFaultError);
    const faults = drainFaults(r);
    expect(faults.map((f) => [faultIova(f), f.access])).toEqual([
      [BigInt(SPARE_IOVA), FaultAccess.READ],
      [BigInt(SPARE_IOVA), FaultAccess.WRITE],
    ]);
  });
});

// ---- property ------------------------------------------------------------------------------------

/**
 * The buffer arena of the property: IOVA pages randomly mapped or left as holes, each mapped one
 * on a GPA page of a permutation, so a device that used an IOVA as a GPA, or the wrong page, writes
 * somewhere the check sees. Transmit buffers live in the first half, receive buffers in the second
 * (so a delivery cannot change a frame not yet read).
 */
const ARENA_IOVA = 0xa000_0000;
const ARENA_PAGES = 24;
const HALF = (ARENA_PAGES / 2) * PAGE;
const ARENA_GPA = 0xa0_0000;
const arenaGpa = (iova: number): number => {
  const off = iova - ARENA_IOVA;
  return ARENA_GPA + ((Math.floor(off / PAGE) * 7) % ARENA_PAGES) * PAGE + (off % PAGE);
};

const segmentArb = fc.record({ offset: fc.integer({ min: 0, max: HALF - 1 }), len: fc.integer({ min: 1, max: 2000 }) });
const txArb = fc.record({
  segments: fc.array(segmentArb, { minLength: 1, maxLength: 4 }),
  /** Device-writable segments a transmit chain should not have: the device must not write them. */
  writable: fc.array(segmentArb, { maxLength: 2 }),
  gso: fc.constantFrom(0, 0, 0, 1, 0x80),
  seed: fc.integer({ min: 0, max: 255 }),
  indirect: fc.boolean(),
});
const rxArb = fc.record({
  segments: fc.array(segmentArb, { minLength: 1, maxLength: 4 }),
  readable: fc.array(segmentArb, { maxLength: 1 }),
  indirect: fc.boolean(),
});

interface Seg {
  addr: number;
  len: number;
}

describe('virtio-net property: hostile chains and IOVA holes', () => {
  it('never throws, never needs a reset for a buffer fault, and writes only inside mapped receive buffers', () => {
    fc.assert(
      fc.property(
        fc.array(fc.boolean(), { minLength: ARENA_PAGES, maxLength: ARENA_PAGES }),
        fc.array(txArb, { maxLength: 8 }),
        fc.array(rxArb, { maxLength: 8 }),
        fc.boolean(),
        (mapped, txs, rxs, rxFirst) => {
          const r = rig();
          const net = r.open();
          const isMapped = (iova: number): boolean => mapped[Math.floor((iova - ARENA_IOVA) / PAGE)] === true;
          mapped.forEach((m, i) => {
            const iova = ARENA_IOVA + i * PAGE;
            if (m) r.ctx.ioasMap(r.ioas, { gpa: arenaGpa(iova), length: BigInt(PAGE), iova: BigInt(iova), flags: RW });
          });
          r.memory.fill(ARENA_GPA, ARENA_PAGES * PAGE, POISON);
          const inHalf = (base: number, s: { offset: number; len: number }): Seg => ({ addr: base + s.offset, len: Math.min(s.len, HALF - s.offset) });

          // Transmit chains; the driver writes their bytes by GPA whether the IOMMU maps them or not.
          const sent: Uint8Array[] = [];
          for (const tx of txs) {
            const readable = tx.segments.map((s) => inHalf(ARENA_IOVA, s));
            let at = 0;
            for (const seg of readable) {
              for (let k = 0; k < seg.len; k++, at++) r.memory.writeU8(arenaGpa(seg.addr + k), at === 1 ? tx.gso : (tx.seed + at) & 0xff);
            }
            // Later chains may overwrite earlier ones' bytes: what is sent is read back below.
            const writable = tx.writable.map((s) => inHalf(ARENA_IOVA, s));
            net.device.submit(VIRTIO_NET.TX, { readable, writable }, { indirect: tx.indirect, kick: false });
          }
          const txQueue = net.device.queue(VIRTIO_NET.TX);
          const rxQueue = net.device.queue(VIRTIO_NET.RX);

          const rxChains: Seg[][] = [];
          const cover = new Uint8Array(ARENA_PAGES * PAGE);
          for (const rx of rxs) {
            const writable = rx.segments.map((s) => inHalf(ARENA_IOVA + HALF, s));
            const readable = rx.readable.map((s) => inHalf(ARENA_IOVA + HALF, s));
            net.device.submit(VIRTIO_NET.RX, { readable, writable }, { indirect: rx.indirect, kick: false, token: rxChains.length });
            rxChains.push(writable);
            for (const seg of writable) for (let k = 0; k < seg.len; k++) cover[seg.addr + k - ARENA_IOVA]!++;
          }
          // Frames as the device will read them: only chains whose every byte is mapped, with
          // gso_type NONE and an Ethernet-sized frame, are sent.
          for (let slot = 0; slot < txs.length; slot++) {
            const segs = txs[slot]!.segments.map((s) => inHalf(ARENA_IOVA, s));
            const bytes: number[] = [];
            let reachable = true;
            for (const seg of segs) {
              for (let k = 0; k < seg.len; k++) {
                if (!isMapped(seg.addr + k)) reachable = false;
                bytes.push(r.memory.readU8(arenaGpa(seg.addr + k)));
              }
            }
            const frameLength = bytes.length - VIRTIO_NET.HDR_SIZE;
            if (reachable && bytes[1] === 0 && frameLength >= 14 && frameLength <= MAX_FRAME_SIZE) {
              sent.push(Uint8Array.from(bytes.slice(VIRTIO_NET.HDR_SIZE)));
            }
          }

          txQueue.publish();
          rxQueue.publish();
          const before = r.memory.view(0, MEMORY_SIZE).slice();
          for (const q of rxFirst ? [VIRTIO_NET.RX, VIRTIO_NET.TX] : [VIRTIO_NET.TX, VIRTIO_NET.RX]) {
            expect(() => r.transport.notify(q)).not.toThrow();
          }
          expect(r.transport.getStatus() & STATUS.DEVICE_NEEDS_RESET).toBe(0);

          // Every changed byte lies in a used ring or in a mapped byte of a receive buffer.
          const after = r.memory.view(0, MEMORY_SIZE);
          const usedRings = [txQueue, rxQueue].map((q) => {
            const gpa = r.view.gpaOf(q.deviceAddr);
            return [gpa, gpa + 6 + 8 * q.size] as const;
          });
          const allowedGpa = (gpa: number): boolean => {
            if (usedRings.some(([a, b]) => gpa >= a && gpa < b)) return true;
            for (let i = ARENA_PAGES / 2; i < ARENA_PAGES; i++) {
              const iova = ARENA_IOVA + i * PAGE;
              const page = arenaGpa(iova);
              if (gpa >= page && gpa < page + PAGE) return mapped[i] === true && cover[iova - ARENA_IOVA + (gpa - page)]! > 0;
            }
            return false;
          };
          const w0 = new Uint32Array(before.buffer);
          const w1 = new Uint32Array(after.buffer, after.byteOffset, MEMORY_SIZE / 4);
          for (let w = 0; w < w0.length; w++) {
            if (w0[w] === w1[w]) continue;
            for (let gpa = w * 4; gpa < w * 4 + 4; gpa++) {
              if (before[gpa] !== after[gpa] && !allowedGpa(gpa)) expect.fail(`device wrote GPA 0x${gpa.toString(16)} outside mapped receive buffers`);
            }
          }

          // What arrived is what was sent, in order, some frames possibly lost; a receive buffer
          // shared with another one may have been overwritten, so only exclusive ones are read.
          let next = 0;
          for (let used = rxQueue.popUsed(); used !== undefined; used = rxQueue.popUsed()) {
            const chain = rxChains[used.token as number]!;
            const exclusive = chain.every((seg) => {
              for (let k = 0; k < seg.len; k++) if (cover[seg.addr + k - ARENA_IOVA] !== 1) return false;
              return true;
            });
            if (used.len === 0) {
              // Returned unwritten (a fault, or no room for any frame): not one byte of it changed.
              if (exclusive) {
                for (const seg of chain) for (let k = 0; k < seg.len; k++) expect(after[arenaGpa(seg.addr + k)]).toBe(before[arenaGpa(seg.addr + k)]);
              }
              continue;
            }
            expect(used.len).toBeGreaterThanOrEqual(VIRTIO_NET.HDR_SIZE + 14);
            let got: Uint8Array | undefined;
            if (exclusive) {
              const bytes: number[] = [];
              for (const seg of chain) for (let k = 0; k < seg.len && bytes.length < used.len; k++) bytes.push(r.memory.readU8(arenaGpa(seg.addr + k)));
              got = Uint8Array.from(bytes);
              const header = new Uint8Array(VIRTIO_NET.HDR_SIZE);
              header[VIRTIO_NET.HDR_NUM_BUFFERS] = 1;
              expect(got.subarray(0, VIRTIO_NET.HDR_SIZE)).toEqual(header);
            }
            const matches = (frame: Uint8Array): boolean =>
              frame.length === used!.len - VIRTIO_NET.HDR_SIZE && (got === undefined || frame.every((b, i) => b === got![VIRTIO_NET.HDR_SIZE + i]));
            while (next < sent.length && !matches(sent[next]!)) next++;
            expect(next, 'a received frame that was never sent, or out of order').toBeLessThan(sent.length);
            next++;
          }
          const stats = r.device.stats();
          expect(stats.txPackets).toBe(sent.length);
          // Each frame sent was received, dropped, lost to a fault, or still waits.
          expect(stats.rxPackets + stats.dropsNoRxBuffer + stats.dropsRxTooSmall + stats.rxFaults + stats.backlog).toBe(stats.txPackets);
        },
      ),
      fuzzParams(20240611, 60),
    );
  });
});
