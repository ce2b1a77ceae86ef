import type { QueueMemory } from '../../src/memory/index.js';
import type { InterruptWaiter } from '../../src/virtio/interrupt-waiter.js';
import type { GuestAllocator } from './allocator.js';
import { GuestDevice, GuestDeviceError } from './guest-device.js';
import { readConfigBytes, readConfigConsistent, type DriverTransport } from './transport.js';
import type { UsedBuffer } from './virtqueue.js';
import { STATUS } from './virtio-driver.js';

/*
 * A guest virtio-net driver (virtio 1.2 §5.1) for one queue pair, as a small kernel driver would
 * run it: negotiate, post receive buffers, send frames, take received frames. Every address it gives
 * the device comes from `allocator` and is written through `memory`: IOVAs the guest has mapped in
 * its IOMMU when ACCESS_PLATFORM is negotiated, guest-physical addresses otherwise.
 */

/** The guest's own copy of the wire constants (include/uapi/linux/virtio_net.h, virtio 1.2 §5.1). */
export const VIRTIO_NET = {
  DEVICE_ID: 1,
  RX: 0,
  TX: 1,
  F_MAC: 1n << 5n,
  F_MRG_RXBUF: 1n << 15n,
  F_STATUS: 1n << 16n,
  S_LINK_UP: 1,
  CONFIG_MAC: 0,
  CONFIG_STATUS: 6,
  /** struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers. */
  HDR_SIZE: 12,
  HDR_NUM_BUFFERS: 10,
  HDR_GSO_TYPE: 1,
  /** virtio 1.2 §5.1.6.3: 1514-byte frames plus the 12-byte header. */
  RX_BUFFER_SIZE: 1526,
} as const;

const F_INDIRECT_DESC = 1n << 28n;
const F_EVENT_IDX = 1n << 29n;
const F_VERSION_1 = 1n << 32n;
const F_ACCESS_PLATFORM = 1n << 33n;

/** What this driver accepts when offered. */
export const NET_DRIVER_FEATURES = F_VERSION_1 | F_ACCESS_PLATFORM | F_EVENT_IDX | F_INDIRECT_DESC | VIRTIO_NET.F_MAC | VIRTIO_NET.F_STATUS;

export interface NetDriverOptions {
  readonly transport: DriverTransport;
  /** The driver's view of the addresses it hands out (see GuestDmaView for IOVAs). */
  readonly memory: QueueMemory;
  /** Where rings and buffers are placed: IOVA space with ACCESS_PLATFORM. */
  readonly allocator: GuestAllocator;
  readonly interrupts?: InterruptWaiter;
  readonly queueSize?: number;
  /** Features the driver accepts if offered (default NET_DRIVER_FEATURES). */
  readonly wantedFeatures?: bigint;
}

/** Where a buffer the driver handed out lives, so it can be read back and freed. */
interface BufferToken {
  readonly addr: number;
  readonly size: number;
}

/** A receive buffer the device returned. */
export type Received =
  /** A header and a frame. */
  | { readonly kind: 'packet'; readonly frame: Uint8Array; readonly numBuffers: number; readonly addr: number }
  /** Used length shorter than a header: the device could not fill the buffer (Linux counts a length error). */
  | { readonly kind: 'error'; readonly len: number; readonly addr: number };

export class NetDriver {
  private constructor(
    readonly device: GuestDevice,
    private readonly memory: QueueMemory,
    private readonly allocator: GuestAllocator,
  ) {}

  static open(options: NetDriverOptions): NetDriver {
    if (options.transport.deviceType !== VIRTIO_NET.DEVICE_ID) {
      throw new Error(`device type ${options.transport.deviceType} is not a network device`);
    }
    const device = GuestDevice.open({
      transport: options.transport,
      memory: options.memory,
      allocator: options.allocator,
      wantedFeatures: options.wantedFeatures ?? NET_DRIVER_FEATURES,
      queueCount: 2,
      ...(options.interrupts !== undefined ? { interrupts: options.interrupts } : {}),
      ...(options.queueSize !== undefined ? { queueSize: options.queueSize } : {}),
    });
    return new NetDriver(device, options.memory, options.allocator);
  }

  get negotiated(): bigint {
    return this.device.negotiated;
  }

  get accessPlatform(): boolean {
    return (this.device.negotiated & F_ACCESS_PLATFORM) !== 0n;
  }

  /** The device's MAC, when VIRTIO_NET_F_MAC was negotiated. */
  mac(): Uint8Array | undefined {
    if ((this.negotiated & VIRTIO_NET.F_MAC) === 0n) return undefined;
    return readConfigBytes(this.device.transport, VIRTIO_NET.CONFIG_MAC, 6);
  }

  /** virtio 1.2 §5.1.4.2: without STATUS the link is assumed up. */
  linkUp(): boolean {
    if ((this.negotiated & VIRTIO_NET.F_STATUS) === 0n) return true;
    const status = readConfigConsistent(this.device.transport, (t) => t.configRead(VIRTIO_NET.CONFIG_STATUS, 2));
    return (status & VIRTIO_NET.S_LINK_UP) !== 0;
  }

  /**
   * Posts `count` receive buffers of `size` bytes, each cut into `pieces` device-writable
   * descriptors. Returns their addresses.
   */
  postReceiveBuffers(count: number, size: number = VIRTIO_NET.RX_BUFFER_SIZE, pieces = 1): number[] {
    const out: number[] = [];
    for (let i = 0; i < count; i++) {
      const addr = this.allocator.alloc(size, 8);
      this.postReceiveBufferAt(addr, size, pieces, { addr, size });
      out.push(addr);
    }
    this.device.kick(VIRTIO_NET.RX);
    return out;
  }

  /** Posts a receive buffer at an address the caller owns (not freed when it comes back). Not kicked. */
  postReceiveBufferAt(addr: number, size: number, pieces = 1, token?: BufferToken): number {
    const writable = split(addr, size, pieces);
    return this.device.submit(VIRTIO_NET.RX, { readable: [], writable }, { token: token ?? { addr, size: 0 }, kick: false });
  }

  /**
   * Sends one frame: a zeroed header (virtio 1.2 §5.1.6.2: no offloads, num_buffers 0) and the
   * frame, in `pieces` device-readable descriptors over one buffer. The buffer is allocated (and
   * freed when the device returns it) unless `addr` names one the caller owns. Returns its address.
   */
  send(frame: Uint8Array, options: { pieces?: number; kick?: boolean; addr?: number } = {}): number {
    const size = VIRTIO_NET.HDR_SIZE + frame.length;
    const owned = options.addr === undefined;
    const addr = options.addr ?? this.allocator.alloc(size, 8);
    const packet = new Uint8Array(size);
    packet.set(frame, VIRTIO_NET.HDR_SIZE);
    this.memory.write(addr, packet);
    const token: BufferToken = { addr, size: owned ? size : 0 };
    const readable = split(addr, size, options.pieces ?? 1);
    this.device.submit(VIRTIO_NET.TX, { readable, writable: [] }, { token, kick: options.kick ?? true });
    return addr;
  }

  /** Frees transmit buffers the device has returned; returns how many. */
  reclaimTransmitted(): number {
    let n = 0;
    for (let used = this.device.queue(VIRTIO_NET.TX).popUsed(); used !== undefined; used = this.device.queue(VIRTIO_NET.TX).popUsed()) {
      this.release(used);
      n++;
    }
    return n;
  }

  /** Waits for `count` transmit completions and frees their buffers. */
  waitTransmitted(count: number, timeoutMs = 5000): void {
    this.acknowledge();
    for (const used of this.device.waitUsedMany(VIRTIO_NET.TX, count, timeoutMs)) this.release(used);
  }

  /** Waits for the next receive completion and frees its buffer (if the driver allocated it). */
  receive(timeoutMs = 5000): Received {
    this.acknowledge();
    const used = this.device.waitUsed(VIRTIO_NET.RX, timeoutMs);
    return this.take(used);
  }

  /**
   * Acknowledges pending interrupt causes before waiting, as an interrupt handler would have:
   * both queues share one level-triggered cause, and a cause left set from a completion taken
   * without waiting would swallow the next edge.
   */
  private acknowledge(): void {
    const causes = this.device.transport.takeInterrupts();
    if ((causes & 2) !== 0) {
      const status = this.device.transport.getStatus();
      if ((status & STATUS.DEVICE_NEEDS_RESET) !== 0) throw new GuestDeviceError('device needs reset', status);
    }
  }

  /** A receive completion already published, or undefined. */
  poll(): Received | undefined {
    const used = this.device.queue(VIRTIO_NET.RX).popUsed();
    return used === undefined ? undefined : this.take(used);
  }

  private take(used: UsedBuffer): Received {
    const token = used.token as BufferToken | undefined;
    if (token === undefined) throw new Error(`receive buffer ${used.head} was not posted by this driver`);
    try {
      if (used.len < VIRTIO_NET.HDR_SIZE) return { kind: 'error', len: used.len, addr: token.addr };
      const header = new Uint8Array(VIRTIO_NET.HDR_SIZE);
      this.memory.read(token.addr, header);
      const numBuffers = new DataView(header.buffer).getUint16(VIRTIO_NET.HDR_NUM_BUFFERS, true);
      const frame = new Uint8Array(used.len - VIRTIO_NET.HDR_SIZE);
      this.memory.read(token.addr + VIRTIO_NET.HDR_SIZE, frame);
      return { kind: 'packet', frame, numBuffers, addr: token.addr };
    } finally {
      this.release(used);
    }
  }

  /** Frees what the driver allocated; chains submitted around it (tests do) carry no token. */
  private release(used: UsedBuffer): void {
    const token = used.token as BufferToken | undefined;
    if (token !== undefined && token.size > 0) this.allocator.free(token.addr);
  }
}

/** [addr, addr + size) cut into at most `pieces` descriptors, none of them empty. */
function split(addr: number, size: number, pieces: number): { addr: number; len: number }[] {
  const n = Math.max(1, Math.min(pieces, size));
  const cut = Math.ceil(size / n);
  const out: { addr: number; len: number }[] = [];
  for (let at = 0; at < size; at += cut) out.push({ addr: addr + at, len: Math.min(cut, size - at) });
  return out;
}
