//! The durability rule across reconnections. A server acknowledges a
//! write without FUA once it holds it, possibly in a volatile cache; a
//! FLUSH makes it durable. If a connection drops while such writes exist
//! that no successful FLUSH has covered, the server may have restarted
//! and lost them, and a later FLUSH on the new connection would succeed
//! over the loss. So: a connection lost with unflushed acknowledged
//! writes marks a loss, and the next FLUSH to complete fails with EIO
//! (once, like the kernel's writeback errors: the guest saw the failure;
//! flushes after it succeed again). Conservative: a connection that
//! dropped without the server restarting fails a flush too.
//!
//! What counts as such a drop is the slot's to say: the server closed or
//! broke the connection, or answered nothing for a whole timeout. A drop
//! the client chose while the server was answering (a write cut short at
//! its deadline, a command left unanswered while others were answered)
//! counts only for a server without NBD_FLAG_CAN_MULTI_CONN (whose FLUSH
//! on a new connection is not promised to cover what another connection
//! acknowledged). A server's error reply never drops the connection, nor
//! does a reconnection for a new size (NBD_CMD_DISC, nothing in flight).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Default)]
pub struct Durability {
    /// Writes (WRITE without FUA, TRIM, WRITE_ZEROES) acknowledged, ever.
    acked: AtomicU64,
    /// `acked` as it was when the last successful FLUSH was sent (a flush
    /// covers the writes completed before it was sent).
    flushed: AtomicU64,
    /// A connection was lost with unflushed acknowledged writes.
    lost: AtomicBool,
}

impl Durability {
    pub fn write_acked(&self) {
        self.acked.fetch_add(1, Ordering::AcqRel);
    }

    /// What a FLUSH sent now covers.
    pub fn flush_sent(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// A FLUSH sent when [`Durability::flush_sent`] said `covers` succeeded.
    pub fn flush_done(&self, covers: u64) {
        self.flushed.fetch_max(covers, Ordering::AcqRel);
    }

    /// A connection dropped (before its requests are sent again).
    pub fn connection_lost(&self) -> bool {
        let unflushed = self.acked.load(Ordering::Acquire) > self.flushed.load(Ordering::Acquire);
        if unflushed {
            self.lost.store(true, Ordering::Release);
        }
        unflushed
    }

    /// Whether a loss is to be reported (by the flush completing now).
    pub fn take_loss(&self) -> bool {
        self.lost.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_after_unflushed_writes_fails_the_next_flush_once() {
        let d = Durability::default();
        assert!(!d.connection_lost(), "nothing written");
        d.write_acked();
        let covers = d.flush_sent();
        d.flush_done(covers);
        assert!(!d.connection_lost(), "flushed");
        assert!(!d.take_loss());
        d.write_acked();
        assert!(d.connection_lost());
        assert!(d.take_loss());
        assert!(!d.take_loss(), "reported once");
        // A flush sent before a write was acknowledged does not cover it.
        let covers = d.flush_sent();
        d.write_acked();
        d.flush_done(covers);
        assert!(d.connection_lost());
    }
}
