import type { QueueMemory } from '../memory/index.js';
import { formatAddress as hex } from '../memory/index.js';
import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import { DescFlag, MAX_QUEUE_SIZE, RingFlag } from './constants.js';
import { AvailRing, Descriptor, UsedRing } from './layout.js';
import type { BufferSegment, DescriptorChain } from './chain.js';

export { ChainReader, ChainWriter } from './chain.js';
export type { BufferSegment, DescriptorChain } from './chain.js';

/** Where the driver placed a queue, and which ring features were negotiated. */
export interface SplitQueueConfig {
  /** Number of entries; a power of two between 1 and 32768 (checked by the transport). */
  readonly size: number;
  /** Descriptor table address (16-byte aligned). */
  readonly descAddr: number;
  /** Driver area (available ring) address (2-byte aligned). */
  readonly driverAddr: number;
  /** Device area (used ring) address (4-byte aligned). */
  readonly deviceAddr: number;
  /** VIRTIO_F_EVENT_IDX negotiated. */
  readonly eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated. */
  readonly indirect: boolean;
}

/** Which rule a malformed queue broke; `reason` carries the values. */
export type QueueRule =
  | 'queue-config' // size or ring placement unusable
  | 'avail-idx' // avail.idx ran more than the queue size ahead
  | 'head-index' // avail ring entry outside the descriptor table
  | 'next-index' // next field outside the (direct or indirect) table
  | 'chain-length' // more descriptors than the table holds (also a loop)
  | 'indirect-feature' // INDIRECT without VIRTIO_F_INDIRECT_DESC
  | 'indirect-next' // INDIRECT together with NEXT
  | 'indirect-table' // indirect table length or placement unusable
  | 'nested-indirect' // INDIRECT inside an indirect table
  | 'write-order' // device-readable descriptor after a device-writable one
  | 'buffer-range' // a buffer not inside accessible memory
  | 'chain-size' // total length over 2^32 - 1
  | 'memory-fault' // a ring access faulted after the queue was set up
  | 'device-used'; // the device model returned an impossible used entry

/** A malformed ring or chain. Returned, never thrown: the queue is broken from then on. */
export class QueueError {
  constructor(
    readonly reason: string,
    readonly rule: QueueRule = 'queue-config',
  ) {}
  toString(): string {
    return `virtqueue ${this.rule}: ${this.reason}`;
  }
}

/** Position of a queue, for migration and introspection. */
export interface SplitQueueState {
  /** Next avail ring index the device will consume (free-running u16). */
  readonly nextAvail: number;
  /** Next used ring index the device will fill (free-running u16). */
  readonly nextUsed: number;
}

/**
 * Largest indirect table, in descriptors. virtio 1.2 §2.7.5.3.1 caps a chain at the queue size, but
 * drivers do put longer chains in an indirect table of a small queue; the bound kept is the largest
 * queue size, which still makes `next` (a u16) unable to escape a valid table.
 */
export const MAX_INDIRECT_DESCRIPTORS = MAX_QUEUE_SIZE;

const U16 = 0xffff;
const U32_MAX = 0xffff_ffff;

/** virtio 1.2 §2.7.7.2 / §2.7.10: notify when `event` lies in the window [old, new) of indices just passed. */
export function needsEvent(event: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - event - 1) & U16) < ((newIdx - oldIdx) & U16);
}

/**
 * Device side of a split virtqueue (virtio 1.2 §2.7): takes descriptor chains from the available ring
 * and returns them through the used ring. Knows nothing of what the buffers mean; every field the
 * driver wrote is checked before it is trusted, and a malformed ring is reported as a QueueError,
 * after which the queue stays broken until the device is reset (a new SplitQueue).
 *
 * Used buffer notifications: after flushUsed(), call needsNotification(). Available buffer
 * notifications: on by default; a device that polls may disableNotifications() while it drains and
 * must then enableNotifications() and re-check before sleeping. With EVENT_IDX, pop() also moves
 * avail_event along while notifications are enabled, so the driver keeps kicking for new buffers.
 */
export class SplitQueue {
  private readonly size: number;
  private readonly availFlagsAddr: number;
  private readonly availIdxAddr: number;
  private readonly availRingAddr: number;
  private readonly usedEventAddr: number;
  private readonly usedFlagsAddr: number;
  private readonly usedIdxAddr: number;
  private readonly usedRingAddr: number;
  private readonly availEventAddr: number;

  private nextAvail = 0;
  /** Next used slot to fill; slots from `publishedUsed` up to it are written but not yet visible. */
  private nextUsed = 0;
  /** Value last stored in used.idx. */
  private publishedUsed = 0;
  /** used.idx at the last needsNotification() call, and whether that is known (not after restore()). */
  private signalledUsed = 0;
  private signalledValid = true;
  private notificationsEnabled = true;
  /** False when the ring placement is unusable: no ring field may be touched at all. */
  private ringsUsable: boolean;
  private brokenBy: QueueError | null = null;

  constructor(
    readonly memory: QueueMemory,
    readonly config: SplitQueueConfig,
    private readonly log: Logger = silentLogger,
  ) {
    const { size, driverAddr, deviceAddr } = config;
    this.size = size;
    this.availFlagsAddr = driverAddr + AvailRing.flags.offset;
    this.availIdxAddr = driverAddr + AvailRing.idx.offset;
    this.availRingAddr = driverAddr + AvailRing.ring.offset;
    this.usedEventAddr = driverAddr + AvailRing.usedEventOffset(size);
    this.usedFlagsAddr = deviceAddr + UsedRing.flags.offset;
    this.usedIdxAddr = deviceAddr + UsedRing.idx.offset;
    this.usedRingAddr = deviceAddr + UsedRing.ring.offset;
    this.availEventAddr = deviceAddr + UsedRing.availEventOffset(size);
    const problem = this.checkPlacement();
    this.ringsUsable = problem === undefined;
    if (problem !== undefined) this.fail(new QueueError(problem, 'queue-config'));
  }

  /** Why the rings cannot be used, or undefined. Event fields count even without EVENT_IDX (§2.7 size table). */
  private checkPlacement(): string | undefined {
    const { size, descAddr, driverAddr, deviceAddr } = this.config;
    const m = this.memory;
    // virtio 1.2 §2.7: queue size is a power of two, at most 32768.
    if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      return `queue size ${size} is not a power of two in 1..${MAX_QUEUE_SIZE}`;
    }
    // virtio 1.2 §2.7.1: each part starts at a multiple of its alignment.
    if (!Number.isSafeInteger(descAddr) || descAddr < 0 || descAddr % Descriptor.ALIGN !== 0) {
      return `descriptor table at ${hex(descAddr)} is not ${Descriptor.ALIGN}-byte aligned`;
    }
    if (!Number.isSafeInteger(driverAddr) || driverAddr < 0 || driverAddr % AvailRing.ALIGN !== 0) {
      return `available ring at ${hex(driverAddr)} is not ${AvailRing.ALIGN}-byte aligned`;
    }
    if (!Number.isSafeInteger(deviceAddr) || deviceAddr < 0 || deviceAddr % UsedRing.ALIGN !== 0) {
      return `used ring at ${hex(deviceAddr)} is not ${UsedRing.ALIGN}-byte aligned`;
    }
    const descBytes = Descriptor.SIZE * size;
    if (!m.contains(descAddr, descBytes)) {
      return `descriptor table ${hex(descAddr)}+${descBytes} is outside memory`;
    }
    if (!m.contains(driverAddr, AvailRing.sizeFor(size))) {
      return `available ring ${hex(driverAddr)}+${AvailRing.sizeFor(size)} is outside memory`;
    }
    if (!m.contains(deviceAddr, UsedRing.sizeFor(size))) {
      return `used ring ${hex(deviceAddr)}+${UsedRing.sizeFor(size)} is outside memory`;
    }
    return undefined;
  }

  private fail(error: QueueError): QueueError {
    if (this.brokenBy === null) {
      this.brokenBy = error;
      this.log.warn({ rule: error.rule, reason: error.reason, nextAvail: this.nextAvail }, 'virtqueue broken');
    }
    return this.brokenBy;
  }

  /** A ring access threw although placement was checked: the mapping changed under us. */
  private faulted(where: string, err: unknown): QueueError {
    this.ringsUsable = false;
    const detail = err instanceof Error ? err.message : String(err);
    return this.fail(new QueueError(`${where}: ${detail}`, 'memory-fault'));
  }

  /** The error that broke the queue, or null. */
  get broken(): QueueError | null {
    return this.brokenBy;
  }

  /** Whether the driver has made chains available that pop() has not taken. False once broken. */
  hasAvailable(): boolean {
    if (this.brokenBy !== null) return false;
    try {
      return this.memory.atomicLoadU16(this.availIdxAddr) !== this.nextAvail;
    } catch (err) {
      this.faulted('reading avail.idx', err);
      return false;
    }
  }

  /**
   * Takes the next available chain: null when the driver made none available, a QueueError when
   * the ring or chain breaks a spec rule (then every later call returns that same error).
   */
  pop(): DescriptorChain | QueueError | null {
    if (this.brokenBy !== null) return this.brokenBy;
    let result: DescriptorChain | QueueError | null;
    try {
      result = this.take();
    } catch (err) {
      return this.faulted('walking the rings', err);
    }
    if (result instanceof QueueError) return this.fail(result);
    return result;
  }

  private take(): DescriptorChain | QueueError | null {
    const m = this.memory;
    const size = this.size;
    // Acquire: ring entries and descriptors written before idx are visible after this load.
    const availIdx = m.atomicLoadU16(this.availIdxAddr);
    const pending = (availIdx - this.nextAvail) & U16;
    if (pending === 0) return null;
    // virtio 1.2 §2.7.6.1 + §2.7.13: idx never goes back and the ring holds at most `size` heads.
    if (pending > size) {
      return new QueueError(
        `avail.idx ${availIdx} is ${pending} entries ahead of next avail index ${this.nextAvail}, more than queue size ${size}`,
        'avail-idx',
      );
    }
    const slot = this.nextAvail & (size - 1);
    const head = m.readU16(this.availRingAddr + slot * AvailRing.ring.size);
    if (head >= size) {
      return new QueueError(`avail ring slot ${slot} holds head ${head}, queue size is ${size}`, 'head-index');
    }

    const readable: BufferSegment[] = [];
    const writable: BufferSegment[] = [];
    let readableLength = 0;
    let writableLength = 0;
    let table = this.config.descAddr;
    let tableSize = size;
    let inIndirect = false;
    let index = head;
    let count = 0;

    for (;;) {
      // virtio 1.2 §2.7.5.2 and §2.7.5.3.1: a chain is no longer than its table, so walking more
      // descriptors than that means the driver built a loop.
      if (++count > tableSize) {
        return new QueueError(
          `chain from head ${head} has more than ${tableSize} descriptors${inIndirect ? ' in its indirect table' : ''} (loop?)`,
          'chain-length',
        );
      }
      const at = table + index * Descriptor.SIZE;
      const addr = m.readU64Address(at + Descriptor.addr.offset);
      const len = m.readU32(at + Descriptor.len.offset);
      const flags = m.readU16(at + Descriptor.flags.offset);

      if ((flags & DescFlag.INDIRECT) !== 0) {
        // virtio 1.2 §2.7.5.3.1: INDIRECT only with VIRTIO_F_INDIRECT_DESC, once per chain, never with NEXT.
        if (!this.config.indirect) {
          return new QueueError(
            `descriptor ${index} of chain ${head} is INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated`,
            'indirect-feature',
          );
        }
        if (inIndirect) {
          return new QueueError(`indirect descriptor ${index} of chain ${head} is itself INDIRECT`, 'nested-indirect');
        }
        if ((flags & DescFlag.NEXT) !== 0) {
          return new QueueError(`descriptor ${index} of chain ${head} sets both INDIRECT and NEXT`, 'indirect-next');
        }
        if (len === 0 || len % Descriptor.SIZE !== 0) {
          return new QueueError(
            `indirect table of chain ${head} has length ${len}, not a non-zero multiple of ${Descriptor.SIZE}`,
            'indirect-table',
          );
        }
        const entries = len / Descriptor.SIZE;
        if (entries > MAX_INDIRECT_DESCRIPTORS) {
          return new QueueError(
            `indirect table of chain ${head} holds ${entries} descriptors, more than ${MAX_INDIRECT_DESCRIPTORS}`,
            'indirect-table',
          );
        }
        // Unlike the rings, an indirect table needs no particular alignment.
        if (!m.contains(addr, len)) {
          return new QueueError(`indirect table ${hex(addr)}+${len} of chain ${head} is outside memory`, 'indirect-table');
        }
        // virtio 1.2 §2.7.5.3.2: the WRITE flag of this descriptor is ignored; the table's
        // first descriptor is entry 0 and the chain ends with the table.
        table = addr;
        tableSize = entries;
        inIndirect = true;
        index = 0;
        count = 0;
        continue;
      }

      if (!m.contains(addr, len)) {
        return new QueueError(
          `descriptor ${index}${inIndirect ? ' (indirect)' : ''} of chain ${head}: buffer ${hex(addr)}+${len} is outside memory`,
          'buffer-range',
        );
      }
      // virtio 1.2 §2.7.5.2: the chain totals at most 2^32 - 1 bytes (the used len is a u32).
      if (readableLength + writableLength + len > U32_MAX) {
        return new QueueError(`chain ${head} is longer than ${U32_MAX} bytes`, 'chain-size');
      }
      if ((flags & DescFlag.WRITE) !== 0) {
        writable.push({ addr, len });
        writableLength += len;
      } else {
        // virtio 1.2 §2.7.4.2: device-writable descriptors come after all device-readable ones.
        if (writable.length > 0) {
          return new QueueError(
            `descriptor ${index}${inIndirect ? ' (indirect)' : ''} of chain ${head} is device-readable after a device-writable one`,
            'write-order',
          );
        }
        readable.push({ addr, len });
        readableLength += len;
      }

      if ((flags & DescFlag.NEXT) === 0) break;
      const next = m.readU16(at + Descriptor.next.offset);
      if (next >= tableSize) {
        return new QueueError(
          `descriptor ${index}${inIndirect ? ' (indirect)' : ''} of chain ${head} has next ${next}, table holds ${tableSize}`,
          'next-index',
        );
      }
      index = next;
    }

    this.nextAvail = (this.nextAvail + 1) & U16;
    if (this.config.eventIdx && this.notificationsEnabled) {
      // virtio 1.2 §2.7.10: ask for a kick when the driver fills the slot after this one.
      m.atomicStoreU16(this.availEventAddr, this.nextAvail);
    }
    return { head, readable, writable, readableLength, writableLength };
  }

  /** Writes a used element; invisible to the driver until flushUsed(). */
  addUsed(head: number, writtenLength: number): void {
    if (!this.ringsUsable) return;
    const size = this.size;
    if (!Number.isInteger(head) || head < 0 || head >= size) {
      this.fail(new QueueError(`device returned head ${head}, queue size is ${size}`, 'device-used'));
      return;
    }
    if (!Number.isInteger(writtenLength) || writtenLength < 0 || writtenLength > U32_MAX) {
      this.fail(new QueueError(`device returned used length ${writtenLength} for head ${head}`, 'device-used'));
      return;
    }
    if (((this.nextAvail - this.nextUsed) & U16) === 0) {
      this.fail(new QueueError(`device returned head ${head} with no chain outstanding`, 'device-used'));
      return;
    }
    const at = this.usedRingAddr + (this.nextUsed & (size - 1)) * UsedRing.ring.size;
    try {
      this.memory.writeU32(at + UsedRing.elemId.offset, head);
      this.memory.writeU32(at + UsedRing.elemLen.offset, writtenLength);
    } catch (err) {
      this.faulted('writing a used element', err);
      return;
    }
    this.nextUsed = (this.nextUsed + 1) & U16;
  }

  /** Publishes every added used element with one used.idx store (release after the element writes). */
  flushUsed(): void {
    if (!this.ringsUsable || this.publishedUsed === this.nextUsed) return;
    try {
      // virtio 1.2 §2.7.8.2: len and id are set before used.idx moves.
      this.memory.atomicStoreU16(this.usedIdxAddr, this.nextUsed);
    } catch (err) {
      this.faulted('writing used.idx', err);
      return;
    }
    this.publishedUsed = this.nextUsed;
  }

  pushUsed(head: number, writtenLength: number): void {
    this.addUsed(head, writtenLength);
    this.flushUsed();
  }

  /**
   * Whether the driver wants a used buffer notification for what was published since the last
   * call. False when nothing new was published.
   */
  needsNotification(): boolean {
    if (!this.ringsUsable) return false;
    const old = this.signalledUsed;
    const known = this.signalledValid;
    const now = this.publishedUsed;
    this.signalledUsed = now;
    this.signalledValid = true;
    if (known && old === now) return false;
    // After restore() the driver's view is unknown: a spurious notification is harmless (§2.7.7.1).
    if (!known) return true;
    try {
      // Both loads are ordered after the used.idx store (sequentially consistent atomics).
      if (this.config.eventIdx) {
        // virtio 1.2 §2.7.7.2: with EVENT_IDX notify when used.idx passes used_event; flags are ignored.
        return needsEvent(this.memory.atomicLoadU16(this.usedEventAddr), now, old);
      }
      // virtio 1.2 §2.7.7.2: without EVENT_IDX, flags 0 means notify, NO_INTERRUPT means should not.
      return (this.memory.atomicLoadU16(this.availFlagsAddr) & RingFlag.AVAIL_NO_INTERRUPT) === 0;
    } catch (err) {
      this.faulted('reading the driver notification fields', err);
      return false;
    }
  }

  /**
   * Asks the driver to notify again: clears used.flags NO_NOTIFY, or with EVENT_IDX sets
   * avail_event to the next index. Returns true if chains arrived meanwhile (pop before sleeping).
   */
  enableNotifications(): boolean {
    this.notificationsEnabled = true;
    if (!this.ringsUsable) return false;
    try {
      if (this.config.eventIdx) {
        // virtio 1.2 §2.7.10.2: with EVENT_IDX flags stay 0 and avail_event says where to kick.
        this.memory.atomicStoreU16(this.availEventAddr, this.nextAvail);
      } else {
        this.memory.atomicStoreU16(this.usedFlagsAddr, 0);
      }
      // The store above is ordered before this load, so a driver that missed it has published by now
      // (virtio 1.2 §2.7.14: re-check after re-enabling).
      return this.brokenBy === null && this.memory.atomicLoadU16(this.availIdxAddr) !== this.nextAvail;
    } catch (err) {
      this.faulted('enabling notifications', err);
      return false;
    }
  }

  /** Tells the driver kicks are not needed: used.flags NO_NOTIFY, or with EVENT_IDX leave avail_event behind. */
  disableNotifications(): void {
    this.notificationsEnabled = false;
    if (!this.ringsUsable || this.config.eventIdx) return;
    try {
      this.memory.atomicStoreU16(this.usedFlagsAddr, RingFlag.USED_NO_NOTIFY);
    } catch (err) {
      this.faulted('disabling notifications', err);
    }
  }

  /** Next avail index to consume and next used index to fill (call flushUsed() first), and why broken. */
  state(): { nextAvail: number; nextUsed: number; broken: string | null } {
    return { nextAvail: this.nextAvail, nextUsed: this.nextUsed, broken: this.brokenBy?.reason ?? null };
  }

  /**
   * Continues from a saved position (used.idx in memory is the driver's to keep: it is not written).
   * A broken queue stays broken. Throws RangeError for indices that are not u16.
   */
  restore(state: SplitQueueState): void {
    const { nextAvail, nextUsed } = state;
    for (const [name, v] of [['nextAvail', nextAvail], ['nextUsed', nextUsed]] as const) {
      if (!Number.isInteger(v) || v < 0 || v > U16) throw new RangeError(`${name} ${v} is not a u16`);
    }
    this.nextAvail = nextAvail;
    this.nextUsed = nextUsed;
    this.publishedUsed = nextUsed;
    this.signalledValid = false;
  }
}
