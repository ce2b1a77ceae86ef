import { describe, it, expect } from 'vitest';
import { isDeepStrictEqual } from 'node:util';
import fc from 'fast-check';
import { GuestMemory } from '../src/memory/index.js';
import { IommufdError, IommufdHost, IoasMapFlag, AccessRwFlag, IommuOption, IommuOptionOp, U64_MAX, type Context } from '../src/ioasid/index.js';

/*
 * Model-based test: random command sequences run against the backend and against a reference
 * model written with plain arrays of areas. After every command the result (or errno), the object
 * table, every IOAS's areas / reserved / allowed ranges, the HWPTs, the pin accounting and the
 * translation of a spread of IOVAs for every device must agree.
 */

const PAGE = 4096n;
const GUEST_PAGES = 64;
/** Commands draw IOVAs from a small window so maps, copies, pins and unmaps collide often. */
const IOVA_PAGES = 24;
const MEMLOCK_PAGES = 10;
const R = IoasMapFlag.READABLE;
const W = IoasMapFlag.WRITEABLE;

type Res<T> = { ok: true; value: T } | { ok: false; errno: string };
const ok = <T>(value: T): Res<T> => ({ ok: true, value });
const err = <T>(errno: string): Res<T> => ({ ok: false, errno });
class ModelError extends Error {
  constructor(readonly errno: string) {
    super(errno);
  }
}
/** Runs a model operation written with throws, as a Res. */
function attempt<T>(fn: () => T): Res<T> {
  try {
    return ok(fn());
  } catch (e) {
    if (e instanceof ModelError) return err(e.errno);
    throw e;
  }
}
const fail = (errno: string): never => {
  throw new ModelError(errno);
};

interface MArea {
  iova: bigint;
  length: bigint;
  gpa: number;
  r: boolean;
  w: boolean;
}
interface MIoas {
  id: number;
  areas: MArea[];
  reserved: { start: bigint; last: bigint; device: number }[];
  allowed: { start: bigint; last: bigint }[];
  accesses: number[];
  huge: boolean;
}
interface MHwpt {
  id: number;
  ioas: number;
  auto: boolean;
  users: number;
}
interface MDevice {
  id: number;
  name: string;
  group: string;
  reserved: [bigint, bigint][];
}
interface MSlice {
  areaIova: bigint;
  gpaPfn: number;
  pages: number;
}
interface MPin {
  iova: bigint;
  length: bigint;
  slices: MSlice[];
}
interface MAccess {
  id: number;
  ioas: number;
  polite: boolean;
  pins: MPin[];
}
type MType = 'IOAS' | 'HWPT_PAGING' | 'DEVICE' | 'ACCESS';

const DEVICES: { name: string; group: string; reserved: [bigint, bigint][] }[] = [
  { name: 'd0', group: 'g01', reserved: [[0x30000n, 0x33fffn]] },
  { name: 'd1', group: 'g01', reserved: [[0x30000n, 0x33fffn]] },
  { name: 'd2', group: 'g2', reserved: [[0x8000n, 0x8fffn]] },
];

const lowbit = (v: bigint) => v & -v;
const roundPow2 = (v: bigint) => {
  let p = 1n;
  while (p < v) p <<= 1n;
  return p;
};
const alignUp = (v: bigint, a: bigint) => ((v + a - 1n) / a) * a;
const overlaps = (a0: bigint, a1: bigint, b0: bigint, b1: bigint) => a0 <= b1 && b0 <= a1;

class Model {
  types = new Map<number, MType>();
  ioas = new Map<number, MIoas>();
  hwpts = new Map<number, MHwpt>();
  devices = new Map<number, MDevice>();
  accesses = new Map<number, MAccess>();
  /** Group → attached HWPT and attached devices. */
  groups = new Map<string, { target: number | null; attached: number[] }>();
  refs = new Map<number, number>();

  allocId(type: MType): number {
    let id = 1;
    while (this.types.has(id)) id++;
    this.types.set(id, type);
    return id;
  }

  ids(type: MType): number[] {
    return [...this.types].filter(([, t]) => t === type).map(([id]) => id).sort((a, b) => a - b);
  }

  /**
   * An object ID of `type` by index (mostly an existing one); index 14 is an ID nobody has, 15 some
   * object of whatever type, so lookups of missing and mistyped IDs are exercised too.
   */
  pick(type: MType, n: number): number {
    const list = this.ids(type);
    if (n < 14 && list.length > 0) return list[n % list.length]!;
    const all = [...this.types.keys()].sort((a, b) => a - b);
    return n === 15 && all.length > 0 ? all[n % all.length]! : 77;
  }

  getIoas(id: number): MIoas {
    return this.ioas.get(id) ?? fail('ENOENT');
  }

  // ---- pins ----
  pin(pfn: number, pages: number) {
    for (let i = 0; i < pages; i++) this.refs.set(pfn + i, (this.refs.get(pfn + i) ?? 0) + 1);
  }
  unpin(pfn: number, pages: number) {
    for (let i = 0; i < pages; i++) {
      const n = this.refs.get(pfn + i)! - 1;
      if (n === 0) this.refs.delete(pfn + i);
      else this.refs.set(pfn + i, n);
    }
  }
  areaPins(ioas: MIoas, areaIova: bigint): number {
    let n = 0;
    for (const aid of ioas.accesses) for (const p of this.accesses.get(aid)!.pins) for (const s of p.slices) if (s.areaIova === areaIova) n++;
    return n;
  }

  // ---- IOVA placement ----
  usedRanges(ioas: MIoas): [bigint, bigint][] {
    return [...ioas.reserved.map((r) => [r.start, r.last] as [bigint, bigint]), ...ioas.areas.map((a) => [a.iova, a.iova + a.length - 1n] as [bigint, bigint])];
  }
  allocIova(ioas: MIoas, length: bigint, gpa: number): bigint {
    if (length >= 1n << 63n) fail('EOVERFLOW');
    let align = roundPow2(length);
    if (gpa !== 0 && lowbit(BigInt(gpa)) < align) align = lowbit(BigInt(gpa));
    if (align < PAGE) fail('EINVAL');
    const lo = PAGE;
    const hi = U64_MAX - PAGE;
    const windows = ioas.allowed.length === 0 ? [{ start: lo, last: hi }] : ioas.allowed.map((w) => ({ start: w.start > lo ? w.start : lo, last: w.last < hi ? w.last : hi })).filter((w) => w.start <= w.last);
    const used = this.usedRanges(ioas);
    for (const w of windows) {
      const candidates = [w.start, ...used.map(([, l]) => l + 1n).filter((c) => c > w.start && c <= w.last)].sort((a, b) => (a < b ? -1 : 1));
      for (const c of candidates) {
        const a = alignUp(c, align);
        const last = a + length - 1n;
        if (last > w.last) continue;
        if (used.some(([s, l]) => overlaps(a, last, s, l))) continue;
        return a;
      }
    }
    return fail('ENOSPC');
  }
  checkFixed(ioas: MIoas, iova: bigint, length: bigint) {
    if (iova % PAGE !== 0n) fail('EINVAL');
    const last = iova + length - 1n;
    if (ioas.reserved.some((r) => overlaps(iova, last, r.start, r.last))) fail('EINVAL');
    if (ioas.areas.some((a) => overlaps(iova, last, a.iova, a.iova + a.length - 1n))) fail('EEXIST');
  }
  place(ioas: MIoas, fixed: boolean, iova: bigint, length: bigint, gpaHint: number): bigint {
    if (length === 0n) fail('EINVAL');
    if (length % PAGE !== 0n) fail('EINVAL');
    if (fixed) {
      this.checkFixed(ioas, iova, length);
      return iova;
    }
    return this.allocIova(ioas, length, gpaHint);
  }
  insert(ioas: MIoas, areas: MArea[]) {
    const before = this.refs.size;
    for (const a of areas) this.pin(a.gpa / 4096, Number(a.length / PAGE));
    if (this.refs.size > MEMLOCK_PAGES && this.refs.size > before) {
      for (const a of areas) this.unpin(a.gpa / 4096, Number(a.length / PAGE));
      fail('ENOMEM');
    }
    ioas.areas.push(...areas);
    ioas.areas.sort((x, y) => (x.iova < y.iova ? -1 : 1));
  }

  /** The parts of areas covering pages [first, last] without a gap, and whether they reach `last`. */
  parts(ioas: MIoas, first: bigint, last: bigint) {
    const out: { area: MArea; from: bigint; pages: number; gpaPfn: number }[] = [];
    let expect = first;
    for (const a of ioas.areas) {
      const aFirst = a.iova / PAGE;
      const aLast = (a.iova + a.length) / PAGE - 1n;
      if (aLast < expect) continue;
      if (aFirst > expect || expect > last) break;
      const to = aLast < last ? aLast : last;
      out.push({ area: a, from: expect, pages: Number(to - expect + 1n), gpaPfn: a.gpa / 4096 + Number(expect - aFirst) });
      expect = aLast + 1n;
    }
    return { parts: out, complete: expect > last };
  }

  // ---- operations ----
  ioasAlloc(): Res<number> {
    const id = this.allocId('IOAS');
    this.ioas.set(id, { id, areas: [], reserved: [], allowed: [], accesses: [], huge: true });
    return ok(id);
  }

  map(ioasId: number, gpa: number, length: bigint, iova: bigint, fixed: boolean, perms: number): Res<bigint> {
    return attempt(() => {
      const ioas = this.getIoas(ioasId);
      const at = this.place(ioas, fixed, iova, length, gpa);
      if (gpa % 4096 !== 0) fail('EINVAL');
      if (gpa + Number(length) > GUEST_PAGES * 4096) fail('EFAULT');
      this.insert(ioas, [{ iova: at, length, gpa, r: (perms & R) !== 0, w: (perms & W) !== 0 }]);
      return at;
    });
  }

  unmap(ioasId: number, iova: bigint, length: bigint): Res<bigint> {
    return attempt(() => {
      const ioas = this.getIoas(ioasId);
      const all = iova === 0n && length === U64_MAX;
      if (!all && length === 0n) fail('EINVAL');
      const last = iova + length - 1n;
      for (;;) {
        const hit = ioas.areas.filter((a) => overlaps(iova, last, a.iova, a.iova + a.length - 1n));
        if (hit.some((a) => a.iova < iova || a.iova + a.length - 1n > last)) fail('ENOENT');
        if (hit.length === 0) {
          if (all) return 0n;
          fail('ENOENT');
        }
        const pinned = hit.find((a) => this.areaPins(ioas, a.iova) > 0);
        if (pinned === undefined) {
          let bytes = 0n;
          for (const a of hit) {
            this.unpin(a.gpa / 4096, Number(a.length / PAGE));
            bytes += a.length;
          }
          ioas.areas = ioas.areas.filter((a) => !hit.includes(a));
          return bytes;
        }
        for (const aid of ioas.accesses) this.politeUnmap(this.accesses.get(aid)!, pinned.iova, pinned.length);
        if (this.areaPins(ioas, pinned.iova) > 0) fail('EDEADLOCK');
      }
    });
  }

  /** What the test's polite access does in onUnmap: drop every pin touching the range. */
  politeUnmap(access: MAccess, iova: bigint, length: bigint) {
    if (!access.polite) return;
    for (let i = access.pins.length - 1; i >= 0; i--) {
      const p = access.pins[i]!;
      if (p.iova < iova + length && p.iova + p.length > iova) this.releasePin(access, i);
    }
  }
  releasePin(access: MAccess, i: number) {
    const [p] = access.pins.splice(i, 1);
    for (const s of p!.slices) this.unpin(s.gpaPfn, s.pages);
  }

  copy(dstId: number, dstIova: bigint, srcId: number, srcIova: bigint, length: bigint, fixed: boolean, perms: number): Res<bigint> {
    return attempt(() => {
      const src = this.getIoas(srcId);
      if (length === 0n) fail('EINVAL');
      const { parts, complete } = this.parts(src, srcIova / PAGE, (srcIova + length - 1n) / PAGE);
      if (!complete) fail('ENOENT');
      const dst = this.getIoas(dstId);
      const at = this.place(dst, fixed, dstIova, length, parts[0]!.gpaPfn * 4096);
      if ((perms & W) !== 0 && parts.some((p) => !p.area.w)) fail('EPERM');
      if (srcIova % PAGE !== 0n) fail('EINVAL');
      const base = at - parts[0]!.from * PAGE;
      this.insert(
        dst,
        parts.map((p) => ({ iova: base + p.from * PAGE, length: BigInt(p.pages) * PAGE, gpa: p.gpaPfn * 4096, r: (perms & R) !== 0, w: (perms & W) !== 0 })),
      );
      return at;
    });
  }

  allowIovas(ioasId: number, ranges: { start: bigint; last: bigint }[]): Res<undefined> {
    return attempt(() => {
      const ioas = this.getIoas(ioasId);
      const list: { start: bigint; last: bigint }[] = [];
      for (const r of ranges) {
        if (r.start >= r.last) fail('EINVAL');
        if (list.some((o) => overlaps(o.start, o.last, r.start, r.last))) fail('EINVAL');
        list.push(r);
      }
      if (list.some((r) => ioas.reserved.some((x) => overlaps(r.start, r.last, x.start, x.last)))) fail('EADDRINUSE');
      ioas.allowed = list.sort((a, b) => (a.start < b.start ? -1 : 1));
      return undefined;
    });
  }

  setHuge(ioasId: number, on: boolean): Res<bigint> {
    return attempt(() => {
      const ioas = this.getIoas(ioasId);
      if (!on && ioas.huge && [...this.hwpts.values()].some((h) => h.ioas === ioasId) && ioas.areas.length > 0) fail('EINVAL');
      ioas.huge = on;
      return 0n;
    });
  }

  hwptAlloc(devId: number, ptId: number): Res<number> {
    return attempt(() => {
      if (!this.devices.has(devId)) fail('ENOENT');
      const t = this.types.get(ptId);
      if (t === undefined) fail('EINVAL');
      if (t === 'HWPT_PAGING') fail('EOPNOTSUPP');
      if (t !== 'IOAS') fail('EINVAL');
      return this.newHwpt(ptId, false);
    });
  }
  newHwpt(ioas: number, auto: boolean): number {
    const id = this.allocId('HWPT_PAGING');
    this.hwpts.set(id, { id, ioas, auto, users: 0 });
    return id;
  }
  removeHwpt(id: number) {
    this.hwpts.delete(id);
    this.types.delete(id);
  }

  group(dev: MDevice) {
    let g = this.groups.get(dev.group);
    if (g === undefined) this.groups.set(dev.group, (g = { target: null, attached: [] }));
    return g;
  }
  checkReserve(ioasId: number, devs: MDevice[]) {
    const ioas = this.ioas.get(ioasId)!;
    for (const d of devs) {
      for (const [s, l] of d.reserved) {
        if (ioas.areas.some((a) => overlaps(s, l, a.iova, a.iova + a.length - 1n)) || ioas.allowed.some((a) => overlaps(s, l, a.start, a.last))) fail('EADDRINUSE');
      }
    }
  }
  addReserved(ioasId: number, devs: MDevice[]) {
    const ioas = this.ioas.get(ioasId)!;
    for (const d of devs) for (const [s, l] of d.reserved) ioas.reserved.push({ start: s, last: l, device: d.id });
  }
  removeReserved(ioasId: number, devs: MDevice[]) {
    const ioas = this.ioas.get(ioasId)!;
    const ids = devs.map((d) => d.id);
    ioas.reserved = ioas.reserved.filter((r) => !ids.includes(r.device));
  }
  dropIfAuto(id: number) {
    const h = this.hwpts.get(id)!;
    if (h.auto && h.users === 0) this.removeHwpt(id);
  }

  attachTo(dev: MDevice, hwptId: number) {
    const g = this.group(dev);
    if (g.target !== null && g.target !== hwptId) fail('EINVAL');
    const h = this.hwpts.get(hwptId)!;
    this.checkReserve(h.ioas, [dev]);
    this.addReserved(h.ioas, [dev]);
    g.target = hwptId;
    g.attached.push(dev.id);
    h.users++;
  }
  replaceWith(dev: MDevice, hwptId: number) {
    const g = this.group(dev);
    const old = g.target!;
    if (old === hwptId) return;
    const next = this.hwpts.get(hwptId)!;
    const prev = this.hwpts.get(old)!;
    const devs = g.attached.map((id) => this.devices.get(id)!);
    const move = next.ioas !== prev.ioas;
    if (move) {
      this.checkReserve(next.ioas, devs);
      this.addReserved(next.ioas, devs);
    }
    g.target = hwptId;
    next.users += devs.length;
    prev.users -= devs.length;
    if (move) this.removeReserved(prev.ioas, devs);
    this.dropIfAuto(old);
  }

  attach(devId: number, ptId: number): Res<number> {
    return attempt(() => {
      const dev = this.devices.get(devId) ?? fail('ENOENT');
      const t = this.types.get(ptId) ?? fail('ENOENT');
      const attached = this.group(dev).attached.includes(dev.id);
      const go = (h: number) => (attached ? this.replaceWith(dev, h) : this.attachTo(dev, h));
      if (t === 'HWPT_PAGING') {
        go(ptId);
        return ptId;
      }
      if (t !== 'IOAS') fail('EINVAL');
      const autos = [...this.hwpts.values()].filter((h) => h.ioas === ptId && h.auto).sort((a, b) => a.id - b.id);
      for (const h of autos) {
        try {
          go(h.id);
          return h.id;
        } catch (e) {
          if (e instanceof ModelError && e.errno === 'EINVAL') continue;
          throw e;
        }
      }
      const id = this.newHwpt(ptId, true);
      try {
        go(id);
      } catch (e) {
        this.removeHwpt(id);
        throw e;
      }
      return id;
    });
  }

  detach(devId: number): Res<undefined> {
    return attempt(() => {
      const dev = this.devices.get(devId) ?? fail('ENOENT');
      const g = this.group(dev);
      if (!g.attached.includes(dev.id)) return undefined;
      const h = this.hwpts.get(g.target!)!;
      g.attached = g.attached.filter((d) => d !== dev.id);
      h.users--;
      this.removeReserved(h.ioas, [dev]);
      if (g.attached.length === 0) g.target = null;
      this.dropIfAuto(h.id);
      return undefined;
    });
  }

  destroy(id: number): Res<undefined> {
    return attempt(() => {
      const t = this.types.get(id) ?? fail('ENOENT');
      if (t === 'DEVICE' || t === 'ACCESS') fail('EBUSY');
      if (t === 'IOAS') {
        const ioas = this.ioas.get(id)!;
        if ([...this.hwpts.values()].some((h) => h.ioas === id) || ioas.accesses.length > 0) fail('EBUSY');
        for (const a of ioas.areas) this.unpin(a.gpa / 4096, Number(a.length / PAGE));
        this.ioas.delete(id);
      } else {
        if (this.hwpts.get(id)!.users > 0) fail('EBUSY');
        this.hwpts.delete(id);
      }
      this.types.delete(id);
      return undefined;
    });
  }

  accessCreate(ioasId: number, polite: boolean): Res<number> {
    return attempt(() => {
      const ioas = this.getIoas(ioasId);
      const id = this.allocId('ACCESS');
      this.accesses.set(id, { id, ioas: ioasId, polite, pins: [] });
      ioas.accesses.push(id);
      return id;
    });
  }

  accessPin(accessId: number, iova: bigint, length: bigint, write: boolean): Res<number[]> {
    return attempt(() => {
      const access = this.accesses.get(accessId) ?? fail('ENOENT');
      if (length === 0n) fail('EINVAL');
      if (iova % PAGE !== 0n) fail('EINVAL');
      const ioas = this.ioas.get(access.ioas)!;
      const { parts, complete } = this.parts(ioas, iova / PAGE, (iova + length - 1n) / PAGE);
      for (const p of parts) if (!(write ? p.area.w : p.area.r)) fail('EPERM');
      if (!complete) fail('ENOENT');
      const slices = parts.map((p) => ({ areaIova: p.area.iova, gpaPfn: p.gpaPfn, pages: p.pages }));
      for (const s of slices) this.pin(s.gpaPfn, s.pages);
      access.pins.push({ iova, length, slices });
      return slices.flatMap((s) => Array.from({ length: s.pages }, (_, i) => (s.gpaPfn + i) * 4096));
    });
  }

  accessUnpin(accessId: number, iova: bigint, length: bigint): Res<undefined> {
    return attempt(() => {
      const access = this.accesses.get(accessId) ?? fail('ENOENT');
      const i = access.pins.findIndex((p) => p.iova === iova && p.length === length);
      if (i < 0) fail('ENOENT');
      this.releasePin(access, i);
      return undefined;
    });
  }

  accessDestroy(accessId: number): Res<undefined> {
    return attempt(() => {
      const access = this.accesses.get(accessId) ?? fail('ENOENT');
      this.politeUnmap(access, 0n, U64_MAX);
      while (access.pins.length > 0) this.releasePin(access, access.pins.length - 1);
      const ioas = this.ioas.get(access.ioas)!;
      ioas.accesses = ioas.accesses.filter((a) => a !== accessId);
      this.accesses.delete(accessId);
      this.types.delete(accessId);
      return undefined;
    });
  }

  translate(devId: number, iova: bigint, write: boolean): { gpa: number } | { reason: string } {
    const dev = this.devices.get(devId)!;
    const g = this.group(dev);
    if (g.target === null) return { reason: 'DOMAIN' };
    const ioas = this.ioas.get(this.hwpts.get(g.target)!.ioas)!;
    const a = ioas.areas.find((x) => iova >= x.iova && iova < x.iova + x.length);
    if (a === undefined) return { reason: 'MAPPING' };
    if (!(write ? a.w : a.r)) return { reason: 'PERMISSION' };
    return { gpa: a.gpa + Number(iova - a.iova) };
  }
}

interface Real {
  host: IommufdHost;
  ctx: Context;
}

function real<T>(fn: () => T): Res<T> {
  try {
    return ok(fn());
  } catch (e) {
    if (e instanceof IommufdError) return err(e.code);
    throw e;
  }
}

function modelView(m: Model) {
  return {
    objects: [...m.types].map(([id, type]) => ({ id, type })).sort((a, b) => a.id - b.id),
    ioas: [...m.ioas.values()]
      .sort((a, b) => a.id - b.id)
      .map((i) => ({
        id: i.id,
        hugePages: i.huge,
        areas: i.areas.map((a) => ({ iova: a.iova, length: a.length, gpa: a.gpa, readable: a.r, writeable: a.w, accessPins: m.areaPins(i, a.iova) })),
        reserved: [...i.reserved].sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : a.device - b.device)),
        allowed: i.allowed,
        accesses: [...i.accesses].sort((a, b) => a - b),
      })),
    hwpts: [...m.hwpts.values()].sort((a, b) => a.id - b.id).map((h) => ({ id: h.id, ioas: h.ioas, auto: h.auto, users: h.users })),
    pins: { pinnedPages: m.refs.size, pinReferences: [...m.refs.values()].reduce((a, b) => a + b, 0) },
  };
}

function realView(r: Real) {
  const s = r.ctx.inspect();
  const stats = r.host.stats();
  return {
    objects: s.objects.map((o) => ({ id: o.id, type: o.type })),
    ioas: s.ioas.map((i) => ({ id: i.id, hugePages: i.hugePages, areas: i.areas, reserved: i.reserved, allowed: i.allowed, accesses: i.accesses })),
    hwpts: s.hwpts.map((h) => ({ id: h.id, ioas: h.ioas, auto: h.auto, users: h.users })),
    pins: { pinnedPages: stats.pinnedPages, pinReferences: stats.pinReferences },
  };
}

let sweep = 0;
function compareTranslations(m: Model, r: Real) {
  // Eight pages per device per step, a different comb each step.
  const offset = BigInt(sweep++ % 8);
  const wrong: unknown[] = [];
  for (const devId of m.ids('DEVICE')) {
    for (let page = 1n + offset; page < BigInt(IOVA_PAGES); page += 8n) {
      const write = page % 2n === 0n;
      const iova = page * PAGE + 8n;
      const want = m.translate(devId, iova, write);
      const got = r.ctx.translate(devId, 0, iova, 16, write ? 'write' : 'read');
      const agree = 'gpa' in want ? got.spans?.length === 1 && got.spans[0]!.gpa === want.gpa && got.spans[0]!.length === 16 : got.fault?.reason === want.reason;
      if (!agree) wrong.push({ devId, iova, write, want, got });
    }
  }
  // One assertion per step: expect() itself is the costly part of a 10^4-run property.
  if (wrong.length > 0) expect(wrong).toEqual([]);
}

class Step implements fc.Command<Model, Real> {
  constructor(
    private readonly label: string,
    private readonly step: (m: Model, r: Real) => void,
  ) {}
  check(): boolean {
    return true;
  }
  run(m: Model, r: Real): void {
    this.step(m, r);
    const got = realView(r);
    const want = modelView(m);
    if (!isDeepStrictEqual(got, want)) expect(got).toEqual(want);
    compareTranslations(m, r);
  }
  toString(): string {
    return this.label;
  }
}

/** Runs the same operation on both sides and compares value or errno. */
function same<T>(want: Res<T>, got: Res<T>) {
  if (!isDeepStrictEqual(got, want)) expect(got).toEqual(want);
}

const ioasPick = fc.nat({ max: 15 });
/** An existing area of an IOAS by index (as [iova, length]), or undefined when it has none. */
function areaOf(m: Model, ioasId: number, n: number): [bigint, bigint] | undefined {
  const areas = m.ioas.get(ioasId)?.areas ?? [];
  const a = areas[n % Math.max(1, areas.length)];
  return a === undefined ? undefined : [a.iova, a.length];
}
const page = fc.integer({ min: 0, max: IOVA_PAGES - 1 });
const pages = fc.integer({ min: 0, max: 6 });

function politeOps(ctx: Context, id: () => number) {
  return {
    onUnmap(iova: bigint, length: bigint) {
      const pins = ctx.inspect().accesses.find((a) => a.id === id())?.pins ?? [];
      for (let i = pins.length - 1; i >= 0; i--) {
        const p = pins[i]!;
        if (p.iova < iova + length && p.iova + p.length > iova) ctx.accessUnpin(id(), p.iova, p.length);
      }
    },
  };
}

const commands = [
  fc.constant(
    new Step('ioasAlloc', (m, r) => {
      same(m.ioasAlloc(), real(() => r.ctx.ioasAlloc()));
    }),
  ),
  fc
    .record({ ioas: ioasPick, gpaPage: fc.integer({ min: 0, max: GUEST_PAGES + 2 }), pages, iova: page, fixed: fc.boolean(), perms: fc.constantFrom(R, W, R | W), odd: fc.nat({ max: 19 }) })
    .map(
      (a) =>
        new Step(`map ${JSON.stringify(a)}`, (m, r) => {
          const ioas = m.pick('IOAS', a.ioas);
          // Now and then an unaligned GPA or length.
          const gpa = a.gpaPage * 4096 + (a.odd === 0 ? 512 : 0);
          const length = BigInt(a.pages) * PAGE + (a.odd === 1 ? 100n : 0n);
          const iova = BigInt(a.iova) * PAGE;
          const flags = a.perms | (a.fixed ? IoasMapFlag.FIXED_IOVA : 0);
          same(m.map(ioas, gpa, length, iova, a.fixed, a.perms), real(() => r.ctx.ioasMap(ioas, { gpa, length, iova, flags })));
        }),
    ),
  fc.record({ ioas: ioasPick, iova: page, pages: fc.integer({ min: 0, max: 24 }), all: fc.nat({ max: 5 }), area: fc.nat() }).map(
    (a) =>
      new Step(`unmap ${JSON.stringify(a)}`, (m, r) => {
        const ioas = m.pick('IOAS', a.ioas);
        // all: 0 unmaps everything, 1-2 exactly an existing area, otherwise a random range.
        const existing = a.all <= 2 ? areaOf(m, ioas, a.area) : undefined;
        const iova = a.all === 0 ? 0n : existing !== undefined ? existing[0] : BigInt(a.iova) * PAGE;
        const length = a.all === 0 ? U64_MAX : existing !== undefined ? existing[1] : BigInt(a.pages) * PAGE;
        same(m.unmap(ioas, iova, length), real(() => r.ctx.ioasUnmap(ioas, iova, length)));
      }),
  ),
  fc.record({ dst: ioasPick, src: ioasPick, srcIova: page, dstIova: page, pages, fixed: fc.boolean(), perms: fc.constantFrom(R, W, R | W), inArea: fc.nat({ max: 3 }), area: fc.nat() }).map(
    (a) =>
      new Step(`copy ${JSON.stringify(a)}`, (m, r) => {
        const dst = m.pick('IOAS', a.dst);
        const src = m.pick('IOAS', a.src);
        const existing = a.inArea > 0 ? areaOf(m, src, a.area) : undefined;
        const length = existing !== undefined ? BigInt(1 + (a.pages % Number(existing[1] / PAGE))) * PAGE : BigInt(a.pages) * PAGE;
        const flags = a.perms | (a.fixed ? IoasMapFlag.FIXED_IOVA : 0);
        const srcIova = existing !== undefined ? existing[0] : BigInt(a.srcIova) * PAGE;
        const dstIova = BigInt(a.dstIova) * PAGE;
        same(m.copy(dst, dstIova, src, srcIova, length, a.fixed, a.perms), real(() => r.ctx.ioasCopy(dst, dstIova, src, srcIova, length, flags)));
      }),
  ),
  fc.record({ ioas: ioasPick, ranges: fc.array(fc.tuple(page, fc.integer({ min: -1, max: 16 })), { maxLength: 2 }) }).map(
    (a) =>
      new Step(`allowIovas ${JSON.stringify(a)}`, (m, r) => {
        const ioas = m.pick('IOAS', a.ioas);
        const ranges = a.ranges.map(([s, n]) => ({ start: BigInt(s) * PAGE, last: BigInt(s) * PAGE + BigInt(n) * PAGE - 1n + (n < 0 ? PAGE : 0n) }));
        same(m.allowIovas(ioas, ranges), real(() => r.ctx.ioasAllowIovas(ioas, ranges)));
      }),
  ),
  fc.record({ ioas: ioasPick, on: fc.boolean() }).map(
    (a) =>
      new Step(`hugePages ${JSON.stringify(a)}`, (m, r) => {
        const ioas = m.pick('IOAS', a.ioas);
        same(m.setHuge(ioas, a.on), real(() => r.ctx.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.SET, objectId: ioas, value: a.on ? 1n : 0n })));
      }),
  ),
  fc.record({ dev: fc.nat({ max: 2 }), pt: fc.nat({ max: 15 }), hwpt: fc.boolean() }).map(
    (a) =>
      new Step(`attach ${JSON.stringify(a)}`, (m, r) => {
        const dev = m.pick('DEVICE', a.dev);
        const pt = m.pick(a.hwpt ? 'HWPT_PAGING' : 'IOAS', a.pt);
        same(m.attach(dev, pt), real(() => r.ctx.deviceAttach(dev, pt)));
      }),
  ),
  fc.nat({ max: 2 }).map(
    (d) =>
      new Step(`detach ${d}`, (m, r) => {
        const dev = m.pick('DEVICE', d);
        same(m.detach(dev), real(() => r.ctx.deviceDetach(dev)));
      }),
  ),
  fc.record({ dev: fc.nat({ max: 2 }), pt: fc.nat({ max: 15 }) }).map(
    (a) =>
      new Step(`hwptAlloc ${JSON.stringify(a)}`, (m, r) => {
        const dev = m.pick('DEVICE', a.dev);
        const pt = m.pick('IOAS', a.pt);
        same(m.hwptAlloc(dev, pt), real(() => r.ctx.hwptAlloc(dev, pt)));
      }),
  ),
  fc.nat({ max: 12 }).map(
    (id) =>
      new Step(`destroy ${id}`, (m, r) => {
        same(m.destroy(id), real(() => r.ctx.destroy(id)));
      }),
  ),
  fc.record({ ioas: ioasPick, polite: fc.boolean() }).map(
    (a) =>
      new Step(`accessCreate ${JSON.stringify(a)}`, (m, r) => {
        const ioas = m.pick('IOAS', a.ioas);
        let id = 0;
        const ops = a.polite ? politeOps(r.ctx, () => id) : { onUnmap() {} };
        const got = real(() => (id = r.ctx.accessCreate(ioas, ops)));
        same(m.accessCreate(ioas, a.polite), got);
      }),
  ),
  fc.record({ access: fc.nat({ max: 15 }), iova: page, pages, write: fc.boolean(), inArea: fc.nat({ max: 3 }), area: fc.nat() }).map(
    (a) =>
      new Step(`accessPin ${JSON.stringify(a)}`, (m, r) => {
        const access = m.pick('ACCESS', a.access);
        const ioasId = m.accesses.get(access)?.ioas ?? 0;
        const existing = a.inArea > 0 ? areaOf(m, ioasId, a.area) : undefined;
        // Inside an area: from its start, for 1 .. its length pages.
        const iova = existing !== undefined ? existing[0] : BigInt(a.iova) * PAGE;
        const length = existing !== undefined ? BigInt(1 + (a.pages % Number(existing[1] / PAGE))) * PAGE : BigInt(a.pages) * PAGE;
        same(m.accessPin(access, iova, length, a.write), real(() => r.ctx.accessPin(access, iova, length, a.write ? AccessRwFlag.WRITE : 0)));
      }),
  ),
  fc.record({ access: fc.nat({ max: 15 }), pin: fc.nat({ max: 3 }) }).map(
    (a) =>
      new Step(`accessUnpin ${JSON.stringify(a)}`, (m, r) => {
        const access = m.pick('ACCESS', a.access);
        const pin = m.accesses.get(access)?.pins[a.pin];
        const iova = pin?.iova ?? 0x7000n;
        const length = pin?.length ?? PAGE;
        same(m.accessUnpin(access, iova, length), real(() => r.ctx.accessUnpin(access, iova, length)));
      }),
  ),
  fc.nat({ max: 15 }).map(
    (n) =>
      new Step(`accessDestroy ${n}`, (m, r) => {
        const access = m.pick('ACCESS', n);
        same(m.accessDestroy(access), real(() => r.ctx.accessDestroy(access)));
      }),
  ),
];

// Maps, pins and accesses are weighted up: they set up most of what the other commands act on.
const [, mapCmd, unmapCmd, copyCmd, , , attachCmd, , , , accessCreateCmd, accessPinCmd] = commands;
const weighted = [...commands, mapCmd!, mapCmd!, mapCmd!, accessPinCmd!, accessPinCmd!, accessCreateCmd!, copyCmd!, unmapCmd!, attachCmd!];

/** Guest RAM is never written by these commands, so every run shares one. */
const memory = GuestMemory.create(GUEST_PAGES * 4096);

function setup(): { model: Model; real: Real } {
  const host = new IommufdHost(memory, {
    devices: DEVICES.map((d) => ({ name: d.name, group: d.group, reservedRegions: d.reserved })),
    memlockLimitPages: MEMLOCK_PAGES,
    pool: { initialTables: 8, maxTables: 256 },
    maxDeviceRows: 64,
  });
  const ctx = host.open();
  const model = new Model();
  for (const d of DEVICES) {
    const id = ctx.deviceBind(d.name);
    expect(model.allocId('DEVICE')).toBe(id);
    model.devices.set(id, { id, name: d.name, group: d.group, reserved: d.reserved });
  }
  // Two IOASes, a polite access on the first and a stubborn one on the second to start with, so
  // short sequences reach copies, group conflicts, pins and unmaps that pins block.
  for (let i = 0; i < 2; i++) expect(real(() => ctx.ioasAlloc())).toEqual(model.ioasAlloc());
  const [first, second] = model.ids('IOAS') as [number, number];
  let accessId = 0;
  expect(real(() => (accessId = ctx.accessCreate(first, politeOps(ctx, () => accessId))))).toEqual(model.accessCreate(first, true));
  expect(real(() => ctx.accessCreate(second, { onUnmap() {} }))).toEqual(model.accessCreate(second, false));
  return { model, real: { host, ctx } };
}

describe('ioasid backend against a reference model', () => {
  it('agrees on results, errnos, state, accounting and translation over 10^4 random command sequences', () => {
    fc.assert(
      // Maps, attaches, pins and copies are listed twice: they set up most of what the others act on.
      fc.property(fc.commands(weighted, { maxCommands: 16, size: 'medium' }), (cmds) => {
        const { model, real: r } = setup();
        fc.modelRun(() => ({ model, real: r }), cmds);
        // Closing releases everything the sequence left behind.
        r.ctx.close();
        expect(r.host.stats()).toEqual({ pinnedPages: 0, accountedPages: 0, pinReferences: 0 });
      }),
      { seed: 20260115, numRuns: 10_000 },
    );
  });
});
