//! Put and get throughput of each cache backend (`sink/*`): the local directory, memory, Azurite
//! (Azure Blob) and Garage (S3), the servers started on free local ports for the run. Objects
//! are 4 MiB of realistic blob-like bytes (what a cycle puts) and 16 MiB (multipart uploads).
//! Each put uses a new key, as cycles do.
//!
//! These measure the backends on this machine, over loopback: an emulator's speed is not a cloud
//! service's. Run with `cargo bench -p replicator-benches --bench sink`; `-- --test` runs each
//! once (the servers must be installed: scripts/setup-tools.sh).

// Benchmarks are test code: a failed setup should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use replicator_benches::DataGen;
use replicator_sink::{LocalDirSink, PutMode, Sink, open_sink};
use testkit::{Azurite, Garage, StoreServer};
use tokio::runtime::Runtime;

const SIZES: [(&str, usize); 2] = [("4MiB", 4 << 20), ("16MiB", 16 << 20)];

fn bench_backend(c: &mut Criterion, rt: &Runtime, name: &str, sink: Arc<dyn Sink>) {
    let mut group = c.benchmark_group(format!("sink/{name}"));
    group.sample_size(10);
    let counter = AtomicU64::new(0);
    for (label, size) in SIZES {
        let data = Bytes::from(DataGen::new(size as u64).bytes(size));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("put_{label}"), |b| {
            b.iter(|| {
                let key = format!("bench/put-{}", counter.fetch_add(1, Ordering::Relaxed));
                rt.block_on(sink.put(&key, data.clone(), PutMode::Overwrite))
                    .unwrap();
            })
        });
        let key = format!("bench/get-{size}");
        rt.block_on(sink.put(&key, data.clone(), PutMode::Overwrite))
            .unwrap();
        group.bench_function(format!("get_{label}"), |b| {
            b.iter(|| {
                let got = rt.block_on(sink.get(&key)).unwrap();
                assert_eq!(got.len(), size);
            })
        });
    }
    group.finish();
}

fn bench_sinks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    bench_backend(
        c,
        &rt,
        "local",
        Arc::new(LocalDirSink::create(dir.path()).unwrap()),
    );
    bench_backend(c, &rt, "memory", open_sink("memory://").unwrap());
    let azurite = rt.block_on(Azurite::start()).unwrap();
    bench_backend(c, &rt, "azurite", azurite.sink().unwrap());
    drop(azurite);
    let garage = rt.block_on(Garage::start()).unwrap();
    bench_backend(c, &rt, "garage", garage.sink().unwrap());
    drop(garage);
}

criterion_group!(benches, bench_sinks);
criterion_main!(benches);
