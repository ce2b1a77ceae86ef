/** Errno names the backend returns, as the kernel's iommufd does. */
export type Errno =
  | 'EINVAL'
  | 'ENOENT'
  | 'EBUSY'
  | 'ENOMEM'
  | 'ERANGE'
  | 'EEXIST'
  | 'EOPNOTSUPP'
  | 'EFAULT'
  | 'ENOSPC'
  | 'EPERM'
  | 'EOVERFLOW'
  | 'EADDRINUSE'
  | 'EMSGSIZE'
  | 'ENODEV'
  | 'E2BIG'
  | 'EDEADLOCK'
  | 'EBADF';

/**
 * A failed backend call. `code` is the errno iommufd would return; `argument` names the argument
 * that was wrong when there is one. A call that throws this changed nothing.
 */
export class IommufdError extends Error {
  constructor(
    readonly code: Errno,
    message: string,
    readonly argument?: string,
    /** Extra out-values the kernel reports with the error (e.g. the range count with EMSGSIZE). */
    readonly details?: Readonly<Record<string, unknown>>,
  ) {
    super(`${code}: ${message}`);
    this.name = 'IommufdError';
  }
}

export function isIommufdError(e: unknown, code?: Errno): e is IommufdError {
  return e instanceof IommufdError && (code === undefined || e.code === code);
}
