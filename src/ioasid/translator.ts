import { GPA_LIMIT, type GuestMemoryDescriptor } from '../memory/guest-memory.js';
import { EntryFlag, MAX_IOVA_PFN, PAGE_SHIFT, PAGE_SIZE } from '../pagetable/format.js';
import { TableReader, emptyLeafInfo, type LeafInfo } from '../pagetable/walk.js';
import { X86Fault, type X86FaultValue } from '../pagetable/x86-64.js';
import { AttachKind, DeviceRowFlag, TranslationReader, emptyRowValue, type DeviceTableDescriptor } from './device-table.js';
import { FaultAccess, FaultReason, NO_PASID, type FaultProducer, type FaultReasonValue } from './fault-queue.js';
import { Iotlb, type GenerationSource, type IotlbOptions, type IotlbStats, type RangeVisitor } from './iotlb.js';
import { GuestWords, NestedFlag, NestedResult, NestedWalker, type NestedResultValue } from './nested.js';
import { EpochChange, type EpochChangeValue, type QuiescenceWorker } from './quiescence.js';
import { emptyStage1View, readInvalidations, readStage1, type Stage1View } from './stage1-record.js';

/** How a (device, PASID) translates; the same values as the device table's attachment kinds. */
export const TranslationKind = {
  /** Every DMA faults (DOMAIN). */
  BLOCKED: 0,
  /** IOVA is GPA. */
  IDENTITY: 1,
  /** Walk the address space whose header slot is `header`. */
  PAGING: 2,
  /** Walk the guest's stage-1 table described by the stage-1 record at `header`, over its stage 2. */
  NESTED: 3,
} as const;

export interface Attachment {
  kind: number;
  /** PAGING: Int32 index of the address space's header slot in the table pool. NESTED: of the stage-1 record. */
  header: number;
  /**
   * Dirty tracking is on (the HWPT's, or a nested HWPT's parent's): writes set EntryFlag.DIRTY on
   * the stage-2 leaves they go through. Sources that never track may leave it false.
   */
  dirty: boolean;
}

/**
 * Where the translator learns what a device is attached to: the context's shared device table, or
 * a fixed table in tests. Called only on the first DMA of a device after the epoch moved, so it
 * may be slower than the IOTLB, but it must read shared memory only and must not allocate.
 */
export interface AttachmentSource {
  /** Fills `out` for (deviceSlot, pasid); pasid is NO_PASID for a DMA without one. Unknown: BLOCKED. */
  resolve(deviceSlot: number, pasid: number, out: Attachment): void;
  /** Guest memory, where nested attachments' stage-1 tables live (TranslatorOptions.memory wins). */
  readonly memory?: GuestMemoryDescriptor;
}

/** A fixed, thread-local attachment table (tests, benches, single-address-space devices). */
export class FixedAttachments implements AttachmentSource {
  private readonly table = new Map<number, Attachment>();

  private static key(deviceSlot: number, pasid: number): number {
    // PASIDs are 20 bits; NO_PASID (-1) becomes 0.
    return deviceSlot * 2 ** 21 + (pasid + 1);
  }

  set(deviceSlot: number, pasid: number, kind: number, header = 0, dirty = false): this {
    this.table.set(FixedAttachments.key(deviceSlot, pasid), { kind, header, dirty });
    return this;
  }

  resolve(deviceSlot: number, pasid: number, out: Attachment): void {
    const a = this.table.get(FixedAttachments.key(deviceSlot, pasid));
    out.kind = a?.kind ?? TranslationKind.BLOCKED;
    out.header = a?.header ?? 0;
    out.dirty = a?.dirty ?? false;
  }
}

/**
 * Attachments read from a context's shared device table (Context.describeShared()), as a device
 * worker finds them: the device's row for a DMA without PASID, the PASID's row through the
 * device's PASID directory otherwise. Nested rows need guest memory (describeShared() has it).
 */
export class DeviceTableAttachments implements AttachmentSource {
  readonly memory: GuestMemoryDescriptor | undefined;
  private readonly reader: TranslationReader;
  private readonly row = emptyRowValue();

  constructor(shared: {
    readonly pool: { readonly buffer: SharedArrayBuffer };
    readonly devices: DeviceTableDescriptor;
    readonly memory?: GuestMemoryDescriptor;
  }) {
    // The reader only finds rows here; the translator walks, so it gets no memory of its own.
    this.reader = new TranslationReader({ pool: shared.pool, devices: shared.devices });
    this.memory = shared.memory;
  }

  resolve(deviceSlot: number, pasid: number, out: Attachment): void {
    // The device table keeps the RID translation as PASID 0.
    const r = this.reader.findPasidRow(deviceSlot, pasid === NO_PASID ? 0 : pasid);
    out.dirty = false;
    if (r < 0) {
      out.kind = TranslationKind.BLOCKED;
      out.header = 0;
      return;
    }
    this.reader.readRow(r, this.row);
    const kind = this.row.kind;
    if (kind === AttachKind.PAGING || kind === AttachKind.NESTED) {
      out.kind = kind === AttachKind.PAGING ? TranslationKind.PAGING : TranslationKind.NESTED;
      out.header = this.row.header;
      out.dirty = (this.row.flags & DeviceRowFlag.DIRTY_TRACKING) !== 0;
      return;
    }
    out.kind = kind === AttachKind.IDENTITY ? TranslationKind.IDENTITY : TranslationKind.BLOCKED;
    out.header = 0;
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
  /**
   * Guest memory, for nested attachments' stage-1 tables (default: the attachment source's). A
   * translator without it treats nested attachments as blocked.
   */
  readonly memory?: GuestMemoryDescriptor;
}

export interface TranslatorStats {
  readonly translations: number;
  readonly faults: number;
  readonly dmas: number;
  /** DMAs that began in a new epoch (caches revalidated or flushed). */
  readonly epochChanges: number;
  /** Leaves this translator marked dirty (first writes since the owner's last clear). */
  readonly dirtyMarks: number;
  readonly iotlb: IotlbStats;
}

const U64_MAX = (1n << 64n) - 1n;
// Plain numbers for the per-page path (no property loads on the imported tables there).
const OK = FaultReason.NONE;
const PAGING = TranslationKind.PAGING;
const IDENTITY = TranslationKind.IDENTITY;
const NESTED = TranslationKind.NESTED;
const PAGE = PAGE_SIZE;
const SHIFT = PAGE_SHIFT;
const LAST_PFN = MAX_IOVA_PFN;
const NEED_READ = EntryFlag.READ;
const NEED_WRITE = EntryFlag.WRITE;
const NEED_EXEC = NestedFlag.EXEC;
const DIRTY = EntryFlag.DIRTY;
const S1_READ = NestedFlag.S1_READ;
const S1_WRITE = NestedFlag.S1_WRITE;
const S1_EXEC = NestedFlag.S1_EXEC;
const ACCESS_READS = FaultAccess.READ | FaultAccess.EXEC;
const ACCESS_READ = FaultAccess.READ;
const ACCESS_WRITES = FaultAccess.WRITE;
const ACCESS_EXEC = FaultAccess.EXEC;
const NONE_PASID = NO_PASID;
/** Fault IOVAs are split at 2^32 = pfn 2^20 pages. */
const PFNS_PER_HIGH_WORD = 2 ** (32 - PAGE_SHIFT);

/**
 * What the IOTLB's revalidation reads: generations from the table pool, and for nested spaces the
 * invalidation ring of their stage-1 record.
 */
class PoolGenerations implements GenerationSource {
  constructor(private readonly tables: TableReader) {}

  generation(header: number): number {
    return this.tables.generation(header);
  }

  invalidations(tag: number, from: number, to: number, visit: RangeVisitor): boolean {
    return readInvalidations(this.tables.words, tag, from, to, visit);
  }
}

/**
 * A device worker's DMA translation: IOVA range → guest-physical spans, through the IOTLB and,
 * on a miss, a lock-free walk of the shared page table (for a nested attachment, the 2-D walk of
 * the guest's stage-1 table over its stage 2). One per worker thread.
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
  /**
   * For a nested attachment's fault: the stage-1 walk's X86Fault (NOT_PRESENT, RESERVED_BIT,
   * NON_CANONICAL, PERMISSION, or STAGE2) and the stage-1 level it happened at; X86Fault.NONE and
   * 0 for other faults.
   */
  declare faultDetail: X86FaultValue;
  declare faultLevel: number;

  private declare readonly tables: TableReader;
  private declare readonly generations: PoolGenerations;
  private declare readonly leaf: LeafInfo;
  private declare depth: number;
  /** One-entry attachment cache, valid for the current epoch only. */
  private declare memoValid: boolean;
  private declare memoDevice: number;
  private declare memoPasid: number;
  private declare memoKind: number;
  private declare memoHeader: number;
  /** The memoised attachment tracks dirty pages. */
  private declare memoDirty: boolean;
  /** NESTED: the stage 1 of the memoised attachment (root, levels, stage-2 header). */
  private declare readonly memoStage1: Stage1View;
  private declare readonly nested: NestedWalker | undefined;
  /** Stage-2 lookups of nested walks: the IOTLB first, a walk and a fill on a miss. */
  private declare readonly stage2Leaf: LeafInfo;
  /** markNestedWrite()'s walk. */
  private declare readonly nestedScratch: LeafInfo;
  /** markDirty()'s walk. */
  private declare readonly dirtyLeaf: LeafInfo;
  private declare nTranslations: number;
  private declare nFaults: number;
  private declare nDmas: number;
  private declare nEpochChanges: number;
  private declare nDirtyMarks: number;
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
    this.faultDetail = X86Fault.NONE;
    this.faultLevel = 0;
    this.tables = new TableReader(options.pool);
    this.generations = new PoolGenerations(this.tables);
    this.leaf = emptyLeafInfo();
    this.depth = 0;
    this.memoValid = false;
    this.memoDevice = 0;
    this.memoPasid = 0;
    this.memoKind = 0;
    this.memoHeader = 0;
    this.memoDirty = false;
    this.memoStage1 = emptyStage1View();
    this.stage2Leaf = emptyLeafInfo();
    this.nestedScratch = emptyLeafInfo();
    this.dirtyLeaf = emptyLeafInfo();
    const memory = options.memory ?? options.attachments.memory;
    this.nested = memory === undefined ? undefined : new NestedWalker(new GuestWords(memory), (header, pfn, leaf) => this.lookupStage2(header, pfn, leaf));
    this.nTranslations = 0;
    this.nFaults = 0;
    this.nDmas = 0;
    this.nEpochChanges = 0;
    this.nDirtyMarks = 0;
    this.attachments = options.attachments;
    this.attachment = { kind: TranslationKind.BLOCKED, header: 0, dirty: false };
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
    else this.iotlb.revalidate(this.generations);
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

    if (!this.memoValid || this.memoDevice !== deviceSlot || this.memoPasid !== pasid) this.resolve(deviceSlot, pasid);
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
      if ((leaf.flags & DIRTY) === 0 && this.memoDirty && (access & ACCESS_WRITES) !== 0) this.markDirty(header, pfn, leaf);
      const spans = this.spans;
      spans.gpa[0] = leaf.guestPfn * PAGE + offset;
      spans.bytes[0] = length;
      spans.count = 1;
      return OK;
    }
    if (this.memoKind === NESTED) {
      if (offset + length > PAGE || pfn > LAST_PFN) return this.translateNested(deviceSlot, pasid, this.memoHeader, pfn, offset, length, access);
      // One page, as for PAGING: a hit is one lookup and one flags check.
      const leaf = this.leaf;
      const tag = this.memoHeader;
      if (!this.iotlb.lookup(tag, pfn, leaf)) {
        const r = this.fillNested(tag, pfn, leaf);
        if (r !== NestedResult.OK && r !== NestedResult.OUTPUT) return this.fault(r === NestedResult.STAGE2 ? FaultReason.STAGE2 : FaultReason.MAPPING, deviceSlot, pasid, pfn, offset, length, access);
      }
      const need = ((access & ACCESS_READ) !== 0 ? NEED_READ : 0) | ((access & ACCESS_WRITES) !== 0 ? NEED_WRITE : 0) | ((access & ACCESS_EXEC) !== 0 ? NEED_EXEC : 0);
      if ((leaf.flags & need) !== need) return this.refuse(leaf.flags, need, deviceSlot, pasid, pfn, offset, length, access);
      if (this.memoDirty && (access & ACCESS_WRITES) !== 0) this.markNestedWrite(pfn);
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

  /** Looks the attachment up (first DMA of a device after an epoch change) and memoises it. */
  private resolve(deviceSlot: number, pasid: number): void {
    this.attachments.resolve(deviceSlot, pasid, this.attachment);
    this.memoDevice = deviceSlot;
    this.memoPasid = pasid;
    this.memoKind = this.attachment.kind;
    this.memoHeader = this.attachment.header;
    this.memoDirty = this.attachment.dirty;
    this.memoValid = true;
    if (this.memoKind !== NESTED) return;
    const words = this.tables.words;
    if (this.memoHeader + 16 > words.length) this.tables.refresh();
    // Without guest memory, or with a record that is not (or no longer) live: blocked.
    if (this.nested === undefined || !readStage1(this.tables.words, this.memoHeader, this.memoStage1)) this.memoKind = TranslationKind.BLOCKED;
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
      if ((leaf.flags & DIRTY) === 0 && this.memoDirty && (access & ACCESS_WRITES) !== 0) this.markDirty(header, cur, leaf);
      const leafEnd = leaf.leafPfn + (1 << (leaf.pageShift - SHIFT));
      const chunk = Math.min(left, (leafEnd - cur) * PAGE - off);
      this.spans.push(leaf.guestPfn * PAGE + off, chunk);
      left -= chunk;
      cur = leafEnd;
      off = 0;
    }
    return OK;
  }

  /**
   * A nested attachment: IOTLB entries tagged with the stage-1 record, filled by the 2-D walk.
   * Stage-1 faults are MAPPING or PERMISSION, stage-2 faults STAGE2 (faultDetail tells which).
   */
  private translateNested(
    deviceSlot: number,
    pasid: number,
    tag: number,
    pfn: number,
    offset: number,
    length: number,
    access: number,
  ): FaultReasonValue {
    if (pfn + Math.floor((offset + length - 1) / PAGE) > LAST_PFN) {
      this.faultDetail = X86Fault.NON_CANONICAL;
      this.faultLevel = 0;
      return this.fault(FaultReason.MAPPING, deviceSlot, pasid, pfn, offset, length, access);
    }
    const need = ((access & ACCESS_READ) !== 0 ? NEED_READ : 0) | ((access & ACCESS_WRITES) !== 0 ? NEED_WRITE : 0) | ((access & ACCESS_EXEC) !== 0 ? NEED_EXEC : 0);
    const leaf = this.leaf;
    const iotlb = this.iotlb;
    let cur = pfn;
    let off = offset;
    let left = length;
    while (left > 0) {
      if (!iotlb.lookup(tag, cur, leaf)) {
        const r = this.fillNested(tag, cur, leaf);
        // OUTPUT: leaf.flags has the stage-1 rights only, so refuse() tells which stage faults.
        if (r !== NestedResult.OK && r !== NestedResult.OUTPUT) return this.fault(r === NestedResult.STAGE2 ? FaultReason.STAGE2 : FaultReason.MAPPING, deviceSlot, pasid, cur, off, length, access);
      }
      if ((leaf.flags & need) !== need) return this.refuse(leaf.flags, need, deviceSlot, pasid, cur, off, length, access);
      if (this.memoDirty && (access & ACCESS_WRITES) !== 0) this.markNestedWrite(cur);
      const leafEnd = leaf.leafPfn + (1 << (leaf.pageShift - SHIFT));
      const chunk = Math.min(left, (leafEnd - cur) * PAGE - off);
      this.spans.push(leaf.guestPfn * PAGE + off, chunk);
      left -= chunk;
      cur = leafEnd;
      off = 0;
    }
    return OK;
  }

  /** A combined translation without a right the access needs: stage 1's fault, or stage 2's. */
  private refuse(flags: number, need: number, deviceSlot: number, pasid: number, pfn: number, offset: number, length: number, access: number): FaultReasonValue {
    const s1 = ((need & NEED_READ) !== 0 ? S1_READ : 0) | ((need & NEED_WRITE) !== 0 ? S1_WRITE : 0) | ((need & NEED_EXEC) !== 0 ? S1_EXEC : 0);
    const stage1 = (flags & s1) !== s1;
    this.faultDetail = stage1 ? X86Fault.PERMISSION : X86Fault.STAGE2;
    this.faultLevel = 0;
    return this.fault(stage1 ? FaultReason.PERMISSION : FaultReason.STAGE2, deviceSlot, pasid, pfn, offset, length, access);
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

  /**
   * Dirty tracking: the first write through a leaf since the owner last cleared its DIRTY bit.
   * Sets the bit in the shared table (one compare-and-swap) and re-files the cached leaf with it, so
   * later writes through the same leaf cost one flags test. A huge leaf is marked whole, as the
   * kernel's dirty tracking marks a huge IOPTE (and reports every page under it).
   *
   * Why no write is lost: a cached leaf says DIRTY only if the bit was set when it was walked or
   * marked. The owner's read-and-clear bumps the address space's GENERATION after clearing and then
   * waits for DMAs in flight (docs/data-plane.md, "Dirty tracking"), so a DMA that begins after that
   * re-walks and marks again, and one already in flight ends before the read returns the bit it set.
   */
  private markDirty(header: number, pfn: number, leaf: LeafInfo): void {
    this.tables.markDirty(header, pfn);
    leaf.flags |= DIRTY;
    this.nDirtyMarks++;
    // Re-file from a fresh walk under the generation read before it (as fill() does), never the
    // cached copy: after an unmap that is waiting for this DMA, the cached leaf must not be filed
    // under the new generation.
    const fresh = this.dirtyLeaf;
    const generation = this.tables.generation(header);
    if (this.tables.walk(header, pfn, fresh) && (fresh.flags & DIRTY) !== 0) this.iotlb.insert(header, generation, fresh);
  }

  /**
   * A write through a nested attachment while its parent tracks dirty pages. The stage-2 leaf to
   * mark is the one stage 1 led to (its output GPA), which the IOTLB's combined entry does not
   * keep: a fresh stage-1 walk finds it. That costs a walk per write, only while tracking is on.
   * (The combined leaf is never larger than that stage-2 leaf, so one mark covers the chunk.)
   */
  private markNestedWrite(iovaPfn: number): void {
    const walker = this.nested;
    if (walker === undefined) return;
    const r = walker.walk(this.memoStage1, iovaPfn, this.nestedScratch);
    if (r === NestedResult.OK) this.markStage2Dirty(walker.stage1Pfn);
  }

  /** Nested: dirty tracking is on the parent (stage 2), so the write dirties the output page's stage-2 leaf. */
  private markStage2Dirty(guestPfn: number): void {
    const stage2 = this.memoStage1.stage2;
    const leaf = this.stage2Leaf;
    if (!this.lookupStage2(stage2, guestPfn, leaf) || (leaf.flags & DIRTY) !== 0) return;
    this.markDirty(stage2, guestPfn, leaf);
  }

  /** Stage-2 lookups of a nested walk: table pages and output pages are cached like any page. */
  private lookupStage2(header: number, pfn: number, leaf: LeafInfo): boolean {
    return this.iotlb.lookup(header, pfn, leaf) || this.fill(header, pfn, leaf);
  }

  /** A nested IOTLB miss: the 2-D walk, cached under the stage-1 record. Returns a NestedResult. */
  private fillNested(tag: number, pfn: number, leaf: LeafInfo): NestedResultValue {
    const stage1 = this.memoStage1;
    const stage2 = stage1.stage2;
    // Both generations before the walk (see fill()); stage-2 entries the walk reuses are made no
    // older than the stage-2 generation the result is filed under.
    const generation = this.tables.generation(tag);
    const parentGeneration = this.tables.generation(stage2);
    this.iotlb.sync(stage2, parentGeneration);
    const walker = this.nested;
    // resolve() only memoises NESTED when there is a walker.
    if (walker === undefined) return NestedResult.STAGE1;
    const r = walker.walk(stage1, pfn, leaf);
    if (r === NestedResult.OK) {
      this.iotlb.insertNested(tag, generation, stage2, parentGeneration, leaf);
    } else if (r !== NestedResult.OUTPUT) {
      const x86 = walker.x86;
      this.faultDetail = r === NestedResult.STAGE2 ? X86Fault.STAGE2 : x86.fault;
      this.faultLevel = x86.faultLevel;
    }
    return r;
  }

  private fault(reason: FaultReasonValue, deviceSlot: number, pasid: number, pfn: number, offset: number, length: number, access: number): FaultReasonValue {
    // Split pfn * 4096 + offset at 2^32 without leaving exact integers (IOVAs reach 2^64).
    const hi = Math.floor(pfn / PFNS_PER_HIGH_WORD);
    const lo = ((pfn - hi * PFNS_PER_HIGH_WORD) * PAGE_SIZE + offset) >>> 0;
    if (this.memoKind !== NESTED) {
      this.faultDetail = X86Fault.NONE;
      this.faultLevel = 0;
    }
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
      dirtyMarks: this.nDirtyMarks,
      iotlb: this.iotlb.stats(),
    };
  }
}
