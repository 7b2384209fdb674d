//! The live progress bar: what phase a run is in and how far it got, on a
//! terminal only.
//!
//! A run says which [`Phase`] it enters and what that phase fills towards
//! (a [`Goal`]: connections to make, or seconds to spend); a ticker thread
//! reads the run's counters every [`TICK`] through a [`Snapshot`] closure
//! and redraws. Nothing on the measured path waits for the bar or pays for
//! it per message: counters the run keeps anyway are read from the side,
//! and where a client thread has no shared counter it publishes a running
//! total into its own [`Counter`] (a plain store to a cache line no one
//! else writes).
//!
//! When stderr is not a terminal (scripts, CI, `2>file`) there is no bar
//! and no ticker thread at all.
//!
//! Lines printed while a bar is drawn go through [`Progress::println`], so
//! they land above the bar instead of through it.

use std::{
    io::IsTerminal as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the bar is redrawn from the counters.
pub const TICK: Duration = Duration::from_millis(200);

/// The phases every scenario goes through, in order (a scenario may skip
/// some).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Opening connections and setting clients up.
    Connecting,
    /// Load before the measured window.
    WarmUp,
    /// The measured window (or, for `idle`, the hold).
    Measuring,
    /// Load stopped; waiting for the last replies and for closes.
    Draining,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::WarmUp => "warm-up",
            Phase::Measuring => "measuring",
            Phase::Draining => "draining",
        }
    }
}

/// What a phase's bar fills towards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// This many connections ([`Snapshot::connections`]).
    Connections(u64),
    /// This long.
    Time(Duration),
}

/// The run's counters at one tick; `None` for what the scenario does not
/// count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub connections: u64,
    pub sent: Option<u64>,
    pub received: Option<u64>,
    pub acked: Option<u64>,
}

/// A counter one thread writes and the ticker reads: the writer adds with
/// a load and a store (no read-modify-write instruction, no lock prefix),
/// and the counter has its cache line to itself so that no other thread's
/// writes bounce it.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Counter {
    value: AtomicU64,
}

impl Counter {
    /// Adds `n`. Only one thread may call this on a given counter.
    pub fn add(&self, n: u64) {
        self.value.store(self.value.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// The phase being drawn and when it began.
#[derive(Debug, Clone, Copy)]
struct Current {
    phase: Phase,
    goal: Goal,
    since: Instant,
}

/// A progress bar on stderr, or nothing if stderr is not a terminal.
/// Dropping it clears the bar.
pub struct Progress {
    bar: Option<ProgressBar>,
    current: Arc<Mutex<Current>>,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts a bar labelled `scenario` that reads `snapshot` every
    /// [`TICK`]; hidden (and `snapshot` never called) unless stderr is a
    /// terminal.
    pub fn start(scenario: &str, snapshot: impl Fn() -> Snapshot + Send + 'static) -> Self {
        Self::start_on(std::io::stderr().is_terminal(), scenario, snapshot)
    }

    fn start_on(visible: bool, scenario: &str, snapshot: impl Fn() -> Snapshot + Send + 'static) -> Self {
        let current = Arc::new(Mutex::new(Current {
            phase: Phase::Connecting,
            goal: Goal::Connections(0),
            since: Instant::now(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        if !visible {
            return Self { bar: None, current, stop, ticker: None };
        }
        let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
        // The template is a constant that parses; if a future indicatif
        // refused it the default style is still a bar. The text comes last
        // and is cut to the terminal's width, so the bar never wraps.
        if let Ok(style) = ProgressStyle::with_template("{prefix:.bold} [{bar:24.cyan/blue}] {wide_msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(scenario.to_owned());
        let ticker = {
            let (bar, current, stop) = (bar.clone(), current.clone(), stop.clone());
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || tick_loop(&bar, &current, &stop, &snapshot))
                .ok()
        };
        Self { bar: Some(bar), current, stop, ticker }
    }

    /// Enters `phase`, whose bar fills towards `goal`.
    pub fn phase(&self, phase: Phase, goal: Goal) {
        if let Ok(mut current) = self.current.lock() {
            *current = Current { phase, goal, since: Instant::now() };
        }
    }

    /// Prints `line` on stderr, above the bar if one is drawn.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn tick_loop(
    bar: &ProgressBar,
    current: &Mutex<Current>,
    stop: &AtomicBool,
    snapshot: &dyn Fn() -> Snapshot,
) {
    let mut last: Option<(Instant, Snapshot)> = None;
    while !stop.load(Ordering::Acquire) {
        let Ok(now_phase) = current.lock().map(|c| *c) else { return };
        let now = Instant::now();
        let counts = snapshot();
        let rate = last.map(|(at, before)| received_per_s(&before, &counts, now - at));
        let (position, length, message) = draw(&now_phase, now - now_phase.since, &counts, rate.flatten());
        bar.set_length(length);
        bar.set_position(position);
        bar.set_message(message);
        last = Some((now, counts));
        std::thread::sleep(TICK);
    }
}

/// Messages received per second between two snapshots (sent, if the
/// scenario counts no receptions).
fn received_per_s(before: &Snapshot, after: &Snapshot, elapsed: Duration) -> Option<f64> {
    let pick = |s: &Snapshot| s.received.or(s.sent);
    let (a, b) = (pick(before)?, pick(after)?);
    (elapsed > Duration::ZERO).then(|| b.saturating_sub(a) as f64 / elapsed.as_secs_f64())
}

/// The bar's position, length and text for a phase `elapsed` in.
fn draw(current: &Current, elapsed: Duration, counts: &Snapshot, rate: Option<f64>) -> (u64, u64, String) {
    let mut text = format!("{:<10}", current.phase.name());
    let (position, length) = match current.goal {
        Goal::Connections(total) => {
            text.push_str(&format!(" {}/{total} conns", counts.connections));
            (counts.connections.min(total), total.max(1))
        }
        Goal::Time(total) => {
            // Tenths only where whole seconds would read "0/0 s".
            let digits = if total < Duration::from_secs(10) { 1 } else { 0 };
            text.push_str(&format!(" {:.digits$}/{:.digits$} s", elapsed.as_secs_f64(), total.as_secs_f64()));
            if counts.connections > 0 {
                text.push_str(&format!(" {} conns", counts.connections));
            }
            let total_ms = u64::try_from(total.as_millis()).unwrap_or(u64::MAX).max(1);
            (u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX).min(total_ms), total_ms)
        }
    };
    for (name, value) in [("sent", counts.sent), ("recv", counts.received), ("acked", counts.acked)] {
        if let Some(value) = value {
            text.push_str(&format!(" {name} {value}"));
        }
    }
    if let Some(rate) = rate.filter(|r| *r > 0.0) {
        text.push_str(&format!(" ({rate:.0}/s)"));
    }
    (position, length, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_connections_then_with_time() {
        let mut current =
            Current { phase: Phase::Connecting, goal: Goal::Connections(200), since: Instant::now() };
        let counts = Snapshot { connections: 50, ..Snapshot::default() };
        let (position, length, text) = draw(&current, Duration::from_secs(1), &counts, None);
        assert_eq!((position, length), (50, 200));
        assert!(text.starts_with("connecting") && text.contains("50/200 conns"), "{text}");

        current.phase = Phase::Measuring;
        current.goal = Goal::Time(Duration::from_secs(10));
        let counts = Snapshot { connections: 200, sent: Some(900), received: Some(880), acked: Some(870) };
        let (position, length, text) = draw(&current, Duration::from_millis(2500), &counts, Some(350.0));
        assert_eq!((position, length), (2500, 10_000));
        for part in ["measuring", "2/10 s", "sent 900", "recv 880", "acked 870", "(350/s)"] {
            assert!(text.contains(part), "{part:?} missing from {text:?}");
        }
        current.goal = Goal::Time(Duration::from_millis(500));
        let (_, _, text) = draw(&current, Duration::from_millis(200), &counts, None);
        assert!(text.contains("0.2/0.5 s"), "{text}");
        current.goal = Goal::Time(Duration::from_secs(10));
        // Past the goal the bar stays full, not beyond.
        let (position, _, _) = draw(&current, Duration::from_secs(12), &counts, None);
        assert_eq!(position, 10_000);
    }

    #[test]
    fn rates_come_from_the_difference_of_two_snapshots() {
        let before = Snapshot { received: Some(100), ..Snapshot::default() };
        let after = Snapshot { received: Some(300), ..Snapshot::default() };
        assert_eq!(received_per_s(&before, &after, Duration::from_millis(500)), Some(400.0));
        let sent_only = Snapshot { sent: Some(10), ..Snapshot::default() };
        assert_eq!(received_per_s(&sent_only, &Snapshot { sent: Some(20), ..sent_only }, TICK), Some(50.0));
        assert_eq!(received_per_s(&Snapshot::default(), &Snapshot::default(), TICK), None);
    }

    #[test]
    fn a_counter_adds_from_its_one_writer() {
        let counter = Arc::new(Counter::default());
        let writer = counter.clone();
        std::thread::spawn(move || (0..1000).for_each(|_| writer.add(3))).join().expect("writer");
        assert_eq!(counter.get(), 3000);
        assert_eq!(std::mem::align_of::<Counter>(), 64);
    }

    #[test]
    fn hidden_bars_never_read_the_counters() {
        let progress = Progress::start_on(false, "test", || panic!("read while hidden"));
        assert!(progress.bar.is_none() && progress.ticker.is_none());
        progress.phase(Phase::Measuring, Goal::Time(Duration::from_secs(1)));
        progress.println("a line with no bar");
    }
}
