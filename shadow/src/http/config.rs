//! The `[http]` section of Umbra's config, and the check that refuses to
//! expose an unauthenticated API beyond loopback.

use std::net::SocketAddr;

use serde::Deserialize;

use super::auth::Role;

/// Settings of the operator API. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer tokens. With none, every request is anonymous with the write
    /// role, which is only allowed on a loopback address.
    pub tokens: Vec<TokenConfig>,
    /// Allow listening beyond loopback without tokens (anyone may write).
    pub allow_anonymous_remote: bool,
    /// `/metrics` without a token (for scrapers that cannot send one).
    pub public_metrics: bool,
    /// Largest request body, in bytes.
    pub body_limit_bytes: usize,
    /// Time to answer a request (to the response head), in milliseconds.
    pub request_timeout_ms: u64,
    /// Requests handled at once; beyond that requests are shed with 503.
    pub max_concurrent_requests: usize,
    /// Change-stream subscribers at once; beyond that 503.
    pub max_stream_subscribers: usize,
    /// Events one change-stream subscriber may have waiting; a subscriber
    /// further behind is ended with an `end` event (reason `lagged`).
    pub stream_buffer: usize,
    /// Seconds between heartbeat comments on an idle change stream.
    pub heartbeat_secs: u64,
    /// Page size when a request names none.
    pub default_page_size: usize,
    /// Largest page size a request may ask for.
    pub max_page_size: usize,
    /// Origins whose web pages may call the API (CORS), e.g.
    /// `["https://dash.example.com"]`; `["*"]` for any. Empty: none (a page
    /// on another origin cannot read an answer).
    pub cors_origins: Vec<String>,
    /// How long a browser may cache a CORS preflight answer, in seconds.
    pub cors_max_age_secs: u64,
    /// Serve the web dashboard at `/`.
    pub dashboard: bool,
    /// The topic the dashboard charts a device's telemetry from; `{thing}`
    /// is replaced by the device's thing name.
    pub dashboard_telemetry_topic: String,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            tokens: Vec::new(),
            allow_anonymous_remote: false,
            public_metrics: false,
            body_limit_bytes: 256 * 1024,
            request_timeout_ms: 10_000,
            max_concurrent_requests: 1024,
            max_stream_subscribers: 256,
            stream_buffer: 1024,
            heartbeat_secs: 15,
            default_page_size: 25,
            max_page_size: 250,
            cors_origins: Vec::new(),
            cors_max_age_secs: 600,
            dashboard: true,
            dashboard_telemetry_topic: "devices/{thing}/telemetry".into(),
        }
    }
}

/// One bearer token.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it; shows in logs as the request's client.
    pub name: String,
    /// The secret the client sends as `Authorization: Bearer <token>`.
    pub token: String,
    pub role: Role,
}

impl TokenConfig {
    /// A token written as `sha256:<64 hex digits>` is stored as the SHA-256
    /// of the secret (so that the config file does not hold the secret):
    /// `Some(Some(digest))`, or `Some(None)` when the hex is not 32 bytes.
    /// `None` for a token stored as it is.
    pub fn token_hash(&self) -> Option<Option<Vec<u8>>> {
        let hex = self.token.strip_prefix("sha256:")?;
        let bytes: Option<Vec<u8>> = (hex.len() == 64)
            .then(|| {
                (0..32)
                    .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                    .collect()
            })
            .flatten();
        Some(bytes)
    }
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Why the API may not listen where it was asked to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    #[error("no api tokens configured: refusing to listen on non-loopback {addr} (set allow_anonymous_remote to override)")]
    AnonymousRemote { addr: SocketAddr },
    #[error("api token {name:?} is empty")]
    EmptyToken { name: String },
    #[error("api token {name:?}: a hashed token is sha256: and 64 hex digits")]
    BadTokenHash { name: String },
    #[error("cors_origins: {0:?} is not an origin (scheme://host[:port], or \"*\")")]
    BadCorsOrigin(String),
    #[error("dashboard_telemetry_topic: {0:?} is not a topic name (not empty, no + or #)")]
    BadTelemetryTopic(String),
}

/// Checks the config before the listener is bound: without tokens the API
/// may only listen on loopback, unless `allow_anonymous_remote` is set.
pub fn check_listen_addr(config: &ApiConfig, addr: SocketAddr) -> Result<(), ListenError> {
    if let Some(origin) = config.cors_origins.iter().find(|o| !valid_origin(o)) {
        return Err(ListenError::BadCorsOrigin(origin.clone()));
    }
    let topic = &config.dashboard_telemetry_topic;
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err(ListenError::BadTelemetryTopic(topic.clone()));
    }
    if let Some(t) = config.tokens.iter().find(|t| t.token.is_empty()) {
        return Err(ListenError::EmptyToken {
            name: t.name.clone(),
        });
    }
    if let Some(t) = config
        .tokens
        .iter()
        .find(|t| t.token_hash().is_some_and(|hash| hash.is_none()))
    {
        return Err(ListenError::BadTokenHash {
            name: t.name.clone(),
        });
    }
    if config.tokens.is_empty() && !addr.ip().is_loopback() && !config.allow_anonymous_remote {
        return Err(ListenError::AnonymousRemote { addr });
    }
    Ok(())
}

/// `*`, or `scheme://host[:port]` without a path, as a browser sends it in
/// `Origin`.
fn valid_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', ' '])
        && axum::http::HeaderValue::from_str(origin).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn reads_an_http_section() {
        #[derive(Deserialize)]
        struct File {
            http: ApiConfig,
        }
        let text = r#"
            [http]
            heartbeat_secs = 5
            max_page_size = 100
            tokens = [
                { name = "grafana", token = "r", role = "read" },
                { name = "ops", token = "w", role = "write" },
            ]
        "#;
        let file: File = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(file.http.heartbeat_secs, 5);
        assert_eq!(file.http.max_page_size, 100);
        assert_eq!(file.http.stream_buffer, ApiConfig::default().stream_buffer);
        assert_eq!(file.http.tokens[1].role, Role::Write);
        assert!(toml::from_str::<File>("[http]\nheartbeat = 5").is_err());
        assert!(toml::from_str::<File>(
            "[http]\ntokens = [{name=\"a\", token=\"b\", role=\"admin\"}]"
        )
        .is_err());
    }

    #[test]
    fn anonymous_only_on_loopback() {
        let open = ApiConfig::default();
        assert_eq!(check_listen_addr(&open, addr("127.0.0.1:8080")), Ok(()));
        assert_eq!(check_listen_addr(&open, addr("[::1]:8080")), Ok(()));
        assert_eq!(
            check_listen_addr(&open, addr("0.0.0.0:8080")),
            Err(ListenError::AnonymousRemote {
                addr: addr("0.0.0.0:8080")
            })
        );
        let allowed = ApiConfig {
            allow_anonymous_remote: true,
            ..ApiConfig::default()
        };
        assert_eq!(check_listen_addr(&allowed, addr("0.0.0.0:8080")), Ok(()));
        let tokens = ApiConfig {
            tokens: vec![TokenConfig {
                name: "ops".into(),
                token: "s3cret".into(),
                role: Role::Read,
            }],
            ..ApiConfig::default()
        };
        assert_eq!(check_listen_addr(&tokens, addr("10.0.0.1:80")), Ok(()));
        assert!(!format!("{tokens:?}").contains("s3cret"));
    }

    #[test]
    fn the_telemetry_topic_is_a_topic_name() {
        for bad in ["", "devices/+/telemetry", "devices/#"] {
            let config = ApiConfig {
                dashboard_telemetry_topic: bad.into(),
                ..ApiConfig::default()
            };
            assert_eq!(
                check_listen_addr(&config, addr("127.0.0.1:8080")),
                Err(ListenError::BadTelemetryTopic(bad.into()))
            );
        }
        let good = ApiConfig {
            dashboard_telemetry_topic: "things/{thing}/telemetry".into(),
            ..ApiConfig::default()
        };
        assert_eq!(check_listen_addr(&good, addr("127.0.0.1:8080")), Ok(()));
    }
}
