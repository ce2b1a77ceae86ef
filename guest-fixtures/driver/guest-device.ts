import type { QueueMemory } from '../../src/memory/index.js';
import type { InterruptWaiter } from '../../src/virtio/interrupt-waiter.js';
import type { GuestAllocator } from './allocator.js';
import type { DriverTransport } from './transport.js';
import { DriverQueue, type DriverBuffer, type UsedBuffer } from './virtqueue.js';
import { driverOk, initializeDevice, STATUS } from './virtio-driver.js';

const F_INDIRECT_DESC = 1n << 28n;
const F_EVENT_IDX = 1n << 29n;

export interface GuestDeviceOptions {
  readonly transport: DriverTransport;
  readonly memory: QueueMemory;
  readonly allocator: GuestAllocator;
  /** Features the driver understands (transport ones included, e.g. VERSION_1, EVENT_IDX). */
  readonly wantedFeatures: bigint;
  /** The device's interrupt output; without it, waits poll the used rings. */
  readonly interrupts?: InterruptWaiter;
  /** Entries per queue (default: the device maximum, capped at 256). */
  readonly queueSize?: number;
  /** How many queues to set up (default: all the device has). */
  readonly queueCount?: number;
}

/** The device stopped serving: DEVICE_NEEDS_RESET, or no answer in time. */
export class GuestDeviceError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
    this.name = 'GuestDeviceError';
  }
}

/**
 * A generic guest virtio driver: initialises the device, lays out and enables its queues, submits
 * chains, kicks when the device asks to be kicked, and waits for used buffers on interrupts (acking
 * them as a kernel's interrupt handler does). Works against a device in this thread or in a worker.
 */
export class GuestDevice {
  readonly queues: DriverQueue[] = [];

  private constructor(
    readonly transport: DriverTransport,
    readonly negotiated: bigint,
    private readonly interrupts: InterruptWaiter | undefined,
  ) {}

  static open(options: GuestDeviceOptions): GuestDevice {
    const { transport } = options;
    const { negotiated } = initializeDevice(transport, { wantedFeatures: options.wantedFeatures });
    const device = new GuestDevice(transport, negotiated, options.interrupts);
    const count = options.queueCount ?? transport.numQueues();
    for (let index = 0; index < count; index++) {
      const max = transport.queueMaxSize(index);
      if (max === 0) throw new GuestDeviceError(`queue ${index} does not exist`, transport.getStatus());
      const size = Math.min(options.queueSize ?? 256, max);
      const queue = DriverQueue.allocate(options.memory, options.allocator, size, {
        eventIdx: (negotiated & F_EVENT_IDX) !== 0n,
        indirect: (negotiated & F_INDIRECT_DESC) !== 0n,
      });
      transport.setupQueue(index, { size, desc: queue.descAddr, driver: queue.driverAddr, device: queue.deviceAddr });
      transport.enableQueue(index);
      device.queues.push(queue);
    }
    driverOk(transport);
    return device;
  }

  queue(index: number): DriverQueue {
    const q = this.queues[index];
    if (q === undefined) throw new RangeError(`queue ${index} is not set up`);
    return q;
  }

  /** Adds a chain and makes it visible; kicks the device if it wants a notification. */
  submit(index: number, buffer: DriverBuffer, options: { indirect?: boolean; token?: unknown; kick?: boolean } = {}): number {
    const q = this.queue(index);
    const head = q.add(buffer, options);
    if (head === undefined) throw new GuestDeviceError(`queue ${index} has no free descriptors`, this.transport.getStatus());
    if (options.kick !== false) this.kick(index);
    return head;
  }

  /** Publishes added chains and notifies the device if its suppression state asks for it. */
  kick(index: number): boolean {
    const q = this.queue(index);
    q.publish();
    if (!q.kickNeeded()) return false;
    this.transport.notify(index);
    return true;
  }

  /**
   * Waits for the next used buffer of queue `index`. Throws GuestDeviceError when the device needs a
   * reset or nothing arrives within `timeoutMs`.
   */
  waitUsed(index: number, timeoutMs = 5000): UsedBuffer {
    const q = this.queue(index);
    const deadline = Date.now() + timeoutMs;
    let acked = false;
    for (;;) {
      const seen = this.interrupts?.count;
      const used = q.popUsed();
      if (used !== undefined) return used;
      const left = deadline - Date.now();
      if (left <= 0) {
        const status = this.transport.getStatus();
        if (status & STATUS.DEVICE_NEEDS_RESET) throw new GuestDeviceError('device needs reset', status);
        throw new GuestDeviceError(`no used buffer on queue ${index} within ${timeoutMs} ms`, status);
      }
      if (this.interrupts !== undefined && seen !== undefined) {
        // Interrupt causes are levels: a cause left set raises no new edge. So before sleeping the
        // handler acknowledges what is pending (a completion found without waiting left it set),
        // looks once more, and only then waits for the next edge.
        if (this.interrupts.status !== 0 && !acked) {
          acked = true;
          if (this.transport.takeInterrupts() & 2 && this.transport.getStatus() & STATUS.DEVICE_NEEDS_RESET) {
            throw new GuestDeviceError('device needs reset', this.transport.getStatus());
          }
          continue;
        }
        acked = false;
        // A device whose worker is gone will never answer: fail now, not at the timeout.
        if (this.interrupts.deviceGone) throw new GuestDeviceError('device worker has stopped', 0);
        this.interrupts.wait(seen, Math.min(left, 100));
        const causes = this.transport.takeInterrupts();
        if (causes & 2) {
          const status = this.transport.getStatus();
          if (status & STATUS.DEVICE_NEEDS_RESET) throw new GuestDeviceError('device needs reset', status);
        }
      }
    }
  }

  /** Waits for `count` used buffers of queue `index`, in completion order. */
  waitUsedMany(index: number, count: number, timeoutMs = 5000): UsedBuffer[] {
    const out: UsedBuffer[] = [];
    while (out.length < count) out.push(this.waitUsed(index, timeoutMs));
    return out;
  }
}
