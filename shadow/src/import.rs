//! Bulk loading of shadows (`umbra import FILE`): JSON lines of
//! `{"thing": .., "name": .., "state": {"desired": .., "reported": ..}}`,
//! each applied as the update request it amounts to, through the same
//! validation, rules and group commit as a device's update (so an import
//! onto existing shadows merges, bumps versions and writes the change log).
//!
//! A line that cannot be loaded is reported with its number and reason; the
//! others load. Nothing is counted as imported before its batch committed.

use std::collections::VecDeque;
use std::io::BufRead;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::engine::Command;
use crate::limits::Limits;
use crate::request::parse_update;
use crate::store::{Committed, CommittedBatch, Job, ShadowStore, StoreError};
use crate::topic::ShadowKey;

/// One line of an import file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    thing: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(borrow)]
    state: &'a RawValue,
}

/// How far an import got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportProgress {
    /// Lines read (blank lines included).
    pub lines: u64,
    /// Shadows committed.
    pub imported: u64,
    /// Lines refused.
    pub refused: u64,
}

/// Why an import stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the import file: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store stopped committing")]
    StoreStopped,
}

/// Lines read, sorted and submitted at a time (see [`import`]).
pub const SORT_CHUNK: usize = 262_144;

/// Loads every line of `input` into `store`, whose committed batches arrive
/// on `committed` (nothing else may be submitting). Keeps at most
/// `in_flight` jobs queued (at most the store's queue capacity). Calls
/// `refused(line, reason)` for each line not loaded and `progress` about
/// once a second. Returns once every loaded line is committed.
///
/// Lines are read `sort_chunk` at a time and each chunk is submitted in
/// the order of shadow names, stably: one shadow's lines keep their order,
/// and a chunk commits in batches that each touch a narrow range of the
/// store's name indexes. A fleet listed in random order would otherwise
/// rewrite most index pages at every commit (measured: 2.2× slower).
#[allow(clippy::too_many_arguments)]
pub fn import(
    input: impl BufRead,
    store: &dyn ShadowStore,
    committed: &mut mpsc::Receiver<CommittedBatch>,
    limits: &Limits,
    in_flight: usize,
    sort_chunk: usize,
    mut refused: impl FnMut(u64, &str),
    mut progress: impl FnMut(ImportProgress),
) -> Result<ImportProgress, ImportError> {
    let mut run = Run {
        store,
        committed,
        limits,
        in_flight: in_flight.max(1),
        done: ImportProgress::default(),
        queued: VecDeque::new(),
        last_report: Instant::now(),
    };
    let mut chunk: Vec<Pending> = Vec::new();
    for bytes in input.split(b'\n') {
        let bytes = bytes?;
        run.done.lines += 1;
        let line = run.done.lines;
        // A line that is not UTF-8 is refused like any other bad line.
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(err) => {
                run.done.refused += 1;
                refused(line, &format!("not UTF-8: {}", err.utf8_error()));
                continue;
            }
        };
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            continue;
        }
        match key(text) {
            Ok(key) => chunk.push(Pending {
                key,
                line,
                text: text.into(),
            }),
            Err(reason) => {
                run.done.refused += 1;
                refused(line, &reason);
            }
        }
        if chunk.len() >= sort_chunk.max(1) {
            run.submit_all(std::mem::take(&mut chunk), &mut refused, &mut progress)?;
        }
    }
    run.submit_all(chunk, &mut refused, &mut progress)?;
    while !run.queued.is_empty() {
        let batch = run
            .committed
            .blocking_recv()
            .ok_or(ImportError::StoreStopped)?;
        run.settle(batch, &mut refused);
    }
    Ok(run.done)
}

/// A line read and not yet submitted. It is kept as text and parsed again
/// when submitted: a chunk of parsed jobs would hold every state as a JSON
/// tree, several times the size of its line.
struct Pending {
    /// Thing and shadow name, the order it is submitted in.
    key: (String, Option<String>),
    line: u64,
    text: Box<str>,
}

/// An import under way.
struct Run<'a> {
    store: &'a dyn ShadowStore,
    committed: &'a mut mpsc::Receiver<CommittedBatch>,
    limits: &'a Limits,
    in_flight: usize,
    done: ImportProgress,
    /// The line number of each queued job, in submission (= commit) order.
    queued: VecDeque<u64>,
    last_report: Instant,
}

impl Run<'_> {
    /// Submits a chunk of lines in the order of their shadows.
    fn submit_all(
        &mut self,
        mut chunk: Vec<Pending>,
        refused: &mut dyn FnMut(u64, &str),
        progress: &mut dyn FnMut(ImportProgress),
    ) -> Result<(), ImportError> {
        chunk.sort_by(|a, b| a.key.cmp(&b.key));
        for pending in chunk {
            let job = match job(&pending.text, self.limits) {
                Ok(job) => job,
                Err(reason) => {
                    self.done.refused += 1;
                    refused(pending.line, &reason);
                    continue;
                }
            };
            while self.queued.len() >= self.in_flight {
                let batch = self
                    .committed
                    .blocking_recv()
                    .ok_or(ImportError::StoreStopped)?;
                self.settle(batch, refused);
            }
            self.store.submit(job)?;
            self.queued.push_back(pending.line);
            while let Ok(batch) = self.committed.try_recv() {
                self.settle(batch, refused);
            }
            if self.last_report.elapsed() >= Duration::from_secs(1) {
                self.last_report = Instant::now();
                progress(self.done);
            }
        }
        Ok(())
    }

    fn settle(&mut self, batch: CommittedBatch, refused: &mut dyn FnMut(u64, &str)) {
        for result in batch {
            let Committed::Shadow { result, .. } = result else {
                continue;
            };
            let line = self.queued.pop_front().unwrap_or(0);
            match result {
                Ok(_) => self.done.imported += 1,
                Err(rejection) => {
                    self.done.refused += 1;
                    refused(line, &rejection.to_string());
                }
            }
        }
    }
}

/// The shadow a line is for, or why it is not an import line.
fn key(text: &str) -> Result<(String, Option<String>), String> {
    let line: Line<'_> =
        serde_json::from_str(text).map_err(|e| format!("not an import line: {e}"))?;
    Ok((line.thing, line.name))
}

/// The update job a line amounts to, or why it is refused.
fn job(text: &str, limits: &Limits) -> Result<Job, String> {
    let line: Line<'_> =
        serde_json::from_str(text).map_err(|e| format!("not an import line: {e}"))?;
    limits
        .check_thing_name(&line.thing)
        .map_err(|r| format!("{r}: {:?}", line.thing))?;
    if let Some(name) = &line.name {
        limits
            .check_shadow_name(name)
            .map_err(|r| format!("{r}: {name:?}"))?;
    }
    let payload = format!(r#"{{"state":{}}}"#, line.state.get());
    let update = parse_update(payload.as_bytes(), limits).map_err(|r| r.rejection.to_string())?;
    let key = match line.name {
        Some(name) => ShadowKey::named(line.thing, name),
        None => ShadowKey::classic(line.thing),
    };
    Ok(Job::Shadow {
        key,
        command: Command::Update(update),
        ticket: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SqliteStore, StoreConfig};

    fn open_store() -> (
        tempfile::TempDir,
        Limits,
        SqliteStore,
        mpsc::Receiver<CommittedBatch>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits::default();
        let (store, committed) =
            SqliteStore::open(StoreConfig::new(dir.path().join("s.db")), limits.clone())
                .expect("open");
        (dir, limits, store, committed)
    }

    #[test]
    fn good_lines_load_and_each_bad_line_is_reported() {
        let (_dir, limits, store, mut committed) = open_store();
        let input = [
            r#"{"thing":"lamp-1","state":{"desired":{"on":true}}}"#,
            r#"{"thing":"lamp-1","name":"cfg","state":{"reported":{"rate":5}}}"#,
            "",
            r#"{"thing":"lamp-2","state":{"reported":{"on":false}}"#,
            r#"{"thing":"bad name!","state":{"reported":{}}}"#,
            r#"{"thing":"lamp-3","state":{"other":{}}}"#,
            r#"{"thing":"lamp-4","state":{"reported":{"on":true}},"extra":1}"#,
            r#"{"thing":"lamp-1","state":{"reported":{"on":true}}}"#,
        ]
        .join("\n")
        .into_bytes();
        // Line 9: not UTF-8; line 10: a good line after it, ending in CRLF.
        let input = [
            input,
            b"\n{\"thing\":\"caf\xe9\"}\n".to_vec(),
            br#"{"thing":"lamp-5","state":{"reported":{"on":true}}}"#.to_vec(),
            b"\r\n".to_vec(),
        ]
        .concat();
        let mut bad = Vec::new();
        let done = import(
            input.as_slice(),
            &store,
            &mut committed,
            &limits,
            2,
            3,
            |line, reason| bad.push((line, reason.to_string())),
            |_| {},
        )
        .expect("import");
        assert_eq!(
            done,
            ImportProgress {
                lines: 10,
                imported: 4,
                refused: 5
            }
        );
        // Malformed lines are reported as they are read, the others as
        // their chunk is submitted.
        bad.sort();
        let lines: Vec<u64> = bad.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [4, 5, 6, 7, 9]);
        assert!(bad[0].1.starts_with("not an import line"), "{}", bad[0].1);
        assert!(bad[1].1.contains("Invalid thing name"), "{}", bad[1].1);
        assert!(bad[2].1.contains("invalid node"), "{}", bad[2].1);
        assert!(bad[3].1.contains("unknown field"), "{}", bad[3].1);
        assert!(bad[4].1.starts_with("not UTF-8"), "{}", bad[4].1);
        // The rules ran: the second update of lamp-1 merged into version 2.
        let lamp = store
            .load(&ShadowKey::classic("lamp-1"))
            .expect("load")
            .expect("stored");
        assert_eq!(lamp.version, 2);
        let state = lamp.state.state_value();
        assert_eq!(
            state,
            serde_json::json!({"desired": {"on": true}, "reported": {"on": true}})
        );
        let cfg = store
            .load(&ShadowKey::named("lamp-1", "cfg"))
            .expect("load");
        assert!(cfg.is_some());
    }

    #[test]
    fn a_chunk_is_submitted_in_name_order_and_one_shadows_lines_keep_theirs() {
        let (_dir, limits, store, mut committed) = open_store();
        let input = [
            r#"{"thing":"b","state":{"desired":{"x":1}}}"#,
            r#"{"thing":"c","state":{"desired":{"x":1}}}"#,
            r#"{"thing":"a","state":{"desired":{"x":1}}}"#,
            r#"{"thing":"b","state":{"desired":{"x":2}}}"#,
            r#"{"thing":"a","name":"n","state":{"desired":{"x":1}}}"#,
            // The next chunk.
            r#"{"thing":"a","state":{"desired":{"x":3}}}"#,
        ]
        .join("\n");
        let done = import(
            input.as_bytes(),
            &store,
            &mut committed,
            &limits,
            2,
            5,
            |line, reason| panic!("line {line}: {reason}"),
            |_| {},
        )
        .expect("import");
        assert_eq!(done.imported, 6);
        let log: Vec<(String, Option<String>, u64)> = store
            .changes_since(0, 100)
            .expect("changes")
            .into_iter()
            .map(|c| (c.thing, c.name, c.version))
            .collect();
        let entry = |thing: &str, name: Option<&str>, version| {
            (thing.to_string(), name.map(str::to_string), version)
        };
        assert_eq!(
            log,
            [
                entry("a", None, 1),
                entry("a", Some("n"), 1),
                entry("b", None, 1),
                entry("b", None, 2),
                entry("c", None, 1),
                entry("a", None, 2),
            ]
        );
        let state = |thing: &str| {
            let stored = store.load(&ShadowKey::classic(thing)).expect("load");
            stored.expect("stored").state.state_value()
        };
        assert_eq!(state("b"), serde_json::json!({"desired": {"x": 2}}));
        assert_eq!(state("a"), serde_json::json!({"desired": {"x": 3}}));
    }
}
