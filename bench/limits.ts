import type { Worker } from 'node:worker_threads';
import { BenchContext, quantile, startWorker, timerCost, type BenchGroup } from './harness.js';
import { PingPong, type PingPongStart } from './protocol.js';

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

/**
 * What the runtime allows at best between two threads. The single-thread limits (memcpy, array
 * read, radix walk) are sampled by the data-plane worker in turn with the figures they bound.
 */
export const limits: BenchGroup = {
  name: 'limit',
  emits: [
    'limit.timer_ns',
    'limit.atomics_rtt_ns',
    'limit.atomics_rtt_p99_ns',
    'limit.spin_rtt_ns',
    'limit.spin_rtt_p99_ns',
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
  },
};
