import {
  readAvailEvent,
  readUsedIdx,
  setAvailIdx,
  setUsedEvent,
  writeAvailEntry,
  writeDescriptor,
  type DriverQueue,
} from '../guest-fixtures/driver/virtqueue.js';
import type { GuestMemory } from '../src/memory/index.js';
import { DescFlag } from '../src/virtio/constants.js';

const U16 = 0xffff;
const STUCK_MS = 5000;

/** A request whose two descriptors were written once: only its head goes into the avail ring. */
export interface FixedRequest {
  readonly head: number;
}

/**
 * A polling guest driver for one split virtqueue, taking over a queue the generic driver set up
 * (so negotiation and layout stay the fixture's). Each request's readable and writable descriptors
 * are written once; a submission writes only avail-ring entries, one avail.idx store and, if the
 * device asks for it, one doorbell. Completion is polled on used.idx with interrupts parked away.
 * The guest then costs tens of nanoseconds per request, so the figures are the device's.
 */
export class PollingQueue {
  private readonly size: number;
  private readonly descAddr: number;
  private readonly driverAddr: number;
  private readonly deviceAddr: number;
  private nextDescriptor = 0;
  private avail: number;
  private used: number;

  /** `queue` must be idle (nothing outstanding); the generic driver must not use it afterwards. */
  constructor(
    private readonly memory: GuestMemory,
    queue: DriverQueue,
    private readonly kick: () => void,
  ) {
    this.size = queue.size;
    this.descAddr = queue.descAddr;
    this.driverAddr = queue.driverAddr;
    this.deviceAddr = queue.deviceAddr;
    this.used = readUsedIdx(memory, this.deviceAddr);
    this.avail = this.used;
    // Ask for no used-buffer notifications: park used_event just behind the used index.
    setUsedEvent(memory, this.driverAddr, this.size, this.used - 1);
  }

  /** Lays out a request: `readable` bytes at readAddr, `writable` bytes at writeAddr. */
  prepare(readAddr: number, readLen: number, writeAddr: number, writeLen: number): FixedRequest {
    if (this.nextDescriptor + 2 > this.size) throw new RangeError('no descriptors left for another fixed request');
    const head = this.nextDescriptor;
    this.nextDescriptor += 2;
    writeDescriptor(this.memory, this.descAddr, head, { addr: readAddr, len: readLen, flags: DescFlag.NEXT, next: head + 1 });
    writeDescriptor(this.memory, this.descAddr, head + 1, { addr: writeAddr, len: writeLen, flags: DescFlag.WRITE, next: 0 });
    return { head };
  }

  /** Makes `requests` available behind one avail.idx store and at most one doorbell. */
  submit(requests: readonly FixedRequest[]): void {
    const old = this.avail;
    for (let i = 0; i < requests.length; i++) writeAvailEntry(this.memory, this.driverAddr, this.size, old + i, requests[i]!.head);
    const now = (old + requests.length) & U16;
    this.avail = now;
    setAvailIdx(this.memory, this.driverAddr, now);
    // virtio 1.2 §2.7.10.1 with EVENT_IDX: notify only when avail_event lies in (old, now].
    const event = readAvailEvent(this.memory, this.deviceAddr, this.size);
    if (((now - event - 1) & U16) < ((now - old) & U16)) this.kick();
  }

  /** Spins until `count` more used entries are published. */
  waitUsed(count: number): void {
    const target = (this.used + count) & U16;
    let spins = 0;
    let t0 = 0;
    while (readUsedIdx(this.memory, this.deviceAddr) !== target) {
      if (++spins === 1 << 20) {
        spins = 0;
        const now = performance.now();
        if (t0 === 0) t0 = now;
        else if (now - t0 > STUCK_MS) throw new Error('device stopped returning used buffers');
      }
    }
    this.used = target;
    setUsedEvent(this.memory, this.driverAddr, this.size, target - 1);
  }
}
