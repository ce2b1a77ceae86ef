import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import type { GpaSpan, TranslatingDmaSpace } from '../memory/dma-space.js';
import { formatAddress } from '../memory/errors.js';
import { DeviceType, FeatureBit, featureMask, hasFeature } from '../virtio/constants.js';
import type { DeviceEnvironment, VirtioDeviceModel } from '../virtio/device.js';
import { stateArray, stateBoolean, stateBytes, stateCount, stateInteger, stateRecord, stateU32 } from '../virtio/saved-state.js';
import { QueueError, type BufferSegment, type DescriptorChain } from '../virtio/split-queue.js';

/*
 * A virtio-net device (virtio 1.2 §5.1) whose link is a loopback cable: every frame the driver
 * transmits comes back on its own receive queue. It is the "vDPA-style" consumer of the IOMMU:
 * behind one, it offers and requires VIRTIO_F_ACCESS_PLATFORM, so every ring and buffer address it
 * is given is an IOVA and every access is translated through its DmaSpace.
 */

/** Network device feature bits this device knows (virtio 1.2 §5.1.3; include/uapi/linux/virtio_net.h). */
export const NetFeatureBit = {
  /** Device has given MAC address. */
  MAC: 5,
  /** Driver can merge receive buffers (not offered: every packet fits one buffer). */
  MRG_RXBUF: 15,
  /** Configuration status field is available. */
  STATUS: 16,
} as const;

/** Queue indices with one queue pair and no control queue (virtio 1.2 §5.1.2). */
export const NetQueue = { RX: 0, TX: 1 } as const;

/**
 * struct virtio_net_hdr as VIRTIO_F_VERSION_1 lays it out without hash reports or tunnels: 12 bytes,
 * num_buffers always present (virtio 1.2 §5.1.6; Linux struct virtio_net_hdr_v1).
 */
export const NetHeader = {
  flags: { offset: 0, size: 1 },
  gsoType: { offset: 1, size: 1 },
  hdrLen: { offset: 2, size: 2 },
  gsoSize: { offset: 4, size: 2 },
  csumStart: { offset: 6, size: 2 },
  csumOffset: { offset: 8, size: 2 },
  numBuffers: { offset: 10, size: 2 },
  SIZE: 12,
} as const;

/** VIRTIO_NET_HDR_GSO_NONE: the only gso_type a driver may send without HOST_TSO/UFO/USO. */
export const NET_GSO_NONE = 0;

/** struct virtio_net_config up to status: the fields that exist with MAC and STATUS (virtio 1.2 §5.1.4). */
export const NetConfig = {
  mac: { offset: 0, size: 6 },
  status: { offset: 6, size: 2 },
  SIZE: 8,
} as const;

/** VIRTIO_NET_S_LINK_UP. */
export const NET_S_LINK_UP = 1;

/** An Ethernet header: a frame shorter than this is nothing a link could carry. */
export const ETH_HEADER_SIZE = 14;
/**
 * Largest frame without any GSO feature (virtio 1.2 §5.1.6.3: "the maximum incoming packet will
 * be ... 1514 bytes"). Larger frames are not sent: looped back, they could not be received.
 */
export const MAX_FRAME_SIZE = 1514;

export const DEFAULT_MAC: readonly number[] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
export const DEFAULT_RX_BACKLOG = 64;
const DEFAULT_QUEUE_SIZE = 256;
/** Faults logged one by one before only every 1024th is: a hostile guest must not flood the log. */
const FAULT_LOG_BURST = 16;

export interface VirtioNetOptions {
  /** How the device reaches memory: through the IOMMU (TranslatorDmaSpace) or not (PhysicalDmaSpace). */
  readonly dma: TranslatingDmaSpace;
  /** The machine puts the device behind an IOMMU: ACCESS_PLATFORM is offered and required. */
  readonly behindIommu: boolean;
  /** Six bytes, a unicast address. Default 52:54:00:12:34:56. */
  readonly mac?: readonly number[];
  /** Maximum size of each queue (default 256). */
  readonly queueSize?: number;
  /** Frames held while the receive queue has no buffer (default 64; 0 drops them at once). */
  readonly rxBacklog?: number;
  /** For what happens before activation (feature refusal); afterwards the transport's logger is used. */
  readonly log?: Logger;
}

/** Counters since the device was created (a reset does not clear them). */
export interface VirtioNetStats {
  /** Frames read from the transmit queue and put on the link, and their bytes (headers excluded). */
  txPackets: number;
  txBytes: number;
  /** Frames written into receive buffers, and their bytes (headers excluded). */
  rxPackets: number;
  rxBytes: number;
  /** Transmit chains that were not a packet: too short, too long, or a gso_type never negotiated. */
  txMalformed: number;
  /** Receive chains with too little device-writable room for any frame: returned unwritten. */
  rxMalformed: number;
  /** Frames dropped because the receive queue had no buffer and the backlog was full. */
  dropsNoRxBuffer: number;
  /** Frames dropped because the next receive buffer was smaller than the frame. */
  dropsRxTooSmall: number;
  /** Transmit and receive buffers the device could not reach through the IOMMU. */
  txFaults: number;
  rxFaults: number;
  /** Frames waiting for a receive buffer now. */
  backlog: number;
}

type Delivery = 'delivered' | 'dropped' | 'no-buffer' | 'broken';

type NetCounters = Omit<VirtioNetStats, 'backlog'>;
const COUNTER_NAMES = [
  'txPackets',
  'txBytes',
  'rxPackets',
  'rxBytes',
  'txMalformed',
  'rxMalformed',
  'dropsNoRxBuffer',
  'dropsRxTooSmall',
  'txFaults',
  'rxFaults',
] as const satisfies readonly (keyof NetCounters)[];

/** A descriptor chain as saved state: the buffers it names, in the device's address space. */
export type SavedChain = {
  readonly head: number;
  readonly readable: readonly { readonly addr: number; readonly len: number }[];
  readonly writable: readonly { readonly addr: number; readonly len: number }[];
};

/**
 * virtio-net's own state beyond its transport's, as saveState() gives it. Translation state is not
 * part of it: the destination gets its device-table row and shared tables in its start message.
 */
export type VirtioNetState = {
  /** Config space: the MAC and the status field (always LINK_UP on this cable). */
  readonly mac: Uint8Array;
  readonly status: number;
  /** Saved behind an IOMMU or not: ACCESS_PLATFORM was offered by that, so it must match. */
  readonly behindIommu: boolean;
  /** The device had asked for a reset and does nothing until it gets one. */
  readonly failed: boolean;
  readonly counters: { readonly [K in keyof NetCounters]: number };
  /** Frames on the cable waiting for a receive buffer, oldest first. */
  readonly backlog: readonly Uint8Array[];
  /** A receive chain taken from the ring and kept for the next frame (it was too small for the last). */
  readonly heldRx: SavedChain | null;
};

/** A split queue has at most 32768 entries (virtio 1.2 §2.7), an indirect table no more descriptors. */
const MAX_QUEUE_SIZE = 32768;
const STATE_FIELDS = ['mac', 'status', 'behindIommu', 'failed', 'counters', 'backlog', 'heldRx'] as const;

function readSegments(value: unknown, path: string): { addr: number; len: number }[] {
  // A chain walks at most its table plus one indirect table (virtio 1.2 §2.7.5.3.1).
  return stateArray(value, path, 2 * MAX_QUEUE_SIZE).map((entry, i) => {
    const seg = stateRecord(entry, `${path}[${i}]`, ['addr', 'len']);
    return { addr: stateInteger(seg.addr, `${path}[${i}].addr`, 0, Number.MAX_SAFE_INTEGER), len: stateU32(seg.len, `${path}[${i}].len`) };
  });
}

function checkMac(mac: readonly number[]): Uint8Array {
  if (mac.length !== 6 || mac.some((b) => !Number.isInteger(b) || b < 0 || b > 0xff)) {
    throw new RangeError(`a MAC address is six bytes, got [${mac.join(', ')}]`);
  }
  // Bit 0 of the first octet marks a group address, which no interface may own.
  if ((mac[0]! & 1) !== 0) throw new RangeError('a MAC address of an interface must be unicast');
  return Uint8Array.from(mac);
}

/**
 * virtio-net with one queue pair and a loopback link. Offers VERSION_1, EVENT_IDX, INDIRECT_DESC,
 * MAC and STATUS (link always up), and ACCESS_PLATFORM when behind an IOMMU; no offloads, no
 * mergeable receive buffers, no control queue.
 *
 * Transmit: each chain's device-readable bytes are a 12-byte header and one frame. The frame is
 * copied out, the chain is returned at once (used length 0: nothing is written to transmit
 * buffers), and the frame goes onto the link, which loops it to the receive queue.
 *
 * Receive: a frame takes the next receive chain and is written there as a zeroed header with
 * num_buffers = 1, then the frame; the used length is header plus frame. With no receive buffer,
 * frames wait in a bounded backlog (oldest first) and are delivered when the driver adds buffers;
 * a frame that finds the backlog full is dropped. A receive chain too small for the frame at hand
 * is kept for the next frame and the frame is dropped, as a NIC drops what its buffer cannot hold.
 *
 * Every chain is handled inside one DMA of the DmaSpace (begin/end), ring accesses included.
 */
export class VirtioNetDevice implements VirtioDeviceModel {
  readonly deviceType = DeviceType.NET;
  readonly queueMaxSizes: readonly number[];
  readonly offeredFeatures: bigint;
  readonly configSize = NetConfig.SIZE;
  readonly mac: Uint8Array;
  readonly behindIommu: boolean;

  private readonly dma: TranslatingDmaSpace;
  private readonly backlogLimit: number;
  private readonly log: Logger;
  private env: DeviceEnvironment | undefined;
  /** Set once the device asked for a reset: nothing more is done until it gets one. */
  private failed = false;
  private backlog: Uint8Array[] = [];
  /** A receive chain taken from the ring but too small for the last frame: the next frame tries it first. */
  private heldRx: DescriptorChain | undefined;
  /** Reused per receive chain. */
  private readonly spans: GpaSpan[] = [];
  private readonly counters: NetCounters = {
    txPackets: 0,
    txBytes: 0,
    rxPackets: 0,
    rxBytes: 0,
    txMalformed: 0,
    rxMalformed: 0,
    dropsNoRxBuffer: 0,
    dropsRxTooSmall: 0,
    txFaults: 0,
    rxFaults: 0,
  };

  constructor(options: VirtioNetOptions) {
    this.dma = options.dma;
    this.behindIommu = options.behindIommu;
    this.mac = checkMac(options.mac ?? DEFAULT_MAC);
    const queueSize = options.queueSize ?? DEFAULT_QUEUE_SIZE;
    this.queueMaxSizes = [queueSize, queueSize];
    const backlog = options.rxBacklog ?? DEFAULT_RX_BACKLOG;
    if (!Number.isSafeInteger(backlog) || backlog < 0 || backlog > 4096) {
      throw new RangeError(`rxBacklog must be an integer in [0, 4096], got ${backlog}`);
    }
    this.backlogLimit = backlog;
    this.log = options.log ?? silentLogger;
    this.offeredFeatures =
      featureMask(FeatureBit.VERSION_1) |
      featureMask(FeatureBit.EVENT_IDX) |
      featureMask(FeatureBit.INDIRECT_DESC) |
      featureMask(NetFeatureBit.MAC) |
      featureMask(NetFeatureBit.STATUS) |
      (this.behindIommu ? featureMask(FeatureBit.ACCESS_PLATFORM) : 0n);
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    const bytes = new Uint8Array(NetConfig.SIZE);
    bytes.set(this.mac, NetConfig.mac.offset);
    const view = new DataView(bytes.buffer);
    // The cable is always plugged in.
    view.setUint16(NetConfig.status.offset, NET_S_LINK_UP, true);
    if (offset < 0 || offset + size > NetConfig.SIZE) return 0;
    return size === 1 ? view.getUint8(offset) : size === 2 ? view.getUint16(offset, true) : view.getUint32(offset, true);
  }

  writeConfig(offset: number, size: 1 | 2 | 4): void {
    // virtio 1.2 §5.1.4.2: "The driver MUST NOT write to any of the device configuration fields."
    (this.env?.log ?? this.log).debug({ offset, size }, 'virtio-net config is read-only; write ignored');
  }

  validateFeatures(negotiated: bigint): boolean {
    // virtio 1.2 §6.2: "A device MAY fail to operate further if VIRTIO_F_ACCESS_PLATFORM is not
    // accepted." Behind an IOMMU it must: without it the driver would hand out guest-physical
    // addresses, and this device can only reach memory through IOVAs.
    if (this.behindIommu && !hasFeature(negotiated, FeatureBit.ACCESS_PLATFORM)) {
      this.log.warn({ negotiated: formatAddress(negotiated) }, 'virtio-net is behind an IOMMU and the driver did not accept ACCESS_PLATFORM; FEATURES_OK refused');
      return false;
    }
    return true;
  }

  activate(env: DeviceEnvironment): void {
    this.env = env;
    this.failed = false;
  }

  notify(queueIndex: number): void {
    const env = this.env;
    if (env === undefined || this.failed) return;
    if (queueIndex === NetQueue.TX) this.serveTransmit(env);
    else if (queueIndex === NetQueue.RX) this.serveBacklog(env);
  }

  reset(): void {
    this.env = undefined;
    this.failed = false;
    this.backlog = [];
    this.heldRx = undefined;
  }

  stats(): VirtioNetStats {
    return { ...this.counters, backlog: this.backlog.length };
  }

  // ---- saved state -------------------------------------------------------------------------------

  saveState(): VirtioNetState {
    const held = this.heldRx;
    return {
      mac: this.mac.slice(),
      status: NET_S_LINK_UP,
      behindIommu: this.behindIommu,
      failed: this.failed,
      counters: { ...this.counters },
      backlog: this.backlog.map((frame) => frame.slice()),
      heldRx:
        held === undefined
          ? null
          : {
              head: held.head,
              readable: held.readable.map(({ addr, len }) => ({ addr, len })),
              writable: held.writable.map(({ addr, len }) => ({ addr, len })),
            },
    };
  }

  restoreState(state: unknown): void {
    const s = stateRecord(state, 'virtio-net', STATE_FIELDS);
    const mac = stateBytes(s.mac, 'virtio-net.mac', 6);
    // Bit 0 of the first octet marks a group address, which no interface may own.
    if ((mac[0]! & 1) !== 0) throw new RangeError('virtio-net.mac must be a unicast address');
    // The only status this cable has: the link is always up.
    if (stateU32(s.status, 'virtio-net.status') !== NET_S_LINK_UP) throw new RangeError(`virtio-net.status must be LINK_UP (${NET_S_LINK_UP}), got ${String(s.status)}`);
    const behindIommu = stateBoolean(s.behindIommu, 'virtio-net.behindIommu');
    if (behindIommu !== this.behindIommu) {
      throw new RangeError(`virtio-net.behindIommu: the state was saved ${behindIommu ? 'behind' : 'without'} an IOMMU, this device is ${this.behindIommu ? 'behind' : 'without'} one`);
    }
    const failed = stateBoolean(s.failed, 'virtio-net.failed');
    const c = stateRecord(s.counters, 'virtio-net.counters', COUNTER_NAMES);
    const counters = {} as NetCounters;
    for (const name of COUNTER_NAMES) counters[name] = stateCount(c[name], `virtio-net.counters.${name}`);
    const backlog = stateArray(s.backlog, 'virtio-net.backlog', this.backlogLimit).map((frame, i) =>
      stateBytes(frame, `virtio-net.backlog[${i}]`, ETH_HEADER_SIZE, MAX_FRAME_SIZE),
    );
    let heldRx: DescriptorChain | undefined;
    if (s.heldRx !== null) {
      const h = stateRecord(s.heldRx, 'virtio-net.heldRx', ['head', 'readable', 'writable']);
      const head = stateInteger(h.head, 'virtio-net.heldRx.head', 0, MAX_QUEUE_SIZE - 1);
      const readable = readSegments(h.readable, 'virtio-net.heldRx.readable');
      const writable = readSegments(h.writable, 'virtio-net.heldRx.writable');
      const length = (segments: readonly { len: number }[]): number => segments.reduce((sum, seg) => sum + seg.len, 0);
      // virtio 1.2 §2.7.5.2: a chain totals at most 2^32 - 1 bytes (the used len is a u32).
      if (length(readable) + length(writable) > 0xffff_ffff) throw new RangeError('virtio-net.heldRx is longer than 2^32 - 1 bytes');
      // Only a chain with room for a packet is ever held; a smaller one is returned at once.
      if (length(writable) < NetHeader.SIZE + ETH_HEADER_SIZE) throw new RangeError(`virtio-net.heldRx.writable holds ${length(writable)} bytes, less than any packet`);
      heldRx = { head, readable, writable, readableLength: length(readable), writableLength: length(writable) };
    }
    this.mac.set(mac);
    this.failed = failed;
    Object.assign(this.counters, counters);
    this.backlog = backlog;
    this.heldRx = heldRx;
  }

  // ---- transmit ----------------------------------------------------------------------------------

  private serveTransmit(env: DeviceEnvironment): void {
    const tx = env.queues[NetQueue.TX];
    if (tx === undefined) return;
    for (;;) {
      let chain: DescriptorChain | QueueError | null;
      let frame: Uint8Array | undefined;
      this.dma.begin();
      try {
        chain = tx.pop();
        if (chain !== null && !(chain instanceof QueueError)) {
          frame = this.readTransmit(env, chain);
          // Nothing is written to a transmit buffer, so the used length is 0 (virtio 1.2 §2.7.8.2).
          tx.addUsed(chain.head, 0);
        }
      } finally {
        this.dma.end();
      }
      if (chain instanceof QueueError) return this.fail(env, 'transmit', chain);
      if (chain === null) {
        // Re-arm kicks, then look once more: the driver may have added a chain meanwhile.
        if (tx.enableNotifications()) continue;
        break;
      }
      if (frame !== undefined) this.transmit(env, frame);
      if (this.failed) return;
    }
    if (tx.broken !== null) return this.fail(env, 'transmit', tx.broken);
    // Received frames first: a driver waiting for them is woken by their interrupt, not by the
    // transmit completion's (the interrupt status is one level both queues share on virtio-mmio).
    this.publish(env, NetQueue.RX);
    if (!this.failed) this.publish(env, NetQueue.TX);
  }

  /** The frame a transmit chain carries, or undefined when it carries none we may send. */
  private readTransmit(env: DeviceEnvironment, chain: DescriptorChain): Uint8Array | undefined {
    const total = chain.readableLength;
    const frameLength = total - NetHeader.SIZE;
    if (frameLength < ETH_HEADER_SIZE || frameLength > MAX_FRAME_SIZE) {
      this.counters.txMalformed++;
      env.log.debug({ head: chain.head, length: total }, 'virtio-net transmit chain is not a header and one frame; dropped');
      return undefined;
    }
    const bytes = new Uint8Array(total);
    let at = 0;
    for (const segment of chain.readable) {
      if (segment.len === 0) continue;
      if (!this.dma.read(segment.addr, bytes.subarray(at, at + segment.len))) {
        this.bufferFault(env, NetQueue.TX, chain, segment);
        return undefined;
      }
      at += segment.len;
    }
    // virtio 1.2 §5.1.6.2.1: without HOST_TSO4/TSO6/UFO/USO the driver MUST NOT ask for
    // segmentation; a packet that does cannot be sent as it is. Flag bits are ignored (§5.1.6.2.2).
    const gsoType = bytes[NetHeader.gsoType.offset]!;
    if (gsoType !== NET_GSO_NONE) {
      this.counters.txMalformed++;
      env.log.debug({ head: chain.head, gsoType }, 'virtio-net transmit asks for segmentation that was not negotiated; dropped');
      return undefined;
    }
    this.counters.txPackets++;
    this.counters.txBytes += frameLength;
    return bytes.subarray(NetHeader.SIZE);
  }

  /** The link: a loopback, so the frame is received at once, or waits for a receive buffer. */
  private transmit(env: DeviceEnvironment, frame: Uint8Array): void {
    // Frames leave in order: anything waiting goes first (buffers may have come without a kick).
    if (this.backlog.length > 0) this.serveBacklogOnly(env);
    if (this.failed) return;
    if (this.backlog.length === 0) {
      const outcome = this.deliver(env, frame);
      if (outcome !== 'no-buffer') return;
    }
    if (this.backlog.length < this.backlogLimit) this.backlog.push(frame);
    else this.counters.dropsNoRxBuffer++;
  }

  // ---- receive -----------------------------------------------------------------------------------

  private serveBacklog(env: DeviceEnvironment): void {
    this.serveBacklogOnly(env);
    if (!this.failed) this.publish(env, NetQueue.RX);
  }

  private serveBacklogOnly(env: DeviceEnvironment): void {
    while (this.backlog.length > 0) {
      const outcome = this.deliver(env, this.backlog[0]!);
      if (outcome === 'no-buffer' || outcome === 'broken') return;
      this.backlog.shift();
    }
  }

  /** Puts one frame into the next receive buffer. */
  private deliver(env: DeviceEnvironment, frame: Uint8Array): Delivery {
    const rx = env.queues[NetQueue.RX];
    if (rx === undefined) return 'no-buffer';
    const needed = NetHeader.SIZE + frame.length;
    for (;;) {
      let chain = this.heldRx;
      this.heldRx = undefined;
      this.dma.begin();
      try {
        if (chain === undefined) {
          const popped = rx.pop();
          if (popped instanceof QueueError) {
            this.fail(env, 'receive', popped);
            return 'broken';
          }
          if (popped === null) {
            if (rx.enableNotifications()) continue;
            if (rx.broken !== null) {
              this.fail(env, 'receive', rx.broken);
              return 'broken';
            }
            return 'no-buffer';
          }
          chain = popped;
        }
        if (chain.writableLength < NetHeader.SIZE + ETH_HEADER_SIZE) {
          // It can never hold a packet: give it back rather than keep it forever.
          this.counters.rxMalformed++;
          env.log.debug({ head: chain.head, writable: chain.writableLength }, 'virtio-net receive chain has no room for a packet; returned unused');
          rx.addUsed(chain.head, 0);
          continue;
        }
        if (chain.writableLength < needed) {
          this.heldRx = chain;
          this.counters.dropsRxTooSmall++;
          return 'dropped';
        }
        const faulted = this.writeReceive(chain, frame);
        if (faulted !== undefined) {
          // virtio 1.2 §2.7.8.2 note: "len is permitted to be an underestimate: that's preferable
          // to the driver believing that uninitialized memory has been overwritten when it has
          // not." Nothing was written, so the buffer goes back with len 0 and the frame is lost.
          this.bufferFault(env, NetQueue.RX, chain, faulted);
          rx.addUsed(chain.head, 0);
          return 'dropped';
        }
        rx.addUsed(chain.head, needed);
        this.counters.rxPackets++;
        this.counters.rxBytes += frame.length;
        return 'delivered';
      } finally {
        this.dma.end();
      }
    }
  }

  /**
   * Writes header and frame over the chain's device-writable buffers, all or nothing: every part is
   * translated before any byte is written. Returns the segment that faulted, or undefined.
   */
  private writeReceive(chain: DescriptorChain, frame: Uint8Array): BufferSegment | undefined {
    const needed = NetHeader.SIZE + frame.length;
    const spans = this.spans;
    spans.length = 0;
    let left = needed;
    for (const segment of chain.writable) {
      if (left === 0) break;
      const n = Math.min(segment.len, left);
      if (n === 0) continue;
      if (!this.dma.translate(segment.addr, n, 'write', spans)) return segment;
      left -= n;
    }
    const packet = new Uint8Array(needed);
    // virtio 1.2 §5.1.6.4.1: flags 0 without GUEST_CSUM, gso_type NONE without GUEST_TSO*, and
    // num_buffers 1 without MRG_RXBUF; the rest of the header means nothing here and stays 0.
    new DataView(packet.buffer).setUint16(NetHeader.numBuffers.offset, 1, true);
    packet.set(frame, NetHeader.SIZE);
    const memory = this.dma.memory;
    let at = 0;
    for (const span of spans) {
      memory.write(span.gpa, packet.subarray(at, at + span.length));
      at += span.length;
    }
    return undefined;
  }

  // ---- shared ------------------------------------------------------------------------------------

  private publish(env: DeviceEnvironment, index: number): void {
    const queue = env.queues[index];
    if (queue === undefined) return;
    queue.flushUsed();
    if (queue.broken !== null) return this.fail(env, index === NetQueue.TX ? 'transmit' : 'receive', queue.broken);
    env.notifyUsed(index);
  }

  /**
   * A ring could not be used: malformed, or its IOVAs no longer translate. The device cannot even
   * return buffers then. virtio 1.2 §2.1: DEVICE_NEEDS_RESET "indicates that the device has
   * experienced an error from which it can't recover", and §2.1.2: "The device SHOULD set
   * DEVICE_NEEDS_RESET when it enters an error state that a reset is needed."
   */
  private fail(env: DeviceEnvironment, which: 'transmit' | 'receive', error: QueueError): void {
    if (this.failed) return;
    this.failed = true;
    env.needsReset(`virtio-net ${which} queue: ${error.reason}`);
  }

  /**
   * A buffer the IOMMU would not let the device reach. The translator has put the fault record in
   * the fault queue (the virtio-iommu reports it to the guest); here the chain is returned
   * untouched and the packet is lost, which is what the guest asked for by unmapping it.
   */
  private bufferFault(env: DeviceEnvironment, queue: number, chain: DescriptorChain, segment: BufferSegment): void {
    const tx = queue === NetQueue.TX;
    if (tx) this.counters.txFaults++;
    else this.counters.rxFaults++;
    const total = this.counters.txFaults + this.counters.rxFaults;
    if (total <= FAULT_LOG_BURST || total % 1024 === 0) {
      env.log.warn(
        { queue: tx ? 'transmit' : 'receive', head: chain.head, iova: formatAddress(segment.addr), length: segment.len, faults: total },
        `virtio-net ${tx ? 'transmit' : 'receive'} buffer is not accessible through the IOMMU; packet dropped, buffer returned unwritten`,
      );
    }
  }
}

