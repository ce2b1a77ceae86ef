/**
 * Start message of workers/nested-translate-worker.ts: a device worker that translates through a
 * nested attachment (guest stage 1 over stage 2) while the test thread edits the guest's table and
 * invalidates. Counters and control words are the data-plane stress layout
 * (translate-worker-protocol.ts: StressControl, StressCounter). Plain data only.
 */
import type { SharedTranslation } from '../ioasid/index.js';

/**
 * IOVA layout: the stable pages never change (IOVA page i → guest-physical page stableGpa/4096 + i);
 * the volatile pages are mapped in round r to guest-physical pages volatileGpa/4096 + r *
 * roundPages + i, so the frame a translation lands on tells which round's mapping it used.
 */
export interface NestedStressLayout {
  readonly stableIova: number;
  readonly stablePages: number;
  readonly stableGpa: number;
  readonly volatileIova: number;
  readonly volatilePages: number;
  readonly volatileGpa: number;
  readonly roundPages: number;
  /** Backend memory address of guest-physical 0 (stage 2 maps guest RAM there). */
  readonly hostBase: number;
}

export interface NestedStressStart {
  readonly index: number;
  readonly seed: number;
  readonly shared: SharedTranslation;
  readonly row: number;
  /** PASID the worker's DMAs carry; undefined: none (the RID). */
  readonly pasid: number | undefined;
  readonly quiescence: SharedArrayBuffer;
  readonly faults: SharedArrayBuffer;
  readonly wake: SharedArrayBuffer;
  readonly control: SharedArrayBuffer;
  readonly layout: NestedStressLayout;
}

export interface NestedStressResult {
  readonly translations: number;
  readonly epochChanges: number;
  readonly iotlbHits: number;
  readonly iotlbMisses: number;
  readonly rangeInvalidations: number;
  readonly flushes: number;
}
