//! How a request chain was answered, whatever the queue.

/// What answering a chain came to: the bytes written to its
/// device-writable part, which the used ring reports (virtio 1.2 §2.7.8),
/// and why the request was malformed, if it was (`E`: the queue's own
/// error type; logged, rate-limited, by the caller).
#[derive(Debug, PartialEq, Eq)]
pub struct Answered<E> {
    pub used_len: u32,
    pub malformed: Option<E>,
}

impl<E> Answered<E> {
    /// A well-formed request, `used_len` bytes written.
    pub fn ok(used_len: u32) -> Self {
        Answered {
            used_len,
            malformed: None,
        }
    }

    /// A malformed request, `used_len` bytes written all the same.
    pub fn malformed(used_len: u32, error: E) -> Self {
        Answered {
            used_len,
            malformed: Some(error),
        }
    }
}
