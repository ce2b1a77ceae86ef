import type { DriverTransport, QueueLayout } from './transport.js';

/** Device status bits (virtio 1.2 §2.1), the guest's own copy. */
export const STATUS = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 64,
  FAILED: 128,
} as const;

/** VIRTIO_F_VERSION_1 (virtio 1.2 §6). */
export const F_VERSION_1 = 1n << 32n;

/** Device initialization failed; the driver has set FAILED (virtio 1.2 §3.1.1). */
export class VirtioInitError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
    this.name = 'VirtioInitError';
  }
}

export interface InitializeOptions {
  /** Features the driver understands; it accepts those the device also offers. */
  readonly wantedFeatures: bigint;
  /**
   * Write `wantedFeatures` as they are, offered or not: a misbehaving driver, for testing how the
   * device refuses FEATURES_OK.
   */
  readonly exact?: boolean;
}

export interface InitializeResult {
  /** Features the device accepted with FEATURES_OK. */
  readonly negotiated: bigint;
  /** What the device offered. */
  readonly offered: bigint;
}

/**
 * virtio 1.2 §3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, read the offered features, write the
 * accepted subset, set FEATURES_OK and read it back. Throws VirtioInitError (after setting FAILED)
 * when the device leaves FEATURES_OK clear. The caller then sets up its queues (setupQueue) and
 * calls driverOk().
 */
export function initializeDevice(transport: DriverTransport, options: InitializeOptions): InitializeResult {
  transport.reset();
  let status = STATUS.ACKNOWLEDGE;
  transport.setStatus(status);
  status |= STATUS.DRIVER;
  transport.setStatus(status);

  const offered = transport.readDeviceFeatures();
  const accepted = options.exact === true ? options.wantedFeatures : offered & options.wantedFeatures;
  transport.writeDriverFeatures(accepted);
  status |= STATUS.FEATURES_OK;
  transport.setStatus(status);

  const readBack = transport.getStatus();
  if ((readBack & STATUS.FEATURES_OK) === 0) {
    transport.setStatus(readBack | STATUS.FAILED);
    throw new VirtioInitError(
      `device refused features 0x${accepted.toString(16)} (offered 0x${offered.toString(16)}): FEATURES_OK not set`,
      readBack,
    );
  }
  return { negotiated: accepted, offered };
}

/**
 * Sets up and enables one queue (virtio 1.2 §4.1.5.1.3 / §4.2.3.2): checks the size against the
 * device maximum, programs the rings and enables it.
 */
export function setupQueue(transport: DriverTransport, index: number, layout: QueueLayout): void {
  const max = transport.queueMaxSize(index);
  if (max === 0) throw new Error(`queue ${index} does not exist`);
  if (layout.size > max) throw new Error(`queue ${index}: size ${layout.size} exceeds the device maximum ${max}`);
  transport.setupQueue(index, layout);
  transport.enableQueue(index);
}

/** virtio 1.2 §3.1.1 step 8: the device is live. Throws if the device needs a reset. */
export function driverOk(transport: DriverTransport): void {
  const status = transport.getStatus();
  transport.setStatus(status | STATUS.DRIVER_OK);
  const after = transport.getStatus();
  if ((after & STATUS.DEVICE_NEEDS_RESET) !== 0 || (after & STATUS.DRIVER_OK) === 0) {
    throw new VirtioInitError(`device did not go live: status 0x${after.toString(16)}`, after);
  }
}

/** Bytes of guest memory a split queue of `size` entries needs, and where each part goes. */
export function splitQueueLayout(base: number, size: number): QueueLayout & { readonly bytes: number } {
  // virtio 1.2 §2.7: descriptor table 16-byte, driver area 2-byte, device area 4-byte aligned.
  const desc = base;
  const driver = desc + 16 * size;
  const device = Math.ceil((driver + 6 + 2 * size) / 4) * 4;
  const end = device + 6 + 8 * size;
  return { size, desc, driver, device, bytes: end - base };
}
