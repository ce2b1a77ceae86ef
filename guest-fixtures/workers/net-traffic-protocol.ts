import type { GuestMemoryDescriptor } from '../../src/memory/index.js';

/** Start message of the net-traffic guest vCPU (guest-fixtures/workers/net-traffic.ts). */
export interface NetTrafficStart {
  readonly memory: GuestMemoryDescriptor;
  /** The net device's signal block (its register mailbox and interrupt output). */
  readonly signals: SharedArrayBuffer;
  /** Rings and transmit buffers: a window the guest keeps mapped (IOVA → GPA). */
  readonly arena: { readonly iova: number; readonly gpa: number; readonly size: number };
  /** The receive buffer's IOVA (one page); the other vCPU maps and unmaps it. */
  readonly slotIova: number;
  /** Int32 words: NetTraffic. */
  readonly control: SharedArrayBuffer;
}

export const NetTraffic = {
  /** Set nonzero to stop after the current frame. */
  STOP: 0,
  /** 1 once the device is initialised and traffic flows. */
  READY: 1,
  /** Frames that landed in the slot (it was mapped). */
  DELIVERED: 2,
  /** Receive buffers the device returned unwritten (the slot was not mapped). */
  REFUSED: 3,
  WORDS: 4,
} as const;

