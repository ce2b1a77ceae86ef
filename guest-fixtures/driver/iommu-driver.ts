import type { GuestMemory } from '../../src/memory/index.js';
import { FaultRecord, IommuConfig, IommuFeature, IommuQueue, type IommuFeatureName } from '../../src/iommu/layout.js';
import type { InterruptWaiter } from '../../src/virtio/interrupt-waiter.js';
import type { GuestAllocator } from './allocator.js';
import { GuestDevice } from './guest-device.js';
import { decodeFault, statusOf, type DecodedFault, type EncodedRequest } from './iommu-requests.js';
import { readConfigConsistent, readConfigU64, type DriverTransport } from './transport.js';

const F_VERSION_1 = 1n << 32n;
const F_INDIRECT_DESC = 1n << 28n;
const F_EVENT_IDX = 1n << 29n;

/** What a completed request gave back. */
export interface RequestResult {
  /** Status byte from the tail, or NONE when the device returned the buffer unwritten. */
  readonly status: number | 'NONE';
  readonly usedLength: number;
  /** The device-writable part as the device left it. */
  readonly writable: Uint8Array;
}

/** Requests on the queue that the guest has not collected yet. */
export interface PostedRequests {
  readonly placed: readonly { readonly head: number; readonly readAddr: number; readonly writeAddr: number; readonly req: EncodedRequest }[];
}

export interface IommuConfigValues {
  readonly pageSizeMask: bigint;
  readonly inputRange: readonly [bigint, bigint];
  readonly domainRange: readonly [number, number];
  readonly probeSize: number;
  readonly bypass: number;
}

export interface IommuDriverOptions {
  readonly transport: DriverTransport;
  readonly memory: GuestMemory;
  readonly allocator: GuestAllocator;
  readonly interrupts?: InterruptWaiter;
  /** Device-specific features the driver accepts (default: all it knows). */
  readonly features?: readonly IommuFeatureName[];
  /** Event buffers kept posted (default 8). */
  readonly eventBuffers?: number;
  readonly queueSize?: number;
}

/**
 * A guest's virtio-iommu driver: negotiates, keeps the event queue stocked with fault-record
 * buffers, puts requests on the request queue (one by one or as a batch behind one notification)
 * and reads their status, config and fault reports.
 */
export class IommuGuestDriver {
  readonly device: GuestDevice;
  readonly offered: bigint;
  private readonly eventBufferCount: number;

  private constructor(
    private readonly options: IommuDriverOptions,
    device: GuestDevice,
    offered: bigint,
  ) {
    this.device = device;
    this.offered = offered;
    this.eventBufferCount = options.eventBuffers ?? 8;
  }

  static open(options: IommuDriverOptions): IommuGuestDriver {
    let wanted = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX;
    const names = options.features ?? (Object.keys(IommuFeature) as IommuFeatureName[]);
    for (const name of names) wanted |= 1n << BigInt(IommuFeature[name]);
    const offered = options.transport.readDeviceFeatures();
    const device = GuestDevice.open({
      transport: options.transport,
      memory: options.memory,
      allocator: options.allocator,
      wantedFeatures: wanted,
      ...(options.interrupts !== undefined ? { interrupts: options.interrupts } : {}),
      queueSize: options.queueSize ?? 128,
      queueCount: 2,
    });
    const driver = new IommuGuestDriver(options, device, offered);
    driver.stockEvents();
    return driver;
  }

  get negotiated(): bigint {
    return this.device.negotiated;
  }

  /** Device-specific feature names the device offers. */
  offeredNames(): IommuFeatureName[] {
    return (Object.keys(IommuFeature) as IommuFeatureName[]).filter((n) => (this.offered >> BigInt(IommuFeature[n])) & 1n);
  }

  /** Sends one request and waits for it. */
  request(req: EncodedRequest, timeoutMs = 5000): RequestResult {
    return this.batch([req], timeoutMs)[0]!;
  }

  /** Places every request on the queue before one notification; results in submission order. */
  batch(requests: readonly EncodedRequest[], timeoutMs = 5000): RequestResult[] {
    return this.wait(this.post(requests), timeoutMs);
  }

  /**
   * Places the requests and notifies, without waiting: a guest that goes on with other work.
   * Collect them with wait() before posting more; completions() tells whether any has been used.
   */
  post(requests: readonly EncodedRequest[]): PostedRequests {
    const { memory, allocator } = this.options;
    const placed = requests.map((req, i) => {
      const readAddr = req.readable.length > 0 ? allocator.alloc(req.readable.length, 8) : 0;
      const writeAddr = req.writable > 0 ? allocator.alloc(req.writable, 8) : 0;
      if (req.readable.length > 0) memory.write(readAddr, req.readable);
      // Poison the writable part so a status the device did not write cannot be mistaken for OK.
      if (req.writable > 0) memory.fill(writeAddr, req.writable, 0xa5);
      const head = this.device.submit(
        IommuQueue.REQUEST,
        {
          readable: req.readable.length > 0 ? [{ addr: readAddr, len: req.readable.length }] : [],
          writable: req.writable > 0 ? [{ addr: writeAddr, len: req.writable }] : [],
        },
        { token: i, kick: false },
      );
      return { head, readAddr, writeAddr, req };
    });
    this.device.kick(IommuQueue.REQUEST);
    return { placed };
  }

  /** Used request buffers the device has published and no wait() has collected yet. */
  completions(): number {
    return this.device.queue(IommuQueue.REQUEST).pendingUsed();
  }

  /** Waits for every request of `posted`; results in submission order. */
  wait(posted: PostedRequests, timeoutMs = 5000): RequestResult[] {
    const { memory, allocator } = this.options;
    const { placed } = posted;
    const results = new Array<RequestResult>(placed.length);
    for (let done = 0; done < placed.length; done++) {
      const used = this.device.waitUsed(IommuQueue.REQUEST, timeoutMs);
      const p = placed[used.token as number]!;
      const writable = p.req.writable > 0 ? memory.view(p.writeAddr, p.req.writable).slice() : new Uint8Array(0);
      results[used.token as number] = { status: statusOf(writable, used.len), usedLength: used.len, writable };
      if (p.req.readable.length > 0) allocator.free(p.readAddr);
      if (p.req.writable > 0) allocator.free(p.writeAddr);
    }
    return results;
  }

  readConfig(): IommuConfigValues {
    const t = this.options.transport;
    return readConfigConsistent(t, () => ({
      pageSizeMask: readConfigU64(t, IommuConfig.pageSizeMask.offset),
      inputRange: [readConfigU64(t, IommuConfig.inputRangeStart.offset), readConfigU64(t, IommuConfig.inputRangeEnd.offset)] as const,
      domainRange: [t.configRead(IommuConfig.domainRangeStart.offset, 4), t.configRead(IommuConfig.domainRangeEnd.offset, 4)] as const,
      probeSize: t.configRead(IommuConfig.probeSize.offset, 4),
      bypass: t.configRead(IommuConfig.bypass.offset, 1),
    }));
  }

  writeBypass(value: number): void {
    this.options.transport.configWrite(IommuConfig.bypass.offset, 1, value);
  }

  /** The next fault record the device has reported, if any; its buffer goes back on the queue. */
  takeFault(): DecodedFault | undefined {
    const q = this.device.queue(IommuQueue.EVENT);
    const used = q.popUsed();
    if (used === undefined) return undefined;
    const addr = used.token as number;
    const record = this.options.memory.view(addr, FaultRecord.SIZE).slice();
    this.postEvent(addr);
    this.device.kick(IommuQueue.EVENT);
    return used.len >= FaultRecord.SIZE ? decodeFault(record) : undefined;
  }

  private stockEvents(): void {
    for (let i = 0; i < this.eventBufferCount; i++) this.postEvent(this.options.allocator.alloc(FaultRecord.SIZE, 8));
    this.device.kick(IommuQueue.EVENT);
  }

  private postEvent(addr: number): void {
    this.options.memory.fill(addr, FaultRecord.SIZE, 0);
    this.device.submit(IommuQueue.EVENT, { readable: [], writable: [{ addr, len: FaultRecord.SIZE }] }, { token: addr, kick: false });
  }
}
