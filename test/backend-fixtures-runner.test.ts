import { afterEach, describe, expect, it, vi } from 'vitest';
import { GuestMemory } from '../src/memory/index.js';
import { Context, IommufdError, IommufdHost, IoasMapFlag, IommuOption, IommuOptionOp, HwptAllocFlag } from '../src/ioasid/index.js';
import { BACKEND_FIXTURE_FORMAT, parseBackendFixture } from '../src/replay/backend-fixture.js';
import { firstDifference, replayBackendFixture, type ConsumerFactory } from '../src/replay/backend-runner.js';
import { startBackendTranslateWorker } from '../src/runtime/backend-translate-client.js';

// Runner behaviour beyond "the shipped fixtures pass". Translate steps start a worker from dist/.

const MOCK = { name: 'mock0', reservedRegions: [['0x0', '0xffffff'], ['0x80000000', '0xffffffffffffffff']] };

function doc(steps: unknown[], extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { format: BACKEND_FIXTURE_FORMAT, name: 'test', memory: { size: 1 << 24 }, devices: [MOCK], steps, ...extra };
}

async function replay(source: Record<string, unknown>, consumers?: ConsumerFactory) {
  return replayBackendFixture(parseBackendFixture(source), { source, ...(consumers !== undefined ? { consumers } : {}) });
}

const ATTACHED = [
  { op: 'ioasAlloc', out: 'ioas' },
  { op: 'deviceBind', device: 'mock0', out: 'dev' },
  { op: 'deviceAttach', device: 'dev', pt: 'ioas', out: 'hwpt' },
  { op: 'ioasMap', ioas: 'ioas', gpa: 0x200000, length: 0x2000, iova: '0x1000000' },
];

afterEach(() => {
  vi.restoreAllMocks();
});

describe('backend fixture runner', () => {
  it('translates in a consumer worker per context, never through the owner thread', async () => {
    const ownerTranslate = vi.spyOn(Context.prototype, 'translate');
    let started = 0;
    const counting: ConsumerFactory = (start) => {
      started++;
      return startBackendTranslateWorker(start);
    };
    const result = await replay(
      doc([
        ...ATTACHED,
        { op: 'translate', device: 'dev', iova: '0x1000ffc', length: 8, access: 'write', expectGpa: '0x200ffc' },
        { op: 'translate', device: 'dev', iova: '0x1001ff0', length: 32, access: 'read', expectFault: 'MAPPING' },
        { op: 'ioasUnmap', ioas: 'ioas', iova: '0x1000000', length: 0x2000 },
        { op: 'translate', device: 'dev', iova: '0x1000000', length: 4, access: 'read', expectFault: 'MAPPING', note: 'strict unmap: gone' },
        { op: 'open', name: 'fd' },
        { op: 'translate', context: 'fd', device: 1, iova: 0, length: 4, expect: 'ENOENT', note: 'no device 1 in this context' },
      ]),
      counting,
    );
    expect(result.steps.filter((s) => !s.ok)).toEqual([]);
    expect(started).toBe(1);
    expect(ownerTranslate).not.toHaveBeenCalled();
  });

  it('fails a step whose expected failure changed the backend, naming what changed', async () => {
    const realMap = Context.prototype.ioasMap;
    vi.spyOn(Context.prototype, 'ioasMap').mockImplementation(function (this: Context, ioas, args) {
      realMap.call(this, ioas, args);
      throw new IommufdError('EINVAL', 'a broken backend: mapped, then failed');
    });
    const result = await replay(doc([{ op: 'ioasAlloc', out: 'ioas' }, { op: 'ioasMap', ioas: 'ioas', gpa: 0, length: 4096, iova: 4096, expect: 'EINVAL' }]));
    const step = result.steps[1]!;
    expect(step.ok).toBe(false);
    expect(step.actual).toMatch(/^EINVAL, but the backend state changed at \$\.stats\.pinnedPages|^EINVAL, but the backend state changed at \$\.pins/);
    expect(result.failed).toBe(1);
  });

  it('reports wrong outcomes and wrong details', async () => {
    const result = await replay(
      doc([
        ...ATTACHED,
        { op: 'destroy', id: 'ioas', expect: 'ENOENT' },
        { op: 'ioasIovaRanges', ioas: 'ioas', expectRanges: [[0, '0xffffffffffffffff']] },
        { op: 'getHwInfo', device: 'dev', expect: { maxPasidLog2: 3 } },
        { op: 'stats', expect: { pinnedPages: 2 } },
        { op: 'getDirtyBitmap', hwpt: 'hwpt', iova: 0, length: 4096, pageSize: 4096, expectDirty: [] },
      ]),
    );
    const [destroy, ranges, info, stats, invalidate] = result.steps.slice(4);
    expect(destroy).toMatchObject({ ok: false, expect: ['ENOENT'], actual: 'EBUSY' });
    expect(ranges).toMatchObject({ ok: false, actual: { ranges: [['0x1000000', '0x7fffffff']] } });
    expect(info).toMatchObject({ ok: false, actual: { info: { maxPasidLog2: 0, capabilities: ['DIRTY_TRACKING'] } } });
    expect(stats).toMatchObject({ ok: true });
    // A HWPT without dirty tracking refuses the read (kernel: EOPNOTSUPP), and the step says so.
    expect(invalidate).toMatchObject({ skipped: false, ok: false, actual: 'EOPNOTSUPP' });
    expect([result.passed, result.failed, result.skipped]).toEqual([5, 4, 0]);
  });

  it('a name whose binding step failed makes its later uses fail with a message, not the run', async () => {
    const result = await replay(doc([{ op: 'deviceBind', device: 'mock0', out: 'dev', expect: 'EBUSY' }, { op: 'deviceUnbind', device: 'dev' }, { op: 'stats' }]));
    expect(result.steps[0]).toMatchObject({ ok: false, actual: 'ok' });
    expect(result.steps[1]).toMatchObject({ ok: true });
    const broken = await replay(doc([{ op: 'ioasAlloc', out: 'ioas', context: 'default' }, { op: 'open', name: 'fd' }, { op: 'close', context: 'fd' }, { op: 'ioasAlloc', context: 'fd', out: 'x', expect: 'EBADF' }, { op: 'destroy', id: 'x' }]));
    expect(broken.steps[3]).toMatchObject({ ok: true, actual: 'EBADF' });
    expect(broken.steps[4]).toMatchObject({ ok: false });
    expect(String(broken.steps[4]!.actual)).toMatch(/^error: "x" is not bound/);
  });

  it('a consumer that dies fails its translate steps, and the run still ends', async () => {
    const dying: ConsumerFactory = () => ({
      translate: () => Promise.reject(new Error('translate worker exited with code 1')),
      close: () => Promise.resolve(),
    });
    const result = await replay(doc([...ATTACHED, { op: 'translate', device: 'dev', iova: '0x1000000', length: 4, expectGpa: '0x200000' }, { op: 'stats' }]), dying);
    expect(result.steps[4]).toMatchObject({ ok: false, actual: 'error: translate worker exited with code 1' });
    expect(result.steps[5]).toMatchObject({ ok: true });
  });

  it('--record rewrites every expectation so that the recorded fixture passes', async () => {
    const source = doc([
      ...ATTACHED,
      { op: 'ioasMap', ioas: 'ioas', gpa: 0x200000, length: 0x1000, out: 'auto', expectIovaWithin: [0, 0xfff], expectIovaAlignment: 4096 },
      { op: 'ioasUnmap', ioas: 'ioas', iova: 'auto', length: 4096, expectLength: 1 },
      { op: 'ioasIovaRanges', ioas: 'ioas', maxRanges: 0, expect: 'ok', expectRanges: [[1, 2]], expectNumIovas: 5 },
      { op: 'option', option: 'HUGE_PAGES', object: 'ioas', expectValue: 0 },
      { op: 'translate', device: 'dev', iova: '0x1000000', length: 0x2000, expectFault: 'DOMAIN' },
      { op: 'translate', device: 'dev', iova: '0x1002000', length: 4, expectGpa: 0 },
      { op: 'getHwInfo', device: 'dev', expect: { capabilities: [] } },
      { op: 'stats', expect: { pinnedPages: 9 } },
      { op: 'memRead', gpa: 0, length: 2, expectData: 'ffff' },
      { op: 'destroy', id: 'ioas' },
      { op: 'setDirtyTracking', hwpt: 'hwpt', enable: true },
    ]);
    const first = await replay(source);
    // The last step too: a HWPT allocated without DIRTY_TRACKING refuses it (EOPNOTSUPP).
    expect(first.failed).toBe(11);
    const recorded = first.recorded;
    const steps = recorded.steps as Record<string, unknown>[];
    expect(steps[4]).toMatchObject({ expectIovaAlignment: 4096, expectIova: '0x1002000' });
    expect(steps[4]!.expectIovaWithin).toBeUndefined();
    expect(steps[6]).toMatchObject({ expect: 'EMSGSIZE', expectNumIovas: 1, expectRanges: [] });
    expect(steps[8]).toMatchObject({ expectGpa: '0x200000' });
    expect(steps[8]!.expectFault).toBeUndefined();
    expect(steps[9]).toMatchObject({ expectFault: 'MAPPING' });
    expect(steps[13]).toMatchObject({ expect: 'EBUSY' });
    expect(steps[14]).toMatchObject({ expect: 'EOPNOTSUPP' });
    const again = await replay(JSON.parse(JSON.stringify(recorded)) as Record<string, unknown>);
    expect(again.steps.filter((s) => !s.ok)).toEqual([]);
    expect(again.skipped).toBe(0);
  });
});

describe('firstDifference', () => {
  it('finds the first differing path, comparing bigints by value', () => {
    expect(firstDifference({ a: [1n, { b: 2 }] }, { a: [1n, { b: 2 }] })).toBeUndefined();
    expect(firstDifference({ a: [1n, { b: 2 }] }, { a: [1n, { b: 3 }] })).toBe('$.a[1].b');
    expect(firstDifference({ a: [1] }, { a: [1, 2] })).toBe('$.a.length');
    expect(firstDifference({ a: 1 }, { a: 1, b: undefined })).toBeUndefined();
    expect(firstDifference({ a: 1n }, { a: 1 })).toBe('$.a');
  });
});

describe('backend fixes found by the fixtures', () => {
  function host(): IommufdHost {
    return new IommufdHost(GuestMemory.create(1 << 24), {
      devices: [
        { name: 'plain', group: 'a', pasidBits: 0 },
        { name: 'pasid', group: 'b', pasidBits: 20 },
      ],
    });
  }

  it('a PASID attach on a device without PASID support is EINVAL (iommu_attach_device_pasid), after the pt_id lookup', () => {
    const h = host();
    const ctx = h.open();
    const ioas = ctx.ioasAlloc();
    const plain = ctx.deviceBind('plain');
    const other = ctx.deviceBind('pasid');
    const pasidHwpt = ctx.hwptAlloc(other, ioas, { flags: HwptAllocFlag.PASID });
    const before = h.inspect();
    expect(() => ctx.deviceAttach(plain, pasidHwpt, 100)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    expect(() => ctx.deviceAttach(plain, 999, 100)).toThrow(expect.objectContaining({ code: 'ENOENT' }));
    expect(h.inspect()).toEqual(before);
    ctx.deviceAttach(other, pasidHwpt);
    expect(ctx.deviceAttach(other, pasidHwpt, 100)).toBe(pasidHwpt);
  });

  it('HUGE_PAGES = 0 on an IOAS where it is already 0 succeeds, even with a domain mapping areas (iopt_disable_large_pages)', () => {
    const h = host();
    const ctx = h.open();
    const ioas = ctx.ioasAlloc();
    const set = (value: bigint) => ctx.option({ option: IommuOption.HUGE_PAGES, op: IommuOptionOp.SET, objectId: ioas, value });
    set(0n);
    ctx.deviceAttach(ctx.deviceBind('plain'), ioas);
    ctx.ioasMap(ioas, { gpa: 0x200000, length: 0x1000n, iova: 0x1000n, flags: IoasMapFlag.READABLE | IoasMapFlag.FIXED_IOVA });
    expect(set(0n)).toBe(0n);
    set(1n);
    expect(() => set(0n)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
  });
});
