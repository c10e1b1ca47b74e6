//! The OPC UA source's configuration (`type: opcua`): the endpoint and its security
//! (policy, mode, identity, the trust folders), and the nodes to monitor with their
//! sampling, queue and deadband. NodeIds and browse paths are parsed here, so a typo is
//! a `check` error with its position, not a failure on the plant floor.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{FileCheck, Secret};

/// The security policies the gateway offers, by the names UA tools show. (Basic128Rsa15
/// and Basic256 are deprecated by the OPC Foundation and not offered.)
pub const POLICIES: [&str; 4] = [
    "None",
    "Basic256Sha256",
    "Aes128_Sha256_RsaOaep",
    "Aes256_Sha256_RsaPss",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityPolicy {
    None,
    Basic256Sha256,
    Aes128Sha256RsaOaep,
    Aes256Sha256RsaPss,
}

impl SecurityPolicy {
    fn parse(text: &str) -> Option<SecurityPolicy> {
        // Accept the spellings UA tools use (with or without the underscores/dashes).
        let key: String = text
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        Some(match key.as_str() {
            "none" => SecurityPolicy::None,
            "basic256sha256" => SecurityPolicy::Basic256Sha256,
            "aes128sha256rsaoaep" => SecurityPolicy::Aes128Sha256RsaOaep,
            "aes256sha256rsapss" => SecurityPolicy::Aes256Sha256RsaPss,
            _ => return None,
        })
    }

    /// The library's name for it.
    pub fn as_ua(self) -> opcua::crypto::SecurityPolicy {
        match self {
            SecurityPolicy::None => opcua::crypto::SecurityPolicy::None,
            SecurityPolicy::Basic256Sha256 => opcua::crypto::SecurityPolicy::Basic256Sha256,
            SecurityPolicy::Aes128Sha256RsaOaep => {
                opcua::crypto::SecurityPolicy::Aes128Sha256RsaOaep
            }
            SecurityPolicy::Aes256Sha256RsaPss => opcua::crypto::SecurityPolicy::Aes256Sha256RsaPss,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SecurityMode {
    None,
    Sign,
    SignAndEncrypt,
}

impl SecurityMode {
    pub fn as_ua(self) -> opcua::types::MessageSecurityMode {
        match self {
            SecurityMode::None => opcua::types::MessageSecurityMode::None,
            SecurityMode::Sign => opcua::types::MessageSecurityMode::Sign,
            SecurityMode::SignAndEncrypt => opcua::types::MessageSecurityMode::SignAndEncrypt,
        }
    }
}

/// Who the gateway is to the server.
#[derive(Debug, Clone)]
pub enum Identity {
    Anonymous,
    UserName { user: String, password: Secret },
    X509 { cert: PathBuf, key: PathBuf },
}

/// Where a monitored node is.
#[derive(Debug, Clone)]
pub enum NodeRef {
    Id(opcua::types::NodeId),
    /// From the Objects folder, each step `ns:BrowseName` (or `BrowseName` in ns 0).
    BrowsePath(Vec<(u16, String)>),
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeRef::Id(id) => write!(f, "{id}"),
            NodeRef::BrowsePath(steps) => {
                let text: Vec<String> = steps.iter().map(|(ns, n)| format!("{ns}:{n}")).collect();
                write!(f, "Objects/{}", text.join("/"))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct OpcuaNode {
    /// The point name rules use.
    pub name: String,
    pub node: NodeRef,
    /// How often the server samples the value; zero: every change (exception-based).
    pub sampling_interval: Duration,
    /// Values the server keeps for this node between publishes (the oldest are never
    /// discarded: an overflow drops the newest and is reported).
    pub queue_size: u32,
    /// Absolute deadband for numbers; `None`: every change.
    pub deadband: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct OpcuaConfig {
    pub id: String,
    /// `opc.tcp://host:port/path`.
    pub endpoint: String,
    pub policy: SecurityPolicy,
    pub mode: SecurityMode,
    pub identity: Identity,
    /// The client's certificate store: `own/`, `private/`, `trusted/`, `rejected/`;
    /// default `opcua-pki` in the data directory (filled in by `settings`).
    pub pki_dir: Option<PathBuf>,
    /// Trust any server certificate (test benches only; logged as a warning).
    pub trust_any_server: bool,
    pub application_uri: String,
    pub publishing_interval: Duration,
    pub request_timeout: Duration,
    pub nodes: Vec<OpcuaNode>,
}

impl OpcuaConfig {
    /// The PKI directory in use.
    pub fn pki(&self) -> PathBuf {
        self.pki_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("opcua-pki"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpcua {
    #[serde(rename = "type")]
    _kind: String,
    id: String,
    endpoint: String,
    #[serde(default = "default_policy")]
    security_policy: String,
    security_mode: Option<SecurityMode>,
    /// `anonymous` (default), or the fields below.
    user: Option<String>,
    password_file: Option<String>,
    user_cert_file: Option<String>,
    user_key_file: Option<String>,
    pki_dir: Option<String>,
    #[serde(default)]
    trust_any_server: bool,
    application_uri: Option<String>,
    publishing_interval: Option<String>,
    sampling_interval: Option<String>,
    queue_size: Option<u32>,
    request_timeout: Option<String>,
    nodes: Vec<RawNode>,
}

fn default_policy() -> String {
    "None".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    node_id: Option<String>,
    browse_path: Option<String>,
    sampling_interval: Option<String>,
    queue_size: Option<u32>,
    deadband: Option<f64>,
}

/// The most values a node's queue may ask the server to keep.
const MAX_QUEUE: u32 = 100_000;

/// Parses `ns:Name/ns:Name`, from the Objects folder.
fn browse_path(text: &str) -> Result<Vec<(u16, String)>, String> {
    let trimmed = text.trim().trim_start_matches('/');
    let trimmed = trimmed
        .strip_prefix("Objects/")
        .or_else(|| trimmed.strip_prefix("0:Objects/"))
        .unwrap_or(trimmed);
    let mut steps = Vec::new();
    for step in trimmed.split('/') {
        if step.is_empty() {
            return Err(format!("{text:?}: an empty step"));
        }
        let (ns, name) = match step.split_once(':') {
            Some((ns, name)) if ns.chars().all(|c| c.is_ascii_digit()) && !ns.is_empty() => {
                let ns: u16 = ns
                    .parse()
                    .map_err(|_| format!("{text:?}: namespace {ns} is too large"))?;
                (ns, name)
            }
            _ => (0, step),
        };
        if name.is_empty() {
            return Err(format!("{text:?}: a step without a name"));
        }
        steps.push((ns, name.to_string()));
    }
    Ok(steps)
}

/// Checks one `type: opcua` entry at `path`.
pub fn read(cx: &mut FileCheck<'_>, path: &str) -> Option<OpcuaConfig> {
    let raw: RawOpcua = cx.parse(path)?;
    let before = cx.error_count();
    let at = |field: &str| format!("{path}.{field}");
    match reqwest::Url::parse(&raw.endpoint) {
        Ok(u) if u.scheme() == "opc.tcp" && u.host_str().is_some() => {}
        _ => cx.error(
            &at("endpoint"),
            format!("{:?}: expected opc.tcp://host:port[/path]", raw.endpoint),
        ),
    }
    let policy = SecurityPolicy::parse(&raw.security_policy).unwrap_or_else(|| {
        cx.error(
            &at("security_policy"),
            format!(
                "unknown security policy {:?}, expected one of {}",
                raw.security_policy,
                POLICIES.join(", ")
            ),
        );
        SecurityPolicy::None
    });
    let mode = raw
        .security_mode
        .unwrap_or(if policy == SecurityPolicy::None {
            SecurityMode::None
        } else {
            SecurityMode::SignAndEncrypt
        });
    if (policy == SecurityPolicy::None) != (mode == SecurityMode::None) {
        cx.error(
            &at("security_mode"),
            "security_policy None goes with security_mode None only, and a policy other than None needs Sign or SignAndEncrypt",
        );
    }
    let identity = match (
        &raw.user,
        &raw.password_file,
        &raw.user_cert_file,
        &raw.user_key_file,
    ) {
        (None, None, None, None) => Identity::Anonymous,
        (Some(user), Some(file), None, None) => match cx.secret_file(&at("password_file"), file) {
            Some((password, _)) => Identity::UserName {
                user: user.clone(),
                password,
            },
            None => Identity::Anonymous,
        },
        (None, None, Some(cert), Some(key)) => {
            let cert = cx.file_path(&at("user_cert_file"), cert);
            let key = cx.file_path(&at("user_key_file"), key);
            for (field, file) in [("user_cert_file", &cert), ("user_key_file", &key)] {
                if let Some(f) = file {
                    if !f.is_file() {
                        cx.error(&at(field), format!("{} does not exist", f.display()));
                    }
                }
            }
            match (cert, key) {
                (Some(cert), Some(key)) => Identity::X509 { cert, key },
                _ => Identity::Anonymous,
            }
        }
        _ => {
            cx.error(
                path,
                "identity: none of user/password_file/user_cert_file/user_key_file (anonymous), user with password_file, or user_cert_file with user_key_file",
            );
            Identity::Anonymous
        }
    };
    if !matches!(identity, Identity::Anonymous) && policy == SecurityPolicy::None {
        // The password would cross the network in the clear: UA encrypts the token with
        // the server's certificate only under a policy.
        if matches!(identity, Identity::UserName { .. }) {
            cx.warn(
                &at("security_policy"),
                "a user name and password with security_policy None: the password is protected only if the server's endpoint encrypts user tokens; prefer Basic256Sha256 SignAndEncrypt",
            );
        }
    }
    let pki_dir = raw
        .pki_dir
        .as_deref()
        .and_then(|d| cx.file_path(&at("pki_dir"), d));
    if raw.trust_any_server {
        cx.warn(
            &at("trust_any_server"),
            "every server certificate is trusted: anyone on the network can pose as this PLC; move the server's certificate into the trusted folder instead",
        );
    }
    let publishing_interval = cx.duration_at_least(
        &at("publishing_interval"),
        raw.publishing_interval.clone(),
        Duration::from_millis(100),
        Duration::from_millis(10),
        "servers refuse faster publishing",
    );
    let default_sampling = cx.duration(
        &at("sampling_interval"),
        raw.sampling_interval.clone(),
        Duration::ZERO,
    );
    let default_queue = raw.queue_size.unwrap_or(100);
    let request_timeout = cx.duration_at_least(
        &at("request_timeout"),
        raw.request_timeout.clone(),
        Duration::from_secs(10),
        Duration::from_millis(100),
        "a request needs a round trip",
    );
    if raw.nodes.is_empty() {
        cx.error(&at("nodes"), "at least one node to monitor");
    }
    let mut nodes = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, n) in raw.nodes.iter().enumerate() {
        let np = |field: &str| format!("{path}.nodes[{i}].{field}");
        if !names.insert(n.name.clone()) {
            cx.error(&np("name"), format!("duplicate node name `{}`", n.name));
        }
        let node = match (&n.node_id, &n.browse_path) {
            (Some(id), None) => match opcua::types::NodeId::from_str(id.trim()) {
                Ok(id) => Some(NodeRef::Id(id)),
                Err(_) => {
                    cx.error(
                        &np("node_id"),
                        format!("{id:?} is not a NodeId: expected e.g. ns=3;s=\"DB_Line1\".\"GoodCount\", ns=2;i=1001, ns=1;g=<guid> or ns=1;b=<base64>"),
                    );
                    None
                }
            },
            (None, Some(p)) => match browse_path(p) {
                Ok(steps) => Some(NodeRef::BrowsePath(steps)),
                Err(e) => {
                    cx.error(&np("browse_path"), e);
                    None
                }
            },
            _ => {
                cx.error(
                    &format!("{path}.nodes[{i}]"),
                    "give either node_id or browse_path",
                );
                None
            }
        };
        let queue_size = n.queue_size.unwrap_or(default_queue);
        if queue_size == 0 || queue_size > MAX_QUEUE {
            cx.error(&np("queue_size"), format!("must be 1..={MAX_QUEUE}"));
        }
        if n.deadband.is_some_and(|d| !(d.is_finite() && d >= 0.0)) {
            cx.error(&np("deadband"), "must be a number ≥ 0");
        }
        let sampling_interval = match &n.sampling_interval {
            Some(_) => cx.duration(
                &np("sampling_interval"),
                n.sampling_interval.clone(),
                default_sampling,
            ),
            None => default_sampling,
        };
        if let Some(node) = node {
            nodes.push(OpcuaNode {
                name: n.name.clone(),
                node,
                sampling_interval,
                queue_size,
                deadband: n.deadband.filter(|d| *d > 0.0),
            });
        }
    }
    if cx.error_count() > before {
        return None;
    }
    Some(OpcuaConfig {
        application_uri: raw
            .application_uri
            .unwrap_or_else(|| format!("urn:mes-gateway:{}", raw.id)),
        id: raw.id,
        endpoint: raw.endpoint,
        policy,
        mode,
        identity,
        pki_dir,
        trust_any_server: raw.trust_any_server,
        publishing_interval,
        request_timeout,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browse_paths_parse_with_namespaces() {
        assert_eq!(
            browse_path("Objects/3:Line1/3:GoodCount").unwrap(),
            vec![(3, "Line1".to_string()), (3, "GoodCount".to_string())]
        );
        assert_eq!(
            browse_path("Server").unwrap(),
            vec![(0, "Server".to_string())]
        );
        assert!(browse_path("3:Line1//x").is_err());
        assert!(browse_path("3:").is_err());
    }

    #[test]
    fn policies_take_the_names_ua_tools_show() {
        assert_eq!(
            SecurityPolicy::parse("Aes128_Sha256_RsaOaep"),
            Some(SecurityPolicy::Aes128Sha256RsaOaep)
        );
        assert_eq!(
            SecurityPolicy::parse("Basic256Sha256"),
            Some(SecurityPolicy::Basic256Sha256)
        );
        assert_eq!(SecurityPolicy::parse("Basic128Rsa15"), None);
    }
}
