import {
  encodeAttach,
  encodeAttachTable,
  encodeDetach,
  encodeDetachPasid,
  encodeInvalidate,
  encodeMap,
  encodeProbe,
  encodeUnmap,
  parseProbeProperties,
  type EncodedRequest,
} from '../../guest-fixtures/driver/iommu-requests.js';
import type { IommuGuestDriver, RequestResult } from '../../guest-fixtures/driver/iommu-driver.js';
import { AttachFlag, FaultFlag, MapFlag, STATUS_NAMES, type StatusName } from '../iommu/layout.js';
import type {
  ConfigExpect,
  ExpectedProperty,
  GuestFixture,
  GuestStep,
  RawExpect,
  RequestStep,
} from './guest-fixture.js';
import { X86PageTableBuilder, memoryEntryWriter, type GuestPageAllocator, type X86PageSize } from '../../guest-fixtures/pagetable/x86-64-builder.js';
import type { GuestMemory } from '../memory/index.js';
import { X86_PAGE_1G, X86_PAGE_2M, X86_PAGE_4K } from '../pagetable/x86-64.js';
import { FixtureError, hex } from './values.js';

/** What a replay needs from a machine: the guest driver and the endpoints' DMA. */
export interface GuestReplayMachine {
  readonly driver: IommuGuestDriver;
  /** Whether `dma` steps can run (an oracle without device DMA skips them). */
  readonly canDma: boolean;
  dma(endpoint: number, address: bigint, length: number, access: 'read' | 'write', pasid?: number): Promise<'ok' | 'fault'>;
  /** Makes every fault the endpoints hit so far visible on the event queue. */
  flushFaults(): Promise<void>;
  /** Device reset and full re-initialisation by the driver; returns the new driver. */
  reset(): Promise<IommuGuestDriver>;
  /** Guest memory, where `pageTable` steps write the guest's own tables. */
  readonly memory: GuestMemory;
  /** Guest pages for those tables (the guest's own allocations). */
  readonly tablePages: GuestPageAllocator;
}

export interface StepResult {
  readonly index: number;
  readonly op: string;
  readonly expect: unknown;
  readonly actual: unknown;
  readonly ok: boolean;
  readonly skipped: boolean;
  readonly note?: string;
  readonly warnings?: readonly string[];
}

export interface ReplayResult {
  readonly name: string;
  readonly steps: StepResult[];
  readonly passed: number;
  readonly failed: number;
  readonly skipped: number;
  /** The fixture with every expectation replaced by what was observed (for --record). */
  readonly recorded: Record<string, unknown>;
}

const REASONS = ['UNKNOWN', 'DOMAIN', 'MAPPING'] as const;
const FAULT_FLAG_NAMES = [
  ['READ', FaultFlag.READ],
  ['WRITE', FaultFlag.WRITE],
  ['EXEC', FaultFlag.EXEC],
  ['ADDRESS', FaultFlag.ADDRESS],
  ['PASID', FaultFlag.PASID],
] as const;

function statusName(status: number | 'NONE'): string {
  return status === 'NONE' ? 'NONE' : (STATUS_NAMES[status] ?? `status ${status}`);
}

const PAGE_SIZES: Record<'4K' | '2M' | '1G', X86PageSize> = { '4K': X86_PAGE_4K, '2M': X86_PAGE_2M, '1G': X86_PAGE_1G };

function encode(step: RequestStep, probeSize: number, tables: ReadonlyMap<string, X86PageTableBuilder>): EncodedRequest {
  switch (step.op) {
    case 'attach':
      return encodeAttach(step.domain, step.endpoint, step.flags.includes('BYPASS') ? AttachFlag.BYPASS : 0);
    case 'detach':
      return step.pasid !== undefined ? encodeDetachPasid(step.domain, step.endpoint, step.pasid) : encodeDetach(step.domain, step.endpoint);
    case 'attachTable': {
      const table = step.table !== undefined ? tables.get(step.table) : undefined;
      if (step.table !== undefined && table === undefined) throw new FixtureError('table', `no page table named ${JSON.stringify(step.table)} was built before this step`);
      const root = table !== undefined ? BigInt(table.root) : step.root!;
      const addrWidth = step.addrWidth ?? (table?.levels === 5 ? 57 : 48);
      return encodeAttachTable(step.domain, step.endpoint, {
        root,
        addrWidth,
        ...(step.pasid !== undefined ? { pasid: step.pasid } : {}),
        ...(step.format !== undefined ? { format: step.format } : {}),
      });
    }
    case 'invalidate':
      return encodeInvalidate(step.domain, {
        scope: step.scope,
        ...(step.pasid !== undefined ? { pasid: step.pasid } : {}),
        ...(step.address !== undefined ? { address: step.address } : {}),
        ...(step.pages !== undefined ? { pages: step.pages } : {}),
        ...(step.pageShift !== undefined ? { pageShift: step.pageShift } : {}),
        ...(step.leaf !== undefined ? { leaf: step.leaf } : {}),
      });
    case 'map': {
      let flags = 0;
      if (step.flags.includes('READ')) flags |= MapFlag.READ;
      if (step.flags.includes('WRITE')) flags |= MapFlag.WRITE;
      if (step.flags.includes('MMIO')) flags |= MapFlag.MMIO;
      return encodeMap(step.domain, step.virtStart, step.virtEnd, step.physStart, flags);
    }
    case 'unmap':
      return encodeUnmap(step.domain, step.virtStart, step.virtEnd);
    case 'probe':
      return encodeProbe(step.endpoint, probeSize);
    case 'raw':
      return { readable: step.request, writable: step.writable };
  }
}

function sameSet(a: readonly string[], b: readonly string[]): boolean {
  const sa = new Set(a);
  const sb = new Set(b);
  return sa.size === sb.size && [...sa].every((x) => sb.has(x));
}

/** Runs a parsed guest fixture against a machine, step by step. */
export async function replayGuestFixture(fixture: GuestFixture, machine: GuestReplayMachine): Promise<ReplayResult> {
  let driver = machine.driver;
  let probeSize = driver.readConfig().probeSize;
  const results: StepResult[] = [];
  const recordedSteps: Record<string, unknown>[] = [];
  /** The guest's own x86-64 page tables, by the name `pageTable` steps give them. */
  const tables = new Map<string, X86PageTableBuilder>();

  const checkRequest = (step: RequestStep, result: RequestResult): { ok: boolean; actual: string; recorded: Record<string, unknown> } => {
    const actual = statusName(result.status);
    let ok = (step.expect as readonly RawExpect[]).includes(actual as RawExpect);
    const recorded: Record<string, unknown> = { expect: actual };
    if (step.op === 'probe' && result.status !== 'NONE') {
      const props = parseProbeProperties(result.writable.subarray(0, probeSize));
      const observed = props.flatMap((p) =>
        p.type === 'RESV_MEM' ? [{ type: 'RESV_MEM', subtype: p.subtype === 1 ? 'MSI' : 'RESERVED', start: hex(p.start), end: hex(p.end) }] : [],
      );
      if (step.expectProperties !== undefined) {
        recorded.expectProperties = observed;
        ok &&= step.expectProperties.every((want: ExpectedProperty) =>
          props.some((p) => p.type === 'RESV_MEM' && (p.subtype === 1 ? 'MSI' : 'RESERVED') === want.subtype && p.start === want.start && p.end === want.end),
        );
      }
    }
    return { ok, actual, recorded };
  };

  for (let index = 0; index < fixture.steps.length; index++) {
    const step: GuestStep = fixture.steps[index]!;
    const base = { index, op: step.op, ...(step.note !== undefined ? { note: step.note } : {}) };
    const warnings = step.unknownKeys?.map((k) => `unknown key ${JSON.stringify(k)} ignored`);
    const push = (r: Omit<StepResult, 'index' | 'op'>, recorded: Record<string, unknown>) => {
      results.push({ ...base, ...r, ...(warnings !== undefined ? { warnings } : {}) });
      recordedSteps.push(recorded);
    };
    const original = fixtureStepJson(fixture, index);
    try {
      switch (step.op) {
        case 'attach':
        case 'detach':
        case 'map':
        case 'unmap':
        case 'probe':
        case 'raw':
        case 'attachTable':
        case 'invalidate': {
          const r = checkRequest(step, driver.request(encode(step, probeSize, tables)));
          push({ expect: step.expect, actual: r.actual, ok: r.ok, skipped: false }, { ...original, ...r.recorded });
          break;
        }
        case 'batch': {
          const out = driver.batch(step.steps.map((s) => encode(s, probeSize, tables)));
          const checks = step.steps.map((s, i) => checkRequest(s, out[i]!));
          const innerOriginal = (original.steps as Record<string, unknown>[] | undefined) ?? [];
          push(
            { expect: step.steps.map((s) => s.expect), actual: checks.map((c) => c.actual), ok: checks.every((c) => c.ok), skipped: false },
            { ...original, steps: checks.map((c, i) => ({ ...innerOriginal[i], ...c.recorded })) },
          );
          break;
        }
        case 'config': {
          if (step.set !== undefined) driver.writeBypass(step.set.bypass);
          const cfg = driver.readConfig();
          probeSize = cfg.probeSize;
          const observed: Required<{ [K in keyof ConfigExpect]: unknown }> = {
            pageSizeMask: cfg.pageSizeMask,
            inputRange: cfg.inputRange,
            domainRange: [BigInt(cfg.domainRange[0]), BigInt(cfg.domainRange[1])],
            probeSize: BigInt(cfg.probeSize),
            bypass: BigInt(cfg.bypass),
          };
          let ok = true;
          const actual: Record<string, unknown> = {};
          for (const [key, want] of Object.entries(step.expect ?? {})) {
            const got = observed[key as keyof ConfigExpect];
            actual[key] = got;
            ok &&= JSON.stringify(want, bigintJson) === JSON.stringify(got, bigintJson);
          }
          const recorded = step.expect !== undefined ? { ...original, expect: jsonValue(actual) } : original;
          push({ expect: step.expect ?? null, actual, ok, skipped: false }, recorded);
          break;
        }
        case 'features': {
          const offered = driver.offeredNames();
          push({ expect: step.expectOffered, actual: offered, ok: sameSet(offered, step.expectOffered), skipped: false }, { ...original, expectOffered: offered });
          break;
        }
        case 'dma': {
          if (!machine.canDma) {
            push({ expect: step.expect, actual: null, ok: true, skipped: true }, original);
            break;
          }
          const actual = await machine.dma(step.endpoint, step.address, step.length, step.access, step.pasid);
          push({ expect: step.expect, actual, ok: actual === step.expect, skipped: false }, { ...original, expect: actual });
          break;
        }
        case 'expectFault': {
          await machine.flushFaults();
          const fault = driver.takeFault();
          if (step.none === true) {
            const actual = fault === undefined ? 'none' : describeFault(fault);
            push({ expect: 'none', actual, ok: fault === undefined, skipped: false }, fault === undefined ? original : recordFault(original, fault));
            break;
          }
          if (fault === undefined) {
            push({ expect: describeExpected(step), actual: 'none', ok: false, skipped: false }, { op: 'expectFault', none: true, ...(step.note ? { note: step.note } : {}) });
            break;
          }
          const flags = FAULT_FLAG_NAMES.filter(([, bit]) => (fault.flags & bit) !== 0).map(([n]) => n);
          let ok = true;
          if (step.reason !== undefined) ok &&= REASONS[fault.reason] === step.reason;
          if (step.endpoint !== undefined) ok &&= fault.endpoint === step.endpoint;
          if (step.address !== undefined) ok &&= (fault.flags & FaultFlag.ADDRESS) !== 0 && fault.address === step.address;
          if (step.flags !== undefined) ok &&= sameSet(flags, step.flags);
          if (step.pasid !== undefined) ok &&= (fault.flags & FaultFlag.PASID) !== 0 && fault.pasid === step.pasid;
          push({ expect: describeExpected(step), actual: describeFault(fault), ok, skipped: false }, recordFault(original, fault));
          break;
        }
        case 'pageTable': {
          // The guest edits its own table in its memory; no request reaches the device.
          let table = tables.get(step.table);
          if (table === undefined) {
            table = new X86PageTableBuilder({ allocator: machine.tablePages, write: memoryEntryWriter(machine.memory), levels: step.levels ?? 4 });
            tables.set(step.table, table);
          }
          for (const m of step.map) {
            table.map(m.iova, Number(m.gpa), PAGE_SIZES[m.size], { writable: m.write, user: m.user, executable: true });
          }
          for (const u of step.unmap) table.unmap(u.iova, u.size);
          push({ expect: null, actual: { root: hex(BigInt(table.root)), levels: table.levels }, ok: true, skipped: false }, original);
          break;
        }
        case 'reset': {
          driver = await machine.reset();
          probeSize = driver.readConfig().probeSize;
          push({ expect: null, actual: null, ok: true, skipped: false }, original);
          break;
        }
      }
    } catch (err) {
      push({ expect: 'expect' in step ? step.expect : null, actual: `error: ${err instanceof Error ? err.message : String(err)}`, ok: false, skipped: false }, original);
    }
  }
  const passed = results.filter((r) => r.ok && !r.skipped).length;
  const skipped = results.filter((r) => r.skipped).length;
  return {
    name: fixture.name,
    steps: results,
    passed,
    failed: results.length - passed - skipped,
    skipped,
    recorded: { ...fixtureJson(fixture), steps: recordedSteps },
  };
}

interface FaultLike {
  readonly reason: number;
  readonly flags: number;
  readonly endpoint: number;
  readonly address: bigint;
  readonly pasid: number;
}

function describeFault(f: FaultLike): Record<string, unknown> {
  return {
    reason: REASONS[f.reason] ?? f.reason,
    endpoint: f.endpoint,
    ...((f.flags & FaultFlag.ADDRESS) !== 0 ? { address: hex(f.address) } : {}),
    ...((f.flags & FaultFlag.PASID) !== 0 ? { pasid: f.pasid } : {}),
    flags: FAULT_FLAG_NAMES.filter(([, bit]) => (f.flags & bit) !== 0).map(([n]) => n),
  };
}

function recordFault(original: Record<string, unknown>, f: FaultLike): Record<string, unknown> {
  const { none: _none, reason: _r, endpoint: _e, address: _a, flags: _f, pasid: _p, ...rest } = original;
  void _p;
  void _none;
  void _r;
  void _e;
  void _a;
  void _f;
  return { ...rest, ...describeFault(f) };
}

function describeExpected(step: { reason?: string; endpoint?: number; address?: bigint; flags?: readonly string[]; pasid?: number }): Record<string, unknown> {
  return {
    ...(step.pasid !== undefined ? { pasid: step.pasid } : {}),
    ...(step.reason !== undefined ? { reason: step.reason } : {}),
    ...(step.endpoint !== undefined ? { endpoint: step.endpoint } : {}),
    ...(step.address !== undefined ? { address: hex(step.address) } : {}),
    ...(step.flags !== undefined ? { flags: step.flags } : {}),
  };
}

function bigintJson(_key: string, value: unknown): unknown {
  return typeof value === 'bigint' ? hex(value) : value;
}

function jsonValue(value: unknown): unknown {
  return JSON.parse(JSON.stringify(value, bigintJson)) as unknown;
}

// The fixture as JSON again (for --record): the parser keeps the source document alongside.
const sources = new WeakMap<GuestFixture, Record<string, unknown>>();

/** Remembers the JSON a fixture was parsed from, so --record can rewrite it faithfully. */
export function rememberSource(fixture: GuestFixture, source: Record<string, unknown>): void {
  sources.set(fixture, source);
}

function fixtureJson(fixture: GuestFixture): Record<string, unknown> {
  return { ...(sources.get(fixture) ?? { format: fixture.format, name: fixture.name }) };
}

function fixtureStepJson(fixture: GuestFixture, index: number): Record<string, unknown> {
  const steps = sources.get(fixture)?.steps;
  const step = Array.isArray(steps) ? (steps[index] as Record<string, unknown> | undefined) : undefined;
  return { ...(step ?? { op: fixture.steps[index]!.op }) };
}

export type { StatusName };
