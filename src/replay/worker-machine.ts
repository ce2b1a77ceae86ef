import { GuestAllocator } from '../../guest-fixtures/driver/allocator.js';
import { IommuGuestDriver } from '../../guest-fixtures/driver/iommu-driver.js';
import { MmioDriverTransport } from '../../guest-fixtures/driver/mmio.js';
import { PciDriverTransport } from '../../guest-fixtures/driver/pci.js';
import type { DriverTransport } from '../../guest-fixtures/driver/transport.js';
import { pagesFromAllocator, type GuestPageAllocator } from '../../guest-fixtures/pagetable/x86-64-builder.js';
import type { GuestMemory } from '../memory/index.js';
import type { IommuFeatureName } from '../iommu/layout.js';
import type { TransportKind } from '../runtime/device-worker-protocol.js';
import type { MmioBus, PciBus } from '../virtio/bus.js';
import { IommuMachine, type IommuMachineOptions } from '../vmm/iommu-machine.js';
import type { GuestFixture } from './guest-fixture.js';
import type { GuestReplayMachine } from './guest-runner.js';
import { driverArena } from './local-machine.js';

/** Where the guest finds the virtio-pci function's BAR 0 (what firmware would assign). */
const PCI_BAR0 = 0xe000_0000;

export interface WorkerReplayOptions {
  readonly memorySize: number;
  readonly transport: TransportKind;
  readonly endpoints: readonly number[];
  readonly driverFeatures: readonly IommuFeatureName[];
  readonly device?: IommuMachineOptions['device'];
  /** PASID width of every endpoint's device (default 0). */
  readonly pasidBits?: number;
}

/**
 * The replay machine as `viommu replay` runs it: the virtio-iommu in its worker behind a real
 * transport, the guest driver in this thread reaching it through the register mailbox and
 * doorbells and sleeping on its interrupts, and one DMA endpoint worker per endpoint.
 */
export class WorkerReplayMachine implements GuestReplayMachine {
  readonly canDma = true;
  driver: IommuGuestDriver;
  private readonly allocator: GuestAllocator;
  readonly tablePages: GuestPageAllocator;
  readonly memory: GuestMemory;

  private constructor(
    readonly machine: IommuMachine,
    private readonly driverFeatures: readonly IommuFeatureName[],
  ) {
    const arena = driverArena(machine.memory.size);
    this.allocator = new GuestAllocator(arena.base, arena.size);
    this.tablePages = pagesFromAllocator(this.allocator);
    this.memory = machine.memory;
    this.driver = this.openDriver();
  }

  static async create(options: WorkerReplayOptions): Promise<WorkerReplayMachine> {
    const machine = await IommuMachine.create({
      memorySize: options.memorySize,
      transport: options.transport,
      endpoints: options.endpoints.map((id) => ({ id, ...(options.pasidBits !== undefined ? { pasidBits: options.pasidBits } : {}) })),
      ...(options.device !== undefined ? { device: options.device } : {}),
    });
    try {
      return new WorkerReplayMachine(machine, options.driverFeatures);
    } catch (err) {
      await machine.close();
      throw err;
    }
  }

  /** The machine a guest fixture asks for (its memory, endpoints and device keys). */
  static forFixture(fixture: GuestFixture, transport: TransportKind): Promise<WorkerReplayMachine> {
    return WorkerReplayMachine.create({
      memorySize: fixture.memorySize,
      transport,
      endpoints: fixture.endpoints,
      driverFeatures: fixture.device.driverFeatures,
      device: { bootBypass: fixture.device.bootBypass, ...(fixture.device.attachTable ? { attachTable: true } : {}) },
      ...(fixture.device.pasidBits > 0 ? { pasidBits: fixture.device.pasidBits } : {}),
    });
  }

  private openDriver(): IommuGuestDriver {
    const { iommu } = this.machine;
    const transport: DriverTransport =
      iommu.transport === 'mmio' ? new MmioDriverTransport(iommu.bus as MmioBus) : new PciDriverTransport(iommu.bus as PciBus, { bar0Address: PCI_BAR0 });
    return IommuGuestDriver.open({
      transport,
      memory: this.machine.memory,
      allocator: this.allocator,
      interrupts: iommu.interrupts,
      features: this.driverFeatures,
    });
  }

  async dma(endpoint: number, address: bigint, length: number, access: 'read' | 'write', pasid?: number): Promise<'ok' | 'fault'> {
    const result = await this.machine.dma(endpoint, { iova: address, length, access, ...(pasid !== undefined ? { pasid } : {}) });
    return result.outcome;
  }

  async flushFaults(): Promise<void> {
    await this.machine.iommu.control.flushFaults();
  }

  async reset(): Promise<IommuGuestDriver> {
    this.driver = this.openDriver();
    return this.driver;
  }

  async close(): Promise<void> {
    await this.machine.close();
  }
}
