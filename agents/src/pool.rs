//! The inference pool: heavy work (ASR, LLM, TTS) runs on blocking threads,
//! never on the async runtime's workers, and at most `size` jobs run at
//! once so that a burst of calls queues instead of thrashing the cores.
//!
//! The queue is not first come, first served: a job a caller is waiting
//! for in silence ([`Urgency::Now`]: a final transcript, a reply's first
//! words and their audio) goes before one with slack ([`Urgency::Later`]:
//! the rest of a reply whose start is already playing, a guess, a warm-up,
//! API work). When calls answer at the same time each one's first audio
//! comes before any one's second sentence.
//!
//! Among the jobs callers wait for, the caller who has waited longest goes
//! first (earliest deadline first), not the job queued first: a reply's
//! work comes in several jobs (its transcript, slices of its words, their
//! audio), and served in turn with another call's they would both end
//! late, where one after the other the first ends early and the second no
//! later.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, Notify};

use crate::error::AgentError;

/// How soon a job's result is needed, ordered by when it is due: a caller
/// who has waited longer is due sooner, and every caller before any work
/// with slack (the least urgency is the most urgent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Urgency {
    /// A caller has heard silence since this instant (the end of their
    /// words, or the answer), and does until it is done.
    Now(Instant),
    /// It has slack: audio is already playing, or it is optional.
    Later,
}

impl Urgency {
    /// A caller waits for it from now on.
    pub fn now() -> Self {
        Urgency::Now(Instant::now())
    }

    pub fn is_now(self) -> bool {
        matches!(self, Urgency::Now(_))
    }
}

#[derive(Clone)]
pub struct InferencePool {
    slots: Arc<Mutex<Slots>>,
    size: usize,
}

/// Free slots and who waits for one: callers' jobs by how long the caller
/// has waited (the same wait in the order they came), the others in order.
struct Slots {
    free: usize,
    now: VecDeque<(Instant, oneshot::Sender<Slot>)>,
    later: VecDeque<oneshot::Sender<Slot>>,
    /// Told whenever a slot goes back to the free ones.
    freed: Arc<Notify>,
}

/// The right to run one job; dropped (wherever it is, also inside a
/// channel nobody reads any more), it passes to the next waiter.
struct Slot {
    /// None once the slot has been handed on (nothing left to give back).
    slots: Option<Arc<Mutex<Slots>>>,
}

impl Slot {
    fn of(slots: &Arc<Mutex<Slots>>) -> Self {
        Slot { slots: Some(slots.clone()) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(shared) = self.slots.take() else { return };
        let mut slots = shared.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(waiter) = slots.now.pop_front().map(|(_, w)| w).or_else(|| slots.later.pop_front()) {
            match waiter.send(Slot::of(&shared)) {
                Ok(()) => return,
                // That waiter gave up: the slot goes to the next one, and
                // the copy it was not sent has nothing to give back.
                Err(mut unsent) => unsent.slots = None,
            }
        }
        slots.free += 1;
        slots.freed.notify_waiters();
    }
}

/// Slots a running job took besides its own: while they are held no other
/// job starts on the cores they stand for, so the job may run threads there
/// (a multi-threaded decode or synthesis next to another job spins on its
/// barriers and takes many times longer). Dropped, they go to the next
/// waiters.
pub struct Extra {
    slots: Vec<Slot>,
}

impl Extra {
    /// Cores the job may use: its own and the ones taken.
    pub fn cores(&self) -> usize {
        1 + self.slots.len()
    }
}

impl InferencePool {
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        InferencePool { slots: Arc::new(Mutex::new(Slots { free: size, now: VecDeque::new(), later: VecDeque::new(), freed: Arc::new(Notify::new()) })), size }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Jobs that could start now without waiting.
    pub fn idle_slots(&self) -> usize {
        self.lock().free
    }

    /// No job runs.
    pub fn idle(&self) -> bool {
        self.idle_slots() >= self.size
    }

    /// No job runs but (at most) the caller's own: called from a job, or
    /// by the one whose work holds a slot, it means nothing else competes.
    pub fn idle_but_one(&self) -> bool {
        self.idle_slots() + 1 >= self.size
    }

    /// Waits until no job runs, for at most `timeout`; true if the pool is
    /// idle by then.
    pub async fn idle_within(&self, timeout: std::time::Duration) -> bool {
        let freed = self.lock().freed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = freed.notified();
            tokio::pin!(notified);
            // Registered before the check: a slot freed in between wakes it.
            notified.as_mut().enable();
            if self.idle() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A free slot, if `slots` (this pool's, locked) has one.
    fn take_free(&self, slots: &mut Slots) -> Option<Slot> {
        (slots.free > 0).then(|| {
            slots.free -= 1;
            Slot::of(&self.slots)
        })
    }

    fn try_take(&self) -> Option<Slot> {
        self.take_free(&mut self.lock())
    }

    async fn take(&self, urgency: Urgency) -> Result<Slot, AgentError> {
        let waiting = {
            // Checked and queued under one lock: a slot freed in between
            // would otherwise find no waiter and this one wait for the next.
            let mut slots = self.lock();
            if let Some(slot) = self.take_free(&mut slots) {
                return Ok(slot);
            }
            let (tx, rx) = oneshot::channel();
            match urgency {
                Urgency::Now(since) => {
                    let at = slots.now.partition_point(|(s, _)| *s <= since);
                    slots.now.insert(at, (since, tx));
                }
                Urgency::Later => slots.later.push_back(tx),
            }
            rx
        };
        waiting.await.map_err(|_| AgentError::Closed)
    }

    /// Up to `most` more slots, for a job that runs on this pool and could
    /// use more cores: those free now (a slot is free only while no job
    /// waits, so this never delays one that is queued). Never waits.
    pub fn try_extra(&self, most: usize) -> Extra {
        let mut slots = self.lock();
        let mut taken = Vec::new();
        while taken.len() < most {
            match self.take_free(&mut slots) {
                Some(slot) => taken.push(slot),
                None => break,
            }
        }
        drop(slots);
        Extra { slots: taken }
    }

    /// A job a caller waits for is queued that is due before work of
    /// `urgency` (for work with slack: any such job). Work that can stop
    /// between steps, such as replies read together, gives way to it.
    pub fn urgent_waiting_before(&self, urgency: Urgency) -> bool {
        let slots = self.lock();
        slots.now.iter().find(|(_, waiter)| !waiter.is_closed()).is_some_and(|(since, _)| Urgency::Now(*since) < urgency)
    }

    /// Runs `job` once a slot is free for work of this `urgency`.
    pub async fn run<T: Send + 'static>(&self, urgency: Urgency, job: impl FnOnce() -> T + Send + 'static) -> Result<T, AgentError> {
        let slot = self.take(urgency).await?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            job()
        })
        .await
        .map_err(|e| AgentError::Inference(format!("inference job failed: {e}")))
    }

    /// Runs `job` only if a slot is free now: for optional work (partial
    /// transcripts) that must not delay the work a caller is waiting for.
    pub fn try_run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<tokio::task::JoinHandle<T>> {
        let slot = self.try_take()?;
        Some(tokio::task::spawn_blocking(move || {
            let _slot = slot;
            job()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Occupies the pool's only slot until the returned sender is used.
    async fn hold(pool: &InferencePool) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = oneshot::channel();
        let p = pool.clone();
        let job = tokio::spawn(async move {
            p.run(Urgency::Later, move || {
                let _ = started_tx.send(());
                let _ = held.recv();
            })
            .await
            .unwrap();
        });
        started.await.unwrap();
        (release, job)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn urgent_work_overtakes_work_with_slack_and_each_keeps_its_order() {
        let pool = InferencePool::new(1);
        let (release, holder) = hold(&pool).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut jobs = Vec::new();
        for (name, urgency) in [("later 1", Urgency::Later), ("now 1", Urgency::now()), ("later 2", Urgency::Later), ("now 2", Urgency::now())] {
            let (p, order) = (pool.clone(), order.clone());
            jobs.push(tokio::spawn(async move { p.run(urgency, move || order.lock().unwrap().push(name)).await.unwrap() }));
            // Queued in this order.
            waiting(&pool, jobs.len()).await;
        }
        release.send(()).unwrap();
        holder.await.unwrap();
        for job in jobs {
            job.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["now 1", "now 2", "later 1", "later 2"]);
        assert_eq!(pool.idle_slots(), 1);
    }

    /// Returns once `n` jobs wait for a slot.
    async fn waiting(pool: &InferencePool, n: usize) {
        while {
            let slots = pool.lock();
            slots.now.len() + slots.later.len()
        } < n
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn running_work_learns_when_a_caller_due_before_it_waits() {
        let pool = InferencePool::new(1);
        let (release, holder) = hold(&pool).await;
        let t0 = Instant::now();
        let (early, late) = (Urgency::Now(t0), Urgency::Now(t0 + Duration::from_millis(300)));
        assert!(!pool.urgent_waiting_before(Urgency::Later), "nobody waits");
        let queue = |urgency: Urgency| {
            let p = pool.clone();
            tokio::spawn(async move { p.run(urgency, || ()).await })
        };
        let slack = queue(Urgency::Later);
        waiting(&pool, 1).await;
        assert!(!pool.urgent_waiting_before(Urgency::Later), "work with slack is no reason to give way");
        let caller = queue(late);
        waiting(&pool, 2).await;
        assert!(pool.urgent_waiting_before(Urgency::Later));
        assert!(pool.urgent_waiting_before(Urgency::Now(t0 + Duration::from_millis(400))), "for a caller due after it");
        assert!(!pool.urgent_waiting_before(late), "not for a caller due at the same time");
        assert!(!pool.urgent_waiting_before(early), "not for one due later");
        // A waiter that gave up is nobody.
        caller.abort();
        let _ = caller.await;
        assert!(!pool.urgent_waiting_before(Urgency::Later));
        release.send(()).unwrap();
        holder.await.unwrap();
        slack.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_caller_who_has_waited_longest_goes_first() {
        let pool = InferencePool::new(1);
        let (release, holder) = hold(&pool).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(300);
        let mut jobs = Vec::new();
        for (name, since) in [("turn ended at 300 ms", later), ("turn ended at 0", t0), ("another turn ended at 300 ms", later)] {
            let (p, order) = (pool.clone(), order.clone());
            jobs.push(tokio::spawn(async move { p.run(Urgency::Now(since), move || order.lock().unwrap().push(name)).await.unwrap() }));
            while pool.lock().now.len() < jobs.len() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        release.send(()).unwrap();
        holder.await.unwrap();
        for job in jobs {
            job.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["turn ended at 0", "turn ended at 300 ms", "another turn ended at 300 ms"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_the_pool_to_be_idle_ends_when_its_last_job_does() {
        let pool = InferencePool::new(1);
        assert!(pool.idle_within(Duration::ZERO).await, "nothing runs");
        let (release, holder) = hold(&pool).await;
        assert!(!pool.idle_within(Duration::from_millis(30)).await, "a job runs until released");
        let p = pool.clone();
        let waiting = tokio::spawn(async move { p.idle_within(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(()).unwrap();
        assert!(waiting.await.unwrap(), "woken when the slot came back");
        holder.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_takes_the_other_free_slots_and_work_that_comes_meanwhile_waits() {
        let pool = InferencePool::new(3);
        let (release, holder) = hold(&pool).await;
        let (p, inside) = (pool.clone(), pool.clone());
        let (wide_tx, wide_rx) = std::sync::mpsc::channel::<()>();
        let (cores_tx, cores) = oneshot::channel();
        let wide = tokio::spawn(async move {
            p.run(Urgency::now(), move || {
                let extra = inside.try_extra(usize::MAX);
                let _ = cores_tx.send(extra.cores());
                let _ = wide_rx.recv();
            })
            .await
            .unwrap()
        });
        assert_eq!(cores.await.unwrap(), 2, "its own slot and the one left free");
        assert_eq!(pool.idle_slots(), 0);
        let p = pool.clone();
        let queued = tokio::spawn(async move { p.run(Urgency::now(), || 5).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!queued.is_finished(), "no slot until a job ends");
        assert_eq!(pool.try_extra(usize::MAX).cores(), 1, "nothing free to take");
        wide_tx.send(()).unwrap();
        wide.await.unwrap();
        assert_eq!(queued.await.unwrap(), 5);
        release.send(()).unwrap();
        holder.await.unwrap();
        assert_eq!(pool.idle_slots(), 3, "every slot came back");
        assert_eq!(pool.try_extra(1).cores(), 2, "at most the number asked for");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_that_gives_up_does_not_keep_the_slot() {
        let pool = InferencePool::new(1);
        let (release, holder) = hold(&pool).await;
        let p = pool.clone();
        let gave_up = tokio::spawn(async move { p.run(Urgency::now(), || ()).await });
        while pool.lock().now.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        gave_up.abort();
        let _ = gave_up.await;
        release.send(()).unwrap();
        holder.await.unwrap();
        assert_eq!(pool.idle_slots(), 1, "the slot came back");
        assert_eq!(pool.run(Urgency::Later, || 7).await.unwrap(), 7);
    }
}
