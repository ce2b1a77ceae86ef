import { readFileSync, readdirSync } from 'node:fs';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BACKEND_FIXTURE_FORMAT, parseBackendFixture } from '../src/replay/backend-fixture.js';
import { FixtureError } from '../src/replay/values.js';
import { fuzzParams } from './support/fuzz.js';

const dir = new URL('../guest-fixtures/backend/', import.meta.url);
const shipped = readdirSync(dir)
  .filter((f) => f.endsWith('.json'))
  .sort()
  .map((f) => JSON.parse(readFileSync(new URL(f, dir), 'utf8')) as Record<string, unknown>);

const minimal = { format: BACKEND_FIXTURE_FORMAT, name: 't', devices: [{ name: 'd0' }], steps: [] as unknown[] };

function pathOf(doc: unknown): string {
  try {
    parseBackendFixture(doc);
  } catch (err) {
    if (err instanceof FixtureError) return err.path;
    throw err;
  }
  throw new Error('parsed without error');
}

describe('backend fixture parser', () => {
  it('reads steps with their defaults, names, offsets and 64-bit hex numbers', () => {
    const f = parseBackendFixture({
      ...minimal,
      memlockPages: 16,
      devices: [{ name: 'd0', group: 7, reservedRegions: [[0, '0xffffff']], pasidBits: 20, dirtyTracking: false }, { name: 'd1' }],
      steps: [
        { op: 'ioasAlloc', out: 'ioas' },
        { op: 'ioasMap', ioas: 'ioas', gpa: 4096, length: '0x2000', out: 'buf' },
        { op: 'ioasMap', ioas: 'ioas', gpa: 0, length: 4096, iova: '0xfffffffffffff000', flags: ['READABLE'], expect: ['ok', 'EEXIST'] },
        { op: 'ioasUnmap', ioas: 'ioas', iova: 'buf+0x1000', length: 4096 },
        { op: 'deviceBind', device: 'd0', out: 'dev' },
        { op: 'deviceAttach', device: 'd1', pt: 'ioas', pasid: 3 },
        { op: 'hwptAlloc', device: 'dev', pt: 'ioas', flags: 8 },
        { op: 'translate', device: 'dev', iova: 'buf', length: 8 },
        { op: 'getHwInfo', device: 'dev', expect: { maxPasidLog2: 20, capabilities: [] } },
        { op: 'stats', expect: { pinnedPages: 2 } },
        { op: 'open', name: 'fd' },
        { op: 'close', context: 'fd', note: 'why' },
      ],
    });
    expect(f.memorySize).toBe(256 * 1024 * 1024);
    expect(f.memlockPages).toBe(16);
    expect(f.devices).toEqual([
      { name: 'd0', group: 'group:7', reservedRegions: [[0n, 0xffffffn]], pasidBits: 20, dirtyTracking: false },
      { name: 'd1', group: 'own:d1', reservedRegions: [], pasidBits: 0, dirtyTracking: true },
    ]);
    expect(f.steps[1]).toMatchObject({ op: 'ioasMap', flags: 0b110, length: 0x2000n, expect: ['ok'], context: 'default' });
    expect(f.steps[2]).toMatchObject({ flags: 0b100, iova: 0xfffffffffffff000n, expect: ['ok', 'EEXIST'] });
    expect(f.steps[3]).toMatchObject({ iova: { name: 'buf', offset: 0x1000n } });
    expect(f.steps[5]).toMatchObject({ device: 'd1', pasid: 3 });
    expect(f.steps[6]).toMatchObject({ flags: 8 });
    expect(f.steps[7]).toMatchObject({ access: 'read', length: 8 });
    expect(f.steps[8]).toMatchObject({ expect: ['ok'], expectInfo: { maxPasidLog2: 20, capabilities: [] } });
    expect(f.steps[9]).toMatchObject({ expectStats: { pinnedPages: 2 } });
    expect(f.steps[11]).toMatchObject({ op: 'close', context: 'fd', note: 'why' });
  });

  it('a map with an IOVA and no flags is a fixed, readable and writeable map', () => {
    const f = parseBackendFixture({ ...minimal, steps: [{ op: 'ioasAlloc', out: 'a' }, { op: 'ioasMap', ioas: 'a', gpa: 0, length: 4096, iova: 4096 }] });
    expect(f.steps[1]).toMatchObject({ flags: 0b111 });
  });

  it('keeps unknown step keys as warnings rather than errors', () => {
    const f = parseBackendFixture({ ...minimal, steps: [{ op: 'ioasAlloc', colour: 'blue' }] });
    expect(f.steps[0]!.unknownKeys).toEqual(['colour']);
  });

  it('accepts every shipped fixture', () => {
    expect(shipped.length).toBeGreaterThanOrEqual(40);
    for (const doc of shipped) expect(() => parseBackendFixture(doc), String(doc.name)).not.toThrow();
  });

  it.each([
    [{ ...minimal, format: 'viommu-guest-fixture/1' }, '$.format'],
    [{ ...minimal, memory: { size: 4097 } }, '$.memory.size'],
    [{ ...minimal, devices: [{ name: 'd0' }, { name: 'd0' }] }, '$.devices[1].name'],
    [{ ...minimal, devices: [{ name: 'd0', pasidBits: 21 }] }, '$.devices[0].pasidBits'],
    [{ ...minimal, devices: [{ name: 'd0', reservedRegions: [[5, 4]] }] }, '$.devices[0].reservedRegions[0]'],
    [{ ...minimal, devices: [{ name: 'd0', colour: 1 }] }, '$.devices[0].colour'],
    [{ ...minimal, steps: [{ op: 'fly' }] }, '$.steps[0].op'],
    [{ ...minimal, steps: [{ op: 'ioasAlloc', context: 'nowhere' }] }, '$.steps[0].context'],
    [{ ...minimal, steps: [{ op: 'destroy', id: 'ioas' }] }, '$.steps[0].id'],
    [{ ...minimal, steps: [{ op: 'destroy', id: 'ioas+4' }] }, '$.steps[0].id'],
    [{ ...minimal, steps: [{ op: 'destroy', id: '0x1g' }] }, '$.steps[0].id'],
    [{ ...minimal, steps: [{ op: 'destroy', id: 2 ** 53 }] }, '$.steps[0].id'],
    [{ ...minimal, steps: [{ op: 'destroy', id: 1, expect: 'ENOPE' }] }, '$.steps[0].expect'],
    [{ ...minimal, steps: [{ op: 'destroy', id: 1, expect: [] }] }, '$.steps[0].expect'],
    [{ ...minimal, steps: [{ op: 'ioasAlloc', out: '0x10' }] }, '$.steps[0].out'],
    [{ ...minimal, steps: [{ op: 'ioasAlloc', out: 'a' }, { op: 'ioasMap', ioas: 'a', gpa: 0, length: 1, flags: ['EXEC'] }] }, '$.steps[1].flags[0]'],
    [{ ...minimal, steps: [{ op: 'ioasAlloc', out: 'a' }, { op: 'ioasMap', ioas: 'a', gpa: 0, length: 1, expectIovaAlignment: 3 }] }, '$.steps[1].expectIovaAlignment'],
    [{ ...minimal, steps: [{ op: 'deviceBind', device: 'd9' }] }, '$.steps[0].device'],
    [{ ...minimal, steps: [{ op: 'deviceAttach', device: 'd0', pt: 1, pasid: 1 << 20 }] }, '$.steps[0].pasid'],
    [{ ...minimal, steps: [{ op: 'option', option: 'RLIMIT_MODE', set: 1, expectValue: 1 }] }, '$.steps[0]'],
    [{ ...minimal, steps: [{ op: 'hwptAlloc', device: 'd0', pt: 1, data: { type: 'ARM', root: 0 } }] }, '$.steps[0].data.type'],
    [{ ...minimal, steps: [{ op: 'accessRw', access: 1, iova: 0 }] }, '$.steps[0]'],
    [{ ...minimal, steps: [{ op: 'accessRw', access: 1, iova: 0, readLength: 2, expectRead: 'aa' }] }, '$.steps[0].expectRead'],
    [{ ...minimal, steps: [{ op: 'translate', device: 'd0', iova: 0, length: 0 }] }, '$.steps[0].length'],
    [{ ...minimal, steps: [{ op: 'translate', device: 'd0', iova: 0, length: 4, expectGpa: 0, expectFault: true }] }, '$.steps[0]'],
    [{ ...minimal, steps: [{ op: 'translate', device: 'd0', iova: 0, length: 4, expectFault: 'LATE' }] }, '$.steps[0].expectFault'],
    [{ ...minimal, memory: { size: 1 << 20 }, steps: [{ op: 'memRead', gpa: (1 << 20) - 2, length: 4 }] }, '$.steps[0].length'],
    [{ ...minimal, steps: [{ op: 'memWrite', gpa: 0, data: 'abc' }] }, '$.steps[0].data'],
    [{ ...minimal, steps: [{ op: 'stats', expect: { pinned: 1 } }] }, '$.steps[0].expect.pinned'],
    [{ ...minimal, steps: [{ op: 'getHwInfo', device: 'd0', expect: { capabilities: ['FAST'] } }] }, '$.steps[0].expect.capabilities[0]'],
    [{ ...minimal, steps: [{ op: 'open', name: 'default' }] }, '$.steps[0].name'],
  ])('rejects %j at %s', (doc, path) => {
    expect(pathOf(doc)).toBe(path);
  });

  it('a closed context may be named again by a later open, and used (EBADF) after close', () => {
    expect(() =>
      parseBackendFixture({ ...minimal, steps: [{ op: 'open', name: 'fd' }, { op: 'close', context: 'fd' }, { op: 'ioasAlloc', context: 'fd' }, { op: 'open', name: 'fd' }] }),
    ).not.toThrow();
  });

  it('limits how many contexts a fixture opens (each reserves a table pool)', () => {
    const cycle = (n: number) => Array.from({ length: n }, () => [{ op: 'open', name: 'fd' }, { op: 'close', context: 'fd' }]).flat();
    expect(() => parseBackendFixture({ ...minimal, steps: cycle(256) })).not.toThrow();
    expect(pathOf({ ...minimal, steps: cycle(257) })).toBe('$.steps[512]');
  });

  it('throws only FixtureError on arbitrary and mutated documents (property)', () => {
    const anyValue = fc.oneof(
      fc.jsonValue(),
      fc.bigInt({ min: 0n, max: 1n << 70n }).map((v) => `0x${v.toString(16)}`),
      fc.constantFrom('ioas', 'dev', 'd0', 'a+0x10', 'ok', 'EINVAL', -1, 2 ** 60, 1.5, null, true, [], {}),
    );
    const keys = [
      'op', 'context', 'expect', 'out', 'ioas', 'gpa', 'length', 'iova', 'flags', 'device', 'pt', 'pasid', 'data', 'id', 'access',
      'write', 'readLength', 'expectRead', 'expectGpa', 'expectSpans', 'expectFault', 'set', 'expectValue', 'object', 'option',
      'ranges', 'name', 'entries', 'hwpt', 'enable', 'maxRanges', 'expectRanges', 'expectIovaWithin', 'srcIoas', 'dstIoas',
    ];
    const ops = fc.constantFrom(
      'open', 'close', 'ioasAlloc', 'ioasMap', 'ioasUnmap', 'ioasCopy', 'ioasIovaRanges', 'ioasAllowIovas', 'option', 'deviceBind',
      'deviceUnbind', 'deviceAttach', 'deviceDetach', 'hwptAlloc', 'hwptInvalidate', 'setDirtyTracking', 'getDirtyBitmap',
      'getHwInfo', 'destroy', 'accessCreate', 'accessDestroy', 'accessRw', 'accessPin', 'accessUnpin', 'translate', 'memWrite',
      'memRead', 'stats', 'x', '__proto__',
    );
    const step = fc.record({ op: ops, fields: fc.dictionary(fc.constantFrom(...keys), anyValue, { maxKeys: 6 }) }).map(({ op, fields }) => ({ ...fields, op }));
    const randomDoc = fc.record({
      format: fc.constantFrom(BACKEND_FIXTURE_FORMAT, 'other'),
      name: fc.oneof(fc.string(), fc.nat()),
      memory: fc.oneof(fc.constant(undefined), fc.record({ size: anyValue })),
      devices: fc.array(fc.record({ name: fc.constantFrom('d0', 'd1', ''), group: anyValue, pasidBits: anyValue }, { requiredKeys: ['name'] }), { maxLength: 3 }),
      steps: fc.array(fc.oneof(step, anyValue), { maxLength: 8 }),
    });
    // Shipped fixtures with one value somewhere replaced: close to valid, so deep paths get exercised.
    const mutated = fc
      .record({ doc: fc.constantFrom(...shipped), where: fc.nat(), key: fc.constantFrom(...keys), value: anyValue })
      .map(({ doc, where, key, value }) => {
        const copy = structuredClone(doc) as { steps: Record<string, unknown>[] };
        const target = copy.steps[where % copy.steps.length]!;
        target[key] = value;
        return copy;
      });
    fc.assert(
      fc.property(fc.oneof(fc.jsonValue(), randomDoc, mutated), (doc) => {
        try {
          parseBackendFixture(doc);
        } catch (err) {
          if (!(err instanceof FixtureError)) throw err;
        }
      }),
      fuzzParams(4242, 1500),
    );
  });
});
