//! `gpupool ui` over HTTP against a real SQLite queue: the pages show the
//! jobs, an unknown id is a clear 404 page, actions need the token and a
//! page's CSRF secret, the live parts stream, and no page loads anything
//! from another host.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Ui {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gp(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .arg("--queue")
        .arg(format!("sqlite://{}/q.db", dir.display()))
        .args(args)
        .current_dir(dir)
        .env_remove("GPUPOOL_QUEUE")
        .env_remove("GPUPOOL_UI_TOKEN")
        .output()
        .unwrap()
}

fn start() -> Ui {
    let dir = tempfile::tempdir().unwrap();
    assert!(gp(dir.path(), &["init"]).status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .arg("--queue")
        .arg(format!("sqlite://{}/q.db", dir.path().display()))
        .args(["ui", "--listen", "127.0.0.1:0", "--token", "the-test-token"])
        .env_remove("GPUPOOL_QUEUE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    assert!(!line.contains("the-test-token"), "a token given is not printed: {line}");
    let addr = line.split("http://").nth(1).and_then(|r| r.split('/').next()).expect("the address").to_owned();
    Ui { child, addr, dir }
}

/// One HTTP/1.1 exchange: status, headers and body (as text).
fn http(ui: &Ui, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(&ui.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", ui.addr);
    for h in headers {
        req.push_str(&format!("{h}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn push(ui: &Ui, job: &str) -> String {
    let file = ui.dir.path().join("job.json");
    std::fs::write(&file, job).unwrap();
    let out = gp(ui.dir.path(), &["push", "--json", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ids: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    ids[0].clone()
}

fn state(ui: &Ui, id: &str) -> String {
    let out = gp(ui.dir.path(), &["jobs", "--id", id, "--json"]);
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    jobs[0]["state"].as_str().unwrap().to_owned()
}

/// No `src` or `href` leads to another host.
fn loads_nothing_from_outside(page: &str) {
    for attr in ["src=", "href="] {
        for (i, _) in page.match_indices(attr) {
            let value = page[i + attr.len()..].trim_start_matches(['"', '\'']);
            assert!(!value.starts_with("http") && !value.starts_with("//"), "outside: {}", &page[i..i + 60]);
        }
    }
}

fn wait_for_view(ui: &Ui, want: &str) -> String {
    for _ in 0..50 {
        let (_, _, body) = http(ui, "GET", "/", &[], "");
        if body.contains(want) {
            return body;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the jobs page never showed {want}");
}

#[test]
fn pages_show_the_pool_actions_need_the_token_and_nothing_loads_from_outside() {
    let ui = start();
    let a = push(&ui, r#"{"git_ref": "main", "entrypoint": "train.py", "name": "baseline <b>", "args": {"lr": 0.1}}"#);
    let b = push(&ui, r#"{"git_ref": "main", "entrypoint": "eval.py"}"#);
    let jobs = wait_for_view(&ui, "eval.py");
    assert!(jobs.contains(&format!("/jobs/{a}")) && jobs.contains("baseline &lt;b&gt;"), "escaped, linked: {jobs}");
    loads_nothing_from_outside(&jobs);
    let (code, _, filtered) = http(&ui, "GET", "/?q=eval", &[], "");
    assert!(code == 200 && filtered.contains("eval.py") && !filtered.contains("baseline"), "{filtered}");

    for path in [format!("/jobs/{a}"), "/workers".to_owned(), "/sweeps".to_owned(), "/login".to_owned()] {
        let (code, _, page) = http(&ui, "GET", &path, &[], "");
        assert_eq!(code, 200, "{path}: {page}");
        loads_nothing_from_outside(&page);
    }
    let (code, _, one) = http(&ui, "GET", &format!("/jobs/{a}"), &[], "");
    assert!(code == 200 && one.contains("&quot;lr&quot;: 0.1") && !one.contains("<button>Cancel"), "read-only: {one}");
    let (code, _, missing) = http(&ui, "GET", "/jobs/999999", &[], "");
    assert!(code == 404 && missing.contains("no job 999999"), "{missing}");
    let (code, _, _) = http(&ui, "GET", "/jobs/a%2F..%2Fx", &[], "");
    assert_eq!(code, 404);
    let (code, _, _) = http(&ui, "GET", "/sweeps/nope", &[], "");
    assert_eq!(code, 404);
    let mut rebound = TcpStream::connect(&ui.addr).unwrap();
    write!(rebound, "GET / HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    rebound.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 421"), "another site's name is refused: {answer}");
    let (code, _, js) = http(&ui, "GET", "/assets/app.js", &[], "");
    assert!(code == 200 && js.contains("EventSource"));

    // Actions: refused without the token, and from a browser without the
    // page's secret or from another site.
    let form = ["Content-Type: application/x-www-form-urlencoded"];
    let (code, _, refused) = http(&ui, "POST", &format!("/jobs/{a}/cancel"), &form, "");
    assert!(code == 403 && refused.contains("need the token"), "{refused}");
    let (code, _, _) = http(&ui, "POST", "/login", &form, "token=wrong");
    assert_eq!(code, 403);
    let (code, head, _) = http(&ui, "POST", "/login", &form, "token=the-test-token");
    assert!(code == 303 && head.contains("HttpOnly") && head.contains("SameSite=Strict"), "{head}");
    let cookie = "Cookie: gpupool_ui=the-test-token";
    let (code, _, _) = http(&ui, "POST", &format!("/jobs/{a}/cancel"), &[form[0], cookie], "");
    assert_eq!(code, 403, "no CSRF secret");
    let (_, _, page) = http(&ui, "GET", &format!("/jobs/{a}"), &[cookie], "");
    let csrf = page.split("name=csrf value=").nth(1).and_then(|r| r.split('>').next()).expect("the form's secret");
    let evil = "Origin: http://evil.example";
    let (code, _, _) =
        http(&ui, "POST", &format!("/jobs/{a}/cancel"), &[form[0], cookie, evil], &format!("csrf={csrf}"));
    assert_eq!(code, 403, "from another site");
    assert_eq!(state(&ui, &a), "queued", "nothing refused was done");
    let (code, _, _) = http(&ui, "POST", &format!("/jobs/{a}/cancel"), &[form[0], cookie], &format!("csrf={csrf}"));
    assert_eq!(code, 303);
    assert_eq!(state(&ui, &a), "cancelled");
    let (code, _, _) = http(&ui, "POST", &format!("/jobs/{b}/cancel"), &["Authorization: Bearer the-test-token"], "");
    assert_eq!(code, 303, "a script with the token");
    assert_eq!(state(&ui, &b), "cancelled");
    let (code, _, _) = http(&ui, "POST", &format!("/jobs/{a}/retry"), &["Authorization: Bearer the-test-token"], "");
    assert_eq!((code, state(&ui, &a).as_str()), (303, "queued"));
    let (code, _, conflict) =
        http(&ui, "POST", &format!("/jobs/{a}/retry"), &["Authorization: Bearer the-test-token"], "");
    assert!(code == 409 && conflict.contains("queued"), "{conflict}");

    // Push a copy with edited args: a new job, the same but its args.
    let bearer = ["Authorization: Bearer the-test-token", form[0]];
    let (code, head, _) = http(&ui, "POST", &format!("/jobs/{a}/copy"), &bearer, "args=%7B%22lr%22%3A+0.5%7D");
    assert_eq!(code, 303, "{head}");
    let copy =
        head.split("location: /jobs/").nth(1).and_then(|r| r.lines().next()).expect("the copy's page").to_owned();
    let out = gp(ui.dir.path(), &["jobs", "--id", &copy, "--json"]);
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (job[0]["args"].clone(), job[0]["name"].clone()),
        (serde_json::json!({"lr": 0.5}), "baseline <b>".into())
    );
    let (code, _, bad) = http(&ui, "POST", &format!("/jobs/{a}/copy"), &bearer, "args=%5B1%5D");
    assert!(code == 400 && bad.contains("args must be a JSON object"), "{bad}");
    let (code, _, bad) = http(&ui, "POST", &format!("/jobs/{a}/copy"), &bearer, "args=%7Blr");
    assert!(code == 400 && bad.contains("args are not JSON"), "{bad}");
    let (code, _, bad) = http(&ui, "POST", &format!("/jobs/{a}/copy"), &bearer, "args=%7B%22bad+key%22%3A1%7D");
    assert!(code == 400 && bad.contains("the copy is not a valid job"), "{bad}");
    let (code, _, _) = http(&ui, "POST", &format!("/jobs/{a}/copy"), &[form[0]], "args=%7B%7D");
    assert_eq!(code, 403, "a copy needs the token too");
    let (code, _, none) = http(&ui, "GET", &format!("/jobs/{a}/files/model.pt"), &[], "");
    assert!(code == 404 && none.contains("no files in an artifact store"), "{none}");
}

#[test]
fn the_jobs_table_streams_as_jobs_arrive() {
    let ui = start();
    push(&ui, r#"{"git_ref": "main", "entrypoint": "first.py"}"#);
    wait_for_view(&ui, "first.py");
    let mut s = TcpStream::connect(&ui.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(s, "GET /events/jobs HTTP/1.1\r\nHost: {}\r\n\r\n", ui.addr).unwrap();
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    reader.read_line(&mut head).unwrap();
    assert!(head.contains("200"), "{head}");
    let id = push(&ui, r#"{"git_ref": "main", "entrypoint": "second.py"}"#);
    let mut seen = String::new();
    while !seen.contains("second.py") {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended: {seen}");
        seen.push_str(&line);
    }
    assert!(seen.contains("event: update") && seen.contains(&format!("/jobs/{id}")), "{seen}");
    let (code, _, _) = http(&ui, "GET", "/events/nope", &[], "");
    assert_eq!(code, 404);
}

/// A backend that has gone away (its tables dropped under a running
/// dashboard, on MariaDB): the pages stay up and say so, a job's page is a
/// clear 503, nothing panics.
#[test]
fn a_backend_that_went_away_is_said_not_a_crash() {
    let Some(base) = std::env::var("GPUPOOL_TEST_MYSQL_URL").ok().filter(|u| !u.is_empty()) else {
        assert!(std::env::var("GPUPOOL_REQUIRE_BACKENDS").as_deref() != Ok("1"), "GPUPOOL_TEST_MYSQL_URL is not set");
        eprintln!("skipped: GPUPOOL_TEST_MYSQL_URL is not set");
        return;
    };
    let prefix = format!("uigone_{}_", gpupool_core::conformance::unique_suffix());
    let url = format!("{base}{}prefix={prefix}", if base.contains('?') { '&' } else { '?' });
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gpupool"))
            .arg("--queue")
            .arg(&url)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    assert!(run(&["init"]).status.success());
    std::fs::write(dir.path().join("job.json"), r#"{"git_ref": "main", "entrypoint": "train.py"}"#).unwrap();
    assert!(run(&["push", "job.json"]).status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .arg("--queue")
        .arg(&url)
        .args(["ui", "--listen", "127.0.0.1:0", "--token", "the-test-token"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|r| r.split('/').next()).expect("the address").to_owned();
    let ui = Ui { child, addr, dir: tempfile::tempdir().unwrap() };
    wait_for_view(&ui, "train.py");
    // The tables go.
    let u = base.trim_start_matches("mysql://");
    let (auth, rest) = u.split_once('@').unwrap();
    let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, db) = rest.split_once('/').unwrap();
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "3306"));
    let db = db.split('?').next().unwrap();
    let list = format!(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = '{db}' AND table_name LIKE '{prefix}%'"
    );
    let sql = |q: &str| {
        let out = Command::new("mariadb")
            .args(["-h", host, "-P", port, "-u", user, &format!("-p{pass}"), db, "-N", "-e", q])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let tables: Vec<String> = sql(&list).lines().map(str::to_owned).collect();
    assert!(!tables.is_empty());
    sql(&format!("DROP TABLE {}", tables.join(", ")));
    let page = (0..50)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(200));
            let (code, _, page) = http(&ui, "GET", "/", &[], "");
            (code == 200 && page.contains("cannot read the queue")).then_some(page)
        })
        .expect("the jobs page says the queue cannot be read");
    assert!(page.contains("train.py"), "and shows what it last read: {page}");
    let (code, _, one) = http(&ui, "GET", "/jobs/1", &[], "");
    assert!(code == 503 && one.contains("the queue did not answer"), "{code}: {one}");
    let (code, _, _) = http(&ui, "GET", "/workers", &[], "");
    assert_eq!(code, 200, "still serving");
}
