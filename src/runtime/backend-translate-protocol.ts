import type { SharedTranslation } from '../ioasid/index.js';

/**
 * The one start message of a backend-fixture consumer worker: a software stand-in for a device's
 * DMA engine that translates through a context's shared page tables, as device workers do, with
 * every translation bracketed in the context's quiescence block (strict unmap).
 */
export interface BackendTranslateStart {
  readonly shared: SharedTranslation;
  readonly quiescence: SharedArrayBuffer;
}

/** One DMA translation: the device's device-table row, an optional PASID, the IOVA range. */
export interface BackendTranslateRequest {
  readonly row: number;
  /** Absent: a DMA without a PASID (the RID's translation). */
  readonly pasid?: number;
  readonly iova: bigint;
  readonly length: number;
  readonly access: 'read' | 'write';
}

export interface GuestSpan {
  readonly gpa: number;
  readonly length: number;
}

/** Where the DMA lands, or the first page that did not translate and why. */
export type BackendTranslateResult =
  | { readonly outcome: 'ok'; readonly spans: readonly GuestSpan[] }
  | { readonly outcome: 'fault'; readonly reason: 'DOMAIN' | 'MAPPING' | 'PERMISSION'; readonly iova: bigint };

/** Control plane of the worker (comlink). */
export interface BackendTranslateApi {
  translate(request: BackendTranslateRequest): BackendTranslateResult;
  /** Leaves the quiescence block; the worker may then be terminated. */
  stop(): void;
}
