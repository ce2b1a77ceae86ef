export * from './format.js';
export { TablePool } from './pool.js';
export type { TablePoolDescriptor, TablePoolOptions, TablePoolStats } from './pool.js';
export { IoPageTable } from './radix.js';
export type { AreaVisitor, LeafVisitor } from './radix.js';
export { TableReader, WalkResult, emptyLeafInfo, fixedView, headerGeneration, walk, walkWords } from './walk.js';
export type { LeafInfo } from './walk.js';
