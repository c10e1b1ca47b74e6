//! The command line: `run`, `check`, `send` and `outbox …`. `main` only parses, sets up
//! logging and maps [`CliError`] to an exit code.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::config::ConfigErrors;
use crate::message::{FieldNames, Message, MessageTypes};
use crate::outbox::{MessageId, NewMessage, Outbox, OutboxError, Record, Sending, State};
use crate::settings;

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
    #[arg(
        short = 'c',
        long = "config",
        env = "MES_GATEWAY_CONFIG",
        default_value = "/etc/mes-gateway"
    )]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct By {
    /// Name recorded in the message history (default: $SUDO_USER or $USER).
    #[arg(long)]
    pub by: Option<String>,
}

impl By {
    fn name(&self) -> String {
        let who = self
            .by
            .clone()
            .or_else(|| std::env::var("SUDO_USER").ok())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".into());
        format!("cli:{who}")
    }
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
    /// Queue one message by hand (gateway stopped). Reads JSON from FILE or stdin:
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
    /// Show the production order running on each line, as last saved (gateway stopped).
    Lines {
        #[command(flatten)]
        config: ConfigDir,
    },
    /// Inspect and act on the outbox (gateway stopped).
    Outbox {
        #[command(flatten)]
        config: ConfigDir,
        #[command(subcommand)]
        action: OutboxCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List messages, oldest first.
    List {
        /// Only messages in this state (queued, sending, delivered, failed, uncertain, cancelled).
        #[arg(long)]
        state: Option<State>,
        /// Only messages of this production order.
        #[arg(long)]
        order: Option<String>,
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
        #[command(flatten)]
        by: By,
    },
    /// Never send this message; releases its order's later messages.
    Cancel {
        id: MessageId,
        #[command(flatten)]
        by: By,
    },
    /// Mark an uncertain message as delivered (you found it on the D365 MES page).
    Resolve {
        id: MessageId,
        #[command(flatten)]
        by: By,
    },
    /// Rewrite the store to give back the disk a drained backlog used (the running
    /// gateway does this by itself after pruning when it is worth it). Crash-safe.
    Compact,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Usage(String),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl From<OutboxError> for CliError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::NotFound(_) | OutboxError::WrongState { .. } => {
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
        Command::Send {
            config,
            message_type,
            file,
            by,
        } => {
            let config = settings::load(&config.dir)?;
            let input = read_input(file.as_deref())?;
            let names = config
                .d365
                .as_ref()
                .map(|d| d.field_names.clone())
                .unwrap_or_default();
            let types = config
                .d365
                .as_ref()
                .map(|d| d.message_types.clone())
                .unwrap_or_default();
            let message = parse_send_input(&input, message_type.as_deref(), &names, &types)?;
            let content = message
                .to_content(&names)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let new = NewMessage {
                production_order: message.production_order().to_string(),
                message_type: message.message_type().to_string(),
                content,
                origin: by.name(),
            };
            let record = runtime()?.block_on(async {
                let outbox = Outbox::open(&config.storage.data_dir)?;
                outbox.append(vec![new]).await
            })?;
            for r in record {
                println!(
                    "queued message {} ({}, order {})",
                    r.id, r.message_type, r.production_order
                );
            }
            Ok(())
        }
        Command::Lines { config } => {
            let settings = settings::load_storage(&config.dir)?;
            let outbox = Outbox::open(&settings.storage.data_dir)?;
            let state = crate::pipeline::load_engine_state(&outbox);
            if state.contexts.is_empty() {
                println!("no line has a production order");
            }
            for (line, c) in &state.contexts {
                let since = c
                    .since
                    .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default();
                println!(
                    "{line}: order {} item {} operation {} resource {} since {since}",
                    c.order,
                    c.item.as_deref().unwrap_or("-"),
                    c.operation.as_deref().unwrap_or("-"),
                    c.resource.as_deref().unwrap_or("-")
                );
            }
            for acc in state.accumulators.values() {
                println!(
                    "  open aggregate: rule {} line {} order {} quantity {}",
                    acc.rule,
                    acc.line,
                    acc.context.as_ref().map_or("-", |c| c.order.as_str()),
                    acc.quantity
                );
            }
            Ok(())
        }
        Command::Outbox { config, action } => {
            let settings = settings::load_storage(&config.dir)?;
            let outbox = Outbox::open(&settings.storage.data_dir)?;
            runtime()?.block_on(outbox_command(&outbox, &settings, action))
        }
    }
}

/// Threads for blocking work: the outbox's writes (the pipeline and the dispatcher write
/// concurrently, nothing else for long). Bounded because every extra thread that
/// allocates can get its own malloc arena: with tokio's default (up to 512) the burst
/// benchmark's RSS was a third higher.
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
    println!("{}: configuration is valid", dir.display());
    for s in &config.sources {
        println!("  source {}", s.id());
    }
    println!("  {} rule(s)", config.rules.len());
    match &config.d365 {
        Some(d) => println!(
            "  D365 {} company {} queue {}; token from {} ({:?}); secret from {}",
            d.send_message_url(),
            d.company,
            d.message_queue,
            d.token_url,
            d.token_api,
            d.secret_origin
        ),
        None => println!("  no d365 section: only `run --dry-run` will run"),
    }
    println!("  outbox in {}", config.storage.data_dir.display());
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

/// Accepts the envelope form (`_messageType` + `_messageContent` as object or string) or,
/// with `--type`, the content object alone.
pub fn parse_send_input(
    input: &str,
    message_type: Option<&str>,
    names: &FieldNames,
    types: &MessageTypes,
) -> Result<Message, CliError> {
    let value: serde_json::Value = serde_json::from_str(input)
        .map_err(|e| CliError::Usage(format!("input is not JSON: {e}")))?;
    let (message_type, content) = match message_type {
        Some(t) => (t.to_string(), value),
        None => {
            let t = value
                .get("_messageType")
                .and_then(|v| v.as_str())
                .ok_or_else(|| {
                    CliError::Usage(
                        "input has no `_messageType`: pass --type or use the envelope form".into(),
                    )
                })?
                .to_string();
            let content = match value.get("_messageContent") {
                Some(serde_json::Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                    CliError::Usage(format!("`_messageContent` string is not JSON: {e}"))
                })?,
                Some(v) => v.clone(),
                None => return Err(CliError::Usage("input has no `_messageContent`".into())),
            };
            (t, content)
        }
    };
    // The type first: a typo must be named as one, not as content that does not fit.
    types
        .check(&message_type)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let message = Message::from_wire_json(&message_type, content, names)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    types
        .check_message(&message)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    message
        .validate()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(message)
}

async fn outbox_command(
    outbox: &Outbox,
    settings: &settings::OutboxSettings,
    action: OutboxCommand,
) -> Result<(), CliError> {
    match action {
        OutboxCommand::List { state, order, json } => {
            let records = outbox.list(state, order.as_deref())?;
            if json {
                for r in &records {
                    println!(
                        "{}",
                        serde_json::to_string(r).context("cannot print a record")?
                    );
                }
            } else {
                println!(
                    "{:>8}  {:<10} {:<34} {:<14} {:>8}  {:<20} LAST ERROR",
                    "ID", "STATE", "TYPE", "ORDER", "ATTEMPTS", "CREATED"
                );
                for r in &records {
                    let created = r.created_at.strftime("%Y-%m-%d %H:%M:%S").to_string();
                    let error = r
                        .last_error
                        .as_deref()
                        .map(|e| e.chars().take(60).collect::<String>())
                        .unwrap_or_default();
                    println!(
                        "{:>8}  {:<10} {:<34} {:<14} {:>8}  {:<20} {}",
                        r.id,
                        r.state,
                        r.message_type,
                        r.production_order,
                        r.attempt_count,
                        created,
                        error
                    );
                }
                let counts = outbox.counts();
                let summary: Vec<String> = counts
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(s, n)| format!("{n} {s}"))
                    .collect();
                println!(
                    "{} message(s) listed; outbox: {}",
                    records.len(),
                    if summary.is_empty() {
                        "empty".into()
                    } else {
                        summary.join(", ")
                    }
                );
            }
        }
        OutboxCommand::Show { id } => {
            let r = outbox.get(id)?;
            print_record(&r)?;
        }
        OutboxCommand::Retry { id, content, by } => {
            let new_content = match content {
                None => None,
                Some(path) => {
                    let current = outbox.get(id)?;
                    let text = read_input(Some(&path))?;
                    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                        CliError::Usage(format!("{}: not JSON: {e}", path.display()))
                    })?;
                    // Edited content is wire content: journal fields carry the configured names.
                    let names = &settings.field_names;
                    let message = Message::from_wire_json(&current.message_type, value, names)
                        .map_err(|e| CliError::Usage(e.to_string()))?;
                    settings
                        .message_types
                        .check_message(&message)
                        .map_err(|e| CliError::Usage(e.to_string()))?;
                    if message.production_order() != current.production_order {
                        return Err(CliError::Usage(format!(
                            "the edited content names order {:?} but message {id} belongs to order {:?}; cancel it and `send` a new one instead",
                            message.production_order(),
                            current.production_order
                        )));
                    }
                    Some(
                        message
                            .to_content(names)
                            .map_err(|e| CliError::Usage(e.to_string()))?,
                    )
                }
            };
            let r = outbox
                .retry(id, &by.name(), new_content, Sending::Interrupted)
                .await?;
            println!(
                "message {} queued again (order {})",
                r.id, r.production_order
            );
        }
        OutboxCommand::Cancel { id, by } => {
            let r = outbox.cancel(id, &by.name()).await?;
            println!("message {} cancelled (order {})", r.id, r.production_order);
        }
        OutboxCommand::Resolve { id, by } => {
            let r = outbox
                .resolve_delivered(id, &by.name(), Sending::Interrupted)
                .await?;
            println!(
                "message {} resolved as delivered (order {})",
                r.id, r.production_order
            );
        }
        OutboxCommand::Compact => {
            let (before, after) = outbox.compact().await?;
            println!(
                "outbox compacted: {:.1} MiB on disk before, {:.1} MiB after",
                mib(before),
                mib(after)
            );
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_record(r: &Record) -> Result<(), CliError> {
    let mut value = serde_json::to_value(r).context("cannot print a record")?;
    if let Ok(content) = serde_json::from_str::<serde_json::Value>(&r.content) {
        value["content"] = content;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&value).context("cannot print a record")?
    );
    Ok(())
}
