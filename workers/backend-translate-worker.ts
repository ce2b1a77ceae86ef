// Entry point of a backend-fixture consumer worker (translates DMAs through a context's shared
// page tables): one start message in workerData, the rest in src/runtime/backend-translate-main.ts.
import { parentPort, workerData } from 'node:worker_threads';
import { runBackendTranslateWorker } from '../src/runtime/backend-translate-main.js';
import type { BackendTranslateStart } from '../src/runtime/backend-translate-protocol.js';

if (parentPort === null) throw new Error('backend-translate-worker must run as a worker thread');
runBackendTranslateWorker(workerData as BackendTranslateStart, parentPort);
