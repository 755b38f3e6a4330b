//! Child processes for tests and the benchmark: each in its own process group, killed whole
//! when dropped (cargo lambda watch spawns the functions as its children and ignores TERM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

pub struct Group(pub Child);

/// The process groups alive now, for `kill_groups_on_signal`.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn kill_group(pid: u32, signal: &str) {
    let group = format!("-{pid}");
    let _ = Command::new("kill")
        .args([signal, "--", &group])
        .stderr(Stdio::null())
        .status();
}

/// A signal (TERM from `timeout`, INT from Ctrl-C) ends the process without running `Drop`,
/// which left its children running: an orphaned device host kept serving and took device
/// leases in the next benchmark run's database of the same name, so that run sent through two
/// hosts and counted only one host's log. On TERM or INT this kills every live group, then exits.
pub fn kill_groups_on_signal() {
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        // the shell's convention: 128 + the signal's number
        let code = tokio::select! {
            _ = term.recv() => 143,
            _ = int.recv() => 130,
        };
        let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
        for pid in live {
            kill_group(pid, "-KILL");
        }
        std::process::exit(code);
    });
}

impl Group {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Kills the whole group at once (SIGKILL: no goodbye, as a machine that dies) and reaps it.
    pub fn kill_now(&mut self) {
        kill_group(self.0.id(), "-KILL");
        let _ = self.0.wait();
    }

    /// Waits until the child listens on `port`; fails at once, with its log, if it exits first.
    pub async fn wait_listening(&mut self, port: u16, timeout: Duration, log: &Path) {
        let deadline = tokio::time::Instant::now() + timeout;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = self.0.try_wait() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                panic!("the child exited ({status}) before listening on {port}:\n{text}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing listens on port {port} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // TERM, a moment to exit, then KILL.
        let pid = self.0.id();
        kill_group(pid, "-TERM");
        for _ in 0..20 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        kill_group(pid, "-KILL");
        let _ = self.0.wait();
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|p| *p != pid);
        }
    }
}

/// Starts `cmd` in a new process group with its output in `log`.
pub fn spawn(cmd: &mut Command, log: &Path) -> Group {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).unwrap();
    // Held across the spawn: a signal handled between the spawn and the push would otherwise
    // kill every group but this one (an orphaned host outlived a benchmark stopped just as it
    // started a host, 2026-12-03, and took leases in the next run's database of the same name).
    let mut live = LIVE.lock().ok();
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e} (infra/test.sh installs cargo-lambda and builds the binaries)"));
    if let Some(live) = live.as_mut() {
        live.push(child.id());
    }
    Group(child)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on the port.
pub async fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on port {port} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
