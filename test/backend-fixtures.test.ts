import { execFile } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { parseBackendFixture } from '../src/replay/backend-fixture.js';
import { replayBackendFixture } from '../src/replay/backend-runner.js';

// Every shipped backend fixture, replayed on a fresh backend with translate steps in a consumer
// worker (workers run from dist/: `npm run build` first).
const root = fileURLToPath(new URL('..', import.meta.url));
const dir = join(root, 'guest-fixtures/backend');
const files = readdirSync(dir)
  .filter((f) => f.endsWith('.json'))
  .sort();
/** Ops the backend does not implement yet; their steps may be skipped, no others. None today. */
const NOT_YET = new Set<string>();

describe('shipped backend fixtures', () => {
  it('port at least 40 kernel selftest cases, each named in its description', () => {
    expect(files.length).toBeGreaterThanOrEqual(40);
    for (const file of files) {
      const doc = JSON.parse(readFileSync(join(dir, file), 'utf8')) as { name: string; description: string };
      expect(`${doc.name}.json`).toBe(file);
      expect(doc.description, file).toMatch(/^iommufd(_[a-z_]+)?\.[a-z_]+( \(|:)/);
    }
  });

  it.each(files)('%s: every step matches', async (file) => {
    const doc = JSON.parse(readFileSync(join(dir, file), 'utf8')) as Record<string, unknown>;
    const result = await replayBackendFixture(parseBackendFixture(doc), { source: doc });
    const failures = result.steps.filter((s) => !s.ok).map((s) => ({ index: s.index, op: s.op, expect: s.expect, actual: s.actual }));
    expect(failures).toEqual([]);
    expect(result.failed).toBe(0);
    expect(result.passed + result.skipped).toBe(result.steps.length);
    for (const s of result.steps) if (s.skipped) expect(NOT_YET.has(s.op), `step ${s.index} (${s.op}) skipped`).toBe(true);
  });
});

const bin = join(root, 'dist/src/cli/main.js');

function viommu(args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [bin, ...args], { cwd: root, env: { ...process.env, VIOMMU_LOG: 'silent' } }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : 1;
      resolve({ code, stdout, stderr });
    });
  });
}

describe('viommu replay with backend fixtures (the built bin)', () => {
  const some = ['iommufd_ioas.area-two_mock_domain.json', 'iommufd_mock_domain.replace-one_domain.json', 'iommufd_dirty_tracking.set_dirty_tracking.json'].map((f) =>
    join(dir, f),
  );

  it('prints a line per step and a summary per file, next to a guest fixture, and exits 0', async () => {
    const guest = join(root, 'guest-fixtures/map-rules.json');
    const { code, stdout } = await viommu(['replay', ...some, guest]);
    expect(stdout).toContain(', ioasid backend)');
    expect(stdout).toContain('virtio-mmio');
    const summaries = stdout.split('\n').filter((l) => /^\d+ passed, \d+ failed/.test(l));
    expect(summaries).toHaveLength(4);
    for (const s of summaries) expect(s).toMatch(/^\d+ passed, 0 failed$/);
    expect(stdout).toMatch(/^ +\d+ setDirtyTracking expect ok +actual ok +ok$/m);
    expect(stdout).toMatch(/^ +\d+ translate +expect \{"gpa":"0x201000"\} +actual \{"gpa":"0x201000"\} +ok$/m);
    expect(stdout).not.toMatch(/ FAIL$/m);
    expect(code).toBe(0);
  });

  it('--json prints one object per file in the guest-fixture result shape', async () => {
    const { code, stdout } = await viommu(['replay', '--json', some[0]!, some[2]!]);
    expect(code).toBe(0);
    const docs = stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(docs.map((d) => d.name)).toEqual(['iommufd_ioas.area-two_mock_domain', 'iommufd_dirty_tracking.set_dirty_tracking']);
    expect(docs[1]!.skipped).toBe(0);
    for (const d of docs) {
      expect(d.failed).toBe(0);
      for (const s of d.steps as Record<string, unknown>[]) expect(Object.keys(s).sort()).toEqual(['actual', 'expect', 'index', 'ok', 'op', 'skipped']);
    }
  });

  it('fails on wrong expectations (exit 1); --record rewrites them with what happened, which then passes', async () => {
    const tmp = await mkdtemp(join(tmpdir(), 'viommu-backend-'));
    const file = join(tmp, 'wrong.json');
    const doc = JSON.parse(await readFile(join(dir, 'iommufd_mock_domain.replace-one_domain.json'), 'utf8')) as { steps: Record<string, unknown>[] };
    const attach = doc.steps.findIndex((s) => s.expect === 'ENOENT');
    const translate = doc.steps.findIndex((s) => s.op === 'translate');
    doc.steps[attach]!.expect = 'ok';
    doc.steps[translate]!.expectGpa = '0x12345000';
    await writeFile(file, JSON.stringify(doc));

    const failing = await viommu(['replay', file]);
    expect(failing.code).toBe(1);
    expect(failing.stdout.match(/ FAIL$/gm)).toHaveLength(2);

    const recording = await viommu(['replay', '--record', file]);
    expect(recording.code).toBe(1);
    expect(recording.stdout).toContain(`recorded ${file}`);
    const recorded = JSON.parse(await readFile(file, 'utf8')) as { steps: Record<string, unknown>[] };
    expect(recorded.steps[attach]!.expect).toBe('ENOENT');
    expect(recorded.steps[translate]!.expectGpa).toBe('0x201000');

    const passing = await viommu(['replay', file]);
    expect(passing.stdout).not.toMatch(/ FAIL$/m);
    expect(passing.code).toBe(0);
  });

  it('an invalid backend fixture names the JSON path and fails the run', async () => {
    const tmp = await mkdtemp(join(tmpdir(), 'viommu-backend-'));
    const file = join(tmp, 'bad.json');
    await writeFile(file, JSON.stringify({ format: 'ioasid-backend-fixture/1', name: 'bad', steps: [{ op: 'destroy', id: 'nothing' }] }));
    const { code, stdout } = await viommu(['replay', file]);
    expect(code).toBe(1);
    expect(stdout).toContain('$.steps[0].id');
  });
});
