/*
 * Readers for saved device state that may be hostile (a migration stream is input like any other):
 * each one checks one value and names the field it refuses, so a model's restoreState() can check
 * everything before it changes anything.
 */

/** A plain object with exactly `keys` (no more, no fewer). */
export function stateRecord<K extends string>(value: unknown, path: string, keys: readonly K[]): Readonly<Record<K, unknown>> {
  if (typeof value !== 'object' || value === null || Array.isArray(value) || ArrayBuffer.isView(value)) {
    throw new TypeError(`${path} must be a plain object`);
  }
  const proto: unknown = Object.getPrototypeOf(value);
  if (proto !== Object.prototype && proto !== null) throw new TypeError(`${path} must be a plain object`);
  for (const key of keys) {
    if (!Object.hasOwn(value, key)) throw new TypeError(`${path}.${key} is missing`);
  }
  for (const key of Object.keys(value)) {
    if (!(keys as readonly string[]).includes(key)) throw new TypeError(`${path}.${key} is not a field of this state`);
  }
  return value as Readonly<Record<K, unknown>>;
}

/** An integer in [min, max]. */
export function stateInteger(value: unknown, path: string, min: number, max: number): number {
  if (typeof value !== 'number') throw new TypeError(`${path} must be a number, got ${typeof value}`);
  if (!Number.isInteger(value) || value < min || value > max) throw new RangeError(`${path} must be an integer in [${min}, ${max}], got ${value}`);
  return value;
}

/** A counter: a non-negative safe integer. */
export function stateCount(value: unknown, path: string): number {
  return stateInteger(value, path, 0, Number.MAX_SAFE_INTEGER);
}

export function stateU32(value: unknown, path: string): number {
  return stateInteger(value, path, 0, 0xffff_ffff);
}

export function stateBoolean(value: unknown, path: string): boolean {
  if (typeof value !== 'boolean') throw new TypeError(`${path} must be a boolean, got ${typeof value}`);
  return value;
}

/** A Uint8Array of `min`..`max` bytes (a copy: the state's buffer is not kept). */
export function stateBytes(value: unknown, path: string, min: number, max = min): Uint8Array {
  if (!(value instanceof Uint8Array)) throw new TypeError(`${path} must be a Uint8Array`);
  if (value.length < min || value.length > max) {
    throw new RangeError(min === max ? `${path} must be ${min} bytes, got ${value.length}` : `${path} must be ${min} to ${max} bytes, got ${value.length}`);
  }
  return value.slice();
}

/** An array of at most `maxLength` entries. */
export function stateArray(value: unknown, path: string, maxLength: number): readonly unknown[] {
  if (!Array.isArray(value)) throw new TypeError(`${path} must be an array`);
  if (value.length > maxLength) throw new RangeError(`${path} has ${value.length} entries, at most ${maxLength} fit`);
  return value as readonly unknown[];
}
