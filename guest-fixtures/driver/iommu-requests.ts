import {
  AttachReq,
  AttachTableFlag,
  AttachTableFormat,
  AttachTableReq,
  DetachFlag,
  DetachPasidReq,
  DetachReq,
  InvalidateCache,
  InvalidateFlag,
  InvalidateReq,
  InvalidateScope,
  ProbeHwIntelVtd,
  ProbePropertyType,
  FaultRecord,
  MapReq,
  ProbeProperty,
  ProbeReq,
  ProbeResvMem,
  ReqHead,
  ReqTail,
  RequestType,
  UnmapReq,
} from '../../src/iommu/layout.js';
import { readField, readField64, writeField } from '../../src/iommu/wire.js';

/**
 * Guest-side encoding of virtio-iommu requests, as a guest kernel's driver builds them: the
 * device-readable part (head and fields) and the size of the device-writable part (tail, plus the
 * properties for PROBE).
 */
export interface EncodedRequest {
  readonly readable: Uint8Array;
  readonly writable: number;
}

function request(layout: { SIZE: number }, type: number, fill: (view: DataView) => void): EncodedRequest {
  const bytes = new Uint8Array(layout.SIZE);
  const view = new DataView(bytes.buffer);
  writeField(view, ReqHead.type, type);
  fill(view);
  return { readable: bytes, writable: ReqTail.SIZE };
}

export function encodeAttach(domain: number, endpoint: number, flags = 0): EncodedRequest {
  return request(AttachReq, RequestType.ATTACH, (v) => {
    writeField(v, AttachReq.domain, domain);
    writeField(v, AttachReq.endpoint, endpoint);
    writeField(v, AttachReq.flags, flags);
  });
}

export function encodeDetach(domain: number, endpoint: number): EncodedRequest {
  return request(DetachReq, RequestType.DETACH, (v) => {
    writeField(v, DetachReq.domain, domain);
    writeField(v, DetachReq.endpoint, endpoint);
  });
}

export function encodeMap(domain: number, virtStart: bigint, virtEnd: bigint, physStart: bigint, flags: number): EncodedRequest {
  return request(MapReq, RequestType.MAP, (v) => {
    writeField(v, MapReq.domain, domain);
    writeField(v, MapReq.virtStart, virtStart);
    writeField(v, MapReq.virtEnd, virtEnd);
    writeField(v, MapReq.physStart, physStart);
    writeField(v, MapReq.flags, flags);
  });
}

export function encodeUnmap(domain: number, virtStart: bigint, virtEnd: bigint): EncodedRequest {
  return request(UnmapReq, RequestType.UNMAP, (v) => {
    writeField(v, UnmapReq.domain, domain);
    writeField(v, UnmapReq.virtStart, virtStart);
    writeField(v, UnmapReq.virtEnd, virtEnd);
  });
}

/** DETACH of one PASID (ATTACH_TABLE extension): the PASID travels in DETACH's reserved words. */
export function encodeDetachPasid(domain: number, endpoint: number, pasid: number): EncodedRequest {
  return request(DetachReq, RequestType.DETACH, (v) => {
    writeField(v, DetachReq.domain, domain);
    writeField(v, DetachReq.endpoint, endpoint);
    writeField(v, DetachPasidReq.flags, DetachFlag.PASID);
    writeField(v, DetachPasidReq.pasid, pasid);
  });
}

export interface TableBinding {
  /** GPA of the guest's x86-64 root table. */
  readonly root: bigint;
  readonly addrWidth: 48 | 57;
  /** The PASID the table serves; none: the endpoint's RID traffic. */
  readonly pasid?: number;
  /** Table format (default INTEL_PT). */
  readonly format?: number;
}

/** ATTACH_TABLE (extension): binds a guest-owned stage-1 table to an endpoint or one of its PASIDs. */
export function encodeAttachTable(domain: number, endpoint: number, table: TableBinding): EncodedRequest {
  return request(AttachTableReq, RequestType.ATTACH_TABLE, (v) => {
    writeField(v, AttachTableReq.domain, domain);
    writeField(v, AttachTableReq.endpoint, endpoint);
    writeField(v, AttachTableReq.format, table.format ?? AttachTableFormat.INTEL_PT);
    writeField(v, AttachTableReq.flags, table.pasid !== undefined ? AttachTableFlag.PASID : 0);
    writeField(v, AttachTableReq.pasid, table.pasid ?? 0);
    writeField(v, AttachTableReq.pgtbl, table.root);
    writeField(v, AttachTableReq.addrWidth, table.addrWidth);
  });
}

export interface InvalidateArgs {
  readonly scope: 'domain' | 'pasid' | 'address';
  readonly pasid?: number;
  /** For scope 'address': the first IOVA and how many pages of 2^pageShift bytes. */
  readonly address?: bigint;
  readonly pages?: bigint;
  readonly pageShift?: number;
  /** Only leaf entries changed (the guest did not free tables). */
  readonly leaf?: boolean;
}

/** INVALIDATE (extension): the guest changed its table; drop what the IOMMU cached from it. */
export function encodeInvalidate(domain: number, args: InvalidateArgs): EncodedRequest {
  return request(InvalidateReq, RequestType.INVALIDATE, (v) => {
    const scope = args.scope === 'domain' ? InvalidateScope.DOMAIN : args.scope === 'pasid' ? InvalidateScope.PASID : InvalidateScope.ADDRESS;
    writeField(v, InvalidateReq.scope, scope);
    writeField(v, InvalidateReq.caches, InvalidateCache.TLB);
    writeField(v, InvalidateReq.flags, (args.leaf === true ? InvalidateFlag.LEAF : 0) | (args.pasid !== undefined ? InvalidateFlag.PASID : 0));
    writeField(v, InvalidateReq.domain, domain);
    writeField(v, InvalidateReq.pasid, args.pasid ?? 0);
    writeField(v, InvalidateReq.address, args.address ?? 0n);
    writeField(v, InvalidateReq.nrPages, args.pages ?? 0n);
    writeField(v, InvalidateReq.pageSize, args.pageShift ?? 12);
  });
}

export function encodeProbe(endpoint: number, probeSize: number): EncodedRequest {
  const r = request(ProbeReq, RequestType.PROBE, (v) => writeField(v, ProbeReq.endpoint, endpoint));
  return { readable: r.readable, writable: probeSize + ReqTail.SIZE };
}

/**
 * The status of a completed request: the tail is the last 4 bytes the device wrote, so it sits at
 * `usedLength - 4` of the writable part. A used length of 0 (or one too short for a tail) means the
 * device returned the buffers unwritten.
 */
export function statusOf(writable: Uint8Array, usedLength: number): number | 'NONE' {
  if (usedLength < ReqTail.SIZE || usedLength > writable.length) return 'NONE';
  return writable[usedLength - ReqTail.SIZE + ReqTail.status.offset]!;
}

export interface ProbedResvMem {
  readonly type: 'RESV_MEM';
  readonly subtype: number;
  readonly start: bigint;
  readonly end: bigint;
}
export interface ProbedHwIntelVtd {
  readonly type: 'HW_INTEL_VTD';
  readonly pasidBits: number;
  /** Bit 0: 48-bit tables; bit 1: 57-bit. */
  readonly addrWidths: number;
}
export interface ProbedUnknown {
  readonly type: number;
  readonly length: number;
}

/** Walks a PROBE reply's properties the way the spec tells a driver to (§5.13.6.5). */
export function parseProbeProperties(properties: Uint8Array): (ProbedResvMem | ProbedHwIntelVtd | ProbedUnknown)[] {
  const out: (ProbedResvMem | ProbedHwIntelVtd | ProbedUnknown)[] = [];
  let at = 0;
  while (at + ProbeProperty.SIZE <= properties.length) {
    const view = new DataView(properties.buffer, properties.byteOffset + at, properties.length - at);
    const rawType = readField(view, ProbeProperty.type);
    const type = rawType & ProbeProperty.TYPE_MASK;
    const length = readField(view, ProbeProperty.length);
    if (type === 0) break;
    if (at + ProbeProperty.SIZE + length > properties.length) break;
    if (rawType !== type) {
      // The driver MUST ignore a property whose reserved bits are set.
    } else if (type === 1 && length >= ProbeResvMem.VALUE_LENGTH) {
      out.push({
        type: 'RESV_MEM',
        subtype: readField(view, ProbeResvMem.subtype),
        start: readField64(view, ProbeResvMem.start),
        end: readField64(view, ProbeResvMem.end),
      });
    } else if (type === ProbePropertyType.HW_INTEL_VTD && length >= ProbeHwIntelVtd.VALUE_LENGTH) {
      out.push({ type: 'HW_INTEL_VTD', pasidBits: readField(view, ProbeHwIntelVtd.pasidBits), addrWidths: readField(view, ProbeHwIntelVtd.addrWidths) });
    } else {
      out.push({ type, length });
    }
    at += ProbeProperty.SIZE + length;
  }
  return out;
}

export interface DecodedFault {
  readonly reason: number;
  readonly flags: number;
  readonly endpoint: number;
  readonly address: bigint;
  /** Meaningful when flags has FaultFlag.PASID (extension). */
  readonly pasid: number;
}

export function decodeFault(record: Uint8Array): DecodedFault {
  const view = new DataView(record.buffer, record.byteOffset, record.length);
  return {
    reason: readField(view, FaultRecord.reason),
    flags: readField(view, FaultRecord.flags),
    endpoint: readField(view, FaultRecord.endpoint),
    pasid: readField(view, FaultRecord.pasid),
    address: readField64(view, FaultRecord.address),
  };
}
