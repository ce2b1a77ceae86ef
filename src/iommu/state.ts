/**
 * The virtio-iommu model's migration state as plain data, and the checks a restore applies to it.
 * A state arrives in an image from another host: every field is checked here before the model
 * changes, and a failure names the field (StateError), so nothing is half restored.
 */

/** A domain as the guest created it, with the backend objects behind it (IDs the backend restores as they were). */
export type DomainState =
  | { readonly id: number; readonly kind: 'bypass'; readonly endpoints: readonly number[] }
  | { readonly id: number; readonly kind: 'paging'; readonly ioas: number; readonly hwpt: number; readonly endpoints: readonly number[] }
  | {
      readonly id: number;
      readonly kind: 'table';
      readonly hwpt: number;
      readonly rootGpa: bigint;
      readonly addrWidth: 48 | 57;
      readonly endpoints: readonly number[];
      readonly pasids: readonly { readonly endpoint: number; readonly pasid: number }[];
    };

/** A fault record still waiting for an event buffer (absent fields are null: plain data has no undefined). */
export type FaultState = {
  readonly reason: 'UNKNOWN' | 'DOMAIN' | 'MAPPING';
  readonly endpoint: number;
  readonly pasid: number | null;
  readonly address: bigint | null;
  readonly read: boolean;
  readonly write: boolean;
  readonly exec: boolean;
};

export type VirtioIommuState = {
  /** What the device offered and its endpoints: the destination must be configured the same. */
  readonly offeredFeatures: bigint;
  readonly endpoints: readonly number[];
  /** Config `bypass` as the driver left it. */
  readonly bypass: boolean;
  readonly domains: readonly DomainState[];
  readonly pendingFaults: readonly FaultState[];
  readonly counters: {
    readonly requests: number;
    readonly unparsable: number;
    readonly faultsReported: number;
    readonly faultsDropped: number;
    readonly faultsCoalesced: number;
    readonly deferredPasses: number;
  };
  readonly byStatus: Readonly<Record<string, number>>;
};

/** A migration state that does not fit: which field, and why. */
export class StateError extends RangeError {
  readonly code = 'EBADSTATE' as const;
  constructor(
    readonly field: string,
    reason: string,
  ) {
    super(`${field}: ${reason}`);
    this.name = 'StateError';
  }
}

const U64_MAX = (1n << 64n) - 1n;

export function record(v: unknown, field: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v) || v instanceof Uint8Array) throw new StateError(field, 'must be an object');
  return v as Record<string, unknown>;
}

export function list(v: unknown, field: string, max: number): unknown[] {
  if (!Array.isArray(v)) throw new StateError(field, 'must be an array');
  if (v.length > max) throw new StateError(field, `has ${v.length} entries, at most ${max} fit`);
  return v;
}

export function u32(v: unknown, field: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 0xffff_ffff) throw new StateError(field, 'must be a u32');
  return v;
}

export function count(v: unknown, field: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new StateError(field, 'must be a non-negative integer');
  return v;
}

export function u64(v: unknown, field: string): bigint {
  if (typeof v !== 'bigint' || v < 0n || v > U64_MAX) throw new StateError(field, 'must be a u64 bigint');
  return v;
}

export function bool(v: unknown, field: string): boolean {
  if (typeof v !== 'boolean') throw new StateError(field, 'must be a boolean');
  return v;
}

/** What the model checks a state against: its own configuration. */
export interface StateLimits {
  readonly offeredFeatures: bigint;
  readonly endpoints: ReadonlySet<number>;
  readonly maxDomains: number;
  readonly maxPendingFaults: number;
  readonly statusNames: ReadonlySet<string>;
}

/**
 * Checks the shape and the model's own invariants of a saved state: unique domain IDs, each
 * endpoint in at most one domain, each (endpoint, PASID) bound once, a domain with nobody in it
 * does not exist (§5.13.6.2). Whether the backend IDs name live objects is the backend's to check.
 */
export function parseIommuState(raw: unknown, limits: StateLimits): VirtioIommuState {
  const s = record(raw, 'device');
  const offeredFeatures = u64(s.offeredFeatures, 'device.offeredFeatures');
  if (offeredFeatures !== limits.offeredFeatures) {
    throw new StateError('device.offeredFeatures', `0x${offeredFeatures.toString(16)} saved, this device offers 0x${limits.offeredFeatures.toString(16)}: configure the destination like the source`);
  }
  const endpoints = list(s.endpoints, 'device.endpoints', limits.endpoints.size).map((e, i) => u32(e, `device.endpoints[${i}]`));
  if (endpoints.length !== limits.endpoints.size || endpoints.some((e) => !limits.endpoints.has(e))) {
    throw new StateError('device.endpoints', `saved [${endpoints.join(', ')}], this device has [${[...limits.endpoints].join(', ')}]`);
  }
  const known = (ep: number, field: string): number => {
    if (!limits.endpoints.has(ep)) throw new StateError(field, `endpoint ${ep} does not exist`);
    return ep;
  };
  const domainIds = new Set<number>();
  const placed = new Set<number>();
  const bound = new Set<string>();
  const domains = list(s.domains, 'device.domains', limits.maxDomains).map((d, i): DomainState => {
    const f = `device.domains[${i}]`;
    const o = record(d, f);
    const id = u32(o.id, `${f}.id`);
    if (domainIds.has(id)) throw new StateError(`${f}.id`, `domain ${id} appears twice`);
    domainIds.add(id);
    const eps = list(o.endpoints, `${f}.endpoints`, limits.endpoints.size).map((e, j) => {
      const ep = known(u32(e, `${f}.endpoints[${j}]`), `${f}.endpoints[${j}]`);
      if (placed.has(ep)) throw new StateError(`${f}.endpoints[${j}]`, `endpoint ${ep} is attached to two domains`);
      placed.add(ep);
      return ep;
    });
    switch (o.kind) {
      case 'bypass':
      case 'paging':
        if (eps.length === 0) throw new StateError(`${f}.endpoints`, 'a domain without endpoints does not exist');
        return o.kind === 'bypass'
          ? { id, kind: 'bypass', endpoints: eps }
          : { id, kind: 'paging', ioas: u32(o.ioas, `${f}.ioas`), hwpt: u32(o.hwpt, `${f}.hwpt`), endpoints: eps };
      case 'table': {
        const pasids = list(o.pasids, `${f}.pasids`, 1 << 16).map((p, j) => {
          const po = record(p, `${f}.pasids[${j}]`);
          const endpoint = known(u32(po.endpoint, `${f}.pasids[${j}].endpoint`), `${f}.pasids[${j}].endpoint`);
          const pasid = u32(po.pasid, `${f}.pasids[${j}].pasid`);
          if (pasid === 0 || pasid >= 1 << 20) throw new StateError(`${f}.pasids[${j}].pasid`, 'must be in [1, 2^20)');
          const key = `${endpoint}:${pasid}`;
          if (bound.has(key)) throw new StateError(`${f}.pasids[${j}]`, `PASID ${pasid} of endpoint ${endpoint} is bound twice`);
          bound.add(key);
          return { endpoint, pasid };
        });
        if (eps.length === 0 && pasids.length === 0) throw new StateError(`${f}`, 'a table domain with no endpoint and no PASID does not exist');
        const rootGpa = u64(o.rootGpa, `${f}.rootGpa`);
        if ((rootGpa & 0xfffn) !== 0n) throw new StateError(`${f}.rootGpa`, 'must be 4 KiB aligned');
        if (o.addrWidth !== 48 && o.addrWidth !== 57) throw new StateError(`${f}.addrWidth`, 'must be 48 or 57');
        return { id, kind: 'table', hwpt: u32(o.hwpt, `${f}.hwpt`), rootGpa, addrWidth: o.addrWidth, endpoints: eps, pasids };
      }
      default:
        throw new StateError(`${f}.kind`, `must be 'bypass', 'paging' or 'table'`);
    }
  });
  const pendingFaults = list(s.pendingFaults, 'device.pendingFaults', limits.maxPendingFaults).map((p, i): FaultState => {
    const f = `device.pendingFaults[${i}]`;
    const o = record(p, f);
    if (o.reason !== 'UNKNOWN' && o.reason !== 'DOMAIN' && o.reason !== 'MAPPING') throw new StateError(`${f}.reason`, "must be 'UNKNOWN', 'DOMAIN' or 'MAPPING'");
    return {
      reason: o.reason,
      endpoint: known(u32(o.endpoint, `${f}.endpoint`), `${f}.endpoint`),
      pasid: o.pasid === null ? null : u32(o.pasid, `${f}.pasid`),
      address: o.address === null ? null : u64(o.address, `${f}.address`),
      read: bool(o.read, `${f}.read`),
      write: bool(o.write, `${f}.write`),
      exec: bool(o.exec, `${f}.exec`),
    };
  });
  const c = record(s.counters, 'device.counters');
  const counters = {
    requests: count(c.requests, 'device.counters.requests'),
    unparsable: count(c.unparsable, 'device.counters.unparsable'),
    faultsReported: count(c.faultsReported, 'device.counters.faultsReported'),
    faultsDropped: count(c.faultsDropped, 'device.counters.faultsDropped'),
    faultsCoalesced: count(c.faultsCoalesced, 'device.counters.faultsCoalesced'),
    deferredPasses: count(c.deferredPasses, 'device.counters.deferredPasses'),
  };
  const byStatusRaw = record(s.byStatus, 'device.byStatus');
  const byStatus: Record<string, number> = {};
  for (const [name, n] of Object.entries(byStatusRaw)) {
    if (!limits.statusNames.has(name)) throw new StateError(`device.byStatus.${name}`, 'is not a status name');
    byStatus[name] = count(n, `device.byStatus.${name}`);
  }
  return { offeredFeatures, endpoints, bypass: bool(s.bypass, 'device.bypass'), domains, pendingFaults, counters, byStatus };
}
