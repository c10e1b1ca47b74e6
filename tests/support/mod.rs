//! Test support: a fake D365 (SendMessage + Entra token endpoint) over real HTTP on
//! 127.0.0.1:0, scriptable per production order, and helpers to build a gateway around it.
//!
//! The fake checks what a real D365 would: the bearer token must be one it issued and not
//! revoked (else 401), the body must be the four-field envelope with `_messageContent` a
//! JSON *string* (else 400).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

pub const SEND_PATH: &str = "/api/services/SysMessageServices/SysMessageService/SendMessage";
pub const TOKEN_PATH: &str = "/tenant/oauth2/v2.0/token";

/// What the fake answers to one SendMessage request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// 429 with `Retry-After: <secs>`.
    Throttle(u64),
    /// Read the request, then never answer (the client times out after writing).
    Hang,
    /// Read the request, then close the connection without an answer.
    Drop,
    /// 302 to this location (an SSO proxy, a moved environment).
    Redirect(String),
}

/// One SendMessage request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub message_id: Option<u64>,
    /// The other messages a joined request carries (the gateway's joined-ids header).
    pub joined: Vec<u64>,
    pub authorization: String,
    pub envelope: serde_json::Value,
    /// `_messageContent` decoded.
    pub content: serde_json::Value,
    pub order: String,
    /// What the fake answered (`None` for Hang/Drop).
    pub status: Option<u16>,
}

#[derive(Default)]
struct FakeState {
    per_order: HashMap<String, VecDeque<Reply>>,
    script: VecDeque<Reply>,
    received: Vec<Received>,
    token_requests: Vec<HashMap<String, String>>,
    issued: u64,
    valid_tokens: HashSet<String>,
    token_lifetime_s: u64,
    reject_credentials: bool,
    /// Only this client secret gets a token (when set).
    required_secret: Option<String>,
    response_delay: Duration,
    token_delay: Duration,
    /// TCP connections accepted so far (a client that reuses connections opens few).
    connections: u64,
    /// Connections open right now.
    open_connections: u64,
    /// Messages answered with 2xx so far (a joined request counts each one it carries).
    accepted: usize,
    /// Every SendMessage answered 503.
    unavailable: bool,
    /// Going unreachable: answer 503 and close the connection.
    refusing: bool,
    /// D365's service protection: at most this many requests in any window of this length
    /// (every request counts, answered or refused); past it, 429 with Retry-After.
    limit: Option<(usize, Duration)>,
    /// When each request of the current window arrived.
    window: VecDeque<Instant>,
}

#[derive(Clone)]
pub struct FakeD365 {
    pub addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    changes: watch::Sender<u64>,
    /// The accept loop, while the fake takes connections.
    listening: Arc<Mutex<Option<tokio::task::AbortHandle>>>,
}

impl FakeD365 {
    pub async fn start() -> FakeD365 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake D365");
        let addr = listener.local_addr().unwrap();
        let fake = FakeD365 {
            addr,
            state: Arc::new(Mutex::new(FakeState {
                token_lifetime_s: 3600,
                ..FakeState::default()
            })),
            changes: watch::channel(0).0,
            listening: Arc::default(),
        };
        fake.listen(listener);
        fake
    }

    fn listen(&self, listener: TcpListener) {
        let f = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let f = f.clone();
                {
                    let mut st = f.state();
                    st.connections += 1;
                    st.open_connections += 1;
                }
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    f.serve(stream).await;
                    f.state().open_connections -= 1;
                    f.changes.send_modify(|n| *n += 1);
                });
            }
        });
        *self.listening.lock().unwrap() = Some(task.abort_handle());
    }

    /// D365 unreachable: the port refuses new connections, and a request that still
    /// comes on an open one is answered 503 and the connection closed (never cut in the
    /// middle of a request: that would be an ambiguous outcome, not an unreachable D365).
    pub fn refuse_connections(&self) {
        self.state().refusing = true;
        if let Some(task) = self.listening.lock().unwrap().take() {
            task.abort();
        }
    }

    /// D365 reachable again, on the same address.
    pub async fn accept_connections(&self) {
        self.state().refusing = false;
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("bind the fake D365 again on its address");
        self.listen(listener);
    }

    /// Enforces a sliding window as D365 does: more than `requests` requests in any
    /// `per` are answered 429 (with `Retry-After` in whole seconds).
    pub fn limit(&self, requests: usize, per: Duration) {
        self.state().limit = Some((requests, per));
    }

    /// While on, every SendMessage is answered 503 (D365 down for maintenance).
    pub fn unavailable(&self, on: bool) {
        self.state().unavailable = on;
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("http://{}{}", self.addr, TOKEN_PATH)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// Answer the next requests (any order) with these replies, then 200.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state().script.extend(replies);
    }

    /// Answer the next requests for `order` with these replies, then 200.
    pub fn script_order(&self, order: &str, replies: impl IntoIterator<Item = Reply>) {
        self.state()
            .per_order
            .entry(order.to_string())
            .or_default()
            .extend(replies);
    }

    /// Tokens issued so far stop working (as after a key rotation): next use gets 401.
    pub fn revoke_tokens(&self) {
        self.state().valid_tokens.clear();
    }

    /// The token endpoint answers 401 invalid_client from now on.
    pub fn reject_credentials(&self) {
        self.state().reject_credentials = true;
    }

    /// Only `secret` gets a token from now on (as Entra ID checks the client secret).
    pub fn require_secret(&self, secret: &str) {
        self.state().required_secret = Some(secret.to_string());
    }

    /// Every SendMessage answer is delayed by this much (requests stay on the wire longer).
    pub fn delay_responses(&self, delay: Duration) {
        self.state().response_delay = delay;
    }

    /// Tokens are announced with this lifetime (`expires_in`).
    pub fn token_lifetime(&self, secs: u64) {
        self.state().token_lifetime_s = secs;
    }

    /// Every token answer is delayed by this much (so many requests wait for one fetch).
    pub fn delay_tokens(&self, delay: Duration) {
        self.state().token_delay = delay;
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state().connections
    }

    /// Waits until `n` requests have been answered with 2xx (cheap: no copy of what was
    /// received, so a burst of 100,000 is not slowed down by the waiting).
    /// Messages D365 accepted so far (a joined request counts every message it carries).
    pub fn accepted_messages(&self) -> usize {
        self.state().accepted
    }

    /// Waits until D365 accepted `n` messages (a joined request counts every message it
    /// carries).
    pub async fn wait_accepted_count(&self, n: usize) {
        let mut rx = self.changes.subscribe();
        let result = tokio::time::timeout(Duration::from_secs(600), async {
            while self.state().accepted < n {
                rx.changed().await.expect("fake alive");
            }
        })
        .await;
        assert!(
            result.is_ok(),
            "timed out waiting for {n} accepted messages; {} so far",
            self.state().accepted
        );
    }

    /// A receiver that sees a new value whenever the fake received or answered something.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits until no connection is open (after a client was killed: everything it
    /// wrote has been read and recorded).
    pub async fn wait_idle(&self) {
        let mut rx = self.changes.subscribe();
        let result = tokio::time::timeout(Duration::from_secs(60), async {
            while self.state().open_connections > 0 {
                rx.changed().await.expect("fake alive");
            }
        })
        .await;
        assert!(result.is_ok(), "connections to the fake D365 stayed open");
    }

    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    /// Requests answered with 2xx: what D365 would have queued.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.status.is_some_and(|s| (200..300).contains(&s)))
            .collect()
    }

    pub fn token_requests(&self) -> Vec<HashMap<String, String>> {
        self.state().token_requests.clone()
    }

    /// Waits until the token endpoint has been asked `n` times.
    pub async fn wait_for_token_requests(&self, n: usize) {
        let mut rx = self.changes.subscribe();
        let result = tokio::time::timeout(Duration::from_secs(120), async {
            while self.state().token_requests.len() < n {
                rx.changed().await.expect("fake alive");
            }
        })
        .await;
        assert!(result.is_ok(), "the token endpoint was not asked {n} times");
    }

    /// Waits until `cond` holds on the received requests (woken by each request, no polling).
    pub async fn wait_until(&self, what: &str, cond: impl Fn(&[Received]) -> bool) {
        let mut rx = self.changes.subscribe();
        let result = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                if cond(&self.received()) {
                    return;
                }
                rx.changed().await.expect("fake alive");
            }
        })
        .await;
        assert!(
            result.is_ok(),
            "timed out waiting for the fake D365 to see: {what}; received: {:#?}",
            self.received()
                .iter()
                .map(|r| (r.order.clone(), r.message_id, r.status))
                .collect::<Vec<_>>()
        );
    }

    /// Serves requests on one connection, kept alive as long as the client wants it
    /// (HTTP/1.1) and the reply allows.
    async fn serve(&self, mut stream: TcpStream) {
        let mut buffered = Vec::new();
        while let Some((method, path, headers, body)) =
            read_request(&mut stream, &mut buffered).await
        {
            let keep_alive = !headers
                .get("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close"))
                && !self.state().refusing;
            if !self
                .serve_one(&mut stream, method, path, headers, body, keep_alive)
                .await
            {
                return;
            }
        }
    }

    /// Answers one request; false when the connection must end.
    async fn serve_one(
        &self,
        stream: &mut TcpStream,
        method: String,
        path: String,
        headers: HashMap<String, String>,
        body: Vec<u8>,
        keep_alive: bool,
    ) -> bool {
        if method == "POST" && path == TOKEN_PATH {
            let (status, body) = self.token(&body);
            let delay = self.state().token_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            return respond(stream, status, &[], &body, keep_alive).await;
        }
        if method != "POST" || path != SEND_PATH {
            return respond(stream, 404, &[], "", keep_alive).await;
        }
        let authorization = headers.get("authorization").cloned().unwrap_or_default();
        let message_id = headers
            .get("x-mes-gateway-message-id")
            .and_then(|v| v.parse().ok());
        let joined: Vec<u64> = headers
            .get("x-mes-gateway-joined-ids")
            .map(|v| {
                v.split(',')
                    .filter_map(|id| id.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let envelope: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        let content = envelope
            .get("_messageContent")
            .and_then(|c| c.as_str())
            .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok());
        let well_formed = headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
            && envelope.as_object().is_some_and(|o| {
                o.len() == 4
                    && ["_companyId", "_messageQueue", "_messageType"]
                        .iter()
                        .all(|k| o.get(*k).is_some_and(|v| v.is_string()))
            })
            && content.is_some();
        let content = content.unwrap_or(serde_json::Value::Null);
        let order = content
            .get("ProductionOrderNumber")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let (reply, delay) = {
            let mut st = self.state();
            let token_ok = authorization
                .strip_prefix("Bearer ")
                .is_some_and(|t| st.valid_tokens.contains(t));
            let now = Instant::now();
            let over_limit = match st.limit {
                Some((requests, per)) => {
                    while st
                        .window
                        .front()
                        .is_some_and(|t| now.duration_since(*t) >= per)
                    {
                        st.window.pop_front();
                    }
                    st.window.push_back(now);
                    st.window.len() > requests
                }
                None => false,
            };
            let reply = if !token_ok {
                Reply::Status(401)
            } else if over_limit {
                Reply::Throttle(1)
            } else if st.unavailable || st.refusing {
                Reply::Status(503)
            } else if !well_formed {
                Reply::Status(400)
            } else if let Some(r) = st.per_order.get_mut(&order).and_then(|q| q.pop_front()) {
                r
            } else {
                st.script.pop_front().unwrap_or(Reply::Status(200))
            };
            let status = match reply {
                Reply::Status(s) => Some(s),
                Reply::Throttle(_) => Some(429),
                Reply::Redirect(_) => Some(302),
                Reply::Hang | Reply::Drop => None,
            };
            if status.is_some_and(|s| (200..300).contains(&s)) {
                st.accepted += 1 + joined.len();
            }
            st.received.push(Received {
                at: Instant::now(),
                message_id,
                joined,
                authorization: authorization.clone(),
                envelope,
                content,
                order,
                status,
            });
            (reply, st.response_delay)
        };
        self.changes.send_modify(|n| *n += 1);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match reply {
            Reply::Status(s) => respond(stream, s, &[], "", keep_alive).await,
            Reply::Throttle(secs) => respond(
                stream,
                429,
                &[("Retry-After", secs.to_string())],
                "Number of requests exeeded the limit of 6000 over the time window of 300 seconds.",
                keep_alive,
            )
            .await,
            Reply::Redirect(location) => {
                respond(stream, 302, &[("Location", location)], "", keep_alive).await
            }
            Reply::Hang => std::future::pending::<bool>().await,
            Reply::Drop => false,
        }
    }

    fn token(&self, body: &[u8]) -> (u16, String) {
        let form: HashMap<String, String> = String::from_utf8_lossy(body)
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), urldecode(v)))
            .collect();
        self.changes.send_modify(|n| *n += 1);
        let mut st = self.state();
        st.token_requests.push(form.clone());
        let wrong_secret = st
            .required_secret
            .as_ref()
            .is_some_and(|s| form.get("client_secret") != Some(s));
        if st.reject_credentials
            || wrong_secret
            || form.get("grant_type").map(String::as_str) != Some("client_credentials")
        {
            return (401, r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1"}"#.into());
        }
        st.issued += 1;
        let token = format!("token-{}", st.issued);
        st.valid_tokens.insert(token.clone());
        (
            200,
            format!(
                r#"{{"token_type":"Bearer","expires_in":{},"ext_expires_in":3599,"access_token":"{token}"}}"#,
                st.token_lifetime_s
            ),
        )
    }
}

fn urldecode(s: &str) -> String {
    let bytes = s.replace('+', " ").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) =
                u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or(""), 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one request; `buf` keeps bytes of the next one that arrived with it.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, String, HashMap<String, String>, Vec<u8>)> {
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let path = request_line.next()?.to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[header_end..header_end + length].to_vec();
    buf.drain(..header_end + length);
    Some((method, path, headers, body))
}

/// Writes one response; returns whether the connection stays open.
async fn respond(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &str,
    keep_alive: bool,
) -> bool {
    let mut out = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: {}\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    if body.starts_with('{') {
        out.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    if stream.write_all(out.as_bytes()).await.is_err() {
        return false;
    }
    if !keep_alive {
        let _ = stream.shutdown().await;
    }
    keep_alive
}

/// The secret used in every test config; tests assert it never shows up in output.
pub const TEST_SECRET: &str = "s3cr3t-Vx9-never-log-me";

/// A `d365` section pointing at the fake, with the secret in a file next to gateway.yaml.
pub fn d365_yaml(fake: &FakeD365) -> String {
    format!(
        "d365:\n  base_url: {}\n  company: USMF\n  client_id: 00000000-0000-0000-0000-0000000000aa\n  token_url: {}\n  client_secret_file: d365-client-secret\n  request_timeout: 30s\n",
        fake.base_url(),
        fake.token_url()
    )
}

/// Writes a config directory: gateway.yaml (with `body` appended) and the secret file.
pub fn write_config(dir: &std::path::Path, gateway_yaml: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("gateway.yaml"), gateway_yaml).unwrap();
    std::fs::write(dir.join("d365-client-secret"), format!("{TEST_SECRET}\n")).unwrap();
}

use mes_gateway::d365::client::D365Client;
use mes_gateway::d365::Dispatcher;
use mes_gateway::message::{FieldNames, Message};
use mes_gateway::outbox::{Ingest, NewMessage, Outbox, Record, State};
use mes_gateway::settings::{self, Config};
use tokio_util::sync::CancellationToken;

/// A dispatcher and its outbox in this process, delivering to a fake D365.
pub struct Gateway {
    pub outbox: Outbox,
    pub stats: Arc<mes_gateway::d365::DispatchStats>,
    pub config: Config,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// `dispatcher_yaml` is the body of the `dispatcher:` section (indented two spaces).
    pub async fn start(fake: &FakeD365, dispatcher_yaml: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "{}dispatcher:\n{dispatcher_yaml}storage:\n  data_dir: data\n",
            d365_yaml(fake)
        );
        write_config(dir.path(), &yaml);
        let config = settings::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let outbox = Outbox::open(&config.storage.data_dir).unwrap();
        Gateway::spawn(outbox, config, dir)
    }

    /// Starts a dispatcher on `outbox` with `config` (what a start of the gateway does).
    fn spawn(outbox: Outbox, config: Config, dir: tempfile::TempDir) -> Gateway {
        let client = Arc::new(D365Client::new(Arc::new(config.d365.clone().unwrap())).unwrap());
        let cancel = CancellationToken::new();
        let dispatcher = Dispatcher::new(
            outbox.clone(),
            client,
            config.dispatcher.clone(),
            Duration::from_secs(5),
        );
        let stats = dispatcher.stats();
        let c = cancel.clone();
        let task = tokio::spawn(async move { dispatcher.run(c).await.expect("dispatcher") });
        Gateway {
            outbox,
            stats,
            config,
            cancel,
            task,
            _dir: dir,
        }
    }

    /// Validates and queues a message as the pipeline would; returns its id.
    pub async fn enqueue(&self, message_type: &str, content: serde_json::Value) -> u64 {
        let m = Message::from_json(message_type, content).unwrap();
        let new = NewMessage {
            production_order: m.production_order().to_string(),
            message_type: m.message_type().to_string(),
            content: m.to_content(&FieldNames::default()).unwrap(),
            origin: "test".into(),
            line: None,
        };
        let id = self
            .outbox
            .commit(Ingest::of(vec![new]))
            .await
            .unwrap()
            .records[0]
            .id;
        id
    }

    /// Waits until the dispatcher reports a problem of all lanes containing `text`.
    pub async fn wait_for_dispatcher_error(&self, text: &str) {
        let result = tokio::time::timeout(Duration::from_secs(120), async {
            // The error is set right after the token fetch this test already waited for:
            // let the dispatcher task run until it shows.
            while !self.stats.last_error().is_some_and(|e| e.contains(text)) {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(
            result.is_ok(),
            "dispatcher error never contained {text:?}: {:?}",
            self.stats.last_error()
        );
    }

    pub fn state(&self, id: u64) -> State {
        self.outbox.get(id).unwrap().state
    }

    pub fn record(&self, id: u64) -> Record {
        self.outbox.get(id).unwrap()
    }

    /// Waits until `cond` holds on the outbox (woken by each change, no polling).
    pub async fn wait_until(&self, what: &str, cond: impl Fn(&Outbox) -> bool) {
        let mut rx = self.outbox.subscribe();
        let result = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                if cond(&self.outbox) {
                    return;
                }
                rx.changed().await.expect("outbox alive");
            }
        })
        .await;
        let states: Vec<(u64, String, State)> = self
            .outbox
            .list(None, None)
            .unwrap()
            .into_iter()
            .map(|r| (r.id, r.production_order, r.state))
            .collect();
        assert!(
            result.is_ok(),
            "timed out waiting for: {what}; outbox: {states:?}"
        );
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }

    /// Stops the dispatcher and starts a new one on the same outbox and configuration,
    /// as a restart of the gateway would.
    pub async fn restart(self) -> Gateway {
        self.cancel.cancel();
        self.task.await.unwrap();
        Gateway::spawn(self.outbox, self.config, self._dir)
    }
}

/// After a kill: waits until the fake has read everything the gateway wrote, then
/// settles the messages the kill left `sending` as an operator would (resolved where the
/// fake has them, sent again where not), with the CLI. Returns (resolved, retried).
pub async fn settle_interrupted(fake: &FakeD365, config_dir: &std::path::Path) -> (usize, usize) {
    settle_interrupted_in(fake, config_dir, &config_dir.join("data")).await
}

/// [`settle_interrupted`] for a configuration whose `data_dir` is `data_dir`.
pub async fn settle_interrupted_in(
    fake: &FakeD365,
    config_dir: &std::path::Path,
    data_dir: &std::path::Path,
) -> (usize, usize) {
    fake.wait_idle().await;
    let accepted: HashSet<u64> = fake.accepted().iter().flat_map(Received::ids).collect();
    let outbox = Outbox::open(data_dir).unwrap();
    // Left `sending` by a kill, or already marked `uncertain` by a gateway that started
    // after it: both are settled against what the fake received.
    let mut sending = outbox.list(Some(State::Sending), None).unwrap();
    sending.extend(outbox.list(Some(State::Uncertain), None).unwrap());
    drop(outbox);
    process::settle_doubtful(&accepted, process::path_str(config_dir), &sending).await
}

/// Pieces D365 accepted for `order` (the ReportedGoodQuantity of every line of its
/// ReportFinished messages, summed).
pub fn pieces(received: &[Received], order: &str) -> u32 {
    received
        .iter()
        .filter(|r| r.order == order && r.status.is_some_and(|s| (200..300).contains(&s)))
        .flat_map(|r| r.lines("ReportFinishedLines"))
        .map(|line| line["ReportedGoodQuantity"].as_f64().expect("a quantity") as u32)
        .sum()
}

/// Report-as-finished lines D365 accepted, joined into one request or not (the gateway's
/// join.rs).
pub fn accepted_lines(received: &[Received]) -> usize {
    received
        .iter()
        .filter(|r| r.status.is_some_and(|s| (200..300).contains(&s)))
        .map(|r| r.lines("ReportFinishedLines").len())
        .sum()
}

impl Received {
    /// Every message this request carried: the one it was sent for, then the joined ones.
    pub fn ids(&self) -> Vec<u64> {
        self.message_id
            .into_iter()
            .chain(self.joined.iter().copied())
            .collect()
    }

    /// The lines under `field` of its content, in order.
    pub fn lines(&self, field: &str) -> Vec<serde_json::Value> {
        self.content
            .get(field)
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default()
    }
}

/// A ReportFinished message for `order` whose quantity identifies it.
pub fn report(order: &str, quantity: u32) -> serde_json::Value {
    serde_json::json!({"ProductionOrderNumber": order, "ReportFinishedLines": [{"ItemNumber": "A0001", "ReportedGoodQuantity": quantity}]})
}
pub mod alerts;
pub mod browser;
pub mod device;
pub mod disk;
pub mod mqtt;
pub mod opcua;
pub mod plant;
pub mod plc;
pub mod process;
pub mod service_bus;

/// The webhook secret [`Operated::start_with_rules`] writes.
pub const WEBHOOK_SECRET: &str = "webhook-secret-0123456789";

/// A running gateway binary for the operator tests: the fake D365 answers 500 three times
/// to `failing_order` (so its first message fails), retries are fast, `sources` is
/// appended to gateway.yaml (a `sources:` section or nothing), and the API listens on a
/// free loopback port with `token` in `api-token`.
pub struct Operated {
    pub fake: FakeD365,
    pub dir: tempfile::TempDir,
    pub api_port: u16,
    pub out: process::Output,
    pub gw: process::Running,
}

impl Operated {
    pub async fn start(failing_order: &str, token: &str, sources: &str) -> Operated {
        Operated::start_with_rules(failing_order, token, sources, None).await
    }

    /// [`Operated::start`] with `rules` in `rules.d/rules.yaml` and a webhook secret in
    /// `webhook-secret` (for a `d365_events` source in `sources`).
    pub async fn start_with_rules(
        failing_order: &str,
        token: &str,
        sources: &str,
        rules: Option<&str>,
    ) -> Operated {
        let fake = FakeD365::start().await;
        fake.script_order(
            failing_order,
            [Reply::Status(500), Reply::Status(500), Reply::Status(500)],
        );
        let dir = tempfile::tempdir().unwrap();
        let api_port = mqtt::free_port();
        write_config(
            dir.path(),
            &format!(
                "{}dispatcher:\n  backoff_initial: 100ms\n  backoff_max: 200ms\nstorage:\n  data_dir: data\n{sources}api:\n  listen: 127.0.0.1:{api_port}\n  token_file: api-token\n",
                d365_yaml(&fake)
            ),
        );
        std::fs::write(dir.path().join("api-token"), format!("{token}\n")).unwrap();
        std::fs::write(dir.path().join("webhook-secret"), WEBHOOK_SECRET).unwrap();
        if let Some(rules) = rules {
            std::fs::create_dir_all(dir.path().join("rules.d")).unwrap();
            std::fs::write(dir.path().join("rules.d/rules.yaml"), rules).unwrap();
        }
        let out = process::Output::new();
        let gw = process::start(&["run", "-c", process::path_str(dir.path())], &out);
        out.wait_for("Operator socket listening.").await;
        Operated {
            fake,
            dir,
            api_port,
            out,
            gw,
        }
    }
}
