/**
 * Wire layouts of the virtio-iommu device (virtio 1.2 §5.13; Linux include/uapi/linux/virtio_iommu.h).
 * One table per structure; every field access takes its offset and size from here.
 */

export const IOMMU_DEVICE_TYPE = 23;

/** Queue indices (virtio 1.2 §5.13.2). */
export const IommuQueue = { REQUEST: 0, EVENT: 1 } as const;

/** Device-specific feature bits (virtio 1.2 §5.13.3). */
export const IommuFeature = {
  INPUT_RANGE: 0,
  DOMAIN_RANGE: 1,
  MAP_UNMAP: 2,
  BYPASS: 3,
  PROBE: 4,
  MMIO: 5,
  BYPASS_CONFIG: 6,
  /**
   * Extension (the virtio-iommu page-table draft's bit): guest-owned stage-1 tables attached with
   * ATTACH_TABLE, invalidated with INVALIDATE, per PASID. docs/nested.md has the wire layout.
   */
  ATTACH_TABLE: 7,
} as const;
export type IommuFeatureName = keyof typeof IommuFeature;

/** struct virtio_iommu_config. */
export const IommuConfig = {
  pageSizeMask: { offset: 0, size: 8 },
  inputRangeStart: { offset: 8, size: 8 },
  inputRangeEnd: { offset: 16, size: 8 },
  domainRangeStart: { offset: 24, size: 4 },
  domainRangeEnd: { offset: 28, size: 4 },
  probeSize: { offset: 32, size: 4 },
  bypass: { offset: 36, size: 1 },
  SIZE: 40,
} as const;

/** Request types (virtio_iommu_req_head.type). */
export const RequestType = {
  ATTACH: 1,
  DETACH: 2,
  MAP: 3,
  UNMAP: 4,
  /** Extension (ATTACH_TABLE feature). */
  ATTACH_TABLE: 6,
  /** Extension (ATTACH_TABLE feature). */
  INVALIDATE: 7,
  PROBE: 5,
} as const;

/** Status codes written to virtio_iommu_req_tail.status. */
export const Status = {
  OK: 0,
  IOERR: 1,
  UNSUPP: 2,
  DEVERR: 3,
  INVAL: 4,
  RANGE: 5,
  NOENT: 6,
  FAULT: 7,
  NOMEM: 8,
} as const;
export type Status = (typeof Status)[keyof typeof Status];
export const STATUS_NAMES = ['OK', 'IOERR', 'UNSUPP', 'DEVERR', 'INVAL', 'RANGE', 'NOENT', 'FAULT', 'NOMEM'] as const;
export type StatusName = (typeof STATUS_NAMES)[number];

export const ReqHead = {
  type: { offset: 0, size: 1 },
  reserved: { offset: 1, size: 3 },
  SIZE: 4,
} as const;

export const ReqTail = {
  status: { offset: 0, size: 1 },
  reserved: { offset: 1, size: 3 },
  SIZE: 4,
} as const;

/** Device-readable part of each request, head included (the tail is the writable part). */
export const AttachReq = {
  domain: { offset: 4, size: 4 },
  endpoint: { offset: 8, size: 4 },
  flags: { offset: 12, size: 4 },
  reserved: { offset: 16, size: 4 },
  SIZE: 20,
} as const;

export const DetachReq = {
  domain: { offset: 4, size: 4 },
  endpoint: { offset: 8, size: 4 },
  reserved: { offset: 12, size: 8 },
  SIZE: 20,
} as const;

export const MapReq = {
  domain: { offset: 4, size: 4 },
  virtStart: { offset: 8, size: 8 },
  virtEnd: { offset: 16, size: 8 },
  physStart: { offset: 24, size: 8 },
  flags: { offset: 32, size: 4 },
  SIZE: 36,
} as const;

export const UnmapReq = {
  domain: { offset: 4, size: 4 },
  virtStart: { offset: 8, size: 8 },
  virtEnd: { offset: 16, size: 8 },
  reserved: { offset: 24, size: 4 },
  SIZE: 28,
} as const;

export const ProbeReq = {
  endpoint: { offset: 4, size: 4 },
  reserved: { offset: 8, size: 64 },
  SIZE: 72,
} as const;

/**
 * DETACH with ATTACH_TABLE negotiated: the first reserved bytes carry a PASID (the base spec's
 * device ignores them, so a driver without the feature keeps them zero and nothing changes).
 */
export const DetachPasidReq = {
  flags: { offset: 12, size: 4 },
  pasid: { offset: 16, size: 4 },
} as const;
export const DetachFlag = { PASID: 1 } as const;

/**
 * struct virtio_iommu_req_attach_table (the draft's shape: domain, endpoint, format, a 111-byte
 * format-specific descriptor). For format INTEL_PT (x86-64 first-stage tables) the descriptor is
 * ours, written down in docs/nested.md.
 */
export const AttachTableReq = {
  domain: { offset: 4, size: 4 },
  endpoint: { offset: 8, size: 4 },
  format: { offset: 12, size: 1 },
  reserved0: { offset: 13, size: 3 },
  /** AttachTableFlag bits. */
  flags: { offset: 16, size: 4 },
  /** With AttachTableFlag.PASID: the PASID the table serves; otherwise the endpoint's RID traffic. */
  pasid: { offset: 20, size: 4 },
  /** Guest-physical address of the stage-1 root table (4 KiB aligned). */
  pgtbl: { offset: 24, size: 8 },
  /** Input address width: 48 (4 levels) or 57 (5 levels). */
  addrWidth: { offset: 32, size: 1 },
  reserved1: { offset: 33, size: 91 },
  SIZE: 124,
} as const;
export const AttachTableFormat = { ARM_SMMU3: 1, INTEL_PT: 2 } as const;
export const AttachTableFlag = { PASID: 1 } as const;

/** struct virtio_iommu_req_invalidate (draft layout). */
export const InvalidateReq = {
  scope: { offset: 4, size: 1 },
  caches: { offset: 5, size: 1 },
  flags: { offset: 6, size: 2 },
  domain: { offset: 8, size: 4 },
  pasid: { offset: 12, size: 4 },
  id: { offset: 16, size: 8 },
  address: { offset: 24, size: 8 },
  nrPages: { offset: 32, size: 8 },
  pageSize: { offset: 40, size: 1 },
  reserved: { offset: 41, size: 19 },
  SIZE: 60,
} as const;
/** What an INVALIDATE covers: the whole domain, one PASID of it, or an address range. */
export const InvalidateScope = { DOMAIN: 1, PASID: 2, ADDRESS: 3 } as const;
export const InvalidateCache = { PASID: 1, TLB: 2 } as const;
export const InvalidateFlag = { LEAF: 1, PASID: 2, ID: 4, GLOBAL: 8 } as const;

export const AttachFlag = { BYPASS: 1 } as const;
export const MapFlag = { READ: 1, WRITE: 2, MMIO: 4 } as const;

/** struct virtio_iommu_probe_property header; the value follows. */
export const ProbeProperty = {
  type: { offset: 0, size: 2 },
  length: { offset: 2, size: 2 },
  SIZE: 4,
  TYPE_MASK: 0x0fff,
} as const;

export const ProbePropertyType = { NONE: 0, RESV_MEM: 1, HW_INTEL_VTD: 3 } as const;

/**
 * PROBE property HW_INTEL_VTD (type from the page-table draft; the value is ours): what the
 * endpoint's stage-1 support is. Present only with ATTACH_TABLE negotiated.
 */
export const ProbeHwIntelVtd = {
  /** PASID width in bits (0: RID traffic only). */
  pasidBits: { offset: 4, size: 1 },
  /** Bit 0: 48-bit (4-level) tables; bit 1: 57-bit (5-level). */
  addrWidths: { offset: 5, size: 1 },
  reserved: { offset: 6, size: 2 },
  /** Bit 0: hardware sets accessed/dirty bits in stage-1 entries. */
  caps: { offset: 8, size: 8 },
  SIZE: 16,
  VALUE_LENGTH: 12,
} as const;

/** struct virtio_iommu_probe_resv_mem (header included). */
export const ProbeResvMem = {
  subtype: { offset: 4, size: 1 },
  reserved: { offset: 5, size: 3 },
  start: { offset: 8, size: 8 },
  end: { offset: 16, size: 8 },
  SIZE: 24,
  /** Value of the header's length field: the property without its 4-byte header. */
  VALUE_LENGTH: 20,
} as const;

export const ResvMemSubtype = { RESERVED: 0, MSI: 1 } as const;

/** struct virtio_iommu_fault: one event-queue record. */
export const FaultRecord = {
  reason: { offset: 0, size: 1 },
  reserved: { offset: 1, size: 3 },
  flags: { offset: 4, size: 4 },
  endpoint: { offset: 8, size: 4 },
  /** With FaultFlag.PASID (extension): the PASID the faulting DMA carried; zero otherwise. */
  pasid: { offset: 12, size: 4 },
  address: { offset: 16, size: 8 },
  SIZE: 24,
} as const;

export const FaultReason = { UNKNOWN: 0, DOMAIN: 1, MAPPING: 2 } as const;
export const FaultFlag = { READ: 1, WRITE: 2, EXEC: 4, ADDRESS: 0x100, PASID: 0x200 } as const;
