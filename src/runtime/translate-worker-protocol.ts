/**
 * Start message and shared-word layouts of workers/translate-worker.ts, the data-plane test and
 * bench worker. Plain data only: tests and benches import this, never the worker entry itself.
 */
/** Shared words of the stress test, before the per-worker counters. */
export const StressControl = {
  /** Nonzero: workers finish their DMA and exit. */
  STOP: 0,
  /** The latest round whose unmap has completed (waitQuiescent returned) before this was stored. */
  DONE_ROUND: 1,
  /** Workers that have registered and are translating. */
  READY: 2,
  FIELD_COUNT: 3,
  /** Index of worker 0's counters. */
  WORKERS_BASE: 8,
} as const;

/** Per-worker counters in the stress control block (only that worker writes them). */
export const StressCounter = {
  /** DMAs done. */
  ITERATIONS: 0,
  /** Translations of the volatile range that used a mapping whose unmap had completed before the DMA began. */
  VIOLATIONS: 1,
  /** Translations of the stable range that failed or came back wrong. */
  STABLE_FAILURES: 2,
  /** Successful translations of the volatile range. */
  VOLATILE_OK: 3,
  /** Faults (all from the volatile range when the test is right). */
  FAULTS: 4,
  /** Volatile translations that landed on the wrong guest page (a torn or misread table). */
  WRONG_PAGE: 5,
  FIELD_COUNT: 6,
  STRIDE: 8,
} as const;

export function stressControlWords(workers: number): number {
  return StressControl.WORKERS_BASE + workers * StressCounter.STRIDE;
}

/**
 * Stress layout: the stable range is mapped once (IOVA page sPfn + i → guest sGuest + i); the
 * volatile range is remapped every round r to guest vGuest + r * 512 + i, so a guest frame tells
 * which round's mapping a translation used.
 */
export interface StressLayout {
  readonly header: number;
  readonly stablePfn: number;
  readonly stablePages: number;
  readonly stableGuest: number;
  readonly volatilePfn: number;
  readonly volatilePages: number;
  readonly volatileGuest: number;
}

export const VOLATILE_ROUND_PAGES = 512;

export type TranslateWorkerStart =
  | {
      readonly mode: 'stress';
      readonly index: number;
      readonly seed: number;
      readonly pool: SharedArrayBuffer;
      readonly quiescence: SharedArrayBuffer;
      readonly faults: SharedArrayBuffer;
      readonly wake: SharedArrayBuffer;
      readonly control: SharedArrayBuffer;
      readonly layout: StressLayout;
      /** 'naive': a per-worker cache with no invalidation at all (a broken device, for controls). */
      readonly cache: 'translator' | 'naive';
    }
  | { readonly mode: 'hold'; readonly quiescence: SharedArrayBuffer; readonly control: SharedArrayBuffer; readonly tag: number }
  | {
      readonly mode: 'faults';
      readonly index: number;
      readonly count: number;
      readonly faults: SharedArrayBuffer;
      readonly wake: SharedArrayBuffer;
      readonly go: SharedArrayBuffer;
    };

/** Command block of the 'hold' mode: a tiny synchronous RPC over shared words. */
export const HoldControl = {
  /** HoldCommand to run; posted by bumping SEQ. */
  COMMAND: 0,
  SEQ: 1,
  /** SEQ of the last command done. */
  DONE: 2,
  /** Its result (beginDma's EpochChange; -1 for a QuiescenceError). */
  RESULT: 3,
  /** The worker's quiescence slot. */
  SLOT: 4,
  FIELD_COUNT: 5,
} as const;

export const HoldCommand = {
  BEGIN: 1,
  END: 2,
  /** Begin a DMA, then end it only once the owner is waiting (QuiescenceGlobal.WAITING set). */
  BEGIN_END_WHEN_WAITED: 3,
  UNREGISTER: 4,
  EXIT: 5,
} as const;

export interface StressResult {
  readonly translations: number;
  readonly epochChanges: number;
  readonly iotlbHits: number;
  readonly iotlbMisses: number;
}
