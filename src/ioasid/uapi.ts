/**
 * Constants of the iommufd uAPI (include/uapi/linux/iommufd.h) this backend mirrors. Values match
 * the kernel's so traces read the same.
 */

/** IOMMU_IOAS_MAP / IOMMU_IOAS_COPY flags. */
export const IoasMapFlag = {
  FIXED_IOVA: 1 << 0,
  WRITEABLE: 1 << 1,
  READABLE: 1 << 2,
} as const;
export const IOAS_MAP_VALID_FLAGS = IoasMapFlag.FIXED_IOVA | IoasMapFlag.WRITEABLE | IoasMapFlag.READABLE;

/** IOMMU_HWPT_ALLOC flags. */
export const HwptAllocFlag = {
  NEST_PARENT: 1 << 0,
  DIRTY_TRACKING: 1 << 1,
  FAULT_ID_VALID: 1 << 2,
  PASID: 1 << 3,
} as const;

/** IOMMU_HWPT_ALLOC data_type: driver-specific stage-1 formats for nested HWPTs. */
export const HwptDataType = {
  NONE: 0,
  VTD_S1: 1,
  ARM_SMMUV3: 2,
} as const;

/** IOMMU_GET_HW_INFO out_data_type. */
export const HwInfoType = {
  NONE: 0,
  INTEL_VTD: 1,
  ARM_SMMUV3: 2,
} as const;

/** IOMMU_GET_HW_INFO out_capabilities. */
export const HwCap = {
  DIRTY_TRACKING: 1 << 0,
} as const;

/** IOMMU_OPTION option_id / op. */
export const IommuOption = {
  RLIMIT_MODE: 0,
  HUGE_PAGES: 1,
} as const;
export const IommuOptionOp = {
  SET: 0,
  GET: 1,
} as const;

/** iommufd_access_rw / iommufd_access_pin_pages flags (IOMMUFD_ACCESS_RW_*). */
export const AccessRwFlag = {
  READ: 0,
  WRITE: 1 << 0,
  KTHREAD: 1 << 1,
} as const;

/** PASID value that means "the whole device" (the RID): IOMMU_NO_PASID. */
export const IOMMU_NO_PASID = 0;
/** Largest PASID width the PCIe spec allows. */
export const MAX_PASID_BITS = 20;

export const U64_MAX = (1n << 64n) - 1n;
/** Object IDs are allocated like xa_alloc with xa_limit_31b: 1 .. 2^31 - 1. */
export const MAX_OBJECT_ID = 0x7fffffff;
