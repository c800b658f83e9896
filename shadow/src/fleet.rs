//! The fleet index: every thing's live shadows and connectivity in memory, for
//! listing and search without touching SQLite.
//!
//! Built once from a consistent store snapshot and kept current from the
//! committed changes, which the service's publisher feeds in commit order.
//! Changes that arrive while the snapshot loads are held and replayed on top
//! of it (those the snapshot already holds are skipped by sequence).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tracing::warn;

use crate::document::{Section, ShadowState};
use crate::search::{Query, ShadowFields, ThingFields};
use crate::store::{Change, ChangeKind, FleetSnapshot, StoreError};

/// One live shadow as indexed. The state of a shadow updated since start-up
/// is the one the store's writer holds (metadata included), shared rather
/// than copied; one loaded at start-up has no metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedShadow {
    pub version: u64,
    pub state: Arc<ShadowState>,
    pub has_delta: bool,
}

impl IndexedShadow {
    /// The entry an update change makes: its shared state when it has one,
    /// otherwise parsed from its document.
    pub fn from_change(change: &Change) -> Option<IndexedShadow> {
        match &change.state {
            Some(state) => Some(IndexedShadow {
                version: change.version,
                has_delta: state.has_delta(),
                state: Arc::clone(state),
            }),
            None => IndexedShadow::from_change_document(change.version, &change.document),
        }
    }

    /// Builds an entry from `{"desired":..,"reported":..}`.
    pub fn from_state(version: u64, state: &Value) -> IndexedShadow {
        let section = |name: &str| {
            let state = state.get(name)?.as_object()?.clone();
            Some(Section {
                state,
                metadata: Map::new(),
            })
        };
        let state = ShadowState {
            desired: section("desired"),
            reported: section("reported"),
        };
        IndexedShadow {
            version,
            has_delta: state.has_delta(),
            state: Arc::new(state),
        }
    }

    /// Builds an entry from a change log update document (`{"state":..,..}`);
    /// the metadata is skipped, not parsed into values.
    fn from_change_document(version: u64, document: &str) -> Option<IndexedShadow> {
        #[derive(Deserialize)]
        struct Document {
            state: Value,
        }
        let document: Document = serde_json::from_str(document).ok()?;
        Some(IndexedShadow::from_state(version, &document.state))
    }

    /// `{"desired","reported","hasDelta","version"}`.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        if let Some(d) = &self.state.desired {
            out.insert("desired".into(), Value::Object(d.state.clone()));
        }
        if let Some(r) = &self.state.reported {
            out.insert("reported".into(), Value::Object(r.state.clone()));
        }
        out.insert("hasDelta".into(), self.has_delta.into());
        out.insert("version".into(), self.version.into());
        Value::Object(out)
    }
}

/// A thing's connectivity as indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub connected: bool,
    pub last_seen_ms: i64,
}

/// One thing in the index: its live shadows and its connectivity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ThingEntry {
    pub presence: Option<Presence>,
    pub shadows: ShadowSet,
}

/// A thing's live shadows by name (`None` is the classic shadow), in name
/// order. A sorted vector, not a map: a thing has a handful of shadows, and a
/// B-tree node per thing would cost more memory than the shadows themselves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowSet(Vec<(Option<String>, IndexedShadow)>);

impl ShadowSet {
    fn position(&self, name: Option<&str>) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_deref().cmp(&name))
    }

    pub fn get(&self, name: Option<&str>) -> Option<&IndexedShadow> {
        self.position(name).ok().map(|i| &self.0[i].1)
    }

    pub fn insert(&mut self, name: Option<String>, shadow: IndexedShadow) {
        match self.position(name.as_deref()) {
            Ok(i) => self.0[i].1 = shadow,
            Err(i) => {
                // Room for exactly one more: most things have one shadow,
                // and a vector's first growth would make room for four.
                self.0.reserve_exact(1);
                self.0.insert(i, (name, shadow));
            }
        }
    }

    pub fn remove(&mut self, name: Option<&str>) {
        if let Ok(i) = self.position(name) {
            self.0.remove(i);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(name, shadow)` in name order, the classic shadow first.
    pub fn iter(&self) -> impl Iterator<Item = (Option<&str>, &IndexedShadow)> {
        self.0.iter().map(|(k, v)| (k.as_deref(), v))
    }
}

/// A thing and its entry, as a query sees it.
#[derive(Debug, Clone, Copy)]
pub struct ThingRef<'a> {
    pub name: &'a str,
    pub entry: &'a ThingEntry,
}

impl ThingFields for ThingRef<'_> {
    fn thing_name(&self) -> &str {
        self.name
    }

    fn connectivity(&self) -> Option<(bool, i64)> {
        self.entry.presence.map(|p| (p.connected, p.last_seen_ms))
    }

    fn shadow(&self, name: Option<&str>) -> Option<ShadowFields<'_>> {
        let shadow = self.entry.shadows.get(name)?;
        Some(ShadowFields {
            version: shadow.version,
            state: &shadow.state,
            has_delta: shadow.has_delta,
        })
    }
}

impl ThingRef<'_> {
    /// The thing as a search result: name, connectivity, classic shadow and named shadows.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("thingName".into(), self.name.into());
        if let Some(p) = self.entry.presence {
            out.insert(
                "connectivity".into(),
                serde_json::json!({"connected": p.connected, "timestamp": p.last_seen_ms}),
            );
        }
        let mut shadow = match self.entry.shadows.get(None) {
            Some(classic) => classic.to_json(),
            None => Value::Object(Map::new()),
        };
        let named: Map<String, Value> = self
            .entry
            .shadows
            .iter()
            .filter_map(|(k, v)| Some((k?.to_string(), v.to_json())))
            .collect();
        if let (false, Value::Object(map)) = (named.is_empty(), &mut shadow) {
            map.insert("name".into(), Value::Object(named));
        }
        out.insert("shadow".into(), shadow);
        Value::Object(out)
    }
}

/// Whether the index has loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexStatus {
    Loading,
    Ready,
    Failed,
}

/// The in-memory fleet index.
pub struct FleetIndex {
    things: RwLock<BTreeMap<String, ThingEntry>>,
    /// Changes not yet applied. The publisher never waits for a search: when
    /// the index is being read it leaves its changes here, and the next
    /// writer or reader applies them first. Bounded in practice by the commit
    /// rate times the longest search; while loading, by the load time.
    pending: Mutex<Vec<Change>>,
    /// Sequence up to which the snapshot (and so the index) is complete;
    /// changes at or below it are already in.
    loaded_through: Mutex<Option<u64>>,
    status: watch::Sender<IndexStatus>,
}

impl std::fmt::Debug for FleetIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetIndex")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Default for FleetIndex {
    fn default() -> Self {
        FleetIndex::new()
    }
}

/// Why the index could not answer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("fleet index is loading")]
    Loading,
    #[error("fleet index failed to load")]
    Failed,
}

impl FleetIndex {
    /// An empty index waiting for its snapshot.
    pub fn new() -> FleetIndex {
        FleetIndex {
            things: RwLock::new(BTreeMap::new()),
            pending: Mutex::new(Vec::new()),
            loaded_through: Mutex::new(None),
            status: watch::channel(IndexStatus::Loading).0,
        }
    }

    pub fn status(&self) -> IndexStatus {
        *self.status.borrow()
    }

    /// Waits until the index has loaded (or failed to).
    pub async fn wait_loaded(&self) -> IndexStatus {
        let mut rx = self.status.subscribe();
        let status = match rx.wait_for(|s| *s != IndexStatus::Loading).await {
            Ok(status) => *status,
            Err(_) => IndexStatus::Failed,
        };
        status
    }

    /// Marks the index failed: listing and search answer so, and `/readyz`
    /// stops waiting for it.
    pub fn fail(&self) {
        self.status.send_replace(IndexStatus::Failed);
    }

    /// Loads the snapshot, then replays the changes that arrived meanwhile.
    pub fn load(&self, snapshot: Result<FleetSnapshot, StoreError>) {
        let snapshot = match snapshot {
            Ok(snapshot) => snapshot,
            Err(err) => {
                warn!(cause = %err, "fleet index could not read the store");
                self.fail();
                return;
            }
        };
        let mut things: BTreeMap<String, ThingEntry> = BTreeMap::new();
        for row in snapshot.shadows {
            let state: Value = serde_json::from_str(&row.state).unwrap_or(Value::Null);
            things
                .entry(row.key.thing)
                .or_default()
                .shadows
                .insert(row.key.name, IndexedShadow::from_state(row.version, &state));
        }
        for c in snapshot.things {
            things.entry(c.thing).or_default().presence = Some(Presence {
                connected: c.connected,
                last_seen_ms: c.last_seen_ms,
            });
        }
        if let Ok(mut current) = self.things.write() {
            *current = things;
        }
        if let Ok(mut through) = self.loaded_through.lock() {
            *through = Some(snapshot.through_seq);
        }
        self.drain();
        self.status.send_replace(IndexStatus::Ready);
    }

    /// Takes one committed change, in commit order. Never waits for readers.
    pub fn apply(&self, change: Change) {
        if self.status() == IndexStatus::Failed {
            return;
        }
        if let Ok(mut pending) = self.pending.lock() {
            pending.push(change);
        }
        let loaded = self
            .loaded_through
            .lock()
            .map(|t| t.is_some())
            .unwrap_or(false);
        if loaded {
            if let Ok(mut things) = self.things.try_write() {
                self.drain_into(&mut things);
            }
        }
    }

    /// Applies whatever is pending (waits for readers).
    fn drain(&self) {
        if let Ok(mut things) = self.things.write() {
            self.drain_into(&mut things);
        }
    }

    fn drain_into(&self, things: &mut BTreeMap<String, ThingEntry>) {
        let Some(through) = self.loaded_through.lock().ok().and_then(|t| *t) else {
            return;
        };
        let changes = match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        for change in changes.into_iter().filter(|c| c.seq > through) {
            apply_change(things, change);
        }
    }

    /// Runs `read` over the index brought up to date.
    pub fn read<T>(
        &self,
        read: impl FnOnce(&BTreeMap<String, ThingEntry>) -> T,
    ) -> Result<T, IndexError> {
        match self.status() {
            IndexStatus::Loading => return Err(IndexError::Loading),
            IndexStatus::Failed => return Err(IndexError::Failed),
            IndexStatus::Ready => {}
        }
        self.drain();
        let things = self.things.read().map_err(|_| IndexError::Failed)?;
        Ok(read(&things))
    }

    /// Things matching `query` (all things when `None`), in name order, after
    /// `after`, at most `limit`; and whether more follow.
    pub fn search<T>(
        &self,
        query: Option<&Query>,
        after: Option<&str>,
        limit: usize,
        render: impl FnMut(ThingRef<'_>) -> T,
    ) -> Result<(Vec<T>, bool), IndexError> {
        self.select(|t| query.is_none_or(|q| q.matches(t)), after, limit, render)
    }

    /// The fleet: things with at least one shadow (not every client id that
    /// ever connected), as [`search`](Self::search) pages them.
    pub fn list<T>(
        &self,
        after: Option<&str>,
        limit: usize,
        render: impl FnMut(ThingRef<'_>) -> T,
    ) -> Result<(Vec<T>, bool), IndexError> {
        self.select(|t| !t.entry.shadows.is_empty(), after, limit, render)
    }

    fn select<T>(
        &self,
        keep: impl Fn(&ThingRef<'_>) -> bool,
        after: Option<&str>,
        limit: usize,
        mut render: impl FnMut(ThingRef<'_>) -> T,
    ) -> Result<(Vec<T>, bool), IndexError> {
        self.read(|things| {
            let start = match after {
                Some(after) => Bound::Excluded(after.to_string()),
                None => Bound::Unbounded,
            };
            let mut out = Vec::new();
            let mut more = false;
            for (name, entry) in things.range((start, Bound::Unbounded)) {
                let thing = ThingRef { name, entry };
                if keep(&thing) {
                    if out.len() == limit {
                        more = true;
                        break;
                    }
                    out.push(render(thing));
                }
            }
            (out, more)
        })
    }
}

fn apply_change(things: &mut BTreeMap<String, ThingEntry>, change: Change) {
    match change.kind {
        ChangeKind::Update => match IndexedShadow::from_change(&change) {
            Some(shadow) => {
                things
                    .entry(change.thing)
                    .or_default()
                    .shadows
                    .insert(change.name, shadow);
            }
            None => {
                warn!(thing = %change.thing, seq = change.seq, "unreadable change document")
            }
        },
        ChangeKind::Delete => {
            if let Some(entry) = things.get_mut(&change.thing) {
                entry.shadows.remove(change.name.as_deref());
                if entry.shadows.is_empty() && entry.presence.is_none() {
                    things.remove(&change.thing);
                }
            }
        }
        ChangeKind::Forget => {
            if let Some(entry) = things.get_mut(&change.thing) {
                entry.presence = None;
                if entry.shadows.is_empty() {
                    things.remove(&change.thing);
                }
            }
        }
        ChangeKind::Connect | ChangeKind::Disconnect => {
            let last_seen_ms = serde_json::from_str::<Value>(&change.document)
                .ok()
                .and_then(|d| d.get("timestamp").and_then(Value::as_i64))
                .unwrap_or(change.time * 1000);
            things.entry(change.thing).or_default().presence = Some(Presence {
                connected: change.kind == ChangeKind::Connect,
                last_seen_ms,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Connectivity, ShadowRow};
    use crate::topic::ShadowKey;

    fn update(seq: u64, thing: &str, name: Option<&str>, version: u64, temp: i64) -> Change {
        Change {
            seq,
            thing: thing.into(),
            name: name.map(str::to_string),
            version,
            kind: ChangeKind::Update,
            time: 1,
            document: format!(
                r#"{{"state":{{"reported":{{"temp":{temp}}}}},"metadata":{{}},"version":{version}}}"#
            ),
            state: None,
        }
    }

    fn temp(index: &FleetIndex, thing: &str) -> Option<i64> {
        index
            .read(|things| {
                let entry = things.get(thing)?;
                let shadow = entry.shadows.get(None)?;
                shadow.state.reported.as_ref()?.state.get("temp")?.as_i64()
            })
            .ok()
            .flatten()
    }

    #[test]
    fn an_update_with_the_writers_state_is_indexed_without_a_copy() {
        let index = FleetIndex::new();
        index.load(Ok(FleetSnapshot::default()));
        let reported = serde_json::json!({"temp": 7});
        let desired = serde_json::json!({"temp": 8});
        let state = Arc::new(ShadowState::from_values(
            &serde_json::json!({"desired": desired, "reported": reported}),
            &Value::Null,
        ));
        // The document says otherwise: the shared state is what counts.
        let change = Change {
            state: Some(Arc::clone(&state)),
            ..update(1, "a", None, 1, 1)
        };
        index.apply(change);
        let indexed = index
            .read(|t| t.get("a")?.shadows.get(None).cloned())
            .ok()
            .flatten()
            .expect("indexed");
        assert!(Arc::ptr_eq(&indexed.state, &state));
        assert!(indexed.has_delta);
        assert_eq!(temp(&index, "a"), Some(7));
    }

    #[test]
    fn changes_during_load_are_replayed_over_the_snapshot() {
        let index = FleetIndex::new();
        assert!(matches!(index.read(|_| ()), Err(IndexError::Loading)));
        // Published while the snapshot was being read: seq 2 is in it, 3 is not.
        index.apply(update(2, "a", None, 2, 20));
        index.apply(update(3, "a", None, 3, 30));
        index.load(Ok(FleetSnapshot {
            through_seq: 2,
            shadows: vec![ShadowRow {
                key: ShadowKey::classic("a"),
                version: 2,
                state: r#"{"reported":{"temp":20}}"#.into(),
            }],
            things: vec![Connectivity {
                thing: "b".into(),
                connected: true,
                last_seen_ms: 5,
            }],
        }));
        assert_eq!(index.status(), IndexStatus::Ready);
        assert_eq!(temp(&index, "a"), Some(30));
        let names = index.search(None, None, 10, |t| t.name.to_string());
        assert_eq!(
            names.ok(),
            Some((vec!["a".to_string(), "b".to_string()], false))
        );
        // The fleet list leaves out "b", known only from its connectivity.
        let names = index.list(None, 10, |t| t.name.to_string());
        assert_eq!(names.ok(), Some((vec!["a".to_string()], false)));
    }

    #[test]
    fn applies_never_wait_for_readers() {
        let index = FleetIndex::new();
        index.load(Ok(FleetSnapshot::default()));
        index.apply(update(1, "a", None, 1, 1));
        let seen = index.read(|things| {
            // A change published during a read is left pending...
            index.apply(update(2, "a", None, 2, 2));
            things
                .get("a")
                .and_then(|e| e.shadows.get(None))
                .map(|s| s.version)
        });
        assert_eq!(seen.ok().flatten(), Some(1));
        // ...and applied before the next read.
        assert_eq!(temp(&index, "a"), Some(2));
    }

    #[test]
    fn delete_and_presence() {
        let index = FleetIndex::new();
        index.load(Ok(FleetSnapshot::default()));
        index.apply(update(1, "a", Some("cfg"), 1, 1));
        index.apply(Change {
            seq: 2,
            thing: "a".into(),
            name: None,
            version: 0,
            kind: ChangeKind::Connect,
            time: 9,
            document: r#"{"connected":true,"timestamp":9000}"#.into(),
            state: None,
        });
        index.apply(Change {
            seq: 3,
            thing: "a".into(),
            name: Some("cfg".into()),
            version: 1,
            kind: ChangeKind::Delete,
            time: 9,
            document: r#"{"version":1}"#.into(),
            state: None,
        });
        let entry = index.read(|t| t.get("a").cloned()).ok().flatten();
        assert_eq!(
            entry.map(|e| (e.shadows.is_empty(), e.presence)),
            Some((
                true,
                Some(Presence {
                    connected: true,
                    last_seen_ms: 9000
                })
            ))
        );
        // A deleted thing's connectivity forgotten: nothing of it is left.
        index.apply(Change {
            seq: 4,
            thing: "a".into(),
            name: None,
            version: 0,
            kind: ChangeKind::Forget,
            time: 9,
            document: "{}".into(),
            state: None,
        });
        assert_eq!(index.read(|t| t.contains_key("a")).ok(), Some(false));
    }

    #[test]
    fn failed_load_answers_failed_and_drops_changes() {
        let index = FleetIndex::new();
        index.load(Err(StoreError::Closed));
        index.apply(update(1, "a", None, 1, 1));
        assert!(matches!(index.read(|_| ()), Err(IndexError::Failed)));
    }
}
