//! Garage, an S3-compatible object store, from the tool cache (built by
//! `scripts/setup-tools.sh` with `cargo install garage`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use replicator_sink::conformance::Capabilities;
use tempfile::TempDir;

use crate::process::ServerProcess;
use crate::{STARTUP_TIMEOUT, StoreServer, free_port, random_hex, tool_cache, wait_until_serving};

/// The Garage release the tests run (`scripts/setup-tools.sh` installs this one).
pub const GARAGE_VERSION: &str = "2.5.0";
/// The bucket every sink of the handle uses.
pub const BUCKET: &str = "replicator";
/// The S3 region Garage is configured with (object_store's default region is refused).
const REGION: &str = "garage";

/// A running single-node Garage with a bucket and an access key allowed on it.
#[derive(Debug)]
pub struct Garage {
    server: Option<ServerProcess>,
    s3_port: u16,
    key_id: String,
    secret: String,
    dir: TempDir,
}

impl Garage {
    /// Where `scripts/setup-tools.sh` installs the binary:
    /// `${REPLICATOR_TOOLS:-~/.cache/replicator-tools}/garage-<version>/bin/garage`.
    pub fn binary() -> PathBuf {
        tool_cache()
            .join(format!("garage-{GARAGE_VERSION}"))
            .join("bin/garage")
    }

    /// Starts Garage on free ports with its metadata and data in a new temporary directory, and
    /// waits until a sink on its bucket answers.
    ///
    /// `garage server --single-node --default-bucket` (Garage 2.x) assigns the one-node layout
    /// and creates the key and the bucket from `GARAGE_DEFAULT_*` variables, idempotently, so a
    /// restart on the same data needs nothing else.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = Self::binary();
        if !binary.exists() {
            anyhow::bail!(
                "Garage {GARAGE_VERSION} is not installed ({} is missing): run scripts/setup-tools.sh (it builds Garage with cargo install, ~30 minutes the first time)",
                binary.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("garage-").tempdir()?;
        let s3_port = free_port()?;
        let rpc_port = free_port()?;
        let config = format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
"#,
            dir = dir.path().display(),
            secret = random_hex(32),
        );
        std::fs::write(dir.path().join("garage.toml"), config)?;
        let mut garage = Garage {
            server: None,
            s3_port,
            key_id: format!("GK{}", random_hex(12)),
            secret: random_hex(32),
            dir,
        };
        garage.launch().await?;
        Ok(garage)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(Self::binary());
        command
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=warn");
        let mut server =
            ServerProcess::spawn("garage", command, &self.dir.path().join("garage.log"))?;
        server.wait_for_port(self.s3_port, STARTUP_TIMEOUT).await?;
        let sink = self.sink()?;
        wait_until_serving(&mut server, sink.as_ref()).await?;
        self.server = Some(server);
        Ok(())
    }
}

impl StoreServer for Garage {
    fn name(&self) -> &'static str {
        "garage"
    }

    fn url(&self) -> String {
        format!("s3://{BUCKET}")
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.s3_port),
            ),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            // Garage ignores If-None-Match on puts: creates must check first.
            ("AWS_CONDITIONAL_PUT", "disabled".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Creates check, then put: not atomic (see `replicator_sink::object`).
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_create: false,
        }
    }

    /// Garage writes metadata (sqlite) and data before it answers a put.
    fn crash_loss_window(&self) -> Duration {
        Duration::ZERO
    }

    fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(ServerProcess::pid)
    }

    fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch().await
    }
}
