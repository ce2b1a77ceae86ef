import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { X86BuilderError, X86PageTableBuilder, pagesFromAllocator, type IovaRange, type X86PageSize } from '../guest-fixtures/pagetable/x86-64-builder.js';
import { FaultAccess, FaultReason, type FaultReasonValue } from '../src/ioasid/fault-queue.js';
import {
  HwptAllocFlag,
  HwptDataType,
  IommufdHost,
  IoasMapFlag,
  U64_MAX,
  VtdInvalidateFlag,
  encodeVtdS1,
  type Context,
  type HwptInvalidateEntry,
} from '../src/ioasid/index.js';
import { QuiescenceOwner, QuiescenceWorker, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../src/ioasid/translator.js';
import { GuestMemory } from '../src/memory/index.js';
import { fuzzParams } from './support/fuzz.js';

/*
 * Random guest stage-1 tables (built and edited with the guest builder) over a random stage-2 IOAS:
 * Context.translate and a device worker's Translator, which keeps its IOTLB across the edits, both
 * agree with a reference 2-D walk written with BigInts for random IOVAs, accesses and PASIDs. Every
 * stage-1 edit is followed by hwptInvalidate of what it changed; stage-2 edits need nothing else.
 */

const MIB = 1 << 20;
const GUEST_RAM = 16 * MIB;
const HOST_BASE = 16 * MIB;
/** Stage-2 chunks over guest-physical memory: each one IOAS area (or none) so it can change alone. */
const CHUNKS: readonly { start: number; size: number }[] = [
  ...Array.from({ length: 8 }, (_, i) => ({ start: i * MIB, size: MIB })),
  { start: 8 * MIB, size: 2 * MIB },
  { start: 10 * MIB, size: 2 * MIB },
  ...Array.from({ length: 4 }, (_, i) => ({ start: 12 * MIB + i * MIB, size: MIB })),
];
type Perm = 'none' | 'r' | 'rw';

/** IOVA bases that share tables and reach both halves of the canonical space. */
const BASES_4 = [0n, 0x4000_0000n, 0x7f_ffc0_0000n, 0x7fff_ffc0_0000n, 0xffff_8000_0000_0000n, 0xffff_ffff_c000_0000n];
const BASES_5 = [0n, 0x4000_0000n, 0x00ff_ffff_c000_0000n, 0xff00_0000_0000_0000n, 0xffff_ffff_c000_0000n, 0x0001_0000_0000_0000n];
const SIZES: readonly X86PageSize[] = [0x1000, 0x1000, 0x1000, 0x20_0000, 0x4000_0000];

interface LeafSpec {
  base: number;
  slot: number;
  size: X86PageSize;
  gpaIndex: number;
  writable: boolean;
  user: boolean;
  executable: boolean;
  table: 0 | 1;
}

const LEAF_ARB: fc.Arbitrary<LeafSpec> = fc.record({
  base: fc.integer({ min: 0, max: 5 }),
  slot: fc.integer({ min: 0, max: 15 }),
  size: fc.constantFrom(...SIZES),
  gpaIndex: fc.integer({ min: 0, max: 5000 }),
  writable: fc.boolean(),
  user: fc.oneof(fc.constant(true), fc.constant(true), fc.boolean()),
  executable: fc.boolean(),
  table: fc.constantFrom(0 as const, 0 as const, 1 as const),
});

type Step =
  | { op: 'map'; leaf: LeafSpec }
  | { op: 'unmap'; pick: number; table: 0 | 1 }
  | { op: 'protect'; pick: number; table: 0 | 1; writable: boolean; user: boolean }
  | { op: 'stage2'; chunk: number; perm: Perm }
  | { op: 'corrupt'; pick: number; table: 0 | 1 };

const PERM_ARB = fc.constantFrom<Perm>('none', 'r', 'rw', 'rw');
const STEP_ARB: fc.Arbitrary<Step> = fc.oneof(
  fc.record({ op: fc.constant('map' as const), leaf: LEAF_ARB }),
  fc.record({ op: fc.constant('unmap' as const), pick: fc.nat(), table: fc.constantFrom(0 as const, 1 as const) }),
  fc.record({ op: fc.constant('protect' as const), pick: fc.nat(), table: fc.constantFrom(0 as const, 1 as const), writable: fc.boolean(), user: fc.boolean() }),
  fc.record({ op: fc.constant('stage2' as const), chunk: fc.integer({ min: 0, max: CHUNKS.length - 1 }), perm: PERM_ARB }),
  fc.record({ op: fc.constant('corrupt' as const), pick: fc.nat(), table: fc.constantFrom(0 as const, 1 as const) }),
);

interface Query {
  target: 0 | 1 | 2 | 3;
  pick: number;
  offset: number;
  random: bigint;
  access: 'read' | 'write' | 'exec';
}

const QUERY_ARB: fc.Arbitrary<Query> = fc.record({
  target: fc.constantFrom(0 as const, 0 as const, 1 as const, 2 as const, 3 as const),
  pick: fc.nat(),
  offset: fc.integer({ min: 0, max: 0x3fff_fff0 }),
  random: fc.oneof(fc.bigInt({ min: 0n, max: U64_MAX }), fc.constant(-1n)),
  access: fc.constantFrom('read' as const, 'read' as const, 'write' as const, 'exec' as const),
});

const SCENARIO_ARB = fc.record({
  levels: fc.constantFrom(4 as const, 5 as const),
  // Data chunks, then the guest's table chunks (rarely out of stage 2: every walk would fault).
  stage2: fc
    .tuple(
      fc.array(fc.constantFrom<Perm>('r', 'rw', 'rw', 'rw', 'none'), { minLength: CHUNKS.length - 4, maxLength: CHUNKS.length - 4 }),
      fc.array(fc.constantFrom<Perm>('r', 'rw', 'rw', 'r', 'rw', 'rw', 'r', 'rw', 'rw', 'none'), { minLength: 4, maxLength: 4 }),
    )
    .map(([data, tables]) => [...data, ...tables]),
  leaves: fc.array(LEAF_ARB, { maxLength: 30 }),
  pasids: fc.uniqueArray(fc.integer({ min: 1, max: (1 << 20) - 1 }), { minLength: 3, maxLength: 3 }),
  steps: fc.array(fc.tuple(STEP_ARB, fc.boolean()), { maxLength: 10 }),
  queries: fc.array(QUERY_ARB, { minLength: 20, maxLength: 40 }),
});

type Outcome = { fault: 'MAPPING' | 'PERMISSION' | 'STAGE2' | 'DOMAIN' } | { address: number };

const bit = (n: number): bigint => 1n << BigInt(n);
const bits = (lo: number, hi: number): bigint => bit(hi + 1) - bit(lo);

/** The reference: the SDM's 4/5-level walk with every read through a chunked stage 2. */
function referenceWalk(memory: GuestMemory, stage2: readonly Perm[], root: number, levels: 4 | 5, iova: bigint, access: 'read' | 'write' | 'exec'): Outcome {
  const s2 = (gpa: bigint, write: boolean): number | undefined => {
    if (gpa >= BigInt(GUEST_RAM)) return undefined;
    const g = Number(gpa);
    const chunk = CHUNKS.findIndex((c) => g >= c.start && g < c.start + c.size);
    const perm = stage2[chunk];
    if (perm === 'none' || (write && perm !== 'rw')) return undefined;
    return HOST_BASE + g;
  };
  const inputBits = 12 + 9 * levels;
  const upper = iova >> BigInt(inputBits - 1);
  if (upper !== 0n && upper !== bits(0, 64 - inputBits)) return { fault: 'MAPPING' };
  let table = BigInt(root);
  let writable = true;
  let user = true;
  let executable = true;
  for (let level: number = levels; level >= 1; level--) {
    const shift = 12 + 9 * (level - 1);
    const entryGpa = table + ((iova >> BigInt(shift)) & 511n) * 8n;
    const at = s2(entryGpa, false);
    if (at === undefined) return { fault: 'STAGE2' };
    const e = memory.readU64(at);
    if ((e & 1n) === 0n) return { fault: 'MAPPING' };
    const leaf = level === 1 || ((level === 2 || level === 3) && (e & bit(7)) !== 0n);
    let reserved = 0n;
    if (level >= 4) reserved |= bit(7);
    if (leaf && level > 1) reserved |= bits(13, shift - 1);
    if ((e & reserved) !== 0n) return { fault: 'MAPPING' };
    writable &&= (e & bit(1)) !== 0n;
    user &&= (e & bit(2)) !== 0n;
    executable &&= (e & bit(63)) === 0n;
    const address = e & bits(12, 51);
    if (leaf) {
      const gpa = (address & ~bits(0, shift - 1)) + (iova & bits(0, shift - 1));
      // Every request is a user request; stage 1 is judged before the output goes through stage 2.
      if (!user || (access === 'write' && !writable) || (access === 'exec' && !executable)) return { fault: 'PERMISSION' };
      const out = s2(gpa, access === 'write');
      return out === undefined ? { fault: 'STAGE2' } : { address: out };
    }
    table = address;
  }
  throw new Error('unreachable');
}

const REASONS: Record<number, string> = {
  [FaultReason.MAPPING]: 'MAPPING',
  [FaultReason.PERMISSION]: 'PERMISSION',
  [FaultReason.STAGE2]: 'STAGE2',
  [FaultReason.DOMAIN]: 'DOMAIN',
};

interface Rig {
  memory: GuestMemory;
  ctx: Context;
  ioas: number;
  dev: number;
  row: number;
  nested: [number, number];
  builders: [X86PageTableBuilder, X86PageTableBuilder];
  stage2: Perm[];
  t: Translator;
}

function setStage2(r: Rig, chunk: number, perm: Perm): void {
  const c = CHUNKS[chunk]!;
  if (r.stage2[chunk] !== 'none') r.ctx.ioasUnmap(r.ioas, BigInt(c.start), BigInt(c.size));
  if (perm !== 'none') {
    const flags = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | (perm === 'rw' ? IoasMapFlag.WRITEABLE : 0);
    r.ctx.ioasMap(r.ioas, { gpa: HOST_BASE + c.start, length: BigInt(c.size), iova: BigInt(c.start), flags });
  }
  r.stage2[chunk] = perm;
}

function rig(levels: 4 | 5, stage2: readonly Perm[], pasids: readonly number[]): Rig {
  const memory = GuestMemory.create(HOST_BASE + GUEST_RAM);
  const host = new IommufdHost(memory, { devices: [{ name: 'dev0', group: 'g', pasidBits: 20 }], autoReclaim: false });
  const ctx = host.open();
  const q = createQuiescenceBuffer(2);
  ctx.attachQuiescence(new QuiescenceOwner(q));
  const ioas = ctx.ioasAlloc();
  const dev = ctx.deviceBind('dev0');
  const parent = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT | HwptAllocFlag.PASID });
  // Two guest address spaces, each with tables in its own part of the table chunks.
  const builders = [0, 1].map(
    (i) =>
      new X86PageTableBuilder({
        allocator: pagesFromAllocator(new GuestAllocator(12 * MIB + i * 2 * MIB, 2 * MIB)),
        write: (gpa, value) => memory.writeU64(HOST_BASE + gpa, value),
        levels,
      }),
  ) as [X86PageTableBuilder, X86PageTableBuilder];
  const nested = builders.map((b) =>
    ctx.hwptAlloc(dev, parent, { flags: HwptAllocFlag.PASID, dataType: HwptDataType.VTD_S1, data: encodeVtdS1(BigInt(b.root), levels === 5 ? 57 : 48) }),
  ) as [number, number];
  ctx.deviceAttach(dev, nested[0]);
  ctx.deviceAttach(dev, nested[0], pasids[0]!);
  ctx.deviceAttach(dev, nested[1], pasids[1]!);
  const shared = ctx.describeShared();
  const t = new Translator({ pool: shared.pool.buffer, attachments: new DeviceTableAttachments(shared), quiescence: QuiescenceWorker.register(q) });
  const r: Rig = { memory, ctx, ioas, dev, row: ctx.deviceRow(dev), nested, builders, stage2: CHUNKS.map(() => 'none' as Perm), t };
  stage2.forEach((perm, chunk) => setStage2(r, chunk, perm));
  return r;
}

function leafIova(levels: 4 | 5, spec: LeafSpec): bigint {
  const bases = levels === 5 ? BASES_5 : BASES_4;
  return bases[spec.base]! + BigInt(spec.slot) * BigInt(spec.size);
}

function leafGpa(spec: LeafSpec): number {
  if (spec.size === 0x4000_0000) return spec.gpaIndex % 2 === 0 ? 0 : 0x4000_0000;
  if (spec.size === 0x20_0000) return (spec.gpaIndex % 9) * 0x20_0000;
  // Mostly inside guest RAM (data and table chunks), sometimes just past it.
  return (spec.gpaIndex % 4400) * 0x1000;
}

function toEntries(ranges: readonly IovaRange[], flags: number): HwptInvalidateEntry[] {
  return ranges.map((range) => ({ addr: range.iova, npages: range.size >> 12n, flags }));
}

describe('nested translation against a reference 2-D walk', () => {
  it('Context.translate and a long-lived Translator agree with the reference, before and after edits and hwptInvalidate', () => {
    let checked = 0;
    let translated = 0;
    const outcomes: Record<string, number> = {};
    fc.assert(
      fc.property(SCENARIO_ARB, (scenario) => {
        const r = rig(scenario.levels, scenario.stage2, scenario.pasids);
        const [pasid0, pasid1, unattached] = scenario.pasids as [number, number, number];
        const tryMap = (spec: LeafSpec): readonly IovaRange[] => {
          try {
            return r.builders[spec.table].map(leafIova(scenario.levels, spec), leafGpa(spec), spec.size, spec);
          } catch (e) {
            if (e instanceof X86BuilderError) return [];
            throw e;
          }
        };
        for (const spec of scenario.leaves) tryMap(spec);

        const check = (): void => {
          for (const q of scenario.queries) {
            const space = q.target === 2 ? 1 : 0;
            const leaves = r.builders[space].leaves();
            let iova: bigint;
            if (q.random >= 0n && (leaves.length === 0 || q.pick % 4 === 0)) {
              iova = q.random & ~7n;
            } else if (leaves.length === 0) {
              iova = BigInt(q.offset & ~7);
            } else {
              const leaf = leaves[q.pick % leaves.length]!;
              iova = leaf.iova + (BigInt(q.offset & ~7) % BigInt(leaf.size));
            }
            const pasid = [0, pasid0, pasid1, unattached][q.target]!;
            const want: Outcome =
              q.target === 3 ? { fault: 'DOMAIN' } : referenceWalk(r.memory, r.stage2, r.builders[space].root, scenario.levels, iova, q.access);
            const label = `iova 0x${iova.toString(16)} pasid ${pasid} ${q.access}`;
            const bitsOf = q.access === 'read' ? FaultAccess.READ : q.access === 'write' ? FaultAccess.WRITE : FaultAccess.EXEC;
            const status: FaultReasonValue = r.t.translate(r.row, pasid === 0 ? undefined : pasid, iova, 8, bitsOf);
            const got: Outcome = status === FaultReason.NONE ? { address: r.t.spans.gpa[0]! } : { fault: REASONS[status] as 'MAPPING' };
            expect(got, `Translator: ${label}`).toEqual(want);
            if (q.access !== 'exec') {
              const res = r.ctx.translate(r.dev, pasid, iova, 8, q.access);
              const owner: Outcome = res.fault === undefined ? { address: res.spans[0]!.gpa } : { fault: res.fault.reason };
              expect(owner, `Context.translate: ${label}`).toEqual(want);
            }
            checked++;
            if ('address' in want) translated++;
            else outcomes[want.fault] = (outcomes[want.fault] ?? 0) + 1;
          }
        };

        check();
        for (const [step, everything] of scenario.steps) {
          let ranges: readonly IovaRange[] = [];
          let flags = 0;
          let all = everything;
          const leaves = step.op === 'map' || step.op === 'stage2' ? [] : r.builders[step.table].leaves();
          const nested = step.op === 'map' ? r.nested[step.leaf.table] : step.op === 'stage2' ? r.nested[0] : r.nested[step.table];
          switch (step.op) {
            case 'map':
              ranges = tryMap(step.leaf);
              break;
            case 'unmap':
              if (leaves.length > 0) {
                const leaf = leaves[step.pick % leaves.length]!;
                ranges = r.builders[step.table].unmap(leaf.iova, leaf.size);
              }
              break;
            case 'protect':
              if (leaves.length > 0) {
                const leaf = leaves[step.pick % leaves.length]!;
                ranges = r.builders[step.table].protect(leaf.iova, leaf.size, { writable: step.writable, user: step.user, executable: true });
                // Only leaves changed: the guest may say so.
                flags = VtdInvalidateFlag.LEAF;
              }
              break;
            case 'stage2':
              // Stage 2 belongs to the host: its changes are strict on their own.
              setStage2(r, step.chunk, step.perm);
              all = false;
              break;
            case 'corrupt': {
              // Set a reserved bit (PS in the top-level entry) where a walk will meet it.
              const path = leaves.length > 0 ? r.builders[step.table].lookup(leaves[step.pick % leaves.length]!.iova) : [];
              const top = path[0];
              if (top !== undefined) {
                r.memory.writeU64(HOST_BASE + top.entryGpa, top.value | bit(7));
                all = true;
              }
              break;
            }
          }
          if (all && step.op !== 'stage2') r.ctx.hwptInvalidate(nested, [{ addr: 0n, npages: U64_MAX, flags: 0 }]);
          else if (ranges.length > 0) expect(r.ctx.hwptInvalidate(nested, toEntries(ranges, flags))).toBe(ranges.length);
          check();
        }
      }),
      fuzzParams(0x6e5e, 40),
    );
    // The scenarios really translate, and reach every kind of fault.
    expect(translated).toBeGreaterThan(checked / 20);
    for (const reason of ['MAPPING', 'PERMISSION', 'STAGE2', 'DOMAIN']) expect(outcomes[reason] ?? 0, reason).toBeGreaterThan(0);
  });
});
