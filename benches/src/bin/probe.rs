//! `probe`: the tiny native program the dispatch figure runs as the job's
//! command (`probe ENTRYPOINT [--name value …]`), so that the figure is the
//! queue's and the worker's time, not a big program's start-up. It writes
//! the time it started (ns since the epoch) to the file after `--out`, and
//! exits; an entrypoint ending in `.py` is handed to `python3` instead (the
//! job-overhead and RSS figures).

use std::os::unix::process::CommandExt;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().is_some_and(|e| e.ends_with(".py")) {
        let err = std::process::Command::new("python3").args(&argv).exec();
        eprintln!("probe: cannot run python3: {err}");
        std::process::exit(127);
    }
    if let Some(i) = argv.iter().position(|a| a == "--out")
        && let Some(out) = argv.get(i + 1)
    {
        let tmp = format!("{out}.tmp");
        if let Err(e) = std::fs::write(&tmp, started.to_string()).and_then(|()| std::fs::rename(&tmp, out)) {
            eprintln!("probe: cannot write {out}: {e}");
            std::process::exit(1);
        }
    }
}
