//! The `$aws/things/...` shadow topics: parsing request topics and naming answer topics.

use std::fmt;

/// What a request asks of a shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Update,
    Get,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Update => "update",
            Operation::Get => "get",
            Operation::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Option<Operation> {
        match s {
            "update" => Some(Operation::Update),
            "get" => Some(Operation::Get),
            "delete" => Some(Operation::Delete),
            _ => None,
        }
    }
}

/// The kinds of message the service publishes in answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    Accepted,
    Rejected,
    Delta,
    Documents,
}

impl AnswerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AnswerKind::Accepted => "accepted",
            AnswerKind::Rejected => "rejected",
            AnswerKind::Delta => "delta",
            AnswerKind::Documents => "documents",
        }
    }
}

/// Which shadow of which thing: `name` is `None` for the classic shadow.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShadowKey {
    pub thing: String,
    pub name: Option<String>,
}

impl ShadowKey {
    pub fn classic(thing: impl Into<String>) -> ShadowKey {
        ShadowKey {
            thing: thing.into(),
            name: None,
        }
    }

    pub fn named(thing: impl Into<String>, name: impl Into<String>) -> ShadowKey {
        ShadowKey {
            thing: thing.into(),
            name: Some(name.into()),
        }
    }

    /// `$aws/things/{thing}/shadow` or `$aws/things/{thing}/shadow/name/{name}`.
    pub fn topic_prefix(&self) -> String {
        match &self.name {
            None => format!("$aws/things/{}/shadow", self.thing),
            Some(name) => format!("$aws/things/{}/shadow/name/{name}", self.thing),
        }
    }

    /// The topic an answer of `kind` to `op` is published on.
    pub fn answer_topic(&self, op: Operation, kind: AnswerKind) -> String {
        format!("{}/{}/{}", self.topic_prefix(), op.as_str(), kind.as_str())
    }

    /// The name AWS puts in a 404 message: the shadow name, or the thing for the classic shadow.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.thing)
    }
}

impl fmt::Display for ShadowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            None => write!(f, "{}", self.thing),
            Some(name) => write!(f, "{}/{name}", self.thing),
        }
    }
}

/// A parsed shadow request topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTopic {
    pub key: ShadowKey,
    pub op: Operation,
}

/// Why a topic is not a shadow request topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("not a shadow topic")]
    NotShadow,
    #[error("empty thing or shadow name")]
    EmptyName,
    #[error("unknown shadow operation")]
    UnknownOperation,
    #[error("answer topics cannot be published to")]
    AnswerTopic,
}

/// Parses `$aws/things/{thing}/shadow[/name/{name}]/{update|get|delete}`.
/// Names are checked against the configured rules by the service, not here.
pub fn parse_request_topic(topic: &str) -> Result<RequestTopic, TopicError> {
    let rest = topic
        .strip_prefix("$aws/things/")
        .ok_or(TopicError::NotShadow)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (thing, name, tail) = match parts.as_slice() {
        [thing, "shadow", "name", name, tail @ ..] => (*thing, Some(*name), tail),
        [thing, "shadow", tail @ ..] => (*thing, None, tail),
        _ => return Err(TopicError::NotShadow),
    };
    if thing.is_empty() || name.is_some_and(str::is_empty) {
        return Err(TopicError::EmptyName);
    }
    let op = match tail {
        [op] => Operation::parse(op).ok_or(TopicError::UnknownOperation)?,
        [op, _] if Operation::parse(op).is_some() => return Err(TopicError::AnswerTopic),
        _ => return Err(TopicError::UnknownOperation),
    };
    Ok(RequestTopic {
        key: ShadowKey {
            thing: thing.to_string(),
            name: name.map(str::to_string),
        },
        op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_classic_and_named() {
        let t = parse_request_topic("$aws/things/lamp-1/shadow/update")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.key, ShadowKey::classic("lamp-1"));
        assert_eq!(t.op, Operation::Update);
        let t = parse_request_topic("$aws/things/lamp-1/shadow/name/cfg/get")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.key, ShadowKey::named("lamp-1", "cfg"));
        assert_eq!(t.op, Operation::Get);
    }

    #[test]
    fn refuses_malformed() {
        use TopicError::*;
        for (topic, err) in [
            ("aws/things/x/shadow/update", NotShadow),
            ("$aws/things/x/other/update", NotShadow),
            ("$aws/things//shadow/update", EmptyName),
            ("$aws/things/x/shadow/name//update", EmptyName),
            ("$aws/things/x/shadow/frob", UnknownOperation),
            ("$aws/things/x/shadow", UnknownOperation),
            ("$aws/things/x/shadow/update/accepted", AnswerTopic),
            ("$aws/things/x/shadow/name/n/delete/rejected", AnswerTopic),
            ("$aws/things/x/shadow/update/a/b", UnknownOperation),
        ] {
            assert_eq!(parse_request_topic(topic), Err(err), "{topic}");
        }
    }

    #[test]
    fn answer_topics() {
        let k = ShadowKey::named("t", "n");
        assert_eq!(
            k.answer_topic(Operation::Update, AnswerKind::Delta),
            "$aws/things/t/shadow/name/n/update/delta"
        );
        assert_eq!(
            ShadowKey::classic("t").answer_topic(Operation::Get, AnswerKind::Accepted),
            "$aws/things/t/shadow/get/accepted"
        );
    }
}
