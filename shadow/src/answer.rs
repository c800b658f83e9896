//! The messages a request is answered with: their topics and exact JSON payloads.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::document::{ShadowState, Timestamp};
use crate::engine::{Command, Outcome, Snapshot};
use crate::error::Rejection;
use crate::topic::{AnswerKind, Operation, ShadowKey};

/// Name/value pairs a request carried (MQTT 5 user properties), repeated
/// on its reply.
pub type UserProperties = Arc<[(String, String)]>;

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// Set on a reply to a request that carried some.
    pub user_properties: Option<UserProperties>,
}

/// Everything a request produced: the reply (`/accepted` or `/rejected`) first,
/// then `/documents` and `/delta` for an accepted update.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub result: Result<u64, Rejection>,
    pub messages: Vec<Message>,
}

impl Answer {
    /// The `/accepted` or `/rejected` message.
    pub fn reply(&self) -> &Message {
        // Both constructors below put the reply first, so this cannot be empty.
        &self.messages[0]
    }

    /// Puts `user_properties` on the reply (the messages other subscribers
    /// get, `/documents` and `/delta`, stay as they are).
    pub fn with_user_properties(mut self, user_properties: Option<UserProperties>) -> Answer {
        if let Some(reply) = self.messages.first_mut() {
            reply.user_properties = user_properties;
        }
        self
    }

    /// The reply's payload as JSON.
    pub fn reply_json(&self) -> Value {
        serde_json::from_slice(&self.reply().payload).unwrap_or(Value::Null)
    }

    /// Builds the answer to an accepted command.
    pub fn accepted(key: &ShadowKey, command: &Command, outcome: &Outcome) -> Answer {
        Answer::accepted_for(key, command, outcome, |_| true)
    }

    /// [`Answer::accepted`], building the `/documents` and `/delta` messages
    /// only when `wanted(topic)` says someone will receive them (building
    /// them is most of an update's answer work). The reply is always built:
    /// the requester reads it.
    pub fn accepted_for(
        key: &ShadowKey,
        command: &Command,
        outcome: &Outcome,
        wanted: impl Fn(&str) -> bool,
    ) -> Answer {
        let op = command.operation();
        let client_token = command.client_token();
        let mut messages = Vec::with_capacity(3);
        let mut push = |kind: AnswerKind, body: Map<String, Value>| {
            messages.push(message(key.answer_topic(op, kind), body, client_token));
        };
        let wants = |kind: AnswerKind| wanted(&key.answer_topic(op, kind));
        match outcome {
            Outcome::Updated {
                previous,
                current,
                timestamp,
            } => {
                let (desired, reported) = match command {
                    Command::Update(request) => (&request.desired, &request.reported),
                    Command::Get(_) | Command::Delete(_) | Command::Refused { .. } => {
                        (&None, &None)
                    }
                };
                let mut state = Map::new();
                let mut metadata = Map::new();
                for (name, patch) in [("desired", desired), ("reported", reported)] {
                    if let Some(patch) = patch {
                        state.insert(name.into(), patch.to_value());
                        metadata.insert(name.into(), patch.metadata(*timestamp));
                    }
                }
                push(
                    AnswerKind::Accepted,
                    body([
                        ("state", Value::Object(state)),
                        ("metadata", Value::Object(metadata)),
                        ("version", current.version.into()),
                        ("timestamp", (*timestamp).into()),
                    ]),
                );
                if wants(AnswerKind::Documents) {
                    push(
                        AnswerKind::Documents,
                        body([
                            ("previous", previous.as_ref().map_or(Value::Null, snapshot)),
                            ("current", snapshot(current)),
                            ("timestamp", (*timestamp).into()),
                        ]),
                    );
                }
                let delta = match wants(AnswerKind::Delta) {
                    true => current.state.delta(),
                    false => None,
                };
                if let Some(delta) = delta {
                    let delta_metadata = current.state.delta_metadata(&delta);
                    push(
                        AnswerKind::Delta,
                        body([
                            ("state", Value::Object(delta)),
                            ("metadata", Value::Object(delta_metadata)),
                            ("version", current.version.into()),
                            ("timestamp", (*timestamp).into()),
                        ]),
                    );
                }
            }
            Outcome::Read { current, timestamp } => {
                push(
                    AnswerKind::Accepted,
                    body([
                        ("state", state_document(&current.state)),
                        ("metadata", current.state.metadata_value()),
                        ("version", current.version.into()),
                        ("timestamp", (*timestamp).into()),
                    ]),
                );
            }
            Outcome::Deleted { version, timestamp } => push(
                AnswerKind::Accepted,
                body([
                    ("version", (*version).into()),
                    ("timestamp", (*timestamp).into()),
                ]),
            ),
        }
        Answer {
            result: Ok(outcome.version()),
            messages,
        }
    }

    /// Builds the answer to a refused command.
    pub fn rejected(
        key: &ShadowKey,
        op: Operation,
        rejection: Rejection,
        client_token: Option<&str>,
        now: Timestamp,
    ) -> Answer {
        let payload = body([
            ("code", rejection.code().into()),
            ("message", rejection.to_string().into()),
            ("timestamp", now.into()),
        ]);
        Answer {
            messages: vec![message(
                key.answer_topic(op, AnswerKind::Rejected),
                payload,
                client_token,
            )],
            result: Err(rejection),
        }
    }
}

/// The full document of a shadow at one version (`/update/documents` and the change log).
pub fn snapshot(s: &Snapshot) -> Value {
    json!({
        "state": s.state.state_value(),
        "metadata": s.state.metadata_value(),
        "version": s.version,
    })
}

/// A state as the `/get` answer and the HTTP API show it.
pub fn state_document(state: &ShadowState) -> Value {
    let mut value = state.state_value();
    if let (Some(delta), Value::Object(map)) = (state.delta(), &mut value) {
        map.insert("delta".into(), Value::Object(delta));
    }
    value
}

fn body<const N: usize>(fields: [(&str, Value); N]) -> Map<String, Value> {
    fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn message(topic: String, mut body: Map<String, Value>, client_token: Option<&str>) -> Message {
    if let Some(token) = client_token {
        body.insert("clientToken".into(), token.into());
    }
    let payload = serde_json::to_vec(&Value::Object(body)).unwrap_or_default();
    Message {
        topic,
        payload: payload.into(),
        user_properties: None,
    }
}
