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

/// Loads every line of `input` into `store`, whose committed batches arrive
/// on `committed` (nothing else may be submitting). Keeps at most
/// `in_flight` jobs queued (at most the store's queue capacity). Calls
/// `refused(line, reason)` for each line not loaded and `progress` about
/// once a second. Returns once every loaded line is committed.
pub fn import(
    input: impl BufRead,
    store: &dyn ShadowStore,
    committed: &mut mpsc::Receiver<CommittedBatch>,
    limits: &Limits,
    in_flight: usize,
    mut refused: impl FnMut(u64, &str),
    mut progress: impl FnMut(ImportProgress),
) -> Result<ImportProgress, ImportError> {
    let mut done = ImportProgress::default();
    // The line number of each queued job, in submission (= commit) order.
    let mut queued: VecDeque<u64> = VecDeque::new();
    let mut last_report = Instant::now();
    let settle = |batch: CommittedBatch,
                  queued: &mut VecDeque<u64>,
                  done: &mut ImportProgress,
                  refused: &mut dyn FnMut(u64, &str)| {
        for result in batch {
            let Committed::Shadow { result, .. } = result else {
                continue;
            };
            let line = queued.pop_front().unwrap_or(0);
            match result {
                Ok(_) => done.imported += 1,
                Err(rejection) => {
                    done.refused += 1;
                    refused(line, &rejection.to_string());
                }
            }
        }
    };
    for bytes in input.split(b'\n') {
        let bytes = bytes?;
        done.lines += 1;
        let line = done.lines;
        // A line that is not UTF-8 is refused like any other bad line.
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => text.trim_end_matches('\r'),
            Err(err) => {
                done.refused += 1;
                refused(line, &format!("not UTF-8: {err}"));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        let job = match job(text, limits) {
            Ok(job) => job,
            Err(reason) => {
                done.refused += 1;
                refused(line, &reason);
                continue;
            }
        };
        while queued.len() >= in_flight.max(1) {
            let batch = committed.blocking_recv().ok_or(ImportError::StoreStopped)?;
            settle(batch, &mut queued, &mut done, &mut refused);
        }
        store.submit(job)?;
        queued.push_back(line);
        while let Ok(batch) = committed.try_recv() {
            settle(batch, &mut queued, &mut done, &mut refused);
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress(done);
        }
    }
    while !queued.is_empty() {
        let batch = committed.blocking_recv().ok_or(ImportError::StoreStopped)?;
        settle(batch, &mut queued, &mut done, &mut refused);
    }
    Ok(done)
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

    #[test]
    fn good_lines_load_and_each_bad_line_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits::default();
        let (store, mut committed) =
            SqliteStore::open(StoreConfig::new(dir.path().join("s.db")), limits.clone())
                .expect("open");
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
}
