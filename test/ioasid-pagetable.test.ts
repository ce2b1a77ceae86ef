import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import {
  EntryFlag,
  HeaderSlot,
  IoPageTable,
  LEVEL_PAGES,
  MAX_IOVA_PFN,
  ROOT_LEVELS_SHIFT,
  TABLE_BYTES,
  TablePool,
  emptyLeafInfo,
  headerGeneration,
  walk,
} from '../src/pagetable/index.js';
import { fuzzParams } from './support/fuzz.js';

const RW = EntryFlag.READ | EntryFlag.WRITE;
const PAGES_2M = LEVEL_PAGES[1]!;
const PAGES_1G = LEVEL_PAGES[2]!;

function fresh(maxTables = 4096): { pool: TablePool; table: IoPageTable } {
  const pool = new TablePool({ maxTables });
  expect(pool.ensure(IoPageTable.CREATE_TABLES)).toBe(true);
  return { pool, table: new IoPageTable(pool, 1) };
}

/** Maps as the IOAS layer does: capacity first. The count is exact unless the root grows. */
function mapChecked(pool: TablePool, table: IoPageTable, pfn: number, pages: number, guest: number, perms: number, huge: boolean): void {
  const need = table.tablesForMap(pfn, pages, guest, huge);
  expect(pool.ensure(need)).toBe(true);
  const before = pool.stats().tablesInUse;
  const levels = table.levelCount;
  table.map(pfn, pages, guest, perms, huge);
  const used = pool.stats().tablesInUse - before;
  if (table.levelCount === levels) expect(used).toBe(need);
  else expect(used).toBeLessThanOrEqual(need);
}

/** A reader that knows only the shared buffer and the header index, as another thread would. */
function remoteWalk(buffer: SharedArrayBuffer, header: number, pfn: number) {
  const words = new Int32Array(buffer);
  const out = emptyLeafInfo();
  return walk(words, header, pfn, out) ? { ...out } : undefined;
}

describe('radix page table: leaves of every size', () => {
  it('maps and looks up 4 KiB leaves with their permissions and AREA_START on the first page', () => {
    const { pool, table } = fresh();
    mapChecked(pool, table, 0x100, 3, 0x40, EntryFlag.READ, true);
    const first = remoteWalk(pool.buffer, table.header, 0x100)!;
    expect(first.guestPfn).toBe(0x40);
    expect(first.pageShift).toBe(12);
    expect(first.flags & EntryFlag.AREA_START).not.toBe(0);
    expect(first.flags & EntryFlag.WRITE).toBe(0);
    const third = remoteWalk(pool.buffer, table.header, 0x102)!;
    expect(third.guestPfn).toBe(0x42);
    expect(third.flags & EntryFlag.AREA_START).toBe(0);
    expect(remoteWalk(pool.buffer, table.header, 0x103)).toBeUndefined();
    expect(remoteWalk(pool.buffer, table.header, 0xff)).toBeUndefined();
  });

  it('uses one 2 MiB leaf for an aligned 2 MiB map when huge pages are allowed, 512 leaves when not', () => {
    const { pool, table } = fresh();
    mapChecked(pool, table, PAGES_2M * 3, PAGES_2M, PAGES_2M * 7, RW, true);
    const tablesHuge = table.tableCount;
    const hit = remoteWalk(pool.buffer, table.header, PAGES_2M * 3 + 17)!;
    expect(hit.pageShift).toBe(21);
    expect(hit.leafPfn).toBe(PAGES_2M * 3);
    expect(hit.guestPfn).toBe(PAGES_2M * 7 + 17);

    const other = fresh();
    mapChecked(other.pool, other.table, PAGES_2M * 3, PAGES_2M, PAGES_2M * 7, RW, false);
    expect(remoteWalk(other.pool.buffer, other.table.header, PAGES_2M * 3 + 17)!.pageShift).toBe(12);
    expect(other.table.tableCount).toBe(tablesHuge + 1);
  });

  it('uses a 1 GiB leaf for an aligned 1 GiB map, and 2 MiB leaves when IOVA and GPA agree only modulo 2 MiB', () => {
    const { pool, table } = fresh();
    mapChecked(pool, table, PAGES_1G, PAGES_1G, 0, RW, true);
    expect(table.tableCount).toBe(2); // the root and the level-2 table that holds the leaf
    const hit = remoteWalk(pool.buffer, table.header, PAGES_1G + 12345)!;
    expect(hit.pageShift).toBe(30);
    expect(hit.guestPfn).toBe(12345);

    const other = fresh();
    mapChecked(other.pool, other.table, PAGES_1G, PAGES_1G, PAGES_2M, RW, true);
    expect(remoteWalk(other.pool.buffer, other.table.header, PAGES_1G + 12345)!.pageShift).toBe(21);
    expect(remoteWalk(other.pool.buffer, other.table.header, PAGES_1G + 12345)!.guestPfn).toBe(PAGES_2M + 12345);
  });

  it('covers an unaligned head and tail with 4 KiB leaves around huge ones', () => {
    const { pool, table } = fresh();
    const start = PAGES_2M - 2;
    const pages = 2 * PAGES_2M + 5;
    mapChecked(pool, table, start, pages, start, RW, true);
    const sizes = new Map<number, number>();
    table.forEachLeaf(0, MAX_IOVA_PFN, (_pfn, n) => {
      sizes.set(n, (sizes.get(n) ?? 0) + 1);
    });
    expect(sizes.get(PAGES_2M)).toBe(2);
    expect(sizes.get(1)).toBe(2 + 3);
    expect(table.mappedPages).toBe(pages);
    for (const pfn of [start, start + 1, PAGES_2M, PAGES_2M * 2 + 100, start + pages - 1]) {
      expect(remoteWalk(pool.buffer, table.header, pfn)!.guestPfn).toBe(pfn);
    }
  });
});

describe('radix page table: root growth to 64-bit IOVAs', () => {
  it('starts with 4 levels and grows to 5 and 6 only when a mapping needs it, keeping old translations', () => {
    const { pool, table } = fresh();
    const readLevels = () => Atomics.load(new Int32Array(pool.buffer), table.header + HeaderSlot.ROOT) >>> ROOT_LEVELS_SHIFT;
    mapChecked(pool, table, 5, 1, 9, RW, true);
    expect(readLevels()).toBe(4);
    mapChecked(pool, table, 2 ** 36 - 1, 1, 10, RW, true); // IOVA just below 2^48
    expect(readLevels()).toBe(4);
    mapChecked(pool, table, 2 ** 36, 1, 11, RW, true); // IOVA 2^48
    expect(readLevels()).toBe(5);
    mapChecked(pool, table, 2 ** 45, 1, 12, RW, true); // IOVA 2^57
    expect(readLevels()).toBe(6);
    mapChecked(pool, table, MAX_IOVA_PFN, 1, 13, RW, true); // the last page below 2^64
    expect(readLevels()).toBe(6);
    for (const [pfn, guest] of [
      [5, 9],
      [2 ** 36 - 1, 10],
      [2 ** 36, 11],
      [2 ** 45, 12],
      [MAX_IOVA_PFN, 13],
    ] as const) {
      expect(remoteWalk(pool.buffer, table.header, pfn)?.guestPfn).toBe(guest);
    }
    expect(table.nextMapped(6, MAX_IOVA_PFN)).toBe(2 ** 36 - 1);
    expect(table.nextMapped(2 ** 45 + 1, MAX_IOVA_PFN)).toBe(MAX_IOVA_PFN);
    expect(table.unmap(0, MAX_IOVA_PFN)).toBe(5);
    expect(table.tableCount).toBe(1);
    expect(remoteWalk(pool.buffer, table.header, MAX_IOVA_PFN)).toBeUndefined();
  });

  it('grows straight to 6 levels when the first mapping is high, dropping the empty 4-level root', () => {
    const { pool, table } = fresh();
    mapChecked(pool, table, MAX_IOVA_PFN, 1, 1, EntryFlag.READ, false);
    expect(table.levelCount).toBe(6);
    expect(table.tableCount).toBe(6);
    expect(remoteWalk(pool.buffer, table.header, 0)).toBeUndefined();
  });
});

describe('radix page table: areas and searches', () => {
  it('reads areas back from AREA_START marks: adjacent areas stay separate, holes end them', () => {
    const { pool, table } = fresh();
    mapChecked(pool, table, 10, 4, 100, RW, true);
    mapChecked(pool, table, 14, 2, 200, EntryFlag.READ, true); // adjacent, its own area
    mapChecked(pool, table, 20, PAGES_2M, PAGES_2M, RW, true);
    const areas: [number, number, number, number][] = [];
    table.forEachArea(0, MAX_IOVA_PFN, (start, pages, guest, flags) => {
      areas.push([start, pages, guest, flags & EntryFlag.PERM_MASK]);
    });
    expect(areas).toEqual([
      [10, 4, 100, RW],
      [14, 2, 200, EntryFlag.READ],
      [20, PAGES_2M, PAGES_2M, RW],
    ]);
    expect(table.areaStartOf(13)).toBe(10);
    expect(table.areaStartOf(15)).toBe(14);
    expect(table.areaStartOf(20 + 300)).toBe(20);
    const partial: number[] = [];
    table.forEachArea(12, 14, (start) => {
      partial.push(start);
    });
    expect(partial).toEqual([10, 14]);
  });

  it('finds the next mapped and unmapped pages, skipping empty and full subtrees', () => {
    const { pool, table } = fresh();
    mapChecked(pool, table, 0, 3 * PAGES_2M, 0, RW, false);
    mapChecked(pool, table, 2 ** 30, 1, 7, RW, false);
    expect(table.nextUnmapped(0, MAX_IOVA_PFN)).toBe(3 * PAGES_2M);
    expect(table.nextMapped(3 * PAGES_2M, MAX_IOVA_PFN)).toBe(2 ** 30);
    expect(table.nextMapped(3 * PAGES_2M, 2 ** 30 - 1)).toBe(-1);
    expect(table.nextUnmapped(2 ** 30, 2 ** 30)).toBe(-1);
    expect(table.nextUnmapped(2 ** 30, 2 ** 30 + 1)).toBe(2 ** 30 + 1);
    expect(table.nextUnmapped(0, 100)).toBe(-1);
    // Beyond the current reach of the root everything is a hole.
    expect(table.nextUnmapped(2 ** 40, MAX_IOVA_PFN)).toBe(2 ** 40);
  });
});

describe('radix page table: unmap, generation and reclaim', () => {
  it('unmaps whole leaves, frees emptied tables, bumps the generation and refuses to cut a leaf', () => {
    const { pool, table } = fresh();
    mapChecked(pool, table, PAGES_2M, PAGES_2M, 0, RW, true);
    mapChecked(pool, table, 3 * PAGES_2M + 1, 2, 5, RW, true);
    const before = headerGeneration(pool.words, table.header);
    expect(() => table.unmap(PAGES_2M + 1, PAGES_2M + 2)).toThrow(/cut the leaf/);
    const seen: [number, number][] = [];
    expect(table.unmap(0, 4 * PAGES_2M, (guest, pages) => seen.push([guest, pages]))).toBe(PAGES_2M + 2);
    expect(seen).toEqual([
      [0, PAGES_2M],
      [5, 1],
      [6, 1],
    ]);
    expect(headerGeneration(pool.words, table.header)).toBe(before + 1);
    expect(table.tableCount).toBe(1);
    expect(table.mappedPages).toBe(0);
  });

  it('keeps freed tables out of reuse until reclaim(), which zeroes them', () => {
    const { pool, table } = fresh();
    mapChecked(pool, table, 0x12345, 1, 1, RW, false);
    const inUse = pool.stats().tablesInUse;
    table.unmap(0x12345, 0x12345);
    const afterUnmap = pool.stats();
    expect(afterUnmap.tablesInUse).toBe(inUse - 3);
    expect(afterUnmap.pendingFree).toBe(3);
    expect(afterUnmap.freeTables).toBe(0);
    // A reader that cached a pointer into the freed level-0 table still finds its old words intact.
    mapChecked(pool, table, 0x99999, 1, 2, RW, false);
    expect(pool.stats().pendingFree).toBe(3);
    expect(pool.reclaim()).toBe(3);
    const after = pool.stats();
    expect(after.pendingFree).toBe(0);
    expect(after.freeTables).toBe(3);
    // 0x99999 already brought back the level-2 table: two of the three reclaimed tables are reused.
    mapChecked(pool, table, 0x12345, 1, 3, RW, false);
    expect(pool.stats().freeTables).toBe(1);
    expect(remoteWalk(pool.buffer, table.header, 0x12345)!.guestPfn).toBe(3);
    table.destroy();
    expect(remoteWalk(pool.buffer, table.header, 0x12345)).toBeUndefined();
    expect(pool.stats().tablesInUse).toBe(1); // the header page
  });

  it('tables emptied by unmap skip zeroing: a radix table reuses them as they are, any other caller gets them zeroed', () => {
    const { pool, table } = fresh();
    mapChecked(pool, table, 0x12345, 1, 7, RW, false);
    const inUse = pool.stats().tablesInUse;
    table.unmap(0x12345, 0x12345);
    expect(pool.reclaim()).toBe(3);
    expect(pool.stats().tablesInUse).toBe(inUse - 3);
    // The emptied level-0 table still holds the leaf's frame word (its flags were cleared).
    const words = pool.words;
    const stale = (t: number): boolean => {
      for (let w = t * 1024; w < (t + 1) * 1024; w += 2) if (words[w] !== 0) throw new Error(`table ${t} has a nonzero flags word`);
      for (let w = t * 1024 + 1; w < (t + 1) * 1024; w += 2) if (words[w] !== 0) return true;
      return false;
    };
    const plain = [pool.alloc(), pool.alloc(), pool.alloc()];
    // Callers that need zeroed memory (PASID directories, stage-1 records) get zeroed tables.
    for (const t of plain) expect(stale(t)).toBe(false);
    for (const t of plain) pool.release(t);
    pool.reclaim();
    // And a radix table rebuilt over reused tables translates exactly what it maps.
    mapChecked(pool, table, 0x12345, 1, 9, RW, false);
    expect(remoteWalk(pool.buffer, table.header, 0x12345)!.guestPfn).toBe(9);
    expect(remoteWalk(pool.buffer, table.header, 0x12346)).toBeUndefined();
  });

  it('reports when the pool maximum would be exceeded, before anything changes', () => {
    const { pool, table } = fresh(8);
    const need = table.tablesForMap(0, 12 * 512, 0, false);
    expect(need).toBeGreaterThan(8);
    expect(pool.ensure(need)).toBe(false);
    expect(table.mappedPages).toBe(0);
  });
});

describe('radix page table: memory per mapping', () => {
  it('stays under 8.5 bytes of table per live 4 KiB mapping at 100k separate maps', () => {
    const { pool, table } = fresh(1 << 16);
    const n = 100_000;
    for (let i = 0; i < n; i++) {
      if (i % 4096 === 0) expect(pool.ensure(table.tablesForMap(0x1000 + i, 1, i, true) + 64)).toBe(true);
      table.map(0x1000 + i, 1, i, RW, true);
    }
    expect(table.mappedPages).toBe(n);
    const bytesPerMapping = (pool.stats().tablesInUse * TABLE_BYTES) / n;
    expect(bytesPerMapping).toBeLessThan(8.5);
    let areas = 0;
    table.forEachArea(0, MAX_IOVA_PFN, () => {
      areas++;
    });
    expect(areas).toBe(n);
    expect(remoteWalk(pool.buffer, table.header, 0x1000 + 77_777)!.guestPfn).toBe(77_777);
  });
});

describe('radix page table: model property', () => {
  it('agrees with a page map under random maps and unmaps of whole areas', () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.record({
            unmap: fc.boolean(),
            pfn: fc.integer({ min: 0, max: 3 * PAGES_2M }),
            pages: fc.integer({ min: 1, max: PAGES_2M + 40 }),
            guest: fc.integer({ min: 0, max: 4 * PAGES_2M }),
            huge: fc.boolean(),
          }),
          { maxLength: 12 },
        ),
        (ops) => {
          const { pool, table } = fresh();
          const model = new Map<number, number>();
          const areas: [number, number][] = [];
          for (const op of ops) {
            const last = op.pfn + op.pages - 1;
            if (op.unmap) {
              // Unmap every area that lies wholly inside the range, as the IOAS layer would.
              for (let i = areas.length - 1; i >= 0; i--) {
                const [s, n] = areas[i]!;
                if (s >= op.pfn && s + n - 1 <= last) {
                  table.unmap(s, s + n - 1);
                  for (let p = s; p < s + n; p++) model.delete(p);
                  areas.splice(i, 1);
                }
              }
            } else if (table.nextMapped(op.pfn, last) < 0) {
              mapChecked(pool, table, op.pfn, op.pages, op.guest, RW, op.huge);
              for (let p = 0; p < op.pages; p++) model.set(op.pfn + p, op.guest + p);
              areas.push([op.pfn, op.pages]);
            }
          }
          expect(table.mappedPages).toBe(model.size);
          const out = emptyLeafInfo();
          for (let p = 0; p < 4 * PAGES_2M + 64; p += 37) {
            const hit = table.lookup(p, out);
            expect(hit ? out.guestPfn : undefined).toBe(model.get(p));
          }
          const seen: [number, number][] = [];
          table.forEachArea(0, MAX_IOVA_PFN, (s, n) => {
            seen.push([s, n]);
          });
          expect(seen).toEqual([...areas].sort((a, b) => a[0] - b[0]));
        },
      ),
      fuzzParams(0x5eed, 150),
    );
  });
});

describe('radix page table: a reader in another thread', () => {
  it('sees only whole mappings (a frame with its own permissions) while the owner remaps and grows the pool', async () => {
    const { Worker } = await import('node:worker_threads');
    // The reader is written from the format in docs/backend.md alone: it imports nothing.
    const source = `
      const { workerData, parentPort } = require('node:worker_threads');
      const { buffer, header, control, pages, bases } = workerData;
      const ctl = new Int32Array(control);
      let words = new Int32Array(buffer, 0, buffer.byteLength >> 2);
      const refresh = () => { words = new Int32Array(buffer, 0, buffer.byteLength >> 2); };
      function walk(pfn) {
        for (;;) {
          if (header + 4 > words.length) { refresh(); continue; }
          const root = Atomics.load(words, header);
          const levels = root >>> 28;
          let table = root & 0x0fffffff;
          let result = null, again = false;
          for (let level = levels - 1; level >= 0; level--) {
            const w = table * 1024 + (Math.floor(pfn / 512 ** level) % 512) * 2;
            if (w + 2 > words.length) { refresh(); again = true; break; }
            const flags = Atomics.load(words, w);
            if ((flags & 1) === 0) break;
            const frame = words[w + 1] >>> 0;
            if (Atomics.load(words, w) !== flags) { again = true; break; }
            if (level === 0 || (flags & 8) !== 0) {
              result = [frame + (pfn % 512 ** level), flags];
              break;
            }
            table = frame;
          }
          if (!again) return result;
        }
      }
      Atomics.store(ctl, 3, 1);
      let walks = 0, violations = 0, hits = 0;
      while (Atomics.load(ctl, 0) === 0) {
        const pfn = (walks * 7919) % pages;
        const hit = walk(pfn);
        walks++;
        Atomics.store(ctl, 2, walks);
        if (hit !== null) {
          hits++;
          const base = hit[0] - pfn;
          const k = bases.indexOf(base);
          // Mapping k grants WRITE exactly when k is odd.
          if (k < 0 || ((hit[1] & 4) !== 0) !== (k % 2 === 1)) violations++;
        }
        if ((walks & 1023) === 0) Atomics.store(ctl, 1, walks);
      }
      let finalMisses = 0;
      for (let pfn = 0; pfn < pages; pfn++) if (walk(pfn) === null) finalMisses++;
      parentPort.postMessage({ walks, hits, violations, finalMisses });
    `;
    const pool = new TablePool({ initialTables: 4, maxTables: 4096 });
    expect(pool.ensure(IoPageTable.CREATE_TABLES)).toBe(true);
    const table = new IoPageTable(pool, 1);
    const pages = 3 * 512;
    const bases = [1000, 5000, 9000, 13000];
    const control = new SharedArrayBuffer(5 * 4);
    const ctl = new Int32Array(control);
    const worker = new Worker(source, { eval: true, workerData: { buffer: pool.buffer, header: table.header, control, pages, bases } });
    const done = new Promise<{ walks: number; hits: number; violations: number; finalMisses: number }>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    while (Atomics.load(ctl, 3) === 0) await new Promise((r) => setTimeout(r, 1));
    const spare = new IoPageTable(pool, 2); // grows the pool under the reader from time to time
    for (let round = 0; round < 400 || Atomics.load(ctl, 1) < 20_000; round++) {
      const k = round % bases.length;
      const perms = EntryFlag.READ | (k % 2 === 1 ? EntryFlag.WRITE : 0);
      expect(pool.ensure(table.tablesForMap(0, pages, bases[k]!, false))).toBe(true);
      table.map(0, pages, bases[k]!, perms, false);
      if (round % 50 === 0) mapChecked(pool, spare, round * 512, 1, 1, RW, false);
      table.unmap(0, pages - 1);
      // As the context does after a narrowing change, wait until every walk that may have begun
      // before the unmap has ended before mapping again (the reader's walks are its DMAs).
      const walked = Atomics.load(ctl, 2);
      for (const deadline = Date.now() + 5000; Atomics.load(ctl, 2) < walked + 2 && Date.now() < deadline; ) {
        if (Atomics.load(ctl, 0) !== 0) break;
      }
      if (round % 100 === 99) await new Promise((r) => setTimeout(r, 0));
      if (round > 100_000) break;
    }
    mapChecked(pool, table, 0, pages, bases[1]!, RW, false);
    Atomics.store(ctl, 0, 1);
    const result = await done;
    await worker.terminate();
    expect(result.violations).toBe(0);
    expect(result.finalMisses).toBe(0);
    expect(result.walks).toBeGreaterThan(0);
  });
});
