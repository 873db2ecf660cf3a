// Lantern DATA frame -> resolved SenML records, in a Node-RED function node.
// Same checks as the gateway: COBS, CRC-16/CCITT-FALSE, COSE_Mac0 (HMAC 256/64) under the
// node's key, SenML resolution (RFC 8428 section 4.6) with the reading id node:seq:index;
// a pack without bn gets urn:dev:lantern:<kid>:, a record without u its canonical unit.
const cbor = global.get("cbor");
const crypto = global.get("crypto");
const keys = global.get("keys"); // node id -> key (Buffer)
const units = global.get("units"); // measurement name -> unit
const table = context.get("crc");

function reject(kind) {
    const n = (context.get("rejected." + kind) || 0) + 1;
    context.set("rejected." + kind, n);
    if (n === 1) node.warn("rejected frame: " + kind);
    return null;
}

let chunk = msg.payload; // the serial node splits after each 0x00 and keeps it
if (chunk.length && chunk[chunk.length - 1] === 0) chunk = chunk.subarray(0, chunk.length - 1);
if (chunk.length === 0) return null; // the delimiter in front of a frame

const raw = Buffer.allocUnsafe(chunk.length);
let o = 0;
let i = 0;
while (i < chunk.length) {
    const code = chunk[i++];
    const end = i + code - 1;
    if (code === 0 || end > chunk.length) return reject("cobs");
    chunk.copy(raw, o, i, end);
    o += end - i;
    i = end;
    if (code < 255 && i < chunk.length) raw[o++] = 0;
}
if (o < 3) return reject("short");
let crc = 0xffff;
for (let k = 0; k < o - 2; k++) crc = ((crc << 8) ^ table[((crc >> 8) ^ raw[k]) & 0xff]) & 0xffff;
if (crc !== raw.readUInt16BE(o - 2)) return reject("crc");
if (raw[0] !== 1) return reject("type");

let mac0;
try {
    mac0 = cbor.decode(raw.subarray(1, o - 2));
} catch (e) {
    return reject("cbor");
}
if (!mac0 || mac0.tag !== 17 || !Array.isArray(mac0.value) || mac0.value.length !== 4) {
    return reject("cose");
}
const [prot, , payload, tag] = mac0.value;
const hdr = cbor.decode(prot);
const kid = Buffer.from(hdr[4]).toString();
const key = keys[kid];
if (!key) return reject("unknown_node");
// MAC_structure = ["MAC0", protected, h'', payload] (RFC 9052 section 6.3)
const head = (len) => len < 24 ? Buffer.from([0x40 | len])
    : len < 256 ? Buffer.from([0x58, len]) : Buffer.from([0x59, len >> 8, len & 0xff]);
const structure = Buffer.concat([Buffer.from([0x84, 0x64, 0x4d, 0x41, 0x43, 0x30]),
    head(prot.length), prot, Buffer.from([0x40]), head(payload.length), payload]);
const want = crypto.createHmac("sha256", key).update(structure).digest().subarray(0, 8);
if (tag.length !== 8 || !crypto.timingSafeEqual(want, Buffer.from(tag))) return reject("mac");
const seq = Buffer.from(hdr[6]).readUIntBE(0, hdr[6].length);

const pack = cbor.decode(payload);
const out = [];
const prefix = "urn:dev:lantern:" + kid + ":";
let bn = prefix;
let bt = 0;
let bu;
for (let r = 0; r < pack.length; r++) {
    const rec = pack[r];
    if (rec[-2] !== undefined) bn = rec[-2];
    if (rec[-3] !== undefined) bt = rec[-3];
    if (rec[-4] !== undefined) bu = rec[-4];
    const rec_out = {n: bn + (rec[0] || ""), t: bt + (rec[6] || 0)};
    let u = rec[1] !== undefined ? rec[1] : bu;
    if (u === undefined && rec_out.n.startsWith(prefix)) u = units[rec_out.n.slice(prefix.length)];
    if (u !== undefined) rec_out.u = u;
    if (rec[2] !== undefined) rec_out.v = rec[2];
    else if (rec[3] !== undefined) rec_out.vs = rec[3];
    else if (rec[4] !== undefined) rec_out.vb = rec[4];
    else if (rec[8] !== undefined) rec_out.vd = Buffer.from(rec[8]).toString("base64url");
    else return reject("senml");
    rec_out.id = kid + ":" + seq + ":" + r;
    out.push(rec_out);
}
msg.payload = out;
return msg;
