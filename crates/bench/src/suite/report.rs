//! The report: SVG plots and one self-contained HTML page, made from the
//! run records of a sweep.
//!
//! Every figure is the median over repeats of one point (workload,
//! interface, local-memory ratio). Records whose status is not "ok" are left
//! out of the figures and listed in a table of their own.
//!
//! Plots, per workload (files under `plots/`, also inlined in the page):
//!
//! * `<workload>-slowdown.svg`: slowdown against all-local memory as local
//!   memory shrinks, one line per interface that has a local-memory ratio,
//!   dashed reference lines for those that have none, a line at 1 for
//!   all-local memory; log y (the "hockey stick").
//! * `<workload>-latency.svg`: p50, p99 and p99.9 per-operation latency, one
//!   panel each, laid out the same way (key-value workloads only).
//! * `<workload>-bytes.svg`: bytes moved over the network per operation.
//!
//! The x axis of every plot is local memory as a percentage of the
//! workload's footprint, from 100% on the left to the least on the right.
//!
//! [`screenshot`] and [`plot_pixel_count`] let a test look at the rendered
//! page the way a reader does: through a browser.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use super::results::median;
use super::{Interface, RunRecord, Workload};

/// What the report says about the sweep besides its records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportMeta {
    /// The exact command line of the sweep.
    pub command: String,
    /// The machine it ran on ([`machine_description`]).
    pub machine: String,
    /// When the sweep started, as the runner formats it.
    pub started: String,
    /// Wall-clock seconds of the whole sweep.
    pub duration_secs: f64,
    /// Remarks shown at the top of the report, e.g. "zram skipped: not root".
    pub notes: Vec<String>,
}

/// Series colours as RGB, one per interface in the order of
/// [`Interface::ALL`], then one for interface names this build does not
/// know. Nothing else on the page uses these colours (text, grid and tables
/// are grey or near-black, which no entry is close to), so counting pixels
/// of these colours in a screenshot ([`plot_pixel_count`]) measures how much
/// of the plots the browser drew.
pub const PALETTE: [[u8; 3]; 11] = [
    [70, 70, 150],   // local: slate blue
    [31, 119, 180],  // paging: blue
    [255, 127, 14],  // objects: orange
    [44, 160, 44],   // offload: green
    [148, 103, 189], // regions: purple
    [188, 189, 34],  // zram: olive
    [214, 39, 40],   // redis: red
    [240, 120, 170], // redis-pipelined: pink
    [23, 190, 207],  // memcached: cyan
    [140, 86, 75],   // memcached-pipelined: brown
    [200, 160, 0],   // any other name: ochre
];

/// How far (per channel) a pixel may be from a [`PALETTE`] colour and still
/// count in [`plot_pixel_count`]: room for the browser's colour rounding,
/// not for antialiased edges blended with the background.
pub const PIXEL_TOLERANCE: u8 = 3;

/// How long [`screenshot`] waits for Chromium.
pub const SCREENSHOT_TIMEOUT: Duration = Duration::from_secs(90);

/// The colour of an interface's series (see [`PALETTE`]).
pub fn interface_colour(interface: &str) -> [u8; 3] {
    let i = Interface::ALL
        .iter()
        .position(|i| i.name() == interface)
        .unwrap_or(PALETTE.len() - 1);
    PALETTE[i]
}

fn rgb(interface: &str) -> RGBColor {
    let [r, g, b] = interface_colour(interface);
    RGBColor(r, g, b)
}

// ---------------------------------------------------------------------------
// Medians per point
// ---------------------------------------------------------------------------

/// Medians over the repeats of one (workload, interface, ratio).
#[derive(Debug, Clone, Default)]
struct Point {
    secs: Option<f64>,
    slowdown: Option<f64>,
    ops_per_sec: Option<f64>,
    bytes_per_op: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
}

/// The ok records of a sweep, reduced to medians.
#[derive(Debug, Default)]
struct Summary {
    /// Workloads with at least one ok record, in report order.
    workloads: Vec<String>,
    /// Interfaces of each workload in report order, local included.
    interfaces: HashMap<String, Vec<String>>,
    /// (workload, interface, ratio) → medians. Interfaces without a ratio
    /// are keyed at ratio 0 whatever was recorded.
    points: BTreeMap<(String, String, u32), Point>,
    /// Interfaces whose figures depend on local memory.
    with_ratio: BTreeSet<String>,
    /// Median all-local seconds per workload.
    local_secs: HashMap<String, f64>,
}

const LOCAL: &str = "local";

fn workload_rank(name: &str) -> (usize, String) {
    let i = Workload::ALL.iter().position(|w| w.name() == name);
    (i.unwrap_or(usize::MAX), name.to_string())
}

fn interface_rank(name: &str) -> (usize, String) {
    let i = Interface::ALL.iter().position(|i| i.name() == name);
    (i.unwrap_or(usize::MAX), name.to_string())
}

fn is_peer(interface: &str) -> bool {
    interface
        .parse::<Interface>()
        .map(Interface::is_peer)
        .unwrap_or(false)
}

fn med(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.flatten().filter(|x| x.is_finite()).collect();
    median(&mut v)
}

impl Summary {
    fn new(records: &[RunRecord]) -> Summary {
        let ok: Vec<&RunRecord> = records.iter().filter(|r| r.ok()).collect();
        let mut s = Summary::default();

        // Which interfaces have a ratio: the known ones say so themselves;
        // an unknown name has one if it was recorded at a nonzero ratio.
        let mut unknown_ratio: BTreeSet<String> = BTreeSet::new();
        for r in &ok {
            match r.interface.parse::<Interface>() {
                Ok(i) if i.has_ratio() => {
                    s.with_ratio.insert(r.interface.clone());
                }
                Ok(_) => {}
                Err(_) if r.ratio != 0 => {
                    unknown_ratio.insert(r.interface.clone());
                }
                Err(_) => {}
            }
        }
        s.with_ratio.extend(unknown_ratio);

        let mut local: HashMap<&str, Vec<f64>> = HashMap::new();
        for r in ok.iter().filter(|r| r.interface == LOCAL) {
            local.entry(&r.workload).or_default().push(r.secs);
        }
        for (w, mut secs) in local {
            if let Some(m) = median(&mut secs) {
                s.local_secs.insert(w.to_string(), m);
            }
        }

        let mut groups: BTreeMap<(String, String, u32), Vec<&RunRecord>> = BTreeMap::new();
        for r in &ok {
            let ratio = if s.with_ratio.contains(&r.interface) {
                r.ratio
            } else {
                0
            };
            groups
                .entry((r.workload.clone(), r.interface.clone(), ratio))
                .or_default()
                .push(r);
        }
        for ((w, i, ratio), rs) in groups {
            let local = s.local_secs.get(&w).copied();
            let slowdown = |r: &RunRecord| {
                if r.interface == LOCAL {
                    return Some(1.0);
                }
                r.slowdown
                    .or_else(|| local.filter(|l| *l > 0.0).map(|l| r.secs / l))
            };
            let p = Point {
                secs: med(rs.iter().map(|r| Some(r.secs))),
                slowdown: med(rs.iter().map(|r| slowdown(r))),
                ops_per_sec: med(rs
                    .iter()
                    .map(|r| (r.secs > 0.0).then(|| r.ops as f64 / r.secs))),
                bytes_per_op: med(rs.iter().map(|r| r.bytes_per_op())),
                p50: med(rs.iter().map(|r| r.lat_p50_us)),
                p99: med(rs.iter().map(|r| r.lat_p99_us)),
                p999: med(rs.iter().map(|r| r.lat_p999_us)),
            };
            let ifs = s.interfaces.entry(w.clone()).or_default();
            if !ifs.contains(&i) {
                ifs.push(i.clone());
            }
            s.points.insert((w, i, ratio), p);
        }
        for ifs in s.interfaces.values_mut() {
            ifs.sort_by_key(|i| interface_rank(i));
        }
        s.workloads = s.interfaces.keys().cloned().collect();
        s.workloads.sort_by_key(|w| workload_rank(w));
        s
    }

    fn has_ratio(&self, interface: &str) -> bool {
        self.with_ratio.contains(interface)
    }

    /// Ratios measured for `workload` by interfaces with a ratio, most
    /// local memory first.
    fn ratios(&self, workload: &str) -> Vec<u32> {
        let set: BTreeSet<u32> = self
            .points
            .keys()
            .filter(|(w, i, _)| w == workload && self.has_ratio(i))
            .map(|(_, _, r)| *r)
            .collect();
        set.into_iter().rev().collect()
    }

    /// Ratios of every workload, most local memory first.
    fn all_ratios(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self
            .points
            .keys()
            .filter(|(_, i, _)| self.has_ratio(i))
            .map(|(_, _, r)| *r)
            .collect();
        set.into_iter().rev().collect()
    }

    fn point(&self, workload: &str, interface: &str, ratio: u32) -> Option<&Point> {
        self.points
            .get(&(workload.to_string(), interface.to_string(), ratio))
    }

    /// The points of one (workload, interface), most local memory first.
    fn line(&self, workload: &str, interface: &str) -> Vec<(u32, &Point)> {
        let mut v: Vec<(u32, &Point)> = self
            .points
            .iter()
            .filter(|((w, i, _), _)| w == workload && i == interface)
            .map(|((_, _, r), p)| (*r, p))
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.0));
        v
    }

    /// The single point of an interface without a ratio (local memory
    /// included: whatever ratio its runs were recorded at, they are one
    /// point).
    fn flat(&self, workload: &str, interface: &str) -> Option<&Point> {
        self.point(workload, interface, 0)
    }
}

// ---------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------

/// One solid line with markers.
#[derive(Debug)]
struct Series {
    label: String,
    colour: RGBColor,
    points: Vec<(u32, f64)>,
}

/// One horizontal reference line across the chart.
#[derive(Debug)]
struct RefLine {
    label: String,
    colour: RGBColor,
    y: f64,
    dashed: bool,
}

/// Everything one chart panel shows.
#[derive(Debug)]
struct ChartSpec {
    /// Panel title; empty for a plot of one panel (the plot has a title).
    title: String,
    y_desc: String,
    y_fmt: fn(f64) -> String,
    series: Vec<Series>,
    refs: Vec<RefLine>,
    ratios: Vec<u32>,
}

impl ChartSpec {
    fn is_empty(&self) -> bool {
        self.series.iter().all(|s| s.points.is_empty()) && self.refs.is_empty()
    }
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

const FONT: &str = "sans-serif";
const TEXT: RGBColor = RGBColor(34, 34, 34);
const GRID_LIGHT: RGBColor = RGBColor(240, 240, 240);
const GRID_BOLD: RGBColor = RGBColor(212, 212, 212);
/// Height of a plot's title band, in pixels.
const TITLE_H: u32 = 34;
/// Height of one row of the legend band, in pixels.
const LEGEND_ROW_H: u32 = 24;
/// Pixels below the plotting area of a panel (x labels and description).
const X_AREA: u32 = 52;

/// Ticks of a log axis over `lo..hi` for a plotting area `px` pixels high:
/// the densest of 1…9, 1-2-5, 1-3 and powers of ten per decade whose labels
/// stay `min_gap` pixels apart, and the 1…9 per decade as light grid lines.
fn log_ticks(lo: f64, hi: f64, px: f64) -> (Vec<f64>, Vec<f64>) {
    const MIN_GAP: f64 = 22.0;
    let decades = (hi / lo).log10().max(1e-9);
    let per_decade = px / decades;
    let in_range = |mantissas: &[f64], every: i32| -> Vec<f64> {
        let mut v = Vec::new();
        let first = lo.log10().floor() as i32 - 1;
        let last = hi.log10().ceil() as i32 + 1;
        for e in first..=last {
            if e.rem_euclid(every) != 0 {
                continue;
            }
            for m in mantissas {
                let t = m * 10f64.powi(e);
                if t >= lo && t <= hi {
                    v.push(t);
                }
            }
        }
        v
    };
    let light = in_range(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 1);
    let candidates: [&[f64]; 4] = [
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 3.0],
        &[1.0],
    ];
    for m in candidates {
        let ticks = in_range(m, 1);
        let min_gap = ticks
            .windows(2)
            .map(|w| (w[1] / w[0]).log10() * per_decade)
            .fold(f64::INFINITY, f64::min);
        if min_gap >= MIN_GAP && ticks.len() >= 2 {
            return (ticks, light);
        }
    }
    // Very wide ranges: every n-th power of ten.
    let every = ((MIN_GAP / per_decade).ceil() as i32).max(1);
    let mut ticks = in_range(&[1.0], every);
    if ticks.len() < 2 {
        ticks = vec![lo, hi];
    }
    (ticks, light)
}

/// An axis with ticks (bold grid lines and labels) and light grid lines
/// where we say, around any plotters coordinate. Unlike plotters' own
/// `WithKeyPoints` it keeps default formatting, so that an axis of `f64`
/// takes a label formatter.
#[derive(Debug)]
struct Ticked<R: Ranged> {
    inner: R,
    bold: Vec<R::ValueType>,
    light: Vec<R::ValueType>,
}

impl<R: Ranged> Ranged for Ticked<R>
where
    R::ValueType: Clone,
{
    type FormatOption = DefaultFormatting;
    type ValueType = R::ValueType;

    fn map(&self, value: &Self::ValueType, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<Self::ValueType> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> std::ops::Range<Self::ValueType> {
        self.inner.range()
    }

    fn axis_pixel_range(&self, limit: (i32, i32)) -> std::ops::Range<i32> {
        self.inner.axis_pixel_range(limit)
    }
}

fn draw_chart(area: &DrawingArea<SVGBackend<'_>, Shift>, spec: &ChartSpec) -> anyhow::Result<()> {
    // x is the negated ratio, so that less local memory is further right;
    // ticks at the measured ratios.
    let (lo, hi) = match (spec.ratios.iter().min(), spec.ratios.iter().max()) {
        (Some(&lo), Some(&hi)) => (lo as f64, hi as f64),
        _ => (10.0, 100.0),
    };
    let pad = ((hi - lo) * 0.06).max(4.0);
    let x_range = -(hi + pad)..-(lo - pad);
    let mut x_ticks: Vec<f64> = spec.ratios.iter().map(|r| -(*r as f64)).collect();
    if x_ticks.is_empty() {
        x_ticks = vec![-hi, -lo];
    }
    let x_light: Vec<f64> = (0..=100)
        .map(|p| -(p as f64))
        .filter(|x| x_range.contains(x) && (*x as i64) % 5 == 0)
        .collect();

    let ys: Vec<f64> = spec
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(spec.refs.iter().map(|r| r.y))
        .filter(|y| y.is_finite() && *y > 0.0)
        .collect();
    let ymin = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let ymax = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (ymin, ymax) = if ymin.is_finite() && ymax.is_finite() {
        (ymin, ymax)
    } else {
        (1.0, 10.0)
    };
    // At least a factor of 4 top to bottom, so that flat data still reads
    // as a log axis with ticks.
    let spread = (4.0 / (ymax / ymin)).max(1.0).sqrt();
    let (y0, y1) = (ymin / 1.3 / spread, ymax * 1.3 * spread);
    let caption_h = if spec.title.is_empty() { 0 } else { 30 };
    let plot_px = area
        .dim_in_pixel()
        .1
        .saturating_sub(X_AREA + caption_h + 20) as f64;
    let (y_ticks, y_light) = log_ticks(y0, y1, plot_px.max(50.0));

    let mut builder = ChartBuilder::on(area);
    if !spec.title.is_empty() {
        builder.caption(&spec.title, (FONT, 19).into_font().color(&TEXT));
    }
    let mut chart = builder
        .margin(12)
        .margin_top(6)
        .x_label_area_size(X_AREA)
        .y_label_area_size(76)
        .build_cartesian_2d(
            Ticked {
                inner: RangedCoordf64::from(x_range.clone()),
                bold: x_ticks,
                light: x_light,
            },
            Ticked {
                inner: LogCoord::<f64>::from((y0..y1).log_scale()),
                bold: y_ticks,
                light: y_light,
            },
        )
        .map_err(plot_err)?;
    let y_fmt = spec.y_fmt;
    chart
        .configure_mesh()
        .x_desc("local memory, % of footprint (less to the right)")
        .y_desc(spec.y_desc.as_str())
        .x_label_formatter(&|x| format!("{:.0}%", x.abs()))
        .y_label_formatter(&|y| y_fmt(*y))
        .light_line_style(GRID_LIGHT)
        .bold_line_style(GRID_BOLD)
        .axis_style(TEXT)
        .label_style((FONT, 15).into_font().color(&TEXT))
        .axis_desc_style((FONT, 15).into_font().color(&TEXT))
        .draw()
        .map_err(plot_err)?;

    let (x0, x1) = (x_range.start, x_range.end);
    for r in &spec.refs {
        let style = r.colour.stroke_width(if r.dashed { 3 } else { 2 });
        if r.dashed {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x0, r.y), (x1, r.y)],
                    10,
                    6,
                    style,
                ))
                .map_err(plot_err)?;
        } else {
            chart
                .draw_series(LineSeries::new(vec![(x0, r.y), (x1, r.y)], style))
                .map_err(plot_err)?;
        }
    }
    for s in &spec.series {
        let colour = s.colour;
        let pts: Vec<(f64, f64)> = s.points.iter().map(|(r, y)| (-(*r as f64), *y)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(3)))
            .map_err(plot_err)?;
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 5, colour.filled())))
            .map_err(plot_err)?;
    }
    Ok(())
}

/// One entry of a plot's legend.
#[derive(Debug, Clone, PartialEq)]
struct LegendEntry {
    label: String,
    colour: RGBColor,
    dashed: bool,
    /// Whether the series has markers at its points.
    marker: bool,
}

/// The legend entries of some panels, each once, series before reference
/// lines.
fn legend_entries(panels: &[ChartSpec]) -> Vec<LegendEntry> {
    let mut v: Vec<LegendEntry> = Vec::new();
    let mut push = |e: LegendEntry| {
        if !v.contains(&e) {
            v.push(e);
        }
    };
    for p in panels {
        for s in &p.series {
            push(LegendEntry {
                label: s.label.clone(),
                colour: s.colour,
                dashed: false,
                marker: true,
            });
        }
    }
    for p in panels {
        for r in &p.refs {
            push(LegendEntry {
                label: r.label.clone(),
                colour: r.colour,
                dashed: r.dashed,
                marker: false,
            });
        }
    }
    v
}

const LEGEND_LEFT: i32 = 80;
const SWATCH_W: i32 = 28;

/// Positions of legend entries in rows across `width`, and the rows used.
fn legend_layout(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    entries: &[LegendEntry],
    width: i32,
) -> (Vec<(i32, u32)>, u32) {
    let style = TextStyle::from((FONT, 15).into_font());
    let (mut x, mut row) = (LEGEND_LEFT, 0u32);
    let mut pos = Vec::new();
    for e in entries {
        let text_w = area
            .estimate_text_size(&e.label, &style)
            .map(|(w, _)| w as i32)
            .unwrap_or(8 * e.label.len() as i32);
        let item_w = SWATCH_W + 8 + text_w + 28;
        if x + item_w > width - 10 && x > LEGEND_LEFT {
            x = LEGEND_LEFT;
            row += 1;
        }
        pos.push((x, row));
        x += item_w;
    }
    (pos, if entries.is_empty() { 0 } else { row + 1 })
}

/// Renders a plot: a title, a legend band, and panels side by side.
fn render_svg(title: &str, panels: &[ChartSpec], panel_size: (u32, u32)) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let width = panel_size.0 * panels.len() as u32;
        let entries = legend_entries(panels);
        // A throwaway area to measure text with: layout needs the height
        // before the real drawing area exists.
        let (positions, rows) = {
            let mut scratch = String::new();
            let probe = SVGBackend::with_string(&mut scratch, (width, 10)).into_drawing_area();
            legend_layout(&probe, &entries, width as i32)
        };
        let legend_h = rows * LEGEND_ROW_H + 8;
        let height = TITLE_H + legend_h + panel_size.1;
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;

        let title_style = (FONT, 21)
            .into_font()
            .color(&TEXT)
            .pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new(
            title.to_string(),
            (width as i32 / 2, TITLE_H as i32 / 2 + 4),
            title_style,
        ))
        .map_err(plot_err)?;

        let label_style = (FONT, 15)
            .into_font()
            .color(&TEXT)
            .pos(Pos::new(HPos::Left, VPos::Center));
        for (e, (x, row)) in entries.iter().zip(positions) {
            let y = (TITLE_H + row * LEGEND_ROW_H + LEGEND_ROW_H / 2) as i32;
            let line = vec![(x, y), (x + SWATCH_W, y)];
            let style = e.colour.stroke_width(3);
            if e.dashed {
                root.draw(&DashedPathElement::new(line, 7, 4, style))
                    .map_err(plot_err)?;
            } else {
                root.draw(&PathElement::new(line, style))
                    .map_err(plot_err)?;
            }
            if e.marker {
                root.draw(&Circle::new((x + SWATCH_W / 2, y), 4, e.colour.filled()))
                    .map_err(plot_err)?;
            }
            root.draw(&Text::new(
                e.label.clone(),
                (x + SWATCH_W + 8, y),
                label_style.clone(),
            ))
            .map_err(plot_err)?;
        }

        let (_, body) = root.split_vertically(TITLE_H + legend_h);
        let areas = body.split_evenly((1, panels.len()));
        for (area, spec) in areas.iter().zip(panels) {
            draw_chart(area, spec)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn fmt_sig(v: f64) -> String {
    let a = v.abs();
    let s = if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn fmt_times(v: f64) -> String {
    format!("{}×", fmt_sig(v))
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M ops/s", fmt_sig(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k ops/s", fmt_sig(v / 1e3))
    } else {
        format!("{} ops/s", fmt_sig(v))
    }
}

fn fmt_us(v: f64) -> String {
    if v >= 1e6 {
        format!("{} s", fmt_sig(v / 1e6))
    } else if v >= 1e3 {
        format!("{} ms", fmt_sig(v / 1e3))
    } else {
        format!("{} µs", fmt_sig(v))
    }
}

fn fmt_bytes(v: f64) -> String {
    // Decimal units, so that the 1-2-5 ticks of a log axis read as round
    // numbers.
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = v;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    format!("{} {}", fmt_sig(v), UNITS[u])
}

/// Label of a reference line for an interface that has no ratio.
fn ref_label(interface: &str) -> String {
    match interface.parse::<Interface>() {
        Ok(Interface::Regions) => format!("{interface} (no local cache)"),
        Ok(i) if i.is_peer() => format!("{interface} (server holds all data)"),
        _ => format!("{interface} (any local memory)"),
    }
}

/// Builds one panel: a line per interface with a ratio, a dashed line per
/// interface without, and, where `local_ref` says, a line for local memory.
fn panel(
    s: &Summary,
    workload: &str,
    look: Look,
    value: impl Fn(&Point) -> Option<f64>,
) -> ChartSpec {
    let Look {
        title,
        y_desc,
        y_fmt,
        local_ref,
    } = look;
    let mut series = Vec::new();
    let mut refs = Vec::new();
    let good = |v: Option<f64>| v.filter(|y| y.is_finite() && *y > 0.0);
    for i in s.interfaces.get(workload).into_iter().flatten() {
        if i == LOCAL {
            let y = match local_ref {
                LocalRef::One => Some(1.0),
                LocalRef::Measured => s.flat(workload, i).and_then(|p| good(value(p))),
                LocalRef::None => None,
            };
            if let Some(y) = y {
                refs.push(RefLine {
                    label: "local (all in memory)".to_string(),
                    colour: rgb(i),
                    y,
                    dashed: false,
                });
            }
        } else if s.has_ratio(i) {
            let points: Vec<(u32, f64)> = s
                .line(workload, i)
                .into_iter()
                .filter_map(|(r, p)| good(value(p)).map(|y| (r, y)))
                .collect();
            if !points.is_empty() {
                series.push(Series {
                    label: i.clone(),
                    colour: rgb(i),
                    points,
                });
            }
        } else if let Some(y) = s.flat(workload, i).and_then(|p| good(value(p))) {
            refs.push(RefLine {
                label: ref_label(i),
                colour: rgb(i),
                y,
                dashed: true,
            });
        }
    }
    ChartSpec {
        title,
        y_desc,
        y_fmt,
        series,
        refs,
        ratios: s.ratios(workload),
    }
}

/// Titles and styles of a panel (see [`panel`]).
#[derive(Debug)]
struct Look {
    title: String,
    y_desc: String,
    y_fmt: fn(f64) -> String,
    local_ref: LocalRef,
}

/// How a panel shows local memory.
#[derive(Debug, Clone, Copy)]
enum LocalRef {
    /// A line at 1 (slowdown is 1 by definition).
    One,
    /// A line at local memory's own figure.
    Measured,
    /// Not at all (local memory moves no bytes).
    None,
}

/// One plot of the report.
#[derive(Debug)]
struct Plot {
    workload: String,
    file: String,
    caption: String,
    svg: String,
}

fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Plot sizes in pixels: one panel of the slowdown and bytes plots, one of
/// the three latency panels. Two of the first fit side by side in the
/// page, the latency plot takes a row of its own.
const WIDE_PANEL: (u32, u32) = (600, 440);
const LATENCY_PANEL: (u32, u32) = (410, 400);

fn make_plots(s: &Summary) -> anyhow::Result<Vec<Plot>> {
    let mut plots = Vec::new();
    for w in &s.workloads {
        let stem = file_stem(w);
        let slowdown = panel(
            s,
            w,
            Look {
                title: String::new(),
                y_desc: "slowdown against local (log)".into(),
                y_fmt: fmt_times,
                local_ref: LocalRef::One,
            },
            |p| p.slowdown,
        );
        // Local memory alone is a line at 1: nothing to show.
        if !slowdown.series.is_empty() || slowdown.refs.len() > 1 {
            plots.push(Plot {
                workload: w.clone(),
                file: format!("{stem}-slowdown.svg"),
                caption: "Median slowdown over repeats against all-local memory; \
                          dashed lines do not depend on local memory."
                    .to_string(),
                svg: render_svg(&format!("{w}: slowdown"), &[slowdown], WIDE_PANEL)?,
            });
        }

        let bytes = panel(
            s,
            w,
            Look {
                title: String::new(),
                y_desc: "network bytes per operation (log)".into(),
                y_fmt: fmt_bytes,
                local_ref: LocalRef::None,
            },
            |p| p.bytes_per_op,
        );
        if !bytes.is_empty() {
            plots.push(Plot {
                workload: w.clone(),
                file: format!("{stem}-bytes.svg"),
                caption: "Median bytes moved over the network per operation; \
                          runs that moved nothing or were not measured are not drawn."
                    .to_string(),
                svg: render_svg(
                    &format!("{w}: bytes moved per operation"),
                    &[bytes],
                    WIDE_PANEL,
                )?,
            });
        }

        let has_latency = s
            .points
            .iter()
            .any(|((pw, _, _), p)| pw == w && (p.p50.or(p.p99).or(p.p999)).is_some());
        if has_latency {
            type Pick = fn(&Point) -> Option<f64>;
            let pcts: [(&str, Pick); 3] = [
                ("p50", |p| p.p50),
                ("p99", |p| p.p99),
                ("p99.9", |p| p.p999),
            ];
            let panels: Vec<ChartSpec> = pcts
                .iter()
                .map(|(name, pick)| {
                    panel(
                        s,
                        w,
                        Look {
                            title: name.to_string(),
                            y_desc: format!("{name} latency (log)"),
                            y_fmt: fmt_us,
                            local_ref: LocalRef::Measured,
                        },
                        pick,
                    )
                })
                .collect();
            if panels.iter().any(|p| !p.is_empty()) {
                plots.push(Plot {
                    workload: w.clone(),
                    file: format!("{stem}-latency.svg"),
                    caption: "Per-operation latency percentiles, medians over repeats.".to_string(),
                    svg: render_svg(
                        &format!("{w}: per-operation latency"),
                        &panels,
                        LATENCY_PANEL,
                    )?,
                });
            }
        }
    }
    Ok(plots)
}

// ---------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
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

fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "unknown".to_string();
    }
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h} h {m:02} min {s:02} s")
    } else if m > 0 {
        format!("{m} min {s:02} s")
    } else {
        format!("{secs:.1} s")
    }
}

fn fmt_secs(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.2} s")
    } else {
        fmt_us(v * 1e6)
    }
}

fn opt(v: Option<f64>, f: fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".to_string())
}

const CSS: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;\
color:#222;background:#fff;margin:2em auto;max-width:1240px;padding:0 1em;line-height:1.45}\
h1{font-size:1.7em;margin-bottom:.3em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}\
h3{margin-top:1.4em}\
dl.meta{display:grid;grid-template-columns:max-content auto;gap:.25em 1.2em}\
dl.meta dt{font-weight:600;color:#555}dl.meta dd{margin:0}\
code{font-family:ui-monospace,Menlo,Consolas,monospace;background:#f3f3f3;padding:.1em .3em;border-radius:3px}\
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}\
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}\
td.flat{text-align:center;color:#444}\
tbody tr.first td{border-top:2px solid #999}\
.muted{color:#666}ul.notes li{margin:.2em 0}\
div.plots{display:flex;flex-wrap:wrap;gap:14px}\
figure{margin:0;min-width:0;max-width:100%}figure svg{display:block;max-width:100%;height:auto;border:1px solid #e4e4e4}\
figcaption{color:#555;font-size:.9em;max-width:600px;margin-top:.3em}a{color:#333}";

fn summary_table(h: &mut String, s: &Summary) {
    let ratios = s.all_ratios();
    h.push_str("<table class=\"summary\"><thead><tr><th>workload</th><th>local time</th><th>interface</th>");
    for r in &ratios {
        let _ = write!(h, "<th>{r}% local</th>");
    }
    h.push_str("</tr></thead><tbody>\n");
    let ncols = ratios.len().max(1);
    for w in &s.workloads {
        let ifs: Vec<&String> = s.interfaces[w].iter().filter(|i| *i != LOCAL).collect();
        let local = s
            .local_secs
            .get(w)
            .map(|v| fmt_secs(*v))
            .unwrap_or_else(|| "no local run".to_string());
        let rows = ifs.len().max(1);
        let _ = write!(
            h,
            "<tr class=\"first\"><td rowspan=\"{rows}\">{}</td><td rowspan=\"{rows}\" class=\"num\">{}</td>",
            esc(w),
            esc(&local)
        );
        if ifs.is_empty() {
            let _ = writeln!(
                h,
                "<td class=\"muted\">only local</td><td colspan=\"{ncols}\"></td></tr>"
            );
            continue;
        }
        for (k, i) in ifs.iter().enumerate() {
            if k > 0 {
                h.push_str("<tr>");
            }
            let _ = write!(h, "<td>{}</td>", esc(i));
            if s.has_ratio(i) {
                for r in &ratios {
                    let cell = s
                        .point(w, i, *r)
                        .and_then(|p| p.slowdown)
                        .map(fmt_times)
                        .unwrap_or_default();
                    let _ = write!(h, "<td class=\"num\">{}</td>", esc(&cell));
                }
                if ratios.is_empty() {
                    h.push_str("<td></td>");
                }
            } else {
                let cell = s
                    .flat(w, i)
                    .and_then(|p| p.slowdown)
                    .map(|v| format!("{} (does not depend on local memory)", fmt_times(v)))
                    .unwrap_or_default();
                let _ = write!(
                    h,
                    "<td class=\"flat\" colspan=\"{ncols}\">{}</td>",
                    esc(&cell)
                );
            }
            h.push_str("</tr>\n");
        }
    }
    h.push_str("</tbody></table>\n");
}

/// The best Remora interface (lowest median slowdown) of `workload` at
/// `ratio`, counting the interfaces that have no ratio too.
fn best_remora(s: &Summary, workload: &str, ratio: u32) -> Option<String> {
    let mut best: Option<(f64, String)> = None;
    for i in s.interfaces.get(workload).into_iter().flatten() {
        if i == LOCAL || is_peer(i) {
            continue;
        }
        let (p, label) = if s.has_ratio(i) {
            (s.point(workload, i, ratio), format!("{i} at {ratio}%"))
        } else {
            (s.flat(workload, i), i.clone())
        };
        if let Some(v) = p.and_then(|p| p.slowdown) {
            if best.as_ref().is_none_or(|(b, _)| v < *b) {
                best = Some((v, label));
            }
        }
    }
    best.map(|(v, label)| format!("{label}: {}", fmt_times(v)))
}

fn peers_table(h: &mut String, s: &Summary) {
    let mut rows = String::new();
    for w in &s.workloads {
        let ratios = s.ratios(w);
        let least = ratios.last().copied();
        for i in s.interfaces[w].iter().filter(|i| is_peer(i)) {
            let line: Vec<(Option<u32>, &Point)> = if s.has_ratio(i) {
                s.line(w, i)
                    .into_iter()
                    .map(|(r, p)| (Some(r), p))
                    .collect()
            } else {
                s.flat(w, i).map(|p| (None, p)).into_iter().collect()
            };
            for (ratio, p) in line {
                let best = ratio
                    .or(least)
                    .and_then(|r| best_remora(s, w, r))
                    .unwrap_or_else(|| "–".to_string());
                let _ = writeln!(
                    rows,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
                     <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                     <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    esc(w),
                    esc(i),
                    esc(&ratio.map(|r| format!("{r}%")).unwrap_or_else(|| "–".into())),
                    esc(&opt(p.secs, fmt_secs)),
                    esc(&opt(p.slowdown, fmt_times)),
                    esc(&opt(p.ops_per_sec, fmt_rate)),
                    esc(&opt(p.p50, fmt_us)),
                    esc(&opt(p.p99, fmt_us)),
                    esc(&opt(p.p999, fmt_us)),
                    esc(&best),
                );
            }
        }
    }
    if rows.is_empty() {
        h.push_str("<p class=\"muted\">No peer ran successfully.</p>\n");
        return;
    }
    h.push_str(
        "<p>Medians over repeats. The last column is the Remora interface with the lowest \
         slowdown at the same local memory (for peers that hold all the data themselves: \
         at the least local memory measured).</p>\n<table class=\"peers\"><thead><tr>\
         <th>workload</th><th>peer</th><th>local memory</th><th>time</th><th>slowdown</th>\
         <th>throughput</th><th>p50</th><th>p99</th><th>p99.9</th><th>best Remora</th>\
         </tr></thead><tbody>\n",
    );
    h.push_str(&rows);
    h.push_str("</tbody></table>\n");
}

fn failed_table(h: &mut String, records: &[RunRecord]) {
    let mut bad: Vec<&RunRecord> = records.iter().filter(|r| !r.ok()).collect();
    if bad.is_empty() {
        h.push_str("<p class=\"muted\">None: every run finished with a checked result.</p>\n");
        return;
    }
    bad.sort_by(|a, b| {
        (
            workload_rank(&a.workload),
            interface_rank(&a.interface),
            b.ratio,
            a.repeat,
        )
            .cmp(&(
                workload_rank(&b.workload),
                interface_rank(&b.interface),
                a.ratio,
                b.repeat,
            ))
    });
    h.push_str(
        "<table class=\"failed\"><thead><tr><th>workload</th><th>interface</th>\
         <th>local memory</th><th>repeat</th><th>status</th></tr></thead><tbody>\n",
    );
    for r in bad {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}%</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&r.workload),
            esc(&r.interface),
            r.ratio,
            r.repeat,
            esc(&r.status)
        );
    }
    h.push_str("</tbody></table>\n");
}

/// Strips anything before the `<svg` tag (an XML declaration is not
/// allowed inside HTML).
fn inline_svg(svg: &str) -> &str {
    svg.find("<svg").map(|i| &svg[i..]).unwrap_or(svg)
}

/// Writes the SVG plots to `out/plots/` and the self-contained report to
/// `out/index.html` (plots inlined, styles embedded, nothing fetched), and
/// returns the path of the HTML file. Records whose status is not "ok" are
/// listed, not plotted; every figure is a median over repeats.
pub fn render(records: &[RunRecord], meta: &ReportMeta, out: &Path) -> anyhow::Result<PathBuf> {
    let plots_dir = out.join("plots");
    fs::create_dir_all(&plots_dir).with_context(|| format!("creating {}", plots_dir.display()))?;
    let s = Summary::new(records);
    let plots = make_plots(&s)?;
    for p in &plots {
        let path = plots_dir.join(&p.file);
        fs::write(&path, &p.svg).with_context(|| format!("writing {}", path.display()))?;
    }

    let mut h = String::new();
    h.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Remora benchmark report</title>\n<style>",
    );
    h.push_str(CSS);
    h.push_str("</style></head><body>\n<h1>Remora benchmark report</h1>\n<dl class=\"meta\">\n");
    let ok = records.iter().filter(|r| r.ok()).count();
    let items = [
        ("Command", format!("<code>{}</code>", esc(&meta.command))),
        ("Machine", esc(&meta.machine)),
        ("Started", esc(&meta.started)),
        ("Duration", esc(&fmt_duration(meta.duration_secs))),
        (
            "Runs",
            format!(
                "{} recorded, {} ok, {} failed or skipped",
                records.len(),
                ok,
                records.len() - ok
            ),
        ),
    ];
    for (k, v) in items {
        let _ = writeln!(h, "<dt>{k}</dt><dd>{v}</dd>");
    }
    h.push_str("</dl>\n");
    if !meta.notes.is_empty() {
        h.push_str("<h2>Notes</h2>\n<ul class=\"notes\">\n");
        for n in &meta.notes {
            let _ = writeln!(h, "<li>{}</li>", esc(n));
        }
        h.push_str("</ul>\n");
    }

    h.push_str(
        "<h2>Summary</h2>\n<p>Median slowdown over repeats against all-local memory \
         (local time is the median all-local time of the workload), by local memory as a \
         percentage of the workload's footprint.</p>\n",
    );
    if s.workloads.is_empty() {
        h.push_str("<p class=\"muted\">No run finished successfully.</p>\n");
    } else {
        summary_table(&mut h, &s);
    }

    h.push_str("<h2>Peers</h2>\n");
    peers_table(&mut h, &s);

    h.push_str("<h2>Plots</h2>\n");
    if plots.is_empty() {
        h.push_str("<p class=\"muted\">Nothing to plot.</p>\n");
    }
    let mut current: Option<&str> = None;
    for p in &plots {
        if current != Some(p.workload.as_str()) {
            if current.is_some() {
                h.push_str("</div>\n");
            }
            current = Some(&p.workload);
            let _ = writeln!(h, "<h3>{}</h3>\n<div class=\"plots\">", esc(&p.workload));
        }
        let href = format!("plots/{}", p.file);
        let _ = writeln!(
            h,
            "<figure>\n{}\n<figcaption>{} (<a href=\"{}\">{}</a>)</figcaption></figure>",
            inline_svg(&p.svg).trim_end(),
            esc(&p.caption),
            esc(&href),
            esc(&href)
        );
    }
    if current.is_some() {
        h.push_str("</div>\n");
    }

    h.push_str("<h2>Failed or skipped runs</h2>\n");
    failed_table(&mut h, records);
    h.push_str("</body></html>\n");

    let html = out.join("index.html");
    fs::write(&html, h).with_context(|| format!("writing {}", html.display()))?;
    Ok(html)
}

// ---------------------------------------------------------------------------
// Machine
// ---------------------------------------------------------------------------

/// One line about the machine: CPU model and count of logical CPUs (from
/// `/proc/cpuinfo`), memory (`MemTotal` in `/proc/meminfo`) and kernel
/// release (`/proc/sys/kernel/osrelease`). Parts that cannot be read are
/// given as unknown; never panics.
pub fn machine_description() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();

    let field = |line: &str, key: &str| -> Option<String> {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    };
    let model = cpuinfo
        .lines()
        .find_map(|l| field(l, "model name").or_else(|| field(l, "Model")))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "unknown CPU".to_string());
    let mut cpus = cpuinfo
        .lines()
        .filter(|l| field(l, "processor").is_some())
        .count();
    if cpus == 0 {
        cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
    }
    let cpus = match cpus {
        0 => "unknown CPU count".to_string(),
        1 => "1 CPU".to_string(),
        n => format!("{n} CPUs"),
    };
    let mem = meminfo
        .lines()
        .find_map(|l| field(l, "MemTotal"))
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB memory", kb as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "unknown memory".to_string());
    let kernel = match kernel.trim() {
        "" => "unknown kernel".to_string(),
        k => format!("Linux {k}"),
    };
    format!("{model}, {cpus}, {mem}, {kernel}")
}

// ---------------------------------------------------------------------------
// Looking at the report through a browser
// ---------------------------------------------------------------------------

/// Finds a Chromium-family browser: `chromium`, `chromium-headless-shell`,
/// `chromium-browser` or `google-chrome` on `PATH`, else
/// `/usr/lib/chromium/chromium`.
pub fn find_chromium() -> Option<PathBuf> {
    const NAMES: [&str; 4] = [
        "chromium",
        "chromium-headless-shell",
        "chromium-browser",
        "google-chrome",
    ];
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in NAMES {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if is_executable(&p) {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from("/usr/lib/chromium/chromium");
    is_executable(&p).then_some(p)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A `file://` URL for an absolute path, percent-encoding what a URL path
/// cannot hold.
fn file_url(path: &Path) -> String {
    let mut url = String::from("file://");
    for b in path.as_os_str().as_encoded_bytes() {
        match *b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                url.push(*b as char)
            }
            b => {
                let _ = write!(url, "%{b:02X}");
            }
        }
    }
    url
}

/// Takes a screenshot of `html` into `png` with headless Chromium, in a
/// 1280×4000 window, with a throwaway profile. Fails with Chromium's own
/// output if it is not found, fails, gives no file, or takes longer than
/// [`SCREENSHOT_TIMEOUT`].
pub fn screenshot(html: &Path, png: &Path) -> anyhow::Result<()> {
    let chrome = find_chromium().ok_or_else(|| {
        anyhow!(
            "no Chromium found (looked for chromium, chromium-headless-shell, \
             chromium-browser, google-chrome on PATH and /usr/lib/chromium/chromium)"
        )
    })?;
    let html = html
        .canonicalize()
        .with_context(|| format!("finding {}", html.display()))?;
    let png = if png.is_absolute() {
        png.to_path_buf()
    } else {
        std::env::current_dir()?.join(png)
    };
    let _ = fs::remove_file(&png);

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let profile =
        std::env::temp_dir().join(format!("remora-chromium-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&profile).with_context(|| format!("creating {}", profile.display()))?;
    let log_path = profile.join("chromium.log");
    let result = (|| -> anyhow::Result<()> {
        let log = fs::File::create(&log_path)?;
        let mut child = Command::new(&chrome)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--no-first-run",
                "--no-default-browser-check",
                "--window-size=1280,4000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--screenshot={}", png.display()))
            .arg(file_url(&html))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", chrome.display()))?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() > SCREENSHOT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} took longer than {:?} to take a screenshot of {}; its output:\n{}",
                    chrome.display(),
                    SCREENSHOT_TIMEOUT,
                    html.display(),
                    log_tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !status.success() || !png.is_file() {
            bail!(
                "{} gave no screenshot of {} ({status}); its output:\n{}",
                chrome.display(),
                html.display(),
                log_tail(&log_path)
            );
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&profile);
    result
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Decodes a PNG and counts the pixels whose colour is within
/// [`PIXEL_TOLERANCE`] of a [`PALETTE`] colour: roughly the area of plot
/// lines, markers and legend swatches. A page without plots gives about 0.
pub fn plot_pixel_count(png: &Path) -> anyhow::Result<usize> {
    let file = fs::File::open(png).with_context(|| format!("opening {}", png.display()))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder
        .read_info()
        .with_context(|| format!("decoding {}", png.display()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| anyhow!("{}: image too large to decode", png.display()))?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("decoding {}", png.display()))?;
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        // Grey pixels can never match a palette colour.
        png::ColorType::Grayscale | png::ColorType::GrayscaleAlpha => return Ok(0),
        other => bail!("{}: unexpected colour type {other:?}", png.display()),
    };
    let close = |a: u8, b: u8| a.abs_diff(b) <= PIXEL_TOLERANCE;
    let count = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .filter(|px| {
            PALETTE
                .iter()
                .any(|c| close(px[0], c[0]) && close(px[1], c[1]) && close(px[2], c[2]))
        })
        .count();
    Ok(count)
}
