/**
 * Location of a compiled worker entry point. Workers always run the built JavaScript in dist/, the
 * code users run: from dist/src/runtime/ it is ../../workers/NAME.js; when this module itself is
 * loaded from TypeScript sources (under the test runner), it is the same file in dist/.
 */
export function workerUrl(name: string): URL {
  const here = import.meta.url;
  if (here.endsWith('.ts')) return new URL(`../../dist/workers/${name}.js`, here);
  return new URL(`../../workers/${name}.js`, here);
}
