import { describe, expect, it } from 'vitest';
import { Worker } from 'node:worker_threads';
import { IommufdError, IommufdHost, type PhysicalDeviceSpec } from '../src/ioasid/index.js';
import { FaultAccess, FaultReason } from '../src/ioasid/fault-queue.js';
import { X86_PAGE_4K } from '../src/pagetable/x86-64.js';
import { GUEST_RAM, HOST_BASE, USER_RW, nestedGuest } from './support/nested-guest.js';
import { QuiescenceOwner, QuiescenceWorker, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../src/ioasid/translator.js';
import { HwCap, HwptAllocFlag, HwptDirtyTrackingFlag, HwptGetDirtyBitmapFlag, IoasMapFlag, U64_MAX } from '../src/ioasid/uapi.js';
import { GuestMemory } from '../src/memory/index.js';
import { DirtyWriterControl, type DirtyWriterResult, type DirtyWriterStart } from '../src/runtime/dirty-writer-protocol.js';
import { workerUrl } from '../src/runtime/worker-url.js';

const PAGE = 4096;
const RW = IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE | IoasMapFlag.FIXED_IOVA;
const IOVA = 0x1000000n;

function device(name: string, dirtyTracking = true): PhysicalDeviceSpec {
  return { name, group: name, dirtyTracking, pasidBits: 8 };
}

function setup(options: { autoReclaim?: boolean } = {}) {
  const memory = GuestMemory.create(32 * 1024 * 1024);
  const host = new IommufdHost(memory, { devices: [device('mock0'), device('mock1'), device('plain', false)], ...options });
  const ctx = host.open();
  const ioas = ctx.ioasAlloc();
  const dev = ctx.deviceBind('mock0');
  const hwpt = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.DIRTY_TRACKING });
  ctx.deviceAttach(dev, hwpt);
  return { memory, host, ctx, ioas, dev, hwpt };
}

function expectErrno(host: IommufdHost, code: string, fn: () => unknown): void {
  const before = host.inspect();
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught, `expected ${code}`).toBeInstanceOf(IommufdError);
  expect((caught as IommufdError).code).toBe(code);
  expect(host.inspect()).toEqual(before);
}

/** The set bits of a dirty bitmap, as bit indexes. */
function bitsOf(bitmap: BigUint64Array): number[] {
  const out: number[] = [];
  bitmap.forEach((word, i) => {
    for (let b = 0; b < 64; b++) if (((word >> BigInt(b)) & 1n) !== 0n) out.push(i * 64 + b);
  });
  return out;
}

describe('dirty tracking: IOMMU_HWPT_SET_DIRTY_TRACKING and IOMMU_HWPT_GET_DIRTY_BITMAP', () => {
  it('iommufd_dirty_tracking.device_dirty_capability: IOMMU_HW_CAP_DIRTY_TRACKING follows the device', () => {
    const { ctx } = setup();
    expect(ctx.getHwInfo(ctx.deviceBind('mock1')).capabilities & HwCap.DIRTY_TRACKING).toBe(HwCap.DIRTY_TRACKING);
    expect(ctx.getHwInfo(ctx.deviceBind('plain')).capabilities).toBe(0);
  });

  it('iommufd_dirty_tracking.set_dirty_tracking: on and off on an attached HWPT; kernel errnos otherwise', () => {
    const { host, ctx, ioas, dev, hwpt } = setup();
    ctx.hwptSetDirtyTracking(hwpt, true);
    ctx.hwptSetDirtyTracking(hwpt, false);
    ctx.hwptSetDirtyTracking(hwpt, false, HwptDirtyTrackingFlag.ENABLE);
    ctx.hwptSetDirtyTracking(hwpt, false);
    // iommufd_hwpt_set_dirty_tracking: unknown flags are EOPNOTSUPP; anything but a paging HWPT is ENOENT.
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptSetDirtyTracking(hwpt, true, 2));
    expectErrno(host, 'ENOENT', () => ctx.hwptSetDirtyTracking(ioas, true));
    expectErrno(host, 'ENOENT', () => ctx.hwptSetDirtyTracking(999, true));
    // iopt_set_dirty_tracking: a HWPT allocated without DIRTY_TRACKING has no dirty ops.
    const plain = ctx.hwptAlloc(dev, ioas);
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptSetDirtyTracking(plain, true));
  });

  it('iommufd_dirty_tracking.get_dirty_bitmap: written pages are reported once, then cleared', () => {
    const { ctx, ioas, dev, hwpt } = setup();
    ctx.ioasMap(ioas, { gpa: 0x100000, length: 128n * BigInt(PAGE), iova: IOVA, flags: RW });
    ctx.hwptSetDirtyTracking(hwpt, true);
    const written = [0, 1, 5, 64, 127];
    for (const p of written) expect(ctx.translate(dev, 0, IOVA + BigInt(p * PAGE) + 12n, 4, 'write')).toHaveProperty('spans');
    // Reads do not dirty.
    expect(ctx.translate(dev, 0, IOVA + 3n * BigInt(PAGE), 4, 'read')).toHaveProperty('spans');
    const args = { iova: IOVA, length: 128n * BigInt(PAGE), pageSize: BigInt(PAGE) };
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, args))).toEqual(written);
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, args))).toEqual([]);
    // Coarser and finer bitmap pages: 8 KiB (two pages a bit) and 2 KiB (two bits a page).
    ctx.translate(dev, 0, IOVA + 5n * BigInt(PAGE), 1, 'write');
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, { ...args, pageSize: 8192n, flags: HwptGetDirtyBitmapFlag.NO_CLEAR }))).toEqual([2]);
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, { ...args, pageSize: 2048n }))).toEqual([10, 11]);
    // A range that covers a hole reports nothing for it (the kernel drops the area walk's result).
    ctx.translate(dev, 0, IOVA, 1, 'write');
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, { iova: IOVA - 4n * BigInt(PAGE), length: 8n * BigInt(PAGE), pageSize: BigInt(PAGE) }))).toEqual([4]);
  });

  it('iommufd_dirty_tracking.get_dirty_bitmap_no_clear: NO_CLEAR reports without clearing', () => {
    const { ctx, ioas, dev, hwpt } = setup();
    ctx.ioasMap(ioas, { gpa: 0x100000, length: 16n * BigInt(PAGE), iova: IOVA, flags: RW });
    ctx.hwptSetDirtyTracking(hwpt, true);
    ctx.translate(dev, 0, IOVA + 2n * BigInt(PAGE), 8192, 'write');
    const args = { iova: IOVA, length: 16n * BigInt(PAGE), pageSize: BigInt(PAGE) };
    const noClear = { ...args, flags: HwptGetDirtyBitmapFlag.NO_CLEAR };
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, noClear))).toEqual([2, 3]);
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, noClear))).toEqual([2, 3]);
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, args))).toEqual([2, 3]);
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, noClear))).toEqual([]);
  });

  it('a huge leaf is dirty as a whole, as the kernel reports a huge IOPTE', () => {
    const { ctx, ioas, dev, hwpt } = setup();
    ctx.ioasMap(ioas, { gpa: 0x400000, length: 0x200000n, iova: 0x1200000n, flags: RW });
    ctx.hwptSetDirtyTracking(hwpt, true);
    ctx.translate(dev, 0, 0x1200000n + 7n * BigInt(PAGE), 4, 'write');
    const bits = bitsOf(ctx.hwptGetDirtyBitmap(hwpt, { iova: 0x1200000n, length: 0x200000n, pageSize: BigInt(PAGE) }));
    expect(bits).toHaveLength(512);
    // Part of a huge leaf: reported, but not cleared (the rest of the leaf is outside the range).
    ctx.translate(dev, 0, 0x1200000n, 4, 'write');
    const part = { iova: 0x1200000n, length: 0x10000n, pageSize: BigInt(PAGE) };
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, part))).toHaveLength(16);
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, part))).toHaveLength(16);
  });

  it('enabling clears what was dirty before (iopt_set_dirty_tracking: a clean snapshot); disabled writes are not tracked', () => {
    const { host, ctx, ioas, dev, hwpt } = setup();
    ctx.ioasMap(ioas, { gpa: 0x100000, length: 16n * BigInt(PAGE), iova: IOVA, flags: RW });
    const args = { iova: IOVA, length: 16n * BigInt(PAGE), pageSize: BigInt(PAGE) };
    ctx.hwptSetDirtyTracking(hwpt, true);
    ctx.translate(dev, 0, IOVA, 4, 'write');
    ctx.hwptSetDirtyTracking(hwpt, false);
    ctx.translate(dev, 0, IOVA + BigInt(PAGE), 4, 'write');
    // The drivers' read_and_clear_dirty refuse a read while tracking is off.
    expectErrno(host, 'EINVAL', () => ctx.hwptGetDirtyBitmap(hwpt, args));
    ctx.hwptSetDirtyTracking(hwpt, true);
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, args))).toEqual([]);
  });

  it('get_dirty_bitmap argument errors follow iommufd_check_iova_range and iommu_read_and_clear_dirty', () => {
    const { host, ctx, ioas, dev, hwpt } = setup();
    ctx.ioasMap(ioas, { gpa: 0x100000, length: 16n * BigInt(PAGE), iova: IOVA, flags: RW });
    ctx.hwptSetDirtyTracking(hwpt, true);
    const ok = { iova: IOVA, length: 16n * BigInt(PAGE), pageSize: BigInt(PAGE) };
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptGetDirtyBitmap(hwpt, { ...ok, flags: 2 }));
    expectErrno(host, 'ENOENT', () => ctx.hwptGetDirtyBitmap(ioas, ok));
    expectErrno(host, 'EOVERFLOW', () => ctx.hwptGetDirtyBitmap(hwpt, { ...ok, iova: U64_MAX - 0xfffn, length: 0x2000n }));
    expectErrno(host, 'EINVAL', () => ctx.hwptGetDirtyBitmap(hwpt, { ...ok, iova: IOVA + 1n }));
    expectErrno(host, 'EINVAL', () => ctx.hwptGetDirtyBitmap(hwpt, { ...ok, length: 0x1800n }));
    expectErrno(host, 'EINVAL', () => ctx.hwptGetDirtyBitmap(hwpt, { ...ok, length: 0n }));
    expectErrno(host, 'EINVAL', () => ctx.hwptGetDirtyBitmap(hwpt, { ...ok, pageSize: 0n }));
    expectErrno(host, 'EINVAL', () => ctx.hwptGetDirtyBitmap(hwpt, { ...ok, pageSize: 3n * BigInt(PAGE) }));
    expectErrno(host, 'EINVAL', () => ctx.hwptGetDirtyBitmap(hwpt, { ...ok, pageSize: 32n * BigInt(PAGE) }));
    expectErrno(host, 'ENOMEM', () => ctx.hwptGetDirtyBitmap(hwpt, { iova: 0n, length: 1n << 60n, pageSize: BigInt(PAGE) }));
    const plain = ctx.hwptAlloc(dev, ioas);
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptGetDirtyBitmap(plain, ok));
  });

  it("a device worker's translator marks dirty, and marks again after a read cleared a leaf it had cached", () => {
    const { ctx, ioas, dev, hwpt } = setup({ autoReclaim: false });
    const q = createQuiescenceBuffer(4);
    ctx.attachQuiescence(new QuiescenceOwner(q));
    const shared = ctx.describeShared();
    const t = new Translator({ pool: shared.pool.buffer, attachments: new DeviceTableAttachments(shared), quiescence: QuiescenceWorker.register(q) });
    const row = ctx.deviceRow(dev);
    ctx.ioasMap(ioas, { gpa: 0x100000, length: 16n * BigInt(PAGE), iova: IOVA, flags: RW });
    const args = { iova: IOVA, length: 16n * BigInt(PAGE), pageSize: BigInt(PAGE) };
    const base = Number(IOVA);
    // Tracking off: nothing is marked.
    expect(t.translate(row, undefined, base, 8, FaultAccess.WRITE)).toBe(0);
    ctx.hwptSetDirtyTracking(hwpt, true);
    expect(t.translate(row, undefined, base + 3 * PAGE, 2 * PAGE, FaultAccess.WRITE)).toBe(0);
    expect(t.translate(row, undefined, base + 9 * PAGE, 8, FaultAccess.READ)).toBe(0);
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, args))).toEqual([3, 4]);
    // The leaf of page 3 sits in the translator's IOTLB as dirty; the read moved the generation.
    expect(t.translate(row, undefined, base + 3 * PAGE, 8, FaultAccess.WRITE)).toBe(0);
    expect(bitsOf(ctx.hwptGetDirtyBitmap(hwpt, args))).toEqual([3]);
    // Within one read cycle the second write to a leaf costs no shared-memory write.
    const marks = t.stats().dirtyMarks;
    t.translate(row, undefined, base + 7 * PAGE, 8, FaultAccess.WRITE);
    t.translate(row, undefined, base + 7 * PAGE, 8, FaultAccess.WRITE);
    expect(t.stats().dirtyMarks).toBe(marks + 1);
    expect(t.stats().iotlb.hits).toBeGreaterThan(0);
  });

  it('workers writing while the owner reads and clears: every write reaches the copy, clean pages are never reported', async () => {
    const { memory, ctx, ioas, dev, hwpt } = setup({ autoReclaim: false });
    const q = createQuiescenceBuffer(8);
    ctx.attachQuiescence(new QuiescenceOwner(q), { timeoutMs: 5000 });
    const PAGES = 192;
    const GPA = 0x100000;
    ctx.ioasMap(ioas, { gpa: GPA, length: BigInt(PAGES * PAGE), iova: IOVA, flags: RW });
    ctx.hwptSetDirtyTracking(hwpt, true);
    // The "migration": copy everything once, then only what the bitmaps report.
    const shadow = new Uint8Array(PAGES * PAGE);
    memory.read(GPA, shadow);
    const copyPage = (p: number): void => memory.read(GPA + p * PAGE, shadow.subarray(p * PAGE, (p + 1) * PAGE));
    const control = new SharedArrayBuffer(DirtyWriterControl.WORDS * 4);
    const ctl = new Int32Array(control);
    const WORKERS = 4;
    const results: Promise<DirtyWriterResult>[] = [];
    for (let index = 0; index < WORKERS; index++) {
      const start: DirtyWriterStart & { index: number } = {
        shared: ctx.describeShared(),
        quiescence: q,
        row: ctx.deviceRow(dev),
        iovaPfn: Number(IOVA) / PAGE,
        pages: PAGES,
        stride: 3,
        phase: index % 2,
        seed: 0x1234 + index * 7919,
        control,
        bytes: 64,
        index,
      };
      const w = new Worker(workerUrl('dirty-writer-worker'), { workerData: start });
      results.push(new Promise((resolve, reject) => (w.once('message', resolve), w.once('error', reject))));
    }
    const args = { iova: IOVA, length: BigInt(PAGES * PAGE), pageSize: BigInt(PAGE) };
    const reported = new Set<number>();
    let reads = 0;
    const deadline = Date.now() + 8000;
    // Until every worker has written a good deal (a worker may start late on a loaded machine).
    const fewest = (): number => Math.min(...Array.from({ length: WORKERS }, (_, i) => Atomics.load(ctl, DirtyWriterControl.WRITES_BASE + i)));
    while (Date.now() < deadline && (reads < 50 || fewest() < 5000)) {
      for (const p of bitsOf(ctx.hwptGetDirtyBitmap(hwpt, args))) {
        reported.add(p);
        copyPage(p);
      }
      reads++;
      await new Promise((r) => setTimeout(r, 1));
    }
    Atomics.store(ctl, DirtyWriterControl.STOP, 1);
    const done = await Promise.all(results);
    for (const p of bitsOf(ctx.hwptGetDirtyBitmap(hwpt, args))) {
      reported.add(p);
      copyPage(p);
    }
    expect(done.map((r) => r.faults)).toEqual([0, 0, 0, 0]);
    expect(done.every((r) => r.writes > 0)).toBe(true);
    expect(reads).toBeGreaterThan(10);
    // No page the workers never write is reported, and every written page was (the copy is whole).
    expect([...reported].filter((p) => p % 3 === 2)).toEqual([]);
    const live = new Uint8Array(PAGES * PAGE);
    memory.read(GPA, live);
    const differing = Array.from({ length: PAGES }, (_, p) => p).filter((p) => !Buffer.from(live.subarray(p * PAGE, (p + 1) * PAGE)).equals(shadow.subarray(p * PAGE, (p + 1) * PAGE)));
    expect(differing).toEqual([]);
    expect(reported.size).toBeGreaterThan(100);
  }, 20000);
});

describe('dirty tracking under nested translation', () => {
  it("a write through a guest stage-1 table dirties the stage-2 page it reached, in the parent's bitmap; table walks dirty nothing", () => {
    const g = nestedGuest({ dirtyParent: true });
    g.ctx.hwptSetDirtyTracking(g.parent, true);
    const VA = 0x40_0000n;
    const GPA = 0x20_0000;
    const GPA2 = 0x60_0000;
    g.builder.map(VA, GPA, X86_PAGE_4K, USER_RW);
    g.builder.map(VA + 0x1000n, GPA2, X86_PAGE_4K, USER_RW);
    const bitmapPages = (): bigint[] => {
      const bits = g.ctx.hwptGetDirtyBitmap(g.parent, { iova: 0n, length: BigInt(GUEST_RAM), pageSize: 0x1000n });
      const out: bigint[] = [];
      bits.forEach((word, w) => {
        for (let b = 0; word !== 0n && b < 64; b++) if ((word >> BigInt(b)) & 1n) out.push(BigInt(w * 64 + b) * 0x1000n);
      });
      return out;
    };
    // Stage 2 maps guest RAM with 2 MiB leaves: a written page's leaf is dirty as a whole (as the
    // kernel reports a huge IOPTE), and nothing else — not the table pages the walks read.
    const leafOf = (gpa: number): bigint[] => Array.from({ length: 512 }, (_, i) => (BigInt(gpa) & ~0x1f_ffffn) + BigInt(i) * 0x1000n);
    expect(bitmapPages()).toEqual([]);
    // Owner side: Context.translate.
    expect(g.ctx.translate(g.dev, 0, VA + 8n, 8, 'write').spans?.[0]?.gpa).toBe(HOST_BASE + GPA + 8);
    expect(bitmapPages()).toEqual(leafOf(GPA));
    expect(bitmapPages()).toEqual([]);
    // A device worker's translator: the page stage 1 led to, in another stage-2 leaf.
    const { t } = g.translator();
    expect(t.translate(g.ctx.deviceRow(g.dev), undefined, VA + 0x1000n, 16, FaultAccess.WRITE)).toBe(FaultReason.NONE);
    expect(t.translate(g.ctx.deviceRow(g.dev), undefined, VA, 16, FaultAccess.READ)).toBe(FaultReason.NONE);
    expect(bitmapPages()).toEqual(leafOf(GPA2));
    expect(bitmapPages()).toEqual([]);
  });
});
