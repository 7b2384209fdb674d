//! Monoio Uring Driver.

use std::{
    cell::UnsafeCell,
    io,
    mem::ManuallyDrop,
    os::{
        fd::OwnedFd,
        unix::prelude::{AsRawFd, RawFd},
    },
    rc::Rc,
    task::{Context, Poll},
    time::Duration,
};

use io_uring::{cqueue, opcode, types::Timespec, IoUring};
use lifecycle::{Accepts, Lifecycle, Multi};

use super::{
    op::{CompletionMeta, Op, OpAble},
    // ready::Ready,
    // scheduled_io::ScheduledIo,
    util::timespec,
    Driver,
    Inner,
    CURRENT,
};
use crate::utils::slab::Slab;

mod lifecycle;
#[cfg(feature = "sync")]
mod waker;
#[cfg(feature = "sync")]
pub(crate) use waker::UnparkHandle;

#[allow(unused)]
pub(crate) const CANCEL_USERDATA: u64 = u64::MAX;
pub(crate) const TIMEOUT_USERDATA: u64 = u64::MAX - 1;
#[allow(unused)]
pub(crate) const EVENTFD_USERDATA: u64 = u64::MAX - 2;
#[cfg(feature = "poll-io")]
pub(crate) const POLLER_USERDATA: u64 = u64::MAX - 3;

pub(crate) const MIN_REVERSED_USERDATA: u64 = u64::MAX - 3;

/// Driver with uring.
pub struct IoUringDriver {
    inner: Rc<UnsafeCell<UringInner>>,

    // Used as timeout buffer
    timespec: *mut Timespec,

    // Used as read eventfd buffer
    #[cfg(feature = "sync")]
    eventfd_read_dst: *mut u8,

    // Used for drop
    #[cfg(feature = "sync")]
    thread_id: usize,
}

pub(crate) struct UringInner {
    /// In-flight operations
    ops: Ops,

    #[cfg(feature = "poll-io")]
    poll: super::poll::Poll,
    #[cfg(feature = "poll-io")]
    poller_installed: bool,

    /// IoUring bindings
    uring: ManuallyDrop<IoUring>,

    /// Shared waker
    #[cfg(feature = "sync")]
    shared_waker: std::sync::Arc<waker::EventWaker>,

    // Mark if eventfd is in the ring
    #[cfg(feature = "sync")]
    eventfd_installed: bool,

    // Waker receiver
    #[cfg(feature = "sync")]
    waker_receiver: flume::Receiver<std::task::Waker>,

    // Uring support ext_arg
    ext_arg: bool,
}

// When dropping the driver, all in-flight operations must have completed. This
// type wraps the slab and ensures that, on drop, the slab is empty.
struct Ops {
    slab: Slab<Lifecycle>,
}

impl IoUringDriver {
    const DEFAULT_ENTRIES: u32 = 1024;

    pub(crate) fn new(b: &io_uring::Builder) -> io::Result<IoUringDriver> {
        Self::new_with_entries(b, Self::DEFAULT_ENTRIES)
    }

    #[cfg(not(feature = "sync"))]
    pub(crate) fn new_with_entries(
        urb: &io_uring::Builder,
        entries: u32,
    ) -> io::Result<IoUringDriver> {
        let uring = ManuallyDrop::new(urb.build(entries)?);

        let inner = Rc::new(UnsafeCell::new(UringInner {
            #[cfg(feature = "poll-io")]
            poll: super::poll::Poll::with_capacity(entries as usize)?,
            #[cfg(feature = "poll-io")]
            poller_installed: false,
            ops: Ops::new(),
            ext_arg: uring.params().is_feature_ext_arg(),
            uring,
        }));

        Ok(IoUringDriver {
            inner,
            timespec: Box::leak(Box::new(Timespec::new())) as *mut Timespec,
        })
    }

    #[cfg(feature = "sync")]
    pub(crate) fn new_with_entries(
        urb: &io_uring::Builder,
        entries: u32,
    ) -> io::Result<IoUringDriver> {
        let uring = ManuallyDrop::new(urb.build(entries)?);

        // Create eventfd and register it to the ring.
        let waker = {
            let fd = crate::syscall!(eventfd(0, libc::EFD_CLOEXEC))?;
            unsafe {
                use std::os::unix::io::FromRawFd;
                std::fs::File::from_raw_fd(fd)
            }
        };

        let (waker_sender, waker_receiver) = flume::unbounded::<std::task::Waker>();

        let inner = Rc::new(UnsafeCell::new(UringInner {
            #[cfg(feature = "poll-io")]
            poller_installed: false,
            #[cfg(feature = "poll-io")]
            poll: super::poll::Poll::with_capacity(entries as usize)?,
            ops: Ops::new(),
            ext_arg: uring.params().is_feature_ext_arg(),
            uring,
            shared_waker: std::sync::Arc::new(waker::EventWaker::new(waker)),
            eventfd_installed: false,
            waker_receiver,
        }));

        let thread_id = crate::builder::BUILD_THREAD_ID.with(|id| *id);
        let driver = IoUringDriver {
            inner,
            timespec: Box::leak(Box::new(Timespec::new())) as *mut Timespec,
            eventfd_read_dst: Box::leak(Box::new([0_u8; 8])) as *mut u8,
            thread_id,
        };

        // Register unpark handle
        super::thread::register_unpark_handle(thread_id, driver.unpark().into());
        super::thread::register_waker_sender(thread_id, waker_sender);
        Ok(driver)
    }

    #[allow(unused)]
    fn num_operations(&self) -> usize {
        let inner = self.inner.get();
        unsafe { (*inner).ops.slab.len() }
    }

    // Flush to make enough space
    fn flush_space(inner: &mut UringInner, need: usize) -> io::Result<()> {
        let sq = inner.uring.submission();
        debug_assert!(sq.capacity() >= need);
        if sq.len() + need > sq.capacity() {
            drop(sq);
            inner.submit()?;
        }
        Ok(())
    }

    #[cfg(feature = "sync")]
    fn install_eventfd(&self, inner: &mut UringInner, fd: RawFd) {
        let entry = opcode::Read::new(io_uring::types::Fd(fd), self.eventfd_read_dst, 8)
            .build()
            .user_data(EVENTFD_USERDATA);

        let mut sq = inner.uring.submission();
        let _ = unsafe { sq.push(&entry) };
        inner.eventfd_installed = true;
    }

    #[cfg(feature = "poll-io")]
    fn install_poller(&self, inner: &mut UringInner, fd: RawFd) {
        let entry = opcode::PollAdd::new(io_uring::types::Fd(fd), libc::POLLIN as _)
            .build()
            .user_data(POLLER_USERDATA);

        let mut sq = inner.uring.submission();
        let _ = unsafe { sq.push(&entry) };
        inner.poller_installed = true;
    }

    fn install_timeout(&self, inner: &mut UringInner, duration: Duration) {
        let timespec = timespec(duration);
        unsafe {
            std::ptr::replace(self.timespec, timespec);
        }
        let entry = opcode::Timeout::new(self.timespec as *const Timespec)
            .build()
            .user_data(TIMEOUT_USERDATA);

        let mut sq = inner.uring.submission();
        let _ = unsafe { sq.push(&entry) };
    }

    fn inner_park(&self, timeout: Option<Duration>) -> io::Result<()> {
        let inner = unsafe { &mut *self.inner.get() };

        #[allow(unused_mut)]
        let mut need_wait = true;

        #[cfg(feature = "sync")]
        {
            // Process foreign wakers
            while let Ok(w) = inner.waker_receiver.try_recv() {
                w.wake();
                need_wait = false;
            }

            // Set status as not awake if we are going to sleep
            if need_wait {
                inner
                    .shared_waker
                    .awake
                    .store(false, std::sync::atomic::Ordering::Release);
            }

            // Process foreign wakers left
            while let Ok(w) = inner.waker_receiver.try_recv() {
                w.wake();
                need_wait = false;
            }
        }

        if need_wait {
            // Install timeout and eventfd for unpark if sync is enabled

            // 1. alloc spaces
            let mut space = 0;
            #[cfg(feature = "sync")]
            if !inner.eventfd_installed {
                space += 1;
            }
            #[cfg(feature = "poll-io")]
            if !inner.poller_installed {
                space += 1;
            }
            if timeout.is_some() {
                space += 1;
            }
            if space != 0 {
                Self::flush_space(inner, space)?;
            }

            // 2.1 install poller
            #[cfg(feature = "poll-io")]
            if !inner.poller_installed {
                self.install_poller(inner, inner.poll.as_raw_fd());
            }

            // 2.2 install eventfd and timeout
            #[cfg(feature = "sync")]
            if !inner.eventfd_installed {
                self.install_eventfd(inner, inner.shared_waker.as_raw_fd());
            }

            // 2.3 install timeout and submit_and_wait with timeout
            if let Some(duration) = timeout {
                match inner.ext_arg {
                    // Submit and Wait with timeout in an TimeoutOp way.
                    // Better compatibility(5.4+).
                    false => {
                        self.install_timeout(inner, duration);
                        inner.uring.submit_and_wait(1)?;
                    }
                    // Submit and Wait with enter args.
                    // Better performance(5.11+).
                    true => {
                        let timespec = timespec(duration);
                        let args = io_uring::types::SubmitArgs::new().timespec(&timespec);
                        if let Err(e) = inner.uring.submitter().submit_with_args(1, &args) {
                            if e.raw_os_error() != Some(libc::ETIME) {
                                return Err(e);
                            }
                        }
                    }
                }
            } else {
                // Submit and Wait without timeout
                inner.uring.submit_and_wait(1)?;
            }
        } else {
            // Submit only
            inner.uring.submit()?;
        }

        // Set status as awake
        #[cfg(feature = "sync")]
        inner
            .shared_waker
            .awake
            .store(true, std::sync::atomic::Ordering::Release);

        // Process CQ
        inner.tick()?;

        Ok(())
    }

    #[cfg(feature = "poll-io")]
    #[inline]
    pub(crate) fn register_poll_io(
        this: &Rc<UnsafeCell<UringInner>>,
        source: &mut impl mio::event::Source,
        interest: mio::Interest,
    ) -> io::Result<usize> {
        let inner = unsafe { &mut *this.get() };
        inner.poll.register(source, interest)
    }

    #[cfg(feature = "poll-io")]
    #[inline]
    pub(crate) fn deregister_poll_io(
        this: &Rc<UnsafeCell<UringInner>>,
        source: &mut impl mio::event::Source,
        token: usize,
    ) -> io::Result<()> {
        let inner = unsafe { &mut *this.get() };
        inner.poll.deregister(source, token)
    }
}

impl Driver for IoUringDriver {
    /// Enter the driver context. This enables using uring types.
    fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        // TODO(ihciah): remove clone
        let inner = Inner::Uring(self.inner.clone());
        CURRENT.set(&inner, f)
    }

    fn submit(&self) -> io::Result<()> {
        let inner = unsafe { &mut *self.inner.get() };
        inner.submit()?;
        inner.tick()?;
        Ok(())
    }

    fn park(&self) -> io::Result<()> {
        self.inner_park(None)
    }

    fn park_timeout(&self, duration: Duration) -> io::Result<()> {
        self.inner_park(Some(duration))
    }

    #[cfg(feature = "sync")]
    type Unpark = waker::UnparkHandle;

    #[cfg(feature = "sync")]
    fn unpark(&self) -> Self::Unpark {
        UringInner::unpark(&self.inner)
    }
}

impl UringInner {
    fn tick(&mut self) -> io::Result<()> {
        let cq = self.uring.completion();

        for cqe in cq {
            let index = cqe.user_data();
            match index {
                #[cfg(feature = "sync")]
                EVENTFD_USERDATA => self.eventfd_installed = false,
                #[cfg(feature = "poll-io")]
                POLLER_USERDATA => {
                    self.poller_installed = false;
                    self.poll.tick(Some(Duration::ZERO))?;
                }
                _ if index >= MIN_REVERSED_USERDATA => (),
                _ => self.ops.complete(index as _, resultify(&cqe), cqe.flags()),
            }
        }
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.uring.submit() {
                #[cfg(feature = "unstable")]
                Err(ref e)
                    if matches!(e.kind(), io::ErrorKind::Other | io::ErrorKind::ResourceBusy) =>
                {
                    self.tick()?;
                }
                #[cfg(not(feature = "unstable"))]
                Err(ref e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) =>
                {
                    // This error is constructed with io::Error::last_os_error():
                    // https://github.com/tokio-rs/io-uring/blob/01c83bbce965d4aaf93ebfaa08c3aa8b7b0f5335/src/sys/mod.rs#L32
                    // So we can use https://doc.rust-lang.org/nightly/std/io/struct.Error.html#method.raw_os_error
                    // to get the raw error code.
                    self.tick()?;
                }
                e => return e.map(|_| ()),
            }
        }
    }

    fn new_op<T>(data: T, inner: &mut UringInner, driver: Inner) -> Op<T> {
        Op {
            driver,
            index: inner.ops.insert(),
            data: Some(data),
        }
    }

    pub(crate) fn submit_with_data<T>(
        this: &Rc<UnsafeCell<UringInner>>,
        data: T,
    ) -> io::Result<Op<T>>
    where
        T: OpAble,
    {
        let inner = unsafe { &mut *this.get() };
        // If the submission queue is full, flush it to the kernel
        if inner.uring.submission().is_full() {
            inner.submit()?;
        }

        // Create the operation
        let mut op = Self::new_op(data, inner, Inner::Uring(this.clone()));

        // Configure the SQE
        let data_mut = unsafe { op.data.as_mut().unwrap_unchecked() };
        let sqe = OpAble::uring_op(data_mut).user_data(op.index as _);

        {
            let mut sq = inner.uring.submission();

            // Push the new operation
            if unsafe { sq.push(&sqe).is_err() } {
                unimplemented!("when is this hit?");
            }
        }

        // Submit the new operation. At this point, the operation has been
        // pushed onto the queue and the tail pointer has been updated, so
        // the submission entry is visible to the kernel. If there is an
        // error here (probably EAGAIN), we still return the operation. A
        // future `io_uring_enter` will fully submit the event.

        // CHIHAI: We are not going to do syscall now. If we are waiting
        // for IO, we will submit on `park`.
        // let _ = inner.submit();
        Ok(op)
    }

    pub(crate) fn poll_op(
        this: &Rc<UnsafeCell<UringInner>>,
        index: usize,
        cx: &mut Context<'_>,
    ) -> Poll<CompletionMeta> {
        let inner = unsafe { &mut *this.get() };
        let lifecycle = unsafe { inner.ops.slab.get(index).unwrap_unchecked() };
        lifecycle.poll_op(cx)
    }

    #[cfg(feature = "poll-io")]
    pub(crate) fn poll_legacy_op<T: OpAble>(
        this: &Rc<UnsafeCell<Self>>,
        data: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<CompletionMeta> {
        let inner = unsafe { &mut *this.get() };
        let (direction, index) = match data.legacy_interest() {
            Some(x) => x,
            None => {
                // if there is no index provided, it means the action does not rely on fd
                // readiness. do syscall right now.
                return Poll::Ready(CompletionMeta {
                    result: OpAble::legacy_call(data),
                    flags: 0,
                });
            }
        };

        // wait io ready and do syscall
        inner
            .poll
            .poll_syscall(cx, index, direction, || OpAble::legacy_call(data))
    }

    pub(crate) fn drop_op<T: 'static>(
        this: &Rc<UnsafeCell<UringInner>>,
        index: usize,
        data: &mut Option<T>,
    ) {
        let inner = unsafe { &mut *this.get() };
        if index == usize::MAX {
            // already finished
            return;
        }
        if let Some(lifecycle) = inner.ops.slab.get(index) {
            let _must_finished = lifecycle.drop_op(data);
            #[cfg(feature = "async-cancel")]
            if !_must_finished {
                unsafe {
                    let cancel = opcode::AsyncCancel::new(index as u64)
                        .build()
                        .user_data(u64::MAX);

                    // Try push cancel, if failed, will submit and re-push.
                    if inner.uring.submission().push(&cancel).is_err() {
                        let _ = inner.submit();
                        let _ = inner.uring.submission().push(&cancel);
                    }
                }
            }
        }
    }

    /// kefu's patch: pushes `sqe`, submitting first if the queue is full.
    fn push_sqe(&mut self, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: the entries pushed here (a multishot `PollAdd` or
        // `Accept`, a `PollRemove`, an `AsyncCancel`) point at no memory of
        // ours.
        if unsafe { self.uring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        self.submit()?;
        // SAFETY: as above.
        unsafe { self.uring.submission().push(sqe) }
            .map_err(|_| io::Error::new(io::ErrorKind::Other, "submission queue full"))
    }

    fn multi_poll_sqe(fd: RawFd, index: usize) -> io_uring::squeue::Entry {
        opcode::PollAdd::new(io_uring::types::Fd(fd), libc::POLLIN as _)
            .multi(true)
            .build()
            .user_data(index as _)
    }

    /// The removal of the multishot poll in slot `index`; its own completion
    /// goes to the driver's sink for cancels.
    fn multi_poll_remove_sqe(index: usize) -> io_uring::squeue::Entry {
        opcode::PollRemove::new(index as u64)
            .build()
            .user_data(CANCEL_USERDATA)
    }

    /// kefu's patch: arms a multishot poll for `POLLIN` on `fd`, which the
    /// caller keeps open until [`Self::multi_poll_drop`]. Returns its slot.
    pub(crate) fn multi_poll_new(this: &Rc<UnsafeCell<UringInner>>, fd: RawFd) -> io::Result<usize> {
        let inner = unsafe { &mut *this.get() };
        let index = inner.ops.slab.insert(Lifecycle::Multi(Multi {
            armed: true,
            ..Multi::default()
        }));
        if let Err(e) = inner.push_sqe(&Self::multi_poll_sqe(fd, index)) {
            inner.ops.slab.remove(index);
            return Err(e);
        }
        Ok(index)
    }

    /// kefu's patch: `Ready` once a completion came since the last `Ready`
    /// (the socket may be readable: the caller reads until `EAGAIN` before
    /// it waits again), or with the error the poll ended with.
    pub(crate) fn multi_poll_ready(
        this: &Rc<UnsafeCell<UringInner>>,
        index: usize,
        fd: RawFd,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let inner = unsafe { &mut *this.get() };
        let rearm = {
            let mut entry = unsafe { inner.ops.slab.get(index).unwrap_unchecked() };
            let Lifecycle::Multi(multi) = &mut *entry else {
                unreachable!("a multishot poll's slot holds another operation")
            };
            if let Some(errno) = multi.error.take() {
                multi.waiting = false;
                return Poll::Ready(Err(io::Error::from_raw_os_error(errno)));
            }
            if multi.ready {
                multi.ready = false;
                multi.waiting = false;
                return Poll::Ready(Ok(()));
            }
            if !multi.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                multi.waker = Some(cx.waker().clone());
            }
            multi.waiting = true;
            !multi.armed
        };
        // The kernel ended the poll: armed again, under the same slot (its
        // last completion is in, so no completion of the old one can follow).
        // Marked armed only once the entry is queued: a slot marked armed
        // with no poll behind it would never be freed.
        if rearm {
            if let Err(e) = inner.push_sqe(&Self::multi_poll_sqe(fd, index)) {
                return Poll::Ready(Err(e));
            }
            let mut entry = unsafe { inner.ops.slab.get(index).unwrap_unchecked() };
            if let Lifecycle::Multi(multi) = &mut *entry {
                multi.armed = true;
            }
        }
        Poll::Pending
    }

    /// kefu's patch: the owner is gone. An armed poll is removed, and its
    /// slot freed by its last completion.
    pub(crate) fn multi_poll_drop(this: &Rc<UnsafeCell<UringInner>>, index: usize) {
        let inner = unsafe { &mut *this.get() };
        {
            let Some(mut entry) = inner.ops.slab.get(index) else {
                return;
            };
            let Lifecycle::Multi(multi) = &mut *entry else {
                return;
            };
            if !multi.armed {
                entry.remove();
                return;
            }
            multi.dropped = true;
            multi.waker = None;
        }
        // If even a submit finds no room, the poll stays armed until the
        // ring is dropped, and its slot with it: a leak, not a fault (its
        // completions go to a slot marked dropped).
        let _ = inner.push_sqe(&Self::multi_poll_remove_sqe(index));
    }

    /// kefu's patch, for tests: asks the kernel to end an armed poll, as it
    /// may on its own, and leaves the slot to the owner. The poll's last
    /// completion (`ECANCELED`, without `IORING_CQE_F_MORE`) marks it
    /// unarmed; the owner's next wait arms it again.
    pub(crate) fn multi_poll_end(this: &Rc<UnsafeCell<UringInner>>, index: usize) -> io::Result<()> {
        let inner = unsafe { &mut *this.get() };
        inner.push_sqe(&Self::multi_poll_remove_sqe(index))
    }

    fn multi_accept_sqe(fd: RawFd, index: usize) -> io_uring::squeue::Entry {
        // Accepted sockets block, as monoio's one-shot `Accept` makes them:
        // the ring drives them either way.
        opcode::AcceptMulti::new(io_uring::types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(index as _)
    }

    /// The cancel of the multishot accept in slot `index`; its own
    /// completion goes to the driver's sink for cancels.
    fn multi_accept_cancel_sqe(index: usize) -> io_uring::squeue::Entry {
        opcode::AsyncCancel::new(index as u64)
            .build()
            .user_data(CANCEL_USERDATA)
    }

    /// kefu's patch: arms a multishot accept on the listener `fd`, which the
    /// caller keeps open until [`Self::multi_accept_drop`]. Returns its slot.
    pub(crate) fn multi_accept_new(
        this: &Rc<UnsafeCell<UringInner>>,
        fd: RawFd,
    ) -> io::Result<usize> {
        let inner = unsafe { &mut *this.get() };
        let index = inner.ops.slab.insert(Lifecycle::Accepts(Box::new(Accepts {
            armed: true,
            ..Accepts::default()
        })));
        if let Err(e) = inner.push_sqe(&Self::multi_accept_sqe(fd, index)) {
            inner.ops.slab.remove(index);
            return Err(e);
        }
        Ok(index)
    }

    /// kefu's patch: the next connection the accept in slot `index` took
    /// (or the error one accept failed with), in the kernel's order; arms
    /// the accept again when the kernel had ended it.
    pub(crate) fn multi_accept_poll(
        this: &Rc<UnsafeCell<UringInner>>,
        index: usize,
        fd: RawFd,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<OwnedFd>> {
        let inner = unsafe { &mut *this.get() };
        let rearm = {
            let mut entry = unsafe { inner.ops.slab.get(index).unwrap_unchecked() };
            let Lifecycle::Accepts(accepts) = &mut *entry else {
                unreachable!("a multishot accept's slot holds another operation")
            };
            if let Some(result) = accepts.results.pop_front() {
                accepts.waiting = false;
                return Poll::Ready(result.map_err(io::Error::from_raw_os_error));
            }
            if !accepts.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                accepts.waker = Some(cx.waker().clone());
            }
            accepts.waiting = true;
            !accepts.armed
        };
        // As with the multishot poll: armed again under the same slot, and
        // marked armed only once the entry is queued.
        if rearm {
            if let Err(e) = inner.push_sqe(&Self::multi_accept_sqe(fd, index)) {
                return Poll::Ready(Err(e));
            }
            let mut entry = unsafe { inner.ops.slab.get(index).unwrap_unchecked() };
            if let Lifecycle::Accepts(accepts) = &mut *entry {
                accepts.armed = true;
            }
        }
        Poll::Pending
    }

    /// kefu's patch: the owner is gone. The connections accepted and not
    /// taken are closed; an armed accept is cancelled, and its slot freed
    /// by its last completion (closing what it accepts meanwhile).
    pub(crate) fn multi_accept_drop(this: &Rc<UnsafeCell<UringInner>>, index: usize) {
        let inner = unsafe { &mut *this.get() };
        {
            let Some(mut entry) = inner.ops.slab.get(index) else {
                return;
            };
            let Lifecycle::Accepts(accepts) = &mut *entry else {
                return;
            };
            if !accepts.armed {
                entry.remove();
                return;
            }
            accepts.results.clear();
            accepts.dropped = true;
            accepts.waker = None;
        }
        // As with the poll: with no room even after a submit, the accept
        // stays armed until the ring goes, closing what it accepts.
        let _ = inner.push_sqe(&Self::multi_accept_cancel_sqe(index));
    }

    /// kefu's patch, for tests: asks the kernel to end an armed accept, as
    /// it may on its own, and leaves the slot to the owner, whose next wait
    /// arms it again.
    pub(crate) fn multi_accept_end(this: &Rc<UnsafeCell<UringInner>>, index: usize) -> io::Result<()> {
        let inner = unsafe { &mut *this.get() };
        inner.push_sqe(&Self::multi_accept_cancel_sqe(index))
    }

    pub(crate) unsafe fn cancel_op(this: &Rc<UnsafeCell<UringInner>>, index: usize) {
        let inner = &mut *this.get();
        let cancel = opcode::AsyncCancel::new(index as u64)
            .build()
            .user_data(u64::MAX);
        if inner.uring.submission().push(&cancel).is_err() {
            let _ = inner.submit();
            let _ = inner.uring.submission().push(&cancel);
        }
    }

    #[cfg(feature = "sync")]
    pub(crate) fn unpark(this: &Rc<UnsafeCell<UringInner>>) -> waker::UnparkHandle {
        let inner = unsafe { &*this.get() };
        let weak = std::sync::Arc::downgrade(&inner.shared_waker);
        waker::UnparkHandle(weak)
    }
}

impl AsRawFd for IoUringDriver {
    fn as_raw_fd(&self) -> RawFd {
        unsafe { (*self.inner.get()).uring.as_raw_fd() }
    }
}

impl Drop for IoUringDriver {
    fn drop(&mut self) {
        trace!("MONOIO DEBUG[IoUringDriver]: drop");

        // Dealloc leaked memory
        unsafe { std::ptr::drop_in_place(self.timespec) };

        #[cfg(feature = "sync")]
        unsafe {
            std::ptr::drop_in_place(self.eventfd_read_dst)
        };

        // Deregister thread id
        #[cfg(feature = "sync")]
        {
            use crate::driver::thread::{unregister_unpark_handle, unregister_waker_sender};
            unregister_unpark_handle(self.thread_id);
            unregister_waker_sender(self.thread_id);
        }
    }
}

impl Drop for UringInner {
    fn drop(&mut self) {
        // no need to wait for completion, as the kernel will clean up the ring asynchronically.
        let _ = self.uring.submitter().submit();
        unsafe {
            ManuallyDrop::drop(&mut self.uring);
        }
    }
}

impl Ops {
    const fn new() -> Self {
        Ops { slab: Slab::new() }
    }

    // Insert a new operation
    pub(crate) fn insert(&mut self) -> usize {
        self.slab.insert(Lifecycle::Submitted)
    }

    fn complete(&mut self, index: usize, result: io::Result<u32>, flags: u32) {
        let lifecycle = unsafe { self.slab.get(index).unwrap_unchecked() };
        lifecycle.complete(result, flags);
    }
}

#[inline]
fn resultify(cqe: &cqueue::Entry) -> io::Result<u32> {
    let res = cqe.result();

    if res >= 0 {
        Ok(res as u32)
    } else {
        Err(io::Error::from_raw_os_error(-res))
    }
}
