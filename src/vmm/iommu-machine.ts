import { Worker } from 'node:worker_threads';
import { createFaultQueueBuffer } from '../ioasid/fault-queue.js';
import { X86_MSI_WINDOW } from '../ioasid/index.js';
import { createQuiescenceBuffer, releaseWorkerSlots } from '../ioasid/quiescence.js';
import { GuestMemory } from '../memory/index.js';
import { releaseRemote, wrapPort, type Remote } from '../runtime/comlink.js';
import type { DeviceIommuSpec, TransportKind } from '../runtime/device-worker-protocol.js';
import type { DmaEngineWorkerApi, DmaEngineWorkerStart } from '../runtime/dma-engine-protocol.js';
import type { DmaRequest, DmaResult, EndpointWorkerApi, EndpointWorkerStart } from '../runtime/endpoint-worker-protocol.js';
import type { EndpointSpec, IommuWorkerApi, IommuWorkerStart } from '../runtime/iommu-worker-protocol.js';
import { workerUrl } from '../runtime/worker-url.js';
import { decodeImage, encodeImage, sectionMap, type ImageSection, type PlainValue } from '../migration/image.js';
import type { DeviceWorkerState } from '../runtime/device-worker-protocol.js';
import type { DmaEngineWorkerState } from '../runtime/dma-engine-protocol.js';
import type { IommuWorkerState } from '../runtime/iommu-worker-protocol.js';
import { DeviceSignal, createSignalBuffer } from '../virtio/signals.js';
import { DeviceHandle, DeviceWorkerError, countWorker } from './device-handle.js';

/**
 * What sits behind an endpoint: a test endpoint (DMA on command from the host, for tests and
 * replay), a DMA engine (a VFIO-style PCI function the guest programs itself) or a virtio-net
 * device (the vDPA-style consumer: ACCESS_PLATFORM, every ring and buffer address an IOVA).
 */
export type EndpointKind = 'test' | 'dma-engine' | 'virtio-net';

/** An endpoint as the embedder declares it: just its ID (a test endpoint), or its ID with details. */
export type EndpointDeclaration =
  | number
  | (Partial<Omit<EndpointSpec, 'id'>> & {
      readonly id: number;
      readonly kind?: EndpointKind;
      readonly pasidCapable?: boolean;
      /** DMA engine: rest between passes of a repeating transfer, in µs (default 50; 0: none). */
      readonly repeatGapMicros?: number;
      /** virtio-net: the transport it sits behind (default: the machine's). */
      readonly transport?: TransportKind;
      /** virtio-net: its MAC address (six bytes). */
      readonly mac?: readonly number[];
    });

export interface IommuMachineOptions {
  /** Guest RAM at GPA 0, in bytes (a multiple of 4 KiB). */
  readonly memorySize: number;
  readonly transport: TransportKind;
  /** Devices behind the IOMMU, each in its own worker. */
  readonly endpoints: readonly EndpointDeclaration[];
  readonly device?: IommuWorkerStart['device'];
  readonly memlockLimitPages?: number;
  /** How long an unmap waits for device workers to leave their DMAs (default: the context's). */
  readonly quiescenceTimeoutMs?: number;
  /** Quiescence slots beyond the test endpoints, for consumer devices added later (default 8). */
  readonly spareWorkerSlots?: number;
  readonly maxSpinMicros?: number;
  /** Guest memory to run on (default: a fresh one of memorySize at GPA 0); its size must be memorySize. */
  readonly memory?: GuestMemory;
}

/** Version of the image sections this machine writes (each section's own u16). */
const SECTION_VERSION = 1;
const MACHINE_SECTION = 'machine';
const IOMMU_SECTION = 'virtio-iommu';

function endpointSection(id: number): string {
  return `endpoint-${id.toString(16).padStart(4, '0')}`;
}

/** A migration image that cannot be restored: what is wrong, and nothing was left running. */
export class MigrationError extends Error {
  readonly code = 'EMIGRATION' as const;
  constructor(message: string) {
    super(message);
    this.name = 'MigrationError';
  }
}

/** The options as plain data for the image: no undefined values, no memory object. */
function plainOptions(o: IommuMachineOptions): PlainValue {
  const strip = (v: unknown): PlainValue => {
    if (Array.isArray(v)) return v.map(strip);
    if (typeof v === 'object' && v !== null && !(v instanceof Uint8Array)) {
      const out: Record<string, PlainValue> = {};
      for (const [k, x] of Object.entries(v)) if (x !== undefined && k !== 'memory') out[k] = strip(x);
      return out;
    }
    return v as PlainValue;
  };
  return strip(o);
}

/** Per-worker states to start from (a migration's destination). */
interface RestoreStates {
  readonly iommu: IommuWorkerState;
  readonly endpoints: ReadonlyMap<number, PlainValue>;
}

/** Name of the backend device behind an endpoint ID. */
export function endpointDeviceName(endpoint: number): string {
  return `endpoint-${endpoint.toString(16).padStart(4, '0')}`;
}

function endpointSpec(decl: EndpointDeclaration): EndpointSpec {
  const d: Partial<Omit<EndpointSpec, 'id'>> & { readonly id: number; readonly kind?: EndpointKind } = typeof decl === 'number' ? { id: decl } : decl;
  if (!Number.isInteger(d.id) || d.id < 0 || d.id > 0xffff_ffff) throw new RangeError(`endpoint ID must be a u32, got ${String(d.id)}`);
  return {
    id: d.id,
    device: d.device ?? endpointDeviceName(d.id),
    // Without a declared group, each endpoint is its own isolation group.
    group: d.group ?? `group-${d.id}`,
    reservedRegions: d.reservedRegions ?? [X86_MSI_WINDOW],
    ...(d.pasidBits !== undefined ? { pasidBits: d.pasidBits } : {}),
    // The vDPA-style device consumes DMA as software: an iommufd access, not a bound device.
    ...(d.kind === 'virtio-net' ? { consumer: 'access' as const } : {}),
  };
}

/** Checks every option on the caller's thread, so a mistake is one clear error, not a dead worker. */
function validateOptions(o: IommuMachineOptions): void {
  const fail = (what: string): never => {
    throw new TypeError(`IommuMachine: ${what}`);
  };
  if (typeof o !== 'object' || o === null) fail('options must be an object');
  if (!Number.isSafeInteger(o.memorySize) || o.memorySize < 1 << 20 || o.memorySize % 4096 !== 0) fail(`memorySize must be a multiple of 4096 of at least 1 MiB, got ${String(o.memorySize)}`);
  if (o.transport !== 'mmio' && o.transport !== 'pci') fail(`transport must be 'mmio' or 'pci', got ${String(o.transport)}`);
  if (!Array.isArray(o.endpoints)) fail('endpoints must be an array');
  for (const [i, e] of o.endpoints.entries()) {
    if (typeof e === 'number') continue;
    if (typeof e !== 'object' || e === null) fail(`endpoints[${i}] must be an endpoint ID or an object with an id`);
    if (!Number.isInteger(e.id) || e.id < 0 || e.id > 0xffff_ffff) fail(`endpoints[${i}].id must be a u32`);
    if (e.kind !== undefined && e.kind !== 'test' && e.kind !== 'dma-engine' && e.kind !== 'virtio-net') {
      fail(`endpoints[${i}].kind must be 'test', 'dma-engine' or 'virtio-net', got ${String(e.kind)}`);
    }
    if (e.transport !== undefined && e.transport !== 'mmio' && e.transport !== 'pci') fail(`endpoints[${i}].transport must be 'mmio' or 'pci'`);
    if (e.mac !== undefined && (!Array.isArray(e.mac) || e.mac.length !== 6 || e.mac.some((b) => !Number.isInteger(b) || b < 0 || b > 255))) {
      fail(`endpoints[${i}].mac must be six bytes`);
    }
    if (e.group !== undefined && typeof e.group !== 'string' && typeof e.group !== 'number') fail(`endpoints[${i}].group must be a string or a number`);
    if (e.pasidCapable !== undefined && typeof e.pasidCapable !== 'boolean') fail(`endpoints[${i}].pasidCapable must be a boolean`);
    if (e.repeatGapMicros !== undefined && !(Number.isFinite(e.repeatGapMicros) && e.repeatGapMicros >= 0)) fail(`endpoints[${i}].repeatGapMicros must be a non-negative number`);
  }
  const d = o.device ?? {};
  if (d.bootBypass !== undefined && typeof d.bootBypass !== 'boolean') fail('device.bootBypass must be a boolean');
  if (d.pageSizeMask !== undefined && (typeof d.pageSizeMask !== 'bigint' || d.pageSizeMask <= 0n || (d.pageSizeMask & 0xfffn) !== 0n)) {
    fail('device.pageSizeMask must be a nonzero bigint with no bit below 4 KiB (the backend maps 4 KiB pages at least)');
  }
  if (d.inputRange !== undefined && (typeof d.inputRange[0] !== 'bigint' || typeof d.inputRange[1] !== 'bigint' || d.inputRange[0] > d.inputRange[1] || d.inputRange[0] < 0n || d.inputRange[1] > (1n << 64n) - 1n)) {
    fail('device.inputRange must be [start, end] bigints in [0, 2^64) with start <= end');
  }
  if (d.domainRange !== undefined && !(Number.isInteger(d.domainRange[0]) && Number.isInteger(d.domainRange[1]) && d.domainRange[0] >= 0 && d.domainRange[0] <= d.domainRange[1] && d.domainRange[1] <= 0xffff_ffff)) {
    fail('device.domainRange must be [start, end] u32 integers with start <= end');
  }
  if (d.probeSize !== undefined && (!Number.isInteger(d.probeSize) || d.probeSize < 0 || d.probeSize > 1 << 16 || d.probeSize % 4 !== 0)) fail('device.probeSize must be a multiple of 4 in [0, 65536]');
  if (d.maxDomains !== undefined && (!Number.isInteger(d.maxDomains) || d.maxDomains < 1)) fail('device.maxDomains must be a positive integer');
  if (d.maxPendingFaults !== undefined && (!Number.isInteger(d.maxPendingFaults) || d.maxPendingFaults < 1)) fail('device.maxPendingFaults must be a positive integer');
  if (o.memlockLimitPages !== undefined && (!Number.isSafeInteger(o.memlockLimitPages) || o.memlockLimitPages < 0)) fail('memlockLimitPages must be a non-negative integer');
  if (o.quiescenceTimeoutMs !== undefined && !(o.quiescenceTimeoutMs > 0)) fail('quiescenceTimeoutMs must be positive');
  if (o.memory !== undefined && (!(o.memory instanceof GuestMemory) || o.memory.size !== o.memorySize)) fail('memory must be a GuestMemory of memorySize bytes');
  if (o.spareWorkerSlots !== undefined && (!Number.isInteger(o.spareWorkerSlots) || o.spareWorkerSlots < 0 || o.spareWorkerSlots > 1024)) fail('spareWorkerSlots must be an integer in [0, 1024]');
}

/** A test endpoint in its worker: DMA on command through the shared translation. */
export class EndpointHandle {
  failure: DeviceWorkerError | undefined;

  constructor(
    readonly endpoint: number,
    readonly worker: Worker,
    readonly control: Remote<EndpointWorkerApi>,
  ) {
    countWorker(worker);
    worker.on('error', (err) => {
      this.failure = new DeviceWorkerError(`endpoint ${endpoint}`, `worker crashed: ${err.message}`);
    });
  }

  async dma(request: DmaRequest): Promise<DmaResult> {
    if (this.failure !== undefined) throw this.failure;
    return this.control.dma(request);
  }

  async close(): Promise<void> {
    if (this.failure === undefined) {
      try {
        await this.control.stop();
      } catch {
        // Going away regardless.
      }
    }
    releaseRemote(this.control);
    await this.worker.terminate();
  }
}

/**
 * A machine as a VMM builds it: guest memory, the virtio-iommu in its worker (which owns the
 * iommufd context and is the only writer of page tables) behind virtio-mmio or virtio-pci, and one
 * test endpoint worker per endpoint, translating its own DMA through the shared page tables.
 * The guest side (a driver on `iommu.bus`) is the caller's.
 */
export class IommuMachine {
  private closed = false;
  private paused = false;
  /**
   * Consumer devices whose worker died, by endpoint ID, with the reason. The machine has freed
   * their quiescence slots (so no unmap waits for them) and detached them in the backend; the
   * guest sees their registers fail. The virtio-iommu and the other devices keep working.
   */
  readonly failures = new Map<number, string>();
  private readonly settling: Promise<void>[] = [];

  readonly transport: TransportKind;

  private constructor(
    readonly memory: GuestMemory,
    private readonly options: IommuMachineOptions,
    readonly iommu: DeviceHandle<IommuWorkerApi>,
    /** Test endpoints by endpoint ID. */
    readonly endpoints: ReadonlyMap<number, EndpointHandle>,
    /** DMA-engine functions by endpoint ID; the guest reaches each through its `bus`. */
    readonly dmaEngines: ReadonlyMap<number, DeviceHandle<DmaEngineWorkerApi>>,
    /** virtio-net devices by endpoint ID, each behind its own transport. */
    readonly netDevices: ReadonlyMap<number, DeviceHandle>,
    private readonly quiescence: SharedArrayBuffer,
  ) {
    this.transport = options.transport;
    const watch = (endpoint: number, worker: Worker): void => {
      const threadId = worker.threadId;
      worker.once('exit', (code) => {
        if (!this.closed) this.consumerDied(endpoint, threadId, `worker exited with code ${code}`);
      });
    };
    for (const [id, h] of endpoints) watch(id, h.worker);
    for (const [id, h] of dmaEngines) watch(id, h.worker);
    for (const [id, h] of netDevices) watch(id, h.worker);
  }

  /** A consumer's worker died: free what it held and tell the iommu worker, once. */
  private consumerDied(endpoint: number, threadId: number, reason: string): void {
    if (this.failures.has(endpoint)) return;
    this.failures.set(endpoint, reason);
    // From this thread, at once: an unmap in the iommu worker may be waiting for the dead DMA.
    releaseWorkerSlots(this.quiescence, threadId);
    this.settling.push(
      this.iommu.control.consumerGone(endpoint).catch(() => {
        // The iommu worker itself is going away; close() reports that.
      }),
    );
  }

  /**
   * Why the virtio-iommu worker is gone, if it died: the machine has lost its IOMMU (no request
   * is served, no fault delivered). Consumers' register accesses still work; the guest's IOMMU
   * driver gets errors at once instead of waiting for timeouts.
   */
  get iommuFailure(): DeviceWorkerError | undefined {
    return this.closed ? undefined : this.iommu.failure;
  }

  /** Resolves once every consumer failure seen so far has been handled by the iommu worker. */
  async settled(): Promise<void> {
    await Promise.all(this.settling);
  }

  static async create(options: IommuMachineOptions): Promise<IommuMachine> {
    validateOptions(options);
    return IommuMachine.build(options, undefined);
  }

  private static async build(options: IommuMachineOptions, restore: RestoreStates | undefined): Promise<IommuMachine> {
    const specs = options.endpoints.map(endpointSpec);
    const ids = new Set(specs.map((s) => s.id));
    if (ids.size !== specs.length) throw new RangeError('endpoint IDs must be distinct');
    const memory = options.memory ?? GuestMemory.create(options.memorySize);
    const quiescence = createQuiescenceBuffer(specs.length + (options.spareWorkerSlots ?? 8));
    const faults = createFaultQueueBuffer(256);
    const start: IommuWorkerStart = {
      name: 'virtio-iommu',
      transport: options.transport,
      memory: memory.describe(),
      signals: createSignalBuffer(),
      endpoints: specs,
      device: options.device ?? {},
      quiescence,
      faults,
      ...(options.memlockLimitPages !== undefined ? { memlockLimitPages: options.memlockLimitPages } : {}),
      ...(options.quiescenceTimeoutMs !== undefined ? { quiescenceTimeoutMs: options.quiescenceTimeoutMs } : {}),
      ...(options.maxSpinMicros !== undefined ? { maxSpinMicros: options.maxSpinMicros } : {}),
      ...(restore !== undefined ? { restore: restore.iommu } : {}),
    };
    const iommu = await DeviceHandle.launch<IommuWorkerApi, IommuWorkerStart>({
      entry: 'iommu-worker',
      name: 'virtio-iommu',
      transport: options.transport,
      start,
      queues: 2,
    });
    const endpoints = new Map<number, EndpointHandle>();
    const dmaEngines = new Map<number, DeviceHandle<DmaEngineWorkerApi>>();
    const netDevices = new Map<number, DeviceHandle>();
    try {
      for (const [i, spec] of specs.entries()) {
        const t = await iommu.control.endpointTranslation(spec.id);
        const decl = options.endpoints[i]!;
        const kind = typeof decl === 'number' ? 'test' : (decl.kind ?? 'test');
        if (kind === 'dma-engine') {
          const engineStart: DmaEngineWorkerStart = {
            name: spec.device,
            memory: start.memory,
            signals: createSignalBuffer(),
            translation: { shared: t.shared, row: t.row, quiescence, faults, iommuSignals: start.signals },
            ...(restore !== undefined ? { restore: restore.endpoints.get(spec.id) as unknown as DmaEngineWorkerState } : {}),
            ...(typeof decl !== 'number' && decl.pasidCapable !== undefined ? { pasidCapable: decl.pasidCapable } : {}),
            ...(typeof decl !== 'number' && decl.repeatGapMicros !== undefined ? { repeatGapMicros: decl.repeatGapMicros } : {}),
          };
          dmaEngines.set(
            spec.id,
            await DeviceHandle.launch<DmaEngineWorkerApi, DmaEngineWorkerStart>({ entry: 'dma-engine-worker', name: spec.device, transport: 'pci', start: engineStart, queues: 0 }),
          );
          continue;
        }
        if (kind === 'virtio-net') {
          const net = typeof decl === 'number' ? undefined : decl;
          const iommuSpec: DeviceIommuSpec = { shared: t.shared, row: t.row, quiescence, faults, wake: start.signals, wakeIndex: DeviceSignal.WAKE };
          netDevices.set(
            spec.id,
            await DeviceHandle.spawn({
              name: spec.device,
              model: { kind: 'virtio-net', options: { iommu: iommuSpec, ...(net?.mac !== undefined ? { mac: net.mac } : {}) } },
              transport: net?.transport ?? options.transport,
              memory,
              queues: 2,
              ...(restore !== undefined ? { restore: restore.endpoints.get(spec.id) as unknown as DeviceWorkerState } : {}),
            }),
          );
          continue;
        }
        const epStart: EndpointWorkerStart = {
          name: spec.device,
          endpoint: spec.id,
          row: t.row,
          shared: t.shared,
          memory: start.memory,
          quiescence,
          faults,
          iommuSignals: start.signals,
        };
        const worker = new Worker(workerUrl('endpoint-worker'), { workerData: epStart, name: `viommu:${spec.device}` });
        const handle = new EndpointHandle(spec.id, worker, wrapPort<EndpointWorkerApi>(worker));
        endpoints.set(spec.id, handle);
        await Promise.race([
          handle.control.stats(),
          new Promise((_, reject) => worker.once('error', (err) => reject(new DeviceWorkerError(spec.device, `failed to start: ${err.message}`)))),
        ]);
      }
    } catch (err) {
      await Promise.all([...endpoints.values()].map((e) => e.close()));
      await Promise.all([...dmaEngines.values()].map((e) => e.close()));
      await Promise.all([...netDevices.values()].map((e) => e.close()));
      await iommu.close();
      throw err;
    }
    return new IommuMachine(memory, options, iommu, endpoints, dmaEngines, netDevices, quiescence);
  }

  // ---- migration ------------------------------------------------------------------------------

  /**
   * Stops the machine's devices, consumers first (their DMA ends, their fault records are queued),
   * then the virtio-iommu; resolves when none does any work. Guest register accesses wait meanwhile.
   */
  async pause(): Promise<void> {
    await Promise.all([...this.dmaEngines.values()].map((h) => h.control.pause()));
    await Promise.all([...this.netDevices.values()].map((h) => (h as DeviceHandle).control.pause()));
    await this.iommu.control.pause();
    this.paused = true;
  }

  /** Runs the devices again after pause() (the iommu first, so consumers' DMA finds it serving). */
  async resume(): Promise<void> {
    await this.iommu.control.resume();
    await Promise.all([...this.netDevices.values()].map((h) => (h as DeviceHandle).control.resume()));
    await Promise.all([...this.dmaEngines.values()].map((h) => h.control.resume()));
    this.paused = false;
  }

  /** Dirty tracking of DMA by bound devices (every paging HWPT), for a migration's pre-copy. */
  async setDirtyTracking(enable: boolean): Promise<void> {
    await this.iommu.control.setDirtyTracking(enable);
  }

  /** Guest page frames (GPA / 4 KiB) DMA by bound devices wrote since the last call (tracking on). */
  async dirtyPages(): Promise<number[]> {
    return this.iommu.control.dirtyPages();
  }

  /**
   * The paused machine as one migration image (docs/migration.md): its options, the virtio-iommu
   * worker (device, transport, iommufd context) and each consumer device. Guest memory is not in
   * it: the VMM copies memory itself, with dirtyPages() for what DMA wrote.
   */
  async saveImage(): Promise<Uint8Array> {
    if (!this.paused) throw new MigrationError('saveImage needs a paused machine (pause() first)');
    const sections: ImageSection[] = [
      { name: MACHINE_SECTION, version: SECTION_VERSION, payload: plainOptions(this.options) },
      { name: IOMMU_SECTION, version: SECTION_VERSION, payload: (await this.iommu.control.saveState()) as unknown as PlainValue },
    ];
    for (const [id, h] of this.dmaEngines) sections.push({ name: endpointSection(id), version: SECTION_VERSION, payload: (await h.control.saveState()) as unknown as PlainValue });
    for (const [id, h] of this.netDevices) sections.push({ name: endpointSection(id), version: SECTION_VERSION, payload: (await (h as DeviceHandle).control.saveState()) as unknown as PlainValue });
    return encodeImage(sections);
  }

  /**
   * A machine from a migration image, in new workers over `memory` (a copy of the source's guest
   * memory, made while the source was paused). The image is checked whole — container checksums,
   * then each worker's state as it starts — and any failure stops every worker already started and
   * throws (MigrationImageError for the container, MigrationError for its contents): nothing is
   * left half restored. The machine starts running at once.
   */
  static async restore(image: Uint8Array, target: { readonly memory: GuestMemory }): Promise<IommuMachine> {
    const sections = sectionMap(decodeImage(image));
    const section = (name: string): PlainValue => {
      const s = sections.get(name);
      if (s === undefined) throw new MigrationError(`the image has no '${name}' section`);
      if (s.version !== SECTION_VERSION) throw new MigrationError(`section '${name}' has version ${s.version}; this build reads ${SECTION_VERSION}`);
      return s.payload;
    };
    try {
      return await IommuMachine.restoreSections(sections, section, target);
    } catch (err) {
      if (err instanceof MigrationError) throw err;
      throw new MigrationError(`the image's contents do not fit: ${(err as Error).message}`);
    }
  }

  private static async restoreSections(
    sections: ReadonlyMap<string, ImageSection>,
    section: (name: string) => PlainValue,
    target: { readonly memory: GuestMemory },
  ): Promise<IommuMachine> {
    const saved = section(MACHINE_SECTION);
    if (typeof saved !== 'object' || saved === null || Array.isArray(saved) || saved instanceof Uint8Array) throw new MigrationError("the 'machine' section is not an options object");
    const options = { ...(saved as unknown as IommuMachineOptions), memory: target.memory };
    try {
      validateOptions(options);
    } catch (err) {
      throw new MigrationError(`saved machine options: ${(err as Error).message}`);
    }
    const iommu = section(IOMMU_SECTION) as unknown as IommuWorkerState;
    if (typeof iommu !== 'object' || iommu === null) throw new MigrationError("the 'virtio-iommu' section is not an object");
    const endpoints = new Map<number, PlainValue>();
    const consumerIds = new Set<number>();
    for (const decl of options.endpoints) {
      if (typeof decl === 'number' || (decl.kind ?? 'test') === 'test') continue;
      consumerIds.add(decl.id);
      endpoints.set(decl.id, section(endpointSection(decl.id)));
    }
    const known = new Set([MACHINE_SECTION, IOMMU_SECTION, ...[...consumerIds].map(endpointSection)]);
    for (const name of sections.keys()) if (!known.has(name)) throw new MigrationError(`the image has a section '${name}' this machine has no device for`);
    try {
      return await IommuMachine.build(options, { iommu, endpoints });
    } catch (err) {
      throw new MigrationError(`restore failed, nothing is running: ${(err as Error).message}`);
    }
  }

  /** A DMA by the endpoint's device, translated in its worker. */
  async dma(endpoint: number, request: DmaRequest): Promise<DmaResult> {
    const handle = this.endpoints.get(endpoint);
    if (handle === undefined) throw new RangeError(`endpoint ${endpoint} is not a test endpoint`);
    return handle.dma(request);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all([...this.endpoints.values()].map((e) => e.close()));
    await Promise.all([...this.dmaEngines.values()].map((e) => e.close()));
    await Promise.all([...this.netDevices.values()].map((e) => e.close()));
    await this.iommu.close();
  }
}
