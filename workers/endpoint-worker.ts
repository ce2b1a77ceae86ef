// Entry point of a test endpoint worker (a DMA-capable device behind the IOMMU): one start message
// in workerData, everything else in src/runtime/endpoint-worker-main.ts.
import { parentPort, workerData } from 'node:worker_threads';
import { runEndpointWorker } from '../src/runtime/endpoint-worker-main.js';
import type { EndpointWorkerStart } from '../src/runtime/endpoint-worker-protocol.js';

if (parentPort === null) throw new Error('endpoint-worker must run as a worker thread');
runEndpointWorker(workerData as EndpointWorkerStart, parentPort);
