/**
 * What the virtio-iommu model needs from the ioasid backend, in the model's own terms. The one
 * implementation (./ioasid-backend.ts) turns each call into iommufd operations on a Context; the
 * narrow interface keeps the request handling readable and lets tests count backend calls.
 *
 * Errors come back as errno names (iommufd's vocabulary), never as exceptions.
 */
export type Errno = string;

export interface ReservedRegion {
  readonly start: bigint;
  readonly end: bigint;
  /** MSI doorbell (virtio RESV_MEM_T_MSI) or plain reserved (RESV_MEM_T_RESERVED). */
  readonly kind: 'msi' | 'reserved';
}

export interface Mapping {
  readonly start: bigint;
  /** Inclusive. */
  readonly end: bigint;
}

/** Opaque backend handle for one paging domain (an IOAS and the HWPT built from it). */
export interface PagingDomainHandle {
  readonly ioas: number;
  readonly hwpt: number;
}

/** A guest-owned stage-1 table: an x86-64 page table in guest memory. */
export interface StageOneTable {
  /** GPA of the root table (4 KiB aligned). */
  readonly rootGpa: bigint;
  /** 48: 4 levels; 57: 5 levels. */
  readonly addrWidth: 48 | 57;
}

/** Opaque backend handle for a table domain (a nested HWPT over the guest-physical space). */
export interface TableDomainHandle {
  readonly hwpt: number;
}

/**
 * Nested translation for the ATTACH_TABLE extension: stage 1 is the guest's own table, stage 2
 * the guest-physical address space the host keeps for it. Optional: a backend without nesting
 * leaves it out and the device does not offer the feature.
 */
export interface TableBackend {
  /** PASID width of the endpoint's device (0: no PASIDs). */
  pasidBits(endpoint: number): number;
  createTableDomain(endpoint: number, table: StageOneTable): TableDomainHandle | Errno;
  destroyTableDomain(domain: TableDomainHandle): void;
  /** Attaches the endpoint's RID traffic (pasid undefined) or one PASID to the table domain, replacing what was there. */
  attachTable(endpoint: number, pasid: number | undefined, domain: TableDomainHandle): Errno | undefined;
  /** Removes the endpoint's attachment at `pasid`; its DMA with that PASID faults afterwards. */
  detachPasid(endpoint: number, pasid: number): Errno | undefined;
  /**
   * Drops cached stage-1 translations of the domain: all of them, or those of [iova, iova + length).
   * Completes only when no device can still use a dropped entry (strict, like unmap).
   */
  invalidate(domain: TableDomainHandle, range: { readonly iova: bigint; readonly length: bigint } | undefined, leafOnly: boolean): Errno | undefined;
  /**
   * Migration: the handle of a table domain the backend restored with its other objects, after
   * checking that `hwpt` is a nested HWPT over this backend's stage 2 with that very table;
   * an errno otherwise.
   */
  restoredTableDomain(hwpt: number, table: StageOneTable): TableDomainHandle | Errno;
}

export interface IommuBackend {
  /** Nested translation (ATTACH_TABLE extension), when the backend has it. */
  readonly tables?: TableBackend;
  /**
   * The other endpoints in `endpoint`'s isolation group: devices the host cannot isolate from
   * each other, which therefore always share one translation.
   */
  groupSiblings(endpoint: number): readonly number[];
  /** Reserved IOVA ranges of an endpoint's device (PROBE RESV_MEM properties). */
  reservedRegions(endpoint: number): readonly ReservedRegion[];
  /** A fresh paging domain for `endpoint` to attach to first, or an errno (e.g. ENOMEM at a limit). */
  createPagingDomain(endpoint: number): PagingDomainHandle | Errno;
  destroyPagingDomain(domain: PagingDomainHandle): void;
  /** Attach the endpoint's device to the domain, replacing any attachment atomically. */
  attachPaging(endpoint: number, domain: PagingDomainHandle): Errno | undefined;
  /** Identity translation (bypass). */
  attachIdentity(endpoint: number): Errno | undefined;
  /**
   * Takes the endpoint out of its group's attachment. With no sibling attached, the group is
   * blocked (every DMA faults); otherwise the endpoint keeps the group's translation.
   */
  attachBlocked(endpoint: number): Errno | undefined;
  map(domain: PagingDomainHandle, iova: bigint, length: bigint, gpa: number, read: boolean, write: boolean, mmio: boolean): Errno | undefined;
  /** Mappings (IOAS areas) that intersect [start, end], in IOVA order. */
  mappingsIn(domain: PagingDomainHandle, start: bigint, end: bigint): readonly Mapping[];
  /** Removes whole mappings inside [start, end]; completes only after strict-unmap quiescence. */
  unmap(domain: PagingDomainHandle, start: bigint, end: bigint): Errno | undefined;
  /**
   * Migration: the handle of a paging domain the backend restored with its other objects, after
   * checking that `ioas` is an IOAS no other domain uses and `hwpt` (0: none yet) a paging HWPT of
   * it; an errno otherwise. Both IDs come from a saved image: hostile until checked.
   */
  restoredPagingDomain(ioas: number, hwpt: number): PagingDomainHandle | Errno;
  /** Migration: the device has taken over its saved state (or failed to); restore-time caches go. */
  endRestore?(): void;
}
