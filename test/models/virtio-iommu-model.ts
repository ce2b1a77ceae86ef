// A reference model of the virtio-iommu device's request semantics, written from the
// specification's device requirements (virtio 1.2 §5.13.6) with plain data structures: domains
// as lists of intervals, endpoints as a map. It decodes the same bytes the device receives and
// says which status each request must get and what state the backend must then hold.

export const MStatus = { OK: 0, IOERR: 1, UNSUPP: 2, DEVERR: 3, INVAL: 4, RANGE: 5, NOENT: 6, FAULT: 7, NOMEM: 8 } as const;
export type ModelOutcome = number | 'NONE';

export const MFeature = { INPUT_RANGE: 0, DOMAIN_RANGE: 1, MAP_UNMAP: 2, BYPASS: 3, PROBE: 4, MMIO: 5, BYPASS_CONFIG: 6 } as const;
export type MFeatureName = keyof typeof MFeature;

export interface ModelMapping {
  readonly start: bigint;
  readonly end: bigint;
  readonly phys: bigint;
  readonly read: boolean;
  readonly write: boolean;
}

export interface ModelDomain {
  readonly id: number;
  readonly bypass: boolean;
  readonly endpoints: Set<number>;
  mappings: ModelMapping[];
}

export interface ModelConfig {
  readonly endpoints: readonly number[];
  /** Features the device offers (names). */
  readonly offered: readonly MFeatureName[];
  readonly negotiated: readonly MFeatureName[];
  readonly bootBypass: boolean;
  readonly domainRange: readonly [number, number];
  readonly inputRange: readonly [bigint, bigint];
  readonly maxDomains: number;
  readonly probeSize: number;
  readonly ramBytes: number;
  /** The reserved IOVA range every endpoint has (the x86 MSI window). */
  readonly reserved: readonly [bigint, bigint];
}

const PAGE = 4096n;
const U64 = (1n << 64n) - 1n;

export class VirtioIommuModel {
  readonly domains = new Map<number, ModelDomain>();
  readonly attached = new Map<number, number>();
  bypass: boolean;
  private readonly negotiated: Set<MFeatureName>;
  private readonly offered: Set<MFeatureName>;

  constructor(readonly config: ModelConfig) {
    this.bypass = config.bootBypass;
    this.negotiated = new Set(config.negotiated);
    this.offered = new Set(config.offered);
  }

  /** What an endpoint not attached to a domain does: identity (bypass) or nothing. */
  unattachedMode(): 'identity' | 'blocked' {
    return this.offered.has('BYPASS_CONFIG') && this.bypass ? 'identity' : 'blocked';
  }

  writeBypass(value: number): void {
    if (!this.offered.has('BYPASS_CONFIG')) return;
    if ((value & 0xff) > 1) return;
    this.bypass = (value & 0xff) === 1;
  }

  /** Reference outcome of one request (readable bytes, writable size), applied to the state. */
  apply(readable: Uint8Array, writable: number): ModelOutcome {
    const req = readable.subarray(0, 72);
    if (req.length < 4 || writable < 4) return 'NONE';
    const v = new DataView(req.buffer, req.byteOffset, req.byteLength);
    const type = req[0]!;
    const need = { 1: 20, 2: 20, 3: 36, 4: 28, 5: 72 }[type];
    if (need === undefined) return 'NONE';
    if (type === 5) {
      if (!this.negotiated.has('PROBE')) return 'NONE';
      if (writable < this.config.probeSize + 4) return MStatus.INVAL;
    }
    if (req.length < need) return MStatus.INVAL;
    const u32 = (o: number): number => v.getUint32(o, true);
    const u64 = (o: number): bigint => v.getBigUint64(o, true);
    switch (type) {
      case 1:
        return this.attach(u32(4), u32(8), u32(12), u32(16));
      case 2:
        return this.detach(u32(4), u32(8));
      case 3:
        return this.map(u32(4), u64(8), u64(16), u64(24), u32(32));
      case 4:
        return this.unmap(u32(4), u64(8), u64(16));
      default:
        return this.config.endpoints.includes(u32(4)) ? MStatus.OK : MStatus.NOENT;
    }
  }

  private inRange(domain: number): boolean {
    if (!this.offered.has('DOMAIN_RANGE')) return true;
    return domain >= this.config.domainRange[0] && domain <= this.config.domainRange[1];
  }

  private attach(domainId: number, endpoint: number, flags: number, reserved: number): ModelOutcome {
    if (reserved !== 0) return MStatus.INVAL;
    const known = this.negotiated.has('BYPASS_CONFIG') ? 1 : 0;
    if ((flags & ~known) !== 0) return MStatus.INVAL;
    if (!this.config.endpoints.includes(endpoint)) return MStatus.NOENT;
    if (!this.inRange(domainId)) return MStatus.RANGE;
    const bypass = (flags & 1) !== 0;
    let domain = this.domains.get(domainId);
    if (domain !== undefined && domain.bypass !== bypass) return MStatus.INVAL;
    if (this.attached.get(endpoint) === domainId) return MStatus.OK;
    if (domain === undefined) {
      if (this.domains.size >= this.config.maxDomains) return MStatus.NOMEM;
      domain = { id: domainId, bypass, endpoints: new Set(), mappings: [] };
      this.domains.set(domainId, domain);
    }
    this.leave(endpoint);
    domain.endpoints.add(endpoint);
    this.attached.set(endpoint, domainId);
    return MStatus.OK;
  }

  private detach(domainId: number, endpoint: number): ModelOutcome {
    if (!this.config.endpoints.includes(endpoint)) return MStatus.NOENT;
    if (this.attached.get(endpoint) !== domainId) return MStatus.INVAL;
    this.leave(endpoint);
    return MStatus.OK;
  }

  private leave(endpoint: number): void {
    const d = this.attached.get(endpoint);
    if (d === undefined) return;
    this.attached.delete(endpoint);
    const domain = this.domains.get(d)!;
    domain.endpoints.delete(endpoint);
    if (domain.endpoints.size === 0) this.domains.delete(d);
  }

  private map(domainId: number, start: bigint, end: bigint, phys: bigint, flags: number): ModelOutcome {
    if (!this.negotiated.has('MAP_UNMAP')) return MStatus.UNSUPP;
    const known = 1 | 2 | (this.negotiated.has('MMIO') ? 4 : 0);
    if ((flags & ~known) !== 0) return MStatus.INVAL;
    if (!this.inRange(domainId)) return MStatus.RANGE;
    const domain = this.domains.get(domainId);
    if (domain === undefined) return MStatus.NOENT;
    if (domain.bypass) return MStatus.INVAL;
    if (end < start) return MStatus.INVAL;
    if (start % PAGE !== 0n || phys % PAGE !== 0n || ((end + 1n) & U64) % PAGE !== 0n) return MStatus.RANGE;
    if (start < this.config.inputRange[0] || end > this.config.inputRange[1]) return MStatus.RANGE;
    const physEnd = phys + (end - start);
    if (physEnd > BigInt(Number.MAX_SAFE_INTEGER)) return MStatus.RANGE;
    if (domain.mappings.some((m) => m.start <= end && start <= m.end)) return MStatus.INVAL;
    const [rs, re] = this.config.reserved;
    if (rs <= end && start <= re) return MStatus.INVAL;
    const read = (flags & 1) !== 0;
    const write = (flags & 2) !== 0;
    if (!read && !write) return MStatus.INVAL;
    if (physEnd >= BigInt(this.config.ramBytes)) return MStatus.FAULT;
    domain.mappings.push({ start, end, phys, read, write });
    return MStatus.OK;
  }

  private unmap(domainId: number, start: bigint, end: bigint): ModelOutcome {
    if (!this.negotiated.has('MAP_UNMAP')) return MStatus.UNSUPP;
    if (!this.inRange(domainId)) return MStatus.RANGE;
    const domain = this.domains.get(domainId);
    if (domain === undefined) return MStatus.NOENT;
    if (domain.bypass) return MStatus.INVAL;
    if (end < start) return MStatus.INVAL;
    const hit = domain.mappings.filter((m) => m.start <= end && start <= m.end);
    if (hit.some((m) => m.start < start || m.end > end)) return MStatus.RANGE;
    domain.mappings = domain.mappings.filter((m) => !hit.includes(m));
    return MStatus.OK;
  }

  /** Distinct guest pages referenced by any mapping: what the backend must have pinned and accounted. */
  pinnedPages(): number {
    const pages = new Set<bigint>();
    for (const d of this.domains.values()) {
      for (const m of d.mappings) for (let p = m.phys / PAGE; p <= (m.phys + m.end - m.start) / PAGE; p++) pages.add(p);
    }
    return pages.size;
  }
}
