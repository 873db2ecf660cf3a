// On Start: the CRC-16/CCITT-FALSE table (poly 0x1021), built once.
const t = new Array(256);
for (let n = 0; n < 256; n++) {
    let c = n << 8;
    for (let b = 0; b < 8; b++) c = c & 0x8000 ? ((c << 1) ^ 0x1021) & 0xffff : (c << 1) & 0xffff;
    t[n] = c;
}
context.set("crc", t);
