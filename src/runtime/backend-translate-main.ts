import { threadId, type MessagePort } from 'node:worker_threads';
import { FaultAccess, FaultReason } from '../ioasid/fault-queue.js';
import { QuiescenceWorker } from '../ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../ioasid/translator.js';
import { exposeOn } from './comlink.js';
import type { BackendTranslateApi, BackendTranslateRequest, BackendTranslateResult, BackendTranslateStart } from './backend-translate-protocol.js';

const REASONS: Record<number, 'DOMAIN' | 'MAPPING' | 'PERMISSION'> = {
  [FaultReason.DOMAIN]: 'DOMAIN',
  [FaultReason.MAPPING]: 'MAPPING',
  [FaultReason.PERMISSION]: 'PERMISSION',
};

/** Longest DMA one request may translate: the span list comes back through a message. */
export const MAX_TRANSLATE_LENGTH = 16 << 20;

function checkRequest(req: BackendTranslateRequest): void {
  if (!Number.isSafeInteger(req.row) || req.row < 0) throw new RangeError(`device-table row must be a non-negative integer, got ${String(req.row)}`);
  if (req.pasid !== undefined && (!Number.isInteger(req.pasid) || req.pasid < 0 || req.pasid >= 1 << 20)) {
    throw new RangeError(`PASID must be in [0, 2^20), got ${String(req.pasid)}`);
  }
  if (!Number.isSafeInteger(req.length) || req.length <= 0 || req.length > MAX_TRANSLATE_LENGTH) {
    throw new RangeError(`DMA length must be in [1, ${MAX_TRANSLATE_LENGTH}], got ${String(req.length)}`);
  }
  if (typeof req.iova !== 'bigint' || req.iova < 0n || req.iova + BigInt(req.length) > 1n << 64n) {
    throw new RangeError(`DMA IOVA range must lie in [0, 2^64), got ${String(req.iova)} + ${req.length}`);
  }
  if (req.access !== 'read' && req.access !== 'write') throw new RangeError(`access must be 'read' or 'write', got ${String(req.access)}`);
}

/**
 * Body of a consumer worker: it reads only the context's shared buffers (table pool and device
 * table), never the owner's objects, so what it sees is what any device worker would see.
 */
export function runBackendTranslateWorker(start: BackendTranslateStart, port: MessagePort): void {
  const quiescence = QuiescenceWorker.register(start.quiescence, threadId);
  const translator = new Translator({
    pool: start.shared.pool.buffer,
    attachments: new DeviceTableAttachments(start.shared),
    quiescence,
  });
  const api: BackendTranslateApi = {
    translate(req: BackendTranslateRequest): BackendTranslateResult {
      checkRequest(req);
      const access = req.access === 'write' ? FaultAccess.WRITE : FaultAccess.READ;
      return translator.withDma((): BackendTranslateResult => {
        const reason = translator.translate(req.row, req.pasid, req.iova, req.length, access);
        if (reason !== FaultReason.NONE) return { outcome: 'fault', reason: REASONS[reason] ?? 'MAPPING', iova: translator.faultIova };
        return { outcome: 'ok', spans: translator.spans.toArray() };
      });
    },
    stop(): void {
      quiescence.unregister();
    },
  };
  exposeOn(api, port);
}
