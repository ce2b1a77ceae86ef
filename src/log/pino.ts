import { pino, type Logger as PinoLogger, type LevelWithSilent } from 'pino';
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

/** The process-wide root logger: JSON lines on stderr, one child per component. */
export function rootLogger(): PinoLogger {
  root ??= pino({ level: levelFromEnv(), base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
  return root;
}

/** One logger per component, e.g. `componentLogger('iommu', { endpoint: 8 })`. */
export function componentLogger(component: string, bindings: Record<string, unknown> = {}): Logger {
  return rootLogger().child({ component, ...bindings }) as unknown as Logger;
}
