/** Shared readers for fixture JSON: every value is checked and errors name the JSON path. */

export class FixtureError extends Error {
  readonly code = 'EFIXTURE' as const;
  constructor(
    readonly path: string,
    message: string,
  ) {
    super(`${path}: ${message}`);
    this.name = 'FixtureError';
  }
}

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

const U64_MAX = (1n << 64n) - 1n;

export function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

export function expectObject(value: unknown, path: string): JsonObject {
  if (!isObject(value)) throw new FixtureError(path, 'expected an object');
  return value;
}

export function expectArray(value: unknown, path: string): Json[] {
  if (!Array.isArray(value)) throw new FixtureError(path, 'expected an array');
  return value as Json[];
}

export function expectString(value: unknown, path: string): string {
  if (typeof value !== 'string') throw new FixtureError(path, 'expected a string');
  return value;
}

export function expectBoolean(value: unknown, path: string): boolean {
  if (typeof value !== 'boolean') throw new FixtureError(path, 'expected true or false');
  return value;
}

/** A fixture number: a JSON integer below 2^53, or a "0x…" string of up to 64 bits. */
export function expectU64(value: unknown, path: string): bigint {
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new FixtureError(path, `expected a non-negative integer below 2^53 (use a "0x…" string above), got ${value}`);
    }
    return BigInt(value);
  }
  if (typeof value === 'string') {
    if (!/^0[xX][0-9a-fA-F]{1,16}$/.test(value)) {
      throw new FixtureError(path, `expected a hex string "0x…" of at most 16 digits, got ${JSON.stringify(value)}`);
    }
    return BigInt(value);
  }
  throw new FixtureError(path, 'expected a number or a "0x…" string');
}

export function expectU64Max(value: unknown, path: string, max: bigint): bigint {
  const v = expectU64(value, path);
  if (v > max) throw new FixtureError(path, `value 0x${v.toString(16)} exceeds 0x${max.toString(16)}`);
  return v;
}

export function expectU32(value: unknown, path: string): number {
  return Number(expectU64Max(value, path, 0xffff_ffffn));
}

/** A number that must also be a safe integer (sizes, GPAs of this process's memory). */
export function expectSafe(value: unknown, path: string): number {
  return Number(expectU64Max(value, path, BigInt(Number.MAX_SAFE_INTEGER)));
}

export function u64Max(): bigint {
  return U64_MAX;
}

/** Hex digits (whitespace ignored, no 0x) → bytes. */
export function expectHexBytes(value: unknown, path: string): Uint8Array {
  const text = expectString(value, path).replace(/\s+/g, '');
  if (text.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(text)) {
    throw new FixtureError(path, 'expected an even number of hex digits');
  }
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function optional<T>(obj: JsonObject, key: string, path: string, read: (v: unknown, p: string) => T): T | undefined {
  return obj[key] === undefined ? undefined : read(obj[key], `${path}.${key}`);
}

export function required<T>(obj: JsonObject, key: string, path: string, read: (v: unknown, p: string) => T): T {
  if (obj[key] === undefined) throw new FixtureError(`${path}.${key}`, 'is required');
  return read(obj[key], `${path}.${key}`);
}

export function oneOf<T extends string>(allowed: readonly T[]): (v: unknown, p: string) => T {
  return (v, p) => {
    const s = expectString(v, p);
    if (!(allowed as readonly string[]).includes(s)) {
      throw new FixtureError(p, `expected one of ${allowed.join(', ')}, got ${JSON.stringify(s)}`);
    }
    return s as T;
  };
}

export function listOf<T>(read: (v: unknown, p: string) => T): (v: unknown, p: string) => T[] {
  return (v, p) => expectArray(v, p).map((item, i) => read(item, `${p}[${i}]`));
}

/** Formats a 64-bit value the way fixtures write them. */
export function hex(value: bigint | number): string {
  return `0x${value.toString(16)}`;
}
