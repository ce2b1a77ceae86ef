/**
 * The migration image: the saved state of a machine as one byte string of named, versioned
 * sections. This module owns the container only; what a payload means belongs to the code that
 * saves and restores that section. docs/migration.md draws every layout below, and a test keeps
 * the two in step.
 *
 * decodeImage's input is hostile (it crossed a network): every length is checked against the
 * bytes actually present before anything is allocated, nesting is bounded, and every refusal is
 * a MigrationImageError carrying the offset of the byte that gave it away.
 */

import type { Field } from '../iommu/wire.js';
import { crc32c } from './crc32c.js';

export { crc32c } from './crc32c.js';

// ---------------------------------------------------------------------------------------------
// Values and sections

/** What a section payload may hold: JSON's values plus bigint, -0/NaN/±Infinity and raw bytes. */
export type PlainValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | readonly PlainValue[]
  | { readonly [key: string]: PlainValue };

export interface ImageSection {
  /** Unique within an image: 'virtio-iommu', 'backend', 'endpoint-0008'. 1–255 bytes of UTF-8. */
  readonly name: string;
  /** The payload's own format version (u16), bumped by the section's owner. */
  readonly version: number;
  readonly payload: PlainValue;
}

// ---------------------------------------------------------------------------------------------
// Layouts. All integers are little-endian. Offsets are relative to the start of the structure.

/**
 * Version of the container format. A reader refuses another major and accepts a newer minor,
 * which may only add what an older reader can skip (docs/migration.md, "Versioning").
 */
export const FormatVersion = { MAJOR: 1, MINOR: 0 } as const;

/** "\x89VMI\r\n\x1a\n": like PNG's, the high byte and line endings expose 7-bit or text-mode transfers. */
export const IMAGE_MAGIC: readonly number[] = [0x89, 0x56, 0x4d, 0x49, 0x0d, 0x0a, 0x1a, 0x0a];

/** The image header, at offset 0. Magic and version stay where they are in every major. */
export const ImageHeader = {
  magic: { offset: 0, size: 8 },
  versionMajor: { offset: 8, size: 2 },
  versionMinor: { offset: 10, size: 2 },
  /** Where the first section starts; a newer minor may grow the header. */
  headerSize: { offset: 12, size: 4 },
  /** None defined yet: zero unless the image's minor is newer than the reader's. */
  flags: { offset: 16, size: 4 },
  sectionCount: { offset: 20, size: 4 },
  /** Length of the whole image, header included. */
  totalLength: { offset: 24, size: 8 },
  /** CRC-32C of the whole image except these four bytes. */
  checksum: { offset: 32, size: 4 },
  reserved: { offset: 36, size: 4 },
  SIZE: 40,
} as const;

/** One per section, right after the previous section; the name (UTF-8) and then the payload follow. */
export const SectionHeader = {
  nameLength: { offset: 0, size: 2 },
  version: { offset: 2, size: 2 },
  payloadLength: { offset: 4, size: 4 },
  /** CRC-32C of the payload bytes. */
  payloadChecksum: { offset: 8, size: 4 },
  SIZE: 12,
} as const;

/** First byte of every encoded value. Zero is no tag, so a zeroed region is never a value. */
export const ValueTag = {
  NULL: 0x01,
  FALSE: 0x02,
  TRUE: 0x03,
  /** A number that is an int32 other than -0: the canonical form for those numbers. */
  INT: 0x04,
  /** Every other number, NaN as 0x7FF8000000000000 only. */
  F64: 0x05,
  BIGINT: 0x06,
  STRING: 0x07,
  BYTES: 0x08,
  ARRAY: 0x09,
  OBJECT: 0x0a,
} as const;
export type ValueTag = (typeof ValueTag)[keyof typeof ValueTag];

/** NULL, FALSE, TRUE. */
export const TagValue = {
  tag: { offset: 0, size: 1 },
  SIZE: 1,
} as const;

export const IntValue = {
  tag: { offset: 0, size: 1 },
  /** Two's complement int32. */
  value: { offset: 1, size: 4 },
  SIZE: 5,
} as const;

export const F64Value = {
  tag: { offset: 0, size: 1 },
  /** IEEE 754 binary64. */
  value: { offset: 1, size: 8 },
  SIZE: 9,
} as const;

/** The magnitude follows, least significant byte first, without high zero bytes (zero: none). */
export const BigIntValue = {
  tag: { offset: 0, size: 1 },
  /** 0: zero or positive, 1: negative. */
  sign: { offset: 1, size: 1 },
  length: { offset: 2, size: 4 },
  SIZE: 6,
} as const;

/** STRING (UTF-8) and BYTES: `length` bytes follow. */
export const LengthValue = {
  tag: { offset: 0, size: 1 },
  length: { offset: 1, size: 4 },
  SIZE: 5,
} as const;

/** ARRAY: `count` values follow. OBJECT: `count` pairs of an ObjectKey and a value follow. */
export const ContainerValue = {
  tag: { offset: 0, size: 1 },
  count: { offset: 1, size: 4 },
  SIZE: 5,
} as const;

/** An object's key: `length` bytes of UTF-8 follow, then the value. */
export const ObjectKey = {
  length: { offset: 0, size: 4 },
  SIZE: 4,
} as const;

/** Bounds that hold whatever the lengths in an image claim. */
export const ImageLimits = {
  /** Arrays and objects nested in one another; keeps decoding's recursion shallow. */
  MAX_DEPTH: 64,
  MAX_NAME_BYTES: 255,
  /** Magnitude of a bigint (a 524288-bit number): parsing stays cheap. */
  MAX_BIGINT_BYTES: 65536,
} as const;

// ---------------------------------------------------------------------------------------------
// Errors

export const MIGRATION_IMAGE_ERROR_CODES = [
  'BAD_MAGIC',
  'UNSUPPORTED_VERSION',
  'TRUNCATED',
  'TRAILING_BYTES',
  'CHECKSUM',
  'MALFORMED',
  'LIMIT',
] as const;
export type MigrationImageErrorCode = (typeof MIGRATION_IMAGE_ERROR_CODES)[number];

/**
 * An image that cannot be read, or a value that cannot be written. `offset` is the byte of the
 * image where the problem was found; while encoding, where the offending item would have gone;
 * -1 when no image is involved (sectionMap).
 */
export class MigrationImageError extends Error {
  constructor(
    readonly code: MigrationImageErrorCode,
    readonly offset: number,
    message: string,
  ) {
    super(`${code}: ${message}`);
    this.name = 'MigrationImageError';
  }
}

export function isMigrationImageError(e: unknown, code?: MigrationImageErrorCode): e is MigrationImageError {
  return e instanceof MigrationImageError && (code === undefined || e.code === code);
}

// ---------------------------------------------------------------------------------------------
// Little-endian field helpers: every access names its field in a table above.

function getUint(view: DataView, base: number, field: Field): number {
  const at = base + field.offset;
  switch (field.size) {
    case 1:
      return view.getUint8(at);
    case 2:
      return view.getUint16(at, true);
    case 4:
      return view.getUint32(at, true);
    default:
      throw new RangeError(`getUint: ${field.size}-byte field; use getUint64`);
  }
}

function getUint64(view: DataView, base: number, field: Field): bigint {
  return view.getBigUint64(base + field.offset, true);
}

function setUint(view: DataView, base: number, field: Field, value: number): void {
  const at = base + field.offset;
  switch (field.size) {
    case 1:
      view.setUint8(at, value);
      return;
    case 2:
      view.setUint16(at, value, true);
      return;
    case 4:
      view.setUint32(at, value >>> 0, true);
      return;
    default:
      throw new RangeError(`setUint: ${field.size}-byte field; use setUint64`);
  }
}

function setUint64(view: DataView, base: number, field: Field, value: bigint): void {
  view.setBigUint64(base + field.offset, value, true);
}

// ---------------------------------------------------------------------------------------------
// Shared pieces

const utf8Encoder = new TextEncoder();
// fatal: invalid UTF-8 (overlong forms, surrogates, cut sequences) is refused, never replaced.
// ignoreBOM: a leading U+FEFF is content, not a marker to strip, or "\uFEFF" would not round-trip.
const utf8Decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));

/** Canonical NaN: the quiet NaN every engine produces for 0/0, so encoding is deterministic. */
const NAN_HIGH_WORD = 0x7ff80000;

function isInt32(v: number): boolean {
  return (v | 0) === v && !Object.is(v, -0);
}

/** The checksum field is left out of its own sum. */
function imageChecksum(bytes: Uint8Array, length: number): number {
  const { offset, size } = ImageHeader.checksum;
  return crc32c(bytes, offset + size, length, crc32c(bytes, 0, offset));
}

const hex32 = (v: number): string => `0x${v.toString(16).padStart(8, '0')}`;

// ---------------------------------------------------------------------------------------------
// Encoding

/** A growing buffer. alloc may replace `bytes` and `view`: read them only after it returns. */
class Writer {
  bytes = new Uint8Array(256);
  view = new DataView(this.bytes.buffer);
  length = 0;

  /** Makes room for `n` more bytes and returns where they start. */
  alloc(n: number): number {
    const at = this.length;
    const need = at + n;
    if (need > this.bytes.length) {
      const grown = new Uint8Array(Math.max(need, this.bytes.length * 2));
      grown.set(this.bytes.subarray(0, at));
      this.bytes = grown;
      this.view = new DataView(grown.buffer);
    }
    this.length = need;
    return at;
  }

  put(bytes: Uint8Array): void {
    // alloc first: it may replace this.bytes.
    const at = this.alloc(bytes.length);
    this.bytes.set(bytes, at);
  }
}

/**
 * The image holding `sections`, in order. The same sections always give the same bytes: object
 * keys go in Object.keys order, numbers in their canonical form. Throws MigrationImageError
 * (MALFORMED, LIMIT) for what an image cannot hold.
 */
export function encodeImage(sections: readonly ImageSection[]): Uint8Array {
  if (!Array.isArray(sections)) throw new MigrationImageError('MALFORMED', 0, 'encodeImage expects an array of sections');
  const w = new Writer();
  const header = w.alloc(ImageHeader.SIZE);
  for (let i = 0; i < IMAGE_MAGIC.length; i++) w.bytes[header + ImageHeader.magic.offset + i] = IMAGE_MAGIC[i]!;
  setUint(w.view, header, ImageHeader.versionMajor, FormatVersion.MAJOR);
  setUint(w.view, header, ImageHeader.versionMinor, FormatVersion.MINOR);
  setUint(w.view, header, ImageHeader.headerSize, ImageHeader.SIZE);
  setUint(w.view, header, ImageHeader.flags, 0);
  setUint(w.view, header, ImageHeader.sectionCount, sections.length);
  setUint(w.view, header, ImageHeader.reserved, 0);

  const names = new Set<string>();
  sections.forEach((section: unknown, index) => {
    const at = w.length;
    const name = checkSection(section, index, at);
    if (names.has(name)) throw new MigrationImageError('MALFORMED', at, `two sections are named '${name}'`);
    names.add(name);
    const nameBytes = utf8Encoder.encode(name);
    if (nameBytes.length > ImageLimits.MAX_NAME_BYTES) {
      throw new MigrationImageError('LIMIT', at, `section name '${name}' is ${nameBytes.length} bytes of UTF-8; the limit is ${ImageLimits.MAX_NAME_BYTES}`);
    }
    w.alloc(SectionHeader.SIZE);
    setUint(w.view, at, SectionHeader.nameLength, nameBytes.length);
    setUint(w.view, at, SectionHeader.version, (section as ImageSection).version);
    w.put(nameBytes);
    const payloadStart = w.length;
    writeValue(w, (section as ImageSection).payload, 0, [`section '${name}'`]);
    const payloadLength = w.length - payloadStart;
    if (payloadLength > 0xffff_ffff) {
      throw new MigrationImageError('LIMIT', payloadStart, `section '${name}' is ${payloadLength} bytes; a payload holds at most 4 GiB - 1`);
    }
    setUint(w.view, at, SectionHeader.payloadLength, payloadLength);
    setUint(w.view, at, SectionHeader.payloadChecksum, crc32c(w.bytes, payloadStart, w.length));
  });

  setUint64(w.view, header, ImageHeader.totalLength, BigInt(w.length));
  setUint(w.view, header, ImageHeader.checksum, imageChecksum(w.bytes, w.length));
  return w.bytes.slice(0, w.length);
}

/** The section's name once its shape is known to be right. */
function checkSection(section: unknown, index: number, at: number): string {
  if (typeof section !== 'object' || section === null) {
    throw new MigrationImageError('MALFORMED', at, `section ${index} is not an object with name, version and payload`);
  }
  const { name, version } = section as Partial<ImageSection>;
  if (typeof name !== 'string' || name.length === 0 || !name.isWellFormed()) {
    throw new MigrationImageError('MALFORMED', at, `section ${index} needs a name: a non-empty, well-formed string`);
  }
  if (typeof version !== 'number' || !Number.isInteger(version) || version < 0 || version > 0xffff) {
    throw new MigrationImageError('MALFORMED', at, `section '${name}' has version ${String(version)}; a version is an integer from 0 to 65535`);
  }
  return name;
}

/** `path` names where the value sits, for messages; segments are pushed and popped, joined only on error. */
function writeValue(w: Writer, v: unknown, depth: number, path: string[]): void {
  const at = w.length;
  const refuse = (code: MigrationImageErrorCode, why: string): never => {
    throw new MigrationImageError(code, at, `${path.join('')} ${why}`);
  };
  if (v === null) {
    w.alloc(TagValue.SIZE);
    setUint(w.view, at, TagValue.tag, ValueTag.NULL);
    return;
  }
  switch (typeof v) {
    case 'boolean':
      w.alloc(TagValue.SIZE);
      setUint(w.view, at, TagValue.tag, v ? ValueTag.TRUE : ValueTag.FALSE);
      return;
    case 'number':
      if (isInt32(v)) {
        w.alloc(IntValue.SIZE);
        setUint(w.view, at, IntValue.tag, ValueTag.INT);
        setUint(w.view, at, IntValue.value, v);
      } else {
        w.alloc(F64Value.SIZE);
        setUint(w.view, at, F64Value.tag, ValueTag.F64);
        if (Number.isNaN(v)) setUint64(w.view, at, F64Value.value, BigInt(NAN_HIGH_WORD) << 32n);
        else w.view.setFloat64(at + F64Value.value.offset, v, true);
      }
      return;
    case 'bigint': {
      const negative = v < 0n;
      let hex = v === 0n ? '' : (negative ? -v : v).toString(16);
      if (hex.length % 2 === 1) hex = `0${hex}`;
      const length = hex.length / 2;
      if (length > ImageLimits.MAX_BIGINT_BYTES) {
        refuse('LIMIT', `is a bigint of ${length} bytes; the limit is ${ImageLimits.MAX_BIGINT_BYTES}`);
      }
      w.alloc(BigIntValue.SIZE + length);
      setUint(w.view, at, BigIntValue.tag, ValueTag.BIGINT);
      setUint(w.view, at, BigIntValue.sign, negative ? 1 : 0);
      setUint(w.view, at, BigIntValue.length, length);
      const magnitude = at + BigIntValue.SIZE;
      for (let i = 0; i < length; i++) {
        const digits = hex.length - 2 * (i + 1);
        w.bytes[magnitude + i] = Number.parseInt(hex.slice(digits, digits + 2), 16);
      }
      return;
    }
    case 'string': {
      // TextEncoder would turn a lone surrogate into U+FFFD: the value would not come back.
      if (!v.isWellFormed()) refuse('MALFORMED', 'is a string with a lone surrogate, which UTF-8 cannot carry');
      const bytes = utf8Encoder.encode(v);
      writeLengthValue(w, ValueTag.STRING, bytes);
      return;
    }
    case 'object':
      break;
    default:
      return refuse('MALFORMED', `is ${typeof v === 'undefined' ? 'undefined' : `a ${typeof v}`}, which a migration image cannot hold`);
  }

  if (v instanceof Uint8Array) {
    writeLengthValue(w, ValueTag.BYTES, v);
    return;
  }
  // Cycles end here too, at the depth limit.
  if (depth >= ImageLimits.MAX_DEPTH) refuse('LIMIT', `nests deeper than ${ImageLimits.MAX_DEPTH} arrays and objects`);
  if (Array.isArray(v)) {
    w.alloc(ContainerValue.SIZE);
    setUint(w.view, at, ContainerValue.tag, ValueTag.ARRAY);
    setUint(w.view, at, ContainerValue.count, v.length);
    for (let i = 0; i < v.length; i++) {
      path.push(`[${i}]`);
      if (!(i in v)) refuse('MALFORMED', 'is a hole in a sparse array');
      writeValue(w, v[i], depth + 1, path);
      path.pop();
    }
    return;
  }
  const proto: unknown = Object.getPrototypeOf(v);
  if (proto !== Object.prototype && proto !== null) {
    refuse('MALFORMED', `is a ${(v as object).constructor?.name ?? 'non-plain object'}; only plain objects, arrays and Uint8Array fit an image`);
  }
  const keys = Object.keys(v);
  w.alloc(ContainerValue.SIZE);
  setUint(w.view, at, ContainerValue.tag, ValueTag.OBJECT);
  setUint(w.view, at, ContainerValue.count, keys.length);
  for (const key of keys) {
    path.push(`.${key}`);
    // Refused both ways: decoding must never hand out an object whose key could set a prototype.
    if (key === '__proto__') refuse('MALFORMED', 'is a key named __proto__, which images refuse');
    if (!key.isWellFormed()) refuse('MALFORMED', 'is a key with a lone surrogate, which UTF-8 cannot carry');
    const keyBytes = utf8Encoder.encode(key);
    const keyAt = w.alloc(ObjectKey.SIZE);
    setUint(w.view, keyAt, ObjectKey.length, keyBytes.length);
    w.put(keyBytes);
    writeValue(w, (v as Record<string, unknown>)[key], depth + 1, path);
    path.pop();
  }
}

function writeLengthValue(w: Writer, tag: ValueTag, bytes: Uint8Array): void {
  const at = w.alloc(LengthValue.SIZE);
  setUint(w.view, at, LengthValue.tag, tag);
  setUint(w.view, at, LengthValue.length, bytes.length);
  w.put(bytes);
}

// ---------------------------------------------------------------------------------------------
// Decoding

/**
 * The sections of an image, in order, exactly as encodeImage was given them (decoded objects
 * are plain objects; bytes are fresh copies). Throws MigrationImageError and nothing else.
 */
export function decodeImage(input: Uint8Array): ImageSection[] {
  if (!(input instanceof Uint8Array)) throw new MigrationImageError('MALFORMED', 0, 'a migration image must be a Uint8Array');
  // A shared buffer could change under us between the checksum and the parse: read a private copy.
  const bytes = input.buffer instanceof ArrayBuffer ? input : input.slice();
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const size = bytes.length;
  const needHeader = (end: number): void => {
    if (size < end) throw new MigrationImageError('TRUNCATED', size, `the image ends after ${size} bytes, inside its ${ImageHeader.SIZE}-byte header`);
  };

  for (let i = 0; i < Math.min(size, ImageHeader.magic.size); i++) {
    if (bytes[ImageHeader.magic.offset + i] !== IMAGE_MAGIC[i]) {
      throw new MigrationImageError('BAD_MAGIC', i, 'this is not a migration image: its first bytes are not the image magic');
    }
  }
  needHeader(ImageHeader.versionMinor.offset + ImageHeader.versionMinor.size);
  const major = getUint(view, 0, ImageHeader.versionMajor);
  const minor = getUint(view, 0, ImageHeader.versionMinor);
  if (major !== FormatVersion.MAJOR) {
    throw new MigrationImageError(
      'UNSUPPORTED_VERSION',
      ImageHeader.versionMajor.offset,
      `the image has format ${major}.${minor}; this build reads format ${FormatVersion.MAJOR}.x`,
    );
  }
  needHeader(ImageHeader.SIZE);
  const total = getUint64(view, 0, ImageHeader.totalLength);
  if (total > BigInt(size)) {
    throw new MigrationImageError('TRUNCATED', size, `the image is ${size} bytes but its header says ${total}: it was cut short`);
  }
  if (total < BigInt(size)) {
    throw new MigrationImageError('TRAILING_BYTES', Number(total), `the image is ${total} bytes but ${BigInt(size) - total} more follow it`);
  }
  const stored = getUint(view, 0, ImageHeader.checksum);
  const computed = imageChecksum(bytes, size);
  if (stored !== computed) {
    throw new MigrationImageError('CHECKSUM', ImageHeader.checksum.offset, `the image is corrupt: its checksum is ${hex32(stored)} but its bytes sum to ${hex32(computed)}`);
  }

  const headerSize = getUint(view, 0, ImageHeader.headerSize);
  if (headerSize < ImageHeader.SIZE) {
    throw new MigrationImageError('MALFORMED', ImageHeader.headerSize.offset, `the header claims ${headerSize} bytes; it has at least ${ImageHeader.SIZE}`);
  }
  if (headerSize > size) {
    throw new MigrationImageError('TRUNCATED', ImageHeader.headerSize.offset, `the header claims ${headerSize} bytes but the image has ${size}`);
  }
  // What a newer minor added, this reader may skip; in its own minor or older, all is known.
  if (minor <= FormatVersion.MINOR) {
    if (headerSize !== ImageHeader.SIZE) {
      throw new MigrationImageError('MALFORMED', ImageHeader.headerSize.offset, `a format ${major}.${minor} header is ${ImageHeader.SIZE} bytes, not ${headerSize}`);
    }
    const flags = getUint(view, 0, ImageHeader.flags);
    if (flags !== 0) throw new MigrationImageError('MALFORMED', ImageHeader.flags.offset, `unknown header flags ${hex32(flags)}`);
    if (getUint(view, 0, ImageHeader.reserved) !== 0) {
      throw new MigrationImageError('MALFORMED', ImageHeader.reserved.offset, 'the reserved header field is not zero');
    }
  }

  const count = getUint(view, 0, ImageHeader.sectionCount);
  const sections: ImageSection[] = [];
  const names = new Set<string>();
  let pos = headerSize;
  // No allocation up front: a lying count runs out of bytes after size / SectionHeader.SIZE rounds.
  for (let index = 0; index < count; index++) {
    const at = pos;
    if (size - at < SectionHeader.SIZE) {
      throw new MigrationImageError('TRUNCATED', at, `the image ends inside the header of section ${index} of ${count}`);
    }
    const nameLength = getUint(view, at, SectionHeader.nameLength);
    const version = getUint(view, at, SectionHeader.version);
    const payloadLength = getUint(view, at, SectionHeader.payloadLength);
    const payloadChecksum = getUint(view, at, SectionHeader.payloadChecksum);
    const nameAt = at + SectionHeader.SIZE;
    if (nameLength === 0) throw new MigrationImageError('MALFORMED', at, `section ${index} has an empty name`);
    if (nameLength > ImageLimits.MAX_NAME_BYTES) {
      throw new MigrationImageError('LIMIT', at, `section ${index} has a ${nameLength}-byte name; the limit is ${ImageLimits.MAX_NAME_BYTES}`);
    }
    if (size - nameAt < nameLength) throw new MigrationImageError('TRUNCATED', nameAt, `the image ends inside the name of section ${index}`);
    const name = readUtf8(bytes, nameAt, nameLength, `the name of section ${index}`);
    if (names.has(name)) throw new MigrationImageError('MALFORMED', at, `two sections are named '${name}'`);
    names.add(name);
    const payloadAt = nameAt + nameLength;
    if (size - payloadAt < payloadLength) {
      throw new MigrationImageError('TRUNCATED', payloadAt, `section '${name}' claims ${payloadLength} payload bytes but the image has ${size - payloadAt} left`);
    }
    const payloadEnd = payloadAt + payloadLength;
    const sum = crc32c(bytes, payloadAt, payloadEnd);
    if (sum !== payloadChecksum) {
      throw new MigrationImageError(
        'CHECKSUM',
        at + SectionHeader.payloadChecksum.offset,
        `section '${name}' is corrupt: its checksum is ${hex32(payloadChecksum)} but its payload sums to ${hex32(sum)}`,
      );
    }
    const reader = new ValueReader(bytes, view, payloadAt, payloadEnd, name);
    const payload = reader.value(0);
    if (reader.pos !== payloadEnd) {
      throw new MigrationImageError('TRAILING_BYTES', reader.pos, `section '${name}' has ${payloadEnd - reader.pos} bytes after its value`);
    }
    sections.push({ name, version, payload });
    pos = payloadEnd;
  }
  if (pos !== size) throw new MigrationImageError('TRAILING_BYTES', pos, `${size - pos} bytes follow the last of ${count} sections`);
  return sections;
}

function readUtf8(bytes: Uint8Array, at: number, length: number, what: string): string {
  try {
    return utf8Decoder.decode(bytes.subarray(at, at + length));
  } catch {
    throw new MigrationImageError('MALFORMED', at, `${what} is not valid UTF-8`);
  }
}

/** Reads one value from [pos, end) of a payload; offsets in errors are offsets in the image. */
class ValueReader {
  constructor(
    private readonly bytes: Uint8Array,
    private readonly view: DataView,
    public pos: number,
    private readonly end: number,
    private readonly section: string,
  ) {}

  private fail(code: MigrationImageErrorCode, at: number, why: string): never {
    throw new MigrationImageError(code, at, `section '${this.section}', byte ${at}: ${why}`);
  }

  /** Every claimed length passes through here before it is used: the bytes must be there. */
  private need(at: number, n: number, what: string): void {
    if (n > this.end - at) this.fail('TRUNCATED', at, `${what} needs ${n} bytes but the payload has ${Math.max(0, this.end - at)} left`);
  }

  value(depth: number): PlainValue {
    const at = this.pos;
    this.need(at, TagValue.SIZE, 'a value');
    const tag = getUint(this.view, at, TagValue.tag);
    switch (tag) {
      case ValueTag.NULL:
        this.pos = at + TagValue.SIZE;
        return null;
      case ValueTag.FALSE:
      case ValueTag.TRUE:
        this.pos = at + TagValue.SIZE;
        return tag === ValueTag.TRUE;
      case ValueTag.INT:
        this.need(at, IntValue.SIZE, 'an int');
        this.pos = at + IntValue.SIZE;
        return getUint(this.view, at, IntValue.value) | 0;
      case ValueTag.F64:
        return this.f64(at);
      case ValueTag.BIGINT:
        return this.bigint(at);
      case ValueTag.STRING: {
        const length = this.length(at, 'a string');
        this.pos = at + LengthValue.SIZE + length;
        return readUtf8(this.bytes, at + LengthValue.SIZE, length, `section '${this.section}': the string at byte ${at}`);
      }
      case ValueTag.BYTES: {
        const length = this.length(at, 'a byte string');
        this.pos = at + LengthValue.SIZE + length;
        // A copy: the caller may keep it without pinning (or seeing changes to) the image.
        return this.bytes.slice(at + LengthValue.SIZE, this.pos);
      }
      case ValueTag.ARRAY:
        return this.array(at, depth);
      case ValueTag.OBJECT:
        return this.object(at, depth);
      default:
        return this.fail('MALFORMED', at, `unknown value tag 0x${tag.toString(16).padStart(2, '0')}`);
    }
  }

  private f64(at: number): number {
    this.need(at, F64Value.SIZE, 'a number');
    this.pos = at + F64Value.SIZE;
    const v = this.view.getFloat64(at + F64Value.value.offset, true);
    if (Number.isNaN(v)) {
      if (getUint64(this.view, at, F64Value.value) !== BigInt(NAN_HIGH_WORD) << 32n) this.fail('MALFORMED', at, 'a NaN other than the canonical one');
    } else if (isInt32(v)) {
      // Canonical forms make decode-then-encode give back the same bytes.
      this.fail('MALFORMED', at, `${v} is stored as a float; an int32 has its own tag`);
    }
    return v;
  }

  private bigint(at: number): bigint {
    this.need(at, BigIntValue.SIZE, 'a bigint');
    const sign = getUint(this.view, at, BigIntValue.sign);
    const length = getUint(this.view, at, BigIntValue.length);
    if (length > ImageLimits.MAX_BIGINT_BYTES) this.fail('LIMIT', at, `a bigint of ${length} bytes; the limit is ${ImageLimits.MAX_BIGINT_BYTES}`);
    this.need(at, BigIntValue.SIZE + length, 'a bigint');
    const start = at + BigIntValue.SIZE;
    const end = start + length;
    if (sign > 1) this.fail('MALFORMED', at, `bigint sign byte ${sign}; it is 0 or 1`);
    if (length === 0 && sign === 1) this.fail('MALFORMED', at, 'a negative zero bigint');
    if (length > 0 && this.bytes[end - 1] === 0) this.fail('MALFORMED', at, 'a bigint with a high zero byte');
    this.pos = end;
    if (length === 0) return 0n;
    let hex = '0x';
    for (let i = end - 1; i >= start; i--) hex += HEX[this.bytes[i]!];
    const magnitude = BigInt(hex);
    return sign === 1 ? -magnitude : magnitude;
  }

  private length(at: number, what: string): number {
    this.need(at, LengthValue.SIZE, what);
    const length = getUint(this.view, at, LengthValue.length);
    this.need(at + LengthValue.SIZE, length, what);
    return length;
  }

  /** The element count, once the payload could hold that many (each takes `least` bytes or more). */
  private count(at: number, depth: number, least: number, what: string): number {
    this.need(at, ContainerValue.SIZE, what);
    if (depth >= ImageLimits.MAX_DEPTH) this.fail('LIMIT', at, `${what} nested deeper than ${ImageLimits.MAX_DEPTH} arrays and objects`);
    const count = getUint(this.view, at, ContainerValue.count);
    const room = this.end - (at + ContainerValue.SIZE);
    if (count * least > room) this.fail('TRUNCATED', at, `${what} of ${count} entries, which cannot fit in the ${room} bytes left`);
    return count;
  }

  private array(at: number, depth: number): PlainValue[] {
    const count = this.count(at, depth, TagValue.SIZE, 'an array');
    this.pos = at + ContainerValue.SIZE;
    const out: PlainValue[] = [];
    for (let i = 0; i < count; i++) out.push(this.value(depth + 1));
    return out;
  }

  private object(at: number, depth: number): { [key: string]: PlainValue } {
    const count = this.count(at, depth, ObjectKey.SIZE + TagValue.SIZE, 'an object');
    this.pos = at + ContainerValue.SIZE;
    const out: { [key: string]: PlainValue } = {};
    const keys: string[] = [];
    for (let i = 0; i < count; i++) {
      const keyAt = this.pos;
      this.need(keyAt, ObjectKey.SIZE, 'an object key');
      const length = getUint(this.view, keyAt, ObjectKey.length);
      this.need(keyAt + ObjectKey.SIZE, length, 'an object key');
      const key = readUtf8(this.bytes, keyAt + ObjectKey.SIZE, length, `section '${this.section}': the object key at byte ${keyAt}`);
      // Assigning '__proto__' would set the object's prototype instead of adding a key.
      if (key === '__proto__') this.fail('MALFORMED', keyAt, 'an object key named __proto__');
      if (Object.hasOwn(out, key)) this.fail('MALFORMED', keyAt, `the key '${key}' appears twice in one object`);
      this.pos = keyAt + ObjectKey.SIZE + length;
      out[key] = this.value(depth + 1);
      keys.push(key);
    }
    // JavaScript lists integer-like keys first, ascending; an image storing another order could
    // not be produced by encodeImage and would not survive a re-encode unchanged.
    const order = Object.keys(out);
    for (let i = 0; i < keys.length; i++) {
      if (order[i] !== keys[i]) this.fail('MALFORMED', at, 'object keys out of canonical order (integer-like keys come first, ascending)');
    }
    return out;
  }
}

// ---------------------------------------------------------------------------------------------

/** Sections by name, for a restore that looks them up. Refuses duplicate names (offset -1). */
export function sectionMap(sections: readonly ImageSection[]): Map<string, ImageSection> {
  const map = new Map<string, ImageSection>();
  for (const section of sections) {
    if (map.has(section.name)) throw new MigrationImageError('MALFORMED', -1, `two sections are named '${section.name}'`);
    map.set(section.name, section);
  }
  return map;
}
