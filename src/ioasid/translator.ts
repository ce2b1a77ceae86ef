import { GPA_LIMIT } from '../memory/guest-memory.js';
import { EntryFlag, MAX_IOVA_PFN, PAGE_SHIFT, PAGE_SIZE } from '../pagetable/format.js';
import { TableReader, emptyLeafInfo, type LeafInfo } from '../pagetable/walk.js';
import { AttachKind, TranslationReader, emptyRowValue, type DeviceTableDescriptor } from './device-table.js';
import { FaultAccess, FaultReason, NO_PASID, type FaultProducer, type FaultReasonValue } from './fault-queue.js';
import { Iotlb, type IotlbOptions, type IotlbStats } from './iotlb.js';
import { EpochChange, type EpochChangeValue, type QuiescenceWorker } from './quiescence.js';

/** How a (device, PASID) translates; the same values as the device table's attachment kinds. */
export const TranslationKind = {
  /** Every DMA faults (DOMAIN). */
  BLOCKED: 0,
  /** IOVA is GPA. */
  IDENTITY: 1,
  /** Walk the address space whose header slot is `header`. */
  PAGING: 2,
} as const;

export interface Attachment {
  kind: number;
  /** PAGING: Int32 index of the address space's header slot in the table pool. */
  header: number;
}

/**
 * Where the translator learns what a device is attached to: the context's shared device table, or
 * a fixed table in tests. Called only on the first DMA of a device after the epoch moved, so it
 * may be slower than the IOTLB, but it must read shared memory only and must not allocate.
 */
export interface AttachmentSource {
  /** Fills `out` for (deviceSlot, pasid); pasid is NO_PASID for a DMA without one. Unknown: BLOCKED. */
  resolve(deviceSlot: number, pasid: number, out: Attachment): void;
}

/** A fixed, thread-local attachment table (tests, benches, single-address-space devices). */
export class FixedAttachments implements AttachmentSource {
  private readonly table = new Map<number, Attachment>();

  private static key(deviceSlot: number, pasid: number): number {
    // PASIDs are 20 bits; NO_PASID (-1) becomes 0.
    return deviceSlot * 2 ** 21 + (pasid + 1);
  }

  set(deviceSlot: number, pasid: number, kind: number, header = 0): this {
    this.table.set(FixedAttachments.key(deviceSlot, pasid), { kind, header });
    return this;
  }

  resolve(deviceSlot: number, pasid: number, out: Attachment): void {
    const a = this.table.get(FixedAttachments.key(deviceSlot, pasid));
    out.kind = a?.kind ?? TranslationKind.BLOCKED;
    out.header = a?.header ?? 0;
  }
}

/**
 * Attachments read from a context's shared device table (Context.describeShared()), as a device
 * worker finds them: the device's row for a DMA without PASID, the PASID's row through the
 * device's PASID directory otherwise. Nested attachments are not translated yet: they block.
 */
export class DeviceTableAttachments implements AttachmentSource {
  private readonly reader: TranslationReader;
  private readonly row = emptyRowValue();

  constructor(shared: { readonly pool: { readonly buffer: SharedArrayBuffer }; readonly devices: DeviceTableDescriptor }) {
    this.reader = new TranslationReader(shared);
  }

  resolve(deviceSlot: number, pasid: number, out: Attachment): void {
    // The device table keeps the RID translation as PASID 0.
    const r = this.reader.findPasidRow(deviceSlot, pasid === NO_PASID ? 0 : pasid);
    if (r < 0) {
      out.kind = TranslationKind.BLOCKED;
      out.header = 0;
      return;
    }
    this.reader.readRow(r, this.row);
    const kind = this.row.kind;
    out.kind = kind === AttachKind.PAGING ? TranslationKind.PAGING : kind === AttachKind.IDENTITY ? TranslationKind.IDENTITY : TranslationKind.BLOCKED;
    out.header = kind === AttachKind.PAGING ? this.row.header : 0;
  }
}

/** One contiguous guest-physical range of a translated DMA. */
export interface Span {
  readonly gpa: number;
  readonly length: number;
}

/**
 * The output of translate(): reused on every call so the hit path allocates nothing. Span i is
 * [gpa[i], gpa[i] + bytes[i]); contiguous guest pages are merged into one span.
 */
export class SpanList {
  declare count: number;
  declare gpa: Float64Array;
  declare bytes: Float64Array;

  constructor(capacity = 16) {
    this.count = 0;
    this.gpa = new Float64Array(capacity);
    this.bytes = new Float64Array(capacity);
  }

  push(gpa: number, bytes: number): void {
    const n = this.count;
    if (n > 0 && this.gpa[n - 1]! + this.bytes[n - 1]! === gpa) {
      this.bytes[n - 1] = this.bytes[n - 1]! + bytes;
      return;
    }
    if (n === this.gpa.length) {
      const gpaGrown = new Float64Array(n * 2);
      gpaGrown.set(this.gpa);
      const bytesGrown = new Float64Array(n * 2);
      bytesGrown.set(this.bytes);
      this.gpa = gpaGrown;
      this.bytes = bytesGrown;
    }
    this.gpa[n] = gpa;
    this.bytes[n] = bytes;
    this.count = n + 1;
  }

  /** A copy as plain objects (allocates: for tests and slow paths). */
  toArray(): Span[] {
    const out: Span[] = [];
    for (let i = 0; i < this.count; i++) out.push({ gpa: this.gpa[i]!, length: this.bytes[i]! });
    return out;
  }
}

export interface TranslatorOptions {
  /** The context's table pool (a growable SharedArrayBuffer). */
  readonly pool: SharedArrayBuffer;
  readonly attachments: AttachmentSource;
  /** This worker's quiescence slot: every translation happens inside one of its DMAs. */
  readonly quiescence: QuiescenceWorker;
  /** Where faults are reported; none: translate() still returns the reason. */
  readonly faults?: FaultProducer;
  readonly iotlb?: IotlbOptions;
}

export interface TranslatorStats {
  readonly translations: number;
  readonly faults: number;
  readonly dmas: number;
  /** DMAs that began in a new epoch (caches revalidated or flushed). */
  readonly epochChanges: number;
  readonly iotlb: IotlbStats;
}

const U64_MAX = (1n << 64n) - 1n;
// Plain numbers for the per-page path (no property loads on the imported tables there).
const OK = FaultReason.NONE;
const PAGING = TranslationKind.PAGING;
const IDENTITY = TranslationKind.IDENTITY;
const PAGE = PAGE_SIZE;
const SHIFT = PAGE_SHIFT;
const LAST_PFN = MAX_IOVA_PFN;
const NEED_READ = EntryFlag.READ;
const NEED_WRITE = EntryFlag.WRITE;
const ACCESS_READS = FaultAccess.READ | FaultAccess.EXEC;
const ACCESS_WRITES = FaultAccess.WRITE;
const NONE_PASID = NO_PASID;
/** Fault IOVAs are split at 2^32 = pfn 2^20 pages. */
const PFNS_PER_HIGH_WORD = 2 ** (32 - PAGE_SHIFT);

/**
 * A device worker's DMA translation: IOVA range → guest-physical spans, through the IOTLB and,
 * on a miss, a lock-free walk of the shared page table. One per worker thread.
 *
 * Strict unmap: every translation happens inside a DMA bracketed by beginDma()/endDma() (or
 * withDma(); translate() brackets itself when called outside one). A DMA uses translations valid
 * when it began: the owner's unmap waits for it to end. A DMA that begins after the owner bumped
 * the epoch first drops what the change may have invalidated, so it cannot see a removed
 * translation.
 */
export class Translator {
  // Declared here, assigned in the constructor only (see Iotlb): each field keeps the
  // representation of its first store, which the per-DMA and per-page paths depend on.
  declare readonly spans: SpanList;
  declare readonly iotlb: Iotlb;
  /** The last fault: reason and IOVA (u32 halves). Valid after translate() returned a fault. */
  declare faultReason: FaultReasonValue;
  declare faultIovaLo: number;
  declare faultIovaHi: number;

  private declare readonly tables: TableReader;
  private declare readonly leaf: LeafInfo;
  private declare depth: number;
  /** One-entry attachment cache, valid for the current epoch only. */
  private declare memoValid: boolean;
  private declare memoDevice: number;
  private declare memoPasid: number;
  private declare memoKind: number;
  private declare memoHeader: number;
  private declare nTranslations: number;
  private declare nFaults: number;
  private declare nDmas: number;
  private declare nEpochChanges: number;
  private declare readonly attachments: AttachmentSource;
  private declare readonly attachment: Attachment;
  private declare readonly quiescence: QuiescenceWorker;
  private declare readonly faults: FaultProducer | undefined;

  constructor(options: TranslatorOptions) {
    this.spans = new SpanList();
    this.iotlb = new Iotlb(options.iotlb);
    this.faultReason = FaultReason.NONE;
    this.faultIovaLo = 0;
    this.faultIovaHi = 0;
    this.tables = new TableReader(options.pool);
    this.leaf = emptyLeafInfo();
    this.depth = 0;
    this.memoValid = false;
    this.memoDevice = 0;
    this.memoPasid = 0;
    this.memoKind = 0;
    this.memoHeader = 0;
    this.nTranslations = 0;
    this.nFaults = 0;
    this.nDmas = 0;
    this.nEpochChanges = 0;
    this.attachments = options.attachments;
    this.attachment = { kind: TranslationKind.BLOCKED, header: 0 };
    this.quiescence = options.quiescence;
    this.faults = options.faults;
  }

  /** Enters a DMA (nests: only the outermost one talks to the owner). */
  beginDma(): void {
    if (this.depth !== 0) {
      this.depth++;
      return;
    }
    const change = this.quiescence.beginDma();
    this.depth = 1;
    this.nDmas++;
    if (change !== EpochChange.NONE) this.dropStale(change);
  }

  /** Leaves a DMA: from the owner's point of view, nothing this DMA did is still in flight. */
  endDma(): void {
    if (this.depth === 0) throw new Error('endDma() without beginDma()');
    if (--this.depth === 0) this.quiescence.endDma();
  }

  /** Runs `fn` as one DMA: each of its translations is valid at its start, or faults. */
  withDma<T>(fn: () => T): T {
    this.beginDma();
    try {
      return fn();
    } finally {
      this.endDma();
    }
  }

  private dropStale(change: EpochChangeValue): void {
    this.nEpochChanges++;
    // Attachments have no generation of their own: any epoch may have changed one.
    this.memoValid = false;
    if (change === EpochChange.FLUSH) this.iotlb.flush();
    else this.iotlb.revalidate(this.tables);
  }

  /**
   * Translates [iova, iova + length) for an `access` (FaultAccess bits) by device `deviceSlot`
   * with `pasid` (undefined: none). On success returns FaultReason.NONE (0) with the guest ranges
   * in `spans`; otherwise the reason, with faultIovaLo/Hi set and a record appended to the fault
   * queue (`spans` then holds the part translated before the faulting page). IOVAs at or above
   * 2^53 come as a bigint. Throws RangeError only for arguments no device could produce (negative,
   * fractional, beyond 64 bits).
   */
  translate(deviceSlot: number, pasid: number | undefined, iova: number | bigint, length: number, access: number): FaultReasonValue {
    if (this.depth !== 0) return this.translateIn(deviceSlot, pasid === undefined ? NONE_PASID : pasid, iova, length, access);
    return this.translateAlone(deviceSlot, pasid === undefined ? NONE_PASID : pasid, iova, length, access);
  }

  /** A translation outside any DMA is a DMA of its own. */
  private translateAlone(deviceSlot: number, pasid: number, iova: number | bigint, length: number, access: number): FaultReasonValue {
    this.beginDma();
    try {
      return this.translateIn(deviceSlot, pasid, iova, length, access);
    } finally {
      this.endDma();
    }
  }

  private translateIn(deviceSlot: number, pasid: number, iova: number | bigint, length: number, access: number): FaultReasonValue {
    this.spans.count = 0;
    this.nTranslations++;
    let pfn: number;
    let offset: number;
    if (typeof iova === 'number') {
      if (!(iova >= 0 && iova <= Number.MAX_SAFE_INTEGER && Number.isInteger(iova))) throw new RangeError(`bad IOVA ${iova}`);
      pfn = Math.floor(iova / PAGE);
      offset = iova - pfn * PAGE;
    } else {
      if (iova < 0n || iova > U64_MAX) throw new RangeError(`IOVA ${iova} is not a 64-bit address`);
      pfn = Number(iova >> BigInt(PAGE_SHIFT));
      offset = Number(iova & BigInt(PAGE_SIZE - 1));
    }
    if (!(length >= 0 && Number.isSafeInteger(length))) throw new RangeError(`bad DMA length ${length}`);
    if (length === 0) return OK;

    if (!this.memoValid || this.memoDevice !== deviceSlot || this.memoPasid !== pasid) {
      this.attachments.resolve(deviceSlot, pasid, this.attachment);
      this.memoDevice = deviceSlot;
      this.memoPasid = pasid;
      this.memoKind = this.attachment.kind;
      this.memoHeader = this.attachment.header;
      this.memoValid = true;
    }
    if (this.memoKind === PAGING) {
      if (offset + length > PAGE) return this.translatePaging(deviceSlot, pasid, this.memoHeader, pfn, offset, length, access);
      // The common case on its own: one page, one span, written directly.
      const leaf = this.leaf;
      const header = this.memoHeader;
      if (!this.iotlb.lookup(header, pfn, leaf) && !this.fill(header, pfn, leaf)) {
        return this.fault(FaultReason.MAPPING, deviceSlot, pasid, pfn, offset, length, access);
      }
      const need = ((access & ACCESS_READS) !== 0 ? NEED_READ : 0) | ((access & ACCESS_WRITES) !== 0 ? NEED_WRITE : 0);
      if ((leaf.flags & need) !== need) return this.fault(FaultReason.PERMISSION, deviceSlot, pasid, pfn, offset, length, access);
      const spans = this.spans;
      spans.gpa[0] = leaf.guestPfn * PAGE + offset;
      spans.bytes[0] = length;
      spans.count = 1;
      return OK;
    }
    if (this.memoKind === IDENTITY) {
      // Identity: the IOVA is the GPA, which must stay a safe integer (guest memory checks the rest).
      if (pfn * PAGE_SIZE + offset + length > GPA_LIMIT) return this.fault(FaultReason.MAPPING, deviceSlot, pasid, pfn, offset, length, access);
      this.spans.push(pfn * PAGE_SIZE + offset, length);
      return OK;
    }
    return this.fault(FaultReason.DOMAIN, deviceSlot, pasid, pfn, offset, length, access);
  }

  private translatePaging(
    deviceSlot: number,
    pasid: number,
    header: number,
    pfn: number,
    offset: number,
    length: number,
    access: number,
  ): FaultReasonValue {
    if (pfn + Math.floor((offset + length - 1) / PAGE) > LAST_PFN) {
      return this.fault(FaultReason.MAPPING, deviceSlot, pasid, pfn, offset, length, access);
    }
    // The table has no execute bit: an instruction fetch needs read permission.
    const need = ((access & ACCESS_READS) !== 0 ? NEED_READ : 0) | ((access & ACCESS_WRITES) !== 0 ? NEED_WRITE : 0);
    const leaf = this.leaf;
    const iotlb = this.iotlb;
    let cur = pfn;
    let off = offset;
    let left = length;
    while (left > 0) {
      if (!iotlb.lookup(header, cur, leaf) && !this.fill(header, cur, leaf)) {
        return this.fault(FaultReason.MAPPING, deviceSlot, pasid, cur, off, length, access);
      }
      if ((leaf.flags & need) !== need) return this.fault(FaultReason.PERMISSION, deviceSlot, pasid, cur, off, length, access);
      const leafEnd = leaf.leafPfn + (1 << (leaf.pageShift - SHIFT));
      const chunk = Math.min(left, (leafEnd - cur) * PAGE - off);
      this.spans.push(leaf.guestPfn * PAGE + off, chunk);
      left -= chunk;
      cur = leafEnd;
      off = 0;
    }
    return OK;
  }

  /** An IOTLB miss: walks the table and caches the leaf. False when nothing is mapped there. */
  private fill(header: number, pfn: number, leaf: LeafInfo): boolean {
    // The generation is read before the walk: if an unmap lands during the walk, the entry is
    // filed under the old generation and dropped at the next revalidation.
    const generation = this.tables.generation(header);
    if (!this.tables.walk(header, pfn, leaf)) return false;
    this.iotlb.insert(header, generation, leaf);
    return true;
  }

  private fault(reason: FaultReasonValue, deviceSlot: number, pasid: number, pfn: number, offset: number, length: number, access: number): FaultReasonValue {
    // Split pfn * 4096 + offset at 2^32 without leaving exact integers (IOVAs reach 2^64).
    const hi = Math.floor(pfn / PFNS_PER_HIGH_WORD);
    const lo = ((pfn - hi * PFNS_PER_HIGH_WORD) * PAGE_SIZE + offset) >>> 0;
    this.faultReason = reason;
    this.faultIovaLo = lo;
    this.faultIovaHi = hi;
    this.nFaults++;
    this.faults?.append(deviceSlot, pasid, lo, hi, access, reason, length);
    return reason;
  }

  /** The last fault's IOVA as a 64-bit value. */
  get faultIova(): bigint {
    return (BigInt(this.faultIovaHi) << 32n) | BigInt(this.faultIovaLo);
  }

  stats(): TranslatorStats {
    return {
      translations: this.nTranslations,
      faults: this.nFaults,
      dmas: this.nDmas,
      epochChanges: this.nEpochChanges,
      iotlb: this.iotlb.stats(),
    };
  }
}
