import { runInNewContext } from 'node:vm';
import { setFlagsFromString } from 'node:v8';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { X86PageTableBuilder, memoryEntryWriter, pagesFromAllocator } from '../guest-fixtures/pagetable/x86-64-builder.js';
import {
  HwptAllocFlag,
  HwptDataType,
  IommufdHost,
  IoasMapFlag,
  IommuOption,
  IommuOptionOp,
  emptyRowValue,
  encodeVtdS1,
  readRow,
  type Context,
} from '../src/ioasid/index.js';
import { GuestMemory } from '../src/memory/index.js';
import { PAGE_SIZE, TABLE_BYTES } from '../src/pagetable/index.js';
import { X86_PAGE_4K } from '../src/pagetable/x86-64.js';
import { scatteredFrame, type BenchContext } from './harness.js';
import { COPY_REGION, mappingCount } from './sizes.js';

/** Guest frames the 4 KiB mappings point into (many IOVA pages share a frame, as aliases may). */
const TARGET_FRAMES = 4096;
/** First IOVA page of the 4 KiB mappings: 1 GiB, so 1M pages stay in a 4-level table. */
export const MAPPINGS_BASE_PFN = 1 << 18;
const RW = IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;

/**
 * One context whose IOAS holds `pages` live 4 KiB mappings made one ioasMap call each (as a guest
 * driver maps pages one at a time), plus two contiguous DMA windows mapped 4 KiB-granular. The
 * translate figures walk it; the scale figures measure what building it cost.
 */
export interface MappedContext {
  readonly memory: GuestMemory;
  readonly context: Context;
  readonly ioas: number;
  readonly device: number;
  /** The device's row in the shared device table. */
  readonly row: number;
  readonly basePfn: number;
  readonly pages: number;
  readonly srcIova: number;
  readonly dstIova: number;
  readonly windowBytes: number;
  /** Mean ns per 4 KiB ioasMap while building. */
  readonly mapNs: number;
  /** Table-pool bytes added per mapping (tables in use × 4 KiB). */
  readonly poolBytesPerMapping: number;
  /** Everything added per mapping: pool plus JS heap and off-heap growth after a full GC. */
  readonly bytesPerMapping: number;
}

let gcFn: (() => void) | undefined;
/** A full garbage collection, so heap figures hold live data only. */
export function collectGarbage(): void {
  if (gcFn === undefined) {
    setFlagsFromString('--expose_gc');
    gcFn = runInNewContext('gc') as () => void;
  }
  gcFn();
  gcFn();
}

function liveBytes(): number {
  const m = process.memoryUsage();
  // `external` holds typed-array stores such as the pool's owner-side counters; the pool's own
  // SharedArrayBuffer is not in it and is counted by tables in use instead.
  return m.heapUsed + m.external;
}

export function mappedContext(ctx: BenchContext): Promise<MappedContext> {
  return ctx.fixture('mapped-context', async () => {
    const pages = mappingCount(ctx);
    ctx.progress(`building an IOAS with ${pages} live 4 KiB mappings`);
    const srcGpa = TARGET_FRAMES * PAGE_SIZE;
    const dstGpa = srcGpa + COPY_REGION;
    const memory = GuestMemory.create(dstGpa + COPY_REGION);
    // Dirty tracking capable, for dma.copy_64k_dirty_gbps.
    const host = new IommufdHost(memory, { devices: [{ name: 'dma0', group: 'g0', dirtyTracking: true }] });
    const context = host.open();
    const ioas = context.ioasAlloc();
    // 4 KiB leaves only: the DMA windows then cost one IOTLB entry per page, the worst case.
    context.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.SET, objectId: ioas, value: 0 });
    const device = context.deviceBind('dma0');
    context.deviceAttach(device, ioas);
    const row = context.deviceRow(device);

    collectGarbage();
    const tablesBefore = context.inspect().pool.tablesInUse;
    const bytesBefore = liveBytes();
    const flags = IoasMapFlag.FIXED_IOVA | RW;
    const t0 = performance.now();
    for (let i = 0; i < pages; i++) {
      context.ioasMap(ioas, {
        gpa: scatteredFrame(i, TARGET_FRAMES) * PAGE_SIZE,
        length: BigInt(PAGE_SIZE),
        iova: BigInt(MAPPINGS_BASE_PFN + i) * BigInt(PAGE_SIZE),
        flags,
      });
    }
    const mapNs = ((performance.now() - t0) * 1e6) / pages;
    collectGarbage();
    const sideBytes = Math.max(0, liveBytes() - bytesBefore);
    const poolBytes = (context.inspect().pool.tablesInUse - tablesBefore) * TABLE_BYTES;

    // DMA windows at 8 GiB and 9 GiB + 2 MiB, clear of the 4 KiB mappings. The 2 MiB keeps page
    // k of the source and page k of the destination out of the same direct-mapped IOTLB set.
    const srcIova = 8 * 2 ** 30;
    const dstIova = 9 * 2 ** 30 + 2 ** 21;
    context.ioasMap(ioas, { gpa: srcGpa, length: BigInt(COPY_REGION), iova: BigInt(srcIova), flags });
    context.ioasMap(ioas, { gpa: dstGpa, length: BigInt(COPY_REGION), iova: BigInt(dstIova), flags });
    // Commit the windows' pages (see the memcpy limit).
    memory.fill(srcGpa, COPY_REGION, 0x5a);
    memory.fill(dstGpa, COPY_REGION, 1);

    return {
      memory,
      context,
      ioas,
      device,
      row,
      basePfn: MAPPINGS_BASE_PFN,
      pages,
      srcIova,
      dstIova,
      windowBytes: COPY_REGION,
      mapNs,
      poolBytesPerMapping: poolBytes / pages,
      bytesPerMapping: (poolBytes + sideBytes) / pages,
    };
  });
}

/**
 * A guest that builds its own x86-64 stage-1 table (4 KiB leaves for `pages` IOVA pages) in guest
 * RAM, over a stage-2 IOAS that maps all of guest RAM at IOVA = GPA with huge pages, as a VMM maps
 * a VM's memory for nesting; the device is attached to a nested HWPT over that table.
 */
export interface NestedGuest {
  readonly memory: GuestMemory;
  readonly context: Context;
  readonly device: number;
  /** The device's row in the shared device table (attached to `nested`). */
  readonly row: number;
  readonly nested: number;
  /** Header slot of the stage-2 IOAS in the context's table pool. */
  readonly header: number;
  readonly root: number;
  readonly basePfn: number;
  readonly pages: number;
}

export function nestedGuest(ctx: BenchContext): Promise<NestedGuest> {
  return ctx.fixture('nested-guest', async () => {
    const pages = mappingCount(ctx);
    ctx.progress(`building a guest x86-64 stage-1 table with ${pages} 4 KiB leaves`);
    const ram = 64 << 20;
    const memory = GuestMemory.create(ram);
    const host = new IommufdHost(memory, { devices: [{ name: 'dma0', group: 'g0' }] });
    const context = host.open();
    const ioas = context.ioasAlloc();
    const device = context.deviceBind('dma0');
    context.deviceAttach(device, ioas);
    context.ioasMap(ioas, { gpa: 0, length: BigInt(ram), iova: 0n, flags: IoasMapFlag.FIXED_IOVA | RW });
    const header = readRow(new Int32Array(context.describeShared().devices.buffer), context.deviceRow(device), emptyRowValue()).header;

    // Stage-1 tables live in the upper half of guest RAM; leaves point into the first 16 MiB.
    const builder = new X86PageTableBuilder({
      allocator: pagesFromAllocator(new GuestAllocator(ram / 2, ram / 2)),
      write: memoryEntryWriter(memory),
    });
    const permissions = { writable: true, user: true, executable: false };
    for (let i = 0; i < pages; i++) {
      builder.map((MAPPINGS_BASE_PFN + i) * PAGE_SIZE, scatteredFrame(i, TARGET_FRAMES) * PAGE_SIZE, X86_PAGE_4K, permissions);
    }
    const parent = context.hwptAlloc(device, ioas, { flags: HwptAllocFlag.NEST_PARENT });
    const nested = context.hwptAlloc(device, parent, { dataType: HwptDataType.VTD_S1, data: encodeVtdS1(BigInt(builder.root), 48) });
    context.deviceAttach(device, nested);
    return { memory, context, device, row: context.deviceRow(device), nested, header, root: builder.root, basePfn: MAPPINGS_BASE_PFN, pages };
  });
}
