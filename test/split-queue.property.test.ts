import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { GuestMemory } from '../src/memory/index.js';
import type { QueueMemory } from '../src/memory/index.js';
import { DescFlag, MAX_QUEUE_SIZE } from '../src/virtio/constants.js';
import { AvailRing, UsedRing } from '../src/virtio/layout.js';
import {
  ChainReader,
  ChainWriter,
  QueueError,
  SplitQueue,
  type BufferSegment,
  type DescriptorChain,
  type SplitQueueConfig,
} from '../src/virtio/split-queue.js';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { DriverQueue, setAvailIdx, writeAvailEntry, writeDescriptor } from '../guest-fixtures/driver/virtqueue.js';
import { fuzzParams } from './support/fuzz.js';

describe('split queue round trip (driver fixture -> device -> driver)', () => {
  const bufferArb = fc.record({
    readable: fc.array(fc.integer({ min: 0, max: 64 }), { maxLength: 4 }),
    writable: fc.array(fc.integer({ min: 0, max: 64 }), { maxLength: 4 }),
    indirect: fc.boolean(),
    /** Bytes the device writes, as a fraction of the writable length. */
    fill: fc.double({ min: 0, max: 1, noNaN: true }),
    /** Completion priority among the chains the device holds. */
    priority: fc.integer({ min: 0, max: 1000 }),
    seed: fc.integer({ min: 0, max: 255 }),
  });

  it('pops exactly the segments the driver added and returns the used lengths written', () => {
    fc.assert(
      fc.property(
        fc.constantFrom(1, 2, 4, 8, 16),
        fc.boolean(),
        fc.boolean(),
        fc.array(bufferArb, { minLength: 1, maxLength: 24 }),
        (size, eventIdx, indirectFeature, specs) => {
          const memory = GuestMemory.create(1 << 20);
          const alloc = new GuestAllocator(0x1000, memory.size - 0x1000);
          const driver = DriverQueue.allocate(memory, alloc, size, { eventIdx, indirect: indirectFeature });
          const device = new SplitQueue(memory, driver.config);

          interface Pending {
            readonly index: number;
            readonly readable: BufferSegment[];
            readonly writable: BufferSegment[];
            readonly indirect: boolean;
            written: number;
          }
          const buffers: Pending[] = specs.map((spec, index) => {
            let readableLens = spec.readable;
            let writableLens = spec.writable;
            if (readableLens.length + writableLens.length === 0) readableLens = [8];
            const indirect = indirectFeature && spec.indirect;
            if (!indirect) {
              // A direct chain must fit the table.
              writableLens = writableLens.slice(0, Math.max(0, size - readableLens.length));
              readableLens = readableLens.slice(0, size - writableLens.length);
            }
            const segment = (len: number): BufferSegment => ({ addr: alloc.alloc(len, 1), len });
            const readable = readableLens.map(segment);
            const writable = writableLens.map(segment);
            readable.forEach((s, k) => {
              memory.write(s.addr, Uint8Array.from({ length: s.len }, (_, i) => (spec.seed + 7 * k + i) & 0xff));
            });
            writable.forEach((s) => memory.fill(s.addr, s.len, 0));
            return { index, readable, writable, indirect, written: 0 };
          });

          let nextToAdd = 0;
          let returned = 0;
          const held: { chain: DescriptorChain; buf: Pending }[] = [];
          const byHead = new Map<number, Pending>();
          for (let round = 0; returned < buffers.length; round++) {
            if (round > 4 * buffers.length + 10) throw new Error('no progress');
            // Driver: add while descriptors last.
            while (nextToAdd < buffers.length) {
              const b = buffers[nextToAdd]!;
              const head = driver.add({ readable: b.readable, writable: b.writable }, { indirect: b.indirect, token: b });
              if (head === undefined) break;
              expect(byHead.has(head)).toBe(false);
              byHead.set(head, b);
              nextToAdd++;
            }
            driver.publish();

            // Device: take everything, check it, complete the higher-priority half.
            for (let r = device.pop(); r !== null; r = device.pop()) {
              if (r instanceof QueueError) throw new Error(r.toString());
              const b = byHead.get(r.head);
              if (b === undefined) throw new Error(`unexpected head ${r.head}`);
              expect(r.readable).toEqual(b.readable);
              expect(r.writable).toEqual(b.writable);
              expect(r.readableLength).toBe(b.readable.reduce((a, s) => a + s.len, 0));
              expect(r.writableLength).toBe(b.writable.reduce((a, s) => a + s.len, 0));
              const got = new Uint8Array(r.readableLength);
              expect(new ChainReader(memory, r.readable).read(got)).toBe(r.readableLength);
              let expected = 0;
              let bad = 0;
              b.readable.forEach((s, k) => {
                for (let i = 0; i < s.len; i++) if (got[expected++] !== ((specs[b.index]!.seed + 7 * k + i) & 0xff)) bad++;
              });
              expect(bad).toBe(0);
              held.push({ chain: r, buf: b });
            }
            held.sort((x, y) => specs[y.buf.index]!.priority - specs[x.buf.index]!.priority);
            const done = held.splice(0, Math.max(1, Math.ceil(held.length / 2)));
            for (const { chain, buf } of done) {
              const n = Math.floor(specs[buf.index]!.fill * chain.writableLength);
              const writer = new ChainWriter(memory, chain.writable);
              writer.write(Uint8Array.from({ length: n }, (_, i) => (buf.index + i) & 0xff));
              buf.written = writer.written;
              device.addUsed(chain.head, writer.written);
            }
            device.flushUsed();

            // Driver: reap, check lengths and bytes, free the buffers.
            for (let u = driver.popUsed(); u !== undefined; u = driver.popUsed()) {
              const b = u.token as Pending;
              expect(byHead.get(u.head)).toBe(b);
              byHead.delete(u.head);
              expect(u.len).toBe(b.written);
              const all = new Uint8Array(b.writable.reduce((a, s) => a + s.len, 0));
              let at = 0;
              for (const s of b.writable) {
                all.set(memory.view(s.addr, s.len), at);
                at += s.len;
              }
              let bad = 0;
              for (let i = 0; i < all.length; i++) if (all[i] !== (i < u.len ? (b.index + i) & 0xff : 0)) bad++;
              expect(bad).toBe(0);
              for (const s of [...b.readable, ...b.writable]) alloc.free(s.addr);
              returned++;
            }
          }
          expect(driver.freeDescriptors).toBe(size);
          expect(device.pop()).toBeNull();
          expect(device.state()).toEqual({ nextAvail: buffers.length, nextUsed: buffers.length, broken: null });
        },
      ),
      fuzzParams(0x51a7, 200),
    );
  });
});

/** A QueueMemory that records every access before delegating. */
class SpyMemory implements QueueMemory {
  readonly accesses: { op: string; addr: number; len: number }[] = [];
  constructor(private readonly inner: GuestMemory) {}
  private note(op: string, addr: number, len: number): void {
    this.accesses.push({ op, addr, len });
  }
  contains(addr: number, length: number): boolean {
    return this.inner.contains(addr, length);
  }
  readU16(addr: number): number {
    this.note('readU16', addr, 2);
    return this.inner.readU16(addr);
  }
  readU32(addr: number): number {
    this.note('readU32', addr, 4);
    return this.inner.readU32(addr);
  }
  readU64Address(addr: number): number {
    this.note('readU64Address', addr, 8);
    return this.inner.readU64Address(addr);
  }
  writeU16(addr: number, value: number): void {
    this.note('writeU16', addr, 2);
    this.inner.writeU16(addr, value);
  }
  writeU32(addr: number, value: number): void {
    this.note('writeU32', addr, 4);
    this.inner.writeU32(addr, value);
  }
  atomicLoadU16(addr: number): number {
    this.note('atomicLoadU16', addr, 2);
    return this.inner.atomicLoadU16(addr);
  }
  atomicStoreU16(addr: number, value: number): void {
    this.note('atomicStoreU16', addr, 2);
    this.inner.atomicStoreU16(addr, value);
  }
  read(addr: number, into: Uint8Array): void {
    this.note('read', addr, into.length);
    this.inner.read(addr, into);
  }
  write(addr: number, from: Uint8Array): void {
    this.note('write', addr, from.length);
    this.inner.write(addr, from);
  }
}

type Walk = { kind: 'empty' } | { kind: 'error' } | { kind: 'chain'; chain: DescriptorChain };

interface RawDesc {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

/**
 * A deliberately plain reading of the spec rules, independent of SplitQueue's single-pass walk:
 * collect the descriptors first (direct part, then an indirect table), then judge the buffers.
 */
function referenceWalk(mem: GuestMemory, cfg: SplitQueueConfig, nextAvail: number): Walk {
  const { size, descAddr, driverAddr, deviceAddr } = cfg;
  const powerOfTwo = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768].includes(size);
  if (
    !powerOfTwo ||
    descAddr % 16 !== 0 ||
    driverAddr % 2 !== 0 ||
    deviceAddr % 4 !== 0 ||
    !mem.contains(descAddr, 16 * size) ||
    !mem.contains(driverAddr, 6 + 2 * size) ||
    !mem.contains(deviceAddr, 6 + 8 * size)
  ) {
    return { kind: 'error' };
  }
  const availIdx = mem.readU16(driverAddr + 2);
  if (availIdx === nextAvail) return { kind: 'empty' };
  if ((availIdx - nextAvail + 0x10000) % 0x10000 > size) return { kind: 'error' };
  const head = mem.readU16(driverAddr + 4 + 2 * (nextAvail % size));
  if (head >= size) return { kind: 'error' };

  const readDesc = (table: number, i: number): RawDesc => ({
    addr: mem.readU64(table + 16 * i),
    len: mem.readU32(table + 16 * i + 8),
    flags: mem.readU16(table + 16 * i + 12),
    next: mem.readU16(table + 16 * i + 14),
  });
  const has = (d: RawDesc, f: number): boolean => (d.flags & f) !== 0;

  const descs: RawDesc[] = [];
  let pointer: RawDesc | undefined;
  let i = head;
  for (let seen = 0; ; ) {
    if (seen === size) return { kind: 'error' };
    const d = readDesc(descAddr, i);
    seen++;
    if (has(d, DescFlag.INDIRECT)) {
      pointer = d;
      break;
    }
    descs.push(d);
    if (!has(d, DescFlag.NEXT)) break;
    if (d.next >= size) return { kind: 'error' };
    i = d.next;
  }
  if (pointer !== undefined) {
    if (!cfg.indirect || has(pointer, DescFlag.NEXT)) return { kind: 'error' };
    if (pointer.len === 0 || pointer.len % 16 !== 0 || pointer.len / 16 > MAX_QUEUE_SIZE) return { kind: 'error' };
    const table = Number(pointer.addr);
    if (pointer.addr >= 1n << 53n || !mem.contains(table, pointer.len)) return { kind: 'error' };
    const n = pointer.len / 16;
    let j = 0;
    for (let seen = 0; ; ) {
      if (seen === n) return { kind: 'error' };
      const d = readDesc(table, j);
      seen++;
      if (has(d, DescFlag.INDIRECT)) return { kind: 'error' };
      descs.push(d);
      if (!has(d, DescFlag.NEXT)) break;
      if (d.next >= n) return { kind: 'error' };
      j = d.next;
    }
  }

  const readable: BufferSegment[] = [];
  const writable: BufferSegment[] = [];
  let total = 0;
  for (const d of descs) {
    if (d.addr >= 1n << 53n || !mem.contains(Number(d.addr), d.len)) return { kind: 'error' };
    total += d.len;
    if (total > 0xffff_ffff) return { kind: 'error' };
    if (has(d, DescFlag.WRITE)) writable.push({ addr: Number(d.addr), len: d.len });
    else if (writable.length > 0) return { kind: 'error' };
    else readable.push({ addr: Number(d.addr), len: d.len });
  }
  const sum = (s: BufferSegment[]): number => s.reduce((a, b) => a + b.len, 0);
  return { kind: 'chain', chain: { head, readable, writable, readableLength: sum(readable), writableLength: sum(writable) } };
}

describe('split queue against hostile ring contents', () => {
  const { NEXT, WRITE, INDIRECT } = DescFlag;
  // Small guest: two 4 KiB regions with a hole between them, so stray addresses miss often.
  const REGIONS = [
    { base: 0x0000, size: 0x1000 },
    { base: 0x2000, size: 0x1000 },
  ];
  const INDIRECT_AREA = 0x400; // 64 descriptors of random content, where indirect pointers tend to land
  const INDIRECT_COUNT = 64;
  const u16 = fc.integer({ min: 0, max: 0xffff });

  const descArb = fc.record({
    addr: fc.oneof(
      { weight: 8, arbitrary: fc.oneof(fc.integer({ min: 0, max: 0xe00 }), fc.integer({ min: 0x2000, max: 0x2e00 })).map(BigInt) },
      { weight: 2, arbitrary: fc.integer({ min: 0, max: 0x3100 }).map(BigInt) },
      // The last few descriptors' worth of a region: tables and buffers that run off its end.
      { weight: 2, arbitrary: fc.integer({ min: 0, max: 7 }).chain((k) => fc.constantFrom(0x1000 - 16 * k, 0x3000 - 16 * k)).map(BigInt) },
      { weight: 3, arbitrary: fc.integer({ min: 0, max: INDIRECT_COUNT - 1 }).map((k) => BigInt(INDIRECT_AREA + 16 * k)) },
      { weight: 1, arbitrary: fc.constantFrom(0xff0n, 0x1000n, 0x1ff0n, 0x2ff0n, 0x3000n, 1n << 53n, (1n << 64n) - 1n) },
      { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) },
    ),
    len: fc.oneof(
      { weight: 10, arbitrary: fc.integer({ min: 0, max: 0x200 }) },
      { weight: 3, arbitrary: fc.integer({ min: 1, max: 8 }).map((k) => 16 * k) },
      { weight: 1, arbitrary: fc.constantFrom(0x1000, 0x10_0010, 0x8000_0000, 0xffff_fff0, 0xffff_ffff) },
      { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff_ffff }) },
    ),
    flags: fc.oneof(
      { weight: 12, arbitrary: fc.constantFrom(0, NEXT, WRITE, NEXT | WRITE) },
      { weight: 2, arbitrary: fc.constantFrom(INDIRECT, INDIRECT, INDIRECT | WRITE, INDIRECT | NEXT) },
      { weight: 1, arbitrary: fc.integer({ min: 0, max: 7 }) },
      { weight: 1, arbitrary: u16 },
    ),
    /** Mostly inside the table it sits in (reduced modulo its size when laid out). */
    next: fc.oneof({ weight: 10, arbitrary: fc.integer({ min: 0, max: 15 }) }, { weight: 1, arbitrary: u16 }),
    nextMode: fc.constantFrom('in', 'in', 'in', 'in', 'in', 'in', 'edge', 'raw'),
  });
  type DescSpec = typeof descArb extends fc.Arbitrary<infer T> ? T : never;
  /** `edge` is the first index past the table, the off-by-one a walker must reject. */
  const lay = (d: DescSpec, tableSize: number) => ({
    ...d,
    next: d.nextMode === 'in' ? d.next % tableSize : d.nextMode === 'edge' ? tableSize : d.next,
  });

  const placementArb = fc.oneof(
    { weight: 8, arbitrary: fc.constant({ descAddr: 0x000, driverAddr: 0x100, deviceAddr: 0x140 }) },
    {
      weight: 1,
      arbitrary: fc.record({
        descAddr: fc.constantFrom(0x000, 0x008, 0xf80, 0xff0, 0x1000, 0x2000, 0x2f00),
        driverAddr: fc.constantFrom(0x100, 0x101, 0xfe0, 0x2100, 0x3000),
        deviceAddr: fc.constantFrom(0x140, 0x142, 0xf90, 0x2200, 0x1ffc),
      }),
    },
  );

  const scenarioArb = fc.record({
    size: fc.oneof({ weight: 1, arbitrary: fc.constantFrom(1, 2) }, { weight: 4, arbitrary: fc.constantFrom(4, 8, 16) }),
    placement: placementArb,
    eventIdx: fc.boolean(),
    indirect: fc.boolean(),
    table: fc.array(descArb, { minLength: 16, maxLength: 16 }),
    indirectArea: fc.array(descArb, { minLength: INDIRECT_COUNT, maxLength: INDIRECT_COUNT }),
    /** Heads: reduced modulo the queue size (`in`), the size itself (`edge`) or as generated (`raw`). */
    avail: fc.array(fc.oneof({ weight: 8, arbitrary: fc.integer({ min: 0, max: 15 }) }, { weight: 1, arbitrary: u16 }), {
      minLength: 16,
      maxLength: 16,
    }),
    headMode: fc.constantFrom('in', 'in', 'in', 'in', 'in', 'in', 'edge', 'raw'),
    nextAvail: fc.oneof(fc.constantFrom(0, 0xfffe, 0xffff), u16),
    /** How far avail.idx runs ahead: usually up to one past the queue size (reduced modulo size + 2). */
    ahead: fc.oneof({ weight: 8, arbitrary: fc.integer({ min: 0, max: 16 }) }, { weight: 1, arbitrary: u16 }),
    aheadInRange: fc.oneof({ weight: 6, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
    noise: fc.uint8Array({ minLength: 64, maxLength: 64 }),
  });

  it('never throws, stays inside guest memory, and agrees with a reference walker', () => {
    fc.assert(
      fc.property(scenarioArb, (sc) => {
        const mem = GuestMemory.create(REGIONS);
        const cfg: SplitQueueConfig = { size: sc.size, ...sc.placement, eventIdx: sc.eventIdx, indirect: sc.indirect };
        // Scatter noise over both regions, then lay out the hostile structures on top.
        for (let k = 0; k < sc.noise.length; k += 16) {
          const at = (k * 61 + sc.noise[k]! * 16) % 0x1000;
          mem.write(at, sc.noise.subarray(k, k + 16));
          mem.write(0x2000 + at, sc.noise.subarray(k, k + 16));
        }
        // Indirect pointers land on an entry k of the area, leaving 64 - k descriptors to the table end.
        sc.indirectArea.forEach((d, k) => writeDescriptor(mem, INDIRECT_AREA, k, lay(d, 1 + (k % 8))));
        if (mem.contains(cfg.descAddr, 16 * cfg.size)) {
          for (let k = 0; k < cfg.size; k++) writeDescriptor(mem, cfg.descAddr, k, lay(sc.table[k]!, cfg.size));
        }
        const ahead = sc.aheadInRange ? sc.ahead % (cfg.size + 2) : sc.ahead;
        const availIdx = (sc.nextAvail + ahead) & 0xffff;
        if (mem.contains(cfg.driverAddr, AvailRing.sizeFor(cfg.size)) && cfg.driverAddr % 2 === 0) {
          for (let k = 0; k < cfg.size; k++) {
            const raw = sc.avail[k]!;
            const head = sc.headMode === 'in' ? raw % cfg.size : sc.headMode === 'edge' && raw % 2 === 0 ? cfg.size : raw;
            writeAvailEntry(mem, cfg.driverAddr, cfg.size, k, head);
          }
          setAvailIdx(mem, cfg.driverAddr, availIdx);
        }

        const spy = new SpyMemory(mem);
        const queue = new SplitQueue(spy, cfg);
        queue.restore({ nextAvail: sc.nextAvail, nextUsed: sc.nextAvail });
        let nextAvail = sc.nextAvail;
        let firstError: QueueError | undefined;
        for (let pops = 0; pops < cfg.size + 3; pops++) {
          const expected = referenceWalk(mem, cfg, nextAvail);
          queue.hasAvailable();
          const got = queue.pop();
          if (got === null) {
            expect(expected.kind).toBe('empty');
            break;
          }
          if (got instanceof QueueError) {
            if (expected.kind !== 'error') {
              throw new Error(`device said ${got.toString()}, reference said ${JSON.stringify(expected)}`);
            }
            firstError = got;
            break;
          }
          if (expected.kind !== 'chain') throw new Error(`device popped a chain, reference said ${expected.kind}`);
          expect(got).toEqual(expected.chain);
          nextAvail = (nextAvail + 1) & 0xffff;
        }
        if (firstError !== undefined) {
          expect(queue.pop()).toBe(firstError);
          expect(queue.hasAvailable()).toBe(false);
          expect(queue.state().broken).toBe(firstError.reason);
        }

        // Every access the queue made lies inside guest RAM; its only write is avail_event.
        const availEvent = cfg.deviceAddr + UsedRing.availEventOffset(cfg.size);
        for (const a of spy.accesses) {
          if (!mem.contains(a.addr, a.len)) throw new Error(`access outside memory: ${JSON.stringify(a)}`);
          if (a.op.startsWith('write') || a.op === 'atomicStoreU16') {
            expect(cfg.eventIdx).toBe(true);
            expect(a).toEqual({ op: 'atomicStoreU16', addr: availEvent, len: 2 });
          }
        }
        if (queue.broken?.rule === 'queue-config') expect(spy.accesses).toHaveLength(0);
      }),
      fuzzParams(0xbadc0de, 400),
    );
  });
});
