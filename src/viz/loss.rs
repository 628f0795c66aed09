//! Loss curves from a run's `metrics.csv`: train and val loss against step (and tokens seen),
//! with the best val point marked.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{draw_err, ensure_font, ImageFormat};
use crate::error::{Error, Result};

/// The rows of `metrics.csv` that matter for plotting.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// (step, train loss) for every step.
    pub train: Vec<(f64, f64)>,
    /// (step, val loss) at every evaluation.
    pub val: Vec<(f64, f64)>,
}

impl Curves {
    /// Parses `metrics.csv` text (`step,train_loss,val_loss,…`).
    pub fn parse(text: &str, path: &Path) -> Result<Curves> {
        let header = text.lines().next().unwrap_or_default();
        if !header.starts_with("step,train_loss,val_loss") {
            return Err(Error::Usage(format!(
                "{} is not a tinygpt metrics.csv (its header is {header:?})",
                path.display()
            )));
        }
        let mut c = Curves::default();
        // A last line without its newline is a row still being written: not read yet.
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let lines = text[..complete].lines().skip(1);
        for (n, line) in lines.enumerate() {
            let f: Vec<&str> = line.split(',').collect();
            let num = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
            let step = num(0).ok_or_else(|| {
                Error::Usage(format!("{} line {}: no step number", path.display(), n + 2))
            })?;
            if let Some(t) = num(1) {
                c.train.push((step, t));
            }
            if let Some(v) = num(2) {
                c.val.push((step, v));
            }
        }
        if c.train.is_empty() {
            return Err(Error::Usage(format!(
                "{} has no rows yet; train first",
                path.display()
            )));
        }
        Ok(c)
    }

    /// The lowest val loss and its step.
    pub fn best_val(&self) -> Option<(f64, f64)> {
        self.val.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    c: &Curves,
    tokens_per_step: Option<f64>,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let max_step = c.train.iter().map(|p| p.0).fold(1.0, f64::max);
    let all = c.train.iter().chain(&c.val).map(|p| p.1);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let pad = ((hi - lo) * 0.05).max(0.01);
    let mut chart = ChartBuilder::on(root)
        .caption("loss", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .top_x_label_area_size(if tokens_per_step.is_some() { 40 } else { 0 })
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))?
        .set_secondary_coord(
            0.0..max_step * tokens_per_step.unwrap_or(1.0),
            (lo - pad)..(hi + pad),
        );
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("cross-entropy loss")
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    if tokens_per_step.is_some() {
        chart
            .configure_secondary_axes()
            .x_desc("tokens seen")
            .x_label_formatter(&|v| format!("{:.1}M", v / 1e6))
            .draw()?;
    }
    chart
        .draw_series(LineSeries::new(
            c.train.iter().copied(),
            RGBColor(120, 160, 220).stroke_width(1),
        ))?
        .label("train (per step)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(120, 160, 220)));
    chart
        .draw_series(LineSeries::new(
            c.val.iter().copied(),
            RGBColor(230, 120, 20).stroke_width(2),
        ))?
        .label("val")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(230, 120, 20)));
    chart.draw_series(
        c.val
            .iter()
            .map(|&p| Circle::new(p, 3, RGBColor(230, 120, 20).filled())),
    )?;
    if let Some((s, v)) = c.best_val() {
        chart.draw_series(std::iter::once(Circle::new((s, v), 7, RED.stroke_width(2))))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("best val {v:.4} @ {s}"),
            (s, v - pad * 0.4),
            ("sans-serif", 14)
                .into_font()
                .color(&RED)
                .pos(Pos::new(HPos::Right, VPos::Top)),
        )))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}

/// Draws `curves` to `path` (800×500).
pub fn write_loss_plot(
    c: &Curves,
    tokens_per_step: Option<f64>,
    path: &Path,
    format: ImageFormat,
) -> Result<()> {
    ensure_font();
    let size = (800, 500);
    match format {
        ImageFormat::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw(&root, c, tokens_per_step).map_err(|e| draw_err(path, e))?;
            root.present().map_err(|e| draw_err(path, e))?;
        }
        ImageFormat::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw(&root, c, tokens_per_step).map_err(|e| draw_err(path, e))?;
            root.present().map_err(|e| draw_err(path, e))?;
        }
    }
    Ok(())
}
