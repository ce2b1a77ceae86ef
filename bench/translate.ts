import { createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { runWorker, type BenchGroup } from './harness.js';
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
    'translate.hit_ns', 'translate.hit_dma_ns', 'translate.miss_ns', 'translate.walk_ns', 'dma.copy_64k_gbps', 'dma.copy_64k_hot_gbps'],
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
  },
};

/** Nested misses: the guest's x86-64 stage-1 walk over the backend's stage-2 table. */
export const nested: BenchGroup = {
  name: 'translate.nested',
  emits: ['translate.nested_miss_ns'],
  async run(ctx) {
    const guest = await nestedGuest(ctx);
    const start: NestedStart = {
      memory: guest.memory.describe(),
      pool: guest.context.describeShared().pool.buffer,
      header: guest.header,
      root: guest.root,
      basePfn: guest.basePfn,
      pages: guest.pages,
      seed: WALK_SEED,
      quick: ctx.quick,
    };
    ctx.progress('nested walks in a device worker');
    const r = await runWorker<NestedResult>('nested', start);
    ctx.record('translate.nested_miss_ns', r.missNs);
    ctx.env.nested_stage2_lookups_per_miss = r.reads;
  },
};
