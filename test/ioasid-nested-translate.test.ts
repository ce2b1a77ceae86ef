import { describe, expect, it } from 'vitest';
import { FaultAccess, FaultReason, faultIova, type FaultConsumer } from '../src/ioasid/fault-queue.js';
import { HwptAllocFlag, HwptDataType, IoasMapFlag, IommuOption, IommuOptionOp, U64_MAX, encodeVtdS1 } from '../src/ioasid/index.js';
import { QuiescenceWorker } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../src/ioasid/translator.js';
import { X86Fault, X86_PAGE_2M, X86_PAGE_4K } from '../src/pagetable/x86-64.js';
import { HOST_BASE, RW, SUPERVISOR_RW, USER_RO, USER_RW, USER_RX, nestedGuest, type NestedGuest } from './support/nested-guest.js';

/*
 * Nested translation through the owner's reader (Context.translate) and a device worker's
 * Translator over the same shared tables, with the guest building and editing its stage 1.
 */

const { READ, WRITE, EXEC } = FaultAccess;
const BASE = 0x4000_0000;

function faultsOf(consumer: FaultConsumer) {
  const out: { reason: number; iova: bigint; pasid: number; access: number }[] = [];
  consumer.drain((r) => void out.push({ reason: r.reason, iova: faultIova(r), pasid: r.pasid, access: r.access }));
  return out;
}

/** Stage 2 as several areas, so parts can be unmapped (IOAS unmaps take whole areas). */
function areaGuest(options: { hugePages?: boolean } = {}): NestedGuest {
  const g = nestedGuest({ mapStage2: false, quiescence: true });
  if (options.hugePages === false) g.ctx.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.SET, objectId: g.ioas, value: 0n });
  for (let mib = 0; mib < 16; mib += 2) {
    g.ctx.ioasMap(g.ioas, { gpa: HOST_BASE + (mib << 20), length: 2n << 20n, iova: BigInt(mib << 20), flags: RW | IoasMapFlag.FIXED_IOVA });
  }
  return g;
}

describe('nested translation', () => {
  it('walks the guest stage 1 over stage 2: spans, leaf sizes, a fault after the last mapped page', () => {
    const g = nestedGuest({ quiescence: true });
    g.builder.map(BASE, 0x10_0000, X86_PAGE_4K, USER_RW);
    g.builder.map(BASE + X86_PAGE_2M, 0x20_0000, X86_PAGE_2M, USER_RO);
    const { ctx, dev } = g;
    expect(ctx.translate(dev, 0, BigInt(BASE + 0x123), 16, 'read')).toEqual({ spans: [{ gpa: HOST_BASE + 0x10_0123, length: 16 }] });
    expect(ctx.translate(dev, 0, BigInt(BASE + X86_PAGE_2M + 0x1ff000), 0x1000, 'read')).toEqual({ spans: [{ gpa: HOST_BASE + 0x3f_f000, length: 0x1000 }] });
    expect(ctx.translate(dev, 0, BigInt(BASE + X86_PAGE_2M + 0x1ff000), 0x2000, 'read')).toEqual({
      fault: { reason: 'MAPPING', iova: BigInt(BASE + 2 * X86_PAGE_2M), access: 'read', pasid: 0 },
    });
    expect(ctx.translate(dev, 0, BigInt(BASE + X86_PAGE_2M), 8, 'write').fault?.reason).toBe('PERMISSION');

    const { t } = g.translator();
    const row = ctx.deviceRow(dev);
    expect(t.translate(row, undefined, BASE + 0x123, 16, READ)).toBe(FaultReason.NONE);
    expect(t.spans.toArray()).toEqual([{ gpa: HOST_BASE + 0x10_0123, length: 16 }]);
    // One 2 MiB combined entry (2 MiB in both stages) serves the whole leaf.
    const misses = t.stats().iotlb.misses;
    expect(t.translate(row, undefined, BASE + X86_PAGE_2M, 0x20_0000, READ)).toBe(FaultReason.NONE);
    expect(t.spans.toArray()).toEqual([{ gpa: HOST_BASE + 0x20_0000, length: 0x20_0000 }]);
    expect(t.translate(row, undefined, BASE + X86_PAGE_2M + 0x15_5000, 64, READ)).toBe(FaultReason.NONE);
    // The first lookup missed (stage-2 lookups of the walk add their own), the second hit.
    expect(t.stats().iotlb.misses - misses).toBeGreaterThanOrEqual(1);
    const hits = t.stats().iotlb.hits;
    expect(t.translate(row, undefined, BASE + X86_PAGE_2M + 0x1f_f000, 64, READ)).toBe(FaultReason.NONE);
    expect(t.stats().iotlb.hits).toBe(hits + 1);
    expect(t.translate(row, undefined, BASE + X86_PAGE_2M, 8, WRITE)).toBe(FaultReason.PERMISSION);
    expect(t.faultDetail).toBe(X86Fault.PERMISSION);
  });

  it('requests are user requests: U/S must be set at every level; XD refuses fetches', () => {
    const g = nestedGuest({ quiescence: true });
    g.builder.map(BASE, 0x10_0000, X86_PAGE_4K, SUPERVISOR_RW);
    g.builder.map(BASE + 0x1000, 0x10_1000, X86_PAGE_4K, USER_RX);
    g.builder.map(BASE + 0x2000, 0x10_2000, X86_PAGE_4K, USER_RW);
    const { t } = g.translator();
    const row = g.ctx.deviceRow(g.dev);
    expect(g.ctx.translate(g.dev, 0, BigInt(BASE), 4, 'read').fault?.reason).toBe('PERMISSION');
    expect(t.translate(row, undefined, BASE, 4, READ)).toBe(FaultReason.PERMISSION);
    expect(t.translate(row, undefined, BASE + 0x1000, 4, EXEC)).toBe(FaultReason.NONE);
    expect(t.translate(row, undefined, BASE + 0x1000, 4, WRITE)).toBe(FaultReason.PERMISSION);
    expect(t.translate(row, undefined, BASE + 0x2000, 4, EXEC)).toBe(FaultReason.PERMISSION);
    expect(t.translate(row, undefined, BASE + 0x2000, 4, READ | WRITE)).toBe(FaultReason.NONE);
  });

  it('stage-1 faults are MAPPING with the walk detail; stage-2 faults are STAGE2, after stage-1 permission', () => {
    const g = areaGuest();
    const { ctx, dev, ioas } = g;
    g.builder.map(BASE, 0x10_0000, X86_PAGE_4K, USER_RW);
    g.builder.map(BASE + 0x1000, 0x30_0000, X86_PAGE_4K, USER_RO);
    // Output beyond guest RAM: stage 2 has nothing there.
    g.builder.map(BASE + 0x2000, 0x1_0000_0000, X86_PAGE_4K, USER_RW);
    const { t, faults } = g.translator();
    const row = ctx.deviceRow(dev);
    expect(t.translate(row, undefined, BASE + 0x5000, 4, READ)).toBe(FaultReason.MAPPING);
    expect([t.faultDetail, t.faultLevel]).toEqual([X86Fault.NOT_PRESENT, 1]);
    expect(t.translate(row, undefined, 2 ** 47, 4, READ)).toBe(FaultReason.MAPPING);
    expect(t.faultDetail).toBe(X86Fault.NON_CANONICAL);
    expect(t.translate(row, undefined, BASE + 0x2000, 4, READ)).toBe(FaultReason.STAGE2);
    expect(ctx.translate(dev, 0, BigInt(BASE + 0x2000), 4, 'read').fault?.reason).toBe('STAGE2');

    // Stage 2 read-only under [2 MiB, 4 MiB): reads pass, writes are stage 2's fault, but a write
    // stage 1 already refuses is stage 1's.
    ctx.ioasUnmap(ioas, 2n << 20n, 2n << 20n);
    ctx.ioasMap(ioas, { gpa: HOST_BASE + (2 << 20), length: 2n << 20n, iova: 2n << 20n, flags: IoasMapFlag.READABLE | IoasMapFlag.FIXED_IOVA });
    g.builder.map(BASE + 0x3000, 0x20_0000, X86_PAGE_4K, USER_RW);
    expect(t.translate(row, undefined, BASE + 0x3000, 4, READ)).toBe(FaultReason.NONE);
    expect(t.translate(row, undefined, BASE + 0x3000, 4, WRITE)).toBe(FaultReason.STAGE2);
    expect(ctx.translate(dev, 0, BigInt(BASE + 0x3000), 4, 'write').fault?.reason).toBe('STAGE2');
    // Unmapped output page: stage 1 refusing the write still comes first.
    ctx.ioasUnmap(ioas, 2n << 20n, 2n << 20n);
    g.builder.map(BASE + 0x4000, 0x20_1000, X86_PAGE_4K, USER_RO);
    expect(t.translate(row, undefined, BASE + 0x4000, 4, WRITE)).toBe(FaultReason.PERMISSION);
    expect(t.translate(row, undefined, BASE + 0x4000, 4, READ)).toBe(FaultReason.STAGE2);

    // The guest's tables themselves out of stage 2: every walk stops at the top table.
    ctx.ioasUnmap(ioas, 12n << 20n, 2n << 20n);
    expect(t.translate(row, undefined, BASE, 4, READ)).toBe(FaultReason.STAGE2);
    expect([t.faultDetail, t.faultLevel]).toEqual([X86Fault.STAGE2, 4]);
    expect(ctx.translate(dev, 0, BigInt(BASE), 4, 'read').fault?.reason).toBe('STAGE2');

    const records = faultsOf(faults);
    expect(records.map((r) => r.reason)).toEqual([
      FaultReason.MAPPING,
      FaultReason.MAPPING,
      FaultReason.STAGE2,
      FaultReason.STAGE2,
      FaultReason.PERMISSION,
      FaultReason.STAGE2,
      FaultReason.STAGE2,
    ]);
    expect(records[2]).toEqual({ reason: FaultReason.STAGE2, iova: BigInt(BASE + 0x2000), pasid: -1, access: READ });
  });

  it('hwptInvalidate of a range drops exactly the affected IOTLB entries; until then the worker keeps the old entry', () => {
    const g = nestedGuest({ quiescence: true });
    const { ctx, dev } = g;
    const PAGES = 64;
    for (let i = 0; i < PAGES; i++) g.builder.map(BASE + i * 0x1000, 0x10_0000 + i * 0x1000, X86_PAGE_4K, USER_RW);
    const { t } = g.translator();
    const row = ctx.deviceRow(dev);
    const pass = (): number[] =>
      Array.from({ length: PAGES }, (_, i) => {
        expect(t.translate(row, undefined, BASE + i * 0x1000, 8, READ)).toBe(FaultReason.NONE);
        return t.spans.gpa[0]! - HOST_BASE;
      });
    pass();
    // The guest moves page 5 without invalidating: the owner sees the change, the worker's IOTLB not yet.
    g.builder.unmap(BASE + 5 * 0x1000, 0x1000);
    const ranges = g.builder.map(BASE + 5 * 0x1000, 0x1f_0000, X86_PAGE_4K, USER_RW);
    expect(ctx.translate(dev, 0, BigInt(BASE + 5 * 0x1000), 8, 'read')).toEqual({ spans: [{ gpa: HOST_BASE + 0x1f_0000, length: 8 }] });
    expect(pass()[5]).toBe(0x10_5000);

    const before = t.stats().iotlb;
    expect(g.invalidate(ranges)).toBe(1);
    const after = pass();
    expect(after[5]).toBe(0x1f_0000);
    const stats = t.stats().iotlb;
    expect(stats.flushes).toBe(before.flushes);
    expect(stats.rangeInvalidations).toBe(before.rangeInvalidations + 1);
    // 63 pages hit; page 5 missed once (its walk's stage-2 lookups hit the cached 2 MiB stage-2 entry).
    expect(stats.hits - before.hits).toBeGreaterThanOrEqual(PAGES - 1);
    expect(stats.misses - before.misses).toBe(1);

    // Everything (addr 0, npages U64_MAX): every page misses again.
    ctx.hwptInvalidate(g.nested, [{ addr: 0n, npages: U64_MAX, flags: 0 }]);
    const m = t.stats().iotlb.misses;
    pass();
    expect(t.stats().iotlb.misses - m).toBe(PAGES);
  });

  it('a 4 KiB invalidation inside a 2 MiB combined entry drops the entry', () => {
    const g = nestedGuest({ quiescence: true });
    g.builder.map(BASE, 0x20_0000, X86_PAGE_2M, USER_RW);
    const { t } = g.translator();
    const row = g.ctx.deviceRow(g.dev);
    expect(t.translate(row, undefined, BASE + 0x1000, 8, READ)).toBe(FaultReason.NONE);
    g.builder.unmap(BASE, X86_PAGE_2M);
    g.builder.map(BASE, 0x40_0000, X86_PAGE_2M, USER_RW);
    expect(t.translate(row, undefined, BASE + 0x3000, 8, READ)).toBe(FaultReason.NONE);
    expect(t.spans.gpa[0]).toBe(HOST_BASE + 0x20_3000);
    g.ctx.hwptInvalidate(g.nested, [{ addr: BigInt(BASE + 0x7000), npages: 1n, flags: 0 }]);
    expect(t.translate(row, undefined, BASE + 0x3000, 8, READ)).toBe(FaultReason.NONE);
    expect(t.spans.gpa[0]).toBe(HOST_BASE + 0x40_3000);
  });

  it('a 2 MiB stage-1 leaf over 4 KiB stage-2 pages makes 4 KiB combined entries', () => {
    const g = areaGuest({ hugePages: false });
    g.builder.map(BASE, 0x20_0000, X86_PAGE_2M, USER_RW);
    const { t } = g.translator();
    const row = g.ctx.deviceRow(g.dev);
    expect(t.translate(row, undefined, BASE + 0xff8, 16, READ)).toBe(FaultReason.NONE);
    expect(t.spans.toArray()).toEqual([{ gpa: HOST_BASE + 0x20_0ff8, length: 16 }]);
    const misses = t.stats().iotlb.misses;
    expect(t.translate(row, undefined, BASE + 0x2000, 16, READ)).toBe(FaultReason.NONE);
    expect(t.stats().iotlb.misses).toBeGreaterThan(misses);
  });

  it('an unmap of the parent IOAS (stage 2) is strict for nested translations too', () => {
    const g = areaGuest();
    const { ctx, dev, ioas } = g;
    g.builder.map(BASE, 0x10_0000, X86_PAGE_4K, USER_RW);
    g.builder.map(BASE + 0x1000, 0x30_0000, X86_PAGE_4K, USER_RW);
    const { t } = g.translator();
    const row = ctx.deviceRow(dev);
    expect(t.translate(row, undefined, BASE, 8, READ)).toBe(FaultReason.NONE);
    expect(t.translate(row, undefined, BASE + 0x1000, 8, READ)).toBe(FaultReason.NONE);
    ctx.ioasUnmap(ioas, 2n << 20n, 2n << 20n);
    expect(t.translate(row, undefined, BASE + 0x1000, 8, READ)).toBe(FaultReason.STAGE2);
    expect(t.translate(row, undefined, BASE, 8, READ)).toBe(FaultReason.NONE);
    expect(ctx.translate(dev, 0, BigInt(BASE + 0x1000), 8, 'read').fault?.reason).toBe('STAGE2');
  });

  it('PASIDs: a nested HWPT on a PASID translates DMAs that carry it; a detach blocks them', () => {
    const g = nestedGuest({ quiescence: true, attachRid: false });
    const { ctx, dev } = g;
    g.builder.map(BASE, 0x10_0000, X86_PAGE_4K, USER_RW);
    ctx.deviceAttach(dev, g.parent);
    ctx.deviceAttach(dev, g.nested, 9);
    const { t, faults } = g.translator();
    const row = ctx.deviceRow(dev);
    expect(t.translate(row, 9, BASE, 8, WRITE)).toBe(FaultReason.NONE);
    expect(t.spans.gpa[0]).toBe(HOST_BASE + 0x10_0000);
    expect(ctx.translate(dev, 9, BigInt(BASE), 8, 'write')).toEqual({ spans: [{ gpa: HOST_BASE + 0x10_0000, length: 8 }] });
    // The RID translates through the parent: IOVA BASE is not mapped in stage 2.
    expect(t.translate(row, undefined, BASE, 8, READ)).toBe(FaultReason.MAPPING);
    expect(t.translate(row, 10, BASE, 8, READ)).toBe(FaultReason.DOMAIN);
    expect(t.translate(row, 9, BASE + 0x1000, 8, READ)).toBe(FaultReason.MAPPING);
    ctx.deviceDetach(dev, 9);
    expect(t.translate(row, 9, BASE, 8, READ)).toBe(FaultReason.DOMAIN);
    expect(faultsOf(faults).map((f) => [f.reason, f.pasid])).toEqual([
      [FaultReason.MAPPING, -1],
      [FaultReason.DOMAIN, 10],
      [FaultReason.MAPPING, 9],
      [FaultReason.DOMAIN, 9],
    ]);
  });

  it('5-level stage 1: IOVAs above 2^48, the upper half, and 57-bit canonical form', () => {
    const g = nestedGuest({ quiescence: true, levels: 5 });
    const low = 0x00ff_0000_0000_0000n;
    const high = 0xff00_0000_1234_5000n;
    g.builder.map(low, 0x10_0000, X86_PAGE_4K, USER_RW);
    g.builder.map(high, 0x11_0000, X86_PAGE_4K, USER_RW);
    const { t } = g.translator();
    const row = g.ctx.deviceRow(g.dev);
    expect(t.translate(row, undefined, low + 8n, 8, READ)).toBe(FaultReason.NONE);
    expect(t.spans.gpa[0]).toBe(HOST_BASE + 0x10_0008);
    expect(t.translate(row, undefined, high, 8, READ)).toBe(FaultReason.NONE);
    expect(t.spans.gpa[0]).toBe(HOST_BASE + 0x11_0000);
    expect(g.ctx.translate(g.dev, 0, high, 8, 'read')).toEqual({ spans: [{ gpa: HOST_BASE + 0x11_0000, length: 8 }] });
    expect(t.translate(row, undefined, 0x0100_0000_0000_0000n, 8, READ)).toBe(FaultReason.MAPPING);
    expect(t.faultDetail).toBe(X86Fault.NON_CANONICAL);
    expect(t.faultIova).toBe(0x0100_0000_0000_0000n);
  });

  it('a translator without guest memory treats nested attachments as blocked', () => {
    const g = nestedGuest();
    g.builder.map(BASE, 0x10_0000, X86_PAGE_4K, USER_RW);
    const shared = g.ctx.describeShared();
    const t = new Translator({
      pool: shared.pool.buffer,
      attachments: new DeviceTableAttachments({ pool: shared.pool, devices: shared.devices }),
      quiescence: QuiescenceWorker.register(g.quiescenceBuffer),
    });
    expect(t.translate(g.ctx.deviceRow(g.dev), undefined, BASE, 8, READ)).toBe(FaultReason.DOMAIN);
    // Given memory explicitly, the same translator setup walks.
    const t2 = new Translator({
      pool: shared.pool.buffer,
      attachments: new DeviceTableAttachments({ pool: shared.pool, devices: shared.devices }),
      quiescence: QuiescenceWorker.register(g.quiescenceBuffer),
      memory: shared.memory,
    });
    expect(t2.translate(g.ctx.deviceRow(g.dev), undefined, BASE, 8, READ)).toBe(FaultReason.NONE);
  });

  it('replacing the nested HWPT by another (a new stage-1 root) is strict; destroying it flushes', () => {
    const g = nestedGuest({ quiescence: true });
    const { ctx, dev } = g;
    g.builder.map(BASE, 0x10_0000, X86_PAGE_4K, USER_RW);
    const { t } = g.translator();
    const row = ctx.deviceRow(dev);
    expect(t.translate(row, undefined, BASE, 8, READ)).toBe(FaultReason.NONE);
    // A second nested HWPT over an empty table elsewhere in guest RAM.
    const otherRoot = 0xa0_0000;
    g.memory.fill(g.hostAddress(otherRoot), 0x1000, 0);
    const other = ctx.hwptAlloc(dev, g.parent, { flags: HwptAllocFlag.PASID, dataType: HwptDataType.VTD_S1, data: encodeVtdS1(BigInt(otherRoot), 48) });
    ctx.deviceAttach(dev, other);
    expect(t.translate(row, undefined, BASE, 8, READ)).toBe(FaultReason.MAPPING);
    ctx.deviceAttach(dev, g.nested);
    expect(t.translate(row, undefined, BASE, 8, READ)).toBe(FaultReason.NONE);
    const flushes = t.stats().iotlb.flushes;
    ctx.destroy(other);
    expect(t.translate(row, undefined, BASE, 8, READ)).toBe(FaultReason.NONE);
    expect(t.stats().iotlb.flushes).toBe(flushes + 1);
  });
});
