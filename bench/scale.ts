import { IommufdHost, IoasMapFlag } from '../src/ioasid/index.js';
import { GuestMemory } from '../src/memory/index.js';
import { median, type BenchContext, type BenchGroup } from './harness.js';
import { mappedContext } from './fixtures.js';

const GIB = 2 ** 30;

/** ioasMap / ioasUnmap of 1 GiB with huge pages: GPA 0 and IOVA 1 GiB, so one 1 GiB leaf serves it. */
function map1g(ctx: BenchContext): { mapNs: number; unmapNs: number } {
  const memory = GuestMemory.create(GIB);
  const host = new IommufdHost(memory, { devices: [{ name: 'dma0', group: 'g0' }] });
  const context = host.open();
  const ioas = context.ioasAlloc();
  const device = context.deviceBind('dma0');
  context.deviceAttach(device, ioas);
  const flags = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
  const rounds = ctx.quick ? 5 : 25;
  const maps = new Float64Array(rounds);
  const unmaps = new Float64Array(rounds);
  for (let i = -2; i < rounds; i++) {
    const t0 = performance.now();
    context.ioasMap(ioas, { gpa: 0, length: BigInt(GIB), iova: BigInt(GIB), flags });
    const t1 = performance.now();
    context.ioasUnmap(ioas, BigInt(GIB), BigInt(GIB));
    const t2 = performance.now();
    if (i >= 0) {
      maps[i] = (t1 - t0) * 1e6;
      unmaps[i] = (t2 - t1) * 1e6;
    }
  }
  context.close();
  return { mapNs: median(maps), unmapNs: median(unmaps) };
}

/**
 * A 4 KiB map + unmap pair with `live` other 4 KiB mappings in the IOAS: how the backend's cost
 * grows with the size of the address space it edits.
 */
function pairWithLive(ctx: BenchContext, live: number): number {
  const memory = GuestMemory.create(64 << 20);
  const host = new IommufdHost(memory, { devices: [{ name: 'dma0', group: 'g0' }] });
  const context = host.open();
  const ioas = context.ioasAlloc();
  context.deviceAttach(context.deviceBind('dma0'), ioas);
  const flags = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
  // Every other page, so each mapping is its own area (no merging into one big area).
  for (let i = 0; i < live; i++) context.ioasMap(ioas, { gpa: (i % 16384) * 4096, length: 4096n, iova: BigInt(2 * i) * 4096n, flags });
  const pairs = ctx.quick ? 5000 : 20_000;
  const base = BigInt(2 * live + 1024) * 4096n;
  const samples = new Float64Array(5);
  for (let round = -1; round < samples.length; round++) {
    const t0 = performance.now();
    for (let i = 0; i < pairs; i++) {
      const iova = base + BigInt(i % 64) * 4096n;
      context.ioasMap(ioas, { gpa: (i % 1024) * 4096, length: 4096n, iova, flags });
      context.ioasUnmap(ioas, iova, 4096n);
    }
    if (round >= 0) samples[round] = ((performance.now() - t0) * 1e6) / pairs;
  }
  context.close();
  return median(samples);
}

/** Memory and time per mapping as the IOAS grows. */
export const scale: BenchGroup = {
  name: 'scale',
  emits: [
    'scale.bytes_per_mapping',
    'scale.pool_bytes_per_mapping',
    'scale.map_4k_ns',
    'scale.map_1g_ns',
    'scale.unmap_1g_ns',
    'scale.map_unmap_pair_ns_1k',
    'scale.map_unmap_pair_ns_100k',
    'scale.map_unmap_pair_ns_1m',
  ],
  async run(ctx) {
    for (const [live, name] of [
      [1_000, 'scale.map_unmap_pair_ns_1k'],
      [100_000, 'scale.map_unmap_pair_ns_100k'],
      [1_000_000, 'scale.map_unmap_pair_ns_1m'],
    ] as const) {
      if (!ctx.wants(name)) continue;
      ctx.progress(`map + unmap pairs with ${live} live mappings`);
      ctx.record(name, pairWithLive(ctx, live));
    }
    if (ctx.wants('scale.bytes_per_mapping') || ctx.wants('scale.pool_bytes_per_mapping') || ctx.wants('scale.map_4k_ns')) {
      const mapped = await mappedContext(ctx);
      ctx.record('scale.bytes_per_mapping', mapped.bytesPerMapping);
      ctx.record('scale.pool_bytes_per_mapping', mapped.poolBytesPerMapping);
      ctx.record('scale.map_4k_ns', mapped.mapNs);
    }
    if (ctx.wants('scale.map_1g_ns') || ctx.wants('scale.unmap_1g_ns')) {
      ctx.progress('mapping 1 GiB with huge pages');
      const { mapNs, unmapNs } = map1g(ctx);
      ctx.record('scale.map_1g_ns', mapNs);
      ctx.record('scale.unmap_1g_ns', unmapNs);
    }
  },
};
