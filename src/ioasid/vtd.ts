import {
  VTD_ADDR_WIDTH_4LEVEL,
  VTD_ADDR_WIDTH_5LEVEL,
  VTD_HW_INFO_SIZE,
  VTD_S1_DATA_SIZE,
  VtdCap,
  VtdEcap,
} from './uapi.js';

/**
 * The Intel VT-d driver data of the iommufd uAPI, little-endian as the kernel reads it:
 * struct iommu_hwpt_vtd_s1 (IOMMU_HWPT_ALLOC data for a nested stage-1 HWPT) and
 * struct iommu_hw_info_vtd (IOMMU_GET_HW_INFO data).
 */

const U64_LIMIT = 1n << 64n;

/** struct iommu_hwpt_vtd_s1 as fields. */
export interface VtdS1Data {
  /** VtdS1Flag bits (u64). */
  readonly flags: bigint;
  /** pgtbl_addr: guest-physical address of the stage-1 PML4 / PML5. */
  readonly pgtblAddr: bigint;
  /** 48 (4-level) or 57 (5-level) for a usable table; other values decode as given. */
  readonly addrWidth: number;
  readonly reserved: number;
}

/**
 * Encodes struct iommu_hwpt_vtd_s1 for hwptAlloc: the stage-1 table at `rootGpa` with 4 levels
 * (addrWidth 48) or 5 (57). Throws RangeError for values that do not fit the struct.
 */
export function encodeVtdS1(rootGpa: bigint, addrWidth: 48 | 57, flags = 0n): Uint8Array {
  if (typeof rootGpa !== 'bigint' || rootGpa < 0n || rootGpa >= U64_LIMIT) throw new RangeError(`stage-1 root ${String(rootGpa)} is not a u64`);
  if (typeof flags !== 'bigint' || flags < 0n || flags >= U64_LIMIT) throw new RangeError(`flags ${String(flags)} are not a u64`);
  if (addrWidth !== VTD_ADDR_WIDTH_4LEVEL && addrWidth !== VTD_ADDR_WIDTH_5LEVEL) throw new RangeError(`addr_width ${String(addrWidth)} is not 48 or 57`);
  const data = new Uint8Array(VTD_S1_DATA_SIZE);
  const view = new DataView(data.buffer);
  view.setBigUint64(0, flags, true);
  view.setBigUint64(8, rootGpa, true);
  view.setUint32(16, addrWidth, true);
  view.setUint32(20, 0, true);
  return data;
}

/** Reads the first VTD_S1_DATA_SIZE bytes of `data` (the caller checked the length). */
export function decodeVtdS1(data: Uint8Array): VtdS1Data {
  const view = new DataView(data.buffer, data.byteOffset, VTD_S1_DATA_SIZE);
  return {
    flags: view.getBigUint64(0, true),
    pgtblAddr: view.getBigUint64(8, true),
    addrWidth: view.getUint32(16, true),
    reserved: view.getUint32(20, true),
  };
}

/** struct iommu_hw_info_vtd as fields. */
export interface VtdHwInfo {
  readonly flags: number;
  readonly capReg: bigint;
  readonly ecapReg: bigint;
}

const bit = (n: number): bigint => 1n << BigInt(n);

/**
 * The VT-d registers this backend reports: only the bits it implements are set, everything else is
 * zero (see docs/backend.md, "Nested translation"). `pasidBits` is the IOMMU's PASID width.
 */
export function vtdHwInfo(pasidBits: number): VtdHwInfo {
  const capReg = bit(VtdCap.FL1GP) | bit(VtdCap.FL5LP);
  let ecapReg = bit(VtdEcap.NEST) | bit(VtdEcap.SMTS) | bit(VtdEcap.SLTS) | bit(VtdEcap.FLTS);
  if (pasidBits > 0) ecapReg |= bit(VtdEcap.PASID) | (BigInt((pasidBits - 1) & VtdEcap.PSS_MASK) << BigInt(VtdEcap.PSS_SHIFT));
  return { flags: 0, capReg, ecapReg };
}

export function encodeVtdHwInfo(info: VtdHwInfo): Uint8Array {
  const data = new Uint8Array(VTD_HW_INFO_SIZE);
  const view = new DataView(data.buffer);
  view.setUint32(0, info.flags >>> 0, true);
  view.setBigUint64(8, info.capReg, true);
  view.setBigUint64(16, info.ecapReg, true);
  return data;
}

/** Decodes struct iommu_hw_info_vtd (getHwInfo().data when dataType is HwInfoType.INTEL_VTD). */
export function decodeVtdHwInfo(data: Uint8Array): VtdHwInfo {
  if (!(data instanceof Uint8Array) || data.length < VTD_HW_INFO_SIZE) throw new RangeError(`struct iommu_hw_info_vtd needs ${VTD_HW_INFO_SIZE} bytes`);
  const view = new DataView(data.buffer, data.byteOffset, VTD_HW_INFO_SIZE);
  return { flags: view.getUint32(0, true), capReg: view.getBigUint64(8, true), ecapReg: view.getBigUint64(16, true) };
}

/** The PASID width an ecap_reg reports (0 without PASID support). */
export function vtdPasidBits(ecapReg: bigint): number {
  if (((ecapReg >> BigInt(VtdEcap.PASID)) & 1n) === 0n) return 0;
  return Number((ecapReg >> BigInt(VtdEcap.PSS_SHIFT)) & BigInt(VtdEcap.PSS_MASK)) + 1;
}
