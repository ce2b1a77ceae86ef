import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';

// The examples in docs/embedding.md, run as written: each ```ts block becomes a module whose
// package imports point at this checkout ('viommu' → src/index.ts, 'viommu/guest' → the guest
// drivers), nothing else changed.
const root = fileURLToPath(new URL('..', import.meta.url));
const doc = readFileSync(`${root}docs/embedding.md`, 'utf8');
const blocks = [...doc.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]!);
const outDir = `${root}node_modules/.cache/viommu-doc-examples`;

function localise(code: string): string {
  return code
    .replaceAll(`from 'viommu/guest'`, `from '${root}guest-fixtures/driver/index.ts'`)
    .replaceAll(`from 'viommu'`, `from '${root}src/index.ts'`);
}

describe('docs/embedding.md examples', () => {
  it('has examples for both ways in', () => {
    expect(blocks.length).toBeGreaterThanOrEqual(3);
    expect(blocks.some((b) => b.includes('IommuMachine.create'))).toBe(true);
    expect(blocks.some((b) => b.includes('new IommufdHost'))).toBe(true);
  });

  it.each(blocks.map((code, i) => [i, code] as const))('example %i runs', async (i, code) => {
    mkdirSync(outDir, { recursive: true });
    const file = `${outDir}/example-${i}.ts`;
    writeFileSync(file, localise(code));
    await import(/* @vite-ignore */ pathToFileURL(file).href);
  });
});
