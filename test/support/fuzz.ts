// Scale of the property tests: 1 in `npm test` (seconds), larger under `npm run fuzz` (minutes).
// A scaled run draws a fresh seed each time and prints it, so a failure can be replayed with
// VIOMMU_FUZZ_SEED; at scale 1 every test keeps its fixed seed and is reproducible as is.
const scale = Number(process.env.VIOMMU_FUZZ_SCALE ?? '1');
const forcedSeed = process.env.VIOMMU_FUZZ_SEED === undefined ? undefined : Number(process.env.VIOMMU_FUZZ_SEED);

export const FUZZ_SCALE = Number.isFinite(scale) && scale > 0 ? scale : 1;

export function fuzzParams(seed: number | undefined, numRuns: number): { seed?: number; numRuns: number } {
  const runs = Math.max(1, Math.round(numRuns * FUZZ_SCALE));
  if (forcedSeed !== undefined) return { seed: forcedSeed, numRuns: runs };
  if (FUZZ_SCALE === 1) return seed === undefined ? { numRuns: runs } : { seed, numRuns: runs };
  const fresh = (Math.random() * 2 ** 31) | 0;
  process.stderr.write(`fuzz: ${runs} runs, seed ${fresh} (replay with VIOMMU_FUZZ_SEED=${fresh})\n`);
  return { seed: fresh, numRuns: runs };
}
