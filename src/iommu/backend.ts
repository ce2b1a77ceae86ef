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

export interface IommuBackend {
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
}
