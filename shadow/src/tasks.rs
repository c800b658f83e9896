//! One panic policy for every task and thread Umbra starts. A panic is a
//! bug, never an answer:
//! - a long-lived task or thread (the store's writer, the service's commit
//!   task, the fleet index's load, the broker's listeners and housekeeping)
//!   is joined when Umbra stops, and its panic is logged with the task's
//!   name and raised again there, so the process ends with the panic rather
//!   than a clean exit;
//! - what others wait on says so at once: a fleet load that panics marks
//!   the index failed (`/readyz` and search answer so) before it is raised;
//! - a task serving one request (a change stream's feed) logs its panic
//!   with its name and ends that request.
//!
//! [`joined`], [`joined_thread`] and [`spawn_for_request`] are the one
//! place that does it.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use tracing::error;

/// A joined task's value; its panic, logged as `what`'s, raised again. A
/// task that was cancelled gives `None`.
pub fn joined<T>(what: &str, result: Result<T, tokio::task::JoinError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(err) if err.is_panic() => {
            error!(task = what, "task panicked");
            std::panic::resume_unwind(err.into_panic())
        }
        Err(_) => None,
    }
}

/// A joined thread's value; its panic, logged as `what`'s, raised again
/// (unless this thread is already unwinding, which would abort: then the
/// panic is only logged and `None` returned).
pub fn joined_thread<T>(what: &str, result: std::thread::Result<T>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(panic) => {
            error!(task = what, "thread panicked");
            if std::thread::panicking() {
                return None;
            }
            std::panic::resume_unwind(panic)
        }
    }
}

/// Spawns a task that serves one request: its panic is logged as `what`'s
/// and ends the request (whatever it was sending to stops).
pub fn spawn_for_request(what: &'static str, task: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        if AssertUnwindSafe(task).catch_unwind().await.is_err() {
            error!(task = what, "task panicked; its request ends");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_tasks_panic_ends_it_and_nothing_else() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u8>(1);
        spawn_for_request("test request", async move {
            let _keep = tx;
            panic!("bug in a request");
        });
        // The channel closes: the request ended; this task goes on.
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_joined_panic_is_raised_again_with_its_payload() {
        let task = tokio::spawn(async { panic!("bug in the task") });
        let result = task.await;
        let raised = std::panic::catch_unwind(AssertUnwindSafe(|| joined("test task", result)));
        let payload = raised.expect_err("raised again");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"bug in the task"));
        assert_eq!(joined("fine", Ok::<_, tokio::task::JoinError>(7)), Some(7));
    }

    #[test]
    fn a_joined_thread_panic_is_raised_again() {
        let result = std::thread::spawn(|| panic!("bug in the thread")).join();
        let raised =
            std::panic::catch_unwind(AssertUnwindSafe(|| joined_thread("test thread", result)));
        assert!(raised.is_err());
    }
}
