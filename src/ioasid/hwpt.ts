import type { ContextObject } from './objects.js';
import type { Ioas } from './ioas.js';
import { HwptAllocFlag } from './uapi.js';

/**
 * A paging HWPT (IOMMUFD_OBJ_HWPT_PAGING): an attachable page table built from an IOAS. Every paging
 * HWPT of an IOAS shares the IOAS's one radix table, so creating one copies nothing and every map
 * reaches all of them at once; the HWPT itself carries only attachment properties.
 */
export class HwptPaging implements ContextObject {
  readonly type = 'HWPT_PAGING' as const;
  /** Attachments (device, PASID) holding this HWPT, plus nested HWPTs built on it. */
  users = 0;
  /** IOMMU_HWPT_SET_DIRTY_TRACKING state: device writers mark the leaves they write. */
  dirtyEnabled = false;

  constructor(
    readonly id: number,
    readonly ioas: Ioas,
    /** Created by attaching a device to an IOAS (destroyed with its last attachment). */
    readonly auto: boolean,
    /** IOMMU_HWPT_ALLOC_NEST_PARENT: may parent a nested HWPT. */
    readonly nestParent: boolean,
    /** IOMMU_HWPT_ALLOC_DIRTY_TRACKING. */
    readonly dirtyTracking: boolean,
    /** IOMMU_HWPT_ALLOC_PASID: may be attached to a PASID. */
    readonly pasidCompat: boolean,
  ) {}

  get flags(): number {
    return (
      (this.nestParent ? HwptAllocFlag.NEST_PARENT : 0) |
      (this.dirtyTracking ? HwptAllocFlag.DIRTY_TRACKING : 0) |
      (this.pasidCompat ? HwptAllocFlag.PASID : 0)
    );
  }
}

/**
 * A nested HWPT (IOMMUFD_OBJ_HWPT_NESTED): a guest-owned x86-64 stage-1 table (VT-d first stage)
 * translated through a paging parent allocated with NEST_PARENT, whose IOAS is stage 2. It holds a
 * reference on the parent (parent.users) for its whole life. Device workers find the stage 1
 * through the shared record at `record` (see stage1-record.ts).
 */
export class HwptNested implements ContextObject {
  readonly type = 'HWPT_NESTED' as const;
  /** Attachments (device, PASID) holding this HWPT. */
  users = 0;

  constructor(
    readonly id: number,
    readonly parent: HwptPaging,
    /** HwptDataType of the stage-1 format (VTD_S1). */
    readonly dataType: number,
    /** IOMMU_HWPT_ALLOC_PASID: may be attached to a PASID. */
    readonly pasidCompat: boolean,
    /** pgtbl_addr: guest-physical address of the stage-1 top table. */
    readonly root: number,
    /** 48 or 57. */
    readonly addrWidth: number,
    /** struct iommu_hwpt_vtd_s1 flags (VtdS1Flag bits). */
    readonly vtdFlags: bigint,
    /** Int32 word index of the shared stage-1 record in the context's table pool. */
    readonly record: number,
  ) {}

  get levels(): 4 | 5 {
    return this.addrWidth === 57 ? 5 : 4;
  }

  get flags(): number {
    return this.pasidCompat ? HwptAllocFlag.PASID : 0;
  }
}

export type Hwpt = HwptPaging | HwptNested;
