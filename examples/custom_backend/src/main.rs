//! `gpupool-pg`: the whole `gpupool` command, with PostgreSQL besides the
//! built-in backends. `gpupool-pg --queue postgres://user@db/pool init`.

fn main() -> std::process::ExitCode {
    let mut registry = gpupool::Registry::with_defaults();
    registry.add::<gpupool_postgres_example::PgQueue>(); // postgres:// and postgresql://
    gpupool_cli::main_with(registry)
}
