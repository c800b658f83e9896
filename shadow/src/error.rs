//! Why a shadow request is refused: each reason has AWS's code and message.

/// A refused request. The code and message are what the device sees on the
/// `/rejected` topic (or the HTTP status and body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("Invalid JSON")]
    InvalidJson,
    #[error("Missing required node: state")]
    MissingState,
    #[error("State node must be an object")]
    StateNotObject,
    #[error("Desired node must be an object")]
    DesiredNotObject,
    #[error("Reported node must be an object")]
    ReportedNotObject,
    #[error("State contains an invalid node")]
    InvalidStateNode,
    #[error("State node must contain desired or reported")]
    EmptyState,
    #[error("Invalid version")]
    InvalidVersion,
    #[error("Invalid clientToken")]
    InvalidClientToken,
    #[error("JSON contains too many levels of nesting; maximum is {max}")]
    TooDeep { max: usize },
    #[error("Invalid thing name")]
    InvalidThingName,
    #[error("Invalid shadow name")]
    InvalidShadowName,
    #[error("Unauthorized")]
    Unauthorized,
    #[error("Forbidden")]
    Forbidden,
    #[error("No shadow exists with name: '{name}'")]
    NotFound { name: String },
    #[error("Version conflict")]
    VersionConflict,
    #[error("The payload exceeds the maximum size allowed")]
    TooLarge,
    #[error("Too Many Requests")]
    Throttled,
    #[error("Internal service failure")]
    Internal,
}

impl Rejection {
    /// The AWS error code (an HTTP status).
    pub fn code(&self) -> u16 {
        match self {
            Rejection::Unauthorized => 401,
            Rejection::Forbidden => 403,
            Rejection::NotFound { .. } => 404,
            Rejection::VersionConflict => 409,
            Rejection::TooLarge => 413,
            Rejection::Throttled => 429,
            Rejection::Internal => 500,
            _ => 400,
        }
    }
}
