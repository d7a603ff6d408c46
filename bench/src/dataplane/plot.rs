//! The PNG: one panel per (path, metric), a bar per setup at its median with a whisker
//! from the slowest to the fastest round.
//!
//! plotters with only its bitmap backend; text is drawn with ab_glyph from a TTF file of
//! Debian's fonts-dejavu-core, read at run time, so no font library is linked in.

use std::path::Path;

use plotters::{
    coord::ranged1d::SegmentValue,
    prelude::*,
    style::{FontStyle, register_font},
};

pub struct Bar {
    pub label: &'static str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub struct Panel {
    pub title: String,
    pub unit: &'static str,
    pub bars: Vec<Bar>,
}

const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const COLORS: [RGBColor; 3] = [
    RGBColor(150, 150, 150),
    RGBColor(230, 140, 40),
    RGBColor(40, 110, 200),
];

fn load_font() -> Result<(), String> {
    let bytes = FONTS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or("no DejaVuSans.ttf (apt-get install fonts-dejavu-core)")?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| "unusable font".into())
}

fn label(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

pub fn draw(path: &Path, title: &str, panels: &[Panel]) -> Result<(), String> {
    if panels.is_empty() {
        return Err("nothing measured".into());
    }
    load_font()?;
    let cols = panels.len().min(3);
    let rows = panels.len().div_ceil(cols);
    let size = (
        u32::try_from(cols).unwrap_or(3) * 480,
        u32::try_from(rows).unwrap_or(2) * 380 + 50,
    );
    let root = BitMapBackend::new(path, size).into_drawing_area();
    let e = |x: &dyn std::fmt::Display| x.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(|x| e(&x))?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(panels) {
        let top = panel.bars.iter().map(|b| b.max).fold(0.0, f64::max) * 1.18;
        let top = if top > 0.0 { top } else { 1.0 };
        let n = i32::try_from(panel.bars.len()).unwrap_or(3);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)
            .map_err(|x| e(&x))?;
        let labels: Vec<&str> = panel.bars.iter().map(|b| b.label).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(panel.unit)
            .y_label_formatter(&|v| label(*v))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(*i)
                    .ok()
                    .and_then(|i| labels.get(i))
                    .map_or(String::new(), |s| (*s).to_owned()),
                SegmentValue::Last => String::new(),
            })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, b) in (0..n).zip(&panel.bars) {
            let color = COLORS[usize::try_from(i).unwrap_or(0) % COLORS.len()];
            let mut rect = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), b.median),
                ],
                color.filled(),
            );
            rect.set_margin(0, 0, 22, 22);
            chart.draw_series([rect]).map_err(|x| e(&x))?;
            let c = || SegmentValue::CenterOf(i);
            chart
                .draw_series([PathElement::new(
                    vec![(c(), b.min), (c(), b.max)],
                    BLACK.stroke_width(2),
                )])
                .map_err(|x| e(&x))?;
            chart
                .draw_series([Text::new(
                    label(b.median),
                    (c(), b.max + top * 0.02),
                    ("sans-serif", 14),
                )])
                .map_err(|x| e(&x))?;
        }
    }
    root.present().map_err(|x| e(&x))
}

/// One line of a [`LinePanel`]: a setup's medians at each x, with min-max whiskers.
pub struct Line {
    pub label: String,
    /// (median, min, max) per x; `None` where nothing was measured.
    pub points: Vec<Option<(f64, f64, f64)>>,
}

pub struct LinePanel {
    pub title: String,
    pub unit: &'static str,
    pub xs: Vec<String>,
    pub lines: Vec<Line>,
}

/// Panels of lines over categorical x values (the rule counts of the policy sweep).
pub fn draw_lines(path: &Path, title: &str, panels: &[LinePanel]) -> Result<(), String> {
    if panels.is_empty() {
        return Err("nothing measured".into());
    }
    load_font()?;
    let cols = panels.len().min(2);
    let rows = panels.len().div_ceil(cols);
    let size = (
        u32::try_from(cols).unwrap_or(2) * 560,
        u32::try_from(rows).unwrap_or(2) * 400 + 50,
    );
    let root = BitMapBackend::new(path, size).into_drawing_area();
    let e = |x: &dyn std::fmt::Display| x.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(|x| e(&x))?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(panels) {
        let top = panel
            .lines
            .iter()
            .flat_map(|l| l.points.iter().flatten().map(|p| p.2))
            .fold(0.0, f64::max)
            * 1.15;
        let top = if top > 0.0 { top } else { 1.0 };
        let n = i32::try_from(panel.xs.len()).unwrap_or(1);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..f64::from(n) - 0.5, 0.0..top)
            .map_err(|x| e(&x))?;
        let xs = panel.xs.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(xs.len())
            .y_desc(panel.unit)
            .x_desc("rules selecting each pod")
            .y_label_formatter(&|v| label(*v))
            .x_label_formatter(&|v| {
                let i = v.round();
                if (v - i).abs() > 0.01 || i < 0.0 {
                    return String::new();
                }
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a small index"
                )]
                xs.get(i as usize).cloned().unwrap_or_default()
            })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|x| e(&x))?;
        for (li, line) in panel.lines.iter().enumerate() {
            let color = COLORS[li % COLORS.len()];
            let pts: Vec<(f64, f64)> = line
                .points
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    p.map(|(m, _, _)| (f64::from(u32::try_from(i).unwrap_or(0)), m))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(line.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|x| e(&x))?;
            for (i, p) in line.points.iter().enumerate() {
                let Some((_, lo, hi)) = *p else { continue };
                let x = f64::from(u32::try_from(i).unwrap_or(0));
                chart
                    .draw_series([PathElement::new(
                        vec![(x, lo), (x, hi)],
                        color.stroke_width(1),
                    )])
                    .map_err(|x| e(&x))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}
