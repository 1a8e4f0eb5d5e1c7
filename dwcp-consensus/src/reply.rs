//! The answer to one proposal: filled once by the node thread, awaited by its caller.
//!
//! Not a channel: a crossbeam receive spins and yields before it sleeps, and with a
//! thousand callers waiting at once (a fleet's concurrent migrations, one gate each) on a
//! 2-core host that spinning took more CPU than raft itself (`dwcp benchmark consensus
//! --guests`, docs/scale.md). And not a mutex either: the node thread must never wait
//! for a caller that holds a lock and is not scheduled. The answer is set once
//! ([`OnceLock`]) and the waiting thread is unparked; a waiter sleeps at once.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::node::ProposeError;
use crate::registry::Applied;

type Outcome = Result<Applied, ProposeError>;

#[derive(Default)]
struct Slot {
    value: OnceLock<Outcome>,
    waiter: OnceLock<Thread>,
    /// The caller stopped waiting (its own timeout): the node thread must not send
    /// the proposal again, or it could apply after its caller was told `Timeout`
    /// and acted on that (a gate that resumed the source, say).
    abandoned: AtomicBool,
}

/// A reply slot and the caller's [`Answer`] to it.
pub(crate) fn reply() -> (Reply, Answer) {
    let slot = Arc::new(Slot::default());
    (Reply { slot: slot.clone() }, Answer { slot })
}

/// The node thread's end: the first [`Reply::send`] is the answer. Dropped unanswered
/// (the node stopped), the caller gets [`ProposeError::Stopped`].
pub(crate) struct Reply {
    slot: Arc<Slot>,
}

impl Reply {
    /// Answers the caller; later answers are ignored (Err then, as a closed channel's).
    pub(crate) fn send(&self, r: Outcome) -> Result<(), Outcome> {
        if let Some(t) = self.set(r)? {
            t.unpark();
        }
        Ok(())
    }

    /// Sets the answer without waking the caller: returns the thread to unpark (its
    /// caller is parked, or about to park, waiting for it), which the node thread
    /// hands to its waker thread so that a thousand wake-ups are not on the raft
    /// thread's path ([`crate::node`]). An unpark that comes late is not lost: the
    /// waiter's `park_timeout` returns at once and it finds the value.
    pub(crate) fn set(&self, r: Outcome) -> Result<Option<Thread>, Outcome> {
        self.slot.value.set(r)?;
        // Pairs with the fence in `Answer::wait`: either it sees the value, or we see
        // its thread.
        fence(Ordering::SeqCst);
        Ok(self.slot.waiter.get().cloned())
    }
}

impl Reply {
    /// Whether the caller has given up waiting ([`Answer::wait`] timed out).
    pub(crate) fn abandoned(&self) -> bool {
        self.slot.abandoned.load(Ordering::Acquire)
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        let _ = self.send(Err(ProposeError::Stopped));
    }
}

/// The caller's end of a proposal ([`crate::node::Node::propose_async`]).
pub struct Answer {
    slot: Arc<Slot>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Answer")
    }
}

impl Answer {
    /// Waits up to `timeout` for the outcome ([`ProposeError::Timeout`] after it).
    pub fn wait(self, timeout: Duration) -> Result<Applied, ProposeError> {
        let deadline = Instant::now() + timeout;
        let _ = self.slot.waiter.set(std::thread::current());
        fence(Ordering::SeqCst);
        loop {
            if let Some(r) = self.slot.value.get() {
                return r.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                self.slot.abandoned.store(true, Ordering::Release);
                return Err(ProposeError::Timeout);
            }
            std::thread::park_timeout(deadline - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_answer_wins_and_drop_means_stopped() {
        let (tx, rx) = reply();
        assert!(tx.send(Ok(Applied::Registered)).is_ok());
        assert!(tx.send(Err(ProposeError::Timeout)).is_err());
        drop(tx);
        assert_eq!(rx.wait(Duration::from_secs(1)), Ok(Applied::Registered));

        let (tx, rx) = reply();
        drop(tx);
        assert_eq!(rx.wait(Duration::from_secs(1)), Err(ProposeError::Stopped));

        let (tx, rx) = reply();
        assert!(!tx.abandoned());
        assert_eq!(
            rx.wait(Duration::from_millis(5)),
            Err(ProposeError::Timeout)
        );
        // The node thread learns that the caller gave up (and sends it no more).
        assert!(tx.abandoned());
    }

    #[test]
    fn a_deferred_wake_up_reaches_the_waiter() {
        // `set` answers without waking; the waiter's thread, returned once it
        // waits, is unparked later (the node's waker thread), even after a delay.
        let (tx, rx) = reply();
        let t = std::thread::spawn(move || rx.wait(Duration::from_secs(5)));
        let started = Instant::now();
        while tx.slot.waiter.get().is_none() {
            assert!(started.elapsed() < Duration::from_secs(5), "never waited");
            std::thread::yield_now();
        }
        let waiter = tx.set(Ok(Applied::Registered)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        waiter.expect("the caller is waiting").unpark();
        assert_eq!(t.join().unwrap(), Ok(Applied::Registered));
        // Woken by the unpark, not by the end of its 5 s wait.
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn answer_from_another_thread_wakes_the_waiter() {
        let (tx, rx) = reply();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let _ = tx.send(Ok(Applied::MigrationCommitted));
        });
        assert_eq!(
            rx.wait(Duration::from_secs(5)),
            Ok(Applied::MigrationCommitted)
        );
        t.join().unwrap();
    }
}
