import type { Worker } from 'node:worker_threads';
import { IotlbEntry } from '../src/ioasid/iotlb.js';
import { BenchContext, nsPerOp, quantile, scatteredFrame, startWorker, timerCost, type BenchGroup } from './harness.js';
import { PlainRadix, SEQUENCE_LENGTH, WALK_SEED, plainWalk, randomPages } from './plain-radix.js';
import { PingPong, type PingPongStart } from './protocol.js';
import { COPY_BLOCK, COPY_REGION, mappingCount } from './sizes.js';

/** Bytes of the default IOTLB's entry array: 1024 + 64 + 16 entries of four float64 words. */
export const IOTLB_BYTES = (1024 + 64 + 16) * IotlbEntry.STRIDE * Float64Array.BYTES_PER_ELEMENT;

/** How long a round trip may take before the other thread is considered gone. */
const STUCK_MS = 5000;

/**
 * Times `trips` round trips one by one (each includes one performance.now()). Returns the per-trip
 * figures in ns, warm-up trips excluded.
 */
function pingPong(w: Int32Array, mode: 'wait' | 'spin', trips: number, warmup: number): Float64Array {
  const out = new Float64Array(trips);
  let seq = Atomics.load(w, PingPong.PING);
  let t0 = performance.now();
  for (let i = -warmup; i < trips; i++) {
    seq = (seq + 1) | 0;
    Atomics.store(w, PingPong.PING, seq);
    if (mode === 'wait') {
      Atomics.notify(w, PingPong.PING);
      for (;;) {
        const pong = Atomics.load(w, PingPong.PONG);
        if (pong === seq) break;
        if (Atomics.wait(w, PingPong.PONG, pong, STUCK_MS) === 'timed-out') throw new Error('ping-pong worker stopped answering');
      }
    } else {
      let spins = 0;
      while (Atomics.load(w, PingPong.PONG) !== seq) {
        if (++spins === 1 << 22) {
          spins = 0;
          if (performance.now() - t0 > STUCK_MS) throw new Error('ping-pong worker stopped answering');
        }
      }
    }
    const t1 = performance.now();
    if (i >= 0) out[i] = (t1 - t0) * 1e6;
    t0 = t1;
  }
  return out;
}

async function roundTrips(ctx: BenchContext, mode: 'wait' | 'spin'): Promise<Float64Array> {
  const buffer = new SharedArrayBuffer(PingPong.FIELD_COUNT * Int32Array.BYTES_PER_ELEMENT);
  const w = new Int32Array(buffer);
  const start: PingPongStart = { buffer, mode };
  let worker: Worker | undefined;
  try {
    worker = await startWorker('pingpong', start);
    const trips = mode === 'wait' ? (ctx.quick ? 1000 : 10_000) : ctx.quick ? 20_000 : 200_000;
    return pingPong(w, mode, trips, trips / 10);
  } finally {
    Atomics.store(w, PingPong.STOP, 1);
    Atomics.add(w, PingPong.PING, 1);
    Atomics.notify(w, PingPong.PING);
    await worker?.terminate();
  }
}

function memcpyGbps(ctx: BenchContext): number {
  const src = new Uint8Array(new SharedArrayBuffer(COPY_REGION));
  const dst = new Uint8Array(new SharedArrayBuffer(COPY_REGION));
  // Touch every page: untouched pages all read as the one shared zero page and would flatter the copy.
  for (let i = 0; i < src.length; i += 4096) src[i] = i >>> 12;
  dst.fill(1);
  const blocks = COPY_REGION / COPY_BLOCK;
  const ns = nsPerOp(
    (n) => {
      for (let i = 0; i < n; i++) {
        const at = (i % blocks) * COPY_BLOCK;
        dst.set(src.subarray(at, at + COPY_BLOCK), at);
      }
      return dst[n & (COPY_REGION - 1)]!;
    },
    { iterations: ctx.quick ? 500 : 2000, samples: ctx.quick ? 5 : 15, warmup: 2 },
  );
  return COPY_BLOCK / ns;
}

function arrayReadNs(ctx: BenchContext): number {
  const data = new Int32Array(IOTLB_BYTES / Int32Array.BYTES_PER_ELEMENT);
  for (let i = 0; i < data.length; i++) data[i] = i * 7;
  const index = randomPages(0xa11a, data.length);
  const mask = SEQUENCE_LENGTH - 1;
  return nsPerOp(
    (n) => {
      let acc = 0;
      for (let i = 0; i < n; i++) acc = (acc + data[index[i & mask]!]!) | 0;
      return acc;
    },
    { iterations: ctx.quick ? 1 << 20 : 1 << 22, samples: ctx.quick ? 5 : 11, warmup: 2 },
  );
}

function radixWalkNs(ctx: BenchContext): number {
  const pages = mappingCount(ctx);
  const table = new PlainRadix(pages);
  for (let pfn = 0; pfn < pages; pfn++) table.insert(pfn, scatteredFrame(pfn, 4096));
  const pfns = randomPages(WALK_SEED, pages);
  const mask = SEQUENCE_LENGTH - 1;
  const { words, root } = table;
  return nsPerOp(
    (n) => {
      let acc = 0;
      for (let i = 0; i < n; i++) acc = (acc + plainWalk(words, root, pfns[i & mask]!)) | 0;
      return acc;
    },
    { iterations: ctx.quick ? 1 << 18 : 1 << 20, samples: ctx.quick ? 5 : 11, warmup: 2 },
  );
}

/** What the hardware and the runtime allow at best: every other figure is read against these. */
export const limits: BenchGroup = {
  name: 'limit',
  emits: [
    'limit.timer_ns',
    'limit.atomics_rtt_ns',
    'limit.atomics_rtt_p99_ns',
    'limit.spin_rtt_ns',
    'limit.spin_rtt_p99_ns',
    'limit.memcpy_gbps',
    'limit.array_read_ns',
    'limit.radix_walk_ns',
  ],
  async run(ctx) {
    ctx.record('limit.timer_ns', timerCost());
    if (ctx.wants('limit.atomics_rtt')) {
      ctx.progress('Atomics.wait/notify round trips');
      const wait = await roundTrips(ctx, 'wait');
      ctx.record('limit.atomics_rtt_ns', quantile(wait, 0.5));
      ctx.record('limit.atomics_rtt_p99_ns', quantile(wait, 0.99));
    }
    if (ctx.wants('limit.spin_rtt')) {
      ctx.progress('spinning round trips');
      const spin = await roundTrips(ctx, 'spin');
      ctx.record('limit.spin_rtt_ns', quantile(spin, 0.5));
      ctx.record('limit.spin_rtt_p99_ns', quantile(spin, 0.99));
    }
    if (ctx.wants('limit.memcpy_gbps')) {
      ctx.progress('memcpy');
      ctx.record('limit.memcpy_gbps', memcpyGbps(ctx));
    }
    if (ctx.wants('limit.array_read_ns')) ctx.record('limit.array_read_ns', arrayReadNs(ctx));
    if (ctx.wants('limit.radix_walk_ns')) {
      ctx.progress('plain radix walk');
      ctx.record('limit.radix_walk_ns', radixWalkNs(ctx));
    }
  },
};
