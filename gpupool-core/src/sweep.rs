//! Sweeps: many runs of one script over a grid, or random draws, of its
//! arguments, written in W&B's sweep configuration format so that a team
//! brings the files it already has (`gpupool sweep FILE`).
//!
//! ```yaml
//! method: random            # or grid
//! metric: {name: val_loss, goal: minimize}
//! run_cap: 12
//! program: train.py
//! parameters:
//!   lr: {distribution: log_uniform_values, min: 0.0001, max: 0.1}
//!   batch_size: {values: [32, 64, 128]}
//!   epochs: {value: 10}
//! # gpupool's own job fields:
//! git_ref: main
//! gpus: 1
//! ```
//!
//! Parameters take `value`, `values`, or a `distribution` (`uniform`,
//! `int_uniform`, `log_uniform_values`, `q_uniform`,
//! `q_log_uniform_values`, `categorical`) with `min`, `max` and `q`; with
//! `min` and `max` and no distribution, two integers mean `int_uniform`,
//! anything else `uniform`. A grid takes `value`, `values` and
//! `int_uniform` (each integer of the range), in the order written, the
//! first parameter varying slowest; `run_cap` keeps its first points. A
//! random sweep needs `run_cap`.
//!
//! Each run is a job whose args are its point, named by the sweep and
//! carrying a [`SweepRef`]. Its idempotency key is the sweep's id and its
//! index, and the id is a hash of the configuration (all but `run_cap`),
//! so pushing the same file again adds nothing. Random draws come from a
//! generator seeded by
//! the sweep's id and the run's index (our own, so they never change with
//! a library's version): raising `run_cap` and pushing again adds only the
//! new runs.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, JobRecord, JobSpec, Result};

/// The metric a sweep ranks its runs by: a key of their results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    /// The result's key (`GPUPOOL_RESULT {"val_loss": …}`).
    pub name: String,
    /// Whether lower or higher is better.
    pub goal: Goal,
}

/// Whether lower or higher is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// Lower is better.
    Minimize,
    /// Higher is better.
    Maximize,
}

/// What a job of a sweep knows of it ([`JobSpec::sweep`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepRef {
    /// The sweep's id.
    pub id: String,
    /// This run's place in the sweep, from 0.
    pub index: u32,
    /// The sweep's name, when its file gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The metric the sweep ranks its runs by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
}

/// How the points are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Every combination of the values.
    Grid,
    /// `run_cap` independent draws.
    Random,
}

/// A distribution to draw a parameter from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dist {
    Uniform,
    IntUniform,
    LogUniformValues,
    QUniform,
    QLogUniformValues,
}

const DISTRIBUTIONS: &str = "uniform, int_uniform, log_uniform_values, q_uniform, q_log_uniform_values, categorical";

/// One swept parameter.
#[derive(Debug, Clone, PartialEq)]
enum Param {
    Value(Value),
    Values(Vec<Value>),
    Draw { dist: Dist, min: f64, max: f64, q: f64 },
}

/// A parsed sweep: its id, and everything needed to make its jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// A hash of the configuration but `run_cap` (12 hex digits).
    pub id: String,
    /// `name` from the file.
    pub name: Option<String>,
    /// `method`.
    pub method: Method,
    /// `metric`.
    pub metric: Option<Metric>,
    /// `run_cap`.
    pub run_cap: Option<u32>,
    params: Vec<(String, Param)>,
    /// The job every run starts from: `program` and gpupool's own fields.
    base: JobSpec,
}

/// Keys of W&B's format that gpupool reads, and its own job fields.
const KEYS: &[&str] = &[
    "method",
    "parameters",
    "metric",
    "run_cap",
    "program",
    "name",
    "description",
    "project",
    "entity",
    "git_ref",
    "repo",
    "gpus",
    "queue",
    "priority",
    "timeout",
    "max_attempts",
    "retry",
    "env",
];

fn bad(field: &str, problem: impl std::fmt::Display) -> Error {
    Error::InvalidJob(format!("sweep: `{field}`: {problem}"))
}

impl Sweep {
    /// Reads a sweep configuration (a YAML or JSON document, parsed).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidJob`] naming the field and the problem.
    pub fn from_value(config: &Value) -> Result<Sweep> {
        let Some(map) = config.as_object() else {
            return Err(Error::InvalidJob("sweep: the file is not a mapping of fields (method, parameters, …)".into()));
        };
        for key in map.keys() {
            match key.as_str() {
                k if KEYS.contains(&k) => {}
                "command" => {
                    return Err(bad(
                        "command",
                        "not supported: each run starts `program` with its point as arguments (`--lr 0.01`)",
                    ));
                }
                "early_terminate" => return Err(bad("early_terminate", "not supported yet")),
                other => return Err(bad(other, format!("unknown field; expected one of {}", KEYS.join(", ")))),
            }
        }
        let method = match map.get("method").and_then(Value::as_str) {
            Some("grid") => Method::Grid,
            Some("random") => Method::Random,
            Some("bayes") => return Err(bad("method", "`bayes` is not supported yet; use grid or random")),
            Some(other) => return Err(bad("method", format!("`{other}` is not a method; use grid or random"))),
            None => return Err(bad("method", "missing; use grid or random")),
        };
        let metric = map.get("metric").map(metric).transpose()?;
        let run_cap = match map.get("run_cap") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| (1..=MAX_RUNS as u32).contains(n))
                    .ok_or_else(|| bad("run_cap", format!("{v} is not a whole number from 1 to {MAX_RUNS}")))?,
            ),
        };
        if method == Method::Random && run_cap.is_none() {
            return Err(bad("run_cap", "a random sweep needs one (how many runs to draw)"));
        }
        let name = optional_str(map, "name")?;
        let base = base_job(map)?;
        let Some(params) = map.get("parameters").and_then(Value::as_object).filter(|p| !p.is_empty()) else {
            return Err(bad(
                "parameters",
                "missing or empty; give each swept argument `value`, `values` or a distribution",
            ));
        };
        let params = params.iter().map(|(k, v)| Ok((k.clone(), param(k, v, method)?))).collect::<Result<Vec<_>>>()?;
        // The id leaves run_cap out: raising it adds runs to the same sweep.
        let mut identity = map.clone();
        identity.remove("run_cap");
        let id = format!("{:012x}", fnv1a(Value::Object(identity).to_string().as_bytes()) >> 16);
        Ok(Sweep { id, name, method, metric, run_cap, params, base })
    }

    /// The sweep's jobs, in order, each checked as `push` checks it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidJob`] when a job would be refused (the message names
    /// the run), or a grid has more than 100,000 points.
    pub fn jobs(&self) -> Result<Vec<JobSpec>> {
        let points = match self.method {
            Method::Grid => self.grid()?,
            Method::Random => {
                let seed = u64::from_str_radix(&self.id, 16).unwrap_or(0);
                (0..self.run_cap.unwrap_or(0)).map(|i| self.draw(seed, i)).collect()
            }
        };
        points
            .into_iter()
            .enumerate()
            .map(|(i, point)| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let mut spec = self.base.clone();
                spec.args = point;
                spec.name = Some(format!("{}#{index}", self.name.as_deref().unwrap_or(&self.id)));
                spec.idempotency_key = Some(format!("sweep-{}-{index}", self.id));
                spec.sweep =
                    Some(SweepRef { id: self.id.clone(), index, name: self.name.clone(), metric: self.metric.clone() });
                spec.validate().map_err(|e| match e {
                    Error::InvalidJob(m) => Error::InvalidJob(format!("sweep: run {index}: {m}")),
                    other => other,
                })?;
                Ok(spec)
            })
            .collect()
    }

    /// Every combination, the first parameter varying slowest, up to `run_cap`.
    fn grid(&self) -> Result<Vec<Map<String, Value>>> {
        let axes: Vec<(&String, Vec<Value>)> = self
            .params
            .iter()
            .map(|(k, p)| {
                let values = match p {
                    Param::Value(v) => vec![v.clone()],
                    Param::Values(vs) => vs.clone(),
                    // int_uniform is checked to be a small range at parse.
                    #[allow(clippy::cast_possible_truncation)]
                    Param::Draw { dist: Dist::IntUniform, min, max, .. } => {
                        ((*min as i64)..=(*max as i64)).map(Value::from).collect()
                    }
                    // Refused for a grid when the sweep was read.
                    Param::Draw { .. } => Vec::new(),
                };
                (k, values)
            })
            .collect();
        let total = axes.iter().try_fold(1usize, |n, (_, vs)| n.checked_mul(vs.len())).unwrap_or(usize::MAX);
        let take = self.run_cap.map_or(total, |cap| total.min(cap as usize));
        if take > MAX_RUNS {
            return Err(bad("parameters", format!("the grid has {total} points; at most {MAX_RUNS} (set run_cap)")));
        }
        Ok((0..take)
            .map(|mut i| {
                let mut point = vec![Value::Null; axes.len()];
                for (slot, (_, vs)) in point.iter_mut().zip(&axes).rev() {
                    *slot = vs[i % vs.len()].clone();
                    i /= vs.len();
                }
                axes.iter().map(|(k, _)| (*k).clone()).zip(point).collect()
            })
            .collect())
    }

    /// Run `index`'s point of a random sweep.
    fn draw(&self, seed: u64, index: u32) -> Map<String, Value> {
        let mut rng = SplitMix64(seed ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.params
            .iter()
            .map(|(k, p)| {
                let v = match p {
                    Param::Value(v) => v.clone(),
                    Param::Values(vs) => vs[rng.below(vs.len())].clone(),
                    Param::Draw { dist, min, max, q } => sample(*dist, *min, *max, *q, &mut rng),
                };
                (k.clone(), v)
            })
            .collect()
    }
}

/// The most runs one sweep may push.
const MAX_RUNS: usize = 100_000;

fn optional_str(map: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(key, format!("{other} is not text"))),
    }
}

fn metric(v: &Value) -> Result<Metric> {
    let name = v.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
    let Some(name) = name else { return Err(bad("metric.name", "missing (the result key to rank runs by)")) };
    let goal = match v.get("goal").and_then(Value::as_str) {
        None | Some("minimize") => Goal::Minimize,
        Some("maximize") => Goal::Maximize,
        Some(other) => return Err(bad("metric.goal", format!("`{other}` is not minimize or maximize"))),
    };
    if let Some(extra) = v.as_object().and_then(|m| m.keys().find(|k| !matches!(k.as_str(), "name" | "goal"))) {
        return Err(bad(&format!("metric.{extra}"), "not supported (name and goal are)"));
    }
    Ok(Metric { name: name.to_owned(), goal })
}

/// The job every run starts from: `program` and gpupool's own fields,
/// read as the job JSON reads them.
fn base_job(map: &Map<String, Value>) -> Result<JobSpec> {
    let text = |key: &str, what: &str| match map.get(key) {
        None => Err(bad(key, format!("missing ({what})"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(bad(key, format!("{other} is not text ({what})"))),
    };
    let program = text("program", "the script each run starts, as in the repository")?;
    let git_ref = text("git_ref", "the branch, tag or commit the runs check out")?;
    let mut job = Map::new();
    job.insert("git_ref".into(), git_ref.into());
    job.insert("entrypoint".into(), program.into());
    for key in ["repo", "gpus", "queue", "priority", "timeout", "max_attempts", "retry", "env"] {
        if let Some(v) = map.get(key) {
            job.insert(key.into(), v.clone());
        }
    }
    serde_path_to_error::deserialize::<_, JobSpec>(Value::Object(job)).map_err(|e| {
        let field = e.path().to_string();
        bad(if field == "entrypoint" { "program" } else { &field }, e.into_inner())
    })
}

fn number(field: &str, v: Option<&Value>) -> Result<Option<f64>> {
    match v {
        None => Ok(None),
        Some(n) => n.as_f64().map(Some).ok_or_else(|| bad(field, format!("{n} is not a number"))),
    }
}

/// One parameter's specification: a value, values, or a distribution.
fn param(name: &str, v: &Value, method: Method) -> Result<Param> {
    let field = |k: &str| format!("parameters.{name}.{k}");
    let Some(spec) = v.as_object() else {
        return Err(bad(&format!("parameters.{name}"), "give `value`, `values` or a distribution with min and max"));
    };
    for k in spec.keys() {
        if !matches!(k.as_str(), "value" | "values" | "distribution" | "min" | "max" | "q") {
            let why = if k == "parameters" { "nested parameters are not supported" } else { "not supported" };
            return Err(bad(&field(k), why));
        }
    }
    let argument = |k: &str, v: &Value| match v {
        Value::Object(_) => Err(bad(&field(k), format!("{v}: an object cannot be an argument"))),
        Value::Array(items) if items.iter().any(|i| i.is_object() || i.is_array()) => {
            Err(bad(&field(k), format!("{v}: a list argument holds only plain values")))
        }
        _ => Ok(()),
    };
    if let Some(v) = spec.get("value") {
        if spec.len() > 1 {
            return Err(bad(&format!("parameters.{name}"), "`value` goes alone"));
        }
        argument("value", v)?;
        return Ok(Param::Value(v.clone()));
    }
    let dist = spec.get("distribution").map(|d| d.as_str().unwrap_or("?"));
    if let Some(values) = spec.get("values") {
        let Some(values) = values.as_array().filter(|a| !a.is_empty()) else {
            return Err(bad(&field("values"), "must be a list of at least one value"));
        };
        if !matches!(dist, None | Some("categorical")) {
            return Err(bad(&field("distribution"), "goes with min and max, not with values"));
        }
        if let Some(k) = ["min", "max", "q"].into_iter().find(|k| spec.contains_key(*k)) {
            return Err(bad(&field(k), "goes with a distribution, not with values"));
        }
        for v in values {
            argument("values", v)?;
        }
        return Ok(Param::Values(values.clone()));
    }
    distribution(name, spec, dist, method)
}

/// A parameter drawn from a distribution (`min`, `max`, and `q` for the
/// quantized ones); `dist` as written, if it is.
fn distribution(name: &str, spec: &Map<String, Value>, dist: Option<&str>, method: Method) -> Result<Param> {
    let field = |k: &str| format!("parameters.{name}.{k}");
    let (min, max) = (number(&field("min"), spec.get("min"))?, number(&field("max"), spec.get("max"))?);
    let ints = spec.get("min").is_some_and(Value::is_i64) && spec.get("max").is_some_and(Value::is_i64);
    let dist = match dist {
        Some("uniform") => Dist::Uniform,
        Some("int_uniform") => Dist::IntUniform,
        Some("log_uniform_values") => Dist::LogUniformValues,
        Some("q_uniform") => Dist::QUniform,
        Some("q_log_uniform_values") => Dist::QLogUniformValues,
        Some("categorical") => return Err(bad(&field("values"), "missing (categorical draws from values)")),
        Some(other) => {
            return Err(bad(&field("distribution"), format!("`{other}` is not supported; use one of {DISTRIBUTIONS}")));
        }
        None if ints => Dist::IntUniform,
        None => Dist::Uniform,
    };
    let (Some(min), Some(max)) = (min, max) else {
        let missing = if min.is_none() { "min" } else { "max" };
        return Err(bad(&field(missing), "missing (a distribution needs min and max)"));
    };
    if !(min.is_finite() && max.is_finite() && (max - min).is_finite())
        || min > max
        || (min == max && dist != Dist::IntUniform)
    {
        return Err(bad(&format!("parameters.{name}"), format!("min {min} must be below max {max}")));
    }
    let whole = |k: &str| spec.get(k).and_then(Value::as_i64).is_some_and(|n| n.abs() < 1 << 53);
    if dist == Dist::IntUniform && !(whole("min") && whole("max")) {
        return Err(bad(&format!("parameters.{name}"), "int_uniform needs whole numbers for min and max"));
    }
    if spec.contains_key("q") && !matches!(dist, Dist::QUniform | Dist::QLogUniformValues) {
        return Err(bad(&field("q"), "goes with q_uniform or q_log_uniform_values"));
    }
    if matches!(dist, Dist::LogUniformValues | Dist::QLogUniformValues) && min <= 0.0 {
        return Err(bad(&field("min"), format!("{min}: a log distribution needs min above 0")));
    }
    let q = number(&field("q"), spec.get("q"))?.unwrap_or(1.0);
    if !(q.is_finite() && q > 0.0 && q >= (max - min).abs() * 1e-12) {
        return Err(bad(&field("q"), format!("{q} must be above 0")));
    }
    if method == Method::Grid {
        if dist != Dist::IntUniform {
            return Err(bad(
                &format!("parameters.{name}"),
                "a grid needs `value`, `values` or an int_uniform range; other distributions are for random",
            ));
        }
        if max - min >= MAX_RUNS as f64 {
            return Err(bad(&format!("parameters.{name}"), format!("the range {min}..{max} is too big for a grid")));
        }
    }
    Ok(Param::Draw { dist, min, max, q })
}

/// A draw from a distribution.
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
fn sample(dist: Dist, min: f64, max: f64, q: f64, rng: &mut SplitMix64) -> Value {
    let u = rng.unit();
    // 12 significant digits: 0.1 * 3 reads 0.3, not 0.30000000000000004,
    // and a platform's `ln`/`exp` differing in the last bit draws the same.
    let round = |x: f64| -> Value {
        if x == 0.0 || !x.is_finite() {
            return Value::from(x);
        }
        let scale = 10f64.powi(11 - x.abs().log10().floor() as i32);
        let v = (x * scale).round() / scale;
        Value::from(if v.is_finite() { v } else { x })
    };
    let quantize = |x: f64| round((x / q).round() * q);
    match dist {
        Dist::Uniform => round(min + u * (max - min)),
        Dist::IntUniform => {
            let (lo, hi) = (min.ceil() as i64, max.floor() as i64);
            let span = u64::try_from(hi.saturating_sub(lo)).unwrap_or(0).saturating_add(1);
            Value::from(lo.saturating_add(i64::try_from(rng.next() % span).unwrap_or(0)))
        }
        Dist::LogUniformValues => round((min.ln() + u * (max.ln() - min.ln())).exp()),
        Dist::QUniform => quantize(min + u * (max - min)),
        Dist::QLogUniformValues => quantize((min.ln() + u * (max.ln() - min.ln())).exp()),
    }
}

/// SplitMix64: small, and the same on every version of gpupool.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in [0, 1).
    #[allow(clippy::cast_precision_loss)]
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index below `n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A run's value of `metric`, when its results hold a number for it.
pub fn metric_value(record: &JobRecord, metric: &str) -> Option<f64> {
    record.result.as_ref()?.get(metric)?.as_f64()
}

/// Sorts a sweep's runs best first by `metric`: succeeded runs that report
/// it, then other runs that report it, then the rest in id order.
pub fn rank(records: &mut [JobRecord], metric: &Metric) {
    let value = |r: &JobRecord| metric_value(r, &metric.name);
    // Succeeded runs first: a failed run's last reported value is not a result.
    let done = |r: &JobRecord| r.state == crate::JobState::Succeeded && value(r).is_some();
    records.sort_by(|a, b| {
        if done(a) != done(b) {
            return done(b).cmp(&done(a));
        }
        let (x, y) = (value(a), value(b));
        match (x, y) {
            (Some(x), Some(y)) => {
                let order = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
                if metric.goal == Goal::Minimize { order } else { order.reverse() }
            }
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => {
                let n = |r: &JobRecord| r.id.as_str().parse::<u64>().unwrap_or(u64::MAX);
                n(a).cmp(&n(b)).then_with(|| a.id.cmp(&b.id))
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn sweep(v: Value) -> Result<Sweep> {
        Sweep::from_value(&v)
    }

    #[test]
    fn a_grid_is_every_combination_in_the_order_written() {
        let s = sweep(json!({
            "method": "grid", "program": "train.py", "git_ref": "main",
            "parameters": {"lr": {"values": [0.1, 0.01]}, "bs": {"values": [16, 32, 64]}, "ep": {"value": 3}},
            "metric": {"name": "loss", "goal": "minimize"}, "queue": "gpu", "gpus": 2
        }))
        .unwrap();
        let jobs = s.jobs().unwrap();
        assert_eq!(jobs.len(), 6);
        let points: Vec<(f64, i64)> =
            jobs.iter().map(|j| (j.args["lr"].as_f64().unwrap(), j.args["bs"].as_i64().unwrap())).collect();
        assert_eq!(points, [(0.1, 16), (0.1, 32), (0.1, 64), (0.01, 16), (0.01, 32), (0.01, 64)]);
        assert_eq!(jobs[0].args.keys().collect::<Vec<_>>(), ["lr", "bs", "ep"]);
        assert_eq!((jobs[5].queue.as_str(), jobs[5].gpus), ("gpu", Some(2)));
        assert_eq!(jobs[5].idempotency_key.as_deref(), Some(format!("sweep-{}-5", s.id).as_str()));
        assert_eq!(jobs[5].sweep.as_ref().unwrap().index, 5);
        // The same file, the same id; another file, another.
        let again = sweep(json!({
            "method": "grid", "program": "train.py", "git_ref": "main",
            "parameters": {"lr": {"values": [0.1, 0.01]}, "bs": {"values": [16, 32, 64]}, "ep": {"value": 3}},
            "metric": {"name": "loss", "goal": "minimize"}, "queue": "gpu", "gpus": 2
        }))
        .unwrap();
        assert_eq!(again.id, s.id);
        assert_eq!(again.jobs().unwrap(), jobs);
        let grid = |cap: u64| {
            sweep(json!({"method": "grid", "program": "t.py", "git_ref": "main", "run_cap": cap,
                "parameters": {"n": {"distribution": "int_uniform", "min": 1, "max": 4}}}))
            .unwrap()
        };
        assert_eq!(grid(3).jobs().unwrap().len(), 3, "run_cap keeps the first points");
        assert_eq!(
            grid(10).jobs().unwrap().iter().map(|j| j.args["n"].as_i64().unwrap()).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn random_draws_stay_within_their_bounds_and_repeat() {
        let config = json!({
            "method": "random", "program": "train.py", "git_ref": "main", "run_cap": 200,
            "parameters": {
                "lr": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.1},
                "drop": {"distribution": "uniform", "min": 0.0, "max": 0.5},
                "depth": {"min": 2, "max": 8},
                "wd": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.1},
                "m": {"distribution": "q_log_uniform_values", "min": 1, "max": 1000, "q": 10},
                "opt": {"distribution": "categorical", "values": ["adam", "sgd"]},
                "bs": {"values": [16, 32]}
            }
        });
        let jobs = sweep(config.clone()).unwrap().jobs().unwrap();
        assert_eq!(jobs.len(), 200);
        let mut depths = std::collections::BTreeSet::new();
        for j in &jobs {
            let lr = j.args["lr"].as_f64().unwrap();
            assert!((0.0001..=0.1).contains(&lr), "{lr}");
            let drop = j.args["drop"].as_f64().unwrap();
            assert!((0.0..0.5).contains(&drop));
            let depth = j.args["depth"].as_i64().unwrap();
            assert!((2..=8).contains(&depth));
            depths.insert(depth);
            let wd = j.args["wd"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&wd) && ((wd * 10.0).round() - wd * 10.0).abs() < 1e-9, "{wd}");
            let m = j.args["m"].as_f64().unwrap();
            assert!((0.0..=1000.0).contains(&m) && m % 10.0 == 0.0, "{m}");
            assert!(["adam", "sgd"].contains(&j.args["opt"].as_str().unwrap()));
        }
        assert_eq!(depths.len(), 7, "every depth drawn in 200 runs");
        assert_eq!(sweep(config.clone()).unwrap().jobs().unwrap(), jobs, "the same draws again");
        // Raising run_cap keeps the earlier runs as they were.
        let mut more = config;
        more["run_cap"] = json!(250);
        let more_jobs = sweep(more).unwrap().jobs().unwrap();
        let args = |js: &[JobSpec]| js.iter().map(|j| j.args.clone()).collect::<Vec<_>>();
        assert_eq!(args(&more_jobs[..200]), args(&jobs));
    }

    #[test]
    fn bad_sweeps_are_refused_naming_the_field() {
        let base = || {
            json!({"method": "random", "program": "t.py", "git_ref": "main", "run_cap": 3,
            "parameters": {"lr": {"min": 0.1, "max": 1.0}}})
        };
        let refused = |edit: &dyn Fn(&mut Value), says: &str| {
            let mut v = base();
            edit(&mut v);
            match Sweep::from_value(&v).and_then(|s| s.jobs()) {
                Err(Error::InvalidJob(m)) => assert!(m.contains(says), "{says}: {m}"),
                other => panic!("{says}: {other:?}"),
            }
        };
        refused(&|v| v["parameters"]["lr"]["distribution"] = json!("normal"), "parameters.lr.distribution");
        refused(&|v| v["parameters"]["lr"]["distribution"] = json!("normal"), "`normal` is not supported");
        refused(&|v| v["parameters"]["lr"] = json!({"min": 2, "max": 1}), "min 2 must be below max 1");
        refused(
            &|v| v["parameters"]["lr"] = json!({"distribution": "log_uniform_values", "min": 0, "max": 1}),
            "a log distribution needs min above 0",
        );
        refused(&|v| v["parameters"]["lr"] = json!({"distribution": "uniform", "max": 1}), "parameters.lr.min");
        refused(&|v| v["parameters"]["lr"] = json!({"values": []}), "parameters.lr.values");
        refused(&|v| v["parameters"]["lr"] = json!({"parameters": {}}), "nested parameters");
        refused(&|v| v["method"] = json!("bayes"), "`bayes` is not supported yet");
        refused(&|v| v["method"] = json!("grid"), "a grid needs");
        refused(&|v| v.as_object_mut().unwrap().remove("run_cap").map(|_| ()).unwrap_or(()), "run_cap");
        refused(&|v| v["run_cap"] = json!(0), "run_cap");
        refused(&|v| v["metric"] = json!({"name": "loss", "goal": "lowest"}), "metric.goal");
        refused(&|v| v["learning"] = json!(1), "`learning`: unknown field");
        refused(&|v| v.as_object_mut().unwrap().remove("git_ref").map(|_| ()).unwrap_or(()), "git_ref");
        refused(&|v| v["env"] = json!({"LD_PRELOAD": "/x.so"}), "LD_PRELOAD");
        refused(&|v| v["program"] = json!("../x.py"), "run 0");
        refused(&|v| v["command"] = json!(["python", "x.py"]), "`command`");
        refused(&|v| v["run_cap"] = json!(4_000_000_000u64), "run_cap");
        refused(&|v| v["parameters"]["lr"] = json!({"distribution": "int_uniform", "min": 0.5, "max": 3}), "whole");
        refused(&|v| v["parameters"]["lr"] = json!({"min": 0.1, "max": 1.0, "q": 0.1}), "parameters.lr.q");
        refused(&|v| v["parameters"]["lr"] = json!({"values": [1, {"a": 2}]}), "an object cannot be an argument");
        refused(&|v| v["parameters"]["lr"] = json!({"values": [1, 2], "min": 0}), "parameters.lr.min");
        refused(&|v| v["parameters"]["lr"] = json!({"min": -1e308, "max": 1e308}), "must be below max");
        refused(&|v| v["program"] = json!(7), "`program`: 7 is not text");
        refused(&|v| v["gpus"] = json!("two"), "`gpus`");
    }
}
