import type { QueueMemory } from '../../src/memory/index.js';
import { DescFlag, MAX_QUEUE_SIZE, RingFlag } from '../../src/virtio/constants.js';
import { AvailRing, Descriptor, UsedRing } from '../../src/virtio/layout.js';
import type { BufferSegment } from '../../src/virtio/chain.js';
import type { SplitQueueConfig } from '../../src/virtio/split-queue.js';
import type { GuestAllocator } from './allocator.js';

/*
 * The driver half of a split virtqueue, as a guest kernel's virtio ring code runs it. It touches the
 * rings only through a QueueMemory, so it runs in whichever thread plays the guest.
 */

const U16 = 0xffff;

/** One descriptor as it sits in a table. */
export interface RawDescriptor {
  readonly addr: number | bigint;
  readonly len: number;
  readonly flags: number;
  readonly next: number;
}

/** Writes descriptor `index` of the table at `tableAddr`, any values at all (hostile tests use this). */
export function writeDescriptor(memory: QueueMemory, tableAddr: number, index: number, desc: RawDescriptor): void {
  const bytes = new Uint8Array(Descriptor.SIZE);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(Descriptor.addr.offset, BigInt.asUintN(64, BigInt(desc.addr)), true);
  view.setUint32(Descriptor.len.offset, desc.len >>> 0, true);
  view.setUint16(Descriptor.flags.offset, desc.flags & U16, true);
  view.setUint16(Descriptor.next.offset, desc.next & U16, true);
  memory.write(tableAddr + index * Descriptor.SIZE, bytes);
}

export function readDescriptor(
  memory: QueueMemory,
  tableAddr: number,
  index: number,
): { addr: number; len: number; flags: number; next: number } {
  const at = tableAddr + index * Descriptor.SIZE;
  return {
    addr: memory.readU64Address(at + Descriptor.addr.offset),
    len: memory.readU32(at + Descriptor.len.offset),
    flags: memory.readU16(at + Descriptor.flags.offset),
    next: memory.readU16(at + Descriptor.next.offset),
  };
}

/** Writes avail.ring[slot % size] = head (not published). */
export function writeAvailEntry(memory: QueueMemory, driverAddr: number, size: number, slot: number, head: number): void {
  memory.writeU16(driverAddr + AvailRing.ring.offset + (slot % size) * AvailRing.ring.size, head & U16);
}

/** Stores avail.idx (an atomic store: everything written before it is visible to the device). */
export function setAvailIdx(memory: QueueMemory, driverAddr: number, idx: number): void {
  memory.atomicStoreU16(driverAddr + AvailRing.idx.offset, idx & U16);
}

export function setAvailFlags(memory: QueueMemory, driverAddr: number, flags: number): void {
  memory.atomicStoreU16(driverAddr + AvailRing.flags.offset, flags & U16);
}

export function setUsedEvent(memory: QueueMemory, driverAddr: number, size: number, value: number): void {
  memory.atomicStoreU16(driverAddr + AvailRing.usedEventOffset(size), value & U16);
}

export function readUsedIdx(memory: QueueMemory, deviceAddr: number): number {
  return memory.atomicLoadU16(deviceAddr + UsedRing.idx.offset);
}

export function readUsedFlags(memory: QueueMemory, deviceAddr: number): number {
  return memory.atomicLoadU16(deviceAddr + UsedRing.flags.offset);
}

export function readAvailEvent(memory: QueueMemory, deviceAddr: number, size: number): number {
  return memory.atomicLoadU16(deviceAddr + UsedRing.availEventOffset(size));
}

/** used.ring[slot % size]. */
export function readUsedElem(memory: QueueMemory, deviceAddr: number, size: number, slot: number): { id: number; len: number } {
  const at = deviceAddr + UsedRing.ring.offset + (slot % size) * UsedRing.ring.size;
  return { id: memory.readU32(at + UsedRing.elemId.offset), len: memory.readU32(at + UsedRing.elemLen.offset) };
}

/** Same rule as the device side: did the other side's index pass `event` going from old to new? */
function needsEvent(event: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - event - 1) & U16) < ((newIdx - oldIdx) & U16);
}

export interface DriverQueueOptions {
  /** VIRTIO_F_EVENT_IDX negotiated. */
  readonly eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated. */
  readonly indirect: boolean;
}

export interface DriverBuffer {
  readonly readable: readonly BufferSegment[];
  readonly writable: readonly BufferSegment[];
}

export interface UsedBuffer {
  readonly head: number;
  readonly len: number;
  readonly token: unknown;
}

/** Book-keeping for one chain the device holds. */
interface InFlight {
  readonly token: unknown;
  /** Ring descriptors it occupies (1 for an indirect chain). */
  readonly count: number;
  /** Last ring descriptor of the chain, to splice the chain back onto the free list. */
  readonly tail: number;
  /** Indirect table to free when the chain comes back. */
  readonly table: number | undefined;
}

/** Driver side of one split virtqueue. */
export class DriverQueue {
  /** Free descriptors are linked through this private array, so the device cannot corrupt the list. */
  private readonly link: Uint16Array;
  private freeHead = 0;
  private numFree: number;
  private readonly inFlight: (InFlight | undefined)[];
  /** avail.idx including added but unpublished entries. */
  private availShadow = 0;
  /** Last value stored to avail.idx. */
  private availPublished = 0;
  /** avail.idx at the last kickNeeded() call. */
  private availKicked = 0;
  private lastUsed = 0;
  private interruptsSuppressed = false;

  private constructor(
    private readonly memory: QueueMemory,
    private readonly allocator: GuestAllocator,
    readonly size: number,
    readonly descAddr: number,
    readonly driverAddr: number,
    readonly deviceAddr: number,
    readonly options: DriverQueueOptions,
  ) {
    this.link = new Uint16Array(size);
    for (let i = 0; i < size; i++) this.link[i] = i + 1;
    this.numFree = size;
    this.inFlight = new Array<InFlight | undefined>(size).fill(undefined);
  }

  /** Allocates and zeroes the three ring parts (virtio 1.2 §2.7 sizes and alignments). */
  static allocate(memory: QueueMemory, allocator: GuestAllocator, size: number, options: DriverQueueOptions): DriverQueue {
    if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      throw new RangeError(`queue size ${size} is not a power of two in 1..${MAX_QUEUE_SIZE}`);
    }
    const descBytes = Descriptor.SIZE * size;
    const descAddr = allocator.alloc(descBytes, Descriptor.ALIGN);
    const driverAddr = allocator.alloc(AvailRing.sizeFor(size), AvailRing.ALIGN);
    const deviceAddr = allocator.alloc(UsedRing.sizeFor(size), UsedRing.ALIGN);
    memory.write(descAddr, new Uint8Array(descBytes));
    memory.write(driverAddr, new Uint8Array(AvailRing.sizeFor(size)));
    // virtio 1.2 §2.7.10.1: the driver initialises used.flags to 0.
    memory.write(deviceAddr, new Uint8Array(UsedRing.sizeFor(size)));
    return new DriverQueue(memory, allocator, size, descAddr, driverAddr, deviceAddr, options);
  }

  /** What the transport is told: ring addresses and negotiated ring features. */
  get config(): SplitQueueConfig {
    return {
      size: this.size,
      descAddr: this.descAddr,
      driverAddr: this.driverAddr,
      deviceAddr: this.deviceAddr,
      eventIdx: this.options.eventIdx,
      indirect: this.options.indirect,
    };
  }

  get freeDescriptors(): number {
    return this.numFree;
  }

  /** Chains added and not yet returned by the device. */
  get outstanding(): number {
    let n = 0;
    for (const f of this.inFlight) if (f !== undefined) n++;
    return n;
  }

  /**
   * Places a buffer in the descriptor table and the next avail slot (visible after publish()).
   * Returns the head, or undefined when there are not enough free descriptors.
   */
  add(buffer: DriverBuffer, opts: { indirect?: boolean; token?: unknown } = {}): number | undefined {
    const segments = [
      ...buffer.readable.map((s) => ({ s, write: false })),
      ...buffer.writable.map((s) => ({ s, write: true })),
    ];
    if (segments.length === 0) throw new RangeError('a buffer needs at least one segment');
    const indirect = opts.indirect ?? false;
    if (indirect && !this.options.indirect) throw new Error('indirect descriptors were not negotiated');

    let head: number;
    let tail: number;
    let count: number;
    let table: number | undefined;
    if (indirect) {
      if (this.numFree < 1) return undefined;
      table = this.allocator.alloc(segments.length * Descriptor.SIZE, Descriptor.ALIGN);
      segments.forEach(({ s, write }, i) => {
        const last = i === segments.length - 1;
        writeDescriptor(this.memory, table!, i, {
          addr: s.addr,
          len: s.len,
          flags: (write ? DescFlag.WRITE : 0) | (last ? 0 : DescFlag.NEXT),
          next: last ? 0 : i + 1,
        });
      });
      head = tail = this.takeFree();
      count = 1;
      writeDescriptor(this.memory, this.descAddr, head, {
        addr: table,
        len: segments.length * Descriptor.SIZE,
        flags: DescFlag.INDIRECT,
        next: 0,
      });
    } else {
      if (this.numFree < segments.length) return undefined;
      count = segments.length;
      const indices = segments.map(() => this.takeFree());
      head = indices[0]!;
      tail = indices[indices.length - 1]!;
      segments.forEach(({ s, write }, i) => {
        const next = indices[i + 1];
        writeDescriptor(this.memory, this.descAddr, indices[i]!, {
          addr: s.addr,
          len: s.len,
          flags: (write ? DescFlag.WRITE : 0) | (next === undefined ? 0 : DescFlag.NEXT),
          next: next ?? 0,
        });
      });
    }
    this.inFlight[head] = { token: opts.token, count, tail, table };
    writeAvailEntry(this.memory, this.driverAddr, this.size, this.availShadow, head);
    this.availShadow = (this.availShadow + 1) & U16;
    return head;
  }

  private takeFree(): number {
    const i = this.freeHead;
    this.freeHead = this.link[i]!;
    this.numFree--;
    return i;
  }

  /** Makes every added chain visible: one avail.idx store after the ring entries (§2.7.13.3.1). */
  publish(): void {
    if (this.availPublished === this.availShadow) return;
    setAvailIdx(this.memory, this.driverAddr, this.availShadow);
    this.availPublished = this.availShadow;
  }

  /**
   * Whether the chains published since the last call need an available buffer notification
   * (virtio 1.2 §2.7.10.1: avail_event with EVENT_IDX, else used.flags NO_NOTIFY).
   */
  kickNeeded(): boolean {
    const old = this.availKicked;
    const now = this.availPublished;
    this.availKicked = now;
    if (old === now) return false;
    // §2.7.13.4.1: idx was stored before these loads (sequentially consistent atomics).
    if (this.options.eventIdx) return needsEvent(readAvailEvent(this.memory, this.deviceAddr, this.size), now, old);
    return (readUsedFlags(this.memory, this.deviceAddr) & RingFlag.USED_NO_NOTIFY) === 0;
  }

  /** Used entries the device published and popUsed() has not taken. */
  pendingUsed(): number {
    return (readUsedIdx(this.memory, this.deviceAddr) - this.lastUsed) & U16;
  }

  /**
   * Takes the next used entry, frees its descriptors (and indirect table), and returns its token.
   * Throws when the device published something impossible: that is the device's bug to report.
   */
  popUsed(): UsedBuffer | undefined {
    const usedIdx = readUsedIdx(this.memory, this.deviceAddr);
    const pending = (usedIdx - this.lastUsed) & U16;
    if (pending === 0) return undefined;
    if (pending > this.size) {
      throw new Error(`device moved used.idx to ${usedIdx}, ${pending} ahead of ${this.lastUsed} (queue size ${this.size})`);
    }
    const { id, len } = readUsedElem(this.memory, this.deviceAddr, this.size, this.lastUsed);
    const entry = id < this.size ? this.inFlight[id] : undefined;
    if (entry === undefined) throw new Error(`device returned id ${id}, which is not an outstanding head`);
    this.lastUsed = (this.lastUsed + 1) & U16;
    this.inFlight[id] = undefined;
    this.link[entry.tail] = this.freeHead;
    this.freeHead = id;
    this.numFree += entry.count;
    if (entry.table !== undefined) this.allocator.free(entry.table);
    this.updateUsedEvent();
    return { head: id, len, token: entry.token };
  }

  /**
   * Asks the device not to notify (true) or to notify again (false). Without EVENT_IDX this is
   * avail.flags NO_INTERRUPT; with it, used_event (§2.7.7.1). Returns, when enabling, whether used
   * entries are already pending (process them: no notification will come for those).
   */
  suppressInterrupts(on: boolean): boolean {
    this.interruptsSuppressed = on;
    if (this.options.eventIdx) this.updateUsedEvent();
    else setAvailFlags(this.memory, this.driverAddr, on ? RingFlag.AVAIL_NO_INTERRUPT : 0);
    return !on && this.pendingUsed() > 0;
  }

  /**
   * With EVENT_IDX: when enabled, ask for a notification as the device fills the next slot; when
   * suppressed, park used_event just behind us: the device, at most `size` entries ahead, does not
   * pass that index again before the 16-bit index wraps (a late notification for entries it had
   * already published is still possible, and harmless).
   */
  private updateUsedEvent(): void {
    if (!this.options.eventIdx) return;
    const event = this.interruptsSuppressed ? this.lastUsed - 1 : this.lastUsed;
    setUsedEvent(this.memory, this.driverAddr, this.size, event);
  }
}
