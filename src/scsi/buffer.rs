//! The initiator's data buffers as the SCSI target sees them: small traits,
//! implemented over guest memory by the transport and over byte vectors in
//! tests.

use std::io;

use crate::storage::{IoBufs, IoBufsMut, Storage};

/// Data-in: the buffer the device fills for the initiator.
pub trait DataIn {
    /// Bytes the buffer can still take.
    fn remaining(&self) -> usize;

    /// Bytes written so far.
    fn written(&self) -> usize;

    /// Copies as much of `data` as fits; returns the count copied.
    fn write_bytes(&mut self, data: &[u8]) -> usize;

    /// Transfers `len` bytes of `storage` starting at `offset` straight into
    /// the buffer, without an intermediate copy. `len` must not exceed
    /// [`DataIn::remaining`].
    fn read_from(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> io::Result<()>;
}

/// Data-out: the buffer the initiator filled for the device.
pub trait DataOut {
    /// Bytes not yet consumed.
    fn remaining(&self) -> usize;

    /// Copies up to `buf.len()` bytes out of the buffer; returns the count.
    fn read_bytes(&mut self, buf: &mut [u8]) -> usize;

    /// Transfers the next `len` bytes straight to `storage` at `offset`,
    /// without an intermediate copy (`durable` as for
    /// [`Storage::write_vectored_at`]). `len` must not exceed
    /// [`DataOut::remaining`].
    fn write_to(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        len: usize,
        durable: bool,
    ) -> io::Result<()>;
}

/// A data-in buffer in a byte vector, with a fixed capacity (as a guest's
/// buffer has).
#[derive(Debug, Default)]
pub struct VecDataIn {
    pub data: Vec<u8>,
    capacity: usize,
}

impl VecDataIn {
    pub fn with_capacity(capacity: usize) -> Self {
        VecDataIn {
            data: Vec::new(),
            capacity,
        }
    }
}

impl DataIn for VecDataIn {
    fn remaining(&self) -> usize {
        self.capacity - self.data.len()
    }

    fn written(&self) -> usize {
        self.data.len()
    }

    fn write_bytes(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.remaining());
        self.data.extend_from_slice(&data[..n]);
        n
    }

    fn read_from(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> io::Result<()> {
        if len > self.remaining() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let start = self.data.len();
        self.data.resize(start + len, 0);
        let mut destination = IoBufsMut::new();
        destination.push_bytes(&mut self.data[start..]);
        let result = storage.read_vectored_at(&mut destination, offset);
        if result.is_err() {
            self.data.truncate(start);
        }
        result
    }
}

/// A data-out buffer over a byte slice.
#[derive(Debug)]
pub struct SliceDataOut<'a> {
    data: &'a [u8],
}

impl<'a> SliceDataOut<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        SliceDataOut { data }
    }
}

impl DataOut for SliceDataOut<'_> {
    fn remaining(&self) -> usize {
        self.data.len()
    }

    fn read_bytes(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        n
    }

    fn write_to(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        len: usize,
        durable: bool,
    ) -> io::Result<()> {
        let Some(chunk) = self.data.get(..len) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let mut source = IoBufs::new();
        source.push_bytes(chunk);
        storage.write_vectored_at(&source, offset, durable)?;
        self.data = &self.data[len..];
        Ok(())
    }
}
