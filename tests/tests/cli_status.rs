//! The operator's `wabcast status`, run as a person runs it: a device held by a restriction
//! shows why, so the person who has to act reads it there; a device whose host died shows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::domain::DeviceStatus;
use shared::repo;
use sqlx::PgPool;
use wabcast_tests::*;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn status_shows_why_a_device_is_held(pool: PgPool) {
    let cli = built_binary("wabcast");
    let database_url = database_url_of(&pool).await;
    let db_name = database_url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();

    let tenant = seed_tenant(&pool, "status@example.com").await;
    let ok_device = seed_device(&pool, tenant, "shop-ok", 0.0, 0.0).await;
    let held = seed_device(&pool, tenant, "shop-held", 0.0, 0.0).await;
    // A deleted device needs no host and is not counted among the unserved.
    let gone = seed_device(&pool, tenant, "shop-gone", 0.0, 0.0).await;
    let mut tx = pool.begin().await.unwrap();
    repo::devices::delete_device(&mut tx, tenant, gone)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // shop-ok is served by host-a; shop-held's host died a minute ago.
    sqlx::query(
        "INSERT INTO device_leases (device_id, host_id, lease_until)
         VALUES ($1, 'host-a', now() + interval '30 seconds'),
                ($2, 'host-dead', now() - interval '60 seconds')",
    )
    .bind(ok_device)
    .bind(held)
    .execute(&pool)
    .await
    .unwrap();
    let why =
        "WhatsApp refused a message (nack 463: reach-out restriction); new-contact sends paused";
    let mut tx = pool.begin().await.unwrap();
    repo::devices::set_device_status(&mut tx, tenant, held, DeviceStatus::Restricted, Some(why))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let out = std::process::Command::new(&cli)
        .arg("status")
        .env("DATABASE_URL", &database_url)
        .env("QUEUE_BACKEND", "redis")
        .env("QUEUE_PREFIX", format!("cli-status-{db_name}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("shop-held"))
        .unwrap_or_else(|| panic!("no row for the held device:\n{stdout}"));
    assert!(lines[at].contains("restricted"), "{stdout}");
    assert!(
        lines[at].contains("none (host-dead's lease ran out"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 device(s) without a live host lease"),
        "{stdout}"
    );
    assert!(
        lines[at + 1].contains(why),
        "the reason follows the held device's row:\n{stdout}"
    );
    let ok = lines.iter().position(|l| l.starts_with("shop-ok")).unwrap();
    assert!(lines[ok].trim_end().ends_with("host-a"), "{stdout}");
    assert!(
        !lines
            .get(ok + 1)
            .is_some_and(|l| l.trim_start().starts_with('└')),
        "an online device has no reason line:\n{stdout}"
    );
}
