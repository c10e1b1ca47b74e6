//! The command line: `run`, `check`, and the operator commands (`status`, `send`,
//! `lines`, `reload`, `outbox …`), which go to the running gateway's socket or, when it
//! is stopped, to its data directory ([`remote`]). `main` only parses, sets up
//! logging and maps [`CliError`] to an exit code.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

/// `println!` for command output: a closed pipe (`outbox list --json | head`) ends the
/// command quietly, as it ends any Unix tool, instead of a panic with a backtrace.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod print;
pub mod remote;

use crate::config::ConfigErrors;
use crate::operator::OpError;
use crate::outbox::{ListFilter, MessageId, Outbox, State};
use crate::rules::state::OrderContext;
use crate::settings;
use crate::store::StoreError;
use remote::Service;

#[derive(Debug, Parser)]
#[command(
    name = "mes-gateway",
    version,
    about = "Shop-floor signals to Dynamics 365 MES integration messages, with a durable outbox"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ConfigDir {
    /// Configuration directory holding gateway.yaml and rules.d/.
    /// (Global: before or after a subcommand, `outbox list -c DIR` as `outbox -c DIR list`.)
    #[arg(
        short = 'c',
        long = "config",
        env = "MES_GATEWAY_CONFIG",
        default_value = "/etc/mes-gateway",
        global = true
    )]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct By {
    /// Name recorded in the message history (default: $SUDO_USER or $USER).
    #[arg(long, global = true)]
    pub by: Option<String>,
}

impl By {
    fn name(&self) -> String {
        self.by
            .clone()
            .or_else(|| std::env::var("SUDO_USER").ok())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".into())
    }
}

#[derive(Debug, Subcommand)]
pub enum OpcuaCommand {
    /// List the nodes below a node (default: the Objects folder).
    Browse {
        /// The `id` of the `type: opcua` source whose endpoint and security to use.
        source: String,
        /// Start here (a NodeId, e.g. ns=3;s="DB_Line1").
        #[arg(long)]
        node: Option<String>,
        /// Levels to descend.
        #[arg(long, default_value_t = 3)]
        depth: usize,
        /// One JSON object per node.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Run {
        #[command(flatten)]
        config: ConfigDir,
        /// Build, store and print messages, but send nothing to D365.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the configuration and exit: 0 if valid, 78 with every error listed if not.
    Check {
        #[command(flatten)]
        config: ConfigDir,
    },
    /// One screen: version and uptime, sources, outbox depth, the oldest queued message,
    /// the last D365 error, open alerts, the lines' orders.
    Status {
        #[command(flatten)]
        config: ConfigDir,
        #[arg(long)]
        json: bool,
    },
    /// Queue one message by hand. Reads JSON from FILE or stdin:
    /// {"_messageType": "...", "_messageContent": {...}} or, with --type, the content alone.
    Send {
        #[command(flatten)]
        config: ConfigDir,
        /// Message type, when the input is the content alone.
        #[arg(long = "type")]
        message_type: Option<String>,
        /// JSON file; `-` or nothing for stdin.
        file: Option<PathBuf>,
        #[command(flatten)]
        by: By,
    },
    /// Show the production order running on each line; set or clear one.
    Lines {
        #[command(flatten)]
        config: ConfigDir,
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<LinesCommand>,
        #[command(flatten)]
        by: By,
    },
    /// Load the configuration again (the running gateway); on errors it keeps running on
    /// the old one and every error is printed.
    Reload {
        #[command(flatten)]
        config: ConfigDir,
        #[command(flatten)]
        by: By,
    },
    /// Browse an OPC UA server with a configured `opcua` source's connection: NodeIds,
    /// browse names, data types and current values, to write the source's `nodes`.
    Opcua {
        #[command(flatten)]
        config: ConfigDir,
        #[command(subcommand)]
        action: OpcuaCommand,
    },
    /// Inspect and act on the outbox.
    Outbox {
        #[command(flatten)]
        config: ConfigDir,
        #[command(subcommand)]
        action: OutboxCommand,
        #[command(flatten)]
        by: By,
    },
}

#[derive(Debug, Subcommand)]
pub enum LinesCommand {
    /// Set the production order running on a line.
    Set {
        line: String,
        #[arg(long)]
        order: String,
        #[arg(long)]
        item: Option<String>,
        #[arg(long)]
        operation: Option<String>,
        #[arg(long)]
        resource: Option<String>,
    },
    /// The line runs no order any more (what it counted is reported first).
    Clear { line: String },
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List messages, oldest first (or --newest first), one page at a time.
    List {
        /// Only messages in this state (queued, sending, delivered, failed, uncertain, cancelled).
        #[arg(long)]
        state: Option<State>,
        /// Only messages of this production order.
        #[arg(long)]
        order: Option<String>,
        /// Only messages of this type.
        #[arg(long = "type")]
        message_type: Option<String>,
        /// Only messages built from this line's events.
        #[arg(long)]
        line: Option<String>,
        /// Only messages created at or after this time (RFC 3339, e.g. 2026-12-01T06:00:00Z).
        #[arg(long)]
        since: Option<jiff::Timestamp>,
        /// Only messages created before this time.
        #[arg(long)]
        until: Option<jiff::Timestamp>,
        /// Newest first.
        #[arg(long)]
        newest: bool,
        /// Messages per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this message id (the `next` of the previous page).
        #[arg(long)]
        after: Option<MessageId>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message with its content, attempts and history.
    Show { id: MessageId },
    /// Send a failed or uncertain message again, optionally with edited content.
    Retry {
        id: MessageId,
        /// File with the new `_messageContent` JSON (checked like any new message).
        #[arg(long)]
        content: Option<PathBuf>,
    },
    /// Never send this message; releases its order's later messages.
    Cancel { id: MessageId },
    /// Mark an uncertain message as delivered (you found it on the D365 MES page).
    Resolve { id: MessageId },
    /// D365's "message processed" events that matched no message of the gateway, newest
    /// first (kept as long as event ids are remembered).
    Unmatched {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// The events as JSON, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite the store to give back the disk a drained backlog used (gateway stopped;
    /// the running gateway does this by itself after pruning when it is worth it).
    /// Crash-safe.
    Compact,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Usage(String),
    /// The running gateway cannot be reached, or is between two states.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl From<OpError> for CliError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::NotFound(_) | OpError::Conflict(_) => CliError::Usage(e.to_string()),
            OpError::Invalid { field, message } => CliError::Usage(match field {
                Some(f) if !message.contains(f.as_str()) => format!("{f}: {message}"),
                _ => message,
            }),
            OpError::Config(errors) => CliError::Usage(format!(
                "{} configuration error(s); the gateway keeps running on its current configuration:\n  {}",
                errors.len(),
                errors.join("\n  ")
            )),
            OpError::Unavailable(m) => CliError::Unavailable(m),
            OpError::Internal(m) => CliError::Other(anyhow::anyhow!(m)),
        }
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) | StoreError::WrongState { .. } | StoreError::Joined { .. } => {
                CliError::Usage(e.to_string())
            }
            other => CliError::Other(other.into()),
        }
    }
}

impl CliError {
    /// sysexits(3) codes: systemd and scripts can tell a config error from a crash.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) => 78,
            CliError::Usage(_) => 64,
            CliError::Unavailable(_) => 69,
            CliError::Other(_) => 1,
        }
    }
}

pub fn execute(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Check { config } => check(&config.dir),
        Command::Run { config, dry_run } => {
            let config = settings::load(&config.dir)?;
            let options = crate::app::RunOptions { dry_run };
            // The signal handlers need the runtime, so they are installed inside it.
            runtime()?.block_on(async {
                crate::app::run(config, options, crate::signal::listen()).await
            })?;
            Ok(())
        }
        Command::Outbox {
            config,
            action: OutboxCommand::Compact,
            ..
        } => {
            let settings = settings::load_storage(&config.dir)?;
            let outbox = Outbox::open(&settings.storage.data_dir)?;
            runtime()?.block_on(async {
                let (before, after) = outbox.compact().await?;
                outln!(
                    "outbox compacted: {:.1} MiB on disk before, {:.1} MiB after",
                    mib(before),
                    mib(after)
                );
                Ok(())
            })
        }
        Command::Opcua {
            config,
            action:
                OpcuaCommand::Browse {
                    source,
                    node,
                    depth,
                    json,
                },
        } => opcua_browse(&config.dir, &source, node.as_deref(), depth, json),
        Command::Status { config, json } => {
            on_service(&config, &By { by: None }, |service| async move {
                let status = service.status().await?;
                if json {
                    print_json(&status)?;
                } else {
                    print::status(&status);
                }
                Ok(())
            })
        }
        Command::Send {
            config,
            message_type,
            file,
            by,
        } => {
            let input = read_input(file.as_deref())?;
            let value: serde_json::Value = serde_json::from_str(&input)
                .map_err(|e| CliError::Usage(format!("input is not JSON: {e}")))?;
            on_service(&config, &by, |service| async move {
                let r = service.send(value, message_type.as_deref()).await?;
                outln!(
                    "queued message {} ({}, order {})",
                    r.id,
                    r.message_type,
                    r.production_order
                );
                Ok(())
            })
        }
        Command::Lines {
            config,
            json,
            action,
            by,
        } => on_service(&config, &by, |service| async move {
            match action {
                None => {
                    let view = service.lines().await?;
                    if json {
                        print_json(&view)?;
                    } else {
                        print::lines(&view);
                    }
                }
                Some(LinesCommand::Set {
                    line,
                    order,
                    item,
                    operation,
                    resource,
                }) => {
                    let context = OrderContext {
                        order,
                        item,
                        operation,
                        resource,
                        since: None,
                    };
                    let previous = service.set_line(&line, Some(context.clone())).await?;
                    outln!(
                        "{line}: order {} (was {})",
                        context.order,
                        previous.map_or("none".to_string(), |p| p.order)
                    );
                }
                Some(LinesCommand::Clear { line }) => {
                    let previous = service.set_line(&line, None).await?;
                    outln!(
                        "{line}: no order (was {})",
                        previous.map_or("none".to_string(), |p| p.order)
                    );
                }
            }
            Ok(())
        }),
        Command::Reload { config, by } => on_service(&config, &by, |service| async move {
            let summary = service.reload().await?;
            outln!("configuration reloaded: {summary}");
            Ok(())
        }),
        Command::Outbox { config, action, by } => on_service(&config, &by, |service| async move {
            outbox_command(&service, action).await
        }),
    }
}

/// Runs `f` on the running gateway's service, or on the data directory when it is stopped.
fn on_service<F, Fut>(config: &ConfigDir, by: &By, f: F) -> Result<(), CliError>
where
    F: FnOnce(Service) -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>>,
{
    let settings = settings::load_storage(&config.dir)?;
    runtime()?.block_on(async {
        let service = Service::connect(&settings, &by.name()).await?;
        f(service).await
    })
}

fn opcua_browse(
    dir: &Path,
    source: &str,
    node: Option<&str>,
    depth: usize,
    json: bool,
) -> Result<(), CliError> {
    use crate::source::config::SourceConfig;
    let config = settings::load(dir)?;
    let Some(opcua) = config.sources.iter().find_map(|s| match s {
        SourceConfig::Opcua(o) if o.id == source => Some(o.clone()),
        _ => None,
    }) else {
        let ids: Vec<&str> = config
            .sources
            .iter()
            .filter_map(|s| match s {
                SourceConfig::Opcua(o) => Some(o.id.as_str()),
                _ => None,
            })
            .collect();
        return Err(CliError::Usage(format!(
            "no opcua source `{source}` in {} (opcua sources: {})",
            dir.display(),
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            }
        )));
    };
    let start = match node {
        None => None,
        Some(text) => Some(text.parse().map_err(|_| {
            CliError::Usage(format!(
                "{text:?} is not a NodeId (e.g. ns=3;s=\"DB_Line1\")"
            ))
        })?),
    };
    crate::install_crypto_provider();
    let found = runtime()?
        .block_on(crate::source::opcua::browse::browse(
            &opcua,
            start,
            depth.max(1),
        ))
        .map_err(|e| CliError::Unavailable(format!("{}: {e}", opcua.endpoint)))?;
    if json {
        for f in &found {
            outln!("{}", serde_json::to_string(f).context("cannot print JSON")?);
        }
        return Ok(());
    }
    outln!(
        "{:<48} {:<32} {:<9} {:<10} VALUE",
        "NODE ID",
        "BROWSE NAME",
        "CLASS",
        "TYPE"
    );
    for f in &found {
        outln!(
            "{:<48} {:<32} {:<9} {:<10} {}",
            format!("{}{}", "  ".repeat(f.depth), f.node_id),
            f.browse_name,
            f.class,
            f.data_type.as_deref().unwrap_or(""),
            f.value.as_deref().unwrap_or("")
        );
    }
    if found.len() >= crate::source::opcua::browse::MAX_NODES {
        outln!(
            "(stopped at {} nodes: browse from a deeper --node)",
            found.len()
        );
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).context("cannot print JSON")?
    );
    Ok(())
}

/// Threads for blocking work: the outbox's writes (the pipeline and the dispatcher write
/// concurrently, nothing else for long). Bounded because every extra thread that
/// allocates keeps memory of its own (with glibc's malloc and tokio's default of up to 512
/// threads the burst benchmark's RSS was a third higher; jemalloc keeps a cache per thread).
const BLOCKING_THREADS: usize = 2;

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?)
}

fn check(dir: &Path) -> Result<(), CliError> {
    let config = settings::load(dir)?;
    outln!("{}: configuration is valid", dir.display());
    for s in &config.sources {
        outln!("  source {}", s.id());
    }
    outln!("  {} rule(s)", config.rules.len());
    match &config.d365 {
        Some(d) => outln!(
            "  D365 {} company {} queue {}; token from {} ({:?}); secret from {}",
            d.send_message_url(),
            d.company,
            d.message_queue,
            d.token_url,
            d.token_api,
            d.secret_origin
        ),
        None => outln!("  no d365 section: only `run --dry-run` will run"),
    }
    outln!("  outbox in {}", config.storage.data_dir.display());
    for w in &config.warnings {
        outln!("warning: {w}");
    }
    Ok(())
}

fn read_input(file: Option<&Path>) -> Result<String, CliError> {
    let mut text = String::new();
    match file {
        None => {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read stdin")?;
        }
        Some(p) if p == Path::new("-") => {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read stdin")?;
        }
        Some(p) => {
            text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?
        }
    }
    Ok(text)
}

async fn outbox_command(service: &Service, action: OutboxCommand) -> Result<(), CliError> {
    match action {
        OutboxCommand::List {
            state,
            order,
            message_type,
            line,
            since,
            until,
            newest,
            limit,
            after,
            json,
        } => {
            let filter = ListFilter {
                state,
                order,
                message_type,
                line,
                since,
                until,
            };
            let page = service.list(filter, after, limit, newest).await?;
            if json {
                for r in &page.messages {
                    outln!(
                        "{}",
                        serde_json::to_string(r).context("cannot print a record")?
                    );
                }
            } else {
                print::page(&page);
            }
        }
        OutboxCommand::Show { id } => print::record(&service.show(id).await?)?,
        OutboxCommand::Retry { id, content } => {
            let content = match content {
                None => None,
                Some(path) => {
                    let text = read_input(Some(&path))?;
                    Some(serde_json::from_str(&text).map_err(|e| {
                        CliError::Usage(format!("{}: not JSON: {e}", path.display()))
                    })?)
                }
            };
            let r = service.retry(id, content).await?;
            outln!(
                "message {} queued again (order {})",
                r.id,
                r.production_order
            );
        }
        OutboxCommand::Cancel { id } => {
            let r = service.cancel(id).await?;
            outln!("message {} cancelled (order {})", r.id, r.production_order);
        }
        OutboxCommand::Resolve { id } => {
            let r = service.resolve(id).await?;
            outln!(
                "message {} resolved as delivered (order {})",
                r.id,
                r.production_order
            );
        }
        OutboxCommand::Unmatched { limit, json } => {
            print::unmatched(&service.unmatched(limit).await?, json)?
        }
        OutboxCommand::Compact => {
            return Err(CliError::Usage(
                "compact runs on the data directory of a stopped gateway".into(),
            ))
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
