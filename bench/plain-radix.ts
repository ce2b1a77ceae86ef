import { xorshift } from './harness.js';

/**
 * The physical limit our table format is measured against: a hand-written 4-level radix table in
 * one Int32Array, with the same 8-byte entries (flags word, frame word) and 4 KiB tables as
 * src/pagetable, but plain loads, shifts and masks only: no atomics, no root word, no level
 * count, no division, no result object.
 */
export class PlainRadix {
  readonly words: Int32Array;
  readonly root = 1;
  private next = 2;

  constructor(pages: number) {
    // Root and one level-2 table, then level-1 and level-0 tables for `pages` pages; table 0 unused.
    const tables = 2 + Math.ceil(pages / 512 ** 3) + Math.ceil(pages / 512 ** 2) + Math.ceil(pages / 512) + 1;
    this.words = new Int32Array(tables * 1024);
  }

  insert(pfn: number, frame: number): void {
    const w = this.words;
    let t = this.root;
    for (let shift = 27; shift > 0; shift -= 9) {
      const e = (t << 10) | (((pfn >>> shift) & 511) << 1);
      if (w[e] === 0) {
        w[e + 1] = this.next++;
        w[e] = 1;
      }
      t = w[e + 1]!;
    }
    const e = (t << 10) | ((pfn & 511) << 1);
    w[e + 1] = frame;
    w[e] = 1;
  }
}

/** Guest frame of page `pfn`, or -1. The loop the limit times. */
export function plainWalk(w: Int32Array, root: number, pfn: number): number {
  let t = root;
  for (let shift = 27; shift > 0; shift -= 9) {
    const e = (t << 10) | (((pfn >>> shift) & 511) << 1);
    if (w[e] === 0) return -1;
    t = w[e + 1]!;
  }
  const e = (t << 10) | ((pfn & 511) << 1);
  return w[e] === 0 ? -1 : w[e + 1]!;
}

/** Length of every random page sequence (a power of two: loops index it with a mask). */
export const SEQUENCE_LENGTH = 1 << 16;

/** `SEQUENCE_LENGTH` pseudo-random page numbers below `pages`, the same for a given seed. */
export function randomPages(seed: number, pages: number): Int32Array {
  const next = xorshift(seed);
  const out = new Int32Array(SEQUENCE_LENGTH);
  for (let i = 0; i < out.length; i++) out[i] = next() % pages;
  return out;
}

/** Seed shared by the radix limit and the translate miss loop, so both visit the same pages. */
export const WALK_SEED = 0x5eed_0001;
