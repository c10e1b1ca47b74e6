//! Deployment files: the systemd unit verifies, and a staged install puts every file
//! where the unit expects it. (The .deb itself is built and checked by
//! `deploy/check-deb.sh`, which `.ci/run` runs.)

use mes_gateway_testkit as support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use support::process::{path_str, BIN};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn unit_text() -> String {
    std::fs::read_to_string(repo().join("systemd/mes-gateway.service")).unwrap()
}

/// Values of `Key=` lines in the unit.
fn unit_values(key: &str) -> Vec<String> {
    unit_text()
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    // verify checks that commands exist: point them at the binary under test.
    let tmp = tempfile::tempdir().unwrap();
    let unit = tmp.path().join("mes-gateway.service");
    std::fs::write(&unit, unit_text().replace("/usr/bin/mes-gateway", &BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path_str(&unit)])
        .output()
        .expect("systemd-analyze must be installed (bash .ci/run installs package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warned:\n{stderr}"
    );
}

#[test]
fn the_unit_is_notify_with_watchdog_check_and_serial_access() {
    let unit = unit_text();
    for line in [
        "Type=notify",
        "ExecStartPre=/usr/bin/mes-gateway check -c ${MES_GATEWAY_CONFIG}",
        "ExecReload=/usr/bin/mes-gateway check -c ${MES_GATEWAY_CONFIG}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "SupplementaryGroups=dialout",
        "StateDirectory=mes-gateway",
        "ConfigurationDirectory=mes-gateway",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line:?}");
    }
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));
    assert!(
        !unit.lines().any(|l| l.starts_with("PrivateDevices=yes")),
        "PrivateDevices hides serial ports"
    );
    assert!(unit
        .lines()
        .any(|l| l.starts_with("DeviceAllow=char-ttyUSB")));
}

#[test]
fn a_staged_install_puts_files_where_the_unit_expects_them() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let out = Command::new("sh")
        .arg(repo().join("deploy/install.sh"))
        .arg(&*BIN)
        .env("DESTDIR", &root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at = |p: &str| root.join(p.trim_start_matches('/'));

    for exec in unit_values("ExecStart")
        .iter()
        .chain(&unit_values("ExecStartPre"))
    {
        let binary = exec.split_whitespace().next().unwrap();
        assert!(at(binary).is_file(), "{binary} missing");
    }
    let config_dir = unit_values("Environment")
        .iter()
        .find_map(|e| e.strip_prefix("MES_GATEWAY_CONFIG=").map(str::to_string))
        .expect("MES_GATEWAY_CONFIG in the unit");
    assert!(at(&config_dir).join("gateway.yaml").is_file());
    assert!(at(&config_dir).join("rules.d").is_dir());
    let credential = unit_values("LoadCredential")[0]
        .split_once(':')
        .unwrap()
        .1
        .to_string();
    let secret = at(&credential);
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600,
        "secret must be 0600"
    );
    let env_file = unit_values("EnvironmentFile")[0]
        .trim_start_matches('-')
        .to_string();
    assert!(at(&env_file).is_file());
    assert!(at("/usr/lib/sysusers.d/mes-gateway.conf").is_file());
    assert!(at("/usr/lib/tmpfiles.d/mes-gateway.conf").is_file());

    // The installed config checks out once the secret is in place, reading it the way
    // the unit hands it over ($CREDENTIALS_DIRECTORY).
    let check = |creds: &Path| {
        Command::new(&*BIN)
            .args(["check", "-c", path_str(&at(&config_dir))])
            .env("CREDENTIALS_DIRECTORY", creds)
            .output()
            .unwrap()
    };
    let empty = check(secret.parent().unwrap());
    assert_eq!(empty.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("d365-client-secret is empty"));
    std::fs::write(&secret, support::TEST_SECRET).unwrap();
    let ok = check(secret.parent().unwrap());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // A second run keeps the operator's files.
    std::fs::write(at(&config_dir).join("gateway.yaml"), "# edited\n").unwrap();
    let again = Command::new("sh")
        .arg(repo().join("deploy/install.sh"))
        .arg(&*BIN)
        .env("DESTDIR", &root)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(at(&config_dir).join("gateway.yaml")).unwrap(),
        "# edited\n"
    );
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        support::TEST_SECRET
    );
}
