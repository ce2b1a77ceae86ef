export { GuestMemory, GPA_LIMIT } from './guest-memory.js';
export type { GuestMemoryDescriptor, GuestRegionDescriptor } from './guest-memory.js';
export { GuestMemoryError, formatAddress } from './errors.js';
export type { QueueMemory } from './queue-memory.js';
