/**
 * Wire layouts of the split virtqueue (virtio 1.2 §2.7). One table per structure: every read or write
 * of a ring field takes its offset from here.
 */
export const Descriptor = {
  addr: { offset: 0, size: 8 },
  len: { offset: 8, size: 4 },
  flags: { offset: 12, size: 2 },
  next: { offset: 14, size: 2 },
  SIZE: 16,
  ALIGN: 16,
} as const;

/** Driver area ("available ring"): flags, idx, ring[size], used_event (with EVENT_IDX). */
export const AvailRing = {
  flags: { offset: 0, size: 2 },
  idx: { offset: 2, size: 2 },
  ring: { offset: 4, size: 2 },
  ALIGN: 2,
  /** Bytes of the area for a queue of `queueSize` entries, used_event included. */
  sizeFor: (queueSize: number) => 6 + 2 * queueSize,
  usedEventOffset: (queueSize: number) => 4 + 2 * queueSize,
} as const;

/** Device area ("used ring"): flags, idx, ring[size] of {id u32, len u32}, avail_event (with EVENT_IDX). */
export const UsedRing = {
  flags: { offset: 0, size: 2 },
  idx: { offset: 2, size: 2 },
  ring: { offset: 4, size: 8 },
  elemId: { offset: 0, size: 4 },
  elemLen: { offset: 4, size: 4 },
  ALIGN: 4,
  sizeFor: (queueSize: number) => 6 + 8 * queueSize,
  availEventOffset: (queueSize: number) => 4 + 8 * queueSize,
} as const;
