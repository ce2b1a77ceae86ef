import { GuestAllocator } from '../../guest-fixtures/driver/allocator.js';
import { DmaEngineDriver, type DmaEngineResult } from '../../guest-fixtures/driver/dma-engine-driver.js';
import { IommuGuestDriver } from '../../guest-fixtures/driver/iommu-driver.js';
import {
  encodeAttach,
  encodeAttachTable,
  encodeInvalidate,
  encodeMap,
  encodeProbe,
  encodeUnmap,
  parseProbeProperties,
  type DecodedFault,
  type EncodedRequest,
} from '../../guest-fixtures/driver/iommu-requests.js';
import { X86PageTableBuilder, memoryEntryWriter, pagesFromAllocator } from '../../guest-fixtures/pagetable/x86-64-builder.js';
import { X86_PAGE_4K } from '../pagetable/x86-64.js';
import { GuestDmaView } from '../../guest-fixtures/driver/dma-view.js';
import { NetDriver, VIRTIO_NET } from '../../guest-fixtures/driver/net-driver.js';
import { PciDriverTransport } from '../../guest-fixtures/driver/pci.js';
import type { HostSnapshot } from '../ioasid/index.js';
import { FaultFlag, MapFlag, STATUS_NAMES } from '../iommu/layout.js';
import { driverArena } from '../replay/local-machine.js';
import type { PciBus } from '../virtio/bus.js';
import { IommuMachine } from '../vmm/iommu-machine.js';
import { Narrative } from './narrative.js';

const MEMORY = 64 << 20;
const ENGINE = 0x10;
const NET = 0x18;
/** Where the guest puts the net device's rings and buffers: an IOVA window onto guest pages. */
const NET_ARENA = { iova: 0x7000_0000, gpa: 0x40_0000, size: 1 << 20 };
const DOMAIN = 1;
const SRC_GPA = 0x10_0000;
const DST_GPA = 0x20_0000;
const SRC_IOVA = 0x8000_0000n;
const DST_IOVA = 0x9000_0000n;
const LENGTH = 0x2000;
/** Addresses in the guest's process page table (stage 1) and where one of them lands. */
const PROC_SRC = 0x7f00_0000_0000n;
const PROC_DST = 0x7f00_0001_0000n;
const PROC_GPA = 0x60_0000;
const hex = (v: bigint | number): string => `0x${v.toString(16)}`;
const REASONS = ['UNKNOWN', 'DOMAIN', 'MAPPING'];

function describeFault(f: DecodedFault | undefined): string {
  if (f === undefined) return 'no fault record';
  const flags = [f.flags & FaultFlag.READ ? 'READ' : '', f.flags & FaultFlag.WRITE ? 'WRITE' : ''].filter(Boolean).join('|');
  return `fault record: reason ${REASONS[f.reason] ?? f.reason}, endpoint ${hex(f.endpoint)}, ${flags}${f.flags & FaultFlag.ADDRESS ? ` at ${hex(f.address)}` : ''}`;
}

function describeEngine(r: DmaEngineResult): string {
  return r.status === 'DONE' ? `DONE, ${r.doneBytes} bytes` : `${r.status}${r.faultAddress !== undefined ? ` at IOVA ${hex(r.faultAddress)}` : ''} after ${r.doneBytes} bytes`;
}

/** The backend's objects in iommufd words: IOAS with their areas, HWPTs, what each device is attached to. */
function describeBackend(s: HostSnapshot): string[] {
  const ctx = s.contexts[0];
  if (ctx === undefined) return ['no context'];
  const out = ctx.ioas.map((i) => `IOAS ${i.id}: ${i.areas.length} area(s)${i.areas.map((a) => ` [${hex(a.iova)}+${hex(a.length)} -> GPA ${hex(a.gpa)}${a.writeable ? ' rw' : ' r'}]`).join('')}`);
  out.push(...ctx.hwpts.map((h) => `HWPT ${h.id}: ${h.type.toLowerCase()} on IOAS ${h.ioas}`));
  for (const d of ctx.devices) {
    const at = d.attachments.find((a) => a.pasid === 0)?.target;
    out.push(`device ${d.id} (${d.name}): ${at === undefined ? 'blocked (no attachment)' : at === 'identity' ? 'identity (bypass)' : `attached to HWPT ${at}`}`);
  }
  out.push(...ctx.accesses.map((a) => `access ${a.id}: a software consumer (the net device) on IOAS ${a.ioas}`));
  out.push(`pinned guest pages: ${s.stats.pinnedPages}, counted against the memlock limit: ${s.stats.accountedPages}`);
  return out;
}

/**
 * `npm start`: a scripted guest walks through the whole story on a machine of workers — the
 * virtio-iommu behind virtio-pci, a VFIO-style DMA engine and a vDPA-style virtio-net behind it —
 * and the narrative says what the guest asked, what the backend did, and what the devices saw.
 */
export async function runDemo(options: { json: boolean }): Promise<number> {
  const story = new Narrative(options.json);
  const started = performance.now();
  const machine = await IommuMachine.create({
    memorySize: MEMORY,
    transport: 'pci',
    endpoints: [
      { id: ENGINE, kind: 'dma-engine', group: 'card0', pasidCapable: true, pasidBits: 8 },
      { id: NET, kind: 'virtio-net' },
    ],
    device: { attachTable: true },
  });
  try {
    const { memory, iommu } = machine;
    story.section('machine');
    story.say(`guest memory: ${MEMORY >> 20} MiB at GPA 0, one SharedArrayBuffer shared by every worker`);
    story.say('worker 1: virtio-iommu (virtio-pci) and the iommufd-style backend, sole writer of the page tables');
    story.say(`worker 2: DMA engine (VFIO-style), endpoint ${hex(ENGINE)}, walks its HWPT's page tables itself`);
    story.say(`worker 3: virtio-net (vDPA-style), endpoint ${hex(NET)}, every ring and buffer address an IOVA, read through an iommufd access`);
    const arena = driverArena(MEMORY);
    const allocator = new GuestAllocator(arena.base, arena.size);
    const guest = IommuGuestDriver.open({
      transport: new PciDriverTransport(iommu.bus as PciBus, { bar0Address: 0xe000_0000 }),
      memory,
      allocator,
      interrupts: iommu.interrupts,
    });
    const engine = DmaEngineDriver.probe(machine.dmaEngines.get(ENGINE)!.bus as PciBus, { bar0Address: 0xd000_0000 });
    const config = guest.readConfig();
    story.say(`guest driver negotiated: ${guest.offeredNames().join(', ')}`);
    story.say(`config: page_size_mask ${hex(config.pageSizeMask)}, probe_size ${config.probeSize}, bypass ${config.bypass}`);
    const request = (what: string, req: EncodedRequest): string => {
      const status = guest.request(req).status;
      const name = status === 'NONE' ? 'no status' : (STATUS_NAMES[status] ?? String(status));
      story.say(`guest: ${what} -> ${name}`);
      return name;
    };
    const fault = async (): Promise<DecodedFault | undefined> => {
      await iommu.control.flushFaults();
      return guest.takeFault();
    };
    const payload = new TextEncoder().encode('mapped once, used by every device behind the IOMMU. '.repeat(160)).subarray(0, LENGTH);
    memory.write(SRC_GPA, payload);

    story.section('boot bypass');
    story.say('before the guest sets anything up, config bypass=1: endpoints see guest-physical memory');
    story.say(`engine: copy GPA ${hex(SRC_GPA)} -> ${hex(DST_GPA)}: ${describeEngine(engine.copy(BigInt(SRC_GPA), BigInt(DST_GPA), LENGTH))}`);
    for (const line of describeBackend(await iommu.control.inspect())) story.say(`backend: ${line}`);

    story.section('bypass off: DMA blocked');
    guest.writeBypass(0);
    story.say('guest: config bypass = 0 (the driver has taken over)');
    story.say(`engine: the same copy: ${describeEngine(engine.copy(BigInt(SRC_GPA), BigInt(DST_GPA), LENGTH))}`);
    story.say(`event queue: ${describeFault(await fault())}`);
    for (const line of describeBackend(await iommu.control.inspect())) story.say(`backend: ${line}`);

    story.section('a domain, attached');
    const probe = guest.request(encodeProbe(ENGINE, config.probeSize));
    for (const p of parseProbeProperties(probe.writable.subarray(0, config.probeSize))) {
      if (p.type === 'RESV_MEM') story.say(`guest: PROBE ${hex(ENGINE)}: reserved ${p.subtype === 1 ? 'MSI' : ''} window ${hex(p.start)}-${hex(p.end)}`);
    }
    request(`ATTACH endpoint ${hex(ENGINE)} to domain ${DOMAIN}`, encodeAttach(DOMAIN, ENGINE));
    story.say('backend: ioasAlloc -> IOAS, hwptAlloc(paging) -> HWPT, deviceAttach(device, HWPT)');
    request(`ATTACH endpoint ${hex(NET)} to domain ${DOMAIN}`, encodeAttach(DOMAIN, NET));
    story.say("backend: accessCreate(the domain's IOAS) for the net device, a software consumer: one I/O address space, one page table");
    request(
      `MAP ${hex(NET_ARENA.iova)} -> GPA ${hex(NET_ARENA.gpa)} (${NET_ARENA.size >> 10} KiB for the net device's rings and buffers)`,
      encodeMap(DOMAIN, BigInt(NET_ARENA.iova), BigInt(NET_ARENA.iova + NET_ARENA.size - 1), BigInt(NET_ARENA.gpa), MapFlag.READ | MapFlag.WRITE),
    );
    const view = new GuestDmaView(memory);
    view.map(NET_ARENA.iova, NET_ARENA.gpa, NET_ARENA.size);
    const netHandle = machine.netDevices.get(NET)!;
    const net = NetDriver.open({
      transport: new PciDriverTransport(netHandle.bus as PciBus, { bar0Address: 0xe100_0000 }),
      memory: view,
      allocator: new GuestAllocator(NET_ARENA.iova, NET_ARENA.size),
      interrupts: netHandle.interrupts,
      queueSize: 64,
    });
    story.say(`guest: virtio-net up, ACCESS_PLATFORM ${net.accessPlatform ? 'negotiated' : 'NOT negotiated'}, rings at IOVA ${hex(NET_ARENA.iova)}`);
    for (const line of describeBackend(await iommu.control.inspect())) story.say(`backend: ${line}`);

    story.section('buffers mapped once');
    request(`MAP ${hex(SRC_IOVA)} -> GPA ${hex(SRC_GPA)} (${LENGTH} bytes, read)`, encodeMap(DOMAIN, SRC_IOVA, SRC_IOVA + BigInt(LENGTH - 1), BigInt(SRC_GPA), MapFlag.READ));
    request(`MAP ${hex(DST_IOVA)} -> GPA ${hex(DST_GPA)} (${LENGTH} bytes, read/write)`, encodeMap(DOMAIN, DST_IOVA, DST_IOVA + BigInt(LENGTH - 1), BigInt(DST_GPA), MapFlag.READ | MapFlag.WRITE));
    memory.fill(DST_GPA, LENGTH, 0);
    // The source holds a network packet: a virtio-net header and an Ethernet frame to our own MAC.
    const frame = payload.slice(0, 1200);
    frame.set(net.mac() ?? new Uint8Array(6), 0);
    const packet = new Uint8Array(VIRTIO_NET.HDR_SIZE + frame.length);
    packet.set(frame, VIRTIO_NET.HDR_SIZE);
    memory.write(SRC_GPA, packet);
    story.say(`engine: copy IOVA ${hex(SRC_IOVA)} -> ${hex(DST_IOVA)}: ${describeEngine(engine.copy(SRC_IOVA, DST_IOVA, LENGTH))}`);
    const same = memory.view(DST_GPA, packet.length).every((b, i) => b === packet[i]);
    story.say(`guest: destination buffer ${same ? 'matches' : 'DOES NOT match'} the source, byte for byte`);
    net.postReceiveBuffers(2);
    net.device.submit(VIRTIO_NET.TX, { readable: [{ addr: Number(DST_IOVA), len: packet.length }], writable: [] }, { token: { addr: Number(DST_IOVA), size: 0 } });
    const back = net.receive();
    net.waitTransmitted(1);
    const looped = back.kind === 'packet' && back.frame.length === frame.length && back.frame.every((b, i) => b === frame[i]);
    story.say(`net: sent ${frame.length} bytes straight from IOVA ${hex(DST_IOVA)} (the engine's output) and received them back: ${looped ? 'identical' : 'DIFFERENT'}`);
    // The same guest page mapped again, elsewhere: it is pinned and counted once.
    request(`MAP ${hex(DST_IOVA + 0x10_0000n)} -> the same GPA ${hex(DST_GPA)} again`, encodeMap(DOMAIN, DST_IOVA + 0x10_0000n, DST_IOVA + 0x10_0000n + BigInt(LENGTH - 1), BigInt(DST_GPA), MapFlag.READ));
    for (const line of describeBackend(await iommu.control.inspect())) story.say(`backend: ${line}`);

    story.section('faults reach the guest');
    story.say(`engine: write into the read-only source: ${describeEngine(engine.copy(DST_IOVA, SRC_IOVA, 64))}`);
    story.say(`event queue: ${describeFault(await fault())}`);

    story.section('unmap');
    request(`UNMAP ${hex(DST_IOVA)}..${hex(DST_IOVA + BigInt(LENGTH - 1))}`, encodeUnmap(DOMAIN, DST_IOVA, DST_IOVA + BigInt(LENGTH - 1)));
    story.say('backend: ioasUnmap, then waited until no device worker was inside a DMA that began before it (strict unmap)');
    story.say(`engine: copy to the unmapped buffer: ${describeEngine(engine.copy(SRC_IOVA, DST_IOVA, LENGTH))}`);
    story.say(`event queue: ${describeFault(await fault())}`);
    net.device.submit(VIRTIO_NET.TX, { readable: [{ addr: Number(DST_IOVA), len: 200 }], writable: [] }, { token: { addr: Number(DST_IOVA), size: 0 } });
    net.waitTransmitted(1);
    const netStats = (await netHandle.control.stats()).model ?? {};
    story.say(`net: transmit from the unmapped buffer returned unsent (transmit faults: ${netStats.txFaults ?? 0})`);
    story.say(`event queue: ${describeFault(await fault())}`);

    story.section('nested translation');
    // The guest builds a process page table in its own memory and binds it to PASID 1.
    const tables = new X86PageTableBuilder({ allocator: pagesFromAllocator(allocator), write: memoryEntryWriter(memory) });
    const user = { writable: true, user: true, executable: false };
    tables.map(PROC_SRC, SRC_GPA, X86_PAGE_4K, { ...user, writable: false });
    tables.map(PROC_DST, PROC_GPA, X86_PAGE_4K, user);
    story.say(`guest: built an x86-64 page table at GPA ${hex(tables.root)}: ${hex(PROC_SRC)} -> ${hex(SRC_GPA)} (read-only), ${hex(PROC_DST)} -> ${hex(PROC_GPA)}`);
    request(`ATTACH_TABLE domain 2, endpoint ${hex(ENGINE)}, PASID 1, root ${hex(tables.root)}`, encodeAttachTable(2, ENGINE, { root: BigInt(tables.root), addrWidth: 48, pasid: 1 }));
    story.say('backend: hwptAlloc(nested, VT-d stage-1 = the guest table, parent = guest-physical stage 2); deviceAttach(device, PASID 1, nested HWPT)');
    memory.fill(PROC_GPA, 256, 0);
    story.say(`engine: copy with PASID 1 ${hex(PROC_SRC)} -> ${hex(PROC_DST)}: ${describeEngine(engine.copy(PROC_SRC, PROC_DST, 256, 1))} (two-stage walk)`);
    const nestedSame = memory.view(PROC_GPA, 256).every((b, i) => b === memory.view(SRC_GPA, 256)[i]);
    story.say(`guest: the bytes landed at GPA ${hex(PROC_GPA)}: ${nestedSame ? 'yes' : 'NO'}`);
    tables.unmap(PROC_DST, X86_PAGE_4K);
    tables.map(PROC_DST, PROC_GPA + 0x1000, X86_PAGE_4K, user);
    request(`INVALIDATE domain 2, ${hex(PROC_DST)} (the guest moved that page)`, encodeInvalidate(2, { scope: 'address', address: PROC_DST, pages: 1n, leaf: true }));
    memory.fill(PROC_GPA + 0x1000, 256, 0);
    const moved = engine.copy(PROC_SRC, PROC_DST, 256, 1);
    const movedOk = moved.status === 'DONE' && memory.view(PROC_GPA + 0x1000, 256).every((b, i) => b === memory.view(SRC_GPA, 256)[i]);
    story.say(`engine: the same copy: ${describeEngine(moved)}; the bytes ${movedOk ? 'landed' : 'did NOT land'} at the new GPA ${hex(PROC_GPA + 0x1000)}`);
    story.say(`engine: copy with PASID 2, bound to nothing: ${describeEngine(engine.copy(PROC_SRC, PROC_DST, 256, 2))}`);
    const pasidFault = await fault();
    const pins = (await iommu.control.stats()).backend;
    story.say(`backend: stage 2 maps all ${MEMORY >> 20} MiB of guest RAM once; pinned pages ${pins.pinnedPages}, counted ${pins.accountedPages} — the pages domain 1 already pinned are not counted twice`);
    story.say(`event queue: ${describeFault(pasidFault)}${pasidFault !== undefined && (pasidFault.flags & FaultFlag.PASID) !== 0 ? `, PASID ${pasidFault.pasid}` : ''}`);

    const stats = await iommu.control.stats();
    const engineStats = await machine.dmaEngines.get(ENGINE)!.control.stats();
    const summary = {
      requests: stats.device.requests,
      requestsByStatus: stats.device.byStatus,
      faultsReported: stats.device.faultsReported,
      pinnedPages: stats.backend.pinnedPages,
      accountedPages: stats.backend.accountedPages,
      engineCommands: engineStats.engine.commands,
      engineFaults: engineStats.engine.faults,
      engineIotlb: engineStats.translator.iotlb,
      netPackets: (await netHandle.control.stats()).model?.rxPackets ?? 0,
      seconds: Number(((performance.now() - started) / 1000).toFixed(2)),
    };
    story.finish(summary);
    return same && looped && nestedSame && movedOk ? 0 : 1;
  } finally {
    await machine.close();
  }
}
