//! `--html FILE`: one self-contained page per run, the latency
//! distribution drawn as an inline SVG beside the run's results and every
//! parameter it ran with. No script, font or stylesheet is fetched: the
//! page opens from disk, offline, years later.
//!
//! The chart is the percentile curve HdrHistogram's plotter draws: x is the
//! percentile on a log scale of 1/(1 − p), so 90%, 99%, 99.9% … are evenly
//! spaced and the tail, where latency problems live, gets as much room as
//! the median; y is the latency in milliseconds, linear from 0. One curve
//! per latency the run measured (chat: delivery and ack, and each kind of
//! message apart when it sent a mix).

use std::fmt::Write as _;

use crate::{
    report::{Param, Row, Table},
    stats::Latency,
};

/// Points per halving of the distance to 100% when a histogram is turned
/// into a curve.
const TICKS_PER_HALF: u32 = 8;

/// The chart's size and margins, in SVG user units.
const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 56.0;

/// The x axis runs to at least 99% and at most 99.9999% (decades of
/// 1/(1 − p)).
const DECADES_MIN: f64 = 2.0;
const DECADES_MAX: f64 = 6.0;

/// Line colours, one per series, in order (told apart in grey too).
const COLOURS: [&str; 8] =
    ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#7f7f7f"];

/// One latency's percentile curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// Samples behind the curve.
    pub count: u64,
    /// (quantile 0..=1, µs), quantile rising.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// The curve of `latency`.
    pub fn of(name: impl Into<String>, latency: &Latency) -> Self {
        Self { name: name.into(), count: latency.count(), points: latency.percentiles(TICKS_PER_HALF) }
    }
}

/// `text` safe inside HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Decades of 1/(1 − p) the x axis spans: enough for the largest series'
/// last sample (1 − 1/count), within [`DECADES_MIN`, `DECADES_MAX`].
fn decades(series: &[Series]) -> f64 {
    let count = series.iter().map(|s| s.count).max().unwrap_or(0).max(1) as f64;
    count.log10().ceil().clamp(DECADES_MIN, DECADES_MAX)
}

/// A quantile's place on the x axis, in decades of 1/(1 − p), capped at
/// `decades` (p = 1 included).
fn x_decades(quantile: f64, decades: f64) -> f64 {
    let rest = 1.0 - quantile.clamp(0.0, 1.0);
    if rest <= 10f64.powf(-decades) { decades } else { -rest.log10() }
}

/// A round ceiling for the y axis and its tick step: 1, 2, 2.5 or 5 ×
/// 10^k, about five steps.
fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw_step = max / 5.0;
    let magnitude = 10f64.powf(raw_step.log10().floor());
    let step =
        [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw_step).unwrap_or(raw_step);
    ((max / step).ceil() * step, step)
}

/// The label of decade `d` on the x axis: 0%, 90%, 99%, 99.9%, …
fn percentile_label(d: u32) -> String {
    match d {
        0 => "0%".into(),
        1 => "90%".into(),
        d => format!("99.{}%", "9".repeat(d as usize - 2)).replace("99.%", "99%"),
    }
}

/// A number for an axis label, without trailing zeros.
fn tick_number(v: f64) -> String {
    let text = format!("{v:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The chart's points for `series`: (x, y) in SVG units, x and y never
/// going back (y grows down the screen, so it never increases).
fn plot(series: &Series, decades: f64, y_max_ms: f64) -> Vec<(f64, f64)> {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    series
        .points
        .iter()
        .map(|&(q, us)| {
            let x = LEFT + plot_w * x_decades(q, decades) / decades;
            let y = TOP + plot_h * (1.0 - (us / 1000.0 / y_max_ms).min(1.0));
            (x, y)
        })
        .collect()
}

/// The percentile chart of `series` (empty ones are left out) as an SVG
/// element.
pub fn svg(series: &[Series]) -> String {
    let drawn: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    let decades = decades(series);
    let max_ms = drawn.iter().flat_map(|s| s.points.iter().map(|p| p.1 / 1000.0)).fold(0.0, f64::max);
    let (y_max, y_step) = nice_axis(max_ms);
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let bottom = TOP + plot_h;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="latency-chart" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="latency by percentile">"#
    );
    let _ = write!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#999"/>"##
    );
    // Grid and ticks: decades across, round milliseconds up.
    for d in 0..=decades as u32 {
        let x = LEFT + plot_w * f64::from(d) / decades;
        let _ = write!(
            out,
            r##"<line class="grid" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{bottom}" stroke="#e4e4e4"/><text class="x-tick" x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"##,
            bottom + 16.0,
            percentile_label(d)
        );
    }
    let mut v = 0.0;
    while v <= y_max + y_step / 2.0 {
        let y = bottom - plot_h * v / y_max;
        let _ = write!(
            out,
            r##"<line class="grid" x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text class="y-tick" x="{:.1}" y="{:.1}" text-anchor="end" font-size="12">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            tick_number(v)
        );
        v += y_step;
    }
    let _ = write!(
        out,
        r#"<text class="axis-label" x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">percentile (log scale of 1/(1 − p))</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0
    );
    let _ = write!(
        out,
        r#"<text class="axis-label" x="16" y="{:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 16 {:.1})">latency (ms)</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    for (i, series) in drawn.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let dash = if i >= COLOURS.len() { r#" stroke-dasharray="6 3""# } else { "" };
        let points: Vec<String> =
            plot(series, decades, y_max).iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(
            out,
            r#"<polyline class="series" data-name="{}" fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
            escape(&series.name),
            points.join(" ")
        );
        let ly = TOP + 16.0 + 18.0 * i as f64;
        let _ = write!(
            out,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"{dash}/><text class="legend" x="{:.1}" y="{:.1}" font-size="12">{} ({} samples)</text>"#,
            LEFT + 10.0,
            LEFT + 34.0,
            LEFT + 40.0,
            ly + 4.0,
            escape(&series.name),
            series.count
        );
    }
    out.push_str("</svg>");
    out
}

/// The results table as HTML.
fn results_html(table: &Table) -> String {
    let mut out = String::new();
    for section in &table.sections {
        if !section.title.is_empty() {
            let _ = write!(out, "<h3>{}</h3>", escape(&section.title));
        }
        out.push_str("<table>");
        let mut latency_header = false;
        for row in &section.rows {
            match row {
                Row::Value(label, value) => {
                    let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", escape(label), escape(value));
                }
                Row::Latency(label, count, s) => {
                    if !latency_header {
                        out.push_str(
                            "<tr><th>latency (ms)</th><th>count</th><th>p50</th><th>p90</th><th>p99</th>\
                             <th>p99.9</th><th>max</th><th>mean</th></tr>",
                        );
                        latency_header = true;
                    }
                    let _ = write!(out, "<tr><th>{}</th><td>{count}</td>", escape(label));
                    for us in [s.p50, s.p90, s.p99, s.p999, s.max, s.mean] {
                        let _ = write!(out, "<td>{:.3}</td>", us / 1000.0);
                    }
                    out.push_str("</tr>");
                }
                Row::Check(name, ok, detail) => {
                    let _ = write!(
                        out,
                        r#"<tr class="{}"><th>{}</th><td>{}</td><td>{}</td></tr>"#,
                        if *ok { "pass" } else { "fail" },
                        escape(name),
                        if *ok { "PASS" } else { "FAIL" },
                        escape(detail)
                    );
                }
            }
        }
        out.push_str("</table>");
    }
    out
}

/// The whole page: title, chart, results, parameters.
pub fn page(scenario: &str, params: &[Param], table: &Table, series: &[Series]) -> String {
    let mut out = String::from("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    let _ = write!(out, "<title>kefu-bench {}</title>", escape(scenario));
    out.push_str(
        "<style>body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}\
         th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-variant-numeric:tabular-nums}\
         td{text-align:right}tr.fail{background:#fdd}tr.pass{background:#efe}.default{color:#888}</style>",
    );
    out.push_str("</head><body>");
    let _ = write!(out, "<h1>kefu-bench {}</h1><p>{}</p>", escape(scenario), escape(&table.title));
    out.push_str("<h2>Latency distribution</h2>");
    if series.iter().all(|s| s.points.is_empty()) {
        out.push_str("<p>This run measured no latency.</p>");
    }
    out.push_str(&svg(series));
    out.push_str("<h2>Results</h2>");
    out.push_str(&results_html(table));
    out.push_str("<h2>Parameters</h2><table id=\"parameters\"><tr><th>argument</th><th>value</th></tr>");
    for param in params {
        let _ = write!(
            out,
            "<tr{}><th>{}</th><td>{}</td></tr>",
            if param.default { " class=\"default\" title=\"default\"" } else { "" },
            escape(&param.name),
            escape(&param.value)
        );
    }
    out.push_str("</table></body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn latency(micros: &[(u64, u64)]) -> Latency {
        let mut latency = Latency::new();
        for &(us, n) in micros {
            latency.record(Duration::from_micros(us), n);
        }
        latency
    }

    fn two_series() -> Vec<Series> {
        vec![
            Series::of(
                "delivery",
                &latency(&[(900, 5000), (2500, 4000), (9000, 900), (40_000, 99), (120_000, 1)]),
            ),
            Series::of("ack", &latency(&[(300, 9000), (700, 990), (5000, 10)])),
        ]
    }

    /// The points of every polyline in `svg`, parsed back.
    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.split("<polyline")
            .skip(1)
            .map(|rest| {
                let points =
                    rest.split(" points=\"").nth(1).and_then(|p| p.split('"').next()).expect("points");
                points
                    .split(' ')
                    .map(|xy| {
                        let (x, y) = xy.split_once(',').expect("x,y");
                        (x.parse().expect("x"), y.parse().expect("y"))
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn curves_never_go_back_and_stay_in_the_plot() {
        let svg = svg(&two_series());
        let lines = polylines(&svg);
        assert_eq!(lines.len(), 2);
        for points in &lines {
            assert!(points.len() > 10, "{points:?}");
            for pair in points.windows(2) {
                // Rightwards (percentile up) and upwards on screen
                // (latency up: SVG y grows downwards).
                assert!(pair[1].0 >= pair[0].0 && pair[1].1 <= pair[0].1, "{pair:?}");
            }
            for &(x, y) in points {
                assert!(
                    (LEFT..=WIDTH - RIGHT).contains(&x) && (TOP..=HEIGHT - BOTTOM).contains(&y),
                    "({x}, {y})"
                );
            }
        }
        // The slowest sample, 120 ms, is the top of delivery's curve; the
        // axis is rounded up to a tick above it.
        let top = lines[0].iter().map(|p| p.1).fold(f64::MAX, f64::min);
        assert!(top > TOP && top < TOP + 20.0, "top {top}");
        // 10,000 samples: the x axis runs to 99.99%.
        assert!(svg.contains(">99.99%<") && !svg.contains(">99.999%<"), "{svg}");
    }

    #[test]
    fn axes_are_labelled_and_ticked() {
        let svg = svg(&two_series());
        assert!(svg.contains(">latency (ms)</text>") && svg.contains(">percentile (log scale"), "{svg}");
        for tick in [">0%<", ">90%<", ">99%<", ">99.9%<"] {
            assert!(svg.contains(tick), "{tick} missing");
        }
        // y ticks: 0 up to 125 ms (120 ms rounded up to the 25 ms step).
        for tick in [">0</text>", ">25</text>", ">125</text>"] {
            assert!(svg.contains(tick), "{tick} missing from {svg}");
        }
        assert!(svg.contains("delivery (10000 samples)") && svg.contains("ack (10000 samples)"), "{svg}");
    }

    #[test]
    fn axis_helpers() {
        let close = |(a, b): (f64, f64), (c, d): (f64, f64)| (a - c).abs() < 1e-9 && (b - d).abs() < 1e-9;
        assert!(close(nice_axis(120.0), (125.0, 25.0)), "{:?}", nice_axis(120.0));
        assert!(close(nice_axis(0.0), (1.0, 0.2)), "{:?}", nice_axis(0.0));
        assert!(close(nice_axis(3.7), (4.0, 1.0)), "{:?}", nice_axis(3.7));
        assert!(close(nice_axis(180.0), (200.0, 50.0)), "{:?}", nice_axis(180.0));
        assert_eq!(percentile_label(2), "99%");
        assert_eq!(percentile_label(5), "99.999%");
        assert_eq!(x_decades(0.0, 4.0), 0.0);
        assert!((x_decades(0.99, 4.0) - 2.0).abs() < 1e-9);
        assert_eq!(x_decades(1.0, 4.0), 4.0);
        assert_eq!(tick_number(0.2), "0.2");
        assert_eq!(tick_number(125.0), "125");
    }

    #[test]
    fn parameters_and_names_are_escaped() {
        let params = vec![Param {
            name: "--group".into(),
            value: "<script>alert('x')</script>&\"".into(),
            default: false,
        }];
        let mut series = two_series();
        series[1].name = "ack <b>".into();
        let mut table = Table::new("title with <i>");
        table.row("label <u>", "value & more").check("<check>", false, "<detail>");
        let page = page("chat<", &params, &table, &series);
        for raw in ["<script>", "<b>", "<i>", "<u>", "<check>", "<detail>", "chat<"] {
            assert!(!page.contains(raw), "{raw} left unescaped");
        }
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"), "{page}");
        assert!(page.contains("value &amp; more") && page.contains("ack &lt;b&gt;"), "{page}");
    }

    #[test]
    fn the_page_is_self_contained() {
        let page = page("chat", &[], &Table::new("t"), &two_series());
        assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
        for external in ["<script", "<link", "src=", "@import", "url(", "http://", "https://"] {
            // The SVG namespace is an identifier, never fetched.
            let page = page.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            assert!(!page.contains(external), "{external} in the page");
        }
        assert_eq!(page.matches("<polyline class=\"series\"").count(), 2);
        let empty = page_with_no_samples();
        assert!(empty.contains("measured no latency") && !empty.contains("<polyline"), "{empty}");
    }

    fn page_with_no_samples() -> String {
        page("idle", &[], &Table::new("t"), &[Series::of("none", &Latency::new())])
    }
}
