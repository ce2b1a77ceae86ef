import type { GuestMemory, QueueMemory } from '../memory/index.js';
import { formatAddress } from '../memory/index.js';
import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import { DeviceStatus, FeatureBit, MAX_QUEUE_SIZE, featureMask, hasFeature } from './constants.js';
import type { DeviceEnvironment, InterruptLine, VirtioDeviceModel } from './device.js';
import { InterruptCause } from './device.js';
import { AvailRing, Descriptor, UsedRing } from './layout.js';
import { SplitQueue } from './split-queue.js';

/** Transport feature bits that constants.ts does not name yet (virtio 1.2 §6). */
export const TransportFeatureBit = {
  NOTIFY_ON_EMPTY: 24,
  ANY_LAYOUT: 27,
  NOTIF_CONFIG_DATA: 39,
  RING_RESET: 40,
  ADMIN_VQ: 41,
  SUSPEND: 43,
} as const;

/** Feature words (32 bits each) the select registers can reach; bits 128 and up are reserved (virtio 1.2 §2.2). */
export const FEATURE_WORDS = 4;

/**
 * Bits of the transport range (24..43, virtio 1.2 §2.2) this transport implements. A model offering
 * any other bit of that range (packed rings, admin queues, suspend, legacy-only bits) has it
 * withdrawn from the offer: offering what the transport cannot honour would break §2.2.2.
 */
const SUPPORTED_TRANSPORT_FEATURES =
  featureMask(FeatureBit.INDIRECT_DESC) |
  featureMask(FeatureBit.EVENT_IDX) |
  featureMask(FeatureBit.VERSION_1) |
  featureMask(FeatureBit.ACCESS_PLATFORM) |
  featureMask(FeatureBit.IN_ORDER) |
  featureMask(FeatureBit.ORDER_PLATFORM) |
  featureMask(FeatureBit.NOTIFICATION_DATA) |
  featureMask(TransportFeatureBit.NOTIF_CONFIG_DATA) |
  featureMask(TransportFeatureBit.RING_RESET);
const TRANSPORT_FEATURE_RANGE = ((1n << 44n) - 1n) & ~((1n << 24n) - 1n);
const ALL_FEATURE_BITS = (1n << BigInt(32 * FEATURE_WORDS)) - 1n;

/** Status bits a driver may write (virtio 1.2 §2.1); DEVICE_NEEDS_RESET belongs to the device. */
const DRIVER_STATUS_BITS =
  DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK | DeviceStatus.FAILED;

/** The initialization steps in the order virtio 1.2 §3.1.1 sets them, each with the step it needs. */
const STATUS_STEPS: readonly { bit: number; needs: number }[] = [
  { bit: DeviceStatus.ACKNOWLEDGE, needs: 0 },
  { bit: DeviceStatus.DRIVER, needs: DeviceStatus.ACKNOWLEDGE },
  { bit: DeviceStatus.FEATURES_OK, needs: DeviceStatus.DRIVER },
  { bit: DeviceStatus.DRIVER_OK, needs: DeviceStatus.FEATURES_OK },
];

/** The three areas of a virtqueue whose guest addresses the driver programs. */
export type QueueArea = 'desc' | 'driver' | 'device';

/** Driver-programmed configuration of one virtqueue. 64-bit addresses are kept as exact 32-bit halves. */
export type QueueState = {
  /** Entries the driver chose; starts at the device maximum (0 for a queue that does not exist). */
  size: number;
  ready: boolean;
  descLo: number;
  descHi: number;
  driverLo: number;
  driverHi: number;
  deviceLo: number;
  deviceHi: number;
};

/**
 * Everything driver-visible about the transport, as plain data (bigints included): what a saved
 * machine needs, together with each live queue's position (see snapshot()).
 */
export type TransportState = {
  status: number;
  deviceFeatureSelect: number;
  driverFeatureSelect: number;
  /** Bits the driver wrote (may include unoffered bits: checked when it sets FEATURES_OK). */
  driverFeatures: bigint;
  /** The driver set a bit in a feature word past FEATURE_WORDS: never offered, so FEATURES_OK fails. */
  driverFeaturesBeyondRange: boolean;
  /** Fixed when FEATURES_OK is accepted; 0 before. */
  negotiated: bigint;
  queueSelect: number;
  queues: QueueState[];
  /** Pending InterruptCause bits (MMIO InterruptStatus, PCI ISR). */
  interruptStatus: number;
  /** Free-running u32; PCI shows its low 8 bits. */
  configGeneration: number;
  /** A device-initiated change was counted in configGeneration and the driver has not read config since. */
  configChangeUnread: boolean;
};

export type TransportSnapshot = {
  readonly state: TransportState;
  /** Whether the model was activated (DRIVER_OK accepted) and not reset since. */
  readonly active: boolean;
  /** Position of each live queue, null for queues not live. */
  readonly queuePositions: readonly ({ nextAvail: number; nextUsed: number } | null)[];
};

export interface TransportStats {
  status: number;
  active: boolean;
  negotiated: string;
  /** Available-buffer notifications delivered to the model. */
  queueNotifications: number;
  /** Notifications ignored: bad index, queue not live, device not running. */
  droppedNotifications: number;
  /** Used-buffer signals from the model that the driver wanted. */
  usedNotifications: number;
  /** Used-buffer signals suppressed by the driver (flags or EVENT_IDX). */
  suppressedUsedNotifications: number;
  /** Interrupt edges: a cause bit went from clear to set. */
  interrupts: number;
  configChanges: number;
  resets: number;
  needsResets: number;
  lastNeedsResetReason: string | null;
}

export interface TransportOptions {
  /** The interrupt output; the transport calls set() whenever the pending causes change. */
  readonly irq: InterruptLine;
  readonly log?: Logger;
  /**
   * The address space queues live in once features are negotiated. Default: guest memory itself.
   * A VMM with an IOMMU returns a translating QueueMemory when ACCESS_PLATFORM is negotiated.
   */
  readonly queueMemory?: (negotiated: bigint) => QueueMemory;
}

/** The QueueState fields holding each half of each area's address. */
const ADDRESS_FIELDS = {
  desc: { lo: 'descLo', hi: 'descHi' },
  driver: { lo: 'driverLo', hi: 'driverHi' },
  device: { lo: 'deviceLo', hi: 'deviceHi' },
} as const;

function emptyQueue(size: number): QueueState {
  return { size, ready: false, descLo: 0, descHi: 0, driverLo: 0, driverHi: 0, deviceLo: 0, deviceHi: 0 };
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** A 64-bit guest address from halves; undefined when it cannot be a guest address (>= 2^53). */
function joinAddress(lo: number, hi: number): number | undefined {
  return hi >= 0x20_0000 ? undefined : hi * 0x1_0000_0000 + lo;
}

/**
 * The transport-independent half of a virtio device (virtio 1.2 §2, §3): status state machine,
 * feature negotiation, queue configuration, config generation, interrupt causes, activation of the
 * device model and delivery of queue notifications. virtio-mmio and virtio-pci wrap it with their
 * register layouts. Plain synchronous object: it knows nothing of threads.
 *
 * Nothing a guest writes and nothing a model throws escapes: bad input is logged and ignored (or
 * refused the way the spec says), and a throwing model sets DEVICE_NEEDS_RESET.
 */
export class VirtioTransportCore {
  readonly log: Logger;
  /** What the model gets as env.log. */
  private readonly deviceLog: Logger;
  /** The features offered to the driver: the model's, minus transport bits this code cannot honour. */
  readonly deviceFeatures: bigint;
  readonly numQueues: number;
  readonly configSize: number;

  private readonly irq: InterruptLine;
  private readonly queueMemoryFor: (negotiated: bigint) => QueueMemory;
  private readonly maxSizes: readonly number[];
  private state: TransportState;
  /** Bumped on every reset: environments handed out earlier go inert. */
  private epoch = 0;
  private env: DeviceEnvironment | undefined;
  /** The array the current environment exposes as `queues`; entries change on late enable / queue reset. */
  private live: (SplitQueue | undefined)[] = [];
  private liveMemory: QueueMemory | undefined;
  private counters = {
    queueNotifications: 0,
    droppedNotifications: 0,
    usedNotifications: 0,
    suppressedUsedNotifications: 0,
    interrupts: 0,
    configChanges: 0,
    resets: 0,
    needsResets: 0,
  };
  private lastNeedsResetReason: string | null = null;

  constructor(
    readonly device: VirtioDeviceModel,
    readonly memory: GuestMemory,
    options: TransportOptions,
  ) {
    const base = options.log ?? silentLogger;
    this.log = base.child({ component: 'virtio-transport', deviceType: device.deviceType });
    this.deviceLog = base.child({ component: 'virtio-device', deviceType: device.deviceType });
    this.irq = options.irq;
    this.queueMemoryFor = options.queueMemory ?? (() => memory);

    // Host configuration errors, not guest input: fail loudly at construction.
    const sizes = device.queueMaxSizes;
    if (sizes.length > 0x1_0000) throw new RangeError(`a virtio device has at most 65536 queues, got ${sizes.length}`);
    sizes.forEach((max, i) => {
      if (max !== 0 && (!isPowerOfTwo(max) || max > MAX_QUEUE_SIZE)) {
        throw new RangeError(`queue ${i} maximum size ${max} is not 0 or a power of two up to ${MAX_QUEUE_SIZE}`);
      }
    });
    if (!Number.isSafeInteger(device.configSize) || device.configSize < 0) {
      throw new RangeError(`device config size ${device.configSize} is not a non-negative integer`);
    }
    this.maxSizes = [...sizes];
    this.numQueues = sizes.length;
    this.configSize = device.configSize;

    const offered = BigInt.asUintN(128, device.offeredFeatures);
    const withdrawn = (offered & TRANSPORT_FEATURE_RANGE & ~SUPPORTED_TRANSPORT_FEATURES) | (device.offeredFeatures & ~ALL_FEATURE_BITS);
    if (withdrawn !== 0n) {
      this.log.warn({ withdrawn: formatAddress(withdrawn) }, 'model offers transport features this transport does not implement; not offered');
    }
    this.deviceFeatures = offered & ~(TRANSPORT_FEATURE_RANGE & ~SUPPORTED_TRANSPORT_FEATURES);
    if (!hasFeature(this.deviceFeatures, FeatureBit.VERSION_1)) {
      // virtio 1.2 §6.1: a non-transitional device offers VERSION_1; without it no driver can succeed here.
      this.log.warn('model does not offer VERSION_1: feature negotiation will always fail');
    }
    this.state = this.initialState();
  }

  private initialState(): TransportState {
    return {
      status: 0,
      deviceFeatureSelect: 0,
      driverFeatureSelect: 0,
      driverFeatures: 0n,
      driverFeaturesBeyondRange: false,
      negotiated: 0n,
      queueSelect: 0,
      queues: this.maxSizes.map((max) => emptyQueue(max)),
      interruptStatus: 0,
      configGeneration: this.state?.configGeneration ?? 0,
      configChangeUnread: false,
    };
  }

  // ---- status ------------------------------------------------------------------------------------

  get status(): number {
    return this.state.status;
  }

  /** Whether the model is running: DRIVER_OK accepted, activated, and neither FAILED nor NEEDS_RESET. */
  get running(): boolean {
    const s = this.state.status;
    return this.env !== undefined && (s & DeviceStatus.DRIVER_OK) !== 0 && (s & (DeviceStatus.FAILED | DeviceStatus.DEVICE_NEEDS_RESET)) === 0;
  }

  /** Negotiated features (0 before FEATURES_OK). */
  get negotiated(): bigint {
    return this.state.negotiated;
  }

  /** A driver write of the device status field. */
  writeStatus(value: number): void {
    const v = value & 0xff;
    if (v === 0) {
      // virtio 1.2 §2.4: writing 0 resets the device.
      this.resetDevice('driver');
      return;
    }
    const cur = this.state.status;
    const ignored = v & ~(DRIVER_STATUS_BITS | DeviceStatus.DEVICE_NEEDS_RESET);
    if (ignored !== 0) this.log.debug({ value: v, ignored }, 'status bits this device does not implement ignored');

    if (v & DeviceStatus.FAILED && !(cur & DeviceStatus.FAILED)) {
      this.log.warn({ status: cur }, 'driver set FAILED: it gave up on the device');
      this.state.status |= DeviceStatus.FAILED;
    }
    // virtio 1.2 §2.1.1: the driver MUST NOT clear a status bit; such a write changes nothing else.
    const cleared = cur & DRIVER_STATUS_BITS & ~v;
    if (cleared !== 0) {
      this.log.warn({ status: cur, value: v, cleared }, 'driver tried to clear device status bits; write ignored');
      return;
    }
    const wanted = v & ~this.state.status & ~DeviceStatus.FAILED & DRIVER_STATUS_BITS;
    if (wanted === 0) return;
    if (this.state.status & (DeviceStatus.FAILED | DeviceStatus.DEVICE_NEEDS_RESET)) {
      // After FAILED (§2.1.1) or DEVICE_NEEDS_RESET (§2.1.2) only a reset moves the device on.
      this.log.warn({ status: this.state.status, value: v }, 'status progress refused until the device is reset');
      return;
    }
    for (const { bit, needs } of STATUS_STEPS) {
      if ((wanted & bit) === 0) continue;
      if ((this.state.status & needs) !== needs) {
        // virtio 1.2 §3.1.1: the steps are taken in order; a skipped step stops the sequence here.
        this.log.warn({ status: this.state.status, value: v, bit, needs }, 'status bit set out of order; refused');
        return;
      }
      if (bit === DeviceStatus.FEATURES_OK && !this.acceptFeatures()) return;
      this.state.status |= bit;
      if (bit === DeviceStatus.DRIVER_OK) this.activate();
    }
  }

  /** virtio 1.2 §2.2.2 / §3.1.1: FEATURES_OK stays clear unless the driver's set is one the device accepts. */
  private acceptFeatures(): boolean {
    const wanted = this.state.driverFeatures;
    const unoffered = wanted & ~this.deviceFeatures;
    if (unoffered !== 0n || this.state.driverFeaturesBeyondRange) {
      this.log.warn(
        { driverFeatures: formatAddress(wanted), unoffered: formatAddress(unoffered), beyondRange: this.state.driverFeaturesBeyondRange },
        'driver accepted features the device did not offer; FEATURES_OK refused',
      );
      return false;
    }
    if (!hasFeature(wanted, FeatureBit.VERSION_1)) {
      // virtio 1.2 §6.1: a device MAY fail without VERSION_1; this one has no legacy interface.
      this.log.warn({ driverFeatures: formatAddress(wanted) }, 'driver did not accept VERSION_1; FEATURES_OK refused');
      return false;
    }
    let ok: boolean;
    try {
      ok = this.device.validateFeatures?.(wanted) ?? true;
    } catch (err) {
      this.failDevice(`validateFeatures threw: ${errorMessage(err)}`);
      return false;
    }
    if (ok !== true) {
      this.log.warn({ driverFeatures: formatAddress(wanted) }, 'device model refused the feature set; FEATURES_OK refused');
      return false;
    }
    this.state.negotiated = wanted;
    return true;
  }

  // ---- features ----------------------------------------------------------------------------------

  get deviceFeatureSelect(): number {
    return this.state.deviceFeatureSelect;
  }
  set deviceFeatureSelect(value: number) {
    this.state.deviceFeatureSelect = value >>> 0;
  }
  get driverFeatureSelect(): number {
    return this.state.driverFeatureSelect;
  }
  set driverFeatureSelect(value: number) {
    this.state.driverFeatureSelect = value >>> 0;
  }

  /** 32 feature bits starting at bit 32 * deviceFeatureSelect; 0 past the offered range. */
  readDeviceFeatures(): number {
    return this.featureWord(this.deviceFeatures, this.state.deviceFeatureSelect);
  }

  /** What the driver wrote to the selected word (mirrored, as §4.1.4.3.1 allows). */
  readDriverFeatures(): number {
    return this.featureWord(this.state.driverFeatures, this.state.driverFeatureSelect);
  }

  private featureWord(features: bigint, select: number): number {
    if (select >= FEATURE_WORDS) return 0;
    return Number(BigInt.asUintN(32, features >> BigInt(32 * select)));
  }

  writeDriverFeatures(value: number): void {
    const word = value >>> 0;
    const select = this.state.driverFeatureSelect;
    if (this.state.status & DeviceStatus.FEATURES_OK) {
      // virtio 1.2 §3.1.1: negotiation ended at FEATURES_OK; only a reset renegotiates.
      this.log.warn({ select, value: word }, 'driver features written after FEATURES_OK; ignored');
      return;
    }
    if (select >= FEATURE_WORDS) {
      if (word !== 0) {
        this.log.warn({ select, value: word }, 'driver accepted feature bits beyond any the device offers');
        this.state.driverFeaturesBeyondRange = true;
      }
      return;
    }
    const shift = BigInt(32 * select);
    this.state.driverFeatures = (this.state.driverFeatures & ~(0xffff_ffffn << shift)) | (BigInt(word) << shift);
  }

  // ---- queues ------------------------------------------------------------------------------------

  get queueSelect(): number {
    return this.state.queueSelect;
  }
  set queueSelect(value: number) {
    this.state.queueSelect = value >>> 0;
  }

  /** Maximum size of queue `index`; 0 when the queue does not exist. */
  queueMaxSize(index: number): number {
    return this.maxSizes[index] ?? 0;
  }

  /** The queue's driver-programmed state, or undefined when the device has no such queue. */
  queue(index: number): Readonly<QueueState> | undefined {
    return this.existingQueue(index);
  }

  private existingQueue(index: number): QueueState | undefined {
    if (!Number.isInteger(index) || index < 0 || (this.maxSizes[index] ?? 0) === 0) return undefined;
    return this.state.queues[index];
  }

  /** The queue a configuration write may change, or undefined (logged) when it may not. */
  private writableQueue(index: number, what: string): QueueState | undefined {
    const q = this.existingQueue(index);
    if (q === undefined) {
      this.log.debug({ queue: index, what }, 'queue configuration write for a queue that does not exist; ignored');
      return undefined;
    }
    if (q.ready) {
      // virtio 1.2 §4.2.2.2 (and §4.1.4.3.2 for PCI): queue fields are configured before enabling.
      this.log.warn({ queue: index, what }, 'queue configuration write while the queue is enabled; ignored');
      return undefined;
    }
    return q;
  }

  setQueueSize(index: number, value: number): void {
    const q = this.writableQueue(index, 'size');
    if (q === undefined) return;
    const size = value >>> 0;
    const max = this.queueMaxSize(index);
    // virtio 1.2 §2.7 / §4.1.4.3.2: split queue sizes are powers of two no larger than the maximum.
    if (!isPowerOfTwo(size) || size > max) {
      this.log.warn({ queue: index, size, max }, 'queue size is not a power of two within the maximum; ignored');
      return;
    }
    q.size = size;
  }

  /** One 32-bit half of a queue area address. */
  setQueueAddress(index: number, area: QueueArea, half: 'lo' | 'hi', value: number): void {
    const q = this.writableQueue(index, `${area} address`);
    if (q === undefined) return;
    q[ADDRESS_FIELDS[area][half]] = value >>> 0;
  }

  readQueueAddress(index: number, area: QueueArea, half: 'lo' | 'hi'): number {
    const q = this.existingQueue(index);
    return q === undefined ? 0 : q[ADDRESS_FIELDS[area][half]];
  }

  queueReady(index: number): boolean {
    return this.existingQueue(index)?.ready ?? false;
  }

  /**
   * The driver enables a queue. Refused (ready stays 0, logged) when the device is not past
   * FEATURES_OK or the rings cannot be valid. Enabling after DRIVER_OK (after a queue reset) makes
   * the queue live at once.
   */
  enableQueue(index: number): void {
    const q = this.existingQueue(index);
    if (q === undefined) {
      this.log.warn({ queue: index }, 'driver enabled a queue that does not exist; ignored');
      return;
    }
    if (q.ready) return;
    const status = this.state.status;
    if ((status & DeviceStatus.FEATURES_OK) === 0) {
      // virtio 1.2 §3.1.1: queues are set up after FEATURES_OK, when the ring format is known.
      this.log.warn({ queue: index, status }, 'queue enabled before FEATURES_OK; refused');
      return;
    }
    if (status & (DeviceStatus.FAILED | DeviceStatus.DEVICE_NEEDS_RESET)) {
      this.log.warn({ queue: index, status }, 'queue enabled on a failed device; refused');
      return;
    }
    const problem = this.placementProblem(q);
    if (problem !== undefined) {
      this.log.warn({ queue: index, problem }, 'queue enable refused: rings misplaced');
      return;
    }
    q.ready = true;
    if (this.env !== undefined && (status & DeviceStatus.DRIVER_OK) !== 0) this.makeLive(index, q);
  }

  /** virtio-mmio only: writing 0 to QueueReady stops the queue (virtio 1.2 §4.2.2.2). */
  disableQueue(index: number): void {
    const q = this.existingQueue(index);
    if (q === undefined || !q.ready) return;
    q.ready = false;
    if (this.live[index] !== undefined) this.live[index] = undefined;
  }

  /**
   * virtio 1.2 §2.6.1: with VIRTIO_F_RING_RESET the driver resets one queue; it completes at once,
   * so the reset field always reads back 0.
   */
  resetQueue(index: number): void {
    if (!hasFeature(this.state.negotiated, TransportFeatureBit.RING_RESET)) {
      this.log.warn({ queue: index }, 'queue reset without VIRTIO_F_RING_RESET negotiated; ignored');
      return;
    }
    const q = this.existingQueue(index);
    if (q === undefined) {
      this.log.debug({ queue: index }, 'queue reset of a queue that does not exist; ignored');
      return;
    }
    Object.assign(q, emptyQueue(this.queueMaxSize(index)));
    // §2.6.1.1.1: no more requests from, or notifications for, a queue once it is reset.
    if (this.live[index] !== undefined) this.live[index] = undefined;
  }

  /** Why the rings of `q` cannot be used, checked against guest RAM unless addresses are IOVAs. */
  private placementProblem(q: QueueState): string | undefined {
    const desc = joinAddress(q.descLo, q.descHi);
    const driver = joinAddress(q.driverLo, q.driverHi);
    const device = joinAddress(q.deviceLo, q.deviceHi);
    if (desc === undefined || driver === undefined || device === undefined) return 'ring address beyond 2^53';
    // virtio 1.2 §2.7: descriptor table 16-byte, driver area 2-byte, device area 4-byte aligned.
    if (desc % Descriptor.ALIGN !== 0) return `descriptor area ${formatAddress(desc)} not ${Descriptor.ALIGN}-byte aligned`;
    if (driver % AvailRing.ALIGN !== 0) return `driver area ${formatAddress(driver)} not ${AvailRing.ALIGN}-byte aligned`;
    if (device % UsedRing.ALIGN !== 0) return `device area ${formatAddress(device)} not ${UsedRing.ALIGN}-byte aligned`;
    if (!hasFeature(this.state.negotiated, FeatureBit.ACCESS_PLATFORM)) {
      // Without ACCESS_PLATFORM the addresses are guest-physical: every ring byte must be RAM.
      if (!this.memory.contains(desc, Descriptor.SIZE * q.size)) return `descriptor area ${formatAddress(desc)} outside guest memory`;
      if (!this.memory.contains(driver, AvailRing.sizeFor(q.size))) return `driver area ${formatAddress(driver)} outside guest memory`;
      if (!this.memory.contains(device, UsedRing.sizeFor(q.size))) return `device area ${formatAddress(device)} outside guest memory`;
    }
    return undefined;
  }

  private makeLive(index: number, q: QueueState): void {
    const negotiated = this.state.negotiated;
    let queue: SplitQueue;
    try {
      this.liveMemory ??= this.queueMemoryFor(negotiated);
      queue = new SplitQueue(
        this.liveMemory,
        {
          size: q.size,
          descAddr: joinAddress(q.descLo, q.descHi)!,
          driverAddr: joinAddress(q.driverLo, q.driverHi)!,
          deviceAddr: joinAddress(q.deviceLo, q.deviceHi)!,
          eventIdx: hasFeature(negotiated, FeatureBit.EVENT_IDX),
          indirect: hasFeature(negotiated, FeatureBit.INDIRECT_DESC),
        },
        this.log.child({ queue: index }),
      );
    } catch (err) {
      this.failDevice(`building queue ${index} failed: ${errorMessage(err)}`);
      return;
    }
    this.live[index] = queue;
    const broken = queue.broken;
    if (broken !== null) this.failDevice(`queue ${index} unusable: ${broken.reason}`);
  }

  // ---- activation and notifications --------------------------------------------------------------

  /**
   * Resumes from a snapshot of a transport of the same shape (taken with snapshot(), possibly in
   * another worker): the driver-visible state, the queues continuing from their saved positions,
   * and the model activated again if it was running. For a fresh or reset transport; the device
   * model's own state is the model's to restore. A snapshot that does not fit is refused whole
   * (RangeError) and nothing changes.
   */
  restore(snapshot: TransportSnapshot): void {
    const st = snapshot.state;
    if (st.queues.length !== this.numQueues || snapshot.queuePositions.length !== this.numQueues) {
      throw new RangeError(`snapshot has ${st.queues.length} queues, this device ${this.numQueues}`);
    }
    st.queues.forEach((q, i) => {
      if (!Number.isInteger(q.size) || q.size < 0 || q.size > this.maxSizes[i]!) throw new RangeError(`queue ${i}: size ${q.size} beyond the maximum ${this.maxSizes[i]}`);
      const pos = snapshot.queuePositions[i];
      if (pos !== null && pos !== undefined && !(Number.isInteger(pos.nextAvail) && Number.isInteger(pos.nextUsed) && pos.nextAvail >= 0 && pos.nextAvail <= 0xffff && pos.nextUsed >= 0 && pos.nextUsed <= 0xffff)) {
        throw new RangeError(`queue ${i}: position is not a pair of u16 indices`);
      }
    });
    this.epoch++;
    this.env = undefined;
    this.live = [];
    this.liveMemory = undefined;
    this.state = { ...st, queues: st.queues.map((q) => ({ ...q })) };
    if (snapshot.active) this.activate(snapshot.queuePositions);
    // The line as the guest last saw it.
    this.setInterrupts(this.state.interruptStatus);
  }

  /**
   * DRIVER_OK accepted: build the enabled queues and hand the model its environment. With
   * `positions` (a restore), each queue first continues from its saved position.
   */
  private activate(positions?: readonly ({ nextAvail: number; nextUsed: number } | null)[]): void {
    const epoch = this.epoch;
    this.live = new Array<SplitQueue | undefined>(this.numQueues).fill(undefined);
    this.liveMemory = undefined;
    const env: DeviceEnvironment = {
      memory: this.memory,
      features: this.state.negotiated,
      queues: this.live,
      notifyUsed: (queueIndex: number) => {
        if (epoch === this.epoch) this.signalUsed(queueIndex);
      },
      notifyConfigChange: () => {
        if (epoch === this.epoch) this.configChanged();
      },
      needsReset: (reason: string) => {
        if (epoch === this.epoch) this.failDevice(String(reason));
      },
      log: this.deviceLog,
    };
    this.state.queues.forEach((q, i) => {
      if (q.ready) this.makeLive(i, q);
      const pos = positions?.[i];
      if (pos !== null && pos !== undefined) this.live[i]?.restore(pos);
    });
    // A queue that cannot run already failed the device: the model is not started on it.
    if (this.state.status & DeviceStatus.DEVICE_NEEDS_RESET) return;
    this.env = env;
    try {
      this.device.activate(env);
    } catch (err) {
      if (epoch === this.epoch) this.failDevice(`activate threw: ${errorMessage(err)}`);
    }
  }

  /**
   * An available-buffer notification for queue `index`, from a register write or a doorbell.
   * Delivered to the model only while it runs and the queue is live.
   */
  notifyQueue(index: number): void {
    if (!this.running) {
      this.counters.droppedNotifications++;
      this.log.debug({ queue: index, status: this.state.status }, 'queue notification while the device is not running; ignored');
      return;
    }
    if (!Number.isInteger(index) || index < 0 || index >= this.numQueues || this.live[index] === undefined) {
      this.counters.droppedNotifications++;
      this.log.debug({ queue: index }, 'notification for a queue that is not enabled; ignored');
      return;
    }
    this.counters.queueNotifications++;
    try {
      this.device.notify(index);
    } catch (err) {
      this.failDevice(`notify(${index}) threw: ${errorMessage(err)}`);
    }
  }

  /** The model published used buffers on `index`: interrupt if the driver's suppression rules allow. */
  private signalUsed(index: number): void {
    if (!this.running) return;
    const queue = Number.isInteger(index) ? this.live[index] : undefined;
    if (queue === undefined) {
      this.log.debug({ queue: index }, 'used notification for a queue that is not live; ignored');
      return;
    }
    let wanted: boolean;
    try {
      wanted = queue.needsNotification();
    } catch (err) {
      this.failDevice(`needsNotification(${index}) threw: ${errorMessage(err)}`);
      return;
    }
    if (!wanted) {
      this.counters.suppressedUsedNotifications++;
      return;
    }
    this.counters.usedNotifications++;
    this.raise(InterruptCause.USED_BUFFER);
  }

  /**
   * The device-specific configuration changed (model or host initiated). The generation moves at
   * most once between two driver reads of config: that keeps every torn read visible while an
   * 8-bit generation can never wrap back to a value the driver holds (virtio 1.2 §4.1.4.3.1 note).
   */
  configChanged(): void {
    this.counters.configChanges++;
    if (!this.state.configChangeUnread) {
      this.state.configGeneration = (this.state.configGeneration + 1) >>> 0;
      this.state.configChangeUnread = true;
    }
    const s = this.state.status;
    if ((s & DeviceStatus.DRIVER_OK) !== 0 && (s & DeviceStatus.FAILED) === 0) this.raise(InterruptCause.CONFIG_CHANGE);
  }

  /** virtio 1.2 §2.1.2: DEVICE_NEEDS_RESET, then a config change notification if DRIVER_OK is set. */
  failDevice(reason: string): void {
    if (this.state.status & DeviceStatus.DEVICE_NEEDS_RESET) {
      this.log.debug({ reason }, 'device already needs reset');
      return;
    }
    this.counters.needsResets++;
    this.lastNeedsResetReason = reason;
    this.log.error({ reason, status: this.state.status }, 'device needs reset');
    this.state.status |= DeviceStatus.DEVICE_NEEDS_RESET;
    if (this.state.status & DeviceStatus.DRIVER_OK) this.raise(InterruptCause.CONFIG_CHANGE);
  }

  // ---- interrupts --------------------------------------------------------------------------------

  get interruptStatus(): number {
    return this.state.interruptStatus;
  }

  private raise(cause: number): void {
    const before = this.state.interruptStatus;
    const after = before | cause;
    if (after === before) return;
    this.counters.interrupts++;
    this.setInterrupts(after);
  }

  /** virtio-mmio InterruptACK: clears the acknowledged causes. */
  ackInterrupt(bits: number): void {
    const after = this.state.interruptStatus & ~bits;
    if (after !== this.state.interruptStatus) this.setInterrupts(after);
  }

  /** virtio-pci ISR read: returns the causes and clears them (virtio 1.2 §4.1.4.5). */
  takeInterruptStatus(): number {
    const status = this.state.interruptStatus;
    if (status !== 0) this.setInterrupts(0);
    return status;
  }

  private setInterrupts(status: number): void {
    this.state.interruptStatus = status;
    try {
      this.irq.set(status);
    } catch (err) {
      this.log.error({ err, status }, 'interrupt line threw; interrupt state kept');
    }
  }

  // ---- device-specific configuration --------------------------------------------------------------

  get configGeneration(): number {
    return this.state.configGeneration;
  }

  /** Whether a config access of `size` bytes at `offset` is one the model may see. */
  private configAccessOk(offset: number, size: number, what: string): boolean {
    // virtio 1.2 §4.1.3.1 / §4.2.2.2: fields are accessed at their natural width and alignment.
    if (!Number.isSafeInteger(offset) || offset < 0 || offset % size !== 0 || offset + size > this.configSize) {
      this.log.debug({ offset, size, configSize: this.configSize, what }, 'device config access out of range or misaligned');
      return false;
    }
    return true;
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    if (!this.configAccessOk(offset, size, 'read')) return 0;
    this.state.configChangeUnread = false;
    try {
      const value = Number(this.device.readConfig(offset, size));
      return size === 4 ? value >>> 0 : value & ((1 << (8 * size)) - 1);
    } catch (err) {
      this.failDevice(`readConfig(${offset}, ${size}) threw: ${errorMessage(err)}`);
      return 0;
    }
  }

  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    if (!this.configAccessOk(offset, size, 'write')) return;
    try {
      this.device.writeConfig(offset, size, size === 4 ? value >>> 0 : value & ((1 << (8 * size)) - 1));
    } catch (err) {
      this.failDevice(`writeConfig(${offset}, ${size}) threw: ${errorMessage(err)}`);
    }
  }

  // ---- reset, stats, snapshot --------------------------------------------------------------------

  /** Host-initiated reset (a machine reset): the same as the driver writing 0 to the status. */
  reset(): void {
    this.resetDevice('host');
  }

  private resetDevice(by: 'driver' | 'host'): void {
    this.epoch++;
    this.counters.resets++;
    const hadInterrupts = this.state.interruptStatus !== 0;
    this.env = undefined;
    this.live = [];
    this.liveMemory = undefined;
    this.state = this.initialState();
    this.log.debug({ by }, 'device reset');
    try {
      this.device.reset();
    } catch (err) {
      // Nothing to escalate to: the device is already at its reset state as far as the driver sees.
      this.log.error({ err: errorMessage(err) }, 'device model threw from reset');
    }
    // virtio 1.2 §4.2.2.1: reset clears InterruptStatus (and so the line).
    if (hadInterrupts) this.setInterrupts(0);
  }

  stats(): TransportStats {
    return {
      status: this.state.status,
      active: this.env !== undefined,
      negotiated: formatAddress(this.state.negotiated),
      ...this.counters,
      lastNeedsResetReason: this.lastNeedsResetReason,
    };
  }

  /** A deep copy of the driver-visible state and each live queue's position. */
  snapshot(): TransportSnapshot {
    return {
      state: { ...this.state, queues: this.state.queues.map((q) => ({ ...q })) },
      active: this.env !== undefined,
      queuePositions: this.state.queues.map((_, i) => {
        const q = this.live[i];
        if (q === undefined) return null;
        const { nextAvail, nextUsed } = q.state();
        return { nextAvail, nextUsed };
      }),
    };
  }
}
