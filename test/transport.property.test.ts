import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { GuestMemory } from '../src/memory/index.js';
import { DeviceStatus, FeatureBit, MAX_QUEUE_SIZE, hasFeature } from '../src/virtio/constants.js';
import type { DeviceEnvironment } from '../src/virtio/device.js';
import { MmioRegister, MmioTransport } from '../src/virtio/mmio.js';
import { PciBarLayout, PciCommand, PciCommonCfg, PciTransport, pciNotifyOffset } from '../src/virtio/pci.js';
import type { VirtioTransportCore } from '../src/virtio/transport.js';
import type { AccessSize } from '../src/virtio/bus.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { PciDriverTransport } from '../guest-fixtures/driver/pci.js';
import type { DriverTransport } from '../guest-fixtures/driver/transport.js';
import { F_VERSION_1, driverOk, initializeDevice, setupQueue } from '../guest-fixtures/driver/virtio-driver.js';
import { EchoDevice, RecordingIrq, TestRing, text } from './transport-fixtures.js';
import { fuzzParams } from './support/fuzz.js';

const RING_BASE = 0x10000;
const BAR0_ADDRESS = 0xfe00_0000;
const LEGAL_STATUS_BITS =
  DeviceStatus.ACKNOWLEDGE |
  DeviceStatus.DRIVER |
  DeviceStatus.FEATURES_OK |
  DeviceStatus.DRIVER_OK |
  DeviceStatus.DEVICE_NEEDS_RESET |
  DeviceStatus.FAILED;

/**
 * The echo device, watching the transport: every callback checks that the transport was allowed to
 * make it right then, and records a violation otherwise (throwing would only be caught). It also
 * fails on demand, to exercise the transport's containment.
 */
class SpyDevice extends EchoDevice {
  core: VirtioTransportCore | undefined;
  readonly violations: string[] = [];
  /** The next call of this callback throws (once). */
  failIn: string | undefined;

  private check(what: string, ok: boolean): void {
    if (!ok) this.violations.push(`${what} at status 0x${(this.core?.status ?? -1).toString(16)}`);
  }

  private maybeThrow(callback: string): void {
    if (this.failIn === callback) {
      this.failIn = undefined;
      throw new Error(`spy device failure in ${callback}`);
    }
  }

  override validateFeatures(negotiated: bigint): boolean {
    const s = this.core!.status;
    this.check('validateFeatures outside DRIVER..FEATURES_OK', (s & DeviceStatus.DRIVER) !== 0 && (s & DeviceStatus.FEATURES_OK) === 0);
    this.check('validateFeatures with unoffered bits', (negotiated & ~this.core!.deviceFeatures) === 0n);
    this.maybeThrow('validateFeatures');
    return super.validateFeatures(negotiated);
  }

  override activate(env: DeviceEnvironment): void {
    const core = this.core!;
    const s = core.status;
    this.check('activate without FEATURES_OK and DRIVER_OK', (s & DeviceStatus.FEATURES_OK) !== 0 && (s & DeviceStatus.DRIVER_OK) !== 0);
    this.check('activate without VERSION_1', hasFeature(env.features, FeatureBit.VERSION_1));
    this.check('activate with features other than the negotiated', env.features === core.negotiated);
    env.queues.forEach((q, i) => this.check(`activate with live queue ${i} not ready`, q === undefined || core.queueReady(i)));
    this.maybeThrow('activate');
    super.activate(env);
  }

  override notify(queueIndex: number): void {
    const core = this.core!;
    const s = core.status;
    this.check('notify while not running', (s & DeviceStatus.DRIVER_OK) !== 0 && (s & (DeviceStatus.DEVICE_NEEDS_RESET | DeviceStatus.FAILED)) === 0);
    this.check(`notify for queue ${queueIndex} that is not live`, this.env?.queues[queueIndex] !== undefined && core.queueReady(queueIndex));
    this.maybeThrow('notify');
    super.notify(queueIndex);
  }

  override readConfig(offset: number, size: 1 | 2 | 4): number {
    this.check(`readConfig(${offset}, ${size}) out of range`, Number.isInteger(offset) && offset >= 0 && offset + size <= this.configSize);
    this.maybeThrow('readConfig');
    return super.readConfig(offset, size);
  }

  override writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    this.check(`writeConfig(${offset}, ${size}) out of range`, Number.isInteger(offset) && offset >= 0 && offset + size <= this.configSize);
    this.maybeThrow('writeConfig');
    super.writeConfig(offset, size, value);
  }
}

interface Harness {
  readonly core: VirtioTransportCore;
  readonly device: SpyDevice;
  readonly irq: RecordingIrq;
  readonly memory: GuestMemory;
  /** One raw register access of this transport's kind; returns the value read (or undefined for writes). */
  raw(op: RawOp): number | undefined;
  /** Programs queue `queue` through registers without the driver's "not in use" check, then enables it. */
  programQueue(queue: number, size: number, base: number): void;
  /** A driver write of the device status field through this transport's registers. */
  writeStatus(value: number): void;
  /** Expected interrupt pin level for the current causes. */
  expectedLevel(): number;
  driver(): DriverTransport | undefined;
}

interface RawOp {
  readonly space: 'mmio' | 'config' | 'bar';
  readonly read: boolean;
  readonly offset: number;
  readonly size: AccessSize;
  readonly value: number;
  readonly bar: number;
}

function mmioHarness(): Harness {
  const memory = GuestMemory.create(1 << 20);
  const irq = new RecordingIrq();
  const device = new SpyDevice();
  const transport = new MmioTransport(device, memory, { irq });
  device.core = transport.core;
  const driver = new MmioDriverTransport(transport);
  return {
    core: transport.core,
    device,
    irq,
    memory,
    raw: (op) => (op.read ? transport.read(op.offset, op.size) : (transport.write(op.offset, op.size, op.value), undefined)),
    writeStatus: (value) => transport.write(MmioRegister.status.offset, 4, value),
    programQueue: (queue, size, base) => {
      const w = (reg: { offset: number }, v: number) => transport.write(reg.offset, 4, v);
      w(MmioRegister.queueSel, queue);
      w(MmioRegister.queueNum, size);
      w(MmioRegister.queueDescLow, base % 2 ** 32);
      w(MmioRegister.queueDescHigh, Math.floor(base / 2 ** 32));
      w(MmioRegister.queueDriverLow, (base + 0x1000) % 2 ** 32);
      w(MmioRegister.queueDeviceLow, (base + 0x2000) % 2 ** 32);
      w(MmioRegister.queueReady, 1);
    },
    expectedLevel: () => transport.core.interruptStatus,
    driver: () => driver,
  };
}

/** A common config write through the VIRTIO_PCI_CAP_PCI_CFG window (capability at 0x84). */
function windowWrite(transport: PciTransport, field: { offset: number; size: number }, value: number): void {
  const size = field.size as 1 | 2 | 4;
  transport.configWrite(0x84 + 4, 1, 0);
  transport.configWrite(0x84 + 8, 4, field.offset);
  transport.configWrite(0x84 + 12, 4, size);
  transport.configWrite(0x84 + 16, size, value);
}

function pciHarness(): Harness {
  const memory = GuestMemory.create(1 << 20);
  const irq = new RecordingIrq();
  const device = new SpyDevice();
  const transport = new PciTransport(device, memory, { irq });
  device.core = transport.core;
  let driver: PciDriverTransport | undefined;
  return {
    core: transport.core,
    device,
    irq,
    memory,
    raw: (op) => {
      if (op.space === 'config') {
        const size = op.size === 8 ? 4 : op.size;
        if (op.read) return transport.configRead(op.offset, size);
        transport.configWrite(op.offset, size, op.value);
        return undefined;
      }
      if (op.read) return transport.barRead(op.bar, op.offset, op.size);
      transport.barWrite(op.bar, op.offset, op.size, op.value);
      return undefined;
    },
    // Through the PCI_CFG window: works whether or not the guest enabled memory decoding.
    writeStatus: (value) => windowWrite(transport, PciCommonCfg.deviceStatus, value),
    programQueue: (queue, size, base) => {
      windowWrite(transport, PciCommonCfg.queueSelect, queue);
      windowWrite(transport, PciCommonCfg.queueSize, size);
      windowWrite(transport, { offset: PciCommonCfg.queueDesc.offset, size: 4 }, base % 2 ** 32);
      windowWrite(transport, { offset: PciCommonCfg.queueDesc.offset + 4, size: 4 }, Math.floor(base / 2 ** 32));
      windowWrite(transport, { offset: PciCommonCfg.queueDriver.offset, size: 4 }, (base + 0x1000) % 2 ** 32);
      windowWrite(transport, { offset: PciCommonCfg.queueDevice.offset, size: 4 }, (base + 0x2000) % 2 ** 32);
      windowWrite(transport, PciCommonCfg.queueEnable, 1);
    },
    expectedLevel: () => ((transport.configRead(0x04, 2) & PciCommand.INTX_DISABLE) !== 0 ? 0 : transport.core.interruptStatus),
    driver: () => {
      // Probing reprograms the BAR and command register, as a guest's PCI core would.
      try {
        driver = new PciDriverTransport(transport, { bar0Address: BAR0_ADDRESS });
      } catch {
        driver = undefined;
      }
      return driver;
    },
  };
}

const interestingValues = fc.oneof(
  fc.constantFrom(0, 1, 2, 3, 4, 7, 8, 11, 15, 16, 64, 128, 0xff, 0xffff, 0xffff_ffff, RING_BASE, RING_BASE + 0x1000, RING_BASE + 0x2000),
  fc.constantFrom(1 | 2, 1 | 2 | 8, 1 | 2 | 8 | 4, 4, 64, 1 | 2 | 4 | 8 | 64 | 128),
  fc.nat({ max: 0xffff_ffff }),
  fc.integer({ min: -(2 ** 31), max: 2 ** 31 }),
  fc.constantFrom(Number.NaN, 0.5, 2 ** 53, -1, Number.POSITIVE_INFINITY),
);
const sizes = fc.constantFrom<AccessSize>(1, 2, 4, 4, 4, 8);
const weirdOffsets = fc.constantFrom(-4, -1, 0.5, 2 ** 40, Number.NaN);

const mmioOffsets = fc.oneof(
  fc.constantFrom(...Object.values(MmioRegister).map((r) => r.offset)),
  fc.integer({ min: 0x100, max: 0x118 }),
  fc.integer({ min: 0, max: 0x220 }),
  weirdOffsets,
);
const barOffsets = fc.oneof(
  fc.constantFrom(...Object.values(PciCommonCfg).flatMap((f) => (typeof f === 'number' ? [] : f.size === 8 ? [f.offset, f.offset + 4] : [f.offset]))),
  fc.constantFrom(PciBarLayout.isr.offset, PciBarLayout.device.offset, PciBarLayout.device.offset + 8, pciNotifyOffset(0), pciNotifyOffset(2), pciNotifyOffset(3)),
  fc.integer({ min: 0, max: 0x4010 }),
  weirdOffsets,
);
const configOffsets = fc.oneof(fc.integer({ min: 0, max: 0x100 }), fc.constantFrom(0x04, 0x10, 0x14, 0x40, 0x50, 0x84, 0x88, 0x8c, 0x90), weirdOffsets);

type Op =
  | { kind: 'raw'; op: RawOp }
  | { kind: 'status'; value: number }
  | { kind: 'init'; wanted: bigint; exact: boolean; queues: number; ok: boolean }
  | { kind: 'kick'; queue: number }
  | { kind: 'queue'; queue: number; size: number; base: number }
  | { kind: 'model'; event: 'used' | 'config' | 'needsReset'; queue: number }
  | { kind: 'fail'; callback: string }
  | { kind: 'hostReset' };

function opArb(kind: 'mmio' | 'pci'): fc.Arbitrary<Op> {
  const raw =
    kind === 'mmio'
      ? fc.record({ space: fc.constant('mmio' as const), read: fc.boolean(), offset: mmioOffsets, size: sizes, value: interestingValues, bar: fc.constant(0) })
      : fc.oneof(
          fc.record({ space: fc.constant('config' as const), read: fc.boolean(), offset: configOffsets, size: sizes, value: interestingValues, bar: fc.constant(0) }),
          fc.record({ space: fc.constant('bar' as const), read: fc.boolean(), offset: barOffsets, size: sizes, value: interestingValues, bar: fc.constantFrom(0, 0, 0, 1, 6) }),
        );
  return fc.oneof(
    { weight: 8, arbitrary: raw.map((op) => ({ kind: 'raw' as const, op })) },
    {
      weight: 3,
      arbitrary: fc.record({
        kind: fc.constant('status' as const),
        value: fc.oneof(fc.integer({ min: 0, max: 0xff }), fc.constantFrom(1, 3, 7, 11, 15, 0x43, 0x83, 0x4f, 0x8f)),
      }),
    },
    {
      weight: 3,
      arbitrary: fc.record({
        kind: fc.constant('init' as const),
        wanted: fc.constantFrom(F_VERSION_1, F_VERSION_1 | (1n << 29n), F_VERSION_1 | (1n << 40n) | 1n, 1n << 29n, F_VERSION_1 | (1n << 5n)),
        exact: fc.boolean(),
        queues: fc.constantFrom(0, 1, 2),
        ok: fc.constantFrom(true, true, false),
      }),
    },
    {
      weight: 2,
      arbitrary: fc.record({
        kind: fc.constant('queue' as const),
        queue: fc.constantFrom(0, 1, 2, 3),
        size: fc.constantFrom(1, 3, 4, 8, 16, 32),
        base: fc.constantFrom(RING_BASE, RING_BASE + 8, (1 << 20) - 0x100, 2 ** 45),
      }),
    },
    { weight: 5, arbitrary: fc.record({ kind: fc.constant('kick' as const), queue: fc.constantFrom(0, 0, 1, 2, 5) }) },
    {
      weight: 3,
      arbitrary: fc.record({ kind: fc.constant('model' as const), event: fc.constantFrom('used' as const, 'config' as const, 'needsReset' as const), queue: fc.constantFrom(0, 2, 9) }),
    },
    {
      weight: 1,
      arbitrary: fc.record({ kind: fc.constant('fail' as const), callback: fc.constantFrom('validateFeatures', 'activate', 'notify', 'readConfig', 'writeConfig') }),
    },
    { weight: 1, arbitrary: fc.constant({ kind: 'hostReset' as const }) },
  );
}

function apply(h: Harness, op: Op, rings: Map<number, TestRing>): void {
  switch (op.kind) {
    case 'raw': {
      const value = h.raw(op.op);
      if (value !== undefined) {
        const limit = op.op.size === 8 ? Number.MAX_SAFE_INTEGER : 2 ** (8 * op.op.size) - 1;
        if (!Number.isSafeInteger(value) || value < 0 || value > limit) throw new Error(`read returned ${value} for ${JSON.stringify(op.op)}`);
      }
      return;
    }
    case 'status':
      h.writeStatus(op.value);
      return;
    case 'init': {
      const driver = h.driver();
      if (driver === undefined) return;
      try {
        initializeDevice(driver, { wantedFeatures: op.wanted, exact: op.exact });
        rings.clear();
        for (const q of [0, 2].slice(0, op.queues)) {
          const ring = new TestRing(h.memory, RING_BASE + q * 0x20000, 4);
          setupQueue(driver, q, ring);
          rings.set(q, ring);
        }
        if (op.ok) driverOk(driver);
      } catch {
        // Refusals are part of the game: the invariants still have to hold.
      }
      return;
    }
    case 'queue': {
      // Programs and enables a queue at whatever status the device is in, enabled or not, sound rings or not.
      h.programQueue(op.queue, op.size, op.base);
      return;
    }
    case 'kick': {
      rings.get(op.queue)?.add(text('abc'), 8);
      h.core.notifyQueue(op.queue);
      return;
    }
    case 'model': {
      const env = h.device.env;
      if (env === undefined) return;
      if (op.event === 'used') env.notifyUsed(op.queue);
      else if (op.event === 'config') env.notifyConfigChange();
      else env.needsReset('property test');
      return;
    }
    case 'fail':
      h.device.failIn = op.callback;
      return;
    case 'hostReset':
      h.core.reset();
      return;
  }
}

function checkInvariants(h: Harness): void {
  const core = h.core;
  const s = core.status;
  const snap = core.snapshot();
  expect(s & ~LEGAL_STATUS_BITS).toBe(0);
  // virtio 1.2 §3.1.1: each step implies the ones before it.
  if (s & DeviceStatus.DRIVER) expect(s & DeviceStatus.ACKNOWLEDGE).toBeTruthy();
  if (s & DeviceStatus.FEATURES_OK) {
    expect(s & DeviceStatus.DRIVER).toBeTruthy();
    expect(hasFeature(core.negotiated, FeatureBit.VERSION_1)).toBe(true);
    expect(core.negotiated & ~core.deviceFeatures).toBe(0n);
  } else {
    expect(core.negotiated).toBe(0n);
  }
  if (s & DeviceStatus.DRIVER_OK) expect(s & DeviceStatus.FEATURES_OK).toBeTruthy();
  if (s === 0) expect(snap.active).toBe(false);
  if (snap.active) expect(s & DeviceStatus.DRIVER_OK).toBeTruthy();
  snap.state.queues.forEach((q, i) => {
    const max = core.queueMaxSize(i);
    if (max === 0) {
      expect(q.ready).toBe(false);
      return;
    }
    expect(q.size & (q.size - 1)).toBe(0);
    expect(q.size).toBeGreaterThan(0);
    expect(q.size).toBeLessThanOrEqual(Math.min(max, MAX_QUEUE_SIZE));
    if (q.ready) expect(s & DeviceStatus.FEATURES_OK).toBeTruthy();
  });
  // A live queue runs exactly the rings the driver programmed: nothing changed them underneath.
  const env = h.device.env;
  if (snap.active && env !== undefined) {
    env.queues.forEach((live, i) => {
      if (live === undefined) return;
      const q = snap.state.queues[i]!;
      expect(q.ready).toBe(true);
      expect(live.config).toMatchObject({
        size: q.size,
        descAddr: q.descHi * 2 ** 32 + q.descLo,
        driverAddr: q.driverHi * 2 ** 32 + q.driverLo,
        deviceAddr: q.deviceHi * 2 ** 32 + q.deviceLo,
      });
    });
  }
  expect(core.interruptStatus & ~3).toBe(0);
  expect(h.irq.level).toBe(h.expectedLevel());
  expect(h.device.violations).toEqual([]);
}

function runSequences(kind: 'mmio' | 'pci', seed: number): void {
  fc.assert(
    fc.property(fc.array(opArb(kind), { minLength: 1, maxLength: 60 }), (ops) => {
      const h = kind === 'mmio' ? mmioHarness() : pciHarness();
      const rings = new Map<number, TestRing>();
      for (const op of ops) {
        apply(h, op, rings);
        checkInvariants(h);
      }
    }),
    fuzzParams(seed, 150),
  );
}

describe('transport register fuzzing', () => {
  it('virtio-mmio: random accesses never throw and keep the status machine legal', () => {
    runSequences('mmio', 0x5eed_0001);
  });

  it('virtio-pci: random config and BAR accesses never throw and keep the status machine legal', () => {
    runSequences('pci', 0x5eed_0002);
  });

  it('reaches running devices often enough to test the callbacks', () => {
    // Guard against a generator that never gets past initialization: the checks above would be vacuous.
    let activations = 0;
    let notifies = 0;
    fc.assert(
      fc.property(fc.array(opArb('mmio'), { minLength: 20, maxLength: 60 }), (ops) => {
        const h = mmioHarness();
        const rings = new Map<number, TestRing>();
        for (const op of ops) apply(h, op, rings);
        activations += h.device.count('activate');
        notifies += h.device.count('notify');
      }),
      fuzzParams(0x5eed_0003, 100),
    );
    expect(activations).toBeGreaterThan(40);
    expect(notifies).toBeGreaterThan(20);
  });
});
