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
}

/// One session's queue of jobs and its runners.
pub(crate) struct SessionIo {
    state: Mutex<State>,
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
    fn run(self: Arc<Self>) {
        let mut batch = Vec::new();
        let mut batch_since = Instant::now();
        let mut switches = Switches::now();
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
            // Slow because it waited (for the device, a lock), not because
            // the thread was preempted on a busy machine: another runner
            // would not make a preempted one faster.
            let slow = done.duration_since(started) >= SLOW_JOB && switches.waited();
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
