//! `wabcast`: what an operator does from a terminal. Migrate, create tenants, add devices, import
//! leads from CSV, create and steer campaigns, watch progress, show the system's status, seed
//! the demo. Every input is validated at this edge; bad input is refused whole, changing nothing.

/// `println!` for what the CLI prints, ending the process quietly once its reader has gone
/// (`wabcast status | head`): `println!` panics on a closed pipe, with a backtrace.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(e);
        }
    }};
}

mod demo;
mod lead_list;
mod listing;
mod messages;
mod sequence;

/// What `out!` does when stdout cannot be written: a reader that went away ends the command
/// (as the shell's own tools do); anything else is an error.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write the output: {e}");
    std::process::exit(1);
}

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use shared::config::Secret;
use shared::domain::{
    CampaignStatus, DelayRange, LeadStatus, PhoneE164, ProviderKind, TargetStatus, Token,
};
use shared::media::ImageSource;
use shared::repo;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "wabcast",
    about = "Operate wabcast: tenants, devices, leads, campaigns, status"
)]
struct Cli {
    /// Required by every command but `queue`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct HostArgs {
    #[arg(long, env = "HOST_URL", default_value = "http://127.0.0.1:8700")]
    host_url: String,
    #[arg(long, env = "HOST_TOKEN", hide_env_values = true)]
    host_token: String,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations.
    Migrate,
    /// Tenants (the accounts that own devices, leads and campaigns).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Devices (WhatsApp numbers): add, pair, pace, take out of service.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Leads: import from CSV, opt out and back in, look a number up.
    #[command(subcommand)]
    Leads(LeadsCmd),
    /// Campaigns: one message to every matching lead, through each lead's own device.
    #[command(subcommand)]
    Campaign(CampaignCmd),
    /// Per-device state, pacing cursors, pending and in-queue depth, dead letters.
    Status {
        /// Only this tenant (email or id).
        #[arg(long)]
        tenant: Option<String>,
        /// Only the devices that need a person or a host: not online, without a live host
        /// lease, or whose host the workers cannot reach (the totals still count every device).
        #[arg(long)]
        attention: bool,
    },
    /// The demo tenant that `infra/demo.sh` seeds and watches.
    #[command(subcommand)]
    Demo(demo::DemoCmd),
    /// The work queue (SQS) outside the cloud template.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Sequences (drip campaigns): steps days apart, chained by trigger tokens.
    #[command(subcommand)]
    Sequence(sequence::SequenceCmd),
    /// One message: recipient, device, campaign, every state change with its reason, receipts.
    History {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        message: i64,
    },
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Create an SQS FIFO work queue and its FIFO dead-letter queue on an emulator (moto) or an
    /// AWS account without the template; prints the environment lines that select it.
    CreateSqs {
        /// Queue name (`.fifo` is added).
        #[arg(long, default_value = "wabcast")]
        name: String,
        /// Endpoint of an SQS emulator (e.g. moto); omit for AWS itself.
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long, default_value_t = 5)]
        max_receives: u32,
        /// Visibility timeout, seconds (six times the worker's timeout).
        #[arg(long, default_value_t = 180)]
        visibility_s: u64,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant; prints its id.
    Create {
        /// The tenant's login; also how commands name the tenant (`--tenant`).
        #[arg(long)]
        email: String,
        /// Stored as an argon2 hash; prefer the environment variable to the command line.
        #[arg(long, env = "WABCAST_PASSWORD", hide_env_values = true)]
        password: String,
        /// IANA time zone in which the tenant's dates and times are read.
        #[arg(long, default_value = shared::tz::DEFAULT_TIME_ZONE)]
        time_zone: String,
    },
    /// Per-lead frequency cap: at most one message per lead every N hours, across all campaigns
    /// and sequences (0 = off, the default).
    LeadGap {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// Hours that must pass between two messages to one lead, across campaigns and sequences.
        #[arg(long)]
        hours: f64,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Add a device to a tenant; prints its id (the label is only a name).
    Add {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// A name for people, unique among the tenant's live devices; a lead CSV names a
        /// lead's device by it (or by id).
        #[arg(long)]
        label: String,
        /// The device's own number, E.164 (`+60123456789`).
        #[arg(long)]
        phone: Option<String>,
        /// simulator | web (multi-device, paired by QR code or pair code) | cloud_api
        #[arg(long, default_value = "simulator")]
        provider: String,
        /// Floor of the gap between two sends of this device, seconds.
        #[arg(long, default_value_t = 0.0)]
        min_delay: f64,
        /// Floor of the top of the gap's range, seconds: a campaign never paces this device faster.
        #[arg(long, default_value_t = 0.0)]
        max_delay: f64,
        /// Messages per tenant-local day (omit for no cap).
        #[arg(long)]
        daily_cap: Option<i32>,
    },
    /// A tenant's devices: id, label, provider, status, delay range (`status` adds the cursors).
    List {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
    },
    /// Rename a device or change its delay floor; its id, leads and history stay. A lead CSV
    /// names it by the new label from then on; gaps drawn from then on use the new floor.
    Edit {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The device, by label or id.
        #[arg(long)]
        device: String,
        /// A new label, unique among the tenant's live devices.
        #[arg(long)]
        label: Option<String>,
        /// New floor of the gap between two sends of this device, seconds (with --max-delay).
        #[arg(long, requires = "max_delay")]
        min_delay: Option<f64>,
        /// New floor of the top of the gap's range, seconds (with --min-delay).
        #[arg(long, requires = "min_delay")]
        max_delay: Option<f64>,
    },
    /// Delete a device: its unsent messages end skipped (device_deleted).
    Delete {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The device, by label or id.
        #[arg(long)]
        device: String,
    },
    /// Start pairing: draws the QR code in the terminal and redraws it as it rotates until the
    /// device is online (or prints the pair code with --phone).
    Pair {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The device, by label or id.
        #[arg(long)]
        device: String,
        #[arg(long)]
        phone: Option<String>,
        /// Print the QR code once and return instead of following its rotation.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Cloud API device: set its phone-number id and access token (read from the environment,
    /// never from the command line), then ask the host to connect it and print the result.
    CloudApi {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The device, by label or id.
        #[arg(long)]
        device: String,
        /// Meta's phone-number id (WhatsApp Manager > API setup).
        #[arg(long)]
        phone_number_id: String,
        /// A system-user access token with whatsapp_business_messaging.
        #[arg(
            long = "access-token",
            env = "CLOUD_API_ACCESS_TOKEN",
            hide_env_values = true
        )]
        access_token: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Account safety for a device: daily cap, warm-up ramp, quiet hours (tenant's time zone).
    /// Unset options keep their current value.
    Safety {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The device, by label or id.
        #[arg(long)]
        device: String,
        /// Messages per tenant-local day, or `none`.
        #[arg(long)]
        daily_cap: Option<String>,
        /// Quiet hours as HH:MM-HH:MM (may wrap past midnight), or `none`.
        #[arg(long)]
        quiet: Option<String>,
        /// Days of warm-up after pairing (0 = off); the cap starts at --warmup-start and doubles daily.
        #[arg(long)]
        warmup_days: Option<i32>,
        /// Messages allowed on the warm-up's first day (then doubling daily).
        #[arg(long)]
        warmup_start: Option<i32>,
    },
    /// Send all of a device's failed messages again (every campaign and sequence step).
    RetryFailed {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The device, by label or id.
        #[arg(long)]
        device: String,
    },
    /// Log a device out: unlinks it from the phone, deletes its session, and nothing reconnects
    /// until it is paired again.
    Logout {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The device, by label or id.
        #[arg(long)]
        device: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Connect a device again: after its credentials changed, or once a person has resolved
    /// what stopped it (restricted, logged out). Prints its status.
    Connect {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The device, by label or id.
        #[arg(long)]
        device: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Simulator only: take a device offline or bring it back online.
    Simulate {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The device, by label or id.
        #[arg(long)]
        device: String,
        #[arg(long, value_parser = ["online", "offline"])]
        state: String,
        #[command(flatten)]
        host: HostArgs,
    },
}

#[derive(Subcommand)]
enum LeadsCmd {
    /// Import (or update) leads from a CSV with columns device,name,phone,niches,status[,triggers].
    /// `device` is a device label or id of the tenant; niches and triggers are separated by `|`
    /// or `;`. Any bad row refuses the whole file.
    Import {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// Opt a number out: it receives nothing more from this tenant.
    OptOut {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The number, E.164 (`+60123456789`; spaces and dashes are dropped).
        #[arg(long)]
        phone: String,
    },
    /// Take a number off the opt-out list (an opt-out made by mistake, or the person asking to
    /// hear from you again): later campaigns reach its leads; what the opt-out skipped stays
    /// skipped. Logged beside the opt-out (see `leads show`).
    OptIn {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The number, E.164 (`+60123456789`; spaces and dashes are dropped).
        #[arg(long)]
        phone: String,
    },
    /// A tenant's leads, filtered by device, niche, status or opt-out, one line each in the
    /// order they were added (`--csv`: a file `leads import` reads back, edited or not).
    List(lead_list::LeadListArgs),
    /// Everything about a number: whether it is on the opt-out list, its leads on each device,
    /// and the newest messages to it with their states (details: `history --message`).
    Show {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// The number, E.164 (`+60123456789`; spaces and dashes are dropped).
        #[arg(long)]
        phone: String,
        /// How many of the newest messages to show.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum CampaignCmd {
    /// Schedule a campaign: one message to every lead of the niche and target, each through the
    /// lead's own device. Prints its id.
    Create {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        title: String,
        /// `{name}`, `{first_name}`, `{phone}`, `{name:fallback}` and spintax `{Hi|Hello}`.
        #[arg(long)]
        template: String,
        /// Leads whose niche set holds this exact token.
        #[arg(long)]
        niche: String,
        /// prospect | customer | all
        #[arg(long, default_value = "all")]
        target: String,
        /// `https://…`, `data:image/...;base64,…`, or `@path/to/file.png`.
        #[arg(long)]
        image: Option<String>,
        /// Local date in the tenant's time zone (YYYY-MM-DD), with --time; default today.
        #[arg(long)]
        date: Option<chrono::NaiveDate>,
        /// Local time (HH:MM), not in the past; without --date and --time the campaign is due now.
        #[arg(long)]
        time: Option<chrono::NaiveTime>,
        /// Gap between two sends of one device, seconds: drawn uniformly in [min, max], never
        /// below the device's own floor.
        #[arg(long, default_value_t = 30.0)]
        min_delay: f64,
        #[arg(long, default_value_t = 90.0)]
        max_delay: f64,
        /// Cloud API devices send this approved template instead of the text: `name:language`
        /// (e.g. `november_promo:ms`).
        #[arg(long)]
        wa_template: Option<String>,
        /// A body parameter of the template, rendered per lead like the text (`{name}`, spintax);
        /// repeat in order for {{1}}, {{2}}, ….
        #[arg(long = "wa-template-param")]
        wa_template_params: Vec<String>,
        /// Check everything and show what it would send, creating nothing: when it is due, how
        /// many leads it reaches now, and the message as this many of them would get it.
        #[arg(long, value_name = "SAMPLES", num_args = 0..=1, default_missing_value = "3")]
        dry_run: Option<u8>,
    },
    /// A tenant's campaigns, newest first: id, status, when it is (or was) due and when it
    /// finished in the tenant's local time, niche, target, title.
    List {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        /// Only campaigns in this state: scheduled, running, paused, completed or cancelled.
        #[arg(long)]
        status: Option<CampaignStatus>,
    },
    /// Hold a campaign: its unsent messages wait (even those already queued) until it resumes.
    Pause {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        campaign: Uuid,
    },
    /// Continue a paused campaign where it stopped; its messages are paced as before.
    Resume {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        campaign: Uuid,
    },
    /// Change a campaign that has not finished: title, text, image and delays at any time (its
    /// unsent messages are re-rendered at once), its date and time until it starts.
    Edit {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        campaign: Uuid,
        #[arg(long)]
        title: Option<String>,
        /// The new text (placeholders and spintax as in `create`).
        #[arg(long)]
        template: Option<String>,
        /// A new image: `https://…`, `data:image/...;base64,…`, or `@path/to/file.png`.
        #[arg(long)]
        image: Option<String>,
        /// New local date (YYYY-MM-DD), with --time; not in the past.
        #[arg(long, requires = "time")]
        date: Option<chrono::NaiveDate>,
        /// New local time (HH:MM); today's unless --date is given.
        #[arg(long)]
        time: Option<chrono::NaiveTime>,
        /// New gap range between two sends of one device, seconds (both bounds).
        #[arg(long, requires = "max_delay")]
        min_delay: Option<f64>,
        #[arg(long, requires = "min_delay")]
        max_delay: Option<f64>,
        /// A new Cloud API template, `name:language`, with its `--wa-template-param`s (the
        /// parameters are replaced with it); messages not yet sending get it.
        #[arg(long)]
        wa_template: Option<String>,
        #[arg(long = "wa-template-param")]
        wa_template_params: Vec<String>,
        /// Cloud API devices send the text instead of the campaign's template.
        #[arg(long, conflicts_with = "wa_template")]
        no_wa_template: bool,
    },
    /// Cancel a campaign: its messages not yet handed to a device end cancelled.
    Cancel {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        campaign: Uuid,
    },
    /// Send a campaign's failed messages again (optionally only one device's); they go through
    /// pacing again and keep their history.
    RetryFailed {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        campaign: Uuid,
        /// Only this device's failed messages, by label or id.
        #[arg(long)]
        device: Option<String>,
    },
    /// Counts per state (with reasons) and per device.
    Progress {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        campaign: Uuid,
    },
    /// Every recipient's message, one line each in lead order: number, name, device, state,
    /// reason, attempts, when it was sent, its receipt and the last error (`--csv`: every field,
    /// for a spreadsheet).
    Messages {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        campaign: Uuid,
        #[command(flatten)]
        list: messages::ListArgs,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Queue(QueueCmd::CreateSqs {
        name,
        endpoint,
        max_receives,
        visibility_s,
    }) = &cli.command
    {
        return create_sqs_queue(name, endpoint.clone(), *max_receives, *visibility_s).await;
    }
    let database_url = cli
        .database_url
        .as_deref()
        .context("DATABASE_URL (or --database-url) is required")?;
    let pool = shared::db::connect(database_url, 4).await?;
    match cli.command {
        Command::Migrate => {
            for repair in shared::db::migrate(&pool).await? {
                match repair {
                    shared::db::IndexRepair::Rebuilt(name) => {
                        out!("rebuilt index {name}, left invalid by a failed concurrent build")
                    }
                    shared::db::IndexRepair::Dropped(name) => {
                        out!("dropped index {name}, left by a failed concurrent reindex")
                    }
                }
            }
            out!("migrations applied");
        }
        Command::Tenant(TenantCmd::Create {
            email,
            password,
            time_zone,
        }) => {
            let id = create_tenant(&pool, &email, &password, &time_zone).await?;
            out!("{id}");
        }
        Command::Tenant(TenantCmd::LeadGap { tenant, hours }) => {
            let tenant = resolve_tenant(&pool, &tenant).await?;
            let mut tx = pool.begin().await?;
            repo::tenants::set_lead_min_gap(&mut tx, tenant, hours * 3600.0).await?;
            tx.commit().await?;
            if hours == 0.0 {
                out!("per-lead frequency cap off");
            } else {
                out!("at most one message per lead every {hours} h");
            }
        }
        Command::Device(cmd) => device(&pool, cmd).await?,
        Command::Leads(cmd) => leads(&pool, cmd).await?,
        Command::Campaign(cmd) => campaign(&pool, cmd).await?,
        Command::Status { tenant, attention } => {
            let tenant = match tenant {
                Some(t) => Some(resolve_tenant(&pool, &t).await?),
                None => None,
            };
            status(&pool, tenant, attention).await?;
        }
        Command::Demo(cmd) => demo::run(&pool, cmd).await?,
        Command::Sequence(cmd) => sequence::run(&pool, cmd).await?,
        Command::History { tenant, message } => {
            let tenant = resolve_tenant(&pool, &tenant).await?;
            print_history(&pool, tenant, message).await?;
        }
        // Handled above, before connecting to the database.
        Command::Queue(_) => {}
    }
    Ok(())
}

pub(crate) async fn create_tenant(
    pool: &PgPool,
    email: &str,
    password: &str,
    time_zone: &str,
) -> Result<Uuid> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    shared::tz::parse_zone(time_zone)?;
    if password.chars().count() < 8 {
        bail!("password must be at least 8 characters");
    }
    // 16 random bytes from the thread CSPRNG (seeded by the OS) as the salt.
    let mut salt = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut salt);
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| anyhow::anyhow!("failed to encode the salt: {e}"))?;
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("failed to hash password: {e}"))?
        .to_string();
    let mut tx = pool.begin().await?;
    let id = repo::tenants::insert_tenant(&mut tx, email, &hash, time_zone).await?;
    tx.commit().await?;
    Ok(id)
}

/// A tenant by id or by email.
pub(crate) async fn resolve_tenant(pool: &PgPool, s: &str) -> Result<Uuid> {
    let t = match s.parse::<Uuid>() {
        Ok(id) => repo::tenants::get_tenant(pool, id).await,
        Err(_) => repo::tenants::find_tenant_by_email(pool, s).await,
    };
    Ok(t.with_context(|| format!("no tenant {s:?}"))?.id)
}

/// A tenant's device by id or by label. An id is looked up first (a deleted device keeps its
/// id, so `retry-failed` and the listings still reach it); what is not a device id of the tenant
/// is read as the label of one of its live devices. Another tenant's device is not found
/// either way.
pub(crate) async fn resolve_device(pool: &PgPool, tenant: Uuid, s: &str) -> Result<Uuid> {
    if let Ok(id) = s.parse::<Uuid>() {
        match repo::devices::get_device(pool, tenant, id).await {
            Ok(d) => return Ok(d.id),
            Err(repo::RepoError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match repo::devices::find_live_device_by_label(pool, tenant, s).await {
        Ok(d) => Ok(d.id),
        Err(repo::RepoError::NotFound(_)) => bail!(
            "no device {:?} among this tenant's devices (give its label or id; `device list` \
             shows them)",
            printable(s)
        ),
        Err(e) => Err(e.into()),
    }
}

/// `--wa-template name:language` with its `--wa-template-param`s.
fn parse_wa_template(
    spec: Option<String>,
    params: Vec<String>,
) -> Result<Option<shared::render::WaTemplate>> {
    match spec {
        Some(spec) => {
            let (name, language) = spec
                .split_once(':')
                .context("--wa-template is name:language, e.g. november_promo:ms")?;
            Ok(Some(shared::render::WaTemplate::new(
                name, language, params,
            )?))
        }
        None if !params.is_empty() => bail!("--wa-template-param needs --wa-template"),
        None => Ok(None),
    }
}

/// A device's status as the CLI shows it. A connection status is its host's to keep current;
/// with no host serving the device it is only the last one written (a host that died with its
/// devices online left them "online"), and says so.
fn shown_status(status: &str, served: bool) -> String {
    let connection = matches!(
        status,
        "connecting" | "awaiting_pairing" | "online" | "reconnecting"
    );
    if connection && !served {
        format!("{status} (stale)")
    } else {
        status.to_string()
    }
}

/// The time zone in which a tenant's dates and times are read.
async fn tenant_zone(pool: &PgPool, tenant: Uuid) -> Result<chrono_tz::Tz> {
    let t = repo::tenants::get_tenant(pool, tenant).await?;
    Ok(shared::tz::parse_zone(&t.time_zone)?)
}

fn host_client(h: &HostArgs) -> Result<shared::host_api::HostClient> {
    shared::host_api::HostClient::new(
        &h.host_url,
        Secret::new(h.host_token.clone()),
        Duration::from_secs(15),
    )
}

async fn device(pool: &PgPool, cmd: DeviceCmd) -> Result<()> {
    match cmd {
        DeviceCmd::Add {
            tenant,
            label,
            phone,
            provider,
            min_delay,
            max_delay,
            daily_cap,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let phone = phone.as_deref().map(PhoneE164::parse).transpose()?;
            let provider: ProviderKind = provider.parse()?;
            let mut tx = pool.begin().await?;
            let id = repo::devices::insert_device(
                &mut tx,
                tenant,
                &repo::devices::NewDevice {
                    label: &label,
                    phone: phone.as_ref(),
                    provider,
                    delay: DelayRange::new(min_delay, max_delay)?,
                    daily_cap,
                },
            )
            .await?;
            tx.commit().await?;
            out!("{id}");
        }
        DeviceCmd::List { tenant } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            out!(
                "{:<36}  {:<16} {:<16} {:<10} {:<16} {:>11}",
                "id",
                "label",
                "phone",
                "provider",
                "status",
                "delay (s)"
            );
            let served = repo::hosts::list_served_devices(pool, tenant).await?;
            let now = chrono::Utc::now();
            for d in repo::devices::list_devices(pool, tenant).await? {
                let state = if d.restricted(now) {
                    "restricted"
                } else {
                    d.status.as_str()
                };
                out!(
                    "{:<36}  {:<16} {:<16} {:<10} {:<16} {:>5.1}-{:<5.1}",
                    d.id,
                    printable(&d.label),
                    d.phone.as_deref().unwrap_or("-"),
                    d.provider,
                    shown_status(state, served.contains(&d.id)),
                    d.min_delay_s,
                    d.max_delay_s
                );
            }
        }
        DeviceCmd::Edit {
            tenant,
            device,
            label,
            min_delay,
            max_delay,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let device = resolve_device(pool, tenant, &device).await?;
            let delay = match (min_delay, max_delay) {
                (Some(min), Some(max)) => Some(DelayRange::new(min, max)?),
                _ => None,
            };
            if label.is_none() && delay.is_none() {
                bail!("nothing to change: give --label, or --min-delay with --max-delay");
            }
            let mut tx = pool.begin().await?;
            let d = repo::devices::update_device(
                &mut tx,
                tenant,
                device,
                &repo::devices::DeviceEdit {
                    label: label.as_deref(),
                    delay,
                },
            )
            .await?;
            tx.commit().await?;
            out!(
                "device {}: label {}, delay floor {:.1}-{:.1} s",
                d.id,
                printable(&d.label),
                d.min_delay_s,
                d.max_delay_s
            );
        }
        DeviceCmd::Delete { tenant, device } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let device = resolve_device(pool, tenant, &device).await?;
            let mut tx = pool.begin().await?;
            repo::devices::delete_device(&mut tx, tenant, device).await?;
            tx.commit().await?;
            out!("device {device} deleted; its unsent messages will end skipped (device_deleted)");
        }
        DeviceCmd::Pair {
            tenant,
            device,
            phone,
            once,
            host,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let device = resolve_device(pool, tenant, &device).await?;
            if let Some(p) = &phone {
                PhoneE164::parse(p)?;
            }
            let client = host_client(&host)?;
            let pairing = client.start_pairing(tenant, device, phone.clone()).await?;
            if pairing.method == "code" {
                out!(
                    "On the phone: WhatsApp > Linked devices > Link with phone number, then type {} \
                     (valid {} s)",
                    pairing.code, pairing.expires_in_s
                );
                return Ok(());
            }
            let mut shown = String::new();
            let mut current = pairing;
            loop {
                if current.code != shown {
                    out!(
                        "{}\nScan within {} s: WhatsApp > Linked devices > Link a device",
                        shared::qr::terminal(&current.code)?,
                        current.expires_in_s
                    );
                    shown = current.code.clone();
                }
                if once {
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                let status = client.device_status(tenant, device).await?;
                match status.status.as_str() {
                    "online" => {
                        out!("paired: the device is online");
                        return Ok(());
                    }
                    "awaiting_pairing" | "connecting" => {}
                    other => bail!(
                        "pairing ended: {other}{}",
                        status.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                    ),
                }
                current = client.start_pairing(tenant, device, None).await?;
            }
        }
        DeviceCmd::Logout {
            tenant,
            device,
            host,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let device = resolve_device(pool, tenant, &device).await?;
            let s = host_client(&host)?.logout_device(tenant, device).await?;
            out!(
                "{}{}",
                s.status,
                s.reason.map(|r| format!(" ({r})")).unwrap_or_default()
            );
        }
        DeviceCmd::CloudApi {
            tenant,
            device,
            phone_number_id,
            access_token,
            host,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let device = resolve_device(pool, tenant, &device).await?;
            let mut tx = pool.begin().await?;
            repo::cloud_api::set_cloud_credentials(
                &mut tx,
                tenant,
                device,
                &phone_number_id,
                &shared::config::Secret::new(access_token),
            )
            .await?;
            tx.commit().await?;
            let s = host_client(&host)?.connect_device(tenant, device).await?;
            out!(
                "credentials saved; device {}{}",
                s.status,
                s.reason.map(|r| format!(" ({r})")).unwrap_or_default()
            );
        }
        DeviceCmd::Safety {
            tenant,
            device,
            daily_cap,
            quiet,
            warmup_days,
            warmup_start,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let device = resolve_device(pool, tenant, &device).await?;
            let current = repo::devices::get_safety_settings(pool, tenant, device).await?;
            let daily_cap = match daily_cap.as_deref() {
                None => current.daily_cap,
                Some("none") => None,
                Some(n) => Some(
                    n.parse::<i32>()
                        .context("--daily-cap is a number or none")?,
                ),
            };
            let quiet_hours = match quiet.as_deref() {
                None => current.quiet_hours,
                Some("none") => None,
                Some(w) => {
                    let (a, b) = w.split_once('-').context("--quiet is HH:MM-HH:MM")?;
                    let t = |x: &str| {
                        chrono::NaiveTime::parse_from_str(x.trim(), "%H:%M")
                            .with_context(|| format!("{x:?} is not HH:MM"))
                    };
                    Some((t(a)?, t(b)?))
                }
            };
            let s = repo::devices::SafetySettings {
                daily_cap,
                warmup_days: warmup_days.unwrap_or(current.warmup_days),
                warmup_start: warmup_start.unwrap_or(current.warmup_start),
                quiet_hours,
            };
            let mut tx = pool.begin().await?;
            repo::devices::set_safety_settings(&mut tx, tenant, device, &s).await?;
            tx.commit().await?;
            out!(
                "daily cap {}, warm-up {} days from {}/day, quiet hours {}",
                s.daily_cap.map(|c| c.to_string()).unwrap_or("none".into()),
                s.warmup_days,
                s.warmup_start,
                s.quiet_hours
                    .map(|(a, b)| format!("{}-{}", a.format("%H:%M"), b.format("%H:%M")))
                    .unwrap_or("none".into())
            );
        }
        DeviceCmd::RetryFailed { tenant, device } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let device = resolve_device(pool, tenant, &device).await?;
            let mut tx = pool.begin().await?;
            let n = repo::campaigns::retry_failed_messages(
                &mut tx,
                tenant,
                repo::campaigns::RetryScope {
                    campaign: None,
                    device: Some(device),
                },
            )
            .await?;
            tx.commit().await?;
            out!("{n} failed messages of the device will be sent again");
        }
        DeviceCmd::Connect {
            tenant,
            device,
            host,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let device = resolve_device(pool, tenant, &device).await?;
            let s = host_client(&host)?.connect_device(tenant, device).await?;
            out!(
                "{}{}",
                s.status,
                s.reason.map(|r| format!(" ({r})")).unwrap_or_default()
            );
        }
        DeviceCmd::Simulate {
            tenant,
            device,
            state,
            host,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let device = resolve_device(pool, tenant, &device).await?;
            let s = host_client(&host)?
                .simulate_connection(tenant, device, state == "online")
                .await?;
            out!("{} is {}", s.device_id, s.status);
        }
    }
    Ok(())
}

/// Parses a whole CSV into leads, or refuses it with every bad row listed.
/// Line numbers (from 1) of a CSV's records, from their byte offsets. The csv crate's own line
/// count is one short after a CRLF line end (the `\r` ends the record, and the record's position
/// is taken before the `\n`), and spreadsheets write CRLF. Records come in file order, so the
/// count goes on from the last record's: every byte is read once (counted from the start for
/// each record, a 100,000-lead file took over twelve minutes).
struct Lines<'a> {
    bytes: &'a [u8],
    /// The byte up to which newlines are counted, and the line it is on.
    pos: usize,
    line: usize,
    /// Bytes read so far (for the test that every byte is read once).
    scanned: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            bytes: text.as_bytes(),
            pos: 0,
            line: 1,
            scanned: 0,
        }
    }

    /// The line on which the record that starts at byte `at` begins.
    fn at(&mut self, at: u64) -> usize {
        let bytes = self.bytes;
        let at = usize::try_from(at).map_or(bytes.len(), |a| a.min(bytes.len()));
        let start = at
            + bytes[at..]
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
        if start < self.pos {
            // Not in file order (the csv crate never does this): count from the start.
            (self.pos, self.line) = (0, 1);
        }
        let newlines = bytes[self.pos..start]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        self.scanned += start - self.pos;
        (self.pos, self.line) = (start, self.line + newlines);
        self.line
    }
}

pub(crate) fn parse_leads_csv(
    text: &str,
    devices: &std::collections::HashMap<String, Uuid>,
) -> Result<Vec<repo::leads::NewLead>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader.headers()?.iter().map(|h| h.to_lowercase()).collect();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let (Some(c_device), Some(c_phone)) = (col("device"), col("phone")) else {
        bail!(
            "the CSV needs at least the columns device and phone (have: {})",
            headers.join(",")
        );
    };
    let (c_name, c_niches, c_status, c_triggers) =
        (col("name"), col("niches"), col("status"), col("triggers"));
    let mut leads = Vec::new();
    let mut problems = Vec::new();
    // (device, phone) -> the line that first named it.
    let mut first_line = std::collections::HashMap::new();
    let mut lines = Lines::new(text);
    for (i, row) in reader.records().enumerate() {
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(i + 2, |p| lines.at(p.byte()));
                problems.push(format!("line {line}: {e}"));
                continue;
            }
        };
        // A quoted field may span lines: the record's own position, not its index.
        let line = row.position().map_or(i + 2, |p| lines.at(p.byte()));
        let get = |c: Option<usize>| c.and_then(|c| row.get(c)).unwrap_or("");
        let parsed = (|| -> Result<repo::leads::NewLead> {
            // A name or label `leads list --csv` wrote with a leading `'` reads as it was.
            let device_key = listing::from_spreadsheet(get(Some(c_device)));
            let device_id = devices.get(device_key).copied().with_context(|| {
                format!("device {device_key:?} is not one of this tenant's devices")
            })?;
            let status_raw = get(c_status);
            Ok(repo::leads::NewLead {
                device_id,
                name: shared::domain::parse_lead_name(listing::from_spreadsheet(get(c_name)))?,
                phone: PhoneE164::parse(get(Some(c_phone)))?,
                niches: Token::parse_set(get(c_niches))?,
                status: if status_raw.is_empty() {
                    LeadStatus::Prospect
                } else {
                    status_raw.parse()?
                },
                triggers: Token::parse_set(get(c_triggers))?,
            })
        })();
        match parsed {
            Ok(l) => match first_line.entry((l.device_id, l.phone.as_str().to_string())) {
                std::collections::hash_map::Entry::Occupied(first) => problems.push(format!(
                    "line {line}: {} for device {:?} is already on line {}",
                    l.phone.as_str(),
                    get(Some(c_device)),
                    first.get()
                )),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(line);
                    leads.push(l);
                }
            },
            Err(e) => problems.push(format!("line {line}: {e:#}")),
        }
    }
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(20).collect();
        bail!(
            "{} bad row(s); nothing was imported:\n  {}",
            problems.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    Ok(leads)
}

async fn leads(pool: &PgPool, cmd: LeadsCmd) -> Result<()> {
    match cmd {
        LeadsCmd::List(args) => {
            let tenant = resolve_tenant(pool, &args.tenant).await?;
            lead_list::run(pool, tenant, args).await?;
        }
        LeadsCmd::Import { tenant, file } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let mut devices = std::collections::HashMap::new();
            for d in repo::devices::list_devices(pool, tenant).await? {
                if d.deleted_at.is_none() {
                    devices.insert(d.label.clone(), d.id);
                    devices.insert(d.id.to_string(), d.id);
                }
            }
            let leads = parse_leads_csv(&text, &devices)?;
            let mut tx = pool.begin().await?;
            let n = repo::leads::upsert_leads(&mut tx, tenant, &leads).await?;
            tx.commit().await?;
            out!(
                "{} lead(s) imported, {} updated; {} of them opted out (they receive nothing)",
                n.inserted,
                n.updated,
                n.opted_out
            );
        }
        LeadsCmd::OptOut { tenant, phone } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let phone = PhoneE164::parse(&phone)?;
            let n = repo::leads::opt_out_number(
                pool,
                tenant,
                &phone,
                repo::leads::ConsentSource::Operator,
            )
            .await?;
            out!(
                "{phone} is on the tenant's opt-out list: {n} lead(s) with it opted out now, and \
                 any imported with it later come in opted out"
            );
        }
        LeadsCmd::OptIn { tenant, phone } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let phone = PhoneE164::parse(&phone)?;
            let mut tx = pool.begin().await?;
            let n = repo::leads::opt_in_number(
                &mut tx,
                tenant,
                &phone,
                repo::leads::ConsentSource::Operator,
            )
            .await?;
            tx.commit().await?;
            out!(
                "{phone} is off the tenant's opt-out list: {n} lead(s) with it will receive later \
                 campaigns (messages the opt-out skipped stay skipped)"
            );
        }
        LeadsCmd::Show {
            tenant,
            phone,
            limit,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let phone = PhoneE164::parse(&phone)?;
            if !(1..=1_000).contains(&limit) {
                bail!("--limit must be 1 to 1000");
            }
            print_number(pool, tenant, &phone, limit).await?;
        }
    }
    Ok(())
}

/// Validates an image argument and returns what the campaign stores (`https://…` or `media:<id>`).
pub(crate) async fn store_image(pool: &PgPool, tenant: Uuid, raw: &str) -> Result<String> {
    Ok(match read_image(raw)? {
        ImageSource::Remote(url) => url.to_string(),
        ImageSource::Inline { mime, bytes } => {
            let mut tx = pool.begin().await?;
            let id = repo::media::insert_media(&mut tx, tenant, mime, &bytes).await?;
            tx.commit().await?;
            format!("media:{id}")
        }
    })
}

/// An image argument checked (an `https://` URL that is no private address, or a `data:` URL
/// or `@file` whose bytes are a JPEG, PNG or WebP of at most 5 MB), not yet stored.
fn read_image(raw: &str) -> Result<ImageSource> {
    if let Some(path) = raw.strip_prefix('@') {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        if bytes.len() > shared::media::MAX_IMAGE_BYTES {
            bail!("image is larger than 5 MB ({} bytes)", bytes.len());
        }
        let mime =
            shared::media::sniff(&bytes).context("the file is not a JPEG, PNG or WebP image")?;
        Ok(ImageSource::Inline { mime, bytes })
    } else {
        Ok(ImageSource::parse(raw)?)
    }
}

/// `campaign create --dry-run`, after its first lines: how many leads the campaign would reach
/// now, and the message (and Cloud API template, if any) as the first of them would get it. The
/// samples are rendered as the trigger renders them (spintax drawn per lead), from the
/// first leads the campaign would reach.
async fn preview_campaign(
    pool: &PgPool,
    tenant: Uuid,
    (template, wa_template): (
        &shared::render::Template,
        Option<&shared::render::WaTemplate>,
    ),
    niche: &Token,
    target: TargetStatus,
    samples: u8,
) -> Result<()> {
    let (leads, devices) =
        repo::campaigns::count_campaign_recipients(pool, tenant, niche.as_str(), target).await?;
    out!(
        "{leads} lead(s) on {devices} device(s) match it now (niche {}, target {})",
        niche.as_str(),
        target.as_str()
    );
    let sample = repo::campaigns::sample_campaign_recipients(
        pool,
        tenant,
        niche.as_str(),
        target,
        i64::from(samples),
    )
    .await?;
    let mut rng = rand::rng();
    for r in &sample {
        let to = shared::render::Recipient {
            name: &r.name,
            phone: &r.phone,
        };
        let text = template.render(&to, &mut rng);
        out!(
            "to {} ({}, via {}): {}",
            r.phone,
            if r.name.is_empty() {
                "no name".to_string()
            } else {
                printable(&r.name)
            },
            printable(&r.device_label),
            printable(&text)
        );
        if let Some(wa) = wa_template {
            let m = wa.render(&to, rand::Rng::random(&mut rng))?;
            out!(
                "  (a Cloud API device sends the template {}:{} with {:?} instead)",
                m.name,
                m.language,
                m.params
            );
        }
    }
    Ok(())
}

async fn campaign(pool: &PgPool, cmd: CampaignCmd) -> Result<()> {
    match cmd {
        CampaignCmd::Create {
            tenant,
            title,
            template,
            niche,
            target,
            image,
            date,
            time,
            min_delay,
            max_delay,
            wa_template,
            wa_template_params,
            dry_run,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let parsed = shared::render::Template::parse(&template)?;
            let wa_template = parse_wa_template(wa_template, wa_template_params)?;
            let niche = Token::parse(&niche)?;
            let target: TargetStatus = target.parse()?;
            let delay = DelayRange::new(min_delay, max_delay)?;
            let zone = tenant_zone(pool, tenant).await?;
            let scheduled_at = shared::tz::resolve_schedule(zone, date, time, chrono::Utc::now())?;
            if let Some(samples) = dry_run {
                if let Some(raw) = &image {
                    read_image(raw)?;
                }
                out!("dry run: nothing was created");
                out!(
                    "due {}",
                    scheduled_at
                        .with_timezone(&zone)
                        .format("%Y-%m-%d %H:%M %Z")
                );
                return preview_campaign(
                    pool,
                    tenant,
                    (&parsed, wa_template.as_ref()),
                    &niche,
                    target,
                    samples,
                )
                .await;
            }
            let image = match image {
                Some(raw) => Some(store_image(pool, tenant, &raw).await?),
                None => None,
            };
            let mut tx = pool.begin().await?;
            let id = repo::campaigns::insert_campaign(
                &mut tx,
                tenant,
                &repo::campaigns::NewCampaign {
                    title: &title,
                    template: &template,
                    image: image.as_deref(),
                    niche: &niche,
                    target,
                    scheduled_at,
                    delay,
                    wa_template: wa_template.as_ref(),
                },
            )
            .await?;
            tx.commit().await?;
            out!("{id}");
            eprintln!(
                "scheduled for {} ({} local)",
                scheduled_at.to_rfc3339(),
                scheduled_at
                    .with_timezone(&zone)
                    .format("%Y-%m-%d %H:%M %Z")
            );
            let (leads, devices) =
                repo::campaigns::count_campaign_recipients(pool, tenant, niche.as_str(), target)
                    .await?;
            eprintln!(
                "{leads} lead(s) on {devices} device(s) match it now (niche {}, target {}); the \
                 count is taken again when it starts{}",
                niche.as_str(),
                target.as_str(),
                if leads == 0 {
                    ": as it stands it would send nothing"
                } else {
                    ""
                }
            );
        }
        CampaignCmd::List { tenant, status } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let zone = tenant_zone(pool, tenant).await?;
            let local = |t: chrono::DateTime<chrono::Utc>| {
                t.with_timezone(&zone).format("%Y-%m-%d %H:%M").to_string()
            };
            out!("times in {zone}");
            out!(
                "{:<36}  {:<10} {:<16}  {:<16}  {:<12} {:<8} title",
                "id",
                "status",
                "due",
                "finished",
                "niche",
                "target"
            );
            for c in repo::campaigns::list_campaigns(pool, tenant, status).await? {
                out!(
                    "{:<36}  {:<10} {:<16}  {:<16}  {:<12} {:<8} {}",
                    c.id,
                    c.status,
                    local(c.scheduled_at),
                    c.finished_at.map(local).unwrap_or_else(|| "-".into()),
                    c.niche,
                    c.target_status,
                    printable(&c.title)
                );
            }
        }
        CampaignCmd::Pause { tenant, campaign } => {
            set_status(pool, &tenant, campaign, CampaignStatus::Paused).await?
        }
        CampaignCmd::Resume { tenant, campaign } => {
            set_status(pool, &tenant, campaign, CampaignStatus::Running).await?
        }
        CampaignCmd::Cancel { tenant, campaign } => {
            set_status(pool, &tenant, campaign, CampaignStatus::Cancelled).await?
        }
        CampaignCmd::Edit {
            tenant,
            campaign,
            title,
            template,
            image,
            date,
            time,
            min_delay,
            max_delay,
            wa_template,
            wa_template_params,
            no_wa_template,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let wa_template = parse_wa_template(wa_template, wa_template_params)?;
            if title.is_none()
                && template.is_none()
                && image.is_none()
                && time.is_none()
                && min_delay.is_none()
                && wa_template.is_none()
                && !no_wa_template
            {
                bail!(
                    "nothing to change: give --title, --template, --image, --date/--time, \
                     --min-delay/--max-delay, --wa-template or --no-wa-template"
                );
            }
            if let Some(t) = &template {
                shared::render::Template::parse(t)?;
            }
            let delay = match (min_delay, max_delay) {
                (Some(min), Some(max)) => Some(DelayRange::new(min, max)?),
                _ => None,
            };
            let scheduled_at = match time {
                Some(_) => Some(shared::tz::resolve_schedule(
                    tenant_zone(pool, tenant).await?,
                    date,
                    time,
                    chrono::Utc::now(),
                )?),
                None => None,
            };
            let image = match image {
                Some(raw) => Some(store_image(pool, tenant, &raw).await?),
                None => None,
            };
            let edit = repo::campaigns::CampaignEdit {
                title: title.as_deref(),
                template: template.as_deref(),
                image: image.as_deref(),
                scheduled_at,
                delay,
                wa_template: match (&wa_template, no_wa_template) {
                    (Some(t), _) => Some(Some(t)),
                    (None, true) => Some(None),
                    (None, false) => None,
                },
            };
            let mut tx = pool.begin().await?;
            let c = repo::campaigns::update_campaign(&mut tx, tenant, campaign, &edit).await?;
            // A started campaign's unsent rows carry the old text: render them again.
            let rendered =
                if c.started_at.is_some() && (edit.template.is_some() || edit.image.is_some()) {
                    let parsed = shared::render::Template::parse(&c.template)?;
                    repo::messages::rerender_unsent_messages(
                        &mut tx,
                        tenant,
                        campaign,
                        &parsed,
                        c.image.as_deref(),
                    )
                    .await?
                } else {
                    0
                };
            tx.commit().await?;
            out!(
                "campaign {campaign} ({}) updated, due {}; {rendered} unsent message(s) re-rendered",
                c.status,
                c.scheduled_at.to_rfc3339()
            );
            if edit.wa_template.is_some() {
                match &c.wa_template {
                    Some(t) => out!(
                        "Cloud API devices send template {}:{} to every message not yet sending",
                        t.name,
                        t.language
                    ),
                    None => out!("Cloud API devices send the text"),
                }
            }
        }
        CampaignCmd::Progress { tenant, campaign } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            print_progress(pool, tenant, campaign).await?;
        }
        CampaignCmd::Messages {
            tenant,
            campaign,
            list,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            let c = repo::campaigns::get_campaign(pool, tenant, campaign).await?;
            let title = format!("{} [{}]", printable(&c.title), c.status);
            messages::list_messages(pool, tenant, campaign, &title, list).await?;
        }
        CampaignCmd::RetryFailed {
            tenant,
            campaign,
            device,
        } => {
            let tenant = resolve_tenant(pool, &tenant).await?;
            repo::campaigns::get_campaign(pool, tenant, campaign).await?;
            let device = match &device {
                Some(d) => Some(resolve_device(pool, tenant, d).await?),
                None => None,
            };
            let mut tx = pool.begin().await?;
            let n = repo::campaigns::retry_failed_messages(
                &mut tx,
                tenant,
                repo::campaigns::RetryScope {
                    campaign: Some(campaign),
                    device,
                },
            )
            .await?;
            tx.commit().await?;
            out!("{n} failed messages will be sent again");
        }
    }
    Ok(())
}

async fn set_status(pool: &PgPool, tenant: &str, campaign: Uuid, to: CampaignStatus) -> Result<()> {
    let tenant = resolve_tenant(pool, tenant).await?;
    let now = repo::campaigns::set_campaign_status(pool, tenant, campaign, to).await?;
    out!("campaign {campaign} is {now}");
    Ok(())
}

pub(crate) async fn print_progress(pool: &PgPool, tenant: Uuid, campaign: Uuid) -> Result<()> {
    let c = repo::campaigns::get_campaign(pool, tenant, campaign).await?;
    let p = repo::campaigns::get_campaign_progress(pool, tenant, campaign).await?;
    print_report(pool, tenant, &format!("{} [{}]", c.title, c.status), &p).await?;
    if unsent(&p.by_status) == 0 {
        return Ok(());
    }
    match c.status.as_str() {
        "paused" => out!("paused: nothing of it is sent until it resumes"),
        "running" => {
            print_pacing_floor(
                pool,
                tenant,
                &p,
                DelayRange::new(c.min_delay_s, c.max_delay_s)?,
            )
            .await?
        }
        _ => {}
    }
    Ok(())
}

/// How many of these counts (per state) are not sent yet: pending, queued or sending.
pub(crate) fn unsent(counts: &std::collections::BTreeMap<String, i64>) -> i64 {
    ["pending", "queued", "sending"]
        .iter()
        .filter_map(|s| counts.get(*s))
        .sum()
}

/// The closing line of a running campaign's (or an active sequence's) report: the least time
/// pacing still needs for its unsent messages (`p`), drawn in `gap` raised by each device's
/// floor ([`pacing_floor`]).
pub(crate) async fn print_pacing_floor(
    pool: &PgPool,
    tenant: Uuid,
    p: &repo::campaigns::Progress,
    gap: DelayRange,
) -> Result<()> {
    let devices = repo::devices::list_devices(pool, tenant).await?;
    let now = chrono::Utc::now();
    let queues: Vec<DeviceQueue> = devices
        .iter()
        .filter(|d| d.deleted_at.is_none())
        .filter_map(|d| {
            Some(DeviceQueue {
                label: &d.label,
                unsent: unsent(p.by_device.get(&d.id)?),
                next_in_s: (d.next_send_at - now).num_milliseconds() as f64 / 1000.0,
                gap: DelayRange::new(d.min_delay_s, d.max_delay_s).ok()?,
            })
        })
        .collect();
    if let Some((secs, q)) = pacing_floor(&queues, gap) {
        out!(
            "pacing alone needs at least {} more (its busiest device, {}: {} unsent at a \
             mean gap of {:.0} s); daily caps, quiet hours and other campaigns on its \
             devices can only add to it",
            human_duration(secs),
            printable(q.label),
            q.unsent,
            mean_gap(q.gap, gap)
        );
    }
    Ok(())
}

/// One device's share of a campaign's unsent messages, for [`pacing_floor`].
struct DeviceQueue<'a> {
    label: &'a str,
    unsent: i64,
    /// Seconds until the device may send again (negative: it may now).
    next_in_s: f64,
    /// The device's own floor.
    gap: DelayRange,
}

/// The mean gap the processor draws for a device in a campaign: uniform in the range of both
/// floors (`repo::messages::claim_ready_messages`: the larger minimum, the largest top).
fn mean_gap(device: DelayRange, campaign: DelayRange) -> f64 {
    let lo = device.min_s.max(campaign.min_s);
    let hi = device.max_s.max(campaign.max_s).max(lo);
    (lo + hi) / 2.0
}

/// The least time pacing needs to send what is left, in seconds, and the device that sets it:
/// each device sends its next message when its cursor allows, and each after one mean gap more.
/// A lower bound: caps, quiet hours, other campaigns on the same devices and an offline device
/// only lengthen it.
fn pacing_floor<'q, 'a>(
    queues: &'q [DeviceQueue<'a>],
    campaign: DelayRange,
) -> Option<(f64, &'q DeviceQueue<'a>)> {
    queues
        .iter()
        .filter(|q| q.unsent > 0)
        .map(|q| {
            let secs = q.next_in_s.max(0.0) + (q.unsent - 1) as f64 * mean_gap(q.gap, campaign);
            (secs, q)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// `1h 05m`, `4m 30s`, `12s`.
fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s:02}s"),
        (h, m, _) => format!("{h}h {m:02}m"),
    }
}

/// Prints one report (a campaign, a sequence, or one of its steps).
pub(crate) async fn print_report(
    pool: &PgPool,
    tenant: Uuid,
    title: &str,
    p: &repo::campaigns::Progress,
) -> Result<()> {
    out!(
        "{title}: {} messages, {} delivered, {} read",
        p.total,
        p.delivered,
        p.read
    );
    for (status, n) in &p.by_status {
        out!("  {status:<10} {n:>8}");
        for ((s, reason), m) in &p.by_reason {
            if s == status && s != "sent" {
                out!("      {reason:<22} {m:>8}");
            }
        }
    }
    // In the order of the device list (by label), a deleted device marked as such.
    let lines: Vec<(String, String)> = repo::devices::list_devices(pool, tenant)
        .await?
        .into_iter()
        .filter_map(|d| {
            let counts = p.by_device.get(&d.id)?;
            let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{s}={n}")).collect();
            let label = match d.deleted_at {
                Some(_) => format!("{} (deleted)", printable(&d.label)),
                None => printable(&d.label),
            };
            Some((label, parts.join(" ")))
        })
        .collect();
    let width = lines.iter().map(|l| l.0.len()).max().unwrap_or(0).max(16);
    out!("  per device:");
    for (label, counts) in &lines {
        out!("    {label:<width$} {counts}");
    }
    Ok(())
}

/// One message: what it is, every state change with its reason, and its receipts (UTC).
async fn print_number(pool: &PgPool, tenant: Uuid, phone: &PhoneE164, limit: i64) -> Result<()> {
    let zone = tenant_zone(pool, tenant).await?;
    let local = |t: chrono::DateTime<chrono::Utc>| {
        t.with_timezone(&zone)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    match repo::leads::get_opt_out(pool, tenant, phone).await? {
        Some(at) => out!(
            "{phone}: on the opt-out list since {} (it receives nothing from this tenant)",
            local(at)
        ),
        None => out!("{phone}: not on the opt-out list"),
    }
    out!("times in {zone}");
    for (at, action, source) in repo::leads::list_opt_out_log(pool, tenant, phone).await? {
        let what = if action == "opt_in" {
            "taken off the opt-out list"
        } else {
            "put on the opt-out list"
        };
        let by = match source.as_str() {
            "inbound_message" => "by the person's own message",
            "marketing_preference" => "by the person, turning off marketing messages in WhatsApp",
            "operator" => "by an operator",
            _ => "before this log was kept",
        };
        out!("{}  {what} {by}", local(at));
    }
    let leads = repo::leads::list_leads_with_phone(pool, tenant, phone).await?;
    if leads.is_empty() {
        out!("no lead has this number");
        return Ok(());
    }
    out!(
        "{:<16} {:<20} {:<9} {:<20} {:<12} {:<11} {:<19} opted out",
        "device",
        "name",
        "target",
        "niches",
        "triggers",
        "on WhatsApp",
        "last contacted"
    );
    for l in &leads {
        let device = if l.device_deleted {
            format!("{} (deleted)", l.device_label)
        } else {
            l.device_label.clone()
        };
        let on_wa = match l.on_whatsapp {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unchecked",
        };
        out!(
            "{:<16} {:<20} {:<9} {:<20} {:<12} {:<11} {:<19} {}",
            device,
            if l.name.is_empty() {
                "-".to_string()
            } else {
                printable(&l.name)
            },
            l.target_status,
            l.niches.join(","),
            l.triggers.join(","),
            on_wa,
            l.last_contacted_at.map(local).unwrap_or_else(|| "-".into()),
            l.opted_out_at.map(local).unwrap_or_else(|| "-".into())
        );
    }
    let messages = repo::messages::list_messages_to_number(pool, tenant, phone, limit).await?;
    if messages.is_empty() {
        out!("no message to this number yet");
        return Ok(());
    }
    out!("the newest {} message(s):", messages.len());
    out!(
        "{:>10} {:<19} {:<16} {:<10} {:<24} {:<9} campaign",
        "message",
        "created",
        "device",
        "status",
        "reason",
        "receipt"
    );
    for m in &messages {
        let receipt = if m.read_at.is_some() {
            "read"
        } else if m.delivered_at.is_some() {
            "delivered"
        } else if m.sent_at.is_some() {
            "sent"
        } else {
            "-"
        };
        out!(
            "{:>10} {:<19} {:<16} {:<10} {:<24} {:<9} {}",
            m.id,
            local(m.created_at),
            m.device_label,
            m.status,
            m.reason.as_deref().unwrap_or("-"),
            receipt,
            m.campaign_title
        );
    }
    Ok(())
}

/// Text from the database made safe to print: control characters (a terminal's escape
/// sequences among them, from a lead's name in an imported file) become `\u{fffd}`.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

async fn print_history(pool: &PgPool, tenant: Uuid, message: i64) -> Result<()> {
    let m = repo::messages::get_message(pool, tenant, message).await?;
    let campaign = repo::campaigns::get_campaign(pool, tenant, m.campaign_id).await?;
    let device = repo::devices::get_device(pool, tenant, m.device_id).await?;
    let at = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
    out!(
        "message {} to {} through {} ({}), {:?}: {}{}",
        m.id,
        m.recipient,
        printable(&device.label),
        device.provider,
        printable(&campaign.title),
        m.status,
        m.reason.map(|r| format!(" ({r})")).unwrap_or_default()
    );
    out!("times in UTC; {} attempt(s) at the host", m.attempts);
    out!(
        "{}  {:>9}    {:<9} created",
        at(m.created_at),
        "",
        "pending"
    );
    for (t, from, to, reason) in
        repo::campaigns::list_message_transitions(pool, tenant, message).await?
    {
        out!(
            "{}  {from:>9} -> {to:<9} {}",
            at(t),
            reason.unwrap_or_default()
        );
    }
    for (what, t) in [("delivered", m.delivered_at), ("read", m.read_at)] {
        if let Some(t) = t {
            out!("{}  {:>9}    {what}", at(t), "");
        }
    }
    if let Some(e) = m.last_error {
        out!("last error: {}", printable(&e));
    }
    Ok(())
}

async fn status(pool: &PgPool, tenant: Option<Uuid>, attention_only: bool) -> Result<()> {
    let queue = shared::queue::QueueConfig::from_env()?.connect().await;
    let rows = repo::devices::list_device_load(pool, tenant).await?;
    let settling = repo::messages::outage_settling(pool).await?;
    let now = chrono::Utc::now();
    out!(
        "{:<16} {:<16} {:>10} {:>8} {:>7} {:>8}  host",
        "device",
        "status",
        "next send",
        "pending",
        "queued",
        "sending"
    );
    let (mut unserved, mut unreachable, mut stale, mut renewing) = (0, 0, 0, 0);
    // Per state as the table shows it ("online (stale)" apart from "online").
    let mut by_status = std::collections::BTreeMap::<String, usize>::new();
    let mut attention = 0;
    for d in &rows {
        // A restriction in force is the device's state, whatever its session says (a host that
        // took the device over reconnects it, and the restriction still holds).
        let (state, why) = match &d.restriction {
            Some(r) => (
                "restricted",
                Some(match d.restricted_until {
                    Some(until) => format!("{r} (held until {until})"),
                    None => format!("{r} (held until a person runs `wabcast device connect`)"),
                }),
            ),
            None => (d.status.as_str(), d.status_reason.clone()),
        };
        // A device needs attention when it is not online, or when one of the problems counted
        // below is its (a lease being renewed after an outage of the database mends itself).
        let problems_before = unserved + unreachable + stale;
        // Which host serves the device; a lease that ran out means none does, except one that
        // ran out while the database was away, for as long as the hosts have to renew.
        let served = d.lease_until.is_some_and(|until| until > now) || d.lease_renewing;
        let host = match (&d.host_id, d.lease_until) {
            _ if state == "deleted" => "-".to_string(),
            (Some(h), Some(until)) if until > now => match d.host_unreachable_since {
                Some(since) => {
                    unreachable += 1;
                    format!(
                        "{h} (workers cannot reach it, for {}s)",
                        (now - since).num_seconds()
                    )
                }
                None => h.clone(),
            },
            (Some(h), Some(_)) if d.lease_renewing => {
                renewing += 1;
                format!("{h}? (its lease ran out while the database was away; renewing)")
            }
            (Some(h), Some(until)) => {
                unserved += 1;
                format!(
                    "none ({h}'s lease ran out {}s ago)",
                    (now - until).num_seconds()
                )
            }
            _ => {
                unserved += 1;
                "none yet".to_string()
            }
        };
        let next = (d.next_send_at - now).num_milliseconds() as f64 / 1000.0;
        let next = if next <= 0.0 {
            "ready".to_string()
        } else {
            format!("in {next:.1}s")
        };
        let status = shown_status(state, served);
        if status != state {
            stale += 1;
        }
        *by_status.entry(status.clone()).or_default() += 1;
        let needs = state != "deleted"
            && (state != "online" || unserved + unreachable + stale > problems_before);
        attention += usize::from(needs);
        if attention_only && !needs {
            continue;
        }
        out!(
            "{:<16} {:<16} {:>10} {:>8} {:>7} {:>8}  {host}",
            printable(&d.label),
            status,
            next,
            d.pending,
            d.queued,
            d.sending
        );
        // Why a device is not online (a restriction and its end, a logout, a ban): the person
        // who has to act reads it here.
        if state != "online" {
            if let Some(reason) = &why {
                out!("  └ {}", printable(reason));
            }
        }
    }
    let (p, q, s) = rows.iter().fold((0, 0, 0), |a, d| {
        (a.0 + d.pending, a.1 + d.queued, a.2 + d.sending)
    });
    out!("total: {p} pending, {q} queued, {s} sending");
    let mut counts: Vec<(String, usize)> = by_status.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out!(
        "devices: {}; {attention} need(s) attention{}",
        counts
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", "),
        if attention_only {
            " (only those are listed above)"
        } else {
            " (`status --attention` lists only those)"
        }
    );
    if unserved > 0 {
        out!(
            "{unserved} device(s) without a live host lease (a host died or stopped, none has started, or every host is full: HOST_MAX_DEVICES): their messages wait until a host takes them; once a lease has been out for OFFLINE_GRACE_S its device counts as offline and its due messages are skipped"
        );
    }
    if let (true, Some((back, until))) = (renewing > 0, settling) {
        out!(
            "{renewing} device(s) whose lease ran out while the database was away (back {}s ago): their hosts renew within DEVICE_LEASE_S of its return ({}s left); a device whose host has not by then counts as without a host",
            (now - back).num_seconds(),
            (until - now).num_seconds().max(0)
        );
    }
    if stale > 0 {
        out!(
            "{stale} device(s) marked (stale): the status is the last one a host wrote before its lease ran out; no host is keeping it current"
        );
    }
    if unreachable > 0 {
        out!(
            "{unreachable} device(s) whose host holds their lease but cannot be reached by the workers (check the host's advertised URL, HOST_PUBLIC_URL, and the network between them): their messages wait; messages that found the host unreachable are skipped once that has lasted OFFLINE_GRACE_S"
        );
    }
    match queue {
        Ok(queue) => match queue.stats().await {
            Ok(st) => out!(
                "queue: {} visible, {} in flight, {} dead-lettered",
                st.visible,
                st.in_flight,
                st.dead_letter
            ),
            Err(e) => out!("queue: unavailable ({e})"),
        },
        Err(e) => out!("queue: unavailable ({e})"),
    }
    Ok(())
}

async fn create_sqs_queue(
    name: &str,
    endpoint: Option<String>,
    max_receives: u32,
    visibility_s: u64,
) -> Result<()> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let emulator_credentials =
        endpoint.is_some() && env("AWS_ACCESS_KEY_ID").is_none() && env("AWS_PROFILE").is_none();
    let region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| endpoint.as_ref().map(|_| "us-east-1".to_string()));
    let base = shared::queue::SqsQueueConfig {
        queue_url: String::new(),
        dlq_url: None,
        endpoint_url: endpoint.clone(),
        region: region.clone(),
        wait_time: std::time::Duration::ZERO,
        emulator_credentials,
        send_concurrency: shared::queue::DEFAULT_SEND_CONCURRENCY,
    };
    let q = shared::queue::SqsQueue::create_fifo_with_dlq(
        base,
        name,
        max_receives,
        std::time::Duration::from_secs(visibility_s),
    )
    .await?;
    out!("QUEUE_BACKEND=sqs");
    out!("SQS_QUEUE_URL={}", q.queue_url);
    if let Some(dlq) = q.dlq_url {
        out!("SQS_DLQ_URL={dlq}");
    }
    if let Some(e) = endpoint {
        out!("SQS_ENDPOINT_URL={e}");
    }
    if let Some(r) = region {
        out!("AWS_REGION={r}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_import_refuses_the_whole_file_on_any_bad_row() {
        let d = Uuid::new_v4();
        let devices = [("phone-1".to_string(), d), (d.to_string(), d)]
            .into_iter()
            .collect();
        let ok = "device,name,phone,niches,status,triggers\nphone-1,Ali,+60 12-345 6789,cars|loans,customer,COLD\nphone-1,,60198765432,cars,,\n";
        let leads = parse_leads_csv(ok, &devices).unwrap();
        assert_eq!(leads.len(), 2);
        assert_eq!(leads[0].phone.as_str(), "+60123456789");
        assert_eq!(leads[0].niches.len(), 2);
        assert_eq!(leads[1].status, LeadStatus::Prospect);
        let bad = "device,name,phone,niches,status\nphone-1,Ali,+60123456789,cars,prospect\nphone-9,Bo,+60123456780,cars,prospect\nphone-1,Cy,12ab,cars,prospect\nphone-1,Di,+60123456781,car$,prospect\n";
        let err = parse_leads_csv(bad, &devices).unwrap_err().to_string();
        assert!(
            err.contains("3 bad row(s)")
                && err.contains("line 3")
                && err.contains("line 4")
                && err.contains("line 5"),
            "{err}"
        );
        assert!(parse_leads_csv("name,phone\nA,+60123456789\n", &devices).is_err());
        // A name is greeted in messages and printed to terminals: a line break inside a cell
        // folds to a space; an escape sequence or a name past 100 characters is refused.
        let names = format!(
            "device,name,phone\nphone-1,\"Ali\r\n  Bin\",+60123456789\nphone-1,\"\u{1b}[2JEve\",+60123456780\nphone-1,{},+60123456781\n",
            "x".repeat(101)
        );
        let err = parse_leads_csv(&names, &devices).unwrap_err().to_string();
        assert!(
            err.contains("2 bad row(s)")
                && err.contains("line 4: name: holds the control character U+001B")
                && err.contains("line 5: name: is 101 characters long"),
            "{err}"
        );
        let one = "device,name,phone\nphone-1,\"Ali\r\n  Bin\",+60123456789\n";
        assert_eq!(parse_leads_csv(one, &devices).unwrap()[0].name, "Ali Bin");
        // One number twice for one device, written differently, once by label and once by id;
        // a quoted name spanning two lines counts its lines. Then the same from a spreadsheet:
        // a byte-order mark and CRLF line ends.
        let twice = format!(
            "device,name,phone\nphone-1,\"Ali\nBin\",+60123456789\nphone-1,Bo,+60198765432\n{d},Ali B,+60 12-345 6789\n"
        );
        let want = format!("line 5: +60123456789 for device \"{d}\" is already on line 2");
        for text in [
            twice.clone(),
            format!("\u{feff}{}", twice.replace('\n', "\r\n")),
        ] {
            let err = parse_leads_csv(&text, &devices).unwrap_err().to_string();
            assert!(err.contains("1 bad row(s)") && err.contains(&want), "{err}");
        }
    }

    /// Line numbers read each byte of the file once, however many records it has (counting
    /// from the start for every record made a 100,000-lead import quadratic), and stay right
    /// across CRLF, blank lines and a quoted field spanning lines.
    #[test]
    fn line_numbers_read_the_file_once() {
        let mut text = String::from("device,name,phone\r\n");
        let mut starts = Vec::new();
        for i in 0..20_000 {
            starts.push(text.len());
            if i == 7 {
                text.push_str("d,\"two\nlines\",+60123456789\r\n\r\n");
            } else {
                text.push_str("d,name,+60123456789\r\n");
            }
        }
        let mut lines = Lines::new(&text);
        let got: Vec<usize> = starts.iter().map(|s| lines.at(*s as u64)).collect();
        assert_eq!(&got[..10], &[2, 3, 4, 5, 6, 7, 8, 9, 12, 13]);
        assert_eq!(got[19_999], 20_000 + 1 + 2);
        assert!(
            lines.scanned <= text.len(),
            "{} of {}",
            lines.scanned,
            text.len()
        );
        // The same positions again (out of order): counted afresh, still right.
        assert_eq!(lines.at(starts[8] as u64), 12);
    }

    /// A bad step is refused naming which it is, a negative day included (the shell's `-1:…`
    /// reached clap as an unknown option before).
    #[test]
    fn a_sequence_step_is_days_and_a_template() {
        let args = [
            "wabcast",
            "sequence",
            "create",
            "--tenant",
            "t",
            "--name",
            "n",
            "--niche",
            "cars",
            "--trigger",
            "cold",
            "--time",
            "09:30",
            "--step",
            "0:Hi {name}",
            "--step",
            "-1:hi",
        ];
        let Command::Sequence(sequence::SequenceCmd::Create { steps, .. }) =
            <Cli as clap::Parser>::try_parse_from(args).unwrap().command
        else {
            panic!("not sequence create");
        };
        assert_eq!(steps, ["0:Hi {name}", "-1:hi"]);
        assert_eq!(
            sequence::parse_step(&steps[0]).unwrap(),
            (0, "Hi {name}".into())
        );
        for (bad, says) in [
            ("-1:hi", "0 to 3650"),
            ("3651:hi", "0 to 3650"),
            ("x:hi", "not a number of days"),
            ("hi", "DAYS:template"),
            ("1:{Hi|", "never closed"),
        ] {
            let err = format!("{:#}", sequence::parse_step(bad).unwrap_err());
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    /// The least time pacing needs: the busiest device's queue at its mean gap, after its
    /// cursor; the device's floor raises the campaign's range, never lowers it.
    #[test]
    fn pacing_floor_is_the_busiest_devices_queue_at_its_mean_gap() {
        let range = |a, b| DelayRange::new(a, b).unwrap();
        let queues = [
            DeviceQueue {
                label: "a",
                unsent: 10,
                next_in_s: -5.0,
                gap: range(0.0, 0.0),
            },
            DeviceQueue {
                label: "b",
                unsent: 4,
                next_in_s: 20.0,
                gap: range(100.0, 200.0),
            },
            DeviceQueue {
                label: "c",
                unsent: 0,
                next_in_s: 999.0,
                gap: range(500.0, 900.0),
            },
        ];
        // a: 9 gaps of 60 s (campaign 30-90) = 540 s; b: 20 s + 3 gaps of 150 s = 470 s.
        let (secs, q) = pacing_floor(&queues, range(30.0, 90.0)).unwrap();
        assert_eq!((secs, q.label), (540.0, "a"));
        let (secs, q) = pacing_floor(&queues, range(0.0, 0.0)).unwrap();
        assert_eq!((secs, q.label), (470.0, "b"));
        assert!(pacing_floor(&queues[2..], range(0.0, 0.0)).is_none());
        assert_eq!(human_duration(540.0), "9m 00s");
        assert_eq!(human_duration(3_725.0), "1h 02m");
        assert_eq!(human_duration(12.4), "12s");
    }

    /// An operator finds every command in `--help`: each (sub)command says what it does.
    #[test]
    fn every_command_has_a_description() {
        fn undescribed(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    out.push(path.clone());
                }
                undescribed(sub, &path, out);
            }
        }
        let cli = <Cli as clap::CommandFactory>::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        undescribed(&cli, "wabcast", &mut missing);
        assert!(missing.is_empty(), "no description: {missing:?}");
    }
}
