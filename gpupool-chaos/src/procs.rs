//! Processes, read from `/proc`: a worker's tree, and whether a process
//! seen earlier is still the same live process.

use std::collections::HashMap;
use std::process::Child;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// A process as seen once: its pid and its start time (clock ticks since
/// boot), so that a reused pid is not taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Proc {
    pub(crate) pid: i32,
    start: u64,
}

impl Proc {
    /// Whether it still runs (a zombie does not).
    pub(crate) fn alive(self) -> bool {
        stat(self.pid).is_some_and(|s| s.state != 'Z' && s.start == self.start)
    }
}

/// The fields of `/proc/PID/stat` the suite needs.
struct Stat {
    state: char,
    ppid: i32,
    start: u64,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        // Field 22 of stat, the 20th after `(comm)`.
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Every process under `root` (children, grandchildren, …), not `root`.
pub(crate) fn descendants(root: i32) -> Vec<Proc> {
    let mut children: HashMap<i32, Vec<Proc>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if let Some(s) = stat(pid) {
            children.entry(s.ppid).or_default().push(Proc { pid, start: s.start });
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for c in children.remove(&p).unwrap_or_default() {
            todo.push(c.pid);
            out.push(c);
        }
    }
    out
}

/// Whether `pid` is a live process of a chaos run: the job's Python
/// process or its grandchild.
pub(crate) fn is_run(pid: i32) -> bool {
    if pid <= 0 || stat(pid).is_none_or(|s| s.state == 'Z') {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains("job.py") || cmdline.contains("chaos-grandchild")
}

pub(crate) fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// Waits up to `limit` for `child` to exit.
pub(crate) fn wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => return None,
        }
    }
}
