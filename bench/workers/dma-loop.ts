// A device that DMAs without pause: each DMA translates one 4 KiB page the guest keeps mapped and
// copies into it, until told to stop. The strict-unmap figure is taken while several of these run.
import { parentPort, threadId, workerData } from 'node:worker_threads';
import { FaultAccess } from '../../src/ioasid/fault-queue.js';
import { QuiescenceWorker } from '../../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../../src/ioasid/translator.js';
import { GuestMemory } from '../../src/memory/index.js';
import { DmaLoop, type DmaLoopStart } from '../protocol.js';

if (parentPort === null) throw new Error('dma-loop must run as a worker thread');
const start = workerData as DmaLoopStart;
const memory = GuestMemory.fromDescriptor(start.memory);
const ctl = new Int32Array(start.control);
const quiescence = QuiescenceWorker.register(start.shared.quiescence, threadId);
const t = new Translator({
  pool: start.shared.pool,
  attachments: new DeviceTableAttachments({ pool: { buffer: start.shared.pool }, devices: { buffer: start.shared.devices } }),
  quiescence,
});
const payload = new Uint8Array(4096).fill(start.index + 1);
Atomics.add(ctl, DmaLoop.READY, 1);
let dmas = 0;
let faults = 0;
while (Atomics.load(ctl, DmaLoop.STOP) === 0) {
  t.beginDma();
  const iova = start.iova + (dmas % start.pages) * 4096;
  if (t.translate(start.shared.row, undefined, iova, 4096, FaultAccess.WRITE) === 0) memory.write(t.spans.gpa[0]!, payload);
  else faults++;
  t.endDma();
  if ((++dmas & 255) === 0) Atomics.store(ctl, DmaLoop.COUNTS + start.index, dmas);
}
Atomics.store(ctl, DmaLoop.COUNTS + start.index, dmas);
quiescence.unregister();
parentPort.postMessage({ dmas, faults });
