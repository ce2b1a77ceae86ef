import { describe, it, expect } from 'vitest';
import { GuestMemory } from '../src/memory/index.js';
import {
  AccessRwFlag,
  AttachKind,
  HwCap,
  HwInfoType,
  HwptAllocFlag,
  HwptDataType,
  IommufdError,
  IommufdHost,
  IoasMapFlag,
  IommuOption,
  IommuOptionOp,
  U64_MAX,
  X86_MSI_WINDOW,
  emptyRowValue,
  readRow,
  translatePage,
  PageResult,
  type Context,
  type PhysicalDeviceSpec,
} from '../src/ioasid/index.js';
import { emptyLeafInfo } from '../src/pagetable/index.js';

const PAGE = 4096;
const PAGE_N = 4096n;
const BUFFER_PAGES = 16;
const BUFFER_SIZE = BigInt(BUFFER_PAGES * PAGE);
/** The selftest mock domain's aperture; outside it the mock device reports reserved IOVA. */
const APERTURE_START = 1n << 24n;
const APERTURE_LAST = (1n << 31n) - 1n;
const RW = IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
const FIXED_RW = RW | IoasMapFlag.FIXED_IOVA;
/** Guest address of the test buffer, 2 MiB aligned like the selftest's hugepage-aligned buffer. */
const BUFFER_GPA = 0x200000;

/** A device standing in for the selftest's mock domain device: usable IOVA is the mock aperture. */
function mockDevice(name: string, group = name, extra: Partial<PhysicalDeviceSpec> = {}): PhysicalDeviceSpec {
  return {
    name,
    group,
    reservedRegions: [
      [0n, APERTURE_START - 1n],
      [APERTURE_LAST + 1n, U64_MAX],
    ],
    pasidBits: 8,
    dirtyTracking: true,
    ...extra,
  };
}

function setup(options: { devices?: PhysicalDeviceSpec[]; memlockLimitPages?: number; memoryBytes?: number; capSysResource?: boolean } = {}) {
  const memory = GuestMemory.create(options.memoryBytes ?? 8 * 1024 * 1024);
  const host = new IommufdHost(memory, {
    devices: options.devices ?? [mockDevice('mock0'), mockDevice('mock1'), mockDevice('mock2')],
    ...(options.memlockLimitPages !== undefined ? { memlockLimitPages: options.memlockLimitPages } : {}),
    ...(options.capSysResource !== undefined ? { capSysResource: options.capSysResource } : {}),
  });
  const ctx = host.open();
  return { memory, host, ctx };
}

/** Expects `fn` to fail with `code` and to leave every context and the accounting exactly as they were. */
function expectErrno(host: IommufdHost, code: string, fn: () => unknown): IommufdError {
  const before = host.inspect();
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught, `expected ${code}`).toBeInstanceOf(IommufdError);
  expect((caught as IommufdError).code).toBe(code);
  expect(host.inspect()).toEqual(before);
  return caught as IommufdError;
}

function mapFixed(ctx: Context, ioas: number, gpa: number, length: bigint, iova: bigint, flags = FIXED_RW): bigint {
  return ctx.ioasMap(ioas, { gpa, length, iova, flags });
}

function mapAuto(ctx: Context, ioas: number, gpa: number, length: bigint, flags = RW): bigint {
  return ctx.ioasMap(ioas, { gpa, length, flags });
}

/** The selftest's iommufd_ioas fixture: an IOAS, and with `mockDomains` that many mock devices attached. */
function ioasFixture(mockDomains: 0 | 1 | 2, options: Parameters<typeof setup>[0] = {}) {
  const env = setup(options);
  const ioas = env.ctx.ioasAlloc();
  const devs: number[] = [];
  const hwpts: number[] = [];
  for (let i = 0; i < mockDomains; i++) {
    const dev = env.ctx.deviceBind(`mock${i}`);
    devs.push(dev);
    hwpts.push(env.ctx.deviceAttach(dev, ioas));
  }
  const baseIova = mockDomains > 0 ? APERTURE_START : 0n;
  return { ...env, ioas, devs, hwpts, baseIova };
}

describe('iommufd: context-wide commands', () => {
  it('iommufd.cmd_fail: destroying object 0 is ENOENT', () => {
    const { host, ctx } = setup();
    expectErrno(host, 'ENOENT', () => ctx.destroy(0));
    expectErrno(host, 'ENOENT', () => ctx.destroy(12345));
  });

  it('iommufd.global_options: RLIMIT_MODE get/set 0 and 1, 2 is EINVAL; HUGE_PAGES of object 0 is ENOENT', () => {
    const { host, ctx } = setup();
    const rlimit = { option: IommuOption.RLIMIT_MODE };
    expect(ctx.option({ ...rlimit, op: IommuOptionOp.GET })).toBe(0n);
    expect(ctx.option({ ...rlimit, op: IommuOptionOp.SET, value: 1n })).toBe(0n);
    expectErrno(host, 'EINVAL', () => ctx.option({ ...rlimit, op: IommuOptionOp.SET, value: 2n }));
    expect(ctx.option({ ...rlimit, op: IommuOptionOp.GET })).toBe(1n);
    ctx.option({ ...rlimit, op: IommuOptionOp.SET, value: 0n });
    expect(ctx.option({ ...rlimit, op: IommuOptionOp.GET })).toBe(0n);
    expectErrno(host, 'ENOENT', () => ctx.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.GET, objectId: 0 }));
    expectErrno(host, 'ENOENT', () => ctx.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.SET, objectId: 0, value: 1n }));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.option({ option: 7, op: IommuOptionOp.GET }));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.option({ ...rlimit, op: IommuOptionOp.GET, objectId: 3 }));
    // RLIMIT_MODE can only change on an empty context, and needs CAP_SYS_RESOURCE.
    ctx.ioasAlloc();
    expectErrno(host, 'EBUSY', () => ctx.option({ ...rlimit, op: IommuOptionOp.SET, value: 1n }));
    const unprivileged = setup({ capSysResource: false });
    expectErrno(unprivileged.host, 'EPERM', () => unprivileged.ctx.option({ ...rlimit, op: IommuOptionOp.SET, value: 1n }));
  });

  it('rejects hostile argument types with EINVAL / EOVERFLOW before touching state', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    expectErrno(host, 'EINVAL', () => ctx.ioasMap(ioas, { gpa: 0, length: 4096 as unknown as bigint, flags: RW }));
    expectErrno(host, 'EINVAL', () => ctx.ioasMap(ioas, { gpa: -4096, length: PAGE_N, flags: RW }));
    expectErrno(host, 'EINVAL', () => ctx.ioasMap(ioas, { gpa: 0.5, length: PAGE_N, flags: RW }));
    expectErrno(host, 'EINVAL', () => ctx.ioasMap(ioas, { gpa: 0, length: -PAGE_N, flags: RW }));
    expectErrno(host, 'EOVERFLOW', () => ctx.ioasMap(ioas, { gpa: 0, length: 1n << 64n, flags: RW }));
    expectErrno(host, 'EOVERFLOW', () => ctx.ioasMap(ioas, { gpa: 0, length: U64_MAX, flags: RW }));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.ioasMap(ioas, { gpa: 0, length: PAGE_N, flags: RW | 8 }));
    expectErrno(host, 'EINVAL', () => ctx.ioasMap(ioas, { gpa: 0, length: PAGE_N, flags: IoasMapFlag.FIXED_IOVA }));
    expectErrno(host, 'EINVAL', () => ctx.ioasMap(ioas, null as unknown as { gpa: number; length: bigint; flags: number }));
    expectErrno(host, 'ENOENT', () => ctx.ioasMap(ioas + 1, { gpa: 0, length: PAGE_N, flags: RW }));
    expectErrno(host, 'EINVAL', () => ctx.ioasUnmap(ioas, '0' as unknown as bigint, PAGE_N));
    expectErrno(host, 'EINVAL', () => ctx.destroy(-1));
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(1.5, ioas));
    // Not guest RAM: EFAULT (after the IOVA checks pass).
    expectErrno(host, 'EFAULT', () => ctx.ioasMap(ioas, { gpa: 8 * 1024 * 1024, length: PAGE_N, flags: RW }));
    expectErrno(host, 'EFAULT', () => ctx.ioasMap(ioas, { gpa: 0, length: 1n << 40n, flags: RW }));
    expectErrno(host, 'EINVAL', () => mapFixed(ctx, ioas, 100, PAGE_N, 0x10000n));
  });
});

describe('iommufd_ioas: areas', () => {
  for (const mock of [0, 1, 2] as const) {
    it(`iommufd_ioas.ioas_destroy (${mock} mock domains): EBUSY while a HWPT uses the IOAS`, () => {
      const f = ioasFixture(mock);
      if (mock > 0) expectErrno(f.host, 'EBUSY', () => f.ctx.destroy(f.ioas));
      else f.ctx.destroy(f.ioas);
    });

    it(`iommufd_ioas.ioas_area_destroy / ioas_area_auto_destroy (${mock} mock domains)`, () => {
      const f = ioasFixture(mock);
      for (let i = 0n; i < 10n; i++) mapFixed(f.ctx, f.ioas, BUFFER_GPA, PAGE_N, f.baseIova + i * PAGE_N);
      expect(f.host.stats()).toEqual({ pinnedPages: 1, accountedPages: 1, pinReferences: 10 });
      if (mock > 0) expectErrno(f.host, 'EBUSY', () => f.ctx.destroy(f.ioas));
      else f.ctx.destroy(f.ioas);
      f.ctx.close();
      expect(f.host.stats()).toEqual({ pinnedPages: 0, accountedPages: 0, pinReferences: 0 });
    });

    it(`iommufd_ioas.area (${mock} mock domains): ENOENT unmaps, no splitting, EEXIST over maps, unmap all`, () => {
      const { host, ctx, ioas, baseIova } = ioasFixture(mock);
      for (let i = 0n; i < 10n; i++) expectErrno(host, 'ENOENT', () => ctx.ioasUnmap(ioas, i * PAGE_N, PAGE_N));
      for (let i = 0n; i < 10n; i++) mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, baseIova + i * PAGE_N);
      for (let i = 0n; i < 10n; i++) expect(ctx.ioasUnmap(ioas, baseIova + i * PAGE_N, PAGE_N)).toBe(PAGE_N);
      mapFixed(ctx, ioas, BUFFER_GPA, 2n * PAGE_N, baseIova + 16n * PAGE_N);
      expectErrno(host, 'ENOENT', () => ctx.ioasUnmap(ioas, baseIova + 16n * PAGE_N, PAGE_N));
      expectErrno(host, 'ENOENT', () => ctx.ioasUnmap(ioas, baseIova + 17n * PAGE_N, PAGE_N));
      expectErrno(host, 'EEXIST', () => mapFixed(ctx, ioas, BUFFER_GPA, 2n * PAGE_N, baseIova + 16n * PAGE_N));
      expectErrno(host, 'EEXIST', () => mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, baseIova + 16n * PAGE_N));
      expectErrno(host, 'EEXIST', () => mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, baseIova + 17n * PAGE_N));
      expectErrno(host, 'EEXIST', () => mapFixed(ctx, ioas, BUFFER_GPA, 2n * PAGE_N, baseIova + 15n * PAGE_N));
      expectErrno(host, 'EEXIST', () => mapFixed(ctx, ioas, BUFFER_GPA, 3n * PAGE_N, baseIova + 15n * PAGE_N));
      expect(ctx.ioasUnmap(ioas, 0n, U64_MAX)).toBe(2n * PAGE_N);
      expect(ctx.ioasUnmap(ioas, 0n, U64_MAX)).toBe(0n);
      expect(host.stats().pinnedPages).toBe(0);
    });

    it(`iommufd_ioas.unmap_fully_contained_areas (${mock} mock domains)`, () => {
      const { host, ctx, ioas } = ioasFixture(mock);
      const base = (mock > 0 ? APERTURE_START : 0n) + 4n * PAGE_N;
      for (let i = 0n; i < 4n; i++) mapFixed(ctx, ioas, BUFFER_GPA, 8n * PAGE_N, base + i * 16n * PAGE_N);
      expectErrno(host, 'ENOENT', () => ctx.ioasUnmap(ioas, base - 4n * PAGE_N, 8n * PAGE_N));
      expectErrno(host, 'ENOENT', () => ctx.ioasUnmap(ioas, base + 3n * 16n * PAGE_N + 8n * PAGE_N - 4n * PAGE_N, 8n * PAGE_N));
      expect(ctx.ioasUnmap(ioas, base - 4n * PAGE_N, 3n * 16n * PAGE_N + 8n * PAGE_N + 4n * PAGE_N)).toBe(32n * PAGE_N);
    });

    it(`iommufd_ioas.area_auto_iova (${mock} mock domains): alignment, reserved avoidance, allowed ranges`, () => {
      const resv = { name: 'resv', group: 'resv', reservedRegions: [[PAGE_N * 4n, PAGE_N * 104n - 1n]] as [bigint, bigint][] };
      const f = ioasFixture(mock, { devices: [mockDevice('mock0'), mockDevice('mock1'), resv] });
      const { host, ctx, ioas } = f;
      const iovas: bigint[] = [];
      for (let i = 0; i < 10; i++) iovas.push(mapAuto(ctx, ioas, BUFFER_GPA, PAGE_N));
      for (const iova of iovas) ctx.ioasUnmap(ioas, iova, PAGE_N);
      for (let i = 1n; i <= 10n; i++) {
        const length = PAGE_N * i;
        const iova = mapAuto(ctx, ioas, BUFFER_GPA, length);
        expect(iova % (length & -length)).toBe(0n);
        expect(iova).toBeGreaterThan(0n);
        ctx.ioasUnmap(ioas, iova, length);
      }
      // A device whose reserved range is [4 pages, 104 pages) attaches; auto IOVAs avoid the range.
      const dev = ctx.deviceBind('resv');
      ctx.deviceAttach(dev, ioas);
      for (let i = 1n; i <= 10n; i++) {
        const length = PAGE_N * i;
        const iova = mapAuto(ctx, ioas, BUFFER_GPA, length);
        expect(iova % (length & -length)).toBe(0n);
        expect(iova + length <= 4n * PAGE_N || iova >= 104n * PAGE_N).toBe(true);
        iovas[Number(i) - 1] = iova;
      }
      for (let i = 1n; i <= 10n; i++) ctx.ioasUnmap(ioas, iovas[Number(i) - 1]!, PAGE_N * i);
      // An allowed range crossing the reserved one is EADDRINUSE.
      expectErrno(host, 'EADDRINUSE', () => ctx.ioasAllowIovas(ioas, [{ start: PAGE_N, last: PAGE_N * 600n }]));
      // Allocation stays inside the allowed range.
      const allowed = mock > 0 ? { start: APERTURE_START + PAGE_N, last: APERTURE_START + PAGE_N * 600n - 1n } : { start: PAGE_N * 200n, last: PAGE_N * 600n - 1n };
      ctx.ioasAllowIovas(ioas, [allowed]);
      for (let i = 1n; i <= 10n; i++) {
        const length = PAGE_N * i;
        const iova = mapAuto(ctx, ioas, BUFFER_GPA, length);
        expect(iova % (length & -length)).toBe(0n);
        expect(iova >= allowed.start && iova + length - 1n <= allowed.last).toBe(true);
      }
    });
  }

  it('iommufd_ioas.area_auto_iova: the alignment follows the GPA when it is less aligned than the length', () => {
    const { ctx } = setup();
    const ioas = ctx.ioasAlloc();
    mapFixed(ctx, ioas, 0, PAGE_N, PAGE_N); // occupy [4K, 8K)
    const iova = mapAuto(ctx, ioas, BUFFER_GPA + PAGE, 4n * PAGE_N);
    // roundup_pow_of_two(16K) = 16K, lowest set bit of the GPA = 4K: the first 4K-aligned hole.
    expect(iova).toBe(2n * PAGE_N);
    const huge = mapAuto(ctx, ioas, BUFFER_GPA, 0x200000n);
    expect(huge % 0x200000n).toBe(0n);
  });

  it('iommufd_ioas.reserved_overflow: a reserved range up to the top of the space gives ENOSPC, not an overflow', () => {
    const dev = { name: 'big', group: 'big', reservedRegions: [[6n, 6n + 0xffffffffffff8001n - 1n]] as [bigint, bigint][] };
    const { host, ctx } = setup({ devices: [dev] });
    const ioas = ctx.ioasAlloc();
    ctx.deviceAttach(ctx.deviceBind('big'), ioas);
    expectErrno(host, 'ENOSPC', () => mapAuto(ctx, ioas, BUFFER_GPA, 0x5000n));
  });

  it('iommufd_ioas.area_allowed: reserved over allowed and allowed over reserved are EADDRINUSE', () => {
    const dev = { name: 'resv', group: 'resv', reservedRegions: [[PAGE_N, 2n * PAGE_N - 1n]] as [bigint, bigint][] };
    const { host, ctx } = setup({ devices: [dev] });
    const ioas = ctx.ioasAlloc();
    const d = ctx.deviceBind('resv');
    ctx.ioasAllowIovas(ioas, [{ start: 0n, last: PAGE_N * 600n }]);
    expectErrno(host, 'EADDRINUSE', () => ctx.deviceAttach(d, ioas));
    ctx.ioasAllowIovas(ioas, []);
    ctx.deviceAttach(d, ioas);
    expectErrno(host, 'EADDRINUSE', () => ctx.ioasAllowIovas(ioas, [{ start: 0n, last: PAGE_N * 600n }]));
    // ALLOW_IOVAS argument rules.
    expectErrno(host, 'EINVAL', () => ctx.ioasAllowIovas(ioas, [{ start: 5n, last: 5n }]));
    expectErrno(host, 'EINVAL', () =>
      ctx.ioasAllowIovas(ioas, [
        { start: 0x10000n, last: 0x20000n },
        { start: 0x20000n, last: 0x30000n },
      ]),
    );
    expectErrno(host, 'EINVAL', () => ctx.ioasAllowIovas(ioas, [{ start: 0x10000n } as unknown as { start: bigint; last: bigint }]));
  });

  it('iommufd_ioas.copy_area: copies inside one IOAS and between IOASes, pinning nothing new', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, APERTURE_START);
    expect(ctx.ioasCopy(ioas, APERTURE_START + PAGE_N, ioas, APERTURE_START, PAGE_N, FIXED_RW)).toBe(APERTURE_START + PAGE_N);
    const other = ctx.ioasAlloc();
    expect(ctx.ioasCopy(other, 0n, ioas, APERTURE_START, PAGE_N, FIXED_RW)).toBe(0n);
    expect(host.stats()).toEqual({ pinnedPages: 1, accountedPages: 1, pinReferences: 3 });
    const snap = ctx.inspect().ioas.find((i) => i.id === other)!;
    expect(snap.areas).toEqual([{ iova: 0n, length: PAGE_N, gpa: BUFFER_GPA, readable: true, writeable: true, accessPins: 0 }]);
    // Copying over a mapped destination, or from nothing, fails without change.
    expectErrno(host, 'EEXIST', () => ctx.ioasCopy(ioas, APERTURE_START, ioas, APERTURE_START, PAGE_N, FIXED_RW));
    expectErrno(host, 'ENOENT', () => ctx.ioasCopy(other, 0x100000n, ioas, 0n, PAGE_N, FIXED_RW));
    // WRITEABLE from memory that was mapped read-only is EPERM.
    mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, 0x40000n, IoasMapFlag.READABLE | IoasMapFlag.FIXED_IOVA);
    expectErrno(host, 'EPERM', () => ctx.ioasCopy(other, 0x100000n, ioas, 0x40000n, PAGE_N, FIXED_RW));
    ctx.ioasCopy(other, 0x100000n, ioas, 0x40000n, PAGE_N, IoasMapFlag.READABLE | IoasMapFlag.FIXED_IOVA);
  });

  it('iommufd_ioas.copy_area: a copy spanning two adjacent areas creates two destination areas', () => {
    const { ctx } = setup();
    const src = ctx.ioasAlloc();
    const dst = ctx.ioasAlloc();
    mapFixed(ctx, src, BUFFER_GPA, 2n * PAGE_N, 0x10000n);
    mapFixed(ctx, src, 0, 2n * PAGE_N, 0x12000n);
    const iova = ctx.ioasCopy(dst, 0n, src, 0x11000n, 2n * PAGE_N, RW);
    const areas = ctx.inspect().ioas.find((i) => i.id === dst)!.areas;
    expect(areas.map((a) => [a.iova - iova, a.length, a.gpa])).toEqual([
      [0n, PAGE_N, BUFFER_GPA + PAGE],
      [PAGE_N, PAGE_N, 0],
    ]);
  });

  it('ioasAreasIn lists the whole areas a range touches, in order', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    mapFixed(ctx, ioas, BUFFER_GPA, 2n * PAGE_N, 0x10000n);
    mapFixed(ctx, ioas, 0, PAGE_N, 0x12000n, IoasMapFlag.READABLE | IoasMapFlag.FIXED_IOVA);
    mapFixed(ctx, ioas, 0, PAGE_N, 0x20000n);
    expect(ctx.ioasAreasIn(ioas, 0x11fffn, 0x12000n)).toEqual([
      { iova: 0x10000n, length: 2n * PAGE_N, gpa: BUFFER_GPA, readable: true, writeable: true, accessPins: 0 },
      { iova: 0x12000n, length: PAGE_N, gpa: 0, readable: true, writeable: false, accessPins: 0 },
    ]);
    expect(ctx.ioasAreasIn(ioas, 0x13000n, 0x1ffffn)).toEqual([]);
    expect(ctx.ioasAreasIn(ioas, 0n, U64_MAX).map((a) => a.iova)).toEqual([0x10000n, 0x12000n, 0x20000n]);
    expectErrno(host, 'EINVAL', () => ctx.ioasAreasIn(ioas, 2n, 1n));
    expectErrno(host, 'ENOENT', () => ctx.ioasAreasIn(999, 0n, 1n));
  });

  it('iommufd_ioas.iova_ranges: the full range with no device, a hole per reserved region, EMSGSIZE', () => {
    const resv = { name: 'resv', group: 'resv', reservedRegions: [[PAGE_N, 2n * PAGE_N - 1n]] as [bigint, bigint][] };
    const { host, ctx } = setup({ devices: [resv, mockDevice('mock0')] });
    const ioas = ctx.ioasAlloc();
    expect(ctx.ioasIovaRanges(ioas)).toEqual({ ranges: [{ start: 0n, last: U64_MAX }], alignment: PAGE_N });
    const small = expectErrno(host, 'EMSGSIZE', () => ctx.ioasIovaRanges(ioas, 0));
    expect(small.details).toEqual({ numIovas: 1, ranges: [] });
    ctx.deviceAttach(ctx.deviceBind('resv'), ioas);
    expect(ctx.ioasIovaRanges(ioas, 10).ranges).toEqual([
      { start: 0n, last: PAGE_N - 1n },
      { start: 2n * PAGE_N, last: U64_MAX },
    ]);
    const one = expectErrno(host, 'EMSGSIZE', () => ctx.ioasIovaRanges(ioas, 1));
    expect(one.details).toEqual({ numIovas: 2, ranges: [{ start: 0n, last: PAGE_N - 1n }] });
    // A mock-aperture device narrows it to the aperture.
    const other = ctx.ioasAlloc();
    ctx.deviceAttach(ctx.deviceBind('mock0'), other);
    expect(ctx.ioasIovaRanges(other).ranges).toEqual([{ start: APERTURE_START, last: APERTURE_LAST }]);
  });

  it('iommufd_ioas.ioas_option_huge_pages: get 1, set 0, get 0, set 2 is EINVAL, set 1', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    const opt = { option: IommuOption.HUGE_PAGES, objectId: ioas };
    expect(ctx.option({ ...opt, op: IommuOptionOp.GET })).toBe(1n);
    ctx.option({ ...opt, op: IommuOptionOp.SET, value: 0n });
    expect(ctx.option({ ...opt, op: IommuOptionOp.GET })).toBe(0n);
    expectErrno(host, 'EINVAL', () => ctx.option({ ...opt, op: IommuOptionOp.SET, value: 2n }));
    ctx.option({ ...opt, op: IommuOptionOp.SET, value: 1n });
    expect(ctx.option({ ...opt, op: IommuOptionOp.GET })).toBe(1n);
  });

  it('iommufd_ioas.ioas_option_huge_pages: an aligned 2 MiB map is one 2 MiB leaf with huge pages, 512 leaves without', () => {
    const { ctx, memory } = setup();
    const dev = ctx.deviceBind('mock0');
    const ioas = ctx.ioasAlloc();
    ctx.deviceAttach(dev, ioas);
    mapFixed(ctx, ioas, BUFFER_GPA, 0x200000n, APERTURE_START);
    const words = new Int32Array(ctx.describeShared().pool.buffer);
    const rows = new Int32Array(ctx.describeShared().devices.buffer);
    const leaf = emptyLeafInfo();
    expect(translatePage(rows, words, ctx.deviceRow(dev), 0, Number(APERTURE_START / PAGE_N) + 3, true, emptyRowValue(), leaf)).toBe(PageResult.OK);
    expect(leaf.pageShift).toBe(21);
    const plain = ctx.ioasAlloc();
    ctx.option({ option: IommuOption.HUGE_PAGES, objectId: plain, op: IommuOptionOp.SET, value: 0n });
    const dev2 = ctx.deviceBind('mock1');
    ctx.deviceAttach(dev2, plain);
    mapFixed(ctx, plain, BUFFER_GPA, 0x200000n, APERTURE_START);
    expect(translatePage(rows, words, ctx.deviceRow(dev2), 0, Number(APERTURE_START / PAGE_N) + 3, true, emptyRowValue(), leaf)).toBe(PageResult.OK);
    expect(leaf.pageShift).toBe(12);
    expect(memory.size).toBeGreaterThan(0);
  });

  it('iommufd_ioas.ioas_iova_alloc: lengths that are not a multiple of the 4 KiB page are EINVAL', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    for (let length = 1n; length < 2n * PAGE_N; length += 97n) {
      if (length % PAGE_N !== 0n) expectErrno(host, 'EINVAL', () => mapAuto(ctx, ioas, BUFFER_GPA, length));
    }
    const iova = mapAuto(ctx, ioas, BUFFER_GPA, PAGE_N);
    ctx.ioasUnmap(ioas, iova, PAGE_N);
    expectErrno(host, 'EINVAL', () => mapAuto(ctx, ioas, BUFFER_GPA, 0n));
  });

  it('iommufd_ioas.ioas_align_change (adapted): HUGE_PAGES cannot be turned off while a HWPT maps areas', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, APERTURE_START);
    const opt = { option: IommuOption.HUGE_PAGES, objectId: ioas, op: IommuOptionOp.SET };
    ctx.option({ ...opt, value: 0n });
    ctx.option({ ...opt, value: 1n });
    ctx.deviceAttach(ctx.deviceBind('mock0'), ioas);
    expectErrno(host, 'EINVAL', () => ctx.option({ ...opt, value: 0n }));
    ctx.ioasUnmap(ioas, APERTURE_START, PAGE_N);
    ctx.option({ ...opt, value: 0n });
  });

  it('iommufd_ioas.copy_sweep: copies from inside the mapped range work, anything reaching outside is ENOENT', () => {
    const { host, ctx } = setup();
    const src = ctx.ioasAlloc();
    const dst = ctx.ioasAlloc();
    const last = APERTURE_START + BUFFER_SIZE - 1n;
    mapFixed(ctx, src, BUFFER_GPA, BUFFER_SIZE, APERTURE_START);
    for (let iova = APERTURE_START - PAGE_N; iova <= last + PAGE_N; iova += PAGE_N / 2n) {
      const outside = iova < APERTURE_START || iova + PAGE_N - 1n > last;
      if (outside) expectErrno(host, 'ENOENT', () => ctx.ioasCopy(dst, APERTURE_START, src, iova, PAGE_N, FIXED_RW));
      else if (iova % PAGE_N !== 0n) expectErrno(host, 'EINVAL', () => ctx.ioasCopy(dst, APERTURE_START, src, iova, PAGE_N, FIXED_RW));
      else {
        ctx.ioasCopy(dst, APERTURE_START, src, iova, PAGE_N, FIXED_RW);
        expect(ctx.inspect().ioas.find((i) => i.id === dst)!.areas[0]!.gpa).toBe(BUFFER_GPA + Number(iova - APERTURE_START));
        ctx.ioasUnmap(dst, APERTURE_START, PAGE_N);
      }
    }
    ctx.destroy(dst);
  });
});

describe('iommufd_ioas: accesses', () => {
  /** A driver that unpins whatever the backend asks it to, like the selftest's mock access. */
  function politeAccess(ctx: Context, ioas: number) {
    const calls: [bigint, bigint][] = [];
    const pins: [bigint, bigint][] = [];
    const id = ctx.accessCreate(ioas, {
      onUnmap(iova, length) {
        calls.push([iova, length]);
        for (let i = pins.length - 1; i >= 0; i--) {
          const [pi, pl] = pins[i]!;
          if (pi < iova + length && pi + pl > iova) {
            ctx.accessUnpin(id, pi, pl);
            pins.splice(i, 1);
          }
        }
      },
    });
    return {
      id,
      calls,
      pin(iova: bigint, length: bigint, flags = 0) {
        const gpas = ctx.accessPin(id, iova, length, flags);
        pins.push([iova, length]);
        return gpas;
      },
      unpin(iova: bigint, length: bigint) {
        ctx.accessUnpin(id, iova, length);
        pins.splice(
          pins.findIndex(([i, l]) => i === iova && l === length),
          1,
        );
      },
    };
  }

  it('iommufd_ioas.access_pin: single, double and with a domain added and removed under the pin', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    const access = politeAccess(ctx, ioas);
    for (let npages = 1n; npages < BigInt(BUFFER_PAGES); npages++) {
      const length = npages * PAGE_N;
      mapFixed(ctx, ioas, BUFFER_GPA, BUFFER_SIZE, APERTURE_START);
      const gpas = access.pin(APERTURE_START, length);
      expect(gpas).toEqual(Array.from({ length: Number(npages) }, (_, i) => BUFFER_GPA + i * PAGE));
      expect(host.stats().pinReferences).toBe(BUFFER_PAGES + Number(npages));
      access.unpin(APERTURE_START, length);
      access.pin(APERTURE_START, length);
      access.pin(APERTURE_START, length);
      expect(ctx.inspect().ioas[0]!.areas[0]!.accessPins).toBe(2);
      access.unpin(APERTURE_START, length);
      access.unpin(APERTURE_START, length);
      access.pin(APERTURE_START, length);
      const dev = ctx.deviceBind('mock1');
      ctx.deviceAttach(dev, ioas);
      const t = ctx.translate(dev, 0, APERTURE_START, Number(BUFFER_SIZE), 'write');
      expect(t.spans).toEqual([{ gpa: BUFFER_GPA, length: Number(BUFFER_SIZE) }]);
      ctx.deviceUnbind(dev);
      access.unpin(APERTURE_START, length);
      ctx.ioasUnmap(ioas, APERTURE_START, BUFFER_SIZE);
      expect(host.stats().pinReferences).toBe(0);
    }
    ctx.accessDestroy(access.id);
    expect(ctx.inspect().objects).toEqual([{ id: ioas, type: 'IOAS' }]);
  });

  it('iommufd_ioas.access_pin: argument and permission errors change nothing', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    const access = politeAccess(ctx, ioas);
    mapFixed(ctx, ioas, BUFFER_GPA, 4n * PAGE_N, 0x10000n, IoasMapFlag.READABLE | IoasMapFlag.FIXED_IOVA);
    expectErrno(host, 'EINVAL', () => ctx.accessPin(access.id, 0x10000n, 0n));
    expectErrno(host, 'EINVAL', () => ctx.accessPin(access.id, 0x10001n, PAGE_N));
    expectErrno(host, 'EOVERFLOW', () => ctx.accessPin(access.id, U64_MAX - PAGE_N + 1n, 2n * PAGE_N));
    expectErrno(host, 'ENOENT', () => ctx.accessPin(access.id, 0x10000n, 5n * PAGE_N));
    expectErrno(host, 'EPERM', () => ctx.accessPin(access.id, 0x10000n, PAGE_N, AccessRwFlag.WRITE));
    expectErrno(host, 'ENOENT', () => ctx.accessUnpin(access.id, 0x10000n, PAGE_N));
    expectErrno(host, 'ENOENT', () => ctx.accessPin(ioas, 0x10000n, PAGE_N));
    // Destroy is refused for objects held by their driver, and for an IOAS with an access.
    expectErrno(host, 'EBUSY', () => ctx.destroy(access.id));
    expectErrno(host, 'EBUSY', () => ctx.destroy(ioas));
  });

  it('iommufd_ioas.access_pin_unmap: unmap asks the access to unpin, then succeeds; the pin is gone', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    const access = politeAccess(ctx, ioas);
    mapFixed(ctx, ioas, BUFFER_GPA, BUFFER_SIZE, APERTURE_START);
    access.pin(APERTURE_START, BUFFER_SIZE);
    expect(ctx.ioasUnmap(ioas, APERTURE_START, BUFFER_SIZE)).toBe(BUFFER_SIZE);
    expect(access.calls).toEqual([[APERTURE_START, BUFFER_SIZE]]);
    expectErrno(host, 'ENOENT', () => ctx.accessUnpin(access.id, APERTURE_START, BUFFER_SIZE));
    expect(host.stats().pinReferences).toBe(0);
  });

  it('iommufd_ioas.access_pin_unmap: pins the access keeps make the unmap fail with EDEADLOCK, changing nothing', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    let calls = 0;
    const stubborn = ctx.accessCreate(ioas, {
      onUnmap() {
        calls++;
      },
    });
    mapFixed(ctx, ioas, BUFFER_GPA, BUFFER_SIZE, APERTURE_START);
    ctx.accessPin(stubborn, APERTURE_START + PAGE_N, PAGE_N);
    expectErrno(host, 'EDEADLOCK', () => ctx.ioasUnmap(ioas, 0n, U64_MAX));
    expect(calls).toBe(1);
    // While onUnmap runs, new pins in the area are refused (prevent_access).
    let inner: string | undefined;
    const second = ctx.accessCreate(ioas, {
      onUnmap() {
        try {
          ctx.accessPin(stubborn, APERTURE_START, PAGE_N);
        } catch (e) {
          inner = (e as IommufdError).code;
        }
      },
    });
    expectErrno(host, 'EDEADLOCK', () => ctx.ioasUnmap(ioas, APERTURE_START, BUFFER_SIZE));
    expect(inner).toBe('EINVAL');
    ctx.accessDestroy(second);
    // Destroying the access releases its pins; then the unmap goes through.
    ctx.accessDestroy(stubborn);
    expect(ctx.ioasUnmap(ioas, APERTURE_START, BUFFER_SIZE)).toBe(BUFFER_SIZE);
  });

  function checkAccessRw(ctx: Context, memory: GuestMemory, access: number, iova: bigint, gpaOf: (iova: bigint) => number) {
    let seed = 12345;
    const rand = () => (seed = (seed * 1103515245 + 12345) >>> 0) & 0xff;
    for (let off = PAGE_N - 50n; off < PAGE_N + 50n; off += 7n) {
      for (let length = 1; length < 64; length += 5) {
        const at = iova + off;
        const want = new Uint8Array(length);
        for (let i = 0; i < length; i++) want[i] = memory.readU8(gpaOf(at + BigInt(i)));
        const got = new Uint8Array(length);
        ctx.accessRw(access, at, got);
        expect(got).toEqual(want);
        const data = Uint8Array.from({ length }, rand);
        ctx.accessRw(access, at, data, AccessRwFlag.WRITE);
        for (let i = 0; i < length; i++) expect(memory.readU8(gpaOf(at + BigInt(i)))).toBe(data[i]);
      }
    }
    const all = new Uint8Array(Number(BUFFER_SIZE));
    ctx.accessRw(access, iova, all);
    for (let i = 0; i < all.length; i += 509) expect(all[i]).toBe(memory.readU8(gpaOf(iova + BigInt(i))));
  }

  it('iommufd_ioas.access_rw: byte-granular reads and writes across a page boundary match guest memory', () => {
    const { ctx, memory } = setup();
    const ioas = ctx.ioasAlloc();
    const access = ctx.accessCreate(ioas, { onUnmap() {} });
    for (let i = 0; i < Number(BUFFER_SIZE); i++) memory.writeU8(BUFFER_GPA + i, (i * 31) & 0xff);
    const iova = mapAuto(ctx, ioas, BUFFER_GPA, BUFFER_SIZE);
    checkAccessRw(ctx, memory, access, iova, (a) => BUFFER_GPA + Number(a - iova));
    ctx.ioasUnmap(ioas, iova, BUFFER_SIZE);
    ctx.accessDestroy(access);
  });

  it('iommufd_ioas.access_rw_unaligned (adapted): accesses spanning two areas whose GPAs are not adjacent', () => {
    const { host, ctx, memory } = setup();
    const ioas = ctx.ioasAlloc();
    const access = ctx.accessCreate(ioas, { onUnmap() {} });
    for (let i = 0; i < 2 * Number(BUFFER_SIZE); i++) memory.writeU8(BUFFER_GPA + i, (i * 7 + 3) & 0xff);
    // Page 0 of the IOVA range comes from the buffer's second half, the rest from its first half.
    const iova = 0x100000n;
    mapFixed(ctx, ioas, BUFFER_GPA + 2 * PAGE, PAGE_N, iova);
    mapFixed(ctx, ioas, BUFFER_GPA, BUFFER_SIZE - PAGE_N, iova + PAGE_N);
    const gpaOf = (a: bigint) => (a < iova + PAGE_N ? BUFFER_GPA + 2 * PAGE + Number(a - iova) : BUFFER_GPA + Number(a - iova - PAGE_N));
    checkAccessRw(ctx, memory, access, iova, gpaOf);
    // A read-only area refuses writes with EPERM; a gap is ENOENT.
    mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, 0x200000n, IoasMapFlag.READABLE | IoasMapFlag.FIXED_IOVA);
    expectErrno(host, 'EPERM', () => ctx.accessRw(access, 0x200000n + 10n, new Uint8Array(4), AccessRwFlag.WRITE));
    expectErrno(host, 'ENOENT', () => ctx.accessRw(access, 0x200000n + PAGE_N - 2n, new Uint8Array(4)));
    expectErrno(host, 'EINVAL', () => ctx.accessRw(access, 0x200000n, new Uint8Array(0)));
  });
});

describe('iommufd_mock_domain', () => {
  it('iommufd_mock_domain.basic: a mapped page translates through the device; memory that is not RAM is EFAULT', () => {
    const { host, ctx, memory } = setup({ memoryBytes: 4 * 1024 * 1024 });
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('mock0');
    ctx.deviceAttach(dev, ioas);
    const iova = mapAuto(ctx, ioas, BUFFER_GPA, PAGE_N);
    expect(iova >= APERTURE_START && iova <= APERTURE_LAST).toBe(true);
    expect(ctx.translate(dev, 0, iova + 5n, 10, 'read')).toEqual({ spans: [{ gpa: BUFFER_GPA + 5, length: 10 }] });
    // Half of the range is past the end of RAM, then all of it.
    expectErrno(host, 'EFAULT', () => mapAuto(ctx, ioas, memory.size - 4 * PAGE, 8n * PAGE_N));
    expectErrno(host, 'EFAULT', () => mapAuto(ctx, ioas, memory.size, 8n * PAGE_N));
  });

  it('iommufd_mock_domain.all_aligns: every start and length within 8 pages maps, translates and unpins', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('mock0');
    ctx.deviceAttach(dev, ioas);
    const bufPages = 8;
    for (let start = 0; start < bufPages; start++) {
      for (let end = start + 1; end <= bufPages; end++) {
        const length = BigInt((end - start) * PAGE);
        const gpa = BUFFER_GPA + start * PAGE;
        const iova = mapAuto(ctx, ioas, gpa, length);
        expect(ctx.translate(dev, 0, iova, Number(length), 'write')).toEqual({ spans: [{ gpa, length: Number(length) }] });
        for (let p = 0; p < bufPages; p++) {
          expect(host.pins.referencesOf(BUFFER_GPA / PAGE + p)).toBe(p >= start && p < end ? 1 : 0);
        }
        ctx.ioasUnmap(ioas, iova, length);
      }
    }
    expect(host.stats()).toEqual({ pinnedPages: 0, accountedPages: 0, pinReferences: 0 });
  });

  it('iommufd_mock_domain.all_aligns_copy: a domain added and removed while the area exists sees it', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    ctx.deviceAttach(ctx.deviceBind('mock0'), ioas);
    for (let start = 0; start < 4; start++) {
      const gpa = BUFFER_GPA + start * PAGE;
      const length = BigInt((4 - start) * PAGE);
      const iova = mapAuto(ctx, ioas, gpa, length);
      const dev = ctx.deviceBind('mock1');
      ctx.deviceAttach(dev, ioas);
      expect(ctx.translate(dev, 0, iova, Number(length), 'read').spans).toEqual([{ gpa, length: Number(length) }]);
      ctx.deviceUnbind(dev);
      ctx.ioasUnmap(ioas, iova, length);
    }
    expect(host.stats().pinReferences).toBe(0);
  });

  it('iommufd_mock_domain.user_copy: pages pinned in a domain-less IOAS are copied into one with a domain', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('mock0');
    ctx.deviceAttach(dev, ioas);
    const plain = ctx.ioasAlloc();
    const src = mapAuto(ctx, plain, BUFFER_GPA, BUFFER_SIZE);
    const access = ctx.accessCreate(plain, { onUnmap() {} });
    ctx.accessPin(access, src, BUFFER_SIZE);
    const pinnedBefore = host.stats().pinnedPages;
    ctx.ioasCopy(ioas, APERTURE_START, plain, src, BUFFER_SIZE, FIXED_RW);
    expect(host.stats().pinnedPages).toBe(pinnedBefore);
    expect(ctx.translate(dev, 0, APERTURE_START, Number(BUFFER_SIZE), 'read').spans).toEqual([{ gpa: BUFFER_GPA, length: Number(BUFFER_SIZE) }]);
    ctx.accessUnpin(access, src, BUFFER_SIZE);
    ctx.accessDestroy(access);
    ctx.ioasUnmap(ioas, APERTURE_START, BUFFER_SIZE);
    ctx.destroy(plain);
    expect(host.stats().pinnedPages).toBe(0);
  });

  for (const domains of [1, 2] as const) {
    it(`iommufd_mock_domain.replace (${domains} domains): replacing the IOAS frees the old automatic HWPT`, () => {
      const f = ioasFixture(domains);
      const { host, ctx, devs, hwpts } = f;
      const ioas2 = ctx.ioasAlloc();
      ctx.deviceAttach(devs[0]!, ioas2);
      if (domains === 1) expectErrno(host, 'ENOENT', () => ctx.deviceAttach(devs[0]!, hwpts[0]!));
      ctx.deviceAttach(devs[0]!, ioas2);
      if (domains === 2) {
        // Both mock devices share the first automatic HWPT of the IOAS.
        expect(hwpts[1]).toBe(hwpts[0]);
      }
      expect(ctx.deviceAttach(devs[0]!, f.ioas)).toBeGreaterThan(0);
      ctx.destroy(ioas2);
    });
  }

  it('iommufd_mock_domain.replace: a DMA-visible switch with no moment without translation', () => {
    const { ctx } = setup();
    const a = ctx.ioasAlloc();
    const b = ctx.ioasAlloc();
    mapFixed(ctx, a, BUFFER_GPA, PAGE_N, APERTURE_START);
    mapFixed(ctx, b, 0, PAGE_N, APERTURE_START);
    const dev = ctx.deviceBind('mock0');
    const hwptA = ctx.deviceAttach(dev, a);
    const rows = new Int32Array(ctx.describeShared().devices.buffer);
    const row = ctx.deviceRow(dev);
    const before = readRow(rows, row, emptyRowValue());
    expect(before.kind).toBe(AttachKind.PAGING);
    const hwptB = ctx.deviceAttach(dev, b);
    const after = readRow(rows, row, emptyRowValue());
    expect(after.kind).toBe(AttachKind.PAGING);
    expect(after.header).not.toBe(before.header);
    expect(after.seq).toBe(before.seq + 2);
    expect(ctx.translate(dev, 0, APERTURE_START, 8, 'read').spans).toEqual([{ gpa: 0, length: 8 }]);
    // The automatic HWPT of `a` went away with its last attachment; its reserved ranges too.
    expect(ctx.inspect().hwpts.map((h) => h.id)).toEqual([hwptB]);
    expect(hwptA).not.toBe(hwptB);
    expect(ctx.inspect().ioas.find((i) => i.id === a)!.reserved).toEqual([]);
  });

  it('iommufd_mock_domain.alloc_hwpt: flags, rotation, EBUSY while attached', () => {
    const { host, ctx } = setup();
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('mock0');
    ctx.deviceAttach(dev, ioas);
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, ioas, { flags: ~HwptAllocFlag.NEST_PARENT >>> 0 }));
    const h0 = ctx.hwptAlloc(dev, ioas);
    const h1 = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT });
    ctx.deviceAttach(dev, h0);
    expectErrno(host, 'EBUSY', () => ctx.destroy(h0));
    ctx.deviceAttach(dev, h1);
    expectErrno(host, 'EBUSY', () => ctx.destroy(h1));
    ctx.deviceAttach(dev, ioas);
    ctx.destroy(h1);
    const other = ctx.deviceBind('mock1');
    ctx.deviceAttach(other, h0);
    ctx.deviceUnbind(other);
    ctx.destroy(h0);
    // HWPT_ALLOC argument rules.
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, 999));
    expectErrno(host, 'ENOENT', () => ctx.hwptAlloc(999, ioas));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, dev));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, ioas, { dataType: HwptDataType.VTD_S1 }));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, ioas, { data: new Uint8Array(8) }));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, ioas, { dataType: HwptDataType.VTD_S1, data: new Uint8Array(8) }));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.FAULT_ID_VALID }));
    // Nested: the parent must be a NEST_PARENT HWPT; struct iommu_hwpt_vtd_s1 is 24 bytes (the
    // nested cases themselves are in test/ioasid-nested.test.ts).
    const parent = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT });
    const plain = ctx.hwptAlloc(dev, ioas);
    const s1 = { dataType: HwptDataType.VTD_S1, data: new Uint8Array(16) };
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, plain, s1));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, s1));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, parent));
  });

  it('iommufd_ioas.hwpt_attach / get_hw_info: attaching to a missing HWPT is ENOENT; hw info reports the device', () => {
    const { host, ctx } = setup({ devices: [mockDevice('mock0'), { name: 'plain', group: 'g' }] });
    const dev = ctx.deviceBind('mock0');
    expectErrno(host, 'ENOENT', () => ctx.deviceAttach(dev, 77));
    expect(ctx.getHwInfo(dev)).toMatchObject({ dataType: HwInfoType.INTEL_VTD, capabilities: HwCap.DIRTY_TRACKING, maxPasidLog2: 8 });
    expect(ctx.getHwInfo(ctx.deviceBind('plain')).capabilities).toBe(0);
    expectErrno(host, 'ENOENT', () => ctx.getHwInfo(0));
  });

  it('iommufd_dirty_tracking.enforce_dirty: a device without dirty tracking cannot use a dirty-tracking HWPT', () => {
    const { host, ctx } = setup({ devices: [mockDevice('mock0'), mockDevice('nodirty', 'nodirty', { dirtyTracking: false })] });
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('mock0');
    const hwpt = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.DIRTY_TRACKING });
    ctx.deviceAttach(dev, hwpt);
    const nodirty = ctx.deviceBind('nodirty');
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(nodirty, hwpt));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(nodirty, ioas, { flags: HwptAllocFlag.DIRTY_TRACKING }));
    // The dirty-tracking HWPT is not picked automatically; the device gets its own automatic HWPT.
    expect(ctx.deviceAttach(nodirty, ioas)).not.toBe(hwpt);
  });

  it('iommufd_ioas.mock_domain_limit: a 16-page memlock limit, each guest page counted once', () => {
    const { host, ctx } = setup({ memlockLimitPages: 16 });
    const a = ctx.ioasAlloc();
    const b = ctx.ioasAlloc();
    mapFixed(ctx, a, BUFFER_GPA, BUFFER_SIZE, APERTURE_START);
    expect(host.stats()).toEqual({ pinnedPages: 16, accountedPages: 16, pinReferences: 16 });
    // The same pages again, in another IOAS and at another IOVA, cost nothing more.
    mapFixed(ctx, b, BUFFER_GPA, BUFFER_SIZE, 0n);
    mapAuto(ctx, a, BUFFER_GPA + PAGE, 4n * PAGE_N);
    ctx.ioasCopy(b, 0x100000n, a, APERTURE_START, BUFFER_SIZE, FIXED_RW);
    expect(host.stats()).toEqual({ pinnedPages: 16, accountedPages: 16, pinReferences: 52 });
    // One page more is over the limit: ENOMEM, nothing pinned, nothing mapped.
    expectErrno(host, 'ENOMEM', () => mapAuto(ctx, a, BUFFER_GPA + 15 * PAGE, 2n * PAGE_N));
    expectErrno(host, 'ENOMEM', () => mapFixed(ctx, b, 0, PAGE_N, 0x800000n));
    ctx.ioasUnmap(a, 0n, U64_MAX);
    ctx.ioasUnmap(b, 0n, U64_MAX);
    expect(host.stats()).toEqual({ pinnedPages: 0, accountedPages: 0, pinReferences: 0 });
    mapFixed(ctx, b, 0, 16n * PAGE_N, 0x800000n);
  });
});

describe('isolation groups, reserved regions, PASIDs, translation', () => {
  const groupDevices = [
    { name: 'fn0', group: 'slot1', reservedRegions: [X86_MSI_WINDOW] as [bigint, bigint][] },
    { name: 'fn1', group: 'slot1', reservedRegions: [X86_MSI_WINDOW] as [bigint, bigint][] },
    { name: 'solo', group: 'slot2', reservedRegions: [X86_MSI_WINDOW] as [bigint, bigint][], pasidBits: 4 },
  ];

  it('a group bound in one context cannot be bound in another (EBUSY) until released', () => {
    const { host, ctx } = setup({ devices: groupDevices });
    const other = host.open();
    const fn0 = ctx.deviceBind('fn0');
    expectErrno(host, 'EBUSY', () => other.deviceBind('fn1'));
    expectErrno(host, 'EINVAL', () => ctx.deviceBind('fn0'));
    expectErrno(host, 'ENODEV', () => ctx.deviceBind('nope'));
    const fn1 = ctx.deviceBind('fn1');
    other.deviceBind('solo');
    ctx.deviceUnbind(fn0);
    expectErrno(host, 'EBUSY', () => other.deviceBind('fn0'));
    ctx.deviceUnbind(fn1);
    other.deviceBind('fn0');
    expect(host.inspect().devices).toEqual([
      { name: 'fn0', group: 'slot1', owner: other.serial },
      { name: 'fn1', group: 'slot1', owner: other.serial }, // ownership is per group
      { name: 'solo', group: 'slot2', owner: other.serial },
    ]);
    other.close();
    expect(host.inspect().devices.every((d) => d.owner === null)).toBe(true);
  });

  it('devices of a group share one attachment: a different HWPT is EINVAL, replace moves the whole group', () => {
    const { host, ctx } = setup({ devices: groupDevices });
    const a = ctx.ioasAlloc();
    const b = ctx.ioasAlloc();
    const fn0 = ctx.deviceBind('fn0');
    const fn1 = ctx.deviceBind('fn1');
    const hwptA = ctx.deviceAttach(fn0, a);
    // The group translates through `a` already: fn1's row follows although fn1 is not attached.
    expect(ctx.inspect().devices.find((d) => d.id === fn1)!.rows[0]!.hwpt).toBe(hwptA);
    const hwptB = ctx.hwptAlloc(fn0, b);
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(fn1, hwptB));
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(fn1, b));
    expect(ctx.deviceAttach(fn1, a)).toBe(hwptA);
    ctx.deviceAttach(fn0, hwptB);
    const snap = ctx.inspect();
    expect(snap.devices.map((d) => d.rows[0]!.hwpt)).toEqual([hwptB, hwptB]);
    expect(snap.groups).toEqual([{ key: 'slot1', devices: [fn0, fn1], attachments: [{ pasid: 0, target: hwptB, devices: [fn0, fn1] }] }]);
    // Both devices' reserved regions moved to `b`; the automatic HWPT of `a` is gone.
    expect(snap.ioas.find((i) => i.id === b)!.reserved.map((r) => r.device)).toEqual([fn0, fn1]);
    expect(snap.ioas.find((i) => i.id === a)!.reserved).toEqual([]);
    expect(snap.hwpts.map((h) => h.id)).toEqual([hwptB]);
    ctx.deviceDetach(fn0);
    expect(ctx.inspect().devices.map((d) => d.rows[0]!.kind)).toEqual([AttachKind.PAGING, AttachKind.PAGING]);
    ctx.deviceDetach(fn1);
    expect(ctx.inspect().devices.map((d) => d.rows[0]!.kind)).toEqual([AttachKind.BLOCKED, AttachKind.BLOCKED]);
    ctx.deviceDetach(fn1); // nothing attached: nothing to do
  });

  it('reserved regions: attach adds the MSI window, which then blocks maps; a mapping there blocks attach', () => {
    const { host, ctx } = setup({ devices: groupDevices });
    const ioas = ctx.ioasAlloc();
    const solo = ctx.deviceBind('solo');
    mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, X86_MSI_WINDOW[0]);
    expectErrno(host, 'EADDRINUSE', () => ctx.deviceAttach(solo, ioas));
    ctx.ioasUnmap(ioas, X86_MSI_WINDOW[0], PAGE_N);
    ctx.deviceAttach(solo, ioas);
    expectErrno(host, 'EINVAL', () => mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, X86_MSI_WINDOW[0] + 0x1000n));
    expectErrno(host, 'EINVAL', () => mapFixed(ctx, ioas, BUFFER_GPA, 0x200000n, 0xfed00000n));
    expect(ctx.ioasIovaRanges(ioas).ranges).toEqual([
      { start: 0n, last: X86_MSI_WINDOW[0] - 1n },
      { start: X86_MSI_WINDOW[1] + 1n, last: U64_MAX },
    ]);
    ctx.deviceDetach(solo);
    expect(ctx.ioasIovaRanges(ioas).ranges).toEqual([{ start: 0n, last: U64_MAX }]);
  });

  it('PASID attachments need PASID-capable HWPTs and a PASID-capable device', () => {
    const { host, ctx } = setup({ devices: groupDevices });
    const ioas = ctx.ioasAlloc();
    const solo = ctx.deviceBind('solo');
    const fn0 = ctx.deviceBind('fn0');
    const plain = ctx.hwptAlloc(solo, ioas);
    const pasidHwpt = ctx.hwptAlloc(solo, ioas, { flags: HwptAllocFlag.PASID });
    mapFixed(ctx, ioas, BUFFER_GPA, PAGE_N, 0x10000n);
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(solo, plain, 3));
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(solo, ioas, 3));
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(solo, pasidHwpt, 16));
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(fn0, pasidHwpt, 3));
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(solo, pasidHwpt, 1 << 20));
    ctx.deviceAttach(solo, pasidHwpt, 3);
    // The RID is still blocked; PASID 3 translates; PASID 4 is blocked.
    expect(ctx.translate(solo, 0, 0x10000n, 4, 'read').fault?.reason).toBe('DOMAIN');
    expect(ctx.translate(solo, 3, 0x10000n, 4, 'read').spans).toEqual([{ gpa: BUFFER_GPA, length: 4 }]);
    expect(ctx.translate(solo, 4, 0x10000n, 4, 'read').fault?.reason).toBe('DOMAIN');
    // A RID HWPT without the PASID flag while a PASID is attached is EINVAL.
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(solo, plain));
    ctx.deviceAttach(solo, pasidHwpt);
    ctx.deviceDetach(solo, 3);
    expect(ctx.translate(solo, 3, 0x10000n, 4, 'read').fault?.reason).toBe('DOMAIN');
    expect(ctx.inspect().devices.find((d) => d.id === solo)!.rows).toHaveLength(1);
  });

  it('translate: DOMAIN when blocked, MAPPING in a hole, PERMISSION on a read-only write, identity in bypass', () => {
    const { ctx } = setup({ devices: groupDevices });
    const ioas = ctx.ioasAlloc();
    const solo = ctx.deviceBind('solo');
    expect(ctx.translate(solo, 0, 0x1000n, 1, 'read')).toEqual({ fault: { reason: 'DOMAIN', iova: 0x1000n, access: 'read', pasid: 0 } });
    ctx.deviceAttach(solo, ioas);
    mapFixed(ctx, ioas, BUFFER_GPA, 2n * PAGE_N, 0x10000n, IoasMapFlag.READABLE | IoasMapFlag.FIXED_IOVA);
    mapFixed(ctx, ioas, 0, PAGE_N, 0x12000n);
    expect(ctx.translate(solo, 0, 0x10ff0n, 0x2010, 'read')).toEqual({
      spans: [
        { gpa: BUFFER_GPA + 0xff0, length: 0x1010 },
        { gpa: 0, length: 0x1000 },
      ],
    });
    expect(ctx.translate(solo, 0, 0x11ff0n, 0x20, 'write')).toEqual({ fault: { reason: 'PERMISSION', iova: 0x11ff0n, access: 'write', pasid: 0 } });
    expect(ctx.translate(solo, 0, 0x12ff0n, 0x20, 'read')).toEqual({ fault: { reason: 'MAPPING', iova: 0x13000n, access: 'read', pasid: 0 } });
    ctx.deviceSetBypass(solo);
    expect(ctx.translate(solo, 0, 0x5000n, 0x3000, 'write')).toEqual({ spans: [{ gpa: 0x5000, length: 0x3000 }] });
    expect(ctx.inspect().hwpts).toEqual([]);
    ctx.deviceAttach(solo, ioas);
    expect(ctx.translate(solo, 0, 0x12000n, 8, 'write').spans).toEqual([{ gpa: 0, length: 8 }]);
  });

  it('a reader with only the shared buffers sees the same translation as the owner', () => {
    const { ctx } = setup({ devices: groupDevices });
    const ioas = ctx.ioasAlloc();
    const solo = ctx.deviceBind('solo');
    ctx.deviceAttach(solo, ioas);
    mapFixed(ctx, ioas, BUFFER_GPA, 0x400000n, 0x40000000n);
    const shared = ctx.describeShared();
    const row = ctx.deviceRow(solo);
    // What a device worker would do with the descriptor it was sent.
    const pool = new Int32Array(shared.pool.buffer);
    const rows = new Int32Array(shared.devices.buffer);
    const leaf = emptyLeafInfo();
    expect(translatePage(rows, pool, row, 0, 0x40000 + 0x201, false, emptyRowValue(), leaf)).toBe(PageResult.OK);
    expect(leaf.guestPfn * PAGE).toBe(BUFFER_GPA + 0x201000);
    expect(leaf.pageShift).toBe(21);
    // Growth of the pool after the reader made its views stays visible to it.
    const many = ctx.ioasAlloc();
    for (let i = 0n; i < 600n; i++) mapFixed(ctx, many, 0, PAGE_N, i << 30n);
    ctx.deviceAttach(solo, many);
    expect(translatePage(rows, pool, row, 0, Number((599n << 30n) / PAGE_N), true, emptyRowValue(), leaf)).toBe(PageResult.OK);
    expect(leaf.guestPfn).toBe(0);
  });

  it('close() releases every object, pin and group, and later calls are EBADF', () => {
    const { host, ctx } = setup({ devices: groupDevices });
    const ioas = ctx.ioasAlloc();
    const fn0 = ctx.deviceBind('fn0');
    ctx.deviceAttach(fn0, ioas);
    mapAuto(ctx, ioas, BUFFER_GPA, BUFFER_SIZE);
    const access = ctx.accessCreate(ioas, { onUnmap() {} });
    ctx.accessPin(access, ctx.inspect().ioas[0]!.areas[0]!.iova, PAGE_N);
    expect(host.stats().pinReferences).toBe(17);
    ctx.close();
    expect(host.stats()).toEqual({ pinnedPages: 0, accountedPages: 0, pinReferences: 0 });
    expect(host.inspect().contexts).toEqual([]);
    expect(() => ctx.ioasAlloc()).toThrow(IommufdError);
    const again = host.open();
    again.deviceBind('fn1');
  });
});

describe('table pool limit', () => {
  it('a map that needs more tables than the pool may grow to is ENOMEM and changes nothing', () => {
    const memory = GuestMemory.create(8 * 1024 * 1024);
    const host = new IommufdHost(memory, { pool: { initialTables: 4, maxTables: 8 } });
    const ctx = host.open();
    const ioas = ctx.ioasAlloc();
    ctx.option({ option: IommuOption.HUGE_PAGES, objectId: ioas, op: IommuOptionOp.SET, value: 0n });
    mapFixed(ctx, ioas, 0, PAGE_N, 0n);
    // 4 MiB of 4 KiB leaves far from the first map needs more level-0 tables than are left.
    expectErrno(host, 'ENOMEM', () => mapFixed(ctx, ioas, 0, 0x400000n, 0x40000000n));
    mapFixed(ctx, ioas, 0, 0x200000n, 0x200000n);
  });
});

describe('memory per mapping', () => {
  it('keeps table and pin-count memory under 16 bytes per live 4 KiB mapping at 100k maps', () => {
    const guestPages = 8192;
    const { host, ctx } = setup({ memoryBytes: guestPages * PAGE });
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('mock0');
    ctx.deviceAttach(dev, ioas);
    const n = 100_000;
    const iovas: bigint[] = [];
    for (let i = 0; i < n; i++) iovas.push(mapAuto(ctx, ioas, (i % guestPages) * PAGE, PAGE_N));
    expect(host.stats()).toEqual({ pinnedPages: guestPages, accountedPages: guestPages, pinReferences: n });
    for (const i of [0, 1, 4095, 77_777, n - 1]) {
      expect(ctx.translate(dev, 0, iovas[i]!, 8, 'write').spans).toEqual([{ gpa: (i % guestPages) * PAGE, length: 8 }]);
    }
    // Tables (8 bytes per leaf, plus upper levels) and the 4-byte reference count per guest page:
    // nothing else is kept per mapping.
    const tableBytes = ctx.stats().tablesInUse * 4096;
    const refcountBytes = guestPages * 4;
    expect((tableBytes + refcountBytes) / n).toBeLessThan(16);
    ctx.deviceDetach(dev);
    expect(ctx.ioasUnmap(ioas, 0n, U64_MAX)).toBe(BigInt(n) * PAGE_N);
    expect(ctx.stats().tablesInUse).toBe(2); // the header page and the empty root
    expect(host.stats().pinReferences).toBe(0);
  });
});
