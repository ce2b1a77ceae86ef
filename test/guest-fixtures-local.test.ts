import { readFileSync, readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { parseGuestFixture } from '../src/replay/guest-fixture.js';
import { rememberSource, replayGuestFixture } from '../src/replay/guest-runner.js';
import { LocalIommuMachine } from '../src/replay/local-machine.js';

const dir = new URL('../guest-fixtures/', import.meta.url);
const files = readdirSync(dir).filter((f) => f.endsWith('.json'));

describe('guest fixtures on the in-thread machine', () => {
  it.each(files)('%s', async (file) => {
    const source = JSON.parse(readFileSync(new URL(file, dir), 'utf8')) as Record<string, unknown>;
    const fixture = parseGuestFixture(source);
    rememberSource(fixture, source);
    const machine = LocalIommuMachine.forFixture(fixture);
    const result = await replayGuestFixture(fixture, machine);
    const failures = result.steps.filter((s) => !s.ok).map((s) => `step ${s.index} ${s.op}: expected ${JSON.stringify(s.expect)}, got ${JSON.stringify(s.actual, (_k, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v))}`);
    expect(failures).toEqual([]);
    expect(result.passed).toBe(fixture.steps.length);
  });
});
