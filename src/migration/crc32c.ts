/**
 * CRC-32C (Castagnoli; reflected polynomial 0x82F63B78), the checksum iSCSI, ext4 and virtio-fs
 * use. It detects every single-bit error and every burst of up to 32 bits, which is what a
 * migration image needs; it is not a defence against a deliberate forger.
 */

const TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/**
 * CRC-32C of `bytes[start, end)`. Pass the result of a previous call as `crc` to continue over
 * a further range, as if the two ranges were one.
 */
export function crc32c(bytes: Uint8Array, start = 0, end = bytes.length, crc = 0): number {
  let c = ~crc >>> 0;
  for (let i = start; i < end; i++) c = TABLE[(c ^ bytes[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}
