//! What a run measures, and how: latency histograms and the CPU and memory
//! that the client and the server spent.
//!
//! - Latency goes into an HdrHistogram in nanoseconds (3 significant
//!   digits: 1 µs resolution up to ~1 ms, 0.1% relative above), one per
//!   client thread, merged at the end. Recording is a few nanoseconds and
//!   allocates nothing, so it can sit on the hot path.
//! - The client's own CPU comes from `getrusage(RUSAGE_SELF)`, microsecond
//!   resolution, all threads. A load generator that reports throughput must
//!   also report whether it was the bottleneck: client CPU near 100% of its
//!   cores means the number is the client's ceiling, not the server's.
//! - The server's CPU comes from `/proc/PID/stat` (utime + stime in clock
//!   ticks, 10 ms on Linux: over a 10 s window that is 0.1%), its memory from
//!   `VmRSS` in `/proc/PID/status`, and its open descriptors from
//!   `/proc/PID/fd`, so the reports can name a server-side limit too.

use std::{collections::BTreeMap, fs, time::Duration};

use anyhow::{Context as _, anyhow};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histogram can hold; slower round trips are clamped
/// to it (and such a run has bigger problems than its p99).
const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds.
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self {
            // Bounds are constants that satisfy the constructor's contract
            // (low ≥ 1, high ≥ 2 × low, sigfig ≤ 5), so this cannot fail.
            histogram: Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// Records `count` round trips that each took `latency`.
    pub fn record(&mut self, latency: Duration, count: u64) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.histogram.saturating_record_n(ns.clamp(1, LATENCY_NS_MAX), count);
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so `add` cannot fail; if it ever did,
        // saturating keeps the report honest about counts.
        if self.histogram.add(&other.histogram).is_err() {
            for value in other.histogram.iter_recorded() {
                self.histogram.saturating_record_n(value.value_iterated_to(), value.count_at_value());
            }
        }
    }

    /// Round trips recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The percentile curve: (quantile, µs) points, quantile rising from 0
    /// to 1 and latency never falling, `ticks` points per halving of the
    /// distance to 100% (HdrHistogram's percentile distribution), so the
    /// tail is drawn as finely as the middle. Empty if nothing was recorded.
    pub fn percentiles(&self, ticks: u32) -> Vec<(f64, f64)> {
        self.histogram
            .iter_quantiles(ticks.max(1))
            .map(|v| (v.quantile_iterated_to(), v.value_iterated_to() as f64 / 1000.0))
            .collect()
    }

    /// Percentiles in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        if self.histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            min: us(self.histogram.min()),
            p50: us(self.histogram.value_at_quantile(0.50)),
            p90: us(self.histogram.value_at_quantile(0.90)),
            p99: us(self.histogram.value_at_quantile(0.99)),
            p999: us(self.histogram.value_at_quantile(0.999)),
            max: us(self.histogram.max()),
            mean: self.histogram.mean() / 1000.0,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// CPU seconds (user + system) this process has used so far, all threads.
pub fn self_cpu_seconds() -> anyhow::Result<f64> {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct
    // (integers and timevals only).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live, writable rusage; RUSAGE_SELF is a valid
    // `who`; the kernel writes only within the struct.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    Ok(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

/// Clock ticks per second, the unit of `/proc/PID/stat` times.
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects; _SC_CLK_TCK is a valid name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // Linux has reported 100 since forever; keep that if sysconf balks.
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU seconds (utime + stime, all threads) that process `pid` has used.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat")).map(|(user, system)| user + system)
}

/// User and system CPU of one thread (or a sum of threads).
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct CpuSplit {
    pub user: f64,
    pub system: f64,
}

/// CPU seconds each thread of process `pid` has used, with the thread's
/// name (`comm`), by thread id: which of a server's threads (a shard, a
/// storage writer) a cost belongs to. Threads that exit while this reads
/// are skipped.
pub fn process_threads_cpu(pid: u32) -> anyhow::Result<BTreeMap<u32, (String, CpuSplit)>> {
    let dir = format!("/proc/{pid}/task");
    let mut threads = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let (Ok(name), Ok(cpu)) =
            (fs::read_to_string(entry.path().join("comm")), stat_cpu_seconds(&format!("{dir}/{tid}/stat")))
        else {
            continue;
        };
        threads.insert(tid, (name.trim().to_owned(), CpuSplit { user: cpu.0, system: cpu.1 }));
    }
    Ok(threads)
}

/// Per-thread-name CPU cores between two [`process_threads_cpu`] readings
/// `seconds` apart (threads of the same name are added up).
pub fn threads_cores(
    before: &BTreeMap<u32, (String, CpuSplit)>,
    after: &BTreeMap<u32, (String, CpuSplit)>,
    seconds: f64,
) -> BTreeMap<String, CpuSplit> {
    let mut cores: BTreeMap<String, CpuSplit> = BTreeMap::new();
    for (tid, (name, cpu)) in after {
        let start = before.get(tid).map(|(_, c)| *c).unwrap_or_default();
        let entry = cores.entry(name.clone()).or_default();
        entry.user += (cpu.user - start.user).max(0.0) / seconds;
        entry.system += (cpu.system - start.system).max(0.0) / seconds;
    }
    cores
}

/// (utime, stime) of a `/proc/.../stat` file, in seconds.
fn stat_cpu_seconds(path: &str) -> anyhow::Result<(f64, f64)> {
    let stat = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces;
    // count fields from after its closing parenthesis. utime and stime are
    // fields 14 and 15, that is the 12th and 13th after it.
    let after_name =
        stat.rfind(')').map(|i| &stat[i + 1..]).ok_or_else(|| anyhow!("{path}: no ')' in {stat:?}"))?;
    let mut fields = after_name.split_whitespace().skip(11);
    let mut next = |name: &str| -> anyhow::Result<u64> {
        fields
            .next()
            .ok_or_else(|| anyhow!("{path}: no {name} field"))?
            .parse::<u64>()
            .with_context(|| format!("{path}: {name} is not a number"))
    };
    let utime = next("utime")?;
    let stime = next("stime")?;
    let ticks = clock_ticks_per_second();
    Ok((utime as f64 / ticks, stime as f64 / ticks))
}

/// Resident set size of process `pid` in bytes (`VmRSS`).
pub fn process_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("{path}: no VmRSS line (is {pid} a kernel thread?)"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("{path}: empty VmRSS line"))?
        .parse()
        .with_context(|| format!("{path}: VmRSS is not a number: {line:?}"))?;
    Ok(kib * 1024)
}

/// How many descriptors process `pid` holds, and its soft limit on them.
pub fn process_fds(pid: u32) -> anyhow::Result<(u64, Option<u64>)> {
    let dir = format!("/proc/{pid}/fd");
    let open = fs::read_dir(&dir).with_context(|| format!("listing {dir}"))?.count() as u64;
    let limit = fs::read_to_string(format!("/proc/{pid}/limits")).ok().and_then(|limits| {
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|soft| soft.parse().ok())
    });
    Ok((open, limit))
}

/// Busy, total and stolen clock ticks of each CPU line (`cpuN`, in order)
/// of `/proc/stat`.
fn cpu_ticks_of(stat: &str) -> Vec<CpuTicks> {
    stat.lines()
        .filter_map(|line| line.strip_prefix("cpu")?.split_once(' '))
        // "cpu " is the sum of all; "cpuN " are the cores.
        .filter(|(index, _)| !index.is_empty())
        .map(|(_, counters)| {
            // user nice system idle iowait irq softirq steal [guest
            // guest_nice]: guest time is already inside user, so only the
            // first 8 count.
            let values: Vec<u64> = counters.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
            let total: u64 = values.iter().take(8).sum();
            let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
            CpuTicks { busy: total - idle.min(total), total, steal: values.get(7).copied().unwrap_or(0) }
        })
        .collect()
}

/// One CPU's clock ticks since boot (see [`cpu_ticks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// Everything but idle and iowait.
    pub busy: u64,
    pub total: u64,
    /// Time the hypervisor ran something else while this virtual CPU had
    /// work (`steal`); inside `busy` and `total`.
    pub steal: u64,
}

/// Busy and total clock ticks of each CPU since boot, from `/proc/stat`
/// (busy = everything but idle and iowait). Two snapshots give each core's
/// utilisation over the interval between them, whoever used it: the check
/// that catches a compiler running on the client's core mid-benchmark.
pub fn cpu_ticks() -> anyhow::Result<Vec<CpuTicks>> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    Ok(cpu_ticks_of(&stat))
}

/// The share (0..=1) of each CPU's time between two [`cpu_ticks`]
/// snapshots that the hypervisor took from it (steal): on a virtual
/// machine, time in which whatever ran there stood still.
pub fn steal_shares(before: &[CpuTicks], after: &[CpuTicks]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let total = a.total.saturating_sub(b.total);
            if total == 0 { 0.0 } else { a.steal.saturating_sub(b.steal) as f64 / total as f64 }
        })
        .collect()
}

/// Above this share of a CPU stolen over a window, a run says so: at
/// 5,000 msg/s, 1% of the time is 50 messages a second standing still.
pub const STEAL_WARN: f64 = 0.005;

/// "cpu0 1.2%, cpu1 0.3%".
pub fn steal_row(steal: &[f64]) -> String {
    steal
        .iter()
        .enumerate()
        .map(|(cpu, s)| format!("cpu{cpu} {:.1}%", s * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints a warning when the hypervisor took more than [`STEAL_WARN`] of
/// any CPU over the window.
pub fn warn_if_stolen(steal: &[f64]) {
    if steal.iter().any(|&s| s > STEAL_WARN) {
        eprintln!(
            "WARNING: the hypervisor took {} of the CPUs' time during the window: a stall of the \
             virtual CPU stops server and client alike, and lands in the latency tail",
            steal_row(steal)
        );
    }
}

/// Cores busy on the whole host between two [`cpu_ticks`] snapshots with
/// neither the hypervisor's steal nor `accounted` (the cores the run's own
/// processes used) in them: someone else's work beside the benchmark.
pub fn other_cores(before: &[CpuTicks], after: &[CpuTicks], accounted: f64) -> f64 {
    let all: Vec<usize> = (0..before.len()).collect();
    let busy = cpus_busy(before, after, &all).unwrap_or(0.0) * all.len() as f64;
    let stolen: f64 = steal_shares(before, after).iter().sum();
    (busy - stolen - accounted).max(0.0)
}

/// Mean utilisation (0..=1) of `cpus` between two [`cpu_ticks`] snapshots.
pub fn cpus_busy(before: &[CpuTicks], after: &[CpuTicks], cpus: &[usize]) -> Option<f64> {
    let mut busy = 0;
    let mut total = 0;
    for &cpu in cpus {
        let (b, a) = (before.get(cpu)?, after.get(cpu)?);
        busy += a.busy.saturating_sub(b.busy);
        total += a.total.saturating_sub(b.total);
    }
    (total > 0).then(|| busy as f64 / total as f64)
}

/// The CPUs process `pid` may run on (`Cpus_allowed_list`, e.g. "1" or
/// "0-3,6"): where a server pinned with `taskset` is.
pub fn process_cpus(pid: u32) -> anyhow::Result<Vec<usize>> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| anyhow!("{path}: no Cpus_allowed_list"))?;
    parse_cpu_list(list.trim())
}

fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse()?),
        }
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steal is the eighth counter of a CPU line, counted in busy and
    /// total; the summary line "cpu " is not a CPU.
    #[test]
    fn cpu_lines_give_busy_total_and_steal() {
        let at = |steal| {
            format!(
                "cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 100 0 50 800 50 0 0 {steal} 7 0\ncpu1 10 0 0 {} 0 0 0 0 0 0\nintr 5\n",
                990 + steal
            )
        };
        let before = cpu_ticks_of(&at(0));
        assert_eq!(before.len(), 2);
        assert_eq!(before[0], CpuTicks { busy: 150, total: 1000, steal: 0 });
        let after = cpu_ticks_of(&at(100));
        assert_eq!(after[0], CpuTicks { busy: 250, total: 1100, steal: 100 });
        let shares = steal_shares(&before, &after);
        assert_eq!(shares.len(), 2);
        assert!((shares[0] - 1.0).abs() < 1e-9, "all of cpu0's 100 new ticks were stolen: {shares:?}");
        assert_eq!(shares[1], 0.0, "cpu1 idled");
        assert_eq!(other_cores(&before, &after, 0.0), 0.0, "stolen time is nobody's work");
    }

    #[test]
    fn own_cpu_and_memory_are_readable() {
        let pid = std::process::id();
        let start = self_cpu_seconds().expect("getrusage");
        // Burn a little CPU so that the counters move.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(self_cpu_seconds().expect("getrusage") > start);
        assert!(process_cpu_seconds(pid).expect("stat") >= 0.0);
        let threads = process_threads_cpu(pid).expect("task stats");
        assert!(threads.contains_key(&pid), "{threads:?}");
        let cores = threads_cores(&BTreeMap::new(), &threads, 1.0);
        assert!(!cores.is_empty() && cores.values().all(|c| c.user >= 0.0 && c.system >= 0.0), "{cores:?}");
        assert!(process_rss_bytes(pid).expect("status") > 0);
        let (open, limit) = process_fds(pid).expect("fds");
        assert!(open >= 3);
        assert!(limit.is_some_and(|l| l >= open));
        assert!(clock_ticks_per_second() >= 1.0);
    }

    #[test]
    fn cpu_lists_and_ticks_parse() {
        assert_eq!(parse_cpu_list("1").expect("list"), vec![1]);
        assert_eq!(parse_cpu_list("0-2,5").expect("list"), vec![0, 1, 2, 5]);
        let cpus = process_cpus(std::process::id()).expect("own cpus");
        assert!(!cpus.is_empty());
        let before = cpu_ticks().expect("/proc/stat");
        assert!(before.len() >= cpus.len());
        let after = cpu_ticks().expect("/proc/stat");
        let busy = cpus_busy(&before, &after, &[0]).unwrap_or(0.0);
        assert!((0.0..=1.0).contains(&busy));
    }

    #[test]
    fn percentiles_come_out_in_microseconds() {
        let mut a = Latency::new();
        a.record(Duration::from_micros(100), 99);
        let mut b = Latency::new();
        b.record(Duration::from_millis(10), 1);
        a.merge(&b);
        let s = a.summary();
        assert!((s.p50 - 100.0).abs() < 1.0, "{s:?}");
        assert!((s.max - 10_000.0).abs() < 20.0, "{s:?}");
    }
}
