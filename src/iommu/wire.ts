/** Little-endian field access through the layout tables in ./layout.ts. */
export interface Field {
  readonly offset: number;
  readonly size: number;
}

export function readField(view: DataView, field: Field): number {
  switch (field.size) {
    case 1:
      return view.getUint8(field.offset);
    case 2:
      return view.getUint16(field.offset, true);
    case 4:
      return view.getUint32(field.offset, true);
    default:
      throw new RangeError(`readField: ${field.size}-byte field; use readField64`);
  }
}

export function readField64(view: DataView, field: Field): bigint {
  return view.getBigUint64(field.offset, true);
}

export function writeField(view: DataView, field: Field, value: number | bigint): void {
  switch (field.size) {
    case 1:
      view.setUint8(field.offset, Number(value));
      return;
    case 2:
      view.setUint16(field.offset, Number(value), true);
      return;
    case 4:
      view.setUint32(field.offset, Number(value) >>> 0, true);
      return;
    case 8:
      view.setBigUint64(field.offset, BigInt.asUintN(64, BigInt(value)), true);
      return;
    default:
      throw new RangeError(`writeField: unsupported size ${field.size}`);
  }
}

/** True when every byte of `field` is zero (reserved fields). */
export function isZero(bytes: Uint8Array, field: Field): boolean {
  for (let i = field.offset; i < field.offset + field.size; i++) if (bytes[i] !== 0) return false;
  return true;
}
