import { readFileSync, readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { parseGuestFixture } from '../src/replay/guest-fixture.js';
import { rememberSource, replayGuestFixture } from '../src/replay/guest-runner.js';
import { WorkerReplayMachine } from '../src/replay/worker-machine.js';

const dir = new URL('../guest-fixtures/', import.meta.url);
const files = readdirSync(dir).filter((f) => f.endsWith('.json'));

function failures(steps: readonly { ok: boolean; index: number; op: string; expect: unknown; actual: unknown }[]): string[] {
  const hex = (_k: string, v: unknown): unknown => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v);
  return steps.filter((s) => !s.ok).map((s) => `step ${s.index} ${s.op}: expected ${JSON.stringify(s.expect, hex)}, got ${JSON.stringify(s.actual, hex)}`);
}

// The same fixtures as the in-thread test, now with the device in its worker behind each
// transport and every DMA issued by an endpoint worker translating through the shared tables.
describe.each(['mmio', 'pci'] as const)('guest fixtures through workers over virtio-%s', (transport) => {
  it.each(files)('%s', async (file) => {
    const source = JSON.parse(readFileSync(new URL(file, dir), 'utf8')) as Record<string, unknown>;
    const fixture = parseGuestFixture(source);
    rememberSource(fixture, source);
    const machine = await WorkerReplayMachine.forFixture(fixture, transport);
    try {
      const result = await replayGuestFixture(fixture, machine);
      expect(failures(result.steps)).toEqual([]);
      expect(result.passed).toBe(fixture.steps.length);
      const stats = await machine.machine.iommu.control.stats();
      // Requests really crossed to the worker (a fixture of config steps only sends none).
      const sends = fixture.steps.some((s) => ['attach', 'detach', 'map', 'unmap', 'probe', 'raw', 'batch'].includes(s.op));
      expect(stats.device.requests > 0).toBe(sends);
    } finally {
      await machine.close();
    }
  });
});
