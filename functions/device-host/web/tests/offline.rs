//! The web provider with no network: a session pointed at a port nobody listens on must fail to
//! connect gracefully, back off, report `reconnecting`, and never panic; logout must stop it for
//! good and delete its store. No WhatsApp server is involved (none can be reached from here).

use device_host_web::{
    InboundKeeper, InboundText, WebConfig, WebError, WebEvent, WebMessage, WebSessions,
};
use shared::domain::DeviceStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

/// A loopback port with no listener: every connect is refused at once.
fn refused_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(9);
    format!("ws://127.0.0.1:{port}/ws/chat")
}

async fn next_status(
    rx: &mut mpsc::UnboundedReceiver<WebEvent>,
    want: DeviceStatus,
    within: Duration,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        if let WebEvent::Status { status, reason, .. } = ev {
            if status == want {
                return Some(reason.unwrap_or_default());
            }
        }
    }
}

/// No contact ever writes to these sessions.
struct NoInbound;

#[async_trait::async_trait]
impl InboundKeeper for NoInbound {
    async fn keep(&self, _inbound: InboundText) -> Result<(), String> {
        Ok(())
    }
}

fn config(dir: &std::path::Path, in_memory: bool) -> WebConfig {
    let mut c = WebConfig::new(dir);
    c.ws_url = Some(refused_url());
    c.in_memory = in_memory;
    c.poll = Duration::from_millis(100);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_backs_off_as_reconnecting_and_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sessions = Arc::new(WebSessions::new(
        config(dir.path(), true),
        tx,
        Arc::new(NoInbound),
    ));
    let device = Uuid::new_v4();
    assert_eq!(
        sessions.open(device, None).await.expect("open"),
        DeviceStatus::Connecting
    );
    let reason = next_status(&mut rx, DeviceStatus::Reconnecting, Duration::from_secs(20))
        .await
        .expect("reconnecting reported");
    assert!(reason.contains("cannot reach WhatsApp"), "{reason}");
    // A send to a device that is not online is refused as offline (transient), not attempted.
    let msg = WebMessage {
        id: device_host_web::new_message_id(),
        to: "60123456789".into(),
        text: "hello".into(),
        image: None,
    };
    assert!(matches!(
        sessions.send(device, &msg).await,
        Err(WebError::Offline(_))
    ));
    // Opening again while it is trying is a no-op: one session per device.
    sessions.open(device, None).await.expect("open again");
    assert_eq!(sessions.open_count(), 1);
    sessions.close_all().await;
    assert_eq!(sessions.open_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_is_terminal_and_deletes_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sessions = Arc::new(WebSessions::new(
        config(dir.path(), false),
        tx,
        Arc::new(NoInbound),
    ));
    let device = Uuid::new_v4();
    sessions.open(device, None).await.expect("open");
    assert!(sessions.has_store(device), "a SQLite store per device");
    assert_eq!(sessions.stored_devices(), vec![device]);
    next_status(&mut rx, DeviceStatus::Reconnecting, Duration::from_secs(20))
        .await
        .expect("reconnecting");
    sessions.logout(device, "logged out by the user").await;
    let reason = next_status(&mut rx, DeviceStatus::LoggedOut, Duration::from_secs(10))
        .await
        .expect("logged out");
    assert!(reason.contains("by the user"), "{reason}");
    // Nothing reconnects behind the user's back: no status but logged_out from here on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        if let WebEvent::Status { status, .. } = ev {
            assert_eq!(status, DeviceStatus::LoggedOut, "no reconnect after logout");
        }
    }
    assert_eq!(
        sessions.status(device).map(|s| s.0),
        Some(DeviceStatus::LoggedOut)
    );
    assert!(!sessions.has_store(device), "the store is deleted");
    sessions.close_all().await;
}

#[test]
fn typing_time_is_proportional_and_bounded() {
    let c = WebConfig::new("/tmp");
    assert_eq!(c.typing_for("hi"), c.typing_min);
    assert_eq!(c.typing_for(&"x".repeat(50)), Duration::from_millis(3_000));
    assert_eq!(c.typing_for(&"x".repeat(5_000)), c.typing_max);
    let id = device_host_web::new_message_id();
    assert!(id.starts_with("3EB0") && id.len() == 22, "{id}");
    assert_ne!(id, device_host_web::new_message_id());
}
