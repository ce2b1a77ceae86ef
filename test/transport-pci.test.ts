import { describe, it, expect } from 'vitest';
import { GuestMemory } from '../src/memory/index.js';
import { DeviceType, FeatureBit, featureMask } from '../src/virtio/constants.js';
import { InterruptCause } from '../src/virtio/device.js';
import {
  PCI_NOTIFY_BAR,
  PciBarLayout,
  PciCommonCfg,
  PciTransport,
  VIRTIO_MSI_NO_VECTOR,
  pciNotifyOffset,
  type PciTransportOptions,
} from '../src/virtio/pci.js';
import { TransportFeatureBit } from '../src/virtio/transport.js';
import {
  PCI_CFG,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  PciDriverTransport,
  PciProbeError,
  VIRTIO_PCI_CAP_TYPE,
  VIRTIO_PCI_COMMON,
} from '../guest-fixtures/driver/pci.js';
import { readConfigU64 } from '../guest-fixtures/driver/transport.js';
import { F_VERSION_1, STATUS, VirtioInitError, driverOk, initializeDevice, setupQueue } from '../guest-fixtures/driver/virtio-driver.js';
import { ECHO_DEVICE_TYPE, ECHO_F_SHOUT, EchoConfig, EchoDevice, RecordingIrq, TestRing, text, untext } from './transport-fixtures.js';

const ALL_WANTED = F_VERSION_1 | featureMask(FeatureBit.EVENT_IDX) | featureMask(TransportFeatureBit.RING_RESET) | featureMask(ECHO_F_SHOUT);
const RING_BASE = 0x10000;
const BAR0_ADDRESS = 0x1_2000_0000; // above 4 GiB: exercises the 64-bit BAR
const INTX_DISABLE = 0x400;

function device(options: { deviceType?: number } = {}) {
  return new EchoDevice(options);
}

function setup(dev = device(), options: Partial<PciTransportOptions> = {}) {
  const memory = GuestMemory.create(1 << 20);
  const irq = new RecordingIrq();
  const mappings: (number | undefined)[] = [];
  const transport = new PciTransport(dev, memory, { irq, onBarMapping: (_bar, address) => mappings.push(address), ...options });
  return { memory, irq, transport, device: dev, mappings };
}

function probed(dev = device(), options: Partial<PciTransportOptions> = {}, useConfigWindow = false) {
  const s = setup(dev, options);
  const driver = new PciDriverTransport(s.transport, { bar0Address: BAR0_ADDRESS, useConfigWindow });
  return { ...s, driver };
}

function live(wanted = ALL_WANTED, useConfigWindow = false) {
  const s = probed(device(), {}, useConfigWindow);
  const { negotiated } = initializeDevice(s.driver, { wantedFeatures: wanted });
  const ring = new TestRing(s.memory, RING_BASE, 8);
  setupQueue(s.driver, 0, ring);
  driverOk(s.driver);
  return { ...s, ring, negotiated };
}

describe('virtio-pci configuration space', () => {
  it('presents the modern virtio IDs, revision, class and subsystem', () => {
    const { transport } = setup();
    expect(transport.configRead(0x00, 2)).toBe(0x1af4);
    expect(transport.configRead(0x02, 2)).toBe(0x1040 + ECHO_DEVICE_TYPE);
    expect(transport.configRead(0x00, 4)).toBe(((0x1040 + ECHO_DEVICE_TYPE) << 16) | 0x1af4);
    expect(transport.configRead(0x08, 1)).toBe(1);
    expect(transport.configRead(0x08, 4) >>> 8).toBe(0x00ff00);
    expect(transport.configRead(0x0e, 1)).toBe(0);
    expect(transport.configRead(0x2c, 2)).toBe(0x1af4);
    expect(transport.configRead(0x2e, 2)).toBeGreaterThanOrEqual(0x40);
    expect(transport.configRead(0x3d, 1)).toBe(1);
    expect(transport.configRead(0x06, 2) & 0x10).toBe(0x10);
    expect(transport.configRead(0x34, 1)).toBe(0x40);
  });

  it('picks class codes as QEMU does', () => {
    const iommu = setup(device({ deviceType: DeviceType.IOMMU })).transport;
    expect(iommu.configRead(0x02, 2)).toBe(0x1057);
    expect(iommu.configRead(0x08, 4) >>> 8).toBe(0x00ff00);
    const net = setup(device({ deviceType: DeviceType.NET })).transport;
    expect(net.configRead(0x08, 4) >>> 8).toBe(0x020000);
    const custom = setup(device(), { classCode: 0x088000 }).transport;
    expect(custom.configRead(0x08, 4) >>> 8).toBe(0x088000);
  });

  it('refuses device IDs outside the modern PCI range', () => {
    expect(() => setup(device({ deviceType: 0x40 }))).toThrow(RangeError);
  });

  it('sizes the 64-bit BAR with all-ones writes and keeps the other BARs unimplemented', () => {
    const { transport } = setup();
    expect(transport.configRead(0x10, 4)).toBe(0x4); // memory, 64-bit, non-prefetchable
    transport.configWrite(0x10, 4, 0xffffffff);
    transport.configWrite(0x14, 4, 0xffffffff);
    expect(transport.configRead(0x10, 4)).toBe((~(transport.barSize - 1) & ~0xf | 0x4) >>> 0);
    expect(transport.configRead(0x14, 4)).toBe(0xffffffff);
    expect(transport.barSize).toBe(0x4000);
    for (const bar of [0x18, 0x1c, 0x20, 0x24, 0x30]) {
      transport.configWrite(bar, 4, 0xffffffff);
      expect(transport.configRead(bar, 4)).toBe(0);
    }
  });

  it('treats out-of-range and misaligned config accesses as a real bus does', () => {
    const { transport } = setup();
    expect(transport.configRead(0x100, 4)).toBe(0xffffffff);
    expect(transport.configRead(0x01, 2)).toBe(0xffff);
    expect(transport.configRead(0x02, 4)).toBe(0xffffffff);
    expect(transport.configRead(-4, 4)).toBe(0xffffffff);
    transport.configWrite(0x00, 2, 0x1234);
    expect(transport.configRead(0x00, 2)).toBe(0x1af4);
    // Reserved header bytes read 0.
    expect(transport.configRead(0x38, 4)).toBe(0);
  });

  it('offers a 4 KiB PCI Express space with an Express capability and no extended capabilities', () => {
    const { transport } = setup(device(), { configSpaceSize: 4096 });
    expect(transport.configRead(0x100, 4)).toBe(0);
    expect(transport.configRead(0xffc, 4)).toBe(0);
    expect(transport.configRead(0x1000, 4)).toBe(0xffffffff);
    const ids: number[] = [];
    for (let p = transport.configRead(0x34, 1); p !== 0; p = transport.configRead(p + 1, 1)) ids.push(transport.configRead(p, 1));
    expect(ids).toEqual([9, 9, 9, 9, 9, 0x10]);
  });
});

describe('virtio-pci capability discovery and BAR placement', () => {
  it('finds every virtio structure where the layout says', () => {
    const { driver, transport } = probed();
    expect(driver.deviceType).toBe(ECHO_DEVICE_TYPE);
    expect(driver.capabilities.map((c) => c.type)).toEqual([
      VIRTIO_PCI_CAP_TYPE.COMMON_CFG,
      VIRTIO_PCI_CAP_TYPE.NOTIFY_CFG,
      VIRTIO_PCI_CAP_TYPE.ISR_CFG,
      VIRTIO_PCI_CAP_TYPE.DEVICE_CFG,
      VIRTIO_PCI_CAP_TYPE.PCI_CFG,
    ]);
    expect(driver.common).toMatchObject({ bar: 0, offset: PciBarLayout.common.offset });
    expect(driver.common.length).toBeGreaterThanOrEqual(PciCommonCfg.SIZE);
    expect(driver.isr).toMatchObject({ bar: 0, offset: PciBarLayout.isr.offset });
    expect(driver.device).toMatchObject({ bar: 0, offset: PciBarLayout.device.offset, length: EchoConfig.SIZE });
    expect(driver.notifyRegion).toMatchObject({ bar: PCI_NOTIFY_BAR, offset: PciBarLayout.notify.offset });
    // virtio 1.2 §4.1.4.4.1: room for the last queue's notify address (4 bytes with NOTIFICATION_DATA).
    expect(driver.notifyRegion.length).toBeGreaterThanOrEqual(2 * driver.notifyOffMultiplier + 4);
    expect(driver.notifyOffMultiplier).toBe(4);
    expect(driver.barSize).toBe(transport.barSize);
    // Common config layout, cross-checked against the guest's own copy of the offsets.
    expect(PciCommonCfg.queueReset.offset).toBe(VIRTIO_PCI_COMMON.Q_RESET);
    expect(PciCommonCfg.queueDevice.offset).toBe(VIRTIO_PCI_COMMON.Q_USEDLO);
  });

  it('places BAR 0 where the driver put it and decodes it only with memory space enabled', () => {
    const { transport, driver, mappings } = probed();
    expect(transport.configRead(PCI_CFG.BAR0, 4)).toBe((BAR0_ADDRESS % 2 ** 32) | 0x4);
    expect(transport.configRead(PCI_CFG.BAR1, 4)).toBe(1);
    expect(transport.barAddress(0)).toBe(BAR0_ADDRESS);
    expect(mappings.at(-1)).toBe(BAR0_ADDRESS);
    expect(transport.configRead(PCI_CFG.COMMAND, 2) & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)).toBe(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    expect(driver.numQueues()).toBe(3);

    transport.configWrite(PCI_CFG.COMMAND, 2, 0);
    expect(transport.barAddress(0)).toBeUndefined();
    expect(mappings.at(-1)).toBeUndefined();
    expect(transport.barRead(0, VIRTIO_PCI_COMMON.NUMQ, 2)).toBe(0xffff);
    transport.barWrite(0, VIRTIO_PCI_COMMON.STATUS, 1, STATUS.ACKNOWLEDGE);
    expect(transport.core.status).toBe(0);
  });

  it('reads all-ones outside BAR 0 and for other BARs, 0 in unused BAR space', () => {
    const { transport } = probed();
    expect(transport.barRead(1, 0, 4)).toBe(0xffffffff);
    expect(transport.barRead(0, transport.barSize, 4)).toBe(0xffffffff);
    expect(transport.barRead(0, transport.barSize - 2, 4)).toBe(0xffffffff);
    expect(transport.barRead(0, 0x800, 4)).toBe(0);
    expect(transport.barRead(0, PciBarLayout.device.offset + 0x800, 4)).toBe(0);
  });

  it('probing rejects a function that is not a modern virtio device', () => {
    const bus = { configRead: () => 0xffff, configWrite: () => undefined, barRead: () => 0, barWrite: () => undefined };
    expect(() => new PciDriverTransport(bus, { bar0Address: 0 })).toThrow(PciProbeError);
    const { transport } = setup();
    expect(() => new PciDriverTransport(transport, { bar0Address: 0x1000 })).toThrow(/not aligned/);
  });
});

describe('virtio-pci common configuration', () => {
  it('negotiates features and refuses unoffered ones', () => {
    const { driver, transport } = probed();
    expect(initializeDevice(driver, { wantedFeatures: ALL_WANTED }).negotiated).toBe(ALL_WANTED);
    expect(transport.core.negotiated).toBe(ALL_WANTED);
    expect(() => initializeDevice(driver, { wantedFeatures: ALL_WANTED | (1n << 6n), exact: true })).toThrow(VirtioInitError);
    expect(driver.getStatus() & STATUS.FAILED).toBe(STATUS.FAILED);
  });

  it('mirrors what the driver wrote in driver_feature', () => {
    const { transport } = probed();
    transport.barWrite(0, VIRTIO_PCI_COMMON.GFSELECT, 4, 1);
    transport.barWrite(0, VIRTIO_PCI_COMMON.GF, 4, 1);
    expect(transport.barRead(0, VIRTIO_PCI_COMMON.GF, 4)).toBe(1);
    expect(transport.barRead(0, VIRTIO_PCI_COMMON.GFSELECT, 4)).toBe(1);
  });

  it('reports queue sizes, notify offsets and no MSI-X vectors', () => {
    const { transport, driver } = probed();
    const read = (off: number, size: 1 | 2 | 4) => transport.barRead(0, off, size);
    expect(read(VIRTIO_PCI_COMMON.NUMQ, 2)).toBe(3);
    for (const [q, size] of [[0, 16], [1, 0], [2, 8], [3, 0]] as const) {
      transport.barWrite(0, VIRTIO_PCI_COMMON.Q_SELECT, 2, q);
      expect(read(VIRTIO_PCI_COMMON.Q_SIZE, 2)).toBe(size);
    }
    transport.barWrite(0, VIRTIO_PCI_COMMON.Q_SELECT, 2, 2);
    expect(read(VIRTIO_PCI_COMMON.Q_NOFF, 2)).toBe(2);
    expect(driver.notifyAddress(2)).toBe(pciNotifyOffset(2));
    transport.barWrite(0, VIRTIO_PCI_COMMON.MSIX, 2, 0);
    transport.barWrite(0, VIRTIO_PCI_COMMON.Q_MSIX, 2, 1);
    expect(read(VIRTIO_PCI_COMMON.MSIX, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
    expect(read(VIRTIO_PCI_COMMON.Q_MSIX, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
    // Aligned accesses of the wrong width address no field and read 0; misaligned ones float.
    expect(read(VIRTIO_PCI_COMMON.MSIX, 4)).toBe(0);
    expect(read(VIRTIO_PCI_COMMON.STATUS, 2)).toBe(0);
    expect(read(VIRTIO_PCI_COMMON.NUMQ, 4)).toBe(0xffffffff);
    // Read-only fields ignore writes.
    transport.barWrite(0, VIRTIO_PCI_COMMON.NUMQ, 2, 9);
    expect(read(VIRTIO_PCI_COMMON.NUMQ, 2)).toBe(3);
  });

  it('takes queue addresses as 32-bit halves or one 8-byte access', () => {
    const { transport, driver } = probed();
    initializeDevice(driver, { wantedFeatures: ALL_WANTED });
    transport.barWrite(0, VIRTIO_PCI_COMMON.Q_SELECT, 2, 0);
    transport.barWrite(0, VIRTIO_PCI_COMMON.Q_DESCLO, 8, 0x1_0000_1000);
    expect(transport.barRead(0, VIRTIO_PCI_COMMON.Q_DESCLO, 4)).toBe(0x1000);
    expect(transport.barRead(0, VIRTIO_PCI_COMMON.Q_DESCHI, 4)).toBe(1);
    expect(transport.barRead(0, VIRTIO_PCI_COMMON.Q_DESCLO, 8)).toBe(0x1_0000_1000);
    transport.barWrite(0, VIRTIO_PCI_COMMON.Q_DESCHI, 4, 0);
    expect(transport.core.queue(0)).toMatchObject({ descLo: 0x1000, descHi: 0 });
    // 8-byte accesses elsewhere are refused.
    expect(transport.barRead(0, VIRTIO_PCI_COMMON.DFSELECT, 8)).toBe(0);
  });

  it('ignores queue_enable 0 and queue writes once enabled', () => {
    const { driver, transport, memory } = probed();
    initializeDevice(driver, { wantedFeatures: ALL_WANTED });
    setupQueue(driver, 0, new TestRing(memory, RING_BASE, 8));
    transport.barWrite(0, VIRTIO_PCI_COMMON.Q_SELECT, 2, 0);
    transport.barWrite(0, VIRTIO_PCI_COMMON.Q_ENABLE, 2, 0);
    expect(driver.queueEnabled(0)).toBe(true);
    transport.barWrite(0, VIRTIO_PCI_COMMON.Q_SIZE, 2, 4);
    expect(transport.barRead(0, VIRTIO_PCI_COMMON.Q_SIZE, 2)).toBe(8);
  });

  it('shows only the low 8 bits of the config generation', () => {
    const { transport, driver } = probed();
    for (let i = 0; i < 300; i++) {
      transport.core.configChanged();
      driver.configRead(0, 4);
    }
    expect(transport.core.configGeneration).toBe(300);
    expect(driver.configGeneration()).toBe(300 & 0xff);
  });
});

describe('virtio-pci operation', () => {
  it('echoes through queue 0, interrupts via the ISR, and clears it on read', () => {
    const { driver, ring, irq, transport, device } = live();
    ring.add(text('ping'), 8);
    driver.notify(0);
    expect(device.calls.filter((c) => c.method === 'notify').map((c) => c.arg)).toEqual([0]);
    expect(untext(ring.takeUsed()[0]!.data)).toBe('PING');
    expect(irq.level).toBe(InterruptCause.USED_BUFFER);
    expect(transport.configRead(PCI_CFG.STATUS, 2) & 0x8).toBe(0x8);
    expect(driver.takeInterrupts()).toBe(InterruptCause.USED_BUFFER);
    expect(driver.takeInterrupts()).toBe(0);
    expect(irq.level).toBe(0);
    expect(transport.configRead(PCI_CFG.STATUS, 2) & 0x8).toBe(0);
  });

  it('routes notify writes by address and ignores addresses that are no queue', () => {
    const { transport, device } = live();
    transport.barWrite(0, pciNotifyOffset(0) + 1, 2, 0);
    transport.barWrite(0, pciNotifyOffset(3), 2, 3);
    transport.barWrite(0, pciNotifyOffset(0), 1, 0);
    expect(device.count('notify')).toBe(0);
    transport.barWrite(0, pciNotifyOffset(0), 4, 0);
    expect(device.count('notify')).toBe(1);
    transport.notifyQueue(0);
    expect(device.count('notify')).toBe(2);
  });

  it('masks the interrupt pin with INTx disable but keeps the ISR', () => {
    const { driver, ring, irq, transport } = live();
    const command = transport.configRead(PCI_CFG.COMMAND, 2);
    transport.configWrite(PCI_CFG.COMMAND, 2, command | INTX_DISABLE);
    ring.add(text('masked'), 8);
    driver.notify(0);
    expect(irq.level).toBe(0);
    transport.configWrite(PCI_CFG.COMMAND, 2, command);
    expect(irq.level).toBe(InterruptCause.USED_BUFFER);
    expect(driver.takeInterrupts()).toBe(InterruptCause.USED_BUFFER);
  });

  it('works entirely through the PCI_CFG access window', () => {
    const { driver, ring, transport } = live(ALL_WANTED, true);
    ring.add(text('window'), 8);
    driver.notify(0);
    expect(untext(ring.takeUsed()[0]!.data)).toBe('WINDOW');
    expect(driver.takeInterrupts()).toBe(InterruptCause.USED_BUFFER);
    expect(readConfigU64(driver, EchoConfig.serial.offset)).toBe(0x1122334455667788n);
    // The window also works with memory decoding off.
    transport.configWrite(PCI_CFG.COMMAND, 2, 0);
    expect(driver.windowRead(0, VIRTIO_PCI_COMMON.NUMQ, 2)).toBe(3);
  });

  it('ignores window accesses with a bad length, offset or BAR', () => {
    const { driver, transport } = probed();
    const cap = driver.cfgWindow!.capOffset;
    transport.configWrite(cap + 4, 1, 0);
    transport.configWrite(cap + 8, 4, VIRTIO_PCI_COMMON.STATUS);
    transport.configWrite(cap + 12, 4, 3);
    transport.configWrite(cap + 16, 1, STATUS.ACKNOWLEDGE);
    expect(transport.core.status).toBe(0);
    transport.configWrite(cap + 12, 4, 1);
    transport.configWrite(cap + 4, 1, 2);
    transport.configWrite(cap + 16, 1, STATUS.ACKNOWLEDGE);
    expect(transport.core.status).toBe(0);
    transport.configWrite(cap + 4, 1, 0);
    transport.configWrite(cap + 16, 1, STATUS.ACKNOWLEDGE);
    expect(transport.core.status).toBe(STATUS.ACKNOWLEDGE);
  });

  it('resets queues with RING_RESET and the device on status 0, keeping the PCI function set up', () => {
    const { driver, transport, device, memory, irq } = live();
    driver.resetQueue(0);
    expect(driver.queueEnabled(0)).toBe(false);
    const ring = new TestRing(memory, RING_BASE + 0x40000, 4);
    setupQueue(driver, 0, ring);
    ring.add(text('abc'), 4);
    driver.notify(0);
    expect(untext(ring.takeUsed()[0]!.data)).toBe('ABC');
    driver.reset();
    expect(transport.core.snapshot().state).toMatchObject({ status: 0, interruptStatus: 0, negotiated: 0n });
    expect(irq.level).toBe(0);
    expect(device.env).toBeUndefined();
    expect(transport.barAddress(0)).toBe(BAR0_ADDRESS);
    expect(transport.snapshot().pci.config[0]).toBe(0xf4);
  });

  it('function-level reset returns config space to power-on values', () => {
    const { transport, driver, ring, irq, mappings } = live();
    ring.add(text('x'), 4);
    driver.notify(0);
    transport.configWrite(0x3c, 1, 11);
    transport.resetFunction();
    expect(transport.configRead(PCI_CFG.BAR0, 4)).toBe(0x4);
    expect(transport.configRead(PCI_CFG.BAR1, 4)).toBe(0);
    expect(transport.configRead(PCI_CFG.COMMAND, 2)).toBe(0);
    expect(transport.configRead(0x3c, 1)).toBe(0);
    expect(transport.barAddress(0)).toBeUndefined();
    expect(mappings.at(-1)).toBeUndefined();
    expect(transport.core.status).toBe(0);
    expect(irq.level).toBe(0);
    // And the guest can probe it again from scratch.
    expect(new PciDriverTransport(transport, { bar0Address: BAR0_ADDRESS }).numQueues()).toBe(3);
  });

  it('sets DEVICE_NEEDS_RESET and a config interrupt when the model fails', () => {
    const { driver, device, ring, irq } = live();
    device.fault = 'notify';
    ring.add(text('x'), 4);
    driver.notify(0);
    expect(driver.getStatus() & STATUS.DEVICE_NEEDS_RESET).toBe(STATUS.DEVICE_NEEDS_RESET);
    expect(irq.level & InterruptCause.CONFIG_CHANGE).toBe(InterruptCause.CONFIG_CHANGE);
    expect(driver.takeInterrupts() & InterruptCause.CONFIG_CHANGE).toBe(InterruptCause.CONFIG_CHANGE);
  });
});
