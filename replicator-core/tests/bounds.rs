//! Named limits hold under load: a sink that stalls does not let the reader run ahead of the
//! blobs the ship pipeline may hold (queued plus in flight), however large the delta.
#![allow(clippy::disallowed_methods)] // waits in real time for a real pipeline to settle

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use replicator_core::clock::{SimClock, Timestamp};
use replicator_core::device::{BlockDevice, DeviceError, MemDevice};
use replicator_core::keys::MasterKey;
use replicator_core::progress::NoProgress;
use replicator_core::source::{ShipConfig, Source, ship_cycle};
use replicator_core::tracker::TrackerConfig;
use replicator_sink::{ObjectMeta, PutMode, Sink, SinkError, SinkErrorKind};

/// A device that counts the bytes read from it.
#[derive(Debug)]
struct Counting {
    inner: MemDevice,
    read: Arc<AtomicU64>,
}

impl BlockDevice for Counting {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), DeviceError> {
        self.read.fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.inner.read_at(buf, offset_bytes)
    }
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<(), DeviceError> {
        self.inner.write_at(buf, offset_bytes)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// A sink whose puts never finish (a stalled store); it counts the puts started.
#[derive(Debug, Default)]
struct Stalled {
    puts_started: AtomicU64,
}

#[async_trait]
impl Sink for Stalled {
    async fn put(&self, _key: &str, _data: Bytes, _mode: PutMode) -> Result<(), SinkError> {
        self.puts_started.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>().await;
        Ok(())
    }
    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        Err(SinkError::new(
            SinkErrorKind::NotFound,
            "get",
            key,
            "no such object",
        ))
    }
    async fn list(&self, _prefix: &str) -> Result<Vec<ObjectMeta>, SinkError> {
        Ok(Vec::new())
    }
    async fn delete(&self, _key: &str) -> Result<(), SinkError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "stalled://".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_holds_the_reader_to_the_pipeline_budget() -> anyhow::Result<()> {
    // 64 MiB to ship in 256 KiB blobs: 256 blobs, far more than the pipeline may hold.
    let disk_bytes = 64 << 20;
    let span = 256 << 10;
    let read = Arc::new(AtomicU64::new(0));
    let dev = Counting {
        inner: MemDevice::new("source", disk_bytes),
        read: Arc::clone(&read),
    };
    let dir = tempfile::tempdir()?;
    let (mut source, _) = Source::open(dir.path(), dev, TrackerConfig::default())?;
    let cfg = ShipConfig {
        blob_span_bytes_max: span,
        blobs_queued_max: 2,
        puts_in_flight_max: 3,
        encode_threads: 2,
        read_threads: 2,
        ..ShipConfig::default()
    };
    let sink = Arc::new(Stalled::default());
    let key = MasterKey::from_bytes([9; 32]);
    let clock = SimClock::new(Timestamp::from_unix_ms(1_700_000_000_000));
    let shipping = {
        let sink = Arc::clone(&sink);
        let clock = clock.clone();
        tokio::spawn(async move {
            let _ = ship_cycle(&mut source, sink.as_ref(), &key, &clock, &cfg, &NoProgress).await;
        })
    };
    // Let the pipeline fill up and settle against the stalled sink.
    let mut last = u64::MAX;
    for _ in 0..200 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let now = read.load(Ordering::SeqCst);
        if now == last && sink.puts_started.load(Ordering::SeqCst) > 0 {
            break;
        }
        last = now;
    }
    let read_bytes = read.load(Ordering::SeqCst);
    let puts = sink.puts_started.load(Ordering::SeqCst);
    // In flight (3), queued for the putter (2), one per encoding thread (2) holding the blob it
    // waits to send, the blobs parked ahead of their turn (two per encoder: 4), read groups
    // queued for the encoders (one per encoder: 2) and one per reading thread (2) holding the
    // group it waits to hand on; the jobs queued for the readers are not read yet.
    let budget_blobs = 3 + 2 + 2 + replicator_core::pipeline::parked_max(2) as u64 + 2 + 2;
    assert_eq!(puts, 3, "puts in flight are capped at puts_in_flight_max");
    assert!(
        read_bytes <= budget_blobs * span,
        "the reader ran ahead of a stalled sink: {read_bytes} bytes read, budget {} ({} blobs)",
        budget_blobs * span,
        budget_blobs
    );
    assert!(read_bytes < disk_bytes / 8, "{read_bytes}");
    shipping.abort();
    let _ = shipping.await;
    Ok(())
}
