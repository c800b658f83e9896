//! The AWS-compatible shadow routes. Each goes through
//! [`ShadowService::handle`](crate::ShadowService::handle), so an HTTP update
//! publishes the same MQTT messages as a device's.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::ApiQuery;
use super::{ApiError, ApiState};
use crate::error::Rejection;
use crate::service::{now_secs, Request};
use crate::topic::{Operation, ShadowKey};

/// `?name=`: a named shadow; absent for the classic shadow.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ShadowName {
    /// The named shadow; omit for the classic shadow.
    pub name: Option<String>,
}

/// A shadow document as AWS answers it (free-form JSON).
#[derive(Debug, Serialize, ToSchema)]
#[schema(value_type = Object)]
pub struct ShadowDocument(serde_json::Value);

#[utoipa::path(get, path = "/things/{thing}/shadow", tag = "shadow",
    params(("thing" = String, Path, description = "Thing name"), ShadowName),
    responses(
        (status = 200, description = "The shadow document (as `/get/accepted`)", body = ShadowDocument),
        (status = 400, description = "Invalid thing or shadow name", body = super::error::ErrorBody),
        (status = 404, description = "No such shadow", body = super::error::ErrorBody),
        (status = 429, description = "Too many requests for this thing", body = super::error::ErrorBody),
    ))]
pub async fn get_shadow(
    State(state): State<ApiState>,
    Path(thing): Path<String>,
    ApiQuery(shadow): ApiQuery<ShadowName>,
    Extension(caller): Extension<Caller>,
) -> Response {
    handle(
        &state,
        &caller,
        thing,
        shadow.name,
        Operation::Get,
        Bytes::new(),
    )
    .await
}

/// The body is read as the update payload whatever its Content-Type
/// (`curl -d` sends form encoding).
#[utoipa::path(post, path = "/things/{thing}/shadow", tag = "shadow",
    params(("thing" = String, Path, description = "Thing name"), ShadowName),
    request_body(content = ShadowDocument, description = "An update: `{\"state\":{\"desired\":..,\"reported\":..}}`"),
    responses(
        (status = 200, description = "The update as accepted (as `/update/accepted`)", body = ShadowDocument),
        (status = 400, description = "Invalid update", body = super::error::ErrorBody),
        (status = 409, description = "Version conflict", body = super::error::ErrorBody),
        (status = 413, description = "Too large", body = super::error::ErrorBody),
        (status = 429, description = "Too many requests for this thing", body = super::error::ErrorBody),
    ))]
pub async fn update_shadow(
    State(state): State<ApiState>,
    Path(thing): Path<String>,
    ApiQuery(shadow): ApiQuery<ShadowName>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return ApiError::Shadow(Rejection::TooLarge).into_response()
        }
        Err(_) => return ApiError::Shadow(Rejection::InvalidJson).into_response(),
    };
    handle(&state, &caller, thing, shadow.name, Operation::Update, body).await
}

#[utoipa::path(delete, path = "/things/{thing}/shadow", tag = "shadow",
    params(("thing" = String, Path, description = "Thing name"), ShadowName),
    responses(
        (status = 200, description = "`{\"version\":N,\"timestamp\":T}`", body = ShadowDocument),
        (status = 400, description = "Invalid thing or shadow name", body = super::error::ErrorBody),
        (status = 404, description = "No such shadow", body = super::error::ErrorBody),
        (status = 429, description = "Too many requests for this thing", body = super::error::ErrorBody),
    ))]
pub async fn delete_shadow(
    State(state): State<ApiState>,
    Path(thing): Path<String>,
    ApiQuery(shadow): ApiQuery<ShadowName>,
    Extension(caller): Extension<Caller>,
) -> Response {
    handle(
        &state,
        &caller,
        thing,
        shadow.name,
        Operation::Delete,
        Bytes::new(),
    )
    .await
}

async fn handle(
    state: &ApiState,
    caller: &Caller,
    thing: String,
    name: Option<String>,
    op: Operation,
    payload: Bytes,
) -> Response {
    let request = Request {
        key: ShadowKey { thing, name },
        op,
        payload,
        client: format!("http:{}", caller.name),
        user_properties: None,
    };
    let answer = state.service.handle(request).await;
    let status = match &answer.result {
        Ok(_) => StatusCode::OK,
        Err(rejection) => {
            StatusCode::from_u16(rejection.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        answer.reply().payload.clone(),
    )
        .into_response()
}

/// `?pageSize=&nextToken=`, as AWS names them.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(rename_all = "camelCase")]
pub struct PageParams {
    /// Results per page (default and maximum from the config).
    pub page_size: Option<usize>,
    /// The `nextToken` of the previous page.
    pub next_token: Option<String>,
}

impl PageParams {
    pub(crate) fn size(&self, state: &ApiState) -> Result<usize, ApiError> {
        match self.page_size {
            None => Ok(state.config.default_page_size.max(1)),
            Some(n) if n >= 1 && n <= state.config.max_page_size => Ok(n),
            Some(_) => Err(ApiError::BadParameter("pageSize out of range")),
        }
    }
}

/// AWS's `ListNamedShadowsForThing` answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamedShadowsPage {
    pub results: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    pub timestamp: i64,
}

#[utoipa::path(get, path = "/api/things/shadow/ListNamedShadowsForThing/{thing}", tag = "shadow",
    params(("thing" = String, Path, description = "Thing name"), PageParams),
    responses(
        (status = 200, description = "Names of the thing's named shadows", body = NamedShadowsPage),
        (status = 400, description = "Invalid thing name or page", body = super::error::ErrorBody),
    ))]
pub async fn list_named_shadows(
    State(state): State<ApiState>,
    Path(thing): Path<String>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<NamedShadowsPage>, ApiError> {
    let limits = state.service.limits();
    limits.check_thing_name(&thing)?;
    let size = page.size(&state)?;
    if let Some(token) = &page.next_token {
        limits
            .check_shadow_name(token)
            .map_err(|_| ApiError::BadParameter("invalid nextToken"))?;
    }
    let store = std::sync::Arc::clone(state.service.store());
    let after = page.next_token.clone();
    let mut names = tokio::task::spawn_blocking(move || {
        store.named_shadows(&thing, after.as_deref(), size + 1)
    })
    .await
    .map_err(|_| ApiError::Task)??;
    let next_token = if names.len() > size {
        names.truncate(size);
        names.last().cloned()
    } else {
        None
    };
    Ok(Json(NamedShadowsPage {
        results: names,
        next_token,
        timestamp: now_secs(),
    }))
}
