//! Coarse timers of an edge thread, cheaper than a tokio timer each.
//!
//! Two waits happen on every request and almost never end by their timer: hyper's HTTP/1
//! header-read timeout (armed while each request head is awaited, dropped when it came) and the
//! preview's late-answer backstop (`upstream_head_timeout`, preview/forward.rs). A tokio timer
//! costs a wheel insertion and removal each, and a place in every park of the thread. On an edge
//! thread (one current-thread runtime, so a connection's task never leaves it) they are instead
//! entered in the thread's watch: one ticker task counts ticks of [`TICK`] while anything is
//! watched (and [`IDLE_TICKS`] more) and wakes what is due. A wait so ends at most about one
//! tick late, never early. Elsewhere (the main runtime, which moves tasks between threads)
//! tokio's timers are used.
//!
//! - [`within`]: a future under a limit, with no clock read to enter or leave the watch;
//! - [`EdgeTimer`]: hyper's `Timer` for HTTP/1 connections.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// tokio's clock: std's `Instant`, except that tests can pause it.
type Clock = tokio::time::Instant;

/// The watch's resolution.
const TICK: Duration = Duration::from_millis(100);
/// Ticks with nothing to watch before the ticker stops (it starts again with the next entry).
const IDLE_TICKS: u32 = 50;

/// The limit passed before the future ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

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
    /// When the last tick was counted (or the ticker started).
    last_tick: Option<Clock>,
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
    /// Enters a wait of `limit` from now.
    fn enter(&mut self, limit: Duration, waker: &Waker) -> usize {
        // Whole ticks, rounded up, plus one for the part of the current tick already gone: the
        // limit is never cut short.
        self.enter_due(self.now + ticks(limit) + 1, waker)
    }

    /// Enters a wait until `deadline`; `None` when it has passed.
    fn enter_until(&mut self, deadline: Clock, waker: &Waker) -> Option<usize> {
        // Counted from the last tick (ticks fire a whole number of ticks after it, or later):
        // no clock read while the ticker runs.
        let from = match self.last_tick {
            Some(t) if self.ticking => t,
            _ => Clock::now(),
        };
        if deadline <= from && deadline <= Clock::now() {
            return None;
        }
        Some(self.enter_due(
            self.now + ticks(deadline.saturating_duration_since(from)),
            waker,
        ))
    }

    fn enter_due(&mut self, due: u64, waker: &Waker) -> usize {
        let entry = Entry {
            due,
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

    /// Starts the thread's ticker unless it runs.
    fn start_ticker(&mut self) {
        if !self.ticking {
            self.ticking = true;
            self.last_tick = Some(Clock::now());
            tokio::spawn(ticker());
        }
    }

    /// One tick: the wakers of the entries now due (woken by the caller, outside the borrow).
    fn advance(&mut self) -> Vec<Waker> {
        self.now += 1;
        self.last_tick = Some(Clock::now());
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

/// Whole ticks in `d`, rounded up.
fn ticks(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(TICK.as_nanos())).unwrap_or(u64::MAX / 2)
}

/// Runs `fut` for at most `limit` (see the module's doc).
pub async fn within<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
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
                    w.start_ticker();
                    place.0 = Some(w.enter(limit, cx.waker()));
                }
            }
            Poll::Pending
        })
    })
    .await
}

/// hyper's `Timer` for HTTP/1 connections: a sleep on an edge thread is a place in its watch,
/// elsewhere a tokio timer.
#[derive(Clone, Debug, Default)]
pub struct EdgeTimer;

impl hyper::rt::Timer for EdgeTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        if crate::edge::percore::on_edge_thread() {
            Box::pin(CoarseSleep {
                deadline: Clock::from_std(deadline),
                place: Place(None),
                done: false,
            })
        } else {
            hyper_util::rt::TokioTimer::new().sleep_until(deadline)
        }
    }
}

/// A sleep in the thread's watch, entered when first polled.
struct CoarseSleep {
    deadline: Clock,
    place: Place,
    done: bool,
}

impl hyper::rt::Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        let this = &mut *self;
        let due = WATCH.with(|w| {
            let mut w = w.borrow_mut();
            match this.place.0 {
                Some(i) => w.check(i, cx.waker()),
                None => {
                    w.start_ticker();
                    match w.enter_until(this.deadline, cx.waker()) {
                        Some(i) => {
                            this.place.0 = Some(i);
                            false
                        }
                        None => true,
                    }
                }
            }
        });
        if due {
            this.done = true;
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
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
    async fn a_coarse_sleep_ends_at_its_deadline_not_before() {
        for ms in [0u64, 1, 99, 100, 250, 3000] {
            let deadline = Instant::now() + Duration::from_millis(ms);
            let t = Instant::now();
            CoarseSleep {
                deadline,
                place: Place(None),
                done: false,
            }
            .await;
            let took = t.elapsed();
            assert!(Instant::now() >= deadline, "{ms}: {took:?}");
            assert!(
                took <= Duration::from_millis(ms) + TICK * 2,
                "{ms}: {took:?}"
            );
            assert_eq!(live().0, 0);
        }
        // A deadline in the past ends at once.
        let t = Instant::now();
        CoarseSleep {
            deadline: Instant::now() - Duration::from_secs(1),
            place: Place(None),
            done: false,
        }
        .await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_request_leaves_the_watch() {
        let waiting = watched(Duration::from_secs(5), std::future::pending::<()>());
        let r = tokio::time::timeout(Duration::from_millis(200), waiting).await;
        assert!(r.is_err());
        assert_eq!(live().0, 0);
    }
}
