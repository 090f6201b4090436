//! Serving the API socket: an accept thread, and one thread per client
//! reading a request line, answering it ([`handle_line`]) and reading the
//! next, so a slow call (a `lun_remove` waiting for I/O) holds up only its
//! own client.
//!
//! Limits, none of them a client's to raise:
//! - at most [`MAX_CLIENTS`] clients at once: the next one gets one error
//!   line (-32000, too many clients) and is disconnected;
//! - a line of at most [`MAX_LINE`] bytes (without its `\n`), read into a
//!   buffer that never grows beyond it: a longer line gets a parse error
//!   and the connection is closed (its framing is lost);
//! - a reply the client does not read for [`WRITE_TIMEOUT`] ends that
//!   client; a write error (EPIPE from a client gone) ends that client
//!   only. The daemon gets EPIPE as an error, not SIGPIPE: the Rust
//!   runtime sets SIGPIPE to be ignored before `main` in every binary
//!   (the daemon's and the test harnesses'), so plain writes are enough
//!   and `send(MSG_NOSIGNAL)` is not needed.
//!
//! Blank lines (whitespace only) are skipped without a reply. A last line
//! without `\n` before the client shuts down its side is still answered.
//! No read timeout: an idle client keeps its slot until it disconnects.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use serde_json::Value;

use super::protocol::{error_line, handle_line, PARSE_ERROR, TOO_MANY_CLIENTS};
use super::Management;

/// The most clients served at once.
pub const MAX_CLIENTS: usize = 16;

/// The longest request line, in bytes without its `\n` (1 MiB).
pub const MAX_LINE: usize = 1 << 20;

/// How long a reply may wait for the client to read it before the client
/// is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the refusal sent to a client over [`MAX_CLIENTS`] may take:
/// the accept thread sends it, and must not wait on a client.
const REFUSAL_TIMEOUT: Duration = Duration::from_millis(100);

/// The first pause after accept(2) failed (EMFILE, ENOMEM...); it doubles
/// while failures go on, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(10);
/// The longest pause between accept attempts.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Serves the management API on `listener` (bound with
/// [`crate::daemon::bind_unix`]): starts the accept thread, which serves
/// each client on a thread of its own with `management`, and returns.
/// An error means the thread could not be started.
pub fn serve(listener: UnixListener, management: Arc<dyn Management>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("api-accept".into())
        .spawn(move || accept_clients(&listener, &management))?;
    Ok(())
}

/// Accepts clients for ever; a failing accept(2) is logged and retried
/// after a pause, since such failures (out of descriptors) pass.
fn accept_clients(listener: &UnixListener, management: &Arc<dyn Management>) {
    let clients = Arc::new(AtomicUsize::new(0));
    let mut delay = RETRY_FIRST;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                delay = RETRY_FIRST;
                admit(stream, management, &clients);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                warn!(
                    "api: cannot accept a connection: {e}; trying again in {} ms",
                    delay.as_millis()
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Serves `stream` on a thread of its own, or refuses it if
/// [`MAX_CLIENTS`] are being served.
fn admit(stream: UnixStream, management: &Arc<dyn Management>, clients: &Arc<AtomicUsize>) {
    let Some(slot) = ClientSlot::take(clients) else {
        warn!("api: {MAX_CLIENTS} clients connected already: refusing one more");
        refuse(stream);
        return;
    };
    let management = Arc::clone(management);
    let spawned = std::thread::Builder::new()
        .name("api-client".into())
        .spawn(move || {
            let _slot = slot;
            serve_client(&stream, &*management);
        });
    // On failure the closure, its slot and the stream are dropped: the
    // client is disconnected and its slot is free again.
    if let Err(e) = spawned {
        warn!("api: cannot start a thread for a client: {e}");
    }
}

/// Tells a client over the limit so, and disconnects it.
fn refuse(stream: UnixStream) {
    let mut line = error_line(
        &Value::Null,
        TOO_MANY_CLIENTS,
        &format!("too many clients: at most {MAX_CLIENTS} at once"),
    );
    line.push('\n');
    // A fresh socket's buffer takes one line; the timeout is for safety.
    let _ = stream.set_write_timeout(Some(REFUSAL_TIMEOUT));
    let _ = (&stream).write_all(line.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// One of the [`MAX_CLIENTS`] places, given back when dropped (also when
/// the client's thread ends by a panic).
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    /// A place, if fewer than [`MAX_CLIENTS`] are taken.
    fn take(clients: &Arc<AtomicUsize>) -> Option<ClientSlot> {
        clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CLIENTS).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientSlot(Arc::clone(clients)))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What reading one line came to.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line ended by `\n` (taken off).
    Complete,
    /// The last bytes before end of file, without `\n`.
    Last,
    /// End of file, nothing read.
    End,
    /// More than [`MAX_LINE`] bytes without `\n`.
    TooLong,
}

/// Reads one line into `line` (emptied first), never more than
/// [`MAX_LINE`] + 1 bytes of it.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Line> {
    line.clear();
    let limit = u64::try_from(MAX_LINE)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let read = reader.take(limit).read_until(b'\n', line)?;
    Ok(if read == 0 {
        Line::End
    } else if line.last() == Some(&b'\n') {
        line.pop();
        Line::Complete
    } else if line.len() > MAX_LINE {
        Line::TooLong
    } else {
        Line::Last
    })
}

/// Serves one client until it disconnects, sends a line too long, or
/// cannot be written to.
fn serve_client(stream: &UnixStream, management: &dyn Management) {
    debug!("api: client connected");
    if let Err(e) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
        warn!("api: cannot set a client's write timeout: {e}");
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    let mut line = Vec::new();
    loop {
        let read = match read_line(&mut reader, &mut line) {
            Ok(read) => read,
            Err(e) => {
                debug!("api: client read error: {e}");
                break;
            }
        };
        let reply = match read {
            Line::End => break,
            Line::TooLong => Some(error_line(
                &Value::Null,
                PARSE_ERROR,
                &format!("parse error: a line longer than {MAX_LINE} bytes"),
            )),
            Line::Complete | Line::Last if line.trim_ascii().is_empty() => None,
            Line::Complete | Line::Last => handle_line(&line, management),
        };
        if let Some(mut reply) = reply {
            reply.push('\n');
            if let Err(e) = writer.write_all(reply.as_bytes()) {
                debug!("api: cannot write to a client: {e}");
                break;
            }
        }
        if matches!(read, Line::TooLong | Line::Last) {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    debug!("api: client disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<(Line, Vec<u8>)> {
        let mut reader = BufReader::with_capacity(7, input);
        let mut line = Vec::new();
        let mut out = Vec::new();
        loop {
            let read = read_line(&mut reader, &mut line).unwrap();
            let stop = matches!(read, Line::End | Line::TooLong);
            out.push((read, line.clone()));
            if stop {
                return out;
            }
        }
    }

    #[test]
    fn lines_are_split_and_capped() {
        assert_eq!(
            lines(b"ab\n\ncd"),
            [
                (Line::Complete, b"ab".to_vec()),
                (Line::Complete, vec![]),
                (Line::Last, b"cd".to_vec()),
                (Line::End, vec![]),
            ]
        );
        // Exactly 1 MiB and its newline is a line; one byte more is not.
        let mut exact = vec![b'x'; 1 << 20];
        exact.push(b'\n');
        assert_eq!(lines(&exact)[0].0, Line::Complete);
        assert_eq!(lines(&exact)[0].1.len(), 1 << 20);
        let long = vec![b'x'; (1 << 20) + 1];
        let read = lines(&long);
        assert_eq!(read[0].0, Line::TooLong);
        assert_eq!(read[0].1.len(), (1 << 20) + 1, "never more than the cap");
        // Longer still: the buffer stops at the cap all the same.
        let longer = vec![b'x'; 3 << 20];
        assert_eq!(lines(&longer)[0].1.len(), (1 << 20) + 1);
    }

    #[test]
    fn slots_are_capped_and_given_back() {
        let clients = Arc::new(AtomicUsize::new(0));
        let slots: Vec<ClientSlot> = (0..16).map_while(|_| ClientSlot::take(&clients)).collect();
        assert_eq!(slots.len(), 16);
        assert!(ClientSlot::take(&clients).is_none(), "a 17th place");
        drop(slots);
        assert_eq!(clients.load(Ordering::Acquire), 0);
        assert!(ClientSlot::take(&clients).is_some());
    }
}
