//! Parsing and validating request payloads into typed requests.

use serde_json::Value;

use crate::document::SectionPatch;
use crate::error::Rejection;
use crate::json::object_depth;
use crate::limits::Limits;

/// A validated update request.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    pub desired: Option<SectionPatch>,
    pub reported: Option<SectionPatch>,
    pub version: Option<u64>,
    pub client_token: Option<String>,
}

/// A validated get or delete request: both carry only these optional fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlainRequest {
    pub version: Option<u64>,
    pub client_token: Option<String>,
}

/// A payload that was refused, with the clientToken to echo when one could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub rejection: Rejection,
    pub client_token: Option<String>,
}

impl From<Rejection> for Refused {
    fn from(rejection: Rejection) -> Refused {
        Refused {
            rejection,
            client_token: None,
        }
    }
}

/// Parses an `/update` payload.
pub fn parse_update(payload: &[u8], limits: &Limits) -> Result<UpdateRequest, Refused> {
    let mut top = parse_object(payload, limits)?;
    let client_token = client_token(&top, limits)?;
    let refuse = |rejection| Refused {
        rejection,
        client_token: client_token.clone(),
    };
    let version = version(&top).map_err(refuse)?;
    let state = match top.remove("state") {
        None => return Err(refuse(Rejection::MissingState)),
        Some(Value::Object(state)) => state,
        Some(_) => return Err(refuse(Rejection::StateNotObject)),
    };
    if state.keys().any(|k| k != "desired" && k != "reported") {
        return Err(refuse(Rejection::InvalidStateNode));
    }
    let section = |name: &str, not_object: Rejection| match state.get(name) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(SectionPatch::Clear)),
        Some(value @ Value::Object(object)) => {
            if object_depth(value) > limits.max_depth {
                Err(Rejection::TooDeep {
                    max: limits.max_depth,
                })
            } else {
                Ok(Some(SectionPatch::Merge(object.clone())))
            }
        }
        Some(_) => Err(not_object),
    };
    let desired = section("desired", Rejection::DesiredNotObject).map_err(refuse)?;
    let reported = section("reported", Rejection::ReportedNotObject).map_err(refuse)?;
    if desired.is_none() && reported.is_none() {
        return Err(refuse(Rejection::EmptyState));
    }
    Ok(UpdateRequest {
        desired,
        reported,
        version,
        client_token,
    })
}

/// Parses a `/get` or `/delete` payload; an empty payload is an empty request.
pub fn parse_plain(payload: &[u8], limits: &Limits) -> Result<PlainRequest, Refused> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(PlainRequest::default());
    }
    let top = parse_object(payload, limits)?;
    let client_token = client_token(&top, limits)?;
    let version = version(&top).map_err(|rejection| Refused {
        rejection,
        client_token: client_token.clone(),
    })?;
    Ok(PlainRequest {
        version,
        client_token,
    })
}

fn parse_object(
    payload: &[u8],
    limits: &Limits,
) -> Result<serde_json::Map<String, Value>, Refused> {
    if payload.len() > limits.max_payload_bytes {
        return Err(Rejection::TooLarge.into());
    }
    match serde_json::from_slice(payload) {
        Ok(Value::Object(top)) => Ok(top),
        Ok(_) | Err(_) => Err(Rejection::InvalidJson.into()),
    }
}

fn client_token(
    top: &serde_json::Map<String, Value>,
    limits: &Limits,
) -> Result<Option<String>, Refused> {
    match top.get("clientToken") {
        None => Ok(None),
        Some(Value::String(t)) if t.len() <= limits.max_client_token => Ok(Some(t.clone())),
        Some(_) => Err(Rejection::InvalidClientToken.into()),
    }
}

fn version(top: &serde_json::Map<String, Value>) -> Result<Option<u64>, Rejection> {
    match top.get("version") {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(Rejection::InvalidVersion),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(payload: &str) -> Refused {
        match parse_update(payload.as_bytes(), &Limits::default()) {
            Err(r) => r,
            Ok(ok) => panic!("accepted {payload}: {ok:?}"),
        }
    }

    #[test]
    fn client_token_is_kept_on_refusal() {
        let r = refused(r#"{"clientToken":"abc","state":5}"#);
        assert_eq!(r.rejection, Rejection::StateNotObject);
        assert_eq!(r.client_token.as_deref(), Some("abc"));
    }

    #[test]
    fn schema_errors() {
        assert_eq!(refused("[1]").rejection, Rejection::InvalidJson);
        assert_eq!(refused(r#"{"state":{}}"#).rejection, Rejection::EmptyState);
        assert_eq!(
            refused(r#"{"state":{"desired":{}},"version":-1}"#).rejection,
            Rejection::InvalidVersion
        );
        assert_eq!(
            refused(r#"{"state":{"desired":{}},"version":1.5}"#).rejection,
            Rejection::InvalidVersion
        );
        assert_eq!(
            refused(r#"{"state":{"desired":{}},"clientToken":5}"#).rejection,
            Rejection::InvalidClientToken
        );
    }

    #[test]
    fn payload_size_limit() {
        let limits = Limits {
            max_payload_bytes: 16,
            ..Limits::default()
        };
        let r = parse_update(br#"{"state":{"desired":{"a":1}}}"#, &limits);
        assert_eq!(r.map_err(|r| r.rejection), Err(Rejection::TooLarge));
    }

    #[test]
    fn plain_requests() {
        let l = Limits::default();
        assert_eq!(parse_plain(b"", &l), Ok(PlainRequest::default()));
        let p = parse_plain(br#"{"clientToken":"t","version":3}"#, &l);
        assert_eq!(
            p,
            Ok(PlainRequest {
                version: Some(3),
                client_token: Some("t".into())
            })
        );
        assert_eq!(
            parse_plain(b"{", &l).map_err(|r| r.rejection),
            Err(Rejection::InvalidJson)
        );
    }
}
