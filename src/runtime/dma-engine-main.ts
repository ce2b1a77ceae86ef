import { threadId, type MessagePort } from 'node:worker_threads';
import { DmaEngine } from '../devices/dma-engine.js';
import { FaultProducer } from '../ioasid/fault-queue.js';
import { QuiescenceWorker } from '../ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../ioasid/translator.js';
import { componentLogger } from '../log/pino.js';
import { TranslatorDmaSpace } from '../memory/dma-space.js';
import { GuestMemory } from '../memory/index.js';
import { DeviceRunner } from '../virtio/device-runner.js';
import type { MailboxAccess } from '../virtio/mailbox.js';
import { ControlRequest, DeviceSignal, MailboxOp, SignalInterruptLine, WorkerState, postControl } from '../virtio/signals.js';
import { exposeOn } from './comlink.js';
import type { DmaEngineWorkerApi, DmaEngineWorkerStart, DmaEngineWorkerState } from './dma-engine-protocol.js';

/**
 * Body of a DMA-engine worker: the engine's registers served through the mailbox (a register
 * write that starts a command returns once the transfer has finished or faulted), its DMA
 * translated by this worker's Translator through the shared page tables.
 */
export function runDmaEngineWorker(start: DmaEngineWorkerStart, port: MessagePort): void {
  const log = componentLogger('dma-engine', { device: start.name });
  const signals = new Int32Array(start.signals);
  const memory = GuestMemory.fromDescriptor(start.memory);
  const t = start.translation;
  const quiescence = QuiescenceWorker.register(t.quiescence, threadId);
  const translator = new Translator({
    pool: t.shared.pool.buffer,
    attachments: new DeviceTableAttachments(t.shared),
    quiescence,
    faults: new FaultProducer(t.faults, new Int32Array(t.iommuSignals), DeviceSignal.WAKE),
  });
  const spaces = new Map<number, TranslatorDmaSpace>();
  const gapMs = (start.repeatGapMicros ?? 50) / 1000;
  const engine = new DmaEngine({
    spaceFor: (pasid) => {
      const key = pasid ?? -1;
      let space = spaces.get(key);
      if (space === undefined) spaces.set(key, (space = new TranslatorDmaSpace(translator, memory, t.row, pasid)));
      return space;
    },
    irq: new SignalInterruptLine(signals),
    ...(start.pasidCapable !== undefined ? { pasidCapable: start.pasidCapable } : {}),
    log,
  });
  if (start.restore !== undefined) {
    try {
      const saved = start.restore as unknown;
      if (typeof saved !== 'object' || saved === null || !Object.hasOwn(saved, 'engine')) throw new TypeError('restore.engine is missing');
      engine.restoreState((saved as { engine: unknown }).engine);
    } catch (err) {
      // No half-restored engine: the start fails, and the quiescence slot is given back.
      quiescence.unregister();
      throw new Error(`restore refused: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
    }
    log.info({ repeating: engine.saveState().repeating !== null }, 'DMA engine restored from saved state');
  }
  const runner = new DeviceRunner(
    start.signals,
    {
      access(a: MailboxAccess): number {
        const size = a.size as 1 | 2 | 4;
        switch (a.op) {
          case MailboxOp.CONFIG_READ:
            return engine.configRead(a.offset, size);
          case MailboxOp.CONFIG_WRITE:
            engine.configWrite(a.offset, size, a.value);
            return 0;
          case MailboxOp.BAR_READ:
            return engine.barRead(a.bar, a.offset, size);
          case MailboxOp.BAR_WRITE:
            engine.barWrite(a.bar, a.offset, size, a.value);
            return 0;
          default:
            log.warn({ op: a.op }, 'a PCI function takes configuration and BAR accesses only; read as all-ones');
            return 0xffff_ffff;
        }
      },
      notifyQueue: (index) => log.debug({ index }, 'doorbell on a device without queues ignored'),
      reset: () => engine.reset(),
      // A repeating transfer runs one pass per loop turn, between register accesses, then rests
      // for the pass gap (or until the guest touches a register): an emulated engine has no bus of
      // its own, so without the gap it would take a whole core from the guest and the IOMMU.
      poll: () => {
        if (!engine.pump()) return false;
        const wake = Atomics.load(signals, DeviceSignal.WAKE);
        if (gapMs > 0) Atomics.wait(signals, DeviceSignal.WAKE, wake, gapMs);
        return true;
      },
    },
    { log, ...(start.maxSpinMicros !== undefined ? { maxSpinMicros: start.maxSpinMicros } : {}) },
  );
  const running = runner.run().catch((err: unknown) => {
    Atomics.store(signals, DeviceSignal.WORKER_STATE, WorkerState.CRASHED);
    log.error({ err }, 'DMA-engine runner failed');
  });
  const api: DmaEngineWorkerApi = {
    stats: () => ({
      engine: engine.stats(),
      translator: translator.stats(),
      registerAccesses: Atomics.load(signals, DeviceSignal.STAT_MAILBOX),
      wakeups: Atomics.load(signals, DeviceSignal.STAT_WAKEUPS),
    }),
    reset: () => engine.reset(),
    async stop(): Promise<void> {
      postControl(signals, ControlRequest.STOP);
      await running;
      // No DMA after the loop ends: the slot goes back, as a migrated-away engine's must.
      quiescence.unregister();
    },
    // A repeating transfer runs in the runner's poll, one pass per turn: parked, it is suspended.
    pause: () => runner.pause(),
    resume: () => runner.resume(),
    saveState(): DmaEngineWorkerState {
      if (!runner.paused) throw new Error(`DMA engine ${start.name}: saveState() needs a paused engine: call pause() first`);
      return { engine: engine.saveState() };
    },
  };
  exposeOn(api, port);
}
