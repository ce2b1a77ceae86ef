import type { Logger } from '../log/logger.js';
import { GPA_LIMIT, type GuestMemoryDescriptor } from '../memory/index.js';
import { EntryFlag, MAX_IOVA_PFN, PAGE_SIZE, PAGE_SIZE_N } from '../pagetable/format.js';
import { TablePool, type TablePoolDescriptor } from '../pagetable/pool.js';
import { IoPageTable } from '../pagetable/radix.js';
import { emptyLeafInfo, markLeafDirty, walk, type LeafInfo } from '../pagetable/walk.js';
import { bumpDirtyGeneration, dirtyRuns, markDirtyRun, readAndClearDirty } from './dirty.js';
import { Access, type AccessOps, type PinSlice } from './access.js';
import { BoundDevice, IGroup, type Attachment, type AttachTarget, type IovaRange, type PhysicalDevice } from './device.js';
import {
  AttachKind,
  DeviceRowFlag,
  DeviceTable,
  PageResult,
  PasidDirectory,
  TranslationReader,
  emptyRowValue,
  type DeviceTableDescriptor,
} from './device-table.js';
import { IommufdError } from './errors.js';
import type { IommufdHost } from './host.js';
import { HwptNested, HwptPaging, type Hwpt } from './hwpt.js';
import { Ioas, iovaOf, pfnOf, type AreaPart, type AreaSlice } from './ioas.js';
import { ObjectTable, type ObjectType } from './objects.js';
import type { QuiescenceOwner } from './quiescence.js';
import { ALL_PFNS, appendInvalidations, createStage1Record, emptyStage1View, readStage1, releaseStage1Record, type PfnRange } from './stage1-record.js';
import {
  AccessRwFlag,
  HwCap,
  HwInfoType,
  HwptAllocFlag,
  HwptDataType,
  HwptDirtyTrackingFlag,
  HwptGetDirtyBitmapFlag,
  HwptInvalidateDataType,
  IOAS_MAP_VALID_FLAGS,
  IoasMapFlag,
  IommuOption,
  IommuOptionOp,
  MAX_PASID_BITS,
  U64_MAX,
  VTD_ADDR_WIDTH_4LEVEL,
  VTD_ADDR_WIDTH_5LEVEL,
  VTD_S1_DATA_SIZE,
  VTD_S1_VALID_FLAGS,
  VtdEcap,
  VtdInvalidateFlag,
  VtdS1Flag,
} from './uapi.js';
import {
  CONTEXT_STATE_VERSION,
  bindOrder,
  firstDifference,
  parseContextState,
  type ContextState,
  type HwptState,
  type IoasState,
  type RestoreDevice,
} from './state.js';
import { decodeVtdS1, encodeVtdHwInfo, encodeVtdS1, vtdHwInfo } from './vtd.js';
import { flagsArg, gpaArg, pasidArg, u32Arg, u64Arg } from './validate.js';

type AnyObject = Ioas | Hwpt | BoundDevice | Access;

export interface IoasMapArgs {
  /** Guest-physical address of the memory to map (page aligned). */
  readonly gpa: number;
  readonly length: bigint;
  /** Where to map, with IoasMapFlag.FIXED_IOVA; otherwise ignored and chosen by the backend. */
  readonly iova?: bigint;
  /** IoasMapFlag bits. */
  readonly flags: number;
}

export interface HwptAllocArgs {
  /** HwptAllocFlag bits. */
  readonly flags?: number;
  /** HwptDataType of `data` (a stage-1 description for nested HWPTs). */
  readonly dataType?: number;
  readonly data?: Uint8Array;
}

/**
 * One entry of hwptInvalidate: struct iommu_hwpt_vtd_s1_invalidate. `addr` 0 with `npages`
 * U64_MAX invalidates everything.
 */
export interface HwptInvalidateEntry {
  /** First IOVA, 4 KiB aligned. */
  readonly addr: bigint;
  /** 4 KiB pages from addr. */
  readonly npages: bigint;
  /** VtdInvalidateFlag bits. */
  readonly flags: number;
  /** __reserved: must be 0. */
  readonly reserved?: number;
}

export interface RestoreOptions {
  /**
   * The callbacks of the consumer behind each restored access (by access ID). Without them a
   * restored access unpins whatever an unmap covers.
   */
  readonly accessOps?: (accessId: number) => AccessOps;
}

export interface OptionArgs {
  /** IommuOption. */
  readonly option: number;
  /** IommuOptionOp. */
  readonly op: number;
  /** IOAS ID for HUGE_PAGES; 0 for the global RLIMIT_MODE. */
  readonly objectId?: number;
  /** The value to SET. */
  readonly value?: bigint | number;
}

export interface HwInfo {
  /** HwInfoType. */
  readonly dataType: number;
  readonly data: Uint8Array;
  /** HwCap bits. */
  readonly capabilities: number;
  readonly maxPasidLog2: number;
}

export interface IovaRanges {
  readonly ranges: IovaRange[];
  /** out_iova_alignment: IOVAs and lengths must be multiples of this. */
  readonly alignment: bigint;
}

export interface Span {
  readonly gpa: number;
  readonly length: number;
}

export interface TranslationFault {
  /**
   * MAPPING / PERMISSION: the (stage-1) table lacks the page or the right; STAGE2: a nested
   * translation's stage 2 does not map or allow a guest-physical address it needed.
   */
  readonly reason: 'MAPPING' | 'DOMAIN' | 'PERMISSION' | 'STAGE2';
  readonly iova: bigint;
  readonly access: 'read' | 'write';
  readonly pasid: number;
}

export type TranslateResult = { readonly spans: Span[]; readonly fault?: undefined } | { readonly fault: TranslationFault; readonly spans?: undefined };

/**
 * What device workers need to translate on their own: the table pool and the device table, plus
 * guest memory, where guests keep the stage-1 tables of nested attachments.
 */
export interface SharedTranslation {
  readonly pool: TablePoolDescriptor;
  readonly devices: DeviceTableDescriptor;
  readonly memory: GuestMemoryDescriptor;
}

export interface AreaSnapshot {
  readonly iova: bigint;
  readonly length: bigint;
  readonly gpa: number;
  readonly readable: boolean;
  readonly writeable: boolean;
  readonly accessPins: number;
}

export interface ContextSnapshot {
  readonly serial: number;
  readonly closed: boolean;
  readonly rlimitMode: number;
  readonly nextObjectId: number;
  readonly objects: readonly { id: number; type: ObjectType }[];
  readonly ioas: readonly {
    id: number;
    hugePages: boolean;
    areas: AreaSnapshot[];
    reserved: { start: bigint; last: bigint; device: number }[];
    allowed: { start: bigint; last: bigint }[];
    hwpts: number[];
    accesses: number[];
    tables: number;
    levels: number;
  }[];
  readonly hwpts: readonly {
    id: number;
    type: string;
    ioas: number;
    auto: boolean;
    flags: number;
    users: number;
    /** HWPT_NESTED: the paging parent and the stage-1 description. */
    parent?: number;
    stage1?: { root: number; addrWidth: number; flags: bigint };
  }[];
  readonly devices: readonly {
    id: number;
    name: string;
    attachments: { pasid: number; target: number | 'identity' }[];
    rows: { pasid: number; kind: number; header: number; hwpt: number }[];
  }[];
  readonly groups: readonly { key: string; devices: number[]; attachments: { pasid: number; target: number | 'identity'; devices: number[] }[] }[];
  readonly accesses: readonly { id: number; ioas: number; pins: { iova: bigint; length: bigint; pages: number }[] }[];
  readonly pool: { readonly tablesInUse: number; readonly pendingFree: number };
  readonly deviceRows: number;
}

const READ_WRITE = IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;

function permsOf(flags: number): number {
  return ((flags & IoasMapFlag.READABLE) !== 0 ? EntryFlag.READ : 0) | ((flags & IoasMapFlag.WRITEABLE) !== 0 ? EntryFlag.WRITE : 0);
}

const PAGE_SHIFT_N = 12n;
/** Largest dirty bitmap hwptGetDirtyBitmap returns: 2^31 bits (256 MiB). */
const MAX_DIRTY_BITMAP_BITS = 2 ** 31;
const MAX_IOVA_PFN_N = BigInt(MAX_IOVA_PFN);

/**
 * The IOVA pages one struct iommu_hwpt_vtd_s1_invalidate covers, checked as
 * intel_nested_cache_invalidate_user does; undefined for npages 0 (nothing to drop).
 */
function invalidationRange(entry: unknown, index: number): PfnRange | undefined {
  const name = `entries[${index}]`;
  if (typeof entry !== 'object' || entry === null) throw new IommufdError('EINVAL', `${name} must be an object`, name);
  const e = entry as Partial<Record<keyof HwptInvalidateEntry, unknown>>;
  const addr = u64Arg(e.addr, `${name}.addr`);
  const npages = u64Arg(e.npages, `${name}.npages`);
  const flags = u32Arg(e.flags, `${name}.flags`);
  const reserved = u32Arg(e.reserved ?? 0, `${name}.reserved`);
  // intel_nested_cache_invalidate_user: unknown flags or a nonzero __reserved: -EOPNOTSUPP.
  if ((flags & ~VtdInvalidateFlag.LEAF) !== 0 || reserved !== 0) {
    throw new IommufdError('EOPNOTSUPP', `${name} has unknown flags or a nonzero reserved field`, name);
  }
  // intel_nested_cache_invalidate_user: an unaligned addr, or npages U64_MAX from a nonzero addr: -EINVAL.
  if (addr % PAGE_SIZE_N !== 0n) throw new IommufdError('EINVAL', `${name}.addr 0x${addr.toString(16)} is not 4 KiB aligned`, `${name}.addr`);
  if (npages === U64_MAX && addr !== 0n) throw new IommufdError('EINVAL', `${name}: npages U64_MAX needs addr 0`, `${name}.npages`);
  if (npages === U64_MAX) return ALL_PFNS;
  if (npages === 0n) return undefined;
  const first = addr >> PAGE_SHIFT_N;
  // The kernel's end address wraps past 2^64; clamping to the top invalidates at least as much.
  const last = first + npages - 1n > MAX_IOVA_PFN_N ? MAX_IOVA_PFN_N : first + npages - 1n;
  return { first: Number(first), last: Number(last) };
}

function targetId(t: AttachTarget): number | 'identity' {
  return t === 'identity' ? 'identity' : t.id;
}

/**
 * An open /dev/iommu (struct iommufd_ctx): the object table and every iommufd operation, named as
 * the ioctls are (IOMMU_IOAS_MAP → ioasMap, ...). Synchronous, for the owner thread only. Every
 * argument is checked; a call that throws IommufdError changed nothing (inspect() proves it).
 */
export class Context {
  private readonly log: Logger;
  private readonly pool: TablePool;
  private readonly deviceTable: DeviceTable;
  private readonly objects = new ObjectTable<AnyObject>();
  private readonly groups = new Map<string, IGroup>();
  /** Consumer rows (consumerRowAlloc) and the IOAS each points at, if any. */
  private readonly consumerRows = new Map<number, number | undefined>();
  private rlimitMode = 0;
  private isClosed = false;
  private depth = 0;
  private readonly rowScratch = emptyRowValue();
  private readonly leafScratch = emptyLeafInfo();
  private readonly stage1Scratch = emptyStage1View();
  /** translate() reads through the same shared-memory path a device worker uses. */
  private readonly reader: TranslationReader;
  /** Device workers' DMA brackets: set once workers translate from this context's tables. */
  private quiescence: QuiescenceOwner | undefined;
  private quiescenceTimeoutMs = 1000;
  /** restoreState: the ID the next object takes, and every object restore created, in order. */
  private restoreId: number | undefined;
  private restoreLog: AnyObject[] | undefined;

  constructor(
    private readonly host: IommufdHost,
    readonly serial: number,
  ) {
    this.log = host.log.child({ component: 'iommufd', ctx: serial });
    this.pool = new TablePool(host.poolOptions);
    this.deviceTable = new DeviceTable(64, host.maxDeviceRows);
    this.reader = new TranslationReader(this.describeShared());
  }

  // ---- plumbing ----

  /** Runs one operation: refuses a closed context, logs failures, reclaims freed tables at the end. */
  private run<T>(op: string, fn: () => T): T {
    if (this.isClosed) {
      const e = new IommufdError('EBADF', 'the context is closed');
      this.log.warn({ op, errno: e.code }, e.message);
      throw e;
    }
    this.depth++;
    try {
      return fn();
    } catch (e) {
      if (e instanceof IommufdError) this.log.warn({ op, errno: e.code, argument: e.argument }, e.message);
      else this.log.error({ op, err: String(e) }, 'internal error in the iommufd backend');
      throw e;
    } finally {
      this.depth--;
      // Without device workers nobody else reads the tables, so freed ones are reusable at once.
      // With workers, reclaim happens only after they are quiescent (see settle()).
      if (this.depth === 0 && this.quiescence === undefined && this.host.autoReclaim) this.reclaim();
    }
  }

  /**
   * Hands the context its device workers' quiescence block. From then on every call that removes
   * or replaces a translation returns only once no worker can still use the old one (strict
   * unmap), and freed tables are reclaimed only after that.
   */
  attachQuiescence(owner: QuiescenceOwner, options: { timeoutMs?: number } = {}): void {
    this.quiescence = owner;
    if (options.timeoutMs !== undefined) this.quiescenceTimeoutMs = options.timeoutMs;
  }

  /**
   * Strict unmap: publishes a new epoch and waits until every device worker is outside a DMA or
   * has seen it, then reclaims tables freed by the change. `fullFlush` when the change cannot be
   * seen through an address space's generation (an address space or device row went away).
   */
  private settle(fullFlush: boolean): void {
    const q = this.quiescence;
    if (q === undefined) return;
    const epoch = q.bumpEpoch({ fullFlush });
    const result = q.waitQuiescent(epoch, { timeoutMs: this.quiescenceTimeoutMs });
    if (result.stragglers.length > 0) {
      this.log.error({ stragglers: result.stragglers }, 'device workers did not quiesce; they were revoked');
    }
    this.reclaim();
  }

  /** run() for calls that may remove or replace translations: settles after a success. */
  private runNarrowing<T>(op: string, fullFlush: boolean, fn: () => T): T {
    const outer = this.depth === 0;
    const result = this.run(op, fn);
    if (outer) this.settle(fullFlush);
    return result;
  }

  /** Makes tables and device-table rows freed so far reusable. Call only when no reader holds them. */
  reclaim(): void {
    this.pool.reclaim();
    this.deviceTable.reclaim();
  }

  /** Stores a new object at the lowest free ID, or at the saved ID while restoreState rebuilds it. */
  private addObject<U extends AnyObject>(make: (id: number) => U): U {
    const at = this.restoreId;
    this.restoreId = undefined;
    const obj = at === undefined ? this.objects.add(make) : this.objects.addAt(at, make);
    this.restoreLog?.push(obj);
    return obj;
  }

  private lookup(id: unknown, argument: string): AnyObject {
    const n = u32Arg(id, argument);
    const obj = this.objects.get(n);
    // iommufd_get_object: an unknown ID (0 included) is -ENOENT.
    if (obj === undefined) throw new IommufdError('ENOENT', `no object with ID ${n}`, argument);
    return obj;
  }

  private getIoas(id: unknown, argument = 'ioas'): Ioas {
    const obj = this.lookup(id, argument);
    // iommufd_get_object: the wrong object type is -ENOENT too.
    if (obj.type !== 'IOAS') throw new IommufdError('ENOENT', `object ${obj.id} is a ${obj.type}, not an IOAS`, argument);
    return obj;
  }

  private getDevice(id: unknown, argument = 'dev'): BoundDevice {
    const obj = this.lookup(id, argument);
    // iommufd_get_device: the wrong object type is -ENOENT.
    if (obj.type !== 'DEVICE') throw new IommufdError('ENOENT', `object ${obj.id} is a ${obj.type}, not a device`, argument);
    return obj;
  }

  private getAccess(id: unknown, argument = 'access'): Access {
    const obj = this.lookup(id, argument);
    if (obj.type !== 'ACCESS') throw new IommufdError('ENOENT', `object ${obj.id} is a ${obj.type}, not an access`, argument);
    return obj;
  }

  private checkIdSpace(): void {
    // xa_alloc: no free index in the 31-bit ID space is -EBUSY.
    if (this.objects.peek() === 0) throw new IommufdError('EBUSY', 'object ID space exhausted');
  }

  /** The GPA range must be guest RAM: pinning memory that is not there is -EFAULT (pin_user_pages). */
  private checkGuestRange(gpa: number, length: bigint): void {
    const size = BigInt(this.host.memory.size);
    if (length > size || !this.host.memory.contains(gpa, Number(length))) {
      throw new IommufdError('EFAULT', `gpa 0x${gpa.toString(16)} + 0x${length.toString(16)} is not guest RAM`, 'gpa');
    }
  }

  // ---- IOAS ----

  /** IOMMU_IOAS_ALLOC. */
  ioasAlloc(): number {
    return this.run('ioasAlloc', () => {
      this.checkIdSpace();
      // iommufd_object_alloc: failing to allocate the table is -ENOMEM.
      if (!this.pool.ensure(IoPageTable.CREATE_TABLES)) throw new IommufdError('ENOMEM', 'page-table pool exhausted');
      return this.addObject((id) => new Ioas(id, this.pool, this.host.pins)).id;
    });
  }

  /**
   * IOMMU_IOAS_IOVA_RANGES. With `maxRanges` (the caller's num_iovas) smaller than the number of
   * ranges, fails with EMSGSIZE and details { numIovas, ranges } holding the count and the first ones.
   */
  ioasIovaRanges(ioasId: number, maxRanges?: number): IovaRanges {
    return this.run('ioasIovaRanges', () => {
      const max = maxRanges === undefined ? undefined : u32Arg(maxRanges, 'maxRanges');
      const ioas = this.getIoas(ioasId);
      const ranges = ioas.iovaRanges();
      // iommufd_ioas_iova_ranges: more ranges than the buffer holds is -EMSGSIZE (num_iovas updated).
      if (max !== undefined && ranges.length > max) {
        throw new IommufdError('EMSGSIZE', `${ranges.length} ranges do not fit in ${max}`, 'maxRanges', {
          numIovas: ranges.length,
          ranges: ranges.slice(0, max),
        });
      }
      return { ranges, alignment: PAGE_SIZE_N };
    });
  }

  /** IOMMU_IOAS_ALLOW_IOVAS: replaces the allowed list (empty list: no restriction). */
  ioasAllowIovas(ioasId: number, ranges: readonly IovaRange[]): void {
    this.run('ioasAllowIovas', () => {
      const ioas = this.getIoas(ioasId);
      if (!Array.isArray(ranges)) throw new IommufdError('EINVAL', 'ranges must be an array', 'ranges');
      const list: IovaRange[] = [];
      for (const [i, r] of ranges.entries()) {
        const start = u64Arg((r as IovaRange | undefined)?.start, `ranges[${i}].start`);
        const last = u64Arg((r as IovaRange | undefined)?.last, `ranges[${i}].last`);
        // iommufd_ioas_load_iovas: start >= last is -EINVAL.
        if (start >= last) throw new IommufdError('EINVAL', `ranges[${i}] has start >= last`, `ranges[${i}]`);
        // iommufd_ioas_load_iovas: ranges overlapping each other are -EINVAL.
        if (list.some((o) => o.start <= last && o.last >= start)) {
          throw new IommufdError('EINVAL', `ranges[${i}] overlaps an earlier range`, `ranges[${i}]`);
        }
        list.push({ start, last });
      }
      for (const r of list) {
        const hit = ioas.reservedHit(r.start, r.last);
        // iopt_set_allow_iova: an allowed range over a reserved one is -EADDRINUSE.
        if (hit !== undefined) {
          throw new IommufdError('EADDRINUSE', `allowed range 0x${r.start.toString(16)}-0x${r.last.toString(16)} covers a reserved range`, 'ranges');
        }
      }
      ioas.allowed = list.sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
    });
  }

  /** IOMMU_IOAS_MAP: maps guest memory, returning the IOVA (chosen unless FIXED_IOVA). */
  ioasMap(ioasId: number, args: IoasMapArgs): bigint {
    return this.run('ioasMap', () => {
      if (typeof args !== 'object' || args === null) throw new IommufdError('EINVAL', 'map arguments must be an object', 'args');
      const flags = flagsArg(args.flags, IOAS_MAP_VALID_FLAGS);
      const iovaIn = args.iova === undefined ? 0n : u64Arg(args.iova, 'iova');
      const length = u64Arg(args.length, 'length');
      // iommufd_ioas_map: iova or length of U64_MAX is -EOVERFLOW.
      if (iovaIn >= U64_MAX || length >= U64_MAX) throw new IommufdError('EOVERFLOW', 'iova or length is U64_MAX', 'length');
      // iommufd_ioas_map: a map with neither READABLE nor WRITEABLE is -EINVAL.
      if ((flags & READ_WRITE) === 0) throw new IommufdError('EINVAL', 'flags need READABLE and/or WRITEABLE', 'flags');
      const gpa = gpaArg(args.gpa);
      const ioas = this.getIoas(ioasId);
      const iova = this.placeAreas(ioas, flags, iovaIn, length, gpa);
      // iopt_insert_area: the memory's page offset must meet the IOAS alignment.
      if (gpa % PAGE_SIZE !== 0) throw new IommufdError('EINVAL', `gpa 0x${gpa.toString(16)} is not page aligned`, 'gpa');
      this.checkGuestRange(gpa, length);
      ioas.insertAreas([{ pfn: pfnOf(iova), pages: pfnOf(length), guestPfn: gpa / PAGE_SIZE, perms: permsOf(flags) }]);
      return iova;
    });
  }

  /**
   * The areas of an IOAS that intersect [start, last] (inclusive), whole and in IOVA order, read back
   * from the table. Not an iommufd ioctl (userspace keeps its own list); here for clients such as
   * virtio-iommu that must tell which mappings a range covers. Cost follows the areas found.
   */
  ioasAreasIn(ioasId: number, start: bigint, last: bigint): AreaSnapshot[] {
    return this.run('ioasAreasIn', () => {
      const ioas = this.getIoas(ioasId);
      const lo = u64Arg(start, 'start');
      const hi = u64Arg(last, 'last');
      if (lo > hi) throw new IommufdError('EINVAL', 'start is after last', 'start');
      const out: AreaSnapshot[] = [];
      ioas.table.forEachArea(pfnOf(lo), pfnOf(hi), (s, n, g, flags) => {
        out.push({
          iova: iovaOf(s),
          length: iovaOf(n),
          gpa: g * PAGE_SIZE,
          readable: (flags & EntryFlag.READ) !== 0,
          writeable: (flags & EntryFlag.WRITE) !== 0,
          accessPins: ioas.areaPins.get(s) ?? 0,
        });
      });
      return out;
    });
  }

  /** The length and IOVA checks of iopt_alloc_area_pages, shared by map and copy. */
  private placeAreas(ioas: Ioas, flags: number, iova: bigint, length: bigint, gpaHint: number): bigint {
    // iopt_alloc_area_pages: zero length, or a length off the IOAS alignment, is -EINVAL.
    if (length === 0n) throw new IommufdError('EINVAL', 'length is 0', 'length');
    if (length % PAGE_SIZE_N !== 0n) throw new IommufdError('EINVAL', `length 0x${length.toString(16)} is not a multiple of 4 KiB`, 'length');
    if ((flags & IoasMapFlag.FIXED_IOVA) !== 0) {
      ioas.checkFixedIova(iova, length);
      return iova;
    }
    return ioas.allocIova(length, gpaHint);
  }

  /** IOMMU_IOAS_UNMAP: returns the bytes unmapped. iova 0 with length U64_MAX unmaps everything. */
  ioasUnmap(ioasId: number, iova: bigint, length: bigint): bigint {
    return this.runNarrowing('ioasUnmap', false, () => {
      const start = u64Arg(iova, 'iova');
      const len = u64Arg(length, 'length');
      const ioas = this.getIoas(ioasId);
      if (start === 0n && len === U64_MAX) {
        try {
          return this.unmapRange(ioas, 0n, U64_MAX);
        } catch (e) {
          // iopt_unmap_all: an empty IOAS unmaps "all" successfully.
          if (e instanceof IommufdError && e.code === 'ENOENT') return 0n;
          throw e;
        }
      }
      // iommufd_ioas_unmap: iova or length of U64_MAX is -EOVERFLOW.
      if (start >= U64_MAX || len >= U64_MAX) throw new IommufdError('EOVERFLOW', 'iova or length is U64_MAX', 'length');
      // iopt_unmap_iova: zero length is -EINVAL.
      if (len === 0n) throw new IommufdError('EINVAL', 'length is 0', 'length');
      // iopt_unmap_iova: check_add_overflow(iova, length - 1).
      if (start + len - 1n > U64_MAX) throw new IommufdError('EOVERFLOW', 'iova + length overflows 64 bits', 'length');
      return this.unmapRange(ioas, start, start + len - 1n);
    });
  }

  /**
   * iopt_unmap_iova_range, all or nothing: validates every area first, asks accesses holding pins
   * to unpin (iommufd_access_notify_unmap), revalidates, and only then removes anything.
   */
  private unmapRange(ioas: Ioas, start: bigint, last: bigint): bigint {
    for (;;) {
      const areas = ioas.areasToUnmap(start, last);
      const pinned = areas.find(([s]) => (ioas.areaPins.get(s) ?? 0) > 0);
      if (pinned === undefined) return ioas.removeAreas(areas);
      const [s, n] = pinned;
      ioas.preventAccess.add(s);
      try {
        for (const access of [...ioas.accesses]) {
          try {
            access.ops.onUnmap(iovaOf(s), iovaOf(n));
          } catch (e) {
            this.log.error({ access: access.id, err: String(e) }, 'access onUnmap callback threw');
          }
        }
      } finally {
        ioas.preventAccess.delete(s);
      }
      // iopt_unmap_iova_range: pins still held after the notifier is WARN_ON + -EDEADLOCK.
      if ((ioas.areaPins.get(s) ?? 0) > 0) {
        throw new IommufdError('EDEADLOCK', `access pins remain in the area at 0x${iovaOf(s).toString(16)} after onUnmap`, 'iova');
      }
    }
  }

  /**
   * IOMMU_IOAS_COPY: maps, in dstIoas, the memory already mapped at [srcIova, srcIova+length) of
   * srcIoas (any page-aligned part of contiguous areas; one destination area per source area
   * touched). Pins nothing new: the pages are already held. Returns the destination IOVA.
   */
  ioasCopy(dstIoasId: number, dstIova: bigint, srcIoasId: number, srcIova: bigint, length: bigint, flags: number): bigint {
    return this.run('ioasCopy', () => {
      const f = flagsArg(flags, IOAS_MAP_VALID_FLAGS);
      const dst = u64Arg(dstIova, 'dstIova');
      const src = u64Arg(srcIova, 'srcIova');
      const len = u64Arg(length, 'length');
      // iommufd_ioas_copy: length, src_iova or dst_iova of U64_MAX is -EOVERFLOW.
      if (len >= U64_MAX || src >= U64_MAX || dst >= U64_MAX) throw new IommufdError('EOVERFLOW', 'an iova or length is U64_MAX', 'length');
      // iommufd_ioas_copy: neither READABLE nor WRITEABLE is -EINVAL.
      if ((f & READ_WRITE) === 0) throw new IommufdError('EINVAL', 'flags need READABLE and/or WRITEABLE', 'flags');
      const srcIoas = this.getIoas(srcIoasId, 'srcIoas');
      // iopt_get_pages: zero length -EINVAL, overflow -EOVERFLOW.
      if (len === 0n) throw new IommufdError('EINVAL', 'length is 0', 'length');
      if (src + len - 1n > U64_MAX) throw new IommufdError('EOVERFLOW', 'srcIova + length overflows 64 bits', 'length');
      const { parts, complete } = srcIoas.contiguousParts(pfnOf(src), pfnOf(src + len - 1n));
      // iopt_get_pages: the source range must be mapped without a gap.
      if (!complete) throw new IommufdError('ENOENT', `source range at 0x${src.toString(16)} is not fully mapped`, 'srcIova');
      const dstIoas = this.getIoas(dstIoasId, 'dstIoas');
      const first = parts[0]!;
      const iova = this.placeAreas(dstIoas, f, dst, len, first.guestPfn * PAGE_SIZE);
      // iopt_insert_area: WRITEABLE over pages that were not mapped writeable is -EPERM.
      if ((f & IoasMapFlag.WRITEABLE) !== 0 && parts.some((p) => (p.perms & EntryFlag.WRITE) === 0)) {
        throw new IommufdError('EPERM', 'source memory is not writeable', 'flags');
      }
      // iopt_insert_area: the start byte's page offset must meet the alignment.
      if (src % PAGE_SIZE_N !== 0n) throw new IommufdError('EINVAL', `srcIova 0x${src.toString(16)} is not page aligned`, 'srcIova');
      const base = pfnOf(iova) - parts[0]!.pfn;
      const perms = permsOf(f);
      const slices: AreaSlice[] = parts.map((p) => ({ pfn: base + p.pfn, pages: p.pages, guestPfn: p.guestPfn, perms }));
      dstIoas.insertAreas(slices);
      return iova;
    });
  }

  // ---- HWPT ----

  /**
   * IOMMU_HWPT_ALLOC. From an IOAS: a paging HWPT sharing the IOAS's table. From a NEST_PARENT
   * paging HWPT with HwptDataType.VTD_S1 data (struct iommu_hwpt_vtd_s1, see encodeVtdS1): a nested
   * HWPT whose stage 1 is the guest's x86-64 table and whose stage 2 is the parent. Returns the ID.
   */
  hwptAlloc(devId: number, ptId: number, args: HwptAllocArgs = {}): number {
    return this.run('hwptAlloc', () => this.allocHwpt(() => this.getDevice(devId).phys, ptId, args));
  }

  /**
   * IOMMU_HWPT_ALLOC for the physical device `device()` returns (looked up where the ioctl looks
   * up dev_id). Restore passes a device of the state or of the host, bound or not: the device only
   * decides whether DIRTY_TRACKING is possible.
   */
  private allocHwpt(device: () => PhysicalDevice | undefined, ptId: number, args: HwptAllocArgs): number {
    const flags = flagsArg(args.flags ?? 0, 0xffffffff);
    const dataType = u32Arg(args.dataType ?? HwptDataType.NONE, 'dataType');
    if (args.data !== undefined && !(args.data instanceof Uint8Array)) throw new IommufdError('EINVAL', 'data must be a Uint8Array', 'data');
    const dataLen = args.data?.length ?? 0;
    // iommufd_hwpt_alloc: data_type and data_len must both be given or both be absent.
    if ((dataType === HwptDataType.NONE) !== (dataLen === 0)) {
      throw new IommufdError('EINVAL', 'dataType and data must be given together', 'dataType');
    }
    const phys = device();
    const pt = this.objects.get(u32Arg(ptId, 'ptId'));
    // iommufd_hwpt_alloc: an unknown pt_id is -EINVAL.
    if (pt === undefined) throw new IommufdError('EINVAL', `no object with ID ${ptId}`, 'ptId');
    if (pt.type === 'IOAS') {
      const valid = HwptAllocFlag.NEST_PARENT | HwptAllocFlag.DIRTY_TRACKING | HwptAllocFlag.PASID;
      // iommufd_hwpt_paging_alloc: unknown flags are -EOPNOTSUPP (fault queues are not emulated).
      if ((flags & ~valid) !== 0) throw new IommufdError('EOPNOTSUPP', `unsupported HWPT flags 0x${(flags & ~valid).toString(16)}`, 'flags');
      // domain_alloc_paging_flags: this IOMMU takes no driver data for a paging domain.
      if (dataLen !== 0) throw new IommufdError('EOPNOTSUPP', `data type ${dataType} is not supported for a paging HWPT`, 'dataType');
      // iommufd_hwpt_paging_alloc: DIRTY_TRACKING on a device without the capability is -EOPNOTSUPP.
      if ((flags & HwptAllocFlag.DIRTY_TRACKING) !== 0 && phys?.dirtyTracking !== true) {
        throw new IommufdError('EOPNOTSUPP', `device '${phys?.name ?? '(none)'}' cannot track dirty pages`, 'flags');
      }
      this.checkIdSpace();
      return this.newHwpt(pt, false, flags).id;
    }
    if (pt.type === 'HWPT_PAGING') {
      // iommufd_hwpt_nested_alloc: only FAULT_ID_VALID / PASID flags, and stage-1 data is required.
      if ((flags & ~(HwptAllocFlag.FAULT_ID_VALID | HwptAllocFlag.PASID)) !== 0 || dataLen === 0) {
        throw new IommufdError('EOPNOTSUPP', 'a nested HWPT takes stage-1 data and only the PASID flag', 'flags');
      }
      // iommufd_hwpt_nested_alloc: the parent must be a manually allocated NEST_PARENT HWPT.
      if (pt.auto || !pt.nestParent) throw new IommufdError('EINVAL', `HWPT ${pt.id} is not a nesting parent`, 'ptId');
      // Fault objects (IOMMU_FAULT_QUEUE_ALLOC) are not emulated, so no fault_id can be valid.
      if ((flags & HwptAllocFlag.FAULT_ID_VALID) !== 0) throw new IommufdError('EOPNOTSUPP', 'fault queues are not supported', 'flags');
      this.checkIdSpace();
      return this.newNestedHwpt(pt, flags, dataType, args.data!).id;
    }
    // iommufd_hwpt_alloc: any other object type is -EINVAL.
    throw new IommufdError('EINVAL', `object ${pt.id} (${pt.type}) cannot parent a HWPT`, 'ptId');
  }

  /** The driver half of IOMMU_HWPT_ALLOC for a nested HWPT: intel_iommu_domain_alloc_nested. */
  private newNestedHwpt(parent: HwptPaging, flags: number, dataType: number, data: Uint8Array): HwptNested {
    // intel_iommu_domain_alloc_nested: "Must be nested domain": another data type is -EOPNOTSUPP.
    if (dataType !== HwptDataType.VTD_S1) throw new IommufdError('EOPNOTSUPP', `stage-1 data type ${dataType} is not supported (VT-d only)`, 'dataType');
    // iommu_copy_struct_from_user(..., __reserved): shorter than the whole struct is -EINVAL ...
    if (data.length < VTD_S1_DATA_SIZE) throw new IommufdError('EINVAL', `struct iommu_hwpt_vtd_s1 needs ${VTD_S1_DATA_SIZE} bytes, got ${data.length}`, 'data');
    // ... and copy_struct_from_user: bytes past the struct must be zero, else -E2BIG.
    if (data.subarray(VTD_S1_DATA_SIZE).some((b) => b !== 0)) throw new IommufdError('E2BIG', 'nonzero bytes past struct iommu_hwpt_vtd_s1', 'data');
    const s1 = decodeVtdS1(data);
    // The kernel's VT-d driver programs unknown flag bits and __reserved into nothing; here they
    // are refused up front with the driver's rule for invalidation entries (-EOPNOTSUPP).
    if ((s1.flags & ~VTD_S1_VALID_FLAGS) !== 0n || s1.reserved !== 0) {
      throw new IommufdError('EOPNOTSUPP', 'struct iommu_hwpt_vtd_s1 has unknown flags or a nonzero __reserved', 'data');
    }
    // intel_pasid_setup_nested (run at attach by the kernel, at allocation here since every device
    // sits behind the same IOMMU): "Invalid stage-1 address width" -EINVAL.
    if (s1.addrWidth !== VTD_ADDR_WIDTH_4LEVEL && s1.addrWidth !== VTD_ADDR_WIDTH_5LEVEL) {
      throw new IommufdError('EINVAL', `stage-1 address width ${s1.addrWidth} is not 48 or 57`, 'data');
    }
    // intel_pasid_setup_nested: SRE without ecap_srs, EAFE without ecap_eafs: -EINVAL. Requests are
    // never privileged here and accessed flags are not written, so neither capability is reported.
    const caps = vtdHwInfo(MAX_PASID_BITS).ecapReg;
    if ((s1.flags & VtdS1Flag.SRE) !== 0n && ((caps >> BigInt(VtdEcap.SRS)) & 1n) === 0n) {
      throw new IommufdError('EINVAL', 'no supervisor request support (IOMMU_VTD_S1_SRE)', 'data');
    }
    if ((s1.flags & VtdS1Flag.EAFE) !== 0n && ((caps >> BigInt(VtdEcap.EAFS)) & 1n) === 0n) {
      throw new IommufdError('EINVAL', 'no extended access flag support (IOMMU_VTD_S1_EAFE)', 'data');
    }
    // pasid_set_flptr keeps bits 12..63; a table above the 52-bit stage-1 address width could never
    // be walked, so it is refused here instead of faulting every DMA.
    const root = s1.pgtblAddr & ~0xfffn;
    if (root >= 1n << 52n) throw new IommufdError('EINVAL', `stage-1 table at 0x${root.toString(16)} is beyond 52 bits`, 'data');
    // Allocation of the shared stage-1 record: -ENOMEM when the pool is full.
    if (!this.pool.ensure(1)) throw new IommufdError('ENOMEM', 'page-table pool exhausted', 'data');
    const hwpt = this.addObject((id) => {
      const record = createStage1Record(this.pool, {
        root: Number(root),
        levels: s1.addrWidth === VTD_ADDR_WIDTH_5LEVEL ? 5 : 4,
        stage2: parent.ioas.table.header,
        hwptId: id,
      });
      return new HwptNested(id, parent, dataType, (flags & HwptAllocFlag.PASID) !== 0, Number(root), s1.addrWidth, s1.flags, record);
    });
    // iommufd_hwpt_nested_alloc: refcount_inc(&parent->common.obj.users).
    parent.users++;
    return hwpt;
  }

  /** iommufd_hwpt_nested_destroy: drops the parent reference and retires the shared record. */
  private removeNested(hwpt: HwptNested): void {
    releaseStage1Record(this.pool, hwpt.record);
    hwpt.parent.users--;
    this.objects.remove(hwpt.id);
  }

  private newHwpt(ioas: Ioas, auto: boolean, flags: number): HwptPaging {
    const hwpt = this.addObject(
      (id) =>
        new HwptPaging(
          id,
          ioas,
          auto,
          (flags & HwptAllocFlag.NEST_PARENT) !== 0,
          (flags & HwptAllocFlag.DIRTY_TRACKING) !== 0,
          (flags & HwptAllocFlag.PASID) !== 0,
        ),
    );
    ioas.hwpts.add(hwpt);
    return hwpt;
  }

  private removeHwpt(hwpt: HwptPaging): void {
    hwpt.ioas.hwpts.delete(hwpt);
    this.objects.remove(hwpt.id);
  }

  /** iommufd_hw_pagetable_put: an automatic HWPT goes away with its last attachment. */
  private dropIfAuto(target: AttachTarget): void {
    if (target !== 'identity' && target.type === 'HWPT_PAGING' && target.auto && target.users === 0) this.removeHwpt(target);
  }

  // ---- devices ----

  /** Binds a physical device (VFIO_DEVICE_BIND_IOMMUFD). Returns its device ID; it starts blocked. */
  deviceBind(name: string): number {
    return this.run('deviceBind', () => {
      if (typeof name !== 'string') throw new IommufdError('EINVAL', 'device name must be a string', 'name');
      const phys = this.host.findDevice(name);
      // No such device node: -ENODEV.
      if (phys === undefined) throw new IommufdError('ENODEV', `no device named '${name}'`, 'name');
      for (const obj of this.objects.list()) {
        // vfio_df_open: a device cdev is bound once.
        if (obj.type === 'DEVICE' && obj.phys === phys) throw new IommufdError('EINVAL', `device '${name}' is already bound here`, 'name');
      }
      // iommu_device_claim_dma_owner: a group owned by another context is -EBUSY.
      if (!this.host.canClaimGroup(this, phys.group)) {
        throw new IommufdError('EBUSY', `group '${phys.group}' of '${name}' is owned by another context`, 'name');
      }
      this.checkIdSpace();
      const group = this.groups.get(phys.group) ?? new IGroup(phys.group);
      const pasids = [...group.attachments.keys()].filter((p) => p !== 0 && phys.pasidBits > 0 && p < 2 ** phys.pasidBits);
      const tables = pasids.length === 0 ? 0 : PasidDirectory.tablesFor(phys.pasidBits) * pasids.length;
      // Allocation failures of the device object are -ENOMEM.
      if (!this.deviceTable.canAlloc(1 + pasids.length) || !this.pool.ensure(tables)) throw new IommufdError('ENOMEM', 'device table full', 'name');
      this.groups.set(group.key, group);
      const dev = this.addObject((id) => new BoundDevice(id, phys, group, this.deviceTable.alloc(id, 0)));
      group.devices.add(dev);
      this.host.claimGroup(this, phys.group);
      // The group may already translate (another of its devices is attached): follow it.
      for (const pasid of group.attachments.keys()) this.syncGroupRows(group, pasid);
      return dev.id;
    });
  }

  /**
   * Attaches (or, when already attached at this PASID, replaces atomically) a device to a HWPT, or
   * to an IOAS through an automatic HWPT. Returns the HWPT ID now in use.
   */
  deviceAttach(devId: number, ptId: number, pasid = 0): number {
    return this.runNarrowing('deviceAttach', false, () => {
      const dev = this.getDevice(devId);
      const requested = pasidArg(pasid);
      // iommufd_device_change_pt looks the pt_id up (ENOENT) before the driver judges the PASID.
      const pt = this.lookup(ptId, 'ptId');
      const p = this.checkPasid(dev, requested);
      const attached = this.isAttached(dev, p);
      switch (pt.type) {
        case 'HWPT_PAGING':
        case 'HWPT_NESTED':
          if (attached) this.replace(dev, p, pt);
          else this.attach(dev, p, pt);
          return pt.id;
        case 'IOAS':
          return this.autoAttach(dev, p, pt, attached);
        default:
          // iommufd_device_change_pt: a pt_id that is neither an IOAS nor a HWPT is -EINVAL.
          throw new IommufdError('EINVAL', `object ${pt.id} (${pt.type}) is not attachable`, 'ptId');
      }
    });
  }

  /**
   * Puts the device (at PASID) in identity translation, IOVA = GPA, replacing any attachment
   * atomically. An emulator extension for virtio-iommu bypass: iommufd has no identity HWPT.
   */
  deviceSetBypass(devId: number, pasid = 0): void {
    this.runNarrowing('deviceSetBypass', false, () => {
      const dev = this.getDevice(devId);
      const p = this.checkPasid(dev, pasidArg(pasid));
      if (this.isAttached(dev, p)) this.replace(dev, p, 'identity');
      else this.attach(dev, p, 'identity');
    });
  }

  /** Detaches the device at PASID: it is blocked again. Detaching what is not attached does nothing. */
  deviceDetach(devId: number, pasid = 0): void {
    this.runNarrowing('deviceDetach', false, () => {
      const dev = this.getDevice(devId);
      this.detach(dev, pasidArg(pasid));
    });
  }

  /** Unbinds the device (closing its VFIO cdev): detaches everything and frees its ID. */
  deviceUnbind(devId: number): void {
    this.runNarrowing('deviceUnbind', true, () => {
      this.unbind(this.getDevice(devId));
    });
  }

  private unbind(dev: BoundDevice): void {
    const group = dev.igroup;
    const pasids = [...group.attachments.keys()].sort((a, b) => b - a);
    for (const p of pasids) this.detach(dev, p);
    group.devices.delete(dev);
    for (const [p, row] of dev.pasidRows) {
      dev.pasidDirectory?.clear(p);
      this.deviceTable.release(row);
    }
    dev.pasidRows.clear();
    dev.pasidDirectory?.destroy();
    this.deviceTable.release(dev.row);
    this.objects.remove(dev.id);
    this.host.releaseGroup(group.key);
    if (group.devices.size === 0) this.groups.delete(group.key);
  }

  private checkPasid(dev: BoundDevice, pasid: number): number {
    if (pasid === 0) return 0;
    // iommu_attach_device_pasid: pasid >= max_pasids is -EINVAL, and a device without PASID
    // support has max_pasids 0 (the selftest's no_pasid variant expects EINVAL here).
    if (dev.phys.pasidBits === 0) throw new IommufdError('EINVAL', `device '${dev.phys.name}' has no PASID support`, 'pasid');
    for (const d of dev.igroup.devices) {
      // iommu_attach_device_pasid: a PASID at or above a group device's max_pasids is -EINVAL.
      if (d.phys.pasidBits > 0 && pasid >= 2 ** d.phys.pasidBits) {
        throw new IommufdError('EINVAL', `pasid ${pasid} exceeds the ${d.phys.pasidBits}-bit PASIDs of '${d.phys.name}'`, 'pasid');
      }
    }
    return pasid;
  }

  private isAttached(dev: BoundDevice, pasid: number): boolean {
    return this.groups.get(dev.igroup.key)?.attachments.get(pasid)?.devices.has(dev) === true;
  }

  /** iommufd_hwpt_pasid_compat. */
  private checkPasidCompat(target: AttachTarget, group: IGroup, pasid: number): void {
    if (target === 'identity') return;
    if (pasid === 0) {
      // iommufd_hwpt_pasid_compat: a RID HWPT without PASID support while PASIDs are attached is -EINVAL.
      if (!target.pasidCompat && [...group.attachments.keys()].some((p) => p !== 0)) {
        throw new IommufdError('EINVAL', `HWPT ${target.id} was not allocated with the PASID flag, and PASIDs are attached`, 'ptId');
      }
      return;
    }
    // iommufd_hwpt_pasid_compat: a PASID attach needs PASID-capable HWPTs, on the PASID and on the RID.
    if (!target.pasidCompat) throw new IommufdError('EINVAL', `HWPT ${target.id} was not allocated with the PASID flag`, 'ptId');
    const rid = group.attachments.get(0)?.target;
    if (rid !== undefined && rid !== 'identity' && !rid.pasidCompat) {
      throw new IommufdError('EINVAL', `the RID's HWPT ${rid.id} was not allocated with the PASID flag`, 'ptId');
    }
  }

  /** The IOMMU driver refuses a dirty-tracking domain for a device that cannot track dirty pages. */
  private checkDirty(target: AttachTarget, devices: Iterable<BoundDevice>, pasid: number): void {
    // A nested HWPT is judged by its parent: paging_domain_compatible(s2_domain) in the VT-d driver.
    const paging = this.paging(target);
    if (paging === undefined || !paging.dirtyTracking) return;
    // intel_nested_set_dev_pasid: a nested domain over a dirty-tracking parent takes no PASID: -EINVAL.
    if (target !== 'identity' && target.type === 'HWPT_NESTED' && pasid !== 0) {
      throw new IommufdError('EINVAL', `nested HWPT ${target.id} has a dirty-tracking parent and cannot be attached to a PASID`, 'ptId');
    }
    for (const d of devices) {
      // attach_dev of a dirty-tracking domain to a device without IOMMU_CAP_DIRTY_TRACKING: -EINVAL.
      if (!d.phys.dirtyTracking) throw new IommufdError('EINVAL', `device '${d.phys.name}' cannot use a dirty-tracking HWPT`, 'ptId');
    }
  }

  /** iopt_reserve_iova check for devices' reserved regions in `ioas` (no change made). */
  private checkReserve(ioas: Ioas, devices: Iterable<BoundDevice>): void {
    for (const d of devices) {
      for (const r of d.phys.reservedRegions) {
        // iopt_reserve_iova: an area or an allowed range over the region is -EADDRINUSE.
        if (ioas.areaHit(r.start, r.last) || ioas.allowedHit(r.start, r.last)) {
          throw new IommufdError(
            'EADDRINUSE',
            `reserved region 0x${r.start.toString(16)}-0x${r.last.toString(16)} of '${d.phys.name}' is mapped or allowed in IOAS ${ioas.id}`,
            'ptId',
          );
        }
      }
    }
  }

  private addReserved(ioas: Ioas, devices: Iterable<BoundDevice>): void {
    for (const d of devices) for (const r of d.phys.reservedRegions) ioas.reserved.push({ start: r.start, last: r.last, owner: d.id });
  }

  private removeReserved(ioas: Ioas, devices: Iterable<BoundDevice>): void {
    const ids = new Set([...devices].map((d) => d.id));
    ioas.reserved = ioas.reserved.filter((r) => !ids.has(r.owner));
  }

  /** Rows and tables a group needs to translate at `pasid`: fails with ENOMEM before any change. */
  private checkRowCapacity(group: IGroup, pasid: number): void {
    if (pasid === 0) return;
    let rows = 0;
    let tables = 0;
    for (const d of group.devices) {
      if (d.phys.pasidBits === 0 || pasid >= 2 ** d.phys.pasidBits || d.pasidRows.has(pasid)) continue;
      rows++;
      tables += d.pasidDirectory === undefined ? PasidDirectory.tablesFor(d.phys.pasidBits) : d.pasidDirectory.tablesToSet(pasid);
    }
    if (!this.deviceTable.canAlloc(rows) || !this.pool.ensure(tables)) throw new IommufdError('ENOMEM', 'device table full', 'pasid');
  }

  /** find_hwpt_paging: the paging HWPT itself, or a nested HWPT's parent (whose IOAS gets reserved regions). */
  private paging(target: AttachTarget): HwptPaging | undefined {
    if (target === 'identity') return undefined;
    return target.type === 'HWPT_PAGING' ? target : target.parent;
  }

  /** iommufd_hw_pagetable_attach: the device joins its group's attachment at `pasid`. */
  private attach(dev: BoundDevice, pasid: number, target: AttachTarget): void {
    const group = dev.igroup;
    const att = group.attachments.get(pasid);
    // iommufd_hw_pagetable_attach: the group already uses another HWPT at this PASID: -EINVAL.
    if (att !== undefined && att.target !== target) {
      throw new IommufdError('EINVAL', `group '${group.key}' is attached elsewhere at pasid ${pasid}; attach every device to the same HWPT`, 'ptId');
    }
    this.checkPasidCompat(target, group, pasid);
    this.checkDirty(target, att === undefined ? group.devices : [dev], pasid);
    const hwpt = this.paging(target);
    // Reserved regions apply to the RID only (attach_resv is false for a PASID attach).
    if (hwpt !== undefined && pasid === 0) this.checkReserve(hwpt.ioas, [dev]);
    this.checkRowCapacity(group, pasid);
    if (hwpt !== undefined && pasid === 0) this.addReserved(hwpt.ioas, [dev]);
    const entry: Attachment = att ?? { target, devices: new Set() };
    group.attachments.set(pasid, entry);
    entry.devices.add(dev);
    if (target !== 'identity') target.users++;
    if (att === undefined) this.syncGroupRows(group, pasid);
  }

  /** iommufd_device_do_replace: the whole group moves to `target` at `pasid` in one step per row. */
  private replace(dev: BoundDevice, pasid: number, target: AttachTarget): void {
    const group = dev.igroup;
    const att = group.attachments.get(pasid)!;
    const old = att.target;
    if (old === target) return;
    this.checkPasidCompat(target, group, pasid);
    this.checkDirty(target, group.devices, pasid);
    const next = this.paging(target);
    const prev = this.paging(old);
    const moveReserved = pasid === 0 && next !== undefined && (prev === undefined || prev.ioas !== next.ioas);
    if (moveReserved) this.checkReserve(next.ioas, att.devices);
    this.checkRowCapacity(group, pasid);
    if (moveReserved) this.addReserved(next.ioas, att.devices);
    att.target = target;
    if (target !== 'identity') target.users += att.devices.size;
    if (old !== 'identity') old.users -= att.devices.size;
    this.syncGroupRows(group, pasid);
    if (pasid === 0 && prev !== undefined && (next === undefined || next.ioas !== prev.ioas)) this.removeReserved(prev.ioas, att.devices);
    this.dropIfAuto(old);
  }

  /** iommufd_device_auto_get_domain: reuse an automatic HWPT of the IOAS, or make one. */
  private autoAttach(dev: BoundDevice, pasid: number, ioas: Ioas, attached: boolean): number {
    // Automatic HWPTs are allocated without IOMMU_HWPT_ALLOC_PASID, so iommufd_hwpt_pasid_compat
    // refuses them for a PASID: -EINVAL.
    if (pasid !== 0) throw new IommufdError('EINVAL', 'a PASID attaches to a HWPT allocated with the PASID flag, not to an IOAS', 'ptId');
    const candidates = [...ioas.hwpts].filter((h) => h.auto).sort((a, b) => a.id - b.id);
    for (const hwpt of candidates) {
      try {
        if (attached) this.replace(dev, pasid, hwpt);
        else this.attach(dev, pasid, hwpt);
        return hwpt.id;
      } catch (e) {
        // iommufd_device_auto_get_domain: -EINVAL means "incompatible, try the next one".
        if (e instanceof IommufdError && e.code === 'EINVAL') continue;
        throw e;
      }
    }
    this.checkIdSpace();
    const hwpt = this.newHwpt(ioas, true, 0);
    try {
      if (attached) this.replace(dev, pasid, hwpt);
      else this.attach(dev, pasid, hwpt);
    } catch (e) {
      // iommufd_object_abort_and_destroy: the new HWPT never becomes visible.
      this.removeHwpt(hwpt);
      throw e;
    }
    return hwpt.id;
  }

  private detach(dev: BoundDevice, pasid: number): void {
    const group = dev.igroup;
    const att = group.attachments.get(pasid);
    // vfio's DETACH_IOMMUFD_PT on a device that is not attached has nothing to undo.
    if (att === undefined || !att.devices.has(dev)) return;
    att.devices.delete(dev);
    const target = att.target;
    if (target !== 'identity') target.users--;
    const hwpt = this.paging(target);
    if (hwpt !== undefined && pasid === 0) this.removeReserved(hwpt.ioas, [dev]);
    if (att.devices.size === 0) {
      group.attachments.delete(pasid);
      this.syncGroupRows(group, pasid);
    }
    this.dropIfAuto(target);
  }

  /** Writes every group device's row for `pasid` from the group's attachment (blocked when none). */
  private syncGroupRows(group: IGroup, pasid: number): void {
    const att = group.attachments.get(pasid);
    for (const d of group.devices) {
      if (pasid === 0) {
        this.writeRow(d.row, att);
        continue;
      }
      const eligible = d.phys.pasidBits > 0 && pasid < 2 ** d.phys.pasidBits;
      const existing = d.pasidRows.get(pasid);
      if (att !== undefined && eligible) {
        if (existing !== undefined) {
          this.writeRow(existing, att);
          continue;
        }
        if (d.pasidDirectory === undefined) {
          d.pasidDirectory = new PasidDirectory(this.pool, d.phys.pasidBits);
          this.deviceTable.setPasidDirectory(d.row, d.pasidDirectory.root, d.pasidDirectory.levels);
        }
        const row = this.deviceTable.alloc(d.id, DeviceRowFlag.PASID);
        this.writeRow(row, att);
        d.pasidDirectory.set(pasid, row);
        d.pasidRows.set(pasid, row);
      } else if (existing !== undefined) {
        d.pasidDirectory?.clear(pasid);
        this.deviceTable.release(existing);
        d.pasidRows.delete(pasid);
      }
    }
  }

  private writeRow(row: number, att: Attachment | undefined): void {
    if (att === undefined) {
      this.deviceTable.write(row, AttachKind.BLOCKED, 0, 0, false);
    } else if (att.target === 'identity') {
      this.deviceTable.write(row, AttachKind.IDENTITY, 0, 0, false);
    } else if (att.target.type === 'HWPT_PAGING') {
      this.deviceTable.write(row, AttachKind.PAGING, att.target.ioas.table.header, att.target.id, att.target.dirtyEnabled);
    } else {
      // A nested row names the stage-1 record; the record names stage 2. Dirty tracking is the
      // parent's: writes through a nested HWPT dirty its stage 2.
      this.deviceTable.write(row, AttachKind.NESTED, att.target.record, att.target.id, att.target.parent.dirtyEnabled);
    }
  }

  /**
   * IOMMU_GET_HW_INFO. The IOMMU presents itself as VT-d (struct iommu_hw_info_vtd): only the
   * capability bits this backend implements are set (vtdHwInfo, docs/backend.md).
   */
  getHwInfo(devId: number): HwInfo {
    return this.run('getHwInfo', () => {
      const dev = this.getDevice(devId);
      return {
        dataType: HwInfoType.INTEL_VTD,
        data: encodeVtdHwInfo(vtdHwInfo(MAX_PASID_BITS)),
        capabilities: dev.phys.dirtyTracking ? HwCap.DIRTY_TRACKING : 0,
        maxPasidLog2: dev.phys.pasidBits,
      };
    });
  }

  /**
   * IOMMU_HWPT_INVALIDATE with IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 entries: the guest changed its
   * stage-1 table over these IOVA ranges. Entries are handled in order; like the kernel, an entry
   * that fails stops the call after the earlier ones were handled (the IommufdError's
   * details.entryNum says how many). Strict, as an unmap: when it returns, no device worker uses a
   * translation cached from before the change. Returns the number of entries handled.
   */
  hwptInvalidate(hwptId: number, entries: readonly HwptInvalidateEntry[], dataType: number = HwptInvalidateDataType.VTD_S1): number {
    let failure: IommufdError | undefined;
    const outer = this.depth === 0;
    const handled = this.run('hwptInvalidate', () => {
      const obj = this.lookup(hwptId, 'hwptId');
      // iommufd_hwpt_invalidate: an object that is neither a nested HWPT nor a vIOMMU is -EINVAL.
      if (obj.type !== 'HWPT_NESTED') throw new IommufdError('EINVAL', `object ${obj.id} (${obj.type}) is not a nested HWPT`, 'hwptId');
      const type = u32Arg(dataType, 'dataType');
      // intel_nested_cache_invalidate_user: another data type is -EINVAL, even for no entries.
      if (type !== HwptInvalidateDataType.VTD_S1) throw new IommufdError('EINVAL', `invalidation data type ${type} is not VTD_S1`, 'dataType');
      if (!Array.isArray(entries)) throw new IommufdError('EINVAL', 'entries must be an array', 'entries');
      const ranges: PfnRange[] = [];
      let done = 0;
      for (; done < entries.length; done++) {
        try {
          const range = invalidationRange(entries[done], done);
          if (range !== undefined) ranges.push(range);
        } catch (e) {
          if (!(e instanceof IommufdError)) throw e;
          failure = new IommufdError(e.code, e.message, e.argument, { entryNum: done });
          break;
        }
      }
      appendInvalidations(this.pool.words, obj.record, ranges);
      return done;
    });
    // Handled entries count even when a later one failed: wait for the workers before reporting.
    if (outer && handled > 0) this.settle(false);
    if (failure !== undefined) {
      this.log.warn({ op: 'hwptInvalidate', errno: failure.code, argument: failure.argument, entryNum: handled }, failure.message);
      throw failure;
    }
    return handled;
  }

  // ---- dirty tracking ----

  /**
   * IOMMU_HWPT_SET_DIRTY_TRACKING: switches dirty tracking on or off for a paging HWPT allocated
   * with IOMMU_HWPT_ALLOC_DIRTY_TRACKING. `flags` may carry HwptDirtyTrackingFlag.ENABLE too
   * (the kernel's only bit); `enable` or that bit turns tracking on. Every row attached to the HWPT,
   * or to a nested HWPT over it, is rewritten; like an unmap the call returns once no device worker
   * still translates under the old setting, so every write of a DMA that begins afterwards is seen.
   */
  hwptSetDirtyTracking(hwptId: number, enable: boolean, flags = 0): void {
    let cleared = 0;
    let changed = false;
    let header = 0;
    const outer = this.depth === 0;
    this.run('hwptSetDirtyTracking', () => {
      // iommufd_hwpt_set_dirty_tracking: flags beyond IOMMU_HWPT_DIRTY_TRACKING_ENABLE are -EOPNOTSUPP.
      const f = flagsArg(flags, HwptDirtyTrackingFlag.ENABLE);
      if (typeof enable !== 'boolean') throw new IommufdError('EINVAL', 'enable must be a boolean', 'enable');
      const on = enable || (f & HwptDirtyTrackingFlag.ENABLE) !== 0;
      const hwpt = this.getDirtyHwpt(hwptId);
      // iopt_set_dirty_tracking: a domain without dirty_ops (not allocated with
      // IOMMU_HWPT_ALLOC_DIRTY_TRACKING) is -EOPNOTSUPP.
      if (!hwpt.dirtyTracking) throw new IommufdError('EOPNOTSUPP', `HWPT ${hwpt.id} was not allocated with DIRTY_TRACKING`, 'hwptId');
      if (on) {
        // iopt_set_dirty_tracking: "Clear dirty bits from PTEs to ensure a clean snapshot" before
        // enabling. The bits live in the IOAS's table, shared by its HWPTs: they are left alone while
        // another HWPT of the IOAS tracks (its next read still owes them).
        const othersTrack = [...hwpt.ioas.hwpts].some((h) => h !== hwpt && h.dirtyEnabled);
        if (!othersTrack) cleared = readAndClearDirty(hwpt.ioas.table, this.pool.words, 0, MAX_IOVA_PFN, false, undefined);
        header = hwpt.ioas.table.header;
      }
      if (hwpt.dirtyEnabled === on) return;
      hwpt.dirtyEnabled = on;
      for (const group of this.groups.values()) {
        for (const [pasid, att] of group.attachments) {
          const t = att.target;
          if (t === hwpt || (t !== 'identity' && t.type === 'HWPT_NESTED' && t.parent === hwpt)) this.syncGroupRows(group, pasid);
        }
      }
      changed = true;
    });
    if (cleared > 0) bumpDirtyGeneration(this.pool.words, header);
    if (outer && (changed || cleared > 0)) this.settle(false);
  }

  /**
   * IOMMU_HWPT_GET_DIRTY_BITMAP: the pages of [iova, iova + length) written by DMA since the
   * last read (or since tracking was enabled), one bit per `pageSize` bytes, bit i for the page at
   * iova + i * pageSize, as the kernel's __u64 bitmap. Clears what it reports unless `flags` has
   * HwptGetDirtyBitmapFlag.NO_CLEAR. A write that races the read is reported by this read or by
   * the next one, never lost: after clearing, the call waits for the DMAs in flight (strict, like
   * an unmap), so those DMAs' data is in memory when it returns.
   */
  hwptGetDirtyBitmap(hwptId: number, args: { iova: bigint; length: bigint; pageSize: bigint; flags?: number }): BigUint64Array {
    let cleared = 0;
    let header = 0;
    const outer = this.depth === 0;
    const bitmap = this.run('hwptGetDirtyBitmap', () => {
      if (typeof args !== 'object' || args === null) throw new IommufdError('EINVAL', 'arguments must be an object', 'args');
      // iommufd_hwpt_get_dirty_bitmap: flags beyond IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR are -EOPNOTSUPP.
      const f = flagsArg(args.flags ?? 0, HwptGetDirtyBitmapFlag.NO_CLEAR);
      const hwpt = this.getDirtyHwpt(hwptId);
      const iova = u64Arg(args.iova, 'iova');
      const length = u64Arg(args.length, 'length');
      const pageSize = u64Arg(args.pageSize, 'pageSize');
      // iommufd_check_iova_range, in its order. A zero length is EINVAL here: the kernel's
      // check_add_overflow(iova, length - 1) only lets it through for iova 0, to a bitmap of nothing.
      if (length === 0n) throw new IommufdError('EINVAL', 'length is 0', 'length');
      // "if (check_add_overflow(bitmap->iova, bitmap->length - 1, &last_iova)) return -EOVERFLOW;"
      if (iova + length - 1n > U64_MAX) throw new IommufdError('EOVERFLOW', 'iova + length overflows 64 bits', 'length');
      // "(bitmap->iova & (iommu_pgsize - 1)) || ((last_iova + 1) & (iommu_pgsize - 1))": -EINVAL,
      // with the IOAS alignment, always 4 KiB here.
      if (iova % PAGE_SIZE_N !== 0n || length % PAGE_SIZE_N !== 0n) {
        throw new IommufdError('EINVAL', 'iova and length must be 4 KiB aligned', iova % PAGE_SIZE_N !== 0n ? 'iova' : 'length');
      }
      // "if (!bitmap->page_size) return -EINVAL;" A page size that is not a power of two is EINVAL
      // too (the kernel's mask tests assume one; its bitmap takes __ffs(page_size) as the shift).
      if (pageSize === 0n || (pageSize & (pageSize - 1n)) !== 0n) throw new IommufdError('EINVAL', 'pageSize must be a power of two', 'pageSize');
      // "(bitmap->iova & (bitmap->page_size - 1)) || ((last_iova + 1) & (bitmap->page_size - 1))": -EINVAL.
      if (iova % pageSize !== 0n || length % pageSize !== 0n) {
        throw new IommufdError('EINVAL', 'iova and length must be aligned to pageSize', iova % pageSize !== 0n ? 'iova' : 'length');
      }
      // iommu_read_and_clear_dirty: a domain without dirty_ops (no IOMMU_HWPT_ALLOC_DIRTY_TRACKING) is -EOPNOTSUPP.
      if (!hwpt.dirtyTracking) throw new IommufdError('EOPNOTSUPP', `HWPT ${hwpt.id} was not allocated with DIRTY_TRACKING`, 'hwptId');
      const bits = length / pageSize;
      // iova_bitmap_alloc failing is -ENOMEM; here the bitmap is returned whole, so it is bounded.
      if (bits > BigInt(MAX_DIRTY_BITMAP_BITS)) throw new IommufdError('ENOMEM', `a bitmap of ${bits} bits is too large`, 'length');
      // The drivers' read_and_clear_dirty (mock, VT-d): reading a bitmap while tracking is off is -EINVAL.
      if (!hwpt.dirtyEnabled) throw new IommufdError('EINVAL', `dirty tracking is off on HWPT ${hwpt.id}`, 'hwptId');
      const nbits = Number(bits);
      const out = new BigUint64Array(Math.ceil(nbits / 64));
      const firstPfn = pfnOf(iova);
      const lastPfn = pfnOf(iova + length - 1n);
      const pages = pageSize >= PAGE_SIZE_N ? Number(pageSize / PAGE_SIZE_N) : 0;
      const target = {
        words: new Uint32Array(out.buffer),
        basePfn: firstPfn,
        pagesPerBit: pages,
        bitsPerPage: pages > 0 ? 0 : Number(PAGE_SIZE_N / pageSize),
      };
      // __iommu_read_and_clear_dirty walks the areas in the range; the kernel ignores what that
      // walk returns (iova_bitmap_for_each's result is dropped), so holes simply report nothing.
      cleared = readAndClearDirty(hwpt.ioas.table, this.pool.words, firstPfn, lastPfn, (f & HwptGetDirtyBitmapFlag.NO_CLEAR) !== 0, target);
      header = hwpt.ioas.table.header;
      return out;
    });
    if (cleared > 0) {
      bumpDirtyGeneration(this.pool.words, header);
      if (outer) this.settle(false);
    }
    return bitmap;
  }

  /** iommufd_get_hwpt_paging: anything but a paging HWPT (a nested one included) is -ENOENT. */
  private getDirtyHwpt(hwptId: number): HwptPaging {
    const obj = this.lookup(hwptId, 'hwptId');
    if (obj.type !== 'HWPT_PAGING') throw new IommufdError('ENOENT', `object ${obj.id} (${obj.type}) is not a paging HWPT`, 'hwptId');
    return obj;
  }

  // ---- accesses ----

  /** iommufd_access_create + iommufd_access_attach: a software consumer of `ioas`. */
  accessCreate(ioasId: number, ops: AccessOps): number {
    return this.run('accessCreate', () => {
      if (typeof ops !== 'object' || ops === null || typeof ops.onUnmap !== 'function') {
        throw new IommufdError('EINVAL', 'ops.onUnmap must be a function', 'ops');
      }
      const ioas = this.getIoas(ioasId);
      this.checkIdSpace();
      const access = this.addObject((id) => new Access(id, ioas, ops));
      ioas.accesses.add(access);
      return access.id;
    });
  }

  /** iommufd_access_destroy: tells the consumer to drop everything, then releases what it kept. */
  accessDestroy(accessId: number): void {
    this.run('accessDestroy', () => {
      this.destroyAccess(this.getAccess(accessId));
    });
  }

  private destroyAccess(access: Access): void {
    try {
      // iommufd_access_change_ioas(NULL): ops->unmap(data, 0, ULONG_MAX).
      access.ops.onUnmap(0n, U64_MAX);
    } catch (e) {
      this.log.error({ access: access.id, err: String(e) }, 'access onUnmap callback threw');
    }
    if (access.pins.length > 0) this.log.warn({ access: access.id, pins: access.pins.length }, 'access destroyed with pins left; releasing them');
    while (access.pins.length > 0) this.releasePin(access, access.pins.length - 1);
    access.ioas.accesses.delete(access);
    this.objects.remove(access.id);
  }

  /**
   * iommufd_access_pin_pages: holds the pages under [iova, iova+length) (iova page aligned) until
   * accessUnpin; returns the GPA of each 4 KiB page. flags: AccessRwFlag.WRITE to need write access.
   */
  accessPin(accessId: number, iova: bigint, length: bigint, flags = 0): number[] {
    return this.run('accessPin', () => {
      const access = this.getAccess(accessId);
      const start = u64Arg(iova, 'iova');
      const len = u64Arg(length, 'length');
      const f = flagsArg(flags, AccessRwFlag.WRITE | AccessRwFlag.KTHREAD);
      // iommufd_access_pin_pages: zero length -EINVAL, overflow -EOVERFLOW.
      if (len === 0n) throw new IommufdError('EINVAL', 'length is 0', 'length');
      if (start + len - 1n > U64_MAX) throw new IommufdError('EOVERFLOW', 'iova + length overflows 64 bits', 'length');
      // iopt_area_contig_is_aligned: the pin API needs a page-aligned iova.
      if (start % PAGE_SIZE_N !== 0n) throw new IommufdError('EINVAL', `iova 0x${start.toString(16)} is not page aligned`, 'iova');
      const parts = this.accessibleParts(access.ioas, start, start + len - 1n, f);
      const slices: PinSlice[] = parts.map((p) => ({ areaStart: p.areaStart, guestPfn: p.guestPfn, pages: p.pages }));
      const out: number[] = [];
      for (const s of slices) {
        this.host.pins.pin(s.guestPfn, s.pages);
        access.ioas.areaPins.set(s.areaStart, (access.ioas.areaPins.get(s.areaStart) ?? 0) + 1);
        for (let i = 0; i < s.pages; i++) out.push((s.guestPfn + i) * PAGE_SIZE);
      }
      access.pins.push({ iova: start, length: len, flags: f, slices });
      return out;
    });
  }

  /** The contiguous area parts under [start, last] an access may use, checked as the kernel does. */
  private accessibleParts(ioas: Ioas, start: bigint, last: bigint, flags: number): AreaPart[] {
    const { parts, complete } = ioas.contiguousParts(pfnOf(start), pfnOf(last));
    const need = (flags & AccessRwFlag.WRITE) !== 0 ? EntryFlag.WRITE : EntryFlag.READ;
    for (const p of parts) {
      // iommufd_access_pin_pages / _rw: an area being unmapped (prevent_access) is -EINVAL.
      if (ioas.preventAccess.has(p.areaStart)) throw new IommufdError('EINVAL', `area at 0x${iovaOf(p.areaStart).toString(16)} is being unmapped`, 'iova');
      // check_area_prot: the area lacks the permission the access needs: -EPERM.
      if ((p.perms & need) === 0) {
        throw new IommufdError('EPERM', `area at 0x${iovaOf(p.areaStart).toString(16)} is not ${need === EntryFlag.WRITE ? 'writeable' : 'readable'}`, 'flags');
      }
    }
    // iopt_area_contig_done false: part of the range is not mapped: -ENOENT.
    if (!complete) throw new IommufdError('ENOENT', `iova range at 0x${start.toString(16)} is not fully mapped`, 'iova');
    return parts;
  }

  /** iommufd_access_unpin_pages: iova and length must match an accessPin exactly. */
  accessUnpin(accessId: number, iova: bigint, length: bigint): void {
    this.run('accessUnpin', () => {
      const access = this.getAccess(accessId);
      const start = u64Arg(iova, 'iova');
      const len = u64Arg(length, 'length');
      const i = access.pins.findIndex((p) => p.iova === start && p.length === len);
      // iommufd_access_unpin_pages WARNs on a range it never pinned; reported as -ENOENT.
      if (i < 0) throw new IommufdError('ENOENT', `no pin at 0x${start.toString(16)} of 0x${len.toString(16)} bytes`, 'iova');
      this.releasePin(access, i);
    });
  }

  private releasePin(access: Access, index: number): void {
    const [pin] = access.pins.splice(index, 1);
    for (const s of pin!.slices) {
      this.host.pins.unpin(s.guestPfn, s.pages);
      const n = (access.ioas.areaPins.get(s.areaStart) ?? 0) - 1;
      if (n > 0) access.ioas.areaPins.set(s.areaStart, n);
      else access.ioas.areaPins.delete(s.areaStart);
    }
  }

  /**
   * iommufd_access_rw: copies between `buf` and IOVA [iova, iova+buf.length), any alignment, across
   * contiguous areas. flags: AccessRwFlag.WRITE writes guest memory, otherwise reads it.
   */
  accessRw(accessId: number, iova: bigint, buf: Uint8Array, flags = 0): void {
    this.run('accessRw', () => {
      const access = this.getAccess(accessId);
      const start = u64Arg(iova, 'iova');
      if (!(buf instanceof Uint8Array)) throw new IommufdError('EINVAL', 'buf must be a Uint8Array', 'buf');
      const f = flagsArg(flags, AccessRwFlag.WRITE | AccessRwFlag.KTHREAD);
      // iommufd_access_rw: zero length -EINVAL, overflow -EOVERFLOW.
      if (buf.length === 0) throw new IommufdError('EINVAL', 'length is 0', 'buf');
      const last = start + BigInt(buf.length) - 1n;
      if (last > U64_MAX) throw new IommufdError('EOVERFLOW', 'iova + length overflows 64 bits', 'buf');
      const parts = this.accessibleParts(access.ioas, start, last, f);
      const memory = this.host.memory;
      let done = 0;
      for (const p of parts) {
        const partStart = iovaOf(p.pfn);
        const from = partStart > start ? partStart : start;
        const partLast = iovaOf(p.pfn + p.pages) - 1n;
        const to = partLast < last ? partLast : last;
        const n = Number(to - from) + 1;
        const gpa = p.guestPfn * PAGE_SIZE + Number(from - partStart);
        const guest = memory.view(gpa, n);
        if ((f & AccessRwFlag.WRITE) !== 0) guest.set(buf.subarray(done, done + n));
        else buf.set(guest, done);
        done += n;
      }
    });
  }

  // ---- options, destroy, close ----

  /** IOMMU_OPTION. Returns the value for GET (0n for SET). */
  option(args: OptionArgs): bigint {
    return this.run('option', () => {
      if (typeof args !== 'object' || args === null) throw new IommufdError('EINVAL', 'option arguments must be an object', 'args');
      const option = u32Arg(args.option, 'option');
      const op = u32Arg(args.op, 'op');
      const objectId = u32Arg(args.objectId ?? 0, 'objectId');
      const raw = args.value ?? 0n;
      if (typeof raw !== 'bigint' && (typeof raw !== 'number' || !Number.isInteger(raw))) throw new IommufdError('EINVAL', 'value must be an integer', 'value');
      const value = BigInt(raw);
      switch (option) {
        case IommuOption.RLIMIT_MODE: {
          // iommufd_option_rlimit_mode: the global option takes no object: -EOPNOTSUPP.
          if (objectId !== 0) throw new IommufdError('EOPNOTSUPP', 'RLIMIT_MODE takes objectId 0', 'objectId');
          if (op === IommuOptionOp.GET) return BigInt(this.rlimitMode);
          if (op !== IommuOptionOp.SET) throw new IommufdError('EOPNOTSUPP', `unknown option op ${op}`, 'op');
          // iommufd_option_rlimit_mode: setting needs CAP_SYS_RESOURCE: -EPERM.
          if (!this.host.capSysResource) throw new IommufdError('EPERM', 'RLIMIT_MODE needs CAP_SYS_RESOURCE', 'op');
          // iommufd_option_rlimit_mode: only before any object exists: -EBUSY.
          if (this.objects.size > 0) throw new IommufdError('EBUSY', 'RLIMIT_MODE can only change while the context has no objects', 'op');
          // iommufd_option_rlimit_mode: 0 (user) or 1 (process), anything else -EINVAL.
          if (value !== 0n && value !== 1n) throw new IommufdError('EINVAL', `RLIMIT_MODE must be 0 or 1, got ${value}`, 'value');
          this.rlimitMode = Number(value);
          return 0n;
        }
        case IommuOption.HUGE_PAGES: {
          const ioas = this.getIoas(objectId, 'objectId');
          if (op === IommuOptionOp.GET) return ioas.hugePages ? 1n : 0n;
          if (op !== IommuOptionOp.SET) throw new IommufdError('EOPNOTSUPP', `unknown option op ${op}`, 'op');
          if (value === 0n) {
            // iopt_disable_large_pages: already off is success, before any other check.
            if (!ioas.hugePages) return 0n;
            // iopt_disable_large_pages: not while HWPTs already map areas: -EINVAL.
            if (ioas.hwpts.size > 0 && ioas.table.mappedPages > 0) {
              throw new IommufdError('EINVAL', 'huge pages cannot be turned off while HWPTs map areas', 'value');
            }
            ioas.hugePages = false;
            return 0n;
          }
          if (value === 1n) {
            ioas.hugePages = true;
            return 0n;
          }
          // iommufd_ioas_option_huge_pages: 0 or 1, anything else -EINVAL.
          throw new IommufdError('EINVAL', `HUGE_PAGES must be 0 or 1, got ${value}`, 'value');
        }
        default:
          // iommufd_option: unknown option_id is -EOPNOTSUPP.
          throw new IommufdError('EOPNOTSUPP', `unknown option ${option}`, 'option');
      }
    });
  }

  /** IOMMU_DESTROY. Devices and accesses are held by their drivers: use deviceUnbind / accessDestroy. */
  destroy(id: number): void {
    this.runNarrowing('destroy', true, () => {
      const obj = this.lookup(id, 'id');
      switch (obj.type) {
        case 'IOAS':
          // iommufd_object_remove: an object others still refer to is -EBUSY.
          if (obj.users > 0) throw new IommufdError('EBUSY', `IOAS ${obj.id} is used by ${obj.hwpts.size} HWPTs and ${obj.accesses.size} accesses`, 'id');
          // A consumer row still translating through it keeps it too.
          if ([...this.consumerRows.values()].includes(obj.id)) throw new IommufdError('EBUSY', `IOAS ${obj.id} is used by a consumer row`, 'id');
          obj.destroy();
          this.objects.remove(obj.id);
          return;
        case 'HWPT_PAGING':
        case 'HWPT_NESTED':
          // iommufd_object_remove: a HWPT with attachments (or, for a parent, nested HWPTs) is -EBUSY.
          if (obj.users > 0) throw new IommufdError('EBUSY', `HWPT ${obj.id} has ${obj.users} users`, 'id');
          if (obj.type === 'HWPT_PAGING') this.removeHwpt(obj);
          else this.removeNested(obj);
          return;
        case 'DEVICE':
        case 'ACCESS':
          // iommufd_object_remove: the driver's own reference keeps it: -EBUSY.
          throw new IommufdError('EBUSY', `${obj.type} ${obj.id} is held by its driver`, 'id');
      }
    });
  }

  /** Closes the context (release of the iommufd file): every object goes, every pin is dropped. */
  close(): void {
    if (this.isClosed) return;
    this.depth++;
    try {
      for (const obj of this.objects.list()) if (obj.type === 'ACCESS') this.destroyAccess(obj);
      for (const row of this.consumerRows.keys()) this.deviceTable.release(row);
      this.consumerRows.clear();
      for (const obj of this.objects.list()) if (obj.type === 'DEVICE') this.unbind(obj);
      for (const obj of this.objects.list()) if (obj.type === 'HWPT_NESTED') this.removeNested(obj);
      for (const obj of this.objects.list()) if (obj.type === 'HWPT_PAGING') this.removeHwpt(obj);
      for (const obj of this.objects.list()) {
        if (obj.type === 'IOAS') {
          obj.destroy();
          this.objects.remove(obj.id);
        }
      }
    } finally {
      this.depth--;
    }
    if (this.quiescence !== undefined) this.settle(true);
    else this.reclaim();
    this.isClosed = true;
    this.host.closed(this);
  }

  get closed(): boolean {
    return this.isClosed;
  }

  // ---- save and restore ----

  /**
   * The context's complete logical state as plain data, for live migration (state.ts has the
   * format). Consumer rows (consumerRowAlloc) are not part of it: they belong to the VMM's worker
   * threads, and the VMM allocates them again for its workers on the destination.
   */
  saveState(): ContextState {
    return this.run('saveState', () => this.captureState());
  }

  private captureState(): ContextState {
    const ioas: IoasState[] = [];
    const hwpts: HwptState[] = [];
    const devices: ContextState['devices'][number][] = [];
    const accesses: ContextState['accesses'][number][] = [];
    for (const o of this.objects.list()) {
      switch (o.type) {
        case 'IOAS':
          ioas.push({
            id: o.id,
            hugePages: o.hugePages,
            levels: o.table.levelCount,
            allowed: o.allowed.map((r) => ({ start: r.start, last: r.last })),
            areas: o.listAreas().map(([start, pages, guestPfn, perms]) => ({
              iova: iovaOf(start),
              length: iovaOf(pages),
              gpa: guestPfn * PAGE_SIZE,
              readable: (perms & EntryFlag.READ) !== 0,
              writeable: (perms & EntryFlag.WRITE) !== 0,
              huge: o.hasHugeLeaf(start, pages),
            })),
            dirty: dirtyRuns(o.table).map(([start, pages]) => ({ iova: iovaOf(start), length: iovaOf(pages) })),
          });
          break;
        case 'HWPT_PAGING':
          hwpts.push({ type: 'HWPT_PAGING', id: o.id, ioas: o.ioas.id, flags: o.flags, auto: o.auto, dirtyTracking: o.dirtyEnabled });
          break;
        case 'HWPT_NESTED':
          hwpts.push({
            type: 'HWPT_NESTED',
            id: o.id,
            parent: o.parent.id,
            flags: o.flags,
            dataType: o.dataType,
            data: encodeVtdS1(BigInt(o.root), o.addrWidth === VTD_ADDR_WIDTH_5LEVEL ? 57 : 48, o.vtdFlags),
          });
          break;
        case 'DEVICE':
          devices.push({
            id: o.id,
            name: o.phys.name,
            attachments: [...o.igroup.attachments]
              .filter(([, a]) => a.devices.has(o))
              .map(([pasid, a]) => ({ pasid, target: targetId(a.target) }))
              .sort((a, b) => a.pasid - b.pasid),
          });
          break;
        case 'ACCESS':
          accesses.push({ id: o.id, ioas: o.ioas.id, pins: o.pins.map((p) => ({ iova: p.iova, length: p.length, flags: p.flags })) });
          break;
      }
    }
    return { version: CONTEXT_STATE_VERSION, rlimitMode: this.rlimitMode, nextObjectId: this.objects.peek(), ioas, hwpts, devices, accesses };
  }

  /**
   * Rebuilds a saved context (saveState, possibly on another host) in this one, which must have no
   * objects (EBUSY). The host must declare the same physical devices and the guest memory must have
   * the same layout. The state is treated as hostile: its shape is checked (EINVAL naming the field),
   * then every object is rebuilt through the context's own operations, at its saved ID, so their
   * checks apply; a failure keeps the operation's errno and names the object. Any failure undoes
   * everything: the context is empty again, and pins and group ownership are as before.
   *
   * Access callbacks cannot be saved: `accessOps(id)` gives each restored access its consumer's;
   * without it a restored access unpins whatever an unmap covers.
   */
  restoreState(state: unknown, options: RestoreOptions = {}): void {
    let unwound = false;
    try {
      this.run('restoreState', () => {
        // Like IOMMU_OPTION_RLIMIT_MODE, only a context without objects can take a whole state.
        if (this.objects.size > 0) throw new IommufdError('EBUSY', 'restoreState needs a context without objects', 'state');
        if (typeof options !== 'object' || options === null || (options.accessOps !== undefined && typeof options.accessOps !== 'function')) {
          throw new IommufdError('EINVAL', 'options.accessOps must be a function', 'options');
        }
        let parsed: ContextState;
        try {
          parsed = parseContextState(state);
        } catch (e) {
          if (e instanceof IommufdError) throw e;
          throw new IommufdError('EINVAL', `state: unreadable (${String(e)})`, 'state');
        }
        const rlimitMode = this.rlimitMode;
        this.restoreLog = [];
        try {
          this.rebuild(parsed, options);
        } catch (e) {
          this.unwindRestore(rlimitMode);
          unwound = true;
          throw e;
        } finally {
          this.restoreLog = undefined;
          this.restoreId = undefined;
        }
      });
    } finally {
      // Rows were written and released again: no worker may keep translating through them.
      if (unwound && this.quiescence !== undefined) this.settle(true);
    }
  }

  /** Creates a parsed state's objects in dependency order, whatever their IDs. */
  private rebuild(s: ContextState, options: RestoreOptions): void {
    // The operation's errno, with the part of the state that failed in the message and argument.
    const step = <T>(field: string, fn: () => T): T => {
      try {
        return fn();
      } catch (e) {
        if (!(e instanceof IommufdError)) throw e;
        throw new IommufdError(e.code, `${field}: ${e.message.slice(e.code.length + 2)}`, field, e.details);
      }
    };
    const at = <T>(id: number, field: string, fn: () => T): T =>
      step(field, () => {
        this.restoreId = id;
        try {
          return fn();
        } finally {
          this.restoreId = undefined;
        }
      });
    const invalid = (field: string, message: string): never => {
      throw new IommufdError('EINVAL', `${field}: ${message}`, field);
    };
    const flag = (on: boolean) => (on ? 1 : 0);

    if (s.rlimitMode !== this.rlimitMode) {
      step('rlimitMode', () => this.option({ option: IommuOption.RLIMIT_MODE, op: IommuOptionOp.SET, value: s.rlimitMode }));
    }

    // IOASes first: everything else refers to them. Areas go in before any HWPT exists, so
    // HUGE_PAGES can be set per area, as each was mapped.
    s.ioas.forEach((st, i) => {
      const f = `ioas[${i}]`;
      at(st.id, f, () => this.ioasAlloc());
      const ioas = this.getIoas(st.id);
      step(`${f}.levels`, () => ioas.growLevels(st.levels));
      step(`${f}.allowed`, () => this.ioasAllowIovas(st.id, st.allowed));
      st.areas.forEach((a, j) => {
        const af = `${f}.areas[${j}]`;
        step(af, () => {
          if (ioas.hugePages !== a.huge) this.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.SET, objectId: st.id, value: flag(a.huge) });
          const perms = (a.readable ? IoasMapFlag.READABLE : 0) | (a.writeable ? IoasMapFlag.WRITEABLE : 0);
          this.ioasMap(st.id, { gpa: a.gpa, length: a.length, iova: a.iova, flags: IoasMapFlag.FIXED_IOVA | perms });
        });
        if (a.huge && !ioas.hasHugeLeaf(pfnOf(a.iova), pfnOf(a.length))) invalid(`${af}.huge`, 'IOVA, GPA and length do not allow a huge leaf');
      });
      if (ioas.hugePages !== st.hugePages) {
        step(`${f}.hugePages`, () => this.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.SET, objectId: st.id, value: flag(st.hugePages) }));
      }
    });

    // Paging HWPTs, then nested ones on them. hwptAlloc only asks its device whether it can track
    // dirty pages, and the device that allocated a HWPT may be gone: any device of the state, or
    // else of the host, that can answer for the flags will do; attaching checks each device again.
    const known = s.devices.map((d) => this.host.findDevice(d.name)).filter((p): p is PhysicalDevice => p !== undefined);
    const candidates = [...known, ...this.host.physicalDevices()];
    s.hwpts.forEach((h, i) => {
      if (h.type !== 'HWPT_PAGING') return;
      const f = `hwpts[${i}]`;
      if (h.auto) {
        // iommufd_device_auto_get_domain's HWPT, at its saved ID; its attachments follow.
        at(h.id, f, () => {
          this.checkIdSpace();
          return this.newHwpt(this.getIoas(h.ioas, 'ioas'), true, 0);
        });
        return;
      }
      const dirty = (h.flags & HwptAllocFlag.DIRTY_TRACKING) !== 0;
      const phys = candidates.find((p) => !dirty || p.dirtyTracking);
      at(h.id, f, () => this.allocHwpt(() => phys, h.ioas, { flags: h.flags }));
    });
    s.hwpts.forEach((h, i) => {
      if (h.type !== 'HWPT_NESTED') return;
      at(h.id, `hwpts[${i}]`, () => this.allocHwpt(() => candidates[0], h.parent, { flags: h.flags, dataType: h.dataType, data: h.data }));
    });

    // Devices, group by group, each bound and attached in an order the group-wide checks accept.
    const groups = new Map<string, RestoreDevice[]>();
    s.devices.forEach((d, index) => {
      const phys = this.host.findDevice(d.name);
      // An unknown device gets a group of its own; deviceBind answers ENODEV for it.
      const key = phys === undefined ? `\0${d.name}` : phys.group;
      const group = groups.get(key) ?? [];
      group.push({ index, state: d, phys });
      groups.set(key, group);
    });
    const dirtyTarget = (t: number | 'identity'): boolean => {
      const h = t === 'identity' ? undefined : this.objects.get(t);
      const paging = h?.type === 'HWPT_PAGING' ? h : h?.type === 'HWPT_NESTED' ? h.parent : undefined;
      return paging?.dirtyTracking === true;
    };
    for (const group of groups.values()) {
      for (const d of bindOrder(group, dirtyTarget)) {
        const f = `devices[${d.index}]`;
        at(d.state.id, f, () => this.deviceBind(d.state.name));
        d.state.attachments.forEach((a, j) => {
          step(`${f}.attachments[${j}]`, () => {
            if (a.target === 'identity') this.deviceSetBypass(d.state.id, a.pasid);
            else this.deviceAttach(d.state.id, a.target, a.pasid);
          });
        });
      }
    }

    s.accesses.forEach((a, i) => {
      const f = `accesses[${i}]`;
      let self: Access | undefined;
      const ops = options.accessOps?.(a.id) ?? this.unpinningOps(() => self);
      at(a.id, f, () => this.accessCreate(a.ioas, ops));
      self = this.getAccess(a.id);
      a.pins.forEach((p, j) => step(`${f}.pins[${j}]`, () => this.accessPin(a.id, p.iova, p.length, p.flags)));
    });

    // Tracking on before the dirty bits: enabling clears the IOAS's bits for a clean start.
    s.hwpts.forEach((h, i) => {
      if (h.type === 'HWPT_PAGING' && h.dirtyTracking) step(`hwpts[${i}].dirtyTracking`, () => this.hwptSetDirtyTracking(h.id, true));
    });
    s.ioas.forEach((st, i) => {
      const ioas = this.getIoas(st.id);
      st.dirty.forEach((d, j) => {
        if (!markDirtyRun(ioas.table, this.pool.words, pfnOf(d.iova), pfnOf(d.iova + d.length - 1n))) {
          invalid(`ioas[${i}].dirty[${j}]`, 'not a run of whole mapped leaves');
        }
      });
    });

    // What was built must save as what was given; anything else is a state no context can be in
    // (levels below what the areas need, dirty runs split, ...).
    const diff = firstDifference(this.captureState(), s);
    if (diff !== undefined) invalid(diff, 'does not come back as saved: no context can be in this state');
  }

  /** A restored access's callbacks until its consumer brings its own: an unmap unpins what it covers. */
  private unpinningOps(self: () => Access | undefined): AccessOps {
    return {
      onUnmap: (iova, length) => {
        const access = self();
        if (access === undefined || this.objects.get(access.id) !== access) return;
        for (const p of [...access.pins]) if (p.iova < iova + length && iova < p.iova + p.length) this.accessUnpin(access.id, p.iova, p.length);
      },
    };
  }

  /** Undoes a failed restore: every object it created goes, newest first, and RLIMIT_MODE returns. */
  private unwindRestore(rlimitMode: number): void {
    for (const obj of [...(this.restoreLog ?? [])].reverse()) {
      // An automatic HWPT has already gone with its last attachment.
      if (this.objects.get(obj.id) !== obj) continue;
      switch (obj.type) {
        case 'ACCESS':
          // The pins were restore's own: dropped without calling the consumer back.
          while (obj.pins.length > 0) this.releasePin(obj, obj.pins.length - 1);
          obj.ioas.accesses.delete(obj);
          this.objects.remove(obj.id);
          break;
        case 'DEVICE':
          this.unbind(obj);
          break;
        case 'HWPT_NESTED':
          this.removeNested(obj);
          break;
        case 'HWPT_PAGING':
          this.removeHwpt(obj);
          break;
        case 'IOAS':
          obj.destroy();
          this.objects.remove(obj.id);
          break;
      }
    }
    this.rlimitMode = rlimitMode;
  }

  // ---- readers ----

  /** The shared buffers device workers map to translate without the owner. */
  describeShared(): SharedTranslation {
    return { pool: this.pool.describe(), devices: this.deviceTable.describe(), memory: this.host.memory.describe() };
  }

  /**
   * A device-table row for a software consumer that runs in another thread (emulator extension).
   * In the kernel an iommufd_access reads its IOAS directly; a consumer in a worker needs a row it
   * can translate through, pointing at the IOAS its access is attached to. Starts blocked; the
   * owner points it with consumerRowSet() and frees it with consumerRowFree().
   */
  consumerRowAlloc(): number {
    return this.run('consumerRowAlloc', () => {
      const row = this.deviceTable.alloc(0, 0);
      this.consumerRows.set(row, undefined);
      return row;
    });
  }

  /**
   * Points a consumer row at an IOAS's table, identity translation, or nothing. Strict like an
   * unmap: when it returns, no worker uses the row's previous translation.
   */
  consumerRowSet(row: number, target: { readonly ioas: number } | 'identity' | 'blocked'): void {
    this.runNarrowing('consumerRowSet', false, () => {
      if (!this.consumerRows.has(row)) throw new IommufdError('ENOENT', `row ${String(row)} is not a consumer row`, 'row');
      if (target === 'identity' || target === 'blocked') {
        this.deviceTable.write(row, target === 'identity' ? AttachKind.IDENTITY : AttachKind.BLOCKED, 0, 0, false);
        this.consumerRows.set(row, undefined);
        return;
      }
      const ioas = this.getIoas(target.ioas);
      this.deviceTable.write(row, AttachKind.PAGING, ioas.table.header, 0, false);
      this.consumerRows.set(row, ioas.id);
    });
  }

  consumerRowFree(row: number): void {
    this.runNarrowing('consumerRowFree', false, () => {
      if (!this.consumerRows.has(row)) throw new IommufdError('ENOENT', `row ${String(row)} is not a consumer row`, 'row');
      this.consumerRows.delete(row);
      this.deviceTable.release(row);
    });
  }

  /** The device-table row of a bound device, for device workers. */
  deviceRow(devId: number): number {
    return this.run('deviceRow', () => this.getDevice(devId).row);
  }

  /**
   * Translates a DMA of `length` bytes at `iova` for (device, PASID), through the same shared-memory
   * reader path device workers use. Returns the GPA spans, or the first fault.
   */
  translate(devId: number, pasid: number, iova: bigint, length: number | bigint, access: 'read' | 'write'): TranslateResult {
    return this.run('translate', () => {
      const dev = this.getDevice(devId);
      const p = pasidArg(pasid);
      const start = u64Arg(iova, 'iova');
      const len = typeof length === 'number' && Number.isSafeInteger(length) ? BigInt(length) : length;
      if (typeof len !== 'bigint' || len <= 0n) throw new IommufdError('EINVAL', 'length must be a positive integer', 'length');
      if (start + len - 1n > U64_MAX) throw new IommufdError('EOVERFLOW', 'iova + length overflows 64 bits', 'length');
      if (access !== 'read' && access !== 'write') throw new IommufdError('EINVAL', "access must be 'read' or 'write'", 'access');
      const write = access === 'write';
      const spans: { gpa: number; length: number }[] = [];
      const leaf = this.leafScratch;
      let pos = start;
      let remaining = len;
      while (remaining > 0n) {
        const r = this.reader.translatePage(dev.row, p, pfnOf(pos), write, this.rowScratch, leaf);
        if (r === PageResult.DOMAIN) return { fault: { reason: 'DOMAIN', iova: pos, access, pasid: p } };
        if (r === PageResult.MAPPING) return { fault: { reason: 'MAPPING', iova: pos, access, pasid: p } };
        if (r === PageResult.PERMISSION) return { fault: { reason: 'PERMISSION', iova: pos, access, pasid: p } };
        if (r === PageResult.STAGE2) return { fault: { reason: 'STAGE2', iova: pos, access, pasid: p } };
        if (write && r === PageResult.OK && (this.rowScratch.flags & DeviceRowFlag.DIRTY_TRACKING) !== 0) this.markWritten(leaf);
        let gpa: number;
        let chunk: bigint;
        if (r === PageResult.IDENTITY) {
          if (pos + remaining > BigInt(GPA_LIMIT)) return { fault: { reason: 'MAPPING', iova: pos, access, pasid: p } };
          gpa = Number(pos);
          chunk = remaining;
        } else {
          const leafStart = iovaOf(leaf.leafPfn);
          const leafEnd = leafStart + (1n << BigInt(leaf.pageShift));
          chunk = leafEnd - pos < remaining ? leafEnd - pos : remaining;
          gpa = leaf.leafGuestPfn * PAGE_SIZE + Number(pos - leafStart);
        }
        const n = Number(chunk);
        const prev = spans[spans.length - 1];
        if (prev !== undefined && prev.gpa + prev.length === gpa) prev.length += n;
        else spans.push({ gpa, length: n });
        pos += chunk;
        remaining -= chunk;
      }
      return { spans };
    });
  }

  /**
   * translate()'s write with dirty tracking on: dirties the leaf it went through, as a device
   * worker's translator does (for a nested row, the stage-2 leaf of the output page).
   */
  private markWritten(leaf: LeafInfo): void {
    const words = this.pool.words;
    if (this.rowScratch.kind === AttachKind.PAGING) {
      markLeafDirty(words, this.rowScratch.header, leaf.leafPfn);
      return;
    }
    const stage1 = readStage1(words, this.rowScratch.header, this.stage1Scratch) ? this.stage1Scratch : undefined;
    // Stage 2's input is stage 1's output page (the walk that just ran left it in the walker),
    // not the final page in `leaf`.
    const walker = this.reader.nestedWalker;
    const s2 = emptyLeafInfo();
    if (stage1 !== undefined && walker !== undefined && walk(words, stage1.stage2, walker.stage1Pfn, s2)) markLeafDirty(words, stage1.stage2, s2.leafPfn);
  }

  /** Cheap counters (no walk of the tables): objects, table memory, device-table rows. */
  stats(): { objects: number; tablesInUse: number; pendingFree: number; poolBytes: number; deviceRows: number } {
    const pool = this.pool.stats();
    return { objects: this.objects.size, tablesInUse: pool.tablesInUse, pendingFree: pool.pendingFree, poolBytes: pool.bytes, deviceRows: this.deviceTable.liveRows };
  }

  /** A canonical plain-data snapshot of every object, area, range, attachment, pin and table count. */
  inspect(): ContextSnapshot {
    const list = this.objects.list();
    const ioases = list.filter((o): o is Ioas => o.type === 'IOAS');
    const hwpts = list.filter((o): o is HwptPaging | HwptNested => o.type === 'HWPT_PAGING' || o.type === 'HWPT_NESTED');
    const devices = list.filter((o): o is BoundDevice => o.type === 'DEVICE');
    const accesses = list.filter((o): o is Access => o.type === 'ACCESS');
    const cmp = (a: bigint, b: bigint) => (a < b ? -1 : a > b ? 1 : 0);
    return {
      serial: this.serial,
      closed: this.isClosed,
      rlimitMode: this.rlimitMode,
      nextObjectId: this.objects.peek(),
      objects: list.map((o) => ({ id: o.id, type: o.type })),
      ioas: ioases.map((ioas) => ({
        id: ioas.id,
        hugePages: ioas.hugePages,
        areas: ioas.listAreas().map(([s, n, g, perms]) => ({
          iova: iovaOf(s),
          length: iovaOf(n),
          gpa: g * PAGE_SIZE,
          readable: (perms & EntryFlag.READ) !== 0,
          writeable: (perms & EntryFlag.WRITE) !== 0,
          accessPins: ioas.areaPins.get(s) ?? 0,
        })),
        reserved: ioas.reserved
          .map((r) => ({ start: r.start, last: r.last, device: r.owner }))
          .sort((a, b) => cmp(a.start, b.start) || cmp(a.last, b.last) || a.device - b.device),
        allowed: ioas.allowed.map((r) => ({ start: r.start, last: r.last })),
        hwpts: [...ioas.hwpts].map((h) => h.id).sort((a, b) => a - b),
        accesses: [...ioas.accesses].map((a) => a.id).sort((a, b) => a - b),
        tables: ioas.table.tableCount,
        levels: ioas.table.levelCount,
      })),
      hwpts: hwpts.map((h) =>
        h.type === 'HWPT_PAGING'
          ? { id: h.id, type: h.type, ioas: h.ioas.id, auto: h.auto, flags: h.flags, users: h.users }
          : {
              id: h.id,
              type: h.type,
              ioas: h.parent.ioas.id,
              auto: false,
              flags: h.flags,
              users: h.users,
              parent: h.parent.id,
              stage1: { root: h.root, addrWidth: h.addrWidth, flags: h.vtdFlags },
            },
      ),
      devices: devices.map((d) => {
        const attachments = [...d.igroup.attachments]
          .filter(([, a]) => a.devices.has(d))
          .map(([pasid, a]) => ({ pasid, target: targetId(a.target) }))
          .sort((a, b) => a.pasid - b.pasid);
        const rows = [[0, d.row] as const, ...[...d.pasidRows].sort((a, b) => a[0] - b[0])].map(([pasid, row]) => {
          const v = this.deviceTable.read(row);
          return { pasid, kind: v.kind, header: v.header, hwpt: v.hwptId };
        });
        return { id: d.id, name: d.phys.name, attachments, rows };
      }),
      groups: [...this.groups.values()]
        .map((g) => ({
          key: g.key,
          devices: [...g.devices].map((d) => d.id).sort((a, b) => a - b),
          attachments: [...g.attachments]
            .map(([pasid, a]) => ({ pasid, target: targetId(a.target), devices: [...a.devices].map((d) => d.id).sort((x, y) => x - y) }))
            .sort((a, b) => a.pasid - b.pasid),
        }))
        .sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0)),
      accesses: accesses.map((a) => ({
        id: a.id,
        ioas: a.ioas.id,
        pins: a.pins.map((p) => ({ iova: p.iova, length: p.length, pages: p.slices.reduce((n, s) => n + s.pages, 0) })),
      })),
      pool: { tablesInUse: this.pool.stats().tablesInUse, pendingFree: this.pool.stats().pendingFree },
      deviceRows: this.deviceTable.liveRows,
    };
  }
}
