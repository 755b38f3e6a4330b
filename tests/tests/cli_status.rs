//! The operator's CLI, run as a person runs it: `wabcast status` shows why a device is held, so
//! the person who has to act reads it there, and a device whose host died; `wabcast migrate`
//! repairs what an interrupted concurrent index build left; `history` and `campaign progress`
//! tell a tenant, and only that tenant, what happened to its messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::domain::DeviceStatus;
use shared::repo;
use sqlx::PgPool;
use wabcast_tests::*;

/// Runs the CLI command, which must succeed; its standard output.
fn succeeds(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

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
    // Its host died with it online: the status is only the last one written.
    let stale = seed_device(&pool, tenant, "shop-stale", 0.0, 0.0).await;
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
                ($2, 'host-dead', now() - interval '60 seconds'),
                ($3, 'host-dead', now() - interval '60 seconds')",
    )
    .bind(ok_device)
    .bind(held)
    .bind(stale)
    .execute(&pool)
    .await
    .unwrap();
    let why =
        "WhatsApp refused a message (nack 463: reach-out restriction); new-contact sends paused";
    let mut tx = pool.begin().await.unwrap();
    repo::devices::set_device_status(
        &mut tx,
        None,
        tenant,
        held,
        DeviceStatus::Restricted,
        Some(why),
    )
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
        stdout.contains("2 device(s) without a live host lease"),
        "{stdout}"
    );
    // A connection status nobody keeps current says so; a restriction (WhatsApp's, not the
    // host's) and a served device's status do not.
    let stale_row = lines.iter().find(|l| l.starts_with("shop-stale")).unwrap();
    assert!(stale_row.contains("online (stale)"), "{stdout}");
    assert!(!lines[at].contains("stale"), "{stdout}");
    assert!(stdout.contains("1 device(s) marked (stale)"), "{stdout}");
    // The device list says the same.
    let out = std::process::Command::new(&cli)
        .args(["device", "list", "--tenant", "status@example.com"])
        .env("DATABASE_URL", &database_url)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    let row = |label: &str| {
        list.lines()
            .find(|l| l.contains(&format!(" {label} ")))
            .unwrap_or_else(|| panic!("no {label}:\n{list}"))
            .to_string()
    };
    assert!(row("shop-stale").contains("online (stale)"), "{list}");
    assert!(
        row("shop-ok").contains("online ") && !row("shop-ok").contains("stale"),
        "{list}"
    );
    assert!(
        lines[at + 1].contains(why)
            && lines[at + 1].contains("held until a person runs `wabcast device connect`"),
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
    assert!(
        stdout.contains(
            "devices: 1 deleted, 1 online, 1 online (stale), 1 restricted; 2 need(s) attention"
        ),
        "{stdout}"
    );

    // `--attention`: only the held and the stale device (and the held one's reason); the same
    // totals.
    let out = std::process::Command::new(&cli)
        .args(["status", "--attention"])
        .env("DATABASE_URL", &database_url)
        .env("QUEUE_BACKEND", "redis")
        .env("QUEUE_PREFIX", format!("cli-status-{db_name}"))
        .output()
        .unwrap();
    let brief = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{brief}");
    let listed: Vec<&str> = brief
        .lines()
        .filter(|l| l.starts_with("shop-"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(listed, vec!["shop-held", "shop-stale"], "{brief}");
    assert!(brief.contains(why), "{brief}");
    assert!(
        brief.contains("2 need(s) attention (only those are listed above)"),
        "{brief}"
    );
    assert!(
        brief.contains("2 device(s) without a live host lease"),
        "{brief}"
    );
}

/// Right after an outage of the database every lease has run out, since no host could renew
/// it: until the hosts have had their settling time to renew (one device lease after the
/// processors' return), `wabcast status` says so rather than that no host serves the devices,
/// as the processor itself does not count those leases yet. A lease that ran out after the
/// return is a host that stopped renewing, and is shown as such.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn status_after_an_outage_of_the_database_says_the_hosts_are_renewing(pool: PgPool) {
    let cli = built_binary("wabcast");
    let database_url = database_url_of(&pool).await;
    let tenant = seed_tenant(&pool, "renewing@example.com").await;
    let renewing = seed_device(&pool, tenant, "shop-renewing", 0.0, 0.0).await;
    let lost = seed_device(&pool, tenant, "shop-lost", 0.0, 0.0).await;
    let run = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    // Back 5 s ago, settling for 30 s.
    run(
        "INSERT INTO processor_liveness (last_tick_at, resumed_at, back_at, settle_s)
         VALUES (now(), '-infinity', now() - interval '5 seconds', 30)",
    )
    .await;
    sqlx::query(
        "INSERT INTO device_leases (device_id, host_id, lease_until)
         VALUES ($1, 'host-a', now() - interval '20 seconds'),
                ($2, 'host-b', now() - interval '2 seconds')",
    )
    .bind(renewing)
    .bind(lost)
    .execute(&pool)
    .await
    .unwrap();
    let status = || {
        succeeds(
            std::process::Command::new(&cli)
                .args(["status", "--tenant", "renewing@example.com"])
                .env("DATABASE_URL", &database_url)
                .env("QUEUE_BACKEND", "redis")
                .env("QUEUE_PREFIX", format!("cli-renewing-{renewing}")),
        )
    };
    let row = |out: &str, label: &str| {
        out.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label}:\n{out}"))
            .to_string()
    };
    let out = status();
    let r = row(&out, "shop-renewing");
    assert!(
        r.contains("host-a? (its lease ran out while the database was away; renewing)"),
        "{out}"
    );
    assert!(!r.contains("stale"), "{out}");
    assert!(
        row(&out, "shop-lost").contains("none (host-b's lease ran out"),
        "{out}"
    );
    assert!(row(&out, "shop-lost").contains("online (stale)"), "{out}");
    assert!(
        out.contains("1 device(s) whose lease ran out while the database was away (back 5s ago)"),
        "{out}"
    );
    assert!(
        out.contains("1 device(s) without a live host lease"),
        "{out}"
    );
    // The device list agrees.
    let list = std::process::Command::new(&cli)
        .args(["device", "list", "--tenant", "renewing@example.com"])
        .env("DATABASE_URL", &database_url)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    let line = |label: &str| {
        list.lines()
            .find(|l| l.contains(&format!(" {label} ")))
            .unwrap_or_else(|| panic!("no {label}:\n{list}"))
            .to_string()
    };
    assert!(!line("shop-renewing").contains("stale"), "{list}");
    assert!(line("shop-lost").contains("online (stale)"), "{list}");

    // The settling time over, a host that has not renewed is one that did not come back.
    run("UPDATE processor_liveness SET back_at = now() - interval '31 seconds'").await;
    let out = status();
    assert!(
        row(&out, "shop-renewing").contains("none (host-a's lease ran out"),
        "{out}"
    );
    assert!(
        row(&out, "shop-renewing").contains("online (stale)"),
        "{out}"
    );
    assert!(
        out.contains("2 device(s) without a live host lease"),
        "{out}"
    );
    assert!(!out.contains("while the database was away"), "{out}");
}

/// The status view's counts per device: every unsent row of the device, a paused campaign's
/// (held) ones included, by state; another tenant's devices only in the operator's view of all.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn status_counts_each_devices_unsent_rows_held_ones_included(pool: PgPool) {
    use shared::domain::{CampaignStatus, LeadStatus};
    let tenant = seed_tenant(&pool, "load@example.com").await;
    let other = seed_tenant(&pool, "other-load@example.com").await;
    let a = seed_device(&pool, tenant, "a", 0.0, 0.0).await;
    let b = seed_device(&pool, tenant, "b", 0.0, 0.0).await;
    let c = seed_device(&pool, other, "c", 0.0, 0.0).await;
    seed_leads(&pool, tenant, a, 0, 10, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, b, 100, 10, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, other, c, 200, 4, "cars", LeadStatus::Prospect).await;
    let paused = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    seed_campaign(&pool, other, &CampaignSpec::default()).await;
    fan_out(&pool).await;
    let mut tx = pool.begin().await.unwrap();
    repo::campaigns::change_campaign_status(&mut tx, tenant, paused, CampaignStatus::Paused)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let running = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    fan_out(&pool).await;
    // five of device a's running rows in flight: three queued, two sending
    sqlx::query(
        "UPDATE broadcast_messages m
         SET status = CASE WHEN r.n <= 3 THEN 'queued' ELSE 'sending' END,
             lease_until = now() + interval '1 minute'
         FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM broadcast_messages
               WHERE campaign_id = $1 AND device_id = $2) r
         WHERE m.id = r.id AND r.n <= 5",
    )
    .bind(running)
    .bind(a)
    .execute(&pool)
    .await
    .unwrap();
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM broadcast_messages WHERE held")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(held, 20, "the paused campaign's rows are held");

    let counts = |rows: Vec<repo::devices::DeviceLoad>| -> Vec<(String, i64, i64, i64)> {
        rows.into_iter()
            .map(|d| (d.label, d.pending, d.queued, d.sending))
            .collect()
    };
    assert_eq!(
        counts(
            repo::devices::list_device_load(&pool, Some(tenant))
                .await
                .unwrap()
        ),
        vec![("a".into(), 15, 3, 2), ("b".into(), 20, 0, 0)]
    );
    let all = counts(repo::devices::list_device_load(&pool, None).await.unwrap());
    assert_eq!(all.len(), 3);
    assert!(all.contains(&("c".into(), 4, 0, 0)), "{all:?}");
}

/// `wabcast migrate` repairs what an interrupted concurrent index build leaves behind (README,
/// "Migrations on a live database"): the invalid index of a `CREATE INDEX CONCURRENTLY` that
/// timed out is rebuilt, the `_ccnew` copy of a `REINDEX … CONCURRENTLY` that timed out is
/// dropped, and the original index stays valid. Both builds are made to time out the way a
/// real one does: waiting for a transaction that writes to the table.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn migrate_repairs_the_indexes_an_interrupted_concurrent_build_left(pool: PgPool) {
    let cli = built_binary("wabcast");
    let database_url = database_url_of(&pool).await;
    let invalid = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE NOT i.indisvalid ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let mut writer = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE leads IN ROW EXCLUSIVE MODE")
        .execute(&mut *writer)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("SET statement_timeout = '1s'")
        .execute(&mut *conn)
        .await
        .unwrap();
    for sql in [
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS leads_name_probe ON leads (name)",
        "REINDEX INDEX CONCURRENTLY leads_tenant_phone",
    ] {
        let err = sqlx::raw_sql(sql).execute(&mut *conn).await.unwrap_err();
        assert!(
            err.to_string().contains("statement timeout"),
            "{sql}: {err}"
        );
    }
    drop(conn);
    writer.rollback().await.unwrap();
    assert_eq!(
        invalid().await,
        vec!["leads_name_probe", "leads_tenant_phone_ccnew"]
    );

    let migrate = || {
        succeeds(
            std::process::Command::new(&cli)
                .arg("migrate")
                .env("DATABASE_URL", &database_url)
                .env("QUEUE_BACKEND", "redis"),
        )
    };
    let first = migrate();
    assert_eq!(
        first,
        "rebuilt index leads_name_probe, left invalid by a failed concurrent build\n\
         dropped index leads_tenant_phone_ccnew, left by a failed concurrent reindex\n\
         migrations applied\n"
    );
    assert!(invalid().await.is_empty());
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_indexes WHERE indexname IN ('leads_name_probe', 'leads_tenant_phone')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kept, 2);
    assert_eq!(migrate(), "migrations applied\n", "nothing left to repair");
}

/// Runs the CLI against the test's database; returns (success, stdout, stderr).
async fn wabcast(pool: &PgPool, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(built_binary("wabcast"))
        .args(args)
        .env("DATABASE_URL", database_url_of(pool).await)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `wabcast` with the arguments of `base`, then those of `extra`.
async fn wabcast_args(pool: &PgPool, base: &[&str], extra: &[&str]) -> (bool, String, String) {
    let args: Vec<&str> = base.iter().chain(extra).copied().collect();
    wabcast(pool, &args).await
}

/// What a person asks of one campaign after it ran: a message's whole story (created, each state
/// change, its receipts) and the per-device report in label order; another tenant asking about
/// the same ids is told they are not found. A schedule typed into the past is refused before it
/// can send anything.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn history_and_progress_tell_a_messages_story_to_its_tenant_only(pool: PgPool) {
    use shared::domain::LeadStatus;
    use std::time::Duration;
    let tenant = seed_tenant(&pool, "story@example.com").await;
    seed_tenant(&pool, "nosy@example.com").await;
    // Labels whose order differs from the devices' (random) id order in most runs.
    let mut devices = Vec::new();
    for (i, label) in ["delta", "alpha", "charlie", "bravo"].iter().enumerate() {
        let d = seed_device(&pool, tenant, label, 0.0, 0.0).await;
        seed_leads(
            &pool,
            tenant,
            d,
            i as u64 * 10,
            2,
            "cars",
            LeadStatus::Prospect,
        )
        .await;
        devices.push(d);
    }
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(
        &pool,
        SimConfig {
            delivered_after: Some(Duration::from_millis(10)),
            read_after: Some(Duration::from_millis(20)),
            read_rate: 1.0,
            ..quiet_sim()
        },
    )
    .await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    let rows = repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap();
    assert_eq!(rows.len(), 8);
    let id = rows[0].id;
    // The receipts arrive after the send.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while repo::messages::get_message(&pool, tenant, id)
        .await
        .unwrap()
        .read_at
        .is_none()
    {
        assert!(std::time::Instant::now() < deadline, "no read receipt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let id_arg = id.to_string();
    let (ok, out, err) = wabcast(
        &pool,
        &[
            "history",
            "--tenant",
            "story@example.com",
            "--message",
            &id_arg,
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let label = ["delta", "alpha", "charlie", "bravo"][devices
        .iter()
        .position(|d| *d == rows[0].device_id)
        .unwrap()];
    assert!(
        out.starts_with(&format!(
            "message {id} to {} through {label} ",
            rows[0].recipient
        )) && out.lines().next().unwrap().ends_with(": sent (accepted)"),
        "{out}"
    );
    let story: Vec<String> = out
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        story,
        [
            "pending created",
            "pending -> queued",
            "queued -> sending",
            "sending -> sent accepted",
            "delivered",
            "read"
        ],
        "{out}"
    );
    let campaign_arg = campaign.to_string();
    let (ok, out, err) = wabcast(
        &pool,
        &[
            "campaign",
            "progress",
            "--tenant",
            "story@example.com",
            "--campaign",
            &campaign_arg,
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let per_device: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.contains("per device:"))
        .skip(1)
        .collect();
    assert_eq!(
        per_device
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>(),
        [
            "alpha sent=2",
            "bravo sent=2",
            "charlie sent=2",
            "delta sent=2"
        ],
        "{out}"
    );

    // Another tenant: the same ids are not found, and nothing is printed of them.
    for args in [
        &[
            "history",
            "--tenant",
            "nosy@example.com",
            "--message",
            &id_arg,
        ][..],
        &[
            "campaign",
            "progress",
            "--tenant",
            "nosy@example.com",
            "--campaign",
            &campaign_arg,
        ],
    ] {
        let (ok, out, err) = wabcast(&pool, args).await;
        assert!(
            !ok && out.is_empty() && err.contains("not found"),
            "{args:?}: {out}{err}"
        );
    }

    // A year typed wrong is refused, and no campaign is created.
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM campaigns")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = count().await;
    let create = |niche: &'static str, date: &'static str| {
        let pool = pool.clone();
        async move {
            let args = [
                "campaign",
                "create",
                "--tenant",
                "story@example.com",
                "--title",
                "t",
                "--template",
                "hi",
                "--niche",
                niche,
                "--date",
                date,
                "--time",
                "09:00",
            ];
            wabcast(&pool, &args).await
        }
    };
    let (ok, _, err) = create("cars", "2025-12-05").await;
    assert!(!ok && err.contains("is in the past"), "{err}");
    assert_eq!(count().await, before);
    // Created, it says whom it would reach now, and warns when that is no one.
    for (niche, reach) in [
        ("cars", "8 lead(s) on 4 device(s) match it now"),
        ("boats", "0 lead(s) on 0 device(s) match it now"),
    ] {
        let (ok, _, err) = create(niche, "2099-01-01").await;
        assert!(ok && err.contains(reach), "{err}");
        assert_eq!(
            err.contains("would send nothing"),
            niche == "boats",
            "{err}"
        );
    }
    assert_eq!(count().await, before + 2);

    // An edit: refused for the finished campaign, done for one not yet started.
    let (ok, _, err) = wabcast(
        &pool,
        &[
            "campaign",
            "edit",
            "--tenant",
            "story@example.com",
            "--campaign",
            &campaign_arg,
            "--title",
            "x",
        ],
    )
    .await;
    assert!(!ok && err.contains("completed"), "{err}");
    let next: uuid::Uuid = sqlx::query_scalar("SELECT id FROM campaigns WHERE niche = 'boats'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let next_arg = next.to_string();
    let (ok, out, err) = wabcast(
        &pool,
        &[
            "campaign",
            "edit",
            "--tenant",
            "story@example.com",
            "--campaign",
            &next_arg,
            "--template",
            "{Hi|Hey} {name}",
            "--date",
            "2099-02-01",
            "--time",
            "10:30",
        ],
    )
    .await;
    assert!(
        ok && out.contains("(scheduled) updated, due 2099-02-01T02:30:00+00:00"),
        "{out}{err}"
    );
    // Its Cloud API template: set, refused when malformed (nothing changes), removed.
    let edit_args = |extra: &[&'static str]| {
        let mut a = vec![
            "campaign".to_string(),
            "edit".into(),
            "--tenant".into(),
            "story@example.com".into(),
            "--campaign".into(),
            next_arg.clone(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let stored = || async {
        sqlx::query_scalar::<_, Option<serde_json::Value>>(
            "SELECT wa_template FROM campaigns WHERE id = $1",
        )
        .bind(next)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let args = edit_args(&[
        "--wa-template",
        "boat_promo:ms",
        "--wa-template-param",
        "{name}",
    ]);
    let (ok, out, err) = wabcast(&pool, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(
        ok && out.contains("send template boat_promo:ms"),
        "{out}{err}"
    );
    let set =
        serde_json::json!({"name": "boat_promo", "language": "ms", "body_params": ["{name}"]});
    assert_eq!(stored().await, Some(set.clone()));
    for bad in [
        &["--wa-template", "Boat Promo:ms"][..],
        &["--wa-template", "boat_promo"][..],
        &["--wa-template-param", "{name}"][..],
        &["--wa-template", "boat_promo:ms", "--no-wa-template"][..],
    ] {
        let args = edit_args(bad);
        let (ok, out, err) =
            wabcast(&pool, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        assert!(!ok && !err.is_empty(), "{bad:?} was taken: {out}");
        assert_eq!(
            stored().await,
            Some(set.clone()),
            "{bad:?} changed the campaign"
        );
    }
    let args = edit_args(&["--no-wa-template"]);
    let (ok, out, err) = wabcast(&pool, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(ok && out.contains("send the text"), "{out}{err}");
    assert_eq!(stored().await, None);
}

/// `leads show`: what answers "I said STOP and still got a message". The number's opt-out, its
/// lead on each device (opted out on both), and every message to it with its campaign, device
/// and state; a campaign after the opt-out has none for it. Another tenant's lead with the same
/// number and its message do not appear; a malformed number is refused.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn leads_show_tells_a_numbers_story_to_its_tenant_only(pool: PgPool) {
    use shared::domain::LeadStatus;
    use std::time::Duration;
    let tenant = seed_tenant(&pool, "number@example.com").await;
    let other = seed_tenant(&pool, "number-other@example.com").await;
    let a = seed_device(&pool, tenant, "shop-a", 0.0, 0.0).await;
    let b = seed_device(&pool, tenant, "shop-b", 0.0, 0.0).await;
    let o = seed_device(&pool, other, "other-shop", 0.0, 0.0).await;
    // The first number is a lead of both devices, and of the other tenant.
    let phones = seed_leads(&pool, tenant, a, 0, 3, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, b, 0, 1, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, other, o, 0, 1, "cars", LeadStatus::Prospect).await;
    let first = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let others = seed_campaign(&pool, other, &CampaignSpec::default()).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.run_until_done(&[(tenant, first), (other, others)], Duration::from_secs(30))
        .await;
    assert_eq!(host.sends().len(), 5);
    let mut tx = pool.begin().await.unwrap();
    repo::leads::opt_out_lead(
        &mut tx,
        tenant,
        &phones[0],
        repo::leads::ConsentSource::Operator,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let after = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.run_until_done(&[(tenant, after)], Duration::from_secs(30))
        .await;
    assert_eq!(host.sends().len(), 7, "the two other leads only");

    let number = phones[0].as_str();
    // A name imported with a terminal escape sequence (one that sets the window title).
    sqlx::query("UPDATE leads SET name = $1 WHERE device_id = $2 AND phone = $3")
        .bind("\u{1b}]0;x\u{7}Ali")
        .bind(b)
        .bind(number)
        .execute(&pool)
        .await
        .unwrap();
    let (ok, out, err) = wabcast(
        &pool,
        &[
            "leads",
            "show",
            "--tenant",
            "number@example.com",
            "--phone",
            number,
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("{number}: on the opt-out list since ")),
        "{out}"
    );
    assert_eq!(lines[1], "times in Asia/Kuala_Lumpur", "{out}");
    let leads: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("shop-"))
        .collect();
    assert_eq!(leads.len(), 2, "{out}");
    for (l, label) in leads.iter().zip(["shop-a", "shop-b"]) {
        assert!(
            l.starts_with(label) && l.contains("prospect  cars"),
            "{out}"
        );
        // Its last column is the opt-out's local time, not "-".
        assert!(!l.trim_end().ends_with(" -"), "not shown opted out: {out}");
    }
    assert!(
        !out.contains('\u{1b}') && out.contains("\u{fffd}]0;x\u{fffd}Ali"),
        "the name's control characters reached the terminal: {out:?}"
    );
    assert!(out.contains("the newest 2 message(s):"), "{out}");
    let rows = repo::messages::list_campaign_messages(&pool, tenant, first)
        .await
        .unwrap();
    for m in rows.iter().filter(|m| m.recipient == number) {
        let line = lines
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("{} ", m.id)))
            .unwrap_or_else(|| panic!("message {} missing:\n{out}", m.id));
        assert!(
            line.contains(" sent ") && line.contains("accepted") && line.ends_with("test campaign"),
            "{line}"
        );
    }
    assert!(
        !out.contains("other-shop"),
        "another tenant's lead shown:\n{out}"
    );

    // A number with no lead, a malformed one, and the other tenant asking about its own.
    let (ok, out, _) = wabcast(
        &pool,
        &[
            "leads",
            "show",
            "--tenant",
            "number@example.com",
            "--phone",
            "+60199999999",
        ],
    )
    .await;
    assert!(
        ok && out.contains("not on the opt-out list") && out.contains("no lead has this number"),
        "{out}"
    );
    let (ok, _, err) = wabcast(
        &pool,
        &[
            "leads",
            "show",
            "--tenant",
            "number@example.com",
            "--phone",
            "12ab",
        ],
    )
    .await;
    assert!(!ok && err.contains("phone"), "{err}");
    let (ok, out, err) = wabcast(
        &pool,
        &[
            "leads",
            "show",
            "--tenant",
            "number-other@example.com",
            "--phone",
            number,
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("not on the opt-out list")
            && out.contains("other-shop")
            && out.contains("the newest 1 message(s):")
            && !out.contains("shop-a"),
        "{out}"
    );

    // Taken off the list by an operator (an opt-out made by mistake), and shown so; a second
    // time it is refused.
    let opt_in = [
        "leads",
        "opt-in",
        "--tenant",
        "number@example.com",
        "--phone",
        number,
    ];
    let (ok, out, err) = wabcast(&pool, &opt_in).await;
    assert!(ok && out.contains("2 lead(s)"), "{out}{err}");
    let (ok, out, err) = wabcast(&pool, &opt_in).await;
    assert!(
        !ok && err.contains("not on the tenant's opt-out list"),
        "{out}{err}"
    );
    let (ok, out, _) = wabcast(
        &pool,
        &[
            "leads",
            "show",
            "--tenant",
            "number@example.com",
            "--phone",
            number,
        ],
    )
    .await;
    let log: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("the opt-out list by"))
        .collect();
    assert!(
        ok && out.starts_with(&format!("{number}: not on the opt-out list")),
        "{out}"
    );
    assert_eq!(log.len(), 2, "{out}");
    assert!(
        log[0].ends_with("put on the opt-out list by an operator"),
        "{out}"
    );
    assert!(
        log[1].ends_with("taken off the opt-out list by an operator"),
        "{out}"
    );
}

/// `wabcast status | head -n 3`: the command ends quietly when its reader goes away. It panicked
/// ("failed printing to stdout: Broken pipe") with a backtrace. The output here (2,000 devices)
/// is far larger than the pipe holds, so the write after `head` has gone is certain.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn output_into_a_closed_pipe_ends_quietly(pool: PgPool) {
    use std::process::{Command, Stdio};
    let tenant = seed_tenant(&pool, "pipe@example.com").await;
    sqlx::query(
        "INSERT INTO devices (id, tenant_id, label, provider, min_delay_s, max_delay_s)
         SELECT gen_random_uuid(), $1, 'device-' || g, 'simulator', 1, 2
         FROM generate_series(1, 2000) g",
    )
    .bind(tenant)
    .execute(&pool)
    .await
    .unwrap();
    let db_name = database_url_of(&pool).await;
    let mut status = Command::new(built_binary("wabcast"))
        .arg("status")
        .env("DATABASE_URL", &db_name)
        .env("QUEUE_BACKEND", "redis")
        .env("QUEUE_PREFIX", format!("cli-pipe-{}", uuid::Uuid::new_v4()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let head = Command::new("head")
        .args(["-n", "3"])
        .stdin(status.stdout.take().unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&head.stdout).lines().count(), 3);
    let out = status.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "{:?}: {stderr}",
        out.status
    );
}

/// A sequence created without delays is paced like a campaign created without them (30 to 90
/// seconds between two sends of a device): its default was no gap at all, a drip sent in
/// bursts.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_sequence_without_delays_gets_the_campaigns_default_pacing(pool: PgPool) {
    seed_tenant(&pool, "seq-pace@example.com").await;
    let (ok, out, err) = wabcast(
        &pool,
        &[
            "sequence",
            "create",
            "--tenant",
            "seq-pace@example.com",
            "--name",
            "COLD",
            "--niche",
            "cars",
            "--trigger",
            "cold",
            "--time",
            "09:30",
            "--step",
            "0:Hi {name}",
            "--step",
            "2:Still there?",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let delays: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT c.min_delay_s, c.max_delay_s FROM campaigns c
         JOIN sequence_steps s ON s.campaign_id = c.id ORDER BY s.position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(delays, vec![(30.0, 90.0), (30.0, 90.0)]);
}

/// The message ids a `campaign messages` table lists (its lines that start with one), and its
/// closing line.
fn listed_ids(out: &str) -> (Vec<i64>, String) {
    let ids = out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let id = words.next()?.parse().ok()?;
            // The second column is the lead id ("10 shown" is no message line).
            words.next()?.parse::<i64>().ok()?;
            Some(id)
        })
        .collect();
    (ids, out.lines().last().unwrap_or_default().to_string())
}

/// `campaign messages`: every recipient's message with its state and why, filtered by state,
/// reason and device, in pages that together list each message once, and as CSV that a
/// spreadsheet opens without running a lead's name as a formula; a lead's name cannot send
/// escape sequences to the operator's terminal. Another tenant's campaign is not found and a
/// state that does not exist is refused, printing nothing.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn campaign_messages_lists_each_recipient_and_why(pool: PgPool) {
    use shared::domain::LeadStatus;
    use std::collections::BTreeSet;
    use std::time::Duration;
    let tenant = seed_tenant(&pool, "list@example.com").await;
    seed_tenant(&pool, "other@example.com").await;
    let north = seed_device(&pool, tenant, "north", 0.0, 0.0).await;
    let south = seed_device(&pool, tenant, "south", 0.0, 0.0).await;
    seed_leads(&pool, tenant, north, 0, 5, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, south, 10, 5, "cars", LeadStatus::Prospect).await;
    let formula = "=HYPERLINK(\"https://example.com\",\"win\")";
    for (phone, name) in [
        ("+601000000001", formula),
        ("+601000000002", "\u{1b}[31mRed"),
    ] {
        sqlx::query("UPDATE leads SET name = $1 WHERE tenant_id = $2 AND phone = $3")
            .bind(name)
            .bind(tenant)
            .bind(phone)
            .execute(&pool)
            .await
            .unwrap();
    }
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(
        &pool,
        SimConfig {
            not_on_whatsapp_rate: 0.4,
            ..quiet_sim()
        },
    )
    .await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    let rows = repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap();
    assert_eq!(rows.len(), 10);
    let ids_where = |keep: &dyn Fn(&repo::messages::MessageRow) -> bool| -> BTreeSet<i64> {
        rows.iter().filter(|r| keep(r)).map(|r| r.id).collect()
    };
    let all = ids_where(&|_| true);
    let skipped = ids_where(&|r| r.status == "skipped");
    let sent = ids_where(&|r| r.status == "sent");
    assert!(!skipped.is_empty() && !sent.is_empty(), "{rows:?}");
    assert!(rows.iter().all(|r| r.status == "sent"
        || (r.status == "skipped" && r.reason.as_deref() == Some("not_on_whatsapp"))));

    let c = campaign.to_string();
    let base = [
        "campaign",
        "messages",
        "--tenant",
        "list@example.com",
        "--campaign",
        &c,
    ];
    let list = |extra: Vec<String>| {
        let pool = pool.clone();
        let args: Vec<String> = base.iter().map(|s| s.to_string()).chain(extra).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            wabcast(&pool, &args).await
        }
    };

    // Everything: one line per message, with its number and state.
    let (ok, out, err) = list(vec![]).await;
    assert!(ok, "{out}{err}");
    let (ids, last) = listed_ids(&out);
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), all, "{out}");
    assert_eq!(ids.len(), 10, "{out}");
    assert_eq!(last, "10 shown", "{out}");
    for r in &rows {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&r.id.to_string()))
            .unwrap();
        assert!(
            line.contains(&r.recipient) && line.contains(&r.status),
            "{line}"
        );
    }
    assert!(
        !out.contains('\u{1b}'),
        "an escape sequence reached the terminal:\n{out}"
    );

    // Filters: state, reason, device.
    for (extra, want) in [
        (vec!["--status", "skipped"], skipped.clone()),
        (vec!["--reason", "not_on_whatsapp"], skipped.clone()),
        (vec!["--status", "SENT"], sent.clone()),
        (vec!["--status", "failed"], BTreeSet::new()),
        (
            vec!["--device", &north.to_string()],
            ids_where(&|r| r.device_id == north),
        ),
    ] {
        let (ok, out, err) = list(extra.iter().map(|s| s.to_string()).collect()).await;
        assert!(ok, "{extra:?}: {out}{err}");
        let (ids, last) = listed_ids(&out);
        assert_eq!(
            ids.into_iter().collect::<BTreeSet<_>>(),
            want,
            "{extra:?}: {out}"
        );
        if want.is_empty() {
            assert_eq!(last, "no message matches", "{out}");
        }
    }

    // Pages of three: each message once, in lead order, the last page saying nothing is left.
    let mut paged = Vec::new();
    let mut after = "0".to_string();
    for page in 0.. {
        assert!(page < 5, "the pages do not end: {paged:?}");
        let (ok, out, err) = list(vec![
            "--limit".into(),
            "3".into(),
            "--after".into(),
            after.clone(),
        ])
        .await;
        assert!(ok, "{out}{err}");
        let (ids, last) = listed_ids(&out);
        paged.extend(ids);
        match last.split("--after ").nth(1) {
            Some(next) => after = next.split_whitespace().next().unwrap().to_string(),
            None => {
                assert!(last.ends_with(" shown"), "{out}");
                break;
            }
        }
    }
    assert_eq!(paged.len(), 10, "{paged:?}");
    assert_eq!(paged.iter().copied().collect::<BTreeSet<_>>(), all);

    // CSV: a header and every message; the formula name is text; times are UTC instants.
    let (ok, out, err) = list(vec!["--csv".into()]).await;
    assert!(ok, "{out}{err}");
    let mut csv = csv::Reader::from_reader(out.as_bytes());
    let header: Vec<String> = csv.headers().unwrap().iter().map(String::from).collect();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let records: Vec<csv::StringRecord> = csv.records().map(|r| r.unwrap()).collect();
    assert_eq!(records.len(), 10, "{out}");
    let by_phone = |phone: &str| {
        records
            .iter()
            .find(|r| &r[col("phone")] == phone)
            .unwrap_or_else(|| panic!("no {phone}:\n{out}"))
    };
    assert_eq!(
        &by_phone("+601000000001")[col("name")],
        format!("'{formula}")
    );
    for r in &rows {
        let rec = by_phone(&r.recipient);
        assert_eq!(rec[col("message_id")].parse::<i64>().unwrap(), r.id);
        assert_eq!(&rec[col("status")], r.status);
        assert_eq!(Some(&rec[col("reason")]), r.reason.as_deref());
        let sent_at = &rec[col("sent_at")];
        let parsed = (!sent_at.is_empty()).then(|| {
            chrono::DateTime::parse_from_rfc3339(sent_at)
                .unwrap()
                .with_timezone(&chrono::Utc)
        });
        assert_eq!(parsed, r.sent_at, "{sent_at}");
    }

    // Refused, printing nothing: another tenant's campaign, a state or reason that is no word.
    for (args, says) in [
        (
            vec![
                "campaign",
                "messages",
                "--tenant",
                "other@example.com",
                "--campaign",
                &c,
            ],
            "not found",
        ),
        (
            [base.to_vec(), vec!["--status", "delivered"]].concat(),
            "pending",
        ),
        (
            [base.to_vec(), vec!["--reason", "x' OR '1'='1"]].concat(),
            "--reason",
        ),
        (
            [
                base.to_vec(),
                vec!["--device", &south.to_string().replace('-', "")[..8]],
            ]
            .concat(),
            "device",
        ),
    ] {
        let (ok, out, err) = wabcast(&pool, &args).await;
        assert!(!ok && out.is_empty(), "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// `sequence messages`: a step's messages, as `campaign messages` lists a campaign's, found by
/// the step's place; a step without messages yet lists none, a step that does not exist and
/// another tenant's sequence are refused.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn sequence_messages_lists_a_steps_recipients(pool: PgPool) {
    use shared::domain::LeadStatus;
    let tenant = seed_tenant(&pool, "drip@example.com").await;
    seed_tenant(&pool, "other@example.com").await;
    let d = seed_device(&pool, tenant, "north", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 6, "cars", LeadStatus::Prospect).await;
    sqlx::query("UPDATE leads SET triggers = ARRAY['cold'] WHERE tenant_id = $1")
        .bind(tenant)
        .execute(&pool)
        .await
        .unwrap();
    let (ok, out, err) = wabcast(
        &pool,
        &[
            "sequence",
            "create",
            "--tenant",
            "drip@example.com",
            "--name",
            "COLD",
            "--niche",
            "cars",
            "--trigger",
            "cold",
            "--time",
            "00:00",
            "--step",
            "0:Hi {name}",
            "--step",
            "2:Still there?",
            "--activate",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let seq = out.trim().to_string();
    // Step 1 at 00:00 of the enrollment day is due at once: the trigger writes its rows.
    let report = fan_out(&pool).await;
    assert_eq!(report.step_rows_created, 6, "{report:?} {out}");
    let step1: uuid::Uuid = sqlx::query_scalar(
        "SELECT campaign_id FROM sequence_steps WHERE sequence_id = $1::uuid AND position = 1",
    )
    .bind(&seq)
    .fetch_one(&pool)
    .await
    .unwrap();
    let want: Vec<i64> = repo::messages::list_campaign_messages(&pool, tenant, step1)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(want.len(), 6);

    let args = |tenant: &'static str, position: &'static str| {
        vec![
            "sequence".to_string(),
            "messages".into(),
            "--tenant".into(),
            tenant.into(),
            "--sequence".into(),
            seq.clone(),
            "--position".into(),
            position.into(),
        ]
    };
    let run = |args: Vec<String>| {
        let pool = pool.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            wabcast(&pool, &args).await
        }
    };
    let (ok, out, err) = run(args("drip@example.com", "1")).await;
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("COLD [active] step 1:"), "{out}");
    let (mut ids, last) = listed_ids(&out);
    ids.sort();
    assert_eq!(ids, want, "{out}");
    assert_eq!(last, "6 shown", "{out}");
    assert!(
        out.lines().filter(|l| l.contains(" pending ")).count() == 6,
        "{out}"
    );

    let (ok, out, err) = run(args("drip@example.com", "2")).await;
    assert!(ok, "{out}{err}");
    assert_eq!(listed_ids(&out).1, "no message matches", "{out}");

    for (tenant, position, says) in [
        ("drip@example.com", "3", "has no step 3"),
        ("other@example.com", "1", "not found"),
    ] {
        let (ok, out, err) = run(args(tenant, position)).await;
        assert!(!ok && out.is_empty(), "{tenant} {position}: {out}{err}");
        assert!(err.contains(says), "{err}");
    }
}

/// Every `--device` names a device by its label or by its id: the tenant's own device of that
/// label, never another tenant's of the same label or id; a deleted device by its id only, its
/// label passing to the device that takes it next. A name that is no device of the tenant is
/// refused and changes nothing.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_device_is_named_by_its_label_or_its_id(pool: PgPool) {
    use shared::domain::LeadStatus;
    use std::collections::BTreeSet;
    let tenant = seed_tenant(&pool, "label@example.com").await;
    let other = seed_tenant(&pool, "other@example.com").await;
    let north = seed_device(&pool, tenant, "north", 0.0, 0.0).await;
    let south = seed_device(&pool, tenant, "south", 0.0, 0.0).await;
    let theirs = seed_device(&pool, other, "north", 0.0, 0.0).await;
    seed_leads(&pool, tenant, north, 0, 3, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, south, 10, 3, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, other, theirs, 20, 3, "cars", LeadStatus::Prospect).await;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    seed_campaign(&pool, other, &CampaignSpec::default()).await;
    assert_eq!(fan_out(&pool).await.rows_created, 9);
    sqlx::query(
        "UPDATE broadcast_messages SET status = 'failed', reason = 'provider_error', \
         finished_at = now()",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Per device: how many of its messages are in each state.
    let states = || {
        let pool = pool.clone();
        async move {
            let rows: Vec<(uuid::Uuid, String, i64)> = sqlx::query_as(
                "SELECT device_id, status, count(*) FROM broadcast_messages \
                 GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.into_iter()
                .map(|(d, s, n)| ((d, s), n))
                .collect::<std::collections::BTreeMap<_, _>>()
        }
    };
    let c = campaign.to_string();
    let t = "label@example.com";
    let run = |args: Vec<String>| {
        let pool = pool.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            wabcast(&pool, &args).await
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // The listing: a label and an id name the same device.
    let south_rows: BTreeSet<i64> =
        sqlx::query_scalar("SELECT id FROM broadcast_messages WHERE device_id = $1")
            .bind(south)
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    for name in ["south".to_string(), south.to_string()] {
        let (ok, out, err) = run(args(&[
            "campaign",
            "messages",
            "--tenant",
            t,
            "--campaign",
            &c,
            "--device",
            &name,
        ]))
        .await;
        assert!(ok, "{name}: {out}{err}");
        let (ids, _) = listed_ids(&out);
        assert_eq!(
            ids.into_iter().collect::<BTreeSet<_>>(),
            south_rows,
            "{out}"
        );
    }

    // Refused, printing and changing nothing: another tenant's device by id, a label no device
    // of the tenant has, a label of the other tenant only.
    let before = states().await;
    let theirs_id = theirs.to_string();
    for name in [theirs_id.as_str(), "nowhere", "north\u{1b}[2J"] {
        for cmd in [
            args(&["device", "retry-failed", "--tenant", t, "--device", name]),
            args(&[
                "campaign",
                "retry-failed",
                "--tenant",
                t,
                "--campaign",
                &c,
                "--device",
                name,
            ]),
            args(&[
                "device",
                "safety",
                "--tenant",
                t,
                "--device",
                name,
                "--daily-cap",
                "1",
            ]),
            args(&["device", "delete", "--tenant", t, "--device", name]),
        ] {
            let (ok, out, err) = run(cmd.clone()).await;
            assert!(!ok && out.is_empty(), "{cmd:?}: {out}{err}");
            assert!(err.contains("no device"), "{cmd:?}: {err}");
            assert!(!err.contains('\u{1b}'), "{cmd:?}: {err}");
        }
    }
    let (ok, out, err) = run(args(&[
        "device",
        "retry-failed",
        "--tenant",
        "other@example.com",
        "--device",
        "south",
    ]))
    .await;
    assert!(!ok && err.contains("no device"), "{out}{err}");
    assert_eq!(states().await, before);

    // By label: north's failed messages of the campaign, then south's of every campaign; the
    // other tenant's device called north keeps its failures.
    let (ok, out, err) = run(args(&[
        "campaign",
        "retry-failed",
        "--tenant",
        t,
        "--campaign",
        &c,
        "--device",
        "north",
    ]))
    .await;
    assert!(ok && out.starts_with("3 failed"), "{out}{err}");
    let (ok, out, err) = run(args(&[
        "device",
        "retry-failed",
        "--tenant",
        t,
        "--device",
        "south",
    ]))
    .await;
    assert!(ok && out.starts_with("3 failed"), "{out}{err}");
    let after = states().await;
    for d in [north, south] {
        assert_eq!(
            after.get(&(d, "pending".to_string())),
            Some(&3),
            "{after:?}"
        );
        assert_eq!(after.get(&(d, "failed".to_string())), None, "{after:?}");
    }
    assert_eq!(
        after.get(&(theirs, "failed".to_string())),
        Some(&3),
        "{after:?}"
    );

    let cap = |d: uuid::Uuid, tenant: uuid::Uuid| {
        let pool = pool.clone();
        async move {
            repo::devices::get_safety_settings(&pool, tenant, d)
                .await
                .unwrap()
                .daily_cap
        }
    };
    let (ok, out, err) = run(args(&[
        "device",
        "safety",
        "--tenant",
        t,
        "--device",
        "north",
        "--daily-cap",
        "7",
    ]))
    .await;
    assert!(ok, "{out}{err}");
    assert_eq!(cap(north, tenant).await, Some(7));
    assert_eq!(cap(theirs, other).await, None);

    // A deleted device: its label is no longer its name, its id still is; a new device may take
    // the label and is then the one it names.
    let (ok, out, err) = run(args(&[
        "device", "delete", "--tenant", t, "--device", "south",
    ]))
    .await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(args(&[
        "device",
        "retry-failed",
        "--tenant",
        t,
        "--device",
        "south",
    ]))
    .await;
    assert!(!ok && err.contains("no device"), "{out}{err}");
    let (ok, out, err) = run(args(&[
        "device",
        "retry-failed",
        "--tenant",
        t,
        "--device",
        &south.to_string(),
    ]))
    .await;
    assert!(ok && out.starts_with("0 failed"), "{out}{err}");
    let (ok, out, err) = run(args(&["device", "add", "--tenant", t, "--label", "south"])).await;
    assert!(ok, "{out}{err}");
    let new_south: uuid::Uuid = out.trim().parse().unwrap();
    let (ok, out, err) = run(args(&[
        "device",
        "safety",
        "--tenant",
        t,
        "--device",
        "south",
        "--daily-cap",
        "5",
    ]))
    .await;
    assert!(ok, "{out}{err}");
    assert_eq!(cap(new_south, tenant).await, Some(5));
    let old_cap: Option<i32> = sqlx::query_scalar("SELECT daily_cap FROM devices WHERE id = $1")
        .bind(south)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(old_cap, None);
}

/// `device edit`: a device renamed is named by its new label (and no longer by the old one),
/// and a raised delay floor paces its next claim at once, whatever the campaign asks. A label
/// another device has, a range upside down, a label with a control character, another
/// tenant's device and an edit of nothing are refused and change nothing.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn device_edit_renames_a_device_and_raises_its_floor(pool: PgPool) {
    use shared::domain::LeadStatus;
    let tenant = seed_tenant(&pool, "edit@example.com").await;
    let other = seed_tenant(&pool, "other@example.com").await;
    let shop = seed_device(&pool, tenant, "shop-1", 0.0, 0.0).await;
    seed_device(&pool, tenant, "shop-2", 0.0, 0.0).await;
    seed_device(&pool, other, "theirs", 0.0, 0.0).await;
    seed_leads(&pool, tenant, shop, 0, 3, "cars", LeadStatus::Prospect).await;
    let t = "edit@example.com";
    let run = |a: &[&str]| {
        let pool = pool.clone();
        let args: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            wabcast(&pool, &args).await
        }
    };
    let devices = || {
        let pool = pool.clone();
        async move {
            let rows: Vec<(uuid::Uuid, String, f64, f64)> = sqlx::query_as(
                "SELECT id, label, min_delay_s, max_delay_s FROM devices ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            rows
        }
    };

    let before = devices().await;
    for (args, says) in [
        (
            vec!["--device", "shop-1", "--label", "shop-2"],
            "already has a device labelled",
        ),
        (
            vec!["--device", "shop-1", "--label", "a\u{7}b"],
            "control character",
        ),
        (vec!["--device", "shop-1", "--label", "  "], "empty"),
        (
            vec!["--device", "shop-1", "--min-delay", "9", "--max-delay", "3"],
            "min <= max",
        ),
        (vec!["--device", "theirs", "--label", "mine"], "no device"),
        (vec!["--device", "shop-1"], "nothing to change"),
        (
            vec!["--device", "shop-1", "--min-delay", "9"],
            "--max-delay",
        ),
    ] {
        let cmd = [vec!["device", "edit", "--tenant", t], args].concat();
        let (ok, out, err) = run(&cmd).await;
        assert!(!ok && out.is_empty(), "{cmd:?}: {out}{err}");
        assert!(err.contains(says), "{cmd:?}: {err}");
    }
    assert_eq!(devices().await, before);

    let (ok, out, err) = run(&[
        "device",
        "edit",
        "--tenant",
        t,
        "--device",
        "shop-1",
        "--label",
        " Ali's phone ",
        "--min-delay",
        "60",
        "--max-delay",
        "90",
    ])
    .await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("label Ali's phone, delay floor 60.0-90.0 s"),
        "{out}"
    );
    let (ok, out, err) = run(&["device", "list", "--tenant", t]).await;
    assert!(
        ok && out.contains("Ali's phone") && !out.contains("shop-1"),
        "{out}{err}"
    );
    let (ok, out, err) = run(&[
        "device",
        "retry-failed",
        "--tenant",
        t,
        "--device",
        "shop-1",
    ])
    .await;
    assert!(!ok && err.contains("no device"), "{out}{err}");
    let (ok, out, err) = run(&[
        "device",
        "retry-failed",
        "--tenant",
        t,
        "--device",
        "Ali's phone",
    ])
    .await;
    assert!(ok, "{out}{err}");

    // The campaign asks for no gap at all; the device's new floor of 60-90 s holds its next
    // claim: one message goes out now, the cursor moves 60-90 s on, the others wait.
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    assert_eq!(p.trigger().await.rows_created, 3);
    for _ in 0..5 {
        p.tick().await;
    }
    let counts = status_counts(&pool, tenant, campaign).await;
    assert_eq!(counts.get("queued"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("pending"), Some(&2), "{counts:?}");
    let (gap,): (f64,) = sqlx::query_as(
        "SELECT extract(epoch FROM d.next_send_at - m.queued_at)::float8
         FROM devices d JOIN broadcast_messages m ON m.device_id = d.id
         WHERE d.id = $1 AND m.status = 'queued'",
    )
    .bind(shop)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!((60.0..=90.5).contains(&gap), "gap {gap}");

    // The campaign's progress says what pacing alone still needs: the cursor (60-90 s), then
    // two more mean gaps of 75 s.
    let c = campaign.to_string();
    let (ok, out, err) = run(&["campaign", "progress", "--tenant", t, "--campaign", &c]).await;
    assert!(ok, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("pacing alone needs at least "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("(its busiest device, Ali's phone: 3 unsent at a mean gap of 75 s)"),
        "{line}"
    );
    let least = line["pacing alone needs at least ".len()..]
        .split(" more")
        .next()
        .unwrap();
    let (m, rest) = least.split_once("m ").unwrap_or_else(|| panic!("{line}"));
    let secs = m.parse::<u64>().unwrap() * 60 + rest.trim_end_matches('s').parse::<u64>().unwrap();
    assert!((205..=241).contains(&secs), "{line}");
}

/// `campaign list`: the tenant's own campaigns, newest first, due times in its local time (as
/// it typed them), filtered by state; another tenant's campaigns are not listed.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn campaign_list_shows_a_tenants_campaigns_in_its_local_time(pool: PgPool) {
    use shared::domain::LeadStatus;
    let tenant = seed_tenant(&pool, "camps@example.com").await;
    let other = seed_tenant(&pool, "other@example.com").await;
    let d = seed_device(&pool, tenant, "north", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 2, "cars", LeadStatus::Prospect).await;
    let running = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let theirs = seed_campaign(&pool, other, &CampaignSpec::default()).await;
    fan_out(&pool).await;
    // Kuala Lumpur keeps +08:00 all year.
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
        .date_naive()
        .to_string();
    let (ok, out, err) = wabcast(
        &pool,
        &[
            "campaign",
            "create",
            "--tenant",
            "camps@example.com",
            "--title",
            "Raya\u{1b}]0;x",
            "--template",
            "Hi",
            "--niche",
            "cars",
            "--date",
            &tomorrow,
            "--time",
            "09:30",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let scheduled = out.trim().to_string();

    let base = ["campaign", "list", "--tenant", "camps@example.com"];
    let list = async |extra: &[&str]| wabcast_args(&pool, &base, extra).await;
    let ids = |out: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| w.parse::<uuid::Uuid>().is_ok())
            .map(String::from)
            .collect()
    };
    let (ok, out, err) = list(&[]).await;
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("times in Asia/Kuala_Lumpur"), "{out}");
    assert_eq!(
        ids(&out),
        vec![scheduled.clone(), running.to_string()],
        "{out}"
    );
    assert!(!out.contains(&theirs.to_string()), "{out}");
    let line = out.lines().find(|l| l.starts_with(&scheduled)).unwrap();
    assert!(line.contains(&format!("{tomorrow} 09:30")), "{line}");
    assert!(!out.contains('\u{1b}'), "{out}");

    let (ok, out, err) = list(&["--status", "running"]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(ids(&out), vec![running.to_string()], "{out}");
    let (ok, out, err) = list(&["--status", "scheduled"]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(ids(&out), vec![scheduled], "{out}");
    let (ok, out, err) = list(&["--status", "sent"]).await;
    assert!(!ok && out.is_empty(), "{out}{err}");
}

/// A lead as stored: phone, id, name, niches, status, triggers, opted out.
type StoredLead = (String, i64, String, Vec<String>, String, Vec<String>, bool);

/// `leads list`: a tenant's leads, filtered by device (label or id), niche, status and opt-out,
/// in pages that list each lead once; its CSV imports back unchanged (a formula-looking name
/// included), and an edited copy updates the leads it names. A deleted device's leads show
/// only when that device is asked for; another tenant sees none of them.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn leads_list_filters_pages_and_imports_back(pool: PgPool) {
    use std::collections::{BTreeMap, BTreeSet};
    let tenant = seed_tenant(&pool, "book@example.com").await;
    seed_tenant(&pool, "other@example.com").await;
    seed_device(&pool, tenant, "+north", 0.0, 0.0).await;
    let south = seed_device(&pool, tenant, "south", 0.0, 0.0).await;
    let gone = seed_device(&pool, tenant, "gone", 0.0, 0.0).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("leads.csv");
    std::fs::write(
        &file,
        "device,name,phone,niches,status,triggers\n\
         +north,Ali,+60100000001,cars|loans,prospect,cold\n\
         +north,\"=HYPERLINK(\"\"https://x\"\")\",+60100000002,cars,customer,\n\
         +north,'=typed,+60100000003,loans,prospect,\n\
         south,Bo,+60100000004,cars,customer,warm|hot\n\
         south,,+60100000005,boats,prospect,\n\
         gone,Cy,+60100000006,cars,prospect,\n",
    )
    .unwrap();
    let t = "book@example.com";
    let run = |a: Vec<String>| {
        let pool = pool.clone();
        async move {
            let args: Vec<&str> = a.iter().map(String::as_str).collect();
            wabcast(&pool, &args).await
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let path = file.to_str().unwrap().to_string();
    let (ok, out, err) = run(args(&["leads", "import", "--tenant", t, "--file", &path])).await;
    assert!(ok && out.starts_with("6 lead(s) imported"), "{out}{err}");
    let (ok, out, err) = run(args(&[
        "device", "delete", "--tenant", t, "--device", "gone",
    ]))
    .await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(args(&[
        "leads",
        "opt-out",
        "--tenant",
        t,
        "--phone",
        "+60100000004",
    ]))
    .await;
    assert!(ok, "{out}{err}");

    // Lead id by phone, and the leads as stored.
    let stored = || {
        let pool = pool.clone();
        async move {
            let rows: Vec<StoredLead> = sqlx::query_as(
                "SELECT phone, id, name, niches, target_status, triggers,
                            opted_out_at IS NOT NULL
                     FROM leads WHERE tenant_id = $1 ORDER BY phone",
            )
            .bind(tenant)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.into_iter()
                .map(|r| (r.0.clone(), r))
                .collect::<BTreeMap<_, _>>()
        }
    };
    let before = stored().await;
    let id = |phone: &str| before[phone].1;
    let ids_of = |phones: &[&str]| phones.iter().map(|p| id(p)).collect::<BTreeSet<_>>();
    // The lead ids a table lists: its lines that start with one ("5 shown" is no lead).
    let listed = |out: &str| -> Vec<i64> {
        out.lines()
            .filter(|l| !l.contains(" shown"))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    };
    // A name typed as a spreadsheet shows text (`'=…`) is stored as the text.
    assert_eq!(before["+60100000003"].2, "=typed");

    let base = ["leads", "list", "--tenant", t];
    let live = [
        "+60100000001",
        "+60100000002",
        "+60100000003",
        "+60100000004",
        "+60100000005",
    ];
    for (extra, want) in [
        (vec![], ids_of(&live)),
        (
            vec!["--device", "south"],
            ids_of(&["+60100000004", "+60100000005"]),
        ),
        (
            vec!["--device", &south.to_string()],
            ids_of(&["+60100000004", "+60100000005"]),
        ),
        (
            vec!["--device", &gone.to_string()],
            ids_of(&["+60100000006"]),
        ),
        (
            vec!["--niche", "loans"],
            ids_of(&["+60100000001", "+60100000003"]),
        ),
        (vec!["--niche", "car"], BTreeSet::new()),
        (
            vec!["--status", "customer"],
            ids_of(&["+60100000002", "+60100000004"]),
        ),
        (vec!["--opted-out", "true"], ids_of(&["+60100000004"])),
        (
            vec!["--opted-out", "false", "--niche", "cars"],
            ids_of(&["+60100000001", "+60100000002"]),
        ),
    ] {
        let (ok, out, err) = run([args(&base), args(&extra)].concat()).await;
        assert!(ok, "{extra:?}: {out}{err}");
        let got = listed(&out);
        assert_eq!(got.len(), want.len(), "{extra:?}: {out}");
        assert_eq!(
            got.into_iter().collect::<BTreeSet<_>>(),
            want,
            "{extra:?}: {out}"
        );
        if want.is_empty() {
            assert!(out.trim_end().ends_with("no lead matches"), "{out}");
        }
    }
    let (ok, out, _) = run(args(&base)).await;
    assert!(ok && !out.contains('\u{1b}'));
    assert!(
        out.contains(&format!("{:>9} south", id("+60100000004"))),
        "{out}"
    );

    // Pages of two: every live lead once, in id order.
    let mut paged = Vec::new();
    let mut after = "0".to_string();
    for page in 0.. {
        assert!(page < 5, "the pages do not end: {paged:?}");
        let (ok, out, err) =
            run([args(&base), args(&["--limit", "2", "--after", &after])].concat()).await;
        assert!(ok, "{out}{err}");
        paged.extend(listed(&out));
        match out.lines().last().unwrap().split("--after ").nth(1) {
            Some(next) => after = next.split_whitespace().next().unwrap().to_string(),
            None => break,
        }
    }
    let mut want: Vec<i64> = ids_of(&live).into_iter().collect();
    want.sort();
    assert_eq!(paged, want);

    // The CSV: the import's columns first, the formula quoted; imported back, nothing changes.
    let (ok, csv_out, err) = run([args(&base), args(&["--csv"])].concat()).await;
    assert!(ok, "{err}");
    assert!(
        csv_out.starts_with("device,name,phone,niches,status,triggers,lead_id,"),
        "{csv_out}"
    );
    assert!(csv_out.contains("\"'=HYPERLINK("), "{csv_out}");
    assert!(
        csv_out.contains("'+north,'=typed,+60100000003"),
        "{csv_out}"
    );
    assert!(
        csv_out.contains("south,Bo,+60100000004,cars,customer,hot|warm"),
        "{csv_out}"
    );
    assert_eq!(csv_out.lines().count(), 6, "{csv_out}");
    std::fs::write(&file, &csv_out).unwrap();
    let (ok, out, err) = run(args(&["leads", "import", "--tenant", t, "--file", &path])).await;
    assert!(
        ok && out.starts_with("0 lead(s) imported, 5 updated"),
        "{out}{err}"
    );
    assert_eq!(stored().await, before);
    // An edited copy: a new name and niche for one lead.
    std::fs::write(
        &file,
        csv_out.replace(
            "'+north,Ali,+60100000001,cars|loans",
            "'+north,Ali Baba,+60100000001,cars|vip",
        ),
    )
    .unwrap();
    let (ok, out, err) = run(args(&["leads", "import", "--tenant", t, "--file", &path])).await;
    assert!(ok, "{out}{err}");
    let after_edit = stored().await;
    assert_eq!(after_edit["+60100000001"].2, "Ali Baba");
    assert_eq!(after_edit["+60100000001"].3, vec!["cars", "vip"]);
    assert_eq!(after_edit["+60100000002"], before["+60100000002"]);

    // Refused: another tenant's device name, a niche that is no token, a negative cursor.
    for (extra, who, says) in [
        (vec!["--device", "+north"], "other@example.com", "no device"),
        (vec!["--niche", "car$"], t, "token"),
        (vec!["--after=-1"], t, "--after"),
    ] {
        let cmd = [args(&["leads", "list", "--tenant", who]), args(&extra)].concat();
        let (ok, out, err) = run(cmd.clone()).await;
        assert!(!ok && out.is_empty(), "{cmd:?}: {out}{err}");
        assert!(err.contains(says), "{cmd:?}: {err}");
    }
    let (ok, out, err) = run(args(&["leads", "list", "--tenant", "other@example.com"])).await;
    assert!(
        ok && out.trim_end().ends_with("no lead matches"),
        "{out}{err}"
    );
}

/// `campaign create --dry-run`: everything is checked as for a real campaign, the message is
/// shown as the first leads would get it (spintax drawn, an empty name's fallback), and nothing
/// is created, not even the image.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_dry_run_shows_the_message_and_creates_nothing(pool: PgPool) {
    use shared::domain::LeadStatus;
    let tenant = seed_tenant(&pool, "dry@example.com").await;
    let d = seed_device(&pool, tenant, "north", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 4, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, d, 10, 2, "boats", LeadStatus::Prospect).await;
    sqlx::query("UPDATE leads SET name = CASE WHEN phone = '+601000000000' THEN '' ELSE 'Ali' END")
        .execute(&pool)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("promo.png");
    let fake = dir.path().join("promo.txt");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    std::fs::write(&fake, b"not an image").unwrap();
    let base = [
        "campaign",
        "create",
        "--tenant",
        "dry@example.com",
        "--title",
        "Promo",
        "--niche",
        "cars",
    ];
    let create = async |extra: &[&str]| wabcast_args(&pool, &base, extra).await;
    let image = format!("@{}", png.display());
    let hi = "{Hi|Hello} {name:there}!";
    let (ok, out, err) = create(&["--template", hi, "--image", &image, "--dry-run"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("dry run: nothing was created"), "{out}");
    assert!(
        out.contains("4 lead(s) on 1 device(s) match it now"),
        "{out}"
    );
    let samples: Vec<&str> = out.lines().filter(|l| l.starts_with("to +")).collect();
    assert_eq!(samples.len(), 3, "{out}");
    assert!(
        samples[0].starts_with("to +601000000000 (no name, via north): ")
            && (samples[0].ends_with(": Hi there!") || samples[0].ends_with(": Hello there!")),
        "{out}"
    );
    for l in &samples[1..] {
        assert!(
            l.ends_with(": Hi Ali!") || l.ends_with(": Hello Ali!"),
            "{l}"
        );
    }
    let (ok, out, err) = create(&["--template", hi, "--dry-run", "10"]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("to +")).count(),
        4,
        "{out}"
    );
    let (ok, out, err) = create(&[
        "--template",
        hi,
        "--wa-template",
        "promo:ms",
        "--wa-template-param",
        "{name:friend}",
        "--dry-run",
        "1",
    ])
    .await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(
            "  (a Cloud API device sends the template promo:ms with [\"friend\"] instead)"
        ),
        "{out}"
    );

    // Checked as a real campaign is: a fake image, a template that does not parse.
    let fake = format!("@{}", fake.display());
    for (extra, says) in [
        (
            vec!["--template", hi, "--image", fake.as_str(), "--dry-run"],
            "not a JPEG, PNG or WebP",
        ),
        (vec!["--template", "{Hi|Hello", "--dry-run"], "template"),
    ] {
        let (ok, out, err) = create(&extra).await;
        assert!(!ok && out.is_empty(), "{extra:?}: {out}{err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    let (campaigns, media): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM campaigns), (SELECT count(*) FROM media)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((campaigns, media), (0, 0));
}

/// `sequence report` of an active sequence ends, as `campaign progress` does, with the least
/// time pacing still needs for what its due steps have left, at the sequence's delays; a
/// paused one says that nothing of it is sent until it resumes.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn sequence_report_says_what_pacing_still_needs(pool: PgPool) {
    use shared::domain::LeadStatus;
    let tenant = seed_tenant(&pool, "drip@example.com").await;
    let d = seed_device(&pool, tenant, "drip-1", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 3, "cars", LeadStatus::Prospect).await;
    sqlx::query("UPDATE leads SET triggers = '{cold}' WHERE tenant_id = $1")
        .bind(tenant)
        .execute(&pool)
        .await
        .unwrap();
    let t = "drip@example.com";
    // Midnight local: the first step is due whenever the test runs.
    let (ok, out, err) = wabcast(
        &pool,
        &[
            "sequence",
            "create",
            "--tenant",
            t,
            "--name",
            "COLD",
            "--niche",
            "cars",
            "--trigger",
            "cold",
            "--time",
            "00:00",
            "--min-delay",
            "60",
            "--max-delay",
            "90",
            "--step",
            "0:Hi {first_name:there}",
            "--step",
            "2:Still there?",
            "--activate",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let seq = out.trim().lines().last().unwrap().to_string();
    let report = |pool: PgPool, seq: String| async move {
        let (ok, out, err) = wabcast(
            &pool,
            &["sequence", "report", "--tenant", t, "--sequence", &seq],
        )
        .await;
        assert!(ok, "{out}{err}");
        out
    };
    let out = report(pool.clone(), seq.clone()).await;
    assert!(!out.contains("pacing alone"), "nothing written yet: {out}");

    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.trigger().await;
    for _ in 0..5 {
        p.tick().await;
    }
    // One message out, its cursor 60-90 s on, two more at a mean gap of 75 s.
    let out = report(pool.clone(), seq.clone()).await;
    let line = out
        .lines()
        .find(|l| l.starts_with("pacing alone needs at least "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("(its busiest device, drip-1: 3 unsent at a mean gap of 75 s)"),
        "{line}"
    );

    let (ok, out, err) = wabcast(
        &pool,
        &["sequence", "pause", "--tenant", t, "--sequence", &seq],
    )
    .await;
    assert!(ok, "{out}{err}");
    let out = report(pool.clone(), seq.clone()).await;
    assert!(!out.contains("pacing alone"), "{out}");
    assert!(
        out.contains("paused: nothing of it is sent until it resumes"),
        "{out}"
    );
}

/// `sequence create --stop-on-reply` and `sequence set --stop-on-reply true|false`: what the
/// list shows; another tenant's sequence is not found, and a bad value is refused.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_sequence_is_told_to_stop_on_a_reply_or_go_on(pool: PgPool) {
    seed_tenant(&pool, "reply@example.com").await;
    seed_tenant(&pool, "other@example.com").await;
    let create = |t: &'static str, extra: &'static [&'static str]| {
        let pool = pool.clone();
        async move {
            let base = [
                "sequence",
                "create",
                "--tenant",
                t,
                "--name",
                "COLD",
                "--niche",
                "cars",
                "--trigger",
                "cold",
                "--time",
                "09:00",
                "--step",
                "0:Hi",
            ];
            let (ok, out, err) = wabcast_args(&pool, &base, extra).await;
            assert!(ok, "{out}{err}");
            out.trim().to_string()
        }
    };
    let mine = create("reply@example.com", &["--stop-on-reply"]).await;
    let theirs = create("other@example.com", &[]).await;
    let list = || {
        let pool = pool.clone();
        async move {
            let (ok, out, err) = wabcast(
                &pool,
                &["sequence", "list", "--tenant", "reply@example.com"],
            )
            .await;
            assert!(ok, "{out}{err}");
            out
        }
    };
    let line = |out: &str, id: &str| out.lines().find(|l| l.starts_with(id)).unwrap().to_string();
    assert!(
        line(&list().await, &mine).contains(" stops "),
        "{}",
        list().await
    );
    let set = |seq: String, value: &'static str| {
        let pool = pool.clone();
        async move {
            wabcast(
                &pool,
                &[
                    "sequence",
                    "set",
                    "--tenant",
                    "reply@example.com",
                    "--sequence",
                    &seq,
                    "--stop-on-reply",
                    value,
                ],
            )
            .await
        }
    };
    let (ok, out, err) = set(mine.clone(), "false").await;
    assert!(ok && out.contains("changes nothing"), "{out}{err}");
    assert!(line(&list().await, &mine).contains(" goes on "));
    let (ok, out, err) = set(theirs.clone(), "true").await;
    assert!(!ok && err.contains("sequence not found"), "{out}{err}");
    let (ok, out, err) = set(mine.clone(), "maybe").await;
    assert!(!ok && err.contains("maybe"), "{out}{err}");
    let stops: Vec<bool> = sqlx::query_scalar("SELECT stop_on_reply FROM sequences ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(stops, [false, false], "{mine} {theirs}");
}

/// A label written before labels were checked (or by hand in the database) may hold a
/// terminal's escape sequence: every listing prints it with `�` in its place, never raw.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_old_label_with_an_escape_sequence_prints_harmless(pool: PgPool) {
    let tenant = seed_tenant(&pool, "escape@example.com").await;
    let d = seed_device(&pool, tenant, "shop", 0.0, 0.0).await;
    sqlx::query("UPDATE devices SET label = $2 WHERE id = $1")
        .bind(d)
        .bind("shop\u{1b}[2J")
        .execute(&pool)
        .await
        .unwrap();
    for args in [
        vec!["device", "list", "--tenant", "escape@example.com"],
        vec!["status", "--tenant", "escape@example.com"],
    ] {
        let (ok, out, err) = wabcast(&pool, &args).await;
        assert!(ok, "{args:?}: {out}{err}");
        assert!(!out.contains('\u{1b}'), "{args:?}: {out:?}");
        assert!(out.contains("shop\u{fffd}[2J"), "{args:?}: {out}");
    }
}
