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
  /**
   * What consumes its DMA: a bound device (VFIO-style: it walks the HWPT of the domain it is
   * attached to), or a software consumer (vDPA-style: an iommufd access on the domain's IOAS,
   * read by its worker through a consumer row). Default 'device'.
   */
  readonly consumer?: 'device' | 'access';
}

/** A software consumer endpoint: its row, and the access it holds on the current domain's IOAS. */
interface AccessEndpoint {
  readonly row: number;
  access: number | undefined;
  ioas: number | undefined;
}

/** A domain as this backend keeps it: the HWPT is made when the first bound device attaches. */
interface DomainHandle {
  readonly ioas: number;
  hwpt: number;
}

/**
 * The virtio-iommu model's backend over an iommufd Context: a domain is an IOAS plus a paging
 * HWPT allocated for the first endpoint that attaches; every endpoint is a device bound once to
 * the context. Errors come back as errno names, never thrown.
 */
export class IoasidIommuBackend implements IommuBackend {
  private readonly devIds = new Map<number, number>();
  private readonly accessEps = new Map<number, AccessEndpoint>();
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
      if (ep.consumer === 'access') this.accessEps.set(ep.endpoint, { row: context.consumerRowAlloc(), access: undefined, ioas: undefined });
      else this.devIds.set(ep.endpoint, context.deviceBind(ep.device));
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

  /** Backend device ID of an endpoint bound as a device (undefined for a software consumer). */
  deviceId(endpoint: number): number | undefined {
    return this.devIds.get(endpoint);
  }

  /** The device-table row the endpoint's worker translates through: its device's or its consumer row. */
  translationRow(endpoint: number): number | undefined {
    const dev = this.devIds.get(endpoint);
    if (dev !== undefined) return this.context.deviceRow(dev);
    return this.accessEps.get(endpoint)?.row;
  }

  /** The iommufd access a software-consumer endpoint holds now, if attached to a domain. */
  accessOf(endpoint: number): number | undefined {
    return this.accessEps.get(endpoint)?.access;
  }

  groupSiblings(endpoint: number): readonly number[] {
    return this.siblings.get(endpoint) ?? [];
  }

  reservedRegions(endpoint: number): readonly ReservedRegion[] {
    return this.reserved.get(endpoint) ?? [];
  }

  createPagingDomain(endpoint: number): PagingDomainHandle | Errno {
    const dev = this.devIds.get(endpoint);
    if (dev === undefined && !this.accessEps.has(endpoint)) return 'ENODEV';
    let ioas: number | undefined;
    try {
      ioas = this.context.ioasAlloc();
      // A software consumer needs only the IOAS; a bound device also a HWPT (made here, or when
      // the first device joins a domain a software consumer created).
      const handle: DomainHandle = { ioas, hwpt: dev !== undefined ? this.hwptFor(dev, ioas) : 0 };
      return handle;
    } catch (err) {
      if (ioas !== undefined) this.quietly(() => this.context.destroy(ioas!));
      return this.errno(err, 'createPagingDomain');
    }
  }

  /**
   * A paging HWPT of `ioas` for `dev`. A device with PASIDs may later get PASID attachments next to
   * this RID domain; iommufd requires the RID's HWPT to be PASID-capable for that.
   */
  private hwptFor(dev: number, ioas: number): number {
    const flags = this.context.getHwInfo(dev).maxPasidLog2 > 0 ? HwptAllocFlag.PASID : 0;
    return this.context.hwptAlloc(dev, ioas, { flags });
  }

  destroyPagingDomain(domain: PagingDomainHandle): void {
    // Endpoints were moved off the HWPT first; destroying the IOAS drops its areas and pins.
    if (domain.hwpt !== 0) this.quietly(() => this.context.destroy(domain.hwpt));
    this.quietly(() => this.context.destroy(domain.ioas));
  }

  attachPaging(endpoint: number, domain: PagingDomainHandle): Errno | undefined {
    const consumer = this.accessEps.get(endpoint);
    if (consumer !== undefined) return this.accessTo(endpoint, consumer, domain.ioas);
    return this.call(endpoint, (dev) => {
      const handle = domain as DomainHandle;
      if (handle.hwpt === 0) handle.hwpt = this.hwptFor(dev, handle.ioas);
      this.context.deviceAttach(dev, handle.hwpt);
    });
  }

  attachIdentity(endpoint: number): Errno | undefined {
    const consumer = this.accessEps.get(endpoint);
    if (consumer !== undefined) return this.accessTo(endpoint, consumer, 'identity');
    return this.call(endpoint, (dev) => this.context.deviceSetBypass(dev));
  }

  attachBlocked(endpoint: number): Errno | undefined {
    const consumer = this.accessEps.get(endpoint);
    if (consumer !== undefined) return this.accessTo(endpoint, consumer, 'blocked');
    return this.call(endpoint, (dev) => this.context.deviceDetach(dev));
  }

  /**
   * Moves a software consumer: its row first (strict: when this returns no worker uses the old
   * translation), then its access — a new one on the domain's IOAS, the old one destroyed, as a
   * vDPA device's access follows the domain. The access pins nothing (the worker translates
   * through the row under the quiescence protocol), so its unmap callback has nothing to drop.
   */
  private accessTo(endpoint: number, consumer: AccessEndpoint, target: number | 'identity' | 'blocked'): Errno | undefined {
    if (this.gone.has(endpoint)) return undefined;
    if (typeof target === 'number' && consumer.ioas === target) return undefined;
    try {
      const access = typeof target === 'number' ? this.context.accessCreate(target, { onUnmap: () => undefined }) : undefined;
      try {
        this.context.consumerRowSet(consumer.row, typeof target === 'number' ? { ioas: target } : target);
      } catch (err) {
        if (access !== undefined) this.quietly(() => this.context.accessDestroy(access));
        throw err;
      }
      const old = consumer.access;
      consumer.access = access;
      consumer.ioas = typeof target === 'number' ? target : undefined;
      if (old !== undefined) this.quietly(() => this.context.accessDestroy(old));
      return undefined;
    } catch (err) {
      return this.errno(err, 'access');
    }
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
    const consumer = this.accessEps.get(endpoint);
    if (consumer !== undefined) {
      const errno = this.accessTo(endpoint, consumer, 'blocked');
      this.gone.add(endpoint);
      return errno;
    }
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
