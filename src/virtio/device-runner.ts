import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import { serveMailbox, type MailboxAccess } from './mailbox.js';
import { ControlRequest, DeviceSignal, MAX_SIGNALLED_QUEUES, WorkerState } from './signals.js';

/** Longest stretch of uninterrupted work before the runner lets its worker's message loop run. */
const YIELD_AFTER_MS = 5;

/** What the runner drives: a transport (and through it a device model). No method may throw. */
export interface RunnerTarget {
  /** A register access forwarded through the mailbox; returns the value the guest reads. */
  access(access: MailboxAccess): number;
  /** The guest rang queue `index`'s doorbell. */
  notifyQueue(index: number): void;
  /** Host-initiated device reset. */
  reset(): void;
  /** Device work that does not come from the guest (e.g. delivering fault events); true if any was done. */
  poll?(): boolean;
}

export interface RunnerOptions {
  /** Longest busy-wait before sleeping, in microseconds (default 1000: longer than a wake-up on a busy host, so two waiting sides cannot keep missing each other). 0 never spins. */
  readonly maxSpinMicros?: number;
  readonly log?: Logger;
}

/**
 * The device worker's event loop. After each burst of work it spins on the wake word for a bounded
 * time that adapts to the traffic (see adapt()), then sleeps with Atomics.waitAsync so the worker's message loop (the comlink control plane) stays
 * responsive. It never polls with timers.
 */
export class DeviceRunner {
  private readonly signals: Int32Array;
  private readonly log: Logger;
  private readonly maxSpinMs: number;
  private spinMs: number;
  private stopped = false;
  /** Asked to pause: the loop parks at its next turn, between steps. */
  private pauseRequested = false;
  /** Parked: the loop takes no step until resume(). */
  private parked = false;
  private pauseWaiters: (() => void)[] = [];

  constructor(
    signalBuffer: SharedArrayBuffer,
    private readonly target: RunnerTarget,
    options: RunnerOptions = {},
  ) {
    this.signals = new Int32Array(signalBuffer);
    this.log = options.log ?? silentLogger;
    this.maxSpinMs = (options.maxSpinMicros ?? 1000) / 1000;
    this.spinMs = this.maxSpinMs;
  }

  /** Handles everything pending once. Returns true if anything was done. */
  step(): boolean {
    const s = this.signals;
    let worked = false;
    const control = Atomics.exchange(s, DeviceSignal.CONTROL, 0);
    if (control & ControlRequest.RESET) {
      this.guard('reset', () => this.target.reset());
      worked = true;
    }
    if (control & ControlRequest.STOP) this.stopped = true;
    if (serveMailbox(s, (a) => this.guard('register access', () => this.target.access(a), 0))) worked = true;
    for (let word = 0; word < MAX_SIGNALLED_QUEUES / 32; word++) {
      let bits = Atomics.exchange(s, DeviceSignal.QUEUE_PENDING + word, 0);
      while (bits !== 0) {
        const bit = 31 - Math.clz32(bits & -bits);
        bits &= bits - 1;
        const queue = word * 32 + bit;
        Atomics.add(s, DeviceSignal.STAT_DOORBELLS, 1);
        this.guard('queue notify', () => this.target.notifyQueue(queue));
        worked = true;
      }
    }
    if (this.target.poll !== undefined && this.guard('poll', () => this.target.poll!(), false)) worked = true;
    return worked;
  }

  /** Whether the loop is parked by pause() (and not resumed since). */
  get paused(): boolean {
    return this.parked;
  }

  /**
   * Stops taking steps and resolves once the loop is parked between two of them, so the device
   * does no more work: no register access, doorbell or poll is served half-way and no DMA is in
   * flight. What arrives meanwhile stays pending in the signal block (doorbell bits, a posted
   * register access, control requests other than STOP) for resume() or a restored device.
   * Resolves at once when already paused or stopped.
   */
  pause(): Promise<void> {
    if (this.parked || this.stopped) return Promise.resolve();
    this.pauseRequested = true;
    return new Promise<void>((resolve) => {
      this.pauseWaiters.push(resolve);
      // Wakes a spinning or sleeping loop; a loop that is yielding sees the request at its next turn.
      Atomics.add(this.signals, DeviceSignal.WAKE, 1);
      Atomics.notify(this.signals, DeviceSignal.WAKE);
    });
  }

  /** Takes steps again after pause(), starting with whatever became pending meanwhile. */
  resume(): void {
    if (!this.pauseRequested && !this.parked) return;
    this.pauseRequested = false;
    Atomics.add(this.signals, DeviceSignal.WAKE, 1);
    Atomics.notify(this.signals, DeviceSignal.WAKE);
    // A pause() still waiting for the loop to park has nothing to wait for any more.
    for (const resolve of this.pauseWaiters.splice(0)) resolve();
  }

  /** Serves until a STOP control request arrives; pause() parks it in between. */
  async run(): Promise<void> {
    const s = this.signals;
    Atomics.store(s, DeviceSignal.WORKER_STATE, WorkerState.RUNNING);
    let busySince = performance.now();
    while (!this.stopped) {
      if (this.pauseRequested) {
        await this.park();
        busySince = performance.now();
        continue;
      }
      const wake = Atomics.load(s, DeviceSignal.WAKE);
      if (this.step()) {
        // A device that always has work (a flood of requests, a DMA engine repeating a transfer)
        // still lets its message loop run now and then, so the control plane keeps answering.
        if (performance.now() - busySince > YIELD_AFTER_MS) {
          await new Promise<void>((resolve) => setImmediate(resolve));
          busySince = performance.now();
        }
        continue;
      }
      busySince = performance.now();
      if (this.stopped) break;
      if (this.spinMs > 0 && this.spin(wake)) continue;
      Atomics.store(s, DeviceSignal.WORKER_STATE, WorkerState.SLEEPING);
      const sleptAt = performance.now();
      const waited = Atomics.waitAsync(s, DeviceSignal.WAKE, wake);
      if (waited.async) await waited.value;
      Atomics.store(s, DeviceSignal.WORKER_STATE, WorkerState.RUNNING);
      Atomics.add(s, DeviceSignal.STAT_WAKEUPS, 1);
      this.adapt(performance.now() - sleptAt);
    }
    this.parked = false;
    for (const resolve of this.pauseWaiters.splice(0)) resolve();
    Atomics.store(s, DeviceSignal.WORKER_STATE, WorkerState.STOPPED);
  }

  /**
   * Waits, taking no step, until resume() or a STOP request. Only STOP is taken from the control
   * word; doorbell bits and the mailbox are left for later.
   */
  private async park(): Promise<void> {
    const s = this.signals;
    this.parked = true;
    Atomics.store(s, DeviceSignal.WORKER_STATE, WorkerState.PAUSED);
    for (const resolve of this.pauseWaiters.splice(0)) resolve();
    while (this.pauseRequested) {
      // The wake word first: postControl() sets the request before it bumps the word, so a STOP
      // that lands after the check below still ends the wait.
      const wake = Atomics.load(s, DeviceSignal.WAKE);
      if ((Atomics.and(s, DeviceSignal.CONTROL, ~ControlRequest.STOP) & ControlRequest.STOP) !== 0) {
        this.stopped = true;
        break;
      }
      const waited = Atomics.waitAsync(s, DeviceSignal.WAKE, wake);
      if (waited.async) await waited.value;
    }
    this.parked = false;
    if (!this.stopped) Atomics.store(s, DeviceSignal.WORKER_STATE, WorkerState.RUNNING);
  }

  /** Busy-waits for the wake word to move within the current budget. */
  private spin(wake: number): boolean {
    const s = this.signals;
    const until = performance.now() + this.spinMs;
    for (;;) {
      for (let i = 0; i < 64; i++) if (Atomics.load(s, DeviceSignal.WAKE) !== wake) return true;
      if (performance.now() >= until) return false;
    }
  }

  /**
   * Halt-polling policy, in the spirit of KVM's: a sleep that ended soon (the guest was still
   * talking; the figure includes the wake-up latency, tens to hundreds of microseconds on a busy
   * host) means a longer spin would have paid, so the budget grows back to the maximum; a long sleep
   * means the guest went quiet, so the budget shrinks and an idle worker stops burning a core.
   */
  private adapt(sleptMs: number): void {
    if (sleptMs < 2) this.spinMs = Math.min(this.maxSpinMs, this.spinMs * 4);
    else if (sleptMs > 20) this.spinMs = Math.max(this.maxSpinMs / 64, this.spinMs / 2);
  }

  private guard<T>(what: string, fn: () => T, fallback?: T): T {
    try {
      return fn();
    } catch (err) {
      // Transports and models turn guest errors into statuses; reaching here is a host bug.
      this.log.error({ err, what }, 'device target threw; ignored to keep the worker alive');
      return fallback as T;
    }
  }
}
