// Entry point of the iommu worker: one start message in workerData, everything else in
// src/runtime/iommu-worker-main.ts.
import { parentPort, workerData } from 'node:worker_threads';
import { runIommuWorker } from '../src/runtime/iommu-worker-main.js';
import type { IommuWorkerStart } from '../src/runtime/iommu-worker-protocol.js';

if (parentPort === null) throw new Error('iommu-worker must run as a worker thread');
runIommuWorker(workerData as IommuWorkerStart, parentPort);
