/**
 * The small shared block between a device worker and the threads that drive it: a wake word the
 * worker sleeps on, per-queue doorbell bits, the interrupt output, and a one-slot register
 * mailbox that forwards the guest's MMIO / PCI configuration accesses (a "VM exit") to the device.
 * Only these words cross threads per request; everything else lives in guest memory.
 */
export const DeviceSignal = {
  /** Bumped by every doorbell, mailbox post and control request; the device worker waits on it. */
  WAKE: 0,
  /** WorkerState of the device worker. */
  WORKER_STATE: 1,
  /** The transport's pending interrupt causes (InterruptCause bits), mirrored for the guest. */
  IRQ_STATUS: 2,
  /** Bumped on every interrupt edge; guest-side waiters sleep on it. */
  IRQ_COUNT: 3,
  /** ControlRequest bits set by the host (stop, reset), consumed by the worker. */
  CONTROL: 4,
  /** Doorbell bitmap: queue q is bit (q & 31) of word QUEUE_PENDING + (q >> 5). */
  QUEUE_PENDING: 8,
  /** Mailbox: held by one driving thread at a time (0 free, 1 held). */
  MB_LOCK: 12,
  /** Sequence number of the last posted access. */
  MB_SEQ: 13,
  /** Sequence number of the last completed access. */
  MB_DONE: 14,
  /** MailboxOp of the posted access. */
  MB_OP: 15,
  MB_BAR: 16,
  MB_OFFSET: 17,
  MB_SIZE: 18,
  MB_VALUE: 19,
  MB_RESULT: 20,
  /** Counters the worker keeps for stats without a round trip. */
  STAT_DOORBELLS: 21,
  STAT_MAILBOX: 22,
  STAT_WAKEUPS: 23,
  FIELD_COUNT: 24,
} as const;

/** Queues a single device may have, given the doorbell bitmap's size. */
export const MAX_SIGNALLED_QUEUES = 128;

export const WorkerState = {
  STARTING: 0,
  RUNNING: 1,
  SLEEPING: 2,
  STOPPED: 3,
  CRASHED: 4,
  /** Parked by DeviceRunner.pause(): doorbells and register accesses wait for resume. */
  PAUSED: 5,
} as const;

export const ControlRequest = {
  STOP: 1,
  RESET: 2,
} as const;

export const MailboxOp = {
  MMIO_READ: 1,
  MMIO_WRITE: 2,
  CONFIG_READ: 3,
  CONFIG_WRITE: 4,
  BAR_READ: 5,
  BAR_WRITE: 6,
} as const;
export type MailboxOp = (typeof MailboxOp)[keyof typeof MailboxOp];

/** Allocates a zeroed signal block. */
export function createSignalBuffer(): SharedArrayBuffer {
  return new SharedArrayBuffer(DeviceSignal.FIELD_COUNT * Int32Array.BYTES_PER_ELEMENT);
}

/** Rings queue `queueIndex`'s doorbell: the ioeventfd of this design, no round trip. */
export function ringDoorbell(signals: Int32Array, queueIndex: number): void {
  Atomics.or(signals, DeviceSignal.QUEUE_PENDING + (queueIndex >>> 5), 1 << (queueIndex & 31));
  Atomics.add(signals, DeviceSignal.WAKE, 1);
  Atomics.notify(signals, DeviceSignal.WAKE);
}

/** Posts a control request (stop / reset) and wakes the worker. */
export function postControl(signals: Int32Array, request: number): void {
  Atomics.or(signals, DeviceSignal.CONTROL, request);
  Atomics.add(signals, DeviceSignal.WAKE, 1);
  Atomics.notify(signals, DeviceSignal.WAKE);
}

/** The device side of the interrupt output: InterruptLine over the signal block. */
export class SignalInterruptLine {
  constructor(private readonly signals: Int32Array) {}
  set(status: number): void {
    const previous = Atomics.exchange(this.signals, DeviceSignal.IRQ_STATUS, status);
    if ((status & ~previous) !== 0) {
      Atomics.add(this.signals, DeviceSignal.IRQ_COUNT, 1);
      Atomics.notify(this.signals, DeviceSignal.IRQ_COUNT);
    }
  }
}
