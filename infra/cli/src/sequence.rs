//! `wabcast sequence …`: create, list, activate, pause, resume, cancel sequences, enroll leads,
//! edit a step (its unsent messages are re-rendered at once), retry a step's failures, the
//! report per step, and a step's messages one by one.

use crate::{print_report, resolve_tenant, store_image};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use shared::domain::{DelayRange, PhoneE164, SequenceStatus, TargetStatus, Token};
use shared::repo;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Subcommand)]
pub enum SequenceCmd {
    /// Create a sequence (draft unless --activate). Steps: --step "DAYS:template", in order.
    Create {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        /// The niche token a lead must have (exact match, not a substring).
        #[arg(long)]
        niche: String,
        /// prospect | customer | all
        #[arg(long, default_value = "all")]
        target: String,
        /// The lead trigger token that enrolls a lead (consumed on enrollment).
        #[arg(long)]
        trigger: String,
        /// Local time of day (tenant's zone) at which steps go out, HH:MM.
        #[arg(long)]
        time: chrono::NaiveTime,
        /// `DAYS:template`: the step's day offset from enrollment and its text; repeat in order.
        #[arg(long = "step", required = true, allow_hyphen_values = true)]
        steps: Vec<String>,
        /// Image for every step (https URL, data: URL or @file).
        #[arg(long)]
        image: Option<String>,
        /// Trigger added to the lead when it finishes (enrolls it in the next sequence).
        #[arg(long)]
        next_trigger: Option<String>,
        /// Gap between two sends of one device, seconds: drawn uniformly in [min, max], never
        /// below the device's own floor. The defaults are `campaign create`'s: a drip sent
        /// without gaps (the old default of 0) goes out in bursts, which is how numbers get banned.
        #[arg(long, default_value_t = 30.0)]
        min_delay: f64,
        #[arg(long, default_value_t = 90.0)]
        max_delay: f64,
        /// Start it at once instead of leaving it a draft.
        #[arg(long)]
        activate: bool,
        /// End a lead's enrollment when the lead writes back (any message to any of the
        /// tenant's devices that is not an opt-out): its next steps are not sent
        /// (`skipped / lead_replied`) and no next trigger is added. Off unless given.
        #[arg(long)]
        stop_on_reply: bool,
    },
    /// Change a sequence's settings.
    Set {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
        /// Whether a lead's reply ends its enrollment (see `create --stop-on-reply`); from now
        /// on, for every open enrollment: `--stop-on-reply true` or `false`.
        #[arg(long, action = clap::ArgAction::Set)]
        stop_on_reply: bool,
    },
    /// A tenant's sequences: id, status, time of day, trigger, next trigger, name.
    List {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
    },
    /// Start a draft sequence: it enrolls leads from the next trigger run.
    Activate {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
    },
    /// Hold a sequence: no new enrollments or steps, and its unsent messages wait.
    Pause {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
    },
    /// Continue a paused sequence: what fell due meanwhile is sent, paced.
    Resume {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
    },
    /// Cancel a sequence: its unsent messages end cancelled (sequence_cancelled).
    Cancel {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
    },
    /// Enroll the tenant's leads with this phone number explicitly.
    Enroll {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
        /// The number, E.164; every lead of the tenant with it is enrolled.
        #[arg(long)]
        phone: String,
    },
    /// Replace a step's template (and image); its unsent messages are re-rendered now.
    EditStep {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
        /// The step's place in the sequence, from 1.
        #[arg(long)]
        position: i32,
        #[arg(long)]
        template: String,
        /// A new image for the step (https URL, data: URL or @file); without it the step keeps
        /// its image.
        #[arg(long)]
        image: Option<String>,
    },
    /// Retry the failed messages of one step (they go through pacing again).
    RetryFailed {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
        /// The step's place in the sequence, from 1.
        #[arg(long)]
        position: i32,
    },
    /// One step's messages, one line each in lead order, as `campaign messages` lists them.
    Messages {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
        /// The step's place in the sequence, from 1.
        #[arg(long)]
        position: i32,
        #[command(flatten)]
        list: crate::messages::ListArgs,
    },
    /// Counts per step, state, reason and device, and the enrollments.
    Report {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sequence: Uuid,
    },
}

/// "2:Hello {name}" → (2, "Hello {name}").
pub(crate) fn parse_step(raw: &str) -> Result<(i32, String)> {
    let (days, template) = raw
        .split_once(':')
        .context("a step is DAYS:template, e.g. \"0:Hi {name}\"")?;
    let days: i32 = days
        .trim()
        .parse()
        .with_context(|| format!("{days:?} is not a number of days"))?;
    if !(0..=3650).contains(&days) {
        bail!("{days} days: a step's day is 0 to 3650 days after the enrollment");
    }
    shared::render::Template::parse(template)?;
    Ok((days, template.to_string()))
}

async fn step_campaign(pool: &PgPool, tenant: Uuid, sequence: Uuid, position: i32) -> Result<Uuid> {
    let mut conn = pool.acquire().await?;
    repo::sequences::list_steps(&mut conn, tenant, sequence)
        .await?
        .into_iter()
        .find(|s| s.position == position)
        .map(|s| s.campaign_id)
        .with_context(|| format!("sequence {sequence} has no step {position}"))
}

pub async fn run(pool: &PgPool, cmd: SequenceCmd) -> Result<()> {
    match cmd {
        SequenceCmd::Create {
            tenant,
            name,
            niche,
            target,
            trigger,
            time,
            steps,
            image,
            next_trigger,
            min_delay,
            max_delay,
            activate,
            stop_on_reply,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let parsed: Vec<(i32, String)> = steps
                .iter()
                .enumerate()
                .map(|(i, s)| parse_step(s).with_context(|| format!("--step {}", i + 1)))
                .collect::<Result<_>>()?;
            let niche = Token::parse(&niche)?;
            let trigger = Token::parse(&trigger)?;
            let next = next_trigger.as_deref().map(Token::parse).transpose()?;
            let target: TargetStatus = target.parse()?;
            let image = match image {
                Some(raw) => Some(store_image(pool, tenant, &raw).await?),
                None => None,
            };
            let new_steps: Vec<repo::sequences::NewStep<'_>> = parsed
                .iter()
                .map(|(d, t)| repo::sequences::NewStep {
                    day_offset: *d,
                    template: t,
                    image: image.as_deref(),
                })
                .collect();
            let mut tx = pool.begin().await?;
            let id = repo::sequences::insert_sequence(
                &mut tx,
                tenant,
                &repo::sequences::NewSequence {
                    name: &name,
                    niche: &niche,
                    target,
                    trigger: &trigger,
                    send_time: time,
                    delay: DelayRange::new(min_delay, max_delay)?,
                    next_trigger: next.as_ref(),
                    steps: &new_steps,
                    stop_on_reply,
                },
            )
            .await?;
            if activate {
                repo::sequences::change_sequence_status(
                    &mut tx,
                    tenant,
                    id,
                    SequenceStatus::Active,
                )
                .await?;
            }
            tx.commit().await?;
            out!("{id}");
        }
        SequenceCmd::List { tenant } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            out!(
                "{:<36}  {:<9} {:<6} {:<10} {:<10} {:<8} name",
                "id",
                "status",
                "time",
                "trigger",
                "next",
                "on reply"
            );
            for s in repo::sequences::list_sequences(pool, tenant).await? {
                out!(
                    "{:<36}  {:<9} {:<6} {:<10} {:<10} {:<8} {}",
                    s.id,
                    s.status,
                    s.send_time.format("%H:%M"),
                    s.trigger_token,
                    s.next_trigger.unwrap_or_default(),
                    if s.stop_on_reply { "stops" } else { "goes on" },
                    crate::printable(&s.name)
                );
            }
        }
        SequenceCmd::Set {
            tenant,
            sequence,
            stop_on_reply,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let mut tx = pool.begin().await?;
            repo::sequences::set_stop_on_reply(&mut tx, tenant, sequence, stop_on_reply).await?;
            tx.commit().await?;
            out!(
                "sequence {sequence}: a lead's reply {}",
                if stop_on_reply {
                    "ends its enrollment"
                } else {
                    "changes nothing"
                }
            );
        }
        SequenceCmd::Activate { tenant, sequence } | SequenceCmd::Resume { tenant, sequence } => {
            set(pool, &tenant, sequence, SequenceStatus::Active).await?
        }
        SequenceCmd::Pause { tenant, sequence } => {
            set(pool, &tenant, sequence, SequenceStatus::Paused).await?
        }
        SequenceCmd::Cancel { tenant, sequence } => {
            set(pool, &tenant, sequence, SequenceStatus::Cancelled).await?
        }
        SequenceCmd::Enroll {
            tenant,
            sequence,
            phone,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let phone = PhoneE164::parse(&phone)?;
            let seq = repo::sequences::get_sequence(pool, tenant, sequence).await?;
            let Some(active) = repo::sequences::get_active_sequence(pool, tenant, sequence).await?
            else {
                bail!("sequence {sequence} is {}: activate it first", seq.status);
            };
            let leads = repo::leads::find_leads_by_phone(pool, tenant, &phone).await?;
            if leads.is_empty() {
                bail!("no lead of this tenant has {phone}");
            }
            let zone = shared::tz::parse_zone(&active.time_zone)?;
            let today = chrono::Utc::now().with_timezone(&zone).date_naive();
            let first_due = shared::tz::resolve_days_after(
                zone,
                today,
                active.first_day_offset,
                active.send_time,
            )?;
            let mut tx = pool.begin().await?;
            let mut n = 0;
            for lead in leads {
                if repo::sequences::enroll_lead(&mut tx, &active, lead, today, first_due).await? {
                    n += 1;
                }
            }
            tx.commit().await?;
            out!(
                "{n} enrolled; first step due {}",
                first_due.with_timezone(&zone)
            );
        }
        SequenceCmd::EditStep {
            tenant,
            sequence,
            position,
            template,
            image,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let parsed = shared::render::Template::parse(&template)?;
            let image = match image {
                Some(raw) => Some(store_image(pool, tenant, &raw).await?),
                None => None,
            };
            let mut tx = pool.begin().await?;
            let (campaign, image) = repo::sequences::update_step(
                &mut tx,
                tenant,
                sequence,
                position,
                &template,
                image.as_deref(),
            )
            .await?;
            let n = repo::messages::rerender_unsent_messages(
                &mut tx,
                tenant,
                campaign,
                &parsed,
                image.as_deref(),
            )
            .await?;
            tx.commit().await?;
            out!("step {position} updated; {n} unsent messages re-rendered");
        }
        SequenceCmd::RetryFailed {
            tenant,
            sequence,
            position,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let campaign = step_campaign(pool, tenant, sequence, position).await?;
            let mut tx = pool.begin().await?;
            let n = repo::campaigns::retry_failed_messages(
                &mut tx,
                tenant,
                repo::campaigns::RetryScope {
                    campaign: Some(campaign),
                    device: None,
                },
            )
            .await?;
            tx.commit().await?;
            out!("{n} failed messages of step {position} will be sent again");
        }
        SequenceCmd::Messages {
            tenant,
            sequence,
            position,
            list,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let seq = repo::sequences::get_sequence(pool, tenant, sequence).await?;
            let campaign = step_campaign(pool, tenant, sequence, position).await?;
            let title = format!(
                "{} [{}] step {position}",
                crate::printable(&seq.name),
                seq.status
            );
            crate::messages::list_messages(pool, tenant, campaign, &title, list).await?;
        }
        SequenceCmd::Report { tenant, sequence } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let seq = repo::sequences::get_sequence(pool, tenant, sequence).await?;
            let mut conn = pool.acquire().await?;
            let steps = repo::sequences::list_steps(&mut conn, tenant, sequence).await?;
            drop(conn);
            let ids: Vec<Uuid> = steps.iter().map(|s| s.campaign_id).collect();
            let by_step = repo::campaigns::progress_of(pool, tenant, &ids).await?;
            let mut total = repo::campaigns::Progress::default();
            for p in by_step.values() {
                total.merge(p);
            }
            let enrolled = repo::sequences::count_enrollments(pool, tenant, sequence).await?;
            let e: Vec<String> = enrolled.iter().map(|(s, n)| format!("{s}={n}")).collect();
            out!(
                "{} [{}] enrollments: {}",
                crate::printable(&seq.name),
                seq.status,
                e.join(" ")
            );
            print_report(pool, tenant, "all steps", &total).await?;
            for s in &steps {
                let p = by_step.get(&s.campaign_id).cloned().unwrap_or_default();
                print_report(
                    pool,
                    tenant,
                    &format!("step {} (day {})", s.position, s.day_offset),
                    &p,
                )
                .await?;
            }
            // What today's steps have left, as `campaign progress` ends a running campaign's
            // report (later steps are not written before they are due).
            match seq.status.as_str() {
                "active" => {
                    crate::print_pacing_floor(
                        pool,
                        tenant,
                        &total,
                        DelayRange::new(seq.min_delay_s, seq.max_delay_s)?,
                    )
                    .await?
                }
                "paused" if crate::unsent(&total.by_status) > 0 => {
                    out!("paused: nothing of it is sent until it resumes")
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn set(pool: &PgPool, tenant: &str, sequence: Uuid, to: SequenceStatus) -> Result<()> {
    let tenant = resolve_tenant(pool, tenant).await?;
    let now = repo::sequences::set_sequence_status(pool, tenant, sequence, to).await?;
    out!("sequence {sequence} is {now}");
    Ok(())
}
