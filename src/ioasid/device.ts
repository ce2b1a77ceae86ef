import type { ContextObject } from './objects.js';
import type { Hwpt } from './hwpt.js';
import type { PasidDirectory } from './device-table.js';

/** An inclusive IOVA range, as struct iommu_iova_range. */
export interface IovaRange {
  readonly start: bigint;
  readonly last: bigint;
}

/** A physical device the host declares: what a VFIO device would report. */
export interface PhysicalDevice {
  readonly name: string;
  /** Isolation group: devices of one group share translation and one DMA owner. */
  readonly group: string;
  /** IOVA ranges the device cannot use for DMA (e.g. the x86 MSI window), inclusive. */
  readonly reservedRegions: readonly IovaRange[];
  /** PASID width (0: no PASID support). */
  readonly pasidBits: number;
  /** The IOMMU can track dirty pages for this device. */
  readonly dirtyTracking: boolean;
}

/** What translates one (group, PASID): a HWPT or the identity (bypass) translation. */
export type AttachTarget = Hwpt | 'identity';

/** One (group, PASID) attachment and the devices that asked for it (iommufd_attach). */
export interface Attachment {
  target: AttachTarget;
  readonly devices: Set<BoundDevice>;
}

/**
 * The context's view of an isolation group (iommufd_group). Translation is per group, as in
 * hardware: every bound device of the group follows the group's attachment for each PASID.
 */
export class IGroup {
  readonly devices = new Set<BoundDevice>();
  readonly attachments = new Map<number, Attachment>();
  constructor(readonly key: string) {}
}

/** A device bound to a context (IOMMUFD_OBJ_DEVICE). */
export class BoundDevice implements ContextObject {
  readonly type = 'DEVICE' as const;
  /** Device-table rows of this device's PASID attachments (PASID 0 is `row`). */
  readonly pasidRows = new Map<number, number>();
  pasidDirectory: PasidDirectory | undefined;

  constructor(
    readonly id: number,
    readonly phys: PhysicalDevice,
    readonly igroup: IGroup,
    /** Device-table row of the device's RID translation. */
    readonly row: number,
  ) {}
}
