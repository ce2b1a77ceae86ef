// A guest that owns an x86-64 stage-1 table over a context's stage-2 IOAS, for the nested tests.
// Guest-physical memory [0, GUEST_RAM) lives at [HOST_BASE, HOST_BASE + GUEST_RAM) of the backend's
// memory; the IOAS (stage 2) maps it there, the guest writes its tables through the same layout.
import { GuestAllocator } from '../../guest-fixtures/driver/allocator.js';
import { X86PageTableBuilder, pagesFromAllocator } from '../../guest-fixtures/pagetable/x86-64-builder.js';
import { QuiescenceOwner, QuiescenceWorker, createQuiescenceBuffer } from '../../src/ioasid/quiescence.js';
import { FaultConsumer, FaultProducer, createFaultQueueBuffer } from '../../src/ioasid/fault-queue.js';
import { DeviceTableAttachments, Translator } from '../../src/ioasid/translator.js';
import {
  HwptAllocFlag,
  HwptDataType,
  IommufdHost,
  IoasMapFlag,
  encodeVtdS1,
  type Context,
  type HwptInvalidateEntry,
} from '../../src/ioasid/index.js';
import type { IovaRange } from '../../guest-fixtures/pagetable/x86-64-builder.js';
import { GuestMemory } from '../../src/memory/index.js';

export const GUEST_RAM = 16 << 20;
export const HOST_BASE = 16 << 20;
/** Guest-physical pages the guest's tables come from. */
export const TABLES_BASE = 12 << 20;
export const TABLES_SIZE = 4 << 20;
export const RW = IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;

export interface NestedGuestOptions {
  readonly levels?: 4 | 5;
  /** Stage 2 maps guest RAM at once (default true). */
  readonly mapStage2?: boolean;
  /** Attach the nested HWPT to the device's RID (default true). */
  readonly attachRid?: boolean;
  readonly quiescence?: boolean;
  /** Allocate the stage-2 parent with DIRTY_TRACKING (default false). */
  readonly dirtyParent?: boolean;
}

export interface NestedGuest {
  readonly memory: GuestMemory;
  readonly host: IommufdHost;
  readonly ctx: Context;
  readonly ioas: number;
  readonly dev: number;
  readonly parent: number;
  readonly nested: number;
  readonly builder: X86PageTableBuilder;
  readonly owner: QuiescenceOwner | undefined;
  readonly quiescenceBuffer: SharedArrayBuffer;
  /** Backend memory address of guest-physical `gpa`. */
  hostAddress(gpa: number): number;
  /** hwptInvalidate entries for ranges a builder change returned. */
  invalidate(ranges: readonly IovaRange[]): number;
  /** A Translator as a device worker builds it from describeShared(), with a fault ring. */
  translator(): { t: Translator; faults: FaultConsumer };
}

export function nestedGuest(options: NestedGuestOptions = {}): NestedGuest {
  const memory = GuestMemory.create(HOST_BASE + GUEST_RAM);
  const host = new IommufdHost(memory, {
    devices: [{ name: 'dev0', group: 'g0', pasidBits: 20, ...(options.dirtyParent === true ? { dirtyTracking: true } : {}) }],
    autoReclaim: options.quiescence !== true,
  });
  const ctx = host.open();
  const quiescenceBuffer = createQuiescenceBuffer(8);
  const owner = options.quiescence === true ? new QuiescenceOwner(quiescenceBuffer) : undefined;
  if (owner !== undefined) ctx.attachQuiescence(owner, { timeoutMs: 10_000 });
  const ioas = ctx.ioasAlloc();
  if (options.mapStage2 !== false) ctx.ioasMap(ioas, { gpa: HOST_BASE, length: BigInt(GUEST_RAM), iova: 0n, flags: RW | IoasMapFlag.FIXED_IOVA });
  const dev = ctx.deviceBind('dev0');
  const parent = ctx.hwptAlloc(dev, ioas, {
    flags: HwptAllocFlag.NEST_PARENT | HwptAllocFlag.PASID | (options.dirtyParent === true ? HwptAllocFlag.DIRTY_TRACKING : 0),
  });
  const hostAddress = (gpa: number): number => HOST_BASE + gpa;
  const levels = options.levels ?? 4;
  const builder = new X86PageTableBuilder({
    allocator: pagesFromAllocator(new GuestAllocator(TABLES_BASE, TABLES_SIZE)),
    write: (gpa, value) => memory.writeU64(hostAddress(gpa), value),
    levels,
  });
  const nested = ctx.hwptAlloc(dev, parent, {
    flags: HwptAllocFlag.PASID,
    dataType: HwptDataType.VTD_S1,
    data: encodeVtdS1(BigInt(builder.root), levels === 5 ? 57 : 48),
  });
  if (options.attachRid !== false) ctx.deviceAttach(dev, nested);
  return {
    memory,
    host,
    ctx,
    ioas,
    dev,
    parent,
    nested,
    builder,
    owner,
    quiescenceBuffer,
    hostAddress,
    invalidate(ranges) {
      const entries: HwptInvalidateEntry[] = ranges.map((r) => ({ addr: r.iova, npages: r.size >> 12n, flags: 0 }));
      return ctx.hwptInvalidate(nested, entries);
    },
    translator() {
      const ring = createFaultQueueBuffer(256);
      const shared = ctx.describeShared();
      const t = new Translator({
        pool: shared.pool.buffer,
        attachments: new DeviceTableAttachments(shared),
        quiescence: QuiescenceWorker.register(quiescenceBuffer),
        faults: new FaultProducer(ring),
      });
      return { t, faults: new FaultConsumer(ring) };
    },
  };
}

export const USER_RW = { writable: true, user: true, executable: false } as const;
export const USER_RO = { writable: false, user: true, executable: false } as const;
export const USER_RX = { writable: false, user: true, executable: true } as const;
export const SUPERVISOR_RW = { writable: true, user: false, executable: false } as const;
