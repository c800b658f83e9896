//! How shadow requests leave the connection edge: the [`ShadowRequestSink`]
//! trait and its bounded-channel implementation.
//!
//! The edge runs inside rumqttd's per-connection read path and must never
//! block, so it *offers* each request. A sink that cannot take a request
//! must not lose it silently: [`ChannelShadowSink`] puts it on a second,
//! small overload channel from which Umbra answers `429 Too Many Requests`
//! on the request's `rejected` topic. Only when both channels are full is a
//! request lost; the edge counts and logs that.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};

use umbra_shadow::topic::RequestTopic;

/// A device's publish to a shadow request topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowPublish {
    /// The MQTT client id of the sender (authorization already checked: a
    /// non-privileged client only reaches its own thing).
    pub client_id: String,
    /// The full `$aws/things/...` topic.
    pub topic: String,
    /// The parsed topic.
    pub request: RequestTopic,
    pub payload: Bytes,
}

/// A request the sink could not accept; carries the request back (boxed:
/// this is the rare path and keeps `Result` small on the common one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overloaded(pub Box<ShadowPublish>);

/// Receives shadow requests from every connection.
pub trait ShadowRequestSink: Send + Sync + 'static {
    /// Called on the connection's read path: must not block. `Err` means the
    /// request is lost (the edge counts and logs it).
    fn offer(&self, request: ShadowPublish) -> Result<(), Overloaded>;
}

/// The receiving ends of a [`ChannelShadowSink`].
#[derive(Debug)]
pub struct ShadowInbox {
    /// Requests to process, in arrival order per connection.
    pub requests: mpsc::Receiver<ShadowPublish>,
    /// Requests that arrived while `requests` was full: answer them with 429.
    pub overloaded: mpsc::Receiver<Overloaded>,
}

/// A [`ShadowRequestSink`] over two bounded channels.
#[derive(Debug)]
pub struct ChannelShadowSink {
    requests: mpsc::Sender<ShadowPublish>,
    overloaded: mpsc::Sender<Overloaded>,
    overflowed: AtomicU64,
}

impl ChannelShadowSink {
    /// A sink with `capacity` queued requests and `overload_capacity` queued
    /// overload records (both at least 1).
    pub fn channel(capacity: usize, overload_capacity: usize) -> (ChannelShadowSink, ShadowInbox) {
        let (requests_tx, requests) = mpsc::channel(capacity.max(1));
        let (overloaded_tx, overloaded) = mpsc::channel(overload_capacity.max(1));
        let sink = ChannelShadowSink {
            requests: requests_tx,
            overloaded: overloaded_tx,
            overflowed: AtomicU64::new(0),
        };
        (
            sink,
            ShadowInbox {
                requests,
                overloaded,
            },
        )
    }

    /// Requests diverted to the overload channel so far.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

impl ShadowRequestSink for ChannelShadowSink {
    fn offer(&self, request: ShadowPublish) -> Result<(), Overloaded> {
        let request = match self.requests.try_send(request) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(request)) => request,
            // Nobody processes requests (shutting down): nobody answers 429 either.
            Err(TrySendError::Closed(request)) => return Err(Overloaded(Box::new(request))),
        };
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        match self.overloaded.try_send(Overloaded(Box::new(request))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(lost) | TrySendError::Closed(lost)) => Err(lost),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use umbra_shadow::topic::parse_request_topic;

    fn request(n: u8) -> ShadowPublish {
        let topic = "$aws/things/dev1/shadow/get".to_owned();
        ShadowPublish {
            client_id: "dev1".into(),
            request: parse_request_topic(&topic).expect("a request topic"),
            topic,
            payload: Bytes::from(vec![n]),
        }
    }

    #[test]
    fn overflow_goes_to_the_overload_channel_then_is_refused() {
        let (sink, mut inbox) = ChannelShadowSink::channel(1, 1);
        assert_eq!(sink.offer(request(1)), Ok(()));
        assert_eq!(sink.offer(request(2)), Ok(()));
        assert_eq!(
            sink.offer(request(3)),
            Err(Overloaded(Box::new(request(3))))
        );
        assert_eq!(inbox.requests.try_recv().ok(), Some(request(1)));
        assert_eq!(
            inbox.overloaded.try_recv().ok(),
            Some(Overloaded(Box::new(request(2))))
        );
        assert_eq!(sink.overflowed(), 2);
    }
}
