//! The fleet index: every thing's live shadows and connectivity in memory, for
//! listing and search without touching SQLite.
//!
//! Compact by design ([`compact`]): thing names once in name order, each
//! shadow's values packed in a few dozen bytes under a field layout
//! (*shape*) that the fleet's shadows share. Built at start-up from the
//! store, streamed and packed on every core while device requests are
//! served, and kept current from the committed changes, which the service's
//! publisher feeds in commit order. Changes that arrive while the store is
//! read are held and replayed on top (those the read already holds are
//! skipped by sequence).
//!
//! A search reads things in name order from where its page starts, a chunk
//! at a time on every core, and stops once it has its page: a frequent
//! match costs a few chunks, a rare one a read of every thing (a few
//! dozen bytes each, which is what makes a million take milliseconds).
//! The `plan` module narrows the read to the name ranges a query allows
//! and checks first the operand that rejects most.
//! A load lays the index out in name order, so that those reads go through
//! memory in order however the store held the fleet.

mod arena;
pub mod compact;
mod plan;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tracing::warn;

use crate::document::{self, Object};
use crate::search::{Field, Query, Scalar, ShadowPart, Term};
use crate::store::{Change, ChangeKind, Connectivity, ShadowRow, SnapshotPart, StoreError};
use arena::{Arena, Span};
use compact::Packed;
use plan::Plan;

/// A thing's connectivity as indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub connected: bool,
    pub last_seen_ms: i64,
}

/// Whether the index has loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexStatus {
    Loading,
    Ready,
    Failed,
}

/// Why the index could not answer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("fleet index is loading")]
    Loading,
    #[error("fleet index failed to load")]
    Failed,
    /// A node of a shared store whose index has not yet taken every change
    /// the other nodes committed (see `ShadowService::fleet_caught_up`).
    #[error("fleet index is behind the change log")]
    Behind,
}

/// What the index holds, for `/metrics` and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSize {
    pub things: usize,
    pub shadows: usize,
    /// Things whose device is connected now.
    pub connected: usize,
    /// Shadows whose desired state differs from their reported state.
    pub with_delta: usize,
    /// Heap bytes of the index, estimated from its parts.
    pub bytes: usize,
}

/// The in-memory fleet index.
pub struct FleetIndex {
    table: RwLock<Table>,
    /// Changes not yet applied. The publisher never waits for a search: when
    /// the index is being read it leaves its changes here, and the next
    /// writer or reader applies them first. Bounded in practice by the commit
    /// rate times the longest search; while loading, by the load time.
    pending: Mutex<Vec<Change>>,
    /// Sequence up to which the loaded store read (and so the index) is
    /// complete; changes at or below it are already in.
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

impl FleetIndex {
    /// An empty index waiting for its load.
    pub fn new() -> FleetIndex {
        FleetIndex {
            table: RwLock::new(Table::default()),
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

    /// Loads the fleet that `read` streams (in parts, returning the change
    /// sequence its read is consistent with), then replays the changes that
    /// arrived meanwhile. Rows are parsed and packed on every core while
    /// `read` goes on.
    pub fn load(&self, read: impl FnOnce(&mut dyn FnMut(SnapshotPart)) -> Result<u64, StoreError>) {
        let started = std::time::Instant::now();
        let (read, table) = build(read);
        let through = match read {
            Ok(through) => through,
            Err(err) => {
                warn!(cause = %err, "fleet index could not read the store");
                self.fail();
                return;
            }
        };
        self.fail_if_full(&table);
        let size = table.size();
        tracing::info!(
            things = size.things,
            shadows = size.shadows,
            seconds = started.elapsed().as_secs_f64(),
            "fleet index loaded"
        );
        if let Ok(mut current) = self.table.write() {
            *current = table;
        }
        if let Ok(mut loaded) = self.loaded_through.lock() {
            *loaded = Some(through);
        }
        self.drain();
        self.status.send_if_modified(|status| {
            let loading = *status == IndexStatus::Loading;
            if loading {
                *status = IndexStatus::Ready;
            }
            loading
        });
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
            if let Ok(mut table) = self.table.try_write() {
                self.drain_into(&mut table);
            }
        }
    }

    /// Applies whatever is pending (waits for readers).
    fn drain(&self) {
        if let Ok(mut table) = self.table.write() {
            self.drain_into(&mut table);
        }
    }

    fn drain_into(&self, table: &mut Table) {
        let Some(through) = self.loaded_through.lock().ok().and_then(|t| *t) else {
            return;
        };
        let changes = match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        for change in changes.into_iter().filter(|c| c.seq > through) {
            table.apply(change);
        }
        self.fail_if_full(table);
    }

    /// An index that could not take everything is not answered from.
    fn fail_if_full(&self, table: &Table) {
        if table.full && self.status() != IndexStatus::Failed {
            tracing::error!("fleet index is full (4 GiB of names or packed values); search and listing are off until restart");
            self.fail();
        }
    }

    /// Runs `read` over the index brought up to date.
    fn read<T>(&self, read: impl FnOnce(&Table) -> T) -> Result<T, IndexError> {
        match self.status() {
            IndexStatus::Loading => return Err(IndexError::Loading),
            IndexStatus::Failed => return Err(IndexError::Failed),
            IndexStatus::Ready => {}
        }
        self.drain();
        let table = self.table.read().map_err(|_| IndexError::Failed)?;
        Ok(read(&table))
    }

    /// What the index holds and its size.
    pub fn size(&self) -> Result<IndexSize, IndexError> {
        self.read(Table::size)
    }

    /// One thing, if indexed (the tests' view of the index; the API reads
    /// shadows from the store).
    #[cfg(test)]
    fn thing<T>(
        &self,
        name: &str,
        render: impl FnOnce(ThingRef<'_>) -> T,
    ) -> Result<Option<T>, IndexError> {
        self.read(|table| table.thing_ref(name).map(render))
    }

    /// Things matching `query` (all things when `None`), in name order, after
    /// `after`, at most `limit`; and whether more follow.
    pub fn search<T>(
        &self,
        query: Option<&Query>,
        after: Option<&str>,
        limit: usize,
        mut render: impl FnMut(ThingRef<'_>) -> T,
    ) -> Result<(Vec<T>, bool), IndexError> {
        self.read(|table| {
            let Some(query) = query else {
                return table.page(|_| true, after, limit, render);
            };
            let mut found = table.first_matches(query, after, limit + 1);
            let more = found.len() > limit;
            found.truncate(limit);
            let things = found
                .into_iter()
                .map(|id| render(table.thing_at(id)))
                .collect();
            (things, more)
        })
    }

    /// The fleet: things with at least one shadow (not every client id that
    /// ever connected), as [`search`](Self::search) pages them.
    pub fn list<T>(
        &self,
        after: Option<&str>,
        limit: usize,
        render: impl FnMut(ThingRef<'_>) -> T,
    ) -> Result<(Vec<T>, bool), IndexError> {
        self.read(|table| {
            let keep = |id: u32| table.things[id as usize].has_shadows();
            table.page(keep, after, limit, render)
        })
    }
}

/// Reads the store through `read` and builds a table: the reading thread
/// hands parts of rows to packers (one per core), and one builder inserts
/// what they packed. Returns `read`'s result and the table.
fn build(
    read: impl FnOnce(&mut dyn FnMut(SnapshotPart)) -> Result<u64, StoreError>,
) -> (Result<u64, StoreError>, Table) {
    let packers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (rows_tx, rows_rx) = mpsc::sync_channel::<Vec<ShadowRow>>(packers * 2);
    let rows_rx = Mutex::new(rows_rx);
    std::thread::scope(|scope| {
        let (packed_tx, packed_rx) = mpsc::sync_channel::<PackedPart>(packers * 2);
        for _ in 0..packers {
            let packed_tx = packed_tx.clone();
            let rows_rx = &rows_rx;
            scope.spawn(move || loop {
                let rows = match rows_rx.lock().map(|rx| rx.recv()) {
                    Ok(Ok(rows)) => rows,
                    _ => break,
                };
                let packed = rows.into_iter().map(PackedShadow::from_row).collect();
                if packed_tx.send(PackedPart::Shadows(packed)).is_err() {
                    break;
                }
            });
        }
        let builder = scope.spawn(move || {
            let mut table = Table::default();
            let mut members = Vec::new();
            for part in packed_rx {
                match part {
                    PackedPart::Shadows(shadows) => {
                        members.extend(shadows.into_iter().map(|shadow| {
                            let slot = table.new_shadow(shadow.entry);
                            let member = Member::Shadow(shadow.name.map(Into::into), slot);
                            (shadow.thing.into_boxed_str(), member)
                        }));
                    }
                    PackedPart::Things(things) => {
                        members.extend(things.into_iter().map(|c| {
                            let presence = Presence {
                                connected: c.connected,
                                last_seen_ms: c.last_seen_ms,
                            };
                            (c.thing.into_boxed_str(), Member::Presence(presence))
                        }));
                    }
                }
            }
            table.add_things(members);
            table.lay_out_in_name_order();
            table
        });
        let result = read(&mut |part| {
            // A send fails only when the packers or the builder died; their
            // panic is raised when the scope ends.
            let _ = match part {
                SnapshotPart::Shadows(rows) => rows_tx.send(rows).is_ok(),
                SnapshotPart::Things(things) => packed_tx.send(PackedPart::Things(things)).is_ok(),
            };
        });
        drop(rows_tx);
        drop(packed_tx);
        let table =
            crate::tasks::joined_thread("fleet index builder", builder.join()).unwrap_or_default();
        (result, table)
    })
}

enum PackedPart {
    Shadows(Vec<PackedShadow>),
    Things(Vec<Connectivity>),
}

/// What a load read of one thing: a shadow (its name, its slot) or its
/// connectivity.
enum Member {
    Shadow(Option<Box<str>>, u32),
    Presence(Presence),
}

/// One shadow packed off the index's lock.
struct PackedShadow {
    thing: String,
    name: Option<String>,
    entry: Entry,
}

/// A shadow's indexed parts before its shape is interned.
struct Entry {
    version: u64,
    has_delta: bool,
    packed: Packed,
}

impl Entry {
    /// From a `{"desired":..,"reported":..}` value.
    fn from_state(version: u64, state: &Value) -> Entry {
        let desired = state.get("desired").and_then(Value::as_object);
        let reported = state.get("reported").and_then(Value::as_object);
        Entry::from_sections(version, desired, reported)
    }

    fn from_sections(version: u64, desired: Option<&Object>, reported: Option<&Object>) -> Entry {
        Entry {
            version,
            has_delta: desired.is_some_and(|d| document::differs(d, reported)),
            packed: Packed::pack(desired, reported),
        }
    }

    /// From an update change: the writer's state when it has it, otherwise
    /// its document (`{"state":..,..}`; the metadata is skipped unparsed).
    fn from_change(change: &Change) -> Option<Entry> {
        if let Some(state) = &change.state {
            return Some(Entry::from_sections(
                change.version,
                state.desired.as_ref().map(|s| &s.state),
                state.reported.as_ref().map(|s| &s.state),
            ));
        }
        #[derive(Deserialize)]
        struct Document {
            state: Value,
        }
        let document: Document = serde_json::from_str(&change.document).ok()?;
        Some(Entry::from_state(change.version, &document.state))
    }
}

impl PackedShadow {
    fn from_row(row: ShadowRow) -> PackedShadow {
        let entry = match compact::pack_state_text(&row.state) {
            Some((packed, has_delta)) => Entry {
                version: row.version,
                has_delta,
                packed,
            },
            // Not as Umbra writes it: through a tree of values.
            None => {
                let state = serde_json::from_str::<Value>(&row.state).unwrap_or_else(|err| {
                    warn!(thing = %row.key.thing, cause = %err, "unreadable stored shadow state");
                    Value::Null
                });
                Entry::from_state(row.version, &state)
            }
        };
        PackedShadow {
            entry,
            thing: row.key.thing,
            name: row.key.name,
        }
    }
}

/// No slot.
const NONE: u32 = u32::MAX;

/// Things from which a search reads on every core.
const PARALLEL_FROM: usize = 65_536;

/// Things a search reads at a time (on one core) before it looks whether
/// it has found enough.
const SEARCH_CHUNK: usize = 4096;

/// One thing. A free slot has an empty name. Small (32 bytes): a search
/// reads every slot, so their size is its memory traffic.
#[derive(Debug)]
struct ThingSlot {
    /// In the table's `text` arena.
    name: Span,
    /// Last connect or disconnect (epoch ms), if ever seen.
    last_seen_ms: i64,
    /// Named shadows' slots, in name order (most things have none).
    named: Option<Box<NamedShadows>>,
    /// The classic shadow's slot, or `NONE`.
    classic: u32,
    /// `NEVER_SEEN`, `DISCONNECTED` or `CONNECTED`.
    connectivity: u8,
}

/// A thing's named shadows: name and slot, in name order.
type NamedShadows = Vec<(Box<str>, u32)>;

const NEVER_SEEN: u8 = 0;
const DISCONNECTED: u8 = 1;
const CONNECTED: u8 = 2;

impl Default for ThingSlot {
    fn default() -> ThingSlot {
        ThingSlot {
            name: Span::default(),
            last_seen_ms: 0,
            named: None,
            classic: NONE,
            connectivity: NEVER_SEEN,
        }
    }
}

impl ThingSlot {
    fn has_shadows(&self) -> bool {
        self.classic != NONE || self.named.is_some()
    }

    fn presence(&self) -> Option<Presence> {
        (self.connectivity != NEVER_SEEN).then_some(Presence {
            connected: self.connectivity == CONNECTED,
            last_seen_ms: self.last_seen_ms,
        })
    }

    fn set_presence(&mut self, presence: Option<Presence>) {
        self.connectivity = match presence {
            None => NEVER_SEEN,
            Some(p) if p.connected => CONNECTED,
            Some(_) => DISCONNECTED,
        };
        self.last_seen_ms = presence.map_or(0, |p| p.last_seen_ms);
    }

    fn named(&self) -> &[(Box<str>, u32)] {
        self.named.as_deref().map_or(&[], Vec::as_slice)
    }

    fn shadow(&self, name: Option<&str>) -> Option<u32> {
        match name {
            None => (self.classic != NONE).then_some(self.classic),
            Some(name) => {
                let named = self.named();
                named
                    .binary_search_by(|(n, _)| (**n).cmp(name))
                    .ok()
                    .map(|i| named[i].1)
            }
        }
    }

    /// Points the named shadow `name` at slot `new` (`NONE`: removes it);
    /// returns the slot it had.
    fn set_named(&mut self, name: &str, new: u32) -> Option<u32> {
        let named = self.named.get_or_insert_with(Box::default);
        let old = match named.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) if new == NONE => Some(named.remove(i).1),
            Ok(i) => Some(std::mem::replace(&mut named[i].1, new)),
            Err(_) if new == NONE => None,
            Err(i) => {
                named.insert(i, (name.into(), new));
                None
            }
        };
        if named.is_empty() {
            self.named = None;
        }
        old
    }
}

/// One live shadow.
#[derive(Debug, Default)]
struct ShadowSlot {
    version: u64,
    /// Packed values, in the table's `values` arena.
    values: Span,
    shape: u32,
    has_delta: bool,
}

/// Field layouts shared by shadows, counted so that a layout no shadow has
/// any more is dropped.
#[derive(Debug, Default)]
struct Shapes {
    ids: HashMap<Box<[u8]>, u32>,
    /// By id: the shape and how many shadows have it (0: a free id).
    list: Vec<(Box<[u8]>, u32)>,
    free: Vec<u32>,
    /// The shape taken last.
    last: u32,
}

impl Shapes {
    fn take(&mut self, shape: &[u8]) -> u32 {
        // Shadows stored one after another mostly share their shape.
        if let Some((last, refs)) = self.list.get_mut(self.last as usize) {
            if *refs > 0 && **last == *shape {
                *refs += 1;
                return self.last;
            }
        }
        let id = self.take_looked_up(shape);
        self.last = id;
        id
    }

    fn take_looked_up(&mut self, shape: &[u8]) -> u32 {
        if let Some(&id) = self.ids.get(shape) {
            self.list[id as usize].1 += 1;
            return id;
        }
        let id = place(&mut self.list, &mut self.free, (shape.into(), 1));
        self.ids.insert(shape.into(), id);
        id
    }

    fn release(&mut self, id: u32) {
        let Some(entry) = self.list.get_mut(id as usize) else {
            return;
        };
        entry.1 = entry.1.saturating_sub(1);
        if entry.1 == 0 {
            let shape = std::mem::take(&mut entry.0);
            self.ids.remove(&shape);
            self.free.push(id);
        }
    }

    fn get(&self, id: u32) -> &[u8] {
        self.list.get(id as usize).map_or(&[], |(s, _)| s)
    }
}

/// The index proper, behind the [`FleetIndex`]'s lock.
#[derive(Debug, Default)]
struct Table {
    /// Thing names in name order, to their slots.
    names: BTreeMap<Box<str>, u32>,
    things: Vec<ThingSlot>,
    free_things: Vec<u32>,
    shadows: Vec<ShadowSlot>,
    free_shadows: Vec<u32>,
    shapes: Shapes,
    /// Thing names, by slot.
    text: Arena,
    /// Packed shadow values, by slot.
    values: Arena,
    /// Heap bytes of the keys of `names`, for [`Table::size`] (which leaves
    /// out the lists of named shadows: most things have none).
    name_key_bytes: usize,
    /// An arena ran out of room (4 GiB): the table is incomplete.
    full: bool,
    /// Things connected now, and shadows with a delta: kept as slots change.
    connected: usize,
    with_delta: usize,
    /// `names`' slots in order, built by the first page that needs it.
    order: Mutex<Option<Arc<[u32]>>>,
}

/// Puts `item` in a free slot of `slots` (one `free` lists) or at the end;
/// its index.
fn place<T>(slots: &mut Vec<T>, free: &mut Vec<u32>, item: T) -> u32 {
    match free.pop() {
        Some(id) => {
            slots[id as usize] = item;
            id
        }
        None => {
            slots.push(item);
            (slots.len() - 1) as u32
        }
    }
}

/// Stores `bytes` in `arena`; when it is full, sets `full` (see
/// [`Table::full`]) and returns an empty span.
fn put(arena: &mut Arena, bytes: &[u8], full: &mut bool) -> Span {
    arena.put(bytes).unwrap_or_else(|| {
        *full = true;
        Span::default()
    })
}

/// Heap bytes an allocation of `len` takes (allocators round up).
fn allocation(len: usize) -> usize {
    match len {
        0 => 0,
        1..=16 => 16,
        _ => len.div_ceil(16) * 16,
    }
}

impl Table {
    fn size(&self) -> IndexSize {
        // A B-tree node holds up to 11 keys and values and is about two
        // thirds full on average.
        let names = self.names.len() * (std::mem::size_of::<(Box<str>, u32)>() * 3 / 2);
        let shapes: usize = self
            .shapes
            .list
            .iter()
            .map(|(s, _)| 2 * allocation(s.len()) + 32)
            .sum();
        IndexSize {
            things: self.names.len(),
            shadows: self.shadows.len() - self.free_shadows.len(),
            connected: self.connected,
            with_delta: self.with_delta,
            bytes: names
                + self.things.capacity() * std::mem::size_of::<ThingSlot>()
                + self.shadows.capacity() * std::mem::size_of::<ShadowSlot>()
                + shapes
                + self.text.capacity()
                + self.values.capacity()
                + self.name_key_bytes,
        }
    }

    fn order_changed(&mut self) {
        if let Ok(order) = self.order.get_mut() {
            *order = None;
        }
    }

    fn thing_id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let id = self.new_slot(name);
        self.names.insert(name.into(), id);
        self.order_changed();
        id
    }

    /// Adds the things a load read, in any order, to an empty table: sorts
    /// them by name and builds the name tree from that order, which is
    /// several times faster than inserting a fleet stored in random order
    /// name by name.
    fn add_things(&mut self, mut members: Vec<(Box<str>, Member)>) {
        // On one core: two halves sorted on two and then merged took longer.
        members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut names: Vec<(Box<str>, u32)> = Vec::new();
        for (thing, member) in members {
            let id = match names.last() {
                Some((last, id)) if *last == thing => *id,
                _ => {
                    let id = self.new_slot(&thing);
                    names.push((thing, id));
                    id
                }
            };
            match member {
                Member::Shadow(name, shadow) => self.point_shadow(id, name.as_deref(), shadow),
                Member::Presence(presence) => self.set_thing_presence(id, Some(presence)),
            }
        }
        // In order and without repeats: built in one pass.
        self.names = names.into_iter().collect();
        self.order_changed();
    }

    /// Lays the slots out in name order: things, their shadows, their
    /// names and packed values. A search reads in name order, so it then
    /// reads memory in order, whatever order the store held the fleet in
    /// (a fleet of random names, say). Done once a load has built the
    /// table; things that come later go at the end.
    fn lay_out_in_name_order(&mut self) {
        let mut old_things = std::mem::take(&mut self.things);
        let mut old_shadows = std::mem::take(&mut self.shadows);
        let mut things = Vec::with_capacity(self.names.len());
        let mut shadows = Vec::with_capacity(old_shadows.len() - self.free_shadows.len());
        let mut move_shadow = |id: u32| {
            shadows.push(std::mem::take(&mut old_shadows[id as usize]));
            (shadows.len() - 1) as u32
        };
        for id in self.names.values_mut() {
            let mut slot = std::mem::take(&mut old_things[*id as usize]);
            if slot.classic != NONE {
                slot.classic = move_shadow(slot.classic);
            }
            for (_, shadow) in slot.named.iter_mut().flat_map(|named| named.iter_mut()) {
                *shadow = move_shadow(*shadow);
            }
            *id = things.len() as u32;
            things.push(slot);
        }
        self.things = things;
        self.shadows = shadows;
        self.free_things.clear();
        self.free_shadows.clear();
        // The names and the values side by side.
        let (text, things) = (&mut self.text, &mut self.things);
        let (values, shadows) = (&mut self.values, &mut self.shadows);
        std::thread::scope(|scope| {
            scope.spawn(|| text.compact(things.iter_mut().map(|slot| &mut slot.name)));
            values.compact(shadows.iter_mut().map(|slot| &mut slot.values));
        });
        let order = (0..self.things.len() as u32).collect();
        if let Ok(cached) = self.order.get_mut() {
            *cached = Some(order);
        }
    }

    /// A slot for a thing about to enter `names`.
    fn new_slot(&mut self, name: &str) -> u32 {
        let slot = ThingSlot {
            name: put(&mut self.text, name.as_bytes(), &mut self.full),
            ..ThingSlot::default()
        };
        self.name_key_bytes += allocation(name.len());
        place(&mut self.things, &mut self.free_things, slot)
    }

    /// Drops a thing with neither shadows nor connectivity.
    fn drop_if_empty(&mut self, id: u32) {
        let slot = &mut self.things[id as usize];
        if slot.has_shadows() || slot.presence().is_some() {
            return;
        }
        let span = std::mem::take(&mut slot.name);
        let name = std::str::from_utf8(self.text.get(span)).unwrap_or_default();
        self.name_key_bytes -= allocation(name.len());
        self.names.remove(name);
        self.text.free(span);
        self.order_changed();
        self.free_things.push(id);
        if self.text.wants_compaction() {
            self.text
                .compact(self.things.iter_mut().map(|slot| &mut slot.name));
        }
    }

    fn new_shadow(&mut self, entry: Entry) -> u32 {
        let slot = ShadowSlot {
            version: entry.version,
            values: put(&mut self.values, &entry.packed.values, &mut self.full),
            shape: self.shapes.take(&entry.packed.shape),
            has_delta: entry.has_delta,
        };
        self.with_delta += usize::from(slot.has_delta);
        place(&mut self.shadows, &mut self.free_shadows, slot)
    }

    fn free_shadow(&mut self, id: u32) {
        let slot = std::mem::take(&mut self.shadows[id as usize]);
        self.with_delta -= usize::from(slot.has_delta);
        self.values.free(slot.values);
        self.shapes.release(slot.shape);
        self.free_shadows.push(id);
        if self.values.wants_compaction() {
            self.values
                .compact(self.shadows.iter_mut().map(|slot| &mut slot.values));
        }
    }

    fn set_shadow(&mut self, id: u32, name: Option<&str>, entry: Entry) {
        let new = self.new_shadow(entry);
        self.point_shadow(id, name, new);
    }

    /// Points thing `id`'s shadow `name` at shadow slot `new`, freeing the
    /// slot it had.
    fn point_shadow(&mut self, id: u32, name: Option<&str>, new: u32) {
        let slot = &mut self.things[id as usize];
        let old = match name {
            None => Some(std::mem::replace(&mut slot.classic, new)).filter(|&o| o != NONE),
            Some(name) => slot.set_named(name, new),
        };
        if let Some(old) = old {
            self.free_shadow(old);
        }
    }

    fn remove_shadow(&mut self, thing: &str, name: Option<&str>) {
        let Some(&id) = self.names.get(thing) else {
            return;
        };
        let slot = &mut self.things[id as usize];
        let old = match name {
            None => Some(std::mem::replace(&mut slot.classic, NONE)).filter(|&o| o != NONE),
            Some(name) => slot.set_named(name, NONE),
        };
        if let Some(old) = old {
            self.free_shadow(old);
        }
        self.drop_if_empty(id);
    }

    fn set_presence(&mut self, thing: &str, presence: Presence) {
        let id = self.thing_id(thing);
        self.set_thing_presence(id, Some(presence));
    }

    /// Sets a thing's connectivity, keeping the count of things connected.
    fn set_thing_presence(&mut self, id: u32, presence: Option<Presence>) {
        let slot = &mut self.things[id as usize];
        let was = slot.connectivity == CONNECTED;
        slot.set_presence(presence);
        let is = slot.connectivity == CONNECTED;
        self.connected = self.connected + usize::from(is) - usize::from(was);
    }

    fn forget(&mut self, thing: &str) {
        if let Some(&id) = self.names.get(thing) {
            self.set_thing_presence(id, None);
            self.drop_if_empty(id);
        }
    }

    fn apply(&mut self, change: Change) {
        match change.kind {
            ChangeKind::Update => match Entry::from_change(&change) {
                Some(entry) => {
                    let id = self.thing_id(&change.thing);
                    self.set_shadow(id, change.name.as_deref(), entry)
                }
                None => {
                    warn!(thing = %change.thing, seq = change.seq, "unreadable change document")
                }
            },
            ChangeKind::Delete => self.remove_shadow(&change.thing, change.name.as_deref()),
            ChangeKind::Forget => self.forget(&change.thing),
            ChangeKind::Connect | ChangeKind::Disconnect => {
                let last_seen_ms = serde_json::from_str::<Value>(&change.document)
                    .ok()
                    .and_then(|d| d.get("timestamp").and_then(Value::as_i64))
                    .unwrap_or(change.time * 1000);
                let presence = Presence {
                    connected: change.kind == ChangeKind::Connect,
                    last_seen_ms,
                };
                self.set_presence(&change.thing, presence);
            }
        }
    }

    #[cfg(test)]
    fn thing_ref(&self, name: &str) -> Option<ThingRef<'_>> {
        let (name, &id) = self.names.get_key_value(name)?;
        Some(ThingRef {
            name,
            slot: &self.things[id as usize],
            table: self,
        })
    }

    /// The first `need` things `query` matches, in name order after
    /// `after`. Only the name ranges the query allows are read (see the
    /// `plan` module); they are read a chunk at a time, on every core
    /// when there are many things, and reading stops as soon as the chunks
    /// finished in order hold `need` matches: a frequent match is found
    /// near the start, a rare one costs a read of every thing.
    fn first_matches(&self, query: &Query, after: Option<&str>, need: usize) -> Vec<u32> {
        let terms = query.terms();
        let order = self.name_order();
        let start = after.map_or(0, |after| {
            order.partition_point(|&id| self.name(id) <= after)
        });
        let mut plan = Plan::new(query);
        let ranges: Vec<&[u32]> = match &plan.prefixes {
            Some(prefixes) => prefixes
                .iter()
                .map(|prefix| {
                    let first = order.partition_point(|&id| self.name(id) < *prefix);
                    let end = first
                        + order[first..].partition_point(|&id| self.name(id).starts_with(prefix));
                    &order[first.max(start)..end.max(start)]
                })
                .collect(),
            None => vec![&order[start..]],
        };
        let mut fields = FieldPositions::new(&terms, self.shapes.list.len());
        plan.order(&ranges, |operand, id| {
            self.holds(operand, &terms, &self.things[id as usize], &mut fields)
        });
        let chunks: Vec<&[u32]> = ranges
            .into_iter()
            .flat_map(|range| range.chunks(SEARCH_CHUNK))
            .collect();
        let threads = match chunks.len() * SEARCH_CHUNK {
            0..PARALLEL_FROM => 1,
            _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        // Matches by chunk, and how many chunks from the first are done.
        struct Progress {
            chunks: Vec<Option<Vec<u32>>>,
            done: usize,
            found: usize,
        }
        let progress = Mutex::new(Progress {
            chunks: vec![None; chunks.len()],
            done: 0,
            found: 0,
        });
        let next = AtomicUsize::new(0);
        let enough = AtomicBool::new(false);
        let work = || {
            let mut fields = FieldPositions::new(&terms, self.shapes.list.len());
            while !enough.load(Ordering::Relaxed) {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(ids) = chunks.get(k) else {
                    break;
                };
                let found: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|&id| {
                        let slot = &self.things[id as usize];
                        plan.operands
                            .iter()
                            .all(|operand| self.holds(operand, &terms, slot, &mut fields))
                    })
                    .collect();
                let mut progress = match progress.lock() {
                    Ok(progress) => progress,
                    Err(poisoned) => poisoned.into_inner(),
                };
                progress.chunks[k] = Some(found);
                while let Some(Some(part)) = progress.chunks.get(progress.done) {
                    let len = part.len();
                    progress.found += len;
                    progress.done += 1;
                }
                if progress.found >= need {
                    enough.store(true, Ordering::Relaxed);
                }
            }
        };
        if threads == 1 {
            work();
        } else {
            std::thread::scope(|scope| {
                let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
                work();
                for helper in helpers {
                    crate::tasks::joined_thread("fleet search", helper.join());
                }
            });
        }
        let progress = match progress.into_inner() {
            Ok(progress) => progress,
            Err(poisoned) => poisoned.into_inner(),
        };
        progress
            .chunks
            .into_iter()
            .take(progress.done)
            .flatten()
            .flatten()
            .take(need)
            .collect()
    }

    /// Whether the thing in `slot` matches `query` (whose terms are `terms`).
    fn holds(
        &self,
        query: &Query,
        terms: &[&Term],
        slot: &ThingSlot,
        fields: &mut FieldPositions,
    ) -> bool {
        query.matches_with(&mut |term| {
            let index = terms
                .iter()
                .position(|t| std::ptr::eq(*t, term))
                .unwrap_or(0);
            self.term_holds(slot, term, index, fields)
        })
    }

    fn term_holds(
        &self,
        thing: &ThingSlot,
        term: &Term,
        index: usize,
        fields: &mut FieldPositions,
    ) -> bool {
        let test = &term.test;
        match &term.field {
            Field::ThingName => {
                let name = std::str::from_utf8(self.text.get(thing.name)).unwrap_or_default();
                test.matches_scalar(Scalar::Text(name))
            }
            Field::Connected => thing
                .presence()
                .is_some_and(|p| test.matches_scalar(Scalar::Bool(p.connected))),
            Field::ConnectivityTimestamp => thing
                .presence()
                .is_some_and(|p| test.matches_scalar(Scalar::Number(p.last_seen_ms as f64))),
            Field::Shadow { name: shadow, part } => {
                let Some(id) = thing.shadow(shadow.as_deref()) else {
                    return false;
                };
                let shadow = &self.shadows[id as usize];
                match part {
                    ShadowPart::HasDelta => test.matches_scalar(Scalar::Bool(shadow.has_delta)),
                    ShadowPart::Version => {
                        test.matches_scalar(Scalar::Number(shadow.version as f64))
                    }
                    ShadowPart::Desired(_) | ShadowPart::Reported(_) => {
                        let Some(at) = fields.position(self, shadow.shape, index) else {
                            return false;
                        };
                        match compact::field(self.values.get(shadow.values), at) {
                            Some(compact::Field::Array(text)) => {
                                serde_json::from_str::<Value>(text).is_ok_and(|v| test.matches(&v))
                            }
                            Some(field) => field.scalar().is_some_and(|s| test.matches_scalar(s)),
                            None => false,
                        }
                    }
                }
            }
        }
    }

    /// Up to `limit` things that `keep` keeps, in name order after `after`;
    /// and whether more follow.
    fn page<T>(
        &self,
        keep: impl Fn(u32) -> bool,
        after: Option<&str>,
        limit: usize,
        mut render: impl FnMut(ThingRef<'_>) -> T,
    ) -> (Vec<T>, bool) {
        let order = self.name_order();
        let start = match after {
            Some(after) => order.partition_point(|&id| self.name(id) <= after),
            None => 0,
        };
        let mut out = Vec::new();
        for &id in &order[start..] {
            if !keep(id) {
                continue;
            }
            if out.len() == limit {
                return (out, true);
            }
            out.push(render(self.thing_at(id)));
        }
        (out, false)
    }

    fn thing_at(&self, id: u32) -> ThingRef<'_> {
        ThingRef {
            name: self.name(id),
            slot: &self.things[id as usize],
            table: self,
        }
    }

    fn name(&self, id: u32) -> &str {
        let span = self.things[id as usize].name;
        std::str::from_utf8(self.text.get(span)).unwrap_or_default()
    }

    /// Thing slots in name order: a walk of the name tree, kept until a
    /// thing comes or goes (an array is read far faster than the tree).
    fn name_order(&self) -> Arc<[u32]> {
        let mut cached = match self.order.lock() {
            Ok(cached) => cached,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(cached.get_or_insert_with(|| self.names.values().copied().collect()))
    }
}

/// Where each shape holds each state term's field, worked out once per
/// shape and query.
struct FieldPositions<'q> {
    terms: &'q [&'q Term],
    /// By shape id: per term, the field's position in the shape.
    by_shape: Vec<Option<Box<[Option<usize>]>>>,
}

impl<'q> FieldPositions<'q> {
    fn new(terms: &'q [&'q Term], shapes: usize) -> FieldPositions<'q> {
        FieldPositions {
            terms,
            by_shape: (0..shapes).map(|_| None).collect(),
        }
    }

    fn position(&mut self, table: &Table, shape: u32, term: usize) -> Option<usize> {
        let slot = self.by_shape.get_mut(shape as usize)?;
        let positions = slot.get_or_insert_with(|| {
            let paths = compact::paths(table.shapes.get(shape));
            self.terms
                .iter()
                .map(|term| {
                    let (section, path) = match &term.field {
                        Field::Shadow {
                            part: ShadowPart::Desired(path),
                            ..
                        } => (compact::DESIRED, path),
                        Field::Shadow {
                            part: ShadowPart::Reported(path),
                            ..
                        } => (compact::REPORTED, path),
                        _ => return None,
                    };
                    paths.iter().position(|p| {
                        p.section == section
                            && p.segments.len() == path.len()
                            && p.segments.iter().zip(path).all(|(a, b)| *a == b)
                    })
                })
                .collect()
        });
        positions.get(term).copied().flatten()
    }
}

/// A thing as a listing or search result sees it.
#[derive(Clone, Copy)]
pub struct ThingRef<'a> {
    name: &'a str,
    slot: &'a ThingSlot,
    table: &'a Table,
}

impl std::fmt::Debug for ThingRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThingRef")
            .field("name", &self.name)
            .finish()
    }
}

/// One of a thing's shadows as indexed.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowView {
    pub version: u64,
    pub has_delta: bool,
    pub desired: Option<Object>,
    pub reported: Option<Object>,
}

impl ShadowView {
    /// `{"desired","reported","hasDelta","version"}`.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        if let Some(d) = &self.desired {
            out.insert("desired".into(), Value::Object(d.clone()));
        }
        if let Some(r) = &self.reported {
            out.insert("reported".into(), Value::Object(r.clone()));
        }
        out.insert("hasDelta".into(), self.has_delta.into());
        out.insert("version".into(), self.version.into());
        Value::Object(out)
    }
}

impl<'a> ThingRef<'a> {
    pub fn name(&self) -> &'a str {
        self.name
    }

    pub fn presence(&self) -> Option<Presence> {
        self.slot.presence()
    }

    /// `(name, version)` of each shadow, the classic shadow first, then
    /// named ones in name order.
    pub fn versions(&self) -> impl Iterator<Item = (Option<&'a str>, u64)> + 'a {
        let table = self.table;
        let classic = self.slot.shadow(None).map(|id| (None, id));
        let named = self.slot.named().iter().map(|(n, id)| (Some(&**n), *id));
        classic
            .into_iter()
            .chain(named)
            .map(move |(name, id)| (name, table.shadows[id as usize].version))
    }

    /// One shadow (`None`: the classic one), unpacked.
    pub fn shadow(&self, name: Option<&str>) -> Option<ShadowView> {
        let shadow = &self.table.shadows[self.slot.shadow(name)? as usize];
        let (desired, reported) = compact::unpack(
            self.table.shapes.get(shadow.shape),
            self.table.values.get(shadow.values),
        );
        Some(ShadowView {
            version: shadow.version,
            has_delta: shadow.has_delta,
            desired,
            reported,
        })
    }

    /// The thing as a search result: name, connectivity, classic shadow and named shadows.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("thingName".into(), self.name.into());
        if let Some(p) = self.slot.presence() {
            out.insert(
                "connectivity".into(),
                serde_json::json!({"connected": p.connected, "timestamp": p.last_seen_ms}),
            );
        }
        let mut shadow = match self.shadow(None) {
            Some(classic) => classic.to_json(),
            None => Value::Object(Map::new()),
        };
        let named: Map<String, Value> = self
            .slot
            .named()
            .iter()
            .filter_map(|(name, _)| Some((name.to_string(), self.shadow(Some(name))?.to_json())))
            .collect();
        if let (false, Value::Object(map)) = (named.is_empty(), &mut shadow) {
            map.insert("name".into(), Value::Object(named));
        }
        out.insert("shadow".into(), shadow);
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::ShadowState;
    use crate::topic::ShadowKey;
    use std::sync::Arc;

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

    fn presence(seq: u64, thing: &str, connected: bool, at_ms: i64) -> Change {
        Change {
            seq,
            thing: thing.into(),
            name: None,
            version: 0,
            kind: if connected {
                ChangeKind::Connect
            } else {
                ChangeKind::Disconnect
            },
            time: 9,
            document: format!(r#"{{"connected":{connected},"timestamp":{at_ms}}}"#),
            state: None,
        }
    }

    fn loaded(parts: Vec<SnapshotPart>, through: u64) -> FleetIndex {
        let index = FleetIndex::new();
        index.load(|each| {
            parts.into_iter().for_each(each);
            Ok(through)
        });
        index
    }

    fn shadow(index: &FleetIndex, thing: &str, name: Option<&str>) -> Option<ShadowView> {
        index
            .thing(thing, |t| t.shadow(name))
            .ok()
            .flatten()
            .flatten()
    }

    fn temp(index: &FleetIndex, thing: &str) -> Option<i64> {
        shadow(index, thing, None)?.reported?.get("temp")?.as_i64()
    }

    fn names(index: &FleetIndex, query: &str) -> Vec<String> {
        let query = Query::parse(query).expect("valid query");
        index
            .search(Some(&query), None, 100, |t| t.name().to_string())
            .map(|(names, _)| names)
            .unwrap_or_default()
    }

    fn row(thing: &str, name: Option<&str>, version: u64, state: Value) -> ShadowRow {
        ShadowRow {
            key: ShadowKey {
                thing: thing.into(),
                name: name.map(str::to_string),
            },
            version,
            state: state.to_string(),
        }
    }

    #[test]
    fn an_update_with_the_writers_state_is_indexed_from_that_state() {
        let index = loaded(vec![], 0);
        let state = Arc::new(ShadowState::from_values(
            &serde_json::json!({"desired": {"temp": 8}, "reported": {"temp": 7}}),
            &Value::Null,
        ));
        // The document says otherwise: the writer's state is what counts.
        index.apply(Change {
            state: Some(state),
            ..update(1, "a", None, 1, 1)
        });
        let indexed = shadow(&index, "a", None).expect("indexed");
        assert!(indexed.has_delta);
        assert_eq!(temp(&index, "a"), Some(7));
        assert_eq!(
            indexed.to_json(),
            serde_json::json!({"desired": {"temp": 8}, "reported": {"temp": 7}, "hasDelta": true, "version": 1})
        );
    }

    #[test]
    fn changes_during_load_are_replayed_over_the_store_read() {
        let index = FleetIndex::new();
        assert!(matches!(index.size(), Err(IndexError::Loading)));
        // Published while the store was being read: seq 2 is in the read, 3 is not.
        index.apply(update(2, "a", None, 2, 20));
        index.apply(update(3, "a", None, 3, 30));
        index.load(|each| {
            each(SnapshotPart::Shadows(vec![row(
                "a",
                None,
                2,
                serde_json::json!({"reported": {"temp": 20}}),
            )]));
            each(SnapshotPart::Things(vec![Connectivity {
                thing: "b".into(),
                connected: true,
                last_seen_ms: 5,
            }]));
            Ok(2)
        });
        assert_eq!(index.status(), IndexStatus::Ready);
        assert_eq!(temp(&index, "a"), Some(30));
        let all = index.search(None, None, 10, |t| t.name().to_string());
        assert_eq!(
            all.ok(),
            Some((vec!["a".to_string(), "b".to_string()], false))
        );
        // The fleet list leaves out "b", known only from its connectivity.
        let listed = index.list(None, 10, |t| t.name().to_string());
        assert_eq!(listed.ok(), Some((vec!["a".to_string()], false)));
    }

    #[test]
    fn a_load_of_many_parts_indexes_every_row() {
        let parts = (0..10)
            .map(|p| {
                SnapshotPart::Shadows(
                    (0..1000)
                        .map(|i| {
                            let n = p * 1000 + i;
                            row(
                                &format!("t{n:05}"),
                                None,
                                n,
                                serde_json::json!({"reported": {"n": n}}),
                            )
                        })
                        .collect(),
                )
            })
            .collect();
        let index = loaded(parts, 0);
        assert_eq!(index.size().map(|s| s.shadows).ok(), Some(10_000));
        assert_eq!(
            names(&index, "shadow.reported.n:[4998 TO 5001]"),
            ["t04998", "t04999", "t05000", "t05001"]
        );
        let page = index.search(None, Some("t09997"), 10, |t| t.name().to_string());
        assert_eq!(
            page.ok(),
            Some((vec!["t09998".to_string(), "t09999".to_string()], false))
        );
    }

    /// A fleet stored in the reverse of name order is laid out in name
    /// order once loaded: things, then each thing's shadows, and every
    /// value still where it belongs.
    #[test]
    fn a_loaded_table_is_laid_out_in_name_order() {
        let rows = (0..300u64)
            .rev()
            .flat_map(|n| {
                let thing = format!("t{n:03}");
                [
                    row(&thing, None, n, serde_json::json!({"reported": {"n": n}})),
                    row(
                        &thing,
                        Some("cfg"),
                        n + 1,
                        serde_json::json!({"desired": {"m": n}}),
                    ),
                ]
            })
            .collect();
        let presence = Connectivity {
            thing: "t007".into(),
            connected: true,
            last_seen_ms: 7,
        };
        let index = loaded(
            vec![
                SnapshotPart::Shadows(rows),
                SnapshotPart::Things(vec![presence]),
            ],
            0,
        );
        {
            let table = index.table.read().expect("table");
            let names: Vec<&str> = (0..table.things.len() as u32)
                .map(|id| table.name(id))
                .collect();
            let expected: Vec<String> = (0..300).map(|n| format!("t{n:03}")).collect();
            assert_eq!(names, expected);
            let shadows: Vec<(u32, Vec<u32>)> = table
                .things
                .iter()
                .map(|t| (t.classic, t.named().iter().map(|(_, id)| *id).collect()))
                .collect();
            let in_order: Vec<(u32, Vec<u32>)> =
                (0..300).map(|i| (2 * i, vec![2 * i + 1])).collect();
            assert_eq!(shadows, in_order);
        }
        for n in [0u64, 7, 150, 299] {
            let json = index
                .thing(&format!("t{n:03}"), |t| t.to_json())
                .ok()
                .flatten()
                .unwrap_or_default();
            assert_eq!(json["shadow"]["reported"]["n"], n, "{json}");
            assert_eq!(json["shadow"]["version"], n, "{json}");
            assert_eq!(json["shadow"]["name"]["cfg"]["desired"]["m"], n, "{json}");
            assert_eq!(json["shadow"]["name"]["cfg"]["version"], n + 1, "{json}");
            let connected = (n == 7).then_some(true);
            assert_eq!(
                json["connectivity"]["connected"].as_bool(),
                connected,
                "{json}"
            );
        }
        // New things after the load go at the end, found as before.
        index.apply(update(1, "s-new", None, 1, 5));
        assert_eq!(temp(&index, "s-new"), Some(5));
        assert_eq!(
            names(&index, "thingName:s-new OR thingName:t299"),
            ["s-new", "t299"]
        );
    }

    /// Enough things for a search on every core, stored in the reverse of
    /// name order: each query's pages, followed to the end, are exactly the
    /// things a brute-force check finds, in name order.
    #[test]
    fn pages_of_a_large_search_are_every_match_in_name_order() {
        const THINGS: u64 = PARALLEL_FROM as u64 + 5_000;
        let parts = (0..THINGS)
            .rev()
            .collect::<Vec<_>>()
            .chunks(4096)
            .map(|ns| {
                SnapshotPart::Shadows(
                    ns.iter()
                        .map(|&n| {
                            let state = serde_json::json!({"reported": {"n": n, "k": n % 7}});
                            row(&format!("t{n:05}"), None, 1, state)
                        })
                        .collect(),
                )
            })
            .collect();
        let index = loaded(parts, 0);
        let cases: [(&str, &dyn Fn(u64) -> bool); 6] = [
            ("shadow.reported.k:3", &|n| n % 7 == 3),
            ("shadow.reported.n>=70000", &|n| n >= 70_000),
            ("shadow.reported.n:12345", &|n| n == 12_345),
            (
                "thingName:t123* OR thingName:t0001* OR thingName:t5* OR thingName:t12345",
                &|n| n / 100 == 123 || n / 10 == 1 || n / 10_000 == 5,
            ),
            (
                "(thingName:t2* OR thingName:t04*) AND shadow.reported.k:0",
                &|n| (n / 10_000 == 2 || n / 1_000 == 4) && n % 7 == 0,
            ),
            (
                "NOT shadow.reported.k:6 AND shadow.reported.n:[30000 TO 30100]",
                &|n| n % 7 != 6 && (30_000..=30_100).contains(&n),
            ),
        ];
        for ((query, holds), size) in cases.into_iter().flat_map(|c| [(c, 1000), (c, 5000)]) {
            let query = Query::parse(query).expect("query");
            let mut found = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let (page, more) = index
                    .search(Some(&query), after.as_deref(), size, |t| {
                        t.name().to_string()
                    })
                    .expect("search");
                after = page.last().cloned();
                found.extend(page);
                if !more {
                    break;
                }
            }
            let expected: Vec<String> = (0..THINGS)
                .filter(|&n| holds(n))
                .map(|n| format!("t{n:05}"))
                .collect();
            assert_eq!(found, expected, "{query:?}");
        }
    }

    #[test]
    fn applies_never_wait_for_readers() {
        let index = loaded(vec![], 0);
        index.apply(update(1, "a", None, 1, 1));
        let seen = index.search(None, None, 10, |t| {
            // A change published during a read is left pending...
            index.apply(update(2, "a", None, 2, 2));
            t.versions().next().map(|(_, v)| v)
        });
        assert_eq!(seen.ok().map(|(v, _)| v), Some(vec![Some(1)]));
        // ...and applied before the next read.
        assert_eq!(temp(&index, "a"), Some(2));
    }

    #[test]
    fn search_matches_as_the_query_says() {
        let index = loaded(vec![], 0);
        let put = |seq: u64, thing: &str, name: Option<&str>, state: Value| {
            let mut change = update(seq, thing, name, seq, 0);
            change.document = serde_json::json!({"state": state}).to_string();
            index.apply(change);
        };
        put(
            1,
            "lamp-1",
            None,
            serde_json::json!({"desired": {"on": true}, "reported": {"on": false, "fw": {"version": "1.3.0"}}}),
        );
        put(
            2,
            "lamp-2",
            None,
            serde_json::json!({"desired": {"on": true}, "reported": {"on": true, "tags": ["a", "b"]}}),
        );
        put(
            3,
            "meter-1",
            None,
            serde_json::json!({"reported": {"kwh": 12.5, "fw": {"version": "1.2.0"}}}),
        );
        put(
            4,
            "meter-1",
            Some("cfg"),
            serde_json::json!({"desired": {"rate": 60}}),
        );
        index.apply(presence(5, "lamp-2", true, 1000));
        index.apply(presence(6, "meter-1", false, 2000));
        assert_eq!(names(&index, "shadow.hasDelta:true"), ["lamp-1"]);
        assert_eq!(names(&index, "shadow.name.cfg.hasDelta:true"), ["meter-1"]);
        assert_eq!(
            names(&index, "shadow.reported.fw.version:1.3.0"),
            ["lamp-1"]
        );
        assert_eq!(names(&index, "shadow.reported.fw:*"), ["lamp-1", "meter-1"]);
        assert_eq!(names(&index, "shadow.reported.kwh>12"), ["meter-1"]);
        assert_eq!(names(&index, "shadow.reported.tags:b"), ["lamp-2"]);
        assert_eq!(
            names(&index, "shadow.name.cfg.desired.rate:60"),
            ["meter-1"]
        );
        assert_eq!(names(&index, "connectivity.connected:true"), ["lamp-2"]);
        assert_eq!(
            names(
                &index,
                "NOT thingName:lamp-* OR shadow.desired.on:true AND shadow.reported.on:true"
            ),
            ["lamp-2", "meter-1"]
        );
        assert_eq!(
            names(&index, "shadow.reported.nothing:*"),
            Vec::<String>::new()
        );
        // A name prefix at the top: only that range of names is evaluated.
        assert_eq!(names(&index, "thingName:lamp-*"), ["lamp-1", "lamp-2"]);
        assert_eq!(
            names(&index, "shadow.reported.on:true AND thingName:lamp*"),
            ["lamp-2"]
        );
        assert_eq!(
            names(&index, "thingName:meter-1 AND shadow.reported.kwh:*"),
            ["meter-1"]
        );
        assert_eq!(names(&index, "thingName:meter-1*"), ["meter-1"]);
        assert_eq!(names(&index, "thingName:meter"), Vec::<String>::new());
        assert_eq!(names(&index, "thingName:zzz*"), Vec::<String>::new());
        assert_eq!(names(&index, "thingName:l*-2"), ["lamp-2"]);
        let versions = index
            .thing("meter-1", |t| {
                t.versions()
                    .map(|(n, v)| (n.map(str::to_string), v))
                    .collect::<Vec<_>>()
            })
            .ok()
            .flatten();
        assert_eq!(versions, Some(vec![(None, 3), (Some("cfg".into()), 4)]));
        let json = index.thing("meter-1", |t| t.to_json()).ok().flatten();
        assert_eq!(
            json,
            Some(serde_json::json!({
                "thingName": "meter-1",
                "connectivity": {"connected": false, "timestamp": 2000},
                "shadow": {"reported": {"kwh": 12.5, "fw": {"version": "1.2.0"}}, "hasDelta": false, "version": 3,
                           "name": {"cfg": {"desired": {"rate": 60}, "hasDelta": true, "version": 4}}}
            }))
        );
    }

    /// The counts of connected things and shadows with a delta, kept as
    /// changes come, match a model of the fleet through a random run of
    /// updates, deletes, connects, disconnects and forgets.
    #[test]
    fn connected_and_delta_counts_follow_every_change() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let index = loaded(vec![], 0);
        let mut deltas: HashMap<(String, Option<String>), bool> = HashMap::new();
        let mut connected: HashMap<String, bool> = HashMap::new();
        for seq in 1..=3000u64 {
            let thing = format!("t{}", rng.gen_range(0..20));
            let name = rng.gen_bool(0.3).then(|| "cfg".to_string());
            let change = match rng.gen_range(0..10) {
                0..=4 => {
                    let (desired, reported) = (rng.gen_range(0..2), rng.gen_range(0..2));
                    deltas.insert((thing.clone(), name.clone()), desired != reported);
                    let mut change = update(seq, &thing, name.as_deref(), seq, 0);
                    change.document = format!(
                        r#"{{"state":{{"desired":{{"x":{desired}}},"reported":{{"x":{reported}}}}},"metadata":{{}},"version":{seq}}}"#
                    );
                    change
                }
                5 => {
                    deltas.remove(&(thing.clone(), name.clone()));
                    Change {
                        kind: ChangeKind::Delete,
                        ..update(seq, &thing, name.as_deref(), seq, 0)
                    }
                }
                6..=7 => {
                    let up = rng.gen_bool(0.5);
                    connected.insert(thing.clone(), up);
                    presence(seq, &thing, up, seq as i64)
                }
                _ => {
                    connected.remove(&thing);
                    Change {
                        kind: ChangeKind::Forget,
                        ..presence(seq, &thing, false, 0)
                    }
                }
            };
            index.apply(change);
            let size = index.size().expect("size");
            assert_eq!(
                (size.connected, size.with_delta, size.shadows),
                (
                    connected.values().filter(|&&c| c).count(),
                    deltas.values().filter(|&&d| d).count(),
                    deltas.len()
                ),
                "after change {seq}"
            );
        }
    }

    #[test]
    fn delete_and_presence() {
        let index = loaded(vec![], 0);
        index.apply(update(1, "a", Some("cfg"), 1, 1));
        index.apply(presence(2, "a", true, 9000));
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
        let entry = index
            .thing("a", |t| (t.versions().count(), t.presence()))
            .ok()
            .flatten();
        assert_eq!(
            entry,
            Some((
                0,
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
        assert_eq!(index.thing("a", |_| ()).ok(), Some(None));
        assert_eq!(
            index.size().map(|s| (s.things, s.shadows)).ok(),
            Some((0, 0))
        );
    }

    #[test]
    fn replaced_and_deleted_shadows_give_their_memory_back() {
        let index = loaded(vec![], 0);
        // Every update a field of a new name: each shape is dropped once no
        // shadow has it, and slots are reused.
        for seq in 1..=1000u64 {
            let mut change = update(seq, &format!("t{}", seq % 10), None, seq, 0);
            change.document = format!(r#"{{"state":{{"reported":{{"k{seq}":1}}}}}}"#);
            index.apply(change);
        }
        let size = index.size().expect("ready");
        assert_eq!((size.things, size.shadows), (10, 10));
        let table = index.table.read().expect("lock");
        assert_eq!(table.shapes.ids.len(), 10);
        assert!(table.shadows.len() <= 11, "{} slots", table.shadows.len());
    }

    #[test]
    fn failed_load_answers_failed_and_drops_changes() {
        let index = FleetIndex::new();
        index.load(|_| Err(StoreError::Closed));
        index.apply(update(1, "a", None, 1, 1));
        assert!(matches!(index.size(), Err(IndexError::Failed)));
    }
}
