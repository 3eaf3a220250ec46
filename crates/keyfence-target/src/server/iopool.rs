//! Where a session's commands that touch the medium run: off the async
//! worker threads, so a read that waits for a slow disk never holds up
//! another session whose task shares the worker.
//!
//! Each session has one [`SessionIo`] queue. Its jobs are run by
//! "runners" on tokio's blocking pool: the first job of a batch starts one
//! runner, which drains the queue in order and exits when it is empty, so
//! a burst of commands served from the page cache (a few microseconds
//! each) costs one hand-off per batch, not one per command. When a job
//! turns out to be slow (it waited for the disk) and more are queued, the
//! runner starts another, up to [`MAX_RUNNERS`] per session: a slow device
//! still sees the session's queue depth, and one session can occupy at
//! most that many blocking threads. Other sessions have their own queues
//! and runners, so their commands never wait behind this one's.
//!
//! A READ whose data is all in the page cache does not come here: the
//! session answers it on the connection's task with a read that fails
//! rather than wait (`RWF_NOWAIT`), and queues it only when that fails.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::ffp::{Completion, Job};

/// Most runners (blocking threads) one session's jobs use at once.
pub(crate) const MAX_RUNNERS: usize = 8;
/// A job that took at least this long waited for the device: if more are
/// queued, another runner starts so they do not wait behind it, and its
/// completion is sent at once.
const SLOW_JOB: Duration = Duration::from_micros(200);
/// Completions of fast jobs are sent together (one wake-up of the session
/// task and one send of their responses), but none waits longer than this
/// for the jobs run after it.
const BATCH_FOR: Duration = Duration::from_micros(100);

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    runners: usize,
}

/// One session's queue of jobs and its runners.
pub(crate) struct SessionIo {
    state: Mutex<State>,
    done: mpsc::UnboundedSender<Vec<Completion>>,
    rt: Handle,
}

impl SessionIo {
    /// Completions are sent to `done` in batches, in the order the jobs
    /// finish.
    pub fn new(done: mpsc::UnboundedSender<Vec<Completion>>) -> Arc<SessionIo> {
        Arc::new(SessionIo {
            state: Mutex::new(State::default()),
            done,
            rt: Handle::current(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `jobs`; start a runner when none is running.
    pub fn submit(self: &Arc<Self>, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let start = {
            let mut st = self.lock();
            st.queue.extend(jobs);
            if st.runners == 0 {
                st.runners = 1;
                true
            } else {
                false
            }
        };
        if start {
            self.start_runner();
        }
    }

    fn start_runner(self: &Arc<Self>) {
        let me = self.clone();
        // A runtime shutting down drops the closure: its jobs' completions
        // never come, and the session's end stops waiting for them.
        drop(self.rt.spawn_blocking(move || me.run()));
    }

    /// The session may be gone; its completions are then moot.
    fn send(&self, batch: &mut Vec<Completion>) {
        let _ = self.done.send(std::mem::take(batch));
    }

    /// One runner: run queued jobs until the queue is empty.
    fn run(self: Arc<Self>) {
        let mut batch = Vec::new();
        let mut batch_since = Instant::now();
        loop {
            let next = self.lock().queue.pop_front();
            let Some(job) = next else {
                if !batch.is_empty() {
                    // Jobs may have come while the batch is sent: look again.
                    self.send(&mut batch);
                    continue;
                }
                let mut st = self.lock();
                if st.queue.is_empty() {
                    st.runners -= 1;
                    return;
                }
                continue;
            };
            let started = Instant::now();
            if batch.is_empty() {
                batch_since = started;
            }
            batch.push(job.run());
            let done = Instant::now();
            let slow = done.duration_since(started) >= SLOW_JOB;
            if slow || done.duration_since(batch_since) >= BATCH_FOR {
                self.send(&mut batch);
            }
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
                    self.start_runner();
                }
            }
        }
    }
}
