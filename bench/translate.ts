import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { X86PageTableBuilder, memoryEntryWriter, pagesFromAllocator } from '../guest-fixtures/pagetable/x86-64-builder.js';
import { FaultAccess } from '../src/ioasid/fault-queue.js';
import { HwptAllocFlag, HwptDataType, IommufdHost, IoasMapFlag, U64_MAX, encodeVtdS1 } from '../src/ioasid/index.js';
import { QuiescenceOwner, QuiescenceWorker, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../src/ioasid/translator.js';
import { GuestMemory } from '../src/memory/index.js';
import { PAGE_SIZE } from '../src/pagetable/index.js';
import { X86_PAGE_4K } from '../src/pagetable/x86-64.js';
import { interleaved, runWorker, type BenchGroup, type TimedLoop } from './harness.js';
import { mappedContext, nestedGuest } from './fixtures.js';
import { WALK_SEED } from './plain-radix.js';
import type { DataPlaneResult, DataPlaneStart, NestedResult, NestedStart } from './protocol.js';

/**
 * Translation in a device worker over the 1M-mapping IOAS and DMA copies through it, with the
 * single-thread limits they are read against sampled in turn in the same worker.
 */
export const translate: BenchGroup = {
  name: 'translate',
  emits: [
    'limit.array_read_ns',
    'limit.radix_walk_ns',
    'limit.memcpy_gbps',
    'translate.hit_ns', 'translate.hit_dma_ns', 'translate.miss_ns', 'translate.walk_ns', 'dma.copy_64k_gbps', 'dma.copy_64k_hot_gbps', 'dma.copy_64k_dirty_gbps'],
  async run(ctx) {
    const mapped = await mappedContext(ctx);
    const shared = mapped.context.describeShared();
    const start: DataPlaneStart = {
      pool: shared.pool.buffer,
      devices: shared.devices.buffer,
      row: mapped.row,
      quiescence: createQuiescenceBuffer(4),
      memory: mapped.memory.describe(),
      basePfn: mapped.basePfn,
      pages: mapped.pages,
      srcIova: mapped.srcIova,
      dstIova: mapped.dstIova,
      windowBytes: mapped.windowBytes,
      seed: WALK_SEED,
      quick: ctx.quick,
    };
    ctx.progress('translating in a device worker');
    const r = await runWorker<DataPlaneResult>('dataplane', start);
    ctx.record('limit.array_read_ns', r.arrayReadNs);
    ctx.record('limit.radix_walk_ns', r.radixWalkNs);
    ctx.record('limit.memcpy_gbps', r.memcpyGbps);
    ctx.record('translate.hit_ns', r.hitNs);
    ctx.record('translate.hit_dma_ns', r.hitDmaNs);
    ctx.record('translate.miss_ns', r.missNs);
    ctx.record('translate.walk_ns', r.walkNs);
    ctx.record('dma.copy_64k_gbps', r.copyGbps);
    ctx.record('dma.copy_64k_hot_gbps', r.copyHotGbps);
    ctx.env.translate_miss_rate = Number(r.missRate.toFixed(4));

    // The same copies with dirty tracking on: the device moves to a DIRTY_TRACKING HWPT of the
    // same IOAS, and the owner reads and clears the destination window's bitmap every 2 ms (each
    // read moves the window's generation, so the worker re-walks and re-marks what it writes next).
    ctx.progress('the same DMA copies with dirty tracking on');
    const c = mapped.context;
    const dirtyHwpt = c.hwptAlloc(mapped.device, mapped.ioas, { flags: HwptAllocFlag.DIRTY_TRACKING });
    c.deviceAttach(mapped.device, dirtyHwpt);
    c.hwptSetDirtyTracking(dirtyHwpt, true);
    const quiescence = createQuiescenceBuffer(4);
    const epochs = new QuiescenceOwner(quiescence);
    let reads = 0;
    const timer = setInterval(() => {
      c.hwptGetDirtyBitmap(dirtyHwpt, { iova: BigInt(mapped.dstIova), length: BigInt(mapped.windowBytes), pageSize: BigInt(PAGE_SIZE) });
      epochs.bumpEpoch();
      reads++;
    }, 2);
    let d: DataPlaneResult;
    try {
      d = await runWorker<DataPlaneResult>('dataplane', { ...start, row: c.deviceRow(mapped.device), quiescence, copyOnly: true });
    } finally {
      clearInterval(timer);
      c.hwptSetDirtyTracking(dirtyHwpt, false);
      c.deviceAttach(mapped.device, mapped.ioas);
      c.destroy(dirtyHwpt);
    }
    ctx.record('dma.copy_64k_dirty_gbps', d.copyGbps);
    ctx.env.dirty_bitmap_reads = reads;
  },
};

/**
 * Nested translation: misses and hits of a device worker's Translator over a nested attachment
 * (the guest's x86-64 stage 1 over the backend's stage-2 IOAS), the uncached 2-D walk, and what a
 * range invalidation costs against a full one.
 */
export const nested: BenchGroup = {
  name: 'translate.nested',
  emits: ['translate.nested_miss_ns', 'translate.nested_hit_ns', 'translate.nested_walk_ns', 'translate.nested_inval_range_ns', 'translate.nested_inval_full_ns'],
  async run(ctx) {
    const guest = await nestedGuest(ctx);
    const shared = guest.context.describeShared();
    const start: NestedStart = {
      memory: shared.memory,
      pool: shared.pool.buffer,
      devices: shared.devices.buffer,
      row: guest.row,
      quiescence: createQuiescenceBuffer(4),
      header: guest.header,
      root: guest.root,
      basePfn: guest.basePfn,
      pages: guest.pages,
      seed: WALK_SEED,
      quick: ctx.quick,
    };
    ctx.progress('nested translation in a device worker');
    const r = await runWorker<NestedResult>('nested', start);
    ctx.record('translate.nested_miss_ns', r.missNs);
    ctx.record('translate.nested_hit_ns', r.hitNs);
    ctx.record('translate.nested_walk_ns', r.walkNs);
    ctx.env.nested_stage2_lookups_per_walk = r.reads;
    ctx.env.nested_fills_per_cold_translation = Number(r.missRate.toFixed(4));

    ctx.progress('nested invalidation: one page against everything');
    const inval = invalidationCosts(ctx.quick);
    ctx.record('translate.nested_inval_range_ns', inval.rangeNs);
    ctx.record('translate.nested_inval_full_ns', inval.fullNs);
  },
};

/**
 * Owner and translator in one thread (the owner's wait finds the translator outside its DMA): a
 * guest with 4096 4 KiB leaves, a 256-page working set kept in the IOTLB, and per iteration one
 * hwptInvalidate then one DMA over the working set.
 */
function invalidationCosts(quick: boolean): { rangeNs: number; fullNs: number } {
  const MIB = 1 << 20;
  const memory = GuestMemory.create(16 * MIB);
  const host = new IommufdHost(memory, { devices: [{ name: 'dev0', group: 'g0' }], autoReclaim: false });
  const context = host.open();
  const quiescence = createQuiescenceBuffer(2);
  context.attachQuiescence(new QuiescenceOwner(quiescence));
  const ioas = context.ioasAlloc();
  context.ioasMap(ioas, { gpa: 0, length: BigInt(16 * MIB), iova: 0n, flags: IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE });
  const device = context.deviceBind('dev0');
  const builder = new X86PageTableBuilder({ allocator: pagesFromAllocator(new GuestAllocator(12 * MIB, 4 * MIB)), write: memoryEntryWriter(memory) });
  const LEAVES = 4096;
  const BASE = 0x4000_0000;
  for (let i = 0; i < LEAVES; i++) builder.map(BASE + i * PAGE_SIZE, (i % 2048) * PAGE_SIZE, X86_PAGE_4K, { writable: true, user: true, executable: false });
  const parent = context.hwptAlloc(device, ioas, { flags: HwptAllocFlag.NEST_PARENT });
  const nestedHwpt = context.hwptAlloc(device, parent, { dataType: HwptDataType.VTD_S1, data: encodeVtdS1(BigInt(builder.root), 48) });
  context.deviceAttach(device, nestedHwpt);
  const shared = context.describeShared();
  const t = new Translator({ pool: shared.pool.buffer, attachments: new DeviceTableAttachments(shared), quiescence: QuiescenceWorker.register(quiescence) });
  const row = context.deviceRow(device);
  const WORKING_SET = 256;
  const working = new Float64Array(WORKING_SET);
  for (let i = 0; i < WORKING_SET; i++) working[i] = BASE + ((i * 37) % LEAVES) * PAGE_SIZE + 64;
  const dma = (): number => {
    t.beginDma();
    let acc = 0;
    for (let i = 0; i < WORKING_SET; i++) {
      if (t.translate(row, undefined, working[i]!, 64, FaultAccess.READ) !== 0) throw new Error('nested translation faulted');
      acc += t.spans.gpa[0]!;
    }
    t.endDma();
    return acc;
  };
  const one = [{ addr: 0n, npages: 1n, flags: 0 }];
  const all = [{ addr: 0n, npages: U64_MAX, flags: 0 }];
  const loop = (full: boolean): TimedLoop => ({
    iterations: quick ? 256 : 2048,
    loop(n) {
      let acc = 0;
      for (let i = 0; i < n; i++) {
        if (full) {
          context.hwptInvalidate(nestedHwpt, all);
        } else {
          // A page of the working set, a different one each time.
          const page = BigInt(Math.floor((working[i % WORKING_SET]! - BASE) / PAGE_SIZE));
          one[0] = { addr: BigInt(BASE) + page * BigInt(PAGE_SIZE), npages: 1n, flags: 0 };
          context.hwptInvalidate(nestedHwpt, one);
        }
        acc += dma();
      }
      return acc;
    },
  });
  dma();
  const [rangeNs = NaN, fullNs = NaN] = interleaved([loop(false), loop(true)], quick ? 5 : 11, 1);
  context.close();
  return { rangeNs, fullNs };
}
