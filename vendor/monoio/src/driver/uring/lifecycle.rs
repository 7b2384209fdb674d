//! Uring state lifecycle.
//! Partly borrow from tokio-uring.

use std::{
    collections::VecDeque,
    io,
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
    task::{Context, Poll, Waker},
};

use crate::{driver::op::CompletionMeta, utils::slab::Ref};

pub(crate) enum Lifecycle {
    /// The operation has been submitted to uring and is currently in-flight
    Submitted,

    /// The submitter is waiting for the completion of the operation
    Waiting(Waker),

    /// The submitter no longer has interest in the operation result. The state
    /// must be passed to the driver and held until the operation completes.
    #[allow(dead_code)]
    Ignored(Box<dyn std::any::Any>),

    /// The operation has completed.
    Completed(io::Result<u32>, u32),

    /// kefu's patch: a multishot poll, armed once and completed many times
    /// (`crate::net::ReadReadiness`). It never goes through `poll_op` or
    /// `drop_op`.
    Multi(Multi),

    /// kefu's patch: a multishot accept, armed once and completed once per
    /// connection (`crate::net::MultishotAccept`). Boxed: there is one per
    /// listener, and the slab's every entry is as large as its largest.
    Accepts(Box<Accepts>),
}

/// kefu's patch: the state of one multishot poll for readability.
#[derive(Default)]
pub(crate) struct Multi {
    /// A completion came since the owner last took one.
    pub(crate) ready: bool,
    /// The kernel holds the poll: its last completion had `IORING_CQE_F_MORE`.
    pub(crate) armed: bool,
    /// The owner's task waits for a completion: only then is it woken.
    pub(crate) waiting: bool,
    /// The owner is gone; the slot waits for the poll's last completion.
    pub(crate) dropped: bool,
    /// An error the poll ended with, for the owner's next look.
    pub(crate) error: Option<i32>,
    /// Kept from one wait to the next, so that a wait does not clone it.
    pub(crate) waker: Option<Waker>,
}

/// kefu's patch: the state of one multishot accept. Its `armed`, `waiting`,
/// `dropped` and `waker` are [`Multi`]'s, kept flat in each rather than in
/// one shared struct: nested, they would pad `Multi`, and with it every
/// entry of the driver's slab, from 32 bytes to 40 (one entry at least per
/// connection).
#[derive(Default)]
pub(crate) struct Accepts {
    /// What the kernel accepted and the owner has not taken yet, in order:
    /// a connection, or the error one accept failed with. Owned, so that
    /// what is left here when the owner or the ring goes is closed. (A
    /// completion still in the completion queue when the ring is dropped
    /// is never read: its connection stays open until the process ends.
    /// The gateway drops its accepts, and reads their cancels, first.)
    pub(crate) results: VecDeque<Result<OwnedFd, i32>>,
    /// The kernel holds the accept: its last completion had
    /// `IORING_CQE_F_MORE`.
    pub(crate) armed: bool,
    /// The owner's task waits for a connection: only then is it woken.
    pub(crate) waiting: bool,
    /// The owner is gone; the slot waits for the accept's last completion,
    /// and a connection accepted meanwhile is closed.
    pub(crate) dropped: bool,
    /// Kept from one wait to the next, so that a wait does not clone it.
    pub(crate) waker: Option<Waker>,
}

impl Accepts {
    /// One completion of the multishot accept.
    fn complete(&mut self, result: io::Result<u32>, more: bool) {
        self.armed &= more;
        match result {
            Ok(fd) => {
                // SAFETY: a successful accept's result is a descriptor the
                // kernel just installed for us, owned by nothing else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
                if !self.dropped {
                    self.results.push_back(Ok(fd));
                }
            }
            // The kernel ended the accept (cancelled, or its completion
            // queue was full): armed again at the owner's next wait.
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) && !more => {}
            Err(e) if !self.dropped => {
                self.results.push_back(Err(e.raw_os_error().unwrap_or(libc::EIO)))
            }
            Err(_) => {}
        }
        if self.waiting && (!self.results.is_empty() || !self.armed) {
            self.waiting = false;
            if let Some(waker) = &self.waker {
                waker.wake_by_ref();
            }
        }
    }
}

impl<'a> Ref<'a, Lifecycle> {
    pub(crate) fn complete(mut self, result: io::Result<u32>, flags: u32) {
        let ref_mut = &mut *self;
        match ref_mut {
            Lifecycle::Submitted => {
                *ref_mut = Lifecycle::Completed(result, flags);
            }
            Lifecycle::Waiting(_) => {
                let old = std::mem::replace(ref_mut, Lifecycle::Completed(result, flags));
                match old {
                    Lifecycle::Waiting(waker) => {
                        waker.wake();
                    }
                    _ => unsafe { std::hint::unreachable_unchecked() },
                }
            }
            Lifecycle::Ignored(..) => {
                self.remove();
            }
            Lifecycle::Completed(..) => unsafe { std::hint::unreachable_unchecked() },
            Lifecycle::Multi(multi) => {
                let more = io_uring::cqueue::more(flags);
                multi.armed &= more;
                if multi.dropped {
                    if !more {
                        self.remove();
                    }
                    return;
                }
                match result {
                    Ok(_) => multi.ready = true,
                    // The kernel ended the poll (its completion queue was
                    // full, say): the owner looks at the socket once, and
                    // arms the poll again when it waits.
                    Err(e) if e.raw_os_error() == Some(libc::ECANCELED) && !more => multi.ready = true,
                    Err(e) => multi.error = e.raw_os_error().or(Some(libc::EIO)),
                }
                if multi.waiting {
                    multi.waiting = false;
                    if let Some(waker) = &multi.waker {
                        waker.wake_by_ref();
                    }
                }
            }
            Lifecycle::Accepts(accepts) => {
                let more = io_uring::cqueue::more(flags);
                accepts.complete(result, more);
                if accepts.dropped && !more {
                    self.remove();
                }
            }
        }
    }

    #[allow(clippy::needless_pass_by_ref_mut)]
    pub(crate) fn poll_op(mut self, cx: &mut Context<'_>) -> Poll<CompletionMeta> {
        let ref_mut = &mut *self;
        match ref_mut {
            Lifecycle::Submitted => {
                *ref_mut = Lifecycle::Waiting(cx.waker().clone());
                return Poll::Pending;
            }
            Lifecycle::Waiting(waker) => {
                if !waker.will_wake(cx.waker()) {
                    *ref_mut = Lifecycle::Waiting(cx.waker().clone());
                }
                return Poll::Pending;
            }
            _ => {}
        }

        match self.remove() {
            Lifecycle::Completed(result, flags) => Poll::Ready(CompletionMeta { result, flags }),
            _ => unsafe { std::hint::unreachable_unchecked() },
        }
    }

    // return if the op must has been finished
    pub(crate) fn drop_op<T: 'static>(mut self, data: &mut Option<T>) -> bool {
        let ref_mut = &mut *self;
        match ref_mut {
            Lifecycle::Submitted | Lifecycle::Waiting(_) => {
                if let Some(data) = data.take() {
                    *ref_mut = Lifecycle::Ignored(Box::new(data));
                } else {
                    *ref_mut = Lifecycle::Ignored(Box::new(())); // () is a ZST, so it does not
                                                                 // allocate
                };
                return false;
            }
            Lifecycle::Completed(..) => {
                self.remove();
            }
            Lifecycle::Ignored(..) | Lifecycle::Multi(..) | Lifecycle::Accepts(..) => unsafe {
                std::hint::unreachable_unchecked()
            },
        }
        true
    }
}
