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

/** IOMMU_HWPT_SET_DIRTY_TRACKING flags (enum iommufd_hwpt_set_dirty_tracking_flags). */
export const HwptDirtyTrackingFlag = {
  ENABLE: 1 << 0,
} as const;

/** IOMMU_HWPT_GET_DIRTY_BITMAP flags (enum iommufd_hwpt_get_dirty_bitmap_flags). */
export const HwptGetDirtyBitmapFlag = {
  /** Read the dirty bits without clearing them. */
  NO_CLEAR: 1 << 0,
} as const;

/** IOMMU_HWPT_ALLOC data_type: driver-specific stage-1 formats for nested HWPTs. */
export const HwptDataType = {
  NONE: 0,
  VTD_S1: 1,
  ARM_SMMUV3: 2,
} as const;

/** IOMMU_HWPT_INVALIDATE data_type. */
export const HwptInvalidateDataType = {
  VTD_S1: 0,
} as const;

/** struct iommu_hwpt_vtd_s1 flags (enum iommu_hwpt_vtd_s1_flags); u64 in the struct. */
export const VtdS1Flag = {
  /** Supervisor requests enable. */
  SRE: 1n << 0n,
  /** Extended access flag enable. */
  EAFE: 1n << 1n,
  /** Write protect enable (supervisor writes honour R/W). */
  WPE: 1n << 2n,
} as const;
export const VTD_S1_VALID_FLAGS = VtdS1Flag.SRE | VtdS1Flag.EAFE | VtdS1Flag.WPE;

/** sizeof(struct iommu_hwpt_vtd_s1): u64 flags, u64 pgtbl_addr, u32 addr_width, u32 __reserved. */
export const VTD_S1_DATA_SIZE = 24;
/** struct iommu_hwpt_vtd_s1 addr_width values the VT-d driver accepts (ADDR_WIDTH_4LEVEL / _5LEVEL). */
export const VTD_ADDR_WIDTH_4LEVEL = 48;
export const VTD_ADDR_WIDTH_5LEVEL = 57;

/** struct iommu_hwpt_vtd_s1_invalidate flags (enum iommu_hwpt_vtd_s1_invalidate_flags). */
export const VtdInvalidateFlag = {
  /** Only leaf entries changed: paging-structure caches may be kept. */
  LEAF: 1 << 0,
} as const;

/** IOMMU_GET_HW_INFO out_data_type. */
export const HwInfoType = {
  NONE: 0,
  INTEL_VTD: 1,
  ARM_SMMUV3: 2,
} as const;

/** sizeof(struct iommu_hw_info_vtd): u32 flags, u32 __reserved, u64 cap_reg, u64 ecap_reg. */
export const VTD_HW_INFO_SIZE = 24;

/** Bit positions in the VT-d capability register (drivers/iommu/intel/iommu.h, cap_*). */
export const VtdCap = {
  /** First-stage 1 GiB pages. */
  FL1GP: 56,
  /** First-stage 5-level paging. */
  FL5LP: 60,
} as const;

/** Bit positions in the VT-d extended capability register (drivers/iommu/intel/iommu.h, ecap_*). */
export const VtdEcap = {
  /** Nested translation. */
  NEST: 26,
  /** Supervisor request support. */
  SRS: 31,
  /** Extended accessed flag support. */
  EAFS: 34,
  /** PASID size supported: bits 35..39, the PASID width minus one. */
  PSS_SHIFT: 35,
  PSS_MASK: 0x1f,
  /** PASID support. */
  PASID: 40,
  /** Scalable-mode translation. */
  SMTS: 43,
  /** Second-stage translation. */
  SLTS: 46,
  /** First-stage translation. */
  FLTS: 47,
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
