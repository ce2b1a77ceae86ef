import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';
import { FeatureBit, featureMask, hasFeature } from '../virtio/constants.js';
import type { DeviceEnvironment, VirtioDeviceModel } from '../virtio/device.js';
import { ChainReader, ChainWriter, QueueError, type DescriptorChain, type SplitQueue } from '../virtio/split-queue.js';
import type { IommuBackend, PagingDomainHandle, StageOneTable, TableDomainHandle } from './backend.js';
import {
  AttachFlag,
  AttachReq,
  AttachTableFlag,
  AttachTableFormat,
  AttachTableReq,
  DetachFlag,
  DetachPasidReq,
  DetachReq,
  InvalidateFlag,
  InvalidateReq,
  InvalidateScope,
  ProbeHwIntelVtd,
  FaultFlag,
  FaultReason,
  FaultRecord,
  IOMMU_DEVICE_TYPE,
  IommuConfig,
  IommuFeature,
  IommuQueue,
  MapFlag,
  MapReq,
  ProbeProperty,
  ProbePropertyType,
  ProbeReq,
  ProbeResvMem,
  ReqHead,
  ReqTail,
  RequestType,
  ResvMemSubtype,
  Status,
  STATUS_NAMES,
  UnmapReq,
  type IommuFeatureName,
} from './layout.js';
import { StateError, parseIommuState, type DomainState, type VirtioIommuState } from './state.js';
import { isZero, readField, readField64, writeField } from './wire.js';

const U64_MAX = (1n << 64n) - 1n;

export interface VirtioIommuOptions {
  /** Endpoint IDs behind the IOMMU (e.g. PCI requester IDs). Any other ID does not exist. */
  readonly endpoints: readonly number[];
  /** Initial value of config `bypass` (QEMU's boot-bypass). Default true. */
  readonly bootBypass?: boolean;
  /** Also offer the legacy VIRTIO_IOMMU_F_BYPASS feature (the spec advises new devices not to). */
  readonly offerLegacyBypass?: boolean;
  /** Page sizes the device maps; the lowest set bit is the granule. Default: every size from 4 KiB. */
  readonly pageSizeMask?: bigint;
  readonly inputRange?: readonly [bigint, bigint];
  readonly domainRange?: readonly [number, number];
  /** Bytes of PROBE properties. Default 512, as QEMU. */
  readonly probeSize?: number;
  /**
   * Offer the ATTACH_TABLE extension (guest-owned stage-1 tables per PASID) when the backend can
   * nest. Off by default: a guest written to the base specification sees the base device.
   */
  readonly attachTable?: boolean;
  /** Device-specific features to offer (default: all but legacy BYPASS and ATTACH_TABLE). */
  readonly features?: readonly IommuFeatureName[];
  /**
   * Requests served per pass over the request queue (default: no bound); the rest wait for the next
   * pass (continueRequests(), which the host's loop calls), so a flooding guest cannot monopolise
   * the worker. The iommu worker sets 256.
   */
  readonly maxRequestsPerPass?: number;
  /** Most live mappings per domain (MAP beyond it gets NOMEM). Default: no bound but memory. */
  readonly maxMappingsPerDomain?: number;
  /** Largest request queue the driver may set up (bounds requests in flight). Default 1024. */
  readonly requestQueueSize?: number;
  /** Most domains that may exist at once (ATTACH beyond it gets NOMEM). Default 65536. */
  readonly maxDomains?: number;
  /** Fault records kept while the guest posts no event buffers (the oldest; newer ones are counted and dropped, repeats coalesced). Default 256. */
  readonly maxPendingFaults?: number;
  /**
   * Migration: start from saveState() of a device configured the same, over a backend restored
   * from the same image (its attachments are already in place, so the boot-time detach of every
   * endpoint is skipped). Checked whole; a state that does not fit throws StateError.
   */
  readonly restoreFrom?: unknown;
  readonly log?: Logger;
}

/** A DMA fault reported by the backend for one endpoint. */
export interface EndpointFault {
  readonly reason: 'UNKNOWN' | 'DOMAIN' | 'MAPPING';
  readonly endpoint: number;
  /** The PASID the faulting DMA carried, if any. */
  readonly pasid?: number;
  readonly address?: bigint;
  readonly read?: boolean;
  readonly write?: boolean;
  readonly exec?: boolean;
}

/** The largest request layout (ATTACH_TABLE); readable bytes beyond it are ignored. */
const MAX_REQUEST_SIZE = Math.max(ProbeReq.SIZE, AttachTableReq.SIZE);

function faultKey(f: EndpointFault): string {
  return `${f.reason}/${f.endpoint}/${f.pasid ?? ''}/${f.address ?? ''}/${f.read === true ? 'r' : ''}${f.write === true ? 'w' : ''}${f.exec === true ? 'x' : ''}`;
}

type Domain =
  | { readonly id: number; readonly kind: 'bypass'; readonly endpoints: Set<number> }
  | {
      readonly id: number;
      readonly kind: 'paging';
      readonly handle: PagingDomainHandle;
      readonly endpoints: Set<number>;
      /** Live mappings (MAP creates one, UNMAP removes whole ones): bounded by maxMappingsPerDomain. */
      mappings: number;
    }
  | {
      readonly id: number;
      /** A guest-owned stage-1 table (ATTACH_TABLE extension), nested over guest-physical memory. */
      readonly kind: 'table';
      readonly handle: TableDomainHandle;
      readonly table: StageOneTable;
      /** Endpoints whose RID traffic uses the table. */
      readonly endpoints: Set<number>;
      /** (endpoint, PASID) pairs bound to the table, as pasidKey() strings. */
      readonly pasids: Set<string>;
    };

function pasidKey(endpoint: number, pasid: number): string {
  return `${endpoint}:${pasid}`;
}

export interface VirtioIommuStats {
  readonly requests: number;
  readonly byStatus: Record<string, number>;
  readonly unparsable: number;
  readonly domains: number;
  readonly faultsReported: number;
  readonly faultsPending: number;
  readonly faultsDropped: number;
  /** Faults identical to a record already waiting, counted instead of queued. */
  readonly faultsCoalesced: number;
  /** Passes over the request queue that stopped at maxRequestsPerPass with requests left. */
  readonly deferredPasses: number;
}

/** Outcome of one request: a status to write in the tail, or NONE (buffer returned unwritten). */
type Outcome = Status | 'NONE';

/**
 * The virtio-iommu device (virtio 1.2 §5.13), a client of the ioasid backend: domains become
 * IOAS + paging HWPT pairs, endpoints are backend devices, MAP/UNMAP become IOAS map/unmap.
 */
export class VirtioIommuDevice implements VirtioDeviceModel {
  readonly deviceType = IOMMU_DEVICE_TYPE;
  /** Request and event queue maxima; a deep request queue lets a guest batch MAP/UNMAP. */
  readonly queueMaxSizes: readonly [number, number];
  readonly configSize = IommuConfig.SIZE;
  readonly offeredFeatures: bigint;

  private readonly log: Logger;
  private readonly endpointIds: ReadonlySet<number>;
  private readonly pageSizeMask: bigint;
  private readonly granule: bigint;
  private readonly inputRange: readonly [bigint, bigint];
  private readonly domainRange: readonly [number, number];
  private readonly probeSize: number;
  private readonly maxDomains: number;
  private readonly maxPendingFaults: number;
  private readonly bootBypass: boolean;

  private bypass: boolean;
  private negotiated = 0n;
  private env: DeviceEnvironment | undefined;
  private readonly domains = new Map<number, Domain>();
  /** Endpoint → domain it is attached to. */
  private readonly attachedTo = new Map<number, number>();
  /** pasidKey(endpoint, PASID) → table domain that PASID is bound to. */
  private readonly pasidBoundTo = new Map<string, number>();
  private readonly pendingFaults: EndpointFault[] = [];
  /** faultKey() of every pending record, for coalescing. */
  private readonly pendingKeys = new Set<string>();
  private readonly counters = { requests: 0, unparsable: 0, faultsReported: 0, faultsDropped: 0, faultsCoalesced: 0, deferredPasses: 0 };
  private readonly requestBuf = new Uint8Array(MAX_REQUEST_SIZE);
  private readonly requestView = new DataView(this.requestBuf.buffer);
  private readonly tailBuf = new Uint8Array(ReqTail.SIZE);
  /** A pass stopped at maxRequestsPerPass with requests left on the queue. */
  private requestsPending = false;
  private readonly maxRequestsPerPass: number;
  private readonly maxMappingsPerDomain: number;
  private readonly byStatus = new Map<string, number>();

  constructor(
    private readonly backend: IommuBackend,
    options: VirtioIommuOptions,
  ) {
    this.log = options.log ?? silentLogger;
    this.endpointIds = new Set(options.endpoints);
    this.pageSizeMask = options.pageSizeMask ?? ~0xfffn & U64_MAX;
    if (this.pageSizeMask === 0n) throw new RangeError('pageSizeMask must have at least one bit set');
    this.granule = this.pageSizeMask & -this.pageSizeMask;
    this.inputRange = options.inputRange ?? [0n, U64_MAX];
    this.domainRange = options.domainRange ?? [0, 0xffff_ffff];
    this.probeSize = options.probeSize ?? 512;
    this.maxDomains = options.maxDomains ?? 65536;
    this.maxPendingFaults = options.maxPendingFaults ?? 256;
    this.maxRequestsPerPass = options.maxRequestsPerPass ?? Number.POSITIVE_INFINITY;
    this.maxMappingsPerDomain = options.maxMappingsPerDomain ?? Number.POSITIVE_INFINITY;
    if (!(this.maxMappingsPerDomain >= 0)) throw new RangeError('maxMappingsPerDomain must not be negative');
    const queueSize = options.requestQueueSize ?? 1024;
    // virtio 1.2 §2.7: a split queue's size is a power of two up to 32768.
    if (!Number.isInteger(queueSize) || queueSize < 2 || queueSize > 32768 || (queueSize & (queueSize - 1)) !== 0) {
      throw new RangeError('requestQueueSize must be a power of two from 2 to 32768');
    }
    this.queueMaxSizes = [queueSize, 256];
    if (!(this.maxRequestsPerPass >= 1)) throw new RangeError('maxRequestsPerPass must be at least 1');
    this.bootBypass = options.bootBypass ?? true;
    this.bypass = this.bootBypass;
    const names: readonly IommuFeatureName[] = options.features ?? [
      'INPUT_RANGE',
      'DOMAIN_RANGE',
      'MAP_UNMAP',
      'PROBE',
      'MMIO',
      'BYPASS_CONFIG',
      ...(options.offerLegacyBypass ? (['BYPASS'] as const) : []),
      ...(options.attachTable === true && backend.tables !== undefined ? (['ATTACH_TABLE'] as const) : []),
    ];
    if (names.includes('ATTACH_TABLE') && backend.tables === undefined) throw new RangeError('ATTACH_TABLE needs a backend with nested translation');
    let features =
      featureMask(FeatureBit.VERSION_1) | featureMask(FeatureBit.INDIRECT_DESC) | featureMask(FeatureBit.EVENT_IDX);
    for (const name of names) features |= featureMask(IommuFeature[name]);
    this.offeredFeatures = features;
    if (options.restoreFrom !== undefined) this.takeOverState(options.restoreFrom);
    else this.applyUnattachedMode();
  }

  // ---- config space -------------------------------------------------------------------------

  readConfig(offset: number, size: 1 | 2 | 4): number {
    const bytes = new Uint8Array(IommuConfig.SIZE);
    const view = new DataView(bytes.buffer);
    writeField(view, IommuConfig.pageSizeMask, this.pageSizeMask);
    writeField(view, IommuConfig.inputRangeStart, this.inputRange[0]);
    writeField(view, IommuConfig.inputRangeEnd, this.inputRange[1]);
    writeField(view, IommuConfig.domainRangeStart, this.domainRange[0]);
    writeField(view, IommuConfig.domainRangeEnd, this.domainRange[1]);
    writeField(view, IommuConfig.probeSize, this.probeSize);
    // virtio 1.2 §5.13.4.2: the device MUST NOT present a value other than 0 or 1 in bypass.
    writeField(view, IommuConfig.bypass, this.bypass ? 1 : 0);
    if (offset < 0 || offset + size > IommuConfig.SIZE) return 0;
    return size === 1 ? view.getUint8(offset) : size === 2 ? view.getUint16(offset, true) : view.getUint32(offset, true);
  }

  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    // virtio 1.2 §5.13.4.1: with BYPASS_CONFIG the driver may write `bypass`, and nothing else.
    if (offset !== IommuConfig.bypass.offset || !this.offers(IommuFeature.BYPASS_CONFIG)) {
      this.log.warn({ offset, size, value }, 'ignored driver write to a read-only config field');
      return;
    }
    const byte = value & 0xff;
    if (byte > 1) {
      // The driver MUST NOT write other values; keep the field a valid 0 or 1.
      this.log.warn({ value: byte }, 'ignored bypass write that is neither 0 nor 1');
      return;
    }
    if ((byte === 1) !== this.bypass) {
      this.bypass = byte === 1;
      this.log.info({ bypass: this.bypass }, 'global bypass changed');
      this.applyUnattachedMode();
    }
  }

  // ---- lifecycle ----------------------------------------------------------------------------

  activate(env: DeviceEnvironment): void {
    this.env = env;
    this.negotiated = env.features;
    this.applyUnattachedMode();
    this.deliverFaults();
  }

  reset(): void {
    // virtio 1.2 §5.13.5: when the device is reset, endpoints are not attached to any domain.
    for (const domain of [...this.domains.values()]) this.destroyDomain(domain);
    this.attachedTo.clear();
    this.requestsPending = false;
    this.env = undefined;
    this.negotiated = 0n;
    // `bypass` SHOULD NOT change on device reset (§5.13.4.2); only a system reset restores it.
    this.applyUnattachedMode();
  }

  /** System (machine) reset: like reset(), and config `bypass` returns to its boot value. */
  systemReset(): void {
    this.bypass = this.bootBypass;
    this.reset();
  }

  notify(queueIndex: number): void {
    const env = this.env;
    if (env === undefined) return;
    if (queueIndex === IommuQueue.REQUEST) this.serveRequests(env);
    else if (queueIndex === IommuQueue.EVENT) this.deliverFaults();
  }

  // ---- faults -------------------------------------------------------------------------------

  /**
   * Queues a fault record for the event queue. When the guest has posted no event buffer the
   * record waits in a bounded list; past its bound the newest records are dropped and counted.
   * With `deliver` false it only queues (a paused device).
   */
  reportFault(fault: EndpointFault, deliver = true): void {
    // A fault identical to one still waiting for a buffer adds nothing the guest can act on: it is
    // counted, not queued again (a device retrying a DMA would otherwise fill the list alone).
    const key = faultKey(fault);
    if (this.pendingKeys.has(key)) {
      this.counters.faultsCoalesced++;
      return;
    }
    if (this.pendingFaults.length >= this.maxPendingFaults) {
      // The oldest records are kept: they are what the guest needs first when buffers come back.
      this.counters.faultsDropped++;
      if (this.counters.faultsDropped === 1 || this.counters.faultsDropped % 1000 === 0) {
        this.log.warn({ dropped: this.counters.faultsDropped, pending: this.pendingFaults.length }, 'event queue has no buffers: newest fault records dropped');
      }
      return;
    }
    this.pendingFaults.push(fault);
    this.pendingKeys.add(key);
    // A paused device (a migration saving it) only queues: guest memory is not written.
    if (deliver) this.deliverFaults();
  }

  private deliverFaults(): void {
    const env = this.env;
    const queue = env?.queues[IommuQueue.EVENT];
    if (env === undefined || queue === undefined || this.pendingFaults.length === 0) return;
    let delivered = 0;
    while (this.pendingFaults.length > 0) {
      const chain = queue.pop();
      if (chain === null) break;
      if (chain instanceof QueueError) {
        env.needsReset(`event queue: ${chain.reason}`);
        return;
      }
      const fault = this.pendingFaults[0]!;
      if (chain.writableLength < FaultRecord.SIZE) {
        // A buffer too small for the record: return it unused rather than split the record.
        this.log.warn({ writable: chain.writableLength }, 'event buffer smaller than a fault record');
        queue.addUsed(chain.head, 0);
        delivered++;
        continue;
      }
      this.pendingFaults.shift();
      this.pendingKeys.delete(faultKey(fault));
      const record = new Uint8Array(FaultRecord.SIZE);
      const view = new DataView(record.buffer);
      writeField(view, FaultRecord.reason, FaultReason[fault.reason]);
      let flags = 0;
      if (fault.read) flags |= FaultFlag.READ;
      if (fault.write) flags |= FaultFlag.WRITE;
      if (fault.exec) flags |= FaultFlag.EXEC;
      if (fault.address !== undefined) {
        flags |= FaultFlag.ADDRESS;
        writeField(view, FaultRecord.address, fault.address);
      }
      // The PASID the DMA carried is reported only to a driver that knows the field (extension).
      if (fault.pasid !== undefined && this.negotiatedFeature(IommuFeature.ATTACH_TABLE)) {
        flags |= FaultFlag.PASID;
        writeField(view, FaultRecord.pasid, fault.pasid);
      }
      writeField(view, FaultRecord.flags, flags);
      writeField(view, FaultRecord.endpoint, fault.endpoint);
      new ChainWriter(env.memory, chain.writable).write(record);
      queue.addUsed(chain.head, FaultRecord.SIZE);
      this.counters.faultsReported++;
      delivered++;
    }
    if (delivered > 0) {
      queue.flushUsed();
      env.notifyUsed(IommuQueue.EVENT);
    }
  }

  // ---- requests -----------------------------------------------------------------------------

  private serveRequests(env: DeviceEnvironment): void {
    const queue = env.queues[IommuQueue.REQUEST];
    if (queue === undefined) return;
    this.requestsPending = false;
    let served = 0;
    for (;;) {
      if (served === this.maxRequestsPerPass) {
        // A guest that keeps the queue full gets its requests served in bounded passes: the rest
        // wait for continueRequests(), so fault delivery, register accesses and the control plane
        // of this worker get their turn in between.
        this.requestsPending = true;
        this.counters.deferredPasses++;
        break;
      }
      const chain = queue.pop();
      if (chain === null) {
        if (!queue.enableNotifications()) break;
        continue;
      }
      if (chain instanceof QueueError) {
        env.needsReset(`request queue: ${chain.reason}`);
        return;
      }
      queue.addUsed(chain.head, this.serveOne(env, chain));
      served++;
    }
    if (served > 0) {
      this.flushAndNotify(env, queue);
    }
  }

  /** Serves the next bounded pass of requests left over from a full pass; true if it did any work. */
  continueRequests(): boolean {
    const env = this.env;
    if (!this.requestsPending || env === undefined) return false;
    this.serveRequests(env);
    return true;
  }

  private flushAndNotify(env: DeviceEnvironment, queue: SplitQueue): void {
    queue.flushUsed();
    env.notifyUsed(IommuQueue.REQUEST);
  }

  /** Handles one request chain and returns the used length. */
  private serveOne(env: DeviceEnvironment, chain: DescriptorChain): number {
    this.counters.requests++;
    const reader = new ChainReader(env.memory, chain.readable);
    // The readable part is at most the largest request; anything beyond is ignored.
    // One buffer per device for the request: handlers read fields only after sized() checked the
    // length, so the bytes past it (left from an earlier request) are never looked at.
    const request = this.requestBuf.subarray(0, Math.min(reader.remaining, MAX_REQUEST_SIZE));
    reader.read(request);
    const writable = chain.writableLength;
    if (request.length < ReqHead.SIZE || writable < ReqTail.SIZE) {
      // virtio 1.2 §5.13.6: a device that cannot find the tail returns the buffers unwritten.
      this.counters.unparsable++;
      this.log.warn({ readable: request.length, writable }, 'request without head or tail: returned unwritten');
      return 0;
    }
    const view = this.requestView;
    const type = readField(view, ReqHead.type);
    let outcome: Outcome;
    let tailOffset = 0;
    let properties: Uint8Array | undefined;
    switch (type) {
      case RequestType.ATTACH:
        outcome = this.sized(request, AttachReq.SIZE, type) ?? this.attach(request, view);
        break;
      case RequestType.DETACH:
        outcome = this.sized(request, DetachReq.SIZE, type) ?? this.detach(view);
        break;
      case RequestType.MAP:
        outcome = this.sized(request, MapReq.SIZE, type) ?? this.mapRequest(view);
        break;
      case RequestType.UNMAP:
        outcome = this.sized(request, UnmapReq.SIZE, type) ?? this.unmapRequest(view);
        break;
      case RequestType.ATTACH_TABLE:
        // Without the feature these types are unknown: returned unwritten, as for any other.
        if (!this.negotiatedFeature(IommuFeature.ATTACH_TABLE)) {
          outcome = 'NONE';
          break;
        }
        outcome = this.sized(request, AttachTableReq.SIZE, type) ?? this.attachTable(request, view);
        break;
      case RequestType.INVALIDATE:
        if (!this.negotiatedFeature(IommuFeature.ATTACH_TABLE)) {
          outcome = 'NONE';
          break;
        }
        outcome = this.sized(request, InvalidateReq.SIZE, type) ?? this.invalidate(request, view);
        break;
      case RequestType.PROBE: {
        if (!this.negotiatedFeature(IommuFeature.PROBE)) {
          // §5.13.6.5: without PROBE the device SHOULD NOT write the buffer and SHOULD use length 0.
          outcome = 'NONE';
          break;
        }
        tailOffset = this.probeSize;
        if (writable < this.probeSize + ReqTail.SIZE) {
          // §5.13.6.5: properties smaller than probe_size: write no property, status INVAL.
          tailOffset = writable - ReqTail.SIZE;
          outcome = Status.INVAL;
          break;
        }
        const result = this.sized(request, ProbeReq.SIZE, type) ?? this.probe(view);
        if (typeof result === 'object') {
          properties = result;
          outcome = Status.OK;
        } else {
          outcome = result;
        }
        break;
      }
      default:
        // §5.13.6: an unrecognised type: SHOULD NOT write the buffer, used length zero.
        this.log.warn({ type }, 'unknown request type: returned unwritten');
        outcome = 'NONE';
    }
    this.count(outcome);
    if (outcome === 'NONE') return 0;
    const writer = new ChainWriter(env.memory, chain.writable);
    const out = tailOffset === 0 ? this.tailBuf.fill(0) : new Uint8Array(tailOffset + ReqTail.SIZE);
    if (properties !== undefined) out.set(properties);
    // §5.13.6: the device SHOULD set the tail's reserved bytes to zero (they are, in `out`).
    out[tailOffset + ReqTail.status.offset] = outcome;
    writer.write(out);
    return out.length;
  }

  /** A request shorter than its type's layout is invalid. */
  private sized(request: Uint8Array, size: number, type: number): Status | undefined {
    if (request.length >= size) return undefined;
    this.log.warn({ type, length: request.length, expected: size }, 'request too short for its type');
    return Status.INVAL;
  }

  private attach(request: Uint8Array, view: DataView): Status {
    const domainId = readField(view, AttachReq.domain);
    const endpoint = readField(view, AttachReq.endpoint);
    const flags = readField(view, AttachReq.flags);
    // §5.13.6.1: reserved not zero → the device MUST reject the request with INVAL.
    if (!isZero(request, AttachReq.reserved)) return Status.INVAL;
    const knownFlags = this.negotiatedFeature(IommuFeature.BYPASS_CONFIG) ? AttachFlag.BYPASS : 0;
    // §5.13.6.1: a flags bit the device does not recognise → MUST reject with INVAL.
    if ((flags & ~knownFlags) !== 0) return Status.INVAL;
    // §5.13.6.1: an endpoint that does not exist → MUST reject with NOENT.
    if (!this.endpointIds.has(endpoint)) return Status.NOENT;
    if (!this.domainInRange(domainId)) return Status.RANGE;
    const wantBypass = (flags & AttachFlag.BYPASS) !== 0;
    const existing = this.domains.get(domainId);
    // A table domain takes endpoints through ATTACH_TABLE only: it has no mappings of its own.
    if (existing?.kind === 'table') return Status.INVAL;
    if (existing !== undefined && (existing.kind === 'bypass') !== wantBypass) {
      // §5.13.6.1: BYPASS flag inconsistent with the existing domain → SHOULD reject with INVAL.
      return Status.INVAL;
    }
    if (this.attachedTo.get(endpoint) === domainId) return Status.OK;
    // §5.13.6.1: the driver SHOULD attach endpoints that cannot be isolated from each other to the
    // same domain. Their translation is one in the backend, so this device cannot put a group
    // member anywhere else while a sibling is attached: "If it cannot do so, the device MUST
    // reject the request and set status to VIRTIO_IOMMU_S_UNSUPP."
    for (const sibling of this.backend.groupSiblings(endpoint)) {
      const theirs = this.attachedTo.get(sibling);
      if (theirs !== undefined && theirs !== domainId) {
        this.log.warn({ endpoint, domain: domainId, sibling, siblingDomain: theirs }, 'attach refused: an endpoint of the same isolation group is attached to another domain');
        return Status.UNSUPP;
      }
    }
    let domain = existing;
    let created = false;
    if (domain === undefined) {
      if (this.domains.size >= this.maxDomains) return Status.NOMEM;
      if (wantBypass) {
        domain = { id: domainId, kind: 'bypass', endpoints: new Set() };
      } else {
        const handle = this.backend.createPagingDomain(endpoint);
        if (typeof handle === 'string') return errnoToStatus(handle, Status.NOMEM);
        domain = { id: domainId, kind: 'paging', handle, endpoints: new Set(), mappings: 0 };
      }
      created = true;
    }
    // §5.13.6.1: attaching an endpoint already attached elsewhere behaves as DETACH then ATTACH;
    // the backend replaces the attachment atomically, so DMA never sees a gap.
    const errno =
      domain.kind === 'bypass' ? this.backend.attachIdentity(endpoint) : this.backend.attachPaging(endpoint, domain.handle);
    if (errno !== undefined) {
      if (created && domain.kind === 'paging') this.backend.destroyPagingDomain(domain.handle);
      this.log.warn({ endpoint, domain: domainId, errno }, 'attach refused by the backend');
      // §5.13.6.1: endpoints whose properties are incompatible with the domain → UNSUPP.
      return errnoToStatus(errno, Status.UNSUPP);
    }
    if (created) this.domains.set(domainId, domain);
    const previous = this.attachedTo.get(endpoint);
    if (previous !== undefined) this.leaveDomain(endpoint, previous);
    domain.endpoints.add(endpoint);
    this.attachedTo.set(endpoint, domainId);
    return Status.OK;
  }

  private detach(view: DataView): Status {
    const domainId = readField(view, DetachReq.domain);
    const endpoint = readField(view, DetachReq.endpoint);
    // §5.13.6.2: the device MUST ignore reserved — unless the ATTACH_TABLE extension is
    // negotiated, which gives the first reserved words a meaning (a PASID to unbind).
    // §5.13.6.2: an endpoint that does not exist → MUST reject with NOENT.
    if (!this.endpointIds.has(endpoint)) return Status.NOENT;
    if (this.negotiatedFeature(IommuFeature.ATTACH_TABLE)) {
      const flags = readField(view, DetachPasidReq.flags);
      if ((flags & ~DetachFlag.PASID) !== 0) return Status.INVAL;
      if ((flags & DetachFlag.PASID) !== 0) return this.detachPasid(domainId, endpoint, readField(view, DetachPasidReq.pasid));
    }
    // §5.13.6.2: no such domain, or endpoint not attached to it → MAY set INVAL.
    if (this.attachedTo.get(endpoint) !== domainId) return Status.INVAL;
    // After DETACH the endpoint MUST NOT reach the domain's mappings; the backend's attach
    // completes only once no device worker can still use the old translation. (An endpoint whose
    // isolation-group sibling stays attached cannot be isolated from it: it keeps the group's
    // translation, which is what "cannot be isolated" means.)
    const errno = this.detachedMode(endpoint);
    if (errno !== undefined) {
      this.log.error({ endpoint, errno }, 'backend refused to detach');
      return Status.DEVERR;
    }
    this.leaveDomain(endpoint, domainId);
    return Status.OK;
  }

  private mapRequest(view: DataView): Status {
    const domainId = readField(view, MapReq.domain);
    const virtStart = readField64(view, MapReq.virtStart);
    const virtEnd = readField64(view, MapReq.virtEnd);
    const physStart = readField64(view, MapReq.physStart);
    const flags = readField(view, MapReq.flags);
    if (!this.negotiatedFeature(IommuFeature.MAP_UNMAP)) return Status.UNSUPP;
    const known = MapFlag.READ | MapFlag.WRITE | (this.negotiatedFeature(IommuFeature.MMIO) ? MapFlag.MMIO : 0);
    // §5.13.6.3: a flags bit the device does not recognise → MUST reject with INVAL.
    if ((flags & ~known) !== 0) return Status.INVAL;
    if (!this.domainInRange(domainId)) return Status.RANGE;
    const domain = this.domains.get(domainId);
    // §5.13.6.3: domain does not exist → SHOULD reject with NOENT.
    if (domain === undefined) return Status.NOENT;
    // §5.13.6.3: a bypass domain → SHOULD reject with INVAL. A table domain's mappings are the
    // guest's own page table: MAP does not apply either.
    if (domain.kind !== 'paging') return Status.INVAL;
    // The driver MUST make virt_end strictly greater than virt_start; an inverted range is invalid.
    if (virtEnd < virtStart) return Status.INVAL;
    const mask = this.granule - 1n;
    // §5.13.6.3: virt_start, phys_start or virt_end + 1 not on the granule → SHOULD reject with RANGE.
    if ((virtStart & mask) !== 0n || (physStart & mask) !== 0n || ((virtEnd + 1n) & mask) !== 0n) return Status.RANGE;
    // §5.13.6: mappings outside input_range fail.
    if (virtStart < this.inputRange[0] || virtEnd > this.inputRange[1]) return Status.RANGE;
    const length = virtEnd - virtStart + 1n;
    const physEnd = physStart + length - 1n;
    if (physEnd > BigInt(Number.MAX_SAFE_INTEGER)) return Status.RANGE;
    // §5.13.6.3: a mapping already in the range → SHOULD reject with INVAL.
    if (this.backend.mappingsIn(domain.handle, virtStart, virtEnd).length > 0) return Status.INVAL;
    // §5.13.6.7: the device SHOULD reject a MAP that overlaps a RESV_MEM region of an attached endpoint.
    for (const ep of domain.endpoints) {
      for (const r of this.backend.reservedRegions(ep)) {
        if (r.start <= virtEnd && virtStart <= r.end) return Status.INVAL;
      }
    }
    // §5.13.6.3 lists NOMEM among the statuses: the device lacks resources for another mapping.
    if (domain.mappings >= this.maxMappingsPerDomain) {
      this.log.warn({ domain: domainId, mappings: domain.mappings }, 'map refused: the domain holds the most mappings allowed');
      return Status.NOMEM;
    }
    const errno = this.backend.map(
      domain.handle,
      virtStart,
      length,
      Number(physStart),
      (flags & MapFlag.READ) !== 0,
      (flags & MapFlag.WRITE) !== 0,
      (flags & MapFlag.MMIO) !== 0,
    );
    if (errno !== undefined) {
      this.log.warn({ domain: domainId, virtStart, virtEnd, physStart, errno }, 'map refused by the backend');
      return errnoToStatus(errno, Status.DEVERR);
    }
    domain.mappings++;
    return Status.OK;
  }

  private unmapRequest(view: DataView): Status {
    const domainId = readField(view, UnmapReq.domain);
    const virtStart = readField64(view, UnmapReq.virtStart);
    const virtEnd = readField64(view, UnmapReq.virtEnd);
    if (!this.negotiatedFeature(IommuFeature.MAP_UNMAP)) return Status.UNSUPP;
    // §5.13.6.4: reserved not zero MAY give INVAL; this device ignores it and unmaps.
    if (!this.domainInRange(domainId)) return Status.RANGE;
    const domain = this.domains.get(domainId);
    // §5.13.6.4: domain does not exist → SHOULD set NOENT.
    if (domain === undefined) return Status.NOENT;
    // §5.13.6.4: a bypass domain → SHOULD reject with INVAL (and a table domain has no mappings).
    if (domain.kind !== 'paging') return Status.INVAL;
    if (virtEnd < virtStart) return Status.INVAL;
    const hit = this.backend.mappingsIn(domain.handle, virtStart, virtEnd);
    for (const m of hit) {
      // §5.13.6.4: a mapping the range would split → SHOULD set RANGE and remove nothing.
      if (m.start < virtStart || m.end > virtEnd) return Status.RANGE;
    }
    // §5.13.6.4: parts of the range that are not mapped are fine: remove what is there, OK.
    if (hit.length === 0) return Status.OK;
    const errno = this.backend.unmap(domain.handle, hit[0]!.start, hit[hit.length - 1]!.end);
    if (errno !== undefined) {
      this.log.error({ domain: domainId, errno }, 'backend failed to unmap');
      return errnoToStatus(errno, Status.DEVERR);
    }
    domain.mappings -= hit.length;
    return Status.OK;
  }

  private probe(view: DataView): Status | Uint8Array {
    const endpoint = readField(view, ProbeReq.endpoint);
    // §5.13.6.5: an endpoint that does not exist → SHOULD reject with NOENT.
    if (!this.endpointIds.has(endpoint)) return Status.NOENT;
    const out = new Uint8Array(this.probeSize);
    let at = 0;
    for (const region of this.backend.reservedRegions(endpoint)) {
      if (at + ProbeResvMem.SIZE > this.probeSize) {
        this.log.warn({ endpoint }, 'probe_size too small for every reserved region; list truncated');
        break;
      }
      const prop = new DataView(out.buffer, at, ProbeResvMem.SIZE);
      writeField(prop, ProbeProperty.type, ProbePropertyType.RESV_MEM);
      // §5.13.6.5: length is the property's size without its header.
      writeField(prop, ProbeProperty.length, ProbeResvMem.VALUE_LENGTH);
      writeField(prop, ProbeResvMem.subtype, region.kind === 'msi' ? ResvMemSubtype.MSI : ResvMemSubtype.RESERVED);
      writeField(prop, ProbeResvMem.start, region.start);
      writeField(prop, ProbeResvMem.end, region.end);
      at += ProbeResvMem.SIZE;
    }
    const tables = this.backend.tables;
    if (tables !== undefined && this.negotiatedFeature(IommuFeature.ATTACH_TABLE)) {
      if (at + ProbeHwIntelVtd.SIZE > this.probeSize) {
        this.log.warn({ endpoint }, 'probe_size too small for the stage-1 property; left out');
      } else {
        const prop = new DataView(out.buffer, at, ProbeHwIntelVtd.SIZE);
        writeField(prop, ProbeProperty.type, ProbePropertyType.HW_INTEL_VTD);
        writeField(prop, ProbeProperty.length, ProbeHwIntelVtd.VALUE_LENGTH);
        writeField(prop, ProbeHwIntelVtd.pasidBits, tables.pasidBits(endpoint));
        // Both 4- and 5-level x86-64 tables; accessed/dirty bits are not set by this IOMMU.
        writeField(prop, ProbeHwIntelVtd.addrWidths, 0b11);
        at += ProbeHwIntelVtd.SIZE;
      }
    }
    // The remaining bytes stay zero: an empty property ends the list (§5.13.6.5).
    return out;
  }

  // ---- ATTACH_TABLE extension ----------------------------------------------------------------

  /**
   * ATTACH_TABLE: the endpoint's RID traffic, or one of its PASIDs, translates through the guest's
   * own stage-1 table, nested over guest-physical memory. The domain then names that table.
   */
  private attachTable(request: Uint8Array, view: DataView): Status {
    const tables = this.backend.tables!;
    const domainId = readField(view, AttachTableReq.domain);
    const endpoint = readField(view, AttachTableReq.endpoint);
    const format = readField(view, AttachTableReq.format);
    const flags = readField(view, AttachTableReq.flags);
    const pasidField = readField(view, AttachTableReq.pasid);
    const root = readField64(view, AttachTableReq.pgtbl);
    const width = readField(view, AttachTableReq.addrWidth);
    // As for ATTACH (§5.13.6.1): reserved not zero or unknown flags → INVAL; no endpoint → NOENT.
    if (!isZero(request, AttachTableReq.reserved0) || !isZero(request, AttachTableReq.reserved1)) return Status.INVAL;
    if ((flags & ~AttachTableFlag.PASID) !== 0) return Status.INVAL;
    if (!this.endpointIds.has(endpoint)) return Status.NOENT;
    if (!this.domainInRange(domainId)) return Status.RANGE;
    // A format the device does not implement is an unsupported request, not a malformed one.
    if (format !== AttachTableFormat.INTEL_PT) return Status.UNSUPP;
    if (width !== 48 && width !== 57) return Status.INVAL;
    if ((root & 0xfffn) !== 0n) return Status.INVAL;
    const pasid = (flags & AttachTableFlag.PASID) !== 0 ? pasidField : undefined;
    if (pasid !== undefined) {
      // PASID 0 is the RID's own traffic; beyond the endpoint's PASID width is out of range.
      if (pasid === 0) return Status.INVAL;
      if (pasid >= 2 ** tables.pasidBits(endpoint)) return Status.RANGE;
    } else if (pasidField !== 0) {
      return Status.INVAL;
    }
    const table: StageOneTable = { rootGpa: root, addrWidth: width };
    let domain = this.domains.get(domainId);
    if (domain !== undefined && (domain.kind !== 'table' || domain.table.rootGpa !== root || domain.table.addrWidth !== width)) {
      // One domain, one translation: a paging or bypass domain, or another table, cannot take it.
      return Status.INVAL;
    }
    if (pasid === undefined) {
      if (this.attachedTo.get(endpoint) === domainId) return Status.OK;
      for (const sibling of this.backend.groupSiblings(endpoint)) {
        const theirs = this.attachedTo.get(sibling);
        // Endpoints that cannot be isolated share a domain (§5.13.6.1): UNSUPP otherwise.
        if (theirs !== undefined && theirs !== domainId) return Status.UNSUPP;
      }
    } else if (this.pasidBoundTo.get(pasidKey(endpoint, pasid)) === domainId) {
      return Status.OK;
    }
    let created = false;
    if (domain === undefined) {
      if (this.domains.size >= this.maxDomains) return Status.NOMEM;
      const handle = tables.createTableDomain(endpoint, table);
      if (typeof handle === 'string') return errnoToStatus(handle, Status.NOMEM);
      domain = { id: domainId, kind: 'table', handle, table, endpoints: new Set(), pasids: new Set() };
      created = true;
    }
    const errno = tables.attachTable(endpoint, pasid, (domain as Extract<Domain, { kind: 'table' }>).handle);
    if (errno !== undefined) {
      if (created) tables.destroyTableDomain((domain as Extract<Domain, { kind: 'table' }>).handle);
      this.log.warn({ endpoint, domain: domainId, pasid, errno }, 'attach table refused by the backend');
      return errnoToStatus(errno, Status.UNSUPP);
    }
    if (created) this.domains.set(domainId, domain);
    const tableDomain = domain as Extract<Domain, { kind: 'table' }>;
    if (pasid === undefined) {
      const previous = this.attachedTo.get(endpoint);
      if (previous !== undefined) this.leaveDomain(endpoint, previous);
      tableDomain.endpoints.add(endpoint);
      this.attachedTo.set(endpoint, domainId);
    } else {
      const key = pasidKey(endpoint, pasid);
      const previous = this.pasidBoundTo.get(key);
      if (previous !== undefined) this.unbindPasid(key, previous);
      tableDomain.pasids.add(key);
      this.pasidBoundTo.set(key, domainId);
    }
    return Status.OK;
  }

  /** DETACH with a PASID (extension): unbinds that PASID from the table domain. */
  private detachPasid(domainId: number, endpoint: number, pasid: number): Status {
    const key = pasidKey(endpoint, pasid);
    // As for DETACH (§5.13.6.2): not bound to that domain → INVAL.
    if (this.pasidBoundTo.get(key) !== domainId) return Status.INVAL;
    const errno = this.backend.tables!.detachPasid(endpoint, pasid);
    if (errno !== undefined) {
      this.log.error({ endpoint, pasid, errno }, 'backend refused to detach a PASID');
      return Status.DEVERR;
    }
    this.unbindPasid(key, domainId);
    return Status.OK;
  }

  private unbindPasid(key: string, domainId: number): void {
    this.pasidBoundTo.delete(key);
    const domain = this.domains.get(domainId);
    if (domain?.kind !== 'table') return;
    domain.pasids.delete(key);
    if (domain.endpoints.size === 0 && domain.pasids.size === 0) this.destroyDomain(domain);
  }

  /**
   * INVALIDATE (extension): the guest changed its table; cached translations of the domain (all,
   * one PASID's — the domain has one table, so the same — or an address range) are dropped. Like
   * UNMAP it completes only when no device can use a dropped entry any more.
   */
  private invalidate(request: Uint8Array, view: DataView): Status {
    const scope = readField(view, InvalidateReq.scope);
    const flags = readField(view, InvalidateReq.flags);
    const domainId = readField(view, InvalidateReq.domain);
    if (!isZero(request, InvalidateReq.reserved)) return Status.INVAL;
    if ((flags & ~(InvalidateFlag.LEAF | InvalidateFlag.PASID | InvalidateFlag.ID | InvalidateFlag.GLOBAL)) !== 0) return Status.INVAL;
    if (scope !== InvalidateScope.DOMAIN && scope !== InvalidateScope.PASID && scope !== InvalidateScope.ADDRESS) return Status.INVAL;
    if (!this.domainInRange(domainId)) return Status.RANGE;
    const domain = this.domains.get(domainId);
    if (domain === undefined) return Status.NOENT;
    if (domain.kind !== 'table') return Status.INVAL;
    let range: { iova: bigint; length: bigint } | undefined;
    if (scope === InvalidateScope.ADDRESS) {
      const shift = readField(view, InvalidateReq.pageSize);
      // page_size is log2 of the granule the address and count are in: 4 KiB to 1 GiB here.
      const granuleShift = shift === 0 ? 12 : shift;
      if (granuleShift < 12 || granuleShift > 30) return Status.INVAL;
      const address = readField64(view, InvalidateReq.address);
      const pages = readField64(view, InvalidateReq.nrPages);
      const granule = 1n << BigInt(granuleShift);
      if ((address & (granule - 1n)) !== 0n || pages === 0n) return Status.INVAL;
      const length = pages * granule;
      if (address + length - 1n > U64_MAX) return Status.RANGE;
      range = { iova: address, length };
    }
    const errno = this.backend.tables!.invalidate(domain.handle, range, (flags & InvalidateFlag.LEAF) !== 0);
    if (errno !== undefined) {
      this.log.error({ domain: domainId, errno }, 'backend failed to invalidate');
      return errnoToStatus(errno, Status.DEVERR);
    }
    return Status.OK;
  }

  // ---- domain bookkeeping -------------------------------------------------------------------

  private leaveDomain(endpoint: number, domainId: number): void {
    const domain = this.domains.get(domainId);
    this.attachedTo.delete(endpoint);
    if (domain === undefined) return;
    domain.endpoints.delete(endpoint);
    // §5.13.6.2: once every endpoint is detached, the domain ceases to exist (a table domain
    // lives on while PASIDs are still bound to it).
    if (domain.endpoints.size === 0 && (domain.kind !== 'table' || domain.pasids.size === 0)) this.destroyDomain(domain);
  }

  private destroyDomain(domain: Domain): void {
    this.domains.delete(domain.id);
    if (domain.kind === 'table') {
      for (const key of [...domain.pasids]) {
        const [ep, pasid] = key.split(':').map(Number) as [number, number];
        this.pasidBoundTo.delete(key);
        const errno = this.backend.tables!.detachPasid(ep, pasid);
        if (errno !== undefined) this.log.error({ endpoint: ep, pasid, errno }, 'backend refused to detach a PASID');
      }
      domain.pasids.clear();
      for (const ep of domain.endpoints) {
        this.attachedTo.delete(ep);
        this.unattachedMode(ep);
      }
      domain.endpoints.clear();
      this.backend.tables!.destroyTableDomain(domain.handle);
      return;
    }
    if (domain.kind === 'paging') {
      for (const ep of domain.endpoints) {
        this.attachedTo.delete(ep);
        this.unattachedMode(ep);
      }
      this.backend.destroyPagingDomain(domain.handle);
    } else {
      for (const ep of domain.endpoints) {
        this.attachedTo.delete(ep);
        this.unattachedMode(ep);
      }
    }
    domain.endpoints.clear();
  }

  /** Puts every endpoint that is not attached into bypass or blocked, per the current rules. */
  private applyUnattachedMode(): void {
    for (const ep of this.endpointIds) if (!this.attachedTo.has(ep)) this.unattachedMode(ep);
  }

  private unattachedMode(endpoint: number): void {
    const errno = this.detachedMode(endpoint);
    if (errno !== undefined) this.log.error({ endpoint, errno }, 'backend refused the unattached-endpoint mode');
  }

  /**
   * The backend state of an endpoint attached to no domain: bypass or blocked per the rules, unless
   * a sibling of its isolation group is attached — then it only leaves the group's attachment (the
   * group's translation is one; switching it would move the sibling too).
   */
  private detachedMode(endpoint: number): string | undefined {
    const siblingAttached = this.backend.groupSiblings(endpoint).some((s) => this.attachedTo.has(s));
    if (siblingAttached) return this.backend.attachBlocked(endpoint);
    return this.bypassInEffect() ? this.backend.attachIdentity(endpoint) : this.backend.attachBlocked(endpoint);
  }

  /**
   * §5.13.6: an unattached endpoint is in bypass if BYPASS_CONFIG is offered and `bypass` is 1
   * (even when the driver did not accept the feature), or if legacy BYPASS was negotiated.
   */
  private bypassInEffect(): boolean {
    if (this.offers(IommuFeature.BYPASS_CONFIG) && this.bypass) return true;
    return this.negotiatedFeature(IommuFeature.BYPASS);
  }

  private domainInRange(domainId: number): boolean {
    if (!this.offers(IommuFeature.DOMAIN_RANGE)) return true;
    return domainId >= this.domainRange[0] && domainId <= this.domainRange[1];
  }

  private offers(bit: number): boolean {
    return hasFeature(this.offeredFeatures, bit);
  }

  private negotiatedFeature(bit: number): boolean {
    return hasFeature(this.negotiated, bit);
  }

  private count(outcome: Outcome): void {
    const name = outcome === 'NONE' ? 'NONE' : (STATUS_NAMES[outcome] ?? String(outcome));
    this.byStatus.set(name, (this.byStatus.get(name) ?? 0) + 1);
  }

  // ---- migration ----------------------------------------------------------------------------

  /**
   * The model's state beyond its transport, as plain data: config `bypass`, the domains with the
   * backend objects behind them, fault records waiting for event buffers, and the counters. Taken
   * while the device is paused (its worker runs no pass), after fault records were drained.
   */
  saveState(): VirtioIommuState {
    const domains = [...this.domains.values()].map((d): DomainState => {
      const endpoints = [...d.endpoints].sort((a, b) => a - b);
      if (d.kind === 'bypass') return { id: d.id, kind: 'bypass', endpoints };
      if (d.kind === 'paging') return { id: d.id, kind: 'paging', ioas: d.handle.ioas, hwpt: d.handle.hwpt, endpoints };
      const pasids = [...d.pasids].map((key) => {
        const [endpoint, pasid] = key.split(':').map(Number) as [number, number];
        return { endpoint, pasid };
      });
      return { id: d.id, kind: 'table', hwpt: d.handle.hwpt, rootGpa: d.table.rootGpa, addrWidth: d.table.addrWidth, endpoints, pasids };
    });
    return {
      offeredFeatures: this.offeredFeatures,
      endpoints: [...this.endpointIds].sort((a, b) => a - b),
      bypass: this.bypass,
      domains,
      pendingFaults: this.pendingFaults.map((f) => ({
        reason: f.reason,
        endpoint: f.endpoint,
        pasid: f.pasid ?? null,
        address: f.address ?? null,
        read: f.read === true,
        write: f.write === true,
        exec: f.exec === true,
      })),
      counters: { ...this.counters },
      byStatus: Object.fromEntries(this.byStatus),
    };
  }

  /**
   * Takes over a saved state (options.restoreFrom), on a device whose backend was restored from
   * the same image (so the backend IDs in the domains name the same objects), before the
   * transport activates the device. Everything is checked first — shape, this device's
   * configuration, the isolation-group rule, that each domain's backend objects exist — and a
   * state that does not fit throws StateError with the model unchanged.
   */
  private takeOverState(raw: unknown): void {
    if (this.domains.size > 0 || this.env !== undefined || this.pendingFaults.length > 0) {
      throw new StateError('device', 'restore needs a fresh device (no domains, not activated)');
    }
    try {
      this.restoreChecked(raw);
    } finally {
      this.backend.endRestore?.();
    }
  }

  private restoreChecked(raw: unknown): void {
    const state = parseIommuState(raw, {
      offeredFeatures: this.offeredFeatures,
      endpoints: this.endpointIds,
      maxDomains: this.maxDomains,
      maxPendingFaults: this.maxPendingFaults,
      statusNames: new Set([...Object.values(STATUS_NAMES), 'NONE']),
    });
    const attachedTo = new Map<number, number>();
    for (const d of state.domains) for (const ep of d.endpoints) attachedTo.set(ep, d.id);
    // Endpoints that cannot be isolated share one translation: never two domains (§5.13.6.1).
    for (const [ep, domainId] of attachedTo) {
      for (const sibling of this.backend.groupSiblings(ep)) {
        const theirs = attachedTo.get(sibling);
        if (theirs !== undefined && theirs !== domainId) throw new StateError('device.domains', `endpoints ${ep} and ${sibling} share an isolation group but sit in domains ${domainId} and ${theirs}`);
      }
    }
    const domains = new Map<number, Domain>();
    const pasidBoundTo = new Map<string, number>();
    // One domain, one set of backend objects: two domains naming the same IOAS or HWPT would
    // share mappings the guest believes separate.
    const backendIds = new Set<number>();
    const claim = (id: number, field: string): void => {
      if (id === 0) return;
      if (backendIds.has(id)) throw new StateError(field, `backend object ${id} belongs to two domains`);
      backendIds.add(id);
    };
    for (const [i, d] of state.domains.entries()) {
      if (d.kind === 'paging') {
        claim(d.ioas, `device.domains[${i}].ioas`);
        claim(d.hwpt, `device.domains[${i}].hwpt`);
      } else if (d.kind === 'table') {
        claim(d.hwpt, `device.domains[${i}].hwpt`);
      }
    }
    for (const [i, d] of state.domains.entries()) {
      if (this.offers(IommuFeature.DOMAIN_RANGE) && !this.domainInRange(d.id)) throw new StateError(`device.domains[${i}].id`, `domain ${d.id} is outside the domain range`);
      const endpoints = new Set(d.endpoints);
      if (d.kind === 'bypass') {
        domains.set(d.id, { id: d.id, kind: 'bypass', endpoints });
      } else if (d.kind === 'paging') {
        const handle = this.backend.restoredPagingDomain(d.ioas, d.hwpt);
        if (typeof handle === 'string') throw new StateError(`device.domains[${i}]`, `IOAS ${d.ioas} / HWPT ${d.hwpt}: ${handle}`);
        // The count is the backend's areas, not a number from the image.
        const mappings = this.backend.mappingsIn(handle, 0n, U64_MAX).length;
        if (mappings > this.maxMappingsPerDomain) throw new StateError(`device.domains[${i}]`, `${mappings} mappings, more than the ${this.maxMappingsPerDomain} allowed`);
        domains.set(d.id, { id: d.id, kind: 'paging', handle, endpoints, mappings });
      } else {
        const tables = this.backend.tables;
        if (tables === undefined || !this.offers(IommuFeature.ATTACH_TABLE)) throw new StateError(`device.domains[${i}]`, 'a table domain, but this device does not offer ATTACH_TABLE');
        const table: StageOneTable = { rootGpa: d.rootGpa, addrWidth: d.addrWidth };
        const handle = tables.restoredTableDomain(d.hwpt, table);
        if (typeof handle === 'string') throw new StateError(`device.domains[${i}]`, `HWPT ${d.hwpt}: ${handle}`);
        const pasids = new Set<string>();
        for (const p of d.pasids) {
          if (p.pasid >= 2 ** tables.pasidBits(p.endpoint)) throw new StateError(`device.domains[${i}].pasids`, `PASID ${p.pasid} is beyond endpoint ${p.endpoint}'s PASID width`);
          const key = pasidKey(p.endpoint, p.pasid);
          pasids.add(key);
          pasidBoundTo.set(key, d.id);
        }
        domains.set(d.id, { id: d.id, kind: 'table', handle, table, endpoints, pasids });
      }
    }
    // Checked: take it over.
    for (const [id, d] of domains) this.domains.set(id, d);
    for (const [ep, id] of attachedTo) this.attachedTo.set(ep, id);
    for (const [key, id] of pasidBoundTo) this.pasidBoundTo.set(key, id);
    this.bypass = state.bypass;
    for (const f of state.pendingFaults) {
      const fault: EndpointFault = {
        reason: f.reason,
        endpoint: f.endpoint,
        ...(f.pasid !== null ? { pasid: f.pasid } : {}),
        ...(f.address !== null ? { address: f.address } : {}),
        read: f.read,
        write: f.write,
        exec: f.exec,
      };
      const key = faultKey(fault);
      if (this.pendingKeys.has(key)) continue;
      this.pendingFaults.push(fault);
      this.pendingKeys.add(key);
    }
    Object.assign(this.counters, state.counters);
    this.byStatus.clear();
    for (const [name, n] of Object.entries(state.byStatus)) this.byStatus.set(name, n);
    this.log.info({ domains: domains.size, pendingFaults: this.pendingFaults.length }, 'device state restored');
  }

  stats(): VirtioIommuStats {
    return {
      requests: this.counters.requests,
      byStatus: Object.fromEntries(this.byStatus),
      unparsable: this.counters.unparsable,
      domains: this.domains.size,
      faultsReported: this.counters.faultsReported,
      faultsPending: this.pendingFaults.length,
      faultsDropped: this.counters.faultsDropped,
      faultsCoalesced: this.counters.faultsCoalesced,
      deferredPasses: this.counters.deferredPasses,
    };
  }
}

/** iommufd errno → virtio-iommu status, for failures the request checks did not catch first. */
export function errnoToStatus(errno: string, fallback: Status): Status {
  switch (errno) {
    case 'ENOENT':
      return Status.NOENT;
    case 'EEXIST':
    case 'EINVAL':
    case 'EADDRINUSE':
      return Status.INVAL;
    case 'ERANGE':
    case 'EOVERFLOW':
      return Status.RANGE;
    case 'ENOMEM':
    case 'ENOSPC':
      return Status.NOMEM;
    case 'EFAULT':
      return Status.FAULT;
    case 'EOPNOTSUPP':
      return Status.UNSUPP;
    default:
      return fallback;
  }
}
