//! Fixtures the daemon's tests and the fuzz targets share: image files, and
//! the mode pages vhost-device-scsi reports (which MODE SELECT sends back).
//! The pages are the daemon's documented choices (docs/guest-view.md in
//! the repository) written out by hand, so the tests do not take them from
//! the daemon.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Read-write error recovery mode page (SBC-3 §6.4.7) as reported: AWRE=1,
/// ARRE=1, nothing else.
pub const RW_ERROR_RECOVERY_PAGE: [u8; 12] = [0x01, 0x0a, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Caching mode page (SBC-3 §6.4.5) as reported, with WCE as given (the
/// default is WCE=1, write-back cache on) and the read cache enabled
/// (RCD=0).
pub fn caching_page(wce: bool) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    p[2] = if wce { 0x04 } else { 0 };
    p
}

/// Control mode page (SPC-4 §7.5.8) as reported: GLTSD=1, QUEUE ALGORITHM
/// MODIFIER 1, BUSY TIMEOUT PERIOD FFFFh, and D_SENSE (byte 2 bit 2) as
/// given.
pub fn control_page(d_sense: bool) -> Vec<u8> {
    let mut p = vec![0x0a, 0x0a, 0x02, 0x10, 0, 0, 0, 0, 0xff, 0xff, 0, 0];
    if d_sense {
        p[2] |= 0x04;
    }
    p
}

/// Creates the image `path` of `len` bytes, every one `fill` (allocated,
/// not sparse).
pub fn filled_image(path: &Path, len: usize, fill: u8) -> io::Result<()> {
    File::create(path)?.write_all(&vec![fill; len])
}

/// Creates the image `path` of `len` bytes: `head` at offset 0, the rest
/// a hole.
pub fn sparse_image(path: &Path, head: &[u8], len: u64) -> io::Result<()> {
    let file = File::create(path)?;
    file.write_all_at(head, 0)?;
    file.set_len(len)
}
