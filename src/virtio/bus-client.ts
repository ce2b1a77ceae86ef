import type { AccessSize, MmioBus, PciBus } from './bus.js';
import { MailboxClient, type MailboxClientOptions } from './mailbox.js';
import { MailboxOp, MAX_SIGNALLED_QUEUES, ringDoorbell } from './signals.js';

/** virtio-mmio QueueNotify (virtio 1.2 §4.2.2): the value written is the queue index. */
const MMIO_QUEUE_NOTIFY = 0x50;

/**
 * Splits 8-byte accesses into two 4-byte ones (low half first), the convention of bus.ts, so the
 * mailbox only ever carries 32-bit values.
 */
function split64(
  access: (offset: number, size: 1 | 2 | 4, value: number) => number,
  offset: number,
  size: AccessSize,
  value: number,
): number {
  if (size !== 8) return access(offset, size, value);
  const lo = access(offset, 4, value % 0x1_0000_0000);
  const hi = access(offset + 4, 4, Math.floor(value / 0x1_0000_0000));
  return hi * 0x1_0000_0000 + lo;
}

/**
 * A virtio-mmio window of a device that lives in another thread. Register accesses go through the
 * device's mailbox (a synchronous round trip, like an MMIO exit); QueueNotify writes ring the
 * queue's doorbell instead, with no round trip.
 */
export class MmioBusClient implements MmioBus {
  private readonly mailbox: MailboxClient;
  private readonly signals: Int32Array;

  constructor(signalBuffer: SharedArrayBuffer, options: MailboxClientOptions = {}) {
    this.signals = new Int32Array(signalBuffer);
    this.mailbox = new MailboxClient(this.signals, options);
  }

  read(offset: number, size: AccessSize): number {
    return split64((o, s) => this.mailbox.access(MailboxOp.MMIO_READ, 0, o, s, 0), offset, size, 0);
  }

  write(offset: number, size: AccessSize, value: number): void {
    if (offset === MMIO_QUEUE_NOTIFY && size === 4 && value >>> 0 < MAX_SIGNALLED_QUEUES) {
      ringDoorbell(this.signals, value >>> 0);
      return;
    }
    split64((o, s, v) => this.mailbox.access(MailboxOp.MMIO_WRITE, 0, o, s, v), offset, size, value);
  }
}

/** Where a PCI transport's notification addresses live, so the client can ring doorbells directly. */
export interface PciNotifyWindow {
  readonly bar: number;
  /** Offset of queue i's notify address within the BAR. */
  offsetOf(queueIndex: number): number;
  readonly queues: number;
}

/** A virtio-pci function in another thread: configuration and BAR accesses through the mailbox. */
export class PciBusClient implements PciBus {
  private readonly mailbox: MailboxClient;
  private readonly signals: Int32Array;
  private readonly notifyOffsets: Map<number, number>;

  constructor(
    signalBuffer: SharedArrayBuffer,
    private readonly notify: PciNotifyWindow,
    options: MailboxClientOptions = {},
  ) {
    this.signals = new Int32Array(signalBuffer);
    this.mailbox = new MailboxClient(this.signals, options);
    this.notifyOffsets = new Map();
    for (let q = 0; q < Math.min(notify.queues, MAX_SIGNALLED_QUEUES); q++) this.notifyOffsets.set(notify.offsetOf(q), q);
  }

  configRead(offset: number, size: 1 | 2 | 4): number {
    return this.mailbox.access(MailboxOp.CONFIG_READ, 0, offset, size, 0);
  }

  configWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    this.mailbox.access(MailboxOp.CONFIG_WRITE, 0, offset, size, value);
  }

  barRead(bar: number, offset: number, size: AccessSize): number {
    return split64((o, s) => this.mailbox.access(MailboxOp.BAR_READ, bar, o, s, 0), offset, size, 0);
  }

  barWrite(bar: number, offset: number, size: AccessSize, value: number): void {
    // A write to a queue's notify address is the doorbell (virtio 1.2 §4.1.5.2). Whether memory
    // decoding is enabled is the device's business, but a disabled BAR cannot hold a queue that
    // the driver enabled, so ringing directly is safe: the transport ignores doorbells for queues
    // that are not live.
    if (bar === this.notify.bar && size !== 8) {
      const queue = this.notifyOffsets.get(offset);
      if (queue !== undefined) {
        ringDoorbell(this.signals, queue);
        return;
      }
    }
    split64((o, s, v) => this.mailbox.access(MailboxOp.BAR_WRITE, bar, o, s, v), offset, size, value);
  }
}
