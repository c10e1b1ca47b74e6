//! Entry point: parse the command line, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = match mes_gateway::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(64),
            };
        }
    };
    init_tracing();
    match mes_gateway::cli::execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs go to stderr (journald under systemd; stdout stays free for command output such
/// as `--dry-run` messages). Under systemd (JOURNAL_STREAM set) the journal adds
/// timestamps itself, so ours are left out.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MES_GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// glibc gives each thread that allocates under contention its own malloc arena (up to 8 per
/// core) and returns little of a fragmented arena to the system, so each arena grows to its
/// own high-water mark. With sled as the store this was 67 MiB RSS after a 100,000-impulse
/// burst with the default against 52 MiB with two arenas; with redb (fewer, larger
/// allocations) it is 37 against 36 MiB at the same throughput (`cargo bench --bench
/// burst -- 100k`, `MALLOC_ARENA_MAX=8` for the default): kept, since it costs nothing.
/// Must run before any thread starts, so it is the first thing `main` does.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // An operator who sets glibc's own variable decides (and can undo this for a comparison).
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
