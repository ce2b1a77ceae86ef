/**
 * What a guest's virtio core needs from a transport, the way a kernel's virtio_config_ops sits
 * between the generic virtio driver and virtio-mmio / virtio-pci. Implementations drive a device
 * only through the register-access interfaces of src/virtio/bus.ts, so they work against the
 * device-side transports in one thread or against a mailbox to a device worker.
 *
 * Guest code keeps its own copy of every wire constant (as a kernel has its own headers): tests
 * then cross-check the device's layout tables instead of trusting them.
 */
export interface DriverTransport {
  readonly kind: 'mmio' | 'pci';
  /** Virtio device ID. */
  readonly deviceType: number;

  /** Writes 0 to the status and waits (polls) until it reads back 0 (virtio 1.2 §2.4.2). */
  reset(): void;
  getStatus(): number;
  setStatus(status: number): void;

  /** All offered feature bits (every 32-bit word the transport exposes). */
  readDeviceFeatures(): bigint;
  writeDriverFeatures(features: bigint): void;

  /** Number of queues the device may have (PCI num_queues; MMIO probes QueueNumMax until 0). */
  numQueues(): number;
  /** Maximum size of queue `index`, 0 when it does not exist. */
  queueMaxSize(index: number): number;
  /** Programs size and ring addresses of queue `index` (not yet enabled). */
  setupQueue(index: number, layout: QueueLayout): void;
  enableQueue(index: number): void;
  queueEnabled(index: number): boolean;
  /** Resets one queue (needs VIRTIO_F_RING_RESET) and waits for completion. */
  resetQueue(index: number): void;
  /** Available-buffer notification for queue `index`. */
  notify(index: number): void;

  configGeneration(): number;
  /** Raw device-specific config access at its natural width. */
  configRead(offset: number, size: 1 | 2 | 4): number;
  configWrite(offset: number, size: 1 | 2 | 4, value: number): void;

  /** Reads the pending interrupt causes and acknowledges them (MMIO: status + ACK; PCI: ISR read). */
  takeInterrupts(): number;
}

export interface QueueLayout {
  readonly size: number;
  /** Guest-physical (or IOVA) addresses of the descriptor table, driver area and device area. */
  readonly desc: number;
  readonly driver: number;
  readonly device: number;
}

/** A device config read that stayed torn however often it was retried. */
export class ConfigRetryError extends Error {
  constructor(attempts: number) {
    super(`device config generation kept changing over ${attempts} read attempts`);
    this.name = 'ConfigRetryError';
  }
}

/**
 * Reads device config consistently (virtio 1.2 §2.5.1): reads the generation, runs `read`, reads
 * the generation again, and retries while the two differ.
 */
export function readConfigConsistent<T>(transport: DriverTransport, read: (t: DriverTransport) => T, maxAttempts = 64): T {
  for (let attempt = 0; attempt < maxAttempts; attempt++) {
    const before = transport.configGeneration();
    const value = read(transport);
    if (transport.configGeneration() === before) return value;
  }
  throw new ConfigRetryError(maxAttempts);
}

/** A 64-bit config field read as two 32-bit halves inside one generation (virtio 1.2 §4.1.3.1). */
export function readConfigU64(transport: DriverTransport, offset: number): bigint {
  return readConfigConsistent(transport, (t) => {
    const lo = BigInt(t.configRead(offset, 4));
    const hi = BigInt(t.configRead(offset + 4, 4));
    return (hi << 32n) | lo;
  });
}

/** `length` bytes of config starting at `offset`, read byte by byte inside one generation. */
export function readConfigBytes(transport: DriverTransport, offset: number, length: number): Uint8Array {
  return readConfigConsistent(transport, (t) => {
    const out = new Uint8Array(length);
    for (let i = 0; i < length; i++) out[i] = t.configRead(offset + i, 1);
    return out;
  });
}

/** 64-bit feature sets split into the 32-bit words the select registers expose. */
export function featureWord(features: bigint, word: number): number {
  return Number(BigInt.asUintN(32, features >> BigInt(32 * word)));
}
