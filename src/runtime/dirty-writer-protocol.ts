import type { SharedTranslation } from '../ioasid/context.js';

/**
 * Start message of workers/dirty-writer-worker.ts: a device worker that keeps writing to random
 * pages of a mapped range through its Translator until told to stop (tests of dirty tracking).
 */
export interface DirtyWriterStart {
  readonly shared: SharedTranslation;
  readonly quiescence: SharedArrayBuffer;
  /** The device-table row the worker's DMA goes through. */
  readonly row: number;
  /** First IOVA page of the range and its page count. */
  readonly iovaPfn: number;
  readonly pages: number;
  /** The worker writes only pages with `page % stride === phase` (others stay clean). */
  readonly stride: number;
  readonly phase: number;
  readonly seed: number;
  /** Int32 words: DirtyWriterControl. */
  readonly control: SharedArrayBuffer;
  /** Bytes written per DMA, at a random offset inside the page. */
  readonly bytes: number;
}

export const DirtyWriterControl = {
  STOP: 0,
  /** Per worker, at WRITES_BASE + index: DMAs done. */
  WRITES_BASE: 8,
  WORDS: 64,
} as const;

export interface DirtyWriterResult {
  readonly writes: number;
  readonly faults: number;
  readonly dirtyMarks: number;
}
