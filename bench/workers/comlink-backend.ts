// The naive design the virtio-iommu is measured against: the backend in its own worker, one
// comlink call per map and per unmap.
import { parentPort, workerData } from 'node:worker_threads';
import { IommufdHost, IoasMapFlag } from '../../src/ioasid/index.js';
import { GuestMemory } from '../../src/memory/index.js';
import { exposeOn } from '../../src/runtime/comlink.js';
import type { ComlinkBackendApi, ComlinkBackendStart } from '../protocol.js';

if (parentPort === null) throw new Error('comlink-backend must run as a worker thread');
const start = workerData as ComlinkBackendStart;
const host = new IommufdHost(GuestMemory.fromDescriptor(start.memory), { devices: [{ name: 'dma0', group: 'g0' }] });
const context = host.open();
const ioas = context.ioasAlloc();
context.deviceAttach(context.deviceBind('dma0'), ioas);
const flags = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;

const api: ComlinkBackendApi = {
  kind: () => 'iommufd Context (src/ioasid)',
  map(iova, gpa, length) {
    context.ioasMap(ioas, { gpa, length: BigInt(length), iova: BigInt(iova), flags });
  },
  unmap(iova, length) {
    context.ioasUnmap(ioas, BigInt(iova), BigInt(length));
  },
};
exposeOn(api, parentPort);
