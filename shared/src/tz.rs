//! Local dates and times to UTC instants, with the IANA time zone database (chrono-tz).
//! Converted once, at the edge; the database stores only UTC.

use crate::domain::InvalidInput;
use chrono::{DateTime, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The zone a new tenant gets.
pub const DEFAULT_TIME_ZONE: &str = "Asia/Kuala_Lumpur";

pub fn parse_zone(name: &str) -> Result<Tz, InvalidInput> {
    name.trim()
        .parse::<Tz>()
        .map_err(|_| InvalidInput::new("time_zone", format!("{name:?} is not an IANA time zone")))
}

/// How far in the past a campaign's local date and time may lie and still mean "now": the time
/// it takes to type the command. Anything earlier is refused, since a year or a day typed wrong
/// would otherwise send a whole campaign at once.
pub const SCHEDULE_GRACE: chrono::Duration = chrono::Duration::seconds(60);

/// When a campaign is due, from the local date and time a user gave in the tenant's `zone`:
/// neither means now; a time alone means that time today (local); a date needs a time. A moment
/// more than [`SCHEDULE_GRACE`] before `now` is refused with both clocks in the message.
pub fn resolve_schedule(
    zone: Tz,
    date: Option<NaiveDate>,
    time: Option<NaiveTime>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, InvalidInput> {
    let time = match (date, time) {
        (None, None) => return Ok(now),
        (Some(date), None) => {
            return Err(InvalidInput::new(
                "time",
                format!("{date} needs a local time of day (HH:MM); give neither to send now"),
            ))
        }
        (_, Some(time)) => time,
    };
    let date = date.unwrap_or_else(|| now.with_timezone(&zone).date_naive());
    let at = resolve_local(zone, date, time)?;
    if at < now - SCHEDULE_GRACE {
        return Err(InvalidInput::new(
            "time",
            format!(
                "{date} {} in {zone} is in the past (it is {} there now); give neither date nor \
                 time to send now",
                time.format("%H:%M"),
                now.with_timezone(&zone).format("%Y-%m-%d %H:%M"),
            ),
        ));
    }
    Ok(at)
}

/// Resolves a local date and time in `zone` to an instant. In a daylight-saving gap the first
/// valid instant after the gap is used; in a repeated hour, the earlier of the two instants.
pub fn resolve_local(
    zone: Tz,
    date: NaiveDate,
    time: NaiveTime,
) -> Result<DateTime<Utc>, InvalidInput> {
    let local = date.and_time(time);
    match zone.from_local_datetime(&local) {
        LocalResult::Single(t) => Ok(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(early, _) => Ok(early.with_timezone(&Utc)),
        LocalResult::None => {
            // Walk forward minute by minute out of the gap (gaps are at most a few hours).
            for minutes in 1..=180 {
                let probe = local + chrono::Duration::minutes(minutes);
                if let LocalResult::Single(t) | LocalResult::Ambiguous(t, _) =
                    zone.from_local_datetime(&probe)
                {
                    return Ok(t.with_timezone(&Utc));
                }
            }
            Err(InvalidInput::new(
                "time",
                format!("{local} does not exist in {zone}"),
            ))
        }
    }
}

/// The instant `days` days after the local `date`, at local `time` in `zone` (a sequence step:
/// enrollment date + day offset at the sequence's time of day). DST gaps and repeats resolve as
/// in [`resolve_local`].
pub fn resolve_days_after(
    zone: Tz,
    date: NaiveDate,
    days: i32,
    time: NaiveTime,
) -> Result<DateTime<Utc>, InvalidInput> {
    let date = date
        .checked_add_days(chrono::Days::new(days.max(0) as u64))
        .ok_or_else(|| InvalidInput::new("day_offset", "date out of range"))?;
    resolve_local(zone, date, time)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }
    fn t(h: u32, min: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, min, 0).unwrap()
    }

    #[test]
    fn kuala_lumpur_is_utc_plus_8() {
        let z = parse_zone("Asia/Kuala_Lumpur").unwrap();
        let at = resolve_local(z, d(2026, 11, 25), t(9, 0)).unwrap();
        assert_eq!(at.to_rfc3339(), "2026-11-25T01:00:00+00:00");
    }

    #[test]
    fn a_campaign_is_due_now_at_a_later_local_time_and_never_in_the_past() {
        let z = zone("Asia/Kuala_Lumpur");
        // 2026-12-05 17:12:30 in Kuala Lumpur.
        let now = Utc.with_ymd_and_hms(2026, 12, 5, 9, 12, 30).unwrap();
        let at = |date, time| resolve_schedule(z, date, time, now);
        assert_eq!(at(None, None).unwrap(), now);
        // A time alone is today's, local: 18:00 local is 10:00 UTC.
        assert_eq!(
            at(None, Some(t(18, 0))).unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 5, 10, 0, 0).unwrap()
        );
        assert_eq!(
            at(Some(d(2027, 1, 2)), Some(t(9, 0))).unwrap(),
            Utc.with_ymd_and_hms(2027, 1, 2, 1, 0, 0).unwrap()
        );
        // The minute it is now still counts as now.
        assert_eq!(
            at(None, Some(t(17, 12))).unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 5, 9, 12, 0).unwrap()
        );
        // A date without a time would have meant "now" whatever the date: refused.
        let no_time = at(Some(d(2027, 1, 2)), None).unwrap_err().to_string();
        assert!(
            no_time.contains("2027-01-02 needs a local time"),
            "{no_time}"
        );
        // Earlier today, or a year typed wrong: refused, with the local clock to compare.
        for (date, time) in [(None, t(17, 10)), (Some(d(2025, 12, 5)), t(18, 0))] {
            let err = at(date, Some(time)).unwrap_err().to_string();
            assert!(
                err.contains("is in the past") && err.contains("2026-12-05 17:12 there now"),
                "{err}"
            );
        }
    }

    #[test]
    fn daylight_saving_gap_and_repeat() {
        let z = parse_zone("America/New_York").unwrap();
        // 2026-03-08 02:30 does not exist: the clock jumps 02:00 -> 03:00 EDT (07:00 UTC).
        let gap = resolve_local(z, d(2026, 3, 8), t(2, 30)).unwrap();
        assert_eq!(gap.to_rfc3339(), "2026-03-08T07:00:00+00:00");
        // 2026-11-01 01:30 happens twice; the earlier (EDT, 05:30 UTC) is used.
        let rep = resolve_local(z, d(2026, 11, 1), t(1, 30)).unwrap();
        assert_eq!(rep.to_rfc3339(), "2026-11-01T05:30:00+00:00");
    }

    #[test]
    fn unknown_zone_is_refused() {
        assert!(parse_zone("Mars/Olympus").is_err());
    }

    fn zone(name: &str) -> Tz {
        parse_zone(name).unwrap()
    }

    #[test]
    fn steps_fall_due_at_the_local_time_of_day_in_the_tenants_zone() {
        // Kuala Lumpur, UTC+8 all year: day 2 at 09:00 local is 01:00 UTC.
        assert_eq!(
            resolve_days_after(zone("Asia/Kuala_Lumpur"), d(2026, 11, 25), 2, t(9, 0)).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 27, 1, 0, 0).unwrap()
        );
        let ny = zone("America/New_York");
        // The same local time on both sides of the spring change is an hour apart in UTC.
        assert_eq!(
            resolve_days_after(ny, d(2026, 3, 7), 0, t(9, 0)).unwrap(),
            Utc.with_ymd_and_hms(2026, 3, 7, 14, 0, 0).unwrap()
        );
        assert_eq!(
            resolve_days_after(ny, d(2026, 3, 7), 1, t(9, 0)).unwrap(),
            Utc.with_ymd_and_hms(2026, 3, 8, 13, 0, 0).unwrap()
        );
        // 02:30 does not exist on 8 March 2026: the first instant after the gap, 03:00 EDT.
        assert_eq!(
            resolve_days_after(ny, d(2026, 3, 7), 1, t(2, 30)).unwrap(),
            Utc.with_ymd_and_hms(2026, 3, 8, 7, 0, 0).unwrap()
        );
        // 01:30 happens twice on 1 November 2026: the earlier one, still EDT.
        assert_eq!(
            resolve_days_after(ny, d(2026, 10, 31), 1, t(1, 30)).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 1, 5, 30, 0).unwrap()
        );
    }
}
