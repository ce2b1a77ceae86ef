import { describe, it, expect } from 'vitest';
import { GuestMemory } from '../src/memory/index.js';
import { DeviceStatus, FeatureBit, featureMask } from '../src/virtio/constants.js';
import { InterruptCause } from '../src/virtio/device.js';
import { MMIO_QUEUE_NOTIFY_OFFSET, MmioRegister, MmioTransport, mmioRegionSize } from '../src/virtio/mmio.js';
import { TransportFeatureBit } from '../src/virtio/transport.js';
import { MmioDriverTransport, MmioProbeError, VIRTIO_MMIO } from '../guest-fixtures/driver/mmio.js';
import { readConfigU64 } from '../guest-fixtures/driver/transport.js';
import { F_VERSION_1, STATUS, VirtioInitError, driverOk, initializeDevice, setupQueue } from '../guest-fixtures/driver/virtio-driver.js';
import { ECHO_DEVICE_TYPE, ECHO_F_SHOUT, EchoConfig, EchoDevice, RecordingIrq, TestRing, text, untext } from './transport-fixtures.js';

const ALL_WANTED = F_VERSION_1 | featureMask(FeatureBit.EVENT_IDX) | featureMask(TransportFeatureBit.RING_RESET) | featureMask(ECHO_F_SHOUT);
const RING_BASE = 0x10000;

function setup(device = new EchoDevice()) {
  const memory = GuestMemory.create(1 << 20);
  const irq = new RecordingIrq();
  const transport = new MmioTransport(device, memory, { irq });
  const driver = new MmioDriverTransport(transport);
  return { memory, irq, transport, driver, device };
}

/** Initializes, sets up queue 0 with a TestRing, and goes live. */
function live(wanted = ALL_WANTED, device = new EchoDevice()) {
  const s = setup(device);
  const { negotiated } = initializeDevice(s.driver, { wantedFeatures: wanted });
  const ring = new TestRing(s.memory, RING_BASE, 8);
  setupQueue(s.driver, 0, ring);
  driverOk(s.driver);
  return { ...s, ring, negotiated };
}

describe('virtio-mmio registers', () => {
  it('identifies itself as a version 2 virtio-mmio device', () => {
    const { transport, driver } = setup();
    expect(transport.read(0x000, 4)).toBe(0x74726976);
    expect(transport.read(0x004, 4)).toBe(2);
    expect(transport.read(0x008, 4)).toBe(ECHO_DEVICE_TYPE);
    expect(transport.read(0x00c, 4)).toBe(0x1af4);
    expect(driver.deviceType).toBe(ECHO_DEVICE_TYPE);
    expect(MMIO_QUEUE_NOTIFY_OFFSET).toBe(0x50);
    expect(mmioRegionSize(16)).toBe(0x200);
  });

  it('has the register table of virtio 1.2 §4.2.2', () => {
    // The guest fixture carries its own copy of the offsets; both must agree with the spec.
    const pairs: [number, number][] = [
      [MmioRegister.deviceFeaturesSel.offset, VIRTIO_MMIO.DEVICE_FEATURES_SEL],
      [MmioRegister.queueReady.offset, 0x44],
      [MmioRegister.interruptAck.offset, 0x64],
      [MmioRegister.queueDeviceHigh.offset, 0xa4],
      [MmioRegister.shmBaseHigh.offset, 0xbc],
      [MmioRegister.queueReset.offset, 0xc0],
      [MmioRegister.configGeneration.offset, 0xfc],
      [MmioRegister.config.offset, VIRTIO_MMIO.CONFIG],
    ];
    for (const [device, spec] of pairs) expect(device).toBe(spec);
  });

  it('reads shared memory length and base as all-ones: no regions', () => {
    const { transport } = setup();
    transport.write(VIRTIO_MMIO.SHM_SEL, 4, 0);
    for (const off of [VIRTIO_MMIO.SHM_LEN_LOW, VIRTIO_MMIO.SHM_LEN_HIGH, VIRTIO_MMIO.SHM_BASE_LOW, VIRTIO_MMIO.SHM_BASE_HIGH]) {
      expect(transport.read(off, 4)).toBe(0xffffffff);
    }
  });

  it('accepts only 32-bit aligned register accesses', () => {
    const { transport } = setup();
    expect(transport.read(0x000, 2)).toBe(0);
    expect(transport.read(0x001, 4)).toBe(0);
    expect(transport.read(0x000, 8)).toBe(0);
    transport.write(VIRTIO_MMIO.STATUS, 1, STATUS.ACKNOWLEDGE);
    expect(transport.read(VIRTIO_MMIO.STATUS, 4)).toBe(0);
    transport.write(VIRTIO_MMIO.STATUS, 4, STATUS.ACKNOWLEDGE);
    expect(transport.read(VIRTIO_MMIO.STATUS, 4)).toBe(STATUS.ACKNOWLEDGE);
  });

  it('reads write-only and undefined registers as 0 and drops writes to read-only ones', () => {
    const { transport } = setup();
    transport.write(VIRTIO_MMIO.QUEUE_SEL, 4, 0);
    expect(transport.read(VIRTIO_MMIO.QUEUE_SEL, 4)).toBe(0);
    expect(transport.read(VIRTIO_MMIO.QUEUE_NUM, 4)).toBe(0);
    expect(transport.read(0x0f0, 4)).toBe(0);
    transport.write(VIRTIO_MMIO.MAGIC_VALUE, 4, 0);
    transport.write(VIRTIO_MMIO.QUEUE_NUM_MAX, 4, 2);
    expect(transport.read(VIRTIO_MMIO.MAGIC_VALUE, 4)).toBe(0x74726976);
    expect(transport.read(VIRTIO_MMIO.QUEUE_NUM_MAX, 4)).toBe(16);
  });

  it('reports QueueNumMax 0 for queues that do not exist', () => {
    const { driver } = setup();
    expect(driver.queueMaxSize(0)).toBe(16);
    expect(driver.queueMaxSize(1)).toBe(0);
    expect(driver.queueMaxSize(2)).toBe(8);
    expect(driver.queueMaxSize(3)).toBe(0);
    expect(driver.queueMaxSize(0xffff_ffff)).toBe(0);
    expect(driver.numQueues()).toBe(1);
  });

  it('exposes device features in 32-bit windows and 0 past them', () => {
    const { transport, device } = setup();
    const word = (sel: number) => {
      transport.write(VIRTIO_MMIO.DEVICE_FEATURES_SEL, 4, sel);
      return transport.read(VIRTIO_MMIO.DEVICE_FEATURES, 4);
    };
    expect(word(0)).toBe(Number(device.offeredFeatures & 0xffffffffn));
    expect(word(1)).toBe(Number(device.offeredFeatures >> 32n));
    expect(word(2)).toBe(0);
    expect(word(0xffff_ffff)).toBe(0);
  });

  it('probing rejects a window that is not virtio-mmio', () => {
    const bus = { read: () => 0, write: () => undefined };
    expect(() => new MmioDriverTransport(bus)).toThrow(MmioProbeError);
  });
});

describe('virtio-mmio feature negotiation and status', () => {
  it('negotiates the common subset and latches it at FEATURES_OK', () => {
    const { driver, transport, device } = setup();
    const { negotiated, offered } = initializeDevice(driver, { wantedFeatures: ALL_WANTED | (1n << 5n) });
    expect(offered).toBe(device.offeredFeatures);
    expect(negotiated).toBe(ALL_WANTED);
    expect(driver.getStatus()).toBe(STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
    expect(transport.core.negotiated).toBe(ALL_WANTED);
    expect(device.calls.find((c) => c.method === 'validateFeatures')?.arg).toBe(ALL_WANTED);
    // virtio 1.2 §3.1.1: writes after FEATURES_OK change nothing.
    transport.write(VIRTIO_MMIO.DRIVER_FEATURES_SEL, 4, 0);
    transport.write(VIRTIO_MMIO.DRIVER_FEATURES, 4, 0);
    expect(transport.core.negotiated).toBe(ALL_WANTED);
    expect(device.count('activate')).toBe(0);
  });

  it('refuses FEATURES_OK for a feature the device did not offer', () => {
    const { driver, device } = setup();
    const attempt = () => initializeDevice(driver, { wantedFeatures: F_VERSION_1 | (1n << 5n), exact: true });
    expect(attempt).toThrow(VirtioInitError);
    expect(driver.getStatus() & STATUS.FEATURES_OK).toBe(0);
    expect(driver.getStatus() & STATUS.FAILED).toBe(STATUS.FAILED);
    expect(device.count('validateFeatures')).toBe(0);
  });

  it('refuses FEATURES_OK for bits written past the feature words it has', () => {
    const { transport, driver } = setup();
    driver.reset();
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    driver.writeDriverFeatures(F_VERSION_1);
    transport.write(VIRTIO_MMIO.DRIVER_FEATURES_SEL, 4, 7);
    transport.write(VIRTIO_MMIO.DRIVER_FEATURES, 4, 1);
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
    expect(driver.getStatus() & STATUS.FEATURES_OK).toBe(0);
  });

  it('refuses FEATURES_OK without VERSION_1', () => {
    const { driver } = setup();
    expect(() => initializeDevice(driver, { wantedFeatures: featureMask(FeatureBit.EVENT_IDX) })).toThrow(/FEATURES_OK not set/);
  });

  it('refuses FEATURES_OK when the model rejects the set', () => {
    const device = new EchoDevice();
    device.refuseFeatures = featureMask(ECHO_F_SHOUT);
    const { driver } = setup(device);
    expect(() => initializeDevice(driver, { wantedFeatures: ALL_WANTED })).toThrow(VirtioInitError);
    // The same driver without the refused bit succeeds after a reset.
    expect(initializeDevice(driver, { wantedFeatures: F_VERSION_1 }).negotiated).toBe(F_VERSION_1);
  });

  it('ignores attempts to clear status bits and to skip steps', () => {
    const { driver, device } = setup();
    driver.reset();
    driver.setStatus(STATUS.DRIVER); // DRIVER before ACKNOWLEDGE
    expect(driver.getStatus()).toBe(0);
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER_OK); // DRIVER_OK without DRIVER, FEATURES_OK
    expect(driver.getStatus()).toBe(STATUS.ACKNOWLEDGE);
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    driver.writeDriverFeatures(F_VERSION_1);
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK); // skips FEATURES_OK
    expect(driver.getStatus()).toBe(STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    driver.setStatus(STATUS.ACKNOWLEDGE); // clears DRIVER
    expect(driver.getStatus()).toBe(STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    expect(device.count('activate')).toBe(0);
  });

  it('accepts FAILED at any point and then refuses progress until reset', () => {
    const { driver } = setup();
    driver.reset();
    // A write that sets FAILED sets only FAILED: nothing progresses on a device the driver gave up.
    driver.setStatus(STATUS.DRIVER | STATUS.FAILED);
    expect(driver.getStatus()).toBe(STATUS.FAILED);
    driver.reset();
    driver.setStatus(STATUS.ACKNOWLEDGE);
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.FAILED);
    expect(driver.getStatus()).toBe(STATUS.ACKNOWLEDGE | STATUS.FAILED);
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.FAILED | STATUS.DRIVER);
    expect(driver.getStatus()).toBe(STATUS.ACKNOWLEDGE | STATUS.FAILED);
    driver.reset();
    expect(driver.getStatus()).toBe(0);
  });
});

describe('virtio-mmio queues', () => {
  function featuresOk() {
    const s = setup();
    initializeDevice(s.driver, { wantedFeatures: ALL_WANTED });
    return s;
  }

  it('refuses to enable a queue before FEATURES_OK', () => {
    const { driver, memory } = setup();
    driver.reset();
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    driver.setupQueue(0, new TestRing(memory, RING_BASE, 8));
    driver.enableQueue(0);
    expect(driver.queueEnabled(0)).toBe(false);
  });

  it('ignores queue sizes that are not powers of two or exceed the maximum', () => {
    const { transport } = featuresOk();
    transport.write(VIRTIO_MMIO.QUEUE_SEL, 4, 0);
    for (const bad of [0, 3, 12, 32, 0x8000_0000]) {
      transport.write(VIRTIO_MMIO.QUEUE_NUM, 4, bad);
      expect(transport.core.queue(0)?.size).toBe(16);
    }
    transport.write(VIRTIO_MMIO.QUEUE_NUM, 4, 4);
    expect(transport.core.queue(0)?.size).toBe(4);
  });

  it('refuses misaligned rings and rings outside guest memory', () => {
    const { transport, driver } = featuresOk();
    driver.setupQueue(0, { size: 8, desc: RING_BASE + 8, driver: RING_BASE + 0x1000, device: RING_BASE + 0x2000 });
    driver.enableQueue(0);
    expect(driver.queueEnabled(0)).toBe(false);
    driver.setupQueue(0, { size: 8, desc: RING_BASE, driver: RING_BASE + 0x1001, device: RING_BASE + 0x2000 });
    driver.enableQueue(0);
    expect(driver.queueEnabled(0)).toBe(false);
    driver.setupQueue(0, { size: 8, desc: (1 << 20) - 64, driver: RING_BASE + 0x1000, device: RING_BASE + 0x2000 });
    driver.enableQueue(0);
    expect(driver.queueEnabled(0)).toBe(false);
    driver.setupQueue(0, { size: 8, desc: 2 ** 40, driver: RING_BASE + 0x1000, device: RING_BASE + 0x2000 });
    driver.enableQueue(0);
    expect(driver.queueEnabled(0)).toBe(false);
    expect(transport.core.queue(0)?.descHi).toBe(0x100);
    driver.setupQueue(0, { size: 8, desc: RING_BASE, driver: RING_BASE + 0x1000, device: RING_BASE + 0x2000 });
    driver.enableQueue(0);
    expect(driver.queueEnabled(0)).toBe(true);
  });

  it('ignores queue configuration writes while the queue is ready', () => {
    const { transport, driver, memory } = featuresOk();
    const ring = new TestRing(memory, RING_BASE, 8);
    setupQueue(driver, 0, ring);
    transport.write(VIRTIO_MMIO.QUEUE_SEL, 4, 0);
    transport.write(VIRTIO_MMIO.QUEUE_NUM, 4, 2);
    transport.write(VIRTIO_MMIO.QUEUE_DESC_LOW, 4, 0x5000);
    expect(transport.core.queue(0)).toMatchObject({ size: 8, descLo: RING_BASE, ready: true });
  });

  it('does not enable a queue that does not exist', () => {
    const { driver, memory } = featuresOk();
    driver.setupQueue(1, new TestRing(memory, RING_BASE, 8));
    driver.enableQueue(1);
    expect(driver.queueEnabled(1)).toBe(false);
  });
});

describe('virtio-mmio operation', () => {
  it('echoes a request through queue 0 and raises a used-buffer interrupt', () => {
    const { driver, ring, irq, device, transport } = live();
    expect(device.count('activate')).toBe(1);
    expect(device.env?.queues[0]).toBeDefined();
    expect(device.env?.queues[2]).toBeUndefined();
    ring.add(text('hello'), 16);
    driver.notify(0);
    expect(device.calls.filter((c) => c.method === 'notify').map((c) => c.arg)).toEqual([0]);
    const used = ring.takeUsed();
    expect(used).toHaveLength(1);
    expect(untext(used[0]!.data)).toBe('HELLO');
    expect(irq.level).toBe(InterruptCause.USED_BUFFER);
    expect(transport.read(VIRTIO_MMIO.INTERRUPT_STATUS, 4)).toBe(InterruptCause.USED_BUFFER);
    expect(driver.takeInterrupts()).toBe(InterruptCause.USED_BUFFER);
    expect(irq.level).toBe(0);
    expect(transport.read(VIRTIO_MMIO.INTERRUPT_STATUS, 4)).toBe(0);
    expect(transport.stats()).toMatchObject({ queueNotifications: 1, usedNotifications: 1, interrupts: 1 });
  });

  it('does not interrupt when the driver suppresses used-buffer notifications', () => {
    const { driver, ring, irq } = live(F_VERSION_1);
    ring.suppressInterrupts(true);
    ring.add(text('quiet'), 8);
    driver.notify(0);
    expect(ring.takeUsed()).toHaveLength(1);
    expect(irq.history).toEqual([]);
  });

  it('drops notifications before DRIVER_OK and for queues that are not live', () => {
    const s = setup();
    initializeDevice(s.driver, { wantedFeatures: ALL_WANTED });
    const ring = new TestRing(s.memory, RING_BASE, 8);
    setupQueue(s.driver, 0, ring);
    s.driver.notify(0);
    expect(s.device.count('notify')).toBe(0);
    driverOk(s.driver);
    for (const q of [1, 2, 3, 0xffff]) s.transport.write(MMIO_QUEUE_NOTIFY_OFFSET, 4, q);
    s.transport.notifyQueue(-1);
    s.transport.notifyQueue(0.5);
    expect(s.device.count('notify')).toBe(0);
    expect(s.transport.stats().droppedNotifications).toBe(7);
    s.transport.notifyQueue(0);
    expect(s.device.count('notify')).toBe(1);
  });

  it('stops a queue when QueueReady is written 0', () => {
    const { driver, device, ring } = live();
    (driver as MmioDriverTransport).disableQueue(0);
    expect(device.env?.queues[0]).toBeUndefined();
    ring.add(text('x'), 4);
    driver.notify(0);
    expect(device.count('notify')).toBe(0);
  });

  it('resets one queue with RING_RESET and brings it back', () => {
    const { driver, device, memory, transport } = live();
    driver.resetQueue(0);
    expect(driver.queueEnabled(0)).toBe(false);
    expect(transport.core.queue(0)).toMatchObject({ size: 16, descLo: 0, ready: false });
    expect(device.env?.queues[0]).toBeUndefined();
    const ring = new TestRing(memory, RING_BASE + 0x40000, 4);
    setupQueue(driver, 0, ring);
    expect(device.env?.queues[0]).toBeDefined();
    ring.add(text('again'), 8);
    driver.notify(0);
    expect(untext(ring.takeUsed()[0]!.data)).toBe('AGAIN');
  });

  it('ignores a queue reset when RING_RESET was not negotiated', () => {
    const { driver, device } = live(F_VERSION_1);
    driver.resetQueue(0);
    expect(driver.queueEnabled(0)).toBe(true);
    expect(device.env?.queues[0]).toBeDefined();
  });

  it('reads config at natural widths, 64-bit fields as halves, and refuses misaligned reads', () => {
    const { driver, transport, device } = setup();
    device.scratch = 0xa1b2c3d4;
    expect(driver.configRead(EchoConfig.scratch.offset, 4)).toBe(0xa1b2c3d4);
    expect(driver.configRead(EchoConfig.scratch.offset, 2)).toBe(0xc3d4);
    expect(driver.configRead(EchoConfig.scratch.offset + 3, 1)).toBe(0xa1);
    expect(driver.configRead(EchoConfig.scratch.offset + 1, 2)).toBe(0);
    expect(driver.configRead(EchoConfig.SIZE, 1)).toBe(0);
    expect(readConfigU64(driver, EchoConfig.serial.offset)).toBe(0x1122334455667788n);
    // An 8-byte access carries only values below 2^53 (src/virtio/bus.ts).
    expect(transport.read(VIRTIO_MMIO.CONFIG + EchoConfig.serial.offset, 8)).toBe(0);
    device.serial = 0x1f_0000_1234n;
    expect(transport.read(VIRTIO_MMIO.CONFIG + EchoConfig.serial.offset, 8)).toBe(0x1f_0000_1234);
    driver.configWrite(EchoConfig.scratch.offset, 4, 0x12345678);
    expect(device.scratch).toBe(0x12345678);
  });

  it('retries a config read torn by a device change and signals the change', () => {
    const { driver, device, irq, transport } = live();
    const genBefore = driver.configGeneration();
    let torn = false;
    device.onConfigRead = (offset) => {
      // The device changes its config between the two halves, once.
      if (offset === EchoConfig.serial.offset + 4 && !torn) {
        torn = true;
        device.changeConfig();
      }
    };
    const serial = readConfigU64(driver, EchoConfig.serial.offset);
    expect(torn).toBe(true);
    expect(serial).toBe(0x1122334455667789n);
    expect(driver.configGeneration()).not.toBe(genBefore);
    expect(irq.level & InterruptCause.CONFIG_CHANGE).toBe(InterruptCause.CONFIG_CHANGE);
    expect(transport.stats().configChanges).toBe(1);
  });

  it('moves the generation once per unread change', () => {
    const { transport, driver } = live();
    const g0 = driver.configGeneration();
    transport.core.configChanged();
    transport.core.configChanged();
    expect(driver.configGeneration()).toBe(g0 + 1);
    driver.configRead(0, 4);
    transport.core.configChanged();
    expect(driver.configGeneration()).toBe(g0 + 2);
  });

  it('sets DEVICE_NEEDS_RESET when the model throws, then recovers after reset', () => {
    const { driver, device, ring, irq, memory } = live();
    device.fault = 'notify';
    ring.add(text('boom'), 8);
    driver.notify(0);
    expect(driver.getStatus() & STATUS.DEVICE_NEEDS_RESET).toBe(STATUS.DEVICE_NEEDS_RESET);
    expect(irq.level & InterruptCause.CONFIG_CHANGE).toBe(InterruptCause.CONFIG_CHANGE);
    driver.notify(0);
    expect(device.count('notify')).toBe(1);
    device.fault = undefined;
    driver.reset();
    expect(driver.getStatus()).toBe(0);
    expect(irq.level).toBe(0);
    const again = new TestRing(memory, RING_BASE + 0x40000, 8);
    initializeDevice(driver, { wantedFeatures: ALL_WANTED });
    setupQueue(driver, 0, again);
    driverOk(driver);
    again.add(text('ok'), 4);
    driver.notify(0);
    expect(untext(again.takeUsed()[0]!.data)).toBe('OK');
  });

  it('turns a throwing activate into DEVICE_NEEDS_RESET', () => {
    const device = new EchoDevice();
    device.fault = 'activate';
    const s = setup(device);
    initializeDevice(s.driver, { wantedFeatures: ALL_WANTED });
    setupQueue(s.driver, 0, new TestRing(s.memory, RING_BASE, 8));
    expect(() => driverOk(s.driver)).toThrow(VirtioInitError);
    expect(s.driver.getStatus() & DeviceStatus.DEVICE_NEEDS_RESET).toBe(DeviceStatus.DEVICE_NEEDS_RESET);
    s.driver.notify(0);
    expect(device.count('notify')).toBe(0);
  });

  it('turns a throwing config read into 0 and DEVICE_NEEDS_RESET, and a model error from the env too', () => {
    const { driver, device } = live();
    device.fault = 'readConfig';
    expect(driver.configRead(0, 4)).toBe(0);
    expect(driver.getStatus() & STATUS.DEVICE_NEEDS_RESET).toBe(STATUS.DEVICE_NEEDS_RESET);
    const s = live();
    s.device.env!.needsReset('model says so');
    expect(s.transport.stats()).toMatchObject({ needsResets: 1, lastNeedsResetReason: 'model says so' });
  });

  it('reset clears status, features, queues and interrupts, and makes old environments inert', () => {
    const { driver, device, ring, irq, transport } = live();
    ring.add(text('a'), 4);
    driver.notify(0);
    expect(irq.level).not.toBe(0);
    const oldEnv = device.env!;
    driver.reset();
    expect(device.count('reset')).toBeGreaterThanOrEqual(2);
    expect(transport.core.snapshot()).toMatchObject({
      active: false,
      state: { status: 0, driverFeatures: 0n, negotiated: 0n, interruptStatus: 0, queueSelect: 0 },
    });
    expect(transport.core.queue(0)).toMatchObject({ size: 16, ready: false, descLo: 0, driverLo: 0, deviceLo: 0 });
    expect(irq.level).toBe(0);
    oldEnv.notifyUsed(0);
    oldEnv.notifyConfigChange();
    oldEnv.needsReset('stale');
    expect(irq.level).toBe(0);
    expect(driver.getStatus()).toBe(0);
    transport.reset();
    expect(transport.stats().resets).toBe(3);
  });

  it('snapshots plain state with live queue positions', () => {
    const { driver, ring, transport } = live();
    ring.add(text('abc'), 4);
    ring.add(text('def'), 4);
    driver.notify(0);
    const snap = transport.snapshot();
    expect(snap.active).toBe(true);
    expect(snap.queuePositions[0]).toEqual({ nextAvail: 2, nextUsed: 2 });
    expect(snap.queuePositions[2]).toBeNull();
    expect(structuredClone(snap)).toEqual(snap);
  });
});
