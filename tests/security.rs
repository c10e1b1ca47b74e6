//! The operator service tried the way a hostile machine on the plant LAN would, against
//! the real binary: TLS (1.2 and 1.3, a new certificate on reload), half-sent requests
//! and a connection flood (closed by the server; `/health` and the CLI's socket answer
//! all along), a webhook refused before its body is sent, reads forwarded by a proxy, a
//! rotated token, hostile login names and a password-guessing loop, and the console in a
//! real headless Chromium with a forged D365 link.

use mes_gateway_testkit as support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::browser::Browser;
use support::mqtt::{free_port, make_ca, openssl};
use support::{process, FakeD365, WEBHOOK_SECRET};

const TOKEN: &str = "security-token-0123456789abcdef";
const NEW_TOKEN: &str = "rotated-token-fedcba9876543210";

/// A gateway with a `d365_events` webhook and the API on a loopback port; `api_extra`
/// is appended to its `api` section.
struct Plant {
    fake: FakeD365,
    dir: tempfile::TempDir,
    port: u16,
    out: process::Output,
    gw: process::Running,
}

/// Writes a secret file only its owner may read (as `check` wants it).
fn secret(dir: &Path, name: &str, value: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

impl Plant {
    async fn start(api_extra: &str) -> Plant {
        let fake = FakeD365::start().await;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        support::write_config(
            dir.path(),
            &format!(
                "{}storage:\n  data_dir: data\nsources:\n  - type: d365_events\n    id: d365\n    webhook_secret_file: webhook-secret\napi:\n  listen: 127.0.0.1:{port}\n  token_file: api-token\n{api_extra}",
                support::d365_yaml(&fake)
            ),
        );
        secret(dir.path(), "api-token", TOKEN);
        secret(dir.path(), "webhook-secret", WEBHOOK_SECRET);
        Plant::run(fake, dir, port).await
    }

    async fn run(fake: FakeD365, dir: tempfile::TempDir, port: u16) -> Plant {
        let out = process::Output::new();
        let gw =
            process::start_logging(&["run", "-c", process::path_str(dir.path())], &out, "info");
        out.wait_for("Operator socket listening.").await;
        Plant {
            fake,
            dir,
            port,
            out,
            gw,
        }
    }

    fn cfg(&self) -> &str {
        process::path_str(self.dir.path())
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("data/api.sock")
    }

    /// Waits until the webhook takes events (the components run).
    async fn webhook_ready(&self) {
        let http = reqwest::Client::new();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let r = http
                    .post(format!("{}/events/d365/d365", self.base()))
                    .header("X-Webhook-Secret", WEBHOOK_SECRET)
                    .body("not an event")
                    .send()
                    .await
                    .unwrap();
                if r.status() != 503 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "the webhook never took events");
    }

    /// The value of a metric sample (`name{labels}`), read as a local caller.
    async fn metric(&self, sample: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
    }
}

/// One HTTP/1.1 GET on the gateway's Unix socket; the raw answer.
async fn socket_get(socket: &Path, path: &str) -> String {
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    answer
}

/// A CA `ca` and a server certificate for 127.0.0.1 it signed, as `NAME.pem`/`NAME.key`.
fn issue(dir: &Path, ca: &str, name: &str) -> PathBuf {
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let ca_pem = make_ca(dir, ca);
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    ca_pem
}

/// An HTTPS client that trusts `ca` alone, speaking exactly `version`.
fn tls_client(ca: &Path, version: Option<reqwest::tls::Version>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    if let Some(v) = version {
        b = b.min_tls_version(v).max_tls_version(v);
    }
    b.build().unwrap()
}

fn install_cert(certs: &Path, name: &str, config: &Path) {
    std::fs::copy(certs.join(format!("{name}.pem")), config.join("api.crt")).unwrap();
    let key = std::fs::read_to_string(certs.join(format!("{name}.key"))).unwrap();
    secret(config, "api.key", key.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_speaks_tls_1_2_and_1_3_and_takes_a_new_certificate_on_reload() {
    let certs = tempfile::tempdir().unwrap();
    let first_ca = issue(certs.path(), "ca1", "one");
    let second_ca = issue(certs.path(), "ca2", "two");
    let fake = FakeD365::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    install_cert(certs.path(), "one", dir.path());
    // Not on loopback without TLS would be refused; with it, the check passes.
    support::write_config(
        dir.path(),
        &format!(
            "{}storage:\n  data_dir: data\napi:\n  listen: 127.0.0.1:{port}\n  token_file: api-token\n  tls:\n    cert_file: api.crt\n    key_file: api.key\n",
            support::d365_yaml(&fake)
        ),
    );
    secret(dir.path(), "api-token", TOKEN);
    let plant = Plant::run(fake, dir, port).await;
    plant.out.wait_for("scheme=\"https\"").await;
    let url = format!("https://127.0.0.1:{port}/health");
    for version in [
        reqwest::tls::Version::TLS_1_2,
        reqwest::tls::Version::TLS_1_3,
    ] {
        let r = tls_client(&first_ca, Some(version))
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{version:?}: {e:?}"));
        assert_eq!(r.status(), 200, "{version:?}");
        assert_eq!(
            r.headers()["strict-transport-security"],
            "max-age=31536000",
            "HSTS under TLS"
        );
    }
    // Plain HTTP on the TLS port gets no answer from the API.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/health")).await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    // A client that trusts only the next certificate's CA refuses this one.
    assert!(tls_client(&second_ca, None).get(&url).send().await.is_err());

    // The console's cookie is Secure under TLS.
    let login = tls_client(&first_ca, None)
        .post(format!("https://127.0.0.1:{port}/console/login"))
        .form(&[("name", "Alice"), ("token", TOKEN)])
        .send()
        .await
        .unwrap();
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.ends_with("; Secure"),
        "{cookie}"
    );

    // Rotate the certificate: files replaced, then `reload` (what SIGHUP does).
    install_cert(certs.path(), "two", plant.dir.path());
    let (code, stdout, stderr) = process::run(&["reload", "-c", plant.cfg()]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    plant.out.wait_for("api.tls: certificate").await;
    let r = tls_client(&second_ca, None).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "the new certificate serves");
    assert!(
        tls_client(&first_ca, None).get(&url).send().await.is_err(),
        "the old one is gone"
    );
    // The listener was never closed: the same port, no restart.
    assert_eq!(
        plant.out.text().matches("Operator API listening").count(),
        1
    );
    plant.gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_by_the_server_and_never_stall_health_or_the_cli() {
    const LORIS: usize = 300;
    let plant = Plant::start("  header_timeout: 1s\n  max_connections: 400\n").await;
    let addr = format!("127.0.0.1:{}", plant.port);
    let mut loris = Vec::new();
    for _ in 0..LORIS {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
            .await
            .unwrap();
        loris.push(s);
    }
    // Health on the same listener, and the CLI's socket, answer within a second.
    let health = tokio::time::timeout(
        Duration::from_secs(1),
        reqwest::get(format!("{}/health", plant.base())),
    )
    .await
    .expect("/health within a second")
    .unwrap();
    assert_eq!(health.status(), 200);
    let status = tokio::time::timeout(
        Duration::from_secs(1),
        socket_get(&plant.socket(), "/api/v1/status"),
    )
    .await
    .expect("the socket within a second");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let started = Instant::now();
    let (code, stdout, stderr) = process::run(&["status", "-c", plant.cfg()]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The server closes every half-sent request after the header deadline.
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        for s in &mut loris {
            let mut buf = [0u8; 512];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "half-sent requests still open");
    let timed_out = plant
        .metric("mes_gateway_api_connections_timed_out_total{door=\"http\"}")
        .await;
    assert!(timed_out >= LORIS as f64, "{timed_out}");
    assert_eq!(
        plant
            .metric("mes_gateway_api_connections_open{door=\"http\"}")
            .await,
        1.0,
        "only the scrape itself"
    );
    plant.gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_once_and_counted_and_the_socket_still_answers() {
    let plant = Plant::start("  max_connections: 8\n").await;
    let addr = format!("127.0.0.1:{}", plant.port);
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut ninth = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = ninth
        .write_all(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await;
    let mut buf = [0u8; 256];
    let answer = tokio::time::timeout(Duration::from_secs(2), ninth.read(&mut buf))
        .await
        .expect("closed at once, not left waiting");
    assert!(
        matches!(answer, Ok(0) | Err(_)),
        "the ninth connection got an answer: {answer:?}"
    );
    let status = tokio::time::timeout(
        Duration::from_secs(1),
        socket_get(&plant.socket(), "/api/v1/status"),
    )
    .await
    .expect("the socket has its own cap");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    drop(idle);
    // Once the idle ones are gone the listener serves again.
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(r) = reqwest::get(format!("{}/health", plant.base())).await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(served.is_ok());
    let refused = plant
        .metric("mes_gateway_api_connections_refused_total{door=\"http\"}")
        .await;
    assert!(refused >= 1.0, "{refused}");
    plant
        .out
        .wait_for("Operator listener at its connection cap")
        .await;
    plant.gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_post_without_the_secret_is_refused_before_its_body_is_sent() {
    let plant = Plant::start("").await;
    plant.webhook_ready().await;
    let mut s = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", plant.port))
        .await
        .unwrap();
    s.write_all(b"POST /events/d365/d365 HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: 1900000\r\n\r\n")
        .await
        .unwrap();
    // Not one byte of the 1.9 MB sent: the answer comes anyway.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered before the upload")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    plant
        .out
        .wait_for(
            "D365 business event refused: missing or wrong webhook secret; its body was not read.",
        )
        .await;

    // With the secret, a body larger than any business event is refused too.
    let big = reqwest::Client::new()
        .post(format!("{}/events/d365/d365", plant.base()))
        .header("X-Webhook-Secret", WEBHOOK_SECRET)
        .body(vec![b' '; 300 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    plant.gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_forwarded_by_a_proxy_needs_the_token_and_every_answer_carries_the_safety_headers() {
    let plant = Plant::start("").await;
    let http = reqwest::Client::new();
    for path in ["/health", "/metrics", "/api/v1/messages", "/api/v1/status"] {
        let url = format!("{}{path}", plant.base());
        assert_eq!(
            http.get(&url).send().await.unwrap().status(),
            200,
            "{path} locally"
        );
        for header in ["X-Forwarded-For", "Forwarded", "X-Real-IP"] {
            let r = http
                .get(&url)
                .header(header, "for=192.0.2.10")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{path} through a proxy ({header})");
        }
        let r = http
            .get(&url)
            .header("X-Forwarded-For", "192.0.2.10")
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} with the token");
    }
    let r = http
        .get(format!("{}/console/login", plant.base()))
        .send()
        .await
        .unwrap();
    let h = r.headers();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert!(
        h.get("strict-transport-security").is_none(),
        "no HSTS on plain HTTP"
    );
    // A `limit` beyond the cap is served at the cap.
    let page: Value = http
        .get(format!(
            "{}/api/v1/d365/unmatched?limit=100000000",
            plant.base()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["total"], 0, "{page}");
    plant.gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_takes_on_reload_and_ends_the_console_sessions_of_the_old_one() {
    let plant = Plant::start("").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = http
        .post(format!("{}/console/login", plant.base()))
        .form(&[("name", "Alice"), ("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = |cookie: String| {
        http.get(format!("{}/console/messages", plant.base()))
            .header("cookie", cookie)
            .send()
    };
    assert_eq!(page(cookie.clone()).await.unwrap().status(), 200);
    // Through a proxy every read needs the token: a way to ask "which token works".
    let with = |token: &'static str| {
        http.get(format!("{}/api/v1/status", plant.base()))
            .header("X-Forwarded-For", "192.0.2.10")
            .bearer_auth(token)
            .send()
    };
    assert_eq!(with(TOKEN).await.unwrap().status(), 200);
    assert_eq!(with(NEW_TOKEN).await.unwrap().status(), 401);

    secret(plant.dir.path(), "api-token", NEW_TOKEN);
    let (code, stdout, stderr) = process::run(&["reload", "-c", plant.cfg()]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    plant
        .out
        .wait_for(
            "api.token_file: changed (old token refused from now on; 1 console session(s) ended)",
        )
        .await;
    assert_eq!(with(TOKEN).await.unwrap().status(), 401, "the old token");
    assert_eq!(
        with(NEW_TOKEN).await.unwrap().status(),
        200,
        "the new token"
    );
    let old_session = page(cookie).await.unwrap();
    assert_eq!(old_session.status(), 303, "the old session is over");
    assert_eq!(old_session.headers()["location"], "/console/login");
    let log = plant.out.text();
    assert!(
        log.contains("webhook secret of d365_events `d365`"),
        "{log}"
    );
    assert!(!log.contains(TOKEN) && !log.contains(NEW_TOKEN) && !log.contains(WEBHOOK_SECRET));
    plant.gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_login_names_are_escaped_and_cut_in_the_log_and_guessing_is_throttled() {
    let plant = Plant::start("").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |name: String, token: &'static str| {
        http.post(format!("{}/console/login", plant.base()))
            .form(&[("name", name.as_str()), ("token", token)])
            .send()
    };
    let forged =
        "x\n2026-12-07T10:00:00.000000Z  INFO mes_gateway::api::console: Console login. name=admin";
    assert_eq!(login(forged.into(), "wrong").await.unwrap().status(), 401);
    let huge = "A".repeat(900_000);
    assert_eq!(login(huge, "wrong").await.unwrap().status(), 401);
    plant.out.wait_for_count("Console login refused", 2).await;
    let log = plant.out.text();
    for line in log.lines() {
        assert!(line.len() < 2_000, "a {} byte log line", line.len());
        if line.contains("Console login. name=admin") {
            assert!(
                line.contains("Console login refused") && line.contains("name=x\\n2026"),
                "a forged line: {line}"
            );
        }
    }
    assert!(log.contains("…(+"), "the long name is cut and says so");
    // Three more wrong guesses: five in all. The sixth attempt waits, even with the
    // right token.
    for _ in 0..3 {
        assert_eq!(login("m".into(), "wrong").await.unwrap().status(), 401);
    }
    let paused = login("m".into(), TOKEN).await.unwrap();
    assert_eq!(paused.status(), 429);
    assert!(paused.headers().contains_key("retry-after"));
    plant
        .out
        .wait_for("Console logins from this address are paused")
        .await;
    assert_eq!(
        plant
            .metric("mes_gateway_console_login_failures_total")
            .await,
        5.0
    );
    assert!(
        plant
            .metric("mes_gateway_console_login_throttled_total")
            .await
            >= 1.0
    );
    plant.gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_runs_its_own_script_only_and_never_links_a_forged_d365_page() {
    let plant = Plant::start("").await;
    plant.webhook_ready().await;
    let http = reqwest::Client::new();
    let sent: Value = http
        .post(format!(
            "{}/api/v1/messages?type=ProdProductionOrderReportFinished",
            plant.base()
        ))
        .bearer_auth(TOKEN)
        .json(&json!({ "ProductionOrderNumber": "P000777", "ReportFinishedLines": [{ "ItemNumber": "A0001", "ReportedGoodQuantity": 1 }] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sent["id"].as_u64().expect("queued");
    plant.fake.wait_accepted_count(1).await;
    let delivered = plant.fake.accepted();
    let event = json!({
        "BusinessEventId": "SysMessageProcessorMessageProcessedBusinessEvent",
        "EventId": "XSS-1",
        "MessageQueue": "JmgMES3P",
        "MessageType": "ProdProductionOrderReportFinished",
        "MessageContent": delivered[0].envelope["_messageContent"],
        "MessageState": "Failed",
        "MessageInfolog": "<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>",
        "MessageProcessorMessagePageUrl": "javascript:window.pwned=3"
    });
    let posted = http
        .post(format!("{}/events/d365/d365", plant.base()))
        .header("X-Webhook-Secret", WEBHOOK_SECRET)
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);

    let browser = Browser::start().await;
    browser
        .goto(&format!("{}/console/login", plant.base()))
        .await;
    browser.fill("#name", "Alice").await;
    browser.fill("#token", TOKEN).await;
    browser.click("#login").await;
    // The click returns before the next page is there: wait for what only it has.
    browser.find("#messages").await;
    browser
        .goto(&format!("{}/console/messages?id={id}", plant.base()))
        .await;
    let refused = browser.text("#d365-page-refused").await;
    assert!(refused.contains("javascript:window.pwned=3"), "{refused}");
    assert!(browser.text("#d365-infolog").await.contains("<script>"));
    let checks = browser
        .execute(
            "return {
                link: document.querySelector('#d365 a') === null,
                pwned: typeof window.pwned,
                refresh: document.body.dataset.refresh || null,
                header: getComputedStyle(document.querySelector('header')).backgroundColor,
                inline: document.querySelectorAll('script:not([src])').length
            };",
        )
        .await;
    assert_eq!(checks["link"], true, "{checks}");
    assert_eq!(
        checks["pwned"], "undefined",
        "no injected script ran: {checks}"
    );
    assert_eq!(
        checks["refresh"], "on",
        "the console's own script ran under the policy: {checks}"
    );
    assert_eq!(
        checks["header"], "rgb(0, 32, 80)",
        "its stylesheet loaded: {checks}"
    );
    assert_eq!(
        checks["inline"], 0,
        "no inline script on the page: {checks}"
    );
    browser.close().await;
    plant.gw.terminate().await;
}

/// Every secret can come from systemd's credentials directory, and `check` names a
/// secret file that others can read.
#[tokio::test]
async fn secrets_come_from_the_credentials_directory_and_readable_ones_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let fake = FakeD365::start().await;
    let dir = tempfile::tempdir().unwrap();
    let creds = tempfile::tempdir().unwrap();
    secret(creds.path(), "api-token", TOKEN);
    secret(creds.path(), "hook", WEBHOOK_SECRET);
    support::write_config(
        dir.path(),
        &format!(
            "{}storage:\n  data_dir: data\nsources:\n  - type: d365_events\n    id: d365\n    webhook_secret_file: ${{CREDENTIALS_DIRECTORY}}/hook\napi:\n  listen: 127.0.0.1:{}\n  token_file: ${{CREDENTIALS_DIRECTORY}}/api-token\n",
            support::d365_yaml(&fake),
            free_port()
        ),
    );
    let out = tokio::process::Command::new(&*process::BIN)
        .args(["check", "-c", process::path_str(dir.path())])
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The d365 secret next to gateway.yaml was written readable by others: named.
    let d365_secret = dir.path().join("d365-client-secret");
    std::fs::set_permissions(&d365_secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stdout, stderr) =
        process::run(&["check", "-c", process::path_str(dir.path())]).await;
    assert_ne!(
        code, 0,
        "without the credentials directory the paths do not resolve"
    );
    assert!(
        format!("{stdout}{stderr}")
            .contains("environment variable CREDENTIALS_DIRECTORY is not set"),
        "{stdout}{stderr}"
    );
    let out = tokio::process::Command::new(&*process::BIN)
        .args(["check", "-c", process::path_str(dir.path())])
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains(&format!(
            "warning: {}",
            dir.path().join("gateway.yaml").display()
        )) && stdout.contains(&format!(
            "{} is readable by every user (mode 0644)",
            d365_secret.display()
        )),
        "{stdout}"
    );
}
