import { STATUS_NAMES, type IommuFeatureName, type StatusName } from '../iommu/layout.js';
import {
  expectArray,
  expectBoolean,
  expectHexBytes,
  expectObject,
  expectSafe,
  expectString,
  expectU32,
  expectU64,
  FixtureError,
  listOf,
  oneOf,
  optional,
  required,
  type JsonObject,
} from './values.js';

export const GUEST_FIXTURE_FORMAT = 'viommu-guest-fixture/1';

export const IOMMU_FEATURE_NAMES = [
  'INPUT_RANGE',
  'DOMAIN_RANGE',
  'MAP_UNMAP',
  'BYPASS',
  'PROBE',
  'MMIO',
  'BYPASS_CONFIG',
  // Extension: accepted by the driver only if the device offers it (device.attachTable).
  'ATTACH_TABLE',
] as const satisfies readonly IommuFeatureName[];

export type RawExpect = StatusName | 'NONE';

interface StepBase {
  readonly note?: string;
  /** Keys this reader does not know; reported, not fatal (the format may grow). */
  readonly unknownKeys?: readonly string[];
}

export interface AttachStep extends StepBase {
  readonly op: 'attach';
  readonly domain: number;
  readonly endpoint: number;
  readonly flags: readonly 'BYPASS'[];
  readonly expect: readonly StatusName[];
}
export interface DetachStep extends StepBase {
  readonly op: 'detach';
  readonly domain: number;
  readonly endpoint: number;
  /** Extension: detach only this PASID's table binding. */
  readonly pasid?: number;
  readonly expect: readonly StatusName[];
}
/** Extension: bind a guest-owned x86-64 table (by `pageTable` name or root GPA) to an endpoint or PASID. */
export interface AttachTableStep extends StepBase {
  readonly op: 'attachTable';
  readonly domain: number;
  readonly endpoint: number;
  readonly table?: string;
  readonly root?: bigint;
  readonly addrWidth?: 48 | 57;
  readonly pasid?: number;
  readonly format?: number;
  readonly expect: readonly StatusName[];
}
/** Extension: INVALIDATE after the guest changed a table. */
export interface InvalidateStep extends StepBase {
  readonly op: 'invalidate';
  readonly domain: number;
  readonly scope: 'domain' | 'pasid' | 'address';
  readonly pasid?: number;
  readonly address?: bigint;
  readonly pages?: bigint;
  readonly pageShift?: number;
  readonly leaf?: boolean;
  readonly expect: readonly StatusName[];
}
export interface PageTableMapping {
  readonly iova: bigint;
  readonly gpa: bigint;
  readonly size: '4K' | '2M' | '1G';
  readonly write: boolean;
  readonly user: boolean;
}
/** Extension: create or edit a guest x86-64 page table in guest memory (no request is sent). */
export interface PageTableStep extends StepBase {
  readonly op: 'pageTable';
  readonly table: string;
  readonly levels?: 4 | 5;
  readonly map: readonly PageTableMapping[];
  readonly unmap: readonly { readonly iova: bigint; readonly size: bigint }[];
}
export interface MapStep extends StepBase {
  readonly op: 'map';
  readonly domain: number;
  readonly virtStart: bigint;
  readonly virtEnd: bigint;
  readonly physStart: bigint;
  readonly flags: readonly ('READ' | 'WRITE' | 'MMIO')[];
  readonly expect: readonly StatusName[];
}
export interface UnmapStep extends StepBase {
  readonly op: 'unmap';
  readonly domain: number;
  readonly virtStart: bigint;
  readonly virtEnd: bigint;
  readonly expect: readonly StatusName[];
}
export interface ExpectedProperty {
  readonly type: 'RESV_MEM';
  readonly subtype: 'RESERVED' | 'MSI';
  readonly start: bigint;
  readonly end: bigint;
}
export interface ProbeStep extends StepBase {
  readonly op: 'probe';
  readonly endpoint: number;
  readonly expect: readonly StatusName[];
  readonly expectProperties?: readonly ExpectedProperty[];
}
export interface RawStep extends StepBase {
  readonly op: 'raw';
  readonly request: Uint8Array;
  readonly writable: number;
  readonly expect: readonly RawExpect[];
}
export type RequestStep = AttachStep | DetachStep | MapStep | UnmapStep | ProbeStep | RawStep | AttachTableStep | InvalidateStep;
export interface BatchStep extends StepBase {
  readonly op: 'batch';
  readonly steps: readonly RequestStep[];
}
export interface ConfigExpect {
  readonly pageSizeMask?: bigint;
  readonly inputRange?: readonly [bigint, bigint];
  readonly domainRange?: readonly [bigint, bigint];
  readonly probeSize?: bigint;
  readonly bypass?: bigint;
}
export interface ConfigStep extends StepBase {
  readonly op: 'config';
  readonly set?: { readonly bypass: number };
  readonly expect?: ConfigExpect;
}
export interface FeaturesStep extends StepBase {
  readonly op: 'features';
  readonly expectOffered: readonly IommuFeatureName[];
}
export interface DmaStep extends StepBase {
  readonly op: 'dma';
  readonly endpoint: number;
  readonly address: bigint;
  readonly length: number;
  readonly access: 'read' | 'write';
  readonly pasid?: number;
  readonly expect: 'ok' | 'fault';
}
export interface ExpectFaultStep extends StepBase {
  readonly op: 'expectFault';
  readonly none?: true;
  readonly reason?: 'UNKNOWN' | 'DOMAIN' | 'MAPPING';
  readonly endpoint?: number;
  readonly address?: bigint;
  readonly flags?: readonly ('READ' | 'WRITE' | 'EXEC' | 'ADDRESS' | 'PASID')[];
  /** Extension: the PASID the record must carry. */
  readonly pasid?: number;
}
export interface ResetStep extends StepBase {
  readonly op: 'reset';
}
export type GuestStep = RequestStep | BatchStep | ConfigStep | FeaturesStep | DmaStep | ExpectFaultStep | ResetStep | PageTableStep;

export interface GuestFixture {
  readonly format: typeof GUEST_FIXTURE_FORMAT;
  readonly name: string;
  readonly description?: string;
  readonly device: {
    readonly driverFeatures: readonly IommuFeatureName[];
    readonly bootBypass: boolean;
    /** Extension: the device offers ATTACH_TABLE (guest-owned tables per PASID). */
    readonly attachTable: boolean;
    /** Extension: PASID width of every endpoint (0: none). */
    readonly pasidBits: number;
  };
  readonly memorySize: number;
  readonly endpoints: readonly number[];
  readonly steps: readonly GuestStep[];
}

export const DEFAULT_MEMORY_SIZE = 256 * 1024 * 1024;

function numberIn<T extends number>(allowed: readonly T[]) {
  return (v: unknown, p: string): T => {
    if (typeof v !== 'number' || !(allowed as readonly number[]).includes(v)) throw new FixtureError(p, `expected one of ${allowed.join(', ')}`);
    return v as T;
  };
}

function expectPasid(v: unknown, p: string): number {
  const n = expectU32(v, p);
  if (n >= 1 << 20) throw new FixtureError(p, 'PASIDs have 20 bits');
  return n;
}

const statusName = oneOf(STATUS_NAMES);
const rawName = oneOf([...STATUS_NAMES, 'NONE'] as const);

function statusList<T extends string>(read: (v: unknown, p: string) => T) {
  return (v: unknown, p: string): T[] => {
    if (Array.isArray(v)) {
      if (v.length === 0) throw new FixtureError(p, 'expected at least one status');
      return v.map((item, i) => read(item, `${p}[${i}]`));
    }
    return [read(v, p)];
  };
}

const STEP_KEYS: Record<GuestStep['op'], readonly string[]> = {
  attach: ['domain', 'endpoint', 'flags', 'expect'],
  detach: ['domain', 'endpoint', 'pasid', 'expect'],
  attachTable: ['domain', 'endpoint', 'table', 'root', 'addrWidth', 'pasid', 'format', 'expect'],
  invalidate: ['domain', 'scope', 'pasid', 'address', 'pages', 'pageShift', 'leaf', 'expect'],
  pageTable: ['table', 'levels', 'map', 'unmap'],
  map: ['domain', 'virtStart', 'virtEnd', 'physStart', 'flags', 'expect'],
  unmap: ['domain', 'virtStart', 'virtEnd', 'expect'],
  probe: ['endpoint', 'expect', 'expectProperties'],
  raw: ['request', 'writable', 'expect'],
  batch: ['steps'],
  config: ['set', 'expect'],
  features: ['expectOffered'],
  dma: ['endpoint', 'address', 'length', 'access', 'pasid', 'expect'],
  expectFault: ['reason', 'endpoint', 'address', 'flags', 'pasid', 'none'],
  reset: [],
};

function base(obj: JsonObject, op: GuestStep['op'], path: string): StepBase {
  const note = optional(obj, 'note', path, expectString);
  const known = new Set(['op', 'note', ...STEP_KEYS[op]]);
  const unknownKeys = Object.keys(obj).filter((k) => !known.has(k));
  return { ...(note !== undefined ? { note } : {}), ...(unknownKeys.length > 0 ? { unknownKeys } : {}) };
}

function parseRequestStep(obj: JsonObject, path: string): RequestStep {
  const op = required(obj, 'op', path, oneOf(['attach', 'detach', 'map', 'unmap', 'probe', 'raw', 'attachTable', 'invalidate'] as const));
  const b = base(obj, op, path);
  const expect = () => optional(obj, 'expect', path, statusList(statusName)) ?? (['OK'] as StatusName[]);
  switch (op) {
    case 'attach':
      return {
        op,
        ...b,
        domain: required(obj, 'domain', path, expectU32),
        endpoint: required(obj, 'endpoint', path, expectU32),
        flags: optional(obj, 'flags', path, listOf(oneOf(['BYPASS'] as const))) ?? [],
        expect: expect(),
      };
    case 'detach': {
      const pasid = optional(obj, 'pasid', path, expectPasid);
      return {
        op,
        ...b,
        domain: required(obj, 'domain', path, expectU32),
        endpoint: required(obj, 'endpoint', path, expectU32),
        ...(pasid !== undefined ? { pasid } : {}),
        expect: expect(),
      };
    }
    case 'attachTable': {
      const table = optional(obj, 'table', path, expectString);
      const root = optional(obj, 'root', path, expectU64);
      if ((table === undefined) === (root === undefined)) throw new FixtureError(path, 'attachTable needs exactly one of table and root');
      const addrWidth = optional(obj, 'addrWidth', path, numberIn([48, 57] as const));
      const pasid = optional(obj, 'pasid', path, expectPasid);
      const format = optional(obj, 'format', path, expectU32);
      return {
        op,
        ...b,
        domain: required(obj, 'domain', path, expectU32),
        endpoint: required(obj, 'endpoint', path, expectU32),
        ...(table !== undefined ? { table } : {}),
        ...(root !== undefined ? { root } : {}),
        ...(addrWidth !== undefined ? { addrWidth } : {}),
        ...(pasid !== undefined ? { pasid } : {}),
        ...(format !== undefined ? { format: format & 0xff } : {}),
        expect: expect(),
      };
    }
    case 'invalidate': {
      const scope = required(obj, 'scope', path, oneOf(['domain', 'pasid', 'address'] as const));
      const pasid = optional(obj, 'pasid', path, expectPasid);
      const address = optional(obj, 'address', path, expectU64);
      const pages = optional(obj, 'pages', path, expectU64);
      const pageShift = optional(obj, 'pageShift', path, expectU32);
      const leaf = optional(obj, 'leaf', path, expectBoolean);
      if (scope === 'address' && (address === undefined || pages === undefined)) throw new FixtureError(path, 'scope "address" needs address and pages');
      return {
        op,
        ...b,
        domain: required(obj, 'domain', path, expectU32),
        scope,
        ...(pasid !== undefined ? { pasid } : {}),
        ...(address !== undefined ? { address } : {}),
        ...(pages !== undefined ? { pages } : {}),
        ...(pageShift !== undefined ? { pageShift: pageShift & 0xff } : {}),
        ...(leaf !== undefined ? { leaf } : {}),
        expect: expect(),
      };
    }
    case 'map':
      return {
        op,
        ...b,
        domain: required(obj, 'domain', path, expectU32),
        virtStart: required(obj, 'virtStart', path, expectU64),
        virtEnd: required(obj, 'virtEnd', path, expectU64),
        physStart: required(obj, 'physStart', path, expectU64),
        flags: optional(obj, 'flags', path, listOf(oneOf(['READ', 'WRITE', 'MMIO'] as const))) ?? [],
        expect: expect(),
      };
    case 'unmap':
      return {
        op,
        ...b,
        domain: required(obj, 'domain', path, expectU32),
        virtStart: required(obj, 'virtStart', path, expectU64),
        virtEnd: required(obj, 'virtEnd', path, expectU64),
        expect: expect(),
      };
    case 'probe': {
      const props = optional(
        obj,
        'expectProperties',
        path,
        listOf((v, p): ExpectedProperty => {
          const o = expectObject(v, p);
          return {
            type: required(o, 'type', p, oneOf(['RESV_MEM'] as const)),
            subtype: required(o, 'subtype', p, oneOf(['RESERVED', 'MSI'] as const)),
            start: required(o, 'start', p, expectU64),
            end: required(o, 'end', p, expectU64),
          };
        }),
      );
      return {
        op,
        ...b,
        endpoint: required(obj, 'endpoint', path, expectU32),
        expect: expect(),
        ...(props !== undefined ? { expectProperties: props } : {}),
      };
    }
    case 'raw': {
      const writable = required(obj, 'writable', path, expectSafe);
      if (writable > 1 << 20) throw new FixtureError(`${path}.writable`, 'at most 1 MiB');
      const request = required(obj, 'request', path, expectHexBytes);
      if (request.length > 1 << 20) throw new FixtureError(`${path}.request`, 'at most 1 MiB');
      return {
        op,
        ...b,
        request,
        writable,
        expect: optional(obj, 'expect', path, statusList(rawName)) ?? ['OK'],
      };
    }
  }
}

function parseRange(v: unknown, p: string): readonly [bigint, bigint] {
  const a = expectArray(v, p);
  if (a.length !== 2) throw new FixtureError(p, 'expected [start, end]');
  return [expectU64(a[0], `${p}[0]`), expectU64(a[1], `${p}[1]`)];
}

function parseStep(value: unknown, path: string): GuestStep {
  const obj = expectObject(value, path);
  const op = required(obj, 'op', path, expectString);
  switch (op) {
    case 'attach':
    case 'detach':
    case 'map':
    case 'unmap':
    case 'probe':
    case 'raw':
    case 'attachTable':
    case 'invalidate':
      return parseRequestStep(obj, path);
    case 'batch': {
      const steps = required(obj, 'steps', path, (v, p) =>
        expectArray(v, p).map((s, i) => parseRequestStep(expectObject(s, `${p}[${i}]`), `${p}[${i}]`)),
      );
      if (steps.length === 0) throw new FixtureError(`${path}.steps`, 'a batch needs at least one request');
      return { op, ...base(obj, op, path), steps };
    }
    case 'config': {
      const set = optional(obj, 'set', path, (v, p) => {
        const o = expectObject(v, p);
        for (const k of Object.keys(o)) {
          if (k !== 'bypass') throw new FixtureError(`${p}.${k}`, 'only bypass is driver-writable');
        }
        return { bypass: Number(required(o, 'bypass', p, expectU32)) };
      });
      const expect = optional(obj, 'expect', path, (v, p): ConfigExpect => {
        const o = expectObject(v, p);
        const known = ['pageSizeMask', 'inputRange', 'domainRange', 'probeSize', 'bypass'];
        for (const k of Object.keys(o)) if (!known.includes(k)) throw new FixtureError(`${p}.${k}`, 'unknown config field');
        const out: { -readonly [K in keyof ConfigExpect]: ConfigExpect[K] } = {};
        const psm = optional(o, 'pageSizeMask', p, expectU64);
        if (psm !== undefined) out.pageSizeMask = psm;
        const ir = optional(o, 'inputRange', p, parseRange);
        if (ir !== undefined) out.inputRange = ir;
        const dr = optional(o, 'domainRange', p, parseRange);
        if (dr !== undefined) out.domainRange = dr;
        const ps = optional(o, 'probeSize', p, expectU64);
        if (ps !== undefined) out.probeSize = ps;
        const by = optional(o, 'bypass', p, expectU64);
        if (by !== undefined) out.bypass = by;
        return out;
      });
      if (set === undefined && expect === undefined) throw new FixtureError(path, 'config needs set and/or expect');
      return { op, ...base(obj, op, path), ...(set ? { set } : {}), ...(expect ? { expect } : {}) };
    }
    case 'features':
      return {
        op,
        ...base(obj, op, path),
        expectOffered: required(obj, 'expectOffered', path, listOf(oneOf(IOMMU_FEATURE_NAMES))),
      };
    case 'dma': {
      const length = required(obj, 'length', path, expectSafe);
      if (length === 0 || length > 1 << 24) throw new FixtureError(`${path}.length`, 'must be 1 byte to 16 MiB');
      const pasid = optional(obj, 'pasid', path, expectU32);
      if (pasid !== undefined && pasid >= 1 << 20) throw new FixtureError(`${path}.pasid`, 'PASIDs have 20 bits');
      return {
        op,
        ...base(obj, op, path),
        endpoint: required(obj, 'endpoint', path, expectU32),
        address: required(obj, 'address', path, expectU64),
        length,
        access: required(obj, 'access', path, oneOf(['read', 'write'] as const)),
        ...(pasid !== undefined ? { pasid } : {}),
        expect: optional(obj, 'expect', path, oneOf(['ok', 'fault'] as const)) ?? 'ok',
      };
    }
    case 'expectFault': {
      const none = optional(obj, 'none', path, expectBoolean);
      const b = base(obj, op, path);
      if (none === true) {
        for (const k of ['reason', 'endpoint', 'address', 'flags', 'pasid']) {
          if (obj[k] !== undefined) throw new FixtureError(`${path}.${k}`, 'not allowed with "none": true');
        }
        return { op, ...b, none: true };
      }
      const reason = optional(obj, 'reason', path, oneOf(['UNKNOWN', 'DOMAIN', 'MAPPING'] as const));
      const endpoint = optional(obj, 'endpoint', path, expectU32);
      const address = optional(obj, 'address', path, expectU64);
      const flags = optional(obj, 'flags', path, listOf(oneOf(['READ', 'WRITE', 'EXEC', 'ADDRESS', 'PASID'] as const)));
      const pasid = optional(obj, 'pasid', path, expectPasid);
      return {
        op,
        ...b,
        ...(pasid !== undefined ? { pasid } : {}),
        ...(reason !== undefined ? { reason } : {}),
        ...(endpoint !== undefined ? { endpoint } : {}),
        ...(address !== undefined ? { address } : {}),
        ...(flags !== undefined ? { flags } : {}),
      };
    }
    case 'reset':
      return { op, ...base(obj, op, path) };
    case 'pageTable': {
      const table = required(obj, 'table', path, expectString);
      const levels = optional(obj, 'levels', path, numberIn([4, 5] as const));
      const map = optional(obj, 'map', path, (v, p) =>
        expectArray(v, p).map((m, i): PageTableMapping => {
          const q = `${p}[${i}]`;
          const o = expectObject(m, q);
          return {
            iova: required(o, 'iova', q, expectU64),
            gpa: required(o, 'gpa', q, expectU64),
            size: optional(o, 'size', q, oneOf(['4K', '2M', '1G'] as const)) ?? '4K',
            write: optional(o, 'write', q, expectBoolean) ?? true,
            // DMA counts as a user access (no supervisor requests): mappings are user unless told otherwise.
            user: optional(o, 'user', q, expectBoolean) ?? true,
          };
        }),
      ) ?? [];
      const unmap = optional(obj, 'unmap', path, (v, p) =>
        expectArray(v, p).map((m, i) => {
          const q = `${p}[${i}]`;
          const o = expectObject(m, q);
          return { iova: required(o, 'iova', q, expectU64), size: required(o, 'size', q, expectU64) };
        }),
      ) ?? [];
      return { op, ...base(obj, op, path), table, ...(levels !== undefined ? { levels } : {}), map, unmap };
    }
    default:
      throw new FixtureError(`${path}.op`, `unknown op ${JSON.stringify(op)}`);
  }
}

/** Validates a parsed JSON document as a guest fixture; errors name the JSON path. */
export function parseGuestFixture(doc: unknown): GuestFixture {
  const top = expectObject(doc, '$');
  const format = required(top, 'format', '$', expectString);
  if (format !== GUEST_FIXTURE_FORMAT) {
    throw new FixtureError('$.format', `expected ${JSON.stringify(GUEST_FIXTURE_FORMAT)}, got ${JSON.stringify(format)}`);
  }
  const name = required(top, 'name', '$', expectString);
  const description = optional(top, 'description', '$', expectString);
  const device = optional(top, 'device', '$', expectObject) ?? {};
  const driverFeatures = optional(device, 'driverFeatures', '$.device', listOf(oneOf(IOMMU_FEATURE_NAMES))) ?? [
    ...IOMMU_FEATURE_NAMES,
  ];
  const bootBypass = optional(device, 'bootBypass', '$.device', expectBoolean) ?? true;
  const attachTable = optional(device, 'attachTable', '$.device', expectBoolean) ?? false;
  const pasidBits = optional(device, 'pasidBits', '$.device', expectU32) ?? 0;
  if (pasidBits > 20) throw new FixtureError('$.device.pasidBits', 'PASIDs have at most 20 bits');
  const memory = optional(top, 'memory', '$', expectObject);
  const memorySize = memory === undefined ? DEFAULT_MEMORY_SIZE : required(memory, 'size', '$.memory', expectSafe);
  if (memorySize < 1 << 20 || memorySize > 16 * 2 ** 30 || memorySize % 4096 !== 0) {
    throw new FixtureError('$.memory.size', 'must be a multiple of 4 KiB between 1 MiB and 16 GiB');
  }
  const endpoints = required(top, 'endpoints', '$', listOf(expectU32));
  if (new Set(endpoints).size !== endpoints.length) throw new FixtureError('$.endpoints', 'endpoint IDs must be unique');
  if (endpoints.length > 256) throw new FixtureError('$.endpoints', 'at most 256 endpoints');
  const steps = required(top, 'steps', '$', (v, p) => expectArray(v, p).map((s, i) => parseStep(s, `${p}[${i}]`)));
  return {
    format: GUEST_FIXTURE_FORMAT,
    name,
    ...(description !== undefined ? { description } : {}),
    device: { driverFeatures, bootBypass, attachTable, pasidBits },
    memorySize,
    endpoints,
    steps,
  };
}
