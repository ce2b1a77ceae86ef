// Entry point of a DMA-engine worker (a VFIO-style PCI function behind the IOMMU): one start
// message in workerData, everything else in src/runtime/dma-engine-main.ts.
import { parentPort, workerData } from 'node:worker_threads';
import { runDmaEngineWorker } from '../src/runtime/dma-engine-main.js';
import type { DmaEngineWorkerStart } from '../src/runtime/dma-engine-protocol.js';

if (parentPort === null) throw new Error('dma-engine-worker must run as a worker thread');
runDmaEngineWorker(workerData as DmaEngineWorkerStart, parentPort);
