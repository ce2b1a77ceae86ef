import { pino, type Logger as PinoLogger, type LevelWithSilent } from 'pino';
import pretty from 'pino-pretty';
import type { Logger } from './logger.js';

const LEVELS: readonly LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/**
 * Level from VIOMMU_LOG (fatal|error|warn|info|debug|trace|silent). Unset means quiet: `warn`
 * normally, `silent` under a test runner, so test output shows only assertions.
 */
export function levelFromEnv(env: Record<string, string | undefined> = process.env): LevelWithSilent {
  const wanted = env.VIOMMU_LOG?.trim().toLowerCase();
  if (wanted !== undefined && wanted !== '') {
    if ((LEVELS as readonly string[]).includes(wanted)) return wanted as LevelWithSilent;
    return 'info';
  }
  return env.VITEST !== undefined ? 'silent' : 'warn';
}

let root: PinoLogger | undefined;

/**
 * Whether logs are for people: VIOMMU_LOG_FORMAT=pretty or json decides; unset, a terminal on
 * stderr means pretty. The main thread resolves it once into the environment its workers inherit.
 */
export function prettyFromEnv(env: Record<string, string | undefined> = process.env): boolean {
  const format = env.VIOMMU_LOG_FORMAT?.trim().toLowerCase();
  if (format === 'pretty') return true;
  if (format === 'json') return false;
  const pretty = process.stderr.isTTY === true;
  env.VIOMMU_LOG_FORMAT = pretty ? 'pretty' : 'json';
  return pretty;
}

/** The process-wide root logger: on stderr, JSON lines or pretty lines, one child per component. */
export function rootLogger(): PinoLogger {
  root ??= pino(
    { level: levelFromEnv(), base: { pid: process.pid } },
    prettyFromEnv() ? pretty({ destination: 2, sync: true, ignore: 'pid,hostname' }) : pino.destination({ fd: 2, sync: true }),
  );
  return root;
}

/** One logger per component, e.g. `componentLogger('iommu', { endpoint: 8 })`. */
export function componentLogger(component: string, bindings: Record<string, unknown> = {}): Logger {
  return rootLogger().child({ component, ...bindings }) as unknown as Logger;
}
