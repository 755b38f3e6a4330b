//! Pacing and retry timing. The per-device cursor itself lives in PostgreSQL (see
//! `repo::messages::claim_ready_messages`, which draws each gap uniformly in the effective range);
//! this module holds the rules that code and tests share. Nothing here may sleep.

use crate::domain::DelayRange;
use rand::Rng;
use std::time::Duration;

/// The gap range a message's send imposes on its device: the campaign's range, but never below
/// the device's own floor (a device configured at 30–90 s stays safe whatever a campaign says).
/// Whether local time `t` is inside quiet hours `[start, end)`; a window with `start > end`
/// wraps past midnight (22:00–08:00).
pub fn in_quiet_hours(
    t: chrono::NaiveTime,
    start: chrono::NaiveTime,
    end: chrono::NaiveTime,
) -> bool {
    if start <= end {
        start <= t && t < end
    } else {
        t >= start || t < end
    }
}

pub fn effective_range(device: DelayRange, campaign: DelayRange) -> DelayRange {
    let min_s = device.min_s.max(campaign.min_s);
    let max_s = device.max_s.max(campaign.max_s).max(min_s);
    DelayRange { min_s, max_s }
}

/// Exponential backoff with full jitter: a delay in [base·2^(n-1) / 2, base·2^(n-1)], capped.
pub fn retry_delay(attempt: i32, base: Duration, cap: Duration, rng: &mut impl Rng) -> Duration {
    let exp = attempt.clamp(1, 20) - 1;
    let ceiling = base.saturating_mul(1u32 << exp).min(cap);
    let half = ceiling / 2;
    let jitter = rng.random_range(0.0..=1.0);
    half + half.mul_f64(jitter)
}

/// min / median / max of a set of gaps in seconds, for reports.
pub fn gap_summary(mut gaps: Vec<f64>) -> Option<(f64, f64, f64)> {
    gaps.retain(|g| g.is_finite());
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_by(f64::total_cmp);
    let n = gaps.len();
    let median = if n % 2 == 1 {
        gaps[n / 2]
    } else {
        (gaps[n / 2 - 1] + gaps[n / 2]) / 2.0
    };
    Some((gaps[0], median, gaps[n - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_hours_may_wrap_past_midnight() {
        let t = |h, m| chrono::NaiveTime::from_hms_opt(h, m, 0).unwrap();
        assert!(in_quiet_hours(t(23, 0), t(22, 0), t(8, 0)));
        assert!(in_quiet_hours(t(3, 0), t(22, 0), t(8, 0)));
        assert!(!in_quiet_hours(t(8, 0), t(22, 0), t(8, 0)));
        assert!(!in_quiet_hours(t(12, 0), t(22, 0), t(8, 0)));
        assert!(in_quiet_hours(t(13, 0), t(12, 0), t(14, 0)));
        assert!(!in_quiet_hours(t(14, 0), t(12, 0), t(14, 0)));
        assert!(!in_quiet_hours(t(11, 59), t(12, 0), t(14, 0)));
    }
    use rand::SeedableRng;

    #[test]
    fn device_floor_wins() {
        let r = effective_range(
            DelayRange {
                min_s: 30.0,
                max_s: 90.0,
            },
            DelayRange {
                min_s: 1.0,
                max_s: 5.0,
            },
        );
        assert_eq!((r.min_s, r.max_s), (30.0, 90.0));
        let r = effective_range(
            DelayRange {
                min_s: 0.0,
                max_s: 0.0,
            },
            DelayRange {
                min_s: 2.0,
                max_s: 4.0,
            },
        );
        assert_eq!((r.min_s, r.max_s), (2.0, 4.0));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let base = Duration::from_secs(10);
        let cap = Duration::from_secs(300);
        for attempt in 1..=10 {
            let d = retry_delay(attempt, base, cap, &mut rng);
            let ceiling = (base * (1 << (attempt - 1))).min(cap);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn summary_of_gaps() {
        assert_eq!(gap_summary(vec![3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
        assert_eq!(gap_summary(vec![4.0, 1.0, 2.0, 3.0]), Some((1.0, 2.5, 4.0)));
        assert_eq!(gap_summary(vec![]), None);
    }
}
