//! The NBD wire format (NetworkBlockDevice/nbd doc/proto.md): constants,
//! request encoding, and the checks of every header and payload a server
//! sends. Pure functions on bytes; nothing here does I/O. Everything the
//! server says is untrusted: lengths and offsets are checked against what
//! was asked with checked arithmetic, and a violation is a [`Violation`]
//! (the connection is dropped), never a panic.

use std::fmt;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

// NBD_OPT_GO information.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR_BIT: u16 = 1 << 15;
pub const CHUNK_ERROR: u16 = CHUNK_ERROR_BIT | 1;
pub const CHUNK_ERROR_OFFSET: u16 = CHUNK_ERROR_BIT | 2;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;

/// The metadata context asked for.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Largest payload a client sends or asks for when the server states no
/// maximum (proto.md: 32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// Largest non-data chunk (errors, block status) accepted: a block status
/// reply to one request of ours has at most this many bytes of
/// descriptors (8 each); anything larger is a violation.
pub const MAX_META_CHUNK: u32 = 1 << 20;

/// Largest option reply accepted during the handshake.
pub const MAX_OPTION_REPLY: u32 = 64 << 10;

/// A server broke the protocol; the connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "protocol violation: {}", self.0)
    }
}

impl std::error::Error for Violation {}

macro_rules! violation {
    ($($arg:tt)*) => { Err(Violation(format!($($arg)*))) };
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// A transmission request header (28 bytes).
pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option request: header and data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// NBD_OPT_GO's data: the export name and the information requested.
pub fn go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// NBD_OPT_SET_META_CONTEXT's data: the export name and the queries.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// The server's first 18 bytes: its handshake flags.
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, Violation> {
    if be64(b, 0) != NBDMAGIC {
        return violation!("not an NBD server (bad magic)");
    }
    if be64(b, 8) != IHAVEOPT {
        return violation!("old-style NBD server (not supported)");
    }
    let flags = be16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return violation!("server without fixed newstyle negotiation");
    }
    Ok(flags)
}

/// An option reply header (20 bytes): (reply type, data length), checked
/// to answer `opt` and to be at most [`MAX_OPTION_REPLY`] long.
pub fn parse_option_reply(b: &[u8; 20], opt: u32) -> Result<(u32, u32), Violation> {
    if be64(b, 0) != OPT_REPLY_MAGIC {
        return violation!("bad option reply magic");
    }
    if be32(b, 8) != opt {
        return violation!("reply to option {} while {opt} was asked", be32(b, 8));
    }
    let len = be32(b, 16);
    if len > MAX_OPTION_REPLY {
        return violation!("option reply of {len} bytes");
    }
    Ok((be32(b, 12), len))
}

/// What the server says of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub block: BlockSize,
}

/// Block size constraints (NBD_INFO_BLOCK_SIZE), checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSize {
    /// What a client assumes of a server that states nothing (proto.md).
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl BlockSize {
    /// The largest READ or WRITE payload sent: the server's maximum, at
    /// most 32 MiB, a multiple of the minimum.
    pub fn max_payload(&self) -> u32 {
        let cap = self.maximum.min(DEFAULT_MAX_PAYLOAD);
        (cap / self.minimum.max(1)).max(1) * self.minimum.max(1)
    }
}

/// NBD_INFO_EXPORT's data (after the type): size and transmission flags.
pub fn parse_info_export(b: &[u8]) -> Result<(u64, u16), Violation> {
    if b.len() != 10 {
        return violation!("NBD_INFO_EXPORT of {} bytes", b.len() + 2);
    }
    let size = be64(b, 0);
    if size > i64::MAX as u64 {
        return violation!("export size {size} beyond 2^63");
    }
    Ok((size, be16(b, 8)))
}

/// The smallest maximum payload accepted from a server.
pub const MIN_MAX_PAYLOAD: u32 = 4096;

/// NBD_INFO_BLOCK_SIZE's data (after the type), checked as proto.md
/// requires: powers of two, minimum at most 64 KiB, preferred at least the
/// minimum, maximum a multiple of the minimum; and a maximum of at least
/// [`MIN_MAX_PAYLOAD`].
pub fn parse_info_block_size(b: &[u8]) -> Result<BlockSize, Violation> {
    if b.len() != 12 {
        return violation!("NBD_INFO_BLOCK_SIZE of {} bytes", b.len() + 2);
    }
    let (minimum, preferred, maximum) = (be32(b, 0), be32(b, 4), be32(b, 8));
    if !minimum.is_power_of_two() || minimum > 64 << 10 {
        return violation!("minimum block size {minimum}");
    }
    if !preferred.is_power_of_two() || preferred < minimum {
        return violation!("preferred block size {preferred} (minimum {minimum})");
    }
    if maximum < minimum || (maximum != u32::MAX && maximum % minimum != 0) {
        return violation!("maximum block size {maximum} (minimum {minimum})");
    }
    // A tiny maximum would split each transfer into a command per few
    // bytes (a 32 MiB read into millions): refused.
    if maximum < MIN_MAX_PAYLOAD {
        return violation!("maximum block size {maximum} (below {MIN_MAX_PAYLOAD})");
    }
    Ok(BlockSize {
        minimum,
        preferred,
        maximum,
    })
}

/// NBD_REP_META_CONTEXT's data: (context id, name).
pub fn parse_meta_context(b: &[u8]) -> Result<(u32, String), Violation> {
    if b.len() < 4 {
        return violation!("NBD_REP_META_CONTEXT of {} bytes", b.len());
    }
    Ok((be32(b, 0), String::from_utf8_lossy(&b[4..]).into_owned()))
}

/// A reply header's start: the magic says which kind, and how many more
/// header bytes follow (simple: 12, structured: 16).
pub fn reply_header_rest(magic: u32, structured: bool) -> Result<usize, Violation> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(12),
        STRUCTURED_REPLY_MAGIC if structured => Ok(16),
        STRUCTURED_REPLY_MAGIC => violation!("structured reply that was not negotiated"),
        other => violation!("bad reply magic {other:#x}"),
    }
}

/// A simple reply (after the magic): (error, cookie).
pub fn parse_simple(b: &[u8; 12]) -> (u32, u64) {
    (be32(b, 0), be64(b, 4))
}

/// A structured reply chunk header (after the magic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

pub fn parse_chunk_header(b: &[u8; 16]) -> ChunkHeader {
    ChunkHeader {
        flags: be16(b, 0),
        kind: be16(b, 2),
        cookie: be64(b, 4),
        len: be32(b, 12),
    }
}

/// The request a chunk answers, as far as its checks need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asked {
    pub cmd: u16,
    pub offset: u64,
    pub len: u32,
}

impl Asked {
    /// `off..off+len` lies in the request's range; returns where, in
    /// bytes from the request's offset.
    pub fn within(&self, off: u64, len: u64) -> Result<usize, Violation> {
        let end = off.checked_add(len);
        let asked_end = self.offset + u64::from(self.len);
        match end {
            Some(end) if off >= self.offset && end <= asked_end => Ok((off - self.offset) as usize),
            _ => violation!(
                "chunk {off}+{len} outside the request {}+{}",
                self.offset,
                self.len
            ),
        }
    }
}

/// What to do with a chunk, decided from its header alone (its payload is
/// read afterwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkPlan {
    /// NBD_REPLY_TYPE_NONE: nothing follows.
    None,
    /// OFFSET_DATA: an 8-byte offset, then `len - 8` bytes of data.
    Data { data_len: u32 },
    /// OFFSET_HOLE: 12 bytes (offset, hole size).
    Hole,
    /// An error chunk, or block status: `len` bytes read whole (bounded).
    Whole,
}

/// Checks a chunk header against the request it answers.
pub fn plan_chunk(h: &ChunkHeader, asked: &Asked) -> Result<ChunkPlan, Violation> {
    let read = asked.cmd == CMD_READ;
    match h.kind {
        CHUNK_NONE if h.len == 0 && h.flags & REPLY_FLAG_DONE != 0 => Ok(ChunkPlan::None),
        CHUNK_NONE => violation!("NONE chunk of {} bytes or without DONE", h.len),
        CHUNK_OFFSET_DATA if read => match h.len.checked_sub(8) {
            Some(data_len) if data_len > 0 && data_len <= asked.len => {
                Ok(ChunkPlan::Data { data_len })
            }
            _ => violation!(
                "OFFSET_DATA chunk of {} bytes for a read of {}",
                h.len,
                asked.len
            ),
        },
        CHUNK_OFFSET_HOLE if read && h.len == 12 => Ok(ChunkPlan::Hole),
        CHUNK_BLOCK_STATUS if asked.cmd == CMD_BLOCK_STATUS => {
            if h.len < 12 || h.len > MAX_META_CHUNK || (h.len - 4) % 8 != 0 {
                return violation!("BLOCK_STATUS chunk of {} bytes", h.len);
            }
            Ok(ChunkPlan::Whole)
        }
        k if k & CHUNK_ERROR_BIT != 0 => {
            if h.len < 6 || h.len > MAX_OPTION_REPLY {
                return violation!("error chunk of {} bytes", h.len);
            }
            Ok(ChunkPlan::Whole)
        }
        k => violation!("chunk type {k} of {} bytes to command {}", h.len, asked.cmd),
    }
}

/// An OFFSET_DATA chunk's offset (its first 8 bytes): where its data goes
/// in the request's range.
pub fn data_at(offset: [u8; 8], data_len: u32, asked: &Asked) -> Result<usize, Violation> {
    asked.within(u64::from_be_bytes(offset), u64::from(data_len))
}

/// An OFFSET_HOLE chunk: (where in the request's range, hole length).
pub fn parse_hole(b: &[u8; 12], asked: &Asked) -> Result<(usize, u32), Violation> {
    let (off, len) = (be64(b, 0), be32(b, 8));
    if len == 0 {
        return violation!("empty hole chunk");
    }
    Ok((asked.within(off, u64::from(len))?, len))
}

/// An error chunk's payload: the errno it carries (never 0), and for
/// ERROR_OFFSET, the offset checked to be in the request.
pub fn parse_error_chunk(kind: u16, b: &[u8], asked: &Asked) -> Result<u32, Violation> {
    let error = be32(b, 0);
    let msg_len = usize::from(be16(b, 4));
    if error == 0 {
        return violation!("error chunk with error 0");
    }
    let rest = b.len() - 6;
    match kind {
        CHUNK_ERROR if msg_len == rest => Ok(error),
        CHUNK_ERROR_OFFSET if msg_len.checked_add(8) == Some(rest) => {
            asked.within(be64(b, 6 + msg_len), 0)?;
            Ok(error)
        }
        // Unknown error types: the error is what the client takes
        // (proto.md asks clients to treat them as errors).
        k if k != CHUNK_ERROR && k != CHUNK_ERROR_OFFSET && msg_len <= rest => Ok(error),
        _ => violation!("error chunk message of {msg_len} in {} bytes", b.len()),
    }
}

/// A BLOCK_STATUS chunk's payload for context `ctx`: the extent at the
/// request's offset, as (allocated, length), consecutive descriptors of
/// the same state merged, clamped to the request's length.
pub fn parse_block_status(b: &[u8], ctx: u32, asked: &Asked) -> Result<(bool, u64), Violation> {
    if be32(b, 0) != ctx {
        return violation!("block status for context {} (asked {ctx})", be32(b, 0));
    }
    let mut first: Option<bool> = None;
    let mut len = 0u64;
    for d in b[4..].chunks_exact(8) {
        let (dlen, flags) = (be32(d, 0), be32(d, 4));
        if dlen == 0 {
            return violation!("block status descriptor of length 0");
        }
        let allocated = flags & STATE_HOLE == 0;
        match first {
            None => first = Some(allocated),
            Some(a) if a != allocated => break,
            Some(_) => {}
        }
        len += u64::from(dlen);
        if len >= u64::from(asked.len) {
            break;
        }
    }
    match first {
        Some(a) => Ok((a, len.min(u64::from(asked.len)))),
        None => violation!("block status without descriptors"),
    }
}

/// The error an NBD error value stands for. The values are Linux errnos
/// (proto.md's list); unknown ones are read as EINVAL, as proto.md asks.
pub fn errno(value: u32) -> i32 {
    match value {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => value as i32,
        _ => libc::EINVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Asked = Asked {
        cmd: CMD_READ,
        offset: 4096,
        len: 8192,
    };

    #[test]
    fn request_bytes_follow_the_spec() {
        let r = request(CMD_FLAG_FUA, CMD_WRITE, 0x0102030405060708, 0x1000, 512);
        assert_eq!(
            r,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
        assert_eq!(
            go_data("ab", &[INFO_BLOCK_SIZE]),
            [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]
        );
        let mut want = vec![0, 0, 0, 1, b'x', 0, 0, 0, 1, 0, 0, 0, 15];
        want.extend_from_slice(b"base:allocation");
        assert_eq!(meta_context_data("x", &[BASE_ALLOCATION]), want);
        assert_eq!(
            option(OPT_STRUCTURED_REPLY, &[]),
            [b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 0, 0, 8, 0, 0, 0, 0]
        );
    }

    #[test]
    fn greeting_and_option_replies() {
        let mut g = *b"NBDMAGICIHAVEOPT\0\x03";
        assert_eq!(parse_greeting(&g), Ok(3));
        g[17] = 2;
        assert!(parse_greeting(&g).is_err(), "fixed newstyle required");
        let g = *b"NBDMAGIC\0\0\x42\x02\x81\x86\x12\x53\0\0";
        assert!(parse_greeting(&g).unwrap_err().0.contains("old-style"));

        let mut r = [0u8; 20];
        r[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        r[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        r[12..16].copy_from_slice(&REP_INFO.to_be_bytes());
        r[16..20].copy_from_slice(&12u32.to_be_bytes());
        assert_eq!(parse_option_reply(&r, OPT_GO), Ok((REP_INFO, 12)));
        assert!(parse_option_reply(&r, OPT_STRUCTURED_REPLY).is_err());
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option_reply(&r, OPT_GO).is_err(), "huge reply");
    }

    #[test]
    fn info_replies() {
        let export = [0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x4d];
        assert_eq!(parse_info_export(&export), Ok((1 << 20, 0x14d)));
        assert!(parse_info_export(&export[..9]).is_err());
        assert!(parse_info_export(&[0xff; 10]).is_err(), "size beyond 2^63");
        let bs = [0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0];
        let bs = parse_info_block_size(&bs).unwrap();
        assert_eq!(
            (bs.minimum, bs.preferred, bs.maximum),
            (512, 4096, 32 << 20)
        );
        assert_eq!(bs.max_payload(), 32 << 20);
        let big = BlockSize {
            minimum: 4096,
            preferred: 4096,
            maximum: u32::MAX,
        };
        assert_eq!(big.max_payload(), 32 << 20);
        for bad in [
            [0, 0, 0, 3, 0, 0, 0x10, 0, 0, 0, 0x10, 0], // minimum not a power of 2
            [0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0],       // minimum 128 KiB
            [0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0x10, 0],    // preferred < minimum
            [0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0],       // maximum not a multiple
        ] {
            assert!(parse_info_block_size(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_maximum_payload_below_4096_or_the_minimum_is_refused() {
        // Minimum 1, preferred 4096, maximum 1: each 32 MiB transfer would
        // become 33 million commands.
        assert!(parse_info_block_size(&[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 1]).is_err());
        // Maximum 2048.
        assert!(parse_info_block_size(&[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]).is_err());
        // Maximum 4096 is enough.
        let bs = parse_info_block_size(&[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0x10, 0]).unwrap();
        assert_eq!(bs.max_payload(), 4096);
    }

    #[test]
    fn reply_headers() {
        assert_eq!(reply_header_rest(SIMPLE_REPLY_MAGIC, false), Ok(12));
        assert_eq!(reply_header_rest(STRUCTURED_REPLY_MAGIC, true), Ok(16));
        assert!(reply_header_rest(STRUCTURED_REPLY_MAGIC, false).is_err());
        assert!(reply_header_rest(0xdeadbeef, true).is_err());
        assert_eq!(parse_simple(&[0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9]), (5, 9));
        let h = parse_chunk_header(&[0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0x20, 8]);
        assert_eq!(
            h,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: CHUNK_OFFSET_DATA,
                cookie: 7,
                len: 0x2008
            }
        );
        assert_eq!(
            plan_chunk(&h, &READ),
            Ok(ChunkPlan::Data { data_len: 8192 })
        );
    }

    fn chunk(kind: u16, len: u32) -> ChunkHeader {
        ChunkHeader {
            flags: 0,
            kind,
            cookie: 1,
            len,
        }
    }

    #[test]
    fn data_and_hole_chunks_stay_inside_the_request() {
        assert!(
            plan_chunk(&chunk(CHUNK_OFFSET_DATA, 8 + 8193), &READ).is_err(),
            "longer than asked"
        );
        assert!(
            plan_chunk(&chunk(CHUNK_OFFSET_DATA, u32::MAX), &READ).is_err(),
            "huge"
        );
        assert!(
            plan_chunk(&chunk(CHUNK_OFFSET_DATA, 8), &READ).is_err(),
            "empty"
        );
        assert!(
            plan_chunk(&chunk(CHUNK_OFFSET_DATA, 7), &READ).is_err(),
            "short"
        );
        let write = Asked {
            cmd: CMD_WRITE,
            ..READ
        };
        assert!(
            plan_chunk(&chunk(CHUNK_OFFSET_DATA, 16), &write).is_err(),
            "data to a write"
        );
        assert_eq!(data_at(4096u64.to_be_bytes(), 8192, &READ), Ok(0));
        assert_eq!(data_at(8192u64.to_be_bytes(), 4096, &READ), Ok(4096));
        assert!(
            data_at(8192u64.to_be_bytes(), 4097, &READ).is_err(),
            "past the request"
        );
        assert!(
            data_at(0u64.to_be_bytes(), 1, &READ).is_err(),
            "before the request"
        );
        assert!(
            data_at(u64::MAX.to_be_bytes(), 2, &READ).is_err(),
            "overflow"
        );

        assert_eq!(
            plan_chunk(&chunk(CHUNK_OFFSET_HOLE, 12), &READ),
            Ok(ChunkPlan::Hole)
        );
        assert!(plan_chunk(&chunk(CHUNK_OFFSET_HOLE, 13), &READ).is_err());
        let hole = [0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x10, 0];
        assert_eq!(parse_hole(&hole, &READ), Ok((4096, 4096)));
        let hole = [0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x10, 1];
        assert!(parse_hole(&hole, &READ).is_err());
        let hole = [0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0];
        assert!(parse_hole(&hole, &READ).is_err(), "empty hole");
    }

    #[test]
    fn error_chunks() {
        assert!(plan_chunk(&chunk(CHUNK_ERROR, 5), &READ).is_err());
        assert!(plan_chunk(&chunk(CHUNK_ERROR, 1 << 30), &READ).is_err());
        assert_eq!(
            plan_chunk(&chunk(CHUNK_ERROR, 8), &READ),
            Ok(ChunkPlan::Whole)
        );
        assert_eq!(
            parse_error_chunk(CHUNK_ERROR, &[0, 0, 0, 5, 0, 2, b'h', b'i'], &READ),
            Ok(5)
        );
        assert!(parse_error_chunk(CHUNK_ERROR, &[0, 0, 0, 5, 0, 3, b'h', b'i'], &READ).is_err());
        assert!(
            parse_error_chunk(CHUNK_ERROR, &[0, 0, 0, 0, 0, 0], &READ).is_err(),
            "error 0"
        );
        let mut eo = vec![0, 0, 0, 28, 0, 0];
        eo.extend_from_slice(&5000u64.to_be_bytes());
        assert_eq!(parse_error_chunk(CHUNK_ERROR_OFFSET, &eo, &READ), Ok(28));
        let mut eo = vec![0, 0, 0, 28, 0, 0];
        eo.extend_from_slice(&100u64.to_be_bytes());
        assert!(
            parse_error_chunk(CHUNK_ERROR_OFFSET, &eo, &READ).is_err(),
            "offset outside"
        );
        assert_eq!(
            parse_error_chunk(CHUNK_ERROR_BIT | 9, &[0, 0, 0, 1, 0, 0, 1], &READ),
            Ok(1)
        );
        assert!(
            plan_chunk(&chunk(3, 4), &READ).is_err(),
            "unknown non-error type"
        );
        assert_eq!(errno(5), libc::EIO);
        assert_eq!(errno(28), libc::ENOSPC);
        assert_eq!(errno(1234), libc::EINVAL);
    }

    #[test]
    fn block_status_payloads() {
        let asked = Asked {
            cmd: CMD_BLOCK_STATUS,
            offset: 0,
            len: 1 << 20,
        };
        assert_eq!(
            plan_chunk(&chunk(CHUNK_BLOCK_STATUS, 4 + 24), &asked),
            Ok(ChunkPlan::Whole)
        );
        assert!(plan_chunk(&chunk(CHUNK_BLOCK_STATUS, 4 + 23), &asked).is_err());
        assert!(plan_chunk(&chunk(CHUNK_BLOCK_STATUS, 4), &asked).is_err());
        assert!(
            plan_chunk(&chunk(CHUNK_BLOCK_STATUS, 0xffff_fff4), &asked).is_err(),
            "huge"
        );
        assert!(
            plan_chunk(&chunk(CHUNK_BLOCK_STATUS, 12), &READ).is_err(),
            "to a read"
        );
        // context 1: 64 KiB data, 64 KiB data+zero, 1 MiB hole.
        let p = [
            0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2, 0, 0x10, 0, 0, 0, 0, 0, 3,
        ];
        assert_eq!(parse_block_status(&p, 1, &asked), Ok((true, 128 << 10)));
        assert!(
            parse_block_status(&p, 2, &asked).is_err(),
            "another context"
        );
        let hole = [0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1];
        assert_eq!(
            parse_block_status(&hole, 1, &asked),
            Ok((false, 1 << 20)),
            "clamped"
        );
        assert!(parse_block_status(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], 1, &asked).is_err());
    }
}
