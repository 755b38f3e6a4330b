//! The connection supervisor of one web session: an explicit state machine over the shared device
//! status vocabulary. It knows nothing of sockets: inputs are what happened (mapped from the
//! library's events and from the session's own polling), outputs are what to do. A terminal state
//! (logged out, replaced by another session, temporarily banned, pairing codes exhausted, outdated
//! client, host stopped) ignores everything until a person opens the session again: nothing
//! reconnects behind the user's back.

use chrono::{DateTime, Duration, Utc};
use shared::domain::DeviceStatus;

/// Which pairing prompt is on show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairingKind {
    Qr,
    Code,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The session is being opened: host start, restore, or a person asked to connect or pair.
    Open {
        paired: bool,
    },
    Connected,
    Disconnected {
        reason: String,
    },
    /// The library's reconnect loop has failed this many times in a row (read from its stats).
    ConnectFailing {
        attempts: u32,
    },
    PairingShown {
        kind: PairingKind,
    },
    /// Every QR code of this pairing expired unscanned.
    PairingExhausted,
    Paired,
    PairFailed {
        error: String,
    },
    /// The server ended the session (logged out elsewhere, device removed, account locked).
    LoggedOut {
        reason: String,
    },
    /// Another session took over this one.
    Replaced,
    TemporaryBan {
        until: DateTime<Utc>,
        why: String,
    },
    ClientOutdated,
    /// The server refused an outgoing message with this code.
    Nack {
        code: String,
    },
    /// The device was logged out here: by a person, or by the host (its account is another
    /// device's). `reason` is the status reason.
    ManualLogout {
        reason: String,
    },
    /// The host is stopping (or handing the device to another host).
    Shutdown,
    /// Time passes: a timed restriction may end.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the status (and its reason) to PostgreSQL.
    Record(DeviceStatus, Option<String>),
    /// Close the connection and stop the library's reconnect loop.
    Disconnect,
    /// Delete the session store: the link is gone and re-pairing must start fresh.
    DeleteSession,
}

/// Nack codes that mean "this number may not start new chats for now".
pub fn is_reach_out_nack(code: &str) -> bool {
    matches!(code, "463" | "475")
}

fn nack_meaning(code: &str) -> &'static str {
    match code {
        "463" => "reach-out restriction",
        "475" => "new-chat limit reached",
        _ => "refused",
    }
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    status: DeviceStatus,
    reason: Option<String>,
    terminal: bool,
    connected: bool,
    restricted_until: Option<DateTime<Utc>>,
    /// How long a reach-out nack pauses the device.
    restriction_hold: Duration,
}

impl Supervisor {
    pub fn new(restriction_hold: Duration) -> Self {
        Self {
            status: DeviceStatus::Offline,
            reason: None,
            terminal: false,
            connected: false,
            restricted_until: None,
            restriction_hold,
        }
    }

    pub fn status(&self) -> DeviceStatus {
        self.status
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// True in a state only a person can leave.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    pub fn restricted_until(&self) -> Option<DateTime<Utc>> {
        self.restricted_until
    }

    /// The end to record with a `restricted` status in PostgreSQL, where the restriction
    /// outlives this session and this host (`devices.restricted_until`, which the processor
    /// reads): a nack's hold ends by itself; a temporary ban is a state only a person leaves
    /// (time does not lift it here), so it is recorded without an end, or a host that took
    /// the device over after the ban's end would start sending again without anyone looking.
    pub fn restriction_end_to_record(&self) -> Option<DateTime<Utc>> {
        if self.terminal {
            None
        } else {
            self.restricted_until
        }
    }

    fn set(&mut self, status: DeviceStatus, reason: impl Into<String>) -> Vec<Action> {
        let reason = Some(reason.into());
        if self.status == status && self.reason == reason {
            return Vec::new();
        }
        self.status = status;
        self.reason = reason.clone();
        vec![Action::Record(status, reason)]
    }

    fn end(&mut self, status: DeviceStatus, reason: String, delete: bool) -> Vec<Action> {
        self.terminal = true;
        self.connected = false;
        let mut out = self.set(status, reason);
        out.push(Action::Disconnect);
        if delete {
            out.push(Action::DeleteSession);
        }
        out
    }

    fn restricted_now(&self, now: DateTime<Utc>) -> bool {
        self.restricted_until.is_some_and(|u| u > now)
    }

    /// Applies one input at `now`; returns what to do, in order.
    pub fn on(&mut self, input: Input, now: DateTime<Utc>) -> Vec<Action> {
        if let Input::Open { paired } = input {
            self.terminal = false;
            self.connected = false;
            return self.set(
                DeviceStatus::Connecting,
                if paired {
                    "restoring the paired session"
                } else {
                    "opening a new session for pairing"
                },
            );
        }
        if self.terminal {
            return Vec::new();
        }
        match input {
            Input::Open { .. } => Vec::new(),
            Input::Connected => {
                self.connected = true;
                match self.restricted_until {
                    Some(until) if until > now => self.set(
                        DeviceStatus::Restricted,
                        format!("connected; new-contact sends paused until {until}"),
                    ),
                    _ => {
                        self.restricted_until = None;
                        self.set(DeviceStatus::Online, "connected")
                    }
                }
            }
            Input::Disconnected { reason } => {
                self.connected = false;
                self.set(
                    DeviceStatus::Reconnecting,
                    format!("connection lost ({reason}); reconnecting with back-off"),
                )
            }
            Input::ConnectFailing { attempts } => {
                if self.connected || attempts == 0 {
                    return Vec::new();
                }
                if self.status == DeviceStatus::AwaitingPairing {
                    // Still waiting for a scan: the prompt stays the message that matters.
                    return Vec::new();
                }
                self.set(
                    DeviceStatus::Reconnecting,
                    format!(
                        "cannot reach WhatsApp ({attempts} failed attempt{}); retrying with back-off",
                        if attempts == 1 { "" } else { "s" }
                    ),
                )
            }
            Input::PairingShown { kind } => self.set(
                DeviceStatus::AwaitingPairing,
                match kind {
                    PairingKind::Qr => {
                        "scan the QR code in WhatsApp > Linked devices (it rotates)"
                    }
                    PairingKind::Code => {
                        "enter the pair code in WhatsApp > Linked devices > Link with phone number"
                    }
                },
            ),
            Input::PairingExhausted => self.end(
                DeviceStatus::Stopped,
                "no QR code was scanned before they ran out; ask for pairing again".into(),
                false,
            ),
            Input::Paired => self.set(DeviceStatus::Connecting, "paired; connecting"),
            Input::PairFailed { error } => self.set(
                DeviceStatus::AwaitingPairing,
                format!("pairing failed ({error}); ask for pairing again"),
            ),
            Input::LoggedOut { reason } => self.end(
                DeviceStatus::LoggedOut,
                format!("{reason}; pair the device again"),
                true,
            ),
            Input::Replaced => self.end(
                DeviceStatus::Stopped,
                "replaced by another session of this device; connect again here once that one is closed"
                    .into(),
                false,
            ),
            Input::TemporaryBan { until, why } => {
                self.restricted_until = Some(until);
                self.end(
                    DeviceStatus::Restricted,
                    format!("temporarily banned until {until}: {why}; connect again after it ends"),
                    false,
                )
            }
            Input::ClientOutdated => self.end(
                DeviceStatus::Stopped,
                "WhatsApp says this client version is outdated; upgrade the host".into(),
                false,
            ),
            Input::Nack { code } => {
                if !is_reach_out_nack(&code) {
                    return Vec::new();
                }
                let until = now + self.restriction_hold;
                self.restricted_until = Some(until);
                self.set(
                    DeviceStatus::Restricted,
                    format!(
                        "WhatsApp refused a message (nack {code}: {}); new-contact sends paused until {until}",
                        nack_meaning(&code)
                    ),
                )
            }
            Input::ManualLogout { reason } => self.end(DeviceStatus::LoggedOut, reason, true),
            Input::Shutdown => self.end(DeviceStatus::Offline, "host stopped".into(), false),
            Input::Tick => {
                if self.status == DeviceStatus::Restricted && !self.restricted_now(now) {
                    self.restricted_until = None;
                    if self.connected {
                        self.set(DeviceStatus::Online, "restriction ended; connected")
                    } else {
                        self.set(DeviceStatus::Reconnecting, "restriction ended; reconnecting")
                    }
                } else {
                    Vec::new()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-25T08:00:00Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default()
    }

    fn statuses(actions: &[Action]) -> Vec<DeviceStatus> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Record(s, _) => Some(*s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn restore_connect_drop_and_come_back() {
        let mut s = Supervisor::new(Duration::hours(24));
        let now = t0();
        assert_eq!(
            statuses(&s.on(Input::Open { paired: true }, now)),
            [DeviceStatus::Connecting]
        );
        assert_eq!(
            statuses(&s.on(Input::ConnectFailing { attempts: 1 }, now)),
            [DeviceStatus::Reconnecting]
        );
        assert_eq!(
            statuses(&s.on(Input::Connected, now)),
            [DeviceStatus::Online]
        );
        // A failure count read while connected is stale: ignored.
        assert!(s.on(Input::ConnectFailing { attempts: 3 }, now).is_empty());
        let a = s.on(
            Input::Disconnected {
                reason: "socket closed".into(),
            },
            now,
        );
        assert_eq!(statuses(&a), [DeviceStatus::Reconnecting]);
        assert!(!a.contains(&Action::Disconnect), "a drop reconnects");
        assert_eq!(
            statuses(&s.on(Input::Connected, now)),
            [DeviceStatus::Online]
        );
    }

    #[test]
    fn pairing_prompts_and_exhaustion() {
        let mut s = Supervisor::new(Duration::hours(24));
        let now = t0();
        s.on(Input::Open { paired: false }, now);
        assert_eq!(
            statuses(&s.on(
                Input::PairingShown {
                    kind: PairingKind::Qr
                },
                now
            )),
            [DeviceStatus::AwaitingPairing]
        );
        // Same prompt again (the QR rotated): nothing new to record.
        assert!(s
            .on(
                Input::PairingShown {
                    kind: PairingKind::Qr
                },
                now
            )
            .is_empty());
        let a = s.on(Input::PairingExhausted, now);
        assert_eq!(statuses(&a), [DeviceStatus::Stopped]);
        assert!(a.contains(&Action::Disconnect));
        assert!(s.is_terminal());
        // Nothing reconnects until a person asks again.
        assert!(s.on(Input::Connected, now).is_empty());
        assert!(s.on(Input::ConnectFailing { attempts: 2 }, now).is_empty());
        assert_eq!(
            statuses(&s.on(Input::Open { paired: false }, now)),
            [DeviceStatus::Connecting]
        );
        assert!(!s.is_terminal());
    }

    #[test]
    fn terminal_states_say_why_and_stay() {
        let now = t0();
        for (input, status, deletes) in [
            (
                Input::LoggedOut {
                    reason: "device removed from the phone".into(),
                },
                DeviceStatus::LoggedOut,
                true,
            ),
            (
                Input::ManualLogout {
                    reason: "logged out by the user".into(),
                },
                DeviceStatus::LoggedOut,
                true,
            ),
            (Input::Replaced, DeviceStatus::Stopped, false),
            (
                Input::TemporaryBan {
                    until: now + Duration::hours(2),
                    why: "too many people blocked you".into(),
                },
                DeviceStatus::Restricted,
                false,
            ),
            (Input::ClientOutdated, DeviceStatus::Stopped, false),
        ] {
            let mut s = Supervisor::new(Duration::hours(24));
            s.on(Input::Open { paired: true }, now);
            s.on(Input::Connected, now);
            let a = s.on(input.clone(), now);
            assert_eq!(statuses(&a), [status], "{input:?}");
            assert!(a.contains(&Action::Disconnect), "{input:?}");
            assert_eq!(a.contains(&Action::DeleteSession), deletes, "{input:?}");
            assert!(s.reason().is_some_and(|r| !r.is_empty()));
            // The library's late events change nothing, and time does not lift a ban.
            assert!(s
                .on(
                    Input::Disconnected {
                        reason: "closed".into()
                    },
                    now
                )
                .is_empty());
            assert!(s.on(Input::Tick, now + Duration::days(3)).is_empty());
            assert_eq!(s.status(), status);
            // Nor does another host: what is recorded has no end (a person lifts it).
            assert_eq!(s.restriction_end_to_record(), None, "{input:?}");
        }
    }

    #[test]
    fn reach_out_nack_restricts_until_the_hold_ends() {
        let mut s = Supervisor::new(Duration::hours(24));
        let now = t0();
        s.on(Input::Open { paired: true }, now);
        s.on(Input::Connected, now);
        assert!(s.on(Input::Nack { code: "479".into() }, now).is_empty());
        let a = s.on(Input::Nack { code: "463".into() }, now);
        assert_eq!(statuses(&a), [DeviceStatus::Restricted]);
        assert!(!a.contains(&Action::Disconnect), "the connection stays up");
        assert!(s.reason().is_some_and(|r| r.contains("463")));
        // recorded with its end, which every host's processor claim honours
        assert_eq!(
            s.restriction_end_to_record(),
            Some(now + Duration::hours(24))
        );
        // A reconnect inside the hold keeps the restriction.
        s.on(
            Input::Disconnected {
                reason: "recycle".into(),
            },
            now,
        );
        assert_eq!(
            statuses(&s.on(Input::Connected, now + Duration::hours(1))),
            [DeviceStatus::Restricted]
        );
        assert!(s.on(Input::Tick, now + Duration::hours(23)).is_empty());
        assert_eq!(
            statuses(&s.on(Input::Tick, now + Duration::hours(25))),
            [DeviceStatus::Online]
        );
        assert_eq!(s.restricted_until(), None);
    }
}
