import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { ALL_METRICS, REQUIRED_METRICS } from '../bench/metrics.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const main = fileURLToPath(new URL('../dist/bench/main.js', import.meta.url));

interface BenchOutput {
  metrics: Record<string, { value: unknown; unit: unknown }>;
  env: Record<string, unknown>;
}

function runQuick(): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [main, '--quick', '--json'], { cwd: root, timeout: 120_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : -1;
      resolve({ code, stdout, stderr });
    });
  });
}

describe('npm run bench -- --quick --json', () => {
  it('exits 0 with one JSON object holding every implemented required metric, each a finite number with a unit', async () => {
    expect(existsSync(main), 'dist/bench/main.js is missing: run npm run build').toBe(true);
    const { code, stdout, stderr } = await runQuick();
    expect(code, stderr).toBe(0);
    const out = JSON.parse(stdout) as BenchOutput;
    expect(Object.keys(out).sort()).toEqual(['env', 'metrics']);

    const known = new Set(ALL_METRICS.map((m) => m.name));
    for (const [name, m] of Object.entries(out.metrics)) {
      expect(known.has(name), `${name} is not in bench/metrics.ts`).toBe(true);
      expect(typeof m.value === 'number' && Number.isFinite(m.value), `${name} = ${String(m.value)}`).toBe(true);
      expect(typeof m.unit === 'string' && m.unit.length > 0, `${name} has no unit`).toBe(true);
    }
    const missing = REQUIRED_METRICS.filter((m) => m.implemented && !(m.name in out.metrics)).map((m) => m.name);
    expect(missing).toEqual([]);

    expect(out.env).toMatchObject({ node: process.version, quick: true });
    expect(typeof out.env.cpu).toBe('string');
    expect(out.env.cores).toBeGreaterThan(0);
    expect(Number.isNaN(Date.parse(String(out.env.date)))).toBe(false);
  });

  it('lists what each row not implemented yet is waiting for', () => {
    for (const m of REQUIRED_METRICS) {
      if (!m.implemented) expect(m.needs, m.name).toBeTruthy();
    }
    expect(new Set(ALL_METRICS.map((m) => m.name)).size).toBe(ALL_METRICS.length);
  });
});
