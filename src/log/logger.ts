/**
 * The logging surface core modules depend on. It is a subset of pino's Logger, so the adapter in
 * ./pino.ts passes a real pino child straight through; core code never imports pino or node:.
 */
export interface LogFn {
  (msg: string): void;
  (obj: Record<string, unknown>, msg?: string): void;
}

export interface Logger {
  trace: LogFn;
  debug: LogFn;
  info: LogFn;
  warn: LogFn;
  error: LogFn;
  child(bindings: Record<string, unknown>): Logger;
  isLevelEnabled?(level: string): boolean;
}

const noop: LogFn = () => undefined;

/** A logger that drops everything: the default for library code that was given none. */
export const silentLogger: Logger = {
  trace: noop,
  debug: noop,
  info: noop,
  warn: noop,
  error: noop,
  child: () => silentLogger,
  isLevelEnabled: () => false,
};
