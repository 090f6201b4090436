//! One virtio-scsi request queue on the driver side: a fixed set of request
//! slots, each owning three descriptors and its own header, response and
//! data buffers in guest memory, with a free list of heads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::ring::{Descriptor, SplitRing, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::scsi::{lun_field, ResponseHeader, REQUEST_LEN, RESPONSE_HEADER_LEN, RESPONSE_LEN};
use super::{wait_for_signal, FrontendError};

/// Descriptors per request: header, response and one data buffer.
pub(crate) const DESCS_PER_SLOT: u16 = 3;

/// Where a slot's buffers live.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotAddrs {
    pub header: u64,
    pub response: u64,
    pub data: u64,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    addrs: SlotAddrs,
    in_flight: bool,
    /// Bytes the device may write: response plus data-in.
    writable: u32,
    submitted: Instant,
}

/// The data phase of a command, in the slot's own data buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    None,
    /// The first `n` bytes of the slot's data buffer go to the device.
    Out(u32),
    /// The device may write up to `n` bytes into the slot's data buffer.
    In(u32),
}

/// A SCSI command to target 0.
#[derive(Clone, Copy, Debug)]
pub struct Command<'a> {
    pub lun: u16,
    /// At most 32 bytes (the default cdb_size).
    pub cdb: &'a [u8],
    pub data: Data,
}

/// A request the device returned.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The slot it was submitted in: its sense and data buffers stay as the
    /// device left them until the slot is submitted again.
    pub slot: usize,
    /// Bytes the device says it wrote (response plus data-in).
    pub used_len: u32,
    /// When the request was made available to the device.
    pub submitted: Instant,
    /// `None` when the device wrote less than a response header.
    pub response: Option<ResponseHeader>,
}

/// What [`RequestQueue::command`] returns: the device's answer in full.
#[derive(Clone, Debug)]
pub struct Reply {
    pub used_len: u32,
    pub response: u8,
    pub status: u8,
    pub residual: u32,
    pub sense: Vec<u8>,
    /// The whole data-in buffer that was offered (bytes the device did not
    /// write read as 0xee).
    pub data_in: Vec<u8>,
}

/// One request queue, owned by one submitting thread.
pub struct RequestQueue {
    /// vhost-user queue index (2 for the first request queue).
    index: usize,
    ring: SplitRing,
    mem: Arc<GuestMemoryMmap<()>>,
    kick: EventFd,
    call: EventFd,
    slots: Vec<Slot>,
    /// Free slots; the head of slot `s` is descriptor `3 * s`.
    free: Vec<u16>,
    data_capacity: u32,
    next_tag: u64,
    timeout: Duration,
}

impl RequestQueue {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        ring: SplitRing,
        mem: Arc<GuestMemoryMmap<()>>,
        kick: EventFd,
        call: EventFd,
        slots: &[SlotAddrs],
        data_capacity: u32,
        timeout: Duration,
    ) -> RequestQueue {
        let now = Instant::now();
        RequestQueue {
            index,
            ring,
            mem,
            kick,
            call,
            slots: slots
                .iter()
                .map(|&addrs| Slot {
                    addrs,
                    in_flight: false,
                    writable: 0,
                    submitted: now,
                })
                .collect(),
            // Popped from the end: slot 0 first.
            free: (0..slots.len() as u16).rev().collect(),
            data_capacity,
            next_tag: 0,
            timeout,
        }
    }

    /// The vhost-user queue index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Requests this queue can keep in flight.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The virtqueue size (descriptors).
    pub fn ring_size(&self) -> u16 {
        self.ring.size()
    }

    /// Size of each slot's data buffer.
    pub fn data_capacity(&self) -> u32 {
        self.data_capacity
    }

    /// The slot the next [`submit`](Self::submit) will use, to fill its data
    /// buffer first.
    pub fn next_free_slot(&self) -> Option<usize> {
        self.free.last().map(|&s| usize::from(s))
    }

    fn slot(&self, slot: usize) -> Result<&Slot, FrontendError> {
        self.slots.get(slot).ok_or(FrontendError::NoSuchSlot {
            slot,
            depth: self.slots.len(),
        })
    }

    /// Copies `bytes` into slot `slot`'s data buffer at `offset`.
    pub fn write_data(&self, slot: usize, offset: u32, bytes: &[u8]) -> Result<(), FrontendError> {
        let s = self.slot(slot)?;
        self.check_data_len(u64::from(offset) + bytes.len() as u64)?;
        self.mem
            .write_slice(bytes, GuestAddress(s.addrs.data + u64::from(offset)))?;
        Ok(())
    }

    /// Reads slot `slot`'s data buffer from `offset` into `buf`.
    pub fn read_data(&self, slot: usize, offset: u32, buf: &mut [u8]) -> Result<(), FrontendError> {
        let s = self.slot(slot)?;
        self.check_data_len(u64::from(offset) + buf.len() as u64)?;
        self.mem
            .read_slice(buf, GuestAddress(s.addrs.data + u64::from(offset)))?;
        Ok(())
    }

    /// The sense bytes of slot `slot`'s last response: `sense_len` of them,
    /// capped at the 96 the response has room for.
    pub fn read_sense(&self, slot: usize, sense_len: u32) -> Result<Vec<u8>, FrontendError> {
        let s = self.slot(slot)?;
        let len = (sense_len as usize).min(RESPONSE_LEN - RESPONSE_HEADER_LEN);
        let mut sense = vec![0u8; len];
        self.mem.read_slice(
            &mut sense,
            GuestAddress(s.addrs.response + RESPONSE_HEADER_LEN as u64),
        )?;
        Ok(sense)
    }

    fn check_data_len(&self, len: u64) -> Result<(), FrontendError> {
        if len > u64::from(self.data_capacity) {
            return Err(FrontendError::DataTooLarge {
                len,
                capacity: self.data_capacity,
            });
        }
        Ok(())
    }

    /// Makes `cmd` available to the device in a free slot and returns the
    /// slot. The device is not kicked: call [`notify`](Self::notify) after a
    /// batch.
    pub fn submit(&mut self, cmd: &Command) -> Result<usize, FrontendError> {
        if cmd.cdb.len() > REQUEST_LEN - 19 {
            return Err(FrontendError::CdbTooLong(cmd.cdb.len()));
        }
        let data_len = match cmd.data {
            Data::None => 0,
            Data::Out(n) | Data::In(n) => n,
        };
        self.check_data_len(u64::from(data_len))?;
        let Some(&slot_index) = self.free.last() else {
            return Err(FrontendError::QueueFull {
                queue: self.index,
                depth: self.slots.len(),
            });
        };
        let slot = usize::from(slot_index);
        let addrs = self.slots[slot].addrs;

        let mut header = [0u8; REQUEST_LEN];
        header[..8].copy_from_slice(&lun_field(cmd.lun));
        header[8..16].copy_from_slice(&self.next_tag.to_le_bytes());
        header[19..19 + cmd.cdb.len()].copy_from_slice(cmd.cdb);
        self.next_tag = self.next_tag.wrapping_add(1);
        self.mem.write_slice(&header, GuestAddress(addrs.header))?;

        // header [data-out] response [data-in], linked in that order.
        let head = slot_index * DESCS_PER_SLOT;
        let response = Descriptor {
            addr: addrs.response,
            len: RESPONSE_LEN as u32,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        };
        let data = Descriptor {
            addr: addrs.data,
            len: data_len,
            flags: 0,
            next: 0,
        };
        let mut chain = [Descriptor::default(); DESCS_PER_SLOT as usize];
        chain[0] = Descriptor {
            addr: addrs.header,
            len: REQUEST_LEN as u32,
            flags: 0,
            next: 0,
        };
        let n = match cmd.data {
            Data::None | Data::Out(0) | Data::In(0) => {
                chain[1] = response;
                2
            }
            Data::Out(_) => {
                chain[1] = data;
                chain[2] = response;
                3
            }
            Data::In(_) => {
                chain[1] = response;
                chain[2] = Descriptor {
                    flags: VRING_DESC_F_WRITE,
                    ..data
                };
                3
            }
        };
        let mut writable = 0u32;
        for (i, desc) in chain[..n].iter_mut().enumerate() {
            if i + 1 < n {
                desc.flags |= VRING_DESC_F_NEXT;
                desc.next = head + i as u16 + 1;
            }
            if desc.flags & VRING_DESC_F_WRITE != 0 {
                writable += desc.len;
            }
            self.ring.write_desc(head + i as u16, *desc)?;
        }
        self.ring.publish(head)?;
        self.free.pop();
        let s = &mut self.slots[slot];
        s.in_flight = true;
        s.writable = writable;
        s.submitted = Instant::now();
        Ok(slot)
    }

    /// Kicks the device if the requests published since the last call need
    /// it (EVENT_IDX: only when avail->idx passed the device's avail_event).
    /// Returns whether it kicked.
    pub fn notify(&mut self) -> Result<bool, FrontendError> {
        if self.ring.kick_needed()? {
            self.kick.write(1).map_err(FrontendError::EventFd)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Hands every request the device returned to `f`, freeing its slot;
    /// returns how many.
    pub fn reap(&mut self, mut f: impl FnMut(Completion)) -> Result<usize, FrontendError> {
        let mut n = 0;
        while let Some((id, used_len)) = self.ring.next_used(self.index, self.in_flight())? {
            let slot = self.slot_of_head(id)?;
            let s = self.slots[slot];
            if used_len > s.writable {
                return Err(FrontendError::UsedLength {
                    queue: self.index,
                    used_len,
                    writable: s.writable,
                });
            }
            let response = if used_len as usize >= RESPONSE_HEADER_LEN {
                let bytes: [u8; RESPONSE_HEADER_LEN] =
                    self.mem.read_obj(GuestAddress(s.addrs.response))?;
                Some(ResponseHeader::parse(&bytes))
            } else {
                None
            };
            self.slots[slot].in_flight = false;
            self.free.push(slot as u16);
            n += 1;
            f(Completion {
                slot,
                used_len,
                submitted: s.submitted,
                response,
            });
        }
        Ok(n)
    }

    fn slot_of_head(&self, id: u32) -> Result<usize, FrontendError> {
        let bad = FrontendError::UsedId {
            queue: self.index,
            id,
        };
        if id % u32::from(DESCS_PER_SLOT) != 0 {
            return Err(bad);
        }
        let slot = (id / u32::from(DESCS_PER_SLOT)) as usize;
        match self.slots.get(slot) {
            Some(s) if s.in_flight => Ok(slot),
            _ => Err(bad),
        }
    }

    /// Spins for up to `window` until the device returns a request; true if
    /// it did (nothing is consumed: reap it).
    pub fn poll_used(&self, window: Duration) -> Result<bool, FrontendError> {
        let deadline = Instant::now() + window;
        loop {
            if self.ring.has_used()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Sleeps until the device signals a completion, unless one is already
    /// there: asks for an interrupt at the next used entry (used_event),
    /// re-checks the used ring, then waits on the call eventfd. Fails after
    /// the queue's timeout, and with [`FrontendError::LostInterrupt`] when
    /// a completion appears while it sleeps but the device does not signal
    /// it within [`INTERRUPT_GRACE`](super::INTERRUPT_GRACE) (a completion already there when it
    /// asked needs no signal: the device may have read the old used_event).
    /// Returning does not promise a completion: a late signal for one
    /// already reaped also ends the sleep, so reap and wait again.
    pub fn wait(&mut self) -> Result<(), FrontendError> {
        if self.in_flight() == 0 {
            return Err(FrontendError::NothingInFlight { queue: self.index });
        }
        // Signals for completions reaped without sleeping would end the
        // sleep at once and could stand in for a missing one. Dropped
        // before the used ring is re-read (arm_interrupt), so a signal
        // consumed here belongs to a completion that re-read sees.
        let _ = self.call.read();
        if self.ring.arm_interrupt()? {
            return Ok(());
        }
        let ring = &self.ring;
        if wait_for_signal(&self.call, self.index, self.timeout, || ring.has_used())? {
            Ok(())
        } else {
            Err(FrontendError::Timeout {
                queue: self.index,
                timeout: self.timeout,
            })
        }
    }

    /// Runs one command to completion on an idle queue: copies `data_out`
    /// into the slot, submits, kicks, waits, and returns the response and
    /// the data-in buffer. For tests and setup, not for load.
    pub fn command(
        &mut self,
        lun: u16,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: u32,
    ) -> Result<Reply, FrontendError> {
        if self.in_flight() != 0 {
            return Err(FrontendError::Busy { queue: self.index });
        }
        if !data_out.is_empty() && data_in_len > 0 {
            return Err(FrontendError::Bidirectional);
        }
        let Some(slot) = self.next_free_slot() else {
            return Err(FrontendError::QueueFull {
                queue: self.index,
                depth: self.slots.len(),
            });
        };
        let data = if !data_out.is_empty() {
            self.write_data(slot, 0, data_out)?;
            Data::Out(data_out.len() as u32)
        } else if data_in_len > 0 {
            self.check_data_len(u64::from(data_in_len))?;
            self.write_data(slot, 0, &vec![0xee; data_in_len as usize])?;
            Data::In(data_in_len)
        } else {
            Data::None
        };
        // A response area the device did not write reads as zeroes.
        self.mem.write_slice(
            &[0u8; RESPONSE_LEN],
            GuestAddress(self.slots[slot].addrs.response),
        )?;
        let submitted = self.submit(&Command { lun, cdb, data })?;
        self.notify()?;
        let mut done = None;
        while done.is_none() {
            self.reap(|c| done = Some(c))?;
            if done.is_none() {
                self.wait()?;
            }
        }
        let Some(c) = done else {
            return Err(FrontendError::NothingInFlight { queue: self.index });
        };
        debug_assert_eq!(c.slot, submitted);
        let header = c.response.unwrap_or(ResponseHeader {
            sense_len: 0,
            residual: 0,
            status_qualifier: 0,
            status: 0,
            response: 0,
        });
        let sense = self.read_sense(c.slot, header.sense_len)?;
        let mut data_in = vec![0u8; data_in_len as usize];
        self.read_data(c.slot, 0, &mut data_in)?;
        Ok(Reply {
            used_len: c.used_len,
            response: header.response,
            status: header.status,
            residual: header.residual,
            sense,
            data_in,
        })
    }
}

/// Playing a broken driver, for tests of how the device copes.
impl RequestQueue {
    /// Stores `idx` as the available index without publishing anything
    /// (`None`: the true index again).
    pub fn store_raw_avail_index(&mut self, idx: Option<u16>) -> Result<(), FrontendError> {
        self.ring.store_raw_avail_idx(idx)
    }

    /// The device's avail_event field (EVENT_IDX).
    pub fn avail_event(&self) -> Result<u16, FrontendError> {
        self.ring.avail_event()
    }

    /// Overwrites the device's avail_event field.
    pub fn set_avail_event(&mut self, value: u16) -> Result<(), FrontendError> {
        self.ring.set_avail_event(value)
    }

    /// Kicks the device whether or not EVENT_IDX asks for it.
    pub fn kick(&mut self) -> Result<(), FrontendError> {
        self.kick.write(1).map_err(FrontendError::EventFd)
    }
}
