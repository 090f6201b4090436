//! libiscsi, loaded at run time (`dlopen` through `libloading`): the
//! default build and a machine without iSCSI logical units need no
//! libiscsi. Only the functions the backend calls are declared, their
//! signatures transcribed from libiscsi 1.19's public headers
//! `include/iscsi.h` and `include/scsi-lowlevel.h` (Debian bookworm's
//! `libiscsi7` is 1.19.0).

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// The library's file name (SONAME of libiscsi 1.x).
pub const LIBISCSI: &str = "libiscsi.so.7";

/// `struct iscsi_context` (opaque).
#[repr(C)]
pub struct IscsiContext {
    _opaque: [u8; 0],
}

/// `struct scsi_sense` (scsi-lowlevel.h), mirrored only so that the
/// fields after it in [`ScsiTask`] sit where the library puts them. Its
/// three one-bit fields share the byte at offset 12 (GCC's layout on
/// x86_64 and aarch64: the next `unsigned char` takes byte 13).
#[repr(C)]
struct ScsiSense {
    error_type: u8,
    key: c_int,
    ascq: c_int,
    bitfields: u8,
    bit_pointer: u8,
    field_pointer: u16,
}

/// `struct scsi_data` (scsi-lowlevel.h).
#[repr(C)]
pub struct ScsiData {
    pub size: c_int,
    pub data: *mut u8,
}

/// libiscsi 1.19's `struct scsi_task` (scsi-lowlevel.h). 1.19 has no
/// accessor for the residual or the raw sense bytes (`scsi_task_get_status`
/// only parses the sense into key and ASC/ASCQ), so they are read here;
/// and `iovector_out` is written here when a finished write task is
/// retired (session.rs, `Worker::release_task`): `scsi_task_set_iov_out`
/// sets only `iov` and `niov`, not the `offset`/`consumed` cursor a
/// partly sent PDU has advanced. Tasks are only ever allocated by the
/// library (`scsi_create_task`). The offsets were checked against the
/// header with `offsetof` (status 0, residual_status 32, residual 40,
/// sense 48, datain 64, datain.data 72, iovector_out 144, size 176 on
/// LP64; see the test below), and the integration tests read a CHECK
/// CONDITION's sense key and a short transfer's residual through them
/// from tgt.
#[repr(C)]
pub struct ScsiTask {
    pub status: c_int,
    cdb_size: c_int,
    xfer_dir: c_int,
    expxferlen: c_int,
    /// `unsigned char cdb[SCSI_CDB_MAX_SIZE]`, 16 in 1.19.
    cdb: [u8; SCSI_CDB_MAX_SIZE],
    /// `enum scsi_residual`.
    pub residual_status: c_int,
    pub residual: usize,
    sense: ScsiSense,
    /// For a CHECK CONDITION: the response's data segment, the sense
    /// length (2 bytes, big-endian) and the sense bytes (iscsi-command.c,
    /// `iscsi_process_scsi_reply`).
    pub datain: ScsiData,
    /// `struct scsi_allocated_memory *mem`.
    mem: *mut c_void,
    /// `void *ptr` (libiscsi points it at the command PDU's callback data).
    ptr: *mut c_void,
    itt: u32,
    cmdsn: u32,
    lun: u32,
    iovector_in: ScsiIovector,
    /// The data-out buffers: what `iscsi_write_to_socket` (socket.c)
    /// reads each DATA-OUT PDU's payload from, through the PDU's pointer
    /// to this task.
    pub iovector_out: ScsiIovector,
}

/// `struct scsi_iovector` (scsi-lowlevel.h): a task's iovec list and the
/// cursor `iscsi_iovector_readv_writev` (socket.c) keeps in it.
#[repr(C)]
pub struct ScsiIovector {
    pub iov: *mut ScsiIovec,
    pub niov: c_int,
    /// Entries libiscsi allocated itself (`scsi_task_add_data_*_buffer`);
    /// 0 for a list set with `scsi_task_set_iov_*`.
    pub nalloc: c_int,
    /// Bytes before `iov[consumed]`.
    pub offset: usize,
    pub consumed: c_int,
}

/// `SCSI_CDB_MAX_SIZE` of 1.19: longer CDBs cannot be sent
/// (`scsi_create_task` copies the CDB into a 16-byte array unchecked).
pub const SCSI_CDB_MAX_SIZE: usize = 16;

/// `struct scsi_iovec`: "follows the POSIX struct iovec definition and
/// *MUST* never change" (scsi-lowlevel.h), so a `libc::iovec` is one.
pub type ScsiIovec = libc::iovec;

// enum scsi_xfer_dir (scsi-lowlevel.h)
pub const SCSI_XFER_NONE: c_int = 0;
pub const SCSI_XFER_READ: c_int = 1;
pub const SCSI_XFER_WRITE: c_int = 2;

// enum scsi_residual (scsi-lowlevel.h)
pub const SCSI_RESIDUAL_UNDERFLOW: c_int = 1;

// enum scsi_status (iscsi.h): the SAM status bytes, and libiscsi's own.
pub const SCSI_STATUS_GOOD: c_int = 0;
pub const SCSI_STATUS_CHECK_CONDITION: c_int = 2;
pub const SCSI_STATUS_CANCELLED: c_int = 0x0f00_0000;
pub const SCSI_STATUS_ERROR: c_int = 0x0f00_0001;
pub const SCSI_STATUS_TIMEOUT: c_int = 0x0f00_0002;

// enum iscsi_session_type (iscsi.h)
pub const ISCSI_SESSION_NORMAL: c_int = 2;

// enum iscsi_header_digest (iscsi.h)
pub const ISCSI_HEADER_DIGEST_NONE: c_int = 0;
pub const ISCSI_HEADER_DIGEST_NONE_CRC32C: c_int = 1;
pub const ISCSI_HEADER_DIGEST_CRC32C_NONE: c_int = 2;
pub const ISCSI_HEADER_DIGEST_CRC32C: c_int = 3;

// enum iscsi_task_mgmt_response (iscsi.h)
pub const ISCSI_TMR_FUNC_COMPLETE: u32 = 0;
pub const ISCSI_TMR_TASK_DOES_NOT_EXIST: u32 = 1;

/// `typedef void (*iscsi_command_cb)(struct iscsi_context *iscsi, int
/// status, void *command_data, void *private_data);` (iscsi.h)
pub type IscsiCommandCb = unsafe extern "C" fn(*mut IscsiContext, c_int, *mut c_void, *mut c_void);

/// The functions used, resolved once. Field names are the C names.
pub struct Libiscsi {
    // Kept loaded for as long as the pointers below are used: forever
    // (the process-wide instance is never dropped).
    _lib: libloading::Library,
    pub iscsi_create_context: unsafe extern "C" fn(*const c_char) -> *mut IscsiContext,
    pub iscsi_destroy_context: unsafe extern "C" fn(*mut IscsiContext) -> c_int,
    pub iscsi_get_error: unsafe extern "C" fn(*mut IscsiContext) -> *const c_char,
    pub iscsi_set_targetname: unsafe extern "C" fn(*mut IscsiContext, *const c_char) -> c_int,
    pub iscsi_set_session_type: unsafe extern "C" fn(*mut IscsiContext, c_int) -> c_int,
    pub iscsi_set_header_digest: unsafe extern "C" fn(*mut IscsiContext, c_int) -> c_int,
    pub iscsi_set_initiator_username_pwd:
        unsafe extern "C" fn(*mut IscsiContext, *const c_char, *const c_char) -> c_int,
    pub iscsi_set_timeout: unsafe extern "C" fn(*mut IscsiContext, c_int) -> c_int,
    pub iscsi_set_noautoreconnect: unsafe extern "C" fn(*mut IscsiContext, c_int),
    pub iscsi_set_isid_random: unsafe extern "C" fn(*mut IscsiContext, u32, u32) -> c_int,
    pub iscsi_full_connect_async: unsafe extern "C" fn(
        *mut IscsiContext,
        *const c_char,
        c_int,
        IscsiCommandCb,
        *mut c_void,
    ) -> c_int,
    pub iscsi_get_fd: unsafe extern "C" fn(*mut IscsiContext) -> c_int,
    pub iscsi_which_events: unsafe extern "C" fn(*mut IscsiContext) -> c_int,
    pub iscsi_service: unsafe extern "C" fn(*mut IscsiContext, c_int) -> c_int,
    pub iscsi_out_queue_length: unsafe extern "C" fn(*mut IscsiContext) -> c_int,
    pub iscsi_scsi_command_async: unsafe extern "C" fn(
        *mut IscsiContext,
        c_int,
        *mut ScsiTask,
        IscsiCommandCb,
        *mut c_void, // struct iscsi_data *: always NULL here
        *mut c_void,
    ) -> c_int,
    pub iscsi_scsi_cancel_task: unsafe extern "C" fn(*mut IscsiContext, *mut ScsiTask) -> c_int,
    pub iscsi_task_mgmt_abort_task_async: unsafe extern "C" fn(
        *mut IscsiContext,
        *mut ScsiTask,
        IscsiCommandCb,
        *mut c_void,
    ) -> c_int,
    pub iscsi_task_mgmt_abort_task_set_async:
        unsafe extern "C" fn(*mut IscsiContext, u32, IscsiCommandCb, *mut c_void) -> c_int,
    pub iscsi_task_mgmt_lun_reset_async:
        unsafe extern "C" fn(*mut IscsiContext, u32, IscsiCommandCb, *mut c_void) -> c_int,
    pub scsi_create_task: unsafe extern "C" fn(c_int, *mut u8, c_int, c_int) -> *mut ScsiTask,
    pub scsi_free_scsi_task: unsafe extern "C" fn(*mut ScsiTask),
    pub scsi_task_set_iov_in: unsafe extern "C" fn(*mut ScsiTask, *mut ScsiIovec, c_int),
    pub scsi_task_set_iov_out: unsafe extern "C" fn(*mut ScsiTask, *mut ScsiIovec, c_int),
}

/// Why the library could not be used.
#[derive(Debug, Clone)]
pub enum LoadError {
    /// No such library on the system (or it could not be loaded).
    NotFound { name: String, detail: String },
    /// Loaded, but a function is missing (not libiscsi 1.19 or later).
    MissingSymbol { name: String, symbol: &'static str },
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // dlopen's own message names the file again and says why;
            // only a library that is there but unusable needs it.
            LoadError::NotFound { name, detail } if !detail.contains("No such file") => {
                write!(f, "{name} cannot be loaded: {detail}")
            }
            LoadError::NotFound { name, .. } => {
                write!(f, "{name} not found (install the libiscsi7 package)")
            }
            LoadError::MissingSymbol { name, symbol } => write!(
                f,
                "{name} has no {symbol} (libiscsi 1.19 or later is needed)"
            ),
        }
    }
}

impl Libiscsi {
    /// Loads the library `name` and resolves every function.
    pub fn load(name: &str) -> Result<Libiscsi, LoadError> {
        // SAFETY: loading libiscsi runs its ELF constructors, of which it
        // has none that could conflict with this process.
        let lib = unsafe { libloading::Library::new(name) }.map_err(|e| LoadError::NotFound {
            name: name.to_string(),
            detail: e.to_string(),
        })?;
        macro_rules! sym {
            ($name:ident) => {{
                // SAFETY: the type is the function's C signature as
                // iscsi.h / scsi-lowlevel.h of 1.19 declare it (the field
                // the pointer goes into has that type).
                let s = unsafe { lib.get(concat!(stringify!($name), "\0").as_bytes()) };
                *s.map_err(|_| LoadError::MissingSymbol {
                    name: name.to_string(),
                    symbol: stringify!($name),
                })?
            }};
        }
        Ok(Libiscsi {
            iscsi_create_context: sym!(iscsi_create_context),
            iscsi_destroy_context: sym!(iscsi_destroy_context),
            iscsi_get_error: sym!(iscsi_get_error),
            iscsi_set_targetname: sym!(iscsi_set_targetname),
            iscsi_set_session_type: sym!(iscsi_set_session_type),
            iscsi_set_header_digest: sym!(iscsi_set_header_digest),
            iscsi_set_initiator_username_pwd: sym!(iscsi_set_initiator_username_pwd),
            iscsi_set_timeout: sym!(iscsi_set_timeout),
            iscsi_set_noautoreconnect: sym!(iscsi_set_noautoreconnect),
            iscsi_set_isid_random: sym!(iscsi_set_isid_random),
            iscsi_full_connect_async: sym!(iscsi_full_connect_async),
            iscsi_get_fd: sym!(iscsi_get_fd),
            iscsi_which_events: sym!(iscsi_which_events),
            iscsi_service: sym!(iscsi_service),
            iscsi_out_queue_length: sym!(iscsi_out_queue_length),
            iscsi_scsi_command_async: sym!(iscsi_scsi_command_async),
            iscsi_scsi_cancel_task: sym!(iscsi_scsi_cancel_task),
            iscsi_task_mgmt_abort_task_async: sym!(iscsi_task_mgmt_abort_task_async),
            iscsi_task_mgmt_abort_task_set_async: sym!(iscsi_task_mgmt_abort_task_set_async),
            iscsi_task_mgmt_lun_reset_async: sym!(iscsi_task_mgmt_lun_reset_async),
            scsi_create_task: sym!(scsi_create_task),
            scsi_free_scsi_task: sym!(scsi_free_scsi_task),
            scsi_task_set_iov_in: sym!(scsi_task_set_iov_in),
            scsi_task_set_iov_out: sym!(scsi_task_set_iov_out),
            _lib: lib,
        })
    }

    /// The process's instance of [`LIBISCSI`], loaded at the first call.
    pub fn get() -> Result<&'static Libiscsi, LoadError> {
        static LIB: OnceLock<Result<Libiscsi, LoadError>> = OnceLock::new();
        LIB.get_or_init(|| Libiscsi::load(LIBISCSI))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// `iscsi_get_error`, as a string.
    ///
    /// # Safety
    /// `ctx` is a live context.
    pub unsafe fn error(&self, ctx: *mut IscsiContext) -> String {
        // SAFETY: a live context (the caller's promise).
        let p = unsafe { (self.iscsi_get_error)(ctx) };
        if p.is_null() {
            return String::from("unknown error");
        }
        // SAFETY: iscsi_get_error returns the context's NUL-terminated
        // error buffer.
        let s = unsafe { std::ffi::CStr::from_ptr(p) };
        s.to_string_lossy().trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// The offsets `offsetof` gave for libiscsi 1.19's scsi-lowlevel.h
    /// (gcc, x86_64). A field added or moved in the mirror fails here.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn scsi_task_mirror_matches_the_header() {
        assert_eq!(offset_of!(ScsiTask, status), 0);
        assert_eq!(offset_of!(ScsiTask, residual_status), 32);
        assert_eq!(offset_of!(ScsiTask, residual), 40);
        assert_eq!(offset_of!(ScsiTask, sense), 48);
        assert_eq!(std::mem::size_of::<ScsiSense>(), 16);
        assert_eq!(offset_of!(ScsiSense, bit_pointer), 13);
        assert_eq!(offset_of!(ScsiSense, field_pointer), 14);
        assert_eq!(offset_of!(ScsiTask, datain), 64);
        assert_eq!(
            offset_of!(ScsiTask, datain) + offset_of!(ScsiData, data),
            72
        );
        assert_eq!(offset_of!(ScsiTask, itt), 96);
        assert_eq!(offset_of!(ScsiTask, lun), 104);
        assert_eq!(offset_of!(ScsiTask, iovector_in), 112);
        assert_eq!(offset_of!(ScsiTask, iovector_out), 144);
        assert_eq!(std::mem::size_of::<ScsiTask>(), 176);
        assert_eq!(offset_of!(ScsiIovector, niov), 8);
        assert_eq!(offset_of!(ScsiIovector, nalloc), 12);
        assert_eq!(offset_of!(ScsiIovector, offset), 16);
        assert_eq!(offset_of!(ScsiIovector, consumed), 24);
        assert_eq!(std::mem::size_of::<ScsiIovector>(), 32);
    }

    #[test]
    fn a_missing_library_is_one_line_naming_the_package() {
        let err = Libiscsi::load("libiscsi-does-not-exist.so.7")
            .err()
            .expect("loaded a library that does not exist");
        assert_eq!(
            err.to_string(),
            "libiscsi-does-not-exist.so.7 not found (install the libiscsi7 package)"
        );
    }
}
