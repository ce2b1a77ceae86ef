import { threadId } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { FaultAccess, FaultReason } from '../src/ioasid/fault-queue.js';
import { IoasMapFlag, IommufdError, IommufdHost } from '../src/ioasid/index.js';
import { QuiescenceOwner, QuiescenceWorker, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../src/ioasid/translator.js';
import { IoasidIommuBackend } from '../src/iommu/ioasid-backend.js';
import { GuestMemory } from '../src/memory/index.js';

// The vDPA-style consumer: an iommufd access on a domain's IOAS, read by its worker through a
// consumer row the context keeps pointed at that IOAS.

const RW = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
const IOVA = 0x4000_0000n;

function setup() {
  const memory = GuestMemory.create(16 << 20);
  const host = new IommufdHost(memory, { devices: [{ name: 'engine', group: 'g' }] });
  const ctx = host.open();
  // As in a machine: the context and the consumer's translator share the quiescence block, so each
  // row change reaches the translator's caches.
  const quiescence = createQuiescenceBuffer(2);
  ctx.attachQuiescence(new QuiescenceOwner(quiescence));
  const translator = new Translator({
    pool: ctx.describeShared().pool.buffer,
    attachments: new DeviceTableAttachments(ctx.describeShared()),
    quiescence: QuiescenceWorker.register(quiescence, threadId),
  });
  const gpaOf = (row: number): number | FaultReasonName => {
    const r = translator.translate(row, undefined, IOVA, 16, FaultAccess.READ);
    return r === FaultReason.NONE ? translator.spans.gpa[0]! : r === FaultReason.DOMAIN ? 'DOMAIN' : 'MAPPING';
  };
  return { host, ctx, gpaOf };
}
type FaultReasonName = 'DOMAIN' | 'MAPPING';

describe('consumer rows', () => {
  it('follow the IOAS they are pointed at, identity, or nothing; keep the IOAS from being destroyed', () => {
    const { ctx, gpaOf } = setup();
    const a = ctx.ioasAlloc();
    const b = ctx.ioasAlloc();
    ctx.ioasMap(a, { gpa: 0x10_0000, length: 0x1000n, iova: IOVA, flags: RW });
    ctx.ioasMap(b, { gpa: 0x20_0000, length: 0x1000n, iova: IOVA, flags: RW });
    const row = ctx.consumerRowAlloc();
    expect(gpaOf(row)).toBe('DOMAIN');
    ctx.consumerRowSet(row, { ioas: a });
    expect(gpaOf(row)).toBe(0x10_0000);
    ctx.consumerRowSet(row, { ioas: b });
    expect(gpaOf(row)).toBe(0x20_0000);
    expect(() => ctx.destroy(b)).toThrow(expect.objectContaining({ code: 'EBUSY' }) as Error);
    ctx.ioasUnmap(b, IOVA, 0x1000n);
    expect(gpaOf(row)).toBe('MAPPING');
    ctx.consumerRowSet(row, 'identity');
    expect(gpaOf(row)).toBe(Number(IOVA));
    ctx.consumerRowSet(row, 'blocked');
    expect(gpaOf(row)).toBe('DOMAIN');
    ctx.destroy(b);
    expect(() => ctx.consumerRowSet(row, { ioas: b })).toThrow(IommufdError);
    ctx.consumerRowFree(row);
    expect(() => ctx.consumerRowSet(row, 'identity')).toThrow(expect.objectContaining({ code: 'ENOENT' }) as Error);
  });

  it('a software-consumer endpoint holds an access on its domain IOAS, moves it with the domain, and drops it when detached', () => {
    const { ctx, gpaOf } = setup();
    const backend = new IoasidIommuBackend(ctx, [
      { endpoint: 0x10, device: 'engine', reservedRegions: [] },
      { endpoint: 0x18, device: 'net', reservedRegions: [], consumer: 'access' },
    ]);
    expect(backend.deviceId(0x18)).toBeUndefined();
    const row = backend.translationRow(0x18)!;
    // The net endpoint creates the first domain: an IOAS, no HWPT until a device joins.
    const d1 = backend.createPagingDomain(0x18);
    if (typeof d1 === 'string') throw new Error(d1);
    expect(d1.hwpt).toBe(0);
    expect(backend.attachPaging(0x18, d1)).toBeUndefined();
    expect(backend.map(d1, IOVA, 0x1000n, 0x30_0000, true, true)).toBeUndefined();
    expect(gpaOf(row)).toBe(0x30_0000);
    expect(backend.attachPaging(0x10, d1)).toBeUndefined();
    expect(d1.hwpt).toBeGreaterThan(0);
    const first = backend.accessOf(0x18);
    expect(ctx.inspect().accesses).toEqual([expect.objectContaining({ id: first, ioas: d1.ioas })]);

    const d2 = backend.createPagingDomain(0x18);
    if (typeof d2 === 'string') throw new Error(d2);
    expect(backend.attachPaging(0x18, d2)).toBeUndefined();
    expect(gpaOf(row)).toBe('MAPPING');
    expect(ctx.inspect().accesses).toEqual([expect.objectContaining({ ioas: d2.ioas })]);
    expect(backend.accessOf(0x18)).not.toBe(first);

    expect(backend.attachBlocked(0x18)).toBeUndefined();
    expect(gpaOf(row)).toBe('DOMAIN');
    expect(ctx.inspect().accesses).toEqual([]);
    backend.destroyPagingDomain(d2);
  });
});
