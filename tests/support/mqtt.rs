//! A real mosquitto broker on a loopback port, started by the test, and a publisher.

use std::process::Stdio;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Mosquitto {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

/// A broker configured as a plant should run one for the gateway: persistent (sessions
/// and queued messages survive a restart) and with no limit on the messages queued for
/// a client (mosquitto's default of 1000 drops the rest of a burst).
pub const DURABLE: &str = "persistence true\nautosave_interval 1\nmax_queued_messages 0\n";

/// A port that was free a moment ago (the broker must listen on a port we know, and
/// must come back on the same one after a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn binary() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect(
            "mosquitto is not installed: `bash .ci/run` installs it (apt-get install mosquitto)",
        )
}

/// Runs openssl in `dir`; panics with its error output if it fails.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is not installed: `bash .ci/run` installs it");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a self-signed CA in `dir` as `NAME.pem` (key `NAME.key`); returns the certificate.
pub fn make_ca(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    dir.join(pem)
}

impl Mosquitto {
    /// The broker's process id (0 once it has exited), for the benchmark's CPU accounting.
    pub fn pid(&self) -> i32 {
        self.child.id().map_or(0, |id| id as i32)
    }

    pub async fn start() -> Mosquitto {
        Mosquitto::start_on(free_port()).await
    }

    /// Starts the broker and waits until it says it listens.
    pub async fn start_on(port: u16) -> Mosquitto {
        Mosquitto::start_with(port, "").await
    }

    /// Starts a TLS listener with a server certificate for 127.0.0.1 signed by a test CA
    /// that openssl makes now; returns the broker and the CA file.
    pub async fn start_tls(certs: &std::path::Path) -> (Mosquitto, std::path::PathBuf) {
        std::fs::write(certs.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        make_ca(certs, "ca");
        openssl(
            certs,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        );
        openssl(
            certs,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
        // mosquitto started as root drops to its own user, which must read the key.
        for key in ["server.key", "server.pem", "ca.pem"] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(certs.join(key), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        let _ =
            std::fs::set_permissions(certs, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        let tls = format!(
            "cafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n",
            certs.display()
        );
        (
            Mosquitto::start_with(free_port(), &tls).await,
            certs.join("ca.pem"),
        )
    }

    /// A broker with these extra configuration lines.
    pub async fn start_with_extra(extra: &str) -> Mosquitto {
        Mosquitto::start_with(free_port(), extra).await
    }

    /// A broker with `DURABLE` settings.
    pub async fn start_durable() -> Mosquitto {
        Mosquitto::start_with(free_port(), DURABLE).await
    }

    async fn start_with(port: u16, extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        // Started as root, mosquitto drops to its own user: it must be able to write its
        // persistence file here, or it logs "Permission denied" and a restart loses every
        // session and queued message (which made broker-restart tests prove nothing).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let conf = dir.path().join("mosquitto.conf");
        let persistence = if extra.contains("persistence true") {
            format!("persistence_location {}/\n", dir.path().display())
        } else {
            "persistence false\n".to_string()
        };
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\n{extra}allow_anonymous true\n{persistence}log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n")).unwrap();
        let child = Mosquitto::spawn(port, &conf).await;
        Mosquitto { port, child, dir }
    }

    async fn spawn(port: u16, conf: &std::path::Path) -> Child {
        let mut child = Command::new(binary())
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start mosquitto");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("running")
                    || line.contains(&format!("listen socket on port {port}"))
                {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(ready, Ok(true)),
            "mosquitto did not start on port {port}"
        );
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        child
    }

    /// Stops the broker gracefully (SIGTERM: it saves its sessions and queues) and starts
    /// it again on the same port with the same configuration.
    pub async fn restart(&mut self) {
        let pid = self.child.id().expect("broker running") as i32;
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        self.child.wait().await.unwrap();
        self.child = Mosquitto::spawn(self.port, &self.dir.path().join("mosquitto.conf")).await;
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub async fn stop(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// Publishes QoS 1 messages and waits for the broker's PUBACK of each.
pub async fn publish(port: u16, messages: &[(&str, &[u8])]) {
    let mut options = MqttOptions::new(
        format!(
            "test-publisher-{}",
            super::process::BIN.len() + messages.len() + port as usize
        ),
        "127.0.0.1",
        port,
    );
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    for (topic, payload) in messages {
        client
            .publish(*topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
    }
    let mut acked = 0;
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        while acked < messages.len() {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("publisher: {e}"),
            }
        }
    })
    .await;
    assert!(
        done.is_ok(),
        "the broker did not acknowledge the test's messages"
    );
    let _ = client.disconnect().await;
}

/// Publishes, for each order at once (one publisher each, as a line controller would),
/// QoS 1 messages `first..=last` on `plant/{order}/count`, the number as payload; returns
/// when the broker has acknowledged every one.
pub async fn publish_burst(port: u16, orders: &[String], first: u32, last: u32) {
    let mut publishers = tokio::task::JoinSet::new();
    for order in orders {
        let order = order.clone();
        publishers.spawn(async move {
            let mut options = MqttOptions::new(format!("burst-{order}-{first}"), "127.0.0.1", port);
            options.set_keep_alive(Duration::from_secs(30));
            options.set_inflight(100);
            let (client, mut eventloop) = AsyncClient::new(options, 256);
            let topic = format!("plant/{order}/count");
            let sender = tokio::spawn(async move {
                for n in first..=last {
                    client
                        .publish(&topic, QoS::AtLeastOnce, false, n.to_string())
                        .await
                        .unwrap();
                }
                client
            });
            let expected = (last - first + 1) as usize;
            let mut acked = 0;
            while acked < expected {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(e) => panic!("publisher for {order}: {e}"),
                }
            }
            let client = sender.await.unwrap();
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
        });
    }
    let done = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(r) = publishers.join_next().await {
            r.expect("publisher");
        }
    })
    .await;
    assert!(done.is_ok(), "the broker did not acknowledge the burst");
}

/// A TCP proxy between the gateway and the broker that can lose what the gateway sends
/// (its PUBACKs never reach the broker) and cut every connection, as a flaky network would.
pub struct Proxy {
    pub port: u16,
    swallow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let swallow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let (sw, cut_tx) = (swallow.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut br, mut bw) = broker.into_split();
                let sw = sw.clone();
                let mut cut = cut_tx.subscribe();
                tokio::spawn(async move {
                    let up = async {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if !sw.load(Ordering::SeqCst) && bw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut br, &mut cw);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            swallow,
            cuts,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// While on, bytes from the gateway to the broker are lost on the way.
    pub fn lose_client_bytes(&self, on: bool) {
        self.swallow.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes every connection through the proxy.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

/// The production orders of a burst: `P000` .. `P049`.
pub fn burst_orders() -> Vec<String> {
    (0..50).map(|i| format!("P{i:03}")).collect()
}

/// A gateway configuration for bursts: an MQTT source on `broker_url` subscribed to
/// `plant/+/count`, one ReportFinished per impulse (the payload is the quantity, the
/// order comes from the topic), 50 requests in flight; `extra` is appended to gateway.yaml.
pub fn write_burst_config(
    dir: &std::path::Path,
    fake: &super::FakeD365,
    broker_url: &str,
    extra: &str,
) {
    super::write_config(
        dir,
        &format!(
            "{}dispatcher:\n  max_in_flight: 50\n  request_budget: off\n  backoff_initial: 100ms\n  backoff_max: 1s\nstorage:\n  data_dir: data\nsources:\n  - type: mqtt\n    id: broker\n    url: {broker_url}\n    client_id: gw-burst\n    subscriptions:\n      - topic: plant/+/count\n        qos: 1\n{extra}",
            super::d365_yaml(fake),
        ),
    );
    std::fs::create_dir_all(dir.join("rules.d")).unwrap();
    std::fs::write(
        dir.join("rules.d/count.yaml"),
        "rules:\n  - name: count\n    line: \"{capture.order}\"\n    when: { source: broker, topic: \"plant/{order}/count\" }\n    count: value\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: { ProductionOrderNumber: \"{capture.order}\", ItemNumber: A0001, ReportedGoodQuantity: \"{quantity}\" }\n",
    )
    .unwrap();
}

/// What a burst left at D365: impulses lost and duplicated, and the orders whose
/// impulses arrived out of order. Every burst test and benchmark asserts it is `EXACT`.
#[derive(Debug, PartialEq, Eq)]
pub struct BurstCount {
    pub lost: usize,
    pub duplicates: usize,
    pub out_of_order: Vec<String>,
}

pub const EXACT: BurstCount = BurstCount {
    lost: 0,
    duplicates: 0,
    out_of_order: Vec::new(),
};

/// Counts what the fake D365 accepted against impulses `1..=last` on every burst order
/// (the quantity of each ReportFinished is the impulse's number).
pub fn count_burst(fake: &super::FakeD365, last: u64) -> BurstCount {
    let mut per_order: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let burst: std::collections::HashSet<String> = burst_orders().into_iter().collect();
    // Other sources' messages in the same fake are not the burst's.
    for r in fake
        .accepted()
        .into_iter()
        .filter(|r| burst.contains(&r.order))
    {
        // Every line of a joined request (the gateway's join.rs), in order.
        for line in r.lines("ReportFinishedLines") {
            let q = line["ReportedGoodQuantity"].as_u64().expect("a quantity");
            per_order.entry(r.order.clone()).or_default().push(q);
        }
    }
    let mut count = BurstCount {
        lost: 0,
        duplicates: 0,
        out_of_order: Vec::new(),
    };
    for order in burst_orders() {
        let seq = per_order.remove(&order).unwrap_or_default();
        let distinct: std::collections::HashSet<u64> = seq.iter().copied().collect();
        count.duplicates += seq.len() - distinct.len();
        count.lost += (1..=last).filter(|n| !distinct.contains(n)).count();
        if seq.windows(2).any(|w| w[0] >= w[1]) {
            count.out_of_order.push(order);
        }
    }
    count
}

/// Makes a burst configuration resend when an outcome is ambiguous. When D365 stops
/// listening, a connection the kernel had already accepted for it is reset after the
/// gateway wrote its request: an ambiguous outcome, which by default holds the order as
/// uncertain (right, in a plant). The fake never read such a request, so resending is
/// safe there, and a burst count would catch a request sent twice that the fake did read.
pub fn resend_when_ambiguous(dir: &std::path::Path) {
    let main = dir.join("gateway.yaml");
    let yaml = std::fs::read_to_string(&main).unwrap().replace(
        "dispatcher:\n",
        "dispatcher:\n  on_ambiguous:\n    default: resend\n",
    );
    std::fs::write(&main, yaml).unwrap();
}

/// Makes a burst configuration join at most `max_lines` lines a request (the dispatcher's
/// `join`; 1: every message in a request of its own).
pub fn join_at_most(dir: &std::path::Path, max_lines: u32) {
    let main = dir.join("gateway.yaml");
    let yaml = std::fs::read_to_string(&main).unwrap();
    assert!(yaml.contains("dispatcher:\n"), "{yaml}");
    let yaml = yaml.replace(
        "dispatcher:\n",
        &format!("dispatcher:\n  join:\n    max_lines: {max_lines}\n"),
    );
    std::fs::write(&main, yaml).unwrap();
}

/// Steady load for fault tests: a burst of `per_round` impulses on every burst order
/// every 100 ms, `rounds` times (impulses `1..=rounds * per_round` per order). The broker
/// queues what arrives while the gateway is down.
pub fn spawn_steady_load(port: u16, rounds: u32, per_round: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for round in 0..rounds {
            publish_burst(
                port,
                &burst_orders(),
                round * per_round + 1,
                (round + 1) * per_round,
            )
            .await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
}
