//! Configuration: `gateway.yaml` plus `rules.d/*.yaml` in one directory.
//!
//! Loading is parse-then-validate. Each file is read with serde-saphyr
//! ([`document::Document`]); each section and each list element is deserialized on its
//! own into the raw types of [`raw`], so one mistake does not hide the next; then
//! `validate` checks values (URLs, limits, references between sections) and builds
//! [`Config`].
//! Every problem found on the way is collected and reported together, each as
//! `file:line:column: field.path: message`.
//!
//! Secrets are read here (from a file or an environment variable) into [`Secret`], whose
//! `Debug` never shows the value. Error messages name the file or variable, never the value.

pub mod devices;
pub mod document;
pub mod raw;

pub use devices::{
    Framer, ModbusConfig, ModbusPoint, ModbusTransport, PointKind, PointType, SerialConfig,
    SerialMode, SerialPort, WordOrder,
};

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

pub use document::Mark;
use document::{join_path, Document, Node, Shape};
pub use raw::{AmbiguousPolicy, Edge, PayloadFormat, TokenApi};
use raw::{RawD365, RawDispatcher, RawRule, RawSimulator, RawStorage};

use crate::message::FieldNames;

/// The main file inside the configuration directory.
pub const MAIN_FILE: &str = "gateway.yaml";
/// The folder of rule files inside the configuration directory.
pub const RULES_DIR: &str = "rules.d";
/// D365's per-user concurrency limit: more requests in flight than this get 429s.
pub const D365_CONCURRENCY_LIMIT: u32 = 52;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    /// `None`: no D365 connection configured; only `run --dry-run` can run.
    pub d365: Option<D365Config>,
    pub dispatcher: DispatcherConfig,
    pub storage: StorageConfig,
    pub sources: Vec<SourceConfig>,
    pub rules: Vec<crate::rules::Rule>,
    /// The plant's time zone, for dates in messages (`{today}`).
    pub time_zone: jiff::tz::TimeZone,
    /// How long shutdown may take before in-flight work is abandoned.
    pub shutdown_grace: Duration,
    /// Where the operator API (`/health`, `/metrics`) listens; `None`: off.
    pub api_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct D365Config {
    pub base_url: reqwest::Url,
    pub company: String,
    pub message_queue: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Where the secret came from, for log lines (`file /run/…` or `env VAR`).
    pub secret_origin: String,
    pub token_url: reqwest::Url,
    pub token_api: TokenApi,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub field_names: FieldNames,
}

impl D365Config {
    /// The SendMessage endpoint.
    pub fn send_message_url(&self) -> reqwest::Url {
        let mut url = self.base_url.clone();
        url.set_path("/api/services/SysMessageServices/SysMessageService/SendMessage");
        url
    }

    /// The D365 resource identifier: the base URL without a trailing slash.
    pub fn resource(&self) -> String {
        self.base_url.as_str().trim_end_matches('/').to_string()
    }
}

/// A secret value. `Debug` and `Display` print a placeholder, so it cannot leak through
/// a log line or an error chain by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Requests in flight across all orders (one per order at most).
    pub max_in_flight: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// HTTP 500 answers a message may get before it is `failed`.
    pub max_attempts: u32,
    /// Pause after a 429 without a usable `Retry-After`.
    pub throttle_fallback: Duration,
    /// Pause after a second 401 in a row (credentials or app registration wrong).
    pub auth_pause: Duration,
    pub ambiguous_default: AmbiguousPolicy,
    pub ambiguous_per_type: BTreeMap<String, AmbiguousPolicy>,
}

impl DispatcherConfig {
    pub fn ambiguous_policy(&self, message_type: &str) -> AmbiguousPolicy {
        self.ambiguous_per_type
            .get(message_type)
            .copied()
            .unwrap_or(self.ambiguous_default)
    }
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            max_in_flight: 4,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            max_attempts: 3,
            throttle_fallback: Duration::from_secs(30),
            auth_pause: Duration::from_secs(300),
            ambiguous_default: AmbiguousPolicy::Hold,
            ambiguous_per_type: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// How long delivered and cancelled messages are kept before pruning.
    pub retention: Duration,
    pub prune_interval: Duration,
}

#[derive(Debug, Clone)]
pub enum SourceConfig {
    Simulator(SimulatorConfig),
    Mqtt(MqttConfig),
    Modbus(ModbusConfig),
    Serial(SerialConfig),
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub id: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Stable across restarts: the broker keeps the session (and unacknowledged
    /// messages) under this id.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub keep_alive: Duration,
    pub payload: PayloadFormat,
    pub subscriptions: Vec<Subscription>,
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub topic: String,
    pub qos: rumqttc::QoS,
}

impl SourceConfig {
    pub fn id(&self) -> &str {
        match self {
            SourceConfig::Simulator(s) => &s.id,
            SourceConfig::Mqtt(s) => &s.id,
            SourceConfig::Modbus(s) => &s.id,
            SourceConfig::Serial(s) => &s.id,
        }
    }

    /// The point names this source emits, when it has a fixed set (rules are checked
    /// against it); `None` when any point may come (MQTT topics).
    pub fn points(&self) -> Option<Vec<String>> {
        match self {
            SourceConfig::Simulator(s) => Some(vec![s.point.clone()]),
            SourceConfig::Mqtt(_) => None,
            SourceConfig::Modbus(m) => Some(m.points.iter().map(|p| p.name.clone()).collect()),
            SourceConfig::Serial(s) => Some(vec![s.point.clone()]),
        }
    }

    /// Whether points are MQTT topics (rules may match them with `topic` filters).
    pub fn has_topics(&self) -> bool {
        matches!(self, SourceConfig::Mqtt(_))
    }
}

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    pub id: String,
    pub interval: Duration,
    pub point: String,
    pub limit: Option<u64>,
    pub mode: SimulatorMode,
}

/// What a simulator emits each interval.
#[derive(Debug, Clone, PartialEq)]
pub enum SimulatorMode {
    /// A pulse: `true` then `false` (a part passing a light barrier).
    Impulse,
    /// The reading of a counter register that counts `step` per interval since
    /// `start_at`, wrapping after `max`. With a fixed `start_at` the count goes on while
    /// the gateway is stopped, like a PLC's.
    Counter {
        start_at: Option<jiff::Timestamp>,
        step: f64,
        max: Option<f64>,
        /// The count stops here (a batch of N parts).
        stop_at: Option<f64>,
    },
    /// The given values in turn (texts, numbers, JSON objects).
    Values(Vec<serde_json::Value>),
}

/// One configuration problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub mark: Option<Mark>,
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(mark) = self.mark {
            write!(f, ":{mark}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems found in a configuration directory.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} configuration error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for (i, e) in self.0.iter().enumerate() {
            if i + 1 < n {
                writeln!(f, "  {e}")?;
            } else {
                write!(f, "  {e}")?;
            }
        }
        Ok(())
    }
}

/// A parsed file and the errors found in it so far.
struct Doc {
    file: PathBuf,
    yaml: Document,
}

#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn at(&mut self, doc: &Doc, path: &str, message: impl Into<String>) {
        self.0.push(ConfigError {
            file: doc.file.clone(),
            mark: Some(doc.yaml.locate(path)),
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn file(&mut self, file: &Path, message: impl Into<String>) {
        self.0.push(ConfigError {
            file: file.to_path_buf(),
            mark: None,
            path: String::new(),
            message: message.into(),
        });
    }

    /// Deserializes the node at `path` in `doc` into `T`, recording any error.
    fn parse<T: DeserializeOwned>(&mut self, doc: &Doc, path: &str) -> Option<T> {
        match doc.yaml.parse_at::<T>(path) {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(ConfigError {
                    file: doc.file.clone(),
                    mark: Some(e.mark),
                    path: e.path,
                    message: e.message,
                });
                None
            }
        }
    }
}

fn read_doc(file: &Path, errors: &mut Errors) -> Option<Doc> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            errors.file(file, format!("cannot read: {e}"));
            return None;
        }
    };
    match Document::parse(text) {
        Ok(yaml) => Some(Doc {
            file: file.to_path_buf(),
            yaml,
        }),
        Err(e) => {
            errors.0.push(ConfigError {
                file: file.to_path_buf(),
                mark: Some(e.mark),
                path: String::new(),
                message: format!("YAML syntax error: {}", e.message),
            });
            None
        }
    }
}

/// Parses a duration such as `500ms`, `30s`, `5m`, `2h`, `7d` or `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {text:?}: expected a number with a unit, e.g. 500ms, 30s, 5m, 2h, 7d"
        )
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    if total > MAX_DURATION {
        return Err(format!(
            "duration {text:?} is too long: at most 36500d (100 years)"
        ));
    }
    Ok(total)
}

/// The longest duration any setting takes: far beyond any sensible value, far below what
/// overflows clock arithmetic (an instant plus a debounce, a deadline plus an interval).
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// Refuses a duration below `min` where a smaller one would stop the daemon or make it
/// spin (a zero interval, a zero timeout); returns `min` in its place after reporting.
fn at_least(
    doc: &Doc,
    errors: &mut Errors,
    path: &str,
    value: Duration,
    min: Duration,
    why: &str,
) -> Duration {
    if value < min {
        errors.at(
            doc,
            path,
            format!("must be at least {} ({why})", format_duration(min)),
        );
        return min;
    }
    value
}

/// A duration as the configuration writes it (500ms, 1s).
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

/// Expands `$VAR`, `${VAR}` and `${VAR:-default}` in a path, so a unit can point the
/// secret at `${CREDENTIALS_DIRECTORY:-/etc/mes-gateway}/d365-client-secret`: systemd's
/// `LoadCredential=` copy when run by systemd, the file itself when an operator runs
/// `check` by hand.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos + 1..];
        let (name, default, consumed) = if let Some(inner) = rest.strip_prefix('{') {
            let end = inner
                .find('}')
                .ok_or_else(|| format!("{text:?}: unclosed `${{`"))?;
            let body = &inner[..end];
            match body.split_once(":-") {
                Some((name, default)) => (name, Some(default), end + 2),
                None => (body, None, end + 2),
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], None, end)
        };
        if name.is_empty() {
            return Err(format!("{text:?}: `$` must be followed by a variable name"));
        }
        match (std::env::var(name).ok().filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!("{text:?}: environment variable {name} is not set (systemd sets CREDENTIALS_DIRECTORY with LoadCredential=; use ${{{name}:-/fallback}} for runs by hand)"))
            }
        }
        rest = &rest[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Loads and validates the configuration in `dir`; reports every problem found.
pub fn load(dir: &Path) -> Result<Config, ConfigErrors> {
    let mut errors = Errors::default();
    let main_file = dir.join(MAIN_FILE);
    let main = if main_file.is_file() {
        read_doc(&main_file, &mut errors)
    } else {
        errors.file(
            &main_file,
            format!("not found: the configuration directory must contain {MAIN_FILE}"),
        );
        None
    };

    let mut rule_docs = Vec::new();
    let rules_dir = dir.join(RULES_DIR);
    if rules_dir.is_dir() {
        match std::fs::read_dir(&rules_dir) {
            Ok(entries) => {
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                    })
                    .collect();
                // Sorted so rules apply in a defined order: file name, then position.
                files.sort();
                for file in files {
                    if let Some(doc) = read_doc(&file, &mut errors) {
                        rule_docs.push(doc);
                    }
                }
            }
            Err(e) => errors.file(&rules_dir, format!("cannot list: {e}")),
        }
    }

    let config = validate(dir, main.as_ref(), &rule_docs, &mut errors);
    match config {
        Some(config) if errors.0.is_empty() => Ok(config),
        _ => Err(ConfigErrors(errors.0)),
    }
}

/// Reads only the `storage` section and the journal-name field names: enough for the
/// outbox commands, which must work even where the D365 secret is readable by the
/// service alone.
pub fn load_storage(dir: &Path) -> Result<(StorageConfig, FieldNames), ConfigErrors> {
    let mut errors = Errors::default();
    let file = dir.join(MAIN_FILE);
    let loaded = read_doc(&file, &mut errors).map(|doc| {
        let raw = match doc.yaml.node("storage") {
            Some(_) => errors
                .parse::<RawStorage>(&doc, "storage")
                .unwrap_or_default(),
            None => RawStorage::default(),
        };
        // The wire names of the journal fields, so edited content can be read back.
        let names = doc
            .yaml
            .node("d365.field_names")
            .and_then(|_| errors.parse::<FieldNames>(&doc, "d365.field_names"))
            .unwrap_or_default();
        (validate_storage(dir, &doc, raw, &mut errors), names)
    });
    match loaded {
        Some(s) if errors.0.is_empty() => Ok(s),
        _ => Err(ConfigErrors(errors.0)),
    }
}

const MAIN_SECTIONS: [&str; 6] = [
    "d365",
    "dispatcher",
    "storage",
    "sources",
    "shutdown_grace",
    "plant",
];

fn validate(
    dir: &Path,
    main: Option<&Doc>,
    rule_docs: &[Doc],
    errors: &mut Errors,
) -> Option<Config> {
    let main = main?;
    let Some(entries) = main.yaml.root.entries() else {
        errors.at(main, "", "the top level must be a mapping of sections");
        return None;
    };
    let mut d365 = None;
    let mut dispatcher = DispatcherConfig::default();
    let mut storage = None;
    let mut sources = Vec::new();
    let mut shutdown_grace = Duration::from_secs(10);
    let mut time_zone = jiff::tz::TimeZone::system();
    let mut api_listen = None;
    let mut seen = HashSet::new();
    for (name, value) in entries {
        let name = name.as_str();
        if !seen.insert(name.to_string()) {
            errors.at(main, name, format!("duplicate section `{name}`"));
            continue;
        }
        match name {
            "d365" => {
                d365 = errors
                    .parse::<RawD365>(main, "d365")
                    .and_then(|raw| validate_d365(main, raw, errors))
            }
            "dispatcher" => {
                if let Some(raw) = errors.parse::<RawDispatcher>(main, "dispatcher") {
                    dispatcher = validate_dispatcher(main, raw, errors);
                }
            }
            "storage" => {
                storage = errors
                    .parse::<RawStorage>(main, "storage")
                    .map(|raw| validate_storage(dir, main, raw, errors))
            }
            "sources" => sources = validate_sources(main, value, errors),
            "api" => {
                if let Some(raw) = errors.parse::<raw::RawApi>(main, "api") {
                    match raw
                        .listen
                        .as_deref()
                        .map(str::parse::<std::net::SocketAddr>)
                    {
                        None => {}
                        Some(Ok(addr)) => api_listen = Some(addr),
                        Some(Err(_)) => errors.at(
                            main,
                            "api.listen",
                            format!(
                                "{:?}: expected ip:port, e.g. 127.0.0.1:9464",
                                raw.listen.unwrap_or_default()
                            ),
                        ),
                    }
                }
            }
            "plant" => {
                if let Some(raw) = errors.parse::<raw::RawPlant>(main, "plant") {
                    if let Some(name) = raw.time_zone {
                        match jiff::tz::TimeZone::get(&name) {
                            Ok(tz) => time_zone = tz,
                            Err(e) => errors.at(main, "plant.time_zone", format!("unknown time zone {name:?} (use an IANA name such as Europe/Berlin): {e}")),
                        }
                    }
                }
            }
            "shutdown_grace" => {
                if let Some(raw) = errors.parse::<String>(main, "shutdown_grace") {
                    shutdown_grace =
                        duration_field(main, errors, "shutdown_grace", Some(raw), shutdown_grace);
                }
            }
            other => errors.at(
                main,
                other,
                format!(
                    "unknown section `{other}`, expected one of {}",
                    MAIN_SECTIONS.join(", ")
                ),
            ),
        }
    }
    let storage =
        storage.unwrap_or_else(|| validate_storage(dir, main, RawStorage::default(), errors));

    let mut rules: Vec<crate::rules::Rule> = Vec::new();
    for doc in rule_docs {
        for rule in validate_rules(doc, &sources, errors) {
            if let Some(first) = rules.iter().find(|r| r.name == rule.name) {
                errors.0.push(ConfigError {
                    file: doc.file.clone(),
                    mark: None,
                    path: String::new(),
                    message: format!(
                        "rule name `{}` is used twice (first at {}); rule names must be unique",
                        rule.name, first.origin
                    ),
                });
            }
            rules.push(rule);
        }
    }

    Some(Config {
        dir: dir.to_path_buf(),
        d365,
        dispatcher,
        storage,
        sources,
        rules,
        time_zone,
        shutdown_grace,
        api_listen,
    })
}

fn duration_field(
    doc: &Doc,
    errors: &mut Errors,
    path: &str,
    raw: Option<String>,
    default: Duration,
) -> Duration {
    match raw {
        None => default,
        Some(text) => match parse_duration(&text) {
            Ok(d) => d,
            Err(e) => {
                errors.at(doc, path, e);
                default
            }
        },
    }
}

fn non_empty(doc: &Doc, errors: &mut Errors, path: &str, value: &str) {
    if value.trim().is_empty() {
        errors.at(doc, path, "must not be empty");
    }
}

fn parse_url(doc: &Doc, errors: &mut Errors, path: &str, text: &str) -> Option<reqwest::Url> {
    match reqwest::Url::parse(text) {
        Ok(url) => {
            let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
            match url.scheme() {
                "https" => Some(url),
                "http" if loopback => Some(url),
                "http" => {
                    errors.at(doc, path, format!("{text:?} uses http: only https is allowed (http only for localhost fakes)"));
                    None
                }
                other => {
                    errors.at(
                        doc,
                        path,
                        format!("{text:?}: unsupported scheme `{other}`, expected https"),
                    );
                    None
                }
            }
        }
        Err(e) => {
            errors.at(doc, path, format!("invalid URL {text:?}: {e}"));
            None
        }
    }
}

fn validate_d365(doc: &Doc, raw: RawD365, errors: &mut Errors) -> Option<D365Config> {
    let before = errors.0.len();
    let base_url = parse_url(doc, errors, "d365.base_url", &raw.base_url);
    non_empty(doc, errors, "d365.company", &raw.company);
    non_empty(doc, errors, "d365.client_id", &raw.client_id);
    let message_queue = raw
        .message_queue
        .unwrap_or_else(|| crate::message::DEFAULT_QUEUE.to_string());
    non_empty(doc, errors, "d365.message_queue", &message_queue);
    let token_api = raw.token_api.unwrap_or(TokenApi::V2);
    let token_url = match (&raw.token_url, &raw.tenant_id) {
        (Some(url), _) => parse_url(doc, errors, "d365.token_url", url),
        (None, Some(tenant)) if !tenant.trim().is_empty() => {
            let path = match token_api {
                TokenApi::V2 => "oauth2/v2.0/token",
                TokenApi::V1 => "oauth2/token",
            };
            parse_url(
                doc,
                errors,
                "d365.tenant_id",
                &format!("https://login.microsoftonline.com/{}/{path}", tenant.trim()),
            )
        }
        _ => {
            errors.at(
                doc,
                "d365",
                "set tenant_id (or token_url to override the token endpoint)",
            );
            None
        }
    };
    let (secret, secret_origin) = match (&raw.client_secret_file, &raw.client_secret_env) {
        (Some(_), Some(_)) => {
            errors.at(
                doc,
                "d365.client_secret_env",
                "set client_secret_file or client_secret_env, not both",
            );
            (None, String::new())
        }
        (None, None) => {
            errors.at(
                doc,
                "d365",
                "set client_secret_file (e.g. a systemd credential) or client_secret_env",
            );
            (None, String::new())
        }
        (Some(file), None) => {
            let file = match expand_env(file) {
                Ok(f) => f,
                Err(e) => {
                    errors.at(doc, "d365.client_secret_file", e);
                    return None;
                }
            };
            let path = resolve(doc.file.parent().unwrap_or(Path::new(".")), &file);
            // The file's content is never put into an error message.
            match std::fs::read_to_string(&path) {
                Ok(s) if s.trim().is_empty() => {
                    errors.at(
                        doc,
                        "d365.client_secret_file",
                        format!("{} is empty", path.display()),
                    );
                    (None, String::new())
                }
                Ok(s) => (
                    Some(Secret(s.trim().to_string())),
                    format!("file {}", path.display()),
                ),
                Err(e) => {
                    errors.at(
                        doc,
                        "d365.client_secret_file",
                        format!("cannot read {}: {}", path.display(), e.kind()),
                    );
                    (None, String::new())
                }
            }
        }
        (None, Some(var)) => match std::env::var(var) {
            Ok(s) if !s.trim().is_empty() => (
                Some(Secret(s.trim().to_string())),
                format!("environment variable {var}"),
            ),
            _ => {
                errors.at(
                    doc,
                    "d365.client_secret_env",
                    format!("environment variable {var} is not set or empty"),
                );
                (None, String::new())
            }
        },
    };
    let connect_timeout = duration_field(
        doc,
        errors,
        "d365.connect_timeout",
        raw.connect_timeout,
        Duration::from_secs(10),
    );
    let connect_timeout = at_least(
        doc,
        errors,
        "d365.connect_timeout",
        connect_timeout,
        Duration::from_millis(100),
        "no connection could be made",
    );
    let request_timeout = duration_field(
        doc,
        errors,
        "d365.request_timeout",
        raw.request_timeout,
        Duration::from_secs(60),
    );
    let request_timeout = at_least(
        doc,
        errors,
        "d365.request_timeout",
        request_timeout,
        Duration::from_secs(1),
        "every request would time out after it was written and be uncertain",
    );
    if errors.0.len() > before {
        return None;
    }
    Some(D365Config {
        base_url: base_url?,
        company: raw.company.trim().to_string(),
        message_queue,
        client_id: raw.client_id.trim().to_string(),
        client_secret: secret?,
        secret_origin,
        token_url: token_url?,
        token_api,
        connect_timeout,
        request_timeout,
        field_names: raw.field_names.unwrap_or_default(),
    })
}

fn validate_dispatcher(doc: &Doc, raw: RawDispatcher, errors: &mut Errors) -> DispatcherConfig {
    let d = DispatcherConfig::default();
    let max_in_flight = raw.max_in_flight.unwrap_or(d.max_in_flight as u32);
    if !(1..=D365_CONCURRENCY_LIMIT).contains(&max_in_flight) {
        errors.at(
            doc,
            "dispatcher.max_in_flight",
            format!("{max_in_flight} is out of range: 1 to {D365_CONCURRENCY_LIMIT} (D365 answers 429 above {D365_CONCURRENCY_LIMIT} concurrent requests per user)"),
        );
    }
    let backoff_initial = duration_field(
        doc,
        errors,
        "dispatcher.backoff_initial",
        raw.backoff_initial,
        d.backoff_initial,
    );
    let backoff_max = duration_field(
        doc,
        errors,
        "dispatcher.backoff_max",
        raw.backoff_max,
        d.backoff_max,
    );
    if let Err(e) = crate::d365::retry::Backoff::try_new(backoff_initial, backoff_max) {
        errors.at(doc, "dispatcher.backoff_max", e.to_string());
    }
    let max_attempts = raw.max_attempts.unwrap_or(d.max_attempts);
    if max_attempts == 0 {
        errors.at(doc, "dispatcher.max_attempts", "must be at least 1");
    }
    let ambiguous = raw.on_ambiguous.unwrap_or_default();
    DispatcherConfig {
        max_in_flight: max_in_flight as usize,
        backoff_initial,
        backoff_max,
        max_attempts,
        throttle_fallback: duration_field(
            doc,
            errors,
            "dispatcher.throttle_fallback",
            raw.throttle_fallback,
            d.throttle_fallback,
        ),
        auth_pause: duration_field(
            doc,
            errors,
            "dispatcher.auth_pause",
            raw.auth_pause,
            d.auth_pause,
        ),
        ambiguous_default: ambiguous.default.unwrap_or(d.ambiguous_default),
        ambiguous_per_type: ambiguous.per_type,
    }
}

fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn validate_storage(dir: &Path, doc: &Doc, raw: RawStorage, errors: &mut Errors) -> StorageConfig {
    let data_dir = match raw.data_dir {
        Some(d) if d.trim().is_empty() => {
            errors.at(doc, "storage.data_dir", "must not be empty");
            PathBuf::new()
        }
        // Relative paths are relative to the configuration directory, not to the
        // working directory, so `run -c DIR` behaves the same from anywhere.
        Some(d) => resolve(dir, &d),
        None => PathBuf::from("/var/lib/mes-gateway"),
    };
    StorageConfig {
        data_dir,
        retention: duration_field(
            doc,
            errors,
            "storage.retention",
            raw.retention,
            Duration::from_secs(7 * 86_400),
        ),
        prune_interval: {
            let d = duration_field(
                doc,
                errors,
                "storage.prune_interval",
                raw.prune_interval,
                Duration::from_secs(3600),
            );
            at_least(
                doc,
                errors,
                "storage.prune_interval",
                d,
                Duration::from_secs(1),
                "pruning reads the whole outbox",
            )
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn simulator_mode(
    doc: &Doc,
    errors: &mut Errors,
    path: &str,
    mode: Option<&str>,
    start_at: Option<&str>,
    step: Option<f64>,
    counter_max: Option<f64>,
    stop_at: Option<f64>,
    values: Option<Vec<raw::ScalarOrJson>>,
) -> Option<SimulatorMode> {
    Some(match (mode.unwrap_or("impulse"), values) {
        ("impulse", None) => SimulatorMode::Impulse,
        ("counter", None) => {
            let start_at = match start_at.map(str::parse::<jiff::Timestamp>) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    errors.at(
                        doc,
                        &format!("{path}.start_at"),
                        format!("invalid time (use RFC 3339, e.g. 2026-01-01T00:00:00Z): {e}"),
                    );
                    return None;
                }
            };
            SimulatorMode::Counter {
                start_at,
                step: step.unwrap_or(1.0),
                max: counter_max,
                stop_at,
            }
        }
        ("values", Some(values)) if !values.is_empty() => {
            SimulatorMode::Values(values.iter().map(raw::ScalarOrJson::to_json).collect())
        }
        ("values", _) => {
            errors.at(
                doc,
                &format!("{path}.values"),
                "mode `values` needs a non-empty `values` list",
            );
            return None;
        }
        (m @ ("impulse" | "counter"), Some(_)) => {
            errors.at(
                doc,
                &format!("{path}.values"),
                format!("`values` needs `mode: values` (mode is {m})"),
            );
            return None;
        }
        (other, _) => {
            errors.at(
                doc,
                &format!("{path}.mode"),
                format!(
                    "unknown simulator mode `{other}`, expected one of impulse, counter, values"
                ),
            );
            return None;
        }
    })
}

/// Runs a device validation that reports problems relative to the source, and files
/// them at `path`. `None` if there was any problem.
fn device_source<T>(
    doc: &Doc,
    errors: &mut Errors,
    path: &str,
    validate: impl FnOnce(&mut devices::Problems) -> Option<T>,
) -> Option<T> {
    let mut problems = Vec::new();
    let config = validate(&mut problems);
    for (sub, message) in &problems {
        errors.at(doc, &join_path(path, sub), message.clone());
    }
    config.filter(|_| problems.is_empty())
}

const SOURCE_TYPES: [&str; 4] = ["simulator", "mqtt", "modbus", "serial"];

fn validate_mqtt(
    doc: &Doc,
    errors: &mut Errors,
    path: &str,
    raw: raw::RawMqtt,
) -> Option<SourceConfig> {
    let before = errors.0.len();
    let base = doc.file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let (tls, default_port, rest) = if let Some(r) = raw.url.strip_prefix("mqtts://") {
        (true, 8883, r)
    } else if let Some(r) = raw.url.strip_prefix("mqtt://") {
        (false, 1883, r)
    } else {
        errors.at(
            doc,
            &format!("{path}.url"),
            format!(
                "{:?}: expected mqtt://host[:port] or mqtts://host[:port]",
                raw.url
            ),
        );
        return None;
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => (h.to_string(), p),
            Err(_) => {
                errors.at(
                    doc,
                    &format!("{path}.url"),
                    format!("{:?}: invalid port {p:?}", raw.url),
                );
                (h.to_string(), default_port)
            }
        },
        None => (rest.to_string(), default_port),
    };
    if host.is_empty() {
        errors.at(
            doc,
            &format!("{path}.url"),
            format!("{:?}: no host", raw.url),
        );
    }
    let password = match &raw.password_file {
        None => None,
        Some(f) => {
            let p = resolve(
                &base,
                &expand_env(f).unwrap_or_else(|e| {
                    errors.at(doc, &format!("{path}.password_file"), e);
                    String::new()
                }),
            );
            match std::fs::read_to_string(&p) {
                Ok(s) => Some(Secret(s.trim().to_string())),
                Err(e) => {
                    errors.at(
                        doc,
                        &format!("{path}.password_file"),
                        format!("cannot read {}: {}", p.display(), e.kind()),
                    );
                    None
                }
            }
        }
    };
    if password.is_some() != raw.username.is_some() {
        errors.at(doc, path, "username and password_file go together");
    }
    let file = |errors: &mut Errors, key: &str, v: &Option<String>| -> Option<PathBuf> {
        let p = resolve(&base, v.as_ref()?);
        if !p.is_file() {
            errors.at(
                doc,
                &format!("{path}.{key}"),
                format!("{} not found", p.display()),
            );
        }
        Some(p)
    };
    let ca_file = file(errors, "ca_file", &raw.ca_file);
    let client_cert_file = file(errors, "client_cert_file", &raw.client_cert_file);
    let client_key_file = file(errors, "client_key_file", &raw.client_key_file);
    if !tls && (ca_file.is_some() || client_cert_file.is_some()) {
        errors.at(
            doc,
            &format!("{path}.url"),
            "certificates need an mqtts:// URL",
        );
    }
    if raw.subscriptions.is_empty() {
        errors.at(
            doc,
            &format!("{path}.subscriptions"),
            "subscribe to at least one topic",
        );
    }
    let mut subscriptions = Vec::new();
    for (i, s) in raw.subscriptions.iter().enumerate() {
        let qos = s.qos.unwrap_or(1);
        match crate::source::mqtt::qos(qos) {
            Some(q) => subscriptions.push(Subscription {
                topic: s.topic.clone(),
                qos: q,
            }),
            None => errors.at(
                doc,
                &format!("{path}.subscriptions[{i}].qos"),
                format!("{qos}: expected 0, 1 or 2"),
            ),
        }
        if let Err(e) = crate::rules::matcher::TopicFilter::parse(&s.topic) {
            errors.at(doc, &format!("{path}.subscriptions[{i}].topic"), e);
        }
    }
    let keep_alive = duration_field(
        doc,
        errors,
        &format!("{path}.keep_alive"),
        raw.keep_alive,
        Duration::from_secs(30),
    );
    // MQTT counts keep-alive in whole seconds; 0 turns it off.
    if !keep_alive.is_zero() && keep_alive < Duration::from_secs(1) {
        errors.at(
            doc,
            &format!("{path}.keep_alive"),
            "must be 0 (off) or at least 1s: MQTT counts keep-alive in seconds",
        );
    }
    let keep_alive = if keep_alive < Duration::from_secs(1) {
        Duration::ZERO
    } else {
        keep_alive
    };
    if errors.0.len() > before {
        return None;
    }
    Some(SourceConfig::Mqtt(MqttConfig {
        client_id: raw
            .client_id
            .unwrap_or_else(|| format!("mes-gateway-{}", raw.id)),
        id: raw.id,
        host,
        port,
        tls,
        username: raw.username,
        password,
        ca_file,
        client_cert_file,
        client_key_file,
        keep_alive,
        payload: raw.payload.unwrap_or_default(),
        subscriptions,
    }))
}

fn validate_sources(doc: &Doc, node: &Node, errors: &mut Errors) -> Vec<SourceConfig> {
    let Shape::Seq(items) = &node.shape else {
        if !node.is_null() {
            errors.at(doc, "sources", "must be a list of sources");
        }
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("sources[{i}]");
        if item.entries().is_none() {
            errors.at(doc, &path, "each source must be a mapping with a `type`");
            continue;
        }
        let Some(kind) = item.get("type").and_then(Node::as_str) else {
            errors.at(
                doc,
                &path,
                format!(
                    "missing `type`, expected one of {}",
                    SOURCE_TYPES.join(", ")
                ),
            );
            continue;
        };
        let source = match kind {
            "simulator" => errors.parse::<RawSimulator>(doc, &path).and_then(|raw| {
                let interval = duration_field(
                    doc,
                    errors,
                    &format!("{path}.interval"),
                    Some(raw.interval),
                    Duration::ZERO,
                );
                if interval.is_zero() {
                    errors.at(
                        doc,
                        &format!("{path}.interval"),
                        "must be greater than zero",
                    );
                    return None;
                }
                let mode = simulator_mode(
                    doc,
                    errors,
                    &path,
                    raw.mode.as_deref(),
                    raw.start_at.as_deref(),
                    raw.step,
                    raw.counter_max,
                    raw.stop_at,
                    raw.values,
                )?;
                Some(SourceConfig::Simulator(SimulatorConfig {
                    id: raw.id,
                    interval,
                    point: raw.point.unwrap_or_else(|| "impulse".into()),
                    limit: raw.limit,
                    mode,
                }))
            }),
            "mqtt" => errors
                .parse::<raw::RawMqtt>(doc, &path)
                .and_then(|raw| validate_mqtt(doc, errors, &path, raw)),
            "modbus" => errors
                .parse::<devices::RawModbus>(doc, &path)
                .and_then(|raw| device_source(doc, errors, &path, |p| devices::modbus(raw, p)))
                .map(SourceConfig::Modbus),
            "serial" => errors
                .parse::<devices::RawSerial>(doc, &path)
                .and_then(|raw| device_source(doc, errors, &path, |p| devices::serial(raw, p)))
                .map(SourceConfig::Serial),
            other => {
                errors.at(
                    doc,
                    &format!("{path}.type"),
                    format!(
                        "unknown source type `{other}`, expected one of {}",
                        SOURCE_TYPES.join(", ")
                    ),
                );
                None
            }
        };
        if let Some(source) = source {
            if source.id().trim().is_empty() {
                errors.at(doc, &format!("{path}.id"), "must not be empty");
            } else if !ids.insert(source.id().to_string()) {
                errors.at(
                    doc,
                    &format!("{path}.id"),
                    format!("duplicate source id `{}`", source.id()),
                );
            }
            out.push(source);
        }
    }
    out
}

fn validate_rules(
    doc: &Doc,
    sources: &[SourceConfig],
    errors: &mut Errors,
) -> Vec<crate::rules::Rule> {
    let Some(entries) = doc.yaml.root.entries() else {
        errors.at(doc, "", "a rule file must be a mapping with a `rules` list");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, value) in entries {
        if key != "rules" {
            errors.at(doc, key, format!("unknown field `{key}`, expected `rules`"));
            continue;
        }
        let items: &[Node] = match &value.shape {
            Shape::Seq(items) => items,
            _ if value.is_null() => &[],
            _ => {
                errors.at(doc, "rules", "must be a list of rules");
                continue;
            }
        };
        for (i, item) in items.iter().enumerate() {
            let path = format!("rules[{i}]");
            let Some(raw) = errors.parse::<RawRule>(doc, &path) else {
                continue;
            };
            let origin = format!("{}:{}", doc.file.display(), item.mark.line);
            match crate::rules::Rule::compile(raw, origin, sources) {
                Ok(rule) => out.push(rule),
                Err(problems) => {
                    for (sub, message) in problems {
                        errors.at(doc, &join_path(&path, &sub), message);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "5", "5x", "s", "1.5s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_expand_environment_variables_with_defaults() {
        std::env::set_var("MES_GATEWAY_TEST_CREDS", "/run/credentials/x");
        assert_eq!(
            expand_env("${MES_GATEWAY_TEST_CREDS:-/etc/m}/s").unwrap(),
            "/run/credentials/x/s"
        );
        assert_eq!(
            expand_env("$MES_GATEWAY_TEST_CREDS/s").unwrap(),
            "/run/credentials/x/s"
        );
        assert_eq!(
            expand_env("${MES_GATEWAY_TEST_UNSET_VAR:-/etc/m}/s").unwrap(),
            "/etc/m/s"
        );
        assert_eq!(expand_env("plain/path").unwrap(), "plain/path");
        assert!(expand_env("${MES_GATEWAY_TEST_UNSET_VAR}/s")
            .unwrap_err()
            .contains("is not set"));
        assert!(expand_env("${oops").is_err());
    }

    #[test]
    fn values_that_would_crash_or_stall_the_daemon_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "s\n").unwrap();
        let main = [
            "d365:",
            "  base_url: http://127.0.0.1:9",
            "  company: USMF",
            "  client_id: x",
            "  token_url: http://127.0.0.1:9/t",
            "  client_secret_file: secret",
            "  request_timeout: 0s",
            "storage:",
            "  data_dir: data",
            "  prune_interval: 0s",
            "sources:",
            "  - type: mqtt",
            "    id: broker",
            "    url: mqtt://127.0.0.1:1883",
            "    client_id: x",
            "    keep_alive: 500ms",
            "    subscriptions: [{ topic: a/b, qos: 1 }]",
            "  - type: modbus",
            "    id: plc",
            "    tcp: 127.0.0.1:502",
            "    poll: 0ms",
            "    points:",
            "      - { name: c, unit: 1, kind: holding_register, address: 65535, type: u32 }",
        ];
        std::fs::write(dir.path().join(MAIN_FILE), main.join("\n")).unwrap();
        std::fs::create_dir_all(dir.path().join("rules.d")).unwrap();
        std::fs::write(
            dir.path().join("rules.d/r.yaml"),
            "rules:\n  - name: r\n    line: l\n    when: { source: broker, topic: a/b, edge: rising, debounce: 99999999999999d }\n    count: impulse\n    aggregate: { interval: 36501d }\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: { ProductionOrderNumber: P1, ItemNumber: A, ReportedGoodQuantity: \"{quantity}\" }\n",
        )
        .unwrap();
        let errors = load(dir.path()).unwrap_err().to_string();
        for expected in [
            "gateway.yaml:7:20: d365.request_timeout: must be at least 1s (every request would time out after it was written and be uncertain)",
            "gateway.yaml:10:19: storage.prune_interval: must be at least 1s (pruning reads the whole outbox)",
            "sources[0].keep_alive: must be 0 (off) or at least 1s: MQTT counts keep-alive in seconds",
            "sources[1].poll: must be at least 10ms (a device cannot be polled or answer faster)",
            "sources[1].points[0].address: the point runs past address 65535",
            "debounce: duration \"99999999999999d\" is too long: at most 36500d (100 years)",
            "aggregate.interval: duration \"36501d\" is too long: at most 36500d (100 years)",
        ] {
            assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
        }
    }

    #[test]
    fn secret_debug_hides_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }
}
