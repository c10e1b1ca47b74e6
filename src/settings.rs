//! The gateway's configuration as a whole: `gateway.yaml` and `rules.d/*.yaml` in one
//! directory. This module names the sections and hands each to the component that owns
//! it (`d365::config`, `outbox::config`, `source::config`, `rules::config`); the shared
//! reading and error collection is [`crate::config`]. It lives apart from `config` so
//! that imports run one way: components use `config`'s helpers, and only this module
//! knows the components.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::alert::config::AlertConfig;
use crate::api::config::ApiConfig;
use crate::config::{ConfigError, ConfigErrors, ConfigFile, Errors, MAIN_FILE, RULES_DIR};
use crate::d365::config::{
    check_type_keys, read_d365, read_dispatcher, read_message_types, D365Config, DispatcherConfig,
};
use crate::message::{FieldNames, MessageTypes};
use crate::outbox::config::{read_storage, StorageConfig};
use crate::rules::config::read_rule_file;
use crate::source::config::{read_sources, BrokenSource, SourceConfig};

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
    /// The operator service's doors: HTTP listener, token, Unix socket.
    pub api: ApiConfig,
    pub alerts: AlertConfig,
    /// What works but should be changed (`check` prints it; `run` logs it at every start).
    pub warnings: Vec<ConfigError>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlant {
    /// IANA time zone of the plant, for dates in messages; default: the system's.
    pub time_zone: Option<String>,
}

/// Loads and validates the configuration in `dir`; reports every problem found.
pub fn load(dir: &Path) -> Result<Config, ConfigErrors> {
    let mut errors = Errors::default();
    let main_file = dir.join(MAIN_FILE);
    let main = if main_file.is_file() {
        ConfigFile::read(&main_file, &mut errors)
    } else {
        errors.file(
            &main_file,
            format!("not found: the configuration directory must contain {MAIN_FILE}"),
        );
        None
    };

    let mut rule_files = Vec::new();
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
                    if let Some(doc) = ConfigFile::read(&file, &mut errors) {
                        rule_files.push(doc);
                    }
                }
            }
            Err(e) => errors.file(&rules_dir, format!("cannot list: {e}")),
        }
    }

    let config = main.and_then(|main| validate(dir, &main, &rule_files, &mut errors));
    match config {
        Some(mut config) if errors.is_empty() => {
            config.warnings = ConfigErrors::in_file_order(errors.1).0;
            Ok(config)
        }
        _ => Err(ConfigErrors::in_file_order(errors.0)),
    }
}

/// What the outbox commands need: the store, and how to read and check the content an
/// operator edits.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    pub storage: StorageConfig,
    /// The wire names of the journal fields, so edited content can be read back.
    pub field_names: FieldNames,
    pub message_types: MessageTypes,
    /// Where the running daemon's operator socket is.
    pub socket: PathBuf,
}

/// Reads only the `storage` section and what edited content is checked against: enough
/// for the outbox commands, which must work even where the D365 secret is readable by
/// the service alone.
pub fn load_storage(dir: &Path) -> Result<OutboxSettings, ConfigErrors> {
    let mut errors = Errors::default();
    let loaded = ConfigFile::read(&dir.join(MAIN_FILE), &mut errors).map(|file| {
        let mut cx = file.check(&mut errors);
        let field_names = cx
            .node("d365.field_names")
            .and_then(|_| cx.parse::<FieldNames>("d365.field_names"))
            .unwrap_or_default();
        let storage = read_storage(&mut cx);
        OutboxSettings {
            message_types: read_message_types(&mut cx),
            field_names,
            socket: crate::api::config::socket_path(
                crate::api::config::read_socket(&mut cx).as_deref(),
                &storage.data_dir,
            ),
            storage,
        }
    });
    match loaded {
        Some(s) if errors.is_empty() => Ok(s),
        _ => Err(ConfigErrors::in_file_order(errors.0)),
    }
}

const MAIN_SECTIONS: [&str; 8] = [
    "d365",
    "dispatcher",
    "storage",
    "sources",
    "api",
    "alerts",
    "shutdown_grace",
    "plant",
];

fn validate(
    dir: &Path,
    main: &ConfigFile,
    rule_files: &[ConfigFile],
    errors: &mut Errors,
) -> Option<Config> {
    let mut cx = main.check(errors);
    let Some(entries) = main.root().entries() else {
        cx.error("", "the top level must be a mapping of sections");
        return None;
    };
    let mut d365 = None;
    let mut dispatcher = DispatcherConfig::default();
    let mut storage = None;
    let mut sources = Vec::new();
    let mut broken_sources: Vec<BrokenSource> = Vec::new();
    let mut shutdown_grace = Duration::from_secs(10);
    let mut time_zone = jiff::tz::TimeZone::system();
    let mut api = ApiConfig::default();
    let mut alerts = AlertConfig::default();
    let mut seen = HashSet::new();
    for (name, _) in entries {
        let name = name.as_str();
        if !seen.insert(name.to_string()) {
            cx.error(name, format!("duplicate section `{name}`"));
            continue;
        }
        match name {
            "d365" => d365 = read_d365(&mut cx),
            "dispatcher" => dispatcher = read_dispatcher(&mut cx),
            "storage" => storage = Some(read_storage(&mut cx)),
            "sources" => sources = read_sources(&mut cx, "sources", &mut broken_sources),
            "api" => api = crate::api::config::read(&mut cx),
            "alerts" => alerts = crate::alert::config::read(&mut cx),
            "plant" => {
                if let Some(raw) = cx.parse::<RawPlant>("plant") {
                    if let Some(name) = raw.time_zone {
                        match jiff::tz::TimeZone::get(&name) {
                            Ok(tz) => time_zone = tz,
                            Err(e) => cx.error("plant.time_zone", format!("unknown time zone {name:?} (use an IANA name such as Europe/Berlin): {e}")),
                        }
                    }
                }
            }
            "shutdown_grace" => {
                if let Some(raw) = cx.parse::<String>("shutdown_grace") {
                    shutdown_grace = cx.duration("shutdown_grace", Some(raw), shutdown_grace);
                }
            }
            other => cx.error(
                other,
                format!(
                    "unknown section `{other}`, expected one of {}",
                    MAIN_SECTIONS.join(", ")
                ),
            ),
        }
    }
    let storage = storage.unwrap_or_else(|| read_storage(&mut cx));
    // An OPC UA source keeps its certificates with the gateway's other state, unless
    // told otherwise.
    for source in sources.iter_mut() {
        if let crate::source::config::SourceConfig::Opcua(o) = source {
            if o.pki_dir.is_none() {
                o.pki_dir = Some(storage.data_dir.join("opcua-pki"));
            }
        }
    }
    // D365 posts its business events to the webhook on the API listener; a Service Bus
    // pull with an Entra token uses the d365 section's app registration.
    for (i, source) in sources.iter_mut().enumerate() {
        let crate::source::config::SourceConfig::D365Events(events) = source else {
            continue;
        };
        if let Some(secret) = &events.webhook_secret {
            let at = format!("sources[{i}].webhook_secret_file");
            match api.listen {
                None => cx.error(
                    &format!("sources[{i}]"),
                    format!("d365_events source `{}` has a webhook_secret_file but no api.listen: D365 posts its events to /events/d365/{} there", events.id, events.id),
                ),
                Some(addr) if !addr.ip().is_loopback() && api.tls.is_none() => cx.error(
                    &at,
                    format!("D365 would post its events and this secret in clear text to {addr}: set api.tls (or listen on loopback behind a TLS proxy)"),
                ),
                Some(_) => {}
            }
            if secret.expose().chars().count() < crate::api::config::MIN_SECRET_CHARS {
                cx.error(
                    &at,
                    format!("the secret is shorter than {} characters; generate one, e.g. `openssl rand -hex 32`", crate::api::config::MIN_SECRET_CHARS),
                );
            }
        }
        if let Some(sb) = &mut events.service_bus {
            if let crate::source::d365_events::config::ServiceBusAuth::Entra(credentials) =
                &mut sb.auth
            {
                match &d365 {
                    Some(d) => *credentials = Some(std::sync::Arc::new(d.clone())),
                    None => cx.error(
                        &format!("sources[{i}].service_bus"),
                        "without sas_key_name and sas_key_file the gateway asks Entra for a token with the d365 section's app registration: add the d365 section, or a shared access key",
                    ),
                }
            }
        }
    }
    // Maps keyed by message type take only types that may be queued (a typo there
    // would silently fall back to the default). Not checked when the d365 section
    // itself is wrong: its declared types are unknown then.
    if d365.is_some() || cx.node("d365").is_none() {
        let types = d365
            .as_ref()
            .map(|d| d.message_types.clone())
            .unwrap_or_default();
        check_type_keys(
            &mut cx,
            "dispatcher.on_ambiguous.per_type",
            dispatcher.retry.ambiguous_per_type.keys(),
            &types,
        );
    }

    let mut rules: Vec<crate::rules::Rule> = Vec::new();
    for file in rule_files {
        let compiled = read_rule_file(&mut file.check(errors), &sources, &broken_sources);
        for rule in compiled {
            if let Some(first) = rules.iter().find(|r| r.name == rule.name) {
                errors.0.push(ConfigError {
                    file: file.path.clone(),
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
        api,
        alerts,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "dispatcher:",
            "  join: { max_lines: 0, per_type: { ProdProductionOrderStart: true } }",
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
        std::fs::write(dir.path().join(crate::config::MAIN_FILE), main.join("\n")).unwrap();
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
            "dispatcher.join.max_lines: 0 is out of range: 1 (nothing joined) to 1000",
            "dispatcher.join.per_type.ProdProductionOrderStart: only messages with lines can be joined",
            "sources[1].poll: must be at least 10ms (a device cannot be polled or answer faster)",
            "sources[1].points[0].address: the point runs past address 65535",
            "debounce: duration \"99999999999999d\" is too long: at most 36500d (100 years)",
            "aggregate.interval: duration \"36501d\" is too long: at most 36500d (100 years)",
        ] {
            assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
        }
    }

    fn config_dir(rules: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(crate::config::MAIN_FILE),
            "storage:\n  data_dir: data\nsources:\n  - type: simulator\n    id: sim\n    interval: 1s\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("rules.d")).unwrap();
        std::fs::write(dir.path().join("rules.d/line1.yaml"), rules).unwrap();
        dir
    }

    #[test]
    fn joining_is_switched_per_type_over_its_defaults() {
        let dir = config_dir("rules: []\n");
        let main = dir.path().join(crate::config::MAIN_FILE);
        let mut yaml = std::fs::read_to_string(&main).unwrap();
        yaml.push_str("dispatcher:\n  join:\n    max_lines: 50\n    per_type:\n      ProdProductionOrderPickingList: true\n      ProdProductionOrderRouteCard: false\n");
        std::fs::write(&main, yaml).unwrap();
        let join = load(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .dispatcher
            .join;
        assert!(
            join.joins(crate::message::TYPE_REPORT_FINISHED),
            "default kept"
        );
        assert!(join.joins(crate::message::TYPE_PICKING_LIST), "switched on");
        assert!(!join.joins(crate::message::TYPE_ROUTE_CARD), "switched off");
        assert!(!join.joins(crate::message::TYPE_START));
        assert_eq!(join.max_lines(), 50);
        // Unwritten: report as finished and route cards, 100 lines.
        let dir = config_dir("rules: []\n");
        let join = load(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .dispatcher
            .join;
        assert_eq!(join, crate::outbox::JoinPolicy::default());
        assert!(join.joins(crate::message::TYPE_ROUTE_CARD));
        assert!(!join.joins(crate::message::TYPE_PICKING_LIST));
    }

    #[test]
    fn three_mistakes_in_one_rule_are_all_reported_in_file_order() {
        let dir = config_dir(
            "rules:\n  - name: r\n    line: l1\n    when:\n      source: sim\n      edge: rissing\n    cuont: impulse\n    aggregate:\n      every: many\n    emit:\n      type: ProdProductionOrderStart\n",
        );
        let errors = load(dir.path()).unwrap_err();
        let file = dir.path().join("rules.d/line1.yaml");
        let lines: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            lines,
            [
                format!("{}:6:13: rules[0].when.edge: unknown variant `rissing`, expected one of `rising`, `falling`, `both`", file.display()),
                format!("{}:7:5: rules[0].cuont: unknown field `cuont`, expected one of `name`, `line`, `when`, `count`, `quantity`, `counter_max`, `aggregate`, `set_context`, `clear_context`, `release`, `withdraw`, `publish`, `emit`", file.display()),
                format!("{}:9:14: rules[0].aggregate.every: invalid value \"many\": expected a number", file.display()),
            ]
        );
    }

    /// A source whose own section has an error (its password file is missing) is not
    /// "unknown" to the rules that name it: their errors say they follow from it.
    #[test]
    fn an_error_that_follows_from_a_broken_source_says_so() {
        let dir = config_dir(
            "rules:\n  - name: count\n    line: line1\n    when: { source: broker, topic: plant/count }\n    count: impulse\n    emit: { type: ProdProductionOrderEnd }\n",
        );
        let main = dir.path().join(crate::config::MAIN_FILE);
        let base = std::fs::read_to_string(&main).unwrap();
        std::fs::write(
            &main,
            base.replace(
                "sources:\n",
                "sources:\n  - type: mqtt\n    id: broker\n    url: mqtt://127.0.0.1:1883\n    username: gw\n    password_file: missing-password\n    subscriptions: [{ topic: plant/# }]\n",
            ),
        )
        .unwrap();
        let errors = load(dir.path()).unwrap_err().to_string();
        assert!(
            errors.contains("sources[0].password_file: cannot read"),
            "{errors}"
        );
        assert!(
            errors.contains(
                "rules[0].when.source: source `broker` did not load (follows from the errors at sources[0] above)"
            ),
            "{errors}"
        );
        assert!(!errors.contains("unknown source"), "{errors}");
    }

    #[test]
    fn service_bus_mistakes_are_named_with_their_place() {
        let dir = config_dir("rules: []\n");
        let main = dir.path().join(crate::config::MAIN_FILE);
        let base = std::fs::read_to_string(&main).unwrap();
        std::fs::write(
            &main,
            base.replace(
                "sources:\n",
                "sources:\n  - type: d365_events\n    id: a\n  - type: d365_events\n    id: b\n    service_bus: { namespace: http://contoso.servicebus.windows.net, topic: t, sas_key_name: listen, wait: 300s, max_deliveries: 0 }\n",
            ),
        )
        .unwrap();
        let errors = load(dir.path()).unwrap_err().to_string();
        for expected in [
            "sources[0]: say how D365's events arrive: `service_bus`",
            "sources[1].service_bus.namespace: \"http://contoso.servicebus.windows.net\" uses http: only https is allowed",
            "sources[1].service_bus: name the entity: `queue`, or `topic` and `subscription`",
            "sources[1].service_bus: set both sas_key_name and sas_key_file",
            "sources[1].service_bus.wait: Service Bus waits at most 230s in one receive",
            "sources[1].service_bus.max_deliveries: must be at least 1",
        ] {
            assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
        }
    }

    #[test]
    fn alert_certificates_are_checked_like_a_sources() {
        let dir = config_dir("rules: []\n");
        let main = dir.path().join(crate::config::MAIN_FILE);
        let base = std::fs::read_to_string(&main).unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not read at load\n").unwrap();
        std::fs::write(
            &main,
            format!("{base}alerts:\n  mqtt:\n    url: mqtt://127.0.0.1:1883\n    topic: alerts/gw\n    ca_file: ca.pem\n    client_cert_file: missing.pem\n"),
        )
        .unwrap();
        let errors = load(dir.path()).unwrap_err().to_string();
        for expected in [
            "alerts.mqtt.url: certificates need an mqtts:// URL",
            "alerts.mqtt: client_cert_file and client_key_file go together",
            "missing.pem not found",
        ] {
            assert!(
                errors.contains(expected),
                "missing {expected:?} in:\n{errors}"
            );
        }
        std::fs::write(
            &main,
            format!("{base}alerts:\n  mqtt:\n    url: mqtts://127.0.0.1:8883\n    topic: alerts/gw\n    ca_file: ca.pem\n"),
        )
        .unwrap();
        let config = load(dir.path()).unwrap();
        let mqtt = config.alerts.mqtt.expect("an MQTT alert publisher");
        assert!(mqtt.broker.tls);
        assert_eq!(
            mqtt.broker.tls_files.ca_file,
            Some(dir.path().join("ca.pem"))
        );
    }

    #[test]
    fn an_api_reachable_from_other_hosts_needs_a_good_token_and_alerts_are_checked() {
        let dir = config_dir("rules: []\n");
        let main = dir.path().join(crate::config::MAIN_FILE);
        let base = std::fs::read_to_string(&main).unwrap();
        std::fs::write(dir.path().join("short-token"), "abc\n").unwrap();
        std::fs::write(
            &main,
            format!("{base}api:\n  listen: 0.0.0.0:9464\nalerts:\n  source_down_after: 0s\n  mqtt: {{ url: mqtt://127.0.0.1:1883, topic: \"alerts/#\" }}\n  webhook: {{ url: ftp://x }}\n"),
        )
        .unwrap();
        let errors = load(dir.path()).unwrap_err().to_string();
        for expected in [
            "api.listen: 0.0.0.0:9464 can be reached from other hosts: set api.token_file, or listen on 127.0.0.1",
            "alerts.source_down_after: must be at least 1s (a blip is not an incident)",
            "alerts.mqtt.topic: \"alerts/#\": a topic prefix without wildcards",
            "alerts.webhook.url: expected an http:// or https:// URL, found ftp://x/…",
            "api.listen: 0.0.0.0:9464 can be reached from other hosts, and the token, the console's cookie and webhook secrets would cross the network in clear text: set api.tls",
        ] {
            assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
        }
        std::fs::write(
            &main,
            format!("{base}api:\n  listen: 0.0.0.0:9464\n  token_file: short-token\n"),
        )
        .unwrap();
        let errors = load(dir.path()).unwrap_err().to_string();
        assert!(
            errors.contains("api.token_file: the token is shorter than 16 characters"),
            "{errors}"
        );
        std::fs::write(
            dir.path().join("hook-secret"),
            "a-webhook-secret-0123456789\n",
        )
        .unwrap();
        std::fs::write(
            &main,
            base.replace(
                "sources:\n",
                "sources:\n  - type: d365_events\n    id: d365\n    webhook_secret_file: hook-secret\n",
            ),
        )
        .unwrap();
        let errors = load(dir.path()).unwrap_err().to_string();
        assert!(
            errors.contains("sources[0]: d365_events source `d365` has a webhook_secret_file but no api.listen: D365 posts its events to /events/d365/d365 there"),
            "{errors}"
        );
        // A short webhook secret, and one D365 would post in clear text to the LAN.
        std::fs::write(dir.path().join("short-secret"), "0123456789\n").unwrap();
        std::fs::write(dir.path().join("long-token"), "0123456789abcdef0123\n").unwrap();
        std::fs::write(
            &main,
            base.replace(
                "sources:\n",
                "sources:\n  - type: d365_events\n    id: d365\n    webhook_secret_file: short-secret\n",
            ) + "api:\n  listen: 0.0.0.0:9464\n  token_file: long-token\n  insecure_plain_http: true\n",
        )
        .unwrap();
        let errors = load(dir.path()).unwrap_err().to_string();
        for expected in [
            "sources[0].webhook_secret_file: D365 would post its events and this secret in clear text to 0.0.0.0:9464: set api.tls",
            "sources[0].webhook_secret_file: the secret is shorter than 16 characters",
        ] {
            assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
        }
        assert_eq!(
            errors.matches("api.listen").count(),
            0,
            "plain HTTP was chosen: {errors}"
        );
        std::fs::write(&main, format!("{base}api:\n  listen: 127.0.0.1:9464\n")).unwrap();
        let config = load(dir.path()).unwrap();
        assert!(!config.api.token_for_reading());
        assert_eq!(
            config.api.socket_path(&config.storage.data_dir),
            config.storage.data_dir.join("api.sock")
        );
    }

    /// Plain HTTP beyond loopback by choice, and a token file others can read, are
    /// allowed and said as warnings naming the file; a file only its owner reads is not.
    #[test]
    fn readable_secret_files_and_plain_http_by_choice_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = config_dir("rules: []\n");
        let main = dir.path().join(crate::config::MAIN_FILE);
        let base = std::fs::read_to_string(&main).unwrap();
        let token = dir.path().join("api-token");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(
            &main,
            format!("{base}api:\n  listen: 0.0.0.0:9464\n  token_file: api-token\n  insecure_plain_http: true\n"),
        )
        .unwrap();
        let config = load(dir.path()).unwrap();
        let warnings: Vec<String> = config.warnings.iter().map(|w| w.to_string()).collect();
        let text = warnings.join("\n");
        assert!(
            text.contains(&format!(
                "api.token_file: {} is readable by every user (mode 0644)",
                token.display()
            )),
            "{text}"
        );
        assert!(
            text.contains("api.insecure_plain_http: 0.0.0.0:9464 serves plain HTTP to other hosts"),
            "{text}"
        );
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
        let config = load(dir.path()).unwrap();
        assert!(
            config.warnings[0]
                .to_string()
                .contains("readable by its group (mode 0640)"),
            "{:?}",
            config.warnings
        );
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = load(dir.path()).unwrap();
        assert_eq!(
            config.warnings.len(),
            1,
            "only the plain HTTP one: {:?}",
            config.warnings
        );
    }

    #[test]
    fn a_long_list_of_errors_is_capped_with_a_count() {
        let rules: String = (0..60)
            .map(|i| format!("  - name: r{i}\n    when: {{ source: sim }}\n    typo: 1\n"))
            .collect();
        let errors = load(config_dir(&format!("rules:\n{rules}")).path()).unwrap_err();
        assert_eq!(errors.0.len(), 60);
        let text = errors.to_string();
        assert!(text.starts_with("60 configuration errors:\n"), "{text}");
        assert_eq!(
            text.lines().count(),
            1 + crate::config::MAX_ERRORS_SHOWN + 1
        );
        assert!(text.ends_with("\n  … and 10 more"), "{text}");
        assert!(text.contains("rules[49].typo") && !text.contains("rules[50].typo"));
    }
}
