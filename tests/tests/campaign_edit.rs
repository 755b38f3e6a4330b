//! Editing a campaign: before it starts, every part of it, and the fan-out uses the edit; once
//! it runs, its text, image and delays, with the unsent rows re-rendered at once and the sent
//! ones left as they went out; never its schedule once started, never once finished, never
//! a sequence's step (edited through the sequence), never another tenant's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::domain::{DelayRange, LeadStatus};
use shared::repo::{self, campaigns::CampaignEdit, RepoError};
use sqlx::PgPool;
use std::time::Duration;
use wabcast_tests::*;

async fn edit(
    pool: &PgPool,
    tenant: uuid::Uuid,
    campaign: uuid::Uuid,
    e: &CampaignEdit<'_>,
) -> Result<(repo::campaigns::Campaign, u64), RepoError> {
    let mut tx = pool.begin().await.unwrap();
    let c = repo::campaigns::update_campaign(&mut tx, tenant, campaign, e).await?;
    let parsed = shared::render::Template::parse(&c.template).unwrap();
    let n = repo::messages::rerender_unsent_messages(
        &mut tx,
        tenant,
        campaign,
        &parsed,
        c.image.as_deref(),
    )
    .await?;
    tx.commit().await.unwrap();
    Ok((c, n))
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_campaign_is_edited_whole_before_it_starts_and_its_unsent_rows_after(pool: PgPool) {
    let tenant = seed_tenant(&pool, "edit@example.com").await;
    let other = seed_tenant(&pool, "edit-other@example.com").await;
    let device = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(&pool, tenant, device, 0, 6, "cars", LeadStatus::Prospect).await;
    let running = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let later = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);

    // Not started: everything changes, and the trigger leaves it alone until its new time.
    let (c, _) = edit(
        &pool,
        tenant,
        later,
        &CampaignEdit {
            title: Some("  Later  "),
            template: Some("Later {name}"),
            scheduled_at: Some(in_an_hour),
            delay: Some(DelayRange::new(0.0, 0.0).unwrap()),
            ..CampaignEdit::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (c.title.as_str(), c.template.as_str(), c.status.as_str()),
        ("Later", "Later {name}", "scheduled")
    );
    assert_eq!(c.scheduled_at.timestamp(), in_an_hour.timestamp());

    // Started, two rows already gone out: the four unsent are re-rendered, the two sent are not.
    fan_out(&pool).await;
    assert_eq!(
        repo::messages::list_campaign_messages(&pool, tenant, later)
            .await
            .unwrap()
            .len(),
        0,
        "not due yet"
    );
    sqlx::query(
        "UPDATE broadcast_messages SET status = 'sent', reason = 'accepted', sent_at = now(), finished_at = now()
         WHERE id IN (SELECT id FROM broadcast_messages WHERE campaign_id = $1 ORDER BY id LIMIT 2)",
    )
    .bind(running)
    .execute(&pool)
    .await
    .unwrap();
    let image = seed_image(&pool, tenant, shared::media::TINY_PNG).await;
    let (c, rendered) = edit(
        &pool,
        tenant,
        running,
        &CampaignEdit {
            template: Some("Edited {name}"),
            image: Some(&image),
            ..CampaignEdit::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((c.status.as_str(), rendered), ("running", 4));
    let rows = repo::messages::list_campaign_messages(&pool, tenant, running)
        .await
        .unwrap();
    for r in &rows {
        let edited = r.body.starts_with("Edited ") && r.image.as_deref() == Some(image.as_str());
        assert_eq!(edited, r.status == "pending", "{r:?}");
    }
    // Its schedule can no longer change; another tenant cannot touch it at all.
    let reschedule = CampaignEdit {
        scheduled_at: Some(in_an_hour),
        ..CampaignEdit::default()
    };
    let err = edit(&pool, tenant, running, &reschedule).await.unwrap_err();
    assert!(
        matches!(&err, RepoError::Conflict(m) if m.contains("can no longer change")),
        "{err}"
    );
    let retitle = CampaignEdit {
        title: Some("mine now"),
        ..CampaignEdit::default()
    };
    assert!(matches!(
        edit(&pool, other, running, &retitle).await,
        Err(RepoError::NotFound(_))
    ));
    assert!(matches!(
        edit(
            &pool,
            tenant,
            running,
            &CampaignEdit {
                title: Some(" "),
                ..CampaignEdit::default()
            }
        )
        .await,
        Err(RepoError::Invalid(_))
    ));

    // What goes out is the edit: the running campaign's four, then the later one's six once
    // it is brought forward.
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.run_until_done(&[(tenant, running)], Duration::from_secs(30))
        .await;
    let now = CampaignEdit {
        scheduled_at: Some(chrono::Utc::now()),
        ..CampaignEdit::default()
    };
    edit(&pool, tenant, later, &now).await.unwrap();
    p.run_until_done(&[(tenant, later)], Duration::from_secs(30))
        .await;
    let sends = host.sends();
    assert_eq!(sends.len(), 10);
    let edited = sends
        .iter()
        .filter(|s| s.text.starts_with("Edited "))
        .count();
    let later_sent = sends
        .iter()
        .filter(|s| s.text.starts_with("Later "))
        .count();
    assert_eq!((edited, later_sent), (4, 6));
    assert!(sends
        .iter()
        .filter(|s| s.text.starts_with("Edited "))
        .all(|s| s.image.is_some()));

    // Finished: nothing left to edit.
    let err = edit(&pool, tenant, running, &retitle).await.unwrap_err();
    assert!(
        matches!(&err, RepoError::Conflict(m) if m.contains("completed")),
        "{err}"
    );
}
