//! The simulation as CI runs it: a fixed set of seeds, determinism, and proof it can fail.

use replicator_sim::{Broken, SimConfig, run};

/// Seeds CI runs; `cargo run --release -p replicator-sim -- --seeds 1000` runs many more.
const CI_SEEDS: u64 = 32;
const CI_STEPS: u64 = 150;

#[test]
fn fixed_seeds_survive_faults_and_crashes_and_converge() {
    let cfg = SimConfig {
        steps: CI_STEPS,
        ..SimConfig::default()
    };
    let (mut applied, mut crashes, mut faults) = (0, 0, 0);
    for seed in 0..CI_SEEDS {
        let report = run(seed, cfg).unwrap_or_else(|failure| panic!("{failure}"));
        applied += report.cycles_applied;
        crashes += report.source_crashes + report.target_crashes;
        faults += report.faults.failures();
    }
    // The runs did something worth checking.
    assert!(applied >= CI_SEEDS * 5, "only {applied} cycles applied");
    assert!(crashes >= CI_SEEDS, "only {crashes} crashes");
    assert!(faults >= CI_SEEDS, "only {faults} sink faults");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let cfg = SimConfig {
        steps: 150,
        ..SimConfig::default()
    };
    let first = run(7, cfg).unwrap_or_else(|failure| panic!("{failure}"));
    let second = run(7, cfg).unwrap_or_else(|failure| panic!("{failure}"));
    assert_eq!(first, second);
    let other = run(8, cfg).unwrap_or_else(|failure| panic!("{failure}"));
    assert_ne!(first.trace_hash, other.trace_hash);
}

#[test]
fn a_target_device_that_loses_flushed_writes_is_reported_with_its_seed() {
    let cfg = SimConfig {
        steps: CI_STEPS,
        broken: Broken::TargetFlushLies,
        ..SimConfig::default()
    };
    let failure = (0..8)
        .find_map(|seed| run(seed, cfg).err())
        .expect("a device that loses flushed writes must break an invariant");
    let text = failure.to_string();
    assert!(text.contains(&format!("seed {}", failure.seed)), "{text}");
    assert!(text.contains(&format!("step {}", failure.step)), "{text}");
    assert!(!failure.last_steps.is_empty());
    // The same seed finds the same failure.
    let again = run(failure.seed, cfg).expect_err("the failure reproduces");
    assert_eq!(again, failure);
}
