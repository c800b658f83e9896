//! The live change stream (`/v1/changes`, SSE) and per-shadow catch-up by
//! version (`/v1/things/{thing}/shadow/changes`).
//!
//! A stream subscribes to the live broadcast first, then reads the history
//! after `since` from the change log, then forwards live changes skipping
//! every sequence already sent: no gap, no duplicate. Each subscriber has a
//! bounded buffer; one that falls behind is ended with an `end` event
//! (reason `lagged`) and never slows the writer or other subscribers.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit};
use tracing::{debug, warn};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiQuery;
use super::{ApiError, ApiState};
use crate::document::ShadowState;
use crate::metrics::ShadowMetrics;
use crate::search::{Query as SearchQuery, ShadowFields, ThingFields};
use crate::store::{Change, ChangeKind};
use crate::topic::ShadowKey;

/// History rows read from the store at a time.
const HISTORY_PAGE: usize = 512;

/// Parameters of the change stream.
#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct StreamParams {
    /// Resume after this sequence (the `Last-Event-ID` header wins when both are given).
    pub since: Option<u64>,
    /// Only changes of this thing.
    pub thing: Option<String>,
    /// Only changes matching this search query, evaluated against the thing
    /// as the event shows it (its name, the changed shadow, or its connectivity).
    pub q: Option<String>,
    /// Comma-separated JSON pointers into the event (e.g.
    /// `/document/state/reported/temp`): only those parts are sent, with
    /// `seq`, `kind` and `thing`. A pointer stops at the first array.
    pub fields: Option<String>,
    /// `false`: send what the change log holds after `since` (from the start
    /// when `since` is absent), then end with `end` {reason: caught-up}.
    pub follow: Option<bool>,
}

/// Which changes a subscriber wants, and which parts of them.
#[derive(Debug, Default)]
pub struct ChangeFilter {
    thing: Option<String>,
    query: Option<SearchQuery>,
    fields: Option<Vec<Vec<String>>>,
}

impl ChangeFilter {
    pub(crate) fn from_params(params: &StreamParams) -> Result<ChangeFilter, ApiError> {
        let query = match params.q.as_deref() {
            Some(q) => Some(SearchQuery::parse(q)?),
            None => None,
        };
        let fields = match params.fields.as_deref() {
            Some(fields) => Some(
                fields
                    .split(',')
                    .map(parse_pointer)
                    .collect::<Option<Vec<_>>>()
                    .ok_or(ApiError::BadParameter("fields must be JSON pointers"))?,
            ),
            None => None,
        };
        Ok(ChangeFilter {
            thing: params.thing.clone(),
            query,
            fields,
        })
    }

    pub(crate) fn matches(&self, change: &Change) -> bool {
        if self.thing.as_ref().is_some_and(|t| *t != change.thing) {
            return false;
        }
        match &self.query {
            None => true,
            Some(query) => query.matches(&EventThing::new(change)),
        }
    }

    /// The event's data: the whole change, or the selected fields of it.
    pub(crate) fn render(&self, change: &Change) -> String {
        match &self.fields {
            None => event_json(change),
            Some(pointers) => {
                let full: Value = serde_json::from_str(&event_json(change)).unwrap_or(Value::Null);
                let mut out = Map::new();
                for key in ["seq", "kind", "thing"] {
                    if let Some(v) = full.get(key) {
                        out.insert(key.into(), v.clone());
                    }
                }
                for pointer in pointers {
                    select(&full, pointer, &mut out);
                }
                Value::Object(out).to_string()
            }
        }
    }
}

/// `/a/b~1c` as segments; `None` when it does not start with `/`.
fn parse_pointer(pointer: &str) -> Option<Vec<String>> {
    let rest = pointer.trim().strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

/// Copies the part of `from` at `path` into `into`, keeping its structure.
fn select(from: &Value, path: &[String], into: &mut Map<String, Value>) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(value) = from.get(first.as_str()) else {
        return;
    };
    if rest.is_empty() || !value.is_object() {
        into.insert(first.clone(), value.clone());
        return;
    }
    let slot = into
        .entry(first.clone())
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(slot) = slot {
        select(value, rest, slot);
    }
}

/// The change as the event's JSON, embedding the stored document as is.
fn event_json(change: &Change) -> String {
    let text = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let name = change.name.as_deref().map_or_else(|| "null".into(), text);
    format!(
        r#"{{"seq":{},"kind":"{}","thing":{},"name":{},"version":{},"time":{},"document":{}}}"#,
        change.seq,
        change.kind.as_str(),
        text(&change.thing),
        name,
        change.version,
        change.time,
        change.document
    )
}

/// A thing as one change shows it, for `?q=`.
struct EventThing<'a> {
    change: &'a Change,
    /// An update's shadow (the writer's state, or read from the document)
    /// and whether it has a delta.
    shadow: Option<(Arc<ShadowState>, bool)>,
    presence: Option<(bool, i64)>,
}

impl<'a> EventThing<'a> {
    fn new(change: &'a Change) -> EventThing<'a> {
        let mut thing = EventThing {
            change,
            shadow: None,
            presence: None,
        };
        match change.kind {
            ChangeKind::Update => {
                let state = match &change.state {
                    Some(state) => Some(Arc::clone(state)),
                    None => serde_json::from_str::<Value>(&change.document)
                        .ok()
                        .map(|d| Arc::new(ShadowState::from_values(&d["state"], &Value::Null))),
                };
                thing.shadow = state.map(|s| {
                    let has_delta = s.has_delta();
                    (s, has_delta)
                });
            }
            ChangeKind::Delete | ChangeKind::Forget => {}
            ChangeKind::Connect | ChangeKind::Disconnect => {
                let at = serde_json::from_str::<Value>(&change.document)
                    .ok()
                    .and_then(|d| d.get("timestamp").and_then(Value::as_i64))
                    .unwrap_or(change.time * 1000);
                thing.presence = Some((change.kind == ChangeKind::Connect, at));
            }
        }
        thing
    }
}

impl ThingFields for EventThing<'_> {
    fn thing_name(&self) -> &str {
        &self.change.thing
    }

    fn connectivity(&self) -> Option<(bool, i64)> {
        self.presence
    }

    fn shadow(&self, name: Option<&str>) -> Option<ShadowFields<'_>> {
        if name != self.change.name.as_deref() {
            return None;
        }
        self.shadow.as_ref().map(|(state, has_delta)| ShadowFields {
            version: self.change.version,
            state,
            has_delta: *has_delta,
        })
    }
}

/// Why a stream ended, sent as its last event (`event: end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndReason {
    /// The subscriber fell further behind than its buffer.
    Lagged,
    /// History it still needed was trimmed from the change log.
    Retention,
    /// The server is shutting down.
    Shutdown,
    /// The store could not be read.
    Error,
    /// Everything up to now was sent and the subscriber did not ask to follow.
    CaughtUp,
}

impl EndReason {
    fn event(self, last: Option<u64>) -> Event {
        let reason = match self {
            EndReason::Lagged => "lagged",
            EndReason::Retention => "retention",
            EndReason::Shutdown => "shutdown",
            EndReason::Error => "error",
            EndReason::CaughtUp => "caught-up",
        };
        let data = serde_json::json!({ "reason": reason, "lastEventId": last });
        Event::default().event("end").data(data.to_string())
    }
}

/// Holds a subscriber's slot and gauge while its stream lives.
struct Subscription {
    _permit: OwnedSemaphorePermit,
    metrics: Option<ShadowMetrics>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.stream_subscribers.dec();
        }
    }
}

/// Where the feeding task leaves the stream's last event before it stops.
type EndSlot = Arc<Mutex<Option<Event>>>;

#[utoipa::path(get, path = "/v1/changes", tag = "changes",
    params(StreamParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this sequence")),
    responses(
        (status = 200, description = "`text/event-stream`: one event per committed change \
            (`id:` = sequence, `event:` = update|delete|connect|disconnect, `data:` = \
            {seq,kind,thing,name,version,time,document}); heartbeat comments; a final \
            `end` event {reason: lagged|retention|shutdown|error|caught-up} when the server ends it", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad filter or Last-Event-ID", body = super::error::ErrorBody),
        (status = 410, description = "`since` is older than the change log's retention", body = super::error::ErrorBody),
        (status = 503, description = "Too many subscribers", body = super::error::ErrorBody),
    ))]
pub async fn stream(
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<StreamParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let since = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(ApiError::BadParameter(
                    "Last-Event-ID must be a sequence number",
                ))?,
        ),
        None => params.since,
    };
    let follow = params.follow.unwrap_or(true);
    // Without following, the history is the whole answer: start from the beginning.
    let since = if follow {
        since
    } else {
        Some(since.unwrap_or(0))
    };
    let filter = ChangeFilter::from_params(&params)?;
    let permit = Arc::clone(&state.subscribers)
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManySubscribers)?;
    if let Some(m) = &state.metrics {
        m.stream_subscribers.inc();
    }
    let subscription = Subscription {
        _permit: permit,
        metrics: state.metrics.clone(),
    };
    // Subscribe before reading history: whatever commits from here on is
    // either in the history read below or arrives live (or both).
    let live = state.service.subscribe_changes();
    if let Some(since) = since {
        let store = Arc::clone(state.service.store());
        let bounds = tokio::task::spawn_blocking(move || store.change_log_bounds())
            .await
            .map_err(|_| ApiError::Task)??;
        if !bounds.retains_after(since) {
            return Err(ApiError::Gone { since });
        }
    }
    let (tx, rx) = mpsc::channel(state.config.stream_buffer.max(1));
    let end: EndSlot = Arc::default();
    crate::tasks::spawn_for_request(
        "change stream feed",
        feed(
            state.clone(),
            live,
            since,
            follow,
            filter,
            tx,
            Arc::clone(&end),
        ),
    );
    let events = stream::unfold(
        (rx, end, Some(subscription)),
        |(mut rx, end, subscription)| async move {
            let subscription = subscription?;
            match rx.recv().await {
                Some(event) => Some((Ok(event), (rx, end, Some(subscription)))),
                None => {
                    let last = end.lock().ok().and_then(|mut e| e.take())?;
                    Some((Ok(last), (rx, end, None)))
                }
            }
        },
    );
    let heartbeat = Duration::from_secs(state.config.heartbeat_secs.max(1));
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat")))
}

/// Feeds one subscriber: history after `since`, then live changes.
async fn feed(
    state: ApiState,
    mut live: broadcast::Receiver<Change>,
    since: Option<u64>,
    follow: bool,
    filter: ChangeFilter,
    tx: mpsc::Sender<Event>,
    end: EndSlot,
) {
    let finish = |reason: EndReason, last: Option<u64>| {
        debug!(?reason, ?last, "change stream ended");
        if let Ok(mut slot) = end.lock() {
            *slot = Some(reason.event(last));
        }
    };
    let mut last = since;
    if let Some(mut cursor) = since {
        loop {
            let store = Arc::clone(state.service.store());
            let page =
                tokio::task::spawn_blocking(move || store.changes_since(cursor, HISTORY_PAGE))
                    .await;
            let page = match page {
                Ok(Ok(page)) => page,
                Ok(Err(err)) => {
                    warn!(cause = %err, "change stream could not read history");
                    return finish(EndReason::Error, Some(cursor));
                }
                Err(_) => return finish(EndReason::Error, Some(cursor)),
            };
            // Sequences are contiguous; a hole at the front means the
            // retention trim overtook this reader.
            if page.first().is_some_and(|c| c.seq > cursor + 1) {
                return finish(EndReason::Retention, Some(cursor));
            }
            let full = page.len() == HISTORY_PAGE;
            for change in page {
                cursor = change.seq;
                if filter.matches(&change) {
                    let event = to_event(&filter, &change);
                    tokio::select! {
                        sent = tx.send(event) => if sent.is_err() { return },
                        () = state.shutdown.cancelled() => return finish(EndReason::Shutdown, Some(cursor)),
                    }
                }
            }
            if !full {
                break;
            }
        }
        last = Some(cursor);
    }
    if !follow {
        return finish(EndReason::CaughtUp, last);
    }
    loop {
        let change = tokio::select! {
            received = live.recv() => received,
            () = tx.closed() => return,
            () = state.shutdown.cancelled() => return finish(EndReason::Shutdown, last),
        };
        let change = match change {
            Ok(change) => change,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                return finish(EndReason::Lagged, last);
            }
            // The service stopped.
            Err(broadcast::error::RecvError::Closed) => return finish(EndReason::Shutdown, last),
        };
        if last.is_some_and(|l| change.seq <= l) {
            continue; // already sent from history
        }
        if filter.matches(&change) {
            match tx.try_send(to_event(&filter, &change)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return finish(EndReason::Lagged, last);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        last = Some(change.seq);
    }
}

fn to_event(filter: &ChangeFilter, change: &Change) -> Event {
    let mut data = filter.render(change);
    if data.contains('\r') {
        // SSE cannot carry a carriage return (axum panics on one). In JSON a
        // raw one can only be whitespace between tokens, so a space is the same.
        data = data.replace('\r', " ");
    }
    Event::default()
        .id(change.seq.to_string())
        .event(change.kind.as_str())
        .data(data)
}

/// Parameters of the per-shadow catch-up.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(rename_all = "camelCase")]
pub struct CatchUpParams {
    /// The version the caller has; changes after it are returned.
    #[serde(rename = "since_version")]
    #[param(rename = "since_version")]
    pub since_version: u64,
    /// The named shadow; omit for the classic shadow.
    pub name: Option<String>,
    /// Changes per page (default and maximum from the config).
    pub page_size: Option<usize>,
    /// The `nextToken` of the previous page.
    pub next_token: Option<u64>,
}

/// One change as catch-up returns it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangeEntry {
    pub seq: u64,
    /// `update` or `delete`.
    pub kind: String,
    pub version: u64,
    pub time: i64,
    /// The shadow after the change (`{"state","metadata","version"}`), or `{"version"}` for a delete.
    #[schema(value_type = Object)]
    pub document: Value,
}

/// A page of one shadow's changes.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShadowChanges {
    pub thing: String,
    pub name: Option<String>,
    pub changes: Vec<ChangeEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

#[utoipa::path(get, path = "/v1/things/{thing}/shadow/changes", tag = "changes",
    params(("thing" = String, Path, description = "Thing name"), CatchUpParams),
    responses(
        (status = 200, description = "Every retained change of the shadow after `since_version`, oldest first", body = ShadowChanges),
        (status = 400, description = "Invalid name or parameter", body = super::error::ErrorBody),
        (status = 410, description = "Changes after `since_version` are no longer retained", body = super::error::ErrorBody),
    ))]
pub async fn shadow_changes(
    State(state): State<ApiState>,
    Path(thing): Path<String>,
    ApiQuery(params): ApiQuery<CatchUpParams>,
) -> Result<Json<ShadowChanges>, ApiError> {
    let limits = state.service.limits();
    limits.check_thing_name(&thing)?;
    if let Some(name) = &params.name {
        limits.check_shadow_name(name)?;
    }
    let size = super::shadow::PageParams {
        page_size: params.page_size,
        next_token: None,
    }
    .size(&state)?;
    let key = ShadowKey {
        thing,
        name: params.name,
    };
    let since = params.since_version;
    let after = params.next_token.unwrap_or(0);
    let store = Arc::clone(state.service.store());
    let lookup = key.clone();
    let (mut changes, current) = tokio::task::spawn_blocking(move || {
        let changes = store.shadow_changes(&lookup, since, after, size + 1)?;
        let current = match changes.is_empty() && after == 0 {
            true => store.load(&lookup)?.map(|s| s.version),
            false => None,
        };
        Ok::<_, crate::store::StoreError>((changes, current))
    })
    .await
    .map_err(|_| ApiError::Task)??;
    if params.next_token.is_none() {
        // The first change after N is the delete of N or the update to N+1;
        // anything later first means the ones between were trimmed.
        let continuous = match changes.first() {
            Some(c) => {
                c.version == since + 1 || (c.version == since && c.kind == ChangeKind::Delete)
            }
            None => current.is_none_or(|v| v <= since),
        };
        if !continuous {
            return Err(ApiError::Gone { since });
        }
    }
    let next_token = if changes.len() > size {
        changes.truncate(size);
        changes.last().map(|c| c.seq.to_string())
    } else {
        None
    };
    Ok(Json(ShadowChanges {
        thing: key.thing,
        name: key.name,
        changes: changes
            .into_iter()
            .map(|c| ChangeEntry {
                seq: c.seq,
                kind: c.kind.as_str().into(),
                version: c.version,
                time: c.time,
                document: serde_json::from_str(&c.document).unwrap_or(Value::Null),
            })
            .collect(),
        next_token,
    }))
}
