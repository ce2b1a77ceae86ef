import {
  AccessRwFlag,
  Context,
  HwCap,
  HwptDataType,
  HwptGetDirtyBitmapFlag,
  IommufdError,
  IommufdHost,
  IommuOption,
  IommuOptionOp,
  U64_MAX,
  VtdInvalidateFlag,
  type HostSnapshot,
} from '../ioasid/index.js';
import { QuiescenceOwner, createQuiescenceBuffer } from '../ioasid/quiescence.js';
import { GuestMemory } from '../memory/index.js';
import type { BackendTranslateResult, BackendTranslateStart } from '../runtime/backend-translate-protocol.js';
import { startBackendTranslateWorker, type TranslateConsumer } from '../runtime/backend-translate-client.js';
import {
  CAPABILITY_NAMES,
  DEFAULT_CONTEXT,
  type BackendFixture,
  type BackendStep,
  type Outcome,
  type TranslateStep,
  type ValueRef,
} from './backend-fixture.js';
import type { ReplayResult, StepResult } from './guest-runner.js';

/** Starts the consumer that translates a context's DMAs (a worker thread, unless a test says otherwise). */
export type ConsumerFactory = (start: BackendTranslateStart) => TranslateConsumer;

export interface BackendReplayOptions {
  /** The parsed JSON document, so that --record can rewrite it faithfully. */
  readonly source?: Record<string, unknown>;
  readonly consumers?: ConsumerFactory;
}

export interface BackendStepResult extends StepResult {
  /** Why a skipped step did not run. */
  readonly skipReason?: string;
}

export interface BackendReplayResult extends ReplayResult {
  readonly steps: BackendStepResult[];
}

/** Ops the backend cannot run yet: their steps are reported as skipped, with the reason. None today. */
const NOT_YET: Partial<Record<BackendStep['op'], string>> = {};

/** What a step reports besides its outcome, by the fixture key that expects it. */
type ObservedKey =
  | 'expectIova'
  | 'expectLength'
  | 'expectRanges'
  | 'expectAlignment'
  | 'expectNumIovas'
  | 'expectValue'
  | 'expectInfo'
  | 'expectStats'
  | 'expectGpas'
  | 'expectRead'
  | 'expectData'
  | 'expectHandled'
  | 'expectDirty';
type Observed = Partial<Record<ObservedKey, unknown>>;

interface DetailSpec {
  /** How the expectation is shown in step results. */
  readonly label: string;
  /** The observation it is checked against. */
  readonly source: ObservedKey;
  /** For a property of the observation (rather than its exact value): whether it holds. */
  readonly property?: (want: unknown, got: unknown, step: BackendStep) => boolean;
}

/** The [iova, iova + length - 1] range a map or copy step placed. */
function placed(iova: unknown, step: BackendStep): [bigint, bigint] {
  const length = step.op === 'ioasMap' || step.op === 'ioasCopy' ? step.length : 1n;
  return [iova as bigint, (iova as bigint) + length - 1n];
}

const DETAILS: Record<string, DetailSpec> = {
  expectIova: { label: 'iova', source: 'expectIova' },
  expectIovaAlignment: { label: 'iovaAlignment', source: 'expectIova', property: (want, got) => (got as bigint) % (want as bigint) === 0n },
  expectIovaWithin: {
    label: 'iovaWithin',
    source: 'expectIova',
    property: (want, got, step) => {
      const [lo, hi] = want as [bigint, bigint];
      const [start, last] = placed(got, step);
      return start >= lo && last <= hi;
    },
  },
  expectIovaOutside: {
    label: 'iovaOutside',
    source: 'expectIova',
    property: (want, got, step) => {
      const [lo, hi] = want as [bigint, bigint];
      const [start, last] = placed(got, step);
      return last < lo || start > hi;
    },
  },
  expectLength: { label: 'length', source: 'expectLength' },
  expectRanges: { label: 'ranges', source: 'expectRanges' },
  expectAlignment: { label: 'alignment', source: 'expectAlignment' },
  expectNumIovas: { label: 'numIovas', source: 'expectNumIovas' },
  expectValue: { label: 'value', source: 'expectValue' },
  expectInfo: { label: 'info', source: 'expectInfo', property: (want, got) => fieldsHold(want, got) },
  expectStats: { label: 'stats', source: 'expectStats', property: (want, got) => fieldsHold(want, got) },
  expectGpas: { label: 'gpas', source: 'expectGpas' },
  expectRead: { label: 'read', source: 'expectRead' },
  expectData: { label: 'data', source: 'expectData' },
  expectHandled: { label: 'handled', source: 'expectHandled' },
  expectDirty: { label: 'dirty', source: 'expectDirty' },
};

/** Hw info and stats: the fields the fixture gives must match; capability lists in any order. */
function fieldsHold(want: unknown, got: unknown): boolean {
  const w = want as Record<string, unknown>;
  const g = got as Record<string, unknown>;
  const sorted = (list: unknown): unknown => (Array.isArray(list) ? [...(list as string[])].sort() : list);
  return Object.entries(w).every(([k, v]) => (k === 'capabilities' ? same(sorted(v), sorted(g[k])) : same(v, g[k])));
}

/** A mistake the parser cannot see: a name whose binding step failed, a device never bound. */
class ReplayError extends Error {}

/** struct iommu_hwpt_vtd_s1: flags, pgtbl_addr, addr_width (48: 4-level paging), reserved. */
function vtdStage1(root: bigint): Uint8Array {
  const data = new Uint8Array(24);
  const view = new DataView(data.buffer);
  view.setBigUint64(8, root, true);
  view.setUint32(16, 48, true);
  return data;
}

/** Values in their fixture form: 64-bit numbers as "0x…", bytes as hex digits. */
export function fixtureJson(value: unknown): unknown {
  if (typeof value === 'bigint') return `0x${value.toString(16)}`;
  if (value instanceof Uint8Array) return Array.from(value, (b) => b.toString(16).padStart(2, '0')).join('');
  if (Array.isArray(value)) return value.map(fixtureJson);
  if (typeof value === 'object' && value !== null) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, fixtureJson(v)]));
  }
  return value;
}

function same(a: unknown, b: unknown): boolean {
  return JSON.stringify(fixtureJson(a)) === JSON.stringify(fixtureJson(b));
}

/**
 * The first place two snapshots differ, as a path ("$.contexts[0].ioas[1].areas[0].length"), or
 * undefined when they are equal. Bigints compare by value.
 */
export function firstDifference(a: unknown, b: unknown, path = '$'): string | undefined {
  if (typeof a !== typeof b) return path;
  if (typeof a !== 'object' || a === null || b === null) return a === b ? undefined : path;
  if (Array.isArray(a) !== Array.isArray(b)) return path;
  if (Array.isArray(a)) {
    const bs = b as unknown[];
    if (a.length !== bs.length) return `${path}.length`;
    for (let i = 0; i < a.length; i++) {
      const d = firstDifference(a[i], bs[i], `${path}[${i}]`);
      if (d !== undefined) return d;
    }
    return undefined;
  }
  const ao = a as Record<string, unknown>;
  const bo = b as Record<string, unknown>;
  const keys = new Set([...Object.keys(ao), ...Object.keys(bo)]);
  for (const k of keys) {
    const d = firstDifference(ao[k], bo[k], `${path}.${k}`);
    if (d !== undefined) return d;
  }
  return undefined;
}

interface AccessState {
  readonly onUnmap: 'unpin' | 'keep';
  /** What the consumer holds, as it pinned it. */
  readonly pins: { iova: bigint; length: bigint }[];
}

/** One named context: the backend context and what the fixture's consumer side keeps for it. */
class ContextState {
  consumer: TranslateConsumer | undefined;
  /** Declared device name → the ID it was last bound to here (kept after unbind, like a stale variable). */
  readonly boundIds = new Map<string, number>();
  readonly accesses = new Map<number, AccessState>();

  constructor(
    readonly name: string,
    readonly ctx: Context,
    readonly quiescence: SharedArrayBuffer,
  ) {}
}

interface Execution {
  readonly outcome: Outcome;
  readonly observed: Observed;
  readonly translation?: BackendTranslateResult;
}

class BackendSession {
  readonly memory: GuestMemory;
  readonly host: IommufdHost;
  private readonly contexts = new Map<string, ContextState>();
  private readonly retired: ContextState[] = [];
  private readonly names = new Map<string, bigint>();

  constructor(
    fixture: BackendFixture,
    private readonly consumers: ConsumerFactory,
  ) {
    this.memory = GuestMemory.create(fixture.memorySize);
    this.host = new IommufdHost(this.memory, {
      devices: fixture.devices.map((d) => ({
        name: d.name,
        group: d.group,
        reservedRegions: d.reservedRegions,
        pasidBits: d.pasidBits,
        dirtyTracking: d.dirtyTracking,
      })),
      ...(fixture.memlockPages !== undefined ? { memlockLimitPages: fixture.memlockPages } : {}),
    });
    this.open(DEFAULT_CONTEXT);
  }

  open(name: string): void {
    const previous = this.contexts.get(name);
    if (previous !== undefined) {
      if (!previous.ctx.closed) throw new ReplayError(`context ${JSON.stringify(name)} is already open`);
      this.retired.push(previous);
    }
    const ctx = this.host.open();
    const quiescence = createQuiescenceBuffer(4);
    // Consumer workers translate from this context's tables: removals wait for them (strict unmap).
    ctx.attachQuiescence(new QuiescenceOwner(quiescence));
    this.contexts.set(name, new ContextState(name, ctx, quiescence));
  }

  state(name: string): ContextState {
    const s = this.contexts.get(name);
    if (s === undefined) throw new ReplayError(`no context ${JSON.stringify(name)}`);
    return s;
  }

  snapshot(): HostSnapshot {
    return this.host.inspect();
  }

  async close(): Promise<void> {
    const all = [...this.retired, ...this.contexts.values()];
    for (const s of all) if (!s.ctx.closed) s.ctx.close();
    await Promise.all(all.map(async (s) => s.consumer?.close()));
  }

  private value(ref: ValueRef, state: ContextState): bigint {
    if (typeof ref === 'bigint') return ref;
    if (typeof ref === 'object') {
      const base = this.names.get(ref.name);
      if (base === undefined) throw new ReplayError(`${JSON.stringify(ref.name)} is not bound (the step that binds it failed)`);
      return base + ref.offset;
    }
    const bound = this.names.get(ref);
    if (bound !== undefined) return bound;
    const device = state.boundIds.get(ref);
    if (device !== undefined) return BigInt(device);
    throw new ReplayError(`${JSON.stringify(ref)} is not bound (the step that binds it failed, or the device was never bound in context ${JSON.stringify(state.name)})`);
  }

  /** An object ID: the backend itself rejects values that are not u32. */
  private id(ref: ValueRef, state: ContextState): number {
    return Number(this.value(ref, state));
  }

  private bind(name: string | undefined, value: bigint | number): void {
    if (name !== undefined) this.names.set(name, BigInt(value));
  }

  private consumer(state: ContextState): TranslateConsumer {
    state.consumer ??= this.consumers({ shared: state.ctx.describeShared(), quiescence: state.quiescence });
    return state.consumer;
  }

  /** The access's onUnmap: like the kernel selftest's access, drop every pin inside the range. */
  private accessUnmapped(state: ContextState, accessId: number, iova: bigint, length: bigint): void {
    const access = state.accesses.get(accessId);
    if (access === undefined || access.onUnmap === 'keep') return;
    const last = length === 0n ? iova : iova + length - 1n > U64_MAX ? U64_MAX : iova + length - 1n;
    for (const pin of [...access.pins]) {
      if (pin.iova > last || pin.iova + pin.length - 1n < iova) continue;
      state.ctx.accessUnpin(accessId, pin.iova, pin.length);
      access.pins.splice(access.pins.indexOf(pin), 1);
    }
  }

  /** Runs one step against the backend. IommufdError means the backend answered with an errno. */
  async execute(step: BackendStep): Promise<Execution> {
    if (step.op === 'open') {
      this.open(step.name);
      return { outcome: 'ok', observed: {} };
    }
    const state = this.state(step.context);
    const { ctx } = state;
    const ok = (observed: Observed = {}): Execution => ({ outcome: 'ok', observed });
    switch (step.op) {
      case 'close':
        ctx.close();
        await state.consumer?.close();
        state.consumer = undefined;
        return ok();
      case 'ioasAlloc':
        this.bind(step.out, ctx.ioasAlloc());
        return ok();
      case 'ioasMap': {
        const iova = ctx.ioasMap(this.id(step.ioas, state), {
          gpa: step.gpa,
          length: step.length,
          ...(step.iova !== undefined ? { iova: this.value(step.iova, state) } : {}),
          flags: step.flags,
        });
        this.bind(step.out, iova);
        return ok({ expectIova: iova });
      }
      case 'ioasUnmap':
        return ok({ expectLength: ctx.ioasUnmap(this.id(step.ioas, state), this.value(step.iova, state), step.length) });
      case 'ioasCopy': {
        const iova = ctx.ioasCopy(
          this.id(step.dstIoas, state),
          step.dstIova === undefined ? 0n : this.value(step.dstIova, state),
          this.id(step.srcIoas, state),
          this.value(step.srcIova, state),
          step.length,
          step.flags,
        );
        this.bind(step.out, iova);
        return ok({ expectIova: iova });
      }
      case 'ioasIovaRanges': {
        const r = ctx.ioasIovaRanges(this.id(step.ioas, state), step.maxRanges);
        return ok({ expectRanges: r.ranges.map((x) => [x.start, x.last]), expectAlignment: r.alignment, expectNumIovas: r.ranges.length });
      }
      case 'ioasAllowIovas':
        ctx.ioasAllowIovas(
          this.id(step.ioas, state),
          step.ranges.map(([start, last]) => ({ start, last })),
        );
        return ok();
      case 'option': {
        const value = ctx.option({
          option: step.option === 'RLIMIT_MODE' ? IommuOption.RLIMIT_MODE : IommuOption.HUGE_PAGES,
          op: step.set !== undefined ? IommuOptionOp.SET : IommuOptionOp.GET,
          objectId: step.object === undefined ? 0 : this.id(step.object, state),
          ...(step.set !== undefined ? { value: step.set } : {}),
        });
        return ok(step.set === undefined ? { expectValue: value } : {});
      }
      case 'deviceBind': {
        const id = ctx.deviceBind(step.device);
        state.boundIds.set(step.device, id);
        this.bind(step.out, id);
        return ok();
      }
      case 'deviceUnbind':
        ctx.deviceUnbind(this.id(step.device, state));
        return ok();
      case 'deviceAttach':
        this.bind(step.out, ctx.deviceAttach(this.id(step.device, state), this.id(step.pt, state), step.pasid ?? 0));
        return ok();
      case 'deviceDetach':
        ctx.deviceDetach(this.id(step.device, state), step.pasid ?? 0);
        return ok();
      case 'hwptAlloc': {
        const args = step.data === undefined ? { flags: step.flags } : { flags: step.flags, dataType: HwptDataType.VTD_S1, data: vtdStage1(step.data.root) };
        this.bind(step.out, ctx.hwptAlloc(this.id(step.device, state), this.id(step.pt, state), args));
        return ok();
      }
      case 'hwptInvalidate': {
        // The format's empty list means "everything": VT-d's invalidate-all entry (addr 0, npages U64_MAX).
        const entries =
          step.entries.length === 0
            ? [{ addr: 0n, npages: U64_MAX, flags: 0 }]
            : step.entries.map((e) => ({ addr: e.addr, npages: e.npages, flags: e.leaf ? VtdInvalidateFlag.LEAF : 0 }));
        const handled = ctx.hwptInvalidate(this.id(step.hwpt, state), entries);
        return ok({ expectHandled: step.entries.length === 0 ? 0 : handled });
      }
      case 'getHwInfo': {
        const info = ctx.getHwInfo(this.id(step.device, state));
        const capabilities = CAPABILITY_NAMES.filter((name) => name === 'DIRTY_TRACKING' && (info.capabilities & HwCap.DIRTY_TRACKING) !== 0);
        return ok({ expectInfo: { maxPasidLog2: info.maxPasidLog2, capabilities } });
      }
      case 'destroy':
        ctx.destroy(this.id(step.id, state));
        return ok();
      case 'accessCreate': {
        let created = -1;
        const id = ctx.accessCreate(this.id(step.ioas, state), {
          onUnmap: (iova, length) => this.accessUnmapped(state, created, iova, length),
        });
        created = id;
        state.accesses.set(id, { onUnmap: step.onUnmap, pins: [] });
        this.bind(step.out, id);
        return ok();
      }
      case 'accessDestroy': {
        const id = this.id(step.access, state);
        ctx.accessDestroy(id);
        state.accesses.delete(id);
        return ok();
      }
      case 'accessRw': {
        const buf = step.write ?? new Uint8Array(step.readLength ?? 0);
        ctx.accessRw(this.id(step.access, state), this.value(step.iova, state), buf, step.write !== undefined ? AccessRwFlag.WRITE : AccessRwFlag.READ);
        return ok(step.write === undefined ? { expectRead: buf } : {});
      }
      case 'accessPin': {
        const id = this.id(step.access, state);
        const iova = this.value(step.iova, state);
        const gpas = ctx.accessPin(id, iova, step.length, step.write ? AccessRwFlag.WRITE : AccessRwFlag.READ);
        state.accesses.get(id)?.pins.push({ iova, length: step.length });
        return ok({ expectGpas: gpas.map((g) => BigInt(g)) });
      }
      case 'accessUnpin': {
        const id = this.id(step.access, state);
        const iova = this.value(step.iova, state);
        ctx.accessUnpin(id, iova, step.length);
        const pins = state.accesses.get(id)?.pins;
        const i = pins?.findIndex((p) => p.iova === iova && p.length === step.length) ?? -1;
        if (i >= 0) pins!.splice(i, 1);
        return ok();
      }
      case 'translate': {
        // The owner only looks up the device's row; the walk happens in the consumer worker.
        const row = ctx.deviceRow(this.id(step.device, state));
        const translation = await this.consumer(state).translate({
          row,
          ...(step.pasid !== undefined ? { pasid: step.pasid } : {}),
          iova: this.value(step.iova, state),
          length: step.length,
          access: step.access,
        });
        return { outcome: 'ok', observed: {}, translation };
      }
      case 'memWrite':
        this.memory.write(step.gpa, step.data);
        return ok();
      case 'memRead': {
        const buf = new Uint8Array(step.length);
        this.memory.read(step.gpa, buf);
        return ok({ expectData: buf });
      }
      case 'stats':
        return ok({ expectStats: this.host.stats() });
      case 'setDirtyTracking':
        ctx.hwptSetDirtyTracking(this.id(step.hwpt, state), step.enable);
        return ok();
      case 'getDirtyBitmap': {
        const iova = this.value(step.iova, state);
        const bitmap = ctx.hwptGetDirtyBitmap(this.id(step.hwpt, state), {
          iova,
          length: step.length,
          pageSize: step.pageSize,
          flags: step.noClear ? HwptGetDirtyBitmapFlag.NO_CLEAR : 0,
        });
        // The fixture lists the IOVAs of the dirty pages; bit i of the bitmap is page iova + i * pageSize.
        const dirty: bigint[] = [];
        bitmap.forEach((word, w) => {
          for (let bit = 0; word !== 0n && bit < 64; bit++) {
            if (((word >> BigInt(bit)) & 1n) !== 0n) dirty.push(iova + BigInt(w * 64 + bit) * step.pageSize);
          }
        });
        return ok({ expectDirty: dirty });
      }
    }
  }
}

/** The detail expectations a step carries, by fixture key. */
function detailExpectations(step: BackendStep): Record<string, unknown> {
  const record = step as unknown as Record<string, unknown>;
  return Object.fromEntries(Object.keys(DETAILS).filter((k) => record[k] !== undefined).map((k) => [k, record[k]]));
}

function detailHolds(key: string, want: unknown, got: unknown, step: BackendStep): boolean {
  const spec = DETAILS[key]!;
  return spec.property !== undefined ? spec.property(want, got, step) : same(want, got);
}

/** Expectations as shown in results: under their labels, in fixture form. */
function shownExpected(details: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(details).map(([k, v]) => [DETAILS[k]!.label, fixtureJson(v)]));
}

/** Observations as shown: each one once, under the label of its exact-value key. */
function shownObserved(details: Record<string, unknown>, observed: Observed): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(details)) {
    const source = DETAILS[key]!.source;
    if (observed[source] !== undefined) out[DETAILS[source]!.label] = fixtureJson(observed[source]);
  }
  return out;
}

/** An outcome with details: the outcome is left out when it is plain success. */
function withOutcome(outcome: Outcome | readonly Outcome[], details: Record<string, unknown>): unknown {
  return outcome === 'ok' ? details : { outcome, ...details };
}

function outcomeShown(list: readonly Outcome[]): Outcome | readonly Outcome[] {
  return list.length === 1 ? list[0]! : list;
}

/** What a translate step expects, for display. */
function translateExpected(step: TranslateStep): unknown {
  const outcome = outcomeShown(step.expect);
  if (step.expectGpa !== undefined) return withOutcome(outcome, { gpa: fixtureJson(step.expectGpa) });
  if (step.expectSpans !== undefined) return withOutcome(outcome, { spans: fixtureJson(step.expectSpans) });
  if (step.expectFault !== undefined) return withOutcome(outcome, { fault: step.expectFault === true ? 'any' : step.expectFault });
  return step.expect;
}

function translateShown(t: BackendTranslateResult): Record<string, unknown> {
  if (t.outcome === 'fault') return { fault: t.reason, iova: fixtureJson(t.iova) };
  if (t.spans.length === 1) return { gpa: fixtureJson(BigInt(t.spans[0]!.gpa)) };
  return { spans: t.spans.map((s) => [fixtureJson(BigInt(s.gpa)), s.length]) };
}

function translateHolds(step: TranslateStep, t: BackendTranslateResult): boolean {
  if (step.expectFault !== undefined) return t.outcome === 'fault' && (step.expectFault === true || step.expectFault === t.reason);
  if (t.outcome === 'fault') return false;
  if (step.expectGpa !== undefined) return t.spans.length === 1 && BigInt(t.spans[0]!.gpa) === step.expectGpa;
  if (step.expectSpans !== undefined) {
    const want = step.expectSpans;
    return t.spans.length === want.length && t.spans.every((s, i) => BigInt(s.gpa) === want[i]![0] && s.length === want[i]![1]);
  }
  // No expectation beyond the outcome: the DMA must translate.
  return true;
}

const TRANSLATE_KEYS = ['expectGpa', 'expectSpans', 'expectFault'];

/**
 * The step's JSON with its expectations replaced by what happened (for --record), so that the
 * recorded fixture passes. Property expectations (an IOVA's alignment, where it lies) stay while
 * they hold; one that fails gives way to the exact value.
 */
function recordStep(original: Record<string, unknown>, step: BackendStep, run: Execution): Record<string, unknown> {
  const out: Record<string, unknown> = { ...original };
  const objectExpect = typeof original.expect === 'object' && original.expect !== null && !Array.isArray(original.expect);
  if (run.outcome !== 'ok') {
    out.expect = run.outcome;
    // Only what a failing call still reports (IOVA_RANGES with EMSGSIZE) can be expected.
    for (const key of [...Object.keys(DETAILS), ...TRANSLATE_KEYS]) {
      if (!(key in out)) continue;
      const spec = DETAILS[key];
      const got = spec === undefined ? undefined : run.observed[spec.source];
      if (got === undefined || spec?.property !== undefined) delete out[key];
      else out[key] = fixtureJson(got);
    }
    return out;
  }
  if ('expect' in original && !objectExpect) out.expect = 'ok';
  if (step.op === 'translate' && run.translation !== undefined) {
    const t = run.translation;
    for (const key of TRANSLATE_KEYS) delete out[key];
    if (t.outcome === 'fault') out.expectFault = original.expectFault === true ? true : t.reason;
    else if (t.spans.length === 1) out.expectGpa = fixtureJson(BigInt(t.spans[0]!.gpa));
    else out.expectSpans = t.spans.map((s) => [fixtureJson(BigInt(s.gpa)), s.length]);
    return out;
  }
  if (objectExpect) {
    const got = run.observed.expectInfo ?? run.observed.expectStats;
    if (got !== undefined) out.expect = fixtureJson(got);
  }
  const details = detailExpectations(step);
  for (const [key, want] of Object.entries(details)) {
    const spec = DETAILS[key]!;
    const got = run.observed[spec.source];
    if (got === undefined || !(key in original)) continue;
    if (spec.property === undefined) out[key] = fixtureJson(got);
    else if (!spec.property(want, got, step)) {
      delete out[key];
      out[spec.source] = fixtureJson(got);
    }
  }
  return out;
}

/**
 * Replays a parsed backend fixture on a fresh IommufdHost: contexts by name, `out` names bound to
 * what steps return, `translate` steps in a consumer worker per context. A step that fails as
 * expected must also leave the backend exactly as it was (objects, areas, ranges, attachments,
 * pins and accounting: host.inspect()).
 */
export async function replayBackendFixture(fixture: BackendFixture, options: BackendReplayOptions = {}): Promise<BackendReplayResult> {
  const session = new BackendSession(fixture, options.consumers ?? startBackendTranslateWorker);
  const sourceSteps = Array.isArray(options.source?.steps) ? (options.source.steps as unknown[]) : [];
  const results: BackendStepResult[] = [];
  const recordedSteps: Record<string, unknown>[] = [];
  try {
    for (let index = 0; index < fixture.steps.length; index++) {
      const step = fixture.steps[index]!;
      const rawOriginal = sourceSteps[index];
      const original: Record<string, unknown> =
        typeof rawOriginal === 'object' && rawOriginal !== null && !Array.isArray(rawOriginal) ? { ...(rawOriginal as Record<string, unknown>) } : { op: step.op };
      const base = {
        index,
        op: step.op,
        ...(step.note !== undefined ? { note: step.note } : {}),
        ...(step.unknownKeys !== undefined ? { warnings: step.unknownKeys.map((k) => `unknown key ${JSON.stringify(k)} ignored`) } : {}),
      };
      const details = detailExpectations(step);
      const hasDetails = Object.keys(details).length > 0;
      const expectShown = step.op === 'translate' ? translateExpected(step) : hasDetails ? withOutcome(outcomeShown(step.expect), shownExpected(details)) : step.expect;

      const skipReason = NOT_YET[step.op];
      if (skipReason !== undefined) {
        results.push({ ...base, expect: expectShown, actual: null, ok: true, skipped: true, skipReason });
        recordedSteps.push(original);
        continue;
      }

      const mayFail = step.expect.some((o) => o !== 'ok');
      const before = mayFail ? session.snapshot() : undefined;
      let run: Execution;
      try {
        try {
          run = await session.execute(step);
        } catch (err) {
          if (!(err instanceof IommufdError)) throw err;
          const observed: Observed = {};
          // IOMMU_IOAS_IOVA_RANGES writes num_iovas and the ranges that fit even with EMSGSIZE.
          // IOMMU_HWPT_INVALIDATE writes back how many entries were handled before the one that failed.
          if (step.op === 'hwptInvalidate') observed.expectHandled = typeof err.details?.entryNum === 'number' ? err.details.entryNum : 0;
          if (err.code === 'EMSGSIZE' && step.op === 'ioasIovaRanges' && err.details !== undefined) {
            const ranges = err.details.ranges as readonly { start: bigint; last: bigint }[] | undefined;
            if (typeof err.details.numIovas === 'number') observed.expectNumIovas = err.details.numIovas;
            if (ranges !== undefined) observed.expectRanges = ranges.map((r) => [r.start, r.last]);
          }
          run = { outcome: err.code, observed };
        }
      } catch (err) {
        results.push({ ...base, expect: expectShown, actual: `error: ${err instanceof Error ? err.message : String(err)}`, ok: false, skipped: false });
        recordedSteps.push(original);
        continue;
      }

      let ok = step.expect.includes(run.outcome);
      let actual: unknown = run.outcome;
      if (step.op === 'translate' && run.translation !== undefined) {
        ok &&= translateHolds(step, run.translation);
        actual = translateShown(run.translation);
      } else if (hasDetails) {
        for (const [key, want] of Object.entries(details)) {
          const got = run.observed[DETAILS[key]!.source];
          if (got !== undefined) ok &&= detailHolds(key, want, got, step);
        }
        const seen = shownObserved(details, run.observed);
        if (Object.keys(seen).length > 0) actual = withOutcome(run.outcome, seen);
      }
      if (before !== undefined && run.outcome !== 'ok' && step.expect.includes(run.outcome)) {
        // A call that fails must change nothing: the backend's own promise, checked after every one.
        const changed = firstDifference(before, session.snapshot());
        if (changed !== undefined) {
          ok = false;
          actual = `${run.outcome}, but the backend state changed at ${changed}`;
        }
      }
      results.push({ ...base, expect: expectShown, actual, ok, skipped: false });
      recordedSteps.push(recordStep(original, step, run));
    }
  } finally {
    await session.close();
  }
  const passed = results.filter((r) => r.ok && !r.skipped).length;
  const skipped = results.filter((r) => r.skipped).length;
  const sourceTop = options.source ?? { format: fixture.format, name: fixture.name };
  return {
    name: fixture.name,
    steps: results,
    passed,
    failed: results.length - passed - skipped,
    skipped,
    recorded: { ...sourceTop, steps: recordedSteps },
  };
}
