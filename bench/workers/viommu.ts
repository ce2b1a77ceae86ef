// The virtio-iommu model in a device worker, over the iommufd backend, behind virtio-mmio: the same
// pieces the device worker host composes for its models, until it hosts this one.
import { parentPort, workerData } from 'node:worker_threads';
import { IoasidIommuBackend } from '../../src/iommu/ioasid-backend.js';
import { VirtioIommuDevice } from '../../src/iommu/device.js';
import { IommufdHost, X86_MSI_WINDOW } from '../../src/ioasid/index.js';
import { QuiescenceOwner, createQuiescenceBuffer } from '../../src/ioasid/quiescence.js';
import { silentLogger } from '../../src/log/logger.js';
import { GuestMemory } from '../../src/memory/index.js';
import { exposeOn } from '../../src/runtime/comlink.js';
import { transportTarget } from '../../src/runtime/device-worker-main.js';
import { DeviceRunner } from '../../src/virtio/device-runner.js';
import { MmioTransport } from '../../src/virtio/mmio.js';
import { ControlRequest, SignalInterruptLine, postControl } from '../../src/virtio/signals.js';
import type { ViommuControl, ViommuStart } from '../protocol.js';

if (parentPort === null) throw new Error('viommu must run as a worker thread');
const start = workerData as ViommuStart;
const memory = GuestMemory.fromDescriptor(start.memory);
const host = new IommufdHost(memory, { devices: [{ name: 'ep', group: 'g0', reservedRegions: [X86_MSI_WINDOW] }] });
const context = host.open();
const backend = new IoasidIommuBackend(context, [{ endpoint: start.endpoint, device: 'ep', reservedRegions: [X86_MSI_WINDOW] }]);
// With device workers, every UNMAP waits for them: strict unmap.
const quiescence = start.dmaWorkers > 0 ? createQuiescenceBuffer(start.dmaWorkers) : undefined;
if (quiescence !== undefined) context.attachQuiescence(new QuiescenceOwner(quiescence));
const model = new VirtioIommuDevice(backend, { endpoints: [start.endpoint] });
const signals = new Int32Array(start.signals);
const transport = new MmioTransport(model, memory, { irq: new SignalInterruptLine(signals), log: silentLogger });
const running = new DeviceRunner(start.signals, transportTarget(transport, silentLogger)).run();

const control: ViommuControl = {
  ready: () => true,
  stats: () => ({ ...model.stats() }),
  shared() {
    if (quiescence === undefined) throw new Error('started without DMA workers');
    const shared = context.describeShared();
    return { pool: shared.pool.buffer, devices: shared.devices.buffer, quiescence, row: context.deviceRow(backend.deviceId(start.endpoint)!) };
  },
  async stop() {
    postControl(signals, ControlRequest.STOP);
    await running;
  },
};
exposeOn(control, parentPort);
