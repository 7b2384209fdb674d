//! How a run's result leaves the tool: a table on stderr for people, one
//! JSON line on stdout for scripts, and with `--html FILE` a page with the
//! latency distribution.
//!
//! # Streams, and what `--json` changes
//!
//! Every script in `tools/` and CI reads the one JSON line from stdout, so
//! stdout keeps it by default: a run prints its [`Table`] on stderr and the
//! JSON line on stdout. `--json` means "the JSON only": no table (warnings,
//! which say a figure is not to be trusted, stay on stderr).
//!
//! # How a scenario uses this layer
//!
//! A scenario's `run(args, out: &Output)`:
//!
//! 1. while it runs, keeps a [`crate::progress::Progress`] (started with a
//!    closure that reads its counters; it says each phase it enters);
//! 2. at the end builds its serializable report, a [`Table`] of it
//!    (sections of rows, [`Table::latency`] rows for percentiles,
//!    [`Table::check`] for pass/fail checks) and one [`Series`] per latency
//!    it measured ([`Series::of`] a [`crate::stats::Latency`]);
//! 3. calls [`Output::emit`], which prints or writes what was asked for.
//!
//! `Output` carries every argument of the command line, defaults included
//! ([`Output::from_matches`]), for the HTML page's table of parameters.

use std::{fmt::Write as _, fs, path::PathBuf};

use anyhow::Context as _;
use clap::{ArgMatches, parser::ValueSource};
use serde::Serialize;

use crate::{
    html::{self, Series},
    stats::LatencySummary,
};

/// Width of a table's label column, in characters.
const LABEL_WIDTH: usize = 30;

/// Width of one latency column.
const NUMBER_WIDTH: usize = 10;

/// The output options every subcommand takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OutputArgs {
    /// Print only the JSON result on stdout: no table on stderr.
    #[arg(long, global = true)]
    pub json: bool,

    /// Also write a self-contained HTML page with the latency distribution
    /// (SVG) and the run's parameters and results to FILE.
    #[arg(long, global = true, value_name = "FILE")]
    pub html: Option<PathBuf>,
}

/// One command-line parameter as the run used it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Param {
    pub name: String,
    pub value: String,
    /// Not given on the command line: the default (or an environment
    /// variable).
    pub default: bool,
}

/// Where a run's result goes.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub args: OutputArgs,
    /// The subcommand, e.g. `chat`.
    pub scenario: String,
    /// Every argument of the subcommand, defaults included, by name.
    pub params: Vec<Param>,
}

impl Output {
    /// The output of subcommand `scenario`, with its parameters read from
    /// its parsed `matches` (the output options themselves left out).
    pub fn from_matches(args: OutputArgs, scenario: &str, matches: &ArgMatches) -> Self {
        let mut params: Vec<Param> = matches
            .ids()
            .map(|id| id.as_str())
            .filter(|id| !matches!(*id, "json" | "html"))
            .filter_map(|id| {
                // Groups (a flattened struct's name) have ids but no values.
                let values = matches.try_get_raw(id).ok().flatten()?;
                let value = values.map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>().join(",");
                let default = !matches!(matches.value_source(id), Some(ValueSource::CommandLine));
                Some(Param { name: format!("--{}", id.replace('_', "-")), value, default })
            })
            .collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Self { args, scenario: scenario.to_owned(), params }
    }

    /// Prints `table` on stderr (unless `--json`), `result` as one JSON line
    /// on stdout, and writes the HTML page if `--html` asked for one.
    pub fn emit<R: Serialize>(&self, result: &R, table: &Table, series: &[Series]) -> anyhow::Result<()> {
        if !self.args.json {
            eprint!("{}", table.render());
        }
        println!("{}", serde_json::to_string(result)?);
        if let Some(path) = &self.args.html {
            let page = html::page(&self.scenario, &self.params, table, series);
            fs::write(path, page).with_context(|| format!("writing the HTML report {}", path.display()))?;
            if !self.args.json {
                eprintln!("report: {}", path.display());
            }
        }
        Ok(())
    }
}

/// One line of a [`Table`].
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A label and its value, already formatted with its unit.
    Value(String, String),
    /// A latency's count and percentiles (µs).
    Latency(String, u64, LatencySummary),
    /// A check: name, passed, detail.
    Check(String, bool, String),
}

/// A titled group of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub title: String,
    pub rows: Vec<Row>,
}

/// A run's results in sections, rendered as fixed-width text for the
/// terminal and as HTML tables for the page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub title: String,
    pub sections: Vec<Section>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Self {
        Self { title: title.into(), sections: Vec::new() }
    }

    /// Starts a section; the rows added next go into it.
    pub fn section(&mut self, title: impl Into<String>) -> &mut Self {
        self.sections.push(Section { title: title.into(), rows: Vec::new() });
        self
    }

    fn push(&mut self, row: Row) -> &mut Self {
        if self.sections.is_empty() {
            self.section("");
        }
        if let Some(section) = self.sections.last_mut() {
            section.rows.push(row);
        }
        self
    }

    /// A labelled value (formatted by the caller, unit included).
    pub fn row(&mut self, label: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.push(Row::Value(label.into(), value.into()))
    }

    /// A labelled value if there is one.
    pub fn row_opt(&mut self, label: &str, value: Option<String>) -> &mut Self {
        match value {
            Some(value) => self.row(label, value),
            None => self,
        }
    }

    /// A latency's percentiles.
    pub fn latency(&mut self, label: impl Into<String>, count: u64, summary: &LatencySummary) -> &mut Self {
        self.push(Row::Latency(label.into(), count, *summary))
    }

    pub fn check(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) -> &mut Self {
        self.push(Row::Check(name.into(), ok, detail.into()))
    }

    /// Checks passed and failed over the whole table.
    pub fn checks(&self) -> (usize, usize) {
        let results = self.sections.iter().flat_map(|s| &s.rows).filter_map(|row| match row {
            Row::Check(_, ok, _) => Some(*ok),
            _ => None,
        });
        results.fold((0, 0), |(pass, fail), ok| if ok { (pass + 1, fail) } else { (pass, fail + 1) })
    }

    /// The table as fixed-width text, one line per row, ending in a newline.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let rule = "─".repeat(LABEL_WIDTH + 2 + 6 * NUMBER_WIDTH + 8);
        let _ = writeln!(out, "{rule}\n{}\n{rule}", self.title);
        for section in &self.sections {
            if !section.title.is_empty() {
                let _ = writeln!(out, "{}", section.title);
            }
            let mut header_done = false;
            for row in &section.rows {
                match row {
                    Row::Value(label, value) => {
                        let _ = writeln!(out, "  {:<LABEL_WIDTH$}{value}", clip(label));
                    }
                    Row::Latency(label, count, s) => {
                        if !header_done {
                            let _ = writeln!(
                                out,
                                "  {:<LABEL_WIDTH$}{:>8}{:>NUMBER_WIDTH$}{:>NUMBER_WIDTH$}{:>NUMBER_WIDTH$}{:>NUMBER_WIDTH$}{:>NUMBER_WIDTH$}{:>NUMBER_WIDTH$}",
                                "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
                            );
                            header_done = true;
                        }
                        let _ = writeln!(
                            out,
                            "  {:<LABEL_WIDTH$}{count:>8}{}{}{}{}{}{}",
                            clip(label),
                            ms(s.p50),
                            ms(s.p90),
                            ms(s.p99),
                            ms(s.p999),
                            ms(s.max),
                            ms(s.mean)
                        );
                    }
                    Row::Check(name, ok, detail) => {
                        let _ = writeln!(
                            out,
                            "  {} {:<LABEL_WIDTH$} {detail}",
                            if *ok { "PASS" } else { "FAIL" },
                            name
                        );
                    }
                }
            }
        }
        let (passed, failed) = self.checks();
        if passed + failed > 0 {
            let _ = writeln!(out, "checks: {passed} passed, {failed} failed");
        }
        let _ = writeln!(out, "{rule}");
        out
    }
}

/// A label cut to the label column (on a character boundary).
fn clip(label: &str) -> String {
    if label.chars().count() < LABEL_WIDTH {
        label.to_owned()
    } else {
        label.chars().take(LABEL_WIDTH - 2).chain(['…', ' ']).collect()
    }
}

/// µs as a right-aligned millisecond column, with the precision the
/// histogram has (3 significant digits).
fn ms(us: f64) -> String {
    let v = us / 1000.0;
    let text = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    format!("{text:>NUMBER_WIDTH$}")
}

/// A rate in messages per second.
pub fn per_s(rate: f64) -> String {
    format!("{rate:.0} msg/s")
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// CPU in cores, and per message if known.
pub fn cpu(cores: f64, us_per_msg: Option<f64>) -> String {
    match us_per_msg {
        Some(per) => format!("{cores:.2} cores, {per:.1} µs/msg"),
        None => format!("{cores:.2} cores"),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _, Parser};

    use super::*;

    fn summary(p50: f64) -> LatencySummary {
        LatencySummary {
            min: 1.0,
            p50,
            p90: 2.0 * p50,
            p99: 3.0 * p50,
            p999: 4.0 * p50,
            max: 5.0 * p50,
            mean: p50,
        }
    }

    #[test]
    fn the_table_is_fixed_width_and_counts_checks() {
        let mut table = Table::new("chat: 10 visitors");
        table.section("rates").row("sent", per_s(500.4)).row_opt("server CPU", None);
        table.section("latency").latency("delivery", 5000, &summary(2_412.0)).latency(
            "ack",
            5000,
            &summary(180.0),
        );
        table.section("checks").check("nothing lost", true, "0 undelivered").check("p99", false, "too slow");
        let text = table.render();
        assert!(text.contains("sent") && text.contains("500 msg/s"), "{text}");
        assert!(!text.contains("server CPU"), "{text}");
        assert!(text.contains("PASS nothing lost") && text.contains("FAIL p99"), "{text}");
        assert!(text.contains("checks: 1 passed, 1 failed"), "{text}");
        assert_eq!(table.checks(), (1, 1));
        // The percentile columns line up: every latency row is as wide as
        // the header, and p50 2.412 ms prints as 2.41.
        let rows: Vec<&str> =
            text.lines().filter(|l| l.contains("delivery") || l.contains("latency (ms)")).collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert_eq!(rows[0].chars().count(), rows[1].chars().count(), "{text}");
        assert!(rows[1].contains("      2.41      4.82      7.24"), "{text}");
        assert!(text.lines().any(|l| l.contains("ack") && l.contains("0.180")), "{text}");
    }

    #[test]
    fn long_labels_are_clipped_not_pushed() {
        let mut table = Table::new("t");
        table.latency("a label far longer than the column is wide", 1, &summary(1000.0));
        table.latency("short", 1, &summary(1000.0));
        let widths: Vec<usize> = table.render().lines().skip(3).take(3).map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{widths:?}\n{}", table.render());
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        output: OutputArgs,
        #[arg(long, default_value_t = 5)]
        rate: u32,
        #[arg(long, value_delimiter = ',')]
        sources: Vec<String>,
        #[arg(long)]
        visitor_tokens: bool,
    }

    #[test]
    fn parameters_include_defaults_and_leave_out_the_output_options() {
        let matches =
            Cli::command().get_matches_from(["t", "--sources", "a,b", "--json", "--html", "/tmp/x.html"]);
        let cli = Cli::from_arg_matches(&matches).expect("parses");
        let out = Output::from_matches(cli.output, "chat", &matches);
        assert!(out.args.json && out.args.html.is_some());
        let by_name = |name: &str| out.params.iter().find(|p| p.name == name).cloned();
        assert_eq!(
            by_name("--rate"),
            Some(Param { name: "--rate".into(), value: "5".into(), default: true })
        );
        assert_eq!(
            by_name("--sources"),
            Some(Param { name: "--sources".into(), value: "a,b".into(), default: false })
        );
        assert_eq!(by_name("--visitor-tokens").map(|p| p.value), Some("false".into()));
        assert!(by_name("--json").is_none() && by_name("--html").is_none(), "{:?}", out.params);
    }
}
