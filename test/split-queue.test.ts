import { describe, it, expect } from 'vitest';
import { GuestMemory, GuestMemoryError } from '../src/memory/index.js';
import type { QueueMemory } from '../src/memory/index.js';
import { DescFlag, RingFlag } from '../src/virtio/constants.js';
import { AvailRing, UsedRing } from '../src/virtio/layout.js';
import {
  ChainReader,
  ChainWriter,
  QueueError,
  SplitQueue,
  needsEvent,
  type DescriptorChain,
  type QueueRule,
  type SplitQueueConfig,
} from '../src/virtio/split-queue.js';
import { GuestAllocator, GuestOutOfMemoryError } from '../guest-fixtures/driver/allocator.js';
import {
  DriverQueue,
  readAvailEvent,
  readUsedElem,
  readUsedFlags,
  readUsedIdx,
  setAvailFlags,
  setAvailIdx,
  writeAvailEntry,
  writeDescriptor,
} from '../guest-fixtures/driver/virtqueue.js';
import type { Logger } from '../src/log/logger.js';

const { NEXT, WRITE, INDIRECT } = DescFlag;

interface Setup {
  memory: GuestMemory;
  alloc: GuestAllocator;
  driver: DriverQueue;
  device: SplitQueue;
}

function setup(opts: { size?: number; eventIdx?: boolean; indirect?: boolean; memSize?: number } = {}): Setup {
  const memory = GuestMemory.create(opts.memSize ?? 1 << 20);
  const alloc = new GuestAllocator(0x1000, memory.size - 0x1000);
  const driver = DriverQueue.allocate(memory, alloc, opts.size ?? 8, {
    eventIdx: opts.eventIdx ?? false,
    indirect: opts.indirect ?? false,
  });
  const device = new SplitQueue(memory, driver.config);
  return { memory, alloc, driver, device };
}

function chainOf(result: DescriptorChain | QueueError | null): DescriptorChain {
  if (result === null) throw new Error('expected a chain, queue was empty');
  if (result instanceof QueueError) throw new Error(`expected a chain, got ${result.toString()}`);
  return result;
}

function errorOf(result: DescriptorChain | QueueError | null): QueueError {
  if (!(result instanceof QueueError)) throw new Error(`expected a QueueError, got ${JSON.stringify(result)}`);
  return result;
}

/** Hand-builds ring state: descriptors at `descs`, one avail entry with `head`, avail.idx 1. */
function rawChain(s: Setup, head: number, descs: Record<number, { addr: number | bigint; len: number; flags: number; next?: number }>): void {
  const { memory, driver } = s;
  for (const [i, d] of Object.entries(descs)) {
    writeDescriptor(memory, driver.descAddr, Number(i), { next: 0, ...d });
  }
  writeAvailEntry(memory, driver.driverAddr, driver.size, 0, head);
  setAvailIdx(memory, driver.driverAddr, 1);
}

function expectRule(s: Setup, rule: QueueRule): QueueError {
  const err = errorOf(s.device.pop());
  expect(err.rule).toBe(rule);
  expect(err.reason.length).toBeGreaterThan(0);
  return err;
}

describe('SplitQueue with the driver fixture', () => {
  it('returns null on an empty ring and pops a direct chain with mixed buffers', () => {
    const s = setup();
    const { memory, alloc, driver, device } = s;
    expect(device.pop()).toBeNull();
    expect(device.hasAvailable()).toBe(false);

    const r1 = alloc.alloc(5);
    const r2 = alloc.alloc(7);
    const w1 = alloc.alloc(3);
    const w2 = alloc.alloc(9);
    memory.write(r1, Uint8Array.of(1, 2, 3, 4, 5));
    memory.write(r2, Uint8Array.of(6, 7, 8, 9, 10, 11, 12));
    const head = driver.add(
      { readable: [{ addr: r1, len: 5 }, { addr: r2, len: 7 }], writable: [{ addr: w1, len: 3 }, { addr: w2, len: 9 }] },
      { token: 'req-1' },
    );
    expect(head).toBeDefined();
    expect(driver.freeDescriptors).toBe(4);
    // Added but not published: invisible.
    expect(device.hasAvailable()).toBe(false);
    expect(device.pop()).toBeNull();
    driver.publish();
    expect(device.hasAvailable()).toBe(true);

    const chain = chainOf(device.pop());
    expect(chain.head).toBe(head);
    expect(chain.readable).toEqual([{ addr: r1, len: 5 }, { addr: r2, len: 7 }]);
    expect(chain.writable).toEqual([{ addr: w1, len: 3 }, { addr: w2, len: 9 }]);
    expect(chain.readableLength).toBe(12);
    expect(chain.writableLength).toBe(12);
    expect(device.pop()).toBeNull();

    const reader = new ChainReader(memory, chain.readable);
    const bytes = new Uint8Array(12);
    expect(reader.read(bytes)).toBe(12);
    expect([...bytes]).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    expect(reader.remaining).toBe(0);

    const writer = new ChainWriter(memory, chain.writable);
    expect(writer.write(Uint8Array.of(0xa0, 0xa1, 0xa2, 0xa3, 0xa4))).toBe(5);
    expect(writer.written).toBe(5);
    expect([...memory.view(w1, 3)]).toEqual([0xa0, 0xa1, 0xa2]);
    expect([...memory.view(w2, 2)]).toEqual([0xa3, 0xa4]);

    expect(driver.popUsed()).toBeUndefined();
    device.addUsed(chain.head, writer.written);
    // Not flushed: the driver cannot see it yet.
    expect(driver.popUsed()).toBeUndefined();
    device.flushUsed();
    expect(driver.popUsed()).toEqual({ head, len: 5, token: 'req-1' });
    expect(driver.freeDescriptors).toBe(8);
    expect(device.state()).toEqual({ nextAvail: 1, nextUsed: 1, broken: null });
  });

  it('returns used lengths per head when the device completes out of order', () => {
    const s = setup({ size: 4 });
    const { driver, device, alloc } = s;
    const heads = [0, 1, 2].map((i) => driver.add({ readable: [], writable: [{ addr: alloc.alloc(64), len: 64 }] }, { token: i }));
    expect(driver.add({ readable: [{ addr: alloc.alloc(8), len: 8 }, { addr: alloc.alloc(8), len: 8 }], writable: [] })).toBeUndefined();
    driver.publish();
    const chains = [chainOf(device.pop()), chainOf(device.pop()), chainOf(device.pop())];
    expect(chains.map((c) => c.head)).toEqual(heads);
    device.addUsed(chains[2]!.head, 7);
    device.addUsed(chains[0]!.head, 64);
    device.flushUsed();
    device.pushUsed(chains[1]!.head, 0);
    expect(driver.popUsed()).toEqual({ head: heads[2], len: 7, token: 2 });
    expect(driver.popUsed()).toEqual({ head: heads[0], len: 64, token: 0 });
    expect(driver.popUsed()).toEqual({ head: heads[1], len: 0, token: 1 });
    expect(driver.popUsed()).toBeUndefined();
    expect(driver.freeDescriptors).toBe(4);
  });

  it('pops indirect chains and the driver frees their tables', () => {
    const s = setup({ size: 4, indirect: true });
    const { memory, driver, device, alloc } = s;
    const live = alloc.liveBlocks;
    const readable = [1, 2, 3].map((n) => ({ addr: alloc.alloc(16 * n), len: 16 * n }));
    const writable = [4, 5].map((n) => ({ addr: alloc.alloc(16 * n), len: 16 * n }));
    const head = driver.add({ readable, writable }, { indirect: true, token: 'ind' });
    expect(driver.freeDescriptors).toBe(3);
    expect(alloc.liveBlocks).toBe(live + 5 + 1);
    driver.publish();
    const chain = chainOf(device.pop());
    expect(chain).toEqual({ head, readable, writable, readableLength: 96, writableLength: 144 });
    device.pushUsed(chain.head, 144);
    expect(driver.popUsed()).toEqual({ head, len: 144, token: 'ind' });
    expect(driver.freeDescriptors).toBe(4);
    expect(alloc.liveBlocks).toBe(live + 5);
    expect(memory.size).toBe(1 << 20);
  });

  it('follows direct descriptors into a final indirect table, ignoring WRITE on the table descriptor', () => {
    const s = setup({ size: 8, indirect: true });
    const table = s.alloc.alloc(48, 16);
    writeDescriptor(s.memory, table, 0, { addr: 0x9000, len: 10, flags: NEXT, next: 2 });
    writeDescriptor(s.memory, table, 1, { addr: 0xb000, len: 30, flags: WRITE, next: 0 });
    writeDescriptor(s.memory, table, 2, { addr: 0xa000, len: 20, flags: NEXT | WRITE, next: 1 });
    rawChain(s, 3, {
      3: { addr: 0x8000, len: 4, flags: NEXT, next: 5 },
      5: { addr: table, len: 48, flags: INDIRECT | WRITE },
    });
    const chain = chainOf(s.device.pop());
    expect(chain.head).toBe(3);
    expect(chain.readable).toEqual([{ addr: 0x8000, len: 4 }, { addr: 0x9000, len: 10 }]);
    expect(chain.writable).toEqual([{ addr: 0xa000, len: 20 }, { addr: 0xb000, len: 30 }]);
  });

  it('wraps the 16-bit ring indices: 70,000 buffers through a 4-entry queue', () => {
    const s = setup({ size: 4 });
    const { driver, device, alloc, memory } = s;
    const buf = alloc.alloc(64);
    let total = 0;
    while (total < 70_000) {
      const heads: number[] = [];
      for (let k = 0; k < 3; k++) {
        // 2 + 1 + 1 descriptors: the whole table.
        const writable = k === 0 ? [{ addr: buf + 8, len: 8 }] : [];
        const h = driver.add({ readable: [{ addr: buf, len: 8 }], writable }, { token: total + k });
        if (h === undefined) throw new Error(`no descriptors at ${total + k}`);
        heads.push(h);
      }
      driver.publish();
      const chains = [chainOf(device.pop()), chainOf(device.pop()), chainOf(device.pop())];
      expect(device.pop()).toBeNull();
      // Complete in reverse to keep the free list moving.
      for (let k = 2; k >= 0; k--) device.addUsed(chains[k]!.head, k);
      device.flushUsed();
      for (let k = 2; k >= 0; k--) {
        const used = driver.popUsed();
        if (used?.token !== total + k || used.len !== k || used.head !== heads[k]) {
          throw new Error(`mismatch at ${total + k}: ${JSON.stringify(used)}`);
        }
      }
      total += 3;
    }
    expect(device.state()).toEqual({ nextAvail: total & 0xffff, nextUsed: total & 0xffff, broken: null });
    expect(readUsedIdx(memory, driver.deviceAddr)).toBe(total & 0xffff);
    expect(total).toBeGreaterThan(65_536);
  });
});

describe('notification suppression', () => {
  it('without EVENT_IDX: NO_INTERRUPT silences used notifications, NO_NOTIFY silences kicks', () => {
    const s = setup({ size: 8 });
    const { driver, device, alloc, memory } = s;
    const add = (): number => driver.add({ readable: [{ addr: alloc.alloc(8), len: 8 }], writable: [] })!;

    add();
    driver.publish();
    expect(driver.kickNeeded()).toBe(true);
    // Nothing new published: no kick.
    expect(driver.kickNeeded()).toBe(false);

    device.disableNotifications();
    expect(readUsedFlags(memory, driver.deviceAddr)).toBe(RingFlag.USED_NO_NOTIFY);
    add();
    driver.publish();
    expect(driver.kickNeeded()).toBe(false);
    expect(device.enableNotifications()).toBe(true); // two chains waiting
    expect(readUsedFlags(memory, driver.deviceAddr)).toBe(0);
    add();
    driver.publish();
    expect(driver.kickNeeded()).toBe(true);

    const chains = [chainOf(device.pop()), chainOf(device.pop()), chainOf(device.pop())];
    expect(device.enableNotifications()).toBe(false);
    expect(device.needsNotification()).toBe(false); // nothing published yet
    device.pushUsed(chains[0]!.head, 0);
    expect(device.needsNotification()).toBe(true);
    driver.suppressInterrupts(true);
    device.pushUsed(chains[1]!.head, 0);
    expect(device.needsNotification()).toBe(false);
    expect(driver.suppressInterrupts(false)).toBe(true); // two used entries pending
    device.pushUsed(chains[2]!.head, 0);
    expect(device.needsNotification()).toBe(true);
  });

  it('with EVENT_IDX: the driver kicks only when avail_event is crossed', () => {
    const s = setup({ size: 8, eventIdx: true });
    const { driver, device, alloc, memory } = s;
    const add = (): number => driver.add({ readable: [{ addr: alloc.alloc(8), len: 8 }], writable: [] })!;

    // A device that set NO_NOTIFY by hand is ignored under EVENT_IDX (§2.7.10.1: lower bit ignored).
    memory.writeU16(driver.deviceAddr + UsedRing.flags.offset, RingFlag.USED_NO_NOTIFY);
    add();
    driver.publish();
    expect(driver.kickNeeded()).toBe(true); // avail_event 0 and the driver filled slot 0
    memory.writeU16(driver.deviceAddr + UsedRing.flags.offset, 0);
    add();
    driver.publish();
    expect(driver.kickNeeded()).toBe(false); // the device has not moved avail_event

    chainOf(device.pop());
    expect(readAvailEvent(memory, driver.deviceAddr, 8)).toBe(1);
    chainOf(device.pop());
    expect(readAvailEvent(memory, driver.deviceAddr, 8)).toBe(2);
    add();
    driver.publish();
    expect(driver.kickNeeded()).toBe(true);

    // Disabled: pop leaves avail_event behind, so no kicks.
    device.disableNotifications();
    chainOf(device.pop());
    expect(readAvailEvent(memory, driver.deviceAddr, 8)).toBe(2);
    add();
    driver.publish();
    add();
    driver.publish();
    expect(driver.kickNeeded()).toBe(false);
    // Re-enable: the device sees the two waiting chains without a kick.
    expect(device.enableNotifications()).toBe(true);
    expect(readAvailEvent(memory, driver.deviceAddr, 8)).toBe(3);
    chainOf(device.pop());
    chainOf(device.pop());
    expect(device.enableNotifications()).toBe(false);
    add();
    add();
    driver.publish();
    expect(driver.kickNeeded()).toBe(true); // the batch covers avail_event 5
  });

  it('with EVENT_IDX: the device notifies only when used_event is crossed', () => {
    const s = setup({ size: 8, eventIdx: true });
    const { driver, device, alloc, memory } = s;
    for (let i = 0; i < 6; i++) driver.add({ readable: [], writable: [{ addr: alloc.alloc(8), len: 8 }] }, { token: i });
    driver.publish();
    const chains = Array.from({ length: 6 }, () => chainOf(device.pop()));

    // avail.flags is ignored under EVENT_IDX (§2.7.7.2).
    setAvailFlags(memory, driver.driverAddr, RingFlag.AVAIL_NO_INTERRUPT);
    device.pushUsed(chains[0]!.head, 1); // used_event 0 reached
    expect(device.needsNotification()).toBe(true);
    device.pushUsed(chains[1]!.head, 1); // driver has not consumed: used_event still 0
    expect(device.needsNotification()).toBe(false);
    expect(driver.popUsed()?.token).toBe(0);
    expect(driver.popUsed()?.token).toBe(1); // used_event now 2
    device.addUsed(chains[2]!.head, 1);
    device.addUsed(chains[3]!.head, 1);
    device.flushUsed(); // used.idx 2 -> 4 passes used_event 2
    expect(device.needsNotification()).toBe(true);

    driver.suppressInterrupts(true);
    device.pushUsed(chains[4]!.head, 1);
    expect(device.needsNotification()).toBe(false);
    expect(driver.suppressInterrupts(false)).toBe(true); // three entries already there
    expect(driver.popUsed()?.token).toBe(2);
    expect(driver.popUsed()?.token).toBe(3);
    expect(driver.popUsed()?.token).toBe(4);
    device.pushUsed(chains[5]!.head, 1);
    expect(device.needsNotification()).toBe(true);
  });

  it('implements the event index rule across the 16-bit wrap', () => {
    expect(needsEvent(0xffff, 0x0001, 0xfffe)).toBe(true);
    expect(needsEvent(0x0001, 0x0001, 0xfffe)).toBe(false);
    expect(needsEvent(0x0000, 0x0001, 0x0000)).toBe(true);
    expect(needsEvent(0x0001, 0x0001, 0x0000)).toBe(false);
  });
});

describe('malformed rings give a QueueError naming the rule', () => {
  it('rejects queue placement: size, alignment, rings outside memory', () => {
    const memory = GuestMemory.create(0x4000);
    const base: SplitQueueConfig = { size: 8, descAddr: 0x0, driverAddr: 0x100, deviceAddr: 0x200, eventIdx: true, indirect: false };
    const cases: Partial<SplitQueueConfig>[] = [
      { size: 6 },
      { size: 0 },
      { size: 65536 },
      { descAddr: 0x8 },
      { driverAddr: 0x101 },
      { deviceAddr: 0x202 },
      { descAddr: 0x3f90 }, // 128-byte table overruns the 16 KiB memory
      { driverAddr: 0x3fec }, // 22 bytes incl. used_event: last 2 bytes outside
      { deviceAddr: 0x3fbc }, // 70 bytes incl. avail_event: last 2 bytes outside
      { deviceAddr: Number.NaN },
    ];
    for (const c of cases) {
      const q = new SplitQueue(memory, { ...base, ...c });
      const err = errorOf(q.pop());
      expect(err.rule, JSON.stringify(c)).toBe('queue-config');
      expect(q.hasAvailable()).toBe(false);
      // Nothing may be written to an unusable ring, and nothing throws.
      q.disableNotifications();
      expect(q.enableNotifications()).toBe(false);
      q.pushUsed(0, 0);
      expect(q.needsNotification()).toBe(false);
    }
    // The placement at the very end of memory is fine.
    const ok = new SplitQueue(memory, { ...base, descAddr: 0x3f80, driverAddr: 0x3fea, deviceAddr: 0x3fb8 });
    expect(ok.pop()).toBeNull();
    expect(ok.broken).toBeNull();
  });

  it('avail.idx more than the queue size ahead', () => {
    const s = setup({ size: 8 });
    setAvailIdx(s.memory, s.driver.driverAddr, 9);
    expect(expectRule(s, 'avail-idx').reason).toMatch(/9/);
  });

  it('accepts avail.idx exactly the queue size ahead', () => {
    const s = setup({ size: 2 });
    rawChain(s, 0, { 0: { addr: 0x8000, len: 1, flags: 0 } });
    writeAvailEntry(s.memory, s.driver.driverAddr, 2, 1, 0);
    setAvailIdx(s.memory, s.driver.driverAddr, 2);
    expect(chainOf(s.device.pop()).head).toBe(0);
    expect(chainOf(s.device.pop()).head).toBe(0);
    expect(s.device.pop()).toBeNull();
  });

  it('head index outside the table', () => {
    const s = setup({ size: 8 });
    writeAvailEntry(s.memory, s.driver.driverAddr, 8, 0, 8);
    setAvailIdx(s.memory, s.driver.driverAddr, 1);
    expectRule(s, 'head-index');
  });

  it('next index outside the table', () => {
    const s = setup({ size: 8 });
    rawChain(s, 0, { 0: { addr: 0x8000, len: 4, flags: NEXT, next: 8 } });
    expectRule(s, 'next-index');
  });

  it('next index outside an indirect table', () => {
    const s = setup({ size: 8, indirect: true });
    const table = s.alloc.alloc(32, 16);
    writeDescriptor(s.memory, table, 0, { addr: 0x8000, len: 4, flags: NEXT, next: 2 });
    rawChain(s, 0, { 0: { addr: table, len: 32, flags: INDIRECT } });
    expectRule(s, 'next-index');
  });

  it('a loop is caught by the chain length limit', () => {
    const s = setup({ size: 8 });
    rawChain(s, 0, {
      0: { addr: 0x8000, len: 4, flags: NEXT, next: 1 },
      1: { addr: 0x8000, len: 4, flags: NEXT, next: 0 },
    });
    expectRule(s, 'chain-length');
  });

  it('a loop inside an indirect table', () => {
    const s = setup({ size: 8, indirect: true });
    const table = s.alloc.alloc(64, 16);
    for (let i = 0; i < 4; i++) writeDescriptor(s.memory, table, i, { addr: 0x8000, len: 4, flags: NEXT, next: (i + 1) % 4 });
    rawChain(s, 0, { 0: { addr: table, len: 64, flags: INDIRECT } });
    expectRule(s, 'chain-length');
  });

  it('a chain using every descriptor of the table is fine', () => {
    const s = setup({ size: 4 });
    rawChain(s, 2, {
      2: { addr: 0x8000, len: 1, flags: NEXT, next: 0 },
      0: { addr: 0x8001, len: 1, flags: NEXT, next: 3 },
      3: { addr: 0x8002, len: 1, flags: NEXT | WRITE, next: 1 },
      1: { addr: 0x8003, len: 1, flags: WRITE },
    });
    const chain = chainOf(s.device.pop());
    expect(chain.readableLength).toBe(2);
    expect(chain.writableLength).toBe(2);
  });

  it('INDIRECT without VIRTIO_F_INDIRECT_DESC', () => {
    const s = setup({ size: 8, indirect: false });
    const table = s.alloc.alloc(16, 16);
    writeDescriptor(s.memory, table, 0, { addr: 0x8000, len: 4, flags: 0, next: 0 });
    rawChain(s, 0, { 0: { addr: table, len: 16, flags: INDIRECT } });
    expectRule(s, 'indirect-feature');
  });

  it('INDIRECT together with NEXT', () => {
    const s = setup({ size: 8, indirect: true });
    const table = s.alloc.alloc(16, 16);
    writeDescriptor(s.memory, table, 0, { addr: 0x8000, len: 4, flags: 0, next: 0 });
    rawChain(s, 0, {
      0: { addr: table, len: 16, flags: INDIRECT | NEXT, next: 1 },
      1: { addr: 0x8000, len: 4, flags: 0 },
    });
    expectRule(s, 'indirect-next');
  });

  it.each([
    ['zero length', 0],
    ['length not a multiple of 16', 24],
    ['more than 32768 descriptors', 32769 * 16],
  ])('indirect table with %s', (_name, len) => {
    const s = setup({ size: 8, indirect: true, memSize: 1 << 20 });
    rawChain(s, 0, { 0: { addr: 0x2000, len, flags: INDIRECT } });
    expectRule(s, 'indirect-table');
  });

  it('indirect table outside memory', () => {
    const s = setup({ size: 8, indirect: true, memSize: 1 << 16 });
    rawChain(s, 0, { 0: { addr: (1 << 16) - 16, len: 32, flags: INDIRECT } });
    expectRule(s, 'indirect-table');
  });

  it('indirect table at an unaligned address is accepted', () => {
    const s = setup({ size: 8, indirect: true });
    const table = s.alloc.alloc(40, 16) + 3;
    writeDescriptor(s.memory, table, 0, { addr: 0x8000, len: 4, flags: NEXT | WRITE, next: 1 });
    writeDescriptor(s.memory, table, 1, { addr: 0x9000, len: 5, flags: WRITE, next: 0 });
    rawChain(s, 0, { 0: { addr: table, len: 32, flags: INDIRECT } });
    expect(chainOf(s.device.pop()).writableLength).toBe(9);
  });

  it('nested indirect table', () => {
    const s = setup({ size: 8, indirect: true });
    const inner = s.alloc.alloc(16, 16);
    const outer = s.alloc.alloc(32, 16);
    writeDescriptor(s.memory, inner, 0, { addr: 0x8000, len: 4, flags: 0, next: 0 });
    writeDescriptor(s.memory, outer, 0, { addr: 0x8000, len: 4, flags: NEXT, next: 1 });
    writeDescriptor(s.memory, outer, 1, { addr: inner, len: 16, flags: INDIRECT, next: 0 });
    rawChain(s, 0, { 0: { addr: outer, len: 32, flags: INDIRECT } });
    expectRule(s, 'nested-indirect');
  });

  it('device-readable descriptor after a device-writable one', () => {
    const s = setup({ size: 8 });
    rawChain(s, 0, {
      0: { addr: 0x8000, len: 4, flags: NEXT | WRITE, next: 1 },
      1: { addr: 0x9000, len: 4, flags: 0 },
    });
    expectRule(s, 'write-order');
  });

  it('device-readable descriptor inside an indirect table after a writable direct one', () => {
    const s = setup({ size: 8, indirect: true });
    const table = s.alloc.alloc(16, 16);
    writeDescriptor(s.memory, table, 0, { addr: 0x9000, len: 4, flags: 0, next: 0 });
    rawChain(s, 0, {
      0: { addr: 0x8000, len: 4, flags: NEXT | WRITE, next: 1 },
      1: { addr: table, len: 16, flags: INDIRECT },
    });
    expectRule(s, 'write-order');
  });

  it.each([
    ['past the end of memory', 1 << 16, 4],
    ['straddling the end of memory', (1 << 16) - 2, 4],
    ['at an address of 2^53 or more', 1n << 60n, 4],
    ['in the hole between regions', 0x10000 + 0x1000, 1],
  ])('buffer %s', (_name, addr, len) => {
    const memory = GuestMemory.create([
      { base: 0, size: 1 << 16 },
      { base: 0x20000, size: 1 << 16 },
    ]);
    const alloc = new GuestAllocator(0x1000, 0xf000);
    const driver = DriverQueue.allocate(memory, alloc, 8, { eventIdx: false, indirect: false });
    const s: Setup = { memory, alloc, driver, device: new SplitQueue(memory, driver.config) };
    rawChain(s, 0, { 0: { addr: 0x8000, len: 4, flags: NEXT, next: 1 }, 1: { addr, len, flags: WRITE } });
    expectRule(s, 'buffer-range');
  });

  it('chain longer than 2^32 - 1 bytes', () => {
    const s = setup({ size: 8, indirect: true, memSize: 1 << 21 });
    const entries = 4096; // 4096 x 1 MiB = 2^32
    const table = s.alloc.alloc(entries * 16, 16);
    for (let i = 0; i < entries; i++) {
      writeDescriptor(s.memory, table, i, { addr: 0x100000, len: 0x100000, flags: i + 1 < entries ? NEXT : 0, next: i + 1 });
    }
    rawChain(s, 0, { 0: { addr: table, len: entries * 16, flags: INDIRECT } });
    expectRule(s, 'chain-size');
  });

  it('a ring access that faults after setup (mapping removed) becomes a QueueError, not an exception', () => {
    const inner = GuestMemory.create(1 << 16);
    let unmapped = false;
    const guard = <T>(f: () => T): T => {
      if (unmapped) throw new GuestMemoryError(0, 0, 'unmapped');
      return f();
    };
    const memory: QueueMemory = {
      contains: (a, l) => inner.contains(a, l),
      readU16: (a) => guard(() => inner.readU16(a)),
      readU32: (a) => guard(() => inner.readU32(a)),
      readU64Address: (a) => guard(() => inner.readU64Address(a)),
      writeU16: (a, v) => guard(() => inner.writeU16(a, v)),
      writeU32: (a, v) => guard(() => inner.writeU32(a, v)),
      atomicLoadU16: (a) => guard(() => inner.atomicLoadU16(a)),
      atomicStoreU16: (a, v) => guard(() => inner.atomicStoreU16(a, v)),
      read: (a, into) => guard(() => inner.read(a, into)),
      write: (a, from) => guard(() => inner.write(a, from)),
    };
    const alloc = new GuestAllocator(0x1000, 0xf000);
    const driver = DriverQueue.allocate(memory, alloc, 8, { eventIdx: true, indirect: false });
    const warnings: unknown[] = [];
    const log: Logger = {
      trace: () => undefined,
      debug: () => undefined,
      info: () => undefined,
      warn: (obj: unknown) => void warnings.push(obj),
      error: () => undefined,
      child: () => log,
    };
    const device = new SplitQueue(memory, driver.config, log);
    driver.add({ readable: [{ addr: 0x8000, len: 4 }], writable: [] });
    driver.publish();
    const chain = chainOf(device.pop());
    unmapped = true;
    expect(() => device.pushUsed(chain.head, 0)).not.toThrow();
    expect(errorOf(device.pop()).rule).toBe('memory-fault');
    expect(device.needsNotification()).toBe(false);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatchObject({ rule: 'memory-fault' });
  });

  it('an impossible used entry from the device model breaks the queue without throwing', () => {
    const s = setup({ size: 8 });
    s.driver.add({ readable: [{ addr: 0x8000, len: 4 }], writable: [] });
    s.driver.publish();
    const chain = chainOf(s.device.pop());
    expect(() => s.device.addUsed(8, 0)).not.toThrow();
    expect(errorOf(s.device.pop()).rule).toBe('device-used');
    // The outstanding chain can still be completed.
    s.device.pushUsed(chain.head, 0);
    expect(s.driver.popUsed()?.head).toBe(chain.head);

    const t = setup({ size: 8 });
    t.device.pushUsed(0, 0); // nothing was ever popped
    expect(errorOf(t.device.pop()).rule).toBe('device-used');
    expect(readUsedIdx(t.memory, t.driver.deviceAddr)).toBe(0);
  });
});

describe('broken queue and restore', () => {
  it('stays broken after the ring is repaired', () => {
    const s = setup({ size: 8 });
    writeAvailEntry(s.memory, s.driver.driverAddr, 8, 0, 200);
    setAvailIdx(s.memory, s.driver.driverAddr, 1);
    const first = errorOf(s.device.pop());
    writeDescriptor(s.memory, s.driver.descAddr, 0, { addr: 0x8000, len: 4, flags: 0, next: 0 });
    writeAvailEntry(s.memory, s.driver.driverAddr, 8, 0, 0);
    expect(s.device.pop()).toBe(first);
    expect(s.device.pop()).toBe(first);
    expect(s.device.hasAvailable()).toBe(false);
    expect(s.device.state()).toEqual({ nextAvail: 0, nextUsed: 0, broken: first.reason });
    s.device.restore({ nextAvail: 0, nextUsed: 0 });
    expect(s.device.pop()).toBe(first);
    // A fresh queue on the repaired ring works.
    expect(chainOf(new SplitQueue(s.memory, s.driver.config).pop()).head).toBe(0);
  });

  it('continues a queue from a saved state', () => {
    const s = setup({ size: 4, eventIdx: true });
    const { driver, device, alloc, memory } = s;
    const buf = alloc.alloc(16);
    for (let i = 0; i < 5; i++) {
      driver.add({ readable: [{ addr: buf, len: 16 }], writable: [] }, { token: i });
      driver.publish();
      device.pushUsed(chainOf(device.pop()).head, i);
      expect(driver.popUsed()?.token).toBe(i);
    }
    driver.add({ readable: [{ addr: buf, len: 16 }], writable: [] }, { token: 5 });
    driver.add({ readable: [{ addr: buf, len: 16 }], writable: [] }, { token: 6 });
    driver.publish();
    const inFlight = chainOf(device.pop());
    const saved = device.state();
    expect(saved).toEqual({ nextAvail: 6, nextUsed: 5, broken: null });

    const moved = new SplitQueue(memory, driver.config);
    moved.restore(saved);
    expect(moved.state()).toEqual(saved);
    const next = chainOf(moved.pop());
    moved.addUsed(inFlight.head, 50);
    moved.addUsed(next.head, 60);
    moved.flushUsed();
    // Unknown driver view after restore: notify once to be safe.
    expect(moved.needsNotification()).toBe(true);
    expect(driver.popUsed()).toMatchObject({ token: 5, len: 50 });
    expect(driver.popUsed()).toMatchObject({ token: 6, len: 60 });
    expect(readUsedElem(memory, driver.deviceAddr, 4, 6)).toEqual({ id: next.head, len: 60 });
    expect(moved.state()).toEqual({ nextAvail: 7, nextUsed: 7, broken: null });

    expect(() => moved.restore({ nextAvail: 65536, nextUsed: 0 })).toThrow(RangeError);
    expect(() => moved.restore({ nextAvail: 0, nextUsed: -1 })).toThrow(RangeError);
    expect(() => moved.restore({ nextAvail: 1.5, nextUsed: 0 })).toThrow(RangeError);
  });

  it('restores to a position near the 16-bit wrap', () => {
    const s = setup({ size: 4 });
    const { memory, driver, device } = s;
    writeDescriptor(memory, driver.descAddr, 1, { addr: 0x8000, len: 4, flags: 0, next: 0 });
    writeAvailEntry(memory, driver.driverAddr, 4, 0xffff, 1);
    writeAvailEntry(memory, driver.driverAddr, 4, 0x10000, 1);
    setAvailIdx(memory, driver.driverAddr, 1);
    memory.writeU16(driver.deviceAddr + UsedRing.idx.offset, 0xffff);
    device.restore({ nextAvail: 0xffff, nextUsed: 0xffff });
    const a = chainOf(device.pop());
    const b = chainOf(device.pop());
    expect(device.pop()).toBeNull();
    device.addUsed(a.head, 1);
    device.addUsed(b.head, 2);
    device.flushUsed();
    expect(readUsedIdx(memory, driver.deviceAddr)).toBe(1);
    expect(readUsedElem(memory, driver.deviceAddr, 4, 0xffff)).toEqual({ id: 1, len: 1 });
    expect(readUsedElem(memory, driver.deviceAddr, 4, 0)).toEqual({ id: 1, len: 2 });
    expect(memory.readU16(driver.driverAddr + AvailRing.idx.offset)).toBe(1);
  });
});

describe('ChainReader and ChainWriter', () => {
  it('read scalars across segment boundaries and skip empty segments', () => {
    const memory = GuestMemory.create(0x1000);
    memory.write(0x100, Uint8Array.of(0x01, 0x02, 0x03));
    memory.write(0x200, Uint8Array.of(0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e));
    const r = new ChainReader(memory, [
      { addr: 0x50, len: 0 },
      { addr: 0x100, len: 3 },
      { addr: 0x180, len: 0 },
      { addr: 0x200, len: 11 },
    ]);
    expect(r.remaining).toBe(14);
    expect(r.readU8()).toBe(0x01);
    expect(r.readU32()).toBe(0x05040302);
    expect(r.readU64()).toBe(0x0d0c0b0a09080706n);
    expect(r.readU16()).toBeUndefined(); // one byte left: nothing consumed
    expect(r.remaining).toBe(1);
    expect(r.readBytes(2)).toBeUndefined();
    expect(r.readBytes(1)).toEqual(Uint8Array.of(0x0e));
    expect(r.readU8()).toBeUndefined();
    expect(r.read(new Uint8Array(4))).toBe(0);
  });

  it('skips and reads partially', () => {
    const memory = GuestMemory.create(0x1000);
    memory.write(0x10, Uint8Array.of(1, 2, 3, 4));
    memory.write(0x20, Uint8Array.of(5, 6));
    const r = new ChainReader(memory, [{ addr: 0x10, len: 4 }, { addr: 0x20, len: 2 }]);
    expect(r.skip(7)).toBe(false);
    expect(r.skip(3)).toBe(true);
    const out = new Uint8Array(8);
    expect(r.read(out)).toBe(3);
    expect([...out.subarray(0, 3)]).toEqual([4, 5, 6]);
  });

  it('writes scalars across segments and stops at the end', () => {
    const memory = GuestMemory.create(0x1000);
    const w = new ChainWriter(memory, [
      { addr: 0x100, len: 3 },
      { addr: 0x300, len: 0 },
      { addr: 0x200, len: 6 },
    ]);
    expect(w.writeU16(0x0201)).toBe(true);
    expect(w.writeU32(0x06050403)).toBe(true);
    expect(w.writeU32(0xdeadbeef)).toBe(false); // 3 left: nothing written
    expect(w.written).toBe(6);
    expect(w.writeU8(0x07)).toBe(true);
    expect(w.write(Uint8Array.of(8, 9, 10, 11))).toBe(2);
    expect(w.remaining).toBe(0);
    expect(w.written).toBe(9);
    expect(w.writeU64(1n)).toBe(false);
    expect([...memory.view(0x100, 3)]).toEqual([1, 2, 3]);
    expect([...memory.view(0x200, 6)]).toEqual([4, 5, 6, 7, 8, 9]);
  });
});

describe('GuestAllocator', () => {
  it('aligns, frees, merges and reports exhaustion', () => {
    const a = new GuestAllocator(0x1000, 0x1000);
    const x = a.alloc(3, 1);
    const y = a.alloc(16, 16);
    expect(x).toBe(0x1000);
    expect(y).toBe(0x1010);
    const z = a.alloc(1, 4);
    expect(z).toBe(0x1004);
    expect(() => a.alloc(0x1000, 1)).toThrow(GuestOutOfMemoryError);
    a.free(x);
    a.free(y);
    a.free(z);
    expect(a.available).toBe(0x1000);
    expect(a.alloc(0x1000, 0x1000)).toBe(0x1000);
    expect(() => a.free(0x1234)).toThrow(RangeError);
    expect(() => a.alloc(4, 3)).toThrow(RangeError);
  });
});
