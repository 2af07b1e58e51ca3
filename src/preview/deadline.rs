//! A coarse deadline for the upstream answer's head, cheaper than a timer per request.
//!
//! Every proxied request waits for its answer's head under `upstream_head_timeout`
//! (forward.rs), a backstop that almost never fires. A tokio timer per request costs a clock
//! read, a wheel insertion and removal, and a place in every park of the thread. On an edge
//! thread (one current-thread runtime, so a request's task never leaves it) the requests in
//! flight are instead entered in the thread's watch: a ticker task counts ticks of [`TICK`]
//! while requests are in flight (and [`IDLE_TICKS`] more), and wakes those whose limit has
//! passed. A deadline is so met at most about one tick late (5 s fires between 5.0 and 5.1 s);
//! entering and leaving the watch reads no clock. Elsewhere (the main runtime, which moves tasks
//! between threads) a tokio timer is used.

use std::cell::RefCell;
use std::future::Future;
use std::task::{Poll, Waker};
use std::time::Duration;

/// The watch's resolution.
const TICK: Duration = Duration::from_millis(100);
/// Ticks with nothing to watch before the ticker stops (it starts again with the next entry).
const IDLE_TICKS: u32 = 50;

/// The limit passed before the future ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Elapsed;

struct Entry {
    /// The tick at which the limit has passed.
    due: u64,
    waker: Option<Waker>,
    fired: bool,
}

/// One edge thread's requests in flight.
#[derive(Default)]
struct Watch {
    /// Ticks counted so far.
    now: u64,
    entries: Vec<Option<Entry>>,
    /// Free places in `entries`.
    free: Vec<usize>,
    live: usize,
    ticking: bool,
}

thread_local! {
    static WATCH: RefCell<Watch> = RefCell::new(Watch::default());
}

impl Watch {
    fn enter(&mut self, limit: Duration, waker: &Waker) -> usize {
        // Whole ticks, rounded up, plus one for the part of the current tick already gone: the
        // limit is never cut short.
        let ticks = limit.as_nanos().div_ceil(TICK.as_nanos()) as u64 + 1;
        let entry = Entry {
            due: self.now + ticks,
            waker: Some(waker.clone()),
            fired: false,
        };
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(entry);
                i
            }
            None => {
                self.entries.push(Some(entry));
                self.entries.len() - 1
            }
        }
    }

    /// Whether `i`'s limit passed; else its waker is brought up to date.
    fn check(&mut self, i: usize, waker: &Waker) -> bool {
        match self.entries.get_mut(i).and_then(Option::as_mut) {
            Some(e) if e.fired => true,
            Some(e) => {
                if !e.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    e.waker = Some(waker.clone());
                }
                false
            }
            None => true,
        }
    }

    fn leave(&mut self, i: usize) {
        if let Some(slot) = self.entries.get_mut(i) {
            if slot.take().is_some() {
                self.live -= 1;
                self.free.push(i);
            }
        }
    }

    /// One tick: the wakers of the entries now due (woken by the caller, outside the borrow).
    fn advance(&mut self) -> Vec<Waker> {
        self.now += 1;
        let now = self.now;
        let mut due = Vec::new();
        for e in self.entries.iter_mut().flatten() {
            if !e.fired && e.due <= now {
                e.fired = true;
                due.extend(e.waker.take());
            }
        }
        due
    }
}

/// Runs `fut` for at most `limit` (see the module's doc).
pub(super) async fn within<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    if crate::edge::percore::on_edge_thread() {
        watched(limit, fut).await
    } else {
        tokio::time::timeout(limit, fut).await.map_err(|_| Elapsed)
    }
}

/// Leaves the watch when the waiting future is dropped, whatever ended it.
struct Place(Option<usize>);

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            // `try_with`: the thread may be ending.
            let _ = WATCH.try_with(|w| w.borrow_mut().leave(i));
        }
    }
}

/// [`within`] through the thread's watch; must be polled on one current-thread runtime only.
async fn watched<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let mut place = Place(None);
    // By reference: a `move` of `place.0` alone would copy the index out of the guard.
    let place = &mut place;
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        WATCH.with(|w| {
            let mut w = w.borrow_mut();
            match place.0 {
                Some(i) => {
                    if w.check(i, cx.waker()) {
                        return Poll::Ready(Err(Elapsed));
                    }
                }
                None => {
                    place.0 = Some(w.enter(limit, cx.waker()));
                    if !w.ticking {
                        w.ticking = true;
                        tokio::spawn(ticker());
                    }
                }
            }
            Poll::Pending
        })
    })
    .await
}

/// Counts the thread's ticks while anything is watched, and [`IDLE_TICKS`] more.
async fn ticker() {
    let mut idle = 0;
    loop {
        tokio::time::sleep(TICK).await;
        let (due, stop) = WATCH.with(|w| {
            let mut w = w.borrow_mut();
            let due = w.advance();
            idle = if w.live == 0 { idle + 1 } else { 0 };
            let stop = idle >= IDLE_TICKS;
            if stop {
                w.ticking = false;
            }
            (due, stop)
        });
        for waker in due {
            waker.wake();
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn live() -> (usize, bool) {
        WATCH.with(|w| {
            let w = w.borrow();
            (w.live, w.ticking)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_that_ends_in_time_leaves_the_watch() {
        let r = watched(Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            7
        })
        .await;
        assert_eq!(r, Ok(7));
        assert_eq!(live(), (0, true));
        // The ticker stops once nothing was watched for a while.
        tokio::time::sleep(TICK * (IDLE_TICKS + 2)).await;
        assert_eq!(live(), (0, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_future_is_stopped_at_its_limit_not_before() {
        for limit_ms in [100u64, 250, 1000, 5000] {
            let limit = Duration::from_millis(limit_ms);
            let t = Instant::now();
            let r = watched(limit, std::future::pending::<()>()).await;
            let took = t.elapsed();
            assert_eq!(r, Err(Elapsed));
            assert!(took >= limit, "{limit:?}: {took:?}");
            assert!(took <= limit + TICK * 2, "{limit:?}: {took:?}");
            assert_eq!(live().0, 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn many_requests_each_get_their_own_answer() {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..40u64 {
            set.spawn(async move {
                // Even ones answer in 10..200 ms, odd ones never.
                let r = watched(Duration::from_millis(500), async move {
                    if i % 2 == 0 {
                        tokio::time::sleep(Duration::from_millis(10 + i * 5)).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                    i
                })
                .await;
                (i, r)
            });
        }
        let mut answered = 0;
        let mut late = 0;
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.unwrap();
            match r {
                Ok(v) => {
                    assert_eq!((v, i % 2), (i, 0));
                    answered += 1;
                }
                Err(Elapsed) => {
                    assert_eq!(i % 2, 1);
                    late += 1;
                }
            }
        }
        assert_eq!((answered, late), (20, 20));
        assert_eq!(live().0, 0);
        // The places were given back and are reused.
        assert!(WATCH.with(|w| w.borrow().entries.len()) <= 40);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_request_leaves_the_watch() {
        let waiting = watched(Duration::from_secs(5), std::future::pending::<()>());
        let r = tokio::time::timeout(Duration::from_millis(200), waiting).await;
        assert!(r.is_err());
        assert_eq!(live().0, 0);
    }
}
