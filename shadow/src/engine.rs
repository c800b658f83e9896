//! The shadow rules as one pure function: a command applied to the stored
//! shadow gives the shadow to store and the outcome to answer with.

use std::sync::Arc;

use crate::document::{ShadowState, Timestamp};
use crate::error::Rejection;
use crate::limits::Limits;
use crate::request::{PlainRequest, Refused, UpdateRequest};
use crate::topic::{Operation, ShadowKey};

/// A shadow as stored. A deleted shadow keeps its version so that
/// recreating it continues the numbering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredShadow {
    /// Shared with the outcome's snapshots: a state is copied once per update, when it changes.
    pub state: Arc<ShadowState>,
    pub version: u64,
    pub deleted: bool,
    pub updated_at: Timestamp,
}

impl StoredShadow {
    fn live(stored: Option<&StoredShadow>) -> Option<&StoredShadow> {
        stored.filter(|s| !s.deleted)
    }
}

/// A validated request for one shadow.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Update(UpdateRequest),
    Get(PlainRequest),
    Delete(PlainRequest),
    /// A request refused before it could be applied (invalid, throttled). It
    /// still goes through the store's queue, so that its answer leaves in
    /// arrival order with the answers of the requests around it.
    Refused {
        op: Operation,
        refused: Refused,
    },
}

impl Command {
    pub fn operation(&self) -> Operation {
        match self {
            Command::Update(_) => Operation::Update,
            Command::Get(_) => Operation::Get,
            Command::Delete(_) => Operation::Delete,
            Command::Refused { op, .. } => *op,
        }
    }

    pub fn client_token(&self) -> Option<&str> {
        match self {
            Command::Update(u) => u.client_token.as_deref(),
            Command::Get(p) | Command::Delete(p) => p.client_token.as_deref(),
            Command::Refused { refused, .. } => refused.client_token.as_deref(),
        }
    }

    fn version(&self) -> Option<u64> {
        match self {
            Command::Update(u) => u.version,
            Command::Get(p) | Command::Delete(p) => p.version,
            Command::Refused { .. } => None,
        }
    }
}

/// A shadow's state at one version, as `/update/documents` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub state: Arc<ShadowState>,
    pub version: u64,
}

/// What an accepted command did.
// Outcomes are moved, not copied, once per request; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Updated {
        /// `None` when the update created the shadow (or recreated a
        /// deleted one).
        previous: Option<Snapshot>,
        current: Snapshot,
        timestamp: Timestamp,
    },
    Read {
        current: Snapshot,
        timestamp: Timestamp,
    },
    Deleted {
        version: u64,
        timestamp: Timestamp,
    },
}

impl Outcome {
    /// The shadow's version after the command.
    pub fn version(&self) -> u64 {
        match self {
            Outcome::Updated { current, .. } | Outcome::Read { current, .. } => current.version,
            Outcome::Deleted { version, .. } => *version,
        }
    }
}

/// The result of applying a command: what to store (if anything changed) and the outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub store: Option<StoredShadow>,
    pub outcome: Outcome,
}

/// Applies `command` to the stored shadow `stored` at time `now`.
pub fn apply(
    key: &ShadowKey,
    stored: Option<&StoredShadow>,
    command: &Command,
    now: Timestamp,
    limits: &Limits,
) -> Result<Applied, Rejection> {
    if let Command::Refused { refused, .. } = command {
        return Err(refused.rejection.clone());
    }
    let live = StoredShadow::live(stored);
    let current_version = stored.map_or(0, |s| s.version);
    let not_found = || Rejection::NotFound {
        name: key.display_name().to_string(),
    };
    if matches!(command, Command::Get(_) | Command::Delete(_)) && live.is_none() {
        return Err(not_found());
    }
    if command.version().is_some_and(|v| v != current_version) {
        return Err(Rejection::VersionConflict);
    }
    match command {
        Command::Update(request) => {
            let before = live.map(|s| Arc::clone(&s.state));
            let mut state = before.as_deref().cloned().unwrap_or_default();
            if let Some(patch) = &request.desired {
                ShadowState::apply(&mut state.desired, patch, now);
            }
            if let Some(patch) = &request.reported {
                ShadowState::apply(&mut state.reported, patch, now);
            }
            if state.state_size() > limits.max_state_bytes {
                return Err(Rejection::TooLarge);
            }
            let version = current_version + 1;
            let state = Arc::new(state);
            Ok(Applied {
                store: Some(StoredShadow {
                    state: Arc::clone(&state),
                    version,
                    deleted: false,
                    updated_at: now,
                }),
                outcome: Outcome::Updated {
                    previous: before.map(|state| Snapshot {
                        state,
                        version: current_version,
                    }),
                    current: Snapshot { state, version },
                    timestamp: now,
                },
            })
        }
        Command::Get(_) => {
            let live = live.ok_or_else(not_found)?;
            Ok(Applied {
                store: None,
                outcome: Outcome::Read {
                    current: Snapshot {
                        state: Arc::clone(&live.state),
                        version: live.version,
                    },
                    timestamp: now,
                },
            })
        }
        Command::Delete(_) => Ok(Applied {
            store: Some(StoredShadow {
                state: Arc::default(),
                version: current_version,
                deleted: true,
                updated_at: now,
            }),
            outcome: Outcome::Deleted {
                version: current_version,
                timestamp: now,
            },
        }),
        Command::Refused { refused, .. } => Err(refused.rejection.clone()),
    }
}
