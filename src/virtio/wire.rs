//! virtio-scsi wire structures (virtio 1.2 §5.6) as `virtio_bindings`
//! defines them, readable and writable as bytes.

use virtio_bindings::virtio_scsi::{
    virtio_scsi_cmd_resp, virtio_scsi_config, virtio_scsi_ctrl_an_req, virtio_scsi_ctrl_tmf_req,
};
use vm_memory::ByteValued;

/// A `virtio_bindings` structure as bytes, little-endian fields as the
/// device reads and writes them.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Wire<T>(pub T);

impl<T: Default> Default for Wire<T> {
    fn default() -> Self {
        Wire(T::default())
    }
}

// SAFETY: each of these is a C structure of integers and byte arrays only
// (the bindings assert its size and every field's offset, without padding),
// so every byte pattern is a valid value and all its bytes are initialised;
// `Wire` is `repr(transparent)` over it.
unsafe impl ByteValued for Wire<virtio_scsi_config> {}
// SAFETY: as above (packed, no padding).
unsafe impl ByteValued for Wire<virtio_scsi_ctrl_tmf_req> {}
// SAFETY: as above (packed, no padding).
unsafe impl ByteValued for Wire<virtio_scsi_ctrl_an_req> {}
// SAFETY: as above (packed, no padding).
unsafe impl ByteValued for Wire<virtio_scsi_cmd_resp> {}
