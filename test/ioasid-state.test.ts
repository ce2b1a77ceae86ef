import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { X86PageTableBuilder, pagesFromAllocator } from '../guest-fixtures/pagetable/x86-64-builder.js';
import {
  AccessRwFlag,
  HwptAllocFlag,
  HwptDataType,
  HwptGetDirtyBitmapFlag,
  IoasMapFlag,
  IommuOption,
  IommuOptionOp,
  IommufdError,
  IommufdHost,
  U64_MAX,
  encodeVtdS1,
  type AccessOps,
  type Context,
  type ContextSnapshot,
  type ContextState,
  type PhysicalDeviceSpec,
} from '../src/ioasid/index.js';
import { ObjectTable } from '../src/ioasid/objects.js';
import { X86_PAGE_4K } from '../src/pagetable/x86-64.js';
import { GuestMemory } from '../src/memory/index.js';

/*
 * Context.saveState / restoreState (live migration of the backend): random contexts saved and
 * rebuilt on a fresh host over a copy of guest memory must look, translate, account and report
 * dirty pages exactly as the source; hostile states must either restore to a state that saves back
 * the same or fail with IommufdError leaving the destination as it was.
 */

const PAGE = 4096;
const PAGE_N = 4096n;
const MEMORY = 8 << 20;
const HIGH = 1n << 48n;
/** Guest pages a stage-1 table of the nested HWPTs comes from, and the pages it maps to. */
const S1_TABLES = 0x70_0000;
const S1_DATA = 0x10_0000;
const S1_PAGES = 64;
const R = IoasMapFlag.READABLE;
const W = IoasMapFlag.WRITEABLE;
const FIXED = IoasMapFlag.FIXED_IOVA;
const PASIDS = [0, 0, 1, 9, 100];

/** One group of two devices that differ in PASID width and dirty tracking, and two single ones. */
const DEVICES: PhysicalDeviceSpec[] = [
  { name: 'a0', group: 'ga', pasidBits: 8, dirtyTracking: true, reservedRegions: [[0x3f_0000n, 0x3f_ffffn]] },
  { name: 'a1', group: 'ga', pasidBits: 4, dirtyTracking: false, reservedRegions: [[0x3_0000n, 0x3_3fffn]] },
  { name: 'b0', group: 'gb', pasidBits: 20, dirtyTracking: true },
  { name: 'c0', group: 'gc', pasidBits: 0, dirtyTracking: true, reservedRegions: [[0x8000n, 0x8fffn]] },
];

function newHost(memory: GuestMemory, extra: { memlockLimitPages?: number } = {}): IommufdHost {
  return new IommufdHost(memory, { devices: DEVICES, ...extra });
}

function copyOf(memory: GuestMemory): GuestMemory {
  const copy = GuestMemory.create(MEMORY);
  copy.view(0, MEMORY).set(memory.view(0, MEMORY));
  return copy;
}

/** A guest x86-64 stage-1 table at S1_TABLES mapping IOVA pages 0..63 to S1_DATA onwards. */
function writeStage1(memory: GuestMemory): bigint {
  const builder = new X86PageTableBuilder({
    allocator: pagesFromAllocator(new GuestAllocator(S1_TABLES, 0x4_0000)),
    write: (gpa, value) => memory.writeU64(gpa, value),
    levels: 4,
  });
  for (let i = 0; i < S1_PAGES; i++) builder.map(BigInt(i * PAGE), S1_DATA + i * PAGE, X86_PAGE_4K, { writable: i % 3 !== 0, user: true, executable: false });
  return BigInt(builder.root);
}

/** An access whose consumer unpins whatever an unmap covers. */
function politeAccess(ctx: Context, ioas: number): number {
  let id = 0;
  const ops: AccessOps = {
    onUnmap(iova, length) {
      const snap = ctx.inspect().accesses.find((a) => a.id === id);
      for (const p of snap?.pins ?? []) if (p.iova < iova + length && iova < p.iova + p.length) ctx.accessUnpin(id, p.iova, p.length);
    },
  };
  id = ctx.accessCreate(ioas, ops);
  return id;
}

/** inspect() without what a restore reallocates: the serial, the pool, row numbers and headers. */
function comparable(snap: ContextSnapshot) {
  const { serial: _serial, pool: _pool, deviceRows: _rows, ...rest } = snap;
  return { ...rest, devices: rest.devices.map((d) => ({ ...d, rows: d.rows.map((r) => ({ pasid: r.pasid, kind: r.kind, hwpt: r.hwpt })) })) };
}

/** Only null, boolean, number, bigint, string, Uint8Array, arrays and plain objects; no undefined. */
function expectPlainData(v: unknown, path = 'state'): void {
  if (v === null || ['boolean', 'number', 'bigint', 'string'].includes(typeof v)) return;
  if (v instanceof Uint8Array) return;
  if (Array.isArray(v)) {
    v.forEach((x, i) => expectPlainData(x, `${path}[${i}]`));
    return;
  }
  expect(typeof v, path).toBe('object');
  expect(Object.getPrototypeOf(v), path).toBe(Object.prototype);
  for (const [k, x] of Object.entries(v as object)) {
    expect(x, `${path}.${k}`).not.toBeUndefined();
    expectPlainData(x, `${path}.${k}`);
  }
}

function errnoOf(fn: () => unknown): unknown {
  try {
    return fn();
  } catch (e) {
    if (e instanceof IommufdError) return { errno: e.code };
    throw e;
  }
}

function bitsOf(bitmap: BigUint64Array): number[] {
  const out: number[] = [];
  bitmap.forEach((word, i) => {
    for (let b = 0; b < 64; b++) if (((word >> BigInt(b)) & 1n) !== 0n) out.push(i * 64 + b);
  });
  return out;
}

// ---- random operation sequences ----

const KINDS = [
  ...['ioas', 'destroy', 'mapHuge', 'mapHigh', 'mapIdentity', 'unmap', 'unmap', 'copy', 'allow', 'huge', 'bind', 'unbind'],
  ...['map', 'map', 'map', 'map', 'hwpt', 'hwpt', 'hwpt', 'nested', 'nested', 'attach', 'attach', 'attach', 'attach', 'attach'],
  ...['bypass', 'detach', 'access', 'access', 'pin', 'pin', 'pin', 'unpin', 'accessDestroy', 'dirty', 'dirty', 'dirty'],
  ...['write', 'write', 'write', 'write', 'write', 'dirtyWrite', 'dirtyWrite', 'dirtyWrite', 'attachNested', 'attachNested', 'join', 'join', 'bitmap', 'rlimit'],
] as const;
type Op = readonly [(typeof KINDS)[number], number, number, number, number];
const opArb: fc.Arbitrary<Op> = fc.tuple(fc.constantFrom(...KINDS), fc.nat(1 << 20), fc.nat(1 << 20), fc.nat(1 << 20), fc.nat(1 << 20));

const pick = (list: readonly number[], n: number): number => (list.length === 0 ? 999 : list[n % list.length]!);

/** Runs one operation; errors the backend answers are part of the game. */
function apply(ctx: Context, root: bigint, [kind, a, b, c, d]: Op): void {
  const snap = ctx.inspect();
  const ioas = snap.ioas.map((x) => x.id);
  const paging = snap.hwpts.filter((h) => h.type === 'HWPT_PAGING').map((h) => h.id);
  const parents = snap.hwpts.filter((h) => h.type === 'HWPT_PAGING' && (h.flags & HwptAllocFlag.NEST_PARENT) !== 0).map((h) => h.id);
  const tracking = snap.hwpts.filter((h) => h.type === 'HWPT_PAGING' && (h.flags & HwptAllocFlag.DIRTY_TRACKING) !== 0).map((h) => h.id);
  const nested = snap.hwpts.filter((h) => h.type === 'HWPT_NESTED').map((h) => h.id);
  const hwpts = snap.hwpts.map((h) => h.id);
  const devices = snap.devices.map((x) => x.id);
  const accesses = snap.accesses.map((x) => x.id);
  const areas = snap.ioas.flatMap((x) => x.areas.map((ar) => ({ ioas: x.id, ...ar })));
  const area = areas[a % Math.max(1, areas.length)];
  const pasid = PASIDS[c % PASIDS.length]!;
  try {
    switch (kind) {
      case 'ioas':
        ctx.ioasAlloc();
        break;
      case 'destroy':
        ctx.destroy(pick(snap.objects.map((o) => o.id), a));
        break;
      case 'map': {
        const pages = 1 + (b % 8);
        const perms = [R, W, R | W][d % 3]!;
        ctx.ioasMap(pick(ioas, a), { gpa: (c % 1536) * PAGE, length: BigInt(pages * PAGE), iova: BigInt((d % 1024) * PAGE), flags: perms | (d % 5 === 0 ? 0 : FIXED) });
        break;
      }
      case 'mapHuge':
        ctx.ioasMap(pick(ioas, a), { gpa: (c % 3) * 0x20_0000, length: 0x20_0000n, iova: BigInt((d % 2) * 0x20_0000), flags: R | W | FIXED });
        break;
      case 'mapHigh':
        ctx.ioasMap(pick(ioas, a), { gpa: (c % 64) * PAGE, length: BigInt((1 + (b % 4)) * PAGE), iova: HIGH + BigInt((d % 16) * PAGE), flags: R | W | FIXED });
        break;
      case 'mapIdentity': {
        const base = b % 2 === 0 ? S1_TABLES : S1_DATA;
        ctx.ioasMap(pick(ioas, a), { gpa: base, length: 0x4_0000n, iova: BigInt(base), flags: R | W | FIXED });
        break;
      }
      case 'unmap':
        if (b % 6 === 0) ctx.ioasUnmap(pick(ioas, a), 0n, U64_MAX);
        else if (area !== undefined) ctx.ioasUnmap(area.ioas, area.iova, area.length);
        break;
      case 'copy':
        if (area !== undefined) ctx.ioasCopy(pick(ioas, b), BigInt((c % 1024) * PAGE), area.ioas, area.iova, area.length, [R, R | W][d % 2]! | FIXED);
        break;
      case 'allow':
        ctx.ioasAllowIovas(pick(ioas, a), b % 3 === 0 ? [] : [{ start: BigInt((c % 512) * PAGE), last: BigInt((c % 512) * PAGE + (1 + (d % 600)) * PAGE - 1) }]);
        break;
      case 'huge':
        ctx.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.SET, objectId: pick(ioas, a), value: b % 2 });
        break;
      case 'bind':
        ctx.deviceBind(DEVICES[a % DEVICES.length]!.name);
        break;
      case 'unbind':
        ctx.deviceUnbind(pick(devices, a));
        break;
      case 'hwpt':
        ctx.hwptAlloc(pick(devices, a), pick(ioas, b), { flags: [0, HwptAllocFlag.NEST_PARENT, HwptAllocFlag.DIRTY_TRACKING, HwptAllocFlag.DIRTY_TRACKING | HwptAllocFlag.NEST_PARENT][c % 4]! | [0, HwptAllocFlag.PASID, HwptAllocFlag.NEST_PARENT | HwptAllocFlag.PASID][d % 3]! });
        break;
      case 'nested':
        ctx.hwptAlloc(pick(devices, a), pick(b % 4 === 0 ? paging : parents, b), { flags: c % 2 === 0 ? HwptAllocFlag.PASID : 0, dataType: HwptDataType.VTD_S1, data: encodeVtdS1(root, 48) });
        break;
      case 'attach':
        ctx.deviceAttach(pick(devices, a), pick([ioas, paging, nested, hwpts][d % 4]!, b), pasid);
        break;
      case 'bypass':
        ctx.deviceSetBypass(pick(devices, a), pasid);
        break;
      case 'detach':
        ctx.deviceDetach(pick(devices, a), pasid);
        break;
      case 'access':
        politeAccess(ctx, pick(ioas, a));
        break;
      case 'pin': {
        const access = snap.accesses[b % Math.max(1, snap.accesses.length)];
        const mine = access === undefined ? [] : areas.filter((x) => x.ioas === access.ioas);
        const target = mine[c % Math.max(1, mine.length)];
        if (access === undefined || target === undefined) break;
        const pages = Number(target.length / PAGE_N);
        const from = d % pages;
        ctx.accessPin(access.id, target.iova + BigInt(from * PAGE), BigInt((1 + (a % (pages - from))) * PAGE), d % 2 === 0 ? AccessRwFlag.WRITE : 0);
        break;
      }
      case 'unpin': {
        const access = snap.accesses[b % Math.max(1, snap.accesses.length)];
        const pin = access?.pins[c % Math.max(1, access.pins.length)];
        if (access !== undefined && pin !== undefined) ctx.accessUnpin(access.id, pin.iova, pin.length);
        break;
      }
      case 'accessDestroy':
        ctx.accessDestroy(pick(accesses, a));
        break;
      case 'dirty':
        ctx.hwptSetDirtyTracking(pick(d % 4 === 0 ? paging : tracking, a), b % 3 !== 0);
        break;
      case 'write': {
        // Mostly through an area of the IOAS the device's RID translates through.
        const dev = pick(devices, a);
        const rid = snap.devices.find((x) => x.id === dev)?.attachments.find((x) => x.pasid === 0)?.target;
        const hwpt = snap.hwpts.find((h) => h.id === rid);
        const mine = areas.filter((x) => hwpt !== undefined && x.ioas === hwpt.ioas);
        const target = mine.length > 0 && b % 4 !== 0 ? mine[b % mine.length] : area;
        const iova = b % 5 === 0 || target === undefined ? BigInt((d % S1_PAGES) * PAGE) : target.iova + BigInt((d % Number(target.length / PAGE_N)) * PAGE);
        ctx.translate(dev, pasid, iova, 1 + (d % 5000), 'write');
        break;
      }
      case 'dirtyWrite': {
        // Tracking on for a HWPT, then DMA writes by a device attached to it (or to a nested HWPT on it).
        const hwpt = pick(tracking, a);
        ctx.hwptSetDirtyTracking(hwpt, true);
        const users = snap.devices.flatMap((x) =>
          x.attachments.filter((t) => t.target === hwpt || snap.hwpts.find((h) => h.id === t.target)?.parent === hwpt).map((t) => ({ dev: x.id, pasid: t.pasid })),
        );
        if (users.length === 0) {
          const dev = pick(devices, b);
          ctx.deviceAttach(dev, hwpt);
          users.push({ dev, pasid: 0 });
        }
        const user = users[b % users.length];
        const ioasId = snap.hwpts.find((h) => h.id === hwpt)?.ioas;
        const mine = areas.filter((x) => x.ioas === ioasId);
        const target = mine[c % Math.max(1, mine.length)];
        if (user === undefined || target === undefined) break;
        for (let i = 0; i < 1 + (d % 3); i++) {
          const iova = target.iova + BigInt(((d + i * 7) % Number(target.length / PAGE_N)) * PAGE);
          ctx.translate(user.dev, user.pasid, iova, 1 + ((d * (i + 1)) % 9000), 'write');
          // Through a nested HWPT the stage-1 IOVAs are what reach the dirty stage 2.
          ctx.translate(user.dev, user.pasid, BigInt(((d + i) % S1_PAGES) * PAGE), 64, 'write');
        }
        break;
      }
      case 'join': {
        // A device joins what another device of its group is attached to.
        const groupOf = (name: string) => DEVICES.find((x) => x.name === name)!.group;
        const dev = snap.devices[a % Math.max(1, snap.devices.length)];
        const mates = snap.devices.filter((x) => dev !== undefined && x.id !== dev.id && groupOf(x.name) === groupOf(dev.name));
        const att = mates.flatMap((x) => x.attachments)[b % 8];
        if (dev === undefined || att === undefined) break;
        if (att.target === 'identity') ctx.deviceSetBypass(dev.id, att.pasid);
        else ctx.deviceAttach(dev.id, att.target, att.pasid);
        break;
      }
      case 'attachNested':
        ctx.deviceAttach(pick(devices, a), pick(nested, b), [0, 0, 1, 9][c % 4]!);
        break;
      case 'bitmap':
        ctx.hwptGetDirtyBitmap(pick(tracking, a), { iova: 0n, length: BigInt(MEMORY), pageSize: PAGE_N, flags: b % 2 === 0 ? HwptGetDirtyBitmapFlag.NO_CLEAR : 0 });
        break;
      case 'rlimit':
        ctx.option({ option: IommuOption.RLIMIT_MODE, op: IommuOptionOp.SET, value: a % 2 });
        break;
    }
  } catch (e) {
    if (!(e instanceof IommufdError)) throw e;
  }
}

interface Source {
  memory: GuestMemory;
  host: IommufdHost;
  ctx: Context;
}

function buildSource(ops: readonly Op[], prologue: { rlimit: boolean; ioas: number; devices: number } = { rlimit: false, ioas: 0, devices: 0 }): Source {
  const memory = GuestMemory.create(MEMORY);
  const root = writeStage1(memory);
  const host = newHost(memory);
  const ctx = host.open();
  // Most runs start with address spaces and devices, so the random part has something to work on.
  if (prologue.rlimit) ctx.option({ option: IommuOption.RLIMIT_MODE, op: IommuOptionOp.SET, value: 1 });
  for (let i = 0; i < prologue.ioas; i++) ctx.ioasAlloc();
  for (let i = 0; i < DEVICES.length; i++) if ((prologue.devices >> i) & 1) ctx.deviceBind(DEVICES[i]!.name);
  for (const op of ops) apply(ctx, root, op);
  return { memory, host, ctx };
}

/** Every (device, PASID, IOVA) the comparison translates: area edges, the stage-1 range, a comb. */
function probes(snap: ContextSnapshot): { dev: number; pasid: number; iova: bigint }[] {
  const iovas = new Set<bigint>();
  for (const x of snap.ioas) {
    for (const a of x.areas) {
      iovas.add(a.iova);
      iovas.add(a.iova + a.length - PAGE_N);
    }
  }
  for (let p = 0; p < S1_PAGES; p += 5) iovas.add(BigInt(p * PAGE));
  for (let p = 0; p < 2048; p += 97) iovas.add(BigInt(p * PAGE));
  iovas.add(HIGH);
  const out: { dev: number; pasid: number; iova: bigint }[] = [];
  for (const d of snap.devices) for (const pasid of [0, 1, 9, 100, 7]) for (const iova of iovas) out.push({ dev: d.id, pasid, iova });
  return out;
}

function dirtyBitmaps(ctx: Context, flags: number): unknown[] {
  const out: unknown[] = [];
  for (const h of ctx.inspect().hwpts) {
    if (h.type !== 'HWPT_PAGING') continue;
    for (const iova of [0n, HIGH]) out.push([h.id, iova, errnoOf(() => bitsOf(ctx.hwptGetDirtyBitmap(h.id, { iova, length: BigInt(MEMORY), pageSize: PAGE_N, flags })))]);
  }
  return out;
}

/** Restores `state` on a fresh host over a copy of the source's memory and checks it matches. */
function expectFaithfulRestore(src: Source, state: ContextState): void {
  const memory = copyOf(src.memory);
  const host = newHost(memory);
  const ctx = host.open();
  ctx.restoreState(state);
  expect(comparable(ctx.inspect())).toEqual(comparable(src.ctx.inspect()));
  expect(host.stats()).toEqual(src.host.stats());
  expect(host.inspect().pins).toEqual(src.host.inspect().pins);
  expect(ctx.saveState()).toEqual(state);
  const snap = src.ctx.inspect();
  for (const p of probes(snap)) {
    const want = errnoOf(() => src.ctx.translate(p.dev, p.pasid, p.iova, 64, 'read'));
    const got = errnoOf(() => ctx.translate(p.dev, p.pasid, p.iova, 64, 'read'));
    expect(got, `translate dev ${p.dev} pasid ${p.pasid} iova 0x${p.iova.toString(16)}`).toEqual(want);
  }
  expect(dirtyBitmaps(ctx, HwptGetDirtyBitmapFlag.NO_CLEAR)).toEqual(dirtyBitmaps(src.ctx, HwptGetDirtyBitmapFlag.NO_CLEAR));
  expect(dirtyBitmaps(ctx, 0)).toEqual(dirtyBitmaps(src.ctx, 0));
  // The allocator hands out the same next ID.
  expect(ctx.ioasAlloc()).toBe(src.ctx.ioasAlloc());
}

/** host.inspect() without the contexts' table pools (a freed IOAS leaves its header page). */
function hostView(host: IommufdHost) {
  const snap = host.inspect();
  return { ...snap, contexts: snap.contexts.map(({ pool: _pool, ...rest }) => rest) };
}

/** After a failed restore: nothing left, accounting and group ownership as before. */
function expectUntouched(host: IommufdHost, ctx: Context, before: ReturnType<typeof hostView>): void {
  expect(ctx.inspect().objects).toEqual([]);
  expect(ctx.inspect().nextObjectId).toBe(1);
  expect(ctx.inspect().rlimitMode).toBe(0);
  expect(hostView(host)).toEqual(before);
  const other = host.open();
  for (const d of DEVICES) other.deviceUnbind(other.deviceBind(d.name));
  other.close();
}

describe('saveState / restoreState', () => {
  it('random contexts restore exactly: inspect, pins, translation, dirty bits, next ID, saved state (property)', () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 10, maxLength: 80, size: 'max' }), fc.boolean(), fc.integer({ min: 1, max: 3 }), fc.nat(15), (ops, rlimit, ioas, devices) => {
        const src = buildSource(ops, { rlimit, ioas, devices });
        const state = src.ctx.saveState();
        expectPlainData(state);
        expect(src.ctx.saveState()).toEqual(state);
        expectFaithfulRestore(src, state);
      }),
      { seed: 20260301, numRuns: 100 },
    );
  });

  it('hostile states: mutated saved states restore to themselves or fail cleanly (property)', () => {
    // A rich source to mutate.
    const src = richSource();
    const valid = src.ctx.saveState();
    expect(valid.hwpts.length).toBeGreaterThan(1);
    expect(valid.devices.length).toBeGreaterThan(1);
    expect(valid.accesses.length).toBeGreaterThan(0);
    const paths = pathsOf(valid);
    let restored = 0;
    let refused = 0;
    fc.assert(
      fc.property(fc.boolean(), fc.array(fc.tuple(fc.nat(), fc.nat(7), valueArb), { minLength: 1, maxLength: 3 }), (plausible, mutations) => {
        const state = structuredClone(valid) as unknown;
        // Half the cases keep every type and change values only, so the operations' own checks answer.
        for (const [p, how, value] of mutations) {
          if (plausible) nudge(state, paths[p % paths.length]!, how);
          else mutate(state, paths[p % paths.length]!, how, value);
        }
        const memory = copyOf(src.memory);
        const host = newHost(memory);
        // Another context already holds pins on the destination.
        const bystander = host.open();
        const bioas = bystander.ioasAlloc();
        bystander.ioasMap(bioas, { gpa: 0x20_0000, length: 0x1_0000n, iova: 0x10_0000n, flags: R | W | FIXED });
        const ctx = host.open();
        const before = hostView(host);
        let caught: unknown;
        try {
          ctx.restoreState(state);
        } catch (e) {
          caught = e;
        }
        if (caught === undefined) {
          restored++;
          const again = ctx.saveState();
          expect(again).toEqual(state);
          const third = newHost(copyOf(src.memory)).open();
          third.restoreState(again);
          expect(third.saveState()).toEqual(again);
          return;
        }
        refused++;
        expect(caught).toBeInstanceOf(IommufdError);
        expectUntouched(host, ctx, before);
      }),
      { seed: 20260302, numRuns: 200 },
    );
    expect(refused).toBeGreaterThan(50);
    expect(restored).toBeGreaterThan(0);
  });

  it('ObjectTable.addAt places an object at any free ID and the allocator goes on as xa_alloc would (property)', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.constantFrom('add', 'addAt', 'remove'), fc.integer({ min: 1, max: 40 })), { maxLength: 120 }), (steps) => {
        const table = new ObjectTable<{ id: number; type: 'IOAS' }>();
        const live = new Set<number>();
        const lowestFree = () => {
          let id = 1;
          while (live.has(id)) id++;
          return id;
        };
        for (const [op, n] of steps) {
          if (op === 'add') {
            const want = lowestFree();
            expect(table.add((id) => ({ id, type: 'IOAS' as const })).id).toBe(want);
            live.add(want);
          } else if (op === 'addAt') {
            if (live.has(n)) expect(errnoOf(() => table.addAt(n, (id) => ({ id, type: 'IOAS' as const })))).toEqual({ errno: 'EEXIST' });
            else {
              table.addAt(n, (id) => ({ id, type: 'IOAS' as const }));
              live.add(n);
            }
          } else {
            table.remove(n);
            live.delete(n);
          }
          expect(table.peek()).toBe(lowestFree());
          expect(table.list().map((o) => o.id)).toEqual([...live].sort((a, b) => a - b));
        }
        // Emptied, it starts again from 1.
        for (const id of [...live]) table.remove(id);
        expect(table.peek()).toBe(1);
        expect(table.add((id) => ({ id, type: 'IOAS' as const })).id).toBe(1);
      }),
      { seed: 20260303, numRuns: 200 },
    );
    const far = new ObjectTable<{ id: number; type: 'IOAS' }>();
    far.addAt(0x7fff_ffff, (id) => ({ id, type: 'IOAS' as const }));
    expect(far.peek()).toBe(1);
    expect(errnoOf(() => far.addAt(0, (id) => ({ id, type: 'IOAS' as const })))).toEqual({ errno: 'EINVAL' });
  });

  it('refuses a context that has objects (EBUSY) and a closed one (EBADF)', () => {
    const src = richSource();
    const state = src.ctx.saveState();
    const host = newHost(copyOf(src.memory));
    const ctx = host.open();
    ctx.ioasAlloc();
    const before = host.inspect();
    expect(errnoOf(() => ctx.restoreState(state))).toEqual({ errno: 'EBUSY' });
    expect(host.inspect()).toEqual(before);
    const closed = host.open();
    closed.close();
    expect(errnoOf(() => closed.restoreState(state))).toEqual({ errno: 'EBADF' });
  });

  it('names the offending field with the errno of the check that failed', () => {
    const src = richSource();
    const valid = src.ctx.saveState();
    const cases: [string, (s: any) => void, string, string][] = [
      ['version', (s) => (s.version = 2), 'EINVAL', 'version'],
      ['unknown field', (s) => (s.extra = 1), 'EINVAL', 'extra'],
      ['wrong type', (s) => (s.ioas[0].areas[0].iova = 4096), 'EINVAL', 'ioas[0].areas[0].iova'],
      ['dangling IOAS', (s) => (s.accesses[0].ioas = 4242), 'EINVAL', 'accesses[0].ioas'],
      ['duplicate ID', (s) => (s.accesses[0].id = s.ioas[0].id), 'EINVAL', 'accesses[0].id'],
      ['next ID', (s) => (s.nextObjectId += 1), 'EINVAL', 'nextObjectId'],
      ['unknown device', (s) => (s.devices[0].name = 'nosuch'), 'ENODEV', 'devices[0]'],
      ['GPA outside memory', (s) => (s.ioas[0].areas[0].gpa = MEMORY), 'EFAULT', 'ioas[0].areas[0]'],
      ['huge length', (s) => (s.ioas[0].areas[0].length = 1n << 60n), 'EFAULT', 'ioas[0].areas[0]'],
      [
        'overlapping areas',
        (s) => {
          const a = s.ioas[0].areas[0];
          s.ioas[0].areas.splice(1, 0, { ...a, iova: a.iova + PAGE_N, gpa: a.gpa + PAGE });
        },
        'EEXIST',
        'ioas[0].areas[1]',
      ],
      ['dirty run off the leaves', (s) => s.ioas[0].dirty.push({ iova: 0x7ff_f000_0000n, length: PAGE_N }), 'EINVAL', `ioas[0].dirty[${valid.ioas[0]!.dirty.length}]`],
      ['levels below the areas', (s) => (s.ioas.find((x: any) => x.levels === 5).levels = 4), 'EINVAL', `ioas[${valid.ioas.findIndex((x) => x.levels === 5)}].levels`],
      ['tracking on a HWPT without DIRTY_TRACKING', (s) => (s.hwpts.find((h: any) => h.type === 'HWPT_PAGING' && h.flags === 0).dirtyTracking = true), 'EOPNOTSUPP', 'hwpts'],
      ['nested on a non-parent', (s) => (s.hwpts.find((h: any) => h.type === 'HWPT_NESTED').parent = s.hwpts.find((h: any) => h.type === 'HWPT_PAGING' && (h.flags & 1) === 0).id), 'EINVAL', 'hwpts'],
      ['PASID past the device width', (s) => s.devices.find((d: any) => d.name === 'c0').attachments.push({ pasid: 5, target: 'identity' }), 'EINVAL', 'devices'],
      ['pin that no area covers', (s) => s.accesses[0].pins.push({ iova: 0x3ff_0000n, length: PAGE_N, flags: 0 }), 'ENOENT', 'accesses[0].pins'],
    ];
    for (const [name, change, errno, field] of cases) {
      const state = structuredClone(valid) as any;
      change(state);
      const host = newHost(copyOf(src.memory));
      const ctx = host.open();
      const before = hostView(host);
      let caught: unknown;
      try {
        ctx.restoreState(state);
      } catch (e) {
        caught = e;
      }
      expect(caught, name).toBeInstanceOf(IommufdError);
      const e = caught as IommufdError;
      expect(e.code, `${name}: ${e.message}`).toBe(errno);
      expect(e.argument, name).toContain(field);
      expect(e.message, name).toContain(field);
      expectUntouched(host, ctx, before);
    }
  });

  it('rebuilds whatever the ID order: a HWPT below its IOAS, a nested HWPT below its parent, a device above its HWPT', () => {
    const memory = GuestMemory.create(MEMORY);
    const root = writeStage1(memory);
    const host = newHost(memory);
    const ctx = host.open();
    const tmp1 = ctx.ioasAlloc(); // 1
    const tmp2 = ctx.ioasAlloc(); // 2
    const ioas = ctx.ioasAlloc(); // 3
    ctx.ioasMap(ioas, { gpa: S1_TABLES, length: 0x4_0000n, iova: BigInt(S1_TABLES), flags: R | W | FIXED });
    ctx.ioasMap(ioas, { gpa: S1_DATA, length: 0x4_0000n, iova: BigInt(S1_DATA), flags: R | W | FIXED });
    const dev = ctx.deviceBind('b0'); // 4
    ctx.destroy(tmp1);
    const parent = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT | HwptAllocFlag.PASID }); // 1
    ctx.destroy(tmp2);
    const nested = ctx.hwptAlloc(dev, parent, { flags: HwptAllocFlag.PASID, dataType: HwptDataType.VTD_S1, data: encodeVtdS1(root, 48) }); // 2
    ctx.deviceAttach(dev, nested);
    ctx.deviceAttach(dev, parent, 5);
    expect([parent, nested, ioas, dev]).toEqual([1, 2, 3, 4]);
    expect(ctx.translate(dev, 0, 4096n, 8, 'read')).toEqual({ spans: [{ gpa: S1_DATA + PAGE, length: 8 }] });
    expectFaithfulRestore({ memory, host, ctx }, ctx.saveState());
  });

  it('restores a group whose devices were bound after PASID and dirty-tracking attaches they would fail', () => {
    const memory = GuestMemory.create(MEMORY);
    const host = newHost(memory);
    const ctx = host.open();
    const ioas = ctx.ioasAlloc();
    ctx.ioasMap(ioas, { gpa: 0, length: 0x10_0000n, iova: 0x10_0000n, flags: R | W | FIXED });
    const hole = ctx.ioasAlloc();
    const a0 = ctx.deviceBind('a0');
    const dirty = ctx.hwptAlloc(a0, ioas, { flags: HwptAllocFlag.DIRTY_TRACKING | HwptAllocFlag.PASID });
    ctx.deviceAttach(a0, dirty, 100); // 100 is past a1's 4-bit PASIDs; a1 cannot track dirty pages
    ctx.deviceAttach(a0, dirty);
    ctx.hwptSetDirtyTracking(dirty, true);
    ctx.translate(a0, 100, 0x10_4000n, 10, 'write');
    ctx.destroy(hole);
    const a1 = ctx.deviceBind('a1'); // takes the freed ID below a0's: ID order would fail the checks
    expect(a1).toBeLessThan(a0);
    const plain = ctx.hwptAlloc(a1, ioas, { flags: HwptAllocFlag.PASID });
    ctx.deviceAttach(a1, plain, 3);
    expectFaithfulRestore({ memory, host, ctx }, ctx.saveState());
  });

  it('keeps huge leaves per area, table levels that outgrew the areas, and dirty huge leaves', () => {
    const memory = GuestMemory.create(MEMORY);
    const host = newHost(memory);
    const ctx = host.open();
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('b0');
    ctx.ioasMap(ioas, { gpa: 0x20_0000, length: 0x20_0000n, iova: 0x20_0000n, flags: R | W | FIXED });
    ctx.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.SET, objectId: ioas, value: 0 });
    ctx.ioasMap(ioas, { gpa: 0x40_0000, length: 0x20_0000n, iova: 0x40_0000n, flags: R | W | FIXED });
    ctx.ioasMap(ioas, { gpa: 0, length: PAGE_N, iova: HIGH * 4n, flags: R | FIXED });
    ctx.ioasUnmap(ioas, HIGH * 4n, PAGE_N);
    const hwpt = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.DIRTY_TRACKING });
    ctx.deviceAttach(dev, hwpt);
    ctx.hwptSetDirtyTracking(hwpt, true);
    ctx.translate(dev, 0, 0x20_0000n + 5n * PAGE_N, 4, 'write');
    ctx.translate(dev, 0, 0x40_0000n + 5n * PAGE_N, 4, 'write');
    const state = ctx.saveState();
    expect(state.ioas[0]).toMatchObject({
      hugePages: false,
      levels: 5,
      areas: [{ huge: true }, { huge: false }],
      dirty: [
        { iova: 0x20_0000n, length: 0x20_0000n },
        { iova: 0x40_5000n, length: PAGE_N },
      ],
    });
    expectFaithfulRestore({ memory, host, ctx }, state);
  });

  it('gives restored accesses their consumer callbacks, or unpins on unmap without them', () => {
    const memory = GuestMemory.create(MEMORY);
    const host = newHost(memory);
    const ctx = host.open();
    const ioas = ctx.ioasAlloc();
    ctx.ioasMap(ioas, { gpa: 0x1_0000, length: 0x4000n, iova: 0x8_0000n, flags: R | W | FIXED });
    const access = politeAccess(ctx, ioas);
    ctx.accessPin(access, 0x8_1000n, 0x2000n, AccessRwFlag.WRITE);
    const state = ctx.saveState();
    expect(state.accesses).toEqual([{ id: access, ioas, pins: [{ iova: 0x8_1000n, length: 0x2000n, flags: AccessRwFlag.WRITE }] }]);

    const plain = newHost(copyOf(memory)).open();
    plain.restoreState(state);
    expect(plain.ioasUnmap(ioas, 0x8_0000n, 0x4000n)).toBe(0x4000n);

    const seen: [number, bigint, bigint][] = [];
    const host2 = newHost(copyOf(memory));
    const withOps = host2.open();
    withOps.restoreState(state, { accessOps: (id) => ({ onUnmap: (iova, length) => void seen.push([id, iova, length]) }) });
    expect(errnoOf(() => withOps.ioasUnmap(ioas, 0x8_0000n, 0x4000n))).toEqual({ errno: 'EDEADLOCK' });
    expect(seen).toEqual([[access, 0x8_0000n, 0x4000n]]);
    expect(errnoOf(() => newHost(copyOf(memory)).open().restoreState(state, { accessOps: 5 as never }))).toEqual({ errno: 'EINVAL' });
  });

  it('fails cleanly when the destination cannot hold the state: locked memory, a group owned elsewhere', () => {
    const src = richSource();
    const state = src.ctx.saveState();
    const limited = newHost(copyOf(src.memory), { memlockLimitPages: 4 });
    const ctx = limited.open();
    const before = hostView(limited);
    const e = errnoOf(() => ctx.restoreState(state));
    expect(e).toEqual({ errno: 'ENOMEM' });
    expectUntouched(limited, ctx, before);

    const host = newHost(copyOf(src.memory));
    const owner = host.open();
    owner.deviceBind('c0');
    const target = host.open();
    const before2 = hostView(host);
    expect(errnoOf(() => target.restoreState(state))).toEqual({ errno: 'EBUSY' });
    expect(target.inspect().objects).toEqual([]);
    expect(hostView(host)).toEqual(before2);
    expect(errnoOf(() => host.open().deviceBind('a0'))).not.toHaveProperty('errno');
  });
});

// ---- the rich source and state mutation ----

/** A source with every kind of object, an ID hole, PASIDs, bypass, dirty bits, huge leaves and pins. */
function richSource(): Source {
  const memory = GuestMemory.create(MEMORY);
  const root = writeStage1(memory);
  const host = newHost(memory);
  const ctx = host.open();
  const hole = ctx.ioasAlloc();
  // Stage 2 of the nested HWPT: identity over the guest's stage-1 tables and the pages they map.
  const s2 = ctx.ioasAlloc();
  ctx.ioasMap(s2, { gpa: 0x1f_4000, length: 0x4000n, iova: 0x4000n, flags: W | FIXED });
  ctx.ioasMap(s2, { gpa: S1_DATA, length: 0x4_0000n, iova: BigInt(S1_DATA), flags: R | W | FIXED });
  ctx.ioasMap(s2, { gpa: S1_TABLES, length: 0x4_0000n, iova: BigInt(S1_TABLES), flags: R | W | FIXED });
  const dma = ctx.ioasAlloc();
  ctx.ioasAllowIovas(dma, [{ start: 0x40_0000n, last: 0x7f_ffffn }]);
  ctx.ioasMap(dma, { gpa: 0x40_0000, length: 0x20_0000n, iova: 0x40_0000n, flags: R | W | FIXED });
  ctx.ioasMap(dma, { gpa: 0x3000, length: 0x3000n, iova: HIGH + 0x4000n, flags: R | FIXED });
  const a0 = ctx.deviceBind('a0');
  const b0 = ctx.deviceBind('b0');
  const c0 = ctx.deviceBind('c0');
  const parent = ctx.hwptAlloc(b0, s2, { flags: HwptAllocFlag.NEST_PARENT | HwptAllocFlag.PASID });
  const nested = ctx.hwptAlloc(b0, parent, { flags: HwptAllocFlag.PASID, dataType: HwptDataType.VTD_S1, data: encodeVtdS1(root, 48) });
  ctx.deviceAttach(b0, nested);
  ctx.deviceAttach(b0, parent, 7);
  ctx.deviceSetBypass(b0, 9);
  const dirty = ctx.hwptAlloc(a0, dma, { flags: HwptAllocFlag.DIRTY_TRACKING | HwptAllocFlag.PASID });
  ctx.deviceAttach(a0, dirty);
  ctx.deviceAttach(a0, dirty, 1);
  ctx.hwptSetDirtyTracking(dirty, true);
  ctx.translate(a0, 0, 0x40_5000n, 4, 'write');
  ctx.hwptAlloc(c0, dma);
  ctx.deviceAttach(c0, s2);
  const access = politeAccess(ctx, s2);
  ctx.accessPin(access, BigInt(S1_DATA + PAGE), 0x2000n, AccessRwFlag.WRITE);
  ctx.accessPin(access, 0x4000n, 0x1000n, AccessRwFlag.WRITE);
  ctx.destroy(hole);
  expect(ctx.translate(b0, 0, 0x2000n, 8, 'read')).toEqual({ spans: [{ gpa: S1_DATA + 2 * PAGE, length: 8 }] });
  return { memory, host, ctx };
}

const valueArb = fc.oneof(
  fc.integer({ min: -2, max: 20 }),
  fc.integer({ min: 0, max: 2 ** 32 }),
  fc.bigInt({ min: -1n, max: 1n << 66n }),
  fc.bigInt({ min: 0n, max: 1n << 24n }).map((v) => v * 4096n),
  fc.constantFrom<unknown>(null, undefined, true, false, 'identity', 'HWPT_PAGING', 'HWPT_NESTED', 'a0', 'b0', 'nosuch', '', 0.5, Number.NaN),
  fc.constant(new Uint8Array(24)),
  fc.constant([]),
  fc.constant({}),
);

/** Every path into the state: object keys and array indexes, containers included. */
function pathsOf(v: unknown, at: (string | number)[] = []): (string | number)[][] {
  const out: (string | number)[][] = [at];
  if (v instanceof Uint8Array) return out;
  if (Array.isArray(v)) v.forEach((x, i) => out.push(...pathsOf(x, [...at, i])));
  else if (typeof v === 'object' && v !== null) for (const [k, x] of Object.entries(v)) out.push(...pathsOf(x, [...at, k]));
  return out;
}

/**
 * Mutates the value at `path`: replace it, delete it, duplicate it in its array, add an unknown
 * field, nudge a number or bigint by one page, swap it with its neighbour, or copy another
 * element's ID over it.
 */
function mutate(state: unknown, path: readonly (string | number)[], how: number, value: unknown): void {
  if (path.length === 0) return;
  let parent: any = state;
  for (const k of path.slice(0, -1)) {
    if (parent === null || typeof parent !== 'object') return;
    parent = parent[k];
  }
  if (parent === null || typeof parent !== 'object') return;
  const key = path[path.length - 1]!;
  const cur = parent[key];
  switch (how) {
    case 0:
    case 1:
      parent[key] = value;
      break;
    case 2:
      if (Array.isArray(parent)) parent.splice(Number(key), 1);
      else delete parent[key];
      break;
    case 3:
      if (Array.isArray(parent)) parent.splice(Number(key), 0, structuredClone(cur));
      else parent.surplus = value;
      break;
    case 4:
      if (typeof cur === 'bigint') parent[key] = cur + 4096n;
      else if (typeof cur === 'number') parent[key] = cur + (cur > 4096 ? 4096 : 1);
      else parent[key] = value;
      break;
    case 5:
      if (typeof cur === 'bigint') parent[key] = cur > 4096n ? cur - 4096n : cur + (1n << 40n);
      else if (typeof cur === 'number') parent[key] = cur > 0 ? cur - 1 : 7;
      else parent[key] = value;
      break;
    case 6:
      if (Array.isArray(parent) && Number(key) + 1 < parent.length) [parent[Number(key)], parent[Number(key) + 1]] = [parent[Number(key) + 1], cur];
      else parent[key] = value;
      break;
    default:
      // A valid-looking but dangling or duplicate reference.
      parent[key] = typeof cur === 'number' ? [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 99][Math.abs(Number(value) || 0) % 13] : value;
  }
}

/** Changes the value at `path` keeping its type: IDs, IOVAs, lengths, GPAs, flags, names, booleans, list lengths. */
function nudge(state: unknown, path: readonly (string | number)[], how: number): void {
  if (path.length === 0) return;
  let parent: any = state;
  for (const k of path.slice(0, -1)) parent = parent?.[k];
  if (parent === null || typeof parent !== 'object') return;
  const key = path[path.length - 1]!;
  const cur = parent[key];
  if (typeof cur === 'bigint') parent[key] = [cur + 4096n, cur - 4096n > 0n ? cur - 4096n : 0n, cur * 2n, cur + 0x20_0000n, cur ^ (1n << 47n), 0n, 4096n, cur + 1n][how]!;
  else if (typeof cur === 'number') parent[key] = [cur + 1, cur > 0 ? cur - 1 : 0, cur + 4096, cur * 2, 1, 3, 9, MEMORY - PAGE][how]!;
  else if (typeof cur === 'boolean') parent[key] = !cur;
  else if (typeof cur === 'string' && key === 'name') parent[key] = ['a0', 'a1', 'b0', 'c0'][how % 4];
  else if (typeof cur === 'string') parent[key] = cur === 'identity' ? 1 + how : 'identity';
  else if (Array.isArray(parent)) parent.splice(Number(key), 1);
}
