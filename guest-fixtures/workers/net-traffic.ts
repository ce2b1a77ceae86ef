// A second guest vCPU that keeps a virtio-net device busy: it opens the device (behind
// virtio-mmio), then loops sending frames from a buffer it owns and receiving them into a buffer at
// a fixed IOVA whose mapping the other vCPU changes all the time. Counters and the stop flag live
// in a shared control block; one message reports the totals at the end.
import { parentPort, workerData } from 'node:worker_threads';
import { GuestMemory } from '../../src/memory/index.js';
import { MmioBusClient } from '../../src/virtio/bus-client.js';
import { InterruptWaiter } from '../../src/virtio/interrupt-waiter.js';
import { GuestAllocator } from '../driver/allocator.js';
import { GuestDmaView } from '../driver/dma-view.js';
import { MmioDriverTransport } from '../driver/mmio.js';
import { NetDriver, VIRTIO_NET } from '../driver/net-driver.js';
import { NetTraffic, type NetTrafficStart } from './net-traffic-protocol.js';

if (parentPort === null) throw new Error('net-traffic must run as a worker thread');
const port = parentPort;
const start = workerData as NetTrafficStart;
const ctl = new Int32Array(start.control);
const memory = GuestMemory.fromDescriptor(start.memory);
const view = new GuestDmaView(memory);
view.map(start.arena.iova, start.arena.gpa, start.arena.size);
// The guest's CPU view of the slot is irrelevant (the device writes it or not); map it to the
// arena's last page so reading a received header is always well-defined.
view.map(start.slotIova, start.arena.gpa + start.arena.size - 4096, 4096);
const net = NetDriver.open({
  transport: new MmioDriverTransport(new MmioBusClient(start.signals)),
  memory: view,
  allocator: new GuestAllocator(start.arena.iova, start.arena.size - 4096),
  interrupts: new InterruptWaiter(start.signals),
  queueSize: 64,
});
const frame = new Uint8Array(256).fill(0x77);
Atomics.store(ctl, NetTraffic.READY, 1);
let delivered = 0;
let refused = 0;
while (Atomics.load(ctl, NetTraffic.STOP) === 0) {
  net.postReceiveBufferAt(start.slotIova, 4096);
  net.device.kick(VIRTIO_NET.RX);
  net.send(frame);
  const got = net.receive();
  if (got.kind === 'packet') delivered++;
  else refused++;
  net.waitTransmitted(1);
  Atomics.store(ctl, NetTraffic.DELIVERED, delivered);
  Atomics.store(ctl, NetTraffic.REFUSED, refused);
}
port.postMessage({ delivered, refused });
