import { IommufdError } from './errors.js';
import { MAX_PASID_BITS, U64_MAX } from './uapi.js';

/** A u64 argument (IOVA, length): a bigint in [0, 2^64). Anything else is rejected before use. */
export function u64Arg(value: unknown, argument: string): bigint {
  if (typeof value !== 'bigint') throw new IommufdError('EINVAL', `${argument} must be a bigint`, argument);
  if (value < 0n) throw new IommufdError('EINVAL', `${argument} must not be negative`, argument);
  // A value that does not fit the u64 field cannot be represented: reported as an overflow.
  if (value > U64_MAX) throw new IommufdError('EOVERFLOW', `${argument} does not fit in 64 bits`, argument);
  return value;
}

/** A u32 flags argument; bits outside `valid` are EOPNOTSUPP, as every iommufd ioctl answers them. */
export function flagsArg(value: unknown, valid: number, argument = 'flags'): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new IommufdError('EINVAL', `${argument} must be a u32 integer`, argument);
  }
  // iommufd ioctls: unknown flag bits are -EOPNOTSUPP.
  if ((value & ~valid) !== 0) {
    throw new IommufdError('EOPNOTSUPP', `${argument} has unsupported bits 0x${(value & ~valid).toString(16)}`, argument);
  }
  return value;
}

/** A u32 integer argument (object IDs, counts). */
export function u32Arg(value: unknown, argument: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new IommufdError('EINVAL', `${argument} must be a u32 integer`, argument);
  }
  return value;
}

/** A PASID: 0 (no PASID, the whole device) or a PCIe PASID below 2^20. */
export function pasidArg(value: unknown, argument = 'pasid'): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value >= 2 ** MAX_PASID_BITS) {
    throw new IommufdError('EINVAL', `${argument} must be an integer in [0, 2^${MAX_PASID_BITS})`, argument);
  }
  return value;
}

/** A guest-physical address: a non-negative safe integer (alignment and range are checked later). */
export function gpaArg(value: unknown, argument = 'gpa'): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new IommufdError('EINVAL', `${argument} must be a non-negative safe integer`, argument);
  }
  return value;
}
