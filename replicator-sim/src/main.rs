//! Runs many seeds of the simulation and reports what they covered and how fast.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use replicator_sim::{Broken, SimConfig, run};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BrokenArg {
    Nothing,
    TargetFlushLies,
}

/// Deterministic simulation of the replicator: seeds of faults, crashes and workloads.
#[derive(Debug, Parser)]
struct Args {
    /// Seeds to run, starting at --first-seed.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Run this one seed only (reproduces a reported failure).
    #[arg(long)]
    seed: Option<u64>,
    /// Steps per seed before the final sync.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// A deliberately broken set-up, to see a failure reported.
    #[arg(long, value_enum, default_value_t = BrokenArg::Nothing)]
    broken: BrokenArg,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = SimConfig {
        steps: args.steps,
        broken: match args.broken {
            BrokenArg::Nothing => Broken::Nothing,
            BrokenArg::TargetFlushLies => Broken::TargetFlushLies,
        },
        ..SimConfig::default()
    };
    let seeds = match args.seed {
        Some(s) => s..s + 1,
        None => args.first_seed..args.first_seed.saturating_add(args.seeds),
    };
    // Only this report reads the real clock, to say how fast simulated cycles go.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    let (mut runs, mut steps, mut shipped, mut applied, mut crashes, mut faults) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for seed in seeds {
        match run(seed, cfg) {
            Ok(r) => {
                runs += 1;
                steps += r.steps;
                shipped += r.cycles_shipped;
                applied += r.cycles_applied;
                crashes += r.source_crashes + r.target_crashes;
                faults += r.faults.failures();
                if args.seed.is_some() {
                    println!("{r:#?}");
                }
            }
            Err(failure) => {
                eprintln!("{failure}");
                eprintln!("(after {runs} seeds passed)");
                return ExitCode::FAILURE;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{runs} seeds passed: {steps} steps, {shipped} cycles shipped, {applied} applied, \
         {crashes} crashes, {faults} sink faults injected; {secs:.1} s real, {:.0} cycles \
         shipped/s, {:.0} steps/s",
        shipped as f64 / secs.max(1e-9),
        steps as f64 / secs.max(1e-9)
    );
    ExitCode::SUCCESS
}
