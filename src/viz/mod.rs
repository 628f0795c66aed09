//! Pictures of what was trained: attention maps (tables, graphs, heatmaps) and loss curves.
//! Images are drawn with `plotters` and an embedded DejaVu font, so no external program or
//! system font is needed.

pub mod dot;
pub mod heads;
pub mod heatmap;
pub mod loss;
pub mod maps;
pub mod table;

use std::path::Path;
use std::sync::Once;

use crate::error::{Error, Result};

/// Image formats tinygpt writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Svg,
}

impl ImageFormat {
    /// The format a file name asks for (`.png` or `.svg`).
    pub fn from_path(path: &Path) -> Result<ImageFormat> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => Ok(ImageFormat::Png),
            Some("svg") => Ok(ImageFormat::Svg),
            _ => Err(Error::Usage(format!(
                "{}: unknown image type; use a file name ending in .png or .svg",
                path.display()
            ))),
        }
    }
}

static FONT: Once = Once::new();

/// Registers the embedded font under the family name `sans-serif`.
pub(crate) fn ensure_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// The viridis colour map at `t` ∈ [0, 1] (dark purple → yellow), interpolated between five
/// of its colours.
pub fn viridis(t: f32) -> plotters::style::RGBColor {
    const STOPS: [(f32, f32, f32); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let x = t.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f32;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: f32, q: f32| (p + (q - p) * f).round() as u8;
    plotters::style::RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Usage(format!("drawing {}: {e}", path.display()))
}
