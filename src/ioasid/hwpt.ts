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
 * A nested HWPT (IOMMUFD_OBJ_HWPT_NESTED): a guest-owned stage-1 table translated through a paging
 * parent. Declared so attachments and the device table can name it; allocation is not implemented
 * yet (hwptAlloc answers EOPNOTSUPP for stage-1 data types).
 */
export interface HwptNested extends ContextObject {
  readonly type: 'HWPT_NESTED';
  readonly parent: HwptPaging;
  /** HwptDataType of the stage-1 format. */
  readonly dataType: number;
  readonly pasidCompat: boolean;
  users: number;
}

export type Hwpt = HwptPaging | HwptNested;
