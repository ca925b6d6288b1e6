//! A run's output as it comes: the results it reports with
//! `GPUPOOL_RESULT {…}` lines, read line by line as a terminal shows them
//! (a line redrawn with `\r` counts as its last state), and, where the
//! backend keeps them ([`gpupool_core::RunLogs`]), shipped with the latest
//! results at most once a second, so that any host can read them. A quiet
//! run ships nothing; a backend that is slow or down never holds the run's
//! output back (what waits is capped, oldest dropped first and marked).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpupool_core::runner::OutputSink;
use serde_json::{Map, Value};

/// What starts a result line.
pub(crate) const RESULT_PREFIX: &str = "GPUPOOL_RESULT";

/// A line longer than this without a newline is taken as it is.
const MAX_LINE: usize = 1 << 20;

/// How often output is shipped, at most.
const SHIP_EVERY: Duration = Duration::from_secs(1);

/// Output waiting to be shipped, at most (a backend that is down): beyond
/// it the oldest lines go, and the log says how many bytes.
const MAX_PENDING: usize = 4 << 20;

/// What a run's output said, so far.
#[derive(Debug, Default, Clone)]
pub(crate) struct Collected {
    /// The results reported, later values winning.
    pub(crate) result: Map<String, Value>,
    /// Lines the worker adds to the job's log (a result line that does not
    /// read, for example).
    pub(crate) notes: Vec<String>,
    /// Output not shipped yet (only while shipping).
    pending: String,
    /// Bytes dropped from `pending` since the last ship.
    dropped: usize,
    /// The results changed since the last ship.
    result_changed: bool,
    shipping: bool,
}

impl Collected {
    /// The result as the record keeps it: `None` when nothing was reported.
    pub(crate) fn result(&self) -> Option<Value> {
        (!self.result.is_empty()).then(|| Value::Object(self.result.clone()))
    }

    /// Merges the text of a result (a JSON object); `from` names where it
    /// came from in a note when it does not read.
    pub(crate) fn merge(&mut self, text: &str, from: &str) {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => self.result.extend(map),
            Ok(other) => self
                .notes
                .push(format!("{from} ignored: a JSON object was expected, not `{}`", short(&other.to_string()))),
            Err(e) => self.notes.push(format!("{from} ignored: not JSON ({e}): `{}`", short(text))),
        }
    }

    fn line(&mut self, line: &str, secrets: &[String]) {
        let notes = self.notes.len();
        if let Some(rest) = line.strip_prefix(RESULT_PREFIX)
            && (rest.is_empty() || rest.starts_with([' ', '\t']))
        {
            let before = self.result.clone();
            self.merge(rest.trim(), "a GPUPOOL_RESULT line");
            self.result_changed |= before != self.result;
        }
        if self.shipping {
            let mut text = line.to_owned();
            for secret in secrets.iter().filter(|s| s.len() >= 4) {
                text = text.replace(secret.as_str(), "***");
            }
            self.queue_line(&text);
            for i in notes..self.notes.len() {
                let note = format!("== gpupool: {}", self.notes[i]);
                self.queue_line(&note);
            }
        }
    }

    fn queue_line(&mut self, line: &str) {
        self.pending.push_str(line);
        self.pending.push('\n');
        if self.pending.len() > MAX_PENDING {
            let over = self.pending.len() - MAX_PENDING / 2;
            let cut = self.pending[over..].find('\n').map_or(self.pending.len(), |i| over + i + 1);
            self.pending.drain(..cut);
            self.dropped += cut;
        }
    }

    /// What to ship now, if anything.
    fn take(&mut self) -> Option<gpupool_core::Progress> {
        if self.pending.is_empty() && !self.result_changed {
            return None;
        }
        let mut log = std::mem::take(&mut self.pending);
        if self.dropped > 0 {
            log.insert_str(
                0,
                &format!("== gpupool: {} bytes of output dropped while the backend was unreachable\n", self.dropped),
            );
            self.dropped = 0;
        }
        let result = std::mem::take(&mut self.result_changed).then(|| self.result()).flatten();
        Some(gpupool_core::Progress { log, result })
    }

    /// Puts back what could not be shipped, in front of what came since.
    fn untake(&mut self, progress: gpupool_core::Progress) {
        let newer = std::mem::replace(&mut self.pending, progress.log);
        self.pending.push_str(&newer);
        self.result_changed |= progress.result.is_some();
    }
}

fn short(text: &str) -> String {
    let cut: String = text.chars().take(120).collect();
    if cut.len() < text.len() { format!("{cut}…") } else { cut }
}

/// Splits output chunks into lines as a terminal shows them.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// Adds `chunk`; calls `each` for every line it completes (without its
    /// newline, redraws collapsed).
    pub(crate) fn push(&mut self, chunk: &[u8], mut each: impl FnMut(&str)) {
        self.partial.extend_from_slice(chunk);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            each(&last_state(&line[..end]));
        }
        // A bar redrawn thousands of times keeps only its last drawing.
        if let Some(cr) = self.partial.iter().rposition(|&b| b == b'\r')
            && cr + 1 < self.partial.len()
        {
            self.partial.drain(..=cr);
        }
        if self.partial.len() > MAX_LINE {
            let line = std::mem::take(&mut self.partial);
            each(&last_state(&line));
        }
    }

    /// The last line, if the output did not end with a newline.
    pub(crate) fn flush(&mut self, mut each: impl FnMut(&str)) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            each(&last_state(&line));
        }
    }
}

fn last_state(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let start = line.iter().rposition(|&b| b == b'\r').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&line[start..]).into_owned()
}

/// Where a run's output is shipped: its queue (when that keeps
/// [`gpupool_core::RunLogs`]) and its lease.
#[derive(Debug, Clone)]
pub(crate) struct Shipping {
    pub(crate) queue: std::sync::Arc<dyn gpupool_core::Queue>,
    pub(crate) lease: gpupool_core::Lease,
    /// Strings replaced by `***` before shipping.
    pub(crate) secrets: Vec<String>,
}

/// Reads a run's output from its [`OutputSink`] while it runs.
#[derive(Debug)]
pub(crate) struct Live {
    tx: Option<OutputSink>,
    task: Option<tokio::task::JoinHandle<()>>,
    shipper: Option<tokio::task::JoinHandle<()>>,
    /// Tells the shipper to ship what is left and stop (also when dropped).
    done: tokio_util::sync::CancellationToken,
    /// Tells the shipper to stop without shipping what is left (the run's
    /// end carries it).
    hold: Arc<std::sync::atomic::AtomicBool>,
    collected: Arc<Mutex<Collected>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

impl Live {
    /// Starts reading; ships too when `shipping` is given and its queue keeps
    /// run logs.
    pub(crate) fn start(shipping: Option<Shipping>) -> Live {
        let shipping = shipping.filter(|s| s.queue.run_logs().is_some());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        let collected = Arc::new(Mutex::new(Collected { shipping: shipping.is_some(), ..Collected::default() }));
        let sink = Arc::clone(&collected);
        let secrets = shipping.as_ref().map(|s| s.secrets.clone()).unwrap_or_default();
        let task = tokio::spawn(async move {
            let mut lines = Lines::default();
            while let Some(chunk) = rx.recv().await {
                let mut c = gpupool_core::sync::lock(&sink);
                lines.push(&chunk, |l| c.line(l, &secrets));
            }
            let mut c = gpupool_core::sync::lock(&sink);
            lines.flush(|l| c.line(l, &secrets));
        });
        let done = tokio_util::sync::CancellationToken::new();
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shipper =
            shipping.map(|s| tokio::spawn(ship_loop(s, Arc::clone(&collected), done.clone(), Arc::clone(&hold))));
        Live { tx: Some(tx), task: Some(task), shipper, done, hold, collected }
    }

    /// Where a runner sends the output.
    pub(crate) fn sink(&self) -> Option<OutputSink> {
        self.tx.clone()
    }

    /// Adds a `== gpupool: …` line of the worker's to the shipped log.
    pub(crate) fn note(&self, text: &str) {
        let mut c = gpupool_core::sync::lock(&self.collected);
        if c.shipping {
            c.queue_line(&format!("== gpupool: {text}"));
        }
    }

    /// What the output said, once the runner has let go of its sinks (a few
    /// seconds at most), with the rest shipped, or, when `hold`, returned
    /// unshipped (for the run's end to carry).
    pub(crate) async fn finish(mut self, hold: bool) -> (Collected, String) {
        drop(self.tx.take());
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.hold.store(hold, std::sync::atomic::Ordering::Relaxed);
        self.done.cancel();
        if let Some(shipper) = self.shipper.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), shipper).await;
        }
        let mut collected = gpupool_core::sync::lock(&self.collected);
        let rest = if hold { collected.take().map(|p| p.log).unwrap_or_default() } else { String::new() };
        (collected.clone(), rest)
    }
}

/// Ships what waits, every [`SHIP_EVERY`], and once more when `done`
/// unless `hold`.
async fn ship_loop(
    s: Shipping,
    collected: Arc<Mutex<Collected>>,
    done: tokio_util::sync::CancellationToken,
    hold: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        let last = tokio::select! {
            () = tokio::time::sleep(SHIP_EVERY) => false,
            () = done.cancelled() => true,
        };
        if last && hold.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let progress = gpupool_core::sync::lock(&collected).take();
        if let Some(progress) = progress
            && let Some(logs) = s.queue.run_logs()
        {
            match logs.ship(&s.lease, &progress).await {
                Ok(()) => {}
                // The heartbeat stops the run; nothing more to ship.
                Err(gpupool_core::Error::LeaseLost { .. }) => return,
                Err(e) => {
                    tracing::debug!("shipping the output failed ({e}); trying again");
                    gpupool_core::sync::lock(&collected).untake(progress);
                }
            }
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&str]) -> Vec<String> {
        let (mut l, mut out) = (Lines::default(), Vec::new());
        for c in chunks {
            l.push(c.as_bytes(), |s| out.push(s.to_owned()));
        }
        l.flush(|s| out.push(s.to_owned()));
        out
    }

    #[test]
    fn a_redrawn_bar_is_one_line_with_its_last_state() {
        let bar: Vec<String> = (0..=3000).map(|i| format!("\r{i}/3000")).collect();
        let mut chunks: Vec<&str> = bar.iter().map(String::as_str).collect();
        chunks.push("\nnext\r");
        chunks.push("\nend");
        assert_eq!(lines(&chunks), ["3000/3000", "next", "end"]);
    }

    #[test]
    fn results_merge_and_bad_ones_are_noted() {
        let mut c = Collected::default();
        for l in [
            r#"GPUPOOL_RESULT {"acc": 0.5, "loss": 1}"#,
            r#"GPUPOOL_RESULT {"acc": 0.9}"#,
            "GPUPOOL_RESULT {not json",
            "GPUPOOL_RESULT [1]",
            "GPUPOOL_RESULTS are not results",
        ] {
            c.line(l, &[]);
        }
        assert_eq!(c.result(), Some(serde_json::json!({"acc": 0.9, "loss": 1})));
        assert_eq!(c.notes.len(), 2, "{:?}", c.notes);
        assert!(c.notes[0].contains("not JSON"), "{:?}", c.notes);
    }
}
