//! `gpupool ui` in a real headless browser (Debian's Chromium, driven
//! through ChromeDriver's WebDriver API), against a real SQLite queue with
//! a real worker running real Python: each page loads and shows the jobs, a
//! worker and a sweep (with its chart); a live log grows while its run
//! prints; cancel works once logged in with the token and is not offered
//! without it; no page loads anything from another host.
//!
//! Without `chromium` and `chromedriver` on the PATH it says `skipped: …`
//! (a failure under `GPUPOOL_REQUIRE_BROWSER=1`, as in CI, which installs
//! them). With `GPUPOOL_UI_SCREENSHOTS=DIR` it saves a screenshot of each
//! page there (`scripts/ui-screenshots.sh` makes those in `docs/`).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TRAIN_PY: &str = r#"import sys, time
args = sys.argv[1:]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
for i in range(int(opt("--lines", 0))):
    print("step %d of the long run" % i, flush=True)
    time.sleep(0.4)
if opt("--lr"):
    print('GPUPOOL_RESULT {"loss": %s}' % (abs(float(opt("--lr")) - 0.2) + 0.1), flush=True)
    import os
    with open(os.path.join(os.environ["GPUPOOL_OUTPUT_DIR"], "model.txt"), "w") as f:
        f.write("weights for lr %s" % opt("--lr"))
"#;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A WebDriver session on ChromeDriver.
struct Browser {
    driver: String,
    session: String,
    _chromedriver: Killed,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Option<Browser> {
        let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
            let why = "skipped: chromium and chromedriver are not installed (apt-get install chromium chromium-driver)";
            assert!(std::env::var("GPUPOOL_REQUIRE_BROWSER").as_deref() != Ok("1"), "{why}");
            eprintln!("{why}");
            return None;
        };
        let port = free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let child = Killed(child);
        let driver = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&driver).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1280,860",
        ];
        let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args}}}});
        let reply = request(&driver, "POST", "/session", Some(&caps));
        let session = reply["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {reply}")).to_owned();
        Some(Browser { driver, session, _chromedriver: child, _profile: profile })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let reply = request(&self.driver, method, &format!("/session/{}{path}", self.session), body);
        assert!(reply["value"].get("error").is_none(), "webdriver {path}: {reply}");
        reply["value"].clone()
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", Some(&json!({"url": url})));
    }

    fn js(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", Some(&json!({"script": script, "args": []})))
    }

    fn text(&self) -> String {
        self.js("return document.body.innerText").as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the page's text holds `want`.
    fn wait_text(&self, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text();
            if text.contains(want) {
                return text;
            }
            assert!(Instant::now() < deadline, "the page never showed {want:?}: {text}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every resource the page loaded is from `origin`.
    fn loaded_only_from(&self, origin: &str) {
        let loaded = self.js("return performance.getEntriesByType('resource').map(e => e.name)");
        for url in loaded.as_array().unwrap() {
            assert!(url.as_str().unwrap().starts_with(origin), "loaded from outside: {url}");
        }
    }

    fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("GPUPOOL_UI_SCREENSHOTS") else { return };
        let png = self.call("GET", "/screenshot", None);
        std::fs::write(Path::new(&dir).join(name), base64(png.as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = request(&self.driver, "DELETE", &format!("/session/{}", self.session), None);
    }
}

/// One HTTP/1.1 exchange with a JSON body both ways.
fn request(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Value {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read by Content-Length (or chunks): the driver may keep the
    // connection open.
    let mut reader = BufReader::new(s);
    let (mut length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let lower = line.trim().to_ascii_lowercase();
        if lower.is_empty() {
            break;
        }
        if let Some(n) = lower.strip_prefix("content-length:") {
            length = n.trim().parse::<usize>().ok();
        }
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
    }
    let rest = if chunked {
        let mut out = Vec::new();
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut chunk = vec![0u8; n + 2];
            reader.read_exact(&mut chunk).unwrap();
            out.extend_from_slice(&chunk[..n]);
        }
        out
    } else if let Some(n) = length {
        let mut body = vec![0u8; n];
        reader.read_exact(&mut body).unwrap();
        body
    } else {
        let mut body = Vec::new();
        reader.read_to_end(&mut body).unwrap();
        body
    };
    let rest = String::from_utf8_lossy(&rest);
    serde_json::from_str(&rest).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {rest}"))
}

fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = text.bytes().filter(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/').collect();
    clean
        .chunks(4)
        .flat_map(|q| {
            let n = q.iter().enumerate().fold(0u32, |acc, (i, c)| acc | (u32::from(value(*c)) << (18 - 6 * i)));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(q.len().saturating_sub(1))
        })
        .collect()
}

/// `gpupool` on the test's SQLite queue and data directory.
fn command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpupool"));
    cmd.arg("--queue")
        .arg(format!("sqlite://{}/q.db", dir.display()))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .current_dir(dir)
        .env_remove("GPUPOOL_QUEUE")
        .env_remove("GPUPOOL_UI_TOKEN");
    cmd
}

fn gp(dir: &Path, args: &[&str]) -> std::process::Output {
    command(dir, args).output().unwrap()
}

fn gp_json(dir: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = gp(dir, &all);
    assert!(out.status.success(), "gpupool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn spawn(dir: &Path, args: &[&str]) -> Child {
    command(dir, args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// A repository holding `train.py`, at its first commit on `main`.
fn repo(dir: &Path) -> PathBuf {
    let path = dir.join("repo");
    let repo = git2::Repository::init(&path).unwrap();
    std::fs::write(path.join("train.py"), TRAIN_PY).unwrap();
    let mut index = repo.index().unwrap();
    index.add_path(Path::new("train.py")).unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("ui", "ui@example.com").unwrap();
    let oid = repo.commit(None, &sig, &sig, "train", &tree, &[]).unwrap();
    repo.reference("refs/heads/main", oid, true, "ui").unwrap();
    path
}

fn state(dir: &Path, id: &str) -> String {
    gp_json(dir, &["jobs", "--id", id])[0]["state"].as_str().unwrap().to_owned()
}

#[test]
fn the_dashboard_in_a_browser_with_a_worker_running() {
    let Some(browser) = Browser::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = repo(dir);
    assert!(gp(dir, &["init"]).status.success());
    let sweep = "method: grid\nprogram: train.py\ngit_ref: main\nname: lr-search\n\
                 metric: {name: loss, goal: minimize}\nparameters:\n  lr: {values: [0.1, 0.2, 0.4]}\n";
    std::fs::write(dir.join("sweep.yaml"), sweep).unwrap();
    let sweep_id = gp_json(dir, &["sweep", "sweep.yaml"])["sweep"].as_str().unwrap().to_owned();
    let jobs = json!([
        {"git_ref": "main", "entrypoint": "train.py", "name": "long run", "args": {"lines": 150}},
        {"git_ref": "main", "entrypoint": "train.py", "name": "to cancel", "args": {"lines": 200}}
    ]);
    std::fs::write(dir.join("jobs.json"), jobs.to_string()).unwrap();
    let ids: Vec<String> = serde_json::from_value(gp_json(dir, &["push", "jobs.json"])).unwrap();
    let (long, doomed) = (&ids[0], &ids[1]);
    let store = format!("file://{}", dir.join("store").display());
    let worker =
        ["worker", "--repo", repo.to_str().unwrap(), "--gpus", "0,1", "--heartbeat", "1s", "--artifacts", &store];
    let _worker = Killed(spawn(dir, &worker));
    let mut ui = spawn(dir, &["ui", "--listen", "127.0.0.1:0"]);
    let mut line = String::new();
    BufReader::new(ui.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let _ui = Killed(ui);
    let origin = format!("http://{}", line.split("http://").nth(1).unwrap().split('/').next().unwrap());
    let token = line.split("token for actions: ").nth(1).expect("a token made and printed").trim().to_owned();

    // Jobs: the sweep's runs and the pushed jobs, live.
    browser.open(&format!("{origin}/"));
    browser.wait_text("long run");
    browser.wait_text("to cancel");
    browser.loaded_only_from(&origin);
    // The live log grows while the run prints.
    browser.open(&format!("{origin}/jobs/{long}"));
    browser.wait_text("step 1 of the long run");
    browser.wait_text("running · attempt 1");
    let before = browser.js("return document.getElementById('log').textContent.length").as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after = browser.js("return document.getElementById('log').textContent.length").as_u64().unwrap();
    assert!(after > before, "the log grew while the run printed ({before} then {after} characters)");
    browser.loaded_only_from(&origin);
    browser.screenshot("ui-job.png");
    // Without the token, no action is offered.
    let offered = browser.js("return document.querySelector(\"form[action$='/cancel']\") !== null");
    assert_eq!(offered, json!(false), "read-only without the token");
    // Workers: the worker, with what it runs.
    browser.open(&format!("{origin}/workers"));
    let holds = format!("return document.querySelector('#workers a[href=\"/jobs/{long}\"]') !== null");
    let deadline = Instant::now() + Duration::from_secs(30);
    while browser.js(&holds) != json!(true) {
        assert!(Instant::now() < deadline, "the worker never showed the long run: {}", browser.text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = browser.text();
    assert!(text.contains("\tok\t") && text.contains("GPU 0") && text.contains("GPU 1"), "healthy, two GPUs: {text}");
    assert!(text.contains(&format!("job {long}")), "a GPU shows the job holding it: {text}");
    browser.loaded_only_from(&origin);
    browser.screenshot("ui-workers.png");
    // Sweeps, and the sweep's page with its chart once its runs are done.
    browser.open(&format!("{origin}/sweeps"));
    browser.wait_text(&sweep_id);
    browser.wait_text("lr-search");
    browser.loaded_only_from(&origin);
    browser.screenshot("ui-sweeps.png");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        browser.open(&format!("{origin}/sweeps/{sweep_id}"));
        if browser.js("return document.querySelectorAll('#charts canvas').length").as_u64() == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "no chart: {}", browser.text());
        std::thread::sleep(Duration::from_millis(500));
    }
    browser.loaded_only_from(&origin);
    browser.screenshot("ui-sweep.png");
    // A run's kept file downloads from its page (a file:// artifact store).
    let first = gp_json(dir, &["jobs", "--sweep", &sweep_id])[0]["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let link = loop {
        browser.open(&format!("{origin}/jobs/{first}"));
        let link = browser.js("var a = document.querySelector(\"a[href*='/files/']\"); return a ? a.href : null");
        if let Some(link) = link.as_str() {
            break link.to_owned();
        }
        assert!(Instant::now() < deadline, "no download link: {}", browser.text());
        std::thread::sleep(Duration::from_millis(500));
    };
    let fetch =
        format!("var x = new XMLHttpRequest(); x.open('GET', {}, false); x.send(); return x.responseText", json!(link));
    let text = browser.js(&fetch);
    assert!(text.as_str().unwrap().starts_with("weights for lr"), "the kept file: {text}");
    // Log in with the token, then cancel from the job's page.
    browser.open(&format!("{origin}/login"));
    let typed = format!(
        "document.querySelector('input[name=token]').value = {}; setTimeout(() => document.querySelector('form').submit(), 0); return true",
        json!(token)
    );
    browser.js(&typed);
    browser.wait_text("actions on");
    browser.open(&format!("{origin}/jobs/{doomed}"));
    browser.wait_text("to cancel");
    browser.js("setTimeout(() => document.querySelector(\"form[action$='/cancel'] button\").click(), 0); return true");
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(dir, doomed) != "cancelled" {
        assert!(Instant::now() < deadline, "not cancelled");
        std::thread::sleep(Duration::from_millis(200));
    }
    browser.open(&format!("{origin}/"));
    browser.wait_text("cancelled");
    browser.screenshot("ui-jobs.png");
}
