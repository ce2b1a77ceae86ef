// Guest-side drivers, as a guest kernel would drive the devices: for tests, fixtures and VMMs that
// script a guest. Exported as `viommu/guest`.
export { GuestAllocator } from './allocator.js';
export { GuestDevice } from './guest-device.js';
export { IommuGuestDriver } from './iommu-driver.js';
export type { IommuConfigValues, IommuDriverOptions, PostedRequests, RequestResult } from './iommu-driver.js';
export * from './iommu-requests.js';
export { DmaEngineDriver } from './dma-engine-driver.js';
export type { DmaEngineResult } from './dma-engine-driver.js';
export { MmioDriverTransport } from './mmio.js';
export { PciDriverTransport } from './pci.js';
export type { DriverTransport } from './transport.js';
