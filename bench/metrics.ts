/**
 * Every figure `npm run bench` knows: its unit, what it is compared to, and the team's targets.
 * The smoke test reads REQUIRED_METRICS to check that every implemented row is emitted.
 */

/** A target ratio against another metric (`ref`), or an absolute bound when `ref` is absent. */
export interface Target {
  readonly ref?: string;
  readonly op: '>=' | '<=';
  /** value op factor × ref (or value op factor when there is no ref). */
  readonly factor: number;
}

export interface MetricSpec {
  readonly name: string;
  readonly unit: string;
  readonly what: string;
  /** False while the piece it measures does not exist: the harness does not emit it yet. */
  readonly implemented: boolean;
  /** For rows not implemented: what they wait for. */
  readonly needs?: string;
  /** The limit or baseline printed beside the figure (ratio = value / reference). */
  readonly compareTo?: string;
  readonly targets?: readonly Target[];
}

/** The team's list. Rows with implemented: false are measured as soon as their piece lands. */
export const REQUIRED_METRICS: readonly MetricSpec[] = [
  { name: 'limit.atomics_rtt_ns', unit: 'ns', implemented: true, what: 'p50 round trip between two threads, Atomics.wait/notify' },
  { name: 'limit.spin_rtt_ns', unit: 'ns', implemented: true, what: 'p50 round trip between two threads spinning on Atomics.load' },
  { name: 'limit.memcpy_gbps', unit: 'GB/s', implemented: true, what: 'SharedArrayBuffer to SharedArrayBuffer copy of 64 KiB blocks' },
  { name: 'limit.array_read_ns', unit: 'ns', implemented: true, what: 'random Int32Array read over the IOTLB working-set size' },
  { name: 'limit.radix_walk_ns', unit: 'ns', implemented: true, what: 'hand-written 4-level radix walk, random over 1M 4 KiB entries' },
  {
    name: 'baseline.comlink_map_unmap_per_s',
    unit: 'pairs/s',
    implemented: true,
    what: 'naive design: one comlink call per map and per unmap to a backend worker',
  },
  {
    name: 'viommu.map_unmap_per_s',
    unit: 'pairs/s',
    implemented: true,
    what: '4 KiB MAP+UNMAP pairs through the request virtqueue of the device in its worker (virtio-mmio, iommufd backend), 64 MAPs behind one notification then their 64 UNMAPs, polling guest',
    compareTo: 'baseline.comlink_map_unmap_per_s',
    targets: [{ op: '>=', factor: 1_000_000 }, { ref: 'baseline.comlink_map_unmap_per_s', op: '>=', factor: 20 }],
  },
  {
    name: 'viommu.request_rtt_p50_ns',
    unit: 'ns',
    implemented: true,
    what: 'one MAP request, guest kick to used buffer, device worker spinning on its doorbell, guest polling (p50)',
    compareTo: 'limit.spin_rtt_ns',
    targets: [{ ref: 'limit.spin_rtt_ns', op: '<=', factor: 3 }],
  },
  {
    name: 'viommu.request_rtt_p99_ns',
    unit: 'ns',
    implemented: true,
    what: 'one MAP request, guest kick to used buffer, spinning doorbell (p99)',
    compareTo: 'limit.spin_rtt_ns',
  },
  {
    name: 'translate.hit_ns',
    unit: 'ns',
    implemented: true,
    what: 'Translator.translate served by the IOTLB, in a device worker, inside an open DMA',
    compareTo: 'limit.array_read_ns',
    targets: [{ ref: 'limit.array_read_ns', op: '<=', factor: 2 }],
  },
  {
    name: 'translate.miss_ns',
    unit: 'ns',
    implemented: true,
    what: 'Translator.translate that misses the IOTLB: walk over 1M live 4 KiB mappings, plus the fill',
    compareTo: 'limit.radix_walk_ns',
    targets: [{ ref: 'limit.radix_walk_ns', op: '<=', factor: 1.3 }],
  },
  {
    name: 'translate.nested_miss_ns',
    unit: 'ns',
    implemented: true,
    what: 'Translator.translate through a nested attachment that misses the IOTLB: the 2-D walk of a guest stage 1 with 1M 4 KiB leaves (each table read and the output page looked up in stage 2, whose 2 MiB entries stay cached), plus the fill',
    compareTo: 'translate.miss_ns',
  },
  {
    name: 'translate.nested_hit_ns',
    unit: 'ns',
    implemented: true,
    what: 'Translator.translate through a nested attachment served by the IOTLB (512 hot pages), inside an open DMA',
    compareTo: 'translate.hit_ns',
  },
  {
    name: 'translate.nested_inval_range_ns',
    unit: 'ns',
    implemented: true,
    what: 'one hwptInvalidate of a single 4 KiB page, then a DMA over the 256-page working set (revalidation drops one entry: 255 hits, one 2-D walk); owner and translator in one thread',
    compareTo: 'translate.nested_inval_full_ns',
  },
  {
    name: 'dma.copy_64k_gbps',
    unit: 'GB/s',
    implemented: true,
    what: 'one DMA: translate 64 KiB of source and destination (4 KiB mappings, 8 MiB windows), then copy; the DMA engine replaces this later',
    compareTo: 'limit.memcpy_gbps',
    targets: [{ ref: 'limit.memcpy_gbps', op: '>=', factor: 0.8 }],
  },
  {
    name: 'scale.bytes_per_mapping',
    unit: 'B',
    implemented: true,
    what: 'memory per live 4 KiB mapping at 1M ioasMap calls: table pool plus measured JS-side growth',
    targets: [{ op: '<=', factor: 16 }],
  },
  { name: 'scale.map_1g_ns', unit: 'ns', implemented: true, what: 'ioasMap of 1 GiB, IOVA and GPA 1 GiB aligned, huge pages on' },
  {
    name: 'strict_unmap.rtt_ns',
    unit: 'ns',
    implemented: true,
    what: 'p50 UNMAP request round trip while 4 device workers DMA continuously (each UNMAP waits for their DMAs in flight)',
    compareTo: 'viommu.request_rtt_p50_ns',
    targets: [{ ref: 'viommu.request_rtt_p50_ns', op: '<=', factor: 10 }],
  },
  { name: 'strict_unmap.rtt_p99_ns', unit: 'ns', implemented: true, what: 'p99 of the same' },
  { name: 'scale.map_unmap_pair_ns_1k', unit: 'ns', implemented: true, what: 'ioasMap + ioasUnmap of one 4 KiB page with 1k other live mappings' },
  { name: 'scale.map_unmap_pair_ns_100k', unit: 'ns', implemented: true, what: 'the same with 100k live mappings', compareTo: 'scale.map_unmap_pair_ns_1k' },
  { name: 'scale.map_unmap_pair_ns_1m', unit: 'ns', implemented: true, what: 'the same with 1M live mappings', compareTo: 'scale.map_unmap_pair_ns_1k' },
  { name: 'strict_unmap.rtt_ns_w1', unit: 'ns', implemented: true, what: 'strict_unmap.rtt_ns with 1 device worker', compareTo: 'strict_unmap.rtt_ns' },
  { name: 'strict_unmap.rtt_ns_w2', unit: 'ns', implemented: true, what: 'strict_unmap.rtt_ns with 2 device workers', compareTo: 'strict_unmap.rtt_ns' },
  { name: 'viommu.map_unmap_per_s_b1', unit: 'pairs/s', implemented: true, what: 'viommu.map_unmap_per_s with 1 request per notification', compareTo: 'viommu.map_unmap_per_s' },
  { name: 'viommu.map_unmap_per_s_b16', unit: 'pairs/s', implemented: true, what: 'viommu.map_unmap_per_s with 16 requests per notification', compareTo: 'viommu.map_unmap_per_s' },
  { name: 'viommu.map_unmap_per_s_b256', unit: 'pairs/s', implemented: true, what: 'viommu.map_unmap_per_s with 256 requests per notification', compareTo: 'viommu.map_unmap_per_s' },
  {
    name: 'migration.downtime_ms',
    unit: 'ms',
    implemented: true,
    what: 'stop-and-copy of a machine with a DMA engine, virtio-net and 5000 mappings: pause, save, last pre-copy round of 64 MiB, restore into new workers until they answer',
  },
  { name: 'migration.image_bytes_per_mapping', unit: 'B', implemented: true, what: 'migration image size divided by the mappings in it' },
  { name: 'migration.precopy_round_ms', unit: 'ms', implemented: true, what: 'one pre-copy round over 64 MiB: IOMMU dirty bitmaps plus the page-hash log of every page' },
];

/** Further figures that explain the required ones. */
export const EXTRA_METRICS: readonly MetricSpec[] = [
  { name: 'limit.atomics_rtt_p99_ns', unit: 'ns', implemented: true, what: 'p99 of the Atomics.wait/notify round trip' },
  { name: 'limit.spin_rtt_p99_ns', unit: 'ns', implemented: true, what: 'p99 of the spinning round trip' },
  { name: 'limit.timer_ns', unit: 'ns', implemented: true, what: 'cost of one performance.now() call (included once in every timed round trip)' },
  {
    name: 'baseline.comlink_call_ns',
    unit: 'ns',
    implemented: true,
    what: 'one comlink call to the backend worker (half a map+unmap pair)',
    compareTo: 'limit.atomics_rtt_ns',
  },
  {
    name: 'translate.hit_dma_ns',
    unit: 'ns',
    implemented: true,
    what: 'a one-translation DMA served by the IOTLB: beginDma + translate + endDma',
    compareTo: 'limit.array_read_ns',
  },
  {
    name: 'dma.copy_64k_dirty_gbps',
    unit: 'GB/s',
    implemented: true,
    what: 'dma.copy_64k_gbps with dirty tracking on, the owner reading and clearing the destination window every 2 ms (first write to a leaf after each read marks it)',
    compareTo: 'dma.copy_64k_gbps',
  },
  {
    name: 'dma.copy_64k_hot_gbps',
    unit: 'GB/s',
    implemented: true,
    what: 'the same DMA copies over 1 MiB of each window, so every translation hits the IOTLB',
    compareTo: 'limit.memcpy_gbps',
  },
  { name: 'translate.walk_ns', unit: 'ns', implemented: true, what: 'the table walk alone (TableReader.walk) over the same 1M-mapping table and pages', compareTo: 'limit.radix_walk_ns' },
  {
    name: 'translate.nested_inval_full_ns',
    unit: 'ns',
    implemented: true,
    what: 'the same with a full invalidation (addr 0, npages U64_MAX): the DMA that follows re-walks all 256 pages',
  },
  {
    name: 'translate.nested_walk_ns',
    unit: 'ns',
    implemented: true,
    what: 'the 2-D walk alone, no cache at either stage: walkX86 over the same 1M leaves, every table read and the output page through a stage-2 walk()',
    compareTo: 'limit.radix_walk_ns',
  },
  {
    name: 'scale.map_4k_ns',
    unit: 'ns',
    implemented: true,
    what: 'one ioasMap of a 4 KiB page at a fixed IOVA, averaged over building the 1M-mapping IOAS',
  },
  { name: 'scale.unmap_1g_ns', unit: 'ns', implemented: true, what: 'ioasUnmap of the 1 GiB area mapped with huge pages' },
  { name: 'scale.pool_bytes_per_mapping', unit: 'B', implemented: true, what: 'table pool alone (tables in use × 4 KiB) per live 4 KiB mapping' },
  {
    name: 'virtio.loopback_rtt_ns',
    unit: 'ns',
    implemented: true,
    what: 'loopback device request over virtio-mmio in a worker, kick to used buffer, both sides spinning (p50)',
    compareTo: 'limit.spin_rtt_ns',
  },
  { name: 'virtio.loopback_rtt_p99_ns', unit: 'ns', implemented: true, what: 'p99 of the loopback round trip', compareTo: 'limit.spin_rtt_ns' },
];

export const ALL_METRICS: readonly MetricSpec[] = [...REQUIRED_METRICS, ...EXTRA_METRICS];

export function metricSpec(name: string): MetricSpec | undefined {
  return ALL_METRICS.find((m) => m.name === name);
}
