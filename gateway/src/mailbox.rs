//! A shard's inbox: how other threads (shards, the storage writer, the
//! bridge) hand it work without sharing its state.
//!
//! A bounded lock-free queue (crossbeam `ArrayQueue`) carries the messages;
//! an eventfd carries the wake-up. The receiving shard waits on the eventfd
//! with an io_uring read, so an idle shard sleeps in the kernel like it does
//! for sockets. Senders write the eventfd only when the receiver has said it
//! is about to sleep (`parked`), so a busy shard is fed with no syscall at
//! all: the queue is drained in the same loop that serves its sockets.
//!
//! The protocol between the two sides, which the tests below exercise:
//! - receiver: drain; set `parked`; drain again (a message may have landed
//!   between the first drain and the flag); if still empty, read the eventfd.
//! - sender: push; if `parked` was set, clear it and write the eventfd.
//!
//! Either the receiver's second drain sees the message, or the sender sees
//! the flag and wakes it: a message is never left waiting on a sleeping
//! shard.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;

/// A bounded multi-producer, single-consumer inbox with an eventfd wake-up.
pub struct Mailbox<T> {
    queue: ArrayQueue<T>,
    parked: AtomicBool,
    eventfd: OwnedFd,
    /// Messages refused because the queue was full.
    pub full: AtomicU64,
    /// Messages queued, by sender (a shard's number). A shard never posts to
    /// its own inbox (it calls its own chat service directly), so the
    /// receiver's own entry stays 0; `/metrics` shows it to prove that.
    posts: Box<[AtomicU64]>,
}

impl<T> std::fmt::Debug for Mailbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("len", &self.queue.len())
            .field("capacity", &self.queue.capacity())
            .finish()
    }
}

impl<T: Send> Mailbox<T> {
    /// An inbox holding at most `capacity` messages, posted to by senders
    /// numbered `0..senders`.
    pub fn new(capacity: usize, senders: usize) -> std::io::Result<Self> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            queue: ArrayQueue::new(capacity.max(1)),
            parked: AtomicBool::new(false),
            eventfd,
            full: AtomicU64::new(0),
            posts: (0..senders).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Queues `msg` and wakes the receiver if it sleeps. A full inbox hands
    /// the message back: the sender decides (retry later, or refuse the
    /// client's command with `unavailable`), nothing grows without bound.
    pub fn send(&self, from: usize, msg: T) -> Result<(), T> {
        if let Err(msg) = self.queue.push(msg) {
            self.full.fetch_add(1, Ordering::Relaxed);
            return Err(msg);
        }
        if let Some(n) = self.posts.get(from) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        self.wake();
        Ok(())
    }

    /// Messages queued so far by sender `from`.
    pub fn posts_from(&self, from: usize) -> u64 {
        self.posts.get(from).map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// How many senders are counted.
    pub fn senders(&self) -> usize {
        self.posts.len()
    }

    /// Wakes the receiver if it sleeps (for work signalled elsewhere, such
    /// as storage completions).
    pub fn wake(&self) {
        if self.parked.load(Ordering::SeqCst) && self.parked.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
            let n = unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            debug_assert_eq!(n, 8, "eventfd write");
        }
    }

    /// Takes the next message, if any.
    pub fn try_recv(&self) -> Option<T> {
        self.queue.pop()
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Announces that the receiver is going to sleep. Returns false if a
    /// message arrived meanwhile (then it must drain again, not sleep).
    pub fn prepare_park(&self) -> bool {
        self.parked.store(true, Ordering::SeqCst);
        if self.queue.is_empty() {
            true
        } else {
            self.parked.store(false, Ordering::SeqCst);
            false
        }
    }

    /// A second handle on the eventfd, for the receiver's runtime to read.
    pub fn wake_fd(&self) -> std::io::Result<OwnedFd> {
        self.eventfd.try_clone()
    }
}

/// The receiving side's wait: an io_uring read of the eventfd, or on epoll
/// its readiness and then a read.
pub struct Waiter {
    on: WaitOn,
}

enum WaitOn {
    /// io_uring: the read waits in the ring.
    Ring {
        file: monoio::fs::File,
        /// The 8-byte read buffer, reused across sleeps (io_uring owns it
        /// while the read is in flight, so it travels by value).
        buf: std::cell::Cell<Option<Vec<u8>>>,
    },
    /// epoll: monoio's legacy driver reads a file at once, by `pread`,
    /// which an eventfd refuses (`ESPIPE`): the shard logged that and
    /// slept 10 ms per turn instead of waiting for a wake. Only sockets
    /// wait for readiness there, so the eventfd is held as one
    /// (`UnixStream` here is only the handle that registers a descriptor
    /// with the poller: its socket calls are never made on it).
    Epoll { ready: monoio::net::UnixStream },
}

impl Waiter {
    /// Wraps the mailbox's eventfd for the current runtime.
    pub fn new<T: Send>(mailbox: &Mailbox<T>) -> std::io::Result<Self> {
        let fd = mailbox.wake_fd()?;
        let on = if monoio::utils::is_legacy() {
            // Non-blocking for the read after readiness. The flag is the
            // file's, so the senders' writes get it too: an eventfd write
            // only blocks when its counter would overflow 2^64 - 2.
            let handle = std::os::unix::net::UnixStream::from(fd);
            handle.set_nonblocking(true)?;
            let ready = monoio::net::UnixStream::from_std(handle)?;
            WaitOn::Epoll { ready }
        } else {
            let file = monoio::fs::File::from_std(std::fs::File::from(fd))?;
            WaitOn::Ring { file, buf: std::cell::Cell::new(Some(Vec::with_capacity(8))) }
        };
        Ok(Self { on })
    }

    /// Sleeps until the mailbox is woken (after `prepare_park` returned true).
    pub async fn sleep(&self) -> std::io::Result<()> {
        match &self.on {
            WaitOn::Ring { file, buf } => {
                let mut b = buf.take().unwrap_or_else(|| Vec::with_capacity(8));
                b.clear();
                let (res, b) = file.read_at(b, 0).await;
                buf.set(Some(b));
                res.map(|_| ())
            }
            WaitOn::Epoll { ready } => loop {
                ready.readable(false).await?;
                let mut count = 0u64;
                // SAFETY: `count` is 8 writable bytes, borrowed for the call.
                let n = unsafe { libc::read(ready.as_raw_fd(), (&raw mut count).cast(), 8) };
                if n == 8 {
                    return Ok(());
                }
                match std::io::Error::last_os_error() {
                    e if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                    e => return Err(e),
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn full_inbox_hands_the_message_back() {
        let m = Mailbox::new(2, 1).unwrap();
        m.send(0, 1).unwrap();
        m.send(0, 2).unwrap();
        assert_eq!(m.send(0, 3), Err(3));
        assert_eq!(m.full.load(Ordering::Relaxed), 1);
        assert_eq!(m.posts_from(0), 2);
        assert_eq!((m.try_recv(), m.try_recv(), m.try_recv()), (Some(1), Some(2), None));
    }

    #[test]
    fn prepare_park_refuses_when_something_landed() {
        let m = Mailbox::new(4, 1).unwrap();
        m.send(0, 1).unwrap();
        assert!(!m.prepare_park());
        m.try_recv();
        assert!(m.prepare_park());
    }

    /// Many senders, a receiver that sleeps whenever it runs dry: every
    /// message arrives and the receiver is never stranded asleep.
    #[test]
    fn no_lost_wakeups_across_threads() {
        no_lost_wakeups(
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build().unwrap(),
        );
    }

    /// On epoll the wait is the eventfd's readiness and a read; a `pread`
    /// of it failed every time (`ESPIPE`).
    #[test]
    fn no_lost_wakeups_across_threads_on_epoll() {
        no_lost_wakeups(
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap(),
        );
    }

    fn no_lost_wakeups<D: monoio::Driver>(mut rt: monoio::Runtime<D>) {
        const SENDERS: u64 = 4;
        const EACH: u64 = 20_000;
        let m = Arc::new(Mailbox::new(64, SENDERS as usize).unwrap());
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let mut msg = s * EACH + i;
                        while let Err(back) = m.send(s as usize, msg) {
                            msg = back;
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let m2 = m.clone();
        let (count, sum) = rt.block_on(async move {
            let waiter = Waiter::new(&m2).unwrap();
            let (mut count, mut sum) = (0u64, 0u64);
            while count < SENDERS * EACH {
                while let Some(v) = m2.try_recv() {
                    count += 1;
                    sum += v;
                }
                if count < SENDERS * EACH && m2.prepare_park() {
                    let slept =
                        monoio::time::timeout(std::time::Duration::from_secs(10), waiter.sleep()).await;
                    match slept {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => panic!("the wait failed with {count} received: {e}"),
                        Err(_) => panic!("stranded asleep with {count} received"),
                    }
                }
            }
            (count, sum)
        });
        for s in senders {
            s.join().unwrap();
        }
        let n = SENDERS * EACH;
        assert_eq!(count, n);
        assert_eq!(sum, n * (n - 1) / 2);
    }
}
