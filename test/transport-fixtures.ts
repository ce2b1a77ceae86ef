/*
 * Shared pieces of the transport tests: a small echo device model, an interrupt line that records
 * what it was told, and a bare-bones split ring driver working straight on guest memory.
 */
import type { GuestMemory } from '../src/memory/index.js';
import { DescFlag, FeatureBit, featureMask } from '../src/virtio/constants.js';
import type { DeviceEnvironment, InterruptLine, VirtioDeviceModel } from '../src/virtio/device.js';
import { AvailRing, Descriptor, UsedRing } from '../src/virtio/layout.js';
import { ChainReader, ChainWriter, QueueError } from '../src/virtio/split-queue.js';
import { TransportFeatureBit } from '../src/virtio/transport.js';

/** Unassigned device ID inside the modern virtio-pci range (0x1040 + ID <= 0x107f). */
export const ECHO_DEVICE_TYPE = 0x3e;
/** A device-specific feature bit the echo device offers (bit 0 of the device range). */
export const ECHO_F_SHOUT = 0;

/** Echo config: u32 served (RO), u32 scratch (RW), u64 serial (RO). */
export const EchoConfig = {
  served: { offset: 0, size: 4 },
  scratch: { offset: 4, size: 4 },
  serial: { offset: 8, size: 8 },
  SIZE: 16,
} as const;

export type EchoFault = 'activate' | 'notify' | 'readConfig' | 'writeConfig' | 'validate' | 'reset';

/**
 * Queue 0 takes requests: each chain's readable bytes are copied into its writable part (upper-cased
 * when ECHO_F_SHOUT is negotiated). Records every callback so tests can check when the transport
 * calls it.
 */
export class EchoDevice implements VirtioDeviceModel {
  readonly deviceType: number;
  readonly queueMaxSizes: readonly number[];
  readonly offeredFeatures: bigint;
  readonly configSize = EchoConfig.SIZE;

  env: DeviceEnvironment | undefined;
  readonly calls: { method: string; arg?: unknown }[] = [];
  /** Features validateFeatures refuses when present. */
  refuseFeatures = 0n;
  fault: EchoFault | undefined;
  served = 0;
  scratch = 0;
  serial = 0x1122_3344_5566_7788n;
  /** Runs inside readConfig, before the value is produced (to change config mid-read). */
  onConfigRead: ((offset: number) => void) | undefined;

  constructor(options: { deviceType?: number; queueMaxSizes?: readonly number[]; offeredFeatures?: bigint } = {}) {
    this.deviceType = options.deviceType ?? ECHO_DEVICE_TYPE;
    this.queueMaxSizes = options.queueMaxSizes ?? [16, 0, 8];
    this.offeredFeatures =
      options.offeredFeatures ??
      featureMask(FeatureBit.VERSION_1) |
        featureMask(FeatureBit.EVENT_IDX) |
        featureMask(FeatureBit.INDIRECT_DESC) |
        featureMask(TransportFeatureBit.RING_RESET) |
        featureMask(ECHO_F_SHOUT);
  }

  count(method: string): number {
    return this.calls.filter((c) => c.method === method).length;
  }

  private maybeFail(what: EchoFault): void {
    if (this.fault === what) throw new Error(`echo device fault in ${what}`);
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    this.calls.push({ method: 'readConfig', arg: offset });
    this.maybeFail('readConfig');
    this.onConfigRead?.(offset);
    const bytes = new Uint8Array(EchoConfig.SIZE);
    const view = new DataView(bytes.buffer);
    view.setUint32(EchoConfig.served.offset, this.served, true);
    view.setUint32(EchoConfig.scratch.offset, this.scratch, true);
    view.setBigUint64(EchoConfig.serial.offset, this.serial, true);
    return size === 1 ? view.getUint8(offset) : size === 2 ? view.getUint16(offset, true) : view.getUint32(offset, true);
  }

  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    this.calls.push({ method: 'writeConfig', arg: offset });
    this.maybeFail('writeConfig');
    if (offset === EchoConfig.scratch.offset && size === 4) this.scratch = value >>> 0;
  }

  validateFeatures(negotiated: bigint): boolean {
    this.calls.push({ method: 'validateFeatures', arg: negotiated });
    this.maybeFail('validate');
    return (negotiated & this.refuseFeatures) === 0n;
  }

  activate(env: DeviceEnvironment): void {
    this.calls.push({ method: 'activate' });
    this.maybeFail('activate');
    this.env = env;
  }

  notify(queueIndex: number): void {
    this.calls.push({ method: 'notify', arg: queueIndex });
    this.maybeFail('notify');
    const env = this.env;
    const queue = env?.queues[queueIndex];
    if (env === undefined || queue === undefined) return;
    const shout = (env.features & featureMask(ECHO_F_SHOUT)) !== 0n;
    for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
      if (chain instanceof QueueError) {
        env.needsReset(`echo queue ${queueIndex}: ${chain.reason}`);
        return;
      }
      const data = new Uint8Array(chain.readableLength);
      new ChainReader(queue.memory, chain.readable).read(data);
      if (shout) for (let i = 0; i < data.length; i++) if (data[i]! >= 0x61 && data[i]! <= 0x7a) data[i]! -= 0x20;
      const written = new ChainWriter(queue.memory, chain.writable).write(data);
      queue.addUsed(chain.head, written);
      this.served++;
    }
    queue.flushUsed();
    env.notifyUsed(queueIndex);
  }

  reset(): void {
    this.calls.push({ method: 'reset' });
    this.env = undefined;
    this.served = 0;
    this.maybeFail('reset');
  }

  /** A device-initiated config change (the serial moves). */
  changeConfig(): void {
    this.serial += 1n;
    this.env?.notifyConfigChange();
  }
}

/** Records the interrupt causes the transport drives. */
export class RecordingIrq implements InterruptLine {
  level = 0;
  readonly history: number[] = [];
  set(status: number): void {
    this.level = status;
    this.history.push(status);
  }
  /** Rising edges seen so far. */
  edges(): number {
    let prev = 0;
    let n = 0;
    for (const s of this.history) {
      if ((s & ~prev) !== 0) n++;
      prev = s;
    }
    return n;
  }
}

/**
 * The driver's half of a split ring in its simplest form: one descriptor pair per request, no
 * indirect tables, no free-list reuse beyond the ring size.
 */
export class TestRing {
  readonly desc: number;
  readonly driver: number;
  readonly device: number;
  private availIdx = 0;
  private usedSeen = 0;
  private nextDesc = 0;
  private readonly dataBase: number;

  constructor(
    private readonly memory: GuestMemory,
    base: number,
    readonly size: number,
  ) {
    this.desc = base;
    this.driver = base + Descriptor.SIZE * size;
    this.device = Math.ceil((this.driver + AvailRing.sizeFor(size)) / 4096) * 4096;
    this.dataBase = this.device + 4096;
  }

  /** Adds one request: `out` readable by the device, `inLength` writable. Returns the head index. */
  add(out: Uint8Array, inLength: number): number {
    const head = this.nextDesc % this.size;
    const second = (head + 1) % this.size;
    this.nextDesc += 2;
    const outAddr = this.dataBase + head * 256;
    const inAddr = outAddr + 128;
    this.memory.write(outAddr, out);
    this.memory.fill(inAddr, inLength, 0);
    this.writeDesc(head, outAddr, out.length, DescFlag.NEXT, second);
    this.writeDesc(second, inAddr, inLength, DescFlag.WRITE, 0);
    this.memory.writeU16(this.driver + AvailRing.ring.offset + (this.availIdx % this.size) * 2, head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.memory.atomicStoreU16(this.driver + AvailRing.idx.offset, this.availIdx);
    return head;
  }

  private writeDesc(index: number, addr: number, len: number, flags: number, next: number): void {
    const at = this.desc + index * Descriptor.SIZE;
    this.memory.writeU64(at + Descriptor.addr.offset, addr);
    this.memory.writeU32(at + Descriptor.len.offset, len);
    this.memory.writeU16(at + Descriptor.flags.offset, flags);
    this.memory.writeU16(at + Descriptor.next.offset, next);
  }

  /** Used elements published since the last call, with the bytes the device wrote. */
  takeUsed(): { head: number; len: number; data: Uint8Array }[] {
    const out: { head: number; len: number; data: Uint8Array }[] = [];
    const idx = this.memory.atomicLoadU16(this.device + UsedRing.idx.offset);
    while (this.usedSeen !== idx) {
      const at = this.device + UsedRing.ring.offset + (this.usedSeen % this.size) * UsedRing.ring.size;
      const head = this.memory.readU32(at + UsedRing.elemId.offset);
      const len = this.memory.readU32(at + UsedRing.elemLen.offset);
      const inAddr = this.dataBase + head * 256 + 128;
      out.push({ head, len, data: this.memory.view(inAddr, len).slice() });
      this.usedSeen = (this.usedSeen + 1) & 0xffff;
    }
    return out;
  }

  /** avail.flags NO_INTERRUPT on or off (virtio 1.2 §2.7.7). */
  suppressInterrupts(on: boolean): void {
    this.memory.atomicStoreU16(this.driver + AvailRing.flags.offset, on ? 1 : 0);
  }
}

export const text = (s: string): Uint8Array => new TextEncoder().encode(s);
export const untext = (b: Uint8Array): string => new TextDecoder().decode(b);
