//! Bearer-token authentication and the two roles: `read` for GET routes,
//! `write` (which includes read) for the routes that change shadows.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;

use super::{ApiError, ApiState};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
}

/// Who made a request; handlers find it in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name, or `anonymous` when no tokens are configured.
    pub name: String,
    pub role: Role,
}

/// Authenticates the request and checks its role: GET and HEAD need `read`,
/// everything else `write`.
pub async fn authorize(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let needed = if matches!(*request.method(), Method::GET | Method::HEAD) {
        Role::Read
    } else {
        Role::Write
    };
    let caller = authenticate(&state, request.headers())?;
    if caller.role < needed {
        return Err(ApiError::Forbidden);
    }
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let tokens = &state.config.tokens;
    if tokens.is_empty() {
        return Ok(Caller {
            name: "anonymous".into(),
            role: Role::Write,
        });
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or(ApiError::Unauthorized)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, presented.as_bytes());
    tokens
        .iter()
        .find(|t| match t.token_hash() {
            Some(hash) => hash.as_deref() == Some(digest.as_ref()),
            None => same_secret(t.token.as_bytes(), presented.as_bytes()),
        })
        .map(|t| Caller {
            name: t.name.clone(),
            role: t.role,
        })
        .ok_or(ApiError::Unauthorized)
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_may_be_stored_as_its_sha256() {
        use super::super::TokenConfig;
        // printf %s s3cret | sha256sum
        let hashed = TokenConfig {
            name: "ops".into(),
            token: "sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0".into(),
            role: Role::Write,
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, b"s3cret");
        let stored = hashed.token_hash().expect("a hash").expect("valid hex");
        assert_eq!(stored.as_slice(), digest.as_ref());
        let plain = TokenConfig {
            token: "s3cret".into(),
            ..hashed.clone()
        };
        assert!(plain.token_hash().is_none());
        let bad = TokenConfig {
            token: "sha256:xyz".into(),
            ..hashed
        };
        assert_eq!(bad.token_hash(), Some(None));
    }

    #[test]
    fn secrets_compare() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
        assert!(Role::Write > Role::Read);
    }
}
