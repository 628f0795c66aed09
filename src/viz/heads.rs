//! `tinygpt heads`' pictures: the head scores as a text table (largest ablation effect first)
//! and as a grid image, one panel per score, layers down and heads across.

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{draw_err, ensure_font, viridis, ImageFormat};
use crate::circuits::scores::{HeadReport, HeadScore};
use crate::error::Result;

/// The table `tinygpt heads` prints.
pub fn to_table(r: &HeadReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "loss {:.4} on {} {} tokens; induction test: {} random sequences of {} tokens written \
         twice, loss {:.3} on the first copy, {:.3} on the second",
        r.loss,
        r.tokens,
        r.split,
        r.induction.sequences,
        r.induction.length,
        r.induction.first_copy_loss,
        r.induction.second_copy_loss
    );
    let ablation = format!("{:?} ablation", r.ablation).to_lowercase();
    let _ = writeln!(
        s,
        "\nhead   {ablation:>14}  prev-token  current  induction  2nd copy ablated  sink   entropy"
    );
    for h in r.by_ablation() {
        let _ = writeln!(
            s,
            "{:<6} {:>+14.4}  {:>10.3}  {:>7.3}  {:>9.3}  {:>16.3}  {:>5.3}  {:>7.3}",
            format!("{}.{}", h.layer, h.head),
            h.ablation,
            h.prev_token,
            h.current_token,
            h.induction,
            h.second_copy_ablated,
            h.sink,
            h.entropy
        );
    }
    if let Some(a) = &r.ablated {
        let _ = writeln!(
            s,
            "\nwith heads {} ablated together: loss {:.4}; induction test loss {:.3} on the first \
             copy, {:.3} on the second",
            a.heads.join(", "),
            a.loss,
            a.first_copy_loss,
            a.second_copy_loss
        );
    }
    let b = &r.random_init;
    let _ = writeln!(
        s,
        "\nrandomly initialised model of this shape, best head: prev-token {:.3}, current {:.3}, \
         induction {:.3}, sink {:.3}",
        b.prev_token, b.current_token, b.induction, b.sink
    );
    s
}

/// One panel: its title, each head's value, and the value that draws brightest.
struct Panel {
    title: &'static str,
    value: fn(&HeadScore) -> f64,
    top: f64,
}

/// The panels in order: each score, drawn brightest at 1 for the attention scores (fractions of
/// a row) and at the largest head's value for the others.
fn panels(r: &HeadReport) -> Vec<Panel> {
    type Score = (&'static str, fn(&HeadScore) -> f64, bool);
    const SCORES: [Score; 7] = [
        ("ablation: loss increase", |h| h.ablation, false),
        ("previous-token", |h| h.prev_token, true),
        ("current-token", |h| h.current_token, true),
        ("induction", |h| h.induction, true),
        ("2nd-copy loss, ablated", |h| h.second_copy_ablated, false),
        ("attention to first token", |h| h.sink, true),
        ("entropy (nats)", |h| h.entropy, false),
    ];
    SCORES
        .iter()
        .map(|&(title, value, fraction)| Panel {
            title,
            value,
            top: match fraction {
                true => 1.0,
                false => r.heads.iter().map(value).fold(1e-9, f64::max),
            },
        })
        .collect()
}

const CELL: i32 = 54;
const PAD: i32 = 40;

fn grid_dims(r: &HeadReport) -> (i32, i32) {
    let layers = r.heads.iter().map(|h| h.layer + 1).max().unwrap_or(1) as i32;
    let heads = r.heads.iter().map(|h| h.head + 1).max().unwrap_or(1) as i32;
    (layers, heads)
}

/// Panels across a row of the image.
const ACROSS: i32 = 4;

/// Image size `(width, height)`: four panels across, two down.
pub fn grid_size(r: &HeadReport) -> (u32, u32) {
    let (layers, heads) = grid_dims(r);
    let (pw, ph) = (PAD + heads * CELL + PAD / 2, PAD + layers * CELL + PAD);
    ((ACROSS * pw) as u32, (2 * ph) as u32)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    r: &HeadReport,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (layers, heads) = grid_dims(r);
    let (pw, ph) = (PAD + heads * CELL + PAD / 2, PAD + layers * CELL + PAD);
    let text = |size: u32| ("sans-serif", size).into_font().color(&BLACK);
    for (n, p) in panels(r).iter().enumerate() {
        let (px, py) = ((n as i32 % ACROSS) * pw, (n as i32 / ACROSS) * ph);
        let (gx, gy) = (px + PAD, py + PAD);
        root.draw(&Text::new(
            p.title,
            (gx + heads * CELL / 2, py + 8),
            text(14).pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
        for h in &r.heads {
            let v = (p.value)(h);
            let shade = (v / p.top).clamp(0.0, 1.0) as f32;
            let (x0, y0) = (gx + h.head as i32 * CELL, gy + h.layer as i32 * CELL);
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + CELL, y0 + CELL)],
                viridis(shade).filled(),
            ))?;
            let ink = if shade > 0.6 { BLACK } else { WHITE };
            root.draw(&Text::new(
                format!("{v:.2}"),
                (x0 + CELL / 2, y0 + CELL / 2),
                ("sans-serif", 13)
                    .into_font()
                    .color(&ink)
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            ))?;
        }
        for l in 0..layers {
            root.draw(&Text::new(
                format!("L{l}"),
                (gx - 6, gy + l * CELL + CELL / 2),
                text(12).pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
        }
        for h in 0..heads {
            root.draw(&Text::new(
                format!("H{h}"),
                (gx + h * CELL + CELL / 2, gy + layers * CELL + 6),
                text(12).pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
        }
    }
    Ok(())
}

/// Draws the score grids of `r` to `path`; returns the image size.
pub fn write_grid(r: &HeadReport, path: &Path, format: ImageFormat) -> Result<(u32, u32)> {
    ensure_font();
    let size = grid_size(r);
    match format {
        ImageFormat::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw(&root, r).map_err(|e| draw_err(path, e))?;
            root.present().map_err(|e| draw_err(path, e))?;
        }
        ImageFormat::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw(&root, r).map_err(|e| draw_err(path, e))?;
            root.present().map_err(|e| draw_err(path, e))?;
        }
    }
    Ok(size)
}
