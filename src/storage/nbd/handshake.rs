//! The fixed newstyle handshake: structured replies, the `base:allocation`
//! metadata context, then NBD_OPT_GO with the block size constraints asked
//! for (NBD_OPT_EXPORT_NAME for a server without NBD_OPT_GO).

use std::io::{self, Read, Write};

use super::wire::{self, BlockSize, ExportInfo, Violation};

/// What one connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub info: ExportInfo,
    /// Structured replies are on.
    pub structured: bool,
    /// The id of `base:allocation`, if the server has it.
    pub allocation_context: Option<u32>,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{}", super::io_message(.0))]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(#[from] Violation),
    #[error("the server refused the export: {0}")]
    Refused(String),
}

fn read_exact<const N: usize>(s: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Most replies taken to one option (a server streaming replies forever
/// is cut off).
const MAX_REPLIES: usize = 64;

/// One option reply: (type, data).
fn option_reply(s: &mut impl Read, opt: u32) -> Result<(u32, Vec<u8>), HandshakeError> {
    let (kind, len) = wire::parse_option_reply(&read_exact::<20>(s)?, opt)?;
    // Bounded by MAX_OPTION_REPLY.
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((kind, data))
}

fn refusal(kind: u32, data: &[u8]) -> String {
    let what = match kind {
        wire::REP_ERR_UNSUP => "unsupported",
        wire::REP_ERR_UNKNOWN => "no such export",
        k if k == wire::REP_FLAG_ERROR | 2 => "forbidden by policy",
        k if k == wire::REP_FLAG_ERROR | 3 => "invalid",
        k if k == wire::REP_FLAG_ERROR | 5 => "TLS required",
        k if k == wire::REP_FLAG_ERROR | 7 => "server shutting down",
        k if k == wire::REP_FLAG_ERROR | 8 => "block size required",
        _ => "error",
    };
    let msg = String::from_utf8_lossy(data);
    let msg: String = msg.chars().filter(|c| !c.is_control()).take(200).collect();
    if msg.is_empty() {
        what.to_string()
    } else {
        format!("{what} ({msg})")
    }
}

/// Negotiates `export` over `s` (timeouts are the caller's, on the
/// socket).
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<Negotiated, HandshakeError> {
    let flags = wire::parse_greeting(&read_exact::<18>(s)?)?;
    let no_zeroes = flags & wire::FLAG_NO_ZEROES != 0;
    let client = wire::FLAG_FIXED_NEWSTYLE as u32
        | if no_zeroes {
            wire::FLAG_NO_ZEROES as u32
        } else {
            0
        };
    s.write_all(&client.to_be_bytes())?;

    s.write_all(&wire::option(wire::OPT_STRUCTURED_REPLY, &[]))?;
    let (kind, _) = option_reply(s, wire::OPT_STRUCTURED_REPLY)?;
    let structured = match kind {
        wire::REP_ACK => true,
        k if k & wire::REP_FLAG_ERROR != 0 => false,
        k => return Err(Violation(format!("reply {k} to NBD_OPT_STRUCTURED_REPLY")).into()),
    };

    let mut allocation_context = None;
    if structured {
        let data = wire::meta_context_data(export, &[wire::BASE_ALLOCATION]);
        s.write_all(&wire::option(wire::OPT_SET_META_CONTEXT, &data))?;
        for n in 0.. {
            if n == MAX_REPLIES {
                return Err(Violation("endless NBD_OPT_SET_META_CONTEXT replies".into()).into());
            }
            match option_reply(s, wire::OPT_SET_META_CONTEXT)? {
                (wire::REP_META_CONTEXT, data) => {
                    let (id, name) = wire::parse_meta_context(&data)?;
                    if name == wire::BASE_ALLOCATION {
                        allocation_context = Some(id);
                    }
                }
                (wire::REP_ACK, _) => break,
                (k, _) if k & wire::REP_FLAG_ERROR != 0 => break,
                (k, _) => {
                    return Err(Violation(format!("reply {k} to NBD_OPT_SET_META_CONTEXT")).into())
                }
            }
        }
    }

    s.write_all(&wire::option(
        wire::OPT_GO,
        &wire::go_data(export, &[wire::INFO_BLOCK_SIZE]),
    ))?;
    let mut export_info = None;
    let mut block = BlockSize::default();
    for n in 0.. {
        if n == MAX_REPLIES {
            return Err(Violation("endless NBD_OPT_GO replies".into()).into());
        }
        match option_reply(s, wire::OPT_GO)? {
            (wire::REP_INFO, data) if data.len() >= 2 => {
                let kind = u16::from_be_bytes([data[0], data[1]]);
                match kind {
                    wire::INFO_EXPORT => export_info = Some(wire::parse_info_export(&data[2..])?),
                    wire::INFO_BLOCK_SIZE => block = wire::parse_info_block_size(&data[2..])?,
                    // Information not asked for (name, description).
                    _ => {}
                }
            }
            (wire::REP_INFO, _) => {
                return Err(Violation("NBD_REP_INFO under 2 bytes".into()).into())
            }
            (wire::REP_ACK, _) => break,
            (wire::REP_ERR_UNSUP, _) => return export_name(s, export, no_zeroes),
            (k, data) if k & wire::REP_FLAG_ERROR != 0 => {
                return Err(HandshakeError::Refused(refusal(k, &data)))
            }
            (k, _) => return Err(Violation(format!("reply {k} to NBD_OPT_GO")).into()),
        }
    }
    let (size, flags) =
        export_info.ok_or_else(|| Violation("NBD_OPT_GO without NBD_INFO_EXPORT".into()))?;
    if flags & wire::TF_HAS_FLAGS == 0 {
        return Err(Violation("transmission flags without NBD_FLAG_HAS_FLAGS".into()).into());
    }
    Ok(Negotiated {
        info: ExportInfo { size, flags, block },
        structured,
        allocation_context,
    })
}

/// NBD_OPT_EXPORT_NAME, for a server without NBD_OPT_GO (no structured
/// replies were negotiated by such a server either).
fn export_name<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<Negotiated, HandshakeError> {
    s.write_all(&wire::option(wire::OPT_EXPORT_NAME, export.as_bytes()))?;
    let b = read_exact::<10>(s)?;
    let (size, flags) = wire::parse_info_export(&b)?;
    if !no_zeroes {
        read_exact::<124>(s)?;
    }
    Ok(Negotiated {
        info: ExportInfo {
            size,
            flags,
            block: BlockSize::default(),
        },
        structured: false,
        allocation_context: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A scripted server: what it says, and what the client wrote.
    pub struct Script {
        pub input: io::Cursor<Vec<u8>>,
        pub output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    pub fn reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut b = wire::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    /// A server's whole handshake: structured replies, base:allocation as
    /// context 7, the export of `size` with `flags` and block sizes.
    pub fn server_handshake(size: u64, flags: u16, block: Option<[u32; 3]>) -> Vec<u8> {
        let mut b = b"NBDMAGICIHAVEOPT\0\x03".to_vec();
        b.extend(reply(wire::OPT_STRUCTURED_REPLY, wire::REP_ACK, &[]));
        let mut ctx = 7u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        b.extend(reply(
            wire::OPT_SET_META_CONTEXT,
            wire::REP_META_CONTEXT,
            &ctx,
        ));
        b.extend(reply(wire::OPT_SET_META_CONTEXT, wire::REP_ACK, &[]));
        let mut info = vec![0, 0];
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        b.extend(reply(wire::OPT_GO, wire::REP_INFO, &info));
        if let Some([min, pref, max]) = block {
            let mut info = vec![0, 3];
            for v in [min, pref, max] {
                info.extend_from_slice(&v.to_be_bytes());
            }
            b.extend(reply(wire::OPT_GO, wire::REP_INFO, &info));
        }
        b.extend(reply(wire::OPT_GO, wire::REP_ACK, &[]));
        b
    }

    fn run(input: Vec<u8>) -> (Result<Negotiated, HandshakeError>, Vec<u8>) {
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let r = handshake(&mut s, "disk");
        (r, s.output)
    }

    #[test]
    fn a_full_handshake() {
        let (r, out) = run(server_handshake(1 << 30, 0x14d, Some([512, 4096, 1 << 25])));
        let n = r.unwrap();
        assert_eq!(n.info.size, 1 << 30);
        assert_eq!(n.info.flags, 0x14d);
        assert_eq!(n.info.block.minimum, 512);
        assert!(n.structured);
        assert_eq!(n.allocation_context, Some(7));
        // Client flags, then the three options in order.
        assert_eq!(&out[..4], &[0, 0, 0, 3]);
        assert_eq!(
            &out[4..20],
            &wire::option(wire::OPT_STRUCTURED_REPLY, &[])[..]
        );
        let meta = wire::option(
            wire::OPT_SET_META_CONTEXT,
            &wire::meta_context_data("disk", &["base:allocation"]),
        );
        assert_eq!(&out[20..20 + meta.len()], &meta[..]);
        let go = wire::option(wire::OPT_GO, &wire::go_data("disk", &[3]));
        assert_eq!(&out[20 + meta.len()..], &go[..]);
    }

    #[test]
    fn a_server_refusing_structured_replies_and_meta_contexts() {
        let mut b = b"NBDMAGICIHAVEOPT\0\x01".to_vec();
        b.extend(reply(wire::OPT_STRUCTURED_REPLY, wire::REP_ERR_UNSUP, &[]));
        let mut info = vec![0, 0];
        info.extend_from_slice(&4096u64.to_be_bytes());
        info.extend_from_slice(&1u16.to_be_bytes());
        b.extend(reply(wire::OPT_GO, wire::REP_INFO, &info));
        b.extend(reply(wire::OPT_GO, wire::REP_ACK, &[]));
        let (r, out) = run(b);
        let n = r.unwrap();
        assert!(!n.structured);
        assert_eq!(n.allocation_context, None);
        assert_eq!(n.info.block, BlockSize::default());
        assert_eq!(
            &out[..4],
            &[0, 0, 0, 1],
            "no NO_ZEROES when the server lacks it"
        );
    }

    #[test]
    fn an_unknown_export_is_refused_with_the_servers_words() {
        let mut b = server_handshake(0, 1, None);
        let go_at = b.len() - 20 - 12 - 20; // the INFO and ACK replies of GO
        b.truncate(go_at);
        b.extend(reply(
            wire::OPT_GO,
            wire::REP_ERR_UNKNOWN,
            b"export 'disk' not present",
        ));
        let err = run(b).0.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the server refused the export: no such export (export 'disk' not present)"
        );
    }

    #[test]
    fn hostile_handshakes_fail_cleanly() {
        // A huge option reply, a reply to another option, a truncated
        // stream, an export without HAS_FLAGS, a bad block size.
        let mut huge = b"NBDMAGICIHAVEOPT\0\x03".to_vec();
        let mut h = reply(wire::OPT_STRUCTURED_REPLY, wire::REP_ACK, &[]);
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        huge.extend(h);
        assert!(matches!(run(huge).0, Err(HandshakeError::Protocol(_))));
        let mut other = b"NBDMAGICIHAVEOPT\0\x03".to_vec();
        other.extend(reply(wire::OPT_GO, wire::REP_ACK, &[]));
        assert!(matches!(run(other).0, Err(HandshakeError::Protocol(_))));
        let full = server_handshake(4096, 1, None);
        for cut in [0, 5, 18, 30, full.len() - 1] {
            assert!(
                matches!(run(full[..cut].to_vec()).0, Err(HandshakeError::Io(_))),
                "cut at {cut}"
            );
        }
        let mut endless = b"NBDMAGICIHAVEOPT\0\x03".to_vec();
        endless.extend(reply(wire::OPT_STRUCTURED_REPLY, wire::REP_ACK, &[]));
        for _ in 0..100 {
            endless.extend(reply(
                wire::OPT_SET_META_CONTEXT,
                wire::REP_META_CONTEXT,
                &[0, 0, 0, 1, b'x'],
            ));
        }
        assert!(matches!(run(endless).0, Err(HandshakeError::Protocol(_))));
        assert!(matches!(
            run(server_handshake(4096, 0, None)).0,
            Err(HandshakeError::Protocol(_))
        ));
        assert!(matches!(
            run(server_handshake(4096, 1, Some([3, 4096, 4096]))).0,
            Err(HandshakeError::Protocol(_))
        ));
    }
}
