/**
 * Translation faults from device workers to the owner of the context: a bounded multi-producer,
 * single-consumer ring in a SharedArrayBuffer. Producers (device workers, any number) reserve a
 * cell by advancing TAIL with a compare-and-swap, write the record, then publish it through the
 * cell's SEQ word; the consumer (the owner) reads a cell only once SEQ says it is complete, so it
 * never sees half a record. A full ring drops the new record and counts it: a faulting device
 * never waits for the owner. (The per-cell sequence is Vyukov's bounded queue.)
 *
 * Header words (Int32 indices). Producers write TAIL and DROPPED; the consumer writes HEAD.
 */
export const FaultQueueHeader = {
  MAGIC: 0,
  /** Cells in the ring (a power of two). */
  CAPACITY: 1,
  /** Next position the consumer reads (wrapping 32-bit counter). */
  HEAD: 16,
  /** Next position a producer reserves (wrapping 32-bit counter). */
  TAIL: 32,
  /** Records dropped because the ring was full (total since creation). */
  DROPPED: 33,
  /** Records appended (total since creation), for stats. */
  APPENDED: 34,
  FIELD_COUNT: 35,
  /** Words before the first cell: whole 64-byte lines, HEAD and TAIL on lines of their own. */
  STRIDE: 48,
} as const;

/** One ring cell. */
export const FaultCell = {
  /**
   * Cell sequence: equals the position p when the cell is free for the producer of p; p + 1 once
   * that record is published; p + capacity after the consumer took it (free for the next lap).
   */
  SEQ: 0,
  /** Device slot (device-table row) or endpoint that faulted. */
  DEVICE: 1,
  /** PASID, or NO_PASID. */
  PASID: 2,
  /** Faulting IOVA, low and high 32 bits. */
  IOVA_LO: 3,
  IOVA_HI: 4,
  /** FaultAccess bits of the access that faulted. */
  ACCESS: 5,
  /** FaultReason. */
  REASON: 6,
  /** Bytes the DMA asked for from IOVA (clamped to 2^31 - 1), for diagnostics. */
  LENGTH: 7,
  FIELD_COUNT: 8,
  STRIDE: 8,
} as const;

/** Why a translation failed. */
export const FaultReason = {
  /** Not a fault: the value translate() returns on success. */
  NONE: 0,
  /** The device (or PASID) has no translation at all: blocked, or not attached. */
  DOMAIN: 1,
  /** The address space has no mapping at the IOVA (or the IOVA is beyond its reach). */
  MAPPING: 2,
  /** Mapped, but without the permission the access needs. */
  PERMISSION: 3,
  /**
   * Nested translation: stage 2 (the parent IOAS) does not map a guest-physical address the walk
   * needed (a stage-1 table page, or the output page) or refuses the access to it. Stage-1 faults
   * are MAPPING and PERMISSION like any other.
   */
  STAGE2: 4,
} as const;
export type FaultReasonValue = (typeof FaultReason)[keyof typeof FaultReason];

/** Access bits (the same values as virtio-iommu's fault flags, so the model can pass them on). */
export const FaultAccess = {
  READ: 1,
  WRITE: 2,
  EXEC: 4,
} as const;

/** PASID word of a DMA without a PASID. */
export const NO_PASID = -1;

export const FAULT_QUEUE_MAGIC = 0x46415154; // 'FAQT'

/** A fault as the consumer reads it. Reused by drain() callers that want no allocation. */
export interface FaultRecord {
  device: number;
  pasid: number;
  iovaLo: number;
  iovaHi: number;
  access: number;
  reason: number;
  length: number;
}

export function emptyFaultRecord(): FaultRecord {
  return { device: 0, pasid: NO_PASID, iovaLo: 0, iovaHi: 0, access: 0, reason: FaultReason.NONE, length: 0 };
}

/** The record's IOVA as a 64-bit value. */
export function faultIova(record: FaultRecord): bigint {
  return (BigInt(record.iovaHi >>> 0) << 32n) | BigInt(record.iovaLo >>> 0);
}

/** A zeroed ring of `capacity` cells (a power of two), ready for producers and the consumer. */
export function createFaultQueueBuffer(capacity = 256): SharedArrayBuffer {
  if (!Number.isInteger(capacity) || capacity < 2 || capacity > 1 << 20 || (capacity & (capacity - 1)) !== 0) {
    throw new RangeError(`fault queue capacity must be a power of two in [2, 2^20], got ${capacity}`);
  }
  const buffer = new SharedArrayBuffer((FaultQueueHeader.STRIDE + capacity * FaultCell.STRIDE) * Int32Array.BYTES_PER_ELEMENT);
  const words = new Int32Array(buffer);
  for (let p = 0; p < capacity; p++) Atomics.store(words, FaultQueueHeader.STRIDE + p * FaultCell.STRIDE + FaultCell.SEQ, p);
  Atomics.store(words, FaultQueueHeader.CAPACITY, capacity);
  Atomics.store(words, FaultQueueHeader.MAGIC, FAULT_QUEUE_MAGIC);
  return buffer;
}

function open(buffer: SharedArrayBuffer): { words: Int32Array; mask: number } {
  const words = new Int32Array(buffer);
  if (Atomics.load(words, FaultQueueHeader.MAGIC) !== FAULT_QUEUE_MAGIC) throw new Error('not a fault queue');
  return { words, mask: Atomics.load(words, FaultQueueHeader.CAPACITY) - 1 };
}

/** A device worker's handle on the ring. Lock-free: append() never waits for the consumer. */
export class FaultProducer {
  private readonly words: Int32Array;
  private readonly mask: number;

  /**
   * `wakeSignals[wakeIndex]` is bumped and notified after every append: point it at the owner's
   * wake word (the iommu worker's DeviceSignal.WAKE) so a sleeping owner drains at once.
   */
  constructor(
    buffer: SharedArrayBuffer,
    private readonly wakeSignals?: Int32Array,
    private readonly wakeIndex = 0,
  ) {
    ({ words: this.words, mask: this.mask } = open(buffer));
  }

  /**
   * Appends one fault; returns false (and counts it in DROPPED) when the ring is full. The IOVA
   * comes as two u32 halves so 64-bit addresses cross without a BigInt.
   */
  append(device: number, pasid: number, iovaLo: number, iovaHi: number, access: number, reason: number, length: number): boolean {
    const w = this.words;
    let pos = Atomics.load(w, FaultQueueHeader.TAIL);
    let cell: number;
    for (;;) {
      cell = FaultQueueHeader.STRIDE + (pos & this.mask) * FaultCell.STRIDE;
      const dif = (Atomics.load(w, cell + FaultCell.SEQ) - pos) | 0;
      if (dif === 0) {
        const won = Atomics.compareExchange(w, FaultQueueHeader.TAIL, pos, (pos + 1) | 0);
        if (won === pos) break;
        pos = won;
      } else if (dif < 0) {
        // The cell still holds the record from one lap ago: the consumer is behind, the ring full.
        Atomics.add(w, FaultQueueHeader.DROPPED, 1);
        return false;
      } else {
        // Another producer took this position already.
        pos = Atomics.load(w, FaultQueueHeader.TAIL);
      }
    }
    Atomics.store(w, cell + FaultCell.DEVICE, device);
    Atomics.store(w, cell + FaultCell.PASID, pasid);
    Atomics.store(w, cell + FaultCell.IOVA_LO, iovaLo | 0);
    Atomics.store(w, cell + FaultCell.IOVA_HI, iovaHi | 0);
    Atomics.store(w, cell + FaultCell.ACCESS, access);
    Atomics.store(w, cell + FaultCell.REASON, reason);
    Atomics.store(w, cell + FaultCell.LENGTH, Math.min(length, 0x7fffffff));
    // Publish: the consumer reads the fields only after it sees this store.
    Atomics.store(w, cell + FaultCell.SEQ, (pos + 1) | 0);
    Atomics.add(w, FaultQueueHeader.APPENDED, 1);
    // Wake only for the record the consumer is stopped at: if HEAD is still behind it, the record
    // at HEAD is unpublished or unread, and whoever publishes or reads it reaches this one (a
    // consumer that advances HEAD to pos later re-reads this cell after our publish). A fault
    // storm thus costs one notify per drain, not one per record.
    if (this.wakeSignals !== undefined && Atomics.load(w, FaultQueueHeader.HEAD) === pos) {
      Atomics.add(this.wakeSignals, this.wakeIndex, 1);
      Atomics.notify(this.wakeSignals, this.wakeIndex);
    }
    return true;
  }
}

export interface FaultQueueStats {
  readonly appended: number;
  readonly dropped: number;
  /** Records published and not yet drained. */
  readonly pending: number;
}

/** The owner's handle: the single consumer. */
export class FaultConsumer {
  private readonly words: Int32Array;
  private readonly mask: number;
  private readonly record = emptyFaultRecord();

  constructor(buffer: SharedArrayBuffer) {
    ({ words: this.words, mask: this.mask } = open(buffer));
  }

  /**
   * Takes the next published record into `out`; false when there is none (a record reserved but
   * not yet published counts as none: it is taken on a later call, in order).
   */
  poll(out: FaultRecord): boolean {
    const w = this.words;
    const pos = Atomics.load(w, FaultQueueHeader.HEAD);
    const cell = FaultQueueHeader.STRIDE + (pos & this.mask) * FaultCell.STRIDE;
    if (Atomics.load(w, cell + FaultCell.SEQ) !== ((pos + 1) | 0)) return false;
    out.device = Atomics.load(w, cell + FaultCell.DEVICE);
    out.pasid = Atomics.load(w, cell + FaultCell.PASID);
    out.iovaLo = Atomics.load(w, cell + FaultCell.IOVA_LO) >>> 0;
    out.iovaHi = Atomics.load(w, cell + FaultCell.IOVA_HI) >>> 0;
    out.access = Atomics.load(w, cell + FaultCell.ACCESS);
    out.reason = Atomics.load(w, cell + FaultCell.REASON);
    out.length = Atomics.load(w, cell + FaultCell.LENGTH);
    // Hand the cell to the producer of the next lap, then move on.
    Atomics.store(w, cell + FaultCell.SEQ, (pos + this.mask + 1) | 0);
    Atomics.store(w, FaultQueueHeader.HEAD, (pos + 1) | 0);
    return true;
  }

  /**
   * Calls `visit` for up to `max` published records, in order, with one reused record object
   * (copy what you keep). Returns the number drained.
   */
  drain(visit: (record: FaultRecord) => void, max = Number.POSITIVE_INFINITY): number {
    let n = 0;
    while (n < max && this.poll(this.record)) {
      n++;
      visit(this.record);
    }
    return n;
  }

  stats(): FaultQueueStats {
    const w = this.words;
    return {
      appended: Atomics.load(w, FaultQueueHeader.APPENDED),
      dropped: Atomics.load(w, FaultQueueHeader.DROPPED),
      // APPENDED moves just after a publish, so for a moment it may trail HEAD.
      pending: Math.max(0, (Atomics.load(w, FaultQueueHeader.APPENDED) - Atomics.load(w, FaultQueueHeader.HEAD)) | 0),
    };
  }
}
