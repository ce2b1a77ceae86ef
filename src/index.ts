// The package's public surface. A VMM embeds the machine (src/vmm) or uses the pieces directly:
// the iommufd-style backend without virtio, the virtio-iommu model behind its own transport, or
// the consumer devices.

// Machines of workers
export { IommuMachine, EndpointHandle, MigrationError, endpointDeviceName } from './vmm/iommu-machine.js';
export { MemoryPrecopy } from './vmm/precopy.js';
export type { DmaDirtyLog, PrecopyRound } from './vmm/precopy.js';
export { MigrationImageError, decodeImage, encodeImage, isMigrationImageError, sectionMap } from './migration/image.js';
export type { ImageSection, PlainValue } from './migration/image.js';
export type { IommuWorkerState } from './runtime/iommu-worker-protocol.js';
export type { EndpointDeclaration, EndpointKind, IommuMachineOptions } from './vmm/iommu-machine.js';
export { DeviceHandle, DeviceWorkerError } from './vmm/device-handle.js';
export type { DeviceControl, DeviceLaunch, MigratableControl, RestoreOf, SpawnDeviceOptions } from './vmm/device-handle.js';
export type { DeviceModelSpec, DeviceWorkerApi, DeviceWorkerState, DeviceWorkerStats, MmioSnapshot, TransportKind } from './runtime/device-worker-protocol.js';
export type { IommuWorkerApi, IommuWorkerStats, EndpointSpec } from './runtime/iommu-worker-protocol.js';
export type { DmaEngineWorkerApi, DmaEngineWorkerState, DmaEngineWorkerStats } from './runtime/dma-engine-protocol.js';
export type { DmaRequest, DmaResult, EndpointWorkerApi } from './runtime/endpoint-worker-protocol.js';

// Guest memory
export * from './memory/index.js';
export type { DmaSpace } from './memory/dma-space.js';
export { TranslatorDmaSpace } from './memory/dma-space.js';

// The backend: an emulated /dev/iommu
export * from './ioasid/index.js';
export { Translator, DeviceTableAttachments, FixedAttachments } from './ioasid/translator.js';
export { QuiescenceOwner, QuiescenceWorker, createQuiescenceBuffer } from './ioasid/quiescence.js';
export { FaultConsumer, FaultProducer, createFaultQueueBuffer } from './ioasid/fault-queue.js';

// The virtio-iommu device model
export { VirtioIommuDevice } from './iommu/device.js';
export type { EndpointFault, VirtioIommuOptions, VirtioIommuStats } from './iommu/device.js';
export { IoasidIommuBackend } from './iommu/ioasid-backend.js';
export type { IommuBackend } from './iommu/backend.js';
export { IommuFeature, Status, STATUS_NAMES, MapFlag, AttachFlag } from './iommu/layout.js';
export type { IommuFeatureName } from './iommu/layout.js';

// Virtio machinery for other device models
export { MmioTransport } from './virtio/mmio.js';
export { PciTransport } from './virtio/pci.js';
export type { VirtioDeviceModel, DeviceEnvironment, InterruptLine, MigrationState } from './virtio/device.js';
export type { TransportSnapshot } from './virtio/transport.js';
export type { PciSnapshot } from './virtio/pci.js';
export { SplitQueue } from './virtio/split-queue.js';
export { DeviceRunner } from './virtio/device-runner.js';

// Consumer devices
export { DmaEngine, DmaEngineReg, DmaEngineCommand, DmaEngineStatus } from './devices/dma-engine.js';
export type { DmaEngineState } from './devices/dma-engine.js';
export type { VirtioNetState } from './devices/virtio-net.js';
export type { LoopbackState } from './devices/loopback.js';

// Guest fixtures
export { parseGuestFixture, GUEST_FIXTURE_FORMAT } from './replay/guest-fixture.js';
export { replayGuestFixture } from './replay/guest-runner.js';
export { WorkerReplayMachine } from './replay/worker-machine.js';
export { LocalIommuMachine } from './replay/local-machine.js';
