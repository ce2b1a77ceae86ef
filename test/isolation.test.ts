import { threadId } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { FaultAccess, FaultReason } from '../src/ioasid/fault-queue.js';
import { IoasMapFlag, IommufdError, IommufdHost } from '../src/ioasid/index.js';
import { QuiescenceWorker, createQuiescenceBuffer } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../src/ioasid/translator.js';
import { GuestMemory } from '../src/memory/index.js';

// Two VMMs on one host, each with its own /dev/iommu context: a device worker given one context's
// shared buffers can only ever reach that context's address spaces, whatever row it asks for.

const RW = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE;
const IOVA = 0x1000_0000n;

describe('isolation between contexts', () => {
  it("a worker with context A's buffers never translates to B's memory, through any row", () => {
    const memory = GuestMemory.create(32 << 20);
    const host = new IommufdHost(memory, {
      devices: [
        { name: 'a0', group: 'ga' },
        { name: 'a1', group: 'ga1' },
        { name: 'b0', group: 'gb' },
      ],
    });
    const a = host.open();
    const b = host.open();
    const ioasA = a.ioasAlloc();
    const ioasB = b.ioasAlloc();
    a.ioasMap(ioasA, { gpa: 0x10_0000, length: 0x1000n, iova: IOVA, flags: RW });
    b.ioasMap(ioasB, { gpa: 0x80_0000, length: 0x1000n, iova: IOVA, flags: RW });
    const devA = a.deviceBind('a0');
    a.deviceAttach(devA, ioasA);
    a.deviceBind('a1');
    const devB = b.deviceBind('b0');
    b.deviceAttach(devB, ioasB);
    // B's device is B's: A cannot bind it while B holds its group.
    expect(() => a.deviceBind('b0')).toThrow(IommufdError);

    const translator = new Translator({
      pool: a.describeShared().pool.buffer,
      attachments: new DeviceTableAttachments(a.describeShared()),
      quiescence: QuiescenceWorker.register(createQuiescenceBuffer(2), threadId),
    });
    const reached = new Set<number>();
    // Every row index a hostile worker could name, B's device row index among them.
    for (let row = 0; row < 16; row++) {
      for (const pasid of [undefined, 1, 5]) {
        const r = translator.translate(row, pasid, IOVA, 64, FaultAccess.WRITE);
        if (r === FaultReason.NONE) reached.add(translator.spans.gpa[0]!);
      }
    }
    expect(reached).toEqual(new Set([0x10_0000]));
    expect(b.deviceRow(devB)).toBeGreaterThanOrEqual(0);
    // And B's own view reaches only B's memory.
    expect(b.translate(devB, 0, IOVA, 64, 'write').spans?.[0]?.gpa).toBe(0x80_0000);
  });
});
