import type { Logger } from '../log/logger.js';
import { HwptAllocFlag, HwptDataType, IoasMapFlag, U64_MAX } from '../ioasid/uapi.js';
import { IommufdError } from '../ioasid/errors.js';
import type { HwptAllocArgs, IoasMapArgs, HwInfo } from '../ioasid/context.js';
import type { Errno, StageOneTable, TableBackend, TableDomainHandle } from './backend.js';

/** One entry of IOMMU_HWPT_INVALIDATE with data type VTD_S1 (struct iommu_hwpt_vtd_s1_invalidate). */
export interface VtdS1Invalidation {
  readonly addr: bigint;
  readonly npages: bigint;
  readonly flags: number;
}

/** IOMMU_VTD_INV_FLAGS_LEAF: only leaf entries changed. */
export const VTD_INV_FLAGS_LEAF = 1;

/** The iommufd operations nesting needs: a Context with nested HWPTs. */
export interface NestingContext {
  ioasAlloc(): number;
  ioasMap(ioasId: number, args: IoasMapArgs): bigint;
  hwptAlloc(devId: number, ptId: number, args?: HwptAllocArgs): number;
  hwptInvalidate(hwptId: number, entries: readonly VtdS1Invalidation[]): number;
  deviceAttach(devId: number, ptId: number, pasid?: number): number;
  deviceDetach(devId: number, pasid?: number): void;
  getHwInfo(devId: number): HwInfo;
  destroy(id: number): void;
}

/** struct iommu_hwpt_vtd_s1: u64 flags, u64 pgtbl_addr, u32 addr_width, u32 reserved (little-endian). */
export function vtdS1Data(table: StageOneTable): Uint8Array {
  const data = new Uint8Array(24);
  const v = new DataView(data.buffer);
  v.setBigUint64(0, 0n, true);
  v.setBigUint64(8, table.rootGpa, true);
  v.setUint32(16, table.addrWidth, true);
  return data;
}

/**
 * Guest-owned tables over an iommufd context: one guest-physical IOAS (all of guest RAM at
 * IOVA = GPA) with a NEST_PARENT paging HWPT is stage 2, built at the first ATTACH_TABLE; each
 * table domain is a nested HWPT (VT-d stage-1 data = the guest's x86-64 table) over it.
 */
export class IoasidTables implements TableBackend {
  private parent: { readonly ioas: number; readonly hwpt: number } | undefined;

  constructor(
    private readonly context: NestingContext,
    private readonly deviceOf: (endpoint: number) => number | undefined,
    private readonly guestRam: readonly { readonly base: number; readonly size: number }[],
    private readonly log: Logger,
    /** The context's objects by ID (type, a HWPT's IOAS, parent and stage-1 table), for checking restored IDs. */
    private readonly objects?: () => {
      readonly types: ReadonlyMap<number, string>;
      readonly hwptIoas: ReadonlyMap<number, { readonly parent: number | undefined; readonly root: bigint | undefined; readonly addrWidth: number | undefined }>;
    },
  ) {}

  /** The guest-physical stage 2, once built (saved with the adapter's state). */
  stage2(): { readonly ioas: number; readonly hwpt: number } | undefined {
    return this.parent;
  }

  /** Migration: the restored context already holds the stage 2 (checked by the caller). */
  adoptStage2(parent: { readonly ioas: number; readonly hwpt: number }): void {
    this.parent = parent;
  }

  restoredTableDomain(hwpt: number, table: StageOneTable): TableDomainHandle | Errno {
    const index = this.objects?.();
    if (index === undefined || this.parent === undefined) return 'ENOENT';
    const h = index.hwptIoas.get(hwpt);
    if (index.types.get(hwpt) !== 'HWPT_NESTED' || h === undefined) return 'ENOENT';
    // The nested HWPT must sit on this stage 2 and walk the very table the domain names.
    if (h.parent !== this.parent.hwpt || h.root !== table.rootGpa || h.addrWidth !== table.addrWidth) return 'EINVAL';
    return { hwpt };
  }

  pasidBits(endpoint: number): number {
    const dev = this.deviceOf(endpoint);
    if (dev === undefined) return 0;
    try {
      return this.context.getHwInfo(dev).maxPasidLog2;
    } catch {
      return 0;
    }
  }

  createTableDomain(endpoint: number, table: StageOneTable): TableDomainHandle | Errno {
    const dev = this.deviceOf(endpoint);
    if (dev === undefined) return 'ENODEV';
    return this.guard('createTableDomain', () => {
      const parent = this.ensureParent(dev);
      const flags = this.pasidBits(endpoint) > 0 ? HwptAllocFlag.PASID : 0;
      return { hwpt: this.context.hwptAlloc(dev, parent.hwpt, { flags, dataType: HwptDataType.VTD_S1, data: vtdS1Data(table) }) };
    });
  }

  destroyTableDomain(domain: TableDomainHandle): void {
    const errno = this.guard('destroyTableDomain', () => this.context.destroy(domain.hwpt));
    if (typeof errno === 'string') this.log.warn({ hwpt: domain.hwpt, errno }, 'table domain clean-up failed');
  }

  attachTable(endpoint: number, pasid: number | undefined, domain: TableDomainHandle): Errno | undefined {
    const dev = this.deviceOf(endpoint);
    if (dev === undefined) return 'ENODEV';
    const r = this.guard('attachTable', () => void this.context.deviceAttach(dev, domain.hwpt, pasid ?? 0));
    return typeof r === 'string' ? r : undefined;
  }

  detachPasid(endpoint: number, pasid: number): Errno | undefined {
    const dev = this.deviceOf(endpoint);
    if (dev === undefined) return 'ENODEV';
    const r = this.guard('detachPasid', () => this.context.deviceDetach(dev, pasid));
    return typeof r === 'string' ? r : undefined;
  }

  invalidate(domain: TableDomainHandle, range: { readonly iova: bigint; readonly length: bigint } | undefined, leafOnly: boolean): Errno | undefined {
    const entry: VtdS1Invalidation =
      range === undefined
        ? { addr: 0n, npages: U64_MAX, flags: 0 }
        : { addr: range.iova, npages: (range.length + 0xfffn) >> 12n, flags: leafOnly ? VTD_INV_FLAGS_LEAF : 0 };
    const r = this.guard('invalidate', () => void this.context.hwptInvalidate(domain.hwpt, [entry]));
    return typeof r === 'string' ? r : undefined;
  }

  /** Stage 2: guest RAM at IOVA = GPA, pinned once, shared by every table domain. */
  private ensureParent(dev: number): { readonly ioas: number; readonly hwpt: number } {
    if (this.parent !== undefined) return this.parent;
    const ioas = this.context.ioasAlloc();
    try {
      const flags = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
      for (const r of this.guestRam) this.context.ioasMap(ioas, { gpa: r.base, length: BigInt(r.size), iova: BigInt(r.base), flags });
      // Not dirty-tracking: VT-d refuses PASID attachments of a nested domain over a dirty-tracking
      // parent (intel_nested_set_dev_pasid), and PASIDs are what table domains are for. Nested
      // DMA is therefore not in the IOMMU's dirty log (docs/migration.md).
      const hwpt = this.context.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT });
      this.parent = { ioas, hwpt };
      this.log.info({ ioas, hwpt }, 'guest-physical stage 2 built for nested translation');
      return this.parent;
    } catch (err) {
      try {
        this.context.destroy(ioas);
      } catch {
        // Nothing more to undo.
      }
      throw err;
    }
  }

  private guard<T>(what: string, fn: () => T): T | Errno {
    try {
      return fn();
    } catch (err) {
      if (err instanceof IommufdError) return err.code;
      this.log.error({ err, what }, 'nested backend operation failed unexpectedly');
      return 'EIO';
    }
  }
}

/** Whether a context has the nested-HWPT operations (the backend grows them over time). */
export function canNest(context: object): context is NestingContext {
  return typeof (context as Partial<NestingContext>).hwptInvalidate === 'function';
}
