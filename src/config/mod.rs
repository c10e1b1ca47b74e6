//! What every part of the configuration shares: reading the files, positions, collecting
//! every error as `file:line:column: path: message`, durations, secrets and environment
//! expansion.
//!
//! Each component owns its configuration next to its code (`d365::config`,
//! `outbox::config`, `source::*::config`, `rules::config`) and reads its section through
//! a [`FileCheck`]; `settings` names the sections and assembles the whole. Imports
//! run one way: components use these helpers, this module uses no component.
//!
//! Loading is parse-then-validate. Each file is read with serde-saphyr
//! ([`document::Document`]); each section and each list element is deserialized on its
//! own into a component's raw type, so one mistake does not hide the next; then the
//! component checks values (URLs, limits, references) and builds its checked type. Every
//! problem found on the way is collected and reported together.
//!
//! Secrets are read here (from a file or an environment variable) into [`Secret`], whose
//! `Debug` never shows the value. Error messages name the file or variable, never the value.

pub mod document;
pub mod value;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use document::Document;
pub use document::{join_path, Mark, Node, Shape};

/// The main file inside the configuration directory.
pub const MAIN_FILE: &str = "gateway.yaml";
/// The folder of rule files inside the configuration directory.
pub const RULES_DIR: &str = "rules.d";

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

/// The most errors listed; the rest are counted ("… and 12 more"). A user fixes the
/// first screenful, and more than this usually follows from one mistake.
pub const MAX_ERRORS_SHOWN: usize = 50;

impl ConfigErrors {
    /// Orders the errors as a user reads the files: files in the order they were read,
    /// each from top to bottom.
    pub fn in_file_order(mut errors: Vec<ConfigError>) -> ConfigErrors {
        let mut files: Vec<PathBuf> = Vec::new();
        for e in &errors {
            if !files.contains(&e.file) {
                files.push(e.file.clone());
            }
        }
        errors.sort_by_key(|e| {
            (
                files.iter().position(|f| *f == e.file),
                e.mark.map(|m| (m.line, m.column)),
            )
        });
        ConfigErrors(errors)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} configuration error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in self.0.iter().take(MAX_ERRORS_SHOWN) {
            write!(f, "\n  {e}")?;
        }
        if n > MAX_ERRORS_SHOWN {
            write!(f, "\n  … and {} more", n - MAX_ERRORS_SHOWN)?;
        }
        Ok(())
    }
}

/// Every problem found so far, in the order found, and the warnings: things that work
/// but that a security review would flag (a secret file others can read, plain HTTP
/// beyond loopback by choice). `check` prints the warnings; `run` logs them at every
/// start and reload.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<ConfigError>, pub Vec<ConfigError>);

impl Errors {
    /// A problem with a whole file (missing, unreadable).
    pub fn file(&mut self, file: &Path, message: impl Into<String>) {
        self.0.push(ConfigError {
            file: file.to_path_buf(),
            mark: None,
            path: String::new(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A parsed configuration file.
#[derive(Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    yaml: Document,
}

impl ConfigFile {
    /// Reads and parses `path`; a problem is recorded in `errors` and gives `None`.
    pub fn read(path: &Path, errors: &mut Errors) -> Option<ConfigFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                errors.file(path, format!("cannot read: {e}"));
                return None;
            }
        };
        match Document::parse(text) {
            Ok(yaml) => Some(ConfigFile {
                path: path.to_path_buf(),
                yaml,
            }),
            Err(e) => {
                errors.0.push(ConfigError {
                    file: path.to_path_buf(),
                    mark: Some(e.mark),
                    path: String::new(),
                    message: format!("YAML syntax error: {}", e.message),
                });
                None
            }
        }
    }

    /// The file's top node.
    pub fn root(&self) -> &Node {
        &self.yaml.root
    }

    /// Checks this file, filing problems in `errors`.
    pub fn check<'a>(&'a self, errors: &'a mut Errors) -> FileCheck<'a> {
        FileCheck { file: self, errors }
    }
}

/// One file being checked: components read their part of it through this and file every
/// problem with its position.
#[derive(Debug)]
pub struct FileCheck<'a> {
    file: &'a ConfigFile,
    errors: &'a mut Errors,
}

impl<'a> FileCheck<'a> {
    /// The file being checked.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// The directory of the file: relative paths in it are relative to this, not to the
    /// working directory, so `run -c DIR` behaves the same from anywhere.
    pub fn dir(&self) -> &Path {
        self.file.path.parent().unwrap_or(Path::new("."))
    }

    /// The node at a field path, if it is written.
    pub fn node(&self, path: &str) -> Option<&'a Node> {
        self.file.yaml.node(path)
    }

    /// How many problems have been found so far (in every file).
    pub fn error_count(&self) -> usize {
        self.errors.0.len()
    }

    /// Files a warning at a field path: the configuration stays valid.
    pub fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.errors.1.push(ConfigError {
            file: self.file.path.clone(),
            mark: Some(self.file.yaml.locate(path)),
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Files a problem at a field path (positioned at the field, or at its parent when
    /// it is not written).
    pub fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.0.push(ConfigError {
            file: self.file.path.clone(),
            mark: Some(self.file.yaml.locate(path)),
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Files problems reported relative to `prefix` (a source's checks), as
    /// `(path inside, message)`. True if there were none.
    pub fn errors_under(&mut self, prefix: &str, problems: Problems) -> bool {
        let none = problems.is_empty();
        for (sub, message) in problems {
            self.error(&join_path(prefix, &sub), message);
        }
        none
    }

    /// Deserializes the node at `path` into `T`, filing every error found in it.
    pub fn parse<T: DeserializeOwned>(&mut self, path: &str) -> Option<T> {
        match self.file.yaml.parse_all_at::<T>(path) {
            Ok(v) => Some(v),
            Err(errors) => {
                for e in errors {
                    self.errors.0.push(ConfigError {
                        file: self.file.path.clone(),
                        mark: Some(e.mark),
                        path: e.path,
                        message: e.message,
                    });
                }
                None
            }
        }
    }

    /// A duration field: `default` when not written, or after filing a bad value.
    pub fn duration(&mut self, path: &str, raw: Option<String>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(text) => match parse_duration(&text) {
                Ok(d) => d,
                Err(e) => {
                    self.error(path, e);
                    default
                }
            },
        }
    }

    /// A duration field that must not be below `min`, where a smaller one would stop the
    /// daemon or make it spin (a zero interval, a zero timeout); `min` in its place after
    /// filing.
    pub fn duration_at_least(
        &mut self,
        path: &str,
        raw: Option<String>,
        default: Duration,
        min: Duration,
        why: &str,
    ) -> Duration {
        let value = self.duration(path, raw, default);
        if value < min {
            self.error(
                path,
                format!("must be at least {} ({why})", format_duration(min)),
            );
            return min;
        }
        value
    }

    pub fn non_empty(&mut self, path: &str, value: &str) {
        if value.trim().is_empty() {
            self.error(path, "must not be empty");
        }
    }

    /// An https URL (http only to a loopback address, for fakes).
    pub fn https_url(&mut self, path: &str, text: &str) -> Option<reqwest::Url> {
        match reqwest::Url::parse(text) {
            Ok(url) => {
                let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
                match url.scheme() {
                    "https" => Some(url),
                    "http" if loopback => Some(url),
                    "http" => {
                        self.error(path, format!("{text:?} uses http: only https is allowed (http only for localhost fakes)"));
                        None
                    }
                    other => {
                        self.error(
                            path,
                            format!("{text:?}: unsupported scheme `{other}`, expected https"),
                        );
                        None
                    }
                }
            }
            Err(e) => {
                self.error(path, format!("invalid URL {text:?}: {e}"));
                None
            }
        }
    }

    /// A path as written (with `$VAR` expanded), relative to the file's directory.
    pub fn file_path(&mut self, path: &str, written: &str) -> Option<PathBuf> {
        match expand_env(written) {
            Ok(expanded) => Some(resolve(self.dir(), &expanded)),
            Err(e) => {
                self.error(path, e);
                None
            }
        }
    }

    /// Reads a secret from the file named at `path`; returns it with its origin for log
    /// lines. The file's content is never put into an error message.
    pub fn secret_file(&mut self, path: &str, written: &str) -> Option<(Secret, String)> {
        let file = self.file_path(path, written)?;
        match std::fs::read_to_string(&file) {
            Ok(s) if s.trim().is_empty() => {
                self.error(path, format!("{} is empty", file.display()));
                None
            }
            Ok(s) => {
                if let Some(mode) = readable_by_others(&file) {
                    self.warn(
                        path,
                        format!(
                            "{} is readable by {} (mode {mode:04o}): make it 0600, owned by the service's user, or hand it over with systemd's LoadCredential=",
                            file.display(),
                            if mode & 0o004 != 0 { "every user" } else { "its group" }
                        ),
                    );
                }
                Some((
                    Secret(s.trim().to_string()),
                    format!("file {}", file.display()),
                ))
            }
            Err(e) => {
                self.error(
                    path,
                    format!("cannot read {}: {}", file.display(), e.kind()),
                );
                None
            }
        }
    }

    /// Reads a secret from the environment variable named at `path`.
    pub fn secret_env(&mut self, path: &str, var: &str) -> Option<(Secret, String)> {
        match std::env::var(var) {
            Ok(s) if !s.trim().is_empty() => Some((
                Secret(s.trim().to_string()),
                format!("environment variable {var}"),
            )),
            _ => {
                self.error(
                    path,
                    format!("environment variable {var} is not set or empty"),
                );
                None
            }
        }
    }
}

/// The file's permission bits when its group or others may read it. A file in systemd's
/// credentials directory is exempt: systemd makes that copy and its directory private to
/// the service, whatever the bits say.
fn readable_by_others(file: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
        if file.starts_with(Path::new(&dir)) {
            return None;
        }
    }
    let mode = std::fs::metadata(file).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then_some(mode)
}

/// Problems found by a check that knows only its own part, as (path inside, message).
pub type Problems = Vec<(String, String)>;

/// `path` relative to `base`, unless it is absolute.
pub fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
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
    fn secret_debug_hides_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }
}
