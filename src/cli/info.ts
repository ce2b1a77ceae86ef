import { availableParallelism } from 'node:os';
import { encodeProbe, parseProbeProperties } from '../../guest-fixtures/driver/iommu-requests.js';
import { DMA_ENGINE_DEVICE_ID, DMA_ENGINE_MAX_LENGTH, DMA_ENGINE_VENDOR_ID } from '../devices/dma-engine.js';
import { DEFAULT_WORKER_SLOTS } from '../ioasid/quiescence.js';
import { GUEST_FIXTURE_FORMAT } from '../replay/guest-fixture.js';
import { LocalIommuMachine } from '../replay/local-machine.js';

const hex = (v: bigint | number): string => `0x${v.toString(16)}`;

/**
 * What the emulated IOMMU offers, read from a live device model (features, config, PROBE) rather
 * than restated, plus the formats and limits a user needs before building on it.
 */
export function collectInfo(): Record<string, unknown> {
  const endpoint = 0x8;
  const m = new LocalIommuMachine({ memorySize: 16 << 20, endpoints: [endpoint], driverFeatures: ['INPUT_RANGE', 'DOMAIN_RANGE', 'MAP_UNMAP', 'BYPASS', 'PROBE', 'MMIO', 'BYPASS_CONFIG'] });
  const config = m.driver.readConfig();
  const probe = m.driver.request(encodeProbe(endpoint, config.probeSize));
  const properties = parseProbeProperties(probe.writable.subarray(0, config.probeSize)).map((p) =>
    p.type === 'RESV_MEM' ? { type: p.type, subtype: p.subtype === 1 ? 'MSI' : 'RESERVED', start: hex(p.start), end: hex(p.end) } : p,
  );
  return {
    device: {
      name: 'virtio-iommu',
      virtioDeviceId: 23,
      transports: ['virtio-mmio (version 2)', 'virtio-pci (modern)'],
      offeredFeatures: ['VERSION_1', 'INDIRECT_DESC', 'EVENT_IDX', ...m.driver.offeredNames()],
      config: {
        pageSizeMask: hex(config.pageSizeMask),
        inputRange: config.inputRange.map(hex),
        domainRange: config.domainRange,
        probeSize: config.probeSize,
        bootBypass: config.bypass === 1,
      },
      probeProperties: properties,
      requests: ['ATTACH', 'DETACH', 'MAP', 'UNMAP', 'PROBE'],
      limits: { maxDomains: 65536, pendingFaultRecords: 256, queueSizes: { request: m.device.queueMaxSizes[0], event: m.device.queueMaxSizes[1] } },
    },
    backend: {
      model: 'iommufd (Linux include/uapi/linux/iommufd.h): context, IOAS, HWPT (paging), device, access',
      pageSizes: ['4 KiB', '2 MiB', '1 GiB'],
      iovaBits: 64,
      nestedHwpt: 'not yet (EOPNOTSUPP)',
      dirtyTracking: 'not yet',
      deviceWorkerSlots: DEFAULT_WORKER_SLOTS,
      faultQueueRecords: 256,
      locking: 'pages counted once per host however often mapped; memlock limit optional',
    },
    consumers: {
      'dma-engine': { pci: `${DMA_ENGINE_VENDOR_ID.toString(16)}:${DMA_ENGINE_DEVICE_ID.toString(16)}`, maxTransfer: DMA_ENGINE_MAX_LENGTH, pasid: 'optional' },
      'test-endpoint': 'DMA on command from the host (replay dma steps)',
    },
    formats: { guestFixture: GUEST_FIXTURE_FORMAT },
    host: { node: process.version, cpus: availableParallelism() },
  };
}

function lines(value: unknown, indent = ''): string[] {
  if (value === null || typeof value !== 'object') return [`${indent}${String(value)}`];
  if (Array.isArray(value)) {
    if (value.every((v) => typeof v !== 'object')) return [`${indent}${value.join(', ')}`];
    return value.flatMap((v) => lines(v, indent));
  }
  const out: string[] = [];
  for (const [k, v] of Object.entries(value)) {
    if (v !== null && typeof v === 'object' && !(Array.isArray(v) && v.every((x) => typeof x !== 'object'))) {
      out.push(`${indent}${k}:`);
      out.push(...lines(v, `${indent}  `));
    } else {
      out.push(`${indent}${k}: ${Array.isArray(v) ? v.join(', ') : String(v)}`);
    }
  }
  return out;
}

export function runInfo(options: { json: boolean; write?: (line: string) => void }): number {
  const write = options.write ?? ((line: string) => process.stdout.write(`${line}\n`));
  const info = collectInfo();
  if (options.json) write(JSON.stringify(info));
  else for (const l of lines(info)) write(l);
  return 0;
}
