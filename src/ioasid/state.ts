import { PAGE_SIZE_N } from '../pagetable/format.js';
import { IommufdError } from './errors.js';
import type { PhysicalDevice } from './device.js';
import { MAX_OBJECT_ID, MAX_PASID_BITS, U64_MAX } from './uapi.js';

/*
 * The saved state of a context (Context.saveState / restoreState), for live migration: what a VMM
 * writes into its image and reads back on the destination. Plain data only (null, boolean, number,
 * bigint, string, Uint8Array, arrays, plain objects), every list in ID (or IOVA, or PASID) order, so
 * equal contexts save equal states. What a restore can derive is left out: reserved ranges come
 * back with the device attachments that put them there, HWPT users and area pin counts with the
 * attachments and pins. Consumer rows (consumerRowAlloc) are not part of it: they belong to the
 * VMM's worker threads, which allocate them again on the destination.
 */

export const CONTEXT_STATE_VERSION = 1;

export interface IovaRangeState {
  readonly start: bigint;
  readonly last: bigint;
}

export interface AreaState {
  readonly iova: bigint;
  readonly length: bigint;
  readonly gpa: number;
  readonly readable: boolean;
  readonly writeable: boolean;
  /** The area uses 2 MiB / 1 GiB leaves (HUGE_PAGES was on when it was mapped, and it lines up). */
  readonly huge: boolean;
}

/** IOVA pages whose leaves carry the DIRTY bit: whole leaves, adjacent ones merged. */
export interface DirtyRunState {
  readonly iova: bigint;
  readonly length: bigint;
}

export interface IoasState {
  readonly id: number;
  /** IOMMU_OPTION_HUGE_PAGES. */
  readonly hugePages: boolean;
  /** Page-table levels (4..6): roots never shrink, so this can exceed what the areas need. */
  readonly levels: number;
  /** IOMMU_IOAS_ALLOW_IOVAS list, by start. */
  readonly allowed: readonly IovaRangeState[];
  /** By IOVA. */
  readonly areas: readonly AreaState[];
  /**
   * Dirty pages. The bits live in the IOAS's one table, shared by all its paging HWPTs (see
   * docs/backend.md, "Dirty tracking"), so they are saved once here, not per HWPT.
   */
  readonly dirty: readonly DirtyRunState[];
}

export interface HwptPagingState {
  readonly type: 'HWPT_PAGING';
  readonly id: number;
  readonly ioas: number;
  /** HwptAllocFlag bits it was allocated with (0 for an automatic HWPT). */
  readonly flags: number;
  /** Created by attaching a device to the IOAS: goes away with its last attachment. */
  readonly auto: boolean;
  /** IOMMU_HWPT_SET_DIRTY_TRACKING is on. */
  readonly dirtyTracking: boolean;
}

export interface HwptNestedState {
  readonly type: 'HWPT_NESTED';
  readonly id: number;
  /** The NEST_PARENT paging HWPT. */
  readonly parent: number;
  /** HwptAllocFlag bits (PASID only). */
  readonly flags: number;
  /** HwptDataType and the stage-1 description, as given to hwptAlloc (struct iommu_hwpt_vtd_s1). */
  readonly dataType: number;
  readonly data: Uint8Array;
}

export type HwptState = HwptPagingState | HwptNestedState;

export interface AttachmentState {
  readonly pasid: number;
  /** A HWPT ID (an automatic HWPT's too), or identity translation (bypass). */
  readonly target: number | 'identity';
}

export interface DeviceState {
  readonly id: number;
  /** The physical device: the destination host must declare it too. */
  readonly name: string;
  /** The device's own attachments, by PASID; a PASID not listed is blocked. */
  readonly attachments: readonly AttachmentState[];
}

export interface PinState {
  readonly iova: bigint;
  readonly length: bigint;
  /** AccessRwFlag bits. */
  readonly flags: number;
}

export interface AccessState {
  readonly id: number;
  readonly ioas: number;
  /** In the order they were taken. */
  readonly pins: readonly PinState[];
}

export interface ContextState {
  readonly version: typeof CONTEXT_STATE_VERSION;
  /** IOMMU_OPTION_RLIMIT_MODE. */
  readonly rlimitMode: number;
  /** The ID the next allocation hands out (the lowest free one): a check on the ID lists. */
  readonly nextObjectId: number;
  readonly ioas: readonly IoasState[];
  /** Paging and nested, by ID. */
  readonly hwpts: readonly HwptState[];
  readonly devices: readonly DeviceState[];
  readonly accesses: readonly AccessState[];
}

// ---- validation: a state read from an image file is hostile ----

const bad = (field: string, what: string): never => {
  throw new IommufdError('EINVAL', `${field}: ${what}`, field);
};

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
  const proto = Object.getPrototypeOf(v) as unknown;
  return proto === Object.prototype || proto === null;
}

/** A plain object with exactly `keys` (own, enumerable); anything else is refused, not ignored. */
function record(v: unknown, field: string, keys: readonly string[]): Record<string, unknown> {
  if (!isPlainObject(v)) return bad(field, 'must be a plain object');
  for (const k of Object.keys(v)) if (!keys.includes(k)) bad(`${field}.${k}`, 'is not a field of the state');
  for (const k of keys) if (!Object.prototype.hasOwnProperty.call(v, k)) bad(`${field}.${k}`, 'is missing');
  return v;
}

function list(v: unknown, field: string): readonly unknown[] {
  if (!Array.isArray(v)) return bad(field, 'must be an array');
  return v;
}

function bool(v: unknown, field: string): boolean {
  if (typeof v !== 'boolean') return bad(field, 'must be a boolean');
  return v;
}

function uint(v: unknown, field: string, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v > max) return bad(field, `must be an integer in [0, ${max}]`);
  return v === 0 ? 0 : v; // no -0
}

function objectId(v: unknown, field: string): number {
  const id = uint(v, field, MAX_OBJECT_ID);
  if (id === 0) bad(field, 'object IDs start at 1');
  return id;
}

function u64(v: unknown, field: string): bigint {
  if (typeof v !== 'bigint' || v < 0n || v > U64_MAX) return bad(field, 'must be a bigint in [0, 2^64)');
  return v;
}

/** An IOVA range of whole pages: page-aligned start, nonzero page-multiple length, within 64 bits. */
function pageRange(iovaIn: unknown, lengthIn: unknown, field: string): { iova: bigint; length: bigint } {
  const iova = u64(iovaIn, `${field}.iova`);
  const length = u64(lengthIn, `${field}.length`);
  if (iova % PAGE_SIZE_N !== 0n) bad(`${field}.iova`, 'is not 4 KiB aligned');
  if (length === 0n || length % PAGE_SIZE_N !== 0n) bad(`${field}.length`, 'must be a nonzero multiple of 4 KiB');
  if (iova + length - 1n > U64_MAX) bad(`${field}.length`, 'runs past 2^64');
  return { iova, length };
}

/** The elements of a list must come in strictly increasing `key` order (which also makes keys unique). */
function ascending<T>(items: readonly T[], key: (t: T) => number | bigint, field: string, name: string): void {
  for (let i = 1; i < items.length; i++) {
    if (key(items[i]!) <= key(items[i - 1]!)) bad(`${field}[${i}]`, `not in increasing ${name} order (or a duplicate)`);
  }
}

/**
 * Checks a saved state's shape and its references (every ID used names an object of the right type,
 * IDs are unique, nextObjectId follows from them) and returns a normalized copy. Whether the objects
 * can exist on this host is left to the operations that rebuild them. Throws IommufdError EINVAL
 * naming the field.
 */
export function parseContextState(raw: unknown): ContextState {
  const top = record(raw, 'state', ['version', 'rlimitMode', 'nextObjectId', 'ioas', 'hwpts', 'devices', 'accesses']);
  if (top.version !== CONTEXT_STATE_VERSION) bad('version', `must be ${CONTEXT_STATE_VERSION}`);
  const rlimitMode = uint(top.rlimitMode, 'rlimitMode', 0xffffffff);
  const nextObjectId = uint(top.nextObjectId, 'nextObjectId', MAX_OBJECT_ID);

  const ioas: IoasState[] = list(top.ioas, 'ioas').map((v, i) => {
    const f = `ioas[${i}]`;
    const o = record(v, f, ['id', 'hugePages', 'levels', 'allowed', 'areas', 'dirty']);
    const levels = uint(o.levels, `${f}.levels`, 6);
    if (levels < 4) bad(`${f}.levels`, 'must be 4, 5 or 6');
    const allowed = list(o.allowed, `${f}.allowed`).map((r, j) => {
      const rf = `${f}.allowed[${j}]`;
      const x = record(r, rf, ['start', 'last']);
      return { start: u64(x.start, `${rf}.start`), last: u64(x.last, `${rf}.last`) };
    });
    ascending(allowed, (r) => r.start, `${f}.allowed`, 'start');
    const areas = list(o.areas, `${f}.areas`).map((a, j) => {
      const af = `${f}.areas[${j}]`;
      const x = record(a, af, ['iova', 'length', 'gpa', 'readable', 'writeable', 'huge']);
      const { iova, length } = pageRange(x.iova, x.length, af);
      return {
        iova,
        length,
        gpa: uint(x.gpa, `${af}.gpa`, Number.MAX_SAFE_INTEGER),
        readable: bool(x.readable, `${af}.readable`),
        writeable: bool(x.writeable, `${af}.writeable`),
        huge: bool(x.huge, `${af}.huge`),
      };
    });
    ascending(areas, (a) => a.iova, `${f}.areas`, 'IOVA');
    const dirty = list(o.dirty, `${f}.dirty`).map((d, j) => {
      const df = `${f}.dirty[${j}]`;
      const x = record(d, df, ['iova', 'length']);
      return pageRange(x.iova, x.length, df);
    });
    ascending(dirty, (d) => d.iova, `${f}.dirty`, 'IOVA');
    return { id: objectId(o.id, `${f}.id`), hugePages: bool(o.hugePages, `${f}.hugePages`), levels, allowed, areas, dirty };
  });
  ascending(ioas, (x) => x.id, 'ioas', 'ID');

  const hwpts: HwptState[] = list(top.hwpts, 'hwpts').map((v, i): HwptState => {
    const f = `hwpts[${i}]`;
    if (!isPlainObject(v)) return bad(f, 'must be a plain object');
    if (v.type === 'HWPT_PAGING') {
      const o = record(v, f, ['type', 'id', 'ioas', 'flags', 'auto', 'dirtyTracking']);
      return {
        type: 'HWPT_PAGING',
        id: objectId(o.id, `${f}.id`),
        ioas: objectId(o.ioas, `${f}.ioas`),
        flags: uint(o.flags, `${f}.flags`, 0xffffffff),
        auto: bool(o.auto, `${f}.auto`),
        dirtyTracking: bool(o.dirtyTracking, `${f}.dirtyTracking`),
      };
    }
    if (v.type === 'HWPT_NESTED') {
      const o = record(v, f, ['type', 'id', 'parent', 'flags', 'dataType', 'data']);
      if (!(o.data instanceof Uint8Array)) return bad(`${f}.data`, 'must be a Uint8Array');
      if (o.data.length > 4096) bad(`${f}.data`, 'is longer than a page');
      return {
        type: 'HWPT_NESTED',
        id: objectId(o.id, `${f}.id`),
        parent: objectId(o.parent, `${f}.parent`),
        flags: uint(o.flags, `${f}.flags`, 0xffffffff),
        dataType: uint(o.dataType, `${f}.dataType`, 0xffffffff),
        data: new Uint8Array(o.data),
      };
    }
    return bad(`${f}.type`, "must be 'HWPT_PAGING' or 'HWPT_NESTED'");
  });
  ascending(hwpts, (h) => h.id, 'hwpts', 'ID');

  const devices: DeviceState[] = list(top.devices, 'devices').map((v, i) => {
    const f = `devices[${i}]`;
    const o = record(v, f, ['id', 'name', 'attachments']);
    if (typeof o.name !== 'string' || o.name === '') bad(`${f}.name`, 'must be a non-empty string');
    const attachments = list(o.attachments, `${f}.attachments`).map((a, j): AttachmentState => {
      const af = `${f}.attachments[${j}]`;
      const x = record(a, af, ['pasid', 'target']);
      const target: number | 'identity' = x.target === 'identity' ? 'identity' : objectId(x.target, `${af}.target`);
      return { pasid: uint(x.pasid, `${af}.pasid`, 2 ** MAX_PASID_BITS - 1), target };
    });
    ascending(attachments, (a) => a.pasid, `${f}.attachments`, 'PASID');
    return { id: objectId(o.id, `${f}.id`), name: o.name as string, attachments };
  });
  ascending(devices, (d) => d.id, 'devices', 'ID');

  const accesses: AccessState[] = list(top.accesses, 'accesses').map((v, i) => {
    const f = `accesses[${i}]`;
    const o = record(v, f, ['id', 'ioas', 'pins']);
    const pins = list(o.pins, `${f}.pins`).map((p, j) => {
      const pf = `${f}.pins[${j}]`;
      const x = record(p, pf, ['iova', 'length', 'flags']);
      return { iova: u64(x.iova, `${pf}.iova`), length: u64(x.length, `${pf}.length`), flags: uint(x.flags, `${pf}.flags`, 0xffffffff) };
    });
    return { id: objectId(o.id, `${f}.id`), ioas: objectId(o.ioas, `${f}.ioas`), pins };
  });
  ascending(accesses, (a) => a.id, 'accesses', 'ID');

  // One ID space: no ID twice, and nextObjectId is the lowest one left free.
  const types = new Map<number, string>();
  const claim = (id: number, type: string, field: string) => {
    if (types.has(id)) bad(field, `ID ${id} is used twice`);
    types.set(id, type);
  };
  ioas.forEach((x, i) => claim(x.id, 'IOAS', `ioas[${i}].id`));
  hwpts.forEach((x, i) => claim(x.id, x.type, `hwpts[${i}].id`));
  devices.forEach((x, i) => claim(x.id, 'DEVICE', `devices[${i}].id`));
  accesses.forEach((x, i) => claim(x.id, 'ACCESS', `accesses[${i}].id`));
  let lowestFree = 1;
  while (types.has(lowestFree)) lowestFree++;
  if (lowestFree > MAX_OBJECT_ID) lowestFree = 0;
  if (nextObjectId !== lowestFree) bad('nextObjectId', `must be ${lowestFree}, the lowest ID no object uses`);

  const expect = (id: number, want: readonly string[], field: string) => {
    const t = types.get(id);
    if (t === undefined || !want.includes(t)) bad(field, `ID ${id} is not a${want.length > 1 ? ' HWPT' : `n ${want[0]}`} of the state`);
  };
  hwpts.forEach((h, i) => {
    if (h.type === 'HWPT_PAGING') expect(h.ioas, ['IOAS'], `hwpts[${i}].ioas`);
    else expect(h.parent, ['HWPT_PAGING'], `hwpts[${i}].parent`);
  });
  devices.forEach((d, i) =>
    d.attachments.forEach((a, j) => {
      if (a.target !== 'identity') expect(a.target, ['HWPT_PAGING', 'HWPT_NESTED'], `devices[${i}].attachments[${j}].target`);
    }),
  );
  accesses.forEach((a, i) => expect(a.ioas, ['IOAS'], `accesses[${i}].ioas`));
  const names = new Set<string>();
  devices.forEach((d, i) => {
    if (names.has(d.name)) bad(`devices[${i}].name`, `device '${d.name}' is listed twice`);
    names.add(d.name);
  });
  hwpts.forEach((h, i) => {
    if (h.type !== 'HWPT_PAGING' || !h.auto) return;
    // iommufd_device_auto_get_domain allocates with no flags, and the HWPT lives only while attached.
    if (h.flags !== 0) bad(`hwpts[${i}].flags`, 'an automatic HWPT has no allocation flags');
    if (!devices.some((d) => d.attachments.some((a) => a.target === h.id))) bad(`hwpts[${i}].auto`, 'an automatic HWPT without attachments cannot exist');
  });
  return { version: CONTEXT_STATE_VERSION, rlimitMode, nextObjectId, ioas, hwpts, devices, accesses };
}

/** The first place two plain-data values differ, as a field path, or undefined when equal. */
export function firstDifference(a: unknown, b: unknown, path = 'state'): string | undefined {
  if (a instanceof Uint8Array || b instanceof Uint8Array) {
    if (!(a instanceof Uint8Array && b instanceof Uint8Array) || a.length !== b.length) return path;
    return a.every((x, i) => x === b[i]) ? undefined : path;
  }
  if (Array.isArray(a) || Array.isArray(b)) {
    if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return path;
    for (let i = 0; i < a.length; i++) {
      const d = firstDifference(a[i], b[i], `${path}[${i}]`);
      if (d !== undefined) return d;
    }
    return undefined;
  }
  if (isPlainObject(a) && isPlainObject(b)) {
    const keys = Object.keys(a);
    if (keys.length !== Object.keys(b).length) return path;
    for (const k of keys) {
      const d = firstDifference(a[k], b[k], path === 'state' ? k : `${path}.${k}`);
      if (d !== undefined) return d;
    }
    return undefined;
  }
  return a === b ? undefined : path;
}

// ---- the order restore binds and attaches a group's devices in ----

/** A device of the state with its physical device (undefined: the host lacks it). */
export interface RestoreDevice {
  readonly index: number;
  readonly state: DeviceState;
  readonly phys: PhysicalDevice | undefined;
}

/**
 * The order to bind (and right away attach) the devices of one isolation group. Two attach checks
 * look at every device bound in the group at the time: a PASID must fit each one's PASID width
 * (iommu_attach_device_pasid), and the first attach of a PASID to a dirty-tracking HWPT needs each
 * one to track dirty pages. The source met them when it attached, possibly before some devices were
 * bound, so restore binds devices with wider PASIDs and dirty tracking first, and tries other orders
 * of a small group when that is not enough. Devices without attachments come last: binding checks
 * nothing. `dirtyTarget` tells whether an attachment target is (or nests on) a dirty-tracking HWPT.
 */
export function bindOrder(group: readonly RestoreDevice[], dirtyTarget: (target: number | 'identity') => boolean): RestoreDevice[] {
  const attached = group.filter((d) => d.state.attachments.length > 0);
  const idle = group.filter((d) => d.state.attachments.length === 0);
  const bits = (d: RestoreDevice) => d.phys?.pasidBits ?? 0;
  const dirty = (d: RestoreDevice) => d.phys?.dirtyTracking === true;
  const works = (order: readonly RestoreDevice[]): boolean => {
    const seen = new Set<number>();
    for (let i = 0; i < order.length; i++) {
      const bound = order.slice(0, i + 1);
      for (const a of order[i]!.state.attachments) {
        if (a.pasid !== 0 && bound.some((e) => bits(e) > 0 && a.pasid >= 2 ** bits(e))) return false;
        if (!seen.has(a.pasid) && dirtyTarget(a.target) && !bound.every(dirty)) return false;
        seen.add(a.pasid);
      }
    }
    return true;
  };
  const first = [...attached].sort((a, b) => bits(b) - bits(a) || Number(dirty(b)) - Number(dirty(a)) || a.state.id - b.state.id);
  let best = first;
  if (!works(first) && attached.length <= 6) {
    const found = permutations(first).find(works);
    if (found !== undefined) best = found;
  }
  return [...best, ...idle];
}

function permutations<T>(items: readonly T[]): T[][] {
  if (items.length <= 1) return [[...items]];
  const out: T[][] = [];
  items.forEach((x, i) => {
    for (const rest of permutations([...items.slice(0, i), ...items.slice(i + 1)])) out.push([x, ...rest]);
  });
  return out;
}
