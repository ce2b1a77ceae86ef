import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  BigIntValue,
  ContainerValue,
  crc32c,
  decodeImage,
  encodeImage,
  F64Value,
  FormatVersion,
  IMAGE_MAGIC,
  ImageHeader,
  ImageLimits,
  IntValue,
  LengthValue,
  MIGRATION_IMAGE_ERROR_CODES,
  MigrationImageError,
  ObjectKey,
  SectionHeader,
  sectionMap,
  TagValue,
  ValueTag,
  type ImageSection,
  type MigrationImageErrorCode,
  type PlainValue,
} from '../src/migration/image.js';
import { fuzzParams } from './support/fuzz.js';

const root = fileURLToPath(new URL('..', import.meta.url));

// ---------------------------------------------------------------------------------------------
// Test-side helpers, written against the layout tables but not the encoder.

function u16(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff];
}
function u32(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
}
const utf8 = (s: string): number[] => [...new TextEncoder().encode(s)];

/** Raw encodings of values, for payloads the encoder would never write. */
const raw = {
  null: [ValueTag.NULL],
  int: (v: number) => [ValueTag.INT, ...u32(v >>> 0)],
  f64: (v: number) => {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setFloat64(0, v, true);
    return [ValueTag.F64, ...b];
  },
  string: (bytes: number[]) => [ValueTag.STRING, ...u32(bytes.length), ...bytes],
  bytes: (bytes: number[]) => [ValueTag.BYTES, ...u32(bytes.length), ...bytes],
  bigint: (sign: number, magnitude: number[]) => [ValueTag.BIGINT, sign, ...u32(magnitude.length), ...magnitude],
  array: (...items: number[][]) => [ValueTag.ARRAY, ...u32(items.length), ...items.flat()],
  object: (...entries: [string, number[]][]) => [
    ValueTag.OBJECT,
    ...u32(entries.length),
    ...entries.flatMap(([k, v]) => [...u32(utf8(k).length), ...utf8(k), ...v]),
  ],
};

interface RawSection {
  name: number[] | string;
  version?: number;
  payload: number[] | Uint8Array;
}

interface RawHeader {
  major?: number;
  minor?: number;
  headerSize?: number;
  flags?: number;
  sectionCount?: number;
  reserved?: number;
  /** Bytes between the known header fields and the first section (a newer minor's additions). */
  extra?: number[];
}

/** An image with the given raw parts and correct lengths and checksums everywhere. */
function buildImage(sections: RawSection[], h: RawHeader = {}): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const s of sections) {
    const name = typeof s.name === 'string' ? utf8(s.name) : s.name;
    const payload = Uint8Array.from(s.payload);
    parts.push(Uint8Array.from([...u16(name.length), ...u16(s.version ?? 1), ...u32(payload.length), ...u32(crc32c(payload)), ...name]), payload);
  }
  const extra = h.extra ?? [];
  const bodyLength = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(ImageHeader.SIZE + extra.length + bodyLength);
  const view = new DataView(out.buffer);
  out.set(IMAGE_MAGIC, ImageHeader.magic.offset);
  view.setUint16(ImageHeader.versionMajor.offset, h.major ?? FormatVersion.MAJOR, true);
  view.setUint16(ImageHeader.versionMinor.offset, h.minor ?? FormatVersion.MINOR, true);
  view.setUint32(ImageHeader.headerSize.offset, h.headerSize ?? ImageHeader.SIZE + extra.length, true);
  view.setUint32(ImageHeader.flags.offset, h.flags ?? 0, true);
  view.setUint32(ImageHeader.sectionCount.offset, h.sectionCount ?? sections.length, true);
  view.setUint32(ImageHeader.reserved.offset, h.reserved ?? 0, true);
  out.set(extra, ImageHeader.SIZE);
  let at = ImageHeader.SIZE + extra.length;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return patchChecksums(out);
}

/**
 * Makes a damaged image self-consistent again where it can: totalLength becomes the real length,
 * every payload that lies inside the image gets its right checksum, then the image checksum. The
 * structural decoder then meets the damage instead of the checksums. Works in place.
 */
function patchChecksums(bytes: Uint8Array): Uint8Array {
  if (bytes.length < ImageHeader.SIZE) return bytes;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  view.setBigUint64(ImageHeader.totalLength.offset, BigInt(bytes.length), true);
  const count = view.getUint32(ImageHeader.sectionCount.offset, true);
  let pos = view.getUint32(ImageHeader.headerSize.offset, true);
  for (let i = 0; i < count && pos + SectionHeader.SIZE <= bytes.length; i++) {
    const payloadAt = pos + SectionHeader.SIZE + view.getUint16(pos + SectionHeader.nameLength.offset, true);
    const payloadEnd = payloadAt + view.getUint32(pos + SectionHeader.payloadLength.offset, true);
    if (payloadEnd > bytes.length) break;
    view.setUint32(pos + SectionHeader.payloadChecksum.offset, crc32c(bytes, payloadAt, payloadEnd), true);
    pos = payloadEnd;
  }
  const c = ImageHeader.checksum;
  view.setUint32(c.offset, crc32c(bytes, c.offset + c.size, bytes.length, crc32c(bytes, 0, c.offset)), true);
  return bytes;
}

/** The payload bytes of an encoded single-section image. */
function payloadOf(image: Uint8Array): Uint8Array {
  const view = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const at = ImageHeader.SIZE;
  const start = at + SectionHeader.SIZE + view.getUint16(at + SectionHeader.nameLength.offset, true);
  return image.slice(start, start + view.getUint32(at + SectionHeader.payloadLength.offset, true));
}

function decodeError(bytes: Uint8Array): MigrationImageError {
  try {
    decodeImage(bytes);
  } catch (e) {
    if (e instanceof MigrationImageError) return e;
    throw new Error(`decodeImage threw something other than a MigrationImageError: ${String(e)}`, { cause: e });
  }
  throw new Error('decodeImage accepted the image');
}

function encodeError(sections: readonly ImageSection[]): MigrationImageError {
  try {
    encodeImage(sections);
  } catch (e) {
    if (e instanceof MigrationImageError) return e;
    throw new Error(`encodeImage threw something other than a MigrationImageError: ${String(e)}`, { cause: e });
  }
  throw new Error('encodeImage accepted the sections');
}

/** Decodes one raw payload inside an otherwise valid image. */
function decodePayload(payload: number[] | Uint8Array): PlainValue {
  return decodeImage(buildImage([{ name: 'p', payload }]))[0]!.payload;
}
function payloadError(payload: number[]): MigrationImageError {
  return decodeError(buildImage([{ name: 'p', payload }]));
}
/** Image offset of the first payload byte in a buildImage([{ name: 'p', … }]) image. */
const P = ImageHeader.SIZE + SectionHeader.SIZE + 1;

/** Either a MigrationImageError, or an image that decodes and, in our own minor, re-encodes to itself. */
function checkDecodesCanonicallyOrRefuses(bytes: Uint8Array): 'ok' | MigrationImageErrorCode {
  let sections: ImageSection[];
  try {
    sections = decodeImage(bytes);
  } catch (e) {
    if (!(e instanceof MigrationImageError)) throw e;
    expect(MIGRATION_IMAGE_ERROR_CODES).toContain(e.code);
    expect(e.offset).toBeGreaterThanOrEqual(0);
    expect(e.offset).toBeLessThanOrEqual(bytes.length);
    return e.code;
  }
  const minor = new DataView(bytes.buffer, bytes.byteOffset).getUint16(ImageHeader.versionMinor.offset, true);
  if (minor === FormatVersion.MINOR) expect(encodeImage(sections)).toEqual(bytes);
  return 'ok';
}

/**
 * Deep equality that is stricter than toEqual where it matters here: Object.is for numbers
 * (-0, NaN), exact Uint8Array class and contents, key order, plain prototypes on decoded objects.
 */
function expectSame(actual: unknown, expected: unknown, path = '$'): void {
  if (typeof expected === 'number') {
    if (!Object.is(actual, expected)) throw new Error(`${path}: ${String(actual)} is not ${String(expected)}`);
    return;
  }
  if (expected instanceof Uint8Array) {
    expect(Object.getPrototypeOf(actual), path).toBe(Uint8Array.prototype);
    expect([...(actual as Uint8Array)], path).toEqual([...expected]);
    return;
  }
  if (Array.isArray(expected)) {
    expect(Array.isArray(actual), path).toBe(true);
    const a = actual as unknown[];
    expect(a.length, path).toBe(expected.length);
    expected.forEach((e, i) => expectSame(a[i], e, `${path}[${i}]`));
    return;
  }
  if (typeof expected === 'object' && expected !== null) {
    expect(Object.getPrototypeOf(actual), path).toBe(Object.prototype);
    const keys = Object.keys(expected);
    expect(Object.keys(actual as object), path).toEqual(keys);
    for (const k of keys) expectSame((actual as Record<string, unknown>)[k], (expected as Record<string, unknown>)[k], `${path}.${k}`);
    return;
  }
  expect(actual, path).toBe(expected);
}

// ---------------------------------------------------------------------------------------------
// Arbitraries

const INT32_EDGES = [0, -0, 1, -1, 2 ** 31 - 1, -(2 ** 31), 2 ** 31, -(2 ** 31) - 1, 2 ** 32, 2 ** 53, -(2 ** 53)];
const numberArb = fc.oneof(
  fc.integer(),
  fc.double(),
  fc.constantFrom(...INT32_EDGES, NaN, Infinity, -Infinity, Number.MAX_VALUE, Number.MIN_VALUE, Number.EPSILON, 0.5),
);
const BIG = 1n << 4096n;
const bigintArb = fc.oneof(
  fc.bigInt(),
  fc.bigInt({ min: -BIG, max: BIG }),
  fc.constantFrom(0n, 1n, -1n, 255n, 256n, -255n, -256n, (1n << 63n) - 1n, -(1n << 63n), (1n << 64n) - 1n, -(1n << 64n), 1n << 64n),
);
const stringArb = fc.oneof(
  fc.string(),
  fc.string({ unit: 'binary' }),
  fc.string({ unit: 'grapheme' }),
  fc.constantFrom('', '\uFEFF', '\uFEFFx', '\0', 'é', '😀', '\u{10FFFF}', 'a\u0301'),
);
const keyArb = fc
  .oneof(stringArb, fc.constantFrom('0', '1', '10', '4294967294', '4294967295', '-1', '01', 'constructor', 'toString', 'hasOwnProperty', 'prototype'))
  .filter((k) => k !== '__proto__');

const { value: plainValueArb } = fc.letrec<{ value: PlainValue }>((tie) => ({
  value: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    fc.constant(null),
    fc.boolean(),
    numberArb,
    bigintArb,
    stringArb,
    fc.uint8Array({ maxLength: 40 }),
    fc.array(tie('value'), { maxLength: 5 }),
    fc.dictionary(keyArb, tie('value'), { maxKeys: 5 }),
  ),
}));

const sectionsArb = fc.uniqueArray(
  fc.record({
    name: fc.string({ unit: 'binary', minLength: 1, maxLength: 20 }),
    version: fc.integer({ min: 0, max: 0xffff }),
    payload: plainValueArb,
  }),
  { selector: (s) => s.name, maxLength: 4 },
);

/** A small image with every kind of value, for the exhaustive damage tests. */
const SAMPLE: ImageSection[] = [
  {
    name: 'virtio-iommu',
    version: 3,
    payload: {
      features: 0x7fn,
      bypass: false,
      domains: [{ id: 1, maps: [[0x1000n, 0x2000n, 3]] }],
      ratio: -0.5,
      nothing: null,
    },
  },
  { name: 'backend', version: 1, payload: { mode: 'nested', negative: -(1n << 70n), big: 2 ** 40, on: true } },
  { name: 'endpoint-0008', version: 0, payload: [Uint8Array.of(1, 2, 3), 'é😀', -7, -0, NaN, []] },
];
const sampleImage = encodeImage(SAMPLE);

// ---------------------------------------------------------------------------------------------

describe('crc32c', () => {
  it('gives the standard check value and continues across ranges', () => {
    const data = new TextEncoder().encode('123456789');
    expect(crc32c(data)).toBe(0xe3069283);
    expect(crc32c(data, 4, 9, crc32c(data, 0, 4))).toBe(0xe3069283);
    expect(crc32c(new Uint8Array(0))).toBe(0);
  });
});

describe('encode and decode', () => {
  it('round-trips arbitrary values exactly, deterministically', () => {
    fc.assert(
      fc.property(sectionsArb, (sections) => {
        const bytes = encodeImage(sections);
        expect(encodeImage(sections)).toEqual(bytes);
        const decoded = decodeImage(bytes);
        expect(decoded.map((s) => [s.name, s.version])).toEqual(sections.map((s) => [s.name, s.version]));
        decoded.forEach((s, i) => expectSame(s.payload, sections[i]!.payload));
        expect(encodeImage(decoded)).toEqual(bytes);
      }),
      fuzzParams(0x5eed, 300),
    );
  });

  it('round-trips the sample, an empty image and edge values', () => {
    expectSame(decodeImage(sampleImage), SAMPLE);
    expect(decodeImage(encodeImage([]))).toEqual([]);
    expect(encodeImage([]).length).toBe(ImageHeader.SIZE);
    const edges: PlainValue = [...INT32_EDGES, NaN, -(1n << 524280n), '', Uint8Array.of(), {}, [], '\uFEFF'];
    expectSame(decodePayload(payloadOf(encodeImage([{ name: 'e', version: 0, payload: edges }]))), edges);
  });

  it('keeps object key order, integer-like keys first as JavaScript lists them', () => {
    const value = { b: 1, '10': 2, a: 3, '2': 4, 'x y': 5 };
    const [decoded] = decodeImage(encodeImage([{ name: 'o', version: 0, payload: value }]));
    expect(Object.keys(decoded!.payload as object)).toEqual(['2', '10', 'b', 'a', 'x y']);
  });

  it('writes the canonical number forms', () => {
    expect(payloadOf(encodeImage([{ name: 'n', version: 0, payload: 7 }]))).toEqual(Uint8Array.from(raw.int(7)));
    expect(payloadOf(encodeImage([{ name: 'n', version: 0, payload: -0 }]))).toEqual(Uint8Array.from(raw.f64(-0)));
    expect(payloadOf(encodeImage([{ name: 'n', version: 0, payload: 2 ** 31 }]))).toEqual(Uint8Array.from(raw.f64(2 ** 31)));
    expect(payloadOf(encodeImage([{ name: 'n', version: 0, payload: NaN }]))).toEqual(Uint8Array.of(ValueTag.F64, 0, 0, 0, 0, 0, 0, 0xf8, 0x7f));
    expect(payloadOf(encodeImage([{ name: 'n', version: 0, payload: -256n }]))).toEqual(Uint8Array.from(raw.bigint(1, [0, 1])));
    expect(payloadOf(encodeImage([{ name: 'n', version: 0, payload: 0n }]))).toEqual(Uint8Array.from(raw.bigint(0, [])));
  });

  it('reads an image inside a larger buffer, and one in shared memory', () => {
    const outer = new Uint8Array(sampleImage.length + 16);
    outer.set(sampleImage, 7);
    expectSame(decodeImage(outer.subarray(7, 7 + sampleImage.length)), SAMPLE);
    const shared = new Uint8Array(new SharedArrayBuffer(sampleImage.length));
    shared.set(sampleImage);
    expectSame(decodeImage(shared), SAMPLE);
  });

  it('hands out byte strings that are copies, not views of the image', () => {
    const image = encodeImage([{ name: 'b', version: 0, payload: Uint8Array.of(9, 9) }]);
    const [section] = decodeImage(image);
    const bytes = section!.payload as Uint8Array;
    expect(bytes.buffer).not.toBe(image.buffer);
    expect(bytes.byteLength).toBe(bytes.buffer.byteLength);
  });

  it('sectionMap indexes by name and refuses duplicates', () => {
    const map = sectionMap(decodeImage(sampleImage));
    expect([...map.keys()]).toEqual(['virtio-iommu', 'backend', 'endpoint-0008']);
    expect(map.get('backend')?.version).toBe(1);
    const dup = () => sectionMap([{ name: 'a', version: 0, payload: null }, { name: 'a', version: 1, payload: null }]);
    expect(dup).toThrow(MigrationImageError);
    expect(dup).toThrow(/two sections are named 'a'/);
  });
});

describe('encodeImage refuses what an image cannot hold', () => {
  const one = (payload: unknown): ImageSection[] => [{ name: 's', version: 0, payload: payload as PlainValue }];
  const sparse: unknown[] = [];
  sparse[2] = 1;
  const cyclic: unknown[] = [];
  cyclic.push(cyclic);

  it.each([
    ['undefined', undefined],
    ['a function', () => 1],
    ['a symbol', Symbol('s')],
    ['a Date', new Date(0)],
    ['a Map', new Map()],
    ['a Float32Array', new Float32Array(1)],
    ['a sparse array', sparse],
    ['a lone surrogate', 'a\uD800'],
    ['a __proto__ key', JSON.parse('{"__proto__": 1}')],
    ['a lone surrogate key', { '\uDC00': 1 }],
    ['undefined in an object', { a: undefined }],
  ])('%s: MALFORMED', (_, payload) => {
    expect(encodeError(one(payload)).code).toBe('MALFORMED');
  });

  it('refuses bad section names and versions', () => {
    expect(encodeError([{ name: '', version: 0, payload: null }]).code).toBe('MALFORMED');
    expect(encodeError([{ name: 'x\uD800', version: 0, payload: null }]).code).toBe('MALFORMED');
    expect(encodeError([{ name: 'é'.repeat(128), version: 0, payload: null }]).code).toBe('LIMIT');
    expect(encodeImage([{ name: 'x'.repeat(255), version: 0xffff, payload: null }]).length).toBeGreaterThan(255);
    for (const version of [-1, 0x10000, 1.5, NaN]) expect(encodeError([{ name: 'v', version, payload: null }]).code).toBe('MALFORMED');
    const dup = encodeError([
      { name: 'a', version: 0, payload: null },
      { name: 'a', version: 0, payload: null },
    ]);
    expect(dup.code).toBe('MALFORMED');
    expect(dup.message).toMatch(/two sections are named 'a'/);
  });

  it('refuses depth beyond the limit, cycles included, and names where', () => {
    let deep: PlainValue = null;
    for (let i = 0; i < ImageLimits.MAX_DEPTH; i++) deep = [deep];
    expect(() => encodeImage(one(deep))).not.toThrow();
    const e = encodeError(one([deep]));
    expect(e.code).toBe('LIMIT');
    expect(encodeError(one({ a: cyclic })).code).toBe('LIMIT');
    expect(encodeError(one({ list: [1, { bad: undefined }] })).message).toContain(`section 's'.list[1].bad`);
  });

  it('refuses a bigint beyond the limit', () => {
    expect(() => encodeImage(one(1n << BigInt(ImageLimits.MAX_BIGINT_BYTES * 8 - 1)))).not.toThrow();
    expect(encodeError(one(1n << BigInt(ImageLimits.MAX_BIGINT_BYTES * 8))).code).toBe('LIMIT');
  });
});

describe('damage is detected', () => {
  it('every single-bit flip is refused, with the code for the field it hits', () => {
    const lengthField = ImageHeader.totalLength;
    for (let i = 0; i < sampleImage.length; i++) {
      for (let bit = 0; bit < 8; bit++) {
        const bytes = sampleImage.slice();
        bytes[i]! ^= 1 << bit;
        const e = decodeError(bytes);
        if (i < ImageHeader.magic.size) {
          expect(e.code).toBe('BAD_MAGIC');
          expect(e.offset).toBe(i);
        } else if (i < ImageHeader.versionMajor.offset + ImageHeader.versionMajor.size) {
          expect(e.code).toBe('UNSUPPORTED_VERSION');
        } else if (i >= lengthField.offset && i < lengthField.offset + lengthField.size) {
          expect(['TRUNCATED', 'TRAILING_BYTES']).toContain(e.code);
        } else {
          expect(e.code, `byte ${i} bit ${bit}`).toBe('CHECKSUM');
        }
      }
    }
  });

  it('every truncation is refused as TRUNCATED', () => {
    for (let n = 0; n < sampleImage.length; n++) {
      const e = decodeError(sampleImage.slice(0, n));
      expect(e.code, `prefix of ${n} bytes`).toBe('TRUNCATED');
    }
  });

  it('appended bytes are refused', () => {
    for (const tail of [[0], [0xff, 1, 2], [...sampleImage]]) {
      const e = decodeError(Uint8Array.from([...sampleImage, ...tail]));
      expect(e.code).toBe('TRAILING_BYTES');
      expect(e.offset).toBe(sampleImage.length);
    }
  });

  it('a damaged payload is caught by its own checksum too', () => {
    const bytes = sampleImage.slice();
    bytes[bytes.length - 1]! ^= 0x10;
    const c = ImageHeader.checksum;
    new DataView(bytes.buffer).setUint32(c.offset, crc32c(bytes, c.offset + c.size, bytes.length, crc32c(bytes, 0, c.offset)), true);
    const e = decodeError(bytes);
    expect(e.code).toBe('CHECKSUM');
    expect(e.message).toMatch(/section 'endpoint-0008' is corrupt/);
  });

  it('patchChecksums makes the sample self-consistent (so the fuzz below reaches the structure)', () => {
    const bytes = sampleImage.slice();
    new DataView(bytes.buffer).setUint32(ImageHeader.checksum.offset, 0);
    new DataView(bytes.buffer).setUint32(ImageHeader.SIZE + SectionHeader.payloadChecksum.offset, 0);
    expect(patchChecksums(bytes)).toEqual(sampleImage);
  });
});

describe('the header', () => {
  it('refuses other majors, accepts a newer minor and skips what it added', () => {
    const payload = raw.int(5);
    for (const major of [0, FormatVersion.MAJOR + 1, 0xffff]) {
      const e = decodeError(buildImage([{ name: 'p', payload }], { major }));
      expect(e.code).toBe('UNSUPPORTED_VERSION');
      expect(e.message).toContain(`format ${major}.`);
    }
    const newer = buildImage([{ name: 'p', payload }], { minor: FormatVersion.MINOR + 1, flags: 0x8000_0001, reserved: 9, extra: [1, 2, 3, 4] });
    expect(decodeImage(newer)).toEqual([{ name: 'p', version: 1, payload: 5 }]);
  });

  it('in its own minor, knows every header byte', () => {
    const s = [{ name: 'p', payload: raw.null }];
    expect(decodeError(buildImage(s, { flags: 1 })).code).toBe('MALFORMED');
    expect(decodeError(buildImage(s, { reserved: 1 })).code).toBe('MALFORMED');
    expect(decodeError(buildImage(s, { extra: [0] })).code).toBe('MALFORMED');
    expect(decodeError(buildImage(s, { headerSize: ImageHeader.SIZE - 1 })).code).toBe('MALFORMED');
    expect(decodeError(buildImage(s, { headerSize: 1 << 30, minor: 9 })).code).toBe('TRUNCATED');
  });

  it('refuses what is not an image at all', () => {
    expect(decodeError(new TextEncoder().encode('{"sections": []}')).code).toBe('BAD_MAGIC');
    expect(decodeError(new Uint8Array(100)).code).toBe('BAD_MAGIC');
    expect(decodeError('nope' as unknown as Uint8Array).code).toBe('MALFORMED');
    expect(decodeError(Uint8Array.from(IMAGE_MAGIC.slice(0, 3))).code).toBe('TRUNCATED');
  });
});

describe('structure', () => {
  it('refuses section-level damage', () => {
    expect(decodeError(buildImage([{ name: '', payload: raw.null }])).code).toBe('MALFORMED');
    expect(decodeError(buildImage([{ name: [0xc3], payload: raw.null }])).code).toBe('MALFORMED');
    const dup = decodeError(buildImage([{ name: 'a', payload: raw.null }, { name: 'a', payload: raw.null }]));
    expect(dup.code).toBe('MALFORMED');
    expect(dup.offset).toBe(P + raw.null.length);
    expect(decodeError(buildImage([{ name: 'a', payload: [] }])).code).toBe('TRUNCATED');
    expect(decodeError(buildImage([{ name: 'a', payload: raw.null }], { sectionCount: 2 })).code).toBe('TRUNCATED');
    const after = decodeError(buildImage([{ name: 'a', payload: raw.null }, { name: 'b', payload: raw.null }], { sectionCount: 1 }));
    expect(after.code).toBe('TRAILING_BYTES');
    expect(after.offset).toBe(P + 1);
  });

  it.each([
    ['tag 0', [0x00]],
    ['tag 0xff', [0xff]],
    ['an int32 stored as F64', raw.f64(1)],
    ['-1 stored as F64', raw.f64(-1)],
    ['a non-canonical NaN', [ValueTag.F64, 1, 0, 0, 0, 0, 0, 0xf8, 0x7f]],
    ['a negative NaN', [ValueTag.F64, 0, 0, 0, 0, 0, 0, 0xf8, 0xff]],
    ['a bigint with a high zero byte', raw.bigint(0, [1, 0])],
    ['a negative zero bigint', raw.bigint(1, [])],
    ['a bigint sign of 2', raw.bigint(2, [1])],
    ['an overlong UTF-8 NUL', raw.string([0xc0, 0x80])],
    ['a UTF-8 surrogate', raw.string([0xed, 0xa0, 0x80])],
    ['a cut UTF-8 sequence', raw.string([0xe2, 0x82])],
    ['a key with bad UTF-8', [ValueTag.OBJECT, ...u32(1), ...u32(1), 0xff, ...raw.null]],
    ['a duplicate key', raw.object(['a', raw.null], ['a', raw.null])],
    ['keys out of JavaScript order', raw.object(['b', raw.null], ['1', raw.null])],
    ['integer keys descending', raw.object(['2', raw.null], ['1', raw.null])],
  ])('refuses %s: MALFORMED', (_, payload) => {
    const e = payloadError(payload);
    expect(e.code).toBe('MALFORMED');
    expect(e.offset).toBeGreaterThanOrEqual(P);
  });

  it('names a duplicate key as such', () => {
    const e = payloadError(raw.object(['a', raw.null], ['a', raw.null]));
    expect(e.message).toMatch(/the key 'a' appears twice/);
    expect(e.offset).toBe(P + ContainerValue.SIZE + ObjectKey.SIZE + 1 + raw.null.length);
  });

  it('refuses __proto__ keys without touching any prototype', () => {
    const e = payloadError(raw.object(['__proto__', raw.object(['polluted', raw.int(1)])]));
    expect(e.code).toBe('MALFORMED');
    expect(e.offset).toBe(P + ContainerValue.SIZE);
    expect(({} as Record<string, unknown>)['polluted']).toBeUndefined();
    // Keys that merely look dangerous are ordinary own properties.
    const v = decodePayload(raw.object(['constructor', raw.int(1)], ['hasOwnProperty', raw.null])) as Record<string, unknown>;
    expect(Object.getPrototypeOf(v)).toBe(Object.prototype);
    expect(Object.keys(v)).toEqual(['constructor', 'hasOwnProperty']);
  });

  it('reports the offset of the offending byte', () => {
    const e = payloadError(raw.array(raw.null, raw.null, [0x42]));
    expect(e.code).toBe('MALFORMED');
    expect(e.offset).toBe(P + ContainerValue.SIZE + 2);
    expect(e.message).toMatch(/unknown value tag 0x42/);
    expect(e.message).toMatch(/section 'p'/);
  });

  it('refuses bytes after a payload value, and values cut short', () => {
    const e = payloadError([...raw.null, ...raw.null]);
    expect(e.code).toBe('TRAILING_BYTES');
    expect(e.offset).toBe(P + 1);
    expect(payloadError(raw.int(5).slice(0, 3)).code).toBe('TRUNCATED');
    expect(payloadError(raw.f64(0.5).slice(0, 8)).code).toBe('TRUNCATED');
    expect(payloadError(raw.string(utf8('abc')).slice(0, 7)).code).toBe('TRUNCATED');
    expect(payloadError(raw.array(raw.null, raw.null).slice(0, 6)).code).toBe('TRUNCATED');
    expect(payloadError(raw.object(['a', raw.null]).slice(0, 9)).code).toBe('TRUNCATED');
  });

  it('decodes hand-made canonical payloads', () => {
    expect(decodePayload(raw.int(-5))).toBe(-5);
    expect(decodePayload(raw.bigint(1, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]))).toBe(-(2n ** 64n - 1n));
    expect(decodePayload(raw.string(utf8('\uFEFFé')))).toBe('\uFEFFé');
    expect(decodePayload(raw.object(['1', raw.null], ['b', raw.array()]))).toEqual({ 1: null, b: [] });
  });
});

describe('hostile images', () => {
  /** A claimed count is checked against the bytes left before any loop or allocation follows it. */
  function refused(bytes: Uint8Array, codes: MigrationImageErrorCode[]): void {
    expect(codes).toContain(decodeError(bytes).code);
  }

  it('depth bombs are refused with LIMIT', () => {
    const nest = (n: number, open: number[]) => Uint8Array.from([...Array.from({ length: n }, () => open).flat(), ...raw.null]);
    const arrayOpen = [ValueTag.ARRAY, ...u32(1)];
    const objectOpen = [ValueTag.OBJECT, ...u32(1), ...u32(1), 0x61];
    expect(decodePayload(nest(ImageLimits.MAX_DEPTH, arrayOpen))).toBeDefined();
    refused(buildImage([{ name: 'p', payload: nest(ImageLimits.MAX_DEPTH + 1, arrayOpen) }]), ['LIMIT']);
    refused(buildImage([{ name: 'p', payload: nest(100_000, arrayOpen) }]), ['LIMIT']);
    refused(buildImage([{ name: 'p', payload: nest(100_000, objectOpen) }]), ['LIMIT']);
  });

  it.each([
    ['an array of 2^31', [ValueTag.ARRAY, ...u32(2 ** 31)], 'TRUNCATED'],
    ['an array of 2^32 - 1', [ValueTag.ARRAY, ...u32(2 ** 32 - 1), ...raw.null], 'TRUNCATED'],
    ['an object of 2^31', [ValueTag.OBJECT, ...u32(2 ** 31), ...raw.null], 'TRUNCATED'],
    ['a string of 2^31', [ValueTag.STRING, ...u32(2 ** 31), 0x61], 'TRUNCATED'],
    ['bytes of 2^32 - 1', [ValueTag.BYTES, ...u32(2 ** 32 - 1)], 'TRUNCATED'],
    ['a key of 2^31', [ValueTag.OBJECT, ...u32(1), ...u32(2 ** 31), ...raw.null], 'TRUNCATED'],
    ['a bigint of 2^31', [ValueTag.BIGINT, 0, ...u32(2 ** 31), 1], 'LIMIT'],
    ['a bigint just over the limit', [ValueTag.BIGINT, 0, ...u32(ImageLimits.MAX_BIGINT_BYTES + 1)], 'LIMIT'],
  ] as const)('length bomb in a payload: %s', (_, payload, code) => {
    refused(buildImage([{ name: 'p', payload: [...payload] }]), [code]);
  });

  it('length bombs in the headers', () => {
    refused(buildImage([{ name: 'p', payload: raw.null }], { sectionCount: 2 ** 31 }), ['TRUNCATED']);
    const longName = buildImage([{ name: 'p', payload: raw.null }]);
    new DataView(longName.buffer).setUint16(ImageHeader.SIZE + SectionHeader.nameLength.offset, 0xffff, true);
    refused(patchChecksums(longName), ['LIMIT']);
    const longPayload = buildImage([{ name: 'p', payload: raw.null }]);
    new DataView(longPayload.buffer).setUint32(ImageHeader.SIZE + SectionHeader.payloadLength.offset, 2 ** 32 - 1, true);
    refused(patchChecksums(longPayload), ['TRUNCATED']);
    const huge = sampleImage.slice();
    new DataView(huge.buffer).setBigUint64(ImageHeader.totalLength.offset, 2n ** 64n - 1n, true);
    refused(huge, ['TRUNCATED']);
  });

  it('a large, wide but honest payload decodes whole', () => {
    const n = 200_000;
    const payload = new Uint8Array(ContainerValue.SIZE + n).fill(ValueTag.NULL);
    payload.set([ValueTag.ARRAY, ...u32(n)]);
    const [s] = decodeImage(buildImage([{ name: 'p', payload }]));
    expect((s!.payload as unknown[]).length).toBe(n);
    expect((s!.payload as unknown[]).every((v) => v === null)).toBe(true);
  });

  const mutation = fc.oneof(
    fc.record({ kind: fc.constant('set' as const), at: fc.nat(), byte: fc.integer({ min: 0, max: 255 }) }),
    fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 8 }) }),
    fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), length: fc.integer({ min: 1, max: 8 }) }),
  );
  type Mutation = typeof mutation extends fc.Arbitrary<infer M> ? M : never;
  function mutate(bytes: Uint8Array, mutations: Mutation[], from = 0): Uint8Array {
    let b = [...bytes];
    for (const m of mutations) {
      const span = b.length - from;
      const at = from + (span > 0 ? m.at % span : 0);
      if (m.kind === 'set') b[at] = m.byte;
      else if (m.kind === 'insert') b = [...b.slice(0, at), ...m.bytes, ...b.slice(at)];
      else b = [...b.slice(0, at), ...b.slice(at + m.length)];
    }
    return Uint8Array.from(b);
  }

  it('random damage with checksums recomputed: a MigrationImageError or a canonical image', () => {
    const seen = new Set<string>();
    fc.assert(
      fc.property(fc.oneof(fc.constant(SAMPLE), sectionsArb), fc.array(mutation, { minLength: 1, maxLength: 4 }), fc.boolean(), (sections, mutations, headerToo) => {
        const image = encodeImage(sections);
        // Mostly leave the magic and major alone, or the decoder stops right there.
        const damaged = patchChecksums(mutate(image, mutations, headerToo ? 0 : ImageHeader.SIZE));
        seen.add(checkDecodesCanonicallyOrRefuses(damaged));
      }),
      fuzzParams(0xda3a6e, 1500),
    );
    // The structural decoder was reached, not just the header checks.
    expect(seen).toContain('MALFORMED');
    expect(seen).toContain('TRUNCATED');
  });

  it('random damage inside one payload, lengths and checksums right: a MigrationImageError or a canonical image', () => {
    const seen = new Set<string>();
    fc.assert(
      fc.property(plainValueArb, fc.array(mutation, { minLength: 1, maxLength: 4 }), (value, mutations) => {
        const payload = mutate(payloadOf(encodeImage([{ name: 'p', version: 0, payload: value }])), mutations);
        seen.add(checkDecodesCanonicallyOrRefuses(buildImage([{ name: 'p', version: 0, payload }])));
      }),
      fuzzParams(0x9a71, 1500),
    );
    expect(seen).toContain('ok');
    expect(seen).toContain('MALFORMED');
  });

  it('random token soup as a payload: a MigrationImageError or a canonical image', () => {
    const token = fc.oneof(
      fc.constantFrom(...Object.values(ValueTag)).map((t) => [t]),
      fc.integer({ min: 0, max: 6 }).map(u32),
      fc.constantFrom([0xc0, 0x80], [0xed, 0xa0, 0x80], [0x61], [0xf8, 0x7f], [0], [0xff]),
      fc.integer({ min: 0, max: 255 }).map((b) => [b]),
    );
    const seen = new Set<string>();
    fc.assert(
      fc.property(fc.array(token, { maxLength: 24 }), (tokens) => {
        seen.add(checkDecodesCanonicallyOrRefuses(buildImage([{ name: 'p', payload: tokens.flat() }])));
      }),
      fuzzParams(0x50e9, 3000),
    );
    expect(seen).toContain('ok');
  });
});

describe('docs/migration.md', () => {
  const doc = readFileSync(`${root}docs/migration.md`, 'utf8');

  /** Tables under the headings that name a code table: "### Title (`Name`, 40 bytes…)". */
  function docTables(): Map<string, { size: number | undefined; rows: string[][] }> {
    const tables = new Map<string, { size: number | undefined; rows: string[][] }>();
    let current: { size: number | undefined; rows: string[][] } | undefined;
    for (const line of doc.split('\n')) {
      const heading = /^#{2,4} .*\(`(\w+)`(?:, (\d+) bytes?)?/.exec(line);
      if (heading) {
        current = { size: heading[2] === undefined ? undefined : Number(heading[2]), rows: [] };
        tables.set(heading[1]!, current);
      } else if (/^#/.test(line)) {
        current = undefined;
      } else if (current && line.startsWith('|') && !/^\|[\s:-]+\|/.test(line)) {
        current.rows.push(line.slice(1, -1).split('|').map((c) => c.trim()));
      }
    }
    // Drop each table's heading row.
    for (const t of tables.values()) t.rows.shift();
    return tables;
  }
  const tables = docTables();

  const layouts = { ImageHeader, SectionHeader, TagValue, IntValue, F64Value, BigIntValue, LengthValue, ContainerValue, ObjectKey };

  it.each(Object.entries(layouts))('%s matches the code, field by field', (name, layout) => {
    const table = tables.get(name);
    expect(table, `a table for ${name}`).toBeDefined();
    expect(table!.size).toBe(layout.SIZE);
    const fields = Object.entries(layout)
      .filter(([k]) => k !== 'SIZE')
      .map(([k, f]) => [k, (f as { offset: number }).offset, (f as { size: number }).size]);
    // Rows with a `field` name are fixed fields; the others describe what follows the structure.
    const fixed = table!.rows.filter((r) => /^`\w+`$/.test(r[2] ?? '')).map((r) => [r[2]!.slice(1, -1), Number(r[0]), Number(r[1])]);
    expect(fixed).toEqual(fields);
    for (const r of table!.rows.filter((r) => !/^`\w+`$/.test(r[2] ?? ''))) {
      expect(Number.parseInt(r[0]!, 10), `variable part '${r[2]}' starts after the fixed fields`).toBe(layout.SIZE);
    }
  });

  it('lists the value tags, limits and error codes of the code', () => {
    const tags = tables.get('ValueTag')!.rows.map((r) => [r[1]!.slice(1, -1), Number(r[0]!.slice(1, -1))]);
    expect(tags).toEqual(Object.entries(ValueTag));
    for (const r of tables.get('ValueTag')!.rows) expect(Object.keys(layouts)).toContain(r[2]!.slice(1, -1));
    const limits = tables.get('ImageLimits')!.rows.map((r) => [r[0]!.slice(1, -1), Number(r[1])]);
    expect(limits).toEqual(Object.entries(ImageLimits));
    const codes = doc.split('### Error codes')[1]!.split('\n').filter((l) => /^\| `[A-Z_]+`/.test(l)).map((l) => /`([A-Z_]+)`/.exec(l)![1]);
    expect(codes).toEqual([...MIGRATION_IMAGE_ERROR_CODES]);
  });

  it('states the magic and the format version of the code', () => {
    const magic = IMAGE_MAGIC.map((b) => b.toString(16).toUpperCase().padStart(2, '0')).join(' ');
    expect(tables.get('ImageHeader')!.rows[0]![3]).toContain(magic);
    expect(tables.get('ImageHeader')!.rows[1]![3]).toContain(`, ${FormatVersion.MAJOR}`);
    expect(tables.get('ImageHeader')!.rows[2]![3]).toContain(`, ${FormatVersion.MINOR}`);
  });
});

describe('core code', () => {
  it('src/migration imports nothing from Node', () => {
    for (const file of ['image.ts', 'crc32c.ts']) {
      const text = readFileSync(`${root}src/migration/${file}`, 'utf8');
      const imports = [...text.matchAll(/from\s+['"]([^'"]+)['"]/g)].map((m) => m[1]!);
      for (const spec of imports) expect(spec, `${file} imports ${spec}`).toMatch(/^\.\.?\//);
    }
  });
});
