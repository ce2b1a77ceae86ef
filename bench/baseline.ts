import type { Worker } from 'node:worker_threads';
import { GuestMemory } from '../src/memory/index.js';
import { releaseRemote, wrapPort, type Remote } from '../src/runtime/comlink.js';
import { median, startWorker, type BenchGroup } from './harness.js';
import type { ComlinkBackendApi, ComlinkBackendStart } from './protocol.js';

const PAGE = 4096;

/** The naive design: every map and every unmap is its own comlink call to the backend worker. */
export const baseline: BenchGroup = {
  name: 'baseline',
  emits: ['baseline.comlink_map_unmap_per_s', 'baseline.comlink_call_ns'],
  async run(ctx) {
    const memory = GuestMemory.create(16 << 20);
    const start: ComlinkBackendStart = { memory: memory.describe() };
    let worker: Worker | undefined;
    let api: Remote<ComlinkBackendApi> | undefined;
    try {
      worker = await startWorker('comlink-backend', start);
      api = wrapPort<ComlinkBackendApi>(worker);
      const kind = await api.kind();
      ctx.env.baseline_backend = kind;
      ctx.note(`baseline backend: ${kind}`);
      ctx.progress(`comlink map/unmap pairs against ${kind}`);
      const pairs = ctx.quick ? 200 : 1000;
      const samples = ctx.quick ? 3 : 9;
      const rates = new Float64Array(samples);
      for (let s = -1; s < samples; s++) {
        const t0 = performance.now();
        for (let i = 0; i < pairs; i++) {
          const iova = (1 + i) * PAGE;
          await api.map(iova, (i % 4096) * PAGE, PAGE);
          await api.unmap(iova, PAGE);
        }
        if (s >= 0) rates[s] = pairs / ((performance.now() - t0) / 1000);
      }
      const rate = median(rates);
      ctx.record('baseline.comlink_map_unmap_per_s', rate);
      ctx.record('baseline.comlink_call_ns', 1e9 / rate / 2);
    } finally {
      if (api !== undefined) releaseRemote(api);
      await worker?.terminate();
    }
  },
};
