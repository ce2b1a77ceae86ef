import { Worker } from 'node:worker_threads';
import { releaseRemote, wrapPort } from './comlink.js';
import type { BackendTranslateApi, BackendTranslateRequest, BackendTranslateResult, BackendTranslateStart } from './backend-translate-protocol.js';
import { workerUrl } from './worker-url.js';

/** The owner's handle on a consumer worker. */
export interface TranslateConsumer {
  translate(request: BackendTranslateRequest): Promise<BackendTranslateResult>;
  /** Unregisters the worker from the quiescence block and ends it. */
  close(): Promise<void>;
}

/**
 * Starts a consumer worker (workers/backend-translate-worker.ts, run from dist/) on a context's
 * shared buffers. A worker that dies turns every pending and later call into a rejection instead
 * of a wait that never ends.
 */
export function startBackendTranslateWorker(start: BackendTranslateStart): TranslateConsumer {
  const worker = new Worker(workerUrl('backend-translate-worker'), { workerData: start });
  const remote = wrapPort<BackendTranslateApi>(worker);
  let exited = false;
  const gone = new Promise<never>((_, reject) => {
    worker.once('error', (err) => reject(err instanceof Error ? err : new Error(String(err))));
    worker.once('exit', (code) => {
      exited = true;
      reject(new Error(`translate worker exited with code ${code}`));
    });
  });
  // Observed here so that a worker ending after close() is not an unhandled rejection.
  gone.catch(() => undefined);
  return {
    translate: (request) => Promise.race([remote.translate(request), gone]),
    async close(): Promise<void> {
      try {
        if (!exited) await Promise.race([remote.stop(), gone]);
      } catch {
        // A worker that already died has nothing left to unregister.
      } finally {
        releaseRemote(remote);
        await worker.terminate();
      }
    },
  };
}
