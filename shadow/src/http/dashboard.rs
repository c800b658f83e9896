//! The web dashboard at `/`: one page, its script and its style sheet,
//! embedded in the binary (no build step, nothing fetched at run time).
//!
//! The page holds no data of its own. It calls this API like any client,
//! with the token the operator gives it (kept in the tab's session storage),
//! and reads a device's telemetry from the broker over MQTT over WebSocket.
//! `/ui/config.json` tells it where that listener is and whether the API
//! wants a token. The page and its assets need no token: the data does.

use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::ApiState;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Scripts and styles from this origin only, no inline code; the API on this
/// origin, and WebSockets anywhere (the broker's listener is on another
/// port, which an origin-bound rule cannot name).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The broker's MQTT-over-WebSocket listener, as the page reaches it: on
/// the host the page was loaded from, at this port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MqttWebSocket {
    pub port: u16,
    pub tls: bool,
}

/// What the page asks the server before anything else.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PageConfig<'a> {
    /// The API wants a bearer token.
    tokens: bool,
    /// `null` when the broker has no WebSocket listener (no telemetry).
    mqtt_web_socket: Option<MqttWebSocket>,
    /// Where a device's telemetry is published; `{thing}` is its name.
    telemetry_topic: &'a str,
}

/// The dashboard's routes (none when `[http] dashboard = false`).
pub(super) fn routes(enabled: bool) -> Router<ApiState> {
    if !enabled {
        return Router::new();
    }
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/ui/config.json", get(page_config))
}

async fn page_config(State(state): State<ApiState>) -> Response {
    Json(PageConfig {
        tokens: !state.config.tokens.is_empty(),
        mqtt_web_socket: state.mqtt_web_socket,
        telemetry_topic: &state.config.dashboard_telemetry_topic,
    })
    .into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (
                HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            ),
        ],
        body,
    )
        .into_response()
}
