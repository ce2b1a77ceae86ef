import { execFile } from 'node:child_process';
import { copyFile, mkdtemp, readFile, readdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

// The command users run: the built bin, in its own process, as `npx viommu replay` does.
const root = fileURLToPath(new URL('..', import.meta.url));
const bin = join(root, 'dist/src/cli/main.js');
const fixtures = join(root, 'guest-fixtures');

function viommu(args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [bin, ...args], { cwd: root, env: { ...process.env, VIOMMU_LOG: 'silent' } }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : 1;
      resolve({ code, stdout, stderr });
    });
  });
}

describe('viommu replay', () => {
  it('passes every shipped fixture, one summary line per file', async () => {
    const files = (await readdir(fixtures)).filter((f) => f.endsWith('.json')).map((f) => join(fixtures, f));
    expect(files.length).toBeGreaterThanOrEqual(15);
    const { code, stdout } = await viommu(['replay', ...files]);
    const summaries = stdout.split('\n').filter((l) => /^\d+ passed, \d+ failed/.test(l));
    expect(summaries).toHaveLength(files.length);
    for (const s of summaries) expect(s).toMatch(/^\d+ passed, 0 failed$/);
    expect(stdout).not.toMatch(/ FAIL$/m);
    expect(code).toBe(0);
  });

  it('--json prints one object per file in the contract shape, over virtio-pci', async () => {
    const { code, stdout } = await viommu(['replay', '--json', '--transport', 'pci', join(fixtures, 'dma-after-unmap.json'), join(fixtures, 'map-rules.json')]);
    expect(code).toBe(0);
    const docs = stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(docs.map((d) => d.name)).toEqual(['dma-after-unmap', 'map-rules']);
    for (const d of docs) {
      expect(Object.keys(d)).toEqual(expect.arrayContaining(['name', 'steps', 'passed', 'failed', 'skipped']));
      expect(d.failed).toBe(0);
      for (const s of d.steps as Record<string, unknown>[]) expect(Object.keys(s).sort()).toEqual(['actual', 'expect', 'index', 'ok', 'op', 'skipped']);
    }
  });

  it('fails on a wrong expectation; --record rewrites it with what was observed, which then passes', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'viommu-replay-'));
    const file = join(dir, 'wrong.json');
    await copyFile(join(fixtures, 'dma-after-unmap.json'), file);
    const doc = JSON.parse(await readFile(file, 'utf8')) as { steps: Record<string, unknown>[] };
    const dmaAfter = doc.steps.findIndex((s, i) => s.op === 'dma' && s.expect === 'fault' && i > 0);
    expect(dmaAfter).toBeGreaterThan(0);
    doc.steps[dmaAfter]!.expect = 'ok';
    doc.steps[0]!.expect = 'NOENT';
    await writeFile(file, JSON.stringify(doc));

    const failing = await viommu(['replay', file]);
    expect(failing.code).toBe(1);
    expect(failing.stdout.match(/ FAIL$/gm)).toHaveLength(2);
    expect(failing.stdout).toMatch(/\n\d+ passed, 2 failed\n/);

    const recording = await viommu(['replay', '--record', file]);
    expect(recording.code).toBe(1);
    const rewritten = JSON.parse(await readFile(file, 'utf8')) as { steps: Record<string, unknown>[]; name: string };
    expect(rewritten.name).toBe('dma-after-unmap');
    expect(rewritten.steps[dmaAfter]!.expect).toBe('fault');
    expect(rewritten.steps[0]!.expect).toBe('OK');
    const again = await viommu(['replay', file]);
    expect(again.code).toBe(0);
  });

  it('reports an unreadable or invalid fixture and exits 1; a bad command line exits 2', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'viommu-replay-'));
    const bad = join(dir, 'bad.json');
    await writeFile(bad, JSON.stringify({ format: 'viommu-guest-fixture/1', name: 'x', endpoints: [1], steps: [{ op: 'map', domain: 1 }] }));
    const invalid = await viommu(['replay', bad, join(dir, 'missing.json')]);
    expect(invalid.code).toBe(1);
    expect(invalid.stdout).toMatch(/bad\.json: invalid fixture: \$\.steps\[0\]/);
    expect(invalid.stdout).toMatch(/missing\.json: invalid fixture: .*ENOENT/);
    const usage = await viommu(['replay', '--transport', 'isa', bad]);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toMatch(/--transport must be mmio or pci/);
    expect((await viommu(['replay'])).code).toBe(2);
  });
});

describe('viommu info and help', () => {
  it('info reads the live device: offered features, config and the MSI window from PROBE', async () => {
    const { code, stdout } = await viommu(['info', '--json']);
    expect(code).toBe(0);
    const info = JSON.parse(stdout) as { device: { offeredFeatures: string[]; config: { pageSizeMask: string }; probeProperties: { subtype: string; start: string }[] }; formats: { guestFixture: string } };
    expect(info.device.offeredFeatures).toEqual(expect.arrayContaining(['VERSION_1', 'MAP_UNMAP', 'PROBE', 'BYPASS_CONFIG']));
    expect(info.device.offeredFeatures).not.toContain('BYPASS');
    expect(info.device.config.pageSizeMask).toBe('0xfffffffffffff000');
    expect(info.device.probeProperties).toEqual([expect.objectContaining({ subtype: 'MSI', start: '0xfee00000' })]);
    expect(info.formats.guestFixture).toBe('viommu-guest-fixture/1');
    const text = await viommu(['info']);
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(/^ {2}offeredFeatures: VERSION_1/m);
  });

  it('every command has --help; unknown commands and arguments exit 2 with one line', async () => {
    for (const command of ['demo', 'replay', 'info']) {
      const help = await viommu([command, '--help']);
      expect(help.code, command).toBe(0);
      expect(help.stdout).toMatch(new RegExp(`^viommu ${command}`));
    }
    const top = await viommu(['--help']);
    expect(top.code).toBe(0);
    expect(top.stdout).toMatch(/viommu replay/);
    const unknown = await viommu(['frobnicate']);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr.trim().split('\n')).toHaveLength(1);
    expect((await viommu(['info', '--verbose'])).code).toBe(2);
  });
});

describe('viommu demo (npm start)', () => {
  it('tells the story through workers and ends with counters that match it', async () => {
    const { code, stdout } = await viommu(['demo', '--json']);
    expect(code).toBe(0);
    const doc = JSON.parse(stdout) as { events: { act: string; text: string }[]; summary: Record<string, unknown> };
    const acts = [...new Set(doc.events.map((e) => e.act))];
    expect(acts).toEqual(['machine', 'boot bypass', 'bypass off: DMA blocked', 'a domain, attached', 'buffers mapped once', 'faults reach the guest', 'unmap', 'nested translation']);
    const text = doc.events.map((e) => e.text).join('\n');
    expect(text).toMatch(/matches the source, byte for byte/);
    expect(text).toMatch(/fault record: reason DOMAIN/);
    expect(text).toMatch(/fault record: reason MAPPING, endpoint 0x10, WRITE at 0x90000000/);
    expect(text).toMatch(/received them back: identical/);
    expect(text).toMatch(/fault record: reason MAPPING, endpoint 0x18, READ at 0x90000000/);
    expect(text).toMatch(/bytes landed at the new GPA/);
    expect(text).toMatch(/fault record: reason DOMAIN, endpoint 0x10, READ at 0x7f0000000000, PASID 2/);
    // Before nesting: the net arena (256 pages) plus source and destination (2 + 2), the destination
    // mapped at two IOVAs counted once: 260, not 262.
    expect(text).toMatch(/pinned guest pages: 260, counted against the memlock limit: 260/);
    // Nesting's stage 2 maps all 64 MiB of RAM: 16384 pages, the 260 among them not counted again.
    expect(doc.summary).toMatchObject({ requests: 10, faultsReported: 5, pinnedPages: 16384, accountedPages: 16384, netPackets: 1 });
  });
});
