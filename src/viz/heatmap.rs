//! Attention heatmaps as PNG or SVG: one panel per layer/head (a grid for several), tokens
//! along both axes (rows = queries, columns = keys), and a colour scale.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::maps::{visible, AttentionMaps};
use super::{draw_err, ensure_font, viridis, ImageFormat};
use crate::error::Result;

const LEFT: u32 = 90;
const TOP: u32 = 30;
const BOTTOM: u32 = 90;
const RIGHT: u32 = 14;
const BAR: u32 = 90;

/// Pixel size of one cell for `t` tokens.
fn cell(t: usize) -> u32 {
    (480 / t.max(1) as u32).clamp(8, 32)
}

/// Image size `(width, height)` for `t` tokens in `rows` × `cols` panels.
pub fn heatmap_size(t: usize, rows: usize, cols: usize) -> (u32, u32) {
    let grid = cell(t) * t as u32;
    (
        cols as u32 * (LEFT + grid + RIGHT) + BAR,
        rows as u32 * (TOP + grid + BOTTOM),
    )
}

fn label(s: &str, n: usize) -> String {
    let v = visible(s);
    if v.chars().count() > n {
        v.chars().take(n - 1).chain(std::iter::once('…')).collect()
    } else {
        v
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    maps: &AttentionMaps,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let t = maps.tokens.len();
    let c = cell(t) as i32;
    let grid = c * t as i32;
    let font = (c - 2).clamp(8, 14) as u32;
    let cols = maps.layers.first().map_or(1, |l| l.heads.len()) as i32;
    let (panel_w, panel_h) = (
        LEFT as i32 + grid + RIGHT as i32,
        TOP as i32 + grid + BOTTOM as i32,
    );
    let text = |size: u32| ("sans-serif", size).into_font().color(&BLACK);
    for (n, (layer, head, m)) in maps.panels().enumerate() {
        let (px, py) = ((n as i32 % cols) * panel_w, (n as i32 / cols) * panel_h);
        let (gx, gy) = (px + LEFT as i32, py + TOP as i32);
        root.draw(&Text::new(
            format!("layer {layer}, head {head}"),
            (gx + grid / 2, py + 8),
            text(14).pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
        for (i, row) in m.iter().enumerate() {
            for (j, &w) in row.iter().enumerate() {
                let (x0, y0) = (gx + j as i32 * c, gy + i as i32 * c);
                let color = if j > i {
                    RGBColor(235, 235, 235)
                } else {
                    viridis(w)
                };
                root.draw(&Rectangle::new(
                    [(x0, y0), (x0 + c, y0 + c)],
                    color.filled(),
                ))?;
            }
        }
        root.draw(&Rectangle::new(
            [(gx, gy), (gx + grid, gy + grid)],
            BLACK.stroke_width(1),
        ))?;
        for (i, tok) in maps.tokens.iter().enumerate() {
            let mid = i as i32 * c + c / 2;
            root.draw(&Text::new(
                label(tok, 10),
                (gx - 4, gy + mid),
                text(font).pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            root.draw(&Text::new(
                label(tok, 10),
                (gx + mid, gy + grid + 4),
                text(font)
                    .transform(FontTransform::Rotate90)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        root.draw(&Text::new(
            "query ↓  key →",
            (px + 4, py + 8),
            text(11).pos(Pos::new(HPos::Left, VPos::Top)),
        ))?;
    }
    // Colour scale, right of the panels.
    let (w, _) = root.dim_in_pixel();
    let bx = w as i32 - BAR as i32 + 20;
    let (by, bh) = (TOP as i32, grid.max(100));
    for k in 0..bh {
        let v = 1.0 - k as f32 / (bh - 1).max(1) as f32;
        root.draw(&Rectangle::new(
            [(bx, by + k), (bx + 18, by + k + 1)],
            viridis(v).filled(),
        ))?;
    }
    root.draw(&Rectangle::new(
        [(bx, by), (bx + 18, by + bh)],
        BLACK.stroke_width(1),
    ))?;
    for (v, y) in [(1.0, by), (0.5, by + bh / 2), (0.0, by + bh)] {
        root.draw(&Text::new(
            format!("{v:.1}"),
            (bx + 22, y),
            text(12).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

/// Draws the heatmaps of `maps` to `path`; returns the image size.
pub fn write_heatmap(maps: &AttentionMaps, path: &Path, format: ImageFormat) -> Result<(u32, u32)> {
    ensure_font();
    let rows = maps.layers.len();
    let cols = maps.layers.first().map_or(1, |l| l.heads.len());
    let size = heatmap_size(maps.tokens.len(), rows, cols);
    match format {
        ImageFormat::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw(&root, maps).map_err(|e| draw_err(path, e))?;
            root.present().map_err(|e| draw_err(path, e))?;
        }
        ImageFormat::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw(&root, maps).map_err(|e| draw_err(path, e))?;
            root.present().map_err(|e| draw_err(path, e))?;
        }
    }
    Ok(size)
}
