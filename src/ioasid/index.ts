export { IommufdHost, X86_MSI_WINDOW } from './host.js';
export type { HostSnapshot, IommufdHostOptions, PhysicalDeviceSpec } from './host.js';
export { Context } from './context.js';
export type {
  AreaSnapshot,
  ContextSnapshot,
  HwInfo,
  HwptAllocArgs,
  IoasMapArgs,
  IovaRanges,
  OptionArgs,
  SharedTranslation,
  Span,
  TranslateResult,
  TranslationFault,
} from './context.js';
export { IommufdError, isIommufdError } from './errors.js';
export type { Errno } from './errors.js';
export type { AccessOps } from './access.js';
export type { IovaRange } from './device.js';
export type { PinStats } from './accounting.js';
export type { ObjectType } from './objects.js';
export {
  AttachKind,
  DeviceRow,
  DeviceRowFlag,
  PageResult,
  TranslationReader,
  emptyRowValue,
  findPasidRow,
  readRow,
  translatePage,
} from './device-table.js';
export type { DeviceTableDescriptor, RowValue } from './device-table.js';
export * from './uapi.js';
