//! Sessions by client id: what of a device's `$aws` traffic outlives one
//! connection (its subscriptions, its mailbox, answers it has not
//! acknowledged), takeover of a client id by a new connection, and expiry of
//! persistent sessions.
//!
//! A session is attached to at most one connection. A new connection with
//! the same client id cancels the old one and waits for it to hand its
//! session over (MQTT: the server closes the existing connection). A session
//! whose connection asked for persistence (MQTT 3.1.1 clean session 0, MQTT 5
//! session expiry > 0) is parked when its connection ends; messages keep
//! arriving in its mailbox (QoS 1 only) until a connection resumes it or it
//! expires.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rumqttd::protocol::QoS;
use rumqttd::RouterTx;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::fanout::{Delivery, Mailbox, Publisher};

/// How long a new connection waits for the one it takes over to hand over.
const HANDOFF_WAIT: Duration = Duration::from_secs(5);

/// The `$aws` state of one client.
#[derive(Debug)]
pub struct Session {
    pub mailbox: Arc<Mailbox>,
    /// `$aws` filters held, with their QoS.
    pub filters: Vec<(Arc<str>, QoS)>,
    /// QoS 1 messages sent and not yet acknowledged, by packet id, in send order.
    pub inflight: VecDeque<(u16, Delivery)>,
    /// The connection had a router link: rumqttd keeps a persistent
    /// session of its own for it, which the next connection reattaches to.
    pub router: bool,
}

impl Session {
    fn new(capacity: usize) -> Session {
        Session {
            mailbox: Mailbox::new(capacity),
            filters: Vec::new(),
            inflight: VecDeque::new(),
            router: false,
        }
    }
}

enum Slot {
    Live {
        conn: u64,
        kick: CancellationToken,
        /// Where the connection hands its session over when taken over.
        handoff: Option<oneshot::Receiver<Session>>,
    },
    Parked {
        session: Session,
        expires: Instant,
        /// Cancels the will the session's last connection left waiting
        /// for its delay (MQTT 5): a new connection of the client does.
        will: Option<CancellationToken>,
    },
}

/// A session attached to a connection.
#[derive(Debug)]
pub struct Attached {
    pub session: Session,
    /// The session existed (MQTT's "session present").
    pub present: bool,
    /// Cancelled when another connection takes the client id over, and
    /// when the broker stops (a child of its stop token: a connection waits
    /// on one token, not two).
    pub kick: CancellationToken,
    /// Cancels the will waiting for its delay, if the connection left one.
    pub pending_will: Option<CancellationToken>,
    handoff: oneshot::Sender<Session>,
}

/// Every client's session.
pub struct Sessions {
    slots: Mutex<HashMap<String, Slot>>,
    publisher: Publisher,
    /// rumqttd's router, which keeps a persistent session of its own for a
    /// client that used it (ended with ours).
    router: RouterTx,
    mailbox_capacity: usize,
    /// The broker's stop token, parent of every connection's kick token.
    stop: CancellationToken,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Sessions {
    pub fn new(
        publisher: Publisher,
        router: RouterTx,
        mailbox_capacity: usize,
        stop: CancellationToken,
    ) -> Sessions {
        Sessions {
            slots: Mutex::new(HashMap::new()),
            publisher,
            router,
            mailbox_capacity,
            stop,
        }
    }

    /// Ends `client_id`'s session: removes every route to it, and the
    /// router's saved session if it had one (the router keeps that one
    /// if a connection has resumed it meanwhile).
    fn end(&self, client_id: &str, session: Session) {
        for (filter, _) in &session.filters {
            self.publisher.unsubscribe(filter, &session.mailbox);
        }
        if session.router {
            if let Err(err) = rumqttd::local::end_session(&self.router, client_id) {
                warn!(client_id, cause = %err, "the router keeps the ended session's subscriptions");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // Every change is one insert or remove.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Attaches connection `conn` to `client_id`'s session: takes over a
    /// live connection, resumes a parked session unless `clean`, or starts
    /// a new one.
    pub async fn attach(&self, client_id: &str, conn: u64, clean: bool) -> Attached {
        let (handoff, receiver) = oneshot::channel();
        let kick = self.stop.child_token();
        let previous = self.lock().insert(
            client_id.to_owned(),
            Slot::Live {
                conn,
                kick: kick.clone(),
                handoff: Some(receiver),
            },
        );
        if let Some(Slot::Parked {
            will: Some(will), ..
        }) = &previous
        {
            will.cancel();
        }
        let previous = match previous {
            None => None,
            Some(Slot::Parked {
                session, expires, ..
            }) if expires <= Instant::now() => {
                debug!(client_id, "parked session expired");
                self.end(client_id, session);
                None
            }
            Some(Slot::Parked { session, .. }) => Some(session),
            Some(Slot::Live {
                kick: old, handoff, ..
            }) => {
                debug!(client_id, "taking over a live connection");
                old.cancel();
                match handoff {
                    Some(receiver) => tokio::time::timeout(HANDOFF_WAIT, receiver)
                        .await
                        .ok()
                        .and_then(Result::ok),
                    None => None,
                }
            }
        };
        let (session, present) = match previous {
            Some(session) if !clean => (session, true),
            Some(session) => {
                self.end(client_id, session);
                (Session::new(self.mailbox_capacity), false)
            }
            None => (Session::new(self.mailbox_capacity), false),
        };
        session.mailbox.set_online(true);
        Attached {
            session,
            present,
            kick,
            pending_will: None,
            handoff,
        }
    }

    /// Detaches connection `conn` from its session: parks it for `keep` if
    /// given, hands it to the connection that took the client id over, or
    /// clears it.
    pub fn detach(&self, client_id: &str, conn: u64, attached: Attached, keep: Option<Duration>) {
        let Attached {
            session,
            handoff,
            pending_will,
            ..
        } = attached;
        session.mailbox.set_online(false);
        let mut slots = self.lock();
        let ours = matches!(slots.get(client_id), Some(Slot::Live { conn: c, .. }) if *c == conn);
        if !ours {
            drop(slots);
            // A new connection came before the will's delay ended.
            if let Some(will) = pending_will {
                will.cancel();
            }
            // Taken over: the new connection decides what to keep.
            if let Err(session) = handoff.send(session) {
                self.end(client_id, session);
            }
            return;
        }
        match keep {
            Some(keep) if !keep.is_zero() => {
                slots.insert(
                    client_id.to_owned(),
                    Slot::Parked {
                        session,
                        expires: Instant::now() + keep,
                        will: pending_will,
                    },
                );
            }
            _ => {
                slots.remove(client_id);
                drop(slots);
                self.end(client_id, session);
            }
        }
    }

    /// Ends parked sessions whose expiry has passed. Returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<(String, Session)> = {
            let mut slots = self.lock();
            let ids: Vec<String> = slots
                .iter()
                .filter(|(_, slot)| matches!(slot, Slot::Parked { expires, .. } if *expires <= now))
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| match slots.remove(&id) {
                    Some(Slot::Parked { session, .. }) => Some((id, session)),
                    _ => None,
                })
                .collect()
        };
        let count = expired.len();
        for (client_id, session) in expired {
            self.end(&client_id, session);
        }
        count
    }

    /// Parked sessions now.
    pub fn parked(&self) -> usize {
        self.lock()
            .values()
            .filter(|slot| matches!(slot, Slot::Parked { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::EdgeMetrics;
    use bytes::Bytes;

    fn sessions() -> (Sessions, Publisher) {
        let (sessions, publisher, _router) = sessions_with_router();
        (sessions, publisher)
    }

    /// Also what the sessions told the router so far (its events, as `Debug`).
    fn sessions_with_router() -> (Sessions, Publisher, impl Fn() -> Vec<String>) {
        let publisher = Publisher::new(Arc::new(EdgeMetrics::default()));
        let (router, events) = flume::bounded(16);
        let told = move || events.try_iter().map(|(_, e)| format!("{e:?}")).collect();
        (
            Sessions::new(publisher.clone(), router, 8, CancellationToken::new()),
            publisher,
            told,
        )
    }

    const TOPIC: &str = "$aws/things/d1/shadow/update/delta";

    #[tokio::test]
    async fn a_parked_session_keeps_qos1_messages_until_resumed() {
        let (sessions, publisher) = sessions();
        let mut attached = sessions.attach("d1", 1, false).await;
        assert!(!attached.present);
        let filter = publisher.subscribe(TOPIC, QoS::AtLeastOnce, &attached.session.mailbox);
        attached.session.filters.push((filter, QoS::AtLeastOnce));
        sessions.detach("d1", 1, attached, Some(Duration::from_secs(60)));
        assert_eq!(sessions.parked(), 1);
        assert_eq!(publisher.publish(TOPIC, Bytes::from_static(b"d")), Ok(1));

        let resumed = sessions.attach("d1", 2, false).await;
        assert!(resumed.present);
        assert_eq!(
            resumed.session.mailbox.pop().map(|d| d.payload),
            Some(Bytes::from_static(b"d"))
        );
        // A clean connection drops it and its routes.
        sessions.detach("d1", 2, resumed, Some(Duration::from_secs(60)));
        let clean = sessions.attach("d1", 3, true).await;
        assert!(!clean.present);
        assert_eq!(publisher.filter_count(), 0);
        sessions.detach("d1", 3, clean, None);
        assert_eq!(sessions.parked(), 0);
    }

    #[tokio::test]
    async fn a_new_connection_takes_the_session_over() {
        let (sessions, _publisher) = sessions();
        let sessions = Arc::new(sessions);
        let first = sessions.attach("d1", 1, false).await;
        let kick = first.kick.clone();
        let taker = {
            let sessions = Arc::clone(&sessions);
            tokio::spawn(async move { sessions.attach("d1", 2, false).await })
        };
        kick.cancelled().await;
        sessions.detach("d1", 1, first, None);
        let second = taker.await.expect("attach");
        assert!(second.present, "handed over, not cleared");
        assert!(!second.kick.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn parked_sessions_expire() {
        let (sessions, publisher) = sessions();
        let mut attached = sessions.attach("d1", 1, false).await;
        let filter = publisher.subscribe(TOPIC, QoS::AtLeastOnce, &attached.session.mailbox);
        attached.session.filters.push((filter, QoS::AtLeastOnce));
        sessions.detach("d1", 1, attached, Some(Duration::from_secs(10)));
        assert_eq!(sessions.expire(), 0);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(sessions.expire(), 1);
        assert_eq!(publisher.filter_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_router_is_told_when_a_session_that_used_it_ends() {
        let (sessions, _publisher, told) = sessions_with_router();
        // Expired.
        let mut attached = sessions.attach("d1", 1, false).await;
        attached.session.router = true;
        sessions.detach("d1", 1, attached, Some(Duration::from_secs(10)));
        assert_eq!(told(), Vec::<String>::new(), "parked: the router keeps it");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(sessions.expire(), 1);
        assert_eq!(told(), ["EndSession(\"d1\")"]);
        // Replaced by a clean session.
        let mut attached = sessions.attach("d2", 2, false).await;
        attached.session.router = true;
        sessions.detach("d2", 2, attached, Some(Duration::from_secs(10)));
        let clean = sessions.attach("d2", 3, true).await;
        assert_eq!(told(), ["EndSession(\"d2\")"]);
        // Ended with its connection; a session that never used the router
        // ends without telling it.
        sessions.detach("d2", 3, clean, None);
        let mut attached = sessions.attach("d3", 4, true).await;
        attached.session.router = true;
        sessions.detach("d3", 4, attached, None);
        assert_eq!(told(), ["EndSession(\"d3\")"]);
    }
}
