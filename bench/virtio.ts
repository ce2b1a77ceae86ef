import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { GuestDevice } from '../guest-fixtures/driver/guest-device.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { GuestMemory } from '../src/memory/index.js';
import type { MmioBus } from '../src/virtio/bus.js';
import { FeatureBit, featureMask } from '../src/virtio/constants.js';
import { DeviceHandle } from '../src/vmm/device-handle.js';
import { quantile, type BenchGroup } from './harness.js';

const FEATURES = featureMask(FeatureBit.VERSION_1) | featureMask(FeatureBit.EVENT_IDX) | featureMask(FeatureBit.INDIRECT_DESC);
const STUCK_MS = 5000;

/**
 * Round trips of the loopback device in its worker over virtio-mmio: the guest driver adds a
 * 64-byte request, kicks (a doorbell, no mailbox round trip), and spins on the used ring; the
 * device worker spins on its wake word between requests. Interrupts are suppressed: a polling
 * guest, as a DPDK-style driver would be.
 */
export const virtio: BenchGroup = {
  name: 'virtio',
  emits: ['virtio.loopback_rtt_ns', 'virtio.loopback_rtt_p99_ns'],
  async run(ctx) {
    const size = 4 << 20;
    const memory = GuestMemory.create(size);
    const allocator = new GuestAllocator(0x1000, size - 0x1000);
    const handle = await DeviceHandle.spawn({ name: 'bench-loopback', model: { kind: 'loopback' }, transport: 'mmio', memory, queues: 1 });
    try {
      ctx.progress('loopback round trips over virtio-mmio');
      const dev = GuestDevice.open({ transport: new MmioDriverTransport(handle.bus as MmioBus), memory, allocator, wantedFeatures: FEATURES, queueSize: 64 });
      const q = dev.queue(0);
      q.suppressInterrupts(true);
      const src = allocator.alloc(64, 64);
      const dst = allocator.alloc(64, 64);
      const buffer = { readable: [{ addr: src, len: 64 }], writable: [{ addr: dst, len: 64 }] };
      const trips = ctx.quick ? 5000 : 50_000;
      const warmup = trips / 10;
      const out = new Float64Array(trips);
      let t0 = performance.now();
      for (let i = -warmup; i < trips; i++) {
        dev.submit(0, buffer);
        let spins = 0;
        while (q.popUsed() === undefined) {
          if (++spins === 1 << 20) {
            spins = 0;
            if (performance.now() - t0 > STUCK_MS) throw new Error('loopback device stopped answering');
          }
        }
        const t1 = performance.now();
        if (i >= 0) out[i] = (t1 - t0) * 1e6;
        t0 = t1;
      }
      ctx.record('virtio.loopback_rtt_ns', quantile(out, 0.5));
      ctx.record('virtio.loopback_rtt_p99_ns', quantile(out, 0.99));
    } finally {
      await handle.close();
    }
  },
};
