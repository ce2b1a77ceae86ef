import type { BenchContext } from './harness.js';

/** Block of the memcpy limit and of the DMA copy. */
export const COPY_BLOCK = 64 << 10;
/** Bytes each side of a copy cycles over: larger than a core's L2, as DMA buffers are. */
export const COPY_REGION = 8 << 20;

/** Live 4 KiB mappings of the big IOAS and entries of the radix limit: 1M, fewer in a quick run. */
export function mappingCount(ctx: BenchContext): number {
  return ctx.quick ? 1 << 17 : 1 << 20;
}
