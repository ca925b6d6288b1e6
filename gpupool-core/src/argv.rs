//! Turning a job into the argv of its process. No shell, ever: each item is
//! passed to `execve` as it is.
//!
//! `argv = command… entrypoint --k1 v1 --k2 v2 …`. Strings are one item;
//! numbers their JSON text; arrays several items; `true` a bare `--key`;
//! `false` and `null` are left out.

use serde_json::Value;

use crate::job::Args;

/// The placeholder in a worker's command template that becomes the number of
/// GPUs given to the run (`torchrun --nproc_per_node={gpus}`).
pub const GPUS_PLACEHOLDER: &str = "{gpus}";

/// Builds the argv of a run.
///
/// `command` is the worker's template (default `["python3"]`); `{gpus}` in
/// its items becomes `gpus`. An object value, which validation refuses at
/// push, would be passed as its JSON text.
pub fn build_argv(command: &[String], entrypoint: &str, args: &Args, gpus: u32) -> Vec<String> {
    let mut argv: Vec<String> = command.iter().map(|c| c.replace(GPUS_PLACEHOLDER, &gpus.to_string())).collect();
    argv.push(entrypoint.to_owned());
    argv.extend(args_to_argv(args));
    argv
}

/// Just the `--key value…` part.
pub fn args_to_argv(args: &Args) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() * 2);
    for (key, value) in args {
        match value {
            Value::Null | Value::Bool(false) => {}
            Value::Bool(true) => out.push(format!("--{key}")),
            Value::Array(items) => {
                out.push(format!("--{key}"));
                out.extend(items.iter().map(item_text));
            }
            other => {
                out.push(format!("--{key}"));
                out.push(item_text(other));
            }
        }
    }
    out
}

fn item_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
