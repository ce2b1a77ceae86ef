import { afterEach, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { GuestDevice, GuestDeviceError } from '../guest-fixtures/driver/guest-device.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import type { DriverTransport } from '../guest-fixtures/driver/transport.js';
import { setAvailIdx, writeAvailEntry } from '../guest-fixtures/driver/virtqueue.js';
import { LOOPBACK_DEVICE_TYPE, LoopbackConfig } from '../src/devices/loopback.js';
import { GuestMemory } from '../src/memory/index.js';
import type { TransportKind } from '../src/runtime/device-worker-protocol.js';
import type { MmioBus, PciBus } from '../src/virtio/bus.js';
import { DeviceStatus, FeatureBit, featureMask } from '../src/virtio/constants.js';
import { DeviceHandle } from '../src/vmm/device-handle.js';
import { fuzzParams } from './support/fuzz.js';

const VERSION_1 = featureMask(FeatureBit.VERSION_1);
const EVENT_IDX = featureMask(FeatureBit.EVENT_IDX);
const INDIRECT = featureMask(FeatureBit.INDIRECT_DESC);
const ALL = VERSION_1 | EVENT_IDX | INDIRECT;

const handles: DeviceHandle[] = [];
afterEach(async () => {
  await Promise.all(handles.splice(0).map((h) => h.close()));
});

interface Machine {
  memory: GuestMemory;
  allocator: GuestAllocator;
  handle: DeviceHandle;
  transport: DriverTransport;
}

async function machine(kind: TransportKind): Promise<Machine> {
  const memory = GuestMemory.create(4 << 20);
  const handle = await DeviceHandle.spawn({ name: `loopback-${kind}`, model: { kind: 'loopback' }, transport: kind, memory, queues: 1 });
  handles.push(handle);
  const transport =
    kind === 'mmio'
      ? new MmioDriverTransport(handle.bus as MmioBus)
      : new PciDriverTransport(handle.bus as PciBus, { bar0Address: 0xe000_0000 });
  return { memory, allocator: new GuestAllocator(0x1000, (4 << 20) - 0x1000), handle, transport };
}

function open(m: Machine, wantedFeatures = ALL, queueSize = 64): GuestDevice {
  return GuestDevice.open({
    transport: m.transport,
    memory: m.memory,
    allocator: m.allocator,
    wantedFeatures,
    interrupts: m.handle.interrupts,
    queueSize,
  });
}

/** Sends `payload` through the loopback and returns what came back. */
function echo(m: Machine, dev: GuestDevice, payload: Uint8Array, indirect: boolean, pieces = 1): Uint8Array {
  const src = m.allocator.alloc(Math.max(payload.length, 1), 8);
  const dst = m.allocator.alloc(Math.max(payload.length, 1), 8);
  m.memory.write(src, payload);
  m.memory.fill(dst, payload.length, 0);
  const cut = Math.max(1, Math.ceil(payload.length / pieces));
  const readable = [];
  const writable = [];
  for (let at = 0; at < payload.length; at += cut) {
    const len = Math.min(cut, payload.length - at);
    readable.push({ addr: src + at, len });
    writable.push({ addr: dst + at, len });
  }
  dev.submit(0, { readable, writable }, { indirect });
  const used = dev.waitUsed(0);
  const out = m.memory.view(dst, used.len).slice();
  m.allocator.free(src);
  m.allocator.free(dst);
  return out;
}

describe.each(['mmio', 'pci'] as const)('loopback device in a worker over virtio-%s', (kind) => {
  it('is discovered, negotiates, and echoes direct and indirect chains', async () => {
    const m = await machine(kind);
    expect(m.transport.deviceType).toBe(LOOPBACK_DEVICE_TYPE);
    const dev = open(m);
    expect(dev.negotiated).toBe(ALL);
    const params = fuzzParams(kind === 'mmio' ? 1 : 2, 60);
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 3000 }), fc.boolean(), fc.integer({ min: 1, max: 5 }), (payload, indirect, pieces) => {
        expect(echo(m, dev, payload, indirect, pieces)).toEqual(payload);
      }),
      params,
    );
    const stats = await m.handle.control.stats();
    expect(stats.doorbells).toBeGreaterThan(0);
    expect(m.transport.configRead(LoopbackConfig.served.offset, 4)).toBe(params.numRuns);
  });

  it('carries config writes across threads', async () => {
    const m = await machine(kind);
    open(m);
    m.transport.configWrite(LoopbackConfig.scratch.offset, 4, 0xfeedf00d);
    expect(m.transport.configRead(LoopbackConfig.scratch.offset, 4)).toBe(0xfeedf00d);
    m.transport.configWrite(LoopbackConfig.served.offset, 4, 7);
    expect(m.transport.configRead(LoopbackConfig.served.offset, 4)).toBe(0);
  });

  it('with EVENT_IDX, kicks once per batch and raises no interrupt the driver suppressed', async () => {
    const m = await machine(kind);
    const dev = open(m);
    const q = dev.queue(0);
    const buf = m.allocator.alloc(64, 8);
    const before = await m.handle.control.stats();
    // The driver asks for no interrupts: used_event is parked far from the used index.
    q.suppressInterrupts(true);
    const batch = 32;
    for (let i = 0; i < batch; i++) dev.submit(0, { readable: [{ addr: buf, len: 8 }], writable: [{ addr: buf + 8, len: 8 }] }, { kick: false });
    expect(dev.kick(0)).toBe(true);
    // Let the device finish its pass (and its notification decision) before taking used entries:
    // popping moves used_event, and a decision racing with that may legitimately notify late.
    let after = await m.handle.control.stats();
    for (let i = 0; i < 500 && (after.transport as { suppressedUsedNotifications: number }).suppressedUsedNotifications === 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 2));
      after = await m.handle.control.stats();
    }
    expect(q.pendingUsed()).toBe(batch);
    let got = 0;
    while (q.popUsed() !== undefined) got++;
    expect(got).toBe(batch);
    expect(after.doorbells - before.doorbells).toBe(1);
    const transport = after.transport as { interrupts: number; suppressedUsedNotifications: number };
    expect(transport.interrupts).toBe((before.transport as { interrupts: number }).interrupts);
    expect(transport.suppressedUsedNotifications).toBeGreaterThan(0);
    // Asking again brings interrupts back.
    q.suppressInterrupts(false);
    expect(echo(m, dev, Uint8Array.from([1, 2, 3]), false)).toEqual(Uint8Array.from([1, 2, 3]));
  });

  it('survives a reset in the middle of traffic and serves again after re-initialisation', async () => {
    const m = await machine(kind);
    let dev = open(m);
    const buf = m.allocator.alloc(4096, 8);
    for (let i = 0; i < 30; i++) dev.submit(0, { readable: [{ addr: buf, len: 2048 }], writable: [{ addr: buf + 2048, len: 2048 }] });
    // The guest resets the device while chains are in flight (virtio 1.2 §2.4).
    m.transport.reset();
    expect(m.transport.getStatus()).toBe(0);
    await m.handle.control.reset();
    dev = open(m);
    expect(echo(m, dev, Uint8Array.from([9, 8, 7]), true)).toEqual(Uint8Array.from([9, 8, 7]));
    const stats = await m.handle.control.stats();
    expect((stats.transport as { resets: number }).resets).toBeGreaterThanOrEqual(2);
  });

  it('a malformed ring puts the device into DEVICE_NEEDS_RESET without killing the worker', async () => {
    const m = await machine(kind);
    const dev = open(m, ALL, 16);
    const q = dev.queue(0);
    // A head index beyond the queue size (virtio 1.2 §2.7.13: the driver MUST NOT do this).
    writeAvailEntry(m.memory, q.driverAddr, q.size, 0, 1000);
    setAvailIdx(m.memory, q.driverAddr, 1);
    m.transport.notify(0);
    expect(() => dev.waitUsed(0, 2000)).toThrow(GuestDeviceError);
    expect(m.transport.getStatus() & DeviceStatus.DEVICE_NEEDS_RESET).toBe(DeviceStatus.DEVICE_NEEDS_RESET);
    // The worker is alive: the driver resets and uses the device again.
    const again = open(m);
    expect(echo(m, again, Uint8Array.from([4, 2]), false)).toEqual(Uint8Array.from([4, 2]));
  });
});

it('refuses a driver that does not accept VERSION_1', async () => {
  const m = await machine('mmio');
  expect(() => open(m, EVENT_IDX)).toThrow(/FEATURES_OK/);
});

describe('hostile register traffic across threads', () => {
  it.each(['mmio', 'pci'] as const)('random %s accesses never take the device worker down', async (kind) => {
    const m = await machine(kind);
    const bus = m.handle.bus;
    const access = fc.record({
      write: fc.boolean(),
      offset: fc.oneof(fc.integer({ min: 0, max: 0x140 }), fc.integer({ min: 0, max: 0x4000 }), fc.constantFrom(-4, 2 ** 31, 0x50, 0x70)),
      size: fc.constantFrom(1, 2, 4, 8, 3 as never),
      value: fc.oneof(fc.nat(), fc.constantFrom(0xffffffff, 0x0f, 0x80, 1)),
      space: fc.constantFrom('config', 'bar0', 'bar1', 'bar9'),
    });
    fc.assert(
      fc.property(fc.array(access, { maxLength: 40 }), (ops) => {
        for (const op of ops) {
          if (kind === 'mmio') {
            const mmio = bus as MmioBus;
            if (op.write) mmio.write(op.offset, op.size, op.value);
            else mmio.read(op.offset, op.size);
          } else {
            const pci = bus as PciBus;
            const size = (op.size === 8 ? 4 : op.size) as 1 | 2 | 4;
            const bar = op.space === 'bar0' ? 0 : op.space === 'bar1' ? 1 : 9;
            if (op.space === 'config') {
              if (op.write) pci.configWrite(op.offset, size, op.value);
              else pci.configRead(op.offset, size);
            } else if (op.write) pci.barWrite(bar, op.offset, op.size, op.value);
            else pci.barRead(bar, op.offset, op.size);
          }
        }
      }),
      fuzzParams(7, 25),
    );
    expect(m.handle.failure).toBeUndefined();
    const stats = await m.handle.control.stats();
    // DRIVER_OK is never shown without FEATURES_OK having been accepted first.
    if (stats.status & DeviceStatus.DRIVER_OK) expect(stats.status & DeviceStatus.FEATURES_OK).toBe(DeviceStatus.FEATURES_OK);
    // The worker still serves a well-behaved driver afterwards.
    const dev = open(m);
    expect(echo(m, dev, Uint8Array.from([1, 2, 3, 4]), false)).toEqual(Uint8Array.from([1, 2, 3, 4]));
  });
});
