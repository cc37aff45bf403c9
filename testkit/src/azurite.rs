//! Azurite, the Azure Blob Storage emulator, from `tools/node_modules` (pinned in
//! `tools/package.json`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use replicator_sink::conformance::Capabilities;
use sha2::Sha256;
use tempfile::TempDir;

use crate::process::ServerProcess;
use crate::{STARTUP_TIMEOUT, StoreServer, free_port, wait_until_serving};

/// The emulator's account and its published key.
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The REST API version used to create the container.
const API_VERSION: &str = "2021-08-06";
/// How often Azurite saves its metadata (LokiJS autosave); a kill loses newer puts.
const AZURITE_SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// The container every sink of the handle uses.
pub const CONTAINER: &str = "replicator";

/// A running Azurite blob service with a container.
#[derive(Debug)]
pub struct Azurite {
    server: Option<ServerProcess>,
    port: u16,
    dir: TempDir,
}

impl Azurite {
    /// The `azurite-blob` script `npm ci --prefix tools` installs.
    pub fn binary() -> PathBuf {
        crate::repo_root().join("tools/node_modules/.bin/azurite-blob")
    }

    /// Starts Azurite on a free port with its data in a new temporary directory, creates the
    /// container, and waits until a sink on it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = Self::binary();
        if !binary.exists() {
            anyhow::bail!(
                "Azurite is not installed ({} is missing): run scripts/setup-tools.sh (or `npm ci --prefix tools`; needs Node.js 20+)",
                binary.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("azurite-").tempdir()?;
        let mut azurite = Azurite {
            server: None,
            port: free_port()?,
            dir,
        };
        azurite.launch().await?;
        Ok(azurite)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let mut command = Command::new(Self::binary());
        command
            .args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(self.port.to_string())
            .arg("--location")
            .arg(&data)
            .args([
                "--silent",
                "--loose",
                "--skipApiVersionCheck",
                "--disableTelemetry",
            ]);
        let mut server =
            ServerProcess::spawn("azurite", command, &self.dir.path().join("azurite.log"))?;
        server.wait_for_port(self.port, STARTUP_TIMEOUT).await?;
        create_container(&self.endpoint(), CONTAINER)
            .await
            .with_context(|| format!("creating container `{CONTAINER}` in Azurite"))?;
        let sink = self.sink()?;
        wait_until_serving(&mut server, sink.as_ref()).await?;
        self.server = Some(server);
        Ok(())
    }
}

impl StoreServer for Azurite {
    fn name(&self) -> &'static str {
        "azurite"
    }

    fn url(&self) -> String {
        format!("az://{CONTAINER}")
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()),
            ("AZURITE_BLOB_STORAGE_URL".into(), self.endpoint()),
        ]
    }

    /// Azure applies `If-None-Match: *` on a put atomically, and Azurite does too.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_create: true,
        }
    }

    /// Azurite keeps blob metadata in LokiJS, which it saves every 5 s (`autosaveInterval` in
    /// `LokiBlobMetadataStore`): a kill loses what was acknowledged since the last save.
    fn crash_loss_window(&self) -> Duration {
        AZURITE_SAVE_INTERVAL
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

/// Creates a container with a Shared Key signed `PUT ...?restype=container` (object_store
/// cannot create containers). An existing container is fine.
async fn create_container(endpoint: &str, name: &str) -> anyhow::Result<()> {
    let date = http_date(SystemTime::now());
    // Path-style URLs put the account in the path, so the signed resource names it twice.
    let resource = format!("/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container");
    // The verb, then eleven empty standard headers (a zero Content-Length is signed empty).
    let string_to_sign = format!(
        "PUT\n{}x-ms-date:{date}\nx-ms-version:{API_VERSION}\n{resource}",
        "\n".repeat(11)
    );
    let key = BASE64.decode(ACCOUNT_KEY)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)
        .map_err(|e| anyhow::anyhow!("bad emulator key: {e}"))?;
    mac.update(string_to_sign.as_bytes());
    let signature = BASE64.encode(mac.finalize().into_bytes());
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?
        .put(format!("{endpoint}/{ACCOUNT}/{name}?restype=container"))
        .header("x-ms-date", date)
        .header("x-ms-version", API_VERSION)
        .header("Authorization", format!("SharedKey {ACCOUNT}:{signature}"))
        .body(Vec::new())
        .send()
        .await?;
    let status = response.status();
    // 201 Created, or 409 ContainerAlreadyExists after a restart.
    if status.as_u16() == 201 || status.as_u16() == 409 {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    anyhow::bail!("Azurite answered {status}: {body}")
}

/// An RFC 1123 date (`Sun, 06 Nov 1994 08:49:37 GMT`), as `x-ms-date` wants.
fn http_date(time: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month (1-12) and day of the month of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_are_rfc_1123() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_208_000); // 2024-02-29 12:00:00
        assert_eq!(http_date(t), "Thu, 29 Feb 2024 12:00:00 GMT");
    }
}
