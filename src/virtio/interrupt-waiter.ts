import { DeviceSignal, WorkerState } from './signals.js';

/**
 * The guest side of a device's interrupt output: waits for the interrupt count in the signal block
 * to move, spinning briefly first (a busy device answers in microseconds) and then sleeping.
 */
export class InterruptWaiter {
  private readonly signals: Int32Array;

  constructor(
    signalBuffer: SharedArrayBuffer,
    /** How long to poll before sleeping, in microseconds. */
    private readonly spinMicros = 1000,
  ) {
    this.signals = new Int32Array(signalBuffer);
  }

  /** Interrupts raised so far (wraps at 2^32). */
  get count(): number {
    return Atomics.load(this.signals, DeviceSignal.IRQ_COUNT);
  }

  /** Whether the device's worker has stopped or crashed: no interrupt will ever come. */
  get deviceGone(): boolean {
    const state = Atomics.load(this.signals, DeviceSignal.WORKER_STATE);
    return state === WorkerState.STOPPED || state === WorkerState.CRASHED;
  }

  /** Pending causes as the transport last published them (InterruptCause bits). */
  get status(): number {
    return Atomics.load(this.signals, DeviceSignal.IRQ_STATUS);
  }

  /**
   * Waits until an interrupt arrives after count `since`. Returns the new count, or undefined when
   * `timeoutMs` passed first.
   */
  wait(since: number, timeoutMs: number): number | undefined {
    const s = this.signals;
    const spinUntil = performance.now() + Math.min(this.spinMicros / 1000, timeoutMs);
    do {
      for (let i = 0; i < 64; i++) {
        const now = Atomics.load(s, DeviceSignal.IRQ_COUNT);
        if (now !== since) return now;
      }
    } while (performance.now() < spinUntil);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const now = Atomics.load(s, DeviceSignal.IRQ_COUNT);
      if (now !== since) return now;
      const left = deadline - Date.now();
      if (left <= 0) return undefined;
      Atomics.wait(s, DeviceSignal.IRQ_COUNT, since, left);
    }
  }
}
