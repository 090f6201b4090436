//! The management API: JSON-RPC 2.0 over a Unix socket (`--api-socket`),
//! one request a line, in front of the [`Management`] trait, which the LUN
//! manager implements. The protocol, its methods and limits are described
//! for operators in docs/api.md.
//!
//! - [`protocol`]: one line in, at most one line out: parsing and checking
//!   a request, calling the method, the reply (batches included).
//! - [`server`]: the listening socket's accept thread and one thread per
//!   client ([`serve`]); at most [`server::MAX_CLIENTS`] clients, lines of
//!   at most [`server::MAX_LINE`] bytes.
//! - [`client`]: the other side, as `vhost-device-scsi-ctl` uses it:
//!   `KEY=VALUE` parameters, one request, one reply.
//! - [`ctl`]: `vhost-device-scsi-ctl`'s command line (clap).
//!
//! # Error codes
//!
//! | code | meaning |
//! | --- | --- |
//! | -32700 | parse error: not JSON, not UTF-8, or a line longer than 1 MiB (`id` null) |
//! | -32600 | invalid request: not a request object, `jsonrpc` not `"2.0"`, `method` not a string, `params` not an object or array, a bad `id`, an unknown member, an empty batch |
//! | -32601 | method not found |
//! | -32602 | invalid parameters: parameters not by name, an unknown or missing one, a wrong type, a number out of range (`lun` 0-16383), a size not a multiple of the block size ([`ErrorKind::InvalidParams`]) |
//! | -32603 | internal error: the method failed unexpectedly (never expected) |
//! | -32000 | too many clients: sent to a client over the limit, which is then disconnected |
//! | -32001 | no such LUN ([`ErrorKind::NoSuchLun`]) |
//! | -32002 | LUN in use: the LUN number asked for is taken ([`ErrorKind::LunInUse`]) |
//! | -32003 | image error: cannot open or lock the image, bad per-LUN options ([`ErrorKind::Image`]) |
//! | -32004 | not supported: e.g. growing a block device, resizing a read-only image ([`ErrorKind::NotSupported`]) |
//! | -32005 | reply too large: a batch's replies passed 32 MiB; the rest of the batch is not executed |
//! | -32006 | still in flight: the LUN was removed, but commands to it had not completed in time; its image is flushed and closed when they do ([`ErrorKind::StillInFlight`]) |

pub mod client;
pub mod ctl;
pub mod protocol;
pub mod server;

pub use server::serve;

#[cfg(test)]
mod tests;

/// The highest LUN number the API accepts (flat space addressing: 16384
/// LUNs, 0-16383).
pub const MAX_LUN: u16 = crate::scsi::lun::MAX_LUN;

/// What the management API can do to the running daemon; implemented by
/// the LUN manager. Each client's calls come from that client's own
/// thread, so calls may run concurrently and may block (a `lun_remove`
/// waiting for I/O) without holding up other clients.
pub trait Management: Send + Sync + 'static {
    /// Adds a LUN serving `image`, which is exactly a command-line IMAGE
    /// argument (`PATH[,OPTIONS]`, `,,` for a comma in the path), at LUN
    /// `lun`, or at the lowest free LUN if `None`. Returns the LUN.
    /// `lun` is at most [`MAX_LUN`] (checked by the protocol).
    fn lun_add(&self, image: &str, lun: Option<u16>) -> Result<u16, MethodError>;

    /// Removes LUN `lun`; returns once the commands in flight to it have
    /// completed and its image is closed.
    fn lun_remove(&self, lun: u16) -> Result<(), MethodError>;

    /// Resizes LUN `lun` to `size` bytes, or to the image's current size
    /// if `None`; a smaller size only with `shrink`. Returns the new size
    /// in bytes.
    fn lun_resize(&self, lun: u16, size: Option<u64>, shrink: bool) -> Result<u64, MethodError>;

    /// Every LUN, in LUN order.
    fn lun_list(&self) -> Vec<LunInfo>;

    /// Per-LUN statistics, already as JSON (their type is the statistics
    /// module's); the `stats` method replies `{"luns": <this value>}`, so
    /// a per-LUN array (or an object keyed by LUN) is expected.
    fn stats(&self) -> serde_json::Value;
}

/// One LUN as `lun_list` reports it.
#[derive(serde::Serialize, Clone, Debug, PartialEq, Eq)]
pub struct LunInfo {
    /// The LUN number, 0-16383.
    pub lun: u16,
    /// The image's path (without the per-LUN options).
    pub image: String,
    /// The LUN's size in bytes.
    pub size: u64,
    /// The logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Whether the LUN is served read-only.
    pub read_only: bool,
    /// The unit serial number the guest sees (VPD page 0x80).
    pub serial: String,
    /// The NAA designator the guest sees (VPD page 0x83), as `0x` and 16
    /// lowercase hex digits, e.g. `"0x5001405f00c0ffee"`.
    pub naa: String,
}

/// What kind of failure a method had; each kind is one JSON-RPC error code
/// (the table in the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// -32602: a parameter's value is not acceptable (a size that is not a
    /// multiple of the block size, a LUN out of range).
    InvalidParams,
    /// -32001: there is no LUN of that number.
    NoSuchLun,
    /// -32002: the LUN number asked for is taken.
    LunInUse,
    /// -32003: the image cannot be opened or locked, or its options are
    /// bad.
    Image,
    /// -32004: the operation is not supported on this LUN (growing a block
    /// device, resizing a read-only image).
    NotSupported,
    /// -32006: the LUN was removed, but commands in flight to it had not
    /// completed when the call gave up waiting.
    StillInFlight,
}

impl ErrorKind {
    /// The JSON-RPC error code of this kind.
    pub fn code(self) -> i64 {
        match self {
            ErrorKind::InvalidParams => protocol::INVALID_PARAMS,
            ErrorKind::NoSuchLun => -32001,
            ErrorKind::LunInUse => -32002,
            ErrorKind::Image => -32003,
            ErrorKind::NotSupported => -32004,
            ErrorKind::StillInFlight => -32006,
        }
    }
}

/// A method's failure: its kind (the error code) and a one-line message
/// for the operator (line breaks in it are replaced by spaces in the
/// reply).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MethodError {
    /// What kind of failure, which gives the error code.
    pub kind: ErrorKind,
    /// What went wrong, e.g. `"LUN 3: no such LUN"`.
    pub message: String,
}

impl MethodError {
    /// A failure of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> MethodError {
        MethodError {
            kind,
            message: message.into(),
        }
    }

    /// An unacceptable parameter value (-32602).
    pub fn invalid_params(message: impl Into<String>) -> MethodError {
        MethodError::new(ErrorKind::InvalidParams, message)
    }

    /// `LUN n: no such LUN` (-32001).
    pub fn no_such_lun(lun: u16) -> MethodError {
        MethodError::new(ErrorKind::NoSuchLun, format!("LUN {lun}: no such LUN"))
    }

    /// `LUN n: in use` (-32002).
    pub fn lun_in_use(lun: u16) -> MethodError {
        MethodError::new(ErrorKind::LunInUse, format!("LUN {lun}: in use"))
    }

    /// An image that cannot be used (-32003).
    pub fn image(message: impl Into<String>) -> MethodError {
        MethodError::new(ErrorKind::Image, message)
    }

    /// An operation this LUN does not support (-32004).
    pub fn not_supported(message: impl Into<String>) -> MethodError {
        MethodError::new(ErrorKind::NotSupported, message)
    }

    /// The JSON-RPC error code.
    pub fn code(&self) -> i64 {
        self.kind.code()
    }
}
