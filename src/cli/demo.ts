import { GuestAllocator } from '../../guest-fixtures/driver/allocator.js';
import { GuestDevice } from '../../guest-fixtures/driver/guest-device.js';
import { MmioDriverTransport } from '../../guest-fixtures/driver/mmio.js';
import { PciDriverTransport } from '../../guest-fixtures/driver/pci.js';
import { GuestMemory } from '../memory/index.js';
import type { MmioBus, PciBus } from '../virtio/bus.js';
import { FeatureBit, featureMask } from '../virtio/constants.js';
import { DeviceHandle } from '../vmm/device-handle.js';
import { Narrative } from './narrative.js';

const FEATURES = featureMask(FeatureBit.VERSION_1) | featureMask(FeatureBit.EVENT_IDX) | featureMask(FeatureBit.INDIRECT_DESC);

/**
 * The machinery every device stands on, shown with the loopback device: one guest memory, a device
 * worker per transport, a guest driver that negotiates, lays out rings and moves data through them.
 */
export async function runDemo(options: { json: boolean }): Promise<number> {
  const story = new Narrative(options.json);
  const memory = GuestMemory.create(16 << 20);
  const allocator = new GuestAllocator(0x10000, (16 << 20) - 0x10000);
  story.section('machine');
  story.say(`guest memory: ${memory.size >> 20} MiB at GPA 0, shared with every device worker`);
  const totals: Record<string, unknown> = {};
  for (const kind of ['mmio', 'pci'] as const) {
    const handle = await DeviceHandle.spawn({ name: `loopback-${kind}`, model: { kind: 'loopback' }, transport: kind, memory, queues: 1 });
    try {
      story.section(`loopback device over virtio-${kind}`);
      const transport =
        kind === 'mmio' ? new MmioDriverTransport(handle.bus as MmioBus) : new PciDriverTransport(handle.bus as PciBus, { bar0Address: 0xe000_0000 });
      const dev = GuestDevice.open({ transport, memory, allocator, wantedFeatures: FEATURES, interrupts: handle.interrupts, queueSize: 128 });
      story.say(`guest found device type ${transport.deviceType}, negotiated features 0x${dev.negotiated.toString(16)}`);
      const src = allocator.alloc(4096, 64);
      const dst = allocator.alloc(4096, 64);
      const message = new TextEncoder().encode(`hello through virtio-${kind}`);
      memory.write(src, message);
      dev.submit(0, { readable: [{ addr: src, len: message.length }], writable: [{ addr: dst, len: 4096 }] });
      const used = dev.waitUsed(0);
      story.say(`device returned ${used.len} bytes: "${new TextDecoder().decode(memory.view(dst, used.len))}"`);
      const rounds = 2000;
      const started = performance.now();
      for (let i = 0; i < rounds; i++) {
        dev.submit(0, { readable: [{ addr: src, len: 256 }], writable: [{ addr: dst, len: 256 }] }, { indirect: i % 2 === 1 });
        dev.waitUsed(0);
      }
      const micros = ((performance.now() - started) * 1000) / rounds;
      story.say(`${rounds} round trips (direct and indirect chains): ${micros.toFixed(1)} µs each`);
      const stats = await handle.control.stats();
      story.say(`device worker: ${stats.doorbells} doorbells, ${stats.mailboxAccesses} register accesses, ${stats.wakeups} wake-ups`);
      totals[kind] = { roundTripMicros: Number(micros.toFixed(1)), doorbells: stats.doorbells, registerAccesses: stats.mailboxAccesses };
    } finally {
      await handle.close();
    }
  }
  story.finish(totals);
  return 0;
}
