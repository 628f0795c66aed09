//! Writes the corpus of `configs/induction.toml`: lines of a random string written twice
//! ("qWfkZqWfkZ"), each string 8 to 32 letters long. The first copy cannot be predicted; the
//! second can, by anything that finds where the current letter appeared before and copies the
//! letter after it: an induction head. The varied lengths keep a head that looks a fixed
//! distance back from solving it.
//!
//! `cargo run --release --example induction_corpus -- data/induction.txt [LINES] [SEED]`

use std::io::Write;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: induction_corpus OUT.txt [LINES (default 20000)] [SEED (default 0)]");
        return std::process::ExitCode::from(2);
    };
    let number = |i: usize, default: u64| match args.get(i) {
        None => Ok(default),
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| format!("{s:?} is not a whole number")),
    };
    let (lines, seed) = match (number(1, 20_000), number(2, 0)) {
        (Ok(l), Ok(s)) => (l as usize, s),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("induction_corpus: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let text = tinygpt::circuits::induction_corpus(lines, 8..=32, seed);
    let written = std::fs::File::create(path).and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written {
        eprintln!("induction_corpus: cannot write {path}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    println!("wrote {} lines ({} bytes) to {path}", lines, text.len());
    std::process::ExitCode::SUCCESS
}
