// Echo side of the round-trip limits: answers every PING with the same number in PONG, either
// sleeping in Atomics.wait between pings or spinning on Atomics.load.
import { workerData } from 'node:worker_threads';
import { PingPong, type PingPongStart } from '../protocol.js';

const start = workerData as PingPongStart;
const w = new Int32Array(start.buffer);
let last = 0;
for (;;) {
  let ping: number;
  if (start.mode === 'wait') {
    Atomics.wait(w, PingPong.PING, last);
    ping = Atomics.load(w, PingPong.PING);
  } else {
    while ((ping = Atomics.load(w, PingPong.PING)) === last) {
      // Spin: the figure is what two busy threads cost each other, nothing else.
    }
  }
  if (ping === last) continue;
  if (Atomics.load(w, PingPong.STOP) !== 0) break;
  last = ping;
  Atomics.store(w, PingPong.PONG, ping);
  if (start.mode === 'wait') Atomics.notify(w, PingPong.PONG);
}
