//! The operator API over HTTP (axum): AWS-compatible shadow routes, fleet
//! listing and search, the live change stream (SSE), metrics, health and the
//! OpenAPI document.
//!
//! The binary validates the config with [`check_listen_addr`], binds, and
//! calls [`serve`] (or `axum::serve` on [`router`] itself). Tests call
//! [`router`] and drive it with `tower::ServiceExt::oneshot`.
//!
//! # Layout
//! - [`config`]: `[http]` settings and tokens, the listen-address check.
//! - [`error`]: [`ApiError`], the one error type answered at the edge.
//! - [`auth`]: bearer tokens and the read/write roles.
//! - [`shadow`]: `/things/{thing}/shadow` and `ListNamedShadowsForThing`.
//! - [`changes`]: `/v1/changes` (SSE) and per-shadow catch-up by version.
//! - [`fleet`]: `/v1/things` and `/v1/search`.
//! - [`ops`]: `/metrics`, `/healthz`, `/readyz`, `/openapi.json`.
//! - [`dashboard`]: the web dashboard at `/` and its assets under `/ui/`.

pub mod auth;
pub mod changes;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod fleet;
pub mod ops;
pub mod shadow;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get};
use axum::Router;
use prometheus::Registry;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::metrics::ShadowMetrics;
use crate::service::ShadowService;

pub use auth::{Caller, Role};
pub use config::{check_listen_addr, ApiConfig, ListenError, TokenConfig};
pub use dashboard::MqttWebSocket;
pub use error::ApiError;

/// Everything the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub(crate) service: Arc<ShadowService>,
    pub(crate) config: Arc<ApiConfig>,
    pub(crate) registry: Registry,
    pub(crate) metrics: Option<ShadowMetrics>,
    pub(crate) ready: watch::Receiver<bool>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) subscribers: Arc<Semaphore>,
    pub(crate) mqtt_web_socket: Option<MqttWebSocket>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// `registry` is what `/metrics` renders (register [`ShadowMetrics`] and
    /// the broker's metrics on it); `ready` is the flag `/readyz` reports.
    pub fn new(
        service: Arc<ShadowService>,
        config: ApiConfig,
        registry: Registry,
        ready: watch::Receiver<bool>,
    ) -> ApiState {
        ApiState {
            service,
            subscribers: Arc::new(Semaphore::new(config.max_stream_subscribers)),
            config: Arc::new(config),
            registry,
            metrics: None,
            ready,
            shutdown: CancellationToken::new(),
            mqtt_web_socket: None,
        }
    }

    /// Records HTTP requests and stream subscribers on `metrics`.
    pub fn with_metrics(mut self, metrics: ShadowMetrics) -> ApiState {
        self.metrics = Some(metrics);
        self
    }

    /// Tells the dashboard where the broker's MQTT-over-WebSocket listener
    /// is, for live telemetry.
    pub fn with_mqtt_web_socket(mut self, listener: MqttWebSocket) -> ApiState {
        self.mqtt_web_socket = Some(listener);
        self
    }

    /// Cancelling it ends every open change stream (graceful shutdown waits
    /// for open connections, and a stream never ends by itself). [`serve`]
    /// cancels it when its shutdown future completes.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// The whole operator API.
pub fn router(state: ApiState) -> Router {
    let config = Arc::clone(&state.config);
    let mut open = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/openapi.json", get(ops::openapi))
        .merge(dashboard::routes(config.dashboard));
    let mut protected = Router::new()
        .route(
            "/things/:thing/shadow",
            get(shadow::get_shadow)
                .post(shadow::update_shadow)
                .delete(shadow::delete_shadow),
        )
        .route(
            "/api/things/shadow/ListNamedShadowsForThing/:thing",
            get(shadow::list_named_shadows),
        )
        .route("/v1/changes", get(changes::stream))
        .route(
            "/v1/things/:thing/shadow/changes",
            get(changes::shadow_changes),
        )
        .route("/v1/fleet", get(fleet::fleet_summary))
        .route("/v1/things", get(fleet::list_things))
        .route("/v1/things/:thing", delete(fleet::delete_thing))
        .route("/v1/search", get(fleet::search));
    if config.public_metrics {
        open = open.route("/metrics", get(ops::metrics));
    } else {
        protected = protected.route("/metrics", get(ops::metrics));
    }
    let protected = protected.route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::authorize,
    ));

    let overload = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::Overloaded
        }))
        .load_shed()
        .concurrency_limit(config.max_concurrent_requests.max(1));

    open.merge(protected)
        .layer(middleware::from_fn_with_state(state.clone(), count_request))
        .layer(DefaultBodyLimit::max(config.body_limit_bytes))
        // Bounds the time to the response head; a change stream's body is not timed.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_millis(config.request_timeout_ms.max(1)),
        ))
        .layer(overload)
        .layer(tower::util::option_layer(cors(&config)))
        // A 5xx is logged by `ApiError` when it is a fault (500, with its
        // cause); a 503 (not ready, overloaded, timed out) is an expected
        // answer that `umbra_http_requests_total` counts, and must not
        // write an ERROR line per readiness poll.
        .layer(
            TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .with_state(state)
}

/// CORS for the configured origins; none by default (no layer: a
/// preflight gets 405 like any method a route does not take).
fn cors(config: &ApiConfig) -> Option<CorsLayer> {
    if config.cors_origins.is_empty() {
        return None;
    }
    let origins = match config.cors_origins.iter().any(|o| o == "*") {
        true => AllowOrigin::any(),
        // Checked at start (`check_listen_addr`).
        false => AllowOrigin::list(
            config
                .cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        ),
    };
    let layer = CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
        ])
        .max_age(Duration::from_secs(config.cors_max_age_secs));
    Some(layer)
}

/// Serves the API on `listener` until `shutdown` completes, then ends the
/// change streams and waits for open requests to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let streams = state.shutdown_token();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            streams.cancel();
        })
        .await
}

/// Counts requests by route template (never by thing), method and status.
async fn count_request(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(metrics) = state.metrics.clone() else {
        return next.run(request).await;
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().clone();
    let response = next.run(request).await;
    metrics
        .http_requests
        .with_label_values(&[&route, method.as_str(), response.status().as_str()])
        .inc();
    response
}
