import { threadId, type MessagePort } from 'node:worker_threads';
import { FaultAccess, FaultProducer, FaultReason } from '../ioasid/fault-queue.js';
import { QuiescenceWorker } from '../ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../ioasid/translator.js';
import { componentLogger } from '../log/pino.js';
import { GuestMemory } from '../memory/index.js';
import { DeviceSignal } from '../virtio/signals.js';
import { exposeOn } from './comlink.js';
import {
  DmaHold,
  MAX_HOLD_MS,
  type DmaRequest,
  type DmaResult,
  type EndpointWorkerApi,
  type EndpointWorkerStart,
  type EndpointWorkerStats,
} from './endpoint-worker-protocol.js';

const REASONS: Record<number, 'DOMAIN' | 'MAPPING' | 'PERMISSION'> = {
  [FaultReason.DOMAIN]: 'DOMAIN',
  [FaultReason.MAPPING]: 'MAPPING',
  [FaultReason.PERMISSION]: 'PERMISSION',
};

/** Largest DMA one call may ask for: the endpoint copies through this thread. */
export const MAX_DMA_LENGTH = 16 << 20;

/**
 * Body of a test endpoint worker: a bus-master device that does nothing but the DMAs it is told
 * to, each translated through the shared page tables inside a quiescence bracket. Faults go to the
 * fault ring (the translator appends them) and wake the iommu worker.
 */
export function runEndpointWorker(start: EndpointWorkerStart, port: MessagePort): void {
  const log = componentLogger('endpoint', { device: start.name, endpoint: start.endpoint });
  const memory = GuestMemory.fromDescriptor(start.memory);
  const quiescence = QuiescenceWorker.register(start.quiescence, threadId);
  const translator = new Translator({
    pool: start.shared.pool.buffer,
    attachments: new DeviceTableAttachments(start.shared),
    quiescence,
    faults: new FaultProducer(start.faults, new Int32Array(start.iommuSignals), DeviceSignal.WAKE),
  });
  let dmas = 0;
  let faults = 0;
  let bytes = 0;

  const perform = (req: DmaRequest): DmaResult => {
    const access = req.access === 'write' ? FaultAccess.WRITE : FaultAccess.READ;
    const reason = translator.translate(start.row, req.pasid, req.iova, req.length, access);
    if (reason !== FaultReason.NONE) {
      return { outcome: 'fault', reason: REASONS[reason] ?? 'MAPPING', iova: translator.faultIova };
    }
    const spans = translator.spans;
    // Identity translation can point past RAM: such a DMA reaches nothing (a bus error, no record).
    for (let i = 0; i < spans.count; i++) {
      if (!memory.contains(spans.gpa[i]!, spans.bytes[i]!)) return { outcome: 'fault', reason: 'OUTSIDE_RAM', iova: req.iova };
    }
    const data = req.access === 'read' ? new Uint8Array(req.length) : undefined;
    let done = 0;
    for (let i = 0; i < spans.count; i++) {
      const gpa = spans.gpa[i]!;
      const n = spans.bytes[i]!;
      if (data !== undefined) memory.read(gpa, data.subarray(done, done + n));
      else if (req.data === undefined || req.data.length === 0) memory.fill(gpa, n, 0x5a);
      else {
        const view = memory.view(gpa, n);
        for (let k = 0; k < n; k++) view[k] = req.data[(done + k) % req.data.length]!;
      }
      done += n;
    }
    bytes += done;
    return data !== undefined ? { outcome: 'ok', spans: spans.count, data } : { outcome: 'ok', spans: spans.count };
  };

  const holdOpen = (word: Int32Array): void => {
    Atomics.store(word, 0, DmaHold.INSIDE);
    Atomics.notify(word, 0);
    const deadline = performance.now() + MAX_HOLD_MS;
    while (Atomics.load(word, 0) !== DmaHold.RELEASE) {
      const left = deadline - performance.now();
      if (left <= 0) {
        log.warn('held DMA never released; ending it');
        break;
      }
      Atomics.wait(word, 0, DmaHold.INSIDE, left);
    }
  };

  const api: EndpointWorkerApi = {
    dma(req: DmaRequest): DmaResult {
      if (!Number.isSafeInteger(req.length) || req.length <= 0 || req.length > MAX_DMA_LENGTH) {
        throw new RangeError(`DMA length must be in [1, ${MAX_DMA_LENGTH}], got ${String(req.length)}`);
      }
      if (typeof req.iova !== 'bigint' || req.iova < 0n || req.iova + BigInt(req.length) > 1n << 64n) {
        throw new RangeError(`DMA IOVA range must lie in [0, 2^64), got ${String(req.iova)} + ${req.length}`);
      }
      dmas++;
      translator.beginDma();
      let result: DmaResult;
      try {
        result = perform(req);
        if (req.hold !== undefined) holdOpen(new Int32Array(req.hold));
      } finally {
        translator.endDma();
      }
      if (result.outcome === 'fault') {
        faults++;
        log.debug({ iova: `0x${result.iova.toString(16)}`, reason: result.reason, access: req.access }, 'DMA faulted');
      }
      return result;
    },
    stats(): EndpointWorkerStats {
      return { endpoint: start.endpoint, dmas, faults, bytes, translator: translator.stats() };
    },
    async stop(): Promise<void> {
      quiescence.unregister();
    },
  };
  exposeOn(api, port);
}
