import { GuestAllocator } from '../../guest-fixtures/driver/allocator.js';
import { IommuGuestDriver } from '../../guest-fixtures/driver/iommu-driver.js';
import { pagesFromAllocator, type GuestPageAllocator } from '../../guest-fixtures/pagetable/x86-64-builder.js';
import { MmioDriverTransport } from '../../guest-fixtures/driver/mmio.js';
import { IommufdHost, X86_MSI_WINDOW, type Context } from '../ioasid/index.js';
import { VirtioIommuDevice, type VirtioIommuOptions } from '../iommu/device.js';
import { IoasidIommuBackend } from '../iommu/ioasid-backend.js';
import type { IommuFeatureName } from '../iommu/layout.js';
import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import { GuestMemory } from '../memory/index.js';
import { MmioTransport } from '../virtio/mmio.js';
import { endpointDeviceName } from '../vmm/iommu-machine.js';
import type { GuestFixture } from './guest-fixture.js';
import type { GuestReplayMachine } from './guest-runner.js';

export interface LocalMachineOptions {
  readonly memorySize: number;
  readonly endpoints: readonly number[];
  readonly driverFeatures: readonly IommuFeatureName[];
  readonly device?: Omit<VirtioIommuOptions, 'endpoints' | 'log'>;
  /** PASID width of every endpoint's device (default 0). */
  readonly pasidBits?: number;
  readonly log?: Logger;
}

/** Guest memory the driver keeps for its rings and request buffers: the top 8 MiB (a quarter of small guests). */
export function driverArena(memorySize: number): { base: number; size: number } {
  const size = Math.min(8 << 20, Math.floor(memorySize / 4 / 4096) * 4096);
  return { base: memorySize - size, size };
}

/**
 * The whole machine in one thread: guest memory, the iommufd host and context, the virtio-iommu
 * model behind virtio-mmio, and the guest driver calling the transport directly. DMA is translated
 * through the context's shared-memory reader, as a device worker does, and performed on guest
 * memory. Fast and deterministic: what unit tests and property tests use.
 */
export class LocalIommuMachine implements GuestReplayMachine {
  readonly canDma = true;
  readonly memory: GuestMemory;
  readonly host: IommufdHost;
  readonly context: Context;
  readonly backend: IoasidIommuBackend;
  readonly device: VirtioIommuDevice;
  readonly transport: MmioTransport;
  driver: IommuGuestDriver;
  private readonly allocator: GuestAllocator;
  private readonly driverFeatures: readonly IommuFeatureName[];
  readonly tablePages: GuestPageAllocator;

  constructor(options: LocalMachineOptions) {
    const log = options.log ?? silentLogger;
    this.memory = GuestMemory.create(options.memorySize);
    this.host = new IommufdHost(this.memory, {
      devices: options.endpoints.map((ep) => ({ name: endpointDeviceName(ep), group: ep, reservedRegions: [X86_MSI_WINDOW], pasidBits: options.pasidBits ?? 0 })),
      log,
    });
    this.context = this.host.open();
    this.backend = new IoasidIommuBackend(
      this.context,
      options.endpoints.map((ep) => ({ endpoint: ep, device: endpointDeviceName(ep), reservedRegions: [X86_MSI_WINDOW] })),
      log,
      this.memory.describe().regions.map((r) => ({ base: r.base, size: r.buffer.byteLength })),
    );
    this.device = new VirtioIommuDevice(this.backend, { ...options.device, endpoints: options.endpoints, log });
    this.transport = new MmioTransport(this.device, this.memory, { irq: { set: () => undefined }, log });
    const arena = driverArena(options.memorySize);
    this.allocator = new GuestAllocator(arena.base, arena.size);
    this.tablePages = pagesFromAllocator(this.allocator);
    this.driverFeatures = options.driverFeatures;
    this.driver = this.openDriver();
  }

  /** The machine a guest fixture asks for (its memory, endpoints and device keys). */
  static forFixture(fixture: GuestFixture): LocalIommuMachine {
    return new LocalIommuMachine({
      memorySize: fixture.memorySize,
      endpoints: fixture.endpoints,
      driverFeatures: fixture.device.driverFeatures,
      device: { bootBypass: fixture.device.bootBypass, ...(fixture.device.attachTable ? { attachTable: true } : {}) },
      ...(fixture.device.pasidBits > 0 ? { pasidBits: fixture.device.pasidBits } : {}),
    });
  }

  private openDriver(): IommuGuestDriver {
    return IommuGuestDriver.open({
      transport: new MmioDriverTransport(this.transport),
      memory: this.memory,
      allocator: this.allocator,
      features: this.driverFeatures,
    });
  }

  async dma(endpoint: number, address: bigint, length: number, access: 'read' | 'write', pasid?: number): Promise<'ok' | 'fault'> {
    const dev = this.backend.deviceId(endpoint);
    if (dev === undefined) throw new RangeError(`endpoint ${endpoint} does not exist`);
    const result = this.context.translate(dev, pasid ?? 0, address, length, access);
    if (result.fault !== undefined) {
      this.device.reportFault({
        reason: result.fault.reason === 'DOMAIN' ? 'DOMAIN' : 'MAPPING',
        endpoint,
        ...(pasid !== undefined ? { pasid } : {}),
        address: result.fault.iova,
        read: access === 'read',
        write: access === 'write',
      });
      return 'fault';
    }
    for (const span of result.spans) {
      // Identity translation can point outside RAM: the access reaches nothing.
      if (!this.memory.contains(span.gpa, span.length)) return 'fault';
      if (access === 'write') this.memory.fill(span.gpa, span.length, 0x5a);
      else this.memory.view(span.gpa, span.length);
    }
    return 'ok';
  }

  async flushFaults(): Promise<void> {
    // Faults are reported synchronously in this machine.
  }

  async reset(): Promise<IommuGuestDriver> {
    this.driver = this.openDriver();
    return this.driver;
  }
}
