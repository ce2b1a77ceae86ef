/** Device status bits (virtio 1.2 §2.1). */
export const DeviceStatus = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 64,
  FAILED: 128,
} as const;

/** Transport-independent feature bits (virtio 1.2 §6). Bit numbers. */
export const FeatureBit = {
  INDIRECT_DESC: 28,
  EVENT_IDX: 29,
  VERSION_1: 32,
  ACCESS_PLATFORM: 33,
  RING_PACKED: 34,
  IN_ORDER: 35,
  ORDER_PLATFORM: 36,
  SR_IOV: 37,
  NOTIFICATION_DATA: 38,
} as const;

export function featureMask(bit: number): bigint {
  return 1n << BigInt(bit);
}

export function hasFeature(features: bigint, bit: number): boolean {
  return (features & featureMask(bit)) !== 0n;
}

/** Device IDs (virtio 1.2 §5). */
export const DeviceType = {
  NET: 1,
  BLOCK: 2,
  CONSOLE: 3,
  ENTROPY: 4,
  IOMMU: 23,
} as const;

/** Split-ring descriptor flags (virtio 1.2 §2.7.5). */
export const DescFlag = {
  NEXT: 1,
  WRITE: 2,
  INDIRECT: 4,
} as const;

/** avail.flags / used.flags values (virtio 1.2 §2.7.7, §2.7.10). */
export const RingFlag = {
  AVAIL_NO_INTERRUPT: 1,
  USED_NO_NOTIFY: 1,
} as const;

/** Largest queue size a split ring may have (virtio 1.2 §2.7). */
export const MAX_QUEUE_SIZE = 32768;
