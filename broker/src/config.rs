//! Umbra's configuration: defaults < TOML file < `UMBRA_*` environment <
//! command-line flags, validated before anything binds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use umbra_shadow::http::{check_listen_addr, ApiConfig, ListenError};
use umbra_shadow::store::PostgresConfig;
use umbra_shadow::{Limits, StoreConfig, Synchronous};

use crate::embedded::{BrokerSettings, ListenerSettings};

/// Everything `umbra` runs with.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the SQLite database lives (created if missing; unused with
    /// `[store] url`).
    pub data_dir: PathBuf,
    /// The operator HTTP API's address.
    pub http_addr: SocketAddr,
    /// The operator HTTP API: tokens, limits, the change stream.
    pub http: ApiConfig,
    /// The embedded MQTT broker: listeners, auth, router sizing.
    pub mqtt: BrokerSettings,
    /// Shadow limits (AWS IoT's defaults).
    pub shadow: Limits,
    /// The shadow store.
    pub store: StoreSettings,
    /// Seconds shutdown may take before connections are cut.
    pub shutdown_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("umbra-data"),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            http: ApiConfig::default(),
            mqtt: BrokerSettings::default(),
            shadow: Limits::default(),
            store: StoreSettings::default(),
            shutdown_grace_secs: 10,
        }
    }
}

/// Settings of the shadow store: SQLite in the data directory, or
/// PostgreSQL when `url` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// A PostgreSQL URL (`postgres://user:password@host/database`): the
    /// store is that database instead of SQLite.
    pub url: Option<String>,
    /// The CA certificates (PEM) that signed the PostgreSQL server's
    /// certificate: Umbra then connects over TLS only and verifies the
    /// server, its name included.
    pub ca_file: Option<PathBuf>,
    /// Lets `url` name another machine, to which Umbra connects without
    /// TLS (only on a network you trust).
    pub allow_plaintext: bool,
    /// PostgreSQL connections for reads (the writer has one more).
    pub readers: usize,
    /// SQLite: `full` (fsync every commit) or `normal` (survives a crash,
    /// not power loss). PostgreSQL commits as the server's
    /// `synchronous_commit` says.
    pub synchronous: Synchronous,
    /// Most updates committed in one transaction.
    pub max_batch: usize,
    /// Requests that may wait for the writer before new ones get 429.
    pub queue_capacity: usize,
    /// Hours the change log is kept.
    pub change_retention_hours: u64,
    /// The most bytes the change log keeps (oldest entries dropped first).
    pub change_retention_bytes: u64,
    /// SQLite: shadows kept decoded in the writer's memory. (PostgreSQL
    /// reads each batch's shadows under their locks: other nodes write too.)
    pub cache_shadows: usize,
}

impl Default for StoreSettings {
    fn default() -> StoreSettings {
        let d = StoreConfig::new("");
        StoreSettings {
            url: None,
            ca_file: None,
            allow_plaintext: false,
            readers: PostgresConfig::new("").readers,
            synchronous: d.synchronous,
            max_batch: d.max_batch,
            queue_capacity: d.queue_capacity,
            change_retention_hours: d.change_retention.as_secs() / 3600,
            change_retention_bytes: d.change_retention_bytes,
            cache_shadows: d.cache_shadows,
        }
    }
}

impl StoreSettings {
    pub fn store_config(&self, path: &Path) -> StoreConfig {
        StoreConfig {
            path: path.to_path_buf(),
            synchronous: self.synchronous,
            max_batch: self.max_batch,
            queue_capacity: self.queue_capacity,
            change_retention: Duration::from_secs(self.change_retention_hours * 3600),
            change_retention_bytes: self.change_retention_bytes,
            cache_shadows: self.cache_shadows,
        }
    }

    /// The PostgreSQL store's settings, when `url` is set.
    pub fn postgres_config(&self) -> Option<PostgresConfig> {
        let url = self.url.as_ref()?;
        Some(PostgresConfig {
            url: url.clone(),
            max_batch: self.max_batch,
            queue_capacity: self.queue_capacity,
            change_retention: Duration::from_secs(self.change_retention_hours * 3600),
            change_retention_bytes: self.change_retention_bytes,
            readers: self.readers,
            resets_presence: true,
            ca_file: self.ca_file.clone(),
        })
    }
}

/// What the command line and environment may override.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub mqtt_addr: Option<SocketAddr>,
    pub ws_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub store_url: Option<String>,
    pub attach: Option<String>,
}

/// A configuration that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Broker(#[from] crate::embedded::ConfigError),
    #[error("http: {0}")]
    Http(#[from] ListenError),
}

impl Config {
    /// Loads the file (if any), applies overrides, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match file {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let mut config: Config =
                    toml::from_str(&text).map_err(|source| ConfigError::Parse {
                        path: path.to_path_buf(),
                        source,
                    })?;
                config.resolve_paths(path.parent().unwrap_or(Path::new("")));
                config
            }
        };
        if let Some(addr) = overrides.mqtt_addr {
            set_addr(&mut config.mqtt.mqtt_v4, addr);
        }
        if let Some(addr) = overrides.ws_addr {
            set_addr(&mut config.mqtt.websocket, addr);
        }
        if let Some(addr) = overrides.http_addr {
            config.http_addr = addr;
        }
        if let Some(dir) = &overrides.data_dir {
            config.data_dir.clone_from(dir);
        }
        if let Some(url) = &overrides.store_url {
            config.store.url = Some(url.clone());
        }
        if let Some(url) = &overrides.attach {
            config.mqtt.attach = Some(url.clone());
        }
        config.validate()?;
        Ok(config)
    }

    /// Makes the file paths a config file names (TLS certificates and keys,
    /// the password file) relative to that file's directory, not to the
    /// directory umbra was started from. `data_dir` stays as it was (it is
    /// also set from the command line and the environment).
    fn resolve_paths(&mut self, base: &Path) {
        let mqtt = &mut self.mqtt;
        let tls = [&mut mqtt.mqtt_v4, &mut mqtt.mqtt_v5, &mut mqtt.websocket]
            .into_iter()
            .flatten()
            .filter_map(|listener| listener.tls.as_mut());
        for files in tls {
            let paths = [
                Some(&mut files.cert),
                Some(&mut files.key),
                files.client_ca.as_mut(),
            ];
            for path in paths.into_iter().flatten() {
                *path = base.join(&*path);
            }
        }
        let attach = &mut mqtt.attach_client;
        for path in [
            &mut mqtt.password_file,
            &mut mqtt.revoked_certificates,
            &mut attach.ca_file,
            &mut attach.cert_file,
            &mut attach.key_file,
        ]
        .into_iter()
        .flatten()
        {
            *path = base.join(&*path);
        }
    }

    /// Checks every setting that could fail later, so nothing binds on bad config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        if self.data_dir.exists() && !self.data_dir.is_dir() {
            return invalid("data_dir", "exists and is not a directory");
        }
        for (field, value) in [
            ("store.max_batch", self.store.max_batch),
            ("store.queue_capacity", self.store.queue_capacity),
            ("store.readers", self.store.readers),
            ("shadow.max_payload_bytes", self.shadow.max_payload_bytes),
            ("shadow.max_state_bytes", self.shadow.max_state_bytes),
            ("shadow.max_depth", self.shadow.max_depth),
            ("shadow.max_thing_name", self.shadow.max_thing_name),
            ("shadow.max_shadow_name", self.shadow.max_shadow_name),
        ] {
            if value == 0 {
                return invalid(field, "must be at least 1");
            }
        }
        if let Some(url) = &self.store.url {
            let tls = self.store.ca_file.is_some();
            if let Err(reason) = PostgresConfig::check_url(url, self.store.allow_plaintext, tls) {
                return invalid("store.url", &reason);
            }
        }
        self.mqtt.validate()?;
        check_listen_addr(&self.http, self.http_addr)?;
        Ok(())
    }

    /// The database file inside the data directory.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("umbra.db")
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

fn set_addr(listener: &mut Option<ListenerSettings>, addr: SocketAddr) {
    match listener {
        Some(l) => l.addr = addr,
        None => {
            *listener = Some(ListenerSettings { addr, tls: None });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("umbra.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn defaults_are_loopback_and_valid() {
        let c = Config::load(None, &Overrides::default()).expect("valid");
        assert_eq!(
            c.mqtt.mqtt_v4.map(|l| l.addr.to_string()).as_deref(),
            Some("127.0.0.1:1883")
        );
        assert_eq!(
            c.mqtt.websocket.map(|l| l.addr.to_string()).as_deref(),
            Some("127.0.0.1:8083")
        );
        assert_eq!(c.data_dir, PathBuf::from("umbra-data"));
    }

    #[test]
    fn paths_in_a_config_file_are_relative_to_it() {
        let (dir, path) = write(
            "[mqtt]\npassword_file = \"passwd\"\n\
             [mqtt.mqtt_v4]\naddr = \"127.0.0.1:1883\"\n\
             tls = { cert = \"tls/cert.pem\", key = \"/abs/key.pem\" }\n",
        );
        let c: Config = toml::from_str(&std::fs::read_to_string(&path).expect("read"))
            .map(|mut c: Config| {
                c.resolve_paths(dir.path());
                c
            })
            .expect("parses");
        assert_eq!(c.mqtt.password_file, Some(dir.path().join("passwd")));
        let tls = c.mqtt.mqtt_v4.and_then(|l| l.tls).expect("tls");
        assert_eq!(tls.cert, dir.path().join("tls/cert.pem"));
        assert_eq!(tls.key, PathBuf::from("/abs/key.pem"));
        // Through load: a missing TLS file is named with the resolved path
        // (the password file exists: an empty one has no users).
        std::fs::write(dir.path().join("passwd"), "").expect("written");
        let err = Config::load(Some(&path), &Overrides::default())
            .expect_err("no such files")
            .to_string();
        assert!(
            err.contains(&dir.path().join("tls/cert.pem").display().to_string()),
            "{err}"
        );
    }

    /// The README's configuration reference is a valid file, and its values
    /// are the defaults it says they are.
    #[test]
    fn the_readme_configuration_reference_parses_to_the_defaults() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## Configuration")
            .nth(1)
            .expect("a configuration section");
        let block = section
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a toml block");
        let config: Config = toml::from_str(block).expect("the reference parses");
        let defaults = Config::default();
        assert_eq!(
            format!("{:?}", config.mqtt.addresses),
            format!("{:?}", defaults.mqtt.addresses)
        );
        assert_eq!(
            config.mqtt.policy.device_role,
            defaults.mqtt.policy.device_role
        );
        assert_eq!(
            config.mqtt.policy.anonymous_role,
            defaults.mqtt.policy.anonymous_role
        );
        assert_eq!(
            config.mqtt.client_id_is_user,
            defaults.mqtt.client_id_is_user
        );
        assert_eq!(
            config.mqtt.password_file_check_ms,
            defaults.mqtt.password_file_check_ms
        );
        assert_eq!(
            format!("{:?}", config.mqtt.connection),
            format!("{:?}", defaults.mqtt.connection)
        );
    }

    #[test]
    fn a_partial_mqtt_table_keeps_the_other_defaults() {
        let (_d, path) = write("[mqtt.edge]\nprivileged_clients = [\"console\"]\n");
        let c = Config::load(Some(&path), &Overrides::default()).expect("valid");
        assert_eq!(
            c.mqtt.websocket.map(|l| l.addr.to_string()).as_deref(),
            Some("127.0.0.1:8083")
        );
        assert!(c.mqtt.edge.privileged_clients.contains("console"));
    }

    #[test]
    fn file_then_overrides() {
        // Data directories inside the test's own folder: a fixed path such
        // as /tmp/x may be a file on the machine that runs the test.
        let dir = tempfile::tempdir().expect("tempdir");
        let (x, y) = (dir.path().join("x"), dir.path().join("y"));
        let (_d, path) = write(&format!(
            "data_dir = {:?}\n[mqtt.mqtt_v4]\naddr = \"127.0.0.1:2000\"\n[shadow]\nmax_depth = 4\n[store]\nsynchronous = \"normal\"\n",
            x.display().to_string()
        ));
        let c = Config::load(Some(&path), &Overrides::default()).expect("valid");
        assert_eq!(c.shadow.max_depth, 4);
        assert_eq!(c.store.synchronous, Synchronous::Normal);
        assert_eq!(c.mqtt.mqtt_v4.as_ref().map(|l| l.addr.port()), Some(2000));
        let o = Overrides {
            mqtt_addr: Some("127.0.0.1:3000".parse().expect("addr")),
            data_dir: Some(y.clone()),
            ..Overrides::default()
        };
        let c = Config::load(Some(&path), &o).expect("valid");
        assert_eq!(c.mqtt.mqtt_v4.as_ref().map(|l| l.addr.port()), Some(3000));
        assert_eq!(c.data_dir, y);
    }

    #[test]
    fn errors_name_the_field() {
        let (_d, path) = write("[shadow]\nmax_depht = 4\n");
        let err = Config::load(Some(&path), &Overrides::default()).expect_err("unknown field");
        assert!(err.to_string().contains("max_depht"), "{err}");
        let (_d, path) = write("[store]\nmax_batch = 0\n");
        let err = Config::load(Some(&path), &Overrides::default()).expect_err("zero");
        assert!(err.to_string().contains("store.max_batch"), "{err}");
        let o = Overrides {
            mqtt_addr: Some("0.0.0.0:1883".parse().expect("addr")),
            ..Overrides::default()
        };
        let err = Config::load(None, &o).expect_err("anonymous remote");
        assert!(err.to_string().contains("mqtt-v4"), "{err}");
        let o = Overrides {
            http_addr: Some("0.0.0.0:8080".parse().expect("addr")),
            ..Overrides::default()
        };
        let err = Config::load(None, &o).expect_err("anonymous remote http");
        assert!(err.to_string().starts_with("http:"), "{err}");
    }
}
