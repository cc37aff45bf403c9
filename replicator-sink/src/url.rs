//! Sink URLs: which backend a URL selects, and where its settings come from.
//!
//! | URL | Backend |
//! |---|---|
//! | `/path/to/dir`, `file:///path/to/dir` | [`LocalDirSink`] (the directory is created if missing) |
//! | `memory://[prefix]` | a new, empty in-memory store for each call (tests) |
//! | `az://container[/prefix]` | Azure Blob Storage, or Azurite |
//! | `s3://bucket[/prefix]` | S3 or an S3-compatible server |
//!
//! Object-store settings come from the usual environment variables, read by object_store's
//! builders: for Azure `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY` (or a SAS, or
//! a service principal...), `AZURE_STORAGE_ENDPOINT`; for the emulator
//! `AZURE_STORAGE_USE_EMULATOR=true` with `AZURITE_BLOB_STORAGE_URL` (default
//! `http://127.0.0.1:10000`). For S3 `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_ALLOW_HTTP=true` for a plain-HTTP
//! endpoint, and `AWS_CONDITIONAL_PUT=disabled` for servers that ignore `If-None-Match` on puts
//! (Garage; see [`crate::object`]). [`open_sink_with_env`] takes the same settings as a list
//! instead of from the process environment.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::memory::InMemory;

use crate::object::{CreateStrategy, ObjectStoreSink, client_options, retry_config};
use crate::{LocalDirSink, Sink, SinkError};

/// The Azurite account, the same on every installation.
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
/// The Azurite account key, published in the Azurite documentation (not a secret).
const EMULATOR_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Where Azurite listens unless `AZURITE_BLOB_STORAGE_URL` says otherwise.
const EMULATOR_DEFAULT_URL: &str = "http://127.0.0.1:10000";

const SUPPORTED: &str =
    "use a directory path, file:///path, memory://, az://container/prefix or s3://bucket/prefix";

/// Opens a sink from a URL (see the module docs), with object-store settings from the process
/// environment.
pub fn open_sink(url: &str) -> Result<Arc<dyn Sink>, SinkError> {
    let vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| is_store_setting(k))
        .collect();
    open_sink_with_env(url, &vars)
}

/// Opens a sink from a URL, with object-store settings taken from `vars` (environment variable
/// names and values) instead of the process environment.
pub fn open_sink_with_env(
    url: &str,
    vars: &[(String, String)],
) -> Result<Arc<dyn Sink>, SinkError> {
    if url.is_empty() {
        return Err(SinkError::invalid_url(
            url,
            &format!("the sink URL is empty; {SUPPORTED}"),
        ));
    }
    if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(SinkError::invalid_url(
                url,
                "a file URL needs an absolute path: file:///path/to/dir",
            ));
        }
        return Ok(Arc::new(LocalDirSink::create(rest)?));
    }
    match url.split_once("://") {
        None => Ok(Arc::new(LocalDirSink::create(url)?)),
        Some(("memory" | "az" | "s3", _)) => Ok(Arc::new(open_object_sink(url, vars)?)),
        Some((scheme, _)) => Err(SinkError::invalid_url(
            url,
            &format!("unsupported sink scheme `{scheme}`; {SUPPORTED}"),
        )),
    }
}

/// Opens an object-store sink (`memory://`, `az://`, `s3://`) with settings from `vars`,
/// returning the concrete type (for its capabilities).
pub fn open_object_sink(
    url: &str,
    vars: &[(String, String)],
) -> Result<ObjectStoreSink, SinkError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(SinkError::invalid_url(
            url,
            "an object-store URL looks like memory://, az://container/prefix or s3://bucket/prefix",
        ));
    };
    if rest.contains(['?', '#', '@']) {
        return Err(SinkError::invalid_url(
            url,
            "a sink URL takes no query, fragment or credentials; put settings in the environment (AZURE_*, AWS_*)",
        ));
    }
    let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    let shown = |host: &str| {
        if prefix.is_empty() {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}/{prefix}")
        }
    };
    let build_err = |e: object_store::Error, what: &str| {
        SinkError::invalid_url(url, &format!("cannot configure the {what} client: {e}"))
    };
    match scheme {
        "memory" => {
            // memory://prefix: the whole rest is the prefix.
            let prefix = rest.trim_matches('/');
            let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            ObjectStoreSink::new(
                store,
                prefix,
                CreateStrategy::Conditional,
                format!("memory://{prefix}"),
            )
        }
        "az" => {
            check_bucket_name(url, host, "az://container/prefix", "container")?;
            let (builder, endpoint) = azure_builder(vars);
            let store = builder
                .with_container_name(host)
                .build()
                .map_err(|e| build_err(e, "Azure"))?;
            ObjectStoreSink::new(
                Arc::new(store),
                prefix,
                CreateStrategy::Conditional,
                describe(&shown(host), endpoint.as_deref()),
            )
        }
        "s3" => {
            check_bucket_name(url, host, "s3://bucket/prefix", "bucket")?;
            let mut builder = AmazonS3Builder::new()
                .with_retry(retry_config())
                .with_client_options(client_options());
            for (key, value) in vars {
                if key.starts_with("AWS_")
                    && let Ok(config) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
                {
                    builder = builder.with_config(config, value);
                }
            }
            let create = match builder.get_config_value(&AmazonS3ConfigKey::ConditionalPut) {
                Some(v) if v == S3ConditionalPut::Disabled.to_string() => {
                    CreateStrategy::CheckThenPut
                }
                _ => CreateStrategy::Conditional,
            };
            let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
            let store = builder
                .with_bucket_name(host)
                .build()
                .map_err(|e| build_err(e, "S3"))?;
            ObjectStoreSink::new(
                Arc::new(store),
                prefix,
                create,
                describe(&shown(host), endpoint.as_deref()),
            )
        }
        other => Err(SinkError::invalid_url(
            url,
            &format!("`{other}` is not an object-store scheme; {SUPPORTED}"),
        )),
    }
}

/// The Azure builder configured from `vars`, and the endpoint it will use if not the default.
/// The emulator settings are turned into an explicit endpoint and the emulator's account, so
/// that nothing is read from the process environment behind the caller's back (object_store's
/// own emulator mode reads `AZURITE_BLOB_STORAGE_URL` from it).
fn azure_builder(vars: &[(String, String)]) -> (MicrosoftAzureBuilder, Option<String>) {
    let get = |name: &str| {
        vars.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let emulator = get("AZURE_STORAGE_USE_EMULATOR")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
    let mut builder = MicrosoftAzureBuilder::new()
        .with_retry(retry_config())
        .with_client_options(client_options());
    for (key, value) in vars {
        if !key.starts_with("AZURE_") {
            continue;
        }
        if let Ok(config) = key.to_ascii_lowercase().parse::<AzureConfigKey>() {
            if config == AzureConfigKey::UseEmulator {
                continue;
            }
            builder = builder.with_config(config, value);
        }
    }
    if emulator {
        let account = builder
            .get_config_value(&AzureConfigKey::AccountName)
            .unwrap_or_else(|| EMULATOR_ACCOUNT.to_owned());
        if builder
            .get_config_value(&AzureConfigKey::AccessKey)
            .is_none()
        {
            builder = builder.with_access_key(EMULATOR_ACCOUNT_KEY);
        }
        let base = get("AZURITE_BLOB_STORAGE_URL").unwrap_or(EMULATOR_DEFAULT_URL);
        builder = builder
            .with_account(&account)
            .with_endpoint(format!("{}/{account}", base.trim_end_matches('/')))
            .with_allow_http(true);
    }
    let endpoint = builder.get_config_value(&AzureConfigKey::Endpoint);
    (builder, endpoint)
}

fn describe(url: &str, endpoint: Option<&str>) -> String {
    match endpoint {
        // Never show credentials an endpoint URL might carry.
        Some(endpoint) => {
            let shown = match endpoint.split_once("://") {
                Some((scheme, rest)) => match rest.split_once('@') {
                    Some((_, host)) => format!("{scheme}://{host}"),
                    None => endpoint.to_owned(),
                },
                None => endpoint.to_owned(),
            };
            let shown = shown.split('?').next().unwrap_or_default().to_owned();
            format!("{url} at {shown}")
        }
        None => url.to_owned(),
    }
}

fn check_bucket_name(url: &str, name: &str, form: &str, what: &str) -> Result<(), SinkError> {
    if name.is_empty() {
        return Err(SinkError::invalid_url(
            url,
            &format!("the URL names no {what}; write {form}"),
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
    {
        return Err(SinkError::invalid_url(
            url,
            &format!("the {what} name `{name}` may hold only a-z 0-9 - and .; write {form}"),
        ));
    }
    Ok(())
}

fn is_store_setting(name: &str) -> bool {
    name.starts_with("AWS_") || name.starts_with("AZURE_") || name == "AZURITE_BLOB_STORAGE_URL"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SinkErrorKind;

    fn kind_of(url: &str) -> Option<SinkErrorKind> {
        open_sink_with_env(url, &[]).err().map(|e| e.kind())
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        for bad in [
            "",
            "gopher://x",
            "az://",
            "s3:///prefix",
            "s3://Bucket/x",
            "az://c/Prefix",
            "s3://b/a//b",
            "s3://key:secret@bucket/x",
            "az://c/x?sig=1",
            "file://relative",
        ] {
            assert_eq!(kind_of(bad), Some(SinkErrorKind::InvalidConfig), "{bad:?}");
        }
        let msg = open_sink_with_env("s3:///x", &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("s3://bucket/prefix"), "{msg}");
    }

    #[test]
    fn object_store_urls_open_without_io() {
        let vars = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let az = open_object_sink(
            "az://cache/replicas/a",
            &vars(&[
                ("AZURE_STORAGE_USE_EMULATOR", "true"),
                ("AZURITE_BLOB_STORAGE_URL", "http://127.0.0.1:1"),
            ]),
        );
        let az = az.map(|s| s.describe()).unwrap_or_else(|e| e.to_string());
        assert_eq!(
            az,
            "az://cache/replicas/a at http://127.0.0.1:1/devstoreaccount1"
        );

        let s3 = open_object_sink(
            "s3://bucket",
            &vars(&[
                ("AWS_ACCESS_KEY_ID", "id"),
                ("AWS_SECRET_ACCESS_KEY", "secret"),
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
                ("AWS_REGION", "garage"),
                ("AWS_CONDITIONAL_PUT", "disabled"),
            ]),
        );
        match s3 {
            Ok(sink) => {
                assert_eq!(sink.describe(), "s3://bucket at http://127.0.0.1:1");
                assert!(!sink.capabilities().atomic_create);
                assert!(!format!("{sink:?}").contains("secret"));
            }
            Err(e) => panic!("{e}"),
        }
        let mem = open_object_sink("memory://p", &[]).map(|s| s.capabilities().atomic_create);
        assert_eq!(mem.ok(), Some(true));
    }
}
