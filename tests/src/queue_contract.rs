//! The queue contract: SQS FIFO semantics every `Queue` implementation must keep. Each case takes
//! a fresh, empty queue configured with `maxReceiveCount = 2` and runs against any backend (Redis,
//! and SQS on moto). Visibility timeouts are whole seconds, as in SQS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::queue::{OutgoingMessage, Queue};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

pub const MAX_RECEIVES: u32 = 2;

fn msg(group: &str, dedup: &str) -> OutgoingMessage {
    OutgoingMessage {
        group_id: group.into(),
        dedup_id: dedup.into(),
        body: format!("{group}/{dedup}"),
    }
}

const LONG: Duration = Duration::from_secs(30);

/// Receives `max` at a time, deleting each message, until a receive comes back empty; returns
/// the bodies in the order received.
async fn drain(q: &dyn Queue, max: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    loop {
        let got = q.receive(max, LONG).await.unwrap();
        if got.is_empty() {
            return bodies;
        }
        for m in got {
            bodies.push(m.body.clone());
            q.delete(&m.receipt_handle).await.unwrap();
        }
    }
}

pub async fn fifo_order_within_a_group(q: Arc<dyn Queue>) {
    let sent: Vec<OutgoingMessage> = (0..7).map(|i| msg("g", &format!("m{i}"))).collect();
    assert_eq!(q.send_batch(&sent).await.unwrap(), 7);
    let bodies = drain(q.as_ref(), 3).await;
    let want: Vec<String> = sent.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, want);
}

/// One send of many messages over many groups (a processor's claim: the SQS client spreads it
/// over concurrent calls) delivers every message once, each group in the order sent.
pub async fn a_large_send_keeps_each_groups_order(q: Arc<dyn Queue>) {
    let sent: Vec<OutgoingMessage> = (0..150)
        .map(|i| msg(&format!("g{}", i % 15), &format!("m{i:03}")))
        .collect();
    assert_eq!(q.send_batch(&sent).await.unwrap(), 150);
    let got = drain(q.as_ref(), 10).await;
    assert_eq!(got.len(), 150, "every message once");
    for g in 0..15 {
        let prefix = format!("g{g}/");
        let of_group: Vec<&String> = got.iter().filter(|b| b.starts_with(&prefix)).collect();
        let want: Vec<String> = sent
            .iter()
            .filter(|m| m.group_id == format!("g{g}"))
            .map(|m| m.body.clone())
            .collect();
        assert_eq!(
            of_group,
            want.iter().collect::<Vec<_>>(),
            "group g{g} in order"
        );
    }
}

pub async fn a_group_is_blocked_while_a_message_is_in_flight(q: Arc<dyn Queue>) {
    // Two sends, so that `a` is first: FIFO orders messages within a group only, and one send
    // may reach the queue group by group in any order (the SQS client sends groups concurrently).
    q.send_batch(&[msg("a", "a1"), msg("a", "a2")])
        .await
        .unwrap();
    q.send_batch(&[msg("b", "b1")]).await.unwrap();
    let first = q.receive(1, LONG).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].body, "a/a1");
    let second = q.receive(10, LONG).await.unwrap();
    let bodies: Vec<&str> = second.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["b/b1"], "a2 must wait for a1");
    q.delete(&first[0].receipt_handle).await.unwrap();
    let third = q.receive(10, LONG).await.unwrap();
    assert_eq!(
        third.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["a/a2"]
    );
    assert_eq!(third[0].group_id, "a");
}

pub async fn the_visibility_timeout_redelivers_with_a_higher_receive_count(q: Arc<dyn Queue>) {
    q.send_batch(&[msg("g", "x")]).await.unwrap();
    let a = q.receive(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].receive_count, 1);
    assert!(
        q.receive(10, LONG).await.unwrap().is_empty(),
        "hidden while in flight"
    );
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let b = q.receive(10, LONG).await.unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].message_id, a[0].message_id);
    assert_eq!(b[0].receive_count, 2);
    q.delete(&b[0].receipt_handle).await.unwrap();
    let s = q.stats().await.unwrap();
    assert_eq!((s.visible, s.in_flight), (0, 0));
}

/// A receipt from an earlier receive does not delete the redelivered message. SQS documents
/// only that such a delete "might not" delete it; the Redis queue guarantees it, and moto deletes
/// (marked in its suite). Nothing in wabcast relies on it: the row's conditional claim is what
/// stops a second send.
pub async fn a_stale_receipt_does_not_delete_the_redelivered_message(q: Arc<dyn Queue>) {
    q.send_batch(&[msg("g", "x")]).await.unwrap();
    let a = q.receive(10, Duration::from_secs(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let b = q.receive(10, LONG).await.unwrap();
    assert_eq!(b.len(), 1);
    q.delete(&a[0].receipt_handle).await.unwrap();
    assert_eq!(q.stats().await.unwrap().in_flight, 1);
    q.delete(&b[0].receipt_handle).await.unwrap();
}

pub async fn a_message_is_dead_lettered_after_max_receives(q: Arc<dyn Queue>) {
    q.send_batch(&[msg("g", "poison"), msg("g", "next")])
        .await
        .unwrap();
    for n in 1..=MAX_RECEIVES {
        let got = q.receive(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            (got.len(), got[0].receive_count, got[0].body.as_str()),
            (1, n, "g/poison")
        );
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    let after = q.receive(10, LONG).await.unwrap();
    assert_eq!(
        after.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["g/next"],
        "the poison message left the group"
    );
    assert_eq!(q.stats().await.unwrap().dead_letter, 1);
}

pub async fn a_deduplication_id_is_accepted_once_within_the_window(q: Arc<dyn Queue>) {
    q.send_batch(&[msg("g", "same")]).await.unwrap();
    q.send_batch(&[msg("g", "same"), msg("g", "other")])
        .await
        .unwrap();
    let s = q.stats().await.unwrap();
    assert_eq!(s.visible, 2);
    let got = q.receive(10, LONG).await.unwrap();
    assert_eq!(
        got.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["g/same", "g/other"]
    );
}

/// SQS remembers a deduplication id for five minutes from the send, whether or not the message
/// was deleted since. moto forgets it once the message is deleted (marked in its suite).
pub async fn a_deduplication_id_outlives_the_deletion_of_its_message(q: Arc<dyn Queue>) {
    q.send_batch(&[msg("g", "once")]).await.unwrap();
    let got = q.receive(10, LONG).await.unwrap();
    assert_eq!(got.len(), 1);
    q.delete(&got[0].receipt_handle).await.unwrap();
    q.send_batch(&[msg("g", "once")]).await.unwrap();
    let s = q.stats().await.unwrap();
    assert_eq!((s.visible, s.in_flight), (0, 0), "the resend was dropped");
}

pub async fn change_visibility_to_zero_makes_a_message_available_again(q: Arc<dyn Queue>) {
    q.send_batch(&[msg("g", "x")]).await.unwrap();
    let a = q.receive(10, LONG).await.unwrap();
    q.change_visibility(&a[0].receipt_handle, Duration::ZERO)
        .await
        .unwrap();
    let b = q.receive(10, LONG).await.unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].receive_count, 2);
}

pub async fn concurrent_consumers_never_share_an_in_flight_message(q: Arc<dyn Queue>) {
    let sent: Vec<OutgoingMessage> = (0..200)
        .map(|i| msg(&format!("g{}", i % 20), &format!("m{i}")))
        .collect();
    for chunk in sent.chunks(10) {
        q.send_batch(chunk).await.unwrap();
    }
    let consumers = (0..4).map(|_| {
        let q = q.clone();
        async move {
            let mut got = Vec::new();
            let mut idle = 0;
            while idle < 5 {
                let batch = q.receive(10, LONG).await.unwrap();
                if batch.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                idle = 0;
                for m in batch {
                    got.push(m.body.clone());
                    q.delete(&m.receipt_handle).await.unwrap();
                }
            }
            got
        }
    });
    let all: Vec<String> = futures::future::join_all(consumers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 200, "every message received exactly once");
    assert_eq!(unique.len(), 200);
}

pub async fn a_batch_delete_removes_exactly_the_named_messages(q: Arc<dyn Queue>) {
    q.send_batch(&[msg("a", "1"), msg("b", "2"), msg("c", "3")])
        .await
        .unwrap();
    let got = q.receive(10, LONG).await.unwrap();
    assert_eq!(got.len(), 3);
    let keep = got
        .iter()
        .find(|m| m.body == "b/2")
        .unwrap()
        .receipt_handle
        .clone();
    let gone: Vec<String> = got
        .iter()
        .filter(|m| m.body != "b/2")
        .map(|m| m.receipt_handle.clone())
        .collect();
    q.delete_batch(&gone).await.unwrap();
    let s = q.stats().await.unwrap();
    assert_eq!((s.visible, s.in_flight), (0, 1));
    q.change_visibility(&keep, Duration::ZERO).await.unwrap();
    let again = q.receive(10, LONG).await.unwrap();
    assert_eq!(
        again.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["b/2"]
    );
}
