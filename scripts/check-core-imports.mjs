#!/usr/bin/env node
// The core (device models, backend, page tables, queues, guest memory) must run in any JavaScript
// engine: it may not import Node built-ins nor the Node-only adapters. Fails with a list of offenders.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const coreDirs = ['src/memory', 'src/virtio', 'src/iommu', 'src/ioasid', 'src/devices', 'src/pagetable', 'src/migration', 'src/log/logger.ts'];
const nodeBuiltin = /^(node:|fs$|path$|os$|worker_threads$|child_process$|crypto$|url$|util$|events$|stream$)/;
const nodeOnlyModules = /(^|\/)(runtime|vmm|cli)\/|log\/pino(\.js)?$|^pino|^comlink/;
const importRe = /(?:^|\n)\s*(?:import|export)\b[^'"]*?from\s*['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g;

function* files(path) {
  const full = join(root, path);
  if (statSync(full).isFile()) {
    yield full;
    return;
  }
  for (const entry of readdirSync(full, { withFileTypes: true })) {
    const child = join(path, entry.name);
    if (entry.isDirectory()) yield* files(child);
    else if (entry.name.endsWith('.ts')) yield join(root, child);
  }
}

const problems = [];
for (const dir of coreDirs) {
  let list;
  try {
    list = [...files(dir)];
  } catch {
    continue;
  }
  for (const file of list) {
    const text = readFileSync(file, 'utf8');
    for (const m of text.matchAll(importRe)) {
      const spec = m[1] ?? m[2];
      if (spec === undefined) continue;
      if (nodeBuiltin.test(spec) || nodeOnlyModules.test(spec)) {
        problems.push(`${relative(root, file)}: imports '${spec}' (core code must not depend on Node or its adapters)`);
      }
    }
  }
}
if (problems.length > 0) {
  console.error(problems.join('\n'));
  process.exit(1);
}
