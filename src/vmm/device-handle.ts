import { Worker } from 'node:worker_threads';
import type { GuestMemory } from '../memory/index.js';
import { releaseRemote, wrapPort, type Remote } from '../runtime/comlink.js';
import type { DeviceModelSpec, DeviceWorkerApi, DeviceWorkerStart, DeviceWorkerState, TransportKind } from '../runtime/device-worker-protocol.js';
import { workerUrl } from '../runtime/worker-url.js';
import type { MmioBus, PciBus } from '../virtio/bus.js';
import { MmioBusClient, PciBusClient } from '../virtio/bus-client.js';
import { InterruptWaiter } from '../virtio/interrupt-waiter.js';
import { PCI_NOTIFY_BAR, pciNotifyOffset } from '../virtio/pci.js';
import { DeviceSignal, WorkerState, createSignalBuffer, ringDoorbell } from '../virtio/signals.js';

export interface SpawnDeviceOptions {
  readonly name: string;
  readonly model: DeviceModelSpec;
  readonly transport: TransportKind;
  readonly memory: GuestMemory;
  /** Queues the model has, for the PCI client's doorbell window (default 8). */
  readonly queues?: number;
  readonly maxSpinMicros?: number;
  /** How long a register access may wait for the worker (default 10 s). */
  readonly accessTimeoutMs?: number;
  /**
   * Start from another worker's saveState() (taken while it was paused) instead of a device just
   * reset. `model` and `transport` must be those the state was saved with; a state that does not
   * fit fails the spawn (DeviceWorkerError saying why).
   */
  readonly restore?: DeviceWorkerState;
}

let liveWorkers = 0;

/** Counts `worker` in DeviceHandle.liveWorkers until it exits (every worker a machine starts). */
export function countWorker(worker: Worker): void {
  liveWorkers++;
  worker.once('exit', () => {
    liveWorkers--;
  });
}

/** Failure of a device worker, reported to whoever holds its handle. */
export class DeviceWorkerError extends Error {
  readonly code = 'EDEVICEWORKER' as const;
  constructor(
    readonly device: string,
    message: string,
  ) {
    super(`device ${device}: ${message}`);
    this.name = 'DeviceWorkerError';
  }
}

/** What every device worker's control plane offers: readiness through stats, and stop. */
export interface DeviceControl {
  stats(): unknown;
  stop(): Promise<void>;
}

/** A device worker that can be paused and saved for a migration (the device worker, the DMA engine's). */
export interface MigratableControl<State> extends DeviceControl {
  pause(): Promise<void>;
  resume(): void;
  saveState(): State;
}

/** The `restore` field a start message takes, if any. */
export type RestoreOf<Start> = Start extends { readonly restore?: infer State } ? State : never;

/** A worker entry point in workers/ hosting one virtio device, and its start message. */
export interface DeviceLaunch<Start> {
  /** Worker entry name (workers/NAME.ts, run from dist/). */
  readonly entry: string;
  readonly name: string;
  readonly transport: TransportKind;
  /** The start message; must carry `signals` (the device's signal block). */
  readonly start: Start & { readonly signals: SharedArrayBuffer };
  /** Queues the model has, for the PCI client's doorbell window (default 8). */
  readonly queues?: number;
  readonly accessTimeoutMs?: number;
  /** Put into the start message as `restore` (the same as giving it there). */
  readonly restore?: RestoreOf<Start>;
}

/**
 * A virtio device running in its own worker, as the VMM sees it: the register bus (synchronous
 * accesses through the mailbox, doorbells without a round trip), the interrupt output, and the
 * comlink control plane.
 */
export class DeviceHandle<Api extends DeviceControl = DeviceWorkerApi> {
  /** The worker's failure, once it has failed. */
  failure: DeviceWorkerError | undefined;
  private exited = false;
  /** Device and endpoint workers started from this thread and not exited yet: a leak shows here. */
  static get liveWorkers(): number {
    return liveWorkers;
  }
  private closing: Promise<void> | undefined;

  private constructor(
    readonly name: string,
    readonly transport: TransportKind,
    readonly worker: Worker,
    readonly signals: SharedArrayBuffer,
    readonly control: Remote<Api>,
    readonly bus: MmioBus | PciBus,
    readonly interrupts: InterruptWaiter,
  ) {
    worker.on('error', (err) => {
      this.failure = new DeviceWorkerError(name, `worker crashed: ${err.message}`);
      Atomics.store(new Int32Array(signals), DeviceSignal.WORKER_STATE, WorkerState.CRASHED);
    });
    countWorker(worker);
    worker.on('exit', (code) => {
      this.exited = true;
      const s = new Int32Array(signals);
      if (Atomics.load(s, DeviceSignal.WORKER_STATE) !== WorkerState.CRASHED) {
        Atomics.store(s, DeviceSignal.WORKER_STATE, WorkerState.STOPPED);
      }
      if (code !== 0 && this.failure === undefined) this.failure = new DeviceWorkerError(name, `worker exited with code ${code}`);
    });
  }

  /** A generic virtio device (loopback, ...) in the device worker. */
  static async spawn(options: SpawnDeviceOptions): Promise<DeviceHandle> {
    const start: DeviceWorkerStart = {
      name: options.name,
      model: options.model,
      transport: options.transport,
      memory: options.memory.describe(),
      signals: createSignalBuffer(),
      ...(options.maxSpinMicros !== undefined ? { maxSpinMicros: options.maxSpinMicros } : {}),
      ...(options.restore !== undefined ? { restore: options.restore } : {}),
    };
    return DeviceHandle.launch<DeviceWorkerApi, DeviceWorkerStart>({
      entry: 'device-worker',
      name: options.name,
      transport: options.transport,
      start,
      ...(options.queues !== undefined ? { queues: options.queues } : {}),
      ...(options.accessTimeoutMs !== undefined ? { accessTimeoutMs: options.accessTimeoutMs } : {}),
    });
  }

  /** Any device worker entry: starts it, wires its bus and interrupts, waits until it answers. */
  static async launch<Api extends DeviceControl, Start>(options: DeviceLaunch<Start>): Promise<DeviceHandle<Api>> {
    const { signals } = options.start;
    const workerData = options.restore !== undefined ? { ...options.start, restore: options.restore } : options.start;
    const worker = new Worker(workerUrl(options.entry), { workerData, name: `viommu:${options.name}` });
    const control = wrapPort<Api>(worker);
    const clientOptions = options.accessTimeoutMs !== undefined ? { timeoutMs: options.accessTimeoutMs } : {};
    const bus =
      options.transport === 'mmio'
        ? new MmioBusClient(signals, clientOptions)
        : new PciBusClient(signals, { bar: PCI_NOTIFY_BAR, offsetOf: pciNotifyOffset, queues: options.queues ?? 8 }, clientOptions);
    const handle = new DeviceHandle<Api>(options.name, options.transport, worker, signals, control, bus, new InterruptWaiter(signals));
    // The first control call answers once the worker has built its device: that is readiness.
    try {
      await Promise.race([
        (control as Remote<DeviceControl>).stats(),
        new Promise((_, reject) => worker.once('error', (err) => reject(new DeviceWorkerError(options.name, `failed to start: ${err.message}`)))),
      ]);
    } catch (err) {
      releaseRemote(control);
      await worker.terminate();
      throw err;
    }
    return handle;
  }

  /**
   * Pauses the device for a migration: resolves once it does no more work (no register access,
   * doorbell, repeating transfer or DMA in progress). Register accesses made meanwhile wait for
   * resume(); doorbells stay pending.
   */
  async pause<State>(this: DeviceHandle<MigratableControl<State>>): Promise<void> {
    await (this.control as Remote<MigratableControl<State>>).pause();
  }

  /** Serves again after pause(). */
  async resume<State>(this: DeviceHandle<MigratableControl<State>>): Promise<void> {
    await (this.control as Remote<MigratableControl<State>>).resume();
  }

  /** The paused device's state, for a new worker's `restore`. Rejects unless paused. */
  async saveState<State>(this: DeviceHandle<MigratableControl<State>>): Promise<State> {
    return (await (this.control as Remote<MigratableControl<State>>).saveState()) as State;
  }

  /** Rings queue `index`'s doorbell directly (what a QueueNotify write does). */
  ringDoorbell(index: number): void {
    ringDoorbell(new Int32Array(this.signals), index);
  }

  /** Stops the device loop and ends the worker. Safe to call twice and after a crash. */
  close(): Promise<void> {
    // A migrated device is closed by whoever switched away from it and again by its owner.
    this.closing ??= this.shutDown();
    return this.closing;
  }

  private async shutDown(): Promise<void> {
    if (!this.exited && this.failure === undefined) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      try {
        await Promise.race([
          (this.control as Remote<DeviceControl>).stop(),
          new Promise((resolve) => {
            timer = setTimeout(resolve, 2000);
          }),
        ]);
      } catch {
        // The worker may already be going away; terminate below either way.
      } finally {
        clearTimeout(timer);
      }
    }
    releaseRemote(this.control);
    await this.worker.terminate();
  }
}
