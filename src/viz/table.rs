//! Attention maps as text tables: rows are the attending (query) tokens, columns the attended
//! (key) tokens, values to two decimals, optionally shaded for a colour terminal. Wide maps
//! are wrapped into column blocks that fit the terminal.

use std::fmt::Write as _;

use super::maps::{visible, AttentionMaps};

/// Cuts `s` to at most `n` characters, marking the cut with `…`.
fn fit(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// A background colour for weight `w` on a 256-colour terminal (dark blue → bright yellow).
fn shade(w: f32) -> u8 {
    const RAMP: [u8; 10] = [17, 18, 19, 25, 31, 37, 71, 107, 143, 227];
    RAMP[((w.clamp(0.0, 1.0) * 9.0).round()) as usize]
}

/// The tables of every shown layer/head, at most `width` characters wide.
pub fn to_table(maps: &AttentionMaps, width: usize, color: bool) -> String {
    const LABEL: usize = 12;
    const CELL: usize = 6;
    let t = maps.tokens.len();
    let per_block = ((width.saturating_sub(LABEL)) / CELL).max(1);
    let labels: Vec<String> = maps.tokens.iter().map(|s| visible(s)).collect();
    let mut out = String::new();
    for (layer, head, m) in maps.panels() {
        let _ = writeln!(
            out,
            "layer {layer}, head {head} (row = query token, column = key token)"
        );
        for start in (0..t).step_by(per_block) {
            let end = (start + per_block).min(t);
            if t > per_block {
                let _ = writeln!(out, "columns {start}..{}", end - 1);
            }
            let _ = write!(out, "{:>LABEL$}", "");
            for l in &labels[start..end] {
                let _ = write!(out, "{:>CELL$}", fit(l, CELL - 1));
            }
            out.push('\n');
            for (i, row) in m.iter().enumerate() {
                let _ = write!(out, "{:>3} {:>8}", i, fit(&labels[i], 8));
                for (j, &w) in row.iter().enumerate().take(end).skip(start) {
                    if j > i {
                        let _ = write!(out, "{:>CELL$}", "·");
                    } else if color {
                        let fg = if w > 0.6 { 16 } else { 231 };
                        let _ = write!(out, " \x1b[48;5;{};38;5;{fg}m{w:>5.2}\x1b[0m", shade(w));
                    } else {
                        let _ = write!(out, "{w:>CELL$.2}");
                    }
                }
                out.push('\n');
            }
        }
        out.push('\n');
    }
    out
}
