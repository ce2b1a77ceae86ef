import type { MessagePort } from 'node:worker_threads';
import { FaultAccess, FaultConsumer, FaultReason, faultIova } from '../ioasid/fault-queue.js';
import { IommufdError, IommufdHost } from '../ioasid/index.js';
import { QuiescenceOwner } from '../ioasid/quiescence.js';
import { VirtioIommuDevice } from '../iommu/device.js';
import { IoasidIommuBackend } from '../iommu/ioasid-backend.js';
import { componentLogger } from '../log/pino.js';
import { GuestMemory } from '../memory/index.js';
import { DeviceRunner } from '../virtio/device-runner.js';
import { MmioTransport } from '../virtio/mmio.js';
import { PciTransport } from '../virtio/pci.js';
import type { PciSnapshot } from '../virtio/pci.js';
import type { TransportSnapshot } from '../virtio/transport.js';
import { ControlRequest, DeviceSignal, SignalInterruptLine, WorkerState, postControl, ringDoorbell } from '../virtio/signals.js';
import { exposeOn } from './comlink.js';
import { transportTarget } from './device-worker-main.js';
import type { EndpointTranslation, IommuWorkerApi, IommuWorkerStart, IommuWorkerState, IommuWorkerStats } from './iommu-worker-protocol.js';

/** A restore that could not be applied: the worker does not start. */
export class RestoreError extends Error {
  constructor(part: string, cause: unknown) {
    super(`cannot restore the ${part} state: ${cause instanceof Error ? cause.message : String(cause)}`);
    this.name = 'RestoreError';
  }
}

function restoring<T>(part: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw new RestoreError(part, err);
  }
}

/**
 * Body of the iommu worker: the iommufd host and context (the only writer of page tables), the
 * virtio-iommu model over it behind a transport, and the fault path from device workers to the
 * event queue. The data plane runs in a DeviceRunner; the control plane is comlink on `port`.
 */
export function runIommuWorker(start: IommuWorkerStart, port: MessagePort): void {
  const log = componentLogger('iommu', { device: start.name, transport: start.transport });
  const signals = new Int32Array(start.signals);
  const memory = GuestMemory.fromDescriptor(start.memory);
  const host = new IommufdHost(memory, {
    devices: start.endpoints.filter((ep) => ep.consumer !== 'access').map((ep) => ({
      name: ep.device,
      group: ep.group,
      reservedRegions: ep.reservedRegions,
      // The emulated IOMMU keeps access/dirty bits (as VT-d's SSADS): what a migration's pre-copy needs.
      dirtyTracking: true,
      ...(ep.pasidBits !== undefined ? { pasidBits: ep.pasidBits } : {}),
    })),
    ...(start.memlockLimitPages !== undefined ? { memlockLimitPages: start.memlockLimitPages } : {}),
    log: log.child({ component: 'iommufd' }),
  });
  const context = host.open();
  const saved = start.restore;
  // The adapter's accesses pin nothing (their workers translate through rows): nothing to drop on unmap.
  if (saved !== undefined) restoring('backend', () => context.restoreState(saved.backend, { accessOps: () => ({ onUnmap: () => undefined }) }));
  context.attachQuiescence(new QuiescenceOwner(start.quiescence, { log }), {
    ...(start.quiescenceTimeoutMs !== undefined ? { timeoutMs: start.quiescenceTimeoutMs } : {}),
  });
  const backend = restoring('adapter', () => new IoasidIommuBackend(
    context,
    start.endpoints.map((ep) => ({
      endpoint: ep.id,
      device: ep.device,
      reservedRegions: ep.reservedRegions,
      group: ep.group,
      ...(ep.consumer !== undefined ? { consumer: ep.consumer } : {}),
    })),
    log,
    start.memory.regions.map((r) => ({ base: r.base, size: r.buffer.byteLength })),
    saved?.adapter,
  ));
  const endpointOfRow = new Map<number, number>();
  for (const ep of start.endpoints) endpointOfRow.set(backend.translationRow(ep.id)!, ep.id);

  const device = restoring('device', () =>
    new VirtioIommuDevice(backend, {
      maxRequestsPerPass: 256,
      ...start.device,
      endpoints: start.endpoints.map((ep) => ep.id),
      log,
      ...(saved !== undefined ? { restoreFrom: saved.device } : {}),
    }),
  );
  const irq = new SignalInterruptLine(signals);
  const transport =
    start.transport === 'mmio' ? new MmioTransport(device, memory, { irq, log }) : new PciTransport(device, memory, { irq, log });
  if (saved !== undefined) {
    restoring('transport', () => {
      if (transport instanceof MmioTransport) transport.restore(saved.transport as TransportSnapshot & { readonly mmio: { readonly shmSel: number } });
      else transport.restore(saved.transport as PciSnapshot);
    });
    // A doorbell the source had not served yet is gone with its signal block: every queue counts
    // as notified once (a spurious notification is harmless, virtio 1.2 §2.7.7.1).
    ringDoorbell(signals, 0);
    ringDoorbell(signals, 1);
    log.info('restored from a saved state');
  }

  const faults = new FaultConsumer(start.faults);
  let drained = 0;
  const drainFaults = (deliver = true): number =>
    faults.drain((record) => {
      const endpoint = endpointOfRow.get(record.device);
      drained++;
      if (endpoint === undefined) {
        log.warn({ row: record.device }, 'fault record for a device that is no endpoint; dropped');
        return;
      }
      device.reportFault({
        reason: record.reason === FaultReason.DOMAIN ? 'DOMAIN' : record.reason === FaultReason.NONE ? 'UNKNOWN' : 'MAPPING',
        endpoint,
        ...(record.pasid >= 0 ? { pasid: record.pasid } : {}),
        address: faultIova(record),
        read: (record.access & FaultAccess.READ) !== 0,
        write: (record.access & FaultAccess.WRITE) !== 0,
        exec: (record.access & FaultAccess.EXEC) !== 0,
      }, deliver);
    }, 256);

  // Between passes of the runner: fault records to deliver, and requests left by a bounded pass.
  const target = { ...transportTarget(transport, log), poll: () => (drainFaults() > 0) || device.continueRequests() };
  const runner = new DeviceRunner(start.signals, target, {
    log,
    ...(start.maxSpinMicros !== undefined ? { maxSpinMicros: start.maxSpinMicros } : {}),
  });
  const running = runner.run().catch((err: unknown) => {
    Atomics.store(signals, DeviceSignal.WORKER_STATE, WorkerState.CRASHED);
    log.error({ err }, 'iommu runner failed');
  });

  const api: IommuWorkerApi = {
    stats(): IommuWorkerStats {
      const q = faults.stats();
      return {
        device: device.stats(),
        transport: { ...transport.stats() },
        backend: host.stats(),
        faultQueue: { drained, dropped: q.dropped },
        doorbells: Atomics.load(signals, DeviceSignal.STAT_DOORBELLS),
        wakeups: Atomics.load(signals, DeviceSignal.STAT_WAKEUPS),
      };
    },
    reset: () => transport.reset(),
    systemReset(): void {
      transport.reset();
      device.systemReset();
    },
    flushFaults(): number {
      let total = 0;
      for (let n = drainFaults(); n > 0; n = drainFaults()) total += n;
      return total;
    },
    endpointTranslation(endpoint: number): EndpointTranslation {
      const row = backend.translationRow(endpoint);
      if (row === undefined) throw new RangeError(`endpoint ${endpoint} does not exist`);
      return { endpoint, shared: context.describeShared(), row };
    },
    consumerGone(endpoint: number): void {
      const errno = backend.markGone(endpoint);
      if (errno !== undefined) throw new RangeError(`endpoint ${endpoint}: ${errno}`);
      log.warn({ endpoint }, 'consumer device gone: detached in the backend; the guest sees it fail');
    },
    foreignBind(name: string): string {
      const other = host.open();
      try {
        other.deviceBind(name);
        return 'OK';
      } catch (err) {
        if (err instanceof IommufdError) return err.code;
        throw err;
      } finally {
        other.close();
      }
    },
    inspect: () => host.inspect(),
    pause: () => runner.pause(),
    resume: () => runner.resume(),
    saveState(): IommuWorkerState {
      if (!runner.paused) throw new Error('saveState needs a paused worker (pause() first)');
      // Fault records device workers queued are the device's pending faults from here on.
      while (drainFaults(false) > 0);
      return { backend: context.saveState(), adapter: backend.saveState(), device: device.saveState(), transport: transport.snapshot() };
    },
    setDirtyTracking: (enable: boolean) => backend.setDirtyTracking(enable),
    dirtyPages: () => backend.dirtyPages(),
    async stop(): Promise<void> {
      postControl(signals, ControlRequest.STOP);
      await running;
    },
  };
  exposeOn(api, port);
  log.debug('iommu worker ready');
}
