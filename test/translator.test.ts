import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { FaultAccess, FaultConsumer, FaultProducer, FaultReason, NO_PASID, createFaultQueueBuffer, emptyFaultRecord, faultIova } from '../src/ioasid/fault-queue.js';
import { QuiescenceOwner, QuiescenceWorker, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, FixedAttachments, SpanList, TranslationKind, Translator } from '../src/ioasid/translator.js';
import { IommufdHost } from '../src/ioasid/host.js';
import { HwptAllocFlag, IoasMapFlag } from '../src/ioasid/uapi.js';
import { GuestMemory } from '../src/memory/index.js';
import { EntryFlag, IoPageTable, LEVEL_PAGES, PAGE_SIZE, TablePool } from '../src/pagetable/index.js';
import { fuzzParams } from './support/fuzz.js';

const RW = EntryFlag.READ | EntryFlag.WRITE;
const { READ, WRITE, EXEC } = FaultAccess;
const PAGES_2M = LEVEL_PAGES[1]!;

interface Rig {
  pool: TablePool;
  table: IoPageTable;
  owner: QuiescenceOwner;
  attachments: FixedAttachments;
  faults: FaultConsumer;
  t: Translator;
  map(pfn: number, pages: number, guest: number, perms?: number, huge?: boolean): void;
}

function rig(): Rig {
  const pool = new TablePool();
  expect(pool.ensure(IoPageTable.CREATE_TABLES)).toBe(true);
  const table = new IoPageTable(pool, 1);
  const q = createQuiescenceBuffer(4);
  const fq = createFaultQueueBuffer(64);
  const attachments = new FixedAttachments().set(0, NO_PASID, TranslationKind.PAGING, table.header);
  const t = new Translator({ pool: pool.buffer, attachments, quiescence: QuiescenceWorker.register(q), faults: new FaultProducer(fq) });
  return {
    pool,
    table,
    owner: new QuiescenceOwner(q),
    attachments,
    faults: new FaultConsumer(fq),
    t,
    map(pfn, pages, guest, perms = RW, huge = true) {
      expect(pool.ensure(table.tablesForMap(pfn, pages, guest, huge))).toBe(true);
      table.map(pfn, pages, guest, perms, huge);
    },
  };
}

/** The owner's strict unmap: remove, bump, wait. */
function strictUnmap(r: Rig, pfn: number, pages: number): void {
  r.table.unmap(pfn, pfn + pages - 1);
  expect(r.owner.waitQuiescent(r.owner.bumpEpoch(), { timeoutMs: 0 }).stragglers).toEqual([]);
}

describe('translator: paging', () => {
  it('coalesces contiguous guest pages into one span and splits where the guest side jumps', () => {
    const r = rig();
    r.map(0x10, 3, 0x100);
    r.map(0x13, 2, 0x500);
    expect(r.t.translate(0, undefined, 0x10 * PAGE_SIZE + 0x800, 4 * PAGE_SIZE, READ)).toBe(FaultReason.NONE);
    expect(r.t.spans.toArray()).toEqual([
      { gpa: 0x100 * PAGE_SIZE + 0x800, length: 3 * PAGE_SIZE - 0x800 },
      { gpa: 0x500 * PAGE_SIZE, length: PAGE_SIZE + 0x800 },
    ]);
  });

  it('crosses 2 MiB leaves in one step each and keeps offsets exact', () => {
    const r = rig();
    r.map(PAGES_2M, 2 * PAGES_2M, 8 * PAGES_2M);
    const iova = PAGES_2M * PAGE_SIZE + 123;
    expect(r.t.translate(0, undefined, iova, 2 * PAGES_2M * PAGE_SIZE - 123, WRITE)).toBe(FaultReason.NONE);
    expect(r.t.spans.toArray()).toEqual([{ gpa: 8 * PAGES_2M * PAGE_SIZE + 123, length: 2 * PAGES_2M * PAGE_SIZE - 123 }]);
    // Two leaves walked, nothing more.
    expect(r.t.stats().iotlb.fills).toBe(2);
  });

  it('serves a repeated translation from the IOTLB and reuses its span list', () => {
    const r = rig();
    r.map(5, 1, 9);
    const spans = r.t.spans;
    r.t.translate(0, undefined, 5 * PAGE_SIZE, 8, READ);
    r.t.translate(0, undefined, 5 * PAGE_SIZE + 8, 8, READ);
    expect(r.t.spans).toBe(spans);
    expect(spans.toArray()).toEqual([{ gpa: 9 * PAGE_SIZE + 8, length: 8 }]);
    expect(r.t.stats().iotlb).toMatchObject({ hits: 1, misses: 1 });
  });

  it('returns no spans for a zero-length DMA', () => {
    const r = rig();
    expect(r.t.translate(0, undefined, 0, 0, READ)).toBe(FaultReason.NONE);
    expect(r.t.spans.count).toBe(0);
  });

  it('translates IOVAs beyond 2^53 given as bigint, and reports their faults exactly', () => {
    const r = rig();
    const pfn = 2 ** 51 + 3;
    r.map(pfn, 1, 0x42);
    const iova = (BigInt(pfn) << 12n) | 0xabcn;
    expect(r.t.translate(0, undefined, iova, 0x10, READ)).toBe(FaultReason.NONE);
    expect(r.t.spans.toArray()).toEqual([{ gpa: 0x42 * PAGE_SIZE + 0xabc, length: 0x10 }]);
    expect(r.t.translate(0, undefined, iova + 0x1000n, 1, READ)).toBe(FaultReason.MAPPING);
    expect(r.t.faultIova).toBe(iova + 0x1000n);
    const rec = emptyFaultRecord();
    expect(r.faults.poll(rec)).toBe(true);
    expect(faultIova(rec)).toBe(iova + 0x1000n);
  });

  it('faults a range that would run past 2^64, and throws for impossible arguments', () => {
    const r = rig();
    expect(r.t.translate(0, undefined, (1n << 64n) - 2n, 4, READ)).toBe(FaultReason.MAPPING);
    expect(() => r.t.translate(0, undefined, -1, 1, READ)).toThrow(RangeError);
    expect(() => r.t.translate(0, undefined, 0.5, 1, READ)).toThrow(RangeError);
    expect(() => r.t.translate(0, undefined, 1n << 64n, 1, READ)).toThrow(RangeError);
    expect(() => r.t.translate(0, undefined, 0, -1, READ)).toThrow(RangeError);
    expect(() => r.t.endDma()).toThrow();
  });
});

describe('translator: faults', () => {
  it('reports an unmapped page in the middle of a DMA at that page, with the partial spans before it', () => {
    const r = rig();
    r.map(0x20, 2, 0x300);
    r.map(0x23, 1, 0x400);
    expect(r.t.translate(0, undefined, 0x20 * PAGE_SIZE + 16, 4 * PAGE_SIZE, WRITE)).toBe(FaultReason.MAPPING);
    expect(r.t.faultIova).toBe(BigInt(0x22 * PAGE_SIZE));
    expect(r.t.spans.toArray()).toEqual([{ gpa: 0x300 * PAGE_SIZE + 16, length: 2 * PAGE_SIZE - 16 }]);
    const rec = emptyFaultRecord();
    expect(r.faults.poll(rec)).toBe(true);
    expect(rec).toEqual({ device: 0, pasid: NO_PASID, iovaLo: 0x22 * PAGE_SIZE, iovaHi: 0, access: WRITE, reason: FaultReason.MAPPING, length: 4 * PAGE_SIZE });
    // Device 7 resolves to nothing: the fixed table only knows device 0.
    expect(r.t.translate(7, 3, 0x20 * PAGE_SIZE, 1, READ)).toBe(FaultReason.DOMAIN);
    expect(r.faults.poll(rec)).toBe(true);
    expect(rec).toMatchObject({ device: 7, pasid: 3, iovaLo: 0x20 * PAGE_SIZE, reason: FaultReason.DOMAIN });
    expect(r.faults.poll(rec)).toBe(false);
  });

  it('checks permissions per access: read-only pages refuse writes; exec needs read', () => {
    const r = rig();
    r.map(1, 1, 1, EntryFlag.READ);
    r.map(2, 1, 2, EntryFlag.WRITE);
    expect(r.t.translate(0, undefined, PAGE_SIZE, 4, READ)).toBe(FaultReason.NONE);
    expect(r.t.translate(0, undefined, PAGE_SIZE, 4, WRITE)).toBe(FaultReason.PERMISSION);
    expect(r.t.translate(0, undefined, PAGE_SIZE, 4, READ | WRITE)).toBe(FaultReason.PERMISSION);
    expect(r.t.translate(0, undefined, PAGE_SIZE, 4, EXEC)).toBe(FaultReason.NONE);
    expect(r.t.translate(0, undefined, 2 * PAGE_SIZE, 4, WRITE)).toBe(FaultReason.NONE);
    expect(r.t.translate(0, undefined, 2 * PAGE_SIZE, 4, EXEC)).toBe(FaultReason.PERMISSION);
    // A cached entry is checked too.
    expect(r.t.translate(0, undefined, PAGE_SIZE, 4, WRITE)).toBe(FaultReason.PERMISSION);
    expect(r.faults.stats().appended).toBe(4);
  });

  it('blocks a blocked device, passes an identity device straight through, and tells PASIDs apart', () => {
    const r = rig();
    r.attachments.set(1, NO_PASID, TranslationKind.BLOCKED).set(2, NO_PASID, TranslationKind.IDENTITY).set(0, 5, TranslationKind.IDENTITY);
    expect(r.t.translate(1, undefined, 0x1000, 4, READ)).toBe(FaultReason.DOMAIN);
    expect(r.t.translate(2, undefined, 0x1234, 0x3000, READ)).toBe(FaultReason.NONE);
    expect(r.t.spans.toArray()).toEqual([{ gpa: 0x1234, length: 0x3000 }]);
    expect(r.t.translate(2, undefined, 2 ** 53 - 4, 8, READ)).toBe(FaultReason.MAPPING);
    expect(r.t.translate(0, 5, 0x7000, 1, READ)).toBe(FaultReason.NONE);
    expect(r.t.spans.toArray()).toEqual([{ gpa: 0x7000, length: 1 }]);
    expect(r.t.translate(0, undefined, 0x7000, 1, READ)).toBe(FaultReason.MAPPING);
    expect(r.t.translate(0, 6, 0x7000, 1, READ)).toBe(FaultReason.DOMAIN);
  });
});

describe('translator: strict unmap in one thread', () => {
  it('a DMA that begins after the unmap returned cannot use the removed translation', () => {
    const r = rig();
    r.map(3, 1, 30);
    expect(r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)).toBe(FaultReason.NONE);
    strictUnmap(r, 3, 1);
    expect(r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)).toBe(FaultReason.MAPPING);
  });

  it('a DMA in flight keeps the translations valid at its start; the next one does not', () => {
    const r = rig();
    r.map(3, 2, 30);
    r.t.withDma(() => {
      expect(r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)).toBe(FaultReason.NONE);
      // The owner unmaps now; this DMA was in flight, so it may finish with what it had.
      r.table.unmap(3, 4);
      const epoch = r.owner.bumpEpoch();
      expect(r.owner.waitQuiescent(epoch, { timeoutMs: 0, spinRounds: 1 }).stragglers.length).toBe(1);
      expect(r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)).toBe(FaultReason.NONE);
      // A page it had not translated yet is gone: a fault, never a stale answer.
      expect(r.t.translate(0, undefined, 4 * PAGE_SIZE, 1, READ)).toBe(FaultReason.MAPPING);
    });
    expect(r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)).toBe(FaultReason.MAPPING);
  });

  it('a nested withDma is one DMA', () => {
    const r = rig();
    r.map(3, 1, 30);
    r.t.withDma(() => r.t.withDma(() => r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)));
    expect(r.t.stats().dmas).toBe(1);
  });

  it('an attachment change takes effect at the next DMA after the epoch moved', () => {
    const r = rig();
    r.map(3, 1, 30);
    expect(r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)).toBe(FaultReason.NONE);
    r.attachments.set(0, NO_PASID, TranslationKind.BLOCKED);
    expect(r.owner.waitQuiescent(r.owner.bumpEpoch()).stragglers).toEqual([]);
    expect(r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)).toBe(FaultReason.DOMAIN);
  });

  it('a destroyed address space whose header slot is reused is not served from the old entries', () => {
    const r = rig();
    r.map(3, 1, 30);
    expect(r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)).toBe(FaultReason.NONE);
    const oldHeader = r.table.header;
    r.table.destroy();
    expect(r.owner.waitQuiescent(r.owner.bumpEpoch({ fullFlush: true })).stragglers).toEqual([]);
    r.pool.reclaim();
    expect(r.pool.ensure(IoPageTable.CREATE_TABLES)).toBe(true);
    const fresh = new IoPageTable(r.pool, 2);
    expect(fresh.header).toBe(oldHeader);
    expect(r.pool.ensure(fresh.tablesForMap(3, 1, 77, true))).toBe(true);
    fresh.map(3, 1, 77, RW, true);
    expect(r.t.translate(0, undefined, 3 * PAGE_SIZE, 1, READ)).toBe(FaultReason.NONE);
    expect(r.t.spans.gpa[0]).toBe(77 * PAGE_SIZE);
  });
});

describe('translator: property against a direct page walk', () => {
  it('spans cover exactly the bytes asked for, page by page equal to the table, after any map/unmap history', () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.record({
            unmap: fc.boolean(),
            pfn: fc.integer({ min: 0, max: 3 * PAGES_2M }),
            pages: fc.oneof(fc.integer({ min: 1, max: 20 }), fc.constant(PAGES_2M)),
            guest: fc.integer({ min: 0, max: 1000 }),
            iova: fc.integer({ min: 0, max: (3 * PAGES_2M + 30) * PAGE_SIZE }),
            length: fc.integer({ min: 1, max: 6 * PAGE_SIZE }),
          }),
          { maxLength: 60 },
        ),
        (steps) => {
          const r = rig();
          let wrong = 0;
          for (const s of steps) {
            if (s.unmap) {
              let first = s.pfn;
              let last = s.pfn + s.pages - 1;
              r.table.forEachLeaf(first, last, (pfn, pages) => {
                first = Math.min(first, pfn);
                last = Math.max(last, pfn + pages - 1);
              });
              strictUnmap(r, first, last - first + 1);
            } else if (r.table.nextMapped(s.pfn, s.pfn + s.pages - 1) < 0) {
              r.map(s.pfn, s.pages, s.guest * PAGES_2M + (s.pfn % PAGES_2M));
            }
            const status = r.t.translate(0, undefined, s.iova, s.length, READ);
            // Reference: every byte's page looked up in the table directly.
            let expectFault = false;
            const want = new SpanList();
            for (let pfn = Math.floor(s.iova / PAGE_SIZE); pfn * PAGE_SIZE < s.iova + s.length; pfn++) {
              const leaf = { guestPfn: 0, leafPfn: 0, leafGuestPfn: 0, pageShift: 12, flags: 0 };
              if (!r.table.lookup(pfn, leaf)) {
                expectFault = true;
                break;
              }
              const from = Math.max(s.iova, pfn * PAGE_SIZE);
              const to = Math.min(s.iova + s.length, (pfn + 1) * PAGE_SIZE);
              want.push(leaf.guestPfn * PAGE_SIZE + (from - pfn * PAGE_SIZE), to - from);
            }
            if ((status !== FaultReason.NONE) !== expectFault) wrong++;
            else if (!expectFault && JSON.stringify(r.t.spans.toArray()) !== JSON.stringify(want.toArray())) wrong++;
          }
          expect(wrong).toBe(0);
        },
      ),
      fuzzParams(0x7a45, 100),
    );
  });
});

describe('translator over a context: the shared device table', () => {
  const FIXED_RW = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;

  function context() {
    const host = new IommufdHost(GuestMemory.create(16 * 1024 * 1024), {
      devices: [
        { name: 'dma0', group: 'g0', pasidBits: 8 },
        { name: 'dma1', group: 'g1' },
      ],
      // Freed tables wait for quiescence, as they must once device workers walk them.
      autoReclaim: false,
    });
    const ctx = host.open();
    const quiescence = createQuiescenceBuffer(4);
    const shared = ctx.describeShared();
    const t = new Translator({ pool: shared.pool.buffer, attachments: new DeviceTableAttachments(shared), quiescence: QuiescenceWorker.register(quiescence) });
    const owner = new QuiescenceOwner(quiescence);
    /** What the owner does after each change before it completes the request. */
    const settle = (fullFlush = false): void => {
      expect(owner.waitQuiescent(owner.bumpEpoch({ fullFlush })).stragglers).toEqual([]);
      ctx.reclaim();
    };
    return { ctx, t, settle };
  }

  it('translates what the context translates, then follows unmap, bypass, detach and replace', () => {
    const { ctx, t, settle } = context();
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('dma0');
    const row = ctx.deviceRow(dev);
    ctx.deviceAttach(dev, ioas);
    ctx.ioasMap(ioas, { gpa: 0x10000, length: 0x2000n, iova: 0x100000n, flags: FIXED_RW });
    ctx.ioasMap(ioas, { gpa: 0x40000, length: 0x1000n, iova: 0x102000n, flags: IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE });
    settle();

    expect(t.translate(row, undefined, 0x100800, 0x2000, READ)).toBe(FaultReason.NONE);
    const reference = ctx.translate(dev, 0, 0x100800n, 0x2000, 'read');
    expect(t.spans.toArray()).toEqual(reference.spans);
    expect(t.translate(row, undefined, 0x102000, 8, WRITE)).toBe(FaultReason.PERMISSION);
    expect(ctx.translate(dev, 0, 0x102000n, 8, 'write').fault?.reason).toBe('PERMISSION');

    ctx.ioasUnmap(ioas, 0x100000n, 0x2000n);
    settle();
    expect(t.translate(row, undefined, 0x100800, 8, READ)).toBe(FaultReason.MAPPING);

    ctx.deviceSetBypass(dev);
    settle();
    expect(t.translate(row, undefined, 0x123456, 8, WRITE)).toBe(FaultReason.NONE);
    expect(t.spans.toArray()).toEqual([{ gpa: 0x123456, length: 8 }]);

    ctx.deviceDetach(dev);
    settle();
    expect(t.translate(row, undefined, 0x123456, 8, WRITE)).toBe(FaultReason.DOMAIN);

    const other = ctx.ioasAlloc();
    ctx.ioasMap(other, { gpa: 0x80000, length: 0x1000n, iova: 0x100000n, flags: FIXED_RW });
    ctx.deviceAttach(dev, ioas);
    settle();
    expect(t.translate(row, undefined, 0x102010, 8, READ)).toBe(FaultReason.NONE);
    expect(t.spans.gpa[0]).toBe(0x40010);
    // Replace: the same IOVA now resolves in the other IOAS.
    ctx.deviceAttach(dev, other);
    settle();
    expect(t.translate(row, undefined, 0x100010, 8, READ)).toBe(FaultReason.NONE);
    expect(t.spans.gpa[0]).toBe(0x80010);
    expect(t.translate(row, undefined, 0x102010, 8, READ)).toBe(FaultReason.MAPPING);
  });

  it('resolves a PASID through the device\'s PASID directory; unattached PASIDs and devices are blocked', () => {
    const { ctx, t, settle } = context();
    const dev = ctx.deviceBind('dma0');
    const row = ctx.deviceRow(dev);
    const ioas = ctx.ioasAlloc();
    ctx.ioasMap(ioas, { gpa: 0x20000, length: 0x1000n, iova: 0x5000n, flags: FIXED_RW });
    const hwpt = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.PASID });
    ctx.deviceAttach(dev, hwpt, 5);
    settle();
    expect(t.translate(row, 5, 0x5008, 8, READ)).toBe(FaultReason.NONE);
    expect(t.spans.gpa[0]).toBe(0x20008);
    expect(t.translate(row, 6, 0x5008, 8, READ)).toBe(FaultReason.DOMAIN);
    expect(t.translate(row, undefined, 0x5008, 8, READ)).toBe(FaultReason.DOMAIN);
    const idle = ctx.deviceRow(ctx.deviceBind('dma1'));
    expect(t.translate(idle, undefined, 0x5008, 8, READ)).toBe(FaultReason.DOMAIN);
  });
});
