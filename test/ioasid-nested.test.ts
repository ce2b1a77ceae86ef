import { describe, expect, it } from 'vitest';
import { GuestMemory } from '../src/memory/index.js';
import {
  AttachKind,
  HwCap,
  HwInfoType,
  HwptAllocFlag,
  HwptDataType,
  IommufdError,
  IommufdHost,
  IoasMapFlag,
  Stage1Record,
  U64_MAX,
  VtdCap,
  VtdEcap,
  VtdInvalidateFlag,
  VtdS1Flag,
  decodeVtdHwInfo,
  decodeVtdS1,
  emptyRowValue,
  encodeVtdS1,
  readInvalidations,
  readRow,
  readStage1,
  vtdPasidBits,
  type Context,
  type HwptInvalidateEntry,
  type PhysicalDeviceSpec,
} from '../src/ioasid/index.js';
import { QuiescenceOwner, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { MAX_IOVA_PFN } from '../src/pagetable/index.js';

/*
 * Nested HWPTs (VT-d stage 1 over a NEST_PARENT paging HWPT): allocation, attachment and
 * invalidation rules. Test names give the kernel selftest case each one follows
 * (tools/testing/selftests/iommu/iommufd.c); the selftest's mock driver data
 * (IOMMU_HWPT_DATA_SELFTEST) is replaced by struct iommu_hwpt_vtd_s1, and its mock IOTLB checks by
 * the shared invalidation record device workers read.
 */

const RW = IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
const S1_ROOT = 0x30_0000n;

function device(name: string, extra: Partial<PhysicalDeviceSpec> = {}): PhysicalDeviceSpec {
  return { name, group: name, pasidBits: 20, dirtyTracking: true, ...extra };
}

function setup(devices: PhysicalDeviceSpec[] = [device('dev0'), device('dev1')]) {
  const memory = GuestMemory.create(8 << 20);
  const host = new IommufdHost(memory, { devices });
  const ctx = host.open();
  return { memory, host, ctx };
}

/** Expects `fn` to fail with `code` and to leave every context and the accounting as they were. */
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

function vtd(root = S1_ROOT, width: 48 | 57 = 48, flags = 0n) {
  return { dataType: HwptDataType.VTD_S1, data: encodeVtdS1(root, width, flags) };
}

/** struct iommu_hwpt_vtd_s1 with arbitrary field values (encodeVtdS1 refuses bad ones). */
function rawVtd(fields: { flags?: bigint; root?: bigint; width?: number; reserved?: number; length?: number; tail?: number }) {
  const data = new Uint8Array(fields.length ?? 24);
  const view = new DataView(data.buffer);
  if (data.length >= 24) {
    view.setBigUint64(0, fields.flags ?? 0n, true);
    view.setBigUint64(8, fields.root ?? S1_ROOT, true);
    view.setUint32(16, fields.width ?? 48, true);
    view.setUint32(20, fields.reserved ?? 0, true);
  }
  if (fields.tail !== undefined) data[data.length - 1] = fields.tail;
  return { dataType: HwptDataType.VTD_S1, data };
}

function rowOf(ctx: Context, dev: number, pasid = 0) {
  const shared = ctx.describeShared();
  const rows = new Int32Array(shared.devices.buffer);
  if (pasid === 0) return readRow(rows, ctx.deviceRow(dev), emptyRowValue());
  const snap = ctx.inspect().devices.find((d) => d.id === dev)!;
  const r = snap.rows.find((x) => x.pasid === pasid);
  return r === undefined ? undefined : { kind: r.kind, header: r.header, hwptId: r.hwpt };
}

function nestedFixture() {
  const env = setup();
  const { ctx } = env;
  const ioas = ctx.ioasAlloc();
  ctx.ioasMap(ioas, { gpa: 0, length: 8n << 20n, iova: 0n, flags: RW | IoasMapFlag.FIXED_IOVA });
  const dev = ctx.deviceBind('dev0');
  ctx.deviceAttach(dev, ioas);
  const parent = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT });
  return { ...env, ioas, dev, parent };
}

describe('hwptAlloc of nested HWPTs', () => {
  it('iommufd_ioas.alloc_hwpt_nested: argument rules, two nested HWPTs on one parent, references, replace and destroy', () => {
    const { host, ctx, ioas, dev, parent } = nestedFixture();
    const data = vtd();
    // Negative tests.
    expectErrno(host, 'ENOENT', () => ctx.hwptAlloc(ioas, dev));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, dev));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT | HwptAllocFlag.FAULT_ID_VALID }));
    const parentNotWork = ctx.hwptAlloc(dev, ioas);
    // Negative nested tests.
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, { dataType: HwptDataType.NONE, data: data.data }));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, parent, { dataType: HwptDataType.ARM_SMMUV3, data: data.data }));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, { dataType: HwptDataType.VTD_S1, data: data.data.subarray(0, 23) }));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, { dataType: HwptDataType.VTD_S1, data: [1, 2] as unknown as Uint8Array }));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, parent, { ...data, flags: HwptAllocFlag.NEST_PARENT }));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parentNotWork, data));
    // Two nested HWPTs sharing one parent.
    const nested0 = ctx.hwptAlloc(dev, parent, data);
    const nested1 = ctx.hwptAlloc(dev, parent, vtd(0x40_0000n));
    // A fault queue cannot be named: fault objects are not emulated.
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, parent, { ...data, flags: HwptAllocFlag.FAULT_ID_VALID }));
    // A nested HWPT on top of a nested HWPT.
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, nested0, data));
    // The parent cannot be freed while nested HWPTs hold it.
    expectErrno(host, 'EBUSY', () => ctx.destroy(parent));
    const snap = ctx.inspect().hwpts.find((h) => h.id === nested0)!;
    expect(snap).toMatchObject({ type: 'HWPT_NESTED', ioas, parent, users: 0, stage1: { root: Number(S1_ROOT), addrWidth: 48, flags: 0n } });
    expect(ctx.inspect().hwpts.find((h) => h.id === parent)!.users).toBe(2);

    // hwpt_invalidate does not take a parent (or any non-nested object).
    expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(parent, [{ addr: 0n, npages: 1n, flags: 0 }]));
    expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(ioas, []));
    expectErrno(host, 'ENOENT', () => ctx.hwptInvalidate(999, []));

    // Attach to nested0, which is then busy; switch to nested1; back to the parent; to the IOAS.
    ctx.deviceAttach(dev, nested0);
    expectErrno(host, 'EBUSY', () => ctx.destroy(nested0));
    ctx.deviceAttach(dev, nested1);
    expectErrno(host, 'EBUSY', () => ctx.destroy(nested1));
    ctx.destroy(nested0);
    ctx.deviceAttach(dev, parent);
    ctx.destroy(nested1);
    ctx.deviceAttach(dev, ioas);
    ctx.destroy(parent);
    ctx.destroy(parentNotWork);
    expect(ctx.inspect().hwpts.map((h) => h.type)).toEqual(['HWPT_PAGING']);
  });

  it('struct iommu_hwpt_vtd_s1: length, trailing bytes, flags, reserved, address width, root', () => {
    const { host, ctx, dev, parent } = nestedFixture();
    // iommu_copy_struct_from_user: a longer struct is fine while its tail is zero; otherwise E2BIG.
    ctx.destroy(ctx.hwptAlloc(dev, parent, rawVtd({ length: 32 })));
    expectErrno(host, 'E2BIG', () => ctx.hwptAlloc(dev, parent, rawVtd({ length: 32, tail: 1 })));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, rawVtd({ length: 16 })));
    // intel_pasid_setup_nested: only 48 and 57; SRE and EAFE need capabilities this IOMMU lacks.
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, rawVtd({ width: 39 })));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, rawVtd({ width: 0 })));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, vtd(S1_ROOT, 48, VtdS1Flag.SRE)));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, vtd(S1_ROOT, 48, VtdS1Flag.EAFE | VtdS1Flag.WPE)));
    // Unknown flag bits and __reserved.
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, parent, rawVtd({ flags: 1n << 3n })));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, parent, rawVtd({ flags: 1n << 63n })));
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptAlloc(dev, parent, rawVtd({ reserved: 1 })));
    // A root no 52-bit walk can reach.
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, rawVtd({ root: 1n << 52n })));
    expectErrno(host, 'EINVAL', () => ctx.hwptAlloc(dev, parent, rawVtd({ root: U64_MAX })));
    // WPE alone is accepted (it only matters with SRE); 57 bits means five levels; pgtbl_addr's
    // bits below 4 KiB are dropped, as pasid_set_flptr does.
    const wpe = ctx.hwptAlloc(dev, parent, vtd(S1_ROOT, 48, VtdS1Flag.WPE));
    const la57 = ctx.hwptAlloc(dev, parent, rawVtd({ width: 57, root: S1_ROOT + 0xabcn }));
    const hwpts = ctx.inspect().hwpts;
    expect(hwpts.find((h) => h.id === wpe)!.stage1).toEqual({ root: Number(S1_ROOT), addrWidth: 48, flags: VtdS1Flag.WPE });
    expect(hwpts.find((h) => h.id === la57)!.stage1).toEqual({ root: Number(S1_ROOT), addrWidth: 57, flags: 0n });
  });

  it('encodeVtdS1 writes the uAPI layout and refuses values that do not fit', () => {
    const data = encodeVtdS1(0x1234_5000n, 57, VtdS1Flag.WPE);
    expect(Array.from(data)).toEqual([4, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x50, 0x34, 0x12, 0, 0, 0, 0, 57, 0, 0, 0, 0, 0, 0, 0]);
    expect(decodeVtdS1(data)).toEqual({ flags: VtdS1Flag.WPE, pgtblAddr: 0x1234_5000n, addrWidth: 57, reserved: 0 });
    expect(() => encodeVtdS1(-1n, 48)).toThrow(RangeError);
    expect(() => encodeVtdS1(1n << 64n, 48)).toThrow(RangeError);
    expect(() => encodeVtdS1(0n, 39 as 48)).toThrow(RangeError);
    expect(() => encodeVtdS1(0n, 48, -1n)).toThrow(RangeError);
  });

  it('iommufd_ioas.get_hw_info: the IOMMU reports VT-d with nesting, first-stage paging and the PASID width', () => {
    const { host, ctx } = setup([device('dev0'), device('plain', { pasidBits: 0, dirtyTracking: false })]);
    const dev = ctx.deviceBind('dev0');
    const info = ctx.getHwInfo(dev);
    expect(info).toMatchObject({ dataType: HwInfoType.INTEL_VTD, capabilities: HwCap.DIRTY_TRACKING, maxPasidLog2: 20 });
    const vtdInfo = decodeVtdHwInfo(info.data);
    const has = (reg: bigint, bitIndex: number) => ((reg >> BigInt(bitIndex)) & 1n) === 1n;
    expect(vtdInfo.flags).toBe(0);
    for (const b of [VtdEcap.NEST, VtdEcap.FLTS, VtdEcap.SLTS, VtdEcap.SMTS, VtdEcap.PASID]) expect(has(vtdInfo.ecapReg, b)).toBe(true);
    for (const b of [VtdEcap.SRS, VtdEcap.EAFS]) expect(has(vtdInfo.ecapReg, b)).toBe(false);
    expect(has(vtdInfo.capReg, VtdCap.FL5LP) && has(vtdInfo.capReg, VtdCap.FL1GP)).toBe(true);
    expect(vtdPasidBits(vtdInfo.ecapReg)).toBe(20);
    expect(ctx.getHwInfo(ctx.deviceBind('plain'))).toMatchObject({ dataType: HwInfoType.INTEL_VTD, capabilities: 0, maxPasidLog2: 0 });
    expectErrno(host, 'ENOENT', () => ctx.getHwInfo(0));
  });
});

describe('attaching nested HWPTs', () => {
  it('a RID attach writes a NESTED row naming the stage-1 record, which names the root, the levels and stage 2', () => {
    const { ctx, ioas, dev, parent } = nestedFixture();
    const nested = ctx.hwptAlloc(dev, parent, vtd(S1_ROOT, 57));
    expect(ctx.deviceAttach(dev, nested)).toBe(nested);
    const row = rowOf(ctx, dev)!;
    expect(row.kind).toBe(AttachKind.NESTED);
    expect(row.hwptId).toBe(nested);
    const pool = new Int32Array(ctx.describeShared().pool.buffer);
    const view = { root: 0, levels: 4 as 4 | 5, stage2: 0 };
    expect(readStage1(pool, row.header, view)).toBe(true);
    // Stage 2 is the parent's IOAS: the header a PAGING attachment of that IOAS walks.
    const paging = ctx.hwptAlloc(dev, ioas);
    ctx.deviceAttach(dev, paging);
    expect(view).toEqual({ root: Number(S1_ROOT), levels: 5, stage2: rowOf(ctx, dev)!.header });
    expect(Atomics.load(pool, row.header + Stage1Record.HWPT_ID)).toBe(nested);
    // Destroying the nested HWPT retires the record: readers no longer accept it.
    ctx.destroy(nested);
    expect(readStage1(pool, row.header, view)).toBe(false);
  });

  it('iommufd_device_pasid.pasid_attach: nested HWPTs on PASIDs, replace among them, detach; the PASID flag rules', () => {
    const { host, ctx, ioas, dev, parent } = nestedFixture();
    const pasidParent = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT | HwptAllocFlag.PASID });
    const nested0 = ctx.hwptAlloc(dev, pasidParent, { ...vtd(), flags: HwptAllocFlag.PASID });
    const nested1 = ctx.hwptAlloc(dev, pasidParent, { ...vtd(0x40_0000n), flags: HwptAllocFlag.PASID });
    const noPasid = ctx.hwptAlloc(dev, parent, vtd());
    // iommufd_hwpt_pasid_compat: a PASID takes only HWPTs allocated with the PASID flag ...
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(dev, noPasid, 100));
    // ... and the RID's HWPT must have it too while PASIDs are attached.
    ctx.deviceAttach(dev, pasidParent);
    ctx.deviceAttach(dev, nested0, 100);
    expect(rowOf(ctx, dev, 100)).toMatchObject({ kind: AttachKind.NESTED, hwptId: nested0 });
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(dev, noPasid));
    ctx.deviceDetach(dev, 100);
    expect(rowOf(ctx, dev, 100)).toBeUndefined();
    // Replace at PASID 200: the parent, then nested0, then nested1, then detach.
    ctx.deviceAttach(dev, pasidParent, 200);
    expect(rowOf(ctx, dev, 200)).toMatchObject({ kind: AttachKind.PAGING, hwptId: pasidParent });
    ctx.deviceAttach(dev, nested0, 200);
    expect(rowOf(ctx, dev, 200)).toMatchObject({ kind: AttachKind.NESTED, hwptId: nested0 });
    ctx.deviceAttach(dev, nested1, 200);
    expect(rowOf(ctx, dev, 200)).toMatchObject({ kind: AttachKind.NESTED, hwptId: nested1 });
    expectErrno(host, 'EBUSY', () => ctx.destroy(nested1));
    ctx.deviceDetach(dev, 200);
    // The RID itself may also be nested, under PASIDs that are nested too.
    ctx.deviceAttach(dev, nested0);
    ctx.deviceAttach(dev, nested1, 300);
    expect(rowOf(ctx, dev)).toMatchObject({ kind: AttachKind.NESTED, hwptId: nested0 });
    expect(rowOf(ctx, dev, 300)).toMatchObject({ kind: AttachKind.NESTED, hwptId: nested1 });
    ctx.deviceUnbind(dev);
    ctx.destroy(nested0);
    ctx.destroy(nested1);
    ctx.destroy(noPasid);
    ctx.destroy(pasidParent);
    ctx.destroy(parent);
  });

  it('iommufd_dirty_tracking.enforce_dirty: a dirty-tracking parent refuses devices without dirty tracking, and PASIDs', () => {
    const { host, ctx } = setup([device('dev0'), device('nodirty', { dirtyTracking: false })]);
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('dev0');
    const other = ctx.deviceBind('nodirty');
    const parent = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT | HwptAllocFlag.DIRTY_TRACKING | HwptAllocFlag.PASID });
    const nested = ctx.hwptAlloc(dev, parent, { ...vtd(), flags: HwptAllocFlag.PASID });
    // paging_domain_compatible(s2_domain): -EINVAL for a device without dirty tracking.
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(other, nested));
    ctx.deviceAttach(dev, nested);
    // intel_nested_set_dev_pasid: s2_domain->dirty_ops is -EINVAL for a PASID.
    expectErrno(host, 'EINVAL', () => ctx.deviceAttach(dev, nested, 5));
  });

  it('reserved regions of a nested RID attach go to the parent IOAS (find_hwpt_paging), not for a PASID attach', () => {
    const msi: [bigint, bigint] = [0xfee0_0000n, 0xfeef_ffffn];
    const { host, ctx } = setup([device('dev0', { reservedRegions: [msi] })]);
    const ioas = ctx.ioasAlloc();
    const dev = ctx.deviceBind('dev0');
    const parent = ctx.hwptAlloc(dev, ioas, { flags: HwptAllocFlag.NEST_PARENT | HwptAllocFlag.PASID });
    const nested = ctx.hwptAlloc(dev, parent, { ...vtd(), flags: HwptAllocFlag.PASID });
    ctx.deviceAttach(dev, nested, 7);
    expect(ctx.inspect().ioas[0]!.reserved).toEqual([]);
    ctx.deviceAttach(dev, nested);
    expect(ctx.inspect().ioas[0]!.reserved).toEqual([{ start: msi[0], last: msi[1], device: dev }]);
    // The stage-2 IOAS now refuses maps over the region.
    expectErrno(host, 'EINVAL', () => ctx.ioasMap(ioas, { gpa: 0, length: 0x1000n, iova: msi[0], flags: RW | IoasMapFlag.FIXED_IOVA }));
    // Replacing by the parent keeps the region (same IOAS); detaching removes it.
    ctx.deviceAttach(dev, parent);
    expect(ctx.inspect().ioas[0]!.reserved).toHaveLength(1);
    ctx.deviceDetach(dev);
    expect(ctx.inspect().ioas[0]!.reserved).toEqual([]);
  });

  it('close() releases nested HWPTs, their parents and their records', () => {
    const { host, ctx, dev, parent } = nestedFixture();
    const nested = ctx.hwptAlloc(dev, parent, vtd());
    ctx.deviceAttach(dev, nested);
    const before = ctx.stats().tablesInUse;
    ctx.close();
    expect(ctx.closed).toBe(true);
    expect(host.inspect().contexts).toEqual([]);
    expect(before).toBeGreaterThan(0);
  });
});

describe('hwptInvalidate', () => {
  function invalidated(ctx: Context, dev: number, from: number) {
    const pool = new Int32Array(ctx.describeShared().pool.buffer);
    const record = rowOf(ctx, dev)!.header;
    const to = Atomics.load(pool, record + Stage1Record.GENERATION);
    const ranges: [number, number][] = [];
    const complete = readInvalidations(pool, record, from, to, (first, last) => ranges.push([first, last]));
    return { complete, ranges, generation: to };
  }

  it('iommufd_ioas.alloc_hwpt_nested (invalidation part): data type, flags, reserved, alignment, partial success', () => {
    const { host, ctx, dev, parent } = nestedFixture();
    const nested = ctx.hwptAlloc(dev, parent, vtd());
    ctx.deviceAttach(dev, nested);
    const entry = (addr: bigint, npages: bigint, flags = 0, reserved = 0): HwptInvalidateEntry => ({ addr, npages, flags, reserved });
    // A zero-length array checks the data type only.
    expect(ctx.hwptInvalidate(nested, [])).toBe(0);
    expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(nested, [], 1));
    expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(nested, [entry(0n, 1n)], 1));
    // Invalid flags and a nonzero reserved field: -EOPNOTSUPP, nothing handled.
    let e = expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptInvalidate(nested, [entry(0n, 1n, 0xffffffff)]));
    expect(e.details).toEqual({ entryNum: 0 });
    expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptInvalidate(nested, [entry(0n, 1n, 0, 1)]));
    // Unaligned addresses, and "all pages" from a nonzero address: -EINVAL.
    expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(nested, [entry(0x800n, 1n)]));
    expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(nested, [entry(0x1000n, U64_MAX)]));
    // Hostile shapes.
    expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(nested, 'x' as unknown as HwptInvalidateEntry[]));
    expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(nested, [null as unknown as HwptInvalidateEntry]));
    expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(nested, [{ addr: 0, npages: 1n, flags: 0 } as unknown as HwptInvalidateEntry]));
    expectErrno(host, 'EOVERFLOW', () => ctx.hwptInvalidate(nested, [entry(1n << 64n, 1n)]));
    expect(invalidated(ctx, dev, 0)).toEqual({ complete: true, ranges: [], generation: 0 });

    // The first entry is handled, the second fails: the call reports 1 (details.entryNum).
    e = expectErrno(host, 'EOPNOTSUPP', () => ctx.hwptInvalidate(nested, [entry(0x5000n, 2n), entry(0n, 1n, 0xffffffff)]));
    expect(e.details).toEqual({ entryNum: 1 });
    expect(invalidated(ctx, dev, 0)).toEqual({ complete: true, ranges: [[5, 6]], generation: 1 });
    e = expectErrno(host, 'EINVAL', () => ctx.hwptInvalidate(nested, [entry(0x9000n, 1n, VtdInvalidateFlag.LEAF), entry(0x123n, 1n)]));
    expect(e.details).toEqual({ entryNum: 1 });
    expect(invalidated(ctx, dev, 1).ranges).toEqual([[9, 9]]);

    // Two entries; everything; a range clamped at the top of the address space; zero pages.
    expect(ctx.hwptInvalidate(nested, [entry(0x10000n, 1n), entry(0xffff_ffff_ffff_f000n, 8n), entry(0x3000n, 0n)])).toBe(3);
    expect(invalidated(ctx, dev, 2).ranges).toEqual([
      [0x10, 0x10],
      [MAX_IOVA_PFN, MAX_IOVA_PFN],
    ]);
    expect(ctx.hwptInvalidate(nested, [entry(0n, U64_MAX)])).toBe(1);
    expect(invalidated(ctx, dev, 4).ranges).toEqual([[0, MAX_IOVA_PFN]]);
  });

  it('more entries than the ring holds become one full invalidation; a reader that fell behind the ring is told to drop all', () => {
    const { ctx, dev, parent } = nestedFixture();
    const nested = ctx.hwptAlloc(dev, parent, vtd());
    ctx.deviceAttach(dev, nested);
    const many = Array.from({ length: Stage1Record.LOG_ENTRIES + 1 }, (_, i) => ({ addr: BigInt(i) << 12n, npages: 1n, flags: 0 }));
    expect(ctx.hwptInvalidate(nested, many)).toBe(many.length);
    expect(invalidated(ctx, dev, 0)).toEqual({ complete: true, ranges: [[0, MAX_IOVA_PFN]], generation: 1 });
    for (let i = 0; i < Stage1Record.LOG_ENTRIES; i++) ctx.hwptInvalidate(nested, [{ addr: BigInt(i) << 12n, npages: 1n, flags: 0 }]);
    expect(invalidated(ctx, dev, 0).complete).toBe(false);
    expect(invalidated(ctx, dev, 1).complete).toBe(true);
  });

  it('is strict: each call that handled an entry bumps the epoch the device workers wait on', () => {
    const { ctx, dev, parent } = nestedFixture();
    const owner = new QuiescenceOwner(createQuiescenceBuffer(2));
    ctx.attachQuiescence(owner);
    const nested = ctx.hwptAlloc(dev, parent, vtd());
    ctx.deviceAttach(dev, nested);
    const epoch = owner.epoch;
    ctx.hwptInvalidate(nested, []);
    expect(owner.epoch).toBe(epoch);
    ctx.hwptInvalidate(nested, [{ addr: 0n, npages: 1n, flags: 0 }]);
    expect(owner.epoch).toBe(epoch + 1);
    expect(() => ctx.hwptInvalidate(nested, [{ addr: 0n, npages: 1n, flags: 0 }, { addr: 1n, npages: 1n, flags: 0 }])).toThrow(IommufdError);
    expect(owner.epoch).toBe(epoch + 2);
  });
});
