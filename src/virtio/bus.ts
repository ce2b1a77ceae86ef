/**
 * Register-access interfaces between a guest's driver and a virtio transport. The device-side
 * transports (./mmio.ts, ./pci.ts) implement them; guest-side drivers and VMM bus code call them.
 *
 * Conventions shared by every implementation:
 *
 * - `offset` is relative to the start of the region (the MMIO window, PCI configuration space, or
 *   the BAR), never a guest-physical address: the caller has already decoded the address.
 * - Values are little-endian and unsigned. For sizes 1, 2 and 4 a value carries exactly that many
 *   bytes: writes use only the low `size` bytes of `value`, reads return 0 ..= 2^(8*size)-1.
 * - 64-bit fields are two 32-bit halves, low half at the lower offset, as both virtio transports
 *   define them (virtio 1.2 §4.1.3, §4.2.2). A caller holding a 64-bit access splits it into two
 *   4-byte accesses, low half first. Size 8 is accepted only where the spec has a 64-bit field
 *   (PCI common configuration queue addresses, device-specific configuration); the transport then
 *   performs it as that same pair of 4-byte accesses. A JS number holds 53 bits, so an 8-byte access
 *   carries only values below 2^53: a write of anything else is dropped, and a read of a field
 *   holding a larger value returns 0 (both logged). Code that needs every 64-bit value uses two
 *   4-byte accesses.
 * - Malformed accesses (unknown offset, wrong width, misaligned, outside the region) never throw:
 *   reads return 0 (all-ones where real PCI hardware floats the bus: outside a BAR, a disabled BAR,
 *   or beyond configuration space), writes are dropped, and the transport logs why.
 */
export type AccessSize = 1 | 2 | 4 | 8;

/** A virtio-mmio register window. */
export interface MmioBus {
  read(offset: number, size: AccessSize): number;
  write(offset: number, size: AccessSize, value: number): void;
}

/** A PCI function: its configuration space and its memory BARs. */
export interface PciBus {
  configRead(offset: number, size: 1 | 2 | 4): number;
  configWrite(offset: number, size: 1 | 2 | 4, value: number): void;
  /** `offset` is relative to the start of BAR `bar`, wherever the guest placed it. */
  barRead(bar: number, offset: number, size: AccessSize): number;
  barWrite(bar: number, offset: number, size: AccessSize, value: number): void;
}

/** All-ones for an access of `size` bytes (sizes up to 4): what a read of unclaimed PCI space returns. */
export function allOnes(size: number): number {
  return size >= 4 ? 0xffff_ffff : (1 << (8 * size)) - 1;
}

/** The low `size` bytes of `value` (sizes 1, 2, 4), as an unsigned number; NaN and friends give 0. */
export function truncateValue(value: number, size: 1 | 2 | 4): number {
  const v = value >>> 0;
  return size === 4 ? v : v & ((1 << (8 * size)) - 1);
}

/** True for a safe-integer offset that is a multiple of `size`: the natural alignment rule. */
export function isAligned(offset: number, size: number): boolean {
  return Number.isSafeInteger(offset) && offset >= 0 && offset % size === 0;
}

/** Splits a value written with an 8-byte access into 32-bit halves; undefined if it is not a safe u64. */
export function splitU64(value: number): { lo: number; hi: number } | undefined {
  if (!Number.isSafeInteger(value) || value < 0) return undefined;
  return { lo: value % 0x1_0000_0000, hi: Math.floor(value / 0x1_0000_0000) };
}

/** Joins two 32-bit halves read for an 8-byte access; undefined when the value is 2^53 or more. */
export function joinU64(lo: number, hi: number): number | undefined {
  return hi >>> 0 >= 0x20_0000 ? undefined : (hi >>> 0) * 0x1_0000_0000 + (lo >>> 0);
}
