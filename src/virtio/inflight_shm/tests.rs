//! Tests of the in-flight region: bytes read and written through the file,
//! as the VMM sees them, at the offsets the specification gives.

use std::os::unix::fs::FileExt;

use super::*;

// Offsets as the specification's structures place them.
fn desc_off(queue_base: u64, head: u64) -> u64 {
    queue_base + 16 + 16 * head
}

fn read(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn read_u16(file: &File, offset: u64) -> u16 {
    u16::from_le_bytes(read(file, offset, 2).try_into().unwrap())
}

fn read_u64(file: &File, offset: u64) -> u64 {
    u64::from_le_bytes(read(file, offset, 8).try_into().unwrap())
}

fn write(file: &File, offset: u64, bytes: &[u8]) {
    file.write_all_at(bytes, offset).unwrap();
}

/// A memfd the "VMM" made itself, `len` bytes, with `seals`.
fn vmm_memfd(len: u64, seals: SealFlags) -> File {
    let fd = rustix::fs::memfd_create("test", MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    if !seals.is_empty() {
        rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
    }
    File::from(fd)
}

/// The same file handed back by the VMM, as a restarted daemon gets it.
fn reopen(file: &File, num_queues: u16, queue_size: u16) -> InflightRegion {
    let size = file.metadata().unwrap().len();
    InflightRegion::from_vmm(file.try_clone().unwrap(), 0, size, num_queues, queue_size).unwrap()
}

#[test]
fn queue_region_sizes_are_libvhost_users() {
    // align_up(16 * n + 2, 64), worked out by hand.
    assert_eq!(queue_region_size(1), 64); // 18 → 64
    assert_eq!(queue_region_size(3), 64); // 50 → 64
    assert_eq!(queue_region_size(4), 128); // 66 → 128
    assert_eq!(queue_region_size(128), 2112); // 2050 → 2112
    assert_eq!(queue_region_size(256), 4160); // 4098 → 4160
    assert_eq!(queue_region_size(32768), 524_352); // 524290 → 524352
                                                   // The 16-byte header always fits, whatever the size.
    for n in 1..=MAX_QUEUE_SIZE {
        assert!(16 + 16 * u64::from(n) <= queue_region_size(n), "{n}");
    }
    assert_eq!(region_size(2, 128).unwrap(), 4224);
}

#[test]
fn a_new_region_is_laid_out_as_the_specification_says() {
    let (region, file) = InflightRegion::create(2, 128).unwrap();
    assert_eq!(region.mmap_size(), 4224);
    assert_eq!(file.metadata().unwrap().len(), 4224);
    let seals = rustix::fs::fcntl_get_seals(&file).unwrap();
    assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
    let bytes = read(&file, 0, 4224);
    let mut expected = vec![0u8; 4224];
    // Queue 0 at 0, queue 1 at 2112: version 1 at +8, desc_num 128 at +10.
    for base in [0usize, 2112] {
        expected[base + 8] = 1;
        expected[base + 10] = 128;
    }
    assert_eq!(bytes, expected);
    assert!(region.queue(1).is_some());
    assert!(region.queue(2).is_none());
}

#[test]
fn counts_out_of_range_are_refused() {
    assert!(matches!(
        InflightRegion::create(0, 128),
        Err(InflightError::QueueCount(0))
    ));
    assert!(matches!(
        InflightRegion::create(1025, 1),
        Err(InflightError::QueueCount(1025))
    ));
    assert!(matches!(
        InflightRegion::create(1, 0),
        Err(InflightError::QueueSize(0))
    ));
    let file = vmm_memfd(1 << 20, SealFlags::SHRINK);
    assert!(matches!(
        InflightRegion::from_vmm(file, 0, 1 << 20, 1, 32769),
        Err(InflightError::QueueSize(32769))
    ));
}

#[test]
fn begin_before_used_after_used_write_the_fields() {
    let (region, file) = InflightRegion::create(2, 128).unwrap();
    let q = region.queue(1).unwrap();
    let base = 2112;
    for head in [3u16, 7, 0] {
        q.begin(head).unwrap();
    }
    // Counters 0, 1, 2 in the order taken; inflight 1.
    for (head, counter) in [(3u64, 0u64), (7, 1), (0, 2)] {
        assert_eq!(read(&file, desc_off(base, head), 1), [1]);
        assert_eq!(read_u64(&file, desc_off(base, head) + 8), counter);
    }
    q.before_used(7).unwrap();
    assert_eq!(read_u16(&file, base + 12), 7); // last_batch_head
    assert_eq!(read_u16(&file, desc_off(base, 7) + 6), 7); // next: end of batch
    assert_eq!(read(&file, desc_off(base, 7), 1), [1]); // still in flight
    q.after_used(7, 1).unwrap();
    assert_eq!(read(&file, desc_off(base, 7), 1), [0]);
    assert_eq!(read_u16(&file, base + 14), 1); // used_idx
                                               // Queue 0 untouched but for its header.
    assert_eq!(
        read(&file, 0, 16),
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 128, 0, 0, 0, 0, 0]
    );
    // desc[3].counter of queue 0 would be at 16 + 3 * 16 + 8.
    region.queue(0).unwrap().begin(3).unwrap();
    assert_eq!(read(&file, 72, 8), [0; 8]);
    region.queue(0).unwrap().begin(3).unwrap();
    assert_eq!(read(&file, 72, 8), [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(read(&file, 64, 1), [1]);
}

#[test]
fn a_head_past_the_queue_is_an_error() {
    let (region, file) = InflightRegion::create(1, 128).unwrap();
    let q = region.queue(0).unwrap();
    for result in [q.begin(128), q.before_used(128), q.after_used(u16::MAX, 1)] {
        assert!(matches!(
            result,
            Err(InflightError::Head {
                queue: 0,
                queue_size: 128,
                ..
            })
        ));
    }
    let mut expected = vec![0u8; 2112];
    expected[8] = 1;
    expected[10] = 128;
    assert_eq!(read(&file, 0, 2112), expected);
}

#[test]
fn recovery_before_the_used_index_moved_resubmits_the_last_batch() {
    let (region, file) = InflightRegion::create(1, 128).unwrap();
    let q = region.queue(0).unwrap();
    q.begin(9).unwrap();
    q.begin(5).unwrap();
    q.before_used(9).unwrap();
    // Crash: the used ring's index is still 0.
    drop((q, region));
    let region = reopen(&file, 1, 128);
    let q = region.queue(0).unwrap();
    let resubmit = q.recover(0).unwrap();
    assert_eq!(
        resubmit,
        Resubmit {
            heads: vec![9, 5],
            next_avail: 2
        }
    );
    // The counter goes on after the largest (1).
    q.begin(11).unwrap();
    assert_eq!(read_u64(&file, desc_off(0, 11) + 8), 2);
}

#[test]
fn recovery_after_the_used_index_moved_clears_the_last_batch() {
    let (region, file) = InflightRegion::create(1, 128).unwrap();
    let q = region.queue(0).unwrap();
    q.begin(9).unwrap();
    q.begin(5).unwrap();
    q.before_used(9).unwrap();
    // Crash after the used ring's index became 1, before after_used.
    drop((q, region));
    let region = reopen(&file, 1, 128);
    let resubmit = region.queue(0).unwrap().recover(1).unwrap();
    assert_eq!(
        resubmit,
        Resubmit {
            heads: vec![5],
            next_avail: 2
        }
    );
    assert_eq!(read(&file, desc_off(0, 9), 1), [0]);
    assert_eq!(read_u16(&file, 14), 1);
}

#[test]
fn recovery_orders_by_counter_after_out_of_order_completions() {
    let (region, file) = InflightRegion::create(1, 16).unwrap();
    let q = region.queue(0).unwrap();
    for head in 1..=4 {
        q.begin(head).unwrap(); // counters 0..=3
    }
    q.before_used(3).unwrap();
    q.after_used(3, 1).unwrap();
    q.before_used(1).unwrap();
    q.after_used(1, 2).unwrap();
    q.begin(3).unwrap(); // counter 4
    q.begin(6).unwrap(); // counter 5
    drop((q, region));
    let region = reopen(&file, 1, 16);
    let q = region.queue(0).unwrap();
    assert_eq!(
        q.recover(2).unwrap(),
        Resubmit {
            heads: vec![2, 4, 3, 6],
            next_avail: 6
        }
    );
    q.begin(7).unwrap();
    assert_eq!(read_u64(&file, desc_off(0, 7) + 8), 6);
}

#[test]
fn recovery_with_nothing_in_flight() {
    let (region, _file) = InflightRegion::create(1, 8).unwrap();
    let q = region.queue(0).unwrap();
    q.begin(2).unwrap();
    q.before_used(2).unwrap();
    q.after_used(2, 1).unwrap();
    assert_eq!(
        q.recover(1).unwrap(),
        Resubmit {
            heads: vec![],
            next_avail: 1
        }
    );
}

#[test]
fn a_hostile_region_every_head_in_flight_with_garbage_counters() {
    let (region, file) = InflightRegion::create(1, 8).unwrap();
    drop(region);
    let counters = [u64::MAX, 5, 5, 0, 1 << 63, 7, 3, u64::MAX - 1];
    for (head, counter) in counters.iter().enumerate() {
        let off = desc_off(0, head as u64);
        write(&file, off, &[1, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xff, 0xff]);
        write(&file, off + 8, &counter.to_le_bytes());
    }
    // used_idx 0x1234 and last_batch_head 0xffff: a mismatch whose
    // batch starts outside the queue.
    write(&file, 12, &[0xff, 0xff, 0x34, 0x12]);
    let region = reopen(&file, 1, 8);
    let q = region.queue(0).unwrap();
    assert_eq!(
        q.recover(0x1234 + 100).unwrap(),
        Resubmit {
            heads: vec![3, 6, 1, 2, 5, 4, 7, 0],
            next_avail: 0x1234 + 100 + 8
        }
    );
    assert_eq!(read_u16(&file, 14), 0x1234 + 100);
    // The counter saturates rather than wrapping to before the others.
    q.begin(0).unwrap();
    assert_eq!(read_u64(&file, desc_off(0, 0) + 8), u64::MAX);
}

#[test]
fn a_hostile_batch_list_is_walked_within_bounds() {
    let (region, file) = InflightRegion::create(1, 8).unwrap();
    drop(region);
    // Heads 2, 4 and 6 in flight; the batch list loops 2 → 4 → 2; an
    // inflight byte of 0xff is not "in flight".
    for head in [2u64, 4, 6] {
        write(&file, desc_off(0, head), &[1]);
    }
    write(&file, desc_off(0, 5), &[0xff]);
    write(&file, desc_off(0, 2) + 6, &4u16.to_le_bytes());
    write(&file, desc_off(0, 4) + 6, &2u16.to_le_bytes());
    write(&file, 12, &2u16.to_le_bytes());
    let region = reopen(&file, 1, 8);
    // used ring 60000 ahead of used_idx 0: the walk stops after 8.
    let resubmit = region.queue(0).unwrap().recover(60000).unwrap();
    assert_eq!(
        resubmit,
        Resubmit {
            heads: vec![6],
            next_avail: 60001
        }
    );
}

#[test]
fn an_uninitialized_region_is_initialized() {
    // Version 0 with garbage in it, at a page offset into the file.
    let needed = region_size(2, 4).unwrap();
    let file = vmm_memfd(4096 + needed, SealFlags::SHRINK);
    write(&file, 4096, &[0xee; 256]);
    write(&file, 4096 + 8, &[0, 0]);
    write(&file, 4096 + 128 + 8, &[0, 0]);
    let region = InflightRegion::from_vmm(file.try_clone().unwrap(), 4096, needed, 2, 4).unwrap();
    assert_eq!(region.mmap_size(), 256);
    let mut expected = vec![0u8; 256];
    for base in [0usize, 128] {
        expected[base + 8] = 1;
        expected[base + 10] = 4;
    }
    // Each queue's header and 4 descriptor states cleared (80 bytes);
    // the padding up to 128 is not the queue's.
    expected[80..128].fill(0xee);
    expected[208..256].fill(0xee);
    assert_eq!(read(&file, 4096, 256), expected);
    assert_eq!(read(&file, 0, 4096), vec![0; 4096]);
    assert!(region
        .queue(1)
        .unwrap()
        .recover(0)
        .unwrap()
        .heads
        .is_empty());
}

#[test]
fn a_header_of_another_geometry_or_version_is_refused_untouched() {
    let (region, file) = InflightRegion::create(2, 128).unwrap();
    drop(region);
    write(&file, 2112 + 10, &64u16.to_le_bytes());
    let before = read(&file, 0, 4224);
    let err = InflightRegion::from_vmm(file.try_clone().unwrap(), 0, 4224, 2, 128);
    assert!(matches!(
        err,
        Err(InflightError::DescNum {
            queue: 1,
            desc_num: 64,
            queue_size: 128
        })
    ));
    assert_eq!(read(&file, 0, 4224), before);
    write(&file, 2112 + 10, &128u16.to_le_bytes());
    write(&file, 2112 + 8, &2u16.to_le_bytes());
    assert!(matches!(
        InflightRegion::from_vmm(file, 0, 4224, 2, 128),
        Err(InflightError::Version {
            queue: 1,
            version: 2
        })
    ));
}

#[test]
fn sizes_and_offsets_are_checked() {
    let needed = region_size(2, 128).unwrap(); // 4224
    let file = vmm_memfd(needed, SealFlags::SHRINK);
    let from = |offset, size| {
        InflightRegion::from_vmm(file.try_clone().unwrap(), offset, size, 2, 128).unwrap_err()
    };
    assert!(matches!(
        from(0, needed - 1),
        InflightError::TooSmall {
            given: 4223,
            needed: 4224
        }
    ));
    assert!(matches!(
        from(!0xfff_u64, needed),
        InflightError::Overflow { .. }
    ));
    assert!(matches!(from(100, needed), InflightError::Unaligned(100)));
    assert!(matches!(
        from(4096, needed),
        InflightError::PastEndOfFile {
            offset: 4096,
            size: 4224,
            file_size: 4224
        }
    ));
    assert!(matches!(
        from(0, needed + 1),
        InflightError::PastEndOfFile { .. }
    ));
    // A larger mmap_size within the file is fine; only what the
    // queues need is mapped.
    let big = vmm_memfd(1 << 20, SealFlags::SHRINK);
    let region = InflightRegion::from_vmm(big, 0, 1 << 20, 2, 128).unwrap();
    assert_eq!(region.mmap_size(), 4224);
}

#[test]
fn a_file_that_can_shrink_is_refused() {
    let needed = region_size(1, 128).unwrap();
    // Sealable but not sealed; sealed against growing only.
    for seals in [SealFlags::empty(), SealFlags::GROW] {
        let file = vmm_memfd(needed, seals);
        assert!(matches!(
            InflightRegion::from_vmm(file, 0, needed, 1, 128),
            Err(InflightError::NotSealed)
        ));
    }
    // A memfd that does not allow sealing carries F_SEAL_SEAL only.
    let fd = rustix::fs::memfd_create("test", MemfdFlags::empty()).unwrap();
    rustix::fs::ftruncate(&fd, needed).unwrap();
    assert!(matches!(
        InflightRegion::from_vmm(File::from(fd), 0, needed, 1, 128),
        Err(InflightError::NotSealed)
    ));
    // A regular file has no seals at all.
    let tmp = tempfile::tempfile().unwrap();
    tmp.set_len(needed).unwrap();
    assert!(InflightRegion::from_vmm(tmp, 0, needed, 1, 128).is_err());
}

#[test]
fn the_region_is_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<InflightRegion>();
    send_sync::<QueueInflight>();
    let (region, file) = InflightRegion::create(2, 8).unwrap();
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let q = region.queue(i).unwrap();
            std::thread::spawn(move || q.begin(i + 1).unwrap())
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let stride = queue_region_size(8);
    assert_eq!(read(&file, desc_off(0, 1), 1), [1]);
    assert_eq!(read(&file, desc_off(stride, 2), 1), [1]);
}
