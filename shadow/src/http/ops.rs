//! Operations routes: `/metrics`, `/healthz`, `/readyz` and `/openapi.json`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus::{Encoder, TextEncoder};
use utoipa::OpenApi;

use super::{ApiError, ApiState};

/// Prometheus text format of the whole registry (the shadow service's
/// metrics and whatever else the binary registered). Needs the `read` role
/// unless `public_metrics` is set.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    if let (Some(metrics), Ok(size)) = (&state.metrics, state.service.fleet().size()) {
        metrics.fleet_index_shadows.set(size.shadows as i64);
        metrics.fleet_index_bytes.set(size.bytes as i64);
        metrics.fleet_things.set(size.things as i64);
        metrics.fleet_things_connected.set(size.connected as i64);
        metrics.fleet_shadows_with_delta.set(size.with_delta as i64);
    }
    let encoder = TextEncoder::new();
    let mut text = Vec::new();
    encoder.encode(&state.registry.gather(), &mut text)?;
    Ok((
        [(header::CONTENT_TYPE, encoder.format_type().to_string())],
        text,
    )
        .into_response())
}

/// 200 while the server serves. No token needed.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "Serving", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// 200 once the binary has flagged the server ready, 503 before. No token needed.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "Ready", body = String),
        (status = 503, description = "Not ready yet", body = super::error::ErrorBody),
    ))]
pub async fn readyz(State(state): State<ApiState>) -> Result<(StatusCode, &'static str), ApiError> {
    if *state.ready.borrow() {
        Ok((StatusCode::OK, "ready"))
    } else {
        Err(ApiError::NotReady)
    }
}

/// The OpenAPI 3 document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "Umbra operator API", description = "Device shadows (AWS IoT compatible), fleet search, live change stream, metrics. \
        Routes other than /healthz, /readyz and /openapi.json need `Authorization: Bearer <token>` when tokens are configured: \
        GET needs the read role, POST and DELETE the write role."),
    paths(
        super::shadow::get_shadow,
        super::shadow::update_shadow,
        super::shadow::delete_shadow,
        super::shadow::list_named_shadows,
        super::changes::stream,
        super::changes::shadow_changes,
        super::fleet::fleet_summary,
        super::fleet::list_things,
        super::fleet::delete_thing,
        super::fleet::search,
        metrics,
        healthz,
        readyz,
        openapi,
    ),
    components(schemas(super::error::ErrorBody)),
    tags(
        (name = "shadow", description = "AWS IoT Device Shadow compatible"),
        (name = "changes", description = "Change stream and catch-up"),
        (name = "fleet", description = "Fleet listing and search"),
        (name = "ops", description = "Metrics and health"),
    )
)]
pub struct ApiDoc;

/// No token needed.
#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "This document", body = Object)))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
