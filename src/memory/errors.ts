/** Raised by checked guest-memory accessors when a range is not fully inside one region. */
export class GuestMemoryError extends Error {
  readonly code = 'EFAULT' as const;
  constructor(
    readonly gpa: number,
    readonly length: number,
    reason = 'not inside one guest memory region',
  ) {
    super(`guest range gpa=${formatAddress(gpa)} length=${length}: ${reason}`);
    this.name = 'GuestMemoryError';
  }
}

export function formatAddress(value: number | bigint): string {
  if (typeof value === 'number' && !Number.isFinite(value)) return String(value);
  return value < 0 ? `-0x${(-value).toString(16)}` : `0x${value.toString(16)}`;
}
