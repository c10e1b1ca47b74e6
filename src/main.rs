//! Entry point: parse the command line, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
        // The OPC UA library logs every connection step at info; its warnings are
        // enough (the source says what matters in its own words).
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "info,opcua_client=warn,opcua_core=warn,opcua_crypto=warn,opcua_types=warn",
            )
        });
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

/// jemalloc instead of glibc's malloc: less CPU per message in the burst benchmark, with
/// the RSS bounded by the options below (docs/performance.md, "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Two arenas (jemalloc's default is four per core) and freed pages handed back to the
/// system after a second (the default is ten, the muzzy ones ten more): every arena keeps
/// its own high-water mark, and the daemon's bound is on RSS (measured in
/// docs/performance.md, "The allocator"). jemalloc reads this before `main` (and
/// `_RJEM_MALLOC_CONF` after it, for a trial).
#[unsafe(export_name = "_rjem_malloc_conf")]
static ALLOCATOR_OPTIONS: Option<&std::ffi::c_char> = Some(
    // SAFETY: a pointer to the first byte of a NUL-terminated static string, as C expects.
    unsafe { &*c"narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() },
);
