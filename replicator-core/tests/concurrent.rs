//! Writes go on while cycles ship: every committed cycle must put on the target exactly the
//! source as of that cycle's freeze (copy-on-write of frozen sectors overwritten before the cycle
//! read them).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{DISK_BYTES, World};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A write the writer thread made: the epoch it was marked in, where, and what.
type Logged = (u64, u64, Vec<u8>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cycle_ships_the_disk_as_of_its_freeze_while_writes_continue() -> anyhow::Result<()> {
    let mut w = World::new(21)?;
    let initial_image = w.src_disk.snapshot();
    let log: Arc<Mutex<Vec<Logged>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let tracker = Arc::clone(w.source.tracker());
    let writer = {
        let log = Arc::clone(&log);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut rng = ChaCha8Rng::seed_from_u64(99);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Hot spots make overwrites of frozen, unread sectors likely.
                let len = rng.random_range(1..=32u64) * 512 + rng.random_range(0..2u64) * 100;
                let hot = rng.random_bool(0.5);
                let off = if hot {
                    rng.random_range(0..(1u64 << 20))
                } else {
                    rng.random_range(0..DISK_BYTES - len)
                };
                let mut data = vec![0u8; len as usize];
                rng.fill_bytes(&mut data);
                let epoch = tracker.write_tracked(&data, off)?;
                log.lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push((epoch, off, data));
                n += 1;
                if n.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
            Ok(n)
        })
    };

    let mut checked = 0;
    let mut preserved_any = false;
    for _ in 0..6 {
        let shipped = w.ship().await?;
        preserved_any |= shipped.changed_sectors > 0;
        let r = w.hydrate().await?;
        assert!(r.failed.is_none(), "{:?}", r.failed);
        // The source as of the freeze: the initial image plus every write marked in an epoch up
        // to the frozen one, in the order they were made (one writer, so log order is write order).
        let mut expected = initial_image.clone();
        let writes = log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
        for (epoch, off, data) in writes.iter().filter(|(e, _, _)| *e <= shipped.epoch) {
            let _ = epoch;
            expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        let later = writes.iter().filter(|(e, _, _)| *e > shipped.epoch).count();
        let got = w.tgt_disk.snapshot();
        if got != expected {
            let first = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            anyhow::bail!(
                "cycle {} (epoch {}) differs from the source as of its freeze at byte {first}",
                shipped.cycle,
                shipped.epoch
            );
        }
        checked += 1;
        let _ = later;
    }
    stop.store(true, Ordering::SeqCst);
    let writes = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    assert!(writes > 100, "the writer made only {writes} writes");
    assert!(preserved_any);
    assert_eq!(checked, 6);

    // With writes stopped, one more cycle makes the target equal the live source.
    w.ship().await?;
    w.hydrate().await?;
    assert!(w.identical());
    Ok(())
}
