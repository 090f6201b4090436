//! Tests from a review of the NBD client: each checks a bug that was
//! found and fixed (a request never answered, reconnection without
//! backoff).
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::handshake::tests::server_handshake;
use super::wire;
use super::*;
use crate::storage::remote::CompletionSink;

const FLAGS: u16 = wire::TF_HAS_FLAGS | wire::TF_SEND_FLUSH | wire::TF_SEND_FUA;

/// A server that trickles its handshake at a reconnection must not keep
/// a request from its result (the handshake has an overall deadline, and
/// jobs expire whatever the driver thread does).
#[test]
fn a_trickled_handshake_at_reconnect_still_times_requests_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut n = 0;
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            n += 1;
            if n == 1 {
                // A good handshake, then the connection drops at the first
                // request.
                std::thread::spawn(move || {
                    s.write_all(&server_handshake(
                        4 << 20,
                        FLAGS,
                        Some([512, 4096, 1 << 20]),
                    ))
                    .unwrap();
                    let meta = 16 + 4 + 1 + 4 + 4 + 15;
                    let go = 16 + 4 + 1 + 2 + 2;
                    let mut opts = vec![0u8; 4 + 16 + meta + go];
                    let _ = s.read_exact(&mut opts);
                    let mut h = [0u8; 28];
                    let _ = s.read_exact(&mut h);
                });
            } else {
                // Every later connection: a greeting and an option reply of
                // 60000 bytes, one byte every 200 ms (each read well within
                // the connect timeout).
                std::thread::spawn(move || {
                    let mut bytes = b"NBDMAGICIHAVEOPT\0\x03".to_vec();
                    bytes.extend(wire::OPT_REPLY_MAGIC.to_be_bytes());
                    bytes.extend(wire::OPT_STRUCTURED_REPLY.to_be_bytes());
                    bytes.extend(wire::REP_ERR_UNSUP.to_be_bytes());
                    bytes.extend(60000u32.to_be_bytes());
                    bytes.extend(vec![b'x'; 60000]);
                    for b in bytes {
                        if s.write_all(&[b]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                });
            }
        }
    });
    let uri = format!("nbd+unix:///x?socket={}", path.display());
    let options = NbdOptions {
        timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        ..NbdOptions::default()
    };
    let image = NbdImage::open(&uri, options).unwrap();
    let memory: Arc<GuestMemoryMmap<()>> =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let mut pinned = PinnedBufs::new();
    let slice = memory.get_slice(GuestAddress(0), 4096).unwrap();
    // SAFETY: the slice lies in the mapping `memory` owns.
    assert!(unsafe {
        pinned.pin_with(memory.clone(), |sink| {
            sink.push(&slice);
            true
        })
    });
    let sink = CompletionSink::new(None);
    let start = Instant::now();
    image.remote().unwrap().submit(
        RemoteOp::Read {
            offset: 0,
            len: 4096,
        },
        pinned,
        sink.completion(1),
    );
    // The request timeout is 1 s, the connect timeout 1 s: a result is
    // due within a few seconds at most.
    let got = sink.wait(Duration::from_secs(15));
    eprintln!("result after {:?}: {got}", start.elapsed());
    // Its drop waits for the driver thread: within the connect timeout.
    let dropping = Instant::now();
    drop(image);
    assert!(
        dropping.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        dropping.elapsed()
    );
    assert!(
        got,
        "no result for a request with a 1 s timeout after 15 s (in flight: {})",
        sink.in_flight()
    );
}

/// A server that completes the handshake and closes at once is not
/// reconnected to in a tight loop (a handshake alone does not reset the
/// backoff).
#[test]
fn a_server_closing_after_each_handshake_is_reconnected_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let count = count.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = s.write_all(&server_handshake(
                    4 << 20,
                    FLAGS,
                    Some([512, 4096, 1 << 20]),
                ));
                let meta = 16 + 4 + 1 + 4 + 4 + 15;
                let go = 16 + 4 + 1 + 2 + 2;
                let mut opts = vec![0u8; 4 + 16 + meta + go];
                let _ = s.read_exact(&mut opts);
                // Closed here.
            }
        });
    }
    let uri = format!("nbd+unix:///x?socket={}", path.display());
    let image = NbdImage::open(&uri, NbdOptions::default()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let n = count.load(std::sync::atomic::Ordering::Relaxed);
    drop(image);
    eprintln!("connections in about 1 s: {n}");
    assert!(n < 20, "{n} connections in 1 s: no backoff");
}

/// The connect timeout bounds the whole handshake, not each read: a
/// server sending a byte every 200 ms is given up on in time.
#[test]
fn a_trickled_handshake_fails_at_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                for b in server_handshake(4 << 20, FLAGS, None) {
                    if s.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
    });
    let uri = format!("nbd+unix:///x?socket={}", path.display());
    let options = NbdOptions {
        connect_timeout: Duration::from_secs(1),
        ..NbdOptions::default()
    };
    let start = Instant::now();
    let err = NbdImage::open(&uri, options).unwrap_err();
    let took = start.elapsed();
    assert!(err.to_string().contains("no answer within"), "{err}");
    assert!(took < Duration::from_millis(1500), "gave up after {took:?}");
}

/// A Unix socket server that accepts nothing (its listen backlog full)
/// is given up on at the connect timeout, not waited for in connect().
#[test]
fn a_unix_server_with_a_full_backlog_fails_at_the_connect_timeout() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let addr = SocketAddrUnix::new(&path).unwrap();
    let mut held = Vec::new();
    loop {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => held.push(fd),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(held.len() < 100_000, "the backlog never filled");
    }
    let uri = format!("nbd+unix:///x?socket={}", path.display());
    let options = NbdOptions {
        connect_timeout: Duration::from_secs(1),
        ..NbdOptions::default()
    };
    let start = Instant::now();
    let err = NbdImage::open(&uri, options).unwrap_err();
    let took = start.elapsed();
    assert!(err.to_string().contains("accepts no connection"), "{err}");
    assert!(took < Duration::from_millis(1500), "gave up after {took:?}");
}
