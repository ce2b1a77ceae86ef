import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { GuestMemory } from '../src/memory/index.js';
import {
  X86Fault,
  X86FaultName,
  emptyX86WalkResult,
  translatedStage2,
  walkX86,
  x86IovaPfn,
  type X86Access,
  type X86FaultValue,
  type X86Stage1,
  type X86WalkResult,
} from '../src/pagetable/x86-64.js';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import {
  X86BuilderError,
  X86PageTableBuilder,
  pagesFromAllocator,
  type X86PageSize,
  type X86Permissions,
} from '../guest-fixtures/pagetable/x86-64-builder.js';
import { fuzzParams } from './support/fuzz.js';

/*
 * The walker against a reference written the obvious way: 64-bit entries as BigInts, masks built bit
 * by bit from the SDM's tables, no shared code with src/pagetable/x86-64.ts.
 */

interface RefConfig {
  readonly root: number;
  readonly levels: 4 | 5;
  readonly physBits: number;
  readonly nxe: boolean;
}

type RefResult =
  | { readonly fault: 'non-canonical' }
  | { readonly fault: 'stage2' | 'not-present' | 'reserved-bit'; readonly level: number; readonly entryGpa: bigint }
  | {
      readonly fault: 'none' | 'permission';
      readonly level: number;
      readonly gpa: bigint;
      readonly leafGpa: bigint;
      readonly pageSize: bigint;
      readonly writable: boolean;
      readonly user: boolean;
      readonly executable: boolean;
      /** Entries used, top first. */
      readonly path: readonly bigint[];
    };

const bit = (n: number): bigint => 1n << BigInt(n);

function bitsFrom(low: number, highInclusive: number): bigint {
  let mask = 0n;
  for (let b = low; b <= highInclusive; b++) mask |= bit(b);
  return mask;
}

function referenceWalk(cfg: RefConfig, iova: bigint, access: X86Access, read: (gpa: bigint) => bigint | undefined): RefResult {
  const inputBits = 12 + 9 * cfg.levels;
  // Bits 63..inputBits-1 must all be copies of one bit.
  const upper = iova >> BigInt(inputBits - 1);
  if (upper !== 0n && upper !== bitsFrom(0, 64 - inputBits)) return { fault: 'non-canonical' };

  let table = BigInt(cfg.root) & ~0xfffn;
  let writable = true;
  let user = true;
  let executable = true;
  const path: bigint[] = [];
  for (let level: number = cfg.levels; level >= 1; level--) {
    const shift = 12 + 9 * (level - 1);
    const index = (iova >> BigInt(shift)) & 511n;
    const entryGpa = table + index * 8n;
    const e = read(entryGpa);
    if (e === undefined) return { fault: 'stage2', level, entryGpa };
    if ((e & bit(0)) === 0n) return { fault: 'not-present', level, entryGpa };
    const leaf = level === 1 || ((level === 2 || level === 3) && (e & bit(7)) !== 0n);

    let reserved = bitsFrom(cfg.physBits, 51);
    if (!cfg.nxe) reserved |= bit(63);
    if (level >= 4) reserved |= bit(7);
    if (leaf && level > 1) reserved |= bitsFrom(13, shift - 1);
    if ((e & reserved) !== 0n) return { fault: 'reserved-bit', level, entryGpa };

    writable &&= (e & bit(1)) !== 0n;
    user &&= (e & bit(2)) !== 0n;
    executable &&= (e & bit(63)) === 0n;
    path.push(entryGpa);
    const address = e & bitsFrom(12, 51);
    if (leaf) {
      const leafGpa = address & ~bitsFrom(0, shift - 1);
      const gpa = leafGpa + (iova & bitsFrom(12, shift - 1));
      const denied = (access.write && !writable) || (access.user === true && !user) || (access.exec === true && !executable);
      return { fault: denied ? 'permission' : 'none', level, gpa, leafGpa, pageSize: bit(shift), writable, user, executable, path };
    }
    table = address;
  }
  throw new Error('unreachable');
}

/** Every output field the walker promises for its result code, as one string. */
function summarizeWalker(code: X86FaultValue, out: X86WalkResult): string {
  const head = `${X86FaultName[code]} ${out.fault === code ? '' : `(out.fault ${out.fault})`}`;
  if (code === X86Fault.NON_CANONICAL) return head;
  if (code !== X86Fault.NONE && code !== X86Fault.PERMISSION) return `${head} level ${out.faultLevel} entry 0x${out.faultGpa.toString(16)}`;
  return (
    `${head} level ${out.faultLevel} gpa 0x${out.gpa.toString(16)} leaf 0x${out.leafGpa.toString(16)} pfn 0x${out.leafPfn.toString(16)} ` +
    `size 0x${out.pageSize.toString(16)} w ${out.writable} u ${out.user} x ${out.executable}`
  );
}

function summarizeReference(ref: RefResult, iova: bigint): string {
  const head = `${ref.fault} `;
  if (ref.fault === 'non-canonical') return head;
  if ('entryGpa' in ref) return `${head} level ${ref.level} entry 0x${ref.entryGpa.toString(16)}`;
  const pfn = iova >> 12n;
  const leafPfn = pfn - (pfn % (ref.pageSize >> 12n));
  return (
    `${head} level ${ref.fault === 'none' ? 0 : ref.level} gpa 0x${ref.gpa.toString(16)} leaf 0x${ref.leafGpa.toString(16)} pfn 0x${leafPfn.toString(16)} ` +
    `size 0x${ref.pageSize.toString(16)} w ${ref.writable} u ${ref.user} x ${ref.executable}`
  );
}

const ACCESSES: readonly X86Access[] = [false, true].flatMap((write) =>
  [false, true].flatMap((user) => [false, true].map((exec) => ({ write, user, exec }))),
);
const PERMISSIONS_ARB = fc.record({ writable: fc.boolean(), user: fc.boolean(), executable: fc.boolean() });
const SIZES: readonly X86PageSize[] = [0x1000, 0x20_0000, 0x4000_0000];
/** Table indices biased towards a few values so maps share tables and collide. */
const INDEX_ARB = fc.oneof(fc.constantFrom(0, 1, 2, 255, 256, 511), fc.integer({ min: 0, max: 511 }));
const U64 = bit(64) - 1n;

/** A canonical IOVA from per-level indices (indices[0] is level 1); indices below the leaf level are zeroed. */
function composeIova(levels: 4 | 5, indices: readonly number[], leafLevel: number): bigint {
  let iova = 0n;
  for (let level = leafLevel; level <= levels; level++) iova |= BigInt(indices[level - 1]!) << BigInt(12 + 9 * (level - 1));
  const inputBits = 12 + 9 * levels;
  return (iova & bit(inputBits - 1)) !== 0n ? iova | (U64 & ~(bit(inputBits) - 1n)) : iova;
}

function leafLevelOf(size: X86PageSize): number {
  return size === 0x1000 ? 1 : size === 0x20_0000 ? 2 : 3;
}

const GUEST_PAGES = 96;
const MEMORY_PAGES = 128;

describe('x86-64 walker against a reference (property)', () => {
  const mapArb = fc.record({
    indices: fc.array(INDEX_ARB, { minLength: 5, maxLength: 5 }),
    size: fc.constantFrom(...SIZES),
    frameHigh: fc.integer({ min: 0, max: 2 ** 26 - 1 }),
    frameLow: fc.integer({ min: 0, max: 2 ** 26 - 1 }),
    permissions: PERMISSIONS_ARB,
  });
  const mutationArb = fc.record({
    entry: fc.nat(),
    /** Pick among leaves only (they carry most of the rules), and/or among one level's entries. */
    leafOnly: fc.boolean(),
    level: fc.option(fc.integer({ min: 1, max: 5 }), { nil: undefined }),
    // Any bit, or one where a rule changes: P, R/W, U/S, A, D, PS, PAT, large-frame edges, width edges, ignored, XD.
    bit: fc.oneof(
      { weight: 1, arbitrary: fc.integer({ min: 0, max: 63 }) },
      { weight: 2, arbitrary: fc.constantFrom(0, 1, 2, 5, 6, 7, 8, 12, 13, 20, 21, 25, 29, 30, 39, 40, 45, 46, 51, 52, 62, 63) },
    ),
    kind: fc.constantFrom('set', 'clear', 'flip', 'not-present'),
  });
  const scenarioArb = fc.record({
    levels: fc.constantFrom<4 | 5>(4, 5),
    physBits: fc.constantFrom(52, 46, 40),
    /** The walker's NXE. The guest always writes XD for non-executable leaves: without NXE those are reserved-bit faults. */
    nxe: fc.constantFrom(true, true, true, false),
    accessedDirty: fc.boolean(),
    placement: fc.shuffledSubarray(
      Array.from({ length: MEMORY_PAGES }, (_, i) => i),
      { minLength: GUEST_PAGES, maxLength: GUEST_PAGES },
    ),
    maps: fc.array(mapArb, { minLength: 1, maxLength: 12 }),
    mutations: fc.oneof({ weight: 1, arbitrary: fc.constant([]) }, { weight: 2, arbitrary: fc.array(mutationArb, { minLength: 1, maxLength: 6 }) }),
    /** Restrictions a guest may put on table entries too: R/W or U/S clear, XD set. */
    restrictions: fc.array(fc.record({ entry: fc.nat(), change: fc.constantFrom(bit(1), bit(2), bit(63)) }), { maxLength: 3 }),
    /** Stage-2 holes: indices into the table pages, or any guest page. */
    tableHoles: fc.oneof(fc.constant([]), fc.array(fc.nat(), { minLength: 1, maxLength: 2 })),
    pageHoles: fc.array(fc.integer({ min: 0, max: GUEST_PAGES - 1 }), { maxLength: 3 }),
    offsets: fc.array(fc.bigInt({ min: 0n, max: bit(30) - 1n }), { minLength: 4, maxLength: 4 }),
    extra: fc.array(
      fc.oneof(
        fc.bigInt({ min: 0n, max: U64 }),
        fc.tuple(fc.array(INDEX_ARB, { minLength: 5, maxLength: 5 }), fc.integer({ min: 1, max: 3 })).map(([indices, leafLevel]) => ({ indices, leafLevel })),
      ),
      { maxLength: 8 },
    ),
  });

  it('gives the reference result for every IOVA and access, and sets A/D exactly where the reference says', () => {
    fc.assert(
      fc.property(scenarioArb, (s) => {
        const memory = GuestMemory.create(MEMORY_PAGES * 0x1000);
        // Stage 2: guest page p lives in memory page placement[p]; holes are unmapped.
        const holes = new Set<number>();
        const toMemory = (gpa: number): number => {
          const page = Math.floor(gpa / 0x1000);
          if (!(page >= 0 && page < GUEST_PAGES) || holes.has(page)) return -1;
          return s.placement[page]! * 0x1000 + (gpa % 0x1000);
        };
        const refRead = (gpa: bigint): bigint | undefined => {
          const page = gpa >> 12n;
          if (page >= BigInt(GUEST_PAGES) || holes.has(Number(page))) return undefined;
          return memory.readU64(s.placement[Number(page)]! * 0x1000 + Number(gpa & 0xfffn));
        };

        // The guest builds its table through its own view (stage 2 before any holes).
        const allocator = new GuestAllocator(0, GUEST_PAGES * 0x1000);
        const builder = new X86PageTableBuilder({
          allocator: pagesFromAllocator(allocator),
          write: (gpa, value) => memory.writeU64(toMemory(gpa), value),
          levels: s.levels,
          physBits: s.physBits,
        });
        const mapped: { iova: bigint; size: bigint }[] = [];
        for (const m of s.maps) {
          const leafLevel = leafLevelOf(m.size);
          const iova = composeIova(s.levels, m.indices, leafLevel);
          const frames = 2 ** s.physBits / m.size;
          const gpa = ((m.frameHigh * 2 ** 26 + m.frameLow) % frames) * m.size;
          try {
            builder.map(iova, gpa, m.size, m.permissions);
            mapped.push({ iova, size: BigInt(m.size) });
          } catch (e) {
            expect(e).toBeInstanceOf(X86BuilderError);
            expect((e as X86BuilderError).reason).toBe('overlap');
          }
        }
        const cfg: RefConfig = { root: builder.root, levels: s.levels, physBits: s.physBits, nxe: s.nxe };

        // The reference agrees with what the builder meant, before anything is broken.
        for (const leaf of s.nxe ? builder.leaves() : []) {
          const offset = s.offsets[0]! % BigInt(leaf.size);
          const r = referenceWalk(cfg, leaf.iova + offset, { write: false }, refRead);
          expect(r.fault).toBe('none');
          if (r.fault !== 'none') continue;
          expect(r.gpa).toBe(BigInt(leaf.gpa) + (offset & ~0xfffn));
          expect([r.pageSize, r.writable, r.user, r.executable]).toEqual([
            BigInt(leaf.size),
            leaf.permissions.writable,
            leaf.permissions.user,
            leaf.permissions.executable,
          ]);
        }

        // Restrict some table entries, then break things: bits set, cleared or flipped in random
        // entries, entries made not present, stage-2 holes.
        const entries = builder.entries();
        const tableEntries = entries.filter((x) => !x.leaf);
        for (const r of tableEntries.length > 0 ? s.restrictions : []) {
          const at = toMemory(tableEntries[r.entry % tableEntries.length]!.entryGpa);
          const value = memory.readU64(at);
          memory.writeU64(at, r.change === bit(63) ? value | r.change : value & ~r.change);
        }
        for (const m of s.mutations) {
          const pool = entries.filter((x) => (!m.leafOnly || x.leaf) && (m.level === undefined || x.level === m.level));
          const e = (pool.length > 0 ? pool : entries)[m.entry % (pool.length > 0 ? pool.length : entries.length)]!;
          const at = toMemory(e.entryGpa);
          const value = memory.readU64(at);
          const next =
            m.kind === 'set' ? value | bit(m.bit) : m.kind === 'clear' ? value & ~bit(m.bit) : m.kind === 'flip' ? value ^ bit(m.bit) : value & ~1n;
          memory.writeU64(at, next);
        }
        const tablePages = [...new Set(entries.map((e) => e.tableGpa / 0x1000))];
        for (const h of s.tableHoles) holes.add(tablePages[h % tablePages.length]!);
        for (const h of s.pageHoles) holes.add(h);

        // IOVAs: each mapping's start, inside, end and just below; random 64-bit values; composed ones.
        const iovas: bigint[] = [];
        for (const [i, { iova, size }] of mapped.entries()) {
          iovas.push(iova, iova + (s.offsets[i % 4]! % size), (iova + size) & U64, (iova - 0x1000n) & U64);
        }
        for (const x of s.extra) iovas.push(typeof x === 'bigint' ? x : composeIova(s.levels, x.indices, x.leafLevel));

        const s2 = translatedStage2(memory, toMemory);
        const stage1: X86Stage1 = {
          root: builder.root,
          levels: s.levels,
          physBits: s.physBits,
          nxe: s.nxe,
          ...(s.accessedDirty ? { accessedDirty: s2.setBits } : {}),
        };
        const before = memory.view(0, memory.size).slice();
        const expectedAD = new Map<number, bigint>();
        const out = emptyX86WalkResult();
        for (const iova of iovas) {
          for (const access of ACCESSES) {
            const ref = referenceWalk(cfg, iova, access, refRead);
            const code = walkX86(stage1, x86IovaPfn(iova), access, s2.read, out);
            // One comparable summary per side; expect() runs only on a mismatch, to keep the loop fast.
            const got = summarizeWalker(code, out);
            const want = summarizeReference(ref, iova);
            if (got !== want) expect(got, `iova 0x${iova.toString(16)} ${JSON.stringify(access)}`).toBe(want);
            if (s.accessedDirty && ref.fault === 'none') {
              ref.path.forEach((gpa, i) => {
                const address = toMemory(Number(gpa));
                const bits = i === ref.path.length - 1 && access.write ? 0x60n : 0x20n;
                expectedAD.set(address, (expectedAD.get(address) ?? 0n) | bits);
              });
            }
          }
        }

        // Memory changed only by the A/D bits of successful walks (none at all without the option).
        const expected = GuestMemory.create(MEMORY_PAGES * 0x1000);
        expected.write(0, before);
        for (const [address, bits] of expectedAD) expected.writeU64(address, expected.readU64(address) | bits);
        const actual = memory.view(0, memory.size);
        const wanted = expected.view(0, expected.size);
        let wrong = -1;
        for (let i = 0; i < actual.length && wrong < 0; i++) if (actual[i] !== wanted[i]) wrong = i & ~7;
        if (wrong >= 0) expect(memory.readU64(wrong), `memory word at 0x${wrong.toString(16)}`).toBe(expected.readU64(wrong));
      }),
      fuzzParams(0x86_64, 150),
    );
  });
});

describe('x86-64 builder against a model (property)', () => {
  interface ModelLeaf {
    /** Index-space start (sign extension stripped). */
    start: bigint;
    size: bigint;
    gpa: number;
    permissions: X86Permissions;
  }

  // A small universe (indices 0, 1 and 511 at every level, 511 at the top being the high half) so
  // that maps collide and unmaps and protects find what earlier maps made.
  const smallIndices = fc.array(fc.constantFrom(0, 1, 511), { minLength: 5, maxLength: 5 });
  const opArb = fc.oneof(
    {
      weight: 3,
      arbitrary: fc.record({
        op: fc.constant('map' as const),
        indices: smallIndices,
        size: fc.constantFrom(...SIZES),
        frame: fc.nat(1 << 20),
        permissions: PERMISSIONS_ARB,
      }),
    },
    {
      weight: 2,
      arbitrary: fc.record({
        op: fc.constantFrom('unmap' as const, 'protect' as const),
        indices: smallIndices,
        leafLevel: fc.integer({ min: 1, max: 4 }),
        /** Start at (an aligned address below) a live leaf instead of a random one. */
        target: fc.option(fc.nat(), { nil: undefined }),
        length: fc.constantFrom(0x1000n, 0x2000n, 0x20_0000n, 0x40_0000n, 0x4000_0000n, 0x8000_0000n, bit(39), bit(40)),
        permissions: PERMISSIONS_ARB,
      }),
    },
  );

  it('maps, unmaps and protects like the model, reports the right ranges and frees emptied tables', () => {
    fc.assert(
      fc.property(fc.constantFrom<4 | 5>(4, 5), fc.array(opArb, { minLength: 1, maxLength: 30 }), (levels, ops) => {
        const memory = GuestMemory.create(512 * 0x1000);
        const allocator = new GuestAllocator(0, memory.size);
        const builder = new X86PageTableBuilder({ allocator: pagesFromAllocator(allocator), write: (gpa, v) => memory.writeU64(gpa, v), levels });
        const inputBits = BigInt(12 + 9 * levels);
        const strip = (iova: bigint) => iova & (bit(Number(inputBits)) - 1n);
        const canonical = (start: bigint) => ((start & bit(Number(inputBits) - 1)) !== 0n ? start | (U64 & ~(bit(Number(inputBits)) - 1n)) : start);
        let model: ModelLeaf[] = [];

        for (const o of ops) {
          if (o.op === 'map') {
            const start = strip(composeIova(levels, o.indices, leafLevelOf(o.size)));
            const size = BigInt(o.size);
            const gpa = o.frame * o.size;
            const overlaps = model.some((l) => l.start < start + size && start < l.start + l.size);
            const run = () => builder.map(canonical(start), gpa, o.size, o.permissions);
            if (overlaps) {
              expect(run).toThrow(/overlaps/);
            } else {
              expect(run()).toEqual([{ iova: canonical(start), size }]);
              model.push({ start, size, gpa, permissions: o.permissions });
            }
          } else {
            const live = o.target === undefined || model.length === 0 ? undefined : model[o.target % model.length]!;
            const align = bit(12 + 9 * (o.leafLevel - 1));
            const start = live === undefined ? strip(composeIova(levels, o.indices, o.leafLevel)) : live.start - (live.start % align);
            const end = start + o.length;
            const half = bit(Number(inputBits) - 1);
            const run = () => (o.op === 'unmap' ? builder.unmap(canonical(start), o.length) : builder.protect(canonical(start), o.length, o.permissions));
            if (end > bit(Number(inputBits)) || (start < half && end > half)) {
              expect(run).toThrow(/canonical half/);
              continue;
            }
            const touched = model.filter((l) => l.start < end && start < l.start + l.size);
            if (touched.some((l) => l.start < start || l.start + l.size > end)) {
              expect(run).toThrow(/cuts the/);
              continue;
            }
            touched.sort((a, b) => (a.start < b.start ? -1 : 1));
            const ranges: { iova: bigint; size: bigint }[] = [];
            for (const l of touched) {
              const last = ranges[ranges.length - 1];
              if (last !== undefined && last.iova + last.size === l.start) last.size += l.size;
              else ranges.push({ iova: l.start, size: l.size });
            }
            expect(run()).toEqual(ranges.map((r) => ({ iova: canonical(r.iova), size: r.size })));
            if (o.op === 'unmap') model = model.filter((l) => !touched.includes(l));
            else for (const l of touched) l.permissions = o.permissions;
          }
        }

        model.sort((a, b) => (a.start < b.start ? -1 : 1));
        expect(builder.leaves().map((l) => [l.iova, BigInt(l.size), l.gpa, l.permissions.writable, l.permissions.user, l.permissions.executable])).toEqual(
          model.map((l) => [canonical(l.start), l.size, l.gpa, l.permissions.writable, l.permissions.user, l.permissions.executable]),
        );
        // Exactly the tables the live leaves need: the root plus one per distinct (level, reach) prefix.
        const needed = new Set<string>();
        for (const l of model) {
          for (let level = leafLevelOf(Number(l.size) as X86PageSize); level < levels; level++) needed.add(`${level}:${l.start >> BigInt(12 + 9 * level)}`);
        }
        expect(builder.tableCount).toBe(1 + needed.size);
        expect(allocator.available).toBe(memory.size - builder.tableCount * 0x1000);

        const out = emptyX86WalkResult();
        const read = translatedStage2(memory, (gpa) => gpa).read;
        for (const l of model) {
          const iova = canonical(l.start + l.size - 0x1000n);
          expect(walkX86({ root: builder.root, levels }, x86IovaPfn(iova), { write: l.permissions.writable, user: l.permissions.user, exec: l.permissions.executable }, read, out)).toBe(X86Fault.NONE);
          expect(out.gpa).toBe(l.gpa + Number(l.size) - 0x1000);
        }
      }),
      fuzzParams(0xb01d, 200),
    );
  });
});
