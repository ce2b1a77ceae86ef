import { GuestAllocator } from '../guest-fixtures/driver/allocator.js';
import { IommuGuestDriver } from '../guest-fixtures/driver/iommu-driver.js';
import { encodeAttach, encodeMap } from '../guest-fixtures/driver/iommu-requests.js';
import { MmioDriverTransport } from '../guest-fixtures/driver/mmio.js';
import { MapFlag, Status } from '../src/iommu/layout.js';
import { GuestMemory } from '../src/memory/index.js';
import { driverArena } from '../src/replay/local-machine.js';
import type { MmioBus } from '../src/virtio/bus.js';
import { IommuMachine } from '../src/vmm/iommu-machine.js';
import { MemoryPrecopy } from '../src/vmm/precopy.js';
import { median, type BenchGroup } from './harness.js';

const MEMORY = 64 << 20;
const PAGE = 4096;

/**
 * Live migration of a machine with a DMA engine, a virtio-net device and a domain of many
 * mappings: the stop-and-copy downtime (pause, save, last pre-copy round, restore until the new
 * machine answers), the image size, and one pre-copy round over all of guest memory.
 */
export const migration: BenchGroup = {
  name: 'migration',
  emits: ['migration.downtime_ms', 'migration.image_bytes_per_mapping', 'migration.precopy_round_ms'],
  async run(ctx) {
    const mappings = ctx.quick ? 200 : 5000;
    const samples = ctx.quick ? 1 : 5;
    const downtimes: number[] = [];
    const rounds: number[] = [];
    let imageBytes = 0;
    for (let s = 0; s < samples; s++) {
      const source = await IommuMachine.create({
        memorySize: MEMORY,
        transport: 'mmio',
        endpoints: [{ id: 0x10, kind: 'dma-engine' }, { id: 0x18, kind: 'virtio-net' }],
        device: { bootBypass: false },
      });
      const arena = driverArena(MEMORY);
      const iommu = IommuGuestDriver.open({
        transport: new MmioDriverTransport(source.iommu.bus as MmioBus),
        memory: source.memory,
        allocator: new GuestAllocator(arena.base, arena.size),
        interrupts: source.iommu.interrupts,
      });
      const requests = [encodeAttach(1, 0x10), encodeAttach(1, 0x18)];
      for (let i = 0; i < mappings; i++) {
        const iova = BigInt(0x1_0000_0000 + i * 2 * PAGE);
        requests.push(encodeMap(1, iova, iova + BigInt(PAGE) - 1n, BigInt(0x100_0000 + (i % 2048) * PAGE), MapFlag.READ | MapFlag.WRITE));
      }
      for (let i = 0; i < requests.length; i += 32) {
        const results = iommu.batch(requests.slice(i, i + 32));
        if (results.some((r) => r.status !== Status.OK)) throw new Error('migration bench: a MAP failed');
      }
      const destination = GuestMemory.create(MEMORY);
      const precopy = new MemoryPrecopy(source.memory, destination, source);
      await precopy.begin();
      const r0 = performance.now();
      await precopy.round();
      rounds.push(performance.now() - r0);

      const t0 = performance.now();
      await source.pause();
      const image = await source.saveImage();
      await precopy.round();
      const dest = await IommuMachine.restore(image, { memory: destination });
      await dest.iommu.control.stats();
      downtimes.push(performance.now() - t0);
      imageBytes = image.length;
      await source.close();
      await dest.close();
    }
    ctx.record('migration.downtime_ms', median(downtimes));
    ctx.record('migration.image_bytes_per_mapping', imageBytes / mappings);
    ctx.record('migration.precopy_round_ms', median(rounds));
    ctx.note(`migration: ${mappings} mappings, ${MEMORY >> 20} MiB guest memory, image ${imageBytes} bytes`);
  },
};
