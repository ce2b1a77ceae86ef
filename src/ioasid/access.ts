import type { ContextObject } from './objects.js';
import type { Ioas } from './ioas.js';

/** Callbacks of a software consumer, as struct iommufd_access_ops. */
export interface AccessOps {
  /**
   * IOVA [iova, iova+length) is being unmapped: unpin every pin inside it before returning
   * (iommufd_access_notify_unmap). Pins left in place make the unmap fail with EDEADLOCK.
   */
  onUnmap(iova: bigint, length: bigint): void;
}

/** The part of one pin that lies in one IOAS area. */
export interface PinSlice {
  /** First page of the area the slice belongs to (the key of the area's pin count). */
  readonly areaStart: number;
  readonly guestPfn: number;
  readonly pages: number;
}

export interface AccessPin {
  readonly iova: bigint;
  readonly length: bigint;
  /** AccessRwFlag bits the pin was taken with (kept so a saved context pins the same way again). */
  readonly flags: number;
  readonly slices: readonly PinSlice[];
}

/** A software consumer of an IOAS (IOMMUFD_OBJ_ACCESS), such as a vDPA-style data path. */
export class Access implements ContextObject {
  readonly type = 'ACCESS' as const;
  readonly pins: AccessPin[] = [];

  constructor(
    readonly id: number,
    readonly ioas: Ioas,
    readonly ops: AccessOps,
  ) {}
}
