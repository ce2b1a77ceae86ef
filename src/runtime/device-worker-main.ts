import type { MessagePort } from 'node:worker_threads';
import { LoopbackDevice } from '../devices/loopback.js';
import { componentLogger } from '../log/pino.js';
import type { Logger } from '../log/logger.js';
import { GuestMemory } from '../memory/index.js';
import type { VirtioDeviceModel } from '../virtio/device.js';
import { DeviceRunner, type RunnerTarget } from '../virtio/device-runner.js';
import type { MailboxAccess } from '../virtio/mailbox.js';
import { MmioTransport } from '../virtio/mmio.js';
import { PciTransport } from '../virtio/pci.js';
import { ControlRequest, DeviceSignal, MailboxOp, SignalInterruptLine, WorkerState, postControl } from '../virtio/signals.js';
import { exposeOn } from './comlink.js';
import type { DeviceModelSpec, DeviceWorkerApi, DeviceWorkerStart, DeviceWorkerStats } from './device-worker-protocol.js';

/** Builds the device model a start message names. */
export function createDeviceModel(spec: DeviceModelSpec): VirtioDeviceModel {
  switch (spec.kind) {
    case 'loopback':
      return new LoopbackDevice(spec.options);
  }
}

type Transport = MmioTransport | PciTransport;

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
  const model = createDeviceModel(start.model);
  const irq = new SignalInterruptLine(signals);
  const transport: Transport =
    start.transport === 'mmio' ? new MmioTransport(model, memory, { irq, log }) : new PciTransport(model, memory, { irq, log });
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
      };
    },
    reset(): void {
      // Runs between runner steps (the runner awaits on the event loop), so no request is cut in half.
      transport.reset();
    },
    async stop(): Promise<void> {
      postControl(signals, ControlRequest.STOP);
      await running;
    },
  };
  exposeOn(api, port);
  log.debug('device worker ready');
}
