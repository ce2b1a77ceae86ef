import { readFileSync, readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { parseGuestFixture } from '../src/replay/guest-fixture.js';
import { FixtureError } from '../src/replay/values.js';
import { fuzzParams } from './support/fuzz.js';

const minimal = { format: 'viommu-guest-fixture/1', name: 't', endpoints: [8], steps: [] as unknown[] };

describe('guest fixture parser', () => {
  it('reads every step kind with defaults and 64-bit hex numbers', () => {
    const f = parseGuestFixture({
      ...minimal,
      steps: [
        { op: 'attach', domain: 1, endpoint: 8 },
        { op: 'map', domain: 1, virtStart: '0xfffffffffffff000', virtEnd: '0xffffffffffffffff', physStart: 0, flags: ['READ'], expect: ['OK', 'RANGE'] },
        { op: 'raw', request: '03 00 00 00', writable: 4, expect: 'NONE' },
        { op: 'batch', steps: [{ op: 'detach', domain: 1, endpoint: 8, expect: 'INVAL' }] },
        { op: 'config', set: { bypass: 0 }, expect: { inputRange: [0, '0xffffffffffffffff'] } },
        { op: 'dma', endpoint: 8, address: '0x1000', length: 4, access: 'write', expect: 'fault' },
        { op: 'expectFault', none: true },
        { op: 'reset', note: 'why' },
      ],
    });
    expect(f.device).toEqual({ driverFeatures: expect.arrayContaining(['MAP_UNMAP', 'BYPASS_CONFIG']), bootBypass: true, attachTable: false, pasidBits: 0 });
    expect(f.memorySize).toBe(256 * 1024 * 1024);
    expect(f.steps[0]).toMatchObject({ op: 'attach', flags: [], expect: ['OK'] });
    expect(f.steps[1]).toMatchObject({ virtEnd: 0xffffffffffffffffn, expect: ['OK', 'RANGE'] });
    expect(f.steps[2]).toMatchObject({ op: 'raw', request: Uint8Array.from([3, 0, 0, 0]), expect: ['NONE'] });
    expect(f.steps[7]).toMatchObject({ op: 'reset', note: 'why' });
  });

  it('accepts the shipped fixtures', () => {
    const dir = new URL('../guest-fixtures/', import.meta.url);
    const files = readdirSync(dir).filter((f) => f.endsWith('.json'));
    for (const file of files) {
      const doc = JSON.parse(readFileSync(new URL(file, dir), 'utf8')) as { format?: string };
      if (doc.format === 'viommu-guest-fixture/1') expect(() => parseGuestFixture(doc), file).not.toThrow();
    }
  });

  it.each([
    [{ ...minimal, format: 'other' }, '$.format'],
    [{ ...minimal, endpoints: [8, 8] }, '$.endpoints'],
    [{ ...minimal, steps: [{ op: 'fly' }] }, '$.steps[0].op'],
    [{ ...minimal, steps: [{ op: 'attach', domain: -1, endpoint: 8 }] }, '$.steps[0].domain'],
    [{ ...minimal, steps: [{ op: 'attach', domain: '0x100000000', endpoint: 8 }] }, '$.steps[0].domain'],
    [{ ...minimal, steps: [{ op: 'map', domain: 1, virtStart: 2 ** 53, virtEnd: 0, physStart: 0 }] }, '$.steps[0].virtStart'],
    [{ ...minimal, steps: [{ op: 'map', domain: 1, virtStart: '0x1g', virtEnd: 0, physStart: 0 }] }, '$.steps[0].virtStart'],
    [{ ...minimal, steps: [{ op: 'raw', request: 'abc', writable: 4 }] }, '$.steps[0].request'],
    [{ ...minimal, steps: [{ op: 'config', set: { probeSize: 4 } }] }, '$.steps[0].set.probeSize'],
    [{ ...minimal, steps: [{ op: 'batch', steps: [{ op: 'reset' }] }] }, '$.steps[0].steps[0].op'],
    [{ ...minimal, memory: { size: 4097 } }, '$.memory.size'],
  ])('rejects %j at %s', (doc, path) => {
    expect(() => parseGuestFixture(doc)).toThrow(FixtureError);
    try {
      parseGuestFixture(doc);
    } catch (err) {
      expect((err as FixtureError).path).toBe(path);
    }
  });

  it('throws only FixtureError on arbitrary JSON (property)', () => {
    const step = fc.record(
      {
        op: fc.constantFrom('attach', 'detach', 'map', 'unmap', 'probe', 'raw', 'batch', 'config', 'features', 'dma', 'expectFault', 'reset', 'x'),
        domain: fc.oneof(fc.integer(), fc.string(), fc.constant('0xffffffff')),
        endpoint: fc.oneof(fc.nat(), fc.double()),
        virtStart: fc.oneof(fc.nat(), fc.string()),
        virtEnd: fc.oneof(fc.nat(), fc.bigInt({ min: 0n, max: 1n << 70n }).map((v) => `0x${v.toString(16)}`)),
        physStart: fc.jsonValue(),
        expect: fc.oneof(fc.constantFrom('OK', 'NOENT', 'NONE', 'ok'), fc.array(fc.string())),
        steps: fc.array(fc.jsonValue(), { maxLength: 3 }),
        request: fc.string(),
        writable: fc.jsonValue(),
        set: fc.jsonValue(),
        flags: fc.jsonValue(),
      },
      { requiredKeys: ['op'] },
    );
    fc.assert(
      fc.property(fc.oneof(fc.jsonValue(), fc.record({ format: fc.constant('viommu-guest-fixture/1'), name: fc.string(), endpoints: fc.array(fc.nat(300)), steps: fc.array(step, { maxLength: 6 }) })), (doc) => {
        try {
          parseGuestFixture(doc);
        } catch (err) {
          expect(err).toBeInstanceOf(FixtureError);
        }
      }),
      fuzzParams(42, 1000),
    );
  });
});
