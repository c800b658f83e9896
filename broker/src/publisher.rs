//! The answer publisher: how Umbra publishes shadow answers (and any other
//! server-originated message) into the embedded broker.
//!
//! It is a rumqttd local link owned by a dedicated thread, because
//! `LinkTx::publish` blocks when the router's channel is full. Callers hand
//! it `(topic, payload)` through a bounded queue ([`AnswerPublisher::publish`]
//! waits for room, [`AnswerPublisher::try_publish`] never waits); the thread
//! batches whatever is queued into one router notification.
//!
//! Trade-offs, both imposed by rumqttd 0.20:
//! - a local link publishes at QoS 0 only (the QoS field of `Publish` is
//!   private). The router still delivers at each subscription's QoS, so a
//!   device subscribed at QoS 1 gets the answer at QoS 1, but Umbra gets no
//!   acknowledgement and an answer to a device that is offline at that moment
//!   is only delivered if its persistent session still covers it;
//! - the link never subscribes: a lagging local subscriber loses messages
//!   silently.

use std::thread::JoinHandle;

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use std::sync::Arc;
use tokio::sync::mpsc::{self, error::TrySendError};
use tracing::{debug, error};

use crate::metrics::EdgeMetrics;
use crate::topics;

/// Client id of the publisher's local link (the edge refuses remote clients
/// using the reserved prefix, so nobody can take this session over).
pub const PUBLISHER_CLIENT_ID: &str = "umbra-internal-publisher";

/// Most answers handed to the router in one notification.
const MAX_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("topic {0} cannot be published: other `$` topics reach no subscriber")]
    Unroutable(String),
    #[error("topic {0} uses the reserved internal prefix")]
    Reserved(String),
    #[error("answer queue is full")]
    Full,
    #[error("broker is shut down")]
    Closed,
}

pub(crate) enum Command {
    Publish { topic: Bytes, payload: Bytes },
    Stop,
}

/// Cheap to clone; every clone feeds the same link.
#[derive(Clone, Debug)]
pub struct AnswerPublisher {
    pub(crate) queue: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Publish { topic, .. } => {
                f.debug_struct("Publish").field("topic", topic).finish()
            }
            Command::Stop => f.write_str("Stop"),
        }
    }
}

impl AnswerPublisher {
    /// Publishes `payload` on `topic`, a real topic such as
    /// `$aws/things/dev1/shadow/update/accepted`. Waits while the queue is full.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        let command = command(topic, payload.into())?;
        self.queue
            .send(command)
            .await
            .map_err(|_| PublishError::Closed)
    }

    /// Like [`publish`](Self::publish) but fails with [`PublishError::Full`]
    /// instead of waiting.
    pub fn try_publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), PublishError> {
        let command = command(topic, payload.into())?;
        self.queue.try_send(command).map_err(|e| match e {
            TrySendError::Full(_) => PublishError::Full,
            TrySendError::Closed(_) => PublishError::Closed,
        })
    }
}

fn command(topic: &str, payload: Bytes) -> Result<Command, PublishError> {
    if topics::is_internal(topic) {
        return Err(PublishError::Reserved(topic.to_owned()));
    }
    let routed = match topics::to_internal(topic) {
        Some(internal) => internal,
        None if topic.starts_with('$') => return Err(PublishError::Unroutable(topic.to_owned())),
        None => topic.to_owned(),
    };
    Ok(Command::Publish {
        topic: Bytes::from(routed),
        payload,
    })
}

/// The running publisher thread.
pub(crate) struct PublisherWorker {
    pub(crate) handle: AnswerPublisher,
    pub(crate) thread: JoinHandle<()>,
}

impl PublisherWorker {
    pub(crate) fn spawn(
        link_tx: LinkTx,
        link_rx: LinkRx,
        capacity: usize,
        metrics: Arc<EdgeMetrics>,
    ) -> std::io::Result<PublisherWorker> {
        let (queue, commands) = mpsc::channel(capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("umbra-publisher".to_owned())
            .spawn(move || run(link_tx, link_rx, commands, &metrics))?;
        Ok(PublisherWorker {
            handle: AnswerPublisher { queue },
            thread,
        })
    }
}

fn run(
    mut link_tx: LinkTx,
    link_rx: LinkRx,
    mut commands: mpsc::Receiver<Command>,
    metrics: &EdgeMetrics,
) {
    // The receiving half stays alive so the router keeps the link registered;
    // the link subscribes to nothing, so nothing ever arrives on it.
    let _link_rx = link_rx;
    let mut batch: Vec<(Bytes, Bytes)> = Vec::with_capacity(MAX_BATCH);
    let mut stop = false;
    while !stop {
        match commands.blocking_recv() {
            Some(Command::Publish { topic, payload }) => batch.push((topic, payload)),
            Some(Command::Stop) | None => break,
        }
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(Command::Publish { topic, payload }) => batch.push((topic, payload)),
                Ok(Command::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        if let Some((topic, payload)) = batch.pop() {
            {
                // All but the last go straight into the link's buffer; the
                // last `publish` notifies the router once for the whole batch.
                let mut buffer = link_tx.buffer();
                for (topic, payload) in batch.drain(..) {
                    buffer.push_back(Packet::Publish(Publish::new(topic, payload, false), None));
                }
            }
            match link_tx.publish(topic, payload) {
                Ok(_) => {
                    metrics
                        .answers_published
                        .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                }
                Err(cause) => {
                    metrics
                        .answers_lost
                        .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                    error!(%cause, "router is gone, answer publisher stops");
                    return;
                }
            }
        }
    }
    debug!("answer publisher stopped");
}
