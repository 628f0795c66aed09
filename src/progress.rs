//! How a long job reports: an indicatif bar on a terminal, plain lines when stdout is a pipe or
//! a file, nothing when asked to be quiet.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A live bar (stdout is a terminal).
    Bar,
    /// One line now and then.
    Lines,
    /// Nothing.
    Quiet,
}

impl ProgressMode {
    /// [`ProgressMode::detect`] for one of `ranks` data-parallel processes: rank 0 alone
    /// reports, in plain lines when there are several (an MPI launcher hands every rank a
    /// terminal of its own, whatever its own output is).
    pub fn for_rank(quiet: bool, rank: usize, ranks: usize) -> ProgressMode {
        match ProgressMode::detect(quiet || rank > 0) {
            ProgressMode::Bar if ranks > 1 => ProgressMode::Lines,
            mode => mode,
        }
    }

    /// Bar on a terminal, lines otherwise; `quiet` wins.
    pub fn detect(quiet: bool) -> ProgressMode {
        if quiet {
            ProgressMode::Quiet
        } else if std::io::stdout().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

/// A progress reporter over `len` units of work.
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    len: u64,
    label: String,
}

impl Progress {
    /// Starts reporting `label` over `len` units, `pos` of them already done.
    pub fn new(mode: ProgressMode, label: &str, len: u64, pos: u64) -> Progress {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stdout());
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} (ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar.set_position(pos);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Progress {
            mode,
            bar,
            len,
            label: label.to_string(),
        }
    }

    /// Moves to `pos` with a status message; in line mode prints it when `log` is set.
    pub fn update(&self, pos: u64, msg: &str, log: bool) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(b) = &self.bar {
                    b.set_position(pos);
                    b.set_message(msg.to_string());
                }
            }
            ProgressMode::Lines if log => println!("{} {pos}/{}: {msg}", self.label, self.len),
            _ => {}
        }
    }

    /// Prints a line without breaking the bar (nothing when quiet).
    pub fn println(&self, line: &str) {
        match (&self.bar, self.mode) {
            (Some(b), _) => b.println(line),
            (None, ProgressMode::Lines) => println!("{line}"),
            _ => {}
        }
    }

    /// Ends the bar, leaving its last state on screen.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
