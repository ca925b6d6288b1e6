//! A run's output as it comes: the results it reports with
//! `GPUPOOL_RESULT {…}` lines, read line by line as a terminal shows them
//! (a line redrawn with `\r` counts as its last state).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpupool_core::runner::OutputSink;
use serde_json::{Map, Value};

/// What starts a result line.
pub(crate) const RESULT_PREFIX: &str = "GPUPOOL_RESULT";

/// A line longer than this without a newline is taken as it is.
const MAX_LINE: usize = 1 << 20;

/// What a run's output said, so far.
#[derive(Debug, Default, Clone)]
pub(crate) struct Collected {
    /// The results reported, later values winning.
    pub(crate) result: Map<String, Value>,
    /// Lines the worker adds to the job's log (a result line that does not
    /// read, for example).
    pub(crate) notes: Vec<String>,
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

    fn line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix(RESULT_PREFIX)
            && (rest.is_empty() || rest.starts_with([' ', '\t']))
        {
            self.merge(rest.trim(), "a GPUPOOL_RESULT line");
        }
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

/// Reads a run's output from its [`OutputSink`] while it runs.
#[derive(Debug)]
pub(crate) struct Live {
    tx: OutputSink,
    task: tokio::task::JoinHandle<()>,
    collected: Arc<Mutex<Collected>>,
}

impl Live {
    pub(crate) fn start() -> Live {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        let collected = Arc::new(Mutex::new(Collected::default()));
        let sink = Arc::clone(&collected);
        let task = tokio::spawn(async move {
            let mut lines = Lines::default();
            while let Some(chunk) = rx.recv().await {
                let mut c = gpupool_core::sync::lock(&sink);
                lines.push(&chunk, |l| c.line(l));
            }
            let mut c = gpupool_core::sync::lock(&sink);
            lines.flush(|l| c.line(l));
        });
        Live { tx, task, collected }
    }

    /// Where a runner sends the output.
    pub(crate) fn sink(&self) -> OutputSink {
        self.tx.clone()
    }

    /// What the output said, once the runner has let go of its sinks (a few
    /// seconds at most).
    pub(crate) async fn finish(self) -> Collected {
        drop(self.tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        gpupool_core::sync::lock(&self.collected).clone()
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
            c.line(l);
        }
        assert_eq!(c.result(), Some(serde_json::json!({"acc": 0.9, "loss": 1})));
        assert_eq!(c.notes.len(), 2, "{:?}", c.notes);
        assert!(c.notes[0].contains("not JSON"), "{:?}", c.notes);
    }
}
