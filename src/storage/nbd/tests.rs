//! The client against servers that misbehave on purpose (an in-process
//! fake speaking the protocol over a Unix socket), and the asynchronous
//! path (`RemoteStorage::submit` with pinned guest memory, which only the
//! crate can build) against qemu-nbd.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::handshake::tests::server_handshake;
use super::wire;
use super::*;
use crate::storage::remote::CompletionSink;

/// A request the fake server read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Req {
    conn: usize,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: Vec<u8>,
}

/// What the fake does with a request: bytes to send back, and whether to
/// close the connection after them.
type Handler = dyn Fn(&Req) -> (Vec<u8>, bool) + Send + Sync;

struct Fake {
    _dir: tempfile::TempDir,
    uri: String,
    seen: Arc<Mutex<Vec<Req>>>,
    connections: Arc<Mutex<usize>>,
}

const EXPORT_SIZE: u64 = 4 << 20;

/// A server on a Unix socket: the handshake of `server_handshake` (export
/// "x", structured replies, base:allocation as context 7), then `handler`
/// for each request, on every connection.
fn fake(flags: u16, handler: Box<Handler>) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(Mutex::new(0));
    let handler: Arc<Handler> = handler.into();
    {
        let (seen, connections) = (seen.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let conn = {
                    let mut c = connections.lock().unwrap();
                    *c += 1;
                    *c - 1
                };
                let (seen, handler) = (seen.clone(), handler.clone());
                std::thread::spawn(move || serve_fake(stream, conn, flags, &*handler, &seen));
            }
        });
    }
    Fake {
        uri: format!("nbd+unix:///x?socket={}", path.display()),
        _dir: dir,
        seen,
        connections,
    }
}

fn serve_fake(
    mut s: UnixStream,
    conn: usize,
    flags: u16,
    handler: &Handler,
    seen: &Mutex<Vec<Req>>,
) {
    if s.write_all(&server_handshake(
        EXPORT_SIZE,
        flags,
        Some([512, 4096, 1 << 20]),
    ))
    .is_err()
    {
        return;
    }
    // The client's flags and three options (export "x").
    let meta = 16 + 4 + 1 + 4 + 4 + 15;
    let go = 16 + 4 + 1 + 2 + 2;
    let mut opts = vec![0u8; 4 + 16 + meta + go];
    if s.read_exact(&mut opts).is_err() {
        return;
    }
    loop {
        let mut h = [0u8; 28];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let be16 = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
        let mut req = Req {
            conn,
            flags: be16(4),
            cmd: be16(6),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(h[24..28].try_into().unwrap()),
            payload: Vec::new(),
        };
        if req.cmd == wire::CMD_WRITE {
            req.payload = vec![0; req.len as usize];
            if s.read_exact(&mut req.payload).is_err() {
                return;
            }
        }
        seen.lock().unwrap().push(req.clone());
        if req.cmd == wire::CMD_DISC {
            return;
        }
        let (reply, close) = handler(&req);
        if s.write_all(&reply).is_err() || close {
            return;
        }
    }
}

fn simple(cookie: u64, error: u32) -> Vec<u8> {
    let mut b = wire::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = wire::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// The export's bytes, as the fakes serve them.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i % 251) as u8)
        .collect()
}

/// A correct structured read reply: the data in one chunk.
fn data_reply(req: &Req) -> Vec<u8> {
    let mut p = req.offset.to_be_bytes().to_vec();
    p.extend(pattern(req.offset, req.len as usize));
    chunk(
        wire::REPLY_FLAG_DONE,
        wire::CHUNK_OFFSET_DATA,
        req.cookie,
        &p,
    )
}

const ALL_FLAGS: u16 = wire::TF_HAS_FLAGS
    | wire::TF_SEND_FLUSH
    | wire::TF_SEND_FUA
    | wire::TF_SEND_TRIM
    | wire::TF_SEND_WRITE_ZEROES;

fn quick() -> NbdOptions {
    NbdOptions {
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        ..NbdOptions::default()
    }
}

fn read(image: &NbdImage, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut bufs = IoBufsMut::new();
    bufs.push_bytes(&mut buf);
    image.read_vectored_at(&mut bufs, offset)?;
    drop(bufs);
    Ok(buf)
}

fn write(image: &NbdImage, offset: u64, data: &[u8], durable: bool) -> io::Result<()> {
    let mut bufs = IoBufs::new();
    bufs.push_bytes(data);
    image.write_vectored_at(&bufs, offset, durable)
}

#[test]
fn hostile_replies_drop_the_connection_and_the_read_is_sent_again() {
    // Connection n misbehaves in way n; the last one answers right. Each
    // hostile reply, if taken, would complete the read with wrong bytes.
    // (Not checked: chunks that overlap and leave a gap of the same size;
    // the gap keeps what the memory held, and a server can send any bytes
    // anyway.)
    let server = fake(
        ALL_FLAGS,
        Box::new(|req: &Req| {
            if req.cmd != wire::CMD_READ {
                return (simple(req.cookie, 0), false);
            }
            let reply = match req.conn {
                // A reply to a cookie never sent.
                0 => {
                    let mut r = data_reply(req);
                    r[8..16].copy_from_slice(&(req.cookie + 1000).to_be_bytes());
                    r
                }
                // Data past the request's end.
                1 => {
                    let mut p = (req.offset + 512).to_be_bytes().to_vec();
                    p.extend(vec![0xee; req.len as usize]);
                    chunk(
                        wire::REPLY_FLAG_DONE,
                        wire::CHUNK_OFFSET_DATA,
                        req.cookie,
                        &p,
                    )
                }
                // A huge chunk length.
                2 => {
                    let mut r = data_reply(req);
                    r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                    r
                }
                // A block status chunk to a read.
                3 => chunk(
                    wire::REPLY_FLAG_DONE,
                    wire::CHUNK_BLOCK_STATUS,
                    req.cookie,
                    &[0, 0, 0, 7, 0, 0, 2, 0, 0, 0, 0, 0],
                ),
                _ => data_reply(req),
            };
            (reply, false)
        }),
    );
    let image = NbdImage::open(&server.uri, quick()).unwrap();
    assert_eq!(image.size(), EXPORT_SIZE);
    assert_eq!(image.transfer_granule(), 512);
    let got = read(&image, 4096, 8192).unwrap();
    assert!(got == pattern(4096, 8192), "the read's bytes");
    assert_eq!(*server.connections.lock().unwrap(), 5);
    // Every attempt was the same request.
    let seen = server.seen.lock().unwrap();
    assert!(seen
        .iter()
        .all(|r| (r.cmd, r.offset, r.len) == (wire::CMD_READ, 4096, 8192)));
    assert_eq!(seen.len(), 5);
}

#[test]
fn structured_holes_errors_and_block_status() {
    let server = fake(
        ALL_FLAGS,
        Box::new(|req: &Req| {
            let reply = match (req.cmd, req.offset) {
                // Data for the first half, a hole for the second.
                (wire::CMD_READ, 0) => {
                    let half = req.len / 2;
                    let mut p = 0u64.to_be_bytes().to_vec();
                    p.extend(pattern(0, half as usize));
                    let mut r = chunk(0, wire::CHUNK_OFFSET_DATA, req.cookie, &p);
                    let mut h = u64::from(half).to_be_bytes().to_vec();
                    h.extend_from_slice(&half.to_be_bytes());
                    r.extend(chunk(
                        wire::REPLY_FLAG_DONE,
                        wire::CHUNK_OFFSET_HOLE,
                        req.cookie,
                        &h,
                    ));
                    r
                }
                (wire::CMD_READ, _) => {
                    let mut p = 28u32.to_be_bytes().to_vec();
                    p.extend_from_slice(&[0, 2, b'n', b'o']);
                    chunk(wire::REPLY_FLAG_DONE, wire::CHUNK_ERROR, req.cookie, &p)
                }
                (wire::CMD_BLOCK_STATUS, _) => {
                    let mut p = 7u32.to_be_bytes().to_vec();
                    for (len, flags) in [(4096u32, 3u32), (4096, 1), (8192, 0)] {
                        p.extend_from_slice(&len.to_be_bytes());
                        p.extend_from_slice(&flags.to_be_bytes());
                    }
                    chunk(
                        wire::REPLY_FLAG_DONE,
                        wire::CHUNK_BLOCK_STATUS,
                        req.cookie,
                        &p,
                    )
                }
                (wire::CMD_WRITE, _) => simple(req.cookie, 1),
                _ => simple(req.cookie, 0),
            };
            (reply, false)
        }),
    );
    let image = NbdImage::open(&server.uri, quick()).unwrap();
    assert!(image.has_block_status());
    let mut want = pattern(0, 4096);
    want.extend(vec![0; 4096]);
    assert!(read(&image, 0, 8192).unwrap() == want);
    let err = read(&image, 8192, 512).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let err = write(&image, 0, &[1; 512], false).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(
        image.extent(0).unwrap(),
        Extent {
            allocated: false,
            len: 8192
        }
    );
    assert_eq!(*server.connections.lock().unwrap(), 1, "nothing dropped");
    let seen = server.seen.lock().unwrap();
    let status = seen
        .iter()
        .find(|r| r.cmd == wire::CMD_BLOCK_STATUS)
        .unwrap();
    assert_eq!((status.offset, status.len), (0, EXPORT_SIZE as u32));
}

#[test]
fn a_server_without_fua_gets_a_flush_before_a_durable_write_completes() {
    let server = fake(
        wire::TF_HAS_FLAGS | wire::TF_SEND_FLUSH,
        Box::new(|req: &Req| (simple(req.cookie, 0), false)),
    );
    let image = NbdImage::open(&server.uri, quick()).unwrap();
    write(&image, 512, &[7; 1024], true).unwrap();
    let seen: Vec<(u16, u16)> = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.cmd, r.flags))
        .collect();
    assert_eq!(seen, [(wire::CMD_WRITE, 0), (wire::CMD_FLUSH, 0)]);
    // With FUA, the flag and no flush.
    let server = fake(
        ALL_FLAGS,
        Box::new(|req: &Req| (simple(req.cookie, 0), false)),
    );
    let image = NbdImage::open(&server.uri, quick()).unwrap();
    write(&image, 512, &[7; 1024], true).unwrap();
    let seen: Vec<(u16, u16)> = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.cmd, r.flags))
        .collect();
    assert_eq!(seen, [(wire::CMD_WRITE, wire::CMD_FLAG_FUA)]);
    // Zeroing: NO_HOLE unless deallocating; TRIM as asked.
    image.write_zeroes(0, 4096, false).unwrap();
    image.write_zeroes(4096, 4096, true).unwrap();
    image.trim(8192, 4096).unwrap();
    let seen: Vec<(u16, u16)> = server.seen.lock().unwrap()[1..]
        .iter()
        .map(|r| (r.cmd, r.flags))
        .collect();
    assert_eq!(
        seen,
        [
            (wire::CMD_WRITE_ZEROES, wire::CMD_FLAG_NO_HOLE),
            (wire::CMD_WRITE_ZEROES, 0),
            (wire::CMD_TRIM, 0)
        ]
    );
}

#[test]
fn a_server_with_few_features() {
    // Read-only, without WRITE_ZEROES, TRIM or FLUSH: writes refused
    // here, flushes and trims answered without the server.
    let server = fake(
        wire::TF_HAS_FLAGS | wire::TF_READ_ONLY,
        Box::new(|req: &Req| (simple(req.cookie, 0), false)),
    );
    let image = NbdImage::open(&server.uri, quick()).unwrap();
    assert!(image.read_only());
    let err = write(&image, 0, &[1; 512], false).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    image.flush().unwrap();
    assert!(server.seen.lock().unwrap().is_empty(), "nothing sent");
    // Writable, without WRITE_ZEROES: zeroes written, a MiB at a time.
    let server = fake(
        wire::TF_HAS_FLAGS | wire::TF_SEND_FLUSH,
        Box::new(|req: &Req| (simple(req.cookie, 0), false)),
    );
    let image = NbdImage::open(&server.uri, quick()).unwrap();
    image.write_zeroes(4096, (2 << 20) + 512, true).unwrap();
    image.trim(0, 4096).unwrap();
    let seen: Vec<(u16, u64, u32, bool)> = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.cmd, r.offset, r.len, r.payload.iter().all(|b| *b == 0)))
        .collect();
    assert_eq!(
        seen,
        [
            (wire::CMD_WRITE, 4096, 1 << 20, true),
            (wire::CMD_WRITE, 4096 + (1 << 20), 1 << 20, true),
            (wire::CMD_WRITE, 4096 + (2 << 20), 512, true)
        ]
    );
}

#[test]
fn transfers_larger_than_the_maximum_payload_are_split() {
    // The fake's maximum block size is 1 MiB.
    let server = fake(
        ALL_FLAGS,
        Box::new(|req: &Req| {
            let reply = if req.cmd == wire::CMD_READ {
                data_reply(req)
            } else {
                simple(req.cookie, 0)
            };
            (reply, false)
        }),
    );
    let image = NbdImage::open(&server.uri, quick()).unwrap();
    let data = pattern(3, (2 << 20) + (512 << 10));
    write(&image, 4096, &data, false).unwrap();
    let seen: Vec<(u64, u32, bool)> = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.offset,
                r.len,
                r.payload[..] == data[(r.offset - 4096) as usize..][..r.len as usize],
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (4096, 1 << 20, true),
            (4096 + (1 << 20), 1 << 20, true),
            (4096 + (2 << 20), 512 << 10, true)
        ]
    );
    assert!(read(&image, 512, 3 << 20).unwrap() == pattern(512, 3 << 20));
    assert_eq!(server.seen.lock().unwrap().len(), 6);
}

#[test]
fn a_lost_connection_with_unflushed_writes_fails_the_next_flush_once() {
    // The first connection acknowledges a write, then goes away.
    let server = fake(
        ALL_FLAGS,
        Box::new(|req: &Req| {
            (
                simple(req.cookie, 0),
                req.conn == 0 && req.cmd == wire::CMD_WRITE,
            )
        }),
    );
    let image = NbdImage::open(&server.uri, quick()).unwrap();
    write(&image, 0, &[1; 512], false).unwrap();
    // The flush goes to the second connection, which confirms it; the
    // loss is reported all the same.
    let err = image.flush().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    image.flush().unwrap();
    // A durable (FUA) write before a loss is not a lost write.
    write(&image, 0, &[1; 512], true).unwrap();
    assert_eq!(*server.connections.lock().unwrap(), 2);
}

#[test]
fn a_server_that_does_not_answer_times_the_request_out() {
    let server = fake(ALL_FLAGS, Box::new(|_: &Req| (Vec::new(), false)));
    let options = NbdOptions {
        timeout: Duration::from_millis(300),
        ..quick()
    };
    let image = NbdImage::open(&server.uri, options).unwrap();
    let start = Instant::now();
    let err = read(&image, 0, 512).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // Silent for a whole timeout with a command waiting: taken for gone,
    // and connected again.
    let deadline = Instant::now() + Duration::from_secs(3);
    while *server.connections.lock().unwrap() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(*server.connections.lock().unwrap(), 2);
}

#[test]
fn open_errors_are_one_line_naming_the_uri() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("nbd+unix:///disk?socket={}/x", dir.path().display());
    let err = NbdImage::open(&uri, NbdOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{uri}: cannot connect: No such file or directory")
    );
    let err = NbdImage::open("nbd://h:0/x", NbdOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "nbd://h:0/x: bad port \"0\"");
    // A server that accepts and never speaks: the connect timeout.
    let path = dir.path().join("mute.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let uri = format!("nbd+unix:///?socket={}", path.display());
    let options = NbdOptions {
        connect_timeout: Duration::from_millis(200),
        ..NbdOptions::default()
    };
    let err = NbdImage::open(&uri, options).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{uri}: handshake failed: no answer within 200ms")
    );
}

/// `name` on the PATH, or a skip (a failure under CI=true).
pub(crate) fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "{name} is missing; CI must install it"
        );
        eprintln!("skipped: {name} not found");
    }
    found
}

/// Pins `len` bytes of `memory` at `addr`.
fn pin(memory: &Arc<GuestMemoryMmap<()>>, addr: u64, len: usize) -> PinnedBufs {
    let mut pinned = PinnedBufs::new();
    let slice = memory.get_slice(GuestAddress(addr), len).unwrap();
    // SAFETY: the slice lies in the mapping `memory` owns.
    let ok = unsafe {
        pinned.pin_with(memory.clone(), |sink| {
            sink.push(&slice);
            true
        })
    };
    assert!(ok);
    pinned
}

#[test]
fn many_requests_in_flight_through_a_completion_sink_against_qemu_nbd() {
    let Some(qemu_nbd) = tool("qemu-nbd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    let size = 16usize << 20;
    let contents = pattern(0, size);
    std::fs::write(&file, &contents).unwrap();
    let sock = dir.path().join("nbd.sock");
    let _server = Child(
        std::process::Command::new(qemu_nbd)
            .args(["-f", "raw", "-e", "4", "-x", "disk", "--persistent", "-k"])
            .arg(&sock)
            .arg(&file)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let options = NbdOptions {
        connections: 4,
        ..NbdOptions::default()
    };
    let image = NbdImage::open(&uri, options).unwrap();
    let memory: Arc<GuestMemoryMmap<()>> =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap());
    let sink = CompletionSink::new(None);
    let remote = image.remote().unwrap();
    // 64 reads of 128 KiB into the first 8 MiB of memory; 64 writes of
    // 64 KiB from the next 4 MiB to the second half of the disk.
    let (reads, writes) = (64u64, 64u64);
    for i in 0..reads {
        let offset = i * 100 * 1024;
        let op = RemoteOp::Read {
            offset,
            len: 128 << 10,
        };
        remote.submit(
            op,
            pin(&memory, i * (128 << 10), 128 << 10),
            sink.completion(i),
        );
    }
    for i in 0..writes {
        let addr = (8 << 20) + i * (64 << 10);
        memory
            .write_slice(&pattern(i * 7, 64 << 10), GuestAddress(addr))
            .unwrap();
        let op = RemoteOp::Write {
            offset: (8 << 20) + i * (64 << 10),
            len: 64 << 10,
            durable: i % 2 == 0,
        };
        remote.submit(op, pin(&memory, addr, 64 << 10), sink.completion(100 + i));
    }
    assert!(sink.in_flight() > 0);
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < (reads + writes) as usize && Instant::now() < deadline {
        sink.wait(Duration::from_millis(100));
        sink.take(&mut |token, result| done.push((token, result)));
    }
    assert_eq!(done.len(), (reads + writes) as usize);
    for (token, result) in &done {
        assert!(
            matches!(result, RemoteResult::Io(Ok(()))),
            "{token}: {result:?}"
        );
    }
    let flush = sink.completion(999);
    remote.submit(RemoteOp::Flush, PinnedBufs::new(), flush);
    assert!(sink.wait(Duration::from_secs(10)));
    sink.take(&mut |token, result| {
        assert_eq!(token, 999);
        assert!(matches!(result, RemoteResult::Io(Ok(()))), "{result:?}");
    });
    for i in 0..reads {
        let mut got = vec![0u8; 128 << 10];
        memory
            .read_slice(&mut got, GuestAddress(i * (128 << 10)))
            .unwrap();
        let offset = (i * 100 * 1024) as usize;
        assert!(got == contents[offset..offset + (128 << 10)], "read {i}");
    }
    let on_disk = std::fs::read(&file).unwrap();
    for i in 0..writes {
        let at = (8 << 20) + (i as usize) * (64 << 10);
        assert!(
            on_disk[at..at + (64 << 10)] == pattern(i * 7, 64 << 10),
            "write {i}"
        );
    }
    // A SCSI op is refused.
    let op = RemoteOp::Scsi {
        cdb: crate::storage::remote::CdbBytes::new(&[0; 6]).unwrap(),
        direction: crate::storage::remote::DataDirection::None,
        len: 0,
        tag: 1,
    };
    remote.submit(op, PinnedBufs::new(), sink.completion(5));
    sink.take(&mut |_, result| assert!(matches!(result, RemoteResult::Scsi(Err(_)))));
    assert_eq!(
        image.connections(),
        4,
        "qemu-nbd -e 4 allows several connections"
    );
}

/// A server process, killed when the test ends (passed or not).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_fua_write_emulated_with_flush_fails_if_the_connection_dropped_between() {
    // Written on connection 0, which drops at the trailing FLUSH; the
    // FLUSH succeeds on connection 1, but the server's cache holding the
    // write may be gone.
    let server = fake(
        wire::TF_HAS_FLAGS | wire::TF_SEND_FLUSH,
        Box::new(|req: &Req| {
            if req.cmd == wire::CMD_FLUSH && req.conn == 0 {
                (Vec::new(), true)
            } else {
                (simple(req.cookie, 0), false)
            }
        }),
    );
    let image = NbdImage::open(&server.uri, quick()).unwrap();
    let result = write(&image, 512, &[7; 1024], true);
    assert!(result.is_err(), "FUA write reported durable");
    // Not a failure without the drop.
    write(&image, 512, &[7; 1024], true).unwrap();
}

#[test]
fn a_command_never_answered_among_answered_ones_drops_the_connection() {
    // Reads at 4096 are never answered, the others are: the entry of the
    // unanswered one must not stay for ever.
    let server = fake(
        ALL_FLAGS,
        Box::new(|req: &Req| {
            if req.offset == 4096 {
                (Vec::new(), false)
            } else {
                (data_reply(req), false)
            }
        }),
    );
    let options = NbdOptions {
        timeout: Duration::from_millis(300),
        ..quick()
    };
    let image = Arc::new(NbdImage::open(&server.uri, options).unwrap());
    // Other reads keep being answered (the connection is never silent).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (image, stop) = (image.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(read(&image, 0, 512).unwrap(), pattern(0, 512));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let err = read(&image, 4096, 512).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert_eq!(*server.connections.lock().unwrap(), 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    while *server.connections.lock().unwrap() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.join().unwrap();
    assert_eq!(*server.connections.lock().unwrap(), 2);
}

#[test]
fn a_server_reading_a_write_slowly_cannot_delay_its_result_or_hold_the_connection() {
    // Connection 0 takes the payload at about 200 KB/s (no single write()
    // ever times out); later connections serve normally.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    std::thread::spawn(move || {
        for (n, s) in listener.incoming().enumerate() {
            let Ok(mut s) = s else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                if n > 0 {
                    return serve_fake(
                        s,
                        n,
                        ALL_FLAGS,
                        &|req: &Req| (data_reply(req), false),
                        &seen,
                    );
                }
                s.write_all(&server_handshake(
                    EXPORT_SIZE,
                    ALL_FLAGS,
                    Some([512, 4096, 32 << 20]),
                ))
                .unwrap();
                let mut b = vec![0u8; 4096];
                while matches!(s.read(&mut b), Ok(n) if n > 0) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
    });
    let uri = format!("nbd+unix:///x?socket={}", path.display());
    let options = NbdOptions {
        timeout: Duration::from_secs(1),
        ..quick()
    };
    let image = NbdImage::open(&uri, options).unwrap();
    let memory: Arc<GuestMemoryMmap<()>> =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
    let sink = CompletionSink::new(None);
    let start = Instant::now();
    image.remote().unwrap().submit(
        RemoteOp::Write {
            offset: 0,
            len: 2 << 20,
            durable: false,
        },
        pin(&memory, 0, 2 << 20),
        sink.completion(1),
    );
    assert!(sink.wait(Duration::from_secs(3)), "no result in 3 s");
    let took = start.elapsed();
    assert!(took < Duration::from_millis(2500), "result after {took:?}");
    let mut result = None;
    sink.take(&mut |_, r| result = Some(r));
    assert!(
        matches!(&result, Some(RemoteResult::Io(Err(e))) if e.kind() == io::ErrorKind::TimedOut),
        "{result:?}"
    );
    // The half-sent command made the connection unusable: a new one
    // serves the next request.
    let start = Instant::now();
    assert_eq!(read(&image, 0, 512).unwrap(), pattern(0, 512));
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "read after {took:?}");
}
