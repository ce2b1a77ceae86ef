import type { Worker } from 'node:worker_threads';
import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import { encodeAttach, encodeMap, encodeUnmap, type EncodedRequest } from '../guest-fixtures/driver/iommu-requests.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { IommuQueue, MapFlag, ReqTail, Status } from '../src/iommu/layout.js';
import { GuestMemory } from '../src/memory/index.js';
import { releaseRemote, wrapPort, type Remote } from '../src/runtime/comlink.js';
import { MmioBusClient } from '../src/virtio/bus-client.js';
import { DeviceSignal, createSignalBuffer } from '../src/virtio/signals.js';
import { median, quantile, startWorker, type BenchContext, type BenchGroup } from './harness.js';
import { PollingQueue, type FixedRequest } from './polling-queue.js';
import { DmaLoop, type DmaLoopStart, type ViommuControl, type ViommuStart } from './protocol.js';

const DOMAIN = 1;
const ENDPOINT = 8;
/** Requests per notification in the throughput figure. */
const BATCH = 64;
const PAGE = 4096;
/** IOVAs of the benchmark's mappings start here (clear of the x86 MSI window). */
const IOVA_BASE = 1 << 30;
const POISON = 0xa5;
/** Guest-physical start of the pages the device workers write (above the driver's allocations). */
const DATA_GPA = 8 << 20;

/** One request laid out once in guest memory and resubmitted as is, as a polling driver does. */
interface Prepared {
  readonly request: FixedRequest;
  /** Guest-physical address of the status byte. */
  readonly status: number;
}

function prepare(m: Machine, req: EncodedRequest): Prepared {
  const readAddr = m.allocator.alloc(req.readable.length, 8);
  const writeAddr = m.allocator.alloc(req.writable, 8);
  m.memory.write(readAddr, req.readable);
  return {
    request: m.queue.prepare(readAddr, req.readable.length, writeAddr, req.writable),
    status: writeAddr + req.writable - ReqTail.SIZE + ReqTail.status.offset,
  };
}

/** Submits `batch` behind one notification, spins until all are back, then checks every status. */
function roundTrip(m: Machine, batch: readonly Prepared[], requests: readonly FixedRequest[]): void {
  for (const r of batch) m.memory.writeU8(r.status, POISON);
  m.queue.submit(requests);
  m.queue.waitUsed(requests.length);
  for (const r of batch) {
    const status = m.memory.readU8(r.status);
    if (status !== Status.OK) throw new Error(`request failed with status ${status}`);
  }
}

interface Machine {
  readonly memory: GuestMemory;
  readonly allocator: GuestAllocator;
  /** The request queue, polled. */
  readonly queue: PollingQueue;
  readonly signals: Int32Array;
  readonly control: Remote<ViommuControl>;
  close(): Promise<void>;
}

/**
 * The device in its worker, negotiated and with the endpoint attached to a paging domain. With
 * `dmaWorkers`, its context waits for that many device workers on every unmap.
 */
async function machine(dmaWorkers: number, queueSize = 256): Promise<Machine> {
  const size = 16 << 20;
  const memory = GuestMemory.create(size);
  // The driver's rings and requests live below DATA_GPA; the pages DMA writes into live above it,
  // so device workers never scribble over the guest's own queues.
  const allocator = new GuestAllocator(0x1000, DATA_GPA - 0x1000);
  const signals = createSignalBuffer();
  const start: ViommuStart = { memory: memory.describe(), signals, endpoint: ENDPOINT, dmaWorkers };
  let worker: Worker | undefined;
  let control: Remote<ViommuControl> | undefined;
  const close = async (): Promise<void> => {
    if (control !== undefined) {
      await control.stop();
      releaseRemote(control);
    }
    await worker?.terminate();
  };
  try {
    worker = await startWorker('viommu', start);
    control = wrapPort<ViommuControl>(worker);
    await control.ready();
    const transport = new MmioDriverTransport(new MmioBusClient(signals));
    const driver = IommuGuestDriver.open({ transport, memory, allocator, queueSize });
    const attached = driver.request(encodeAttach(DOMAIN, ENDPOINT));
    if (attached.status !== Status.OK) throw new Error(`ATTACH failed with status ${String(attached.status)}`);
    const queue = new PollingQueue(memory, driver.device.queue(IommuQueue.REQUEST), () => transport.notify(IommuQueue.REQUEST));
    return { memory, allocator, queue, signals: new Int32Array(signals), control, close };
  } catch (err) {
    await close();
    throw err;
  }
}

/** MAP and UNMAP requests of `count` distinct 4 KiB pages. */
function pages(m: Machine, count: number, iovaBase: number, gpaBase = 0): { maps: Prepared[]; unmaps: Prepared[] } {
  const maps: Prepared[] = [];
  const unmaps: Prepared[] = [];
  for (let k = 0; k < count; k++) {
    const iova = BigInt(iovaBase + k * PAGE);
    const gpa = BigInt(gpaBase + ((k * 7) % 1024) * PAGE);
    maps.push(prepare(m, encodeMap(DOMAIN, iova, iova + BigInt(PAGE - 1), gpa, MapFlag.READ | MapFlag.WRITE)));
    unmaps.push(prepare(m, encodeUnmap(DOMAIN, iova, iova + BigInt(PAGE - 1))));
  }
  return { maps, unmaps };
}

function wakeups(m: Machine): number {
  return Atomics.load(m.signals, DeviceSignal.STAT_WAKEUPS);
}

/** Batch sizes of the throughput sweep (requests per notification). */
const BATCH_SWEEP = [1, 16, 256] as const;

function measure(ctx: BenchContext, m: Machine): void {
  const { maps, unmaps } = pages(m, 256, IOVA_BASE);

  // Throughput: 64 MAPs behind one notification, then their 64 UNMAPs behind another.
  if (ctx.wants('viommu.map_unmap_per_s')) {
    ctx.record('viommu.map_unmap_per_s', throughput(ctx, m, maps.slice(0, BATCH), unmaps.slice(0, BATCH)));
    // How it grows with the batch: fewer notifications and wake-ups per request.
    for (const batch of BATCH_SWEEP) {
      ctx.record(`viommu.map_unmap_per_s_b${batch}`, throughput(ctx, m, maps.slice(0, batch), unmaps.slice(0, batch)));
    }
  }
  if (ctx.wants('viommu.request_rtt')) latency(ctx, m, maps, unmaps);
}

function throughput(ctx: BenchContext, m: Machine, maps: readonly Prepared[], unmaps: readonly Prepared[]): number {
  const mapHeads = maps.map((p) => p.request);
  const unmapHeads = unmaps.map((p) => p.request);
  // About the same number of requests whatever the batch.
  const rounds = Math.max(20, Math.round(((ctx.quick ? 100 : 1000) * BATCH) / maps.length));
  const warmup = rounds / 5;
  const perRound = new Float64Array(rounds);
  let slept = 0;
  for (let i = -warmup; i < rounds; i++) {
    if (i === 0) slept = wakeups(m);
    const t0 = performance.now();
    roundTrip(m, maps, mapHeads);
    roundTrip(m, unmaps, unmapHeads);
    if (i >= 0) perRound[i] = performance.now() - t0;
  }
  ctx.env[`viommu_batch${maps.length}_wakeups`] = wakeups(m) - slept;
  return maps.length / (median(perRound) / 1000);
}

/** One MAP at a time (timed), each followed by its UNMAP (not timed). */
function latency(ctx: BenchContext, m: Machine, maps: readonly Prepared[], unmaps: readonly Prepared[]): void {
  const trips = ctx.quick ? 2000 : 20_000;
  const rtt = new Float64Array(trips);
  const map = maps.slice(0, 1);
  const unmap = unmaps.slice(0, 1);
  const mapHead = [map[0]!.request];
  const unmapHead = [unmap[0]!.request];
  let slept = 0;
  for (let i = -trips / 10; i < trips; i++) {
    if (i === 0) slept = wakeups(m);
    const t0 = performance.now();
    roundTrip(m, map, mapHead);
    const t1 = performance.now();
    roundTrip(m, unmap, unmapHead);
    if (i >= 0) rtt[i] = (t1 - t0) * 1e6;
  }
  ctx.record('viommu.request_rtt_p50_ns', quantile(rtt, 0.5));
  ctx.record('viommu.request_rtt_p99_ns', quantile(rtt, 0.99));
  // Trips that found the device worker asleep (each costs a wake-up): they make the p99.
  ctx.env.viommu_rtt_wakeups = wakeups(m) - slept;
}

/** The virtio-iommu device in its worker, driven through its request virtqueue. */
export const viommu: BenchGroup = {
  name: 'viommu',
  emits: [
    'viommu.map_unmap_per_s',
    'viommu.map_unmap_per_s_b1',
    'viommu.map_unmap_per_s_b16',
    'viommu.map_unmap_per_s_b256',
    'viommu.request_rtt_p50_ns',
    'viommu.request_rtt_p99_ns',
  ],
  async run(ctx) {
    ctx.progress('virtio-iommu requests through the virtqueue');
    // Room for 256 MAPs and their 256 UNMAPs as fixed descriptor pairs: the batch sweep's largest.
    const m = await machine(0, 1024);
    try {
      measure(ctx, m);
    } finally {
      await m.close();
    }
  },
};

/** Device workers DMAing continuously during the strict-unmap figure. */
const DMA_WORKERS = 4;
/** IOVA window the DMA workers write into, kept mapped throughout. */
const DMA_IOVA = 0x8000_0000;
const DMA_PAGES = 16;

/**
 * UNMAP round trip while device workers DMA without pause: each UNMAP bumps the epoch and waits
 * until every worker has left the DMA it was in, so the figure includes that wait.
 */
async function strictUnmap(ctx: BenchContext, workerCount: number): Promise<number> {
  const m = await machine(workerCount, 1024);
  const workers: Worker[] = [];
  const control = new SharedArrayBuffer((DmaLoop.COUNTS + workerCount) * 4);
  const ctl = new Int32Array(control);
  try {
    const window = pages(m, DMA_PAGES, DMA_IOVA, DATA_GPA);
    roundTrip(m, window.maps, window.maps.map((p) => p.request));
    const shared = await m.control.shared();
    for (let index = 0; index < workerCount; index++) {
      const start: DmaLoopStart = { index, shared, memory: m.memory.describe(), control, iova: DMA_IOVA, pages: DMA_PAGES };
      workers.push(await startWorker('dma-loop', start));
    }
    for (const deadline = Date.now() + 10_000; Atomics.load(ctl, DmaLoop.READY) < workerCount && Date.now() < deadline; ) {
      await new Promise((r) => setTimeout(r, 1));
    }
    const { maps, unmaps } = pages(m, 1, IOVA_BASE);
    const map = [maps[0]!.request];
    const unmap = [unmaps[0]!.request];
    const trips = ctx.quick ? 300 : 3000;
    const rtt = new Float64Array(trips);
    const dmasBefore = (): number => Array.from({ length: workerCount }, (_, i) => Atomics.load(ctl, DmaLoop.COUNTS + i)).reduce((a, b) => a + b, 0);
    let dmas = 0;
    let started = 0;
    for (let i = -trips / 10; i < trips; i++) {
      if (i === 0) {
        dmas = dmasBefore();
        started = performance.now();
      }
      roundTrip(m, maps, map);
      const t0 = performance.now();
      roundTrip(m, unmaps, unmap);
      if (i >= 0) rtt[i] = (performance.now() - t0) * 1e6;
    }
    if (workerCount === DMA_WORKERS) ctx.record('strict_unmap.rtt_p99_ns', quantile(rtt, 0.99));
    ctx.env[`strict_unmap_w${workerCount}_dmas_per_s`] = Math.round(((dmasBefore() - dmas) / (performance.now() - started)) * 1000);
    return quantile(rtt, 0.5);
  } finally {
    Atomics.store(ctl, DmaLoop.STOP, 1);
    await Promise.all(
      workers.map(
        (w) =>
          new Promise<void>((resolve) => {
            w.once('exit', () => resolve());
            w.once('message', () => void w.terminate());
          }),
      ),
    );
    await m.close();
  }
}

/** UNMAP under continuous DMA from several device workers (strict unmap). */
export const strictUnmapGroup: BenchGroup = {
  name: 'strict_unmap',
  emits: ['strict_unmap.rtt_ns', 'strict_unmap.rtt_p99_ns', 'strict_unmap.rtt_ns_w1', 'strict_unmap.rtt_ns_w2'],
  async run(ctx) {
    ctx.progress(`UNMAP round trip while ${DMA_WORKERS} device workers DMA continuously`);
    ctx.record('strict_unmap.rtt_ns', await strictUnmap(ctx, DMA_WORKERS));
    // How it grows with the number of device workers each UNMAP may have to wait for.
    for (const workers of [1, 2]) ctx.record(`strict_unmap.rtt_ns_w${workers}`, await strictUnmap(ctx, workers));
  },
};
