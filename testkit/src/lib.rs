//! Test support: real object-storage servers for the sink tests.
//!
//! [`Azurite::start`] and [`Garage::start`] start a server on 127.0.0.1 on a free port, in a
//! temporary directory, wait until it serves requests, create a container or bucket and
//! credentials, and return a handle. The handle gives the sink URL and the environment variables
//! a process needs to reach it ([`StoreServer::url`], [`StoreServer::env`]), opens sinks directly
//! from those without touching the process environment ([`StoreServer::sink`]), and can kill and
//! restart the server on the same data ([`StoreServer::kill`], [`StoreServer::restart`]).
//! Dropping the handle kills the server by its PID and removes its directory.
//!
//! The servers are not downloaded here: `scripts/setup-tools.sh` installs them. A missing tool
//! is an error that names that script, never a skipped test.

// Test support waits on real servers in real time.
#![allow(clippy::disallowed_methods)]

mod azurite;
mod garage;
mod process;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use replicator_sink::conformance::Capabilities;
use replicator_sink::url::{open_object_sink, open_sink_with_env};
use replicator_sink::{ObjectStoreSink, Sink};

pub use azurite::Azurite;
pub use garage::{GARAGE_VERSION, Garage};

/// The longest a server may take to start serving requests.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running object-storage server for tests.
pub trait StoreServer {
    /// A short name for messages: `azurite`, `garage`.
    fn name(&self) -> &'static str;
    /// The sink URL of the container or bucket, e.g. `az://replicator`.
    fn url(&self) -> String;
    /// The environment variables a process needs to open [`StoreServer::url`].
    fn env(&self) -> Vec<(String, String)>;
    /// What sinks on this server promise.
    fn capabilities(&self) -> Capabilities;
    /// How long after acknowledging a put the server may still lose it to a crash (a kill).
    /// Real stores make a put durable before acknowledging it; an emulator may not.
    fn crash_loss_window(&self) -> Duration;
    /// The server's process id while it runs.
    fn pid(&self) -> Option<u32>;
    /// Kills the server (SIGKILL, like a crash); the handle keeps its data for a restart.
    fn kill(&mut self);
    /// Starts the server again on the same port and data, and waits until it serves requests.
    fn restart(&mut self) -> impl Future<Output = anyhow::Result<()>>;

    /// A sink on the container or bucket under `prefix` (empty for none), opened from
    /// [`StoreServer::env`] like a process would, without touching this process's environment.
    fn sink_at(&self, prefix: &str) -> anyhow::Result<Arc<dyn Sink>> {
        Ok(open_sink_with_env(
            &url_with(&self.url(), prefix),
            &self.env(),
        )?)
    }

    /// A sink on the whole container or bucket.
    fn sink(&self) -> anyhow::Result<Arc<dyn Sink>> {
        self.sink_at("")
    }

    /// The concrete object-store sink under `prefix`, e.g. to change its create strategy.
    fn object_sink(&self, prefix: &str) -> anyhow::Result<ObjectStoreSink> {
        Ok(open_object_sink(
            &url_with(&self.url(), prefix),
            &self.env(),
        )?)
    }
}

fn url_with(url: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        url.to_owned()
    } else {
        format!("{url}/{prefix}")
    }
}

/// The repository's root (where `tools/` and `scripts/` are).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The cache of built tools: `$REPLICATOR_TOOLS`, or `~/.cache/replicator-tools`.
pub fn tool_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("REPLICATOR_TOOLS").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("replicator-tools")
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// `n` random bytes as hex, from the standard library's per-process random hash keys (enough
/// for test credentials; no extra dependency).
fn random_hex(n: usize) -> String {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    let mut out = String::with_capacity(2 * n);
    let mut i = 0u64;
    while out.len() < 2 * n {
        for byte in state.hash_one(i).to_le_bytes() {
            if out.len() < 2 * n {
                out.push_str(&format!("{byte:02x}"));
            }
        }
        i += 1;
    }
    out
}

/// Waits until `sink` answers a listing, the server process still running. The error says what
/// the server last logged.
async fn wait_until_serving(
    server: &mut process::ServerProcess,
    sink: &dyn Sink,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = server.exited() {
            anyhow::bail!(
                "{} exited during startup ({status}); its log ends with:\n{}",
                server.name(),
                server.log_tail()
            );
        }
        match sink.list("").await {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > STARTUP_TIMEOUT => anyhow::bail!(
                "{} did not serve requests within {STARTUP_TIMEOUT:?}: {e}; its log ends with:\n{}",
                server.name(),
                server.log_tail()
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_has_the_asked_length() {
        let a = random_hex(32);
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(32));
    }
}
