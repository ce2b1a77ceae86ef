import type { GuestMemory } from '../memory/index.js';
import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import type { TablePoolOptions } from '../pagetable/pool.js';
import { PinAccounting, type PinStats } from './accounting.js';
import { Context } from './context.js';
import type { ContextSnapshot } from './context.js';
import type { IovaRange, PhysicalDevice } from './device.js';
import { IommufdError } from './errors.js';
import { MAX_PASID_BITS, U64_MAX } from './uapi.js';

/** The x86 MSI doorbell window every x86 device reports as reserved (IOMMU_RESV_MSI). */
export const X86_MSI_WINDOW: readonly [bigint, bigint] = [0xfee00000n, 0xfeefffffn];

/** A physical device as the host declares it. */
export interface PhysicalDeviceSpec {
  readonly name: string;
  /** Isolation group identity; devices with the same value share a group. */
  readonly group: string | number;
  /** Inclusive [start, last] IOVA ranges the device cannot use. */
  readonly reservedRegions?: readonly (readonly [bigint, bigint])[];
  /** PASID width, 0..20 (default 0). */
  readonly pasidBits?: number;
  /** IOMMU dirty tracking available for this device (default false). */
  readonly dirtyTracking?: boolean;
}

export interface IommufdHostOptions {
  readonly devices?: readonly PhysicalDeviceSpec[];
  /** RLIMIT_MEMLOCK in 4 KiB pages, shared by every context (default unlimited). */
  readonly memlockLimitPages?: number;
  /** The opener holds CAP_SYS_RESOURCE (may set IOMMU_OPTION_RLIMIT_MODE). Default true. */
  readonly capSysResource?: boolean;
  /**
   * Release freed tables at the end of every mutating call (default true). Set false once device
   * workers exist and call Context.reclaim() after they are quiescent.
   */
  readonly autoReclaim?: boolean;
  /** Table pool sizing of each context. */
  readonly pool?: TablePoolOptions;
  /** Most device-table rows (bound devices plus PASID attachments) per context. Default 65536. */
  readonly maxDeviceRows?: number;
  readonly log?: Logger;
}

export interface HostSnapshot {
  readonly devices: readonly { name: string; group: string; owner: number | null }[];
  readonly limitPages: number;
  readonly stats: PinStats;
  /** Pinned guest pages as [gpa, pages, references] runs. */
  readonly pins: readonly (readonly [number, number, number])[];
  readonly contexts: readonly ContextSnapshot[];
}

/**
 * The emulated kernel side of /dev/iommu: the physical devices that exist, their isolation groups'
 * DMA ownership, and the locked-memory accounting all contexts share (they belong to one process and
 * one user). open() gives a Context, as opening /dev/iommu gives an iommufd.
 */
export class IommufdHost {
  readonly memory: GuestMemory;
  readonly log: Logger;
  readonly pins: PinAccounting;
  readonly capSysResource: boolean;
  readonly autoReclaim: boolean;
  readonly poolOptions: TablePoolOptions;
  readonly maxDeviceRows: number;
  private readonly devices = new Map<string, PhysicalDevice>();
  /** Group → the context that owns its DMA (iommu_device_claim_dma_owner) and how many of its devices it bound. */
  private readonly groupOwners = new Map<string, { ctx: Context; bound: number }>();
  private readonly open_ = new Set<Context>();
  private serial = 0;

  constructor(memory: GuestMemory, options: IommufdHostOptions = {}) {
    this.memory = memory;
    this.log = options.log ?? silentLogger;
    this.pins = new PinAccounting(memory);
    this.capSysResource = options.capSysResource ?? true;
    this.autoReclaim = options.autoReclaim ?? true;
    this.poolOptions = options.pool ?? {};
    this.maxDeviceRows = options.maxDeviceRows ?? 1 << 16;
    if (options.memlockLimitPages !== undefined) this.setMemlockLimit(options.memlockLimitPages);
    for (const spec of options.devices ?? []) this.addDevice(spec);
  }

  /** Declares a physical device (hotplug). Throws IommufdError EINVAL / EEXIST for a bad spec. */
  addDevice(spec: PhysicalDeviceSpec): void {
    if (typeof spec.name !== 'string' || spec.name === '') throw new IommufdError('EINVAL', 'device name must be a non-empty string', 'name');
    if (this.devices.has(spec.name)) throw new IommufdError('EEXIST', `device '${spec.name}' already exists`, 'name');
    const group = String(spec.group);
    const pasidBits = spec.pasidBits ?? 0;
    if (!Number.isInteger(pasidBits) || pasidBits < 0 || pasidBits > MAX_PASID_BITS) {
      throw new IommufdError('EINVAL', `pasidBits must be an integer in [0, ${MAX_PASID_BITS}]`, 'pasidBits');
    }
    const reservedRegions: IovaRange[] = [];
    for (const region of spec.reservedRegions ?? []) {
      const [start, last] = region;
      if (typeof start !== 'bigint' || typeof last !== 'bigint' || start < 0n || last > U64_MAX || start > last) {
        throw new IommufdError('EINVAL', `reserved region must be [start, last] bigints within 64 bits, start <= last`, 'reservedRegions');
      }
      reservedRegions.push({ start, last });
    }
    this.devices.set(spec.name, { name: spec.name, group, reservedRegions, pasidBits, dirtyTracking: spec.dirtyTracking ?? false });
  }

  /** Opens a new context (an iommufd file). */
  open(): Context {
    const ctx = new Context(this, ++this.serial);
    this.open_.add(ctx);
    return ctx;
  }

  /** Sets RLIMIT_MEMLOCK in pages; undefined or Infinity means unlimited. Existing pins stay. */
  setMemlockLimit(pages: number | undefined): void {
    if (pages !== undefined && pages !== Number.POSITIVE_INFINITY && (!Number.isSafeInteger(pages) || pages < 0)) {
      throw new IommufdError('EINVAL', 'memlock limit must be a non-negative integer page count', 'pages');
    }
    this.pins.limitPages = pages ?? Number.POSITIVE_INFINITY;
  }

  stats(): PinStats {
    return this.pins.stats();
  }

  inspect(): HostSnapshot {
    const devices = [...this.devices.values()]
      .map((d) => ({ name: d.name, group: d.group, owner: this.groupOwners.get(d.group)?.ctx.serial ?? null }))
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    return {
      devices,
      limitPages: this.pins.limitPages,
      stats: this.pins.stats(),
      pins: this.pins.runs(),
      contexts: [...this.open_].map((c) => c.inspect()),
    };
  }

  // Used by contexts.

  /** @internal */
  findDevice(name: string): PhysicalDevice | undefined {
    return this.devices.get(name);
  }

  /** @internal Every declared physical device, in declaration order. */
  physicalDevices(): PhysicalDevice[] {
    return [...this.devices.values()];
  }

  /** @internal Whether `ctx` may own `group`'s DMA (no other context does). */
  canClaimGroup(ctx: Context, group: string): boolean {
    const owner = this.groupOwners.get(group);
    return owner === undefined || owner.ctx === ctx;
  }

  /** @internal */
  claimGroup(ctx: Context, group: string): void {
    const owner = this.groupOwners.get(group);
    if (owner === undefined) this.groupOwners.set(group, { ctx, bound: 1 });
    else owner.bound++;
  }

  /** @internal */
  releaseGroup(group: string): void {
    const owner = this.groupOwners.get(group);
    if (owner === undefined) return;
    if (--owner.bound === 0) this.groupOwners.delete(group);
  }

  /** @internal */
  closed(ctx: Context): void {
    this.open_.delete(ctx);
  }
}
