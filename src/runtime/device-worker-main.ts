import { threadId, type MessagePort } from 'node:worker_threads';
import { LoopbackDevice } from '../devices/loopback.js';
import { VirtioNetDevice } from '../devices/virtio-net.js';
import { FaultProducer } from '../ioasid/fault-queue.js';
import { QuiescenceWorker } from '../ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../ioasid/translator.js';
import { componentLogger } from '../log/pino.js';
import type { Logger } from '../log/logger.js';
import { PhysicalDmaSpace, TranslatorDmaSpace, type TranslatingDmaSpace } from '../memory/dma-space.js';
import { queueMemoryFor } from '../memory/iova-queue-memory.js';
import { GuestMemory, type QueueMemory } from '../memory/index.js';
import type { VirtioDeviceModel } from '../virtio/device.js';
import { DeviceRunner, type RunnerTarget } from '../virtio/device-runner.js';
import type { MailboxAccess } from '../virtio/mailbox.js';
import { MmioTransport } from '../virtio/mmio.js';
import { PciTransport, type PciSnapshot } from '../virtio/pci.js';
import { stateBoolean, stateRecord } from '../virtio/saved-state.js';
import { ControlRequest, DeviceSignal, MailboxOp, SignalInterruptLine, WorkerState, postControl, ringDoorbell } from '../virtio/signals.js';
import { exposeOn } from './comlink.js';
import type {
  DeviceIommuSpec,
  DeviceModelSpec,
  DeviceWorkerApi,
  DeviceWorkerStart,
  DeviceWorkerState,
  DeviceWorkerStats,
  MmioSnapshot,
  VirtioNetSpecOptions,
} from './device-worker-protocol.js';

/** A device model as a worker hosts it, with what its transport and control plane need besides. */
export interface HostedModel {
  readonly model: VirtioDeviceModel;
  /** The transport's queueMemory hook, for models that may see IOVAs. */
  readonly queueMemory?: (negotiated: bigint) => QueueMemory;
  /** The model's counters, for the control plane's stats(). */
  readonly stats?: () => Record<string, number>;
  /** Releases what the model holds in shared state (its quiescence slot). */
  readonly close?: () => void;
}

/** Builds the device model a start message names. */
export function hostDeviceModel(spec: DeviceModelSpec, memory: GuestMemory, log: Logger): HostedModel {
  switch (spec.kind) {
    case 'loopback':
      return { model: new LoopbackDevice(spec.options) };
    case 'virtio-net':
      return hostVirtioNet(spec.options ?? {}, memory, log);
  }
}

/**
 * This worker's view of memory through the IOMMU: its own translator (IOTLB, quiescence slot,
 * fault producer) over the context's shared tables, for one device-table row.
 */
export function iommuDmaSpace(spec: DeviceIommuSpec, memory: GuestMemory): { dma: TranslatorDmaSpace; quiescence: QuiescenceWorker } {
  // Host configuration, not guest input: a bad one fails the worker's start.
  if (!Number.isSafeInteger(spec.row) || spec.row < 0) throw new RangeError(`device-table row must be a non-negative integer, got ${spec.row}`);
  if (!Number.isSafeInteger(spec.wakeIndex) || spec.wakeIndex < 0 || spec.wakeIndex >= spec.wake.byteLength / 4) {
    throw new RangeError(`wake index ${spec.wakeIndex} is outside the wake buffer`);
  }
  const quiescence = QuiescenceWorker.register(spec.quiescence, threadId);
  const translator = new Translator({
    pool: spec.shared.pool.buffer,
    attachments: new DeviceTableAttachments(spec.shared),
    quiescence,
    faults: new FaultProducer(spec.faults, new Int32Array(spec.wake), spec.wakeIndex),
  });
  return { dma: new TranslatorDmaSpace(translator, memory, spec.row, spec.pasid), quiescence };
}

function hostVirtioNet(options: VirtioNetSpecOptions, memory: GuestMemory, log: Logger): HostedModel {
  let dma: TranslatingDmaSpace = new PhysicalDmaSpace(memory);
  let close: (() => void) | undefined;
  if (options.iommu !== undefined) {
    const behind = iommuDmaSpace(options.iommu, memory);
    dma = behind.dma;
    close = () => behind.quiescence.unregister();
  }
  const device = new VirtioNetDevice({
    dma,
    behindIommu: options.iommu !== undefined,
    log,
    ...(options.mac !== undefined ? { mac: options.mac } : {}),
    ...(options.queueSize !== undefined ? { queueSize: options.queueSize } : {}),
    ...(options.rxBacklog !== undefined ? { rxBacklog: options.rxBacklog } : {}),
  });
  return {
    model: device,
    queueMemory: queueMemoryFor(dma),
    stats: () => ({ ...device.stats() }),
    ...(close !== undefined ? { close } : {}),
  };
}

type Transport = MmioTransport | PciTransport;

/**
 * Applies a saved worker state to a model and transport just built: the model's own state first,
 * then the transport, which activates the model at the saved queue positions. Throws (naming the
 * field) when the state does not fit this worker.
 */
export function restoreDevice(saved: unknown, start: Pick<DeviceWorkerStart, 'model' | 'transport'>, model: VirtioDeviceModel, transport: Transport): void {
  const r = stateRecord(saved, 'restore', ['modelKind', 'transportKind', 'transport', 'model']);
  if (r.modelKind !== start.model.kind) throw new RangeError(`restore.modelKind is ${String(r.modelKind)}, this worker hosts ${start.model.kind}`);
  if (r.transportKind !== start.transport) throw new RangeError(`restore.transportKind is ${String(r.transportKind)}, this worker serves virtio-${start.transport}`);
  // The transport checks its snapshot's contents; its outline is checked here so a stray value
  // is refused with a field name rather than a TypeError from deep inside.
  const t = stateRecord(r.transport, 'restore.transport', ['state', 'active', 'queuePositions', transport instanceof MmioTransport ? 'mmio' : 'pci']);
  const st = stateRecord(t.state, 'restore.transport.state', Object.keys(transport.snapshot().state));
  if (!Array.isArray(st.queues)) throw new TypeError('restore.transport.state.queues must be an array');
  if (!Array.isArray(t.queuePositions)) throw new TypeError('restore.transport.queuePositions must be an array');
  stateBoolean(t.active, 'restore.transport.active');
  if (model.restoreState !== undefined) model.restoreState(r.model);
  else if (r.model !== null) throw new TypeError('restore.model must be null: this device keeps no state of its own');
  if (transport instanceof MmioTransport) {
    stateRecord(t.mmio, 'restore.transport.mmio', ['shmSel']);
    transport.restore(r.transport as MmioSnapshot);
  } else {
    stateRecord(t.pci, 'restore.transport.pci', ['config']);
    transport.restore(r.transport as PciSnapshot);
  }
}

/** Routes mailbox accesses to the transport's register decoders. */
export function transportTarget(transport: Transport, log: Logger): RunnerTarget {
  return {
    access(a: MailboxAccess): number {
      const size = a.size as 1 | 2 | 4;
      if (transport instanceof MmioTransport) {
        if (a.op === MailboxOp.MMIO_READ) return transport.read(a.offset, size);
        if (a.op === MailboxOp.MMIO_WRITE) {
          transport.write(a.offset, size, a.value);
          return 0;
        }
      } else {
        switch (a.op) {
          case MailboxOp.CONFIG_READ:
            return transport.configRead(a.offset, size);
          case MailboxOp.CONFIG_WRITE:
            transport.configWrite(a.offset, size, a.value);
            return 0;
          case MailboxOp.BAR_READ:
            return transport.barRead(a.bar, a.offset, size);
          case MailboxOp.BAR_WRITE:
            transport.barWrite(a.bar, a.offset, size, a.value);
            return 0;
        }
      }
      log.warn({ op: a.op }, 'mailbox operation does not fit this transport; read as all-ones');
      return 0xffff_ffff;
    },
    notifyQueue: (index) => transport.notifyQueue(index),
    reset: () => transport.reset(),
  };
}

/**
 * Body of a device worker: builds memory, model and transport from the start message, serves the
 * data plane with a DeviceRunner and the control plane with comlink on `port`.
 */
export function runDeviceWorker(start: DeviceWorkerStart, port: MessagePort): void {
  const log = componentLogger('device', { device: start.name, transport: start.transport });
  const signals = new Int32Array(start.signals);
  const memory = GuestMemory.fromDescriptor(start.memory);
  const hosted = hostDeviceModel(start.model, memory, log);
  const model = hosted.model;
  const irq = new SignalInterruptLine(signals);
  const options = { irq, log, ...(hosted.queueMemory !== undefined ? { queueMemory: hosted.queueMemory } : {}) };
  const transport: Transport = start.transport === 'mmio' ? new MmioTransport(model, memory, options) : new PciTransport(model, memory, options);
  if (start.restore !== undefined) {
    try {
      restoreDevice(start.restore, start, model, transport);
    } catch (err) {
      // No half-restored device: the start fails, and the quiescence slot is given back.
      hosted.close?.();
      throw new Error(`restore refused: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
    }
    // The source may have been paused with a doorbell not yet served, and its bits stay behind in
    // the source's signal block: every live queue counts as notified once (a spurious
    // notification is harmless, virtio 1.2 §2.7.7.1 lets the device look at the ring any time).
    transport.snapshot().queuePositions.forEach((position, index) => {
      if (position !== null) ringDoorbell(signals, index);
    });
    log.info({ status: transport.stats().status }, 'device restored from saved state');
  }
  const runner = new DeviceRunner(start.signals, transportTarget(transport, log), {
    log,
    ...(start.maxSpinMicros !== undefined ? { maxSpinMicros: start.maxSpinMicros } : {}),
  });
  const running = runner.run().catch((err: unknown) => {
    Atomics.store(signals, DeviceSignal.WORKER_STATE, WorkerState.CRASHED);
    log.error({ err }, 'device runner failed');
  });
  const api: DeviceWorkerApi = {
    stats(): DeviceWorkerStats {
      return {
        name: start.name,
        doorbells: Atomics.load(signals, DeviceSignal.STAT_DOORBELLS),
        mailboxAccesses: Atomics.load(signals, DeviceSignal.STAT_MAILBOX),
        wakeups: Atomics.load(signals, DeviceSignal.STAT_WAKEUPS),
        status: transport.stats().status,
        transport: { ...transport.stats() },
        ...(hosted.stats !== undefined ? { model: hosted.stats() } : {}),
      };
    },
    reset(): void {
      // Runs between runner steps (the runner awaits on the event loop), so no request is cut in half.
      transport.reset();
    },
    async stop(): Promise<void> {
      postControl(signals, ControlRequest.STOP);
      await running;
      hosted.close?.();
    },
    pause: () => runner.pause(),
    resume: () => runner.resume(),
    saveState(): DeviceWorkerState {
      if (!runner.paused) throw new Error(`device ${start.name}: saveState() needs a paused device: call pause() first`);
      const saved = model.saveState?.() ?? null;
      return transport instanceof MmioTransport
        ? { modelKind: start.model.kind, transportKind: 'mmio', transport: transport.snapshot(), model: saved }
        : { modelKind: start.model.kind, transportKind: 'pci', transport: transport.snapshot(), model: saved };
    },
  };
  exposeOn(api, port);
  log.debug('device worker ready');
}
