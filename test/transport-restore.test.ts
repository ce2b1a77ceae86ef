import { describe, expect, it } from 'vitest';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { GuestDevice } from '../guest-fixtures/driver/guest-device.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import { LoopbackDevice } from '../src/devices/loopback.js';
import { GuestMemory } from '../src/memory/index.js';
import type { AccessSize, MmioBus, PciBus } from '../src/virtio/bus.js';
import { DeviceStatus, FeatureBit, featureMask } from '../src/virtio/constants.js';
import { MmioTransport } from '../src/virtio/mmio.js';
import { PciTransport } from '../src/virtio/pci.js';

// A transport resumes from another's snapshot over the same guest memory, as a device does after a
// migration: the driver never notices, a request in flight at the snapshot is served once, and the
// rings keep wrapping from where they were.

const FEATURES = featureMask(FeatureBit.VERSION_1) | featureMask(FeatureBit.EVENT_IDX);
const irq = { set: () => undefined };

function echo(dev: GuestDevice, memory: GuestMemory, allocator: GuestAllocator, message: string, kick = true): { src: number; dst: number; head: number } {
  const bytes = new TextEncoder().encode(message);
  const src = allocator.alloc(64, 8);
  const dst = allocator.alloc(64, 8);
  memory.write(src, bytes);
  const head = dev.submit(0, { readable: [{ addr: src, len: bytes.length }], writable: [{ addr: dst, len: 64 }] }, { kick });
  return { src, dst, head };
}

function collect(dev: GuestDevice, memory: GuestMemory, allocator: GuestAllocator, sent: { src: number; dst: number }): string {
  const used = dev.waitUsed(0, 2000);
  const text = new TextDecoder().decode(memory.view(sent.dst, used.len));
  allocator.free(sent.src);
  allocator.free(sent.dst);
  return text;
}

describe.each(['mmio', 'pci'] as const)('virtio-%s transport restore', (kind) => {
  it('resumes from a snapshot: the request in flight is served once, and the rings keep wrapping', () => {
    const memory = GuestMemory.create(4 << 20);
    const allocator = new GuestAllocator(0x10000, 2 << 20);
    const make = () =>
      kind === 'mmio' ? new MmioTransport(new LoopbackDevice({ queueSize: 16 }), memory, { irq }) : new PciTransport(new LoopbackDevice({ queueSize: 16 }), memory, { irq });
    let current: MmioTransport | PciTransport = make();
    // The guest's view of the bus stays; what answers behind it changes at the switch-over.
    const mmioBus: MmioBus = {
      read: (o: number, s: AccessSize) => (current as MmioTransport).read(o, s),
      write: (o: number, s: AccessSize, v: number) => (current as MmioTransport).write(o, s, v),
    };
    const pciBus: PciBus = {
      configRead: (o, s) => (current as PciTransport).configRead(o, s),
      configWrite: (o, s, v) => (current as PciTransport).configWrite(o, s, v),
      barRead: (b, o, s) => (current as PciTransport).barRead(b, o, s),
      barWrite: (b, o, s, v) => (current as PciTransport).barWrite(b, o, s, v),
    };
    const transport = kind === 'mmio' ? new MmioDriverTransport(mmioBus) : new PciDriverTransport(pciBus, { bar0Address: 0xe000_0000 });
    const dev = GuestDevice.open({ transport, memory, allocator, wantedFeatures: FEATURES, queueSize: 16 });
    for (let i = 0; i < 5; i++) expect(collect(dev, memory, allocator, echo(dev, memory, allocator, `before ${i}`))).toBe(`before ${i}`);

    // Published but not yet notified: in flight at the snapshot.
    const inFlight = echo(dev, memory, allocator, 'in flight', false);
    const snapshot = current.snapshot();
    const next = make();
    if (kind === 'mmio') (next as MmioTransport).restore(snapshot as ReturnType<MmioTransport['snapshot']>);
    else (next as PciTransport).restore(snapshot as ReturnType<PciTransport['snapshot']>);
    current = next;
    expect(next.stats().status & DeviceStatus.DRIVER_OK).toBe(DeviceStatus.DRIVER_OK);
    const saved = snapshot.queuePositions[0]!;
    expect(saved).toEqual({ nextAvail: 5, nextUsed: 5 });
    expect(next.snapshot().queuePositions[0]).toEqual(saved);

    dev.kick(0);
    expect(collect(dev, memory, allocator, inFlight)).toBe('in flight');
    // Served once: the five answered before the snapshot are not walked again.
    expect(next.snapshot().queuePositions[0]).toEqual({ nextAvail: 6, nextUsed: 6 });
    expect(dev.queue(0).pendingUsed()).toBe(0);
    // Past the 16-entry ring several times.
    for (let i = 0; i < 40; i++) expect(collect(dev, memory, allocator, echo(dev, memory, allocator, `after ${i}`))).toBe(`after ${i}`);
    expect(dev.queue(0).pendingUsed()).toBe(0);
  });

  it('refuses a snapshot that does not fit, and changes nothing', () => {
    const memory = GuestMemory.create(1 << 20);
    const a = kind === 'mmio' ? new MmioTransport(new LoopbackDevice(), memory, { irq }) : new PciTransport(new LoopbackDevice(), memory, { irq });
    const snap = a.snapshot();
    const bad = { ...snap, state: { ...snap.state, queues: [...snap.state.queues, snap.state.queues[0]!] }, queuePositions: [...snap.queuePositions, null] };
    const b = kind === 'mmio' ? new MmioTransport(new LoopbackDevice(), memory, { irq }) : new PciTransport(new LoopbackDevice(), memory, { irq });
    const before = JSON.stringify(b.snapshot(), (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));
    expect(() => (b as MmioTransport).restore(bad as ReturnType<MmioTransport['snapshot']>)).toThrow(RangeError);
    expect(JSON.stringify(b.snapshot(), (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))).toBe(before);
  });
});
