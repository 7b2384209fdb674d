//! kefu's patch: a multishot accept, armed once per listener.
//!
//! monoio's `accept` submits one `Accept` per connection. A multishot
//! accept (`IORING_ACCEPT_MULTISHOT`) stays armed and posts a completion
//! for each connection the kernel accepts, so a burst of connections costs
//! no submission each. The kernel does not report the peer's address with
//! it: that is asked for (`getpeername`) when a connection is taken.

use std::{
    cell::UnsafeCell,
    future::poll_fn,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, IntoRawFd as _},
    rc::Rc,
    task::{Context, Poll},
};

use super::{shared_fd::SharedFd, uring::UringInner, Inner, CURRENT};
use crate::net::TcpStream;

/// The connections one listener accepts, from a multishot accept on the
/// io_uring driver (see the module's doc). It holds the listener's
/// descriptor too, so that the accept it arms again is always on that
/// listener, whichever of the two is dropped first (one per listener: the
/// memory a connection's poll saves by holding a bare number does not
/// matter here). Connections accepted and not taken when it drops are
/// closed.
pub struct MultishotAccept {
    driver: Rc<UnsafeCell<UringInner>>,
    fd: SharedFd,
    index: u32,
}

impl std::fmt::Debug for MultishotAccept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultishotAccept").field("fd", &self.fd.raw_fd()).finish()
    }
}

impl MultishotAccept {
    /// Arms the accept. `Unsupported` on the legacy driver.
    pub(crate) fn new(fd: &SharedFd) -> io::Result<Self> {
        let driver = CURRENT.with(|inner| match inner {
            Inner::Uring(this) => Ok(this.clone()),
            #[allow(unreachable_patterns)]
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a multishot accept needs the io_uring driver",
            )),
        })?;
        let index = UringInner::multi_accept_new(&driver, fd.raw_fd())?;
        let Ok(index) = u32::try_from(index) else {
            UringInner::multi_accept_drop(&driver, index);
            return Err(io::Error::new(
                io::ErrorKind::Other,
                "more than 2^32 operations in flight",
            ));
        };
        Ok(Self {
            driver,
            fd: fd.clone(),
            index,
        })
    }

    /// The next connection, in the order the kernel accepted them, or the
    /// error one accept failed with (`EMFILE`, say; the accept is armed
    /// again at the next wait, so the caller may back off and call again).
    /// Only the last task to poll is woken, and only while it waits here.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        loop {
            let fd = match UringInner::multi_accept_poll(&self.driver, self.index as usize, self.fd.raw_fd(), cx) {
                Poll::Ready(Ok(fd)) => fd,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            // On an error here `fd` still owns the descriptor and closes it.
            let shared = SharedFd::new::<false>(fd.as_raw_fd())?;
            let _ = fd.into_raw_fd(); // now `shared`'s
            let stream = TcpStream::from_shared_fd(shared);
            // A peer gone before it was taken (`ENOTCONN`) is dropped, and
            // its socket closed, here: the next connection is not held up
            // by it, as it would be by an error the caller backs off from.
            if let Ok(peer) = stream.peer_addr() {
                return Poll::Ready(Ok((stream, peer)));
            }
        }
    }

    /// Waits for [`Self::poll_accept`].
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// For tests only: asks the kernel to end the accept, as it may end
    /// one on its own, so that a test can see the next wait arm it again.
    /// Not part of the API.
    #[doc(hidden)]
    pub fn end_in_kernel_for_test(&self) -> io::Result<()> {
        UringInner::multi_accept_end(&self.driver, self.index as usize)
    }
}

impl Drop for MultishotAccept {
    fn drop(&mut self) {
        UringInner::multi_accept_drop(&self.driver, self.index as usize);
    }
}
