// Entry point of a virtio device worker: one start message in workerData, everything else in
// src/runtime/device-worker-main.ts.
import { parentPort, workerData } from 'node:worker_threads';
import { runDeviceWorker } from '../src/runtime/device-worker-main.js';
import type { DeviceWorkerStart } from '../src/runtime/device-worker-protocol.js';

if (parentPort === null) throw new Error('device-worker must run as a worker thread');
runDeviceWorker(workerData as DeviceWorkerStart, parentPort);
