//! Attention as a directed graph in Graphviz DOT: one node per token position, an edge
//! query → key for every weight at or above a threshold (self-loops included), labelled with
//! the weight and drawn thicker the larger it is.

use std::fmt::Write as _;

use super::maps::{visible, AttentionMaps};

/// Escapes text for a double-quoted DOT string.
pub fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// One `digraph` per shown layer/head, nodes left to right in token order.
pub fn to_dot(maps: &AttentionMaps, threshold: f32) -> String {
    let mut out = String::new();
    for (layer, head, m) in maps.panels() {
        let _ = writeln!(out, "digraph \"layer{layer}_head{head}\" {{");
        let _ = writeln!(
            out,
            "  label=\"layer {layer}, head {head}: edge query → key where weight ≥ {threshold}\";"
        );
        let _ = writeln!(out, "  labelloc=t;");
        let _ = writeln!(out, "  rankdir=LR;");
        let _ = writeln!(out, "  edge [fontsize=10, arrowsize=0.6];");
        let _ = writeln!(out, "  node [shape=box, fontname=\"monospace\"];");
        for (i, tok) in maps.tokens.iter().enumerate() {
            let label = dot_escape(&format!("{i}: {}", visible(tok)));
            let _ = writeln!(out, "  t{i} [label=\"{label}\"];");
        }
        // An invisible chain keeps the tokens in one row, in order; attention edges do not move
        // them (constraint=false).
        let chain: Vec<String> = (0..maps.tokens.len()).map(|i| format!("t{i}")).collect();
        if chain.len() > 1 {
            let _ = writeln!(out, "  {} [style=invis, weight=100];", chain.join(" -> "));
        }
        for (i, row) in m.iter().enumerate() {
            for (j, &w) in row.iter().enumerate().take(i + 1) {
                if w >= threshold {
                    let _ = writeln!(
                        out,
                        "  t{i} -> t{j} [label=\"{w:.2}\", penwidth={:.2}, constraint=false];",
                        0.5 + 5.0 * w
                    );
                }
            }
        }
        let _ = writeln!(out, "}}");
    }
    out
}
