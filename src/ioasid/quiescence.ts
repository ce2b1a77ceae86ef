import type { Logger } from '../log/logger.js';
import { silentLogger } from '../log/logger.js';

/**
 * Strict-unmap quiescence between the owner of a context (the only writer of its page tables and
 * device table) and the device workers that translate through them.
 *
 * One shared block: a global part the owner writes (the epoch) and one slot per device worker that
 * only that worker writes while it runs (IN_DMA, the epoch it has observed). The owner removes a
 * translation, bumps the epoch and waits until every live worker is either outside a DMA or has
 * observed the new epoch; a worker observing a new epoch drops everything it cached before it
 * translates again. See docs/data-plane.md for the argument.
 *
 * Global words (Int32 indices). Line 0 is written by the owner only and read by every worker on
 * every DMA; ACK, the one word workers write, sits on its own 64-byte line so it never bounces it.
 */
export const QuiescenceGlobal = {
  MAGIC: 0,
  /** Worker slots in the block. */
  SLOT_COUNT: 1,
  /** Bumped by the owner after every change a worker's cache could still hold. */
  EPOCH: 2,
  /** The latest epoch whose bump requires a full flush (address space destroyed, slot revoked). */
  FLUSH_EPOCH: 3,
  /** Owner threads inside waitQuiescent (sleeping or about to): workers notify ACK only then. */
  WAITING: 4,
  /** Bumped and notified by workers that leave a DMA or catch up while the owner waits. */
  ACK: 16,
  FIELD_COUNT: 17,
  /** Words the global part occupies: FIELD_COUNT rounded up to whole 64-byte lines. */
  STRIDE: 32,
} as const;

/** One device worker's slot. Each slot starts a 64-byte line so workers never share one. */
export const QuiescenceSlot = {
  /** SlotState. Claimed by the worker (FREE → LIVE), revoked or cleared by the owner. */
  STATE: 0,
  /** 1 while the worker is inside a DMA. */
  IN_DMA: 1,
  /** The epoch the worker observed at the start of its latest DMA. */
  OBSERVED: 2,
  /**
   * DMAs the worker has finished, published while an owner waits (and by heartbeat()): tells a
   * busy worker from a stuck one.
   */
  DMA_COUNT: 3,
  /** Caller-chosen tag (e.g. the thread ID), for diagnostics. */
  TAG: 4,
  /** Times the worker found its slot revoked and came back with a full flush. */
  REVIVALS: 5,
  FIELD_COUNT: 6,
  STRIDE: 16,
} as const;

export const SlotState = {
  FREE: 0,
  LIVE: 1,
  /** Did not answer a wait in time: skipped by waits until the worker comes back. */
  DEAD: 2,
} as const;

/** What beginDma() tells the caller about its caches. */
export const EpochChange = {
  /** Nothing changed since the last DMA: caches stay valid. */
  NONE: 0,
  /** The epoch moved: revalidate per address space (generations) and drop cached attachments. */
  REVALIDATE: 1,
  /** Drop every cached translation. */
  FLUSH: 2,
} as const;
export type EpochChangeValue = (typeof EpochChange)[keyof typeof EpochChange];

export const QUIESCENCE_MAGIC = 0x51554945; // 'QUIE'
export const DEFAULT_WORKER_SLOTS = 64;

/** Signed distance a - b of two wrapping 32-bit counters. */
function ahead(a: number, b: number): number {
  return (a - b) | 0;
}

export class QuiescenceError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QuiescenceError';
  }
}

/** A zeroed quiescence block with `slots` worker slots. */
export function createQuiescenceBuffer(slots: number = DEFAULT_WORKER_SLOTS): SharedArrayBuffer {
  if (!Number.isInteger(slots) || slots < 1 || slots > 4096) throw new RangeError(`worker slots must be in [1, 4096], got ${slots}`);
  const buffer = new SharedArrayBuffer((QuiescenceGlobal.STRIDE + slots * QuiescenceSlot.STRIDE) * Int32Array.BYTES_PER_ELEMENT);
  const words = new Int32Array(buffer);
  Atomics.store(words, QuiescenceGlobal.SLOT_COUNT, slots);
  Atomics.store(words, QuiescenceGlobal.MAGIC, QUIESCENCE_MAGIC);
  return buffer;
}

function openBlock(buffer: SharedArrayBuffer): { words: Int32Array; slots: number } {
  const words = new Int32Array(buffer);
  if (Atomics.load(words, QuiescenceGlobal.MAGIC) !== QUIESCENCE_MAGIC) throw new QuiescenceError('not a quiescence block');
  return { words, slots: Atomics.load(words, QuiescenceGlobal.SLOT_COUNT) };
}

/** Int32 index of slot `slot`'s first word. */
export function slotBase(slot: number): number {
  return QuiescenceGlobal.STRIDE + slot * QuiescenceSlot.STRIDE;
}

/** A worker the owner gave up waiting for. */
export interface Straggler {
  readonly slot: number;
  readonly tag: number;
  /** The epoch it had observed (older than the one waited for). */
  readonly observed: number;
  /** Whether it finished any DMA while the owner waited (busy, not stuck). */
  readonly progressed: boolean;
}

export interface WaitOptions {
  /** How long to wait for all workers before giving up on the late ones (default 1000 ms). */
  readonly timeoutMs?: number;
  /**
   * Rounds of checks before sleeping (default 1000, some tens of microseconds): a short DMA ends
   * sooner than an Atomics.wait/notify round trip (25-43 µs here) would return.
   */
  readonly spinRounds?: number;
}

export interface QuiescenceResult {
  /** Workers that neither left their DMA nor observed the epoch in time; now marked DEAD. Empty: quiescent. */
  readonly stragglers: readonly Straggler[];
  /** Whether the owner had to sleep (diagnostics for the bench). */
  readonly slept: boolean;
}

export interface QuiescenceOwnerOptions {
  readonly log?: Logger;
}

/** The owner's side: bumps the epoch and waits for the workers. Lives in the context's thread. */
export class QuiescenceOwner {
  readonly buffer: SharedArrayBuffer;
  private readonly words: Int32Array;
  private readonly slots: number;
  private readonly log: Logger;
  /** Reused between waits: slots still pending, and their DMA counts when the wait began. */
  private readonly pending: Int32Array;
  private readonly startCounts: Int32Array;

  constructor(buffer: SharedArrayBuffer, options: QuiescenceOwnerOptions = {}) {
    this.buffer = buffer;
    ({ words: this.words, slots: this.slots } = openBlock(buffer));
    this.log = options.log ?? silentLogger;
    this.pending = new Int32Array(this.slots);
    this.startCounts = new Int32Array(this.slots);
  }

  get slotCount(): number {
    return this.slots;
  }

  get epoch(): number {
    return Atomics.load(this.words, QuiescenceGlobal.EPOCH);
  }

  /**
   * Starts a new epoch; call after the page-table or device-table change is published and before
   * waitQuiescent(). `fullFlush` when the change is not visible through an address space's
   * generation: an address space destroyed (its header slot may be reused), a slot revoked.
   * Returns the new epoch.
   */
  bumpEpoch(options: { fullFlush?: boolean } = {}): number {
    const w = this.words;
    const next = (Atomics.load(w, QuiescenceGlobal.EPOCH) + 1) | 0;
    // FLUSH_EPOCH before EPOCH: a worker that loads the new epoch then loads FLUSH_EPOCH sees it.
    if (options.fullFlush === true) Atomics.store(w, QuiescenceGlobal.FLUSH_EPOCH, next);
    Atomics.store(w, QuiescenceGlobal.EPOCH, next);
    return next;
  }

  /**
   * Whether slot `slot` can no longer use anything cached before `epoch`.
   *
   * Why one look suffices (all Atomics are sequentially consistent, so they fall in one total
   * order): a worker stores IN_DMA=1 and then loads EPOCH; the owner stores EPOCH and then loads
   * IN_DMA (this function). If the owner's load comes first in that order, the worker's store of
   * IN_DMA comes after it, so the worker's later load of EPOCH sees the new epoch and it drops its
   * caches before translating. Otherwise the owner sees IN_DMA=1 and keeps waiting until the
   * worker leaves the DMA (it started before the change: in flight, allowed to finish) or
   * publishes OBSERVED >= epoch (its current DMA began after the bump and saw the change).
   */
  private settled(slot: number, epoch: number): boolean {
    const base = slotBase(slot);
    const w = this.words;
    if (Atomics.load(w, base + QuiescenceSlot.STATE) !== SlotState.LIVE) return true;
    if (Atomics.load(w, base + QuiescenceSlot.IN_DMA) === 0) return true;
    return ahead(Atomics.load(w, base + QuiescenceSlot.OBSERVED), epoch) >= 0;
  }

  /** Re-checks the pending slots, compacting the list; returns how many remain. */
  private recheck(count: number, epoch: number): number {
    const p = this.pending;
    let kept = 0;
    for (let i = 0; i < count; i++) {
      const slot = p[i]!;
      if (!this.settled(slot, epoch)) p[kept++] = slot;
    }
    return kept;
  }

  /**
   * Returns once every live worker is outside a DMA or has observed `epoch`: from then on no DMA
   * can use a translation removed before bumpEpoch(). Spins first (a DMA usually ends within
   * microseconds), then sleeps on ACK, which workers bump while WAITING is set. Workers that do not
   * answer within the timeout are marked DEAD, reported, and made to flush everything if they come
   * back (the strict guarantee does not hold for them; the caller decides, e.g. by terminating the
   * worker and calling clearSlot()). Never hangs.
   */
  waitQuiescent(epoch: number, options: WaitOptions = {}): QuiescenceResult {
    const w = this.words;
    const timeoutMs = options.timeoutMs ?? 1000;
    const spinRounds = options.spinRounds ?? 1000;
    let count = 0;
    for (let slot = 0; slot < this.slots; slot++) {
      if (!this.settled(slot, epoch)) {
        this.pending[count++] = slot;
        this.startCounts[slot] = Atomics.load(w, slotBase(slot) + QuiescenceSlot.DMA_COUNT);
      }
    }
    for (let round = 0; count > 0 && round < spinRounds; round++) count = this.recheck(count, epoch);
    if (count === 0) return { stragglers: [], slept: false };

    const deadline = Date.now() + timeoutMs;
    Atomics.add(w, QuiescenceGlobal.WAITING, 1);
    try {
      for (;;) {
        // Load ACK before re-checking: a worker that settles after the check bumps ACK (it sees
        // WAITING, stored before), so the wait below returns at once instead of missing it.
        const ack = Atomics.load(w, QuiescenceGlobal.ACK);
        count = this.recheck(count, epoch);
        if (count === 0) return { stragglers: [], slept: true };
        const left = deadline - Date.now();
        if (left <= 0) break;
        Atomics.wait(w, QuiescenceGlobal.ACK, ack, Math.min(left, 50));
      }
    } finally {
      Atomics.sub(w, QuiescenceGlobal.WAITING, 1);
    }
    return { stragglers: this.giveUp(count, epoch), slept: true };
  }

  private giveUp(count: number, epoch: number): Straggler[] {
    const w = this.words;
    const stragglers: Straggler[] = [];
    for (let i = 0; i < count; i++) {
      const slot = this.pending[i]!;
      const base = slotBase(slot);
      if (Atomics.compareExchange(w, base + QuiescenceSlot.STATE, SlotState.LIVE, SlotState.DEAD) !== SlotState.LIVE) continue;
      stragglers.push({
        slot,
        tag: Atomics.load(w, base + QuiescenceSlot.TAG),
        observed: Atomics.load(w, base + QuiescenceSlot.OBSERVED),
        progressed: Atomics.load(w, base + QuiescenceSlot.DMA_COUNT) !== this.startCounts[slot],
      });
    }
    if (stragglers.length > 0) {
      // A revoked worker that comes back must not trust anything it cached, even if it had
      // already observed the latest epoch: a new epoch forces it through its slow path.
      this.bumpEpoch({ fullFlush: true });
      this.log.warn({ epoch, stragglers }, 'device workers did not quiesce in time; marked dead');
    }
    return stragglers;
  }

  /** Frees a slot whose worker has terminated (or will never run again). */
  clearSlot(slot: number): void {
    this.checkSlot(slot);
    const base = slotBase(slot);
    Atomics.store(this.words, base + QuiescenceSlot.IN_DMA, 0);
    Atomics.store(this.words, base + QuiescenceSlot.STATE, SlotState.FREE);
  }

  /** Slots currently registered (LIVE or DEAD), with their tags. */
  registered(): { slot: number; tag: number; state: number }[] {
    const out: { slot: number; tag: number; state: number }[] = [];
    for (let slot = 0; slot < this.slots; slot++) {
      const base = slotBase(slot);
      const state = Atomics.load(this.words, base + QuiescenceSlot.STATE);
      if (state !== SlotState.FREE) out.push({ slot, tag: Atomics.load(this.words, base + QuiescenceSlot.TAG), state });
    }
    return out;
  }

  private checkSlot(slot: number): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.slots) throw new RangeError(`no quiescence slot ${slot}`);
  }
}

/**
 * Frees every slot registered with `tag` (a worker's thread ID) and wakes a waiting owner: what
 * the thread that saw a device worker die does, from any thread, so an unmap blocked on the dead
 * worker's DMA goes on at once instead of at its timeout. Returns the slots freed.
 */
export function releaseWorkerSlots(buffer: SharedArrayBuffer, tag: number): number {
  const w = new Int32Array(buffer);
  if (Atomics.load(w, QuiescenceGlobal.MAGIC) !== QUIESCENCE_MAGIC) throw new QuiescenceError('not a quiescence block');
  const slots = Atomics.load(w, QuiescenceGlobal.SLOT_COUNT);
  let freed = 0;
  for (let slot = 0; slot < slots; slot++) {
    const base = slotBase(slot);
    if (Atomics.load(w, base + QuiescenceSlot.STATE) === SlotState.FREE || Atomics.load(w, base + QuiescenceSlot.TAG) !== tag) continue;
    Atomics.store(w, base + QuiescenceSlot.IN_DMA, 0);
    Atomics.store(w, base + QuiescenceSlot.STATE, SlotState.FREE);
    freed++;
  }
  if (freed > 0) {
    Atomics.add(w, QuiescenceGlobal.ACK, 1);
    Atomics.notify(w, QuiescenceGlobal.ACK);
  }
  return freed;
}

/**
 * A device worker's side: one per worker thread, claimed from the shared block. beginDma/endDma
 * bracket every DMA (see Translator.withDma); they are not reentrant here, the translator nests.
 */
export class QuiescenceWorker {
  // Assigned once in the constructor (no emitted field initialisers): beginDma/endDma run per DMA.
  private declare readonly words: Int32Array;
  private declare readonly base: number;
  /** The epoch this worker's caches are valid for. */
  private declare seen: number;
  private declare dmaCount: number;
  private declare released: boolean;
  declare readonly slot: number;

  private constructor(words: Int32Array, slot: number) {
    this.words = words;
    this.base = slotBase(slot);
    this.seen = Atomics.load(words, QuiescenceGlobal.EPOCH);
    this.dmaCount = 0;
    this.released = false;
    this.slot = slot;
    Atomics.store(words, this.base + QuiescenceSlot.OBSERVED, this.seen);
  }

  /** Claims a free slot for the calling worker. Throws QuiescenceError when every slot is taken. */
  static register(buffer: SharedArrayBuffer, tag = 0): QuiescenceWorker {
    const { words, slots } = openBlock(buffer);
    for (let slot = 0; slot < slots; slot++) {
      const base = slotBase(slot);
      if (Atomics.compareExchange(words, base + QuiescenceSlot.STATE, SlotState.FREE, SlotState.LIVE) === SlotState.FREE) {
        Atomics.store(words, base + QuiescenceSlot.IN_DMA, 0);
        Atomics.store(words, base + QuiescenceSlot.DMA_COUNT, 0);
        Atomics.store(words, base + QuiescenceSlot.REVIVALS, 0);
        Atomics.store(words, base + QuiescenceSlot.TAG, tag);
        return new QuiescenceWorker(words, slot);
      }
    }
    throw new QuiescenceError(`all ${slots} quiescence slots are taken`);
  }

  /**
   * Enters a DMA. Returns what the caller must drop before its next translation: NONE on the fast
   * path (two Atomics), REVALIDATE or FLUSH when the epoch moved. The observed epoch is published
   * here; that is a promise the caller keeps by acting on the result before it translates.
   */
  beginDma(): EpochChangeValue {
    const w = this.words;
    Atomics.store(w, this.base + QuiescenceSlot.IN_DMA, 1);
    const epoch = Atomics.load(w, QuiescenceGlobal.EPOCH);
    if (epoch === this.seen) return EpochChange.NONE;
    return this.catchUp(epoch);
  }

  private catchUp(epoch: number): EpochChangeValue {
    const w = this.words;
    let change: EpochChangeValue = ahead(Atomics.load(w, QuiescenceGlobal.FLUSH_EPOCH), this.seen) > 0 ? EpochChange.FLUSH : EpochChange.REVALIDATE;
    const state = Atomics.load(w, this.base + QuiescenceSlot.STATE);
    if (state !== SlotState.LIVE) {
      if (state === SlotState.FREE || this.released) {
        Atomics.store(w, this.base + QuiescenceSlot.IN_DMA, 0);
        throw new QuiescenceError(`quiescence slot ${this.slot} was cleared while its worker still runs`);
      }
      // Revoked after a timed-out wait: come back, trusting nothing cached.
      Atomics.compareExchange(w, this.base + QuiescenceSlot.STATE, SlotState.DEAD, SlotState.LIVE);
      Atomics.add(w, this.base + QuiescenceSlot.REVIVALS, 1);
      change = EpochChange.FLUSH;
    }
    this.seen = epoch;
    Atomics.store(w, this.base + QuiescenceSlot.OBSERVED, epoch);
    if (Atomics.load(w, QuiescenceGlobal.WAITING) !== 0) this.acknowledge();
    return change;
  }

  /** Leaves the DMA: everything it did with its translations happens-before the owner's next look. */
  endDma(): void {
    const w = this.words;
    Atomics.store(w, this.base + QuiescenceSlot.IN_DMA, 0);
    this.dmaCount = (this.dmaCount + 1) | 0;
    // Store IN_DMA then load WAITING, while the owner stores WAITING then loads IN_DMA: one of
    // the two sees the other (same argument as in QuiescenceOwner.settled()). The heartbeat is
    // published only then, when someone is looking: a seq-cst store per DMA is not free.
    if (Atomics.load(w, QuiescenceGlobal.WAITING) !== 0) {
      Atomics.store(w, this.base + QuiescenceSlot.DMA_COUNT, this.dmaCount);
      this.acknowledge();
    }
  }

  /** Publishes the DMA count now (diagnostics; endDma() does it while the owner waits). */
  heartbeat(): void {
    Atomics.store(this.words, this.base + QuiescenceSlot.DMA_COUNT, this.dmaCount);
  }

  private acknowledge(): void {
    Atomics.add(this.words, QuiescenceGlobal.ACK, 1);
    Atomics.notify(this.words, QuiescenceGlobal.ACK);
  }

  /** The epoch the caches were last validated against. */
  get observedEpoch(): number {
    return this.seen;
  }

  /** Gives the slot back (the worker is shutting down). */
  unregister(): void {
    if (this.released) return;
    this.released = true;
    const w = this.words;
    Atomics.store(w, this.base + QuiescenceSlot.IN_DMA, 0);
    Atomics.compareExchange(w, this.base + QuiescenceSlot.STATE, SlotState.LIVE, SlotState.FREE);
    Atomics.compareExchange(w, this.base + QuiescenceSlot.STATE, SlotState.DEAD, SlotState.FREE);
    if (Atomics.load(w, QuiescenceGlobal.WAITING) !== 0) this.acknowledge();
  }
}
