//! How shadow requests leave a device connection: the [`ShadowRequests`]
//! trait, which the shadow service implements.
//!
//! A connection calls [`ShadowRequests::submit`] in arrival order, so one
//! device's requests are applied in the order it sent them. The returned
//! future resolves once the request is answered; a connection keeps at most
//! a configured number of them outstanding and stops reading from its socket
//! while it has that many (back-pressure: a device that floods slows itself
//! down, not the others). A device whose request was refused because its
//! thing's request rate was used up is not read from until the rate allows
//! its next request.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use umbra_shadow::topic::RequestTopic;
use umbra_shadow::{Message, Request, ShadowService, UserProperties};

/// A device's publish to a shadow request topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowPublish {
    /// The MQTT client id of the sender (authorization already checked: a
    /// non-privileged client only reaches its own thing).
    pub client_id: String,
    /// The parsed topic.
    pub request: RequestTopic,
    pub payload: Bytes,
    /// MQTT 5 user properties, repeated on the reply.
    pub user_properties: Option<UserProperties>,
}

/// A request being handled; resolves when it has been answered, to its
/// reply (the `/accepted` or `/rejected` message) if the handler gives it.
pub type Answered = Pin<Box<dyn Future<Output = Option<Message>> + Send + 'static>>;

/// A submitted request.
pub struct Submitted {
    pub answered: Answered,
    /// Set when the request was refused because its thing's request rate
    /// was used up: how long until the thing may send another one. The
    /// connection of a device stops reading for that long, so that a device
    /// that floods gets one 429 per refused interval, not one per request.
    pub retry_after: Option<Duration>,
}

impl Submitted {
    /// A request that is answered when `answered` resolves.
    pub fn answered(answered: impl Future<Output = Option<Message>> + Send + 'static) -> Submitted {
        Submitted {
            answered: Box::pin(answered),
            retry_after: None,
        }
    }
}

/// Takes shadow requests from every connection.
pub trait ShadowRequests: Send + Sync + 'static {
    /// Queues `request` behind the earlier ones of the same shadow without
    /// waiting. Its answers reach subscribers through the broker's
    /// [`Publisher`](crate::fanout::Publisher), not through the returned future.
    fn submit(&self, request: ShadowPublish) -> Submitted;
}

impl ShadowRequests for ShadowService {
    fn submit(&self, request: ShadowPublish) -> Submitted {
        let pending = ShadowService::submit(
            self,
            Request {
                key: request.request.key,
                op: request.request.op,
                payload: request.payload,
                client: request.client_id,
                user_properties: request.user_properties,
            },
        );
        let retry_after = pending.retry_after();
        Submitted {
            answered: Box::pin(async move { pending.answer().await.messages.into_iter().next() }),
            retry_after,
        }
    }
}
