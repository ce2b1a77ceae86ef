// Entry point of a dirty-tracking test writer: DMA writes to random pages through a Translator.
import { parentPort, workerData } from 'node:worker_threads';
import { FaultAccess } from '../src/ioasid/fault-queue.js';
import { QuiescenceWorker } from '../src/ioasid/quiescence.js';
import { DeviceTableAttachments, Translator } from '../src/ioasid/translator.js';
import { GuestMemory } from '../src/memory/index.js';
import { DirtyWriterControl, type DirtyWriterResult, type DirtyWriterStart } from '../src/runtime/dirty-writer-protocol.js';

if (parentPort === null) throw new Error('dirty-writer-worker must run as a worker thread');
const start = workerData as DirtyWriterStart & { readonly index: number };
const memory = GuestMemory.fromDescriptor(start.shared.memory);
const translator = new Translator({
  pool: start.shared.pool.buffer,
  attachments: new DeviceTableAttachments(start.shared),
  quiescence: QuiescenceWorker.register(start.quiescence, start.index),
});
const control = new Int32Array(start.control);
const payload = new Uint8Array(start.bytes);
let state = start.seed >>> 0 || 1;
const next = (): number => {
  // xorshift32
  state ^= state << 13;
  state ^= state >>> 17;
  state ^= state << 5;
  return state >>> 0;
};
const choices = Math.ceil((start.pages - start.phase) / start.stride);
let writes = 0;
let faults = 0;
while (Atomics.load(control, DirtyWriterControl.STOP) === 0) {
  const page = start.phase + (next() % choices) * start.stride;
  const offset = next() % (4096 - start.bytes + 1);
  payload.fill(next() & 0xff);
  translator.beginDma();
  try {
    const iova = (start.iovaPfn + page) * 4096 + offset;
    if (translator.translate(start.row, undefined, iova, start.bytes, FaultAccess.WRITE) !== 0) faults++;
    else memory.write(translator.spans.gpa[0]!, payload);
  } finally {
    translator.endDma();
  }
  writes++;
  Atomics.store(control, DirtyWriterControl.WRITES_BASE + start.index, writes);
}
const result: DirtyWriterResult = { writes, faults, dirtyMarks: translator.stats().dirtyMarks };
parentPort.postMessage(result);
