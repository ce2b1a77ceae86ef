import { expose, releaseProxy, transferHandlers, wrap, type Endpoint, type Remote } from 'comlink';
import nodeEndpointModule from 'comlink/dist/umd/node-adapter.js';
import type { MessagePort } from 'node:worker_threads';
import type { Worker } from 'node:worker_threads';

type NodeEndpointFn = (nep: MessagePort | Worker) => Endpoint;
// The adapter is CommonJS whose module.exports is the function itself.
const nodeEndpoint = ((nodeEndpointModule as unknown as { default?: NodeEndpointFn }).default ??
  (nodeEndpointModule as unknown as NodeEndpointFn)) as NodeEndpointFn;

/** Fields of a thrown error that survive the trip between threads. */
interface SerializedError {
  name: string;
  message: string;
  stack?: string | undefined;
  code?: unknown;
  details?: Record<string, unknown>;
}

let installed = false;

/**
 * Comlink's default `throw` handler keeps only name, message and stack, dropping the `code` our
 * error types carry (errno names, virtio statuses). Replace it, once per thread, with one that
 * carries `code` and any other own enumerable plain fields.
 */
export function installErrorTransfer(): void {
  if (installed) return;
  installed = true;
  transferHandlers.set('throw', {
    canHandle: (value: unknown): value is { value: unknown } =>
      typeof value === 'object' && value !== null && 'value' in value && Object.keys(value).length === 1,
    serialize(wrapper: { value: unknown }) {
      const err = wrapper.value;
      let out: SerializedError;
      if (err instanceof Error) {
        const details: Record<string, unknown> = {};
        for (const [k, v] of Object.entries(err)) {
          if (k === 'code') continue;
          if (v === null || ['string', 'number', 'boolean', 'bigint'].includes(typeof v)) details[k] = v;
        }
        out = { name: err.name, message: err.message, stack: err.stack, code: (err as { code?: unknown }).code, details };
      } else {
        out = { name: 'Error', message: String(err) };
      }
      return [out, []];
    },
    deserialize(serialized: SerializedError): never {
      const err = new Error(serialized.message) as Error & Record<string, unknown>;
      err.name = serialized.name;
      if (serialized.stack !== undefined) err.stack = serialized.stack;
      if (serialized.details) Object.assign(err, serialized.details);
      if (serialized.code !== undefined) err.code = serialized.code;
      throw err;
    },
  } as unknown as Parameters<typeof transferHandlers.set>[1]);
}

/** Serves `api` over a worker port (inside a worker) with error codes preserved. */
export function exposeOn<T extends object>(api: T, port: MessagePort): void {
  installErrorTransfer();
  expose(api, nodeEndpoint(port));
}

/** A typed proxy for an API exposed on the other side of `port`. */
export function wrapPort<T>(port: MessagePort | Worker): Remote<T> {
  installErrorTransfer();
  return wrap<T>(nodeEndpoint(port));
}

export type { Remote };

/** Detaches a proxy from its port so the port can close. */
export function releaseRemote(remote: Remote<unknown>): void {
  (remote as unknown as { [releaseProxy](): void })[releaseProxy]();
}
