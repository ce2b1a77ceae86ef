import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import { Context, HwCap, HwptAllocFlag, IoasMapFlag, IommufdError, U64_MAX, X86_MSI_WINDOW, type AreaSnapshot } from '../ioasid/index.js';
import type { Errno, IommuBackend, Mapping, PagingDomainHandle, ReservedRegion, TableBackend } from './backend.js';
import { IoasidTables, canNest } from './ioasid-tables.js';
import { StateError, list, record, u32 } from './state.js';

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
  /** Where its row points: the IOAS of `access`, identity, or nowhere. */
  mode: 'ioas' | 'identity' | 'blocked';
}

/**
 * What this adapter adds to the backend's own state for a migration: which backend objects are
 * whose. Object IDs are the context's, restored unchanged; consumer rows are not saved (the
 * destination's workers get fresh ones).
 */
export type BackendAdapterState = {
  readonly devices: readonly { readonly endpoint: number; readonly device: number }[];
  readonly accesses: readonly { readonly endpoint: number; readonly access: number | null; readonly ioas: number | null; readonly mode: 'ioas' | 'identity' | 'blocked' }[];
  readonly gone: readonly number[];
  /** The guest-physical stage 2 of table domains, once built. */
  readonly stage2: { readonly ioas: number; readonly hwpt: number } | null;
};

/** The context's objects by ID, for checking IDs from an image. */
interface ObjectIndex {
  readonly types: ReadonlyMap<number, string>;
  readonly deviceNames: ReadonlyMap<number, string>;
  readonly hwptIoas: ReadonlyMap<
    number,
    { readonly ioas: number; readonly flags: number; readonly parent: number | undefined; readonly root: bigint | undefined; readonly addrWidth: number | undefined }
  >;
  readonly accessIoas: ReadonlyMap<number, number>;
}

function indexObjects(context: Context): ObjectIndex {
  const snap = context.inspect();
  return {
    types: new Map(snap.objects.map((o) => [o.id, o.type])),
    deviceNames: new Map(snap.devices.map((d) => [d.id, d.name])),
    hwptIoas: new Map(snap.hwpts.map((h) => [h.id, { ioas: h.ioas, flags: h.flags, parent: h.parent, root: h.stage1 !== undefined ? BigInt(h.stage1.root) : undefined, addrWidth: h.stage1?.addrWidth }])),
    accessIoas: new Map(snap.accesses.map((a) => [a.id, a.ioas])),
  };
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
  /** While restoring: the restored context's objects, indexed once. */
  private index: ObjectIndex | undefined;
  /** Live paging domains, for dirty tracking. */
  private readonly paging = new Set<DomainHandle>();
  /** Dirty tracking is on for every paging HWPT (migration in progress). */
  private tracking = false;
  /** Paging HWPTs of domains allocated with DIRTY_TRACKING. */
  private readonly trackable = new Set<number>();
  /** Guest pages DMA dirtied in mappings that were unmapped since the last dirtyPages(). */
  private readonly harvested = new Set<number>();

  /** Guest-owned stage-1 tables, when a guest RAM layout was given and the context can nest. */
  readonly tables: TableBackend | undefined;

  constructor(
    readonly context: Context,
    endpoints: readonly EndpointBinding[],
    log: Logger = silentLogger,
    /** Guest RAM regions: the guest-physical stage 2 under guest-owned tables. */
    guestRam?: readonly { readonly base: number; readonly size: number }[],
    /**
     * Migration: the context was restored from an image (restoreState) and this is the adapter's
     * saved part; the devices are bound already, so nothing is bound again. Checked against the
     * context; StateError if it does not fit.
     */
    restored?: unknown,
  ) {
    this.log = log;
    this.tables =
      guestRam !== undefined && canNest(context) ? new IoasidTables(context, (ep) => this.devIds.get(ep), guestRam, log, () => this.objectIndex()) : undefined;
    for (const ep of endpoints) {
      const mates = ep.group === undefined ? [] : endpoints.filter((o) => o !== ep && o.group === ep.group).map((o) => o.endpoint);
      this.siblings.set(ep.endpoint, mates);
    }
    if (restored !== undefined) this.adopt(endpoints, restored);
    for (const ep of endpoints) {
      if (restored === undefined) {
        if (ep.consumer === 'access') this.accessEps.set(ep.endpoint, { row: context.consumerRowAlloc(), access: undefined, ioas: undefined, mode: 'blocked' });
        else this.devIds.set(ep.endpoint, context.deviceBind(ep.device));
      }
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

  /** Binds the endpoints to the objects a restored context already holds. */
  private adopt(endpoints: readonly EndpointBinding[], raw: unknown): void {
    const s = record(raw, 'adapter');
    const index = indexObjects(this.context);
    this.index = index;
    const byEndpoint = new Map(endpoints.map((ep) => [ep.endpoint, ep]));
    const seen = new Set<number>();
    const endpointOf = (v: unknown, field: string, consumer: 'device' | 'access'): EndpointBinding => {
      const ep = byEndpoint.get(u32(v, field));
      if (ep === undefined || (ep.consumer ?? 'device') !== consumer) throw new StateError(field, `no ${consumer} endpoint ${String(v)} here`);
      if (seen.has(ep.endpoint)) throw new StateError(field, `endpoint ${ep.endpoint} appears twice`);
      seen.add(ep.endpoint);
      return ep;
    };
    const devIds = new Map<number, number>();
    for (const [i, d] of list(s.devices, 'adapter.devices', endpoints.length).entries()) {
      const o = record(d, `adapter.devices[${i}]`);
      const ep = endpointOf(o.endpoint, `adapter.devices[${i}].endpoint`, 'device');
      const dev = u32(o.device, `adapter.devices[${i}].device`);
      if (index.deviceNames.get(dev) !== ep.device) throw new StateError(`adapter.devices[${i}].device`, `object ${dev} is not the bound device '${ep.device}'`);
      devIds.set(ep.endpoint, dev);
    }
    const accesses: { endpoint: number; access: number | undefined; ioas: number | undefined; mode: AccessEndpoint['mode'] }[] = [];
    for (const [i, a] of list(s.accesses, 'adapter.accesses', endpoints.length).entries()) {
      const f = `adapter.accesses[${i}]`;
      const o = record(a, f);
      const ep = endpointOf(o.endpoint, `${f}.endpoint`, 'access');
      if (o.mode !== 'ioas' && o.mode !== 'identity' && o.mode !== 'blocked') throw new StateError(`${f}.mode`, "must be 'ioas', 'identity' or 'blocked'");
      if (o.mode === 'ioas') {
        const access = u32(o.access, `${f}.access`);
        const ioas = u32(o.ioas, `${f}.ioas`);
        if (index.accessIoas.get(access) !== ioas) throw new StateError(`${f}.access`, `object ${access} is not an access on IOAS ${ioas}`);
        accesses.push({ endpoint: ep.endpoint, access, ioas, mode: 'ioas' });
      } else {
        if (o.access !== null || o.ioas !== null) throw new StateError(f, `an endpoint in ${o.mode} mode holds no access`);
        accesses.push({ endpoint: ep.endpoint, access: undefined, ioas: undefined, mode: o.mode });
      }
    }
    const missing = endpoints.filter((ep) => !seen.has(ep.endpoint));
    if (missing.length > 0) throw new StateError('adapter', `endpoints ${missing.map((ep) => ep.endpoint).join(', ')} are missing`);
    const gone = list(s.gone, 'adapter.gone', endpoints.length).map((g, i) => {
      const ep = u32(g, `adapter.gone[${i}]`);
      if (!byEndpoint.has(ep)) throw new StateError(`adapter.gone[${i}]`, `endpoint ${ep} does not exist`);
      return ep;
    });
    let stage2: { ioas: number; hwpt: number } | undefined;
    if (s.stage2 !== null) {
      const o = record(s.stage2, 'adapter.stage2');
      const ioas = u32(o.ioas, 'adapter.stage2.ioas');
      const hwpt = u32(o.hwpt, 'adapter.stage2.hwpt');
      if (this.tables === undefined) throw new StateError('adapter.stage2', 'this backend has no nested translation');
      if (index.types.get(ioas) !== 'IOAS' || index.types.get(hwpt) !== 'HWPT_PAGING' || index.hwptIoas.get(hwpt)?.ioas !== ioas) {
        throw new StateError('adapter.stage2', `IOAS ${ioas} / HWPT ${hwpt} are not a paging HWPT and its IOAS`);
      }
      stage2 = { ioas, hwpt };
    }
    // Checked. Software consumers get fresh rows pointing where theirs pointed.
    const rows: number[] = [];
    try {
      for (const a of accesses) {
        const row = this.context.consumerRowAlloc();
        rows.push(row);
        this.context.consumerRowSet(row, a.mode === 'ioas' ? { ioas: a.ioas! } : a.mode);
        this.accessEps.set(a.endpoint, { row, access: a.access, ioas: a.ioas, mode: a.mode });
      }
    } catch (err) {
      for (const row of rows) this.quietly(() => this.context.consumerRowFree(row));
      this.accessEps.clear();
      throw new StateError('adapter.accesses', `consumer row: ${err instanceof Error ? err.message : String(err)}`);
    }
    for (const [ep, dev] of devIds) this.devIds.set(ep, dev);
    for (const ep of gone) this.gone.add(ep);
    // The stage 2 is never dirty-tracking (see IoasidTables), so it joins no dirty log.
    if (stage2 !== undefined) (this.tables as IoasidTables).adoptStage2(stage2);
  }

  /** The adapter's part of a migration image (see BackendAdapterState). */
  saveState(): BackendAdapterState {
    return {
      devices: [...this.devIds].map(([endpoint, device]) => ({ endpoint, device })).sort((a, b) => a.endpoint - b.endpoint),
      accesses: [...this.accessEps]
        .map(([endpoint, a]) => ({ endpoint, access: a.access ?? null, ioas: a.ioas ?? null, mode: a.mode }))
        .sort((a, b) => a.endpoint - b.endpoint),
      gone: [...this.gone].sort((a, b) => a - b),
      stage2: this.tables instanceof IoasidTables ? this.tables.stage2() ?? null : null,
    };
  }

  // ---- dirty tracking (migration) ----

  /**
   * Switches dirty tracking on or off for every paging HWPT this backend holds, and for those it
   * makes while it is on. Turning it on starts a clean log (iommufd clears the bits first).
   */
  setDirtyTracking(enable: boolean): void {
    this.tracking = enable;
    this.harvested.clear();
    for (const hwpt of this.trackedHwpts()) this.context.hwptSetDirtyTracking(hwpt, enable);
  }

  get dirtyTracking(): boolean {
    return this.tracking;
  }

  /**
   * Guest page frames (GPA / 4 KiB) that DMA through a bound device wrote since tracking was
   * switched on or since the last call, in ascending order; reading clears the log. Software
   * consumers (accesses) are not tracked, as in iommufd: their VMM logs their writes itself.
   */
  dirtyPages(): number[] {
    if (!this.tracking) throw new IommufdError('EINVAL', 'dirty tracking is off', 'tracking');
    const pages = new Set(this.harvested);
    this.harvested.clear();
    for (const h of this.paging) if (this.trackable.has(h.hwpt)) this.readDirty(h.hwpt, h.ioas, 0n, U64_MAX, pages);
    return [...pages].sort((a, b) => a - b);
  }

  private *trackedHwpts(): Generator<number> {
    for (const h of this.paging) if (this.trackable.has(h.hwpt)) yield h.hwpt;
  }

  /** Collects the dirty pages of [start, end] of the IOAS (as GPA frames) into `into`. */
  private harvest(domain: DomainHandle, start: bigint, end: bigint): void {
    if (!this.tracking || !this.trackable.has(domain.hwpt)) return;
    this.readDirty(domain.hwpt, domain.ioas, start, end, this.harvested);
  }

  private readDirty(hwpt: number, ioas: number, start: bigint, end: bigint, into: Set<number>): void {
    const areas = this.context.ioasAreasIn(ioas, start, end);
    // One bitmap read per cluster of nearby areas: each read waits for DMA in flight, so few
    // reads, but none spanning a huge hole (a bitmap covers its whole range).
    const CLUSTER_SPAN = 1n << 32n;
    let i = 0;
    while (i < areas.length) {
      const first = areas[i]!.iova;
      let j = i;
      while (j + 1 < areas.length && areas[j + 1]!.iova + areas[j + 1]!.length - first <= CLUSTER_SPAN) j++;
      const cluster = areas.slice(i, j + 1);
      const last = cluster[cluster.length - 1]!;
      const bitmap = this.context.hwptGetDirtyBitmap(hwpt, { iova: first, length: last.iova + last.length - first, pageSize: 4096n });
      for (const area of cluster) collectArea(bitmap, first, area, into);
      i = j + 1;
    }
  }

  restoredPagingDomain(ioas: number, hwpt: number): PagingDomainHandle | Errno {
    const index = this.objectIndex();
    if (index.types.get(ioas) !== 'IOAS') return 'ENOENT';
    if (this.tables instanceof IoasidTables && this.tables.stage2()?.ioas === ioas) return 'EBUSY';
    if (hwpt !== 0 && (index.types.get(hwpt) !== 'HWPT_PAGING' || index.hwptIoas.get(hwpt)?.ioas !== ioas)) return 'EINVAL';
    const handle: DomainHandle = { ioas, hwpt };
    this.paging.add(handle);
    if (hwpt !== 0 && ((index.hwptIoas.get(hwpt)?.flags ?? 0) & HwptAllocFlag.DIRTY_TRACKING) !== 0) this.trackable.add(hwpt);
    return handle;
  }

  /** Restored table domains are checked against the same index. */
  objectIndex(): ObjectIndex {
    return (this.index ??= indexObjects(this.context));
  }

  endRestore(): void {
    this.index = undefined;
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
      this.paging.add(handle);
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
    const info = this.context.getHwInfo(dev);
    // Dirty tracking is allocated wherever the IOMMU can do it, so a migration can switch it on
    // for every domain later (iommufd can only enable it on a HWPT allocated with the flag).
    const flags = (info.maxPasidLog2 > 0 ? HwptAllocFlag.PASID : 0) | ((info.capabilities & HwCap.DIRTY_TRACKING) !== 0 ? HwptAllocFlag.DIRTY_TRACKING : 0);
    const hwpt = this.context.hwptAlloc(dev, ioas, { flags });
    if ((flags & HwptAllocFlag.DIRTY_TRACKING) !== 0) this.trackable.add(hwpt);
    if (this.tracking && (flags & HwptAllocFlag.DIRTY_TRACKING) !== 0) {
      try {
        this.context.hwptSetDirtyTracking(hwpt, true);
      } catch (err) {
        this.quietly(() => this.context.destroy(hwpt));
        throw err;
      }
    }
    return hwpt;
  }

  destroyPagingDomain(domain: PagingDomainHandle): void {
    this.harvest(domain as DomainHandle, 0n, U64_MAX);
    this.paging.delete(domain as DomainHandle);
    this.trackable.delete(domain.hwpt);
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
      consumer.mode = typeof target === 'number' ? 'ioas' : target;
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
    // What DMA wrote through the mappings is read before they go, or a migration would lose it
    // (as VFIO's unmap with a dirty bitmap does for type1).
    this.harvest(domain as DomainHandle, start, end);
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

/** The set bits of `bitmap` (bit i: IOVA base + i pages) that fall in `area`, as GPA frames. */
function collectArea(bitmap: BigUint64Array, base: bigint, area: AreaSnapshot, into: Set<number>): void {
  const firstBit = Number((area.iova - base) >> 12n);
  const pages = Number(area.length >> 12n);
  const gpaPfn = Math.floor(area.gpa / 4096);
  for (let k = 0; k < pages; k++) {
    const bit = firstBit + k;
    const word = bitmap[bit >>> 6]!;
    if (word === 0n) {
      // Skip the rest of an empty word.
      k += 63 - (bit & 63);
      continue;
    }
    if (((word >> BigInt(bit & 63)) & 1n) !== 0n) into.add(gpaPfn + k);
  }
}
