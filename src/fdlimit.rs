//! The open-file limit (`RLIMIT_NOFILE`). Every image keeps one file
//! descriptor open for the daemon's lifetime (its image locks belong to
//! that open file and take none of their own), so a daemon with thousands
//! of LUNs needs more descriptors than the usual soft limit of 1024. At
//! startup the daemon raises the soft limit up to the hard limit when the
//! images need it, and refuses to start, before opening any image, when
//! even the hard limit is too low.

use std::io;

use rlimit::Resource;

/// Descriptors the daemon needs besides the images' and the queues': stdin,
/// stdout and stderr, the listening socket, the VMM connection and its
/// backend request channel, the guest memory region files (at most 8
/// without `VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS`), the `/proc`
/// directories read to name a lock holder, with room to spare.
pub(crate) const BASE_FDS: u64 = 64;

/// Descriptors per virtqueue: its kick, call and error eventfds, its
/// io_uring (request queues, with the io-uring engine), a worker
/// thread's epoll descriptor, exit eventfd pair and completion eventfd (at
/// most one worker thread per queue), and the duplicate of that eventfd
/// its remote storage signals. (A network LUN counts as one image: its
/// connection's socket; the few more of an NBD LUN with several
/// connections, or of a backend's own eventfds, fit in the room
/// `BASE_FDS` leaves.)
pub(crate) const FDS_PER_QUEUE: u64 = 9;

/// About how many descriptors a daemon serving `images` images on
/// `queues` virtqueues keeps open.
pub fn needed(images: usize, queues: usize) -> u64 {
    images as u64 + BASE_FDS + FDS_PER_QUEUE * queues as u64
}

/// What to do about a soft limit `soft` and a hard limit `hard` when
/// `needed` descriptors are needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The soft limit is enough.
    Enough,
    /// Raise the soft limit to this (the hard limit: the estimate is only
    /// an estimate, and the headroom costs nothing).
    Raise(u64),
    /// Even the hard limit is too low.
    TooLow,
}

pub fn plan(needed: u64, soft: u64, hard: u64) -> Plan {
    if needed <= soft {
        Plan::Enough
    } else if needed <= hard {
        Plan::Raise(hard)
    } else {
        Plan::TooLow
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FdLimitError {
    #[error(
        "{} about {needed} open files, but the limit is {limit} \
         (raise it with ulimit -n or LimitNOFILE= in the systemd unit)",
        images_need(*.images)
    )]
    TooLow {
        images: usize,
        needed: u64,
        limit: u64,
    },
    #[error("cannot read the open-file limit: {0}")]
    Get(io::Error),
    #[error("cannot raise the open-file limit from {from} to {to}: {source}")]
    Set {
        from: u64,
        to: u64,
        source: io::Error,
    },
}

fn images_need(images: usize) -> String {
    match images {
        1 => "1 image needs".to_string(),
        n => format!("{n} images need"),
    }
}

/// A raised soft limit: from, to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Raised {
    pub from: u64,
    pub to: u64,
}

/// Makes sure `images` images on `queues` virtqueues fit under the soft
/// open-file limit, raising it up to the hard limit if needed; says whether
/// it raised it.
pub(crate) fn ensure(images: usize, queues: usize) -> Result<Option<Raised>, FdLimitError> {
    let needed = needed(images, queues);
    let (soft, hard) = get().map_err(FdLimitError::Get)?;
    match plan(needed, soft, hard) {
        Plan::Enough => Ok(None),
        Plan::TooLow => Err(FdLimitError::TooLow {
            images,
            needed,
            limit: hard,
        }),
        Plan::Raise(to) => {
            // A hard limit above fs.nr_open (which only an unusual setup
            // has) cannot be the soft limit; what is needed may still be.
            let to = match set(to, hard) {
                Ok(()) => to,
                Err(_) => {
                    set(needed, hard).map_err(|source| FdLimitError::Set {
                        from: soft,
                        to: needed,
                        source,
                    })?;
                    needed
                }
            };
            Ok(Some(Raised { from: soft, to }))
        }
    }
}

/// The soft and hard `RLIMIT_NOFILE` (no limit is [`rlimit::INFINITY`]).
fn get() -> io::Result<(u64, u64)> {
    Resource::NOFILE.get()
}

fn set(soft: u64, hard: u64) -> io::Result<()> {
    Resource::NOFILE.set(soft, hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        assert_eq!(plan(100, 1024, 4096), Plan::Enough);
        assert_eq!(plan(1024, 1024, 4096), Plan::Enough);
        assert_eq!(plan(1025, 1024, 4096), Plan::Raise(4096));
        assert_eq!(plan(4096, 1024, 4096), Plan::Raise(4096));
        assert_eq!(plan(4097, 1024, 4096), Plan::TooLow);
        assert_eq!(plan(4097, 4096, 4096), Plan::TooLow);
        // RLIM_INFINITY (u64::MAX) is the largest value there is.
        let infinity = u64::MAX;
        assert_eq!(plan(20_000, 1024, infinity), Plan::Raise(infinity));
    }

    #[test]
    fn estimate() {
        assert_eq!(needed(0, 18), 64 + 9 * 18);
        assert_eq!(needed(16384, 18), 16384 + 64 + 9 * 18);
    }

    #[test]
    fn message() {
        let e = FdLimitError::TooLow {
            images: 16384,
            needed: 16610,
            limit: 4096,
        };
        assert_eq!(
            e.to_string(),
            "16384 images need about 16610 open files, but the limit is 4096 \
             (raise it with ulimit -n or LimitNOFILE= in the systemd unit)"
        );
        let e = FdLimitError::TooLow {
            images: 1,
            needed: 208,
            limit: 100,
        };
        assert!(e
            .to_string()
            .starts_with("1 image needs about 208 open files"));
    }

    #[test]
    fn a_sufficient_limit_is_left_alone() {
        let before = get().unwrap();
        assert_eq!(ensure(0, 0).unwrap(), None);
        assert_eq!(get().unwrap(), before);
    }
}
