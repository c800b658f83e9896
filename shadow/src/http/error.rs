//! [`ApiError`]: the one error type the operator API answers with.
//!
//! Every error is answered in AWS's error shape,
//! `{"code":N,"message":"...","timestamp":T}` (plus `position` for a malformed
//! search query). Internal failures are logged once here and answered
//! generically.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::error;
use utoipa::ToSchema;

use crate::error::Rejection;
use axum::extract::rejection::QueryRejection;

use crate::fleet::IndexError;
use crate::search::ParseError;
use crate::service::now_secs;
use crate::store::StoreError;

/// Why an API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A shadow request refused with AWS's code and message.
    #[error("{0}")]
    Shadow(#[from] Rejection),
    #[error("missing or unknown bearer token")]
    Unauthorized,
    #[error("token lacks the role this route needs")]
    Forbidden,
    #[error("invalid query: {0}")]
    Query(#[from] ParseError),
    #[error("invalid parameter: {0}")]
    BadParameter(&'static str),
    /// The query string does not fit the route's parameters.
    #[error("{}", .0.body_text())]
    QueryString(#[from] QueryRejection),
    #[error("No thing exists with name: '{0}'")]
    NoThing(String),
    #[error("changes after {since} are no longer retained")]
    Gone { since: u64 },
    #[error("fleet index is loading")]
    IndexLoading,
    #[error("fleet index is behind the change log; try again")]
    IndexBehind,
    #[error("too many change-stream subscribers")]
    TooManySubscribers,
    #[error("server is overloaded")]
    Overloaded,
    #[error("not ready")]
    NotReady,
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("fleet index failed")]
    IndexFailed,
    #[error("metrics encoding: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("background task failed")]
    Task,
}

impl From<IndexError> for ApiError {
    fn from(err: IndexError) -> ApiError {
        match err {
            IndexError::Loading => ApiError::IndexLoading,
            IndexError::Failed => ApiError::IndexFailed,
            IndexError::Behind => ApiError::IndexBehind,
        }
    }
}

/// The error body: AWS's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
    pub timestamp: i64,
    /// Byte offset of a malformed search query's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Shadow(r) => {
                StatusCode::from_u16(r.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::Query(_) | ApiError::BadParameter(_) | ApiError::QueryString(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::NoThing(_) => StatusCode::NOT_FOUND,
            ApiError::Gone { .. } => StatusCode::GONE,
            ApiError::IndexLoading
            | ApiError::IndexBehind
            | ApiError::TooManySubscribers
            | ApiError::Overloaded
            | ApiError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(_) | ApiError::IndexFailed | ApiError::Metrics(_) | ApiError::Task => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            error!(cause = %self, "operator api request failed");
            Rejection::Internal.to_string()
        } else {
            self.to_string()
        };
        let body = ErrorBody {
            code: status.as_u16(),
            message,
            timestamp: now_secs(),
            position: match &self {
                ApiError::Query(e) => Some(e.position),
                _ => None,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::IndexLoading
            | ApiError::IndexBehind
            | ApiError::Overloaded
            | ApiError::TooManySubscribers => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// `axum::extract::Query` whose failures are answered as [`ApiError`]s (the
/// AWS error JSON), not as axum's plain-text rejection.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

#[axum::async_trait]
impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(value) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(value))
    }
}
