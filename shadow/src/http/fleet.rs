//! Fleet listing and search, both answered from the in-memory fleet index.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::ApiQuery;
use super::shadow::PageParams;
use super::{ApiError, ApiState};
use crate::fleet::ThingRef;
use crate::search::Query as SearchQuery;

/// One shadow of a listed thing.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShadowVersion {
    /// `null` for the classic shadow.
    pub name: Option<String>,
    pub version: u64,
}

/// A thing's connectivity.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectivityView {
    pub connected: bool,
    /// Last connect or disconnect, epoch milliseconds.
    pub timestamp: i64,
}

/// One thing in the fleet listing.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThingSummary {
    pub thing_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connectivity: Option<ConnectivityView>,
    pub shadows: Vec<ShadowVersion>,
}

/// A page of things.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThingsPage {
    pub things: Vec<ThingSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// A page of search results: each thing with its connectivity and shadows
/// (`shadow`: the classic shadow's `desired`, `reported`, `hasDelta`,
/// `version`, and `name.{shadow}` for named ones).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SearchPage {
    #[schema(value_type = Vec<Object>)]
    pub things: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// The fleet at a glance, from the fleet index.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetSummary {
    /// Things known: with a shadow, or a connectivity on record.
    pub things: usize,
    /// Things whose device is connected now.
    pub connected: usize,
    /// Shadows (classic and named).
    pub shadows: usize,
    /// Shadows whose reported state matches their desired state.
    pub shadows_in_sync: usize,
    /// Shadows with a delta: desired state the device has not reached yet.
    pub shadows_with_delta: usize,
}

#[utoipa::path(get, path = "/v1/fleet", tag = "fleet",
    responses(
        (status = 200, description = "Counts of things and shadows", body = FleetSummary),
        (status = 503, description = "The fleet index is still loading, or (with a shared store) behind the change log", body = super::error::ErrorBody),
    ))]
pub async fn fleet_summary(State(state): State<ApiState>) -> Result<Json<FleetSummary>, ApiError> {
    state.service.fleet_caught_up().await?;
    let size = state.service.fleet().size()?;
    Ok(Json(FleetSummary {
        things: size.things,
        connected: size.connected,
        shadows: size.shadows,
        shadows_in_sync: size.shadows - size.with_delta,
        shadows_with_delta: size.with_delta,
    }))
}

#[utoipa::path(get, path = "/v1/things", tag = "fleet",
    params(PageParams),
    responses(
        (status = 200, description = "Things with at least one shadow, in name order", body = ThingsPage),
        (status = 503, description = "The fleet index is still loading, or (with a shared store) behind the change log", body = super::error::ErrorBody),
    ))]
pub async fn list_things(
    State(state): State<ApiState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<ThingsPage>, ApiError> {
    let size = page.size(&state)?;
    state.service.fleet_caught_up().await?;
    let (things, more) = state
        .service
        .fleet()
        .list(page.next_token.as_deref(), size, summary)?;
    let next_token = more
        .then(|| things.last().map(|t| t.thing_name.clone()))
        .flatten();
    Ok(Json(ThingsPage { things, next_token }))
}

fn summary(thing: ThingRef<'_>) -> ThingSummary {
    ThingSummary {
        thing_name: thing.name().to_string(),
        connectivity: thing.presence().map(|p| ConnectivityView {
            connected: p.connected,
            timestamp: p.last_seen_ms,
        }),
        shadows: thing
            .versions()
            .map(|(name, version)| ShadowVersion {
                name: name.map(str::to_string),
                version,
            })
            .collect(),
    }
}

/// `?q=` and paging.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(rename_all = "camelCase")]
pub struct SearchParams {
    /// The query, e.g. `thingName:sensor-* AND shadow.reported.temp>30`.
    pub q: String,
    pub page_size: Option<usize>,
    pub next_token: Option<String>,
}

#[utoipa::path(get, path = "/v1/search", tag = "fleet",
    params(SearchParams),
    responses(
        (status = 200, description = "Matching things in name order", body = SearchPage),
        (status = 400, description = "Malformed query (`position` says where)", body = super::error::ErrorBody),
        (status = 503, description = "The fleet index is still loading, or (with a shared store) behind the change log", body = super::error::ErrorBody),
    ))]
pub async fn search(
    State(state): State<ApiState>,
    ApiQuery(params): ApiQuery<SearchParams>,
) -> Result<Json<SearchPage>, ApiError> {
    let query = SearchQuery::parse(&params.q)?;
    let size = PageParams {
        page_size: params.page_size,
        next_token: None,
    }
    .size(&state)?;
    state.service.fleet_caught_up().await?;
    let fleet = std::sync::Arc::clone(state.service.fleet());
    let after = params.next_token;
    // A scan over a large fleet takes milliseconds: keep it off the async workers.
    let (things, names, more) = tokio::task::spawn_blocking(move || {
        fleet
            .search(Some(&query), after.as_deref(), size, |t| {
                (t.to_json(), t.name().to_string())
            })
            .map(|(found, more)| {
                let (things, names): (Vec<_>, Vec<_>) = found.into_iter().unzip();
                (things, names, more)
            })
    })
    .await
    .map_err(|_| ApiError::Task)??;
    let next_token = more.then(|| names.last().cloned()).flatten();
    Ok(Json(SearchPage { things, next_token }))
}

/// What `DELETE /v1/things/{thing}` deleted.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletedThingView {
    pub thing_name: String,
    /// The shadows deleted (`null`: the classic shadow).
    pub shadows: Vec<Option<String>>,
    /// Whether its connectivity was known (it is forgotten).
    pub connectivity: bool,
}

/// Deletes a thing: each of its shadows (as `DELETE /things/{thing}/shadow`
/// would, answers to its device and change log entries included), then its
/// connectivity (a `forget` change). Answered once committed.
#[utoipa::path(delete, path = "/v1/things/{thing}", tag = "fleet",
    params(("thing" = String, Path, description = "Thing name")),
    responses(
        (status = 200, description = "What was deleted", body = DeletedThingView),
        (status = 404, description = "No shadow and no connectivity of that name", body = super::error::ErrorBody),
    ))]
pub async fn delete_thing(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(thing): Path<String>,
) -> Result<Json<DeletedThingView>, ApiError> {
    let client = format!("http:{}", caller.name);
    let deleted = state.service.delete_thing(&thing, &client).await?;
    if deleted.is_empty() {
        return Err(ApiError::NoThing(thing));
    }
    Ok(Json(DeletedThingView {
        thing_name: thing,
        shadows: deleted.shadows,
        connectivity: deleted.connectivity,
    }))
}
