import { DeviceSignal, MailboxOp, WorkerState } from './signals.js';

/** A register access the device did not answer in time: its worker is gone or stuck. */
export class DeviceTimeoutError extends Error {
  readonly code = 'ETIMEDOUT' as const;
  constructor(what: string, timeoutMs: number) {
    super(`device did not answer ${what} within ${timeoutMs} ms (worker stopped or stuck)`);
    this.name = 'DeviceTimeoutError';
  }
}

export interface MailboxClientOptions {
  /** How long one access may take before DeviceTimeoutError (default 10 s). */
  readonly timeoutMs?: number;
  /** How long to poll the done word before sleeping, in microseconds (default 1000): a running worker answers in about a microsecond, a wake-up from sleep costs tens to hundreds. */
  readonly spinMicros?: number;
}

/**
 * The driving side of the register mailbox: posts one access, wakes the device worker and waits
 * for the answer, like a vCPU thread waiting on an MMIO exit. Synchronous (Atomics.wait), so it
 * runs in Node's main thread or in any worker, never in a browser's main thread.
 */
export class MailboxClient {
  private readonly timeoutMs: number;
  private readonly spinMs: number;

  constructor(
    private readonly signals: Int32Array,
    options: MailboxClientOptions = {},
  ) {
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.spinMs = (options.spinMicros ?? 1000) / 1000;
  }

  /** Performs one access; returns the value read (0 for writes), as an unsigned 32-bit number. */
  access(op: MailboxOp, bar: number, offset: number, size: number, value: number): number {
    const s = this.signals;
    const deadline = Date.now() + this.timeoutMs;
    while (Atomics.compareExchange(s, DeviceSignal.MB_LOCK, 0, 1) !== 0) {
      Atomics.wait(s, DeviceSignal.MB_LOCK, 1, 5);
      if (Date.now() > deadline) throw new DeviceTimeoutError('a mailbox lock', this.timeoutMs);
    }
    try {
      const state = Atomics.load(s, DeviceSignal.WORKER_STATE);
      if (state === WorkerState.STOPPED || state === WorkerState.CRASHED) {
        throw new DeviceTimeoutError(`register access at 0x${offset.toString(16)}`, 0);
      }
      Atomics.store(s, DeviceSignal.MB_OP, op);
      Atomics.store(s, DeviceSignal.MB_BAR, bar);
      Atomics.store(s, DeviceSignal.MB_OFFSET, offset);
      Atomics.store(s, DeviceSignal.MB_SIZE, size);
      Atomics.store(s, DeviceSignal.MB_VALUE, value | 0);
      const seq = (Atomics.add(s, DeviceSignal.MB_SEQ, 1) + 1) | 0;
      Atomics.add(s, DeviceSignal.WAKE, 1);
      Atomics.notify(s, DeviceSignal.WAKE);
      const spinUntil = performance.now() + this.spinMs;
      do {
        for (let i = 0; i < 64; i++) {
          if (Atomics.load(s, DeviceSignal.MB_DONE) === seq) return Atomics.load(s, DeviceSignal.MB_RESULT) >>> 0;
        }
      } while (performance.now() < spinUntil);
      for (;;) {
        const done = Atomics.load(s, DeviceSignal.MB_DONE);
        if (done === seq) return Atomics.load(s, DeviceSignal.MB_RESULT) >>> 0;
        const left = deadline - Date.now();
        if (left <= 0) throw new DeviceTimeoutError(`register access at 0x${offset.toString(16)}`, this.timeoutMs);
        // A worker that died after the post never answers; its host marks it in the state word.
        const now = Atomics.load(s, DeviceSignal.WORKER_STATE);
        if (now === WorkerState.STOPPED || now === WorkerState.CRASHED) throw new DeviceTimeoutError(`register access at 0x${offset.toString(16)}`, 0);
        Atomics.wait(s, DeviceSignal.MB_DONE, done, Math.min(left, 50));
      }
    } finally {
      Atomics.store(s, DeviceSignal.MB_LOCK, 0);
      Atomics.notify(s, DeviceSignal.MB_LOCK, 1);
    }
  }
}

/** One posted access as the device worker sees it. */
export interface MailboxAccess {
  readonly op: MailboxOp;
  readonly bar: number;
  readonly offset: number;
  readonly size: number;
  readonly value: number;
}

/**
 * Device side: answers the posted access, if any. Returns true when one was served. `handle` must
 * not throw (the runner wraps it); whatever it returns is the value the guest reads.
 */
export function serveMailbox(signals: Int32Array, handle: (access: MailboxAccess) => number): boolean {
  const seq = Atomics.load(signals, DeviceSignal.MB_SEQ);
  if (seq === Atomics.load(signals, DeviceSignal.MB_DONE)) return false;
  const access: MailboxAccess = {
    op: Atomics.load(signals, DeviceSignal.MB_OP) as MailboxOp,
    bar: Atomics.load(signals, DeviceSignal.MB_BAR),
    offset: Atomics.load(signals, DeviceSignal.MB_OFFSET),
    size: Atomics.load(signals, DeviceSignal.MB_SIZE),
    value: Atomics.load(signals, DeviceSignal.MB_VALUE) >>> 0,
  };
  const result = handle(access);
  Atomics.store(signals, DeviceSignal.MB_RESULT, result | 0);
  Atomics.add(signals, DeviceSignal.STAT_MAILBOX, 1);
  Atomics.store(signals, DeviceSignal.MB_DONE, seq);
  Atomics.notify(signals, DeviceSignal.MB_DONE);
  return true;
}
