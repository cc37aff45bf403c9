//! The harness end to end through real object stores: Azurite (Azure Blob) and Garage (S3),
//! started by the test on free local ports. A missing server is a failure that says how to
//! install it (scripts/setup-tools.sh), never a skip.

use std::process::{Command, Output};

use testkit::{Azurite, Garage, StoreServer};

fn harness(args: &[&str], server: &impl StoreServer) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args)
        .envs(server.env())
        .output()?)
}

fn ok(args: &[&str], server: &impl StoreServer) -> anyhow::Result<String> {
    let o = harness(args, server)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    anyhow::ensure!(
        o.status.success(),
        "harness {args:?} via {} failed ({:?}):\n{text}",
        server.name(),
        o.status.code()
    );
    Ok(text)
}

/// The demo, then a separate-process ship / hydrate / verify, through `server`.
fn replicate_through(server: &impl StoreServer) -> anyhow::Result<()> {
    let url = server.url();
    let out = ok(
        &[
            "demo",
            "--size",
            "32M",
            "--churn",
            "2M",
            "--rounds",
            "2",
            "--quiet",
            "--sink",
            &format!("{url}/demo"),
        ],
        server,
    )?;
    assert!(out.contains("byte-identical"), "{out}");
    assert!(
        out.contains("put") && out.contains("get"),
        "cache metrics printed: {out}"
    );

    let dir = tempfile::tempdir()?;
    let p = |name: &str| dir.path().join(name).display().to_string();
    for img in ["src", "tgt"] {
        std::fs::File::create(dir.path().join(img))?.set_len(8 << 20)?;
    }
    let sink = format!("{url}/cli");
    let (src, tgt, key, ss, ts) = (p("src"), p("tgt"), p("key"), p("ss"), p("ts"));
    let write = |extra: &[&str]| {
        let mut args = vec!["write", "--source", &src, "--state", &ss];
        args.extend_from_slice(extra);
        ok(&args, server)
    };
    let ship = || {
        ok(
            &[
                "ship",
                "--source",
                &src,
                "--sink",
                &sink,
                "--state",
                &ss,
                "--key-file",
                &key,
            ],
            server,
        )
    };
    let hydrate = || {
        ok(
            &[
                "hydrate",
                "--target",
                &tgt,
                "--sink",
                &sink,
                "--state",
                &ts,
                "--key-file",
                &key,
            ],
            server,
        )
    };
    ok(&["keygen", "--out", &key], server)?;
    write(&["--bytes", "2M"])?;
    ship()?;
    hydrate()?;
    write(&["--bytes", "1M", "--seed", "9", "--pattern", "postgres"])?;
    ship()?;
    let out = hydrate()?;
    assert!(out.contains("applied cycle 2"), "{out}");
    let out = ok(
        &["verify", "--source", &p("src"), "--target", &p("tgt")],
        server,
    )?;
    assert!(out.contains("identical"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_and_separate_processes_replicate_through_azurite() -> anyhow::Result<()> {
    let server = Azurite::start().await?;
    tokio::task::spawn_blocking(move || replicate_through(&server)).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_and_separate_processes_replicate_through_garage() -> anyhow::Result<()> {
    let server = Garage::start().await?;
    tokio::task::spawn_blocking(move || replicate_through(&server)).await?
}
