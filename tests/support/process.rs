//! Running the real `mes-gateway` binary as a child process, with its output captured.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The gateway binary Cargo built for the tests and benchmarks: next to the `deps`
/// directory that holds the running test binary (`target/<profile>/mes-gateway`). Cargo
/// builds it whenever an integration test or benchmark is built. (`CARGO_BIN_EXE_…` is
/// only given to the package's own tests, not to this crate they share.)
pub static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let exe = std::env::current_exe().expect("the running test's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("mes-gateway");
    assert!(
        bin.exists(),
        "{} not found: build the tests with cargo, which builds the gateway for them",
        bin.display()
    );
    bin.to_string_lossy().into_owned()
});

/// Everything the gateway printed, across all runs of one test.
#[derive(Clone, Default)]
pub struct Output {
    text: Arc<Mutex<String>>,
    lines: Arc<watch::Sender<u64>>,
}

impl Output {
    pub fn new() -> Output {
        Output {
            text: Arc::default(),
            lines: Arc::new(watch::channel(0).0),
        }
    }

    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    fn push(&self, line: &str) {
        let mut t = self.text.lock().unwrap();
        t.push_str(line);
        t.push('\n');
        drop(t);
        self.lines.send_modify(|n| *n += 1);
    }

    /// Waits until `needle` has been printed `n` times.
    pub async fn wait_for_count(&self, needle: &str, n: usize) {
        let mut rx = self.lines.subscribe();
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            while self.text().matches(needle).count() < n {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(
            found.is_ok() && self.text().matches(needle).count() >= n,
            "gateway never printed {needle:?} {n} times; output:\n{}",
            self.text()
        );
    }

    /// Waits until a printed line contains `needle`.
    pub async fn wait_for(&self, needle: &str) {
        let mut rx = self.lines.subscribe();
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if self.text().contains(needle) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(
            found.is_ok() && self.text().contains(needle),
            "gateway never printed {needle:?}; output:\n{}",
            self.text()
        );
    }
}

pub struct Running {
    pub child: Child,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
        for r in self.readers {
            let _ = r.await;
        }
    }

    /// Waits for the process to exit on its own (a start that fails); its exit code.
    pub async fn child_exit_code(mut self) -> i32 {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("gateway exits")
            .unwrap();
        self.finish(status).await
    }

    /// Collects the output readers after the process exited; its exit code.
    async fn finish(self, status: std::process::ExitStatus) -> i32 {
        for r in self.readers {
            let _ = r.await;
        }
        status.code().unwrap_or(-1)
    }

    /// SIGTERM, then the exit code.
    pub async fn terminate(mut self) -> i32 {
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("gateway stops after SIGTERM")
            .unwrap();
        self.finish(status).await
    }
}

/// Starts `mes-gateway ARGS` with debug logs, copying its stdout and stderr into `output`.
pub fn start(args: &[&str], output: &Output) -> Running {
    start_logging(args, output, "debug")
}

/// Starts `mes-gateway ARGS` with the log filter `log` (`info` is what a plant runs).
pub fn start_logging(args: &[&str], output: &Output, log: &str) -> Running {
    start_with_env(args, output, log, &[])
}

/// [`start_logging`] with extra environment variables (e.g. systemd's `NOTIFY_SOCKET`).
pub fn start_with_env(args: &[&str], output: &Output, log: &str, env: &[(&str, &str)]) -> Running {
    let mut child = Command::new(&*BIN)
        .args(args)
        .envs(env.iter().copied())
        .env("MES_GATEWAY_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start mes-gateway");
    let mut readers = Vec::new();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    for stream in [
        Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(stderr),
    ] {
        let out = output.clone();
        readers.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                out.push(&line);
            }
        }));
    }
    Running { child, readers }
}

/// Runs `mes-gateway ARGS` to completion: (exit code, stdout, stderr).
pub async fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(&*BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run mes-gateway");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// What an operator does with messages a crash left in doubt: those D365 (`accepted`: the
/// ids the fake answered 2xx) has are resolved as delivered, the others sent again. Uses
/// the CLI on the stopped gateway's configuration `cfg`; returns (resolved, retried).
pub async fn settle_doubtful<'a>(
    accepted: &std::collections::HashSet<u64>,
    cfg: &str,
    records: impl IntoIterator<Item = &'a mes_gateway::outbox::Record>,
) -> (usize, usize) {
    let (mut resolved, mut retried) = (0, 0);
    for r in records {
        // A joined request's members are settled with their lead (the gateway's join.rs).
        if r.is_member() {
            if accepted.contains(&r.id) {
                resolved += 1;
            } else {
                retried += 1;
            }
            continue;
        }
        let action = if accepted.contains(&r.id) {
            resolved += 1;
            "resolve"
        } else {
            retried += 1;
            "retry"
        };
        let (code, stdout, stderr) = run(&[
            "outbox",
            "-c",
            cfg,
            action,
            &r.id.to_string(),
            "--by",
            "test",
        ])
        .await;
        assert_eq!(code, 0, "{action} {}: {stdout}{stderr}", r.id);
    }
    (resolved, retried)
}
