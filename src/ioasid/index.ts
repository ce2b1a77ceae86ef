export { IommufdHost, X86_MSI_WINDOW } from './host.js';
export type { HostSnapshot, IommufdHostOptions, PhysicalDeviceSpec } from './host.js';
export { Context } from './context.js';
export type {
  AreaSnapshot,
  ContextSnapshot,
  HwInfo,
  HwptAllocArgs,
  HwptInvalidateEntry,
  IoasMapArgs,
  IovaRanges,
  OptionArgs,
  RestoreOptions,
  SharedTranslation,
  Span,
  TranslateResult,
  TranslationFault,
} from './context.js';
export { CONTEXT_STATE_VERSION } from './state.js';
export type {
  AccessState,
  AreaState,
  AttachmentState,
  ContextState,
  DeviceState,
  DirtyRunState,
  HwptNestedState,
  HwptPagingState,
  HwptState,
  IoasState,
  IovaRangeState,
  PinState,
} from './state.js';
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
export { decodeVtdHwInfo, decodeVtdS1, encodeVtdHwInfo, encodeVtdS1, vtdHwInfo, vtdPasidBits } from './vtd.js';
export type { VtdHwInfo, VtdS1Data } from './vtd.js';
export { Stage1Record, Stage1RecordFlag, readInvalidations, readStage1 } from './stage1-record.js';
export type { PfnRange, Stage1View } from './stage1-record.js';
