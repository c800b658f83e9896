//! Shared by the binary's tests: the real `umbra` process on free ports.
#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(20);
pub const UMBRA: &str = env!("CARGO_BIN_EXE_umbra");
/// Every listener on a free loopback port.
pub const FREE_PORTS: [&str; 6] = [
    "--mqtt-addr",
    "127.0.0.1:0",
    "--ws-addr",
    "127.0.0.1:0",
    "--http-addr",
    "127.0.0.1:0",
];

/// A running `umbra` process and the MQTT address it printed.
pub struct Umbra {
    pub child: Child,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub lines: mpsc::UnboundedReceiver<String>,
}

pub async fn spawn(data_dir: &Path) -> Umbra {
    spawn_with(data_dir, &[]).await
}

/// [`spawn`] with more arguments (e.g. `--config FILE`).
pub async fn spawn_with(data_dir: &Path, args: &[&str]) -> Umbra {
    let (child, mut lines) = launch(data_dir, args);
    let (mut http, mut mqtt) = (None, None);
    while http.is_none() || mqtt.is_none() {
        let line = tokio::time::timeout(WAIT, lines.recv())
            .await
            .expect("umbra prints its addresses")
            .expect("umbra is running");
        // "umbra: mqtt listening on ADDR (what it speaks)"
        let addr = |prefix: &str| {
            let rest = line.strip_prefix(prefix)?;
            rest.split(' ').next()?.parse().ok()
        };
        mqtt = mqtt.or_else(|| addr("umbra: mqtt listening on "));
        http = http.or_else(|| addr("umbra: http listening on "));
    }
    Umbra {
        child,
        mqtt: mqtt.expect("mqtt address"),
        http: http.expect("http address"),
        lines,
    }
}

/// Starts `umbra` on free ports; its stdout's lines.
fn launch(data_dir: &Path, args: &[&str]) -> (Child, mpsc::UnboundedReceiver<String>) {
    launch_with(data_dir, args, Stdio::null())
}

/// [`launch`], with its log (stderr) going to `log`.
fn launch_with(
    data_dir: &Path,
    args: &[&str],
    log: Stdio,
) -> (Child, mpsc::UnboundedReceiver<String>) {
    let mut child = Command::new(UMBRA)
        .args(args)
        .args(FREE_PORTS)
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("umbra starts");
    let lines = lines_of(child.stdout.take().expect("stdout"));
    (child, lines)
}

/// The lines `output` gives, as they come.
fn lines_of(
    output: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> mpsc::UnboundedReceiver<String> {
    let (tx, lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(output).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// A running `umbra` in attach mode (no MQTT listener of its own).
pub struct Attached {
    pub child: Child,
    pub http: SocketAddr,
    /// Kept open: umbra would block on a full stdout pipe.
    _lines: mpsc::UnboundedReceiver<String>,
}

/// Starts `umbra` with `args` (which attach it) and waits until it says so.
pub async fn spawn_attached(data_dir: &Path, args: &[&str]) -> Attached {
    wait_attached(launch(data_dir, args)).await
}

/// [`spawn_attached`], and the lines of its log (stderr).
pub async fn spawn_attached_logging(
    data_dir: &Path,
    args: &[&str],
) -> (Attached, mpsc::UnboundedReceiver<String>) {
    let (mut child, lines) = launch_with(data_dir, args, Stdio::piped());
    let log = lines_of(child.stderr.take().expect("stderr"));
    (wait_attached((child, lines)).await, log)
}

/// Waits until the `umbra` that `launched` says it is attached, and where
/// its HTTP API listens.
async fn wait_attached(launched: (Child, mpsc::UnboundedReceiver<String>)) -> Attached {
    let (child, mut lines) = launched;
    let (mut http, mut attached) = (None, false);
    while http.is_none() || !attached {
        let line = tokio::time::timeout(WAIT, lines.recv())
            .await
            .expect("umbra prints its address")
            .expect("umbra is running");
        attached |= line.starts_with("umbra: attached to ");
        http = http.or_else(|| {
            let rest = line.strip_prefix("umbra: http listening on ")?;
            rest.split(' ').next()?.parse().ok()
        });
    }
    Attached {
        child,
        http: http.expect("http address"),
        _lines: lines,
    }
}
