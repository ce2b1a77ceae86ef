import type { Errno } from '../ioasid/errors.js';
import { MAX_PASID_BITS } from '../ioasid/uapi.js';
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
  type Json,
  type JsonObject,
} from './values.js';

export const BACKEND_FIXTURE_FORMAT = 'ioasid-backend-fixture/1';

/** Every errno the backend can answer (the format's list plus EDEADLOCK, EBADF and E2BIG). */
export const ERRNO_NAMES = [
  'EINVAL',
  'ENOENT',
  'EBUSY',
  'ENOMEM',
  'ERANGE',
  'EEXIST',
  'EOPNOTSUPP',
  'EFAULT',
  'ENOSPC',
  'EPERM',
  'EOVERFLOW',
  'EADDRINUSE',
  'EMSGSIZE',
  'ENODEV',
  'E2BIG',
  'EDEADLOCK',
  'EBADF',
] as const satisfies readonly Errno[];
// Fails to compile when the backend grows an errno this list lacks.
type MissingErrno = Exclude<Errno, (typeof ERRNO_NAMES)[number]>;
const everyErrnoListed: [MissingErrno] extends [never] ? true : never = true;
void everyErrnoListed;

/** What a step may end with: success, or one of the errno names. */
export type Outcome = 'ok' | Errno;

/**
 * Where a step expects an ID or an IOVA: a literal (bigint), a name bound by an earlier step's
 * `out` (string), or such a name plus an offset ("buf+0x1000", for IOVAs the backend chose). A
 * declared device's name also works: it stands for the ID the device was last bound to in the
 * step's context.
 */
export type ValueRef = bigint | string | { readonly name: string; readonly offset: bigint };

export const MAP_FLAG_NAMES = ['FIXED_IOVA', 'WRITEABLE', 'READABLE'] as const;
export const HWPT_FLAG_NAMES = ['NEST_PARENT', 'DIRTY_TRACKING', 'FAULT_ID_VALID', 'PASID'] as const;
export const CAPABILITY_NAMES = ['DIRTY_TRACKING'] as const;
export const FAULT_REASONS = ['DOMAIN', 'MAPPING', 'PERMISSION'] as const;
export type FaultReasonName = (typeof FAULT_REASONS)[number];

interface StepBase {
  /** The context the step runs in ("default" unless given). */
  readonly context: string;
  readonly expect: readonly Outcome[];
  readonly note?: string;
  /** Keys this reader does not know; reported as warnings (the format may grow). */
  readonly unknownKeys?: readonly string[];
}

export interface OpenStep extends StepBase {
  readonly op: 'open';
  readonly name: string;
}
export interface CloseStep extends StepBase {
  readonly op: 'close';
}
export interface IoasAllocStep extends StepBase {
  readonly op: 'ioasAlloc';
  readonly out?: string;
}
export interface IoasMapStep extends StepBase {
  readonly op: 'ioasMap';
  readonly ioas: ValueRef;
  readonly gpa: number;
  readonly length: bigint;
  readonly iova?: ValueRef;
  /** IoasMapFlag bits. */
  readonly flags: number;
  readonly out?: string;
  readonly expectIova?: bigint;
  readonly expectIovaAlignment?: bigint;
  readonly expectIovaWithin?: readonly [bigint, bigint];
  readonly expectIovaOutside?: readonly [bigint, bigint];
}
export interface IoasUnmapStep extends StepBase {
  readonly op: 'ioasUnmap';
  readonly ioas: ValueRef;
  readonly iova: ValueRef;
  readonly length: bigint;
  readonly expectLength?: bigint;
}
export interface IoasCopyStep extends StepBase {
  readonly op: 'ioasCopy';
  readonly srcIoas: ValueRef;
  readonly srcIova: ValueRef;
  readonly dstIoas: ValueRef;
  readonly dstIova?: ValueRef;
  readonly length: bigint;
  readonly flags: number;
  readonly out?: string;
  readonly expectIova?: bigint;
  readonly expectIovaAlignment?: bigint;
  readonly expectIovaWithin?: readonly [bigint, bigint];
  readonly expectIovaOutside?: readonly [bigint, bigint];
}
export interface IoasIovaRangesStep extends StepBase {
  readonly op: 'ioasIovaRanges';
  readonly ioas: ValueRef;
  /** The caller's num_iovas: fewer slots than ranges is EMSGSIZE. */
  readonly maxRanges?: number;
  /** The ranges reported (with EMSGSIZE: the ones that fit). */
  readonly expectRanges?: readonly (readonly [bigint, bigint])[];
  readonly expectAlignment?: bigint;
  /** How many ranges exist (num_iovas written back, also with EMSGSIZE). */
  readonly expectNumIovas?: number;
}
export interface IoasAllowIovasStep extends StepBase {
  readonly op: 'ioasAllowIovas';
  readonly ioas: ValueRef;
  readonly ranges: readonly (readonly [bigint, bigint])[];
}
export interface OptionStep extends StepBase {
  readonly op: 'option';
  readonly option: 'RLIMIT_MODE' | 'HUGE_PAGES';
  readonly object?: ValueRef;
  readonly set?: bigint;
  readonly expectValue?: bigint;
}
export interface DeviceBindStep extends StepBase {
  readonly op: 'deviceBind';
  /** A declared device's name. */
  readonly device: string;
  readonly out?: string;
}
export interface DeviceUnbindStep extends StepBase {
  readonly op: 'deviceUnbind';
  readonly device: ValueRef;
}
export interface DeviceAttachStep extends StepBase {
  readonly op: 'deviceAttach';
  readonly device: ValueRef;
  readonly pt: ValueRef;
  readonly pasid?: number;
  /** Names the HWPT the device now uses (an automatic one when `pt` is an IOAS). */
  readonly out?: string;
}
export interface DeviceDetachStep extends StepBase {
  readonly op: 'deviceDetach';
  readonly device: ValueRef;
  readonly pasid?: number;
}
export interface Stage1Data {
  readonly type: 'X86_64_S1';
  /** Guest-physical address of the stage-1 root table. */
  readonly root: bigint;
}
export interface HwptAllocStep extends StepBase {
  readonly op: 'hwptAlloc';
  readonly device: ValueRef;
  readonly pt: ValueRef;
  /** HwptAllocFlag bits. */
  readonly flags: number;
  readonly data?: Stage1Data;
  readonly out?: string;
}
export interface InvalidateEntry {
  readonly addr: bigint;
  readonly npages: bigint;
  readonly leaf: boolean;
}
export interface HwptInvalidateStep extends StepBase {
  readonly op: 'hwptInvalidate';
  readonly hwpt: ValueRef;
  readonly entries: readonly InvalidateEntry[];
  readonly expectHandled?: number;
}
export interface SetDirtyTrackingStep extends StepBase {
  readonly op: 'setDirtyTracking';
  readonly hwpt: ValueRef;
  readonly enable: boolean;
}
export interface GetDirtyBitmapStep extends StepBase {
  readonly op: 'getDirtyBitmap';
  readonly hwpt: ValueRef;
  readonly iova: ValueRef;
  readonly length: bigint;
  readonly pageSize: bigint;
  readonly noClear: boolean;
  readonly expectDirty?: readonly bigint[];
}
export interface HwInfoExpect {
  readonly maxPasidLog2?: number;
  readonly capabilities?: readonly (typeof CAPABILITY_NAMES)[number][];
}
export interface GetHwInfoStep extends StepBase {
  readonly op: 'getHwInfo';
  readonly device: ValueRef;
  readonly expectInfo?: HwInfoExpect;
}
export interface DestroyStep extends StepBase {
  readonly op: 'destroy';
  readonly id: ValueRef;
}
export interface AccessCreateStep extends StepBase {
  readonly op: 'accessCreate';
  readonly ioas: ValueRef;
  /** What the consumer does when told an IOVA range goes away: unpin what it holds there (default), or keep it. */
  readonly onUnmap: 'unpin' | 'keep';
  readonly out?: string;
}
export interface AccessDestroyStep extends StepBase {
  readonly op: 'accessDestroy';
  readonly access: ValueRef;
}
export interface AccessRwStep extends StepBase {
  readonly op: 'accessRw';
  readonly access: ValueRef;
  readonly iova: ValueRef;
  /** Bytes to write; absent for a read. */
  readonly write?: Uint8Array;
  readonly readLength?: number;
  readonly expectRead?: Uint8Array;
}
export interface AccessPinStep extends StepBase {
  readonly op: 'accessPin';
  readonly access: ValueRef;
  readonly iova: ValueRef;
  readonly length: bigint;
  /** The pin needs write access (IOMMUFD_ACCESS_RW_WRITE). */
  readonly write: boolean;
  /** The guest-physical address of each pinned page. */
  readonly expectGpas?: readonly bigint[];
}
export interface AccessUnpinStep extends StepBase {
  readonly op: 'accessUnpin';
  readonly access: ValueRef;
  readonly iova: ValueRef;
  readonly length: bigint;
}
export interface TranslateStep extends StepBase {
  readonly op: 'translate';
  readonly device: ValueRef;
  readonly pasid?: number;
  readonly iova: ValueRef;
  readonly length: number;
  readonly access: 'read' | 'write';
  /** The DMA lands, contiguously, at this guest-physical address. */
  readonly expectGpa?: bigint;
  /** The DMA lands in these [gpa, length] pieces, in order. */
  readonly expectSpans?: readonly (readonly [bigint, number])[];
  /** The DMA faults: true for any reason, or the reason it must have. */
  readonly expectFault?: true | FaultReasonName;
}
export interface MemWriteStep extends StepBase {
  readonly op: 'memWrite';
  readonly gpa: number;
  readonly data: Uint8Array;
}
export interface MemReadStep extends StepBase {
  readonly op: 'memRead';
  readonly gpa: number;
  readonly length: number;
  readonly expectData?: Uint8Array;
}
export interface StatsExpect {
  readonly pinnedPages?: number;
  readonly accountedPages?: number;
  readonly pinReferences?: number;
}
export interface StatsStep extends StepBase {
  readonly op: 'stats';
  readonly expectStats?: StatsExpect;
}

export type BackendStep =
  | OpenStep
  | CloseStep
  | IoasAllocStep
  | IoasMapStep
  | IoasUnmapStep
  | IoasCopyStep
  | IoasIovaRangesStep
  | IoasAllowIovasStep
  | OptionStep
  | DeviceBindStep
  | DeviceUnbindStep
  | DeviceAttachStep
  | DeviceDetachStep
  | HwptAllocStep
  | HwptInvalidateStep
  | SetDirtyTrackingStep
  | GetDirtyBitmapStep
  | GetHwInfoStep
  | DestroyStep
  | AccessCreateStep
  | AccessDestroyStep
  | AccessRwStep
  | AccessPinStep
  | AccessUnpinStep
  | TranslateStep
  | MemWriteStep
  | MemReadStep
  | StatsStep;

export type BackendOp = BackendStep['op'];

export interface DeviceDecl {
  readonly name: string;
  /** Isolation-group key: devices with the same key share a group. */
  readonly group: string;
  readonly reservedRegions: readonly (readonly [bigint, bigint])[];
  readonly pasidBits: number;
  readonly dirtyTracking: boolean;
}

export interface BackendFixture {
  readonly format: typeof BACKEND_FIXTURE_FORMAT;
  readonly name: string;
  readonly description?: string;
  readonly memorySize: number;
  /** RLIMIT_MEMLOCK in pages; undefined: unlimited. */
  readonly memlockPages?: number;
  readonly devices: readonly DeviceDecl[];
  readonly steps: readonly BackendStep[];
}

export const DEFAULT_MEMORY_SIZE = 256 * 1024 * 1024;
export const DEFAULT_CONTEXT = 'default';
/** Largest byte string or DMA a step may carry: keeps a hostile fixture from exhausting memory. */
export const MAX_STEP_BYTES = 16 << 20;
const MAX_STEPS = 100_000;
const MAX_DEVICES = 256;
/** Each open context reserves its own table pool: a hostile fixture may not open thousands. */
const MAX_OPENS = 256;
const MAX_LIST = 4096;

const PAGE = 4096;

/** Keys each op reads besides op, context, note and expect. */
const STEP_KEYS: Record<BackendOp, readonly string[]> = {
  open: ['name'],
  close: [],
  ioasAlloc: ['out'],
  ioasMap: ['ioas', 'gpa', 'length', 'iova', 'flags', 'out', 'expectIova', 'expectIovaAlignment', 'expectIovaWithin', 'expectIovaOutside'],
  ioasUnmap: ['ioas', 'iova', 'length', 'expectLength'],
  ioasCopy: ['srcIoas', 'srcIova', 'dstIoas', 'dstIova', 'length', 'flags', 'out', 'expectIova', 'expectIovaAlignment', 'expectIovaWithin', 'expectIovaOutside'],
  ioasIovaRanges: ['ioas', 'maxRanges', 'expectRanges', 'expectAlignment', 'expectNumIovas'],
  ioasAllowIovas: ['ioas', 'ranges'],
  option: ['option', 'object', 'set', 'expectValue'],
  deviceBind: ['device', 'out'],
  deviceUnbind: ['device'],
  deviceAttach: ['device', 'pt', 'pasid', 'out'],
  deviceDetach: ['device', 'pasid'],
  hwptAlloc: ['device', 'pt', 'flags', 'data', 'out'],
  hwptInvalidate: ['hwpt', 'entries', 'expectHandled'],
  setDirtyTracking: ['hwpt', 'enable'],
  getDirtyBitmap: ['hwpt', 'iova', 'length', 'pageSize', 'flags', 'expectDirty'],
  getHwInfo: ['device'],
  destroy: ['id'],
  accessCreate: ['ioas', 'onUnmap', 'out'],
  accessDestroy: ['access'],
  accessRw: ['access', 'iova', 'write', 'readLength', 'expectRead'],
  accessPin: ['access', 'iova', 'length', 'flags', 'expectGpas'],
  accessUnpin: ['access', 'iova', 'length'],
  translate: ['device', 'pasid', 'iova', 'length', 'access', 'expectGpa', 'expectSpans', 'expectFault'],
  memWrite: ['gpa', 'data'],
  memRead: ['gpa', 'length', 'expectData'],
  stats: [],
};
const OPS = Object.keys(STEP_KEYS) as BackendOp[];

/** A "0x…" string is a number; any other string names a value bound earlier. */
const HEX_NUMBER = /^0[xX]/;
/** "name+offset": a bound value plus a number (decimal or "0x…"). */
const NAME_PLUS = /^(.+)\+(0[xX][0-9a-fA-F]{1,16}|[0-9]{1,16})$/;

const errnoOrOk = oneOf<Outcome>(['ok', ...ERRNO_NAMES]);

function outcomes(value: unknown, path: string): Outcome[] {
  if (Array.isArray(value)) {
    if (value.length === 0) throw new FixtureError(path, 'expected at least one outcome');
    if (value.length > ERRNO_NAMES.length + 1) throw new FixtureError(path, 'too many outcomes');
    return value.map((v, i) => errnoOrOk(v, `${path}[${i}]`));
  }
  return [errnoOrOk(value, path)];
}

/** A name a step binds with `out`: not empty, not a number, short. */
function bindingName(value: unknown, path: string): string {
  const s = expectString(value, path);
  if (s === '' || s.length > 200) throw new FixtureError(path, 'a name must have 1 to 200 characters');
  if (HEX_NUMBER.test(s)) throw new FixtureError(path, 'a name must not look like a "0x…" number');
  return s;
}

/** Range check for a number used in a step (messages name the path). */
function bounded(value: number, path: string, min: number, max: number, what: string): number {
  if (value < min || value > max) throw new FixtureError(path, `${what} must be in [${min}, ${max}], got ${value}`);
  return value;
}

function rangePair(value: unknown, path: string): readonly [bigint, bigint] {
  const a = expectArray(value, path);
  if (a.length !== 2) throw new FixtureError(path, 'expected [start, last]');
  const start = expectU64(a[0], `${path}[0]`);
  const last = expectU64(a[1], `${path}[1]`);
  return [start, last];
}

function boundedList<T>(read: (v: unknown, p: string) => T, max = MAX_LIST): (v: unknown, p: string) => T[] {
  return (v, p) => {
    const a = expectArray(v, p);
    if (a.length > max) throw new FixtureError(p, `at most ${max} entries`);
    return a.map((item, i) => read(item, `${p}[${i}]`));
  };
}

/** Flags as names from `names` (bit i = names[i]) or, as an extension, the raw u32 bits. */
function flagBits(names: readonly string[]): (v: unknown, p: string) => number {
  const name = oneOf(names);
  return (v, p) => {
    if (typeof v === 'number' || (typeof v === 'string' && HEX_NUMBER.test(v))) return expectU32(v, p);
    let bits = 0;
    for (const [i, item] of expectArray(v, p).entries()) bits |= 1 << names.indexOf(name(item, `${p}[${i}]`));
    return bits >>> 0;
  };
}

function hexBytes(max: number): (v: unknown, p: string) => Uint8Array {
  return (v, p) => {
    if (typeof v === 'string' && v.length > 2 * max + 4096) throw new FixtureError(p, `at most ${max} bytes`);
    const bytes = expectHexBytes(v, p);
    if (bytes.length > max) throw new FixtureError(p, `at most ${max} bytes`);
    return bytes;
  };
}

function pasidNumber(value: unknown, path: string): number {
  return bounded(expectU32(value, path), path, 0, 2 ** MAX_PASID_BITS - 1, 'a PASID');
}

/**
 * Validates a parsed JSON document as a backend fixture. Every problem is a FixtureError naming
 * the JSON path, including references to names no earlier step binds and contexts never opened.
 */
export function parseBackendFixture(doc: unknown): BackendFixture {
  const top = expectObject(doc, '$');
  const format = required(top, 'format', '$', expectString);
  if (format !== BACKEND_FIXTURE_FORMAT) {
    throw new FixtureError('$.format', `expected ${JSON.stringify(BACKEND_FIXTURE_FORMAT)}, got ${JSON.stringify(format)}`);
  }
  const name = required(top, 'name', '$', expectString);
  const description = optional(top, 'description', '$', expectString);
  const memory = optional(top, 'memory', '$', expectObject);
  const memorySize = memory === undefined ? DEFAULT_MEMORY_SIZE : required(memory, 'size', '$.memory', expectSafe);
  if (memorySize < 1 << 20 || memorySize > 16 * 2 ** 30 || memorySize % PAGE !== 0) {
    throw new FixtureError('$.memory.size', 'must be a multiple of 4 KiB between 1 MiB and 16 GiB');
  }
  const memlockPages = optional(top, 'memlockPages', '$', expectSafe);
  const devices = optional(top, 'devices', '$', boundedList(parseDevice, MAX_DEVICES)) ?? [];
  const seen = new Set<string>();
  for (const [i, d] of devices.entries()) {
    if (seen.has(d.name)) throw new FixtureError(`$.devices[${i}].name`, `device ${JSON.stringify(d.name)} is declared twice`);
    seen.add(d.name);
  }
  const rawSteps = required(top, 'steps', '$', expectArray);
  if (rawSteps.length > MAX_STEPS) throw new FixtureError('$.steps', `at most ${MAX_STEPS} steps`);
  const scope = new Scope(seen);
  const steps = rawSteps.map((s, i) => parseStep(s, `$.steps[${i}]`, memorySize, scope));
  return {
    format: BACKEND_FIXTURE_FORMAT,
    name,
    ...(description !== undefined ? { description } : {}),
    memorySize,
    ...(memlockPages !== undefined ? { memlockPages } : {}),
    devices,
    steps,
  };
}

function parseDevice(value: unknown, path: string): DeviceDecl {
  const o = expectObject(value, path);
  for (const k of Object.keys(o)) {
    if (!['name', 'group', 'reservedRegions', 'pasidBits', 'dirtyTracking'].includes(k)) throw new FixtureError(`${path}.${k}`, 'unknown device key');
  }
  const name = required(o, 'name', path, expectString);
  if (name === '' || name.length > 200) throw new FixtureError(`${path}.name`, 'a device name must have 1 to 200 characters');
  const group = optional(o, 'group', path, expectU32);
  const reservedRegions = optional(o, 'reservedRegions', path, boundedList(rangePair)) ?? [];
  for (const [i, [start, last]] of reservedRegions.entries()) {
    if (start > last) throw new FixtureError(`${path}.reservedRegions[${i}]`, 'start is after last');
  }
  const pasidBits = optional(o, 'pasidBits', path, expectU32) ?? 0;
  bounded(pasidBits, `${path}.pasidBits`, 0, MAX_PASID_BITS, 'pasidBits');
  return {
    name,
    // A device without a group is alone in its own; the prefixes keep the two kinds of key apart.
    group: group === undefined ? `own:${name}` : `group:${group}`,
    reservedRegions,
    pasidBits,
    dirtyTracking: optional(o, 'dirtyTracking', path, expectBoolean) ?? true,
  };
}

/** What the steps so far have made known: names bound by `out`, contexts opened and still open. */
class Scope {
  readonly names = new Set<string>();
  readonly contexts = new Map<string, boolean>([[DEFAULT_CONTEXT, true]]);
  opens = 0;
  constructor(readonly devices: ReadonlySet<string>) {}
}

function parseStep(value: unknown, path: string, memorySize: number, scope: Scope): BackendStep {
  const obj = expectObject(value, path);
  const op = required(obj, 'op', path, expectString);
  if (!(OPS as string[]).includes(op)) throw new FixtureError(`${path}.op`, `unknown op ${JSON.stringify(op)}`);
  const known = new Set(['op', 'context', 'note', 'expect', ...STEP_KEYS[op as BackendOp]]);
  const unknownKeys = Object.keys(obj).filter((k) => !known.has(k));
  const context = optional(obj, 'context', path, expectString) ?? DEFAULT_CONTEXT;
  if (!scope.contexts.has(context)) throw new FixtureError(`${path}.context`, `no context ${JSON.stringify(context)} was opened before this step`);
  const note = optional(obj, 'note', path, expectString);
  const base = {
    context,
    ...(note !== undefined ? { note } : {}),
    ...(unknownKeys.length > 0 ? { unknownKeys } : {}),
  };
  // A name used before any step could bind it is a mistake in the fixture, caught here.
  const ref = (key: string): ValueRef | undefined =>
    optional(obj, key, path, (v, p): ValueRef => {
      if (typeof v === 'string' && !HEX_NUMBER.test(v)) {
        if (scope.names.has(v) || scope.devices.has(v)) return v;
        const m = NAME_PLUS.exec(v);
        if (m !== null && scope.names.has(m[1]!)) return { name: m[1]!, offset: BigInt(m[2]!) };
        throw new FixtureError(p, `no earlier step binds the name ${JSON.stringify(v)}`);
      }
      return expectU64(v, p);
    });
  const needRef = (key: string): ValueRef => {
    const r = ref(key);
    if (r === undefined) throw new FixtureError(`${path}.${key}`, 'is required');
    return r;
  };
  const out = (): { out?: string } => {
    const name = optional(obj, 'out', path, bindingName);
    if (name === undefined) return {};
    scope.names.add(name);
    return { out: name };
  };
  const plainExpect = (): Outcome[] => optional(obj, 'expect', path, outcomes) ?? ['ok'];
  const u64 = (key: string) => required(obj, key, path, expectU64);
  const pasid = (): { pasid?: number } => {
    const p = optional(obj, 'pasid', path, pasidNumber);
    return p === undefined ? {} : { pasid: p };
  };
  // The IOVA a map or copy returns: exactly, or (the kernel's promises for a chosen IOVA) its
  // alignment and the ranges the new area must lie in or stay out of.
  const iovaExpectations = () => {
    const expectIova = optional(obj, 'expectIova', path, expectU64);
    const expectIovaAlignment = optional(obj, 'expectIovaAlignment', path, expectU64);
    if (expectIovaAlignment !== undefined && (expectIovaAlignment === 0n || (expectIovaAlignment & (expectIovaAlignment - 1n)) !== 0n)) {
      throw new FixtureError(`${path}.expectIovaAlignment`, 'must be a power of two');
    }
    const expectIovaWithin = optional(obj, 'expectIovaWithin', path, rangePair);
    const expectIovaOutside = optional(obj, 'expectIovaOutside', path, rangePair);
    return {
      ...(expectIova !== undefined ? { expectIova } : {}),
      ...(expectIovaAlignment !== undefined ? { expectIovaAlignment } : {}),
      ...(expectIovaWithin !== undefined ? { expectIovaWithin } : {}),
      ...(expectIovaOutside !== undefined ? { expectIovaOutside } : {}),
    };
  };
  const guestRange = (gpa: number, length: number, key: string): void => {
    if (gpa + length > memorySize) throw new FixtureError(`${path}.${key}`, `[0x${gpa.toString(16)}, +0x${length.toString(16)}) is outside guest memory`);
  };

  switch (op as BackendOp) {
    case 'open': {
      const name = required(obj, 'name', path, expectString);
      if (name === '' || name.length > 200) throw new FixtureError(`${path}.name`, 'a context name must have 1 to 200 characters');
      if (scope.contexts.get(name) === true) throw new FixtureError(`${path}.name`, `context ${JSON.stringify(name)} is already open`);
      if (++scope.opens > MAX_OPENS) throw new FixtureError(path, `at most ${MAX_OPENS} open steps`);
      scope.contexts.set(name, true);
      return { op: 'open', ...base, expect: plainExpect(), name };
    }
    case 'close':
      scope.contexts.set(context, false);
      return { op: 'close', ...base, expect: plainExpect() };
    case 'ioasAlloc':
      return { op: 'ioasAlloc', ...base, expect: plainExpect(), ...out() };
    case 'ioasMap': {
      const iova = ref('iova');
      const explicit = optional(obj, 'flags', path, flagBits(MAP_FLAG_NAMES));
      // Default: readable and writeable, at `iova` when one is given.
      const flags = explicit ?? (0b110 | (iova !== undefined ? 0b001 : 0));
      return {
        op: 'ioasMap',
        ...base,
        expect: plainExpect(),
        ioas: needRef('ioas'),
        gpa: required(obj, 'gpa', path, expectSafe),
        length: u64('length'),
        ...(iova !== undefined ? { iova } : {}),
        flags,
        ...iovaExpectations(),
        ...out(),
      };
    }
    case 'ioasUnmap': {
      const expectLength = optional(obj, 'expectLength', path, expectU64);
      return {
        op: 'ioasUnmap',
        ...base,
        expect: plainExpect(),
        ioas: needRef('ioas'),
        iova: needRef('iova'),
        length: u64('length'),
        ...(expectLength !== undefined ? { expectLength } : {}),
      };
    }
    case 'ioasCopy': {
      const dstIova = ref('dstIova');
      const explicit = optional(obj, 'flags', path, flagBits(MAP_FLAG_NAMES));
      const flags = explicit ?? (0b110 | (dstIova !== undefined ? 0b001 : 0));
      return {
        op: 'ioasCopy',
        ...base,
        expect: plainExpect(),
        srcIoas: needRef('srcIoas'),
        srcIova: needRef('srcIova'),
        dstIoas: needRef('dstIoas'),
        ...(dstIova !== undefined ? { dstIova } : {}),
        length: u64('length'),
        flags,
        ...iovaExpectations(),
        ...out(),
      };
    }
    case 'ioasIovaRanges': {
      const maxRanges = optional(obj, 'maxRanges', path, expectU32);
      const expectRanges = optional(obj, 'expectRanges', path, boundedList(rangePair));
      const expectAlignment = optional(obj, 'expectAlignment', path, expectU64);
      const expectNumIovas = optional(obj, 'expectNumIovas', path, expectU32);
      return {
        op: 'ioasIovaRanges',
        ...base,
        expect: plainExpect(),
        ioas: needRef('ioas'),
        ...(maxRanges !== undefined ? { maxRanges } : {}),
        ...(expectRanges !== undefined ? { expectRanges } : {}),
        ...(expectAlignment !== undefined ? { expectAlignment } : {}),
        ...(expectNumIovas !== undefined ? { expectNumIovas } : {}),
      };
    }
    case 'ioasAllowIovas':
      return { op: 'ioasAllowIovas', ...base, expect: plainExpect(), ioas: needRef('ioas'), ranges: required(obj, 'ranges', path, boundedList(rangePair)) };
    case 'option': {
      const option = required(obj, 'option', path, oneOf(['RLIMIT_MODE', 'HUGE_PAGES'] as const));
      const object = ref('object');
      const set = optional(obj, 'set', path, expectU64);
      const expectValue = optional(obj, 'expectValue', path, expectU64);
      // Without `set` the step reads the option (expectValue, when given, is what it must read).
      if (set !== undefined && expectValue !== undefined) throw new FixtureError(path, 'option takes set or expectValue, not both');
      return {
        op: 'option',
        ...base,
        expect: plainExpect(),
        option,
        ...(object !== undefined ? { object } : {}),
        ...(set !== undefined ? { set } : {}),
        ...(expectValue !== undefined ? { expectValue } : {}),
      };
    }
    case 'deviceBind': {
      const device = required(obj, 'device', path, expectString);
      if (!scope.devices.has(device)) throw new FixtureError(`${path}.device`, `no device ${JSON.stringify(device)} is declared`);
      return { op: 'deviceBind', ...base, expect: plainExpect(), device, ...out() };
    }
    case 'deviceUnbind':
      return { op: 'deviceUnbind', ...base, expect: plainExpect(), device: needRef('device') };
    case 'deviceAttach':
      return { op: 'deviceAttach', ...base, expect: plainExpect(), device: needRef('device'), pt: needRef('pt'), ...pasid(), ...out() };
    case 'deviceDetach':
      return { op: 'deviceDetach', ...base, expect: plainExpect(), device: needRef('device'), ...pasid() };
    case 'hwptAlloc': {
      const data = optional(obj, 'data', path, (v, p): Stage1Data => {
        const o = expectObject(v, p);
        for (const k of Object.keys(o)) if (k !== 'type' && k !== 'root') throw new FixtureError(`${p}.${k}`, 'unknown stage-1 data key');
        return { type: required(o, 'type', p, oneOf(['X86_64_S1'] as const)), root: required(o, 'root', p, expectU64) };
      });
      return {
        op: 'hwptAlloc',
        ...base,
        expect: plainExpect(),
        device: needRef('device'),
        pt: needRef('pt'),
        flags: optional(obj, 'flags', path, flagBits(HWPT_FLAG_NAMES)) ?? 0,
        ...(data !== undefined ? { data } : {}),
        ...out(),
      };
    }
    case 'hwptInvalidate': {
      const entries = required(
        obj,
        'entries',
        path,
        boundedList((v, p): InvalidateEntry => {
          const o = expectObject(v, p);
          return { addr: required(o, 'addr', p, expectU64), npages: required(o, 'npages', p, expectU64), leaf: optional(o, 'leaf', p, expectBoolean) ?? false };
        }),
      );
      const expectHandled = optional(obj, 'expectHandled', path, expectU32);
      return {
        op: 'hwptInvalidate',
        ...base,
        expect: plainExpect(),
        hwpt: needRef('hwpt'),
        entries,
        ...(expectHandled !== undefined ? { expectHandled } : {}),
      };
    }
    case 'setDirtyTracking':
      return { op: 'setDirtyTracking', ...base, expect: plainExpect(), hwpt: needRef('hwpt'), enable: required(obj, 'enable', path, expectBoolean) };
    case 'getDirtyBitmap': {
      const flags = optional(obj, 'flags', path, listOf(oneOf(['NO_CLEAR'] as const))) ?? [];
      const expectDirty = optional(obj, 'expectDirty', path, boundedList(expectU64, 1 << 20));
      return {
        op: 'getDirtyBitmap',
        ...base,
        expect: plainExpect(),
        hwpt: needRef('hwpt'),
        iova: needRef('iova'),
        length: u64('length'),
        pageSize: u64('pageSize'),
        noClear: flags.includes('NO_CLEAR'),
        ...(expectDirty !== undefined ? { expectDirty } : {}),
      };
    }
    case 'getHwInfo': {
      // `expect` is an outcome, or the fields the answer must have (which implies "ok").
      const raw = obj.expect;
      if (raw !== undefined && typeof raw === 'object' && raw !== null && !Array.isArray(raw)) {
        return { op: 'getHwInfo', ...base, expect: ['ok'], device: needRef('device'), expectInfo: parseHwInfoExpect(raw, `${path}.expect`) };
      }
      return { op: 'getHwInfo', ...base, expect: plainExpect(), device: needRef('device') };
    }
    case 'destroy':
      return { op: 'destroy', ...base, expect: plainExpect(), id: needRef('id') };
    case 'accessCreate':
      return {
        op: 'accessCreate',
        ...base,
        expect: plainExpect(),
        ioas: needRef('ioas'),
        onUnmap: optional(obj, 'onUnmap', path, oneOf(['unpin', 'keep'] as const)) ?? 'unpin',
        ...out(),
      };
    case 'accessDestroy':
      return { op: 'accessDestroy', ...base, expect: plainExpect(), access: needRef('access') };
    case 'accessRw': {
      const write = optional(obj, 'write', path, hexBytes(MAX_STEP_BYTES));
      const readLength = optional(obj, 'readLength', path, expectSafe);
      const expectRead = optional(obj, 'expectRead', path, hexBytes(MAX_STEP_BYTES));
      if ((write === undefined) === (readLength === undefined)) throw new FixtureError(path, 'accessRw needs exactly one of write and readLength');
      if (write !== undefined && expectRead !== undefined) throw new FixtureError(`${path}.expectRead`, 'only a read has data to expect');
      if (readLength !== undefined) bounded(readLength, `${path}.readLength`, 0, MAX_STEP_BYTES, 'readLength');
      if (expectRead !== undefined && expectRead.length !== readLength) {
        throw new FixtureError(`${path}.expectRead`, `has ${expectRead.length} bytes, readLength is ${readLength}`);
      }
      return {
        op: 'accessRw',
        ...base,
        expect: plainExpect(),
        access: needRef('access'),
        iova: needRef('iova'),
        ...(write !== undefined ? { write } : {}),
        ...(readLength !== undefined ? { readLength } : {}),
        ...(expectRead !== undefined ? { expectRead } : {}),
      };
    }
    case 'accessPin': {
      const flags = optional(obj, 'flags', path, listOf(oneOf(['WRITE'] as const))) ?? [];
      const expectGpas = optional(obj, 'expectGpas', path, boundedList(expectU64, 1 << 16));
      return {
        op: 'accessPin',
        ...base,
        expect: plainExpect(),
        access: needRef('access'),
        iova: needRef('iova'),
        length: u64('length'),
        write: flags.includes('WRITE'),
        ...(expectGpas !== undefined ? { expectGpas } : {}),
      };
    }
    case 'accessUnpin':
      return { op: 'accessUnpin', ...base, expect: plainExpect(), access: needRef('access'), iova: needRef('iova'), length: u64('length') };
    case 'translate': {
      const length = required(obj, 'length', path, expectSafe);
      bounded(length, `${path}.length`, 1, MAX_STEP_BYTES, 'a DMA length');
      const expectGpa = optional(obj, 'expectGpa', path, expectU64);
      const expectSpans = optional(
        obj,
        'expectSpans',
        path,
        boundedList((v, p): readonly [bigint, number] => {
          const [gpa, len] = rangePair(v, p);
          return [gpa, bounded(Number(len), `${p}[1]`, 1, MAX_STEP_BYTES, 'a span length')];
        }),
      );
      const expectFault = optional(obj, 'expectFault', path, (v, p): true | FaultReasonName => {
        if (v === true) return true;
        if (typeof v === 'string') return oneOf(FAULT_REASONS)(v, p);
        throw new FixtureError(p, `expected true or one of ${FAULT_REASONS.join(', ')}`);
      });
      const given = [expectGpa, expectSpans, expectFault].filter((x) => x !== undefined).length;
      if (given > 1) throw new FixtureError(path, 'translate takes at most one of expectGpa, expectSpans and expectFault');
      return {
        op: 'translate',
        ...base,
        expect: plainExpect(),
        device: needRef('device'),
        ...pasid(),
        iova: needRef('iova'),
        length,
        access: optional(obj, 'access', path, oneOf(['read', 'write'] as const)) ?? 'read',
        ...(expectGpa !== undefined ? { expectGpa } : {}),
        ...(expectSpans !== undefined ? { expectSpans } : {}),
        ...(expectFault !== undefined ? { expectFault } : {}),
      };
    }
    case 'memWrite': {
      const gpa = required(obj, 'gpa', path, expectSafe);
      const data = required(obj, 'data', path, hexBytes(MAX_STEP_BYTES));
      guestRange(gpa, data.length, 'data');
      return { op: 'memWrite', ...base, expect: plainExpect(), gpa, data };
    }
    case 'memRead': {
      const gpa = required(obj, 'gpa', path, expectSafe);
      const length = required(obj, 'length', path, expectSafe);
      bounded(length, `${path}.length`, 1, MAX_STEP_BYTES, 'length');
      guestRange(gpa, length, 'length');
      const expectData = optional(obj, 'expectData', path, hexBytes(MAX_STEP_BYTES));
      if (expectData !== undefined && expectData.length !== length) {
        throw new FixtureError(`${path}.expectData`, `has ${expectData.length} bytes, length is ${length}`);
      }
      return { op: 'memRead', ...base, expect: plainExpect(), gpa, length, ...(expectData !== undefined ? { expectData } : {}) };
    }
    case 'stats': {
      const raw = obj.expect;
      if (raw !== undefined && typeof raw === 'object' && raw !== null && !Array.isArray(raw)) {
        return { op: 'stats', ...base, expect: ['ok'], expectStats: parseStatsExpect(raw, `${path}.expect`) };
      }
      return { op: 'stats', ...base, expect: plainExpect() };
    }
  }
}

function parseHwInfoExpect(raw: JsonObject, path: string): HwInfoExpect {
  for (const k of Object.keys(raw)) if (k !== 'maxPasidLog2' && k !== 'capabilities') throw new FixtureError(`${path}.${k}`, 'unknown hw info field');
  const maxPasidLog2 = optional(raw, 'maxPasidLog2', path, expectU32);
  const capabilities = optional(raw, 'capabilities', path, listOf(oneOf(CAPABILITY_NAMES)));
  return { ...(maxPasidLog2 !== undefined ? { maxPasidLog2 } : {}), ...(capabilities !== undefined ? { capabilities } : {}) };
}

function parseStatsExpect(raw: JsonObject, path: string): StatsExpect {
  const out: { -readonly [K in keyof StatsExpect]: StatsExpect[K] } = {};
  for (const [k, v] of Object.entries(raw)) {
    if (k !== 'pinnedPages' && k !== 'accountedPages' && k !== 'pinReferences') throw new FixtureError(`${path}.${k}`, 'unknown stats field');
    out[k] = expectSafe(v, `${path}.${k}`);
  }
  return out;
}

/** True when `doc` declares the backend fixture format (the CLI dispatches on this). */
export function isBackendFixtureDocument(doc: unknown): boolean {
  return typeof doc === 'object' && doc !== null && (doc as Record<string, Json>).format === BACKEND_FIXTURE_FORMAT;
}

