//! Where a session's commands that touch the medium run: off the async
//! worker threads, so a read that waits for a slow disk never holds up
//! another session whose task shares the worker.
//!
//! Each session has one [`SessionIo`] queue. Its jobs are run by
//! "runners" on tokio's blocking pool: the first job of a batch starts one
//! runner, which drains the queue in order and exits when it is empty, so
//! a burst of commands served from the page cache (a few microseconds
//! each) costs one hand-off per batch, not one per command. After fast
//! jobs it stays a little while (see [`LINGER`]) before it exits, so the
//! initiator's next burst finds it still running. When a job
//! turns out to be slow (it waited for the disk) and more are queued, the
//! runner starts another, up to [`MAX_RUNNERS`] per session: a slow device
//! still sees the session's queue depth, and one session can occupy at
//! most that many blocking threads. Other sessions have their own queues
//! and runners, so their commands never wait behind this one's.
//!
//! Completions go back to the session through [`Done`]: runners append
//! them to the queue's state and signal an eventfd the session's task
//! waits on with the runtime's I/O driver. The worker parked in the
//! driver wakes and runs the task itself; a wake-up through a channel
//! would schedule the task from outside the runtime, which also wakes a
//! second worker to look for more work (a futex wake-up and two context
//! switches more per batch). Thread switches are most of what a 4 KiB
//! write costs beyond the kernel's write itself, so the runner also sends
//! completions in batches as large as the initiator's queue (see
//! [`BATCH_FOR`]).
//!
//! A READ whose data is all in the page cache does not come here: the
//! session answers it on the connection's task with a read that fails
//! rather than wait (`RWF_NOWAIT`), and queues it only when that fails.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::Handle;

use super::ffp::{Completion, Job};

/// Most runners (blocking threads) one session's jobs use at once.
pub(crate) const MAX_RUNNERS: usize = 8;
/// A job that took at least this long and blocked (the thread switched out
/// voluntarily: it waited for the device) is slow: if more are queued,
/// another runner starts so they do not wait behind it, and its completion
/// is sent at once. One that was only preempted on a busy machine is not.
const SLOW_JOB: Duration = Duration::from_micros(200);
/// Completions of fast jobs are sent together when the queue is empty (one
/// wake-up of the session task and one send of their responses, as many as
/// the initiator queued), but none waits longer than this for the jobs run
/// after it. At 100 us a queue of 4 KiB writes went out in batches of about
/// five, each costing the session a wake-up, a send and a receive.
const BATCH_FOR: Duration = Duration::from_millis(1);
/// When the queue empties after fast jobs, the session's first runner
/// looks for more for this long, yielding its CPU between looks, before it
/// exits: an initiator that keeps its queue full sends the next commands
/// as soon as it has the responses, and a runner that is still there
/// takes them without a thread wake-up (a futex wake-up and a park). At
/// queue depth 32 and 4 KiB writes that took about 0.15 futex calls and
/// 0.09 context switches per IO off the target. Runners started because a
/// job was slow do not linger.
const LINGER: Duration = Duration::from_micros(50);
/// After this many lingers in a row found no job, runners stop lingering
/// until jobs come again within [`LINGER`] of the queue running empty: an
/// initiator that waits for each response longer than that (one command
/// at a time, or an idle one) does not pay for them.
const LINGER_MISSES: u8 = 2;
/// A yield of the CPU that took this long ran another thread: the CPU is
/// wanted, and the runner stops lingering (on a busy machine a lingering
/// runner would slow the threads that answer and send the next commands).
const CONTENDED: Duration = Duration::from_micros(10);

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    runners: usize,
    /// Finished jobs the session has not taken yet, in the order they
    /// finished.
    done: Vec<Completion>,
    /// The eventfd was signalled and the session has not taken the
    /// completions since: further ones need no signal.
    signalled: bool,
    /// When the queue last ran empty before its runner left: how soon the
    /// next jobs came tells whether a lingering runner would have taken
    /// them.
    idle_at: Option<Instant>,
    /// Lingers in a row that ended with no job (see [`LINGER`]).
    misses: u8,
}

/// One session's queue of jobs and its runners.
pub(crate) struct SessionIo {
    state: Mutex<State>,
    /// The queue's length as last set under the lock: a lingering runner
    /// looks at it without taking the lock the session submits under.
    queued: AtomicUsize,
    /// Signalled when completions are added; the session's task waits
    /// for it to become readable (see [`Done`]).
    event: AsyncFd<File>,
    rt: Handle,
}

/// The session's end: waits for completions and takes them.
pub(crate) struct Done {
    io: Arc<SessionIo>,
    /// The vector completions were last taken into, kept for its capacity.
    spare: Vec<Completion>,
}

/// A non-blocking eventfd, close-on-exec.
fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new
    // file descriptor that nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

impl SessionIo {
    /// The queue and the session's end of its completions. Fails when no
    /// file descriptor is left for the eventfd.
    pub fn new() -> io::Result<(Arc<SessionIo>, Done)> {
        let event = eventfd()?;
        // SAFETY: the `File` owns its descriptor, and the `AsyncFd` owns the
        // `File` until it is dropped: the descriptor stays open and the same.
        let event = unsafe { AsyncFd::register_with_interest(event, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let io = Arc::new(SessionIo {
            state: Mutex::new(State::default()),
            queued: AtomicUsize::new(0),
            event,
            rt: Handle::current(),
        });
        Ok((
            io.clone(),
            Done {
                io,
                spare: Vec::new(),
            },
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `jobs` (leaving the vector empty, with its capacity); start a
    /// runner when none is running.
    pub fn submit(self: &Arc<Self>, jobs: &mut Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let start = {
            let mut st = self.lock();
            st.queue.extend(jobs.drain(..));
            self.queued.store(st.queue.len(), Ordering::Release);
            if st.runners == 0 {
                st.runners = 1;
                // Jobs that came soon after the last runner left would
                // have been taken by one that lingered.
                if st.idle_at.is_some_and(|t| t.elapsed() < LINGER) {
                    st.misses = 0;
                }
                Some(st.misses < LINGER_MISSES)
            } else {
                None
            }
        };
        if let Some(linger) = start {
            self.start_runner(linger);
        }
    }

    fn start_runner(self: &Arc<Self>, may_linger: bool) {
        let me = self.clone();
        // A runtime shutting down drops the closure: its jobs' completions
        // never come, and the session's end stops waiting for them.
        drop(self.rt.spawn_blocking(move || me.run(may_linger)));
    }

    /// Hand finished jobs to the session, signalling it unless a signal
    /// it has not acted on is pending.
    fn send(&self, batch: &mut Vec<Completion>) {
        let signal = {
            let mut st = self.lock();
            st.done.append(batch);
            !std::mem::replace(&mut st.signalled, true)
        };
        if signal {
            // Cannot block (non-blocking, and the counter cannot
            // overflow); an error leaves the session to its own timeout.
            let _ = self.event.get_ref().write(&1u64.to_ne_bytes());
        }
    }

    /// One runner: run queued jobs until the queue is empty.
    fn run(self: Arc<Self>, may_linger: bool) {
        let mut batch = Vec::new();
        let mut batch_since = Instant::now();
        let mut switches = Switches::now();
        // Since when the queue has been empty (with nothing left to send),
        // and whether the runner may linger then.
        let mut idle_since: Option<Instant> = None;
        let mut linger = may_linger;
        // It lingered since the queue ran empty.
        let mut lingered = false;
        loop {
            let next = {
                let mut st = self.lock();
                let job = st.queue.pop_front();
                self.queued.store(st.queue.len(), Ordering::Release);
                if job.is_some() && idle_since.is_some() {
                    // The linger paid off.
                    st.misses = 0;
                }
                job
            };
            let Some(job) = next else {
                if !batch.is_empty() {
                    // Jobs may have come while the batch is sent: look again.
                    self.send(&mut batch);
                    continue;
                }
                let now = Instant::now();
                let since = *idle_since.get_or_insert(now);
                if linger && now.duration_since(since) < LINGER {
                    lingered = true;
                    loop {
                        let before = Instant::now();
                        std::thread::yield_now();
                        let after = Instant::now();
                        if after.duration_since(before) >= CONTENDED {
                            // Another thread wanted this CPU: lingering
                            // would take it from that one.
                            linger = false;
                            break;
                        }
                        if self.queued.load(Ordering::Acquire) != 0
                            || after.duration_since(since) >= LINGER
                        {
                            break;
                        }
                    }
                    continue;
                }
                let mut st = self.lock();
                if st.queue.is_empty() {
                    st.runners -= 1;
                    if lingered {
                        st.misses = st.misses.saturating_add(1);
                    }
                    st.idle_at = Some(since);
                    return;
                }
                continue;
            };
            idle_since = None;
            lingered = false;
            let started = Instant::now();
            if batch.is_empty() {
                batch_since = started;
            }
            batch.push(job.run());
            let done = Instant::now();
            // Slow because it waited (for the device, a lock), not because
            // the thread was preempted on a busy machine: another runner
            // would not make a preempted one faster.
            let slow = done.duration_since(started) >= SLOW_JOB && switches.waited();
            if slow || done.duration_since(batch_since) >= BATCH_FOR {
                self.send(&mut batch);
            }
            // A runner whose jobs wait for the device gains little by
            // lingering.
            linger = may_linger && !slow;
            if slow {
                let more = {
                    let mut st = self.lock();
                    let more = !st.queue.is_empty() && st.runners < MAX_RUNNERS;
                    if more {
                        st.runners += 1;
                    }
                    more
                };
                if more {
                    self.start_runner(false);
                }
            }
        }
    }
}

/// The calling thread's voluntary context switches (it blocked: on I/O,
/// a lock, a sleep), as last read.
struct Switches(libc::c_long);

impl Switches {
    fn read() -> libc::c_long {
        // SAFETY: getrusage writes one `rusage` to the pointer, which is
        // valid and properly aligned for it; zeroed is a valid `rusage`.
        unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            if libc::getrusage(libc::RUSAGE_THREAD, &mut ru) != 0 {
                return -1;
            }
            ru.ru_nvcsw
        }
    }

    fn now() -> Switches {
        Switches(Self::read())
    }

    /// Did the thread block since the last call (or [`Switches::now`])?
    /// True when that cannot be told.
    fn waited(&mut self) -> bool {
        let n = Self::read();
        let waited = n < 0 || n != self.0;
        self.0 = n;
        waited
    }
}

impl Done {
    /// Wait for finished jobs and take every one there is, in the order
    /// they finished. `None` when the runtime is shutting down. Cancel
    /// safe: nothing is consumed before the last await.
    pub async fn next(&mut self) -> Option<std::vec::Drain<'_, Completion>> {
        loop {
            let mut ready = self.io.event.readable().await.ok()?;
            let mut counter = [0u8; 8];
            match ready.get_inner().read(&mut counter) {
                Ok(_) => ready.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An eventfd read fails no other way.
                Err(_) => return None,
            }
            let mut st = self.io.lock();
            st.signalled = false;
            if !st.done.is_empty() {
                self.spare.clear();
                std::mem::swap(&mut st.done, &mut self.spare);
                drop(st);
                return Some(self.spare.drain(..));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ffp::ResetJob;
    use super::*;

    /// A job that touches no LU: a reset of none.
    fn job(itt: u32) -> Job {
        Job::Reset(ResetJob {
            tmf_itt: itt,
            lus: Vec::new(),
            target_reset: None,
        })
    }

    fn itts(done: std::vec::Drain<'_, Completion>) -> Vec<u32> {
        done.map(|c| match c {
            Completion::Reset { tmf_itt } => tmf_itt,
            Completion::Command(_) => panic!("no command was queued"),
        })
        .collect()
    }

    /// Wait until the session's runners have all left.
    async fn idle(io: &SessionIo) {
        let until = Instant::now() + Duration::from_secs(10);
        while io.lock().runners != 0 {
            assert!(Instant::now() < until, "a runner never left");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// One batch, its completions, and the misses counted once the runner
    /// has left (at least 2 ms after the last one left: far longer than a
    /// linger, so no linger could have taken the jobs).
    async fn round(io: &Arc<SessionIo>, done: &mut Done, first: u32) -> u8 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let mut jobs = vec![job(first), job(first + 1), job(first + 2)];
        io.submit(&mut jobs);
        assert!(jobs.is_empty());
        let mut got = Vec::new();
        while got.len() < 3 {
            got.extend(itts(done.next().await.expect("completions")));
        }
        assert_eq!(got, [first, first + 1, first + 2], "in the order queued");
        idle(io).await;
        io.lock().misses
    }

    #[tokio::test]
    async fn a_runner_lingers_until_lingering_stops_paying() {
        let (io, mut done) = SessionIo::new().unwrap();
        // Nobody sends more jobs: each linger is a miss, until there have
        // been LINGER_MISSES of them; then runners leave at once.
        assert_eq!(round(&io, &mut done, 10).await, 1);
        assert_eq!(round(&io, &mut done, 20).await, 2);
        assert_eq!(
            round(&io, &mut done, 30).await,
            2,
            "no linger after two misses"
        );
        // Jobs that come within LINGER of the queue running empty make
        // lingering worth it again.
        io.lock().idle_at = Some(Instant::now() + Duration::from_secs(60));
        let mut jobs = vec![job(40)];
        io.submit(&mut jobs);
        assert_eq!(itts(done.next().await.unwrap()), [40]);
        idle(&io).await;
        assert_eq!(io.lock().misses, 1, "lingered again, and missed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_queued_while_a_runner_lingers_are_run_in_order() {
        let (io, mut done) = SessionIo::new().unwrap();
        let mut got = Vec::new();
        for burst in 0..200u32 {
            let mut jobs: Vec<Job> = (0..4).map(|i| job(burst * 4 + i)).collect();
            io.submit(&mut jobs);
            // The next burst follows the completions, as an initiator's
            // does: often while the runner lingers.
            while got.len() < (burst as usize + 1) * 4 {
                got.extend(itts(done.next().await.expect("completions")));
            }
        }
        assert_eq!(got, (0..800).collect::<Vec<_>>());
        idle(&io).await;
        assert!(io.lock().queue.is_empty());
    }
}
