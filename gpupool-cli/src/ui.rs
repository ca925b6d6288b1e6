//! `gpupool ui`: the pool in a browser. Pages are HTML rendered here (no
//! frontend build, no outside requests: the one script and style sheet are
//! embedded in the binary).
//!
//! **One poller.** A single task reads the queue once a second (the newest
//! [`VIEW_JOBS`] jobs and the workers) into a shared [`View`]; every page
//! and every open event stream renders from it, so fifty open dashboards
//! cost the backend what one does. Only a job's own page reads the backend
//! for itself: the job with its attempts once, and its live log while it is
//! open.
//!
//! **Actions** (cancel, retry) need the token: given with `--token` (env
//! `GPUPOOL_UI_TOKEN`), else made at start and printed once. A browser
//! logs in with it (an HttpOnly, SameSite=Strict cookie) and each action's
//! form carries a second secret only pages served to a logged-in browser
//! hold, so another site cannot post one (CSRF); a script sends
//! `Authorization: Bearer TOKEN`. Without the token the pages are
//! read-only. The server listens on loopback unless told otherwise.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use futures_util::stream::{self, Stream};
use gpupool::sweep::{Goal, metric_value, rank};
use gpupool::{Error, JobId, JobRecord, JobState, ListFilter, Queue, Result, WorkerInfo};
use serde::Deserialize;
use tokio::sync::watch;

/// How many of the newest jobs the shared view holds.
pub(crate) const VIEW_JOBS: u32 = 1000;

/// How often the poller reads the queue.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// What the poller last read.
#[derive(Debug, Default)]
struct View {
    jobs: Vec<JobRecord>,
    workers: Vec<WorkerInfo>,
    tracked: bool,
    /// Why the last read failed (the pages say so over what they show).
    error: Option<String>,
    /// How many reads the backend has served (the benchmark reads it).
    reads: u64,
}

struct Ui {
    queue: Arc<dyn Queue>,
    /// The artifact store URL configured here (credentials for downloads).
    artifacts: Option<String>,
    url: String,
    token: String,
    csrf: String,
    view: watch::Receiver<Arc<View>>,
    /// Turns for downloads ([`DOWNLOADS_AT_ONCE`]).
    downloads: tokio::sync::Semaphore,
    /// Turns for open log streams ([`LOG_STREAMS_AT_ONCE`]).
    log_streams: Arc<tokio::sync::Semaphore>,
    /// The `Host` values a request may name: on loopback, only the
    /// loopback names (no other site's name rebound to 127.0.0.1).
    hosts: Option<Vec<String>>,
}

/// Runs the dashboard until the process ends. `token`: the one given, or
/// `None` to make one (printed once to stderr).
pub(crate) async fn serve(
    queue: Arc<dyn Queue>,
    url: String,
    listen: SocketAddr,
    token: Option<String>,
    artifacts: Option<String>,
) -> Result<()> {
    let made = token.is_none();
    let token = match token {
        Some(t) => t,
        None => random_hex(16)?,
    };
    if token.len() < 8 {
        return Err(Error::Config("--token must be at least 8 characters".to_owned()));
    }
    let (tx, rx) = watch::channel(Arc::new(View::default()));
    tokio::spawn(poll(Arc::clone(&queue), tx));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| Error::Config(e.to_string()))?;
    let port = addr.port();
    let hosts = addr
        .ip()
        .is_loopback()
        .then(|| ["localhost", "127.0.0.1", "[::1]"].iter().map(|h| format!("{h}:{port}")).collect());
    let ui = Arc::new(Ui {
        queue,
        artifacts,
        url,
        token: token.clone(),
        csrf: random_hex(16)?,
        view: rx,
        downloads: tokio::sync::Semaphore::new(DOWNLOADS_AT_ONCE),
        log_streams: Arc::new(tokio::sync::Semaphore::new(LOG_STREAMS_AT_ONCE)),
        hosts,
    });
    if !addr.ip().is_loopback() {
        crate::cli::say(&format!(
            "warning: listening on {addr}, reachable from other hosts; anyone can read the pages"
        ));
    }
    let how = if made { format!("; token for actions: {token}") } else { "; token as given".to_owned() };
    crate::cli::say(&format!("gpupool ui on http://{addr}/{how}"));
    axum::serve(listener, router(ui)).await.map_err(|e| Error::Config(format!("the dashboard stopped: {e}")))
}

fn router(ui: Arc<Ui>) -> Router {
    Router::new()
        .route("/", get(jobs_page))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/log", get(job_log))
        .route("/jobs/{id}/{action}", post(act))
        .route("/jobs/{id}/files/{*path}", get(download))
        .route("/workers", get(workers_page))
        .route("/sweeps", get(sweeps_page))
        .route("/sweeps/{id}", get(sweep_page))
        .route("/events/{kind}", get(events))
        .route("/login", get(login_page).post(login))
        .route("/poller", get(poller))
        .route("/assets/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], APP_JS) }))
        .route("/assets/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], STYLE_CSS) }))
        .route("/assets/uplot.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], UPLOT_JS) }))
        .route("/assets/uplot.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], UPLOT_CSS) }))
        .fallback(|| async { page_error(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&ui), known_host))
        .with_state(ui)
}

/// Refuses a request whose `Host` is not this server's loopback name when
/// it listens on loopback: a page of another site whose name was made to
/// point at 127.0.0.1 (DNS rebinding) reads nothing.
async fn known_host(
    State(ui): State<Arc<Ui>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    match &ui.hosts {
        Some(hosts) if !hosts.iter().any(|h| h == host) => {
            page_error(StatusCode::MISDIRECTED_REQUEST, "this dashboard answers to its loopback address only")
        }
        _ => next.run(request).await,
    }
}

const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");
/// uPlot (MIT), vendored from npm by `scripts/vendor-ui.sh`.
const UPLOT_JS: &str = include_str!("ui/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("ui/vendor/uplot/uPlot.min.css");

/// The poller: reads the queue every [`POLL_EVERY`] and publishes a new
/// view when it changed.
async fn poll(queue: Arc<dyn Queue>, tx: watch::Sender<Arc<View>>) {
    let mut reads = 0u64;
    let mut last = String::new();
    loop {
        let filter = ListFilter { limit: VIEW_JOBS, ..ListFilter::default() };
        let read = async {
            let jobs = queue.list(&filter).await?;
            let workers = match queue.worker_registry() {
                Some(r) => Some(r.workers().await?),
                None => None,
            };
            Ok::<_, Error>((jobs, workers))
        };
        let view = match read.await {
            Ok((jobs, workers)) => {
                reads += 1;
                let tracked = workers.is_some();
                View { jobs, workers: workers.unwrap_or_default(), tracked, error: None, reads }
            }
            Err(e) => {
                let old = tx.borrow().clone();
                View {
                    jobs: old.jobs.clone(),
                    workers: old.workers.clone(),
                    tracked: old.tracked,
                    error: Some(format!("cannot read the queue ({e}); showing what it last said")),
                    reads,
                }
            }
        };
        let print = fingerprint(&view);
        if print != last {
            last = print;
            let _ = tx.send(Arc::new(view));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// What a page shows of a view, compactly: a new view is published only
/// when this changes.
fn fingerprint(v: &View) -> String {
    let mut s = v.error.clone().unwrap_or_default();
    for j in &v.jobs {
        let result = j.result.as_ref().map(ToString::to_string).unwrap_or_default();
        let _ = write!(s, "|{}:{}:{}:{}:{result}", j.id, j.state, j.attempt, j.cancel_requested);
    }
    for w in &v.workers {
        let _ = write!(s, "|{}:{}:{}:{:?}:{:?}", w.name, w.lost, w.draining, w.running, w.gpus);
    }
    s
}

/// `bytes` random bytes from the system, in hex (the token and the CSRF
/// secret: nothing guessable stands in when the system has none).
fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::Config(format!("cannot read /dev/urandom for the dashboard's secrets: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

// ---- authentication -----------------------------------------------------

/// Whether the request carries the token in an `Authorization: Bearer`
/// header (a script's: no browser sends one on its own, so no CSRF).
fn bearer(ui: &Ui, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t, &ui.token))
}

/// Whether the request carries the token (bearer header or login cookie).
fn authed(ui: &Ui, headers: &HeaderMap) -> bool {
    bearer(ui, headers) || cookie(headers).is_some_and(|t| same(&t, &ui.token))
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.split(';').map(str::trim).find_map(|kv| kv.strip_prefix("gpupool_ui=")).map(ToOwned::to_owned))
}

/// Compares in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A post from another site: its `Origin` names another host.
fn cross_site(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| o.strip_prefix("http://").or_else(|| o.strip_prefix("https://")) != Some(host))
}

/// Why an action is refused, if it is: no token, or (for a browser) no
/// CSRF secret or a post from another site.
fn refused(ui: &Ui, headers: &HeaderMap, csrf: Option<&str>) -> Option<Response> {
    if !authed(ui, headers) {
        return Some(page_error(
            StatusCode::FORBIDDEN,
            "actions need the token: log in with it (the pages are read-only without it)",
        ));
    }
    let by_script = bearer(ui, headers);
    if cross_site(headers) || (!by_script && !csrf.is_some_and(|c| same(c, &ui.csrf))) {
        return Some(page_error(StatusCode::FORBIDDEN, "this action did not come from a gpupool page"));
    }
    None
}

/// The poller's counters, as JSON: how many reads the backend served and
/// how many jobs the view holds (the dashboard benchmark reads it).
async fn poller(State(ui): State<Arc<Ui>>) -> Response {
    let view = ui.view.borrow().clone();
    let body = serde_json::json!({"backend_reads": view.reads, "jobs": view.jobs.len(), "error": view.error});
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login_page(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    let body = "<h1>Log in</h1><p>Give the token <code>gpupool ui</code> printed at start (or was given).</p>\
        <form method=post action=/login><input type=password name=token autofocus> <button>Log in</button></form>";
    page(&ui, &headers, "Log in", body).into_response()
}

async fn login(State(ui): State<Arc<Ui>>, headers: HeaderMap, Form(form): Form<LoginForm>) -> Response {
    if cross_site(&headers) {
        return page_error(StatusCode::FORBIDDEN, "this login did not come from a gpupool page");
    }
    if !same(form.token.trim(), &ui.token) {
        return page_error(StatusCode::FORBIDDEN, "that is not the token");
    }
    let cookie = format!("gpupool_ui={}; HttpOnly; SameSite=Strict; Path=/", ui.token);
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

// ---- pages --------------------------------------------------------------

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Query text as a URL's query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn page(ui: &Ui, headers: &HeaderMap, title: &str, body: &str) -> Html<String> {
    let who =
        if authed(ui, headers) { "actions on".to_owned() } else { "<a href=/login>log in</a> for actions".to_owned() };
    let banner =
        ui.view.borrow().error.clone().map_or_else(String::new, |e| format!("<div class=banner>{}</div>", esc(&e)));
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>{} · gpupool</title>\
         <link rel=stylesheet href=/assets/style.css></head><body><header><b>gpupool</b>\
         <a href=/>Jobs</a><a href=/workers>Workers</a><a href=/sweeps>Sweeps</a>\
         <span class=who>{} · {who}</span></header><main>{banner}{body}</main>\
         <script src=/assets/app.js></script></body></html>",
        esc(title),
        esc(&ui.url)
    ))
}

fn page_error(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>{} · gpupool</title>\
         <link rel=stylesheet href=/assets/style.css></head><body><header><b>gpupool</b>\
         <a href=/>Jobs</a><a href=/workers>Workers</a><a href=/sweeps>Sweeps</a></header>\
         <main><div class=banner>{}</div></main></body></html>",
        status.as_u16(),
        esc(message)
    );
    (status, Html(body)).into_response()
}

/// The jobs page's filters.
#[derive(Debug, Default, Clone, Deserialize)]
struct JobsQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    queue: String,
    #[serde(default)]
    sweep: String,
    #[serde(default)]
    q: String,
}

impl JobsQuery {
    fn keeps(&self, j: &JobRecord) -> bool {
        (self.state.is_empty() || j.state.as_str() == self.state)
            && (self.queue.is_empty() || j.spec.queue == self.queue)
            && (self.sweep.is_empty() || j.spec.sweep.as_ref().is_some_and(|s| s.id == self.sweep))
            && (self.q.is_empty()
                || j.spec.name.as_deref().is_some_and(|n| n.contains(&self.q))
                || j.spec.entrypoint.contains(&self.q)
                || j.id.as_str() == self.q)
    }

    fn to_query(&self) -> String {
        format!("state={}&queue={}&sweep={}&q={}", enc(&self.state), enc(&self.queue), enc(&self.sweep), enc(&self.q))
    }
}

fn state_cell(state: JobState) -> String {
    format!("<span class=state-{0}>{0}</span>", state.as_str())
}

/// The jobs table: what the view holds that `query` keeps.
fn jobs_table(view: &View, query: &JobsQuery) -> String {
    let jobs: Vec<&JobRecord> = view.jobs.iter().filter(|j| query.keeps(j)).collect();
    let keys = crate::result_keys(jobs.iter().copied());
    let mut s = String::from("<table><tr><th>ID<th>State<th>Queue<th>Name<th>Ref<th>Entrypoint<th>Attempt<th>Worker");
    for k in &keys {
        let _ = write!(s, "<th>{}", esc(k));
    }
    s.push_str("<th>Created</tr>");
    for j in &jobs {
        let _ = write!(
            s,
            "<tr><td><a href=\"/jobs/{id}\">{id}</a><td>{}<td>{}<td>{}<td>{}<td>{}<td>{}<td>{}",
            state_cell(j.state),
            esc(&j.spec.queue),
            esc(j.spec.name.as_deref().unwrap_or("")),
            esc(&j.spec.git_ref),
            esc(&j.spec.entrypoint),
            j.attempt,
            esc(j.worker.as_deref().unwrap_or("")),
            id = esc(j.id.as_str()),
        );
        for k in &keys {
            let _ = write!(s, "<td>{}", esc(&crate::result_cell(j.result.as_ref().and_then(|r| r.get(k)))));
        }
        let _ = write!(s, "<td>{}</tr>", esc(&j.created_at.to_rfc3339()));
    }
    s.push_str("</table>");
    if jobs.is_empty() {
        s.push_str("<p class=note>No jobs match.</p>");
    }
    s
}

async fn jobs_page(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(query): Query<JobsQuery>) -> Html<String> {
    let table = jobs_table(&ui.view.borrow(), &query);
    let states: String = JobState::ALL
        .iter()
        .map(|s| {
            let chosen = if query.state == s.as_str() { " selected" } else { "" };
            format!("<option{chosen}>{}</option>", s.as_str())
        })
        .collect();
    let body = format!(
        "<h1>Jobs</h1><form class=filters method=get action=/>\
         <select name=state><option value=''>any state</option>{states}</select>\
         <input name=queue placeholder=queue value=\"{}\"><input name=sweep placeholder=sweep value=\"{}\">\
         <input name=q placeholder='name, entrypoint or id' value=\"{}\"><button>Filter</button></form>\
         <p class=note>The newest {VIEW_JOBS} jobs, live.</p>\
         <div id=jobs data-events=\"/events/jobs?{}\">{table}</div>",
        esc(&query.queue),
        esc(&query.sweep),
        esc(&query.q),
        esc(&query.to_query()),
    );
    page(&ui, &headers, "Jobs", &body)
}

/// A link to a job's page, its id escaped and quoted.
fn job_link(id: &str, text: &str) -> String {
    format!("<a href=\"/jobs/{}\">{}</a>", esc(&enc(id)), esc(text))
}

/// A job id as the pages take one (letters, digits, `-`, `_`).
fn job_id(id: &str) -> Option<JobId> {
    let plain =
        !id.is_empty() && id.len() <= 100 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    plain.then(|| JobId::new(id))
}

fn no_job(id: &str) -> Response {
    page_error(StatusCode::NOT_FOUND, &format!("no job `{id}`"))
}

fn backend_error(e: &Error) -> Response {
    match e {
        Error::NotFound { id } => page_error(StatusCode::NOT_FOUND, &format!("no job {id}")),
        other => page_error(StatusCode::SERVICE_UNAVAILABLE, &format!("the queue did not answer: {other}")),
    }
}

/// A job's state line: live on its page (from the shared view).
fn job_status(job: &JobRecord) -> String {
    format!(
        "<p>{} · attempt {} (limit {}) · worker {} · commit {} · created {}</p>",
        state_cell(job.state),
        job.attempt,
        job.attempt_limit,
        esc(job.worker.as_deref().unwrap_or("-")),
        esc(job.commit.as_deref().unwrap_or("-")),
        esc(&job.created_at.to_rfc3339())
    )
}

async fn job_page(State(ui): State<Arc<Ui>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let Some(id) = job_id(&id) else { return no_job(&id) };
    let job = match ui.queue.get(&id).await {
        Ok(job) => job,
        Err(e) => return backend_error(&e),
    };
    let spec = serde_json::to_string_pretty(&job.spec).unwrap_or_default();
    let mut body = format!("<h1>Job {0}</h1><div id=status>{1}</div>", esc(id.as_str()), job_status(&job));
    if authed(&ui, &headers) {
        let csrf = esc(&ui.csrf);
        let _ = write!(
            body,
            "<form class=inline method=post action=/jobs/{id}/cancel><input type=hidden name=csrf value={csrf}>\
             <button>Cancel</button></form> <form class=inline method=post action=/jobs/{id}/retry>\
             <input type=hidden name=csrf value={csrf}><button>Retry</button></form>\
             <details><summary>Push a copy with edited args</summary><form method=post action=/jobs/{id}/copy>\
             <input type=hidden name=csrf value={csrf}><textarea name=args rows=6 cols=60>{args}</textarea><br>\
             <button>Push the copy</button></form></details>",
            id = esc(id.as_str()),
            args = esc(&serde_json::to_string_pretty(&job.spec.args).unwrap_or_default())
        );
    }
    let _ = write!(body, "<h2>Spec</h2><pre>{}</pre>", esc(&spec));
    if let Some(result) = &job.result {
        let _ = write!(
            body,
            "<h2>Results</h2><pre>{}</pre>",
            esc(&serde_json::to_string_pretty(result).unwrap_or_default())
        );
    }
    if !job.errors.is_empty() {
        body.push_str("<h2>Attempts</h2><table><tr><th>Attempt<th>Kind<th>Exit<th>Message<th>At</tr>");
        for e in &job.errors {
            let _ = write!(
                body,
                "<tr><td>{}<td>{}<td>{}<td>{}<td>{}</tr>",
                e.attempt,
                e.kind,
                e.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                esc(&e.message),
                esc(&e.at.to_rfc3339())
            );
        }
        body.push_str("</table>");
    }
    if let Some(a) = &job.artifacts {
        let _ = write!(body, "<h2>Artifacts</h2><p>attempt {}: {}</p><ul>", a.attempt, esc(&a.location));
        for f in &a.files {
            let name = esc(&f.path);
            let link = if a.stored {
                format!("<a href=\"/jobs/{}/files/{}\">{name}</a>", esc(id.as_str()), esc(&enc_path(&f.path)))
            } else {
                name
            };
            let _ = write!(body, "<li>{link} ({})</li>", gpupool::artifacts::human_size(f.size));
        }
        body.push_str("</ul>");
    }
    let _ = write!(
        body,
        "<h2>Log <span id=log-state class=note></span></h2><pre id=log data-log=\"/jobs/{}/log\"></pre>",
        esc(id.as_str())
    );
    page(&ui, &headers, &format!("Job {id}"), &body).into_response()
}

/// The job's shipped log as an event stream: `log` events (JSON strings)
/// as it grows, `status` events (its state line) as its state changes,
/// then `end` once it has ended. One stream per page: a browser opens at
/// most six connections to one host over HTTP/1.1, and each open event
/// stream holds one.
async fn job_log(State(ui): State<Arc<Ui>>, Path(id): Path<String>) -> Response {
    let Some(id) = job_id(&id) else { return no_job(&id) };
    let Ok(turn) = Arc::clone(&ui.log_streams).try_acquire_owned() else {
        let busy = Event::default().event("end").data("too many logs open on this dashboard; reload later");
        return Sse::new(stream::iter([Ok::<_, std::convert::Infallible>(busy)])).into_response();
    };
    let stream = stream::unfold((ui, id, 0u64, false, String::new()), |(ui, id, from, done, shown)| async move {
        if done {
            return None;
        }
        let mut from = from;
        loop {
            let Some(logs) = ui.queue.run_logs() else {
                let end = Event::default().event("end").data("this backend keeps no logs");
                return Some((Ok::<_, std::convert::Infallible>(end), (ui, id, from, true, shown)));
            };
            let page = match logs.read_log(&id, from).await {
                Ok(p) => p,
                Err(e) => {
                    let end = Event::default().event("end").data(format!("cannot read the log: {e}"));
                    return Some((Ok(end), (ui, id, from, true, shown)));
                }
            };
            if !page.text.is_empty() {
                from = page.next;
                let data = serde_json::to_string(&page.text).unwrap_or_default();
                return Some((Ok(Event::default().event("log").data(data)), (ui, id, from, false, shown)));
            }
            match ui.queue.get(&id).await {
                Ok(job) => {
                    let status = job_status(&job);
                    if status != shown {
                        let event = Event::default().event("status").data(status.clone());
                        return Some((Ok(event), (ui, id, from, false, status)));
                    }
                    if !job.state.is_terminal() {
                        tokio::time::sleep(POLL_EVERY).await;
                        continue;
                    }
                    let end = Event::default().event("end").data(format!("({})", job.state));
                    return Some((Ok(end), (ui, id, from, true, shown)));
                }
                Err(e) => {
                    let end = Event::default().event("end").data(format!("cannot read the job: {e}"));
                    return Some((Ok(end), (ui, id, from, true, shown)));
                }
            }
        }
    });
    // The turn goes with the stream, when the page closes it.
    let stream = futures_util::StreamExt::map(stream, move |e| {
        let _held = &turn;
        e
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// The `csrf` field of an action's form body (`csrf=HEX`).
fn csrf_field(body: &[u8]) -> Option<&str> {
    std::str::from_utf8(body).ok()?.split('&').find_map(|kv| kv.strip_prefix("csrf="))
}

/// A form field's value, decoded (`+` is a space, `%XX` a byte).
fn form_field(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let raw = text.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?;
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: String = [bytes.next()?, bytes.next()?].iter().map(|b| *b as char).collect();
                out.push(u8::from_str_radix(&hex, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// A path in a URL: each segment encoded, the slashes kept.
fn enc_path(path: &str) -> String {
    path.split('/').map(enc).collect::<Vec<_>>().join("/")
}

/// "Push a copy with edited args": the job again, with the args the form
/// gives (a JSON object), as a new job outside any sweep.
async fn copy(ui: &Ui, id: &JobId, body: &[u8]) -> std::result::Result<Result<JobId>, Box<Response>> {
    let job = match ui.queue.get(id).await {
        Ok(job) => job,
        Err(e) => return Ok(Err(e)),
    };
    let text = form_field(body, "args").unwrap_or_default();
    let bad = |m: String| Err(Box::new(page_error(StatusCode::BAD_REQUEST, &m)));
    let args = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(args)) => args,
        Ok(_) => return bad("args must be a JSON object, such as {\"lr\": 0.01}".to_owned()),
        Err(e) => return bad(format!("args are not JSON: {e}")),
    };
    let mut spec = job.spec;
    spec.args = args;
    spec.idempotency_key = None;
    spec.sweep = None;
    match ui.queue.add(spec).await {
        Ok(pushed) => Ok(Ok(pushed.into_id())),
        Err(Error::InvalidJob(m)) => bad(format!("the copy is not a valid job: {m}")),
        Err(e) => Ok(Err(e)),
    }
}

/// The most a download from the dashboard reads into memory; larger files
/// are fetched with `gpupool pull`. At most [`DOWNLOADS_AT_ONCE`] run at
/// once, so downloads hold at most 128 MiB.
const DOWNLOAD_MAX_BYTES: u64 = 64 << 20;
const DOWNLOADS_AT_ONCE: usize = 2;

/// Open job logs streamed at once (each reads the backend once a second).
const LOG_STREAMS_AT_ONCE: usize = 64;

/// One file a job's run kept in the artifact store.
async fn download(State(ui): State<Arc<Ui>>, Path((id, path)): Path<(String, String)>) -> Response {
    use gpupool::worker::ArtifactStore;
    let Some(id) = job_id(&id) else { return no_job(&id) };
    let job = match ui.queue.get(&id).await {
        Ok(job) => job,
        Err(e) => return backend_error(&e),
    };
    let Some(a) = job.artifacts.filter(|a| a.stored) else {
        return page_error(StatusCode::NOT_FOUND, &format!("job {id} has no files in an artifact store"));
    };
    let Some(file) = a.files.iter().find(|f| f.path == path) else {
        return page_error(StatusCode::NOT_FOUND, &format!("job {id} kept no file `{path}`"));
    };
    if file.size > DOWNLOAD_MAX_BYTES {
        let why =
            format!("`{path}` is {}; fetch it with `gpupool pull {id}`", gpupool::artifacts::human_size(file.size));
        return page_error(StatusCode::PAYLOAD_TOO_LARGE, &why);
    }
    let store = match ArtifactStore::at_location(&a.location, ui.artifacts.as_deref()) {
        Ok(s) => s,
        Err(e) => return page_error(StatusCode::SERVICE_UNAVAILABLE, &format!("cannot open the artifact store: {e}")),
    };
    let Ok(_turn) = ui.downloads.acquire().await else {
        return page_error(StatusCode::SERVICE_UNAVAILABLE, "the dashboard is stopping");
    };
    let Ok(tmp) = TempDir::new() else {
        return page_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot make a temporary folder");
    };
    let fetched = store.download(std::slice::from_ref(file), &tmp.0).await;
    let bytes = match fetched.and_then(|_| gpupool::worker::store::safe_join(&tmp.0, &file.path)) {
        Ok(local) => tokio::fs::read(local).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    drop(tmp);
    match bytes {
        Ok(bytes) => {
            let name = file.path.rsplit('/').next().unwrap_or("file");
            let ascii: String =
                name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { '_' }).collect();
            let disposition = format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{}", enc(name));
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (header::CONTENT_DISPOSITION, disposition),
                ],
                bytes,
            )
                .into_response()
        }
        Err(e) => page_error(StatusCode::SERVICE_UNAVAILABLE, &format!("cannot fetch `{path}`: {e}")),
    }
}

/// A fresh folder of this user's only (mode 700) under the system's
/// temporary directory, removed when dropped (also when the request is
/// dropped half way).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let name = random_hex(8).map_err(|e| std::io::Error::other(e.to_string()))?;
        let dir = std::env::temp_dir().join(format!("gpupool-ui-{name}"));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The job an action names, once the action is allowed (the token, and a
/// page's CSRF secret for a browser); else the page that says why not.
fn action_target(ui: &Ui, headers: &HeaderMap, id: &str, body: &[u8]) -> std::result::Result<JobId, Box<Response>> {
    if let Some(r) = refused(ui, headers, csrf_field(body)) {
        return Err(Box::new(r));
    }
    job_id(id).ok_or_else(|| Box::new(no_job(id)))
}

/// `POST /jobs/{id}/cancel`, `/retry` or `/copy`, once allowed
/// ([`action_target`]); each ends on the job's page (the copy's, for a
/// copy).
async fn act(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let id = match action_target(&ui, &headers, &id, &body) {
        Ok(id) => id,
        Err(page) => return *page,
    };
    let done = match action.as_str() {
        // Cancelled, asked to stop, or already ended: the job's page says which.
        "cancel" => ui.queue.request_cancel(&id).await.map(|_| id),
        "retry" => match ui.queue.retry(&id).await {
            Err(e @ Error::InvalidState { .. }) => return page_error(StatusCode::CONFLICT, &e.to_string()),
            other => other.map(|()| id),
        },
        "copy" => match copy(&ui, &id, &body).await {
            Ok(copied) => copied,
            Err(page) => return *page,
        },
        _ => return page_error(StatusCode::NOT_FOUND, &format!("no action `{action}`")),
    };
    match done {
        Ok(id) => Redirect::to(&format!("/jobs/{id}")).into_response(),
        Err(e) => backend_error(&e),
    }
}

fn workers_table(view: &View) -> String {
    if !view.tracked {
        return "<p class=note>This backend does not track workers.</p>".to_owned();
    }
    let holder: BTreeMap<(String, u32), String> = view
        .workers
        .iter()
        .flat_map(|w| {
            w.running.iter().flat_map(move |r| r.gpus.iter().map(move |g| ((w.name.clone(), *g), r.id.to_string())))
        })
        .collect();
    let mut s = String::from("<table><tr><th>Worker<th>Health<th>Queues<th>Slots<th>Running<th>GPUs</tr>");
    for w in &view.workers {
        let health = match (&w.unhealthy, w.lost, w.draining) {
            (_, true, _) => "lost".to_owned(),
            (Some(why), _, _) => format!("unhealthy: {why}"),
            (None, _, true) => "draining".to_owned(),
            _ => "ok".to_owned(),
        };
        let running: Vec<String> = w.running.iter().map(|r| job_link(r.id.as_str(), r.id.as_str())).collect();
        let gpus: Vec<String> = w
            .gpus
            .iter()
            .map(|g| {
                let job = holder
                    .get(&(w.name.clone(), g.index))
                    .map_or_else(|| "free".to_owned(), |j| job_link(j, &format!("job {j}")));
                let memory = if g.memory_total > 0 {
                    format!("{:.1}/{:.1} GiB", gib(g.memory_used), gib(g.memory_total))
                } else {
                    "memory unknown".to_owned()
                };
                let busy = g.utilization.map_or_else(|| "use unknown".to_owned(), |u| format!("{u}% busy"));
                format!("GPU {} {} · {memory} · {busy} · {job}", g.index, esc(&g.name))
            })
            .collect();
        let _ = write!(
            s,
            "<tr><td>{}<td>{}<td>{}<td>{}<td>{}<td>{}</tr>",
            esc(&w.name),
            esc(&health),
            esc(&w.queues.join(",")),
            w.slots,
            running.join(" "),
            gpus.join("<br>")
        );
    }
    s.push_str("</table>");
    if view.workers.is_empty() {
        s.push_str("<p class=note>No worker has reported.</p>");
    }
    s
}

async fn workers_page(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Html<String> {
    let table = workers_table(&ui.view.borrow());
    let body = format!("<h1>Workers</h1><div id=workers data-events=/events/workers>{table}</div>");
    page(&ui, &headers, "Workers", &body)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// The sweeps among the view's jobs: progress and the best run.
fn sweeps_table(view: &View) -> String {
    let mut sweeps: BTreeMap<String, Vec<&JobRecord>> = BTreeMap::new();
    for j in &view.jobs {
        if let Some(s) = &j.spec.sweep {
            sweeps.entry(s.id.clone()).or_default().push(j);
        }
    }
    let mut s = String::from("<table><tr><th>Sweep<th>Name<th>Runs<th>Queued<th>Running<th>Done<th>Best</tr>");
    for (id, runs) in &sweeps {
        let count = |st: JobState| runs.iter().filter(|j| j.state == st).count();
        let name = runs.iter().find_map(|j| j.spec.sweep.as_ref().and_then(|s| s.name.clone())).unwrap_or_default();
        let metric = runs.iter().find_map(|j| j.spec.sweep.as_ref().and_then(|s| s.metric.clone()));
        let best = metric.as_ref().and_then(|m| {
            runs.iter()
                .filter(|j| j.state == JobState::Succeeded)
                .filter_map(|j| metric_value(j, &m.name).map(|v| (j, v)))
                .reduce(|a, b| match m.goal {
                    Goal::Minimize if b.1 < a.1 => b,
                    Goal::Maximize if b.1 > a.1 => b,
                    _ => a,
                })
                .map(|(j, v)| format!("{}: {} {v}", job_link(j.id.as_str(), j.id.as_str()), esc(&m.name)))
        });
        let _ = write!(
            s,
            "<tr><td><a href=\"/sweeps/{link}\">{id}</a><td>{}<td>{}<td>{}<td>{}<td>{}<td>{}</tr>",
            esc(&name),
            runs.len(),
            count(JobState::Queued),
            count(JobState::Running),
            runs.iter().filter(|j| j.state.is_terminal()).count(),
            best.unwrap_or_else(|| "-".to_owned()),
            id = esc(id),
            link = esc(&enc(id))
        );
    }
    s.push_str("</table>");
    if sweeps.is_empty() {
        s.push_str("<p class=note>No sweep among the newest jobs.</p>");
    }
    s
}

async fn sweeps_page(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Html<String> {
    let table = sweeps_table(&ui.view.borrow());
    let body = format!("<h1>Sweeps</h1><div id=sweeps data-events=/events/sweeps>{table}</div>");
    page(&ui, &headers, "Sweeps", &body)
}

/// One sweep's runs, best first by its metric.
fn sweep_runs(view: &View, id: &str) -> Option<String> {
    let mut runs: Vec<JobRecord> =
        view.jobs.iter().filter(|j| j.spec.sweep.as_ref().is_some_and(|s| s.id == id)).cloned().collect();
    if runs.is_empty() {
        return None;
    }
    runs.sort_by_key(|r| r.spec.sweep.as_ref().map_or(0, |s| s.index));
    if let Some(m) = runs.iter().find_map(|j| j.spec.sweep.as_ref().and_then(|s| s.metric.clone())) {
        rank(&mut runs, &m);
    }
    let keys = crate::result_keys(&runs);
    let mut s = String::from("<table><tr><th>ID<th>State<th>Run<th>Args");
    for k in &keys {
        let _ = write!(s, "<th>{}", esc(k));
    }
    s.push_str("</tr>");
    for r in &runs {
        let args = serde_json::to_string(&r.spec.args).unwrap_or_default();
        let _ = write!(
            s,
            "<tr><td><a href=\"/jobs/{0}\">{0}</a><td>{1}<td>#{2}<td>{3}",
            esc(r.id.as_str()),
            state_cell(r.state),
            r.spec.sweep.as_ref().map_or(0, |s| s.index),
            esc(&args)
        );
        for k in &keys {
            let _ = write!(s, "<td>{}", esc(&crate::result_cell(r.result.as_ref().and_then(|res| res.get(k)))));
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    Some(s)
}

/// What the sweep chart plots: for each numeric swept argument, the
/// sweep's metric of each succeeded run against that argument's value.
fn chart_data(view: &View, id: &str) -> serde_json::Value {
    let runs: Vec<&JobRecord> = view
        .jobs
        .iter()
        .filter(|j| j.spec.sweep.as_ref().is_some_and(|s| s.id == id) && j.state == JobState::Succeeded)
        .collect();
    let Some(metric) = runs.iter().find_map(|j| j.spec.sweep.as_ref().and_then(|s| s.metric.clone())) else {
        return serde_json::json!({"metric": null, "params": {}});
    };
    let mut params: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for run in &runs {
        let Some(y) = metric_value(run, &metric.name) else { continue };
        for (name, value) in &run.spec.args {
            if let Some(x) = value.as_f64() {
                params.entry(name.clone()).or_default().push((x, y));
            }
        }
    }
    for points in params.values_mut() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    // An argument with one value over all runs says nothing.
    params.retain(|_, points| points.windows(2).any(|w| w[0].0 != w[1].0));
    serde_json::json!({"metric": metric.name, "params": params})
}

async fn sweep_page(State(ui): State<Arc<Ui>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let Some(table) = sweep_runs(&ui.view.borrow(), &id) else {
        return page_error(StatusCode::NOT_FOUND, &format!("no sweep `{id}` among the newest {VIEW_JOBS} jobs"));
    };
    let data = chart_data(&ui.view.borrow(), &id).to_string().replace('<', "\\u003c");
    let body = format!(
        "<link rel=stylesheet href=/assets/uplot.css><script src=/assets/uplot.js></script>\
         <h1>Sweep {0}</h1><div id=charts></div><script type=application/json id=sweep-data>{data}</script>\
         <div id=runs data-events=\"/events/sweep?sweep={1}\">{table}</div>",
        esc(&id),
        esc(&enc(&id))
    );
    page(&ui, &headers, &format!("Sweep {id}"), &body).into_response()
}

/// A page part as a stream of `update` events: the part rendered again
/// from each new view (no backend read of its own).
async fn events(State(ui): State<Arc<Ui>>, Path(kind): Path<String>, Query(query): Query<JobsQuery>) -> Response {
    if !matches!(kind.as_str(), "jobs" | "workers" | "sweeps" | "sweep") {
        return page_error(StatusCode::NOT_FOUND, "no such event stream");
    }
    let render = move |view: &View| -> Option<String> {
        match kind.as_str() {
            "jobs" => Some(jobs_table(view, &query)),
            "workers" => Some(workers_table(view)),
            "sweeps" => Some(sweeps_table(view)),
            "sweep" => sweep_runs(view, &query.sweep),
            _ => None,
        }
    };
    let rx = ui.view.clone();
    let stream = updates(rx, render);
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn updates(
    rx: watch::Receiver<Arc<View>>,
    render: impl Fn(&View) -> Option<String> + Send + 'static,
) -> impl Stream<Item = std::result::Result<Event, std::convert::Infallible>> + Send {
    stream::unfold((rx, render), |(mut rx, render)| async move {
        rx.changed().await.ok()?;
        let view = rx.borrow_and_update().clone();
        let html = render(&view).unwrap_or_default();
        Some((Ok(Event::default().event("update").data(html)), (rx, render)))
    })
}
