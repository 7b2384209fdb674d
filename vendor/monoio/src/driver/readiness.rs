//! kefu's patch: a multishot poll for readability, armed once per socket.
//!
//! monoio's `readable` submits a one-shot `PollAdd` for every wait, which
//! the kernel arms (a `vfs_poll` and a wait-queue entry) and disarms again
//! each time. A busy socket waits for input once per message, so that is
//! one submission, one arm and one slab entry per message. A multishot
//! poll (`IORING_POLL_ADD_MULTI`) stays armed and posts a completion on
//! each wake-up of the socket for input: the owner reads until `EAGAIN`
//! before it waits again, as with an edge-triggered epoll.

use std::{
    cell::UnsafeCell,
    future::poll_fn,
    io,
    os::unix::io::RawFd,
    rc::Rc,
    task::{Context, Poll},
};

use super::{shared_fd::SharedFd, uring::UringInner, Inner, CURRENT};

/// Readiness for input of one socket, from a multishot poll on the
/// io_uring driver (see the module's doc). Drop it before the socket: it
/// holds the descriptor's number, not the descriptor (16 bytes, where a
/// connection's task is counted in bytes), and arms the poll again by
/// that number when the kernel ended it.
pub struct ReadReadiness {
    driver: Rc<UnsafeCell<UringInner>>,
    fd: RawFd,
    index: u32,
}

impl std::fmt::Debug for ReadReadiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadReadiness").field("fd", &self.fd).finish()
    }
}

impl ReadReadiness {
    /// Arms the poll. `Unsupported` on the legacy driver.
    pub(crate) fn new(fd: &SharedFd) -> io::Result<Self> {
        let driver = CURRENT.with(|inner| match inner {
            Inner::Uring(this) => Ok(this.clone()),
            #[allow(unreachable_patterns)]
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a multishot poll needs the io_uring driver",
            )),
        })?;
        let index = UringInner::multi_poll_new(&driver, fd.raw_fd())?;
        let Ok(index) = u32::try_from(index) else {
            UringInner::multi_poll_drop(&driver, index);
            return Err(io::Error::new(
                io::ErrorKind::Other,
                "more than 2^32 operations in flight",
            ));
        };
        Ok(Self {
            driver,
            fd: fd.raw_fd(),
            index,
        })
    }

    /// `Ready` once the socket was woken for input since the last `Ready`:
    /// the caller then reads until `EAGAIN` (or a short read) before it
    /// waits again, or it may wait for input that has already come. Only
    /// the last task to poll is woken, and only while it waits here.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UringInner::multi_poll_ready(&self.driver, self.index as usize, self.fd, cx)
    }

    /// For tests only: asks the kernel to end the poll, as it may end one
    /// on its own (a full completion queue, on some kernels), so that a
    /// test can see the next wait arm it again. Not part of the API.
    #[doc(hidden)]
    pub fn end_in_kernel_for_test(&self) -> io::Result<()> {
        UringInner::multi_poll_end(&self.driver, self.index as usize)
    }

    /// Waits for [`Self::poll_ready`].
    pub async fn ready(&self) -> io::Result<()> {
        poll_fn(|cx| self.poll_ready(cx)).await
    }
}

impl Drop for ReadReadiness {
    fn drop(&mut self) {
        UringInner::multi_poll_drop(&self.driver, self.index as usize);
    }
}
