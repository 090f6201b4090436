//! Checks on a memory table the VMM sends (vhost-user SET_MEM_TABLE) before
//! any queue uses it.

use std::io;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::chain::GuestMem;

#[derive(Debug, thiserror::Error)]
pub(crate) enum MemoryTableError {
    #[error(
        "memory region at guest address {gpa:#x}: {len} bytes from file offset {offset} \
         run past the end of its {file_len}-byte file"
    )]
    PastEndOfFile {
        gpa: u64,
        len: u64,
        offset: u64,
        file_len: u64,
    },
    #[error("memory region at guest address {gpa:#x}: cannot stat its file: {source}")]
    Stat { gpa: u64, source: io::Error },
    #[error("{0} memory regions: at most {MAX_MEMORY_REGIONS}, as SET_MEM_TABLE carries")]
    TooManyRegions(usize),
}

/// Most regions of a memory table: what one SET_MEM_TABLE carries
/// (VHOST_MEMORY_BASELINE_NREGIONS in the vhost-user specification). More
/// can only be added with ADD_MEM_REG, whose CONFIGURE_MEM_SLOTS protocol
/// feature is never offered.
pub(crate) const MAX_MEMORY_REGIONS: usize = 8;

/// Checks that `mem` has at most [`MAX_MEMORY_REGIONS`] regions and that
/// every region of it backed by a regular file (memfd,
/// tmpfs, hugetlbfs) lies within that file. mmap maps a range past the end
/// of a file without complaint, but the first access to a page beyond it
/// raises SIGBUS, which would end the daemon (vm-memory's `from_file` does
/// not check; the vhost-user specification gives the region's size and
/// offset in the file, and a table that does not fit its file is one the
/// daemon cannot use).
pub(crate) fn check_memory_table(mem: &GuestMem) -> Result<(), MemoryTableError> {
    if mem.num_regions() > MAX_MEMORY_REGIONS {
        return Err(MemoryTableError::TooManyRegions(mem.num_regions()));
    }
    for region in mem.iter() {
        let Some(file_offset) = region.file_offset() else {
            continue;
        };
        let gpa = region.start_addr().0;
        let meta = file_offset
            .file()
            .metadata()
            .map_err(|source| MemoryTableError::Stat { gpa, source })?;
        if !meta.is_file() {
            continue;
        }
        let (offset, len) = (file_offset.start(), region.len());
        if offset.checked_add(len).is_none_or(|end| end > meta.len()) {
            return Err(MemoryTableError::PastEndOfFile {
                gpa,
                len,
                offset,
                file_len: meta.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{FileOffset, GuestAddress};

    fn file(len: u64) -> std::fs::File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f
    }

    fn mem(file_len: u64, offset: u64, size: usize) -> GuestMem {
        GuestMem::from_ranges_with_files(&[(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file(file_len), offset)),
        )])
        .unwrap()
    }

    #[test]
    fn regions_within_their_files_pass() {
        assert!(check_memory_table(&mem(1 << 20, 0, 1 << 20)).is_ok());
        assert!(check_memory_table(&mem(2 << 20, 1 << 20, 1 << 20)).is_ok());
        assert!(
            check_memory_table(&GuestMem::from_ranges(&[(GuestAddress(0), 4096)]).unwrap()).is_ok()
        );
    }

    #[test]
    fn regions_past_the_end_of_their_files_fail() {
        let e = check_memory_table(&mem(1 << 20, 0, 2 << 20)).unwrap_err();
        assert!(matches!(
            e,
            MemoryTableError::PastEndOfFile {
                len: 0x20_0000,
                file_len: 0x10_0000,
                ..
            }
        ));
        assert!(check_memory_table(&mem(1 << 20, 4096, 1 << 20)).is_err());
    }
}
