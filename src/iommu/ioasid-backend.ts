import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import { Context, HwptAllocFlag, IoasMapFlag, IommufdError, U64_MAX, X86_MSI_WINDOW } from '../ioasid/index.js';
import type { Errno, IommuBackend, Mapping, PagingDomainHandle, ReservedRegion, TableBackend } from './backend.js';
import { IoasidTables, canNest } from './ioasid-tables.js';

/** One endpoint behind the IOMMU: its ID on the virtio side and its device in the backend. */
export interface EndpointBinding {
  readonly endpoint: number;
  /** Name of the physical device in the IommufdHost. */
  readonly device: string;
  /** The device's reserved IOVA ranges (as declared on the host), for PROBE. */
  readonly reservedRegions: readonly (readonly [bigint, bigint])[];
  /** Its isolation group as declared on the host (default: a group of its own). */
  readonly group?: number | string;
}

/**
 * The virtio-iommu model's backend over an iommufd Context: a domain is an IOAS plus a paging
 * HWPT allocated for the first endpoint that attaches; every endpoint is a device bound once to
 * the context. Errors come back as errno names, never thrown.
 */
export class IoasidIommuBackend implements IommuBackend {
  private readonly devIds = new Map<number, number>();
  private readonly reserved = new Map<number, readonly ReservedRegion[]>();
  private readonly siblings = new Map<number, readonly number[]>();
  /** Endpoints whose device is gone (its worker died): nothing of theirs reaches the backend. */
  private readonly gone = new Set<number>();
  private readonly log: Logger;

  /** Guest-owned stage-1 tables, when a guest RAM layout was given and the context can nest. */
  readonly tables: TableBackend | undefined;

  constructor(
    readonly context: Context,
    endpoints: readonly EndpointBinding[],
    log: Logger = silentLogger,
    /** Guest RAM regions: the guest-physical stage 2 under guest-owned tables. */
    guestRam?: readonly { readonly base: number; readonly size: number }[],
  ) {
    this.log = log;
    this.tables = guestRam !== undefined && canNest(context) ? new IoasidTables(context, (ep) => this.devIds.get(ep), guestRam, log) : undefined;
    for (const ep of endpoints) {
      const mates = ep.group === undefined ? [] : endpoints.filter((o) => o !== ep && o.group === ep.group).map((o) => o.endpoint);
      this.siblings.set(ep.endpoint, mates);
    }
    for (const ep of endpoints) {
      this.devIds.set(ep.endpoint, context.deviceBind(ep.device));
      this.reserved.set(
        ep.endpoint,
        ep.reservedRegions.map(([start, end]) => ({
          start,
          end,
          // The x86 interrupt window is an MSI doorbell to the guest (RESV_MEM_T_MSI).
          kind: start === X86_MSI_WINDOW[0] && end === X86_MSI_WINDOW[1] ? 'msi' : 'reserved',
        })),
      );
    }
  }

  /** Backend device ID of an endpoint (for consumers that attach their translators). */
  deviceId(endpoint: number): number | undefined {
    return this.devIds.get(endpoint);
  }

  groupSiblings(endpoint: number): readonly number[] {
    return this.siblings.get(endpoint) ?? [];
  }

  reservedRegions(endpoint: number): readonly ReservedRegion[] {
    return this.reserved.get(endpoint) ?? [];
  }

  createPagingDomain(endpoint: number): PagingDomainHandle | Errno {
    const dev = this.devIds.get(endpoint);
    if (dev === undefined) return 'ENODEV';
    let ioas: number | undefined;
    try {
      ioas = this.context.ioasAlloc();
      // A device with PASIDs may later get PASID attachments next to this RID domain; iommufd
      // requires the RID's HWPT to be allocated PASID-capable for that (iommufd_hwpt_pasid_compat).
      const flags = this.context.getHwInfo(dev).maxPasidLog2 > 0 ? HwptAllocFlag.PASID : 0;
      const hwpt = this.context.hwptAlloc(dev, ioas, { flags });
      return { ioas, hwpt };
    } catch (err) {
      if (ioas !== undefined) this.quietly(() => this.context.destroy(ioas!));
      return this.errno(err, 'createPagingDomain');
    }
  }

  destroyPagingDomain(domain: PagingDomainHandle): void {
    // Endpoints were moved off the HWPT first; destroying the IOAS drops its areas and pins.
    this.quietly(() => this.context.destroy(domain.hwpt));
    this.quietly(() => this.context.destroy(domain.ioas));
  }

  attachPaging(endpoint: number, domain: PagingDomainHandle): Errno | undefined {
    return this.call(endpoint, (dev) => void this.context.deviceAttach(dev, domain.hwpt));
  }

  attachIdentity(endpoint: number): Errno | undefined {
    return this.call(endpoint, (dev) => this.context.deviceSetBypass(dev));
  }

  attachBlocked(endpoint: number): Errno | undefined {
    return this.call(endpoint, (dev) => this.context.deviceDetach(dev));
  }

  map(domain: PagingDomainHandle, iova: bigint, length: bigint, gpa: number, read: boolean, write: boolean): Errno | undefined {
    // iommufd has no mapping that grants neither access; such a MAP is refused as invalid.
    if (!read && !write) return 'EINVAL';
    const flags = IoasMapFlag.FIXED_IOVA | (read ? IoasMapFlag.READABLE : 0) | (write ? IoasMapFlag.WRITEABLE : 0);
    try {
      this.context.ioasMap(domain.ioas, { gpa, length, iova, flags });
      return undefined;
    } catch (err) {
      return this.errno(err, 'map');
    }
  }

  mappingsIn(domain: PagingDomainHandle, start: bigint, end: bigint): readonly Mapping[] {
    return this.context.ioasAreasIn(domain.ioas, start, end).map((a) => ({ start: a.iova, end: a.iova + a.length - 1n }));
  }

  unmap(domain: PagingDomainHandle, start: bigint, end: bigint): Errno | undefined {
    try {
      if (start === 0n && end === U64_MAX) this.context.ioasUnmap(domain.ioas, 0n, U64_MAX);
      else this.context.ioasUnmap(domain.ioas, start, end - start + 1n);
      return undefined;
    } catch (err) {
      return this.errno(err, 'unmap');
    }
  }

  /**
   * The endpoint's device has gone away (its worker crashed or was terminated): it is detached now,
   * and later attachment changes for it succeed without touching the backend, so the guest's
   * domain bookkeeping (and the other endpoints) carry on as if it were merely quiet.
   */
  markGone(endpoint: number): Errno | undefined {
    const dev = this.devIds.get(endpoint);
    if (dev === undefined) return 'ENODEV';
    this.gone.add(endpoint);
    try {
      this.context.deviceDetach(dev);
      return undefined;
    } catch (err) {
      return this.errno(err, 'markGone');
    }
  }

  isGone(endpoint: number): boolean {
    return this.gone.has(endpoint);
  }

  private call(endpoint: number, fn: (dev: number) => void): Errno | undefined {
    const dev = this.devIds.get(endpoint);
    if (dev === undefined) return 'ENODEV';
    if (this.gone.has(endpoint)) return undefined;
    try {
      fn(dev);
      return undefined;
    } catch (err) {
      return this.errno(err, 'attach');
    }
  }

  private errno(err: unknown, what: string): Errno {
    if (err instanceof IommufdError) return err.code;
    // Not an iommufd error: a bug on the host side. Logged loudly, reported as a device error.
    this.log.error({ err, what }, 'backend operation failed unexpectedly');
    return 'EIO';
  }

  private quietly(fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.log.warn({ err }, 'backend clean-up failed');
    }
  }
}
