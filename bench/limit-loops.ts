import { IotlbEntry } from '../src/ioasid/iotlb.js';
import { scatteredFrame, type TimedLoop } from './harness.js';
import { PlainRadix, SEQUENCE_LENGTH, WALK_SEED, plainWalk, randomPages } from './plain-radix.js';
import { COPY_BLOCK, COPY_REGION } from './sizes.js';

/**
 * The single-thread limits, as loops the data-plane worker samples in turn with the figures they
 * bound: a limit measured a minute earlier on a shared host is not the same machine.
 */

/** Bytes of the default IOTLB's entry array: 1024 + 64 + 16 entries of four float64 words. */
export const IOTLB_BYTES = (1024 + 64 + 16) * IotlbEntry.STRIDE * Float64Array.BYTES_PER_ELEMENT;

/** Random reads of an Int32Array as large as the IOTLB's entries. */
export function arrayReadLoop(iterations: number): TimedLoop {
  const data = new Int32Array(IOTLB_BYTES / Int32Array.BYTES_PER_ELEMENT);
  for (let i = 0; i < data.length; i++) data[i] = i * 7;
  const index = randomPages(0xa11a, data.length);
  const mask = SEQUENCE_LENGTH - 1;
  return {
    iterations,
    loop(n) {
      let acc = 0;
      for (let i = 0; i < n; i++) acc = (acc + data[index[i & mask]!]!) | 0;
      return acc;
    },
  };
}

/** Hand-written 4-level walks over `pages` entries, in the order the translate miss loop uses. */
export function radixWalkLoop(pages: number, iterations: number): TimedLoop {
  const table = new PlainRadix(pages);
  for (let pfn = 0; pfn < pages; pfn++) table.insert(pfn, scatteredFrame(pfn, 4096));
  const pfns = randomPages(WALK_SEED, pages);
  const mask = SEQUENCE_LENGTH - 1;
  const { words, root } = table;
  return {
    iterations,
    loop(n) {
      let acc = 0;
      for (let i = 0; i < n; i++) acc = (acc + plainWalk(words, root, pfns[i & mask]!)) | 0;
      return acc;
    },
  };
}

/** 64 KiB copies between two SharedArrayBuffers, cycling over COPY_REGION of each. */
export function memcpyLoop(iterations: number): TimedLoop {
  const src = new Uint8Array(new SharedArrayBuffer(COPY_REGION));
  const dst = new Uint8Array(new SharedArrayBuffer(COPY_REGION));
  // Touch every page: untouched pages all read as the one shared zero page and would flatter the copy.
  for (let i = 0; i < src.length; i += 4096) src[i] = i >>> 12;
  dst.fill(1);
  const blocks = COPY_REGION / COPY_BLOCK;
  return {
    iterations,
    loop(n) {
      for (let i = 0; i < n; i++) {
        const at = (i % blocks) * COPY_BLOCK;
        dst.set(src.subarray(at, at + COPY_BLOCK), at);
      }
      return dst[n & (COPY_REGION - 1)]!;
    },
  };
}
