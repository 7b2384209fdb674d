//! The sans-IO heart of kefu: protocol state machines, conversations,
//! routing, presence and rules. Nothing here owns a socket, a thread, a
//! runtime or a clock; callers feed events and the current time in and get
//! actions back, so every product rule is a unit test that runs in
//! microseconds.
