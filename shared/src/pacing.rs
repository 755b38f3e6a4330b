//! Pacing and retry timing. The per-device cursor itself lives in PostgreSQL (see
//! `repo::messages::claim_ready_messages`, which draws each gap uniformly in the effective range);
//! this module holds the rules that code and tests share. Nothing here may sleep.

use crate::domain::DelayRange;
use rand::Rng;
use std::time::Duration;

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

/// The gap range a message's send imposes on its device: the campaign's range, but never below
/// the device's own floor (a device configured at 30–90 s stays safe whatever a campaign says).
pub fn effective_range(device: DelayRange, campaign: DelayRange) -> DelayRange {
    let min_s = device.min_s.max(campaign.min_s);
    let max_s = device.max_s.max(campaign.max_s).max(min_s);
    DelayRange { min_s, max_s }
}

/// The range the processor draws a gap from, for a processor that claims every `tick`: the
/// effective range with its top lowered by one tick, never below its bottom.
///
/// The device's cursor comes due at acceptance + gap, and the claim that takes its next message
/// runs up to one tick later, so a real gap between two sends is the drawn gap plus that wait
/// (uniform in [0, tick)) plus one pass through queue, worker and host. Drawn from the whole
/// range, real gaps ran up to a tick past the maximum (the demo: median 1.0 s for 0.5–1.0 s at
/// a 0.2 s tick). Drawn from this one they stay within [min, max] plus the pass, and never
/// below the minimum, which is what protects the number. A range narrower than a tick draws
/// its minimum. A paced range (maximum above zero) never draws below [`MIN_PACED_GAP_S`]: a
/// zero gap means unpaced (a device then takes a burst of messages per claim), which 0–0.5 s
/// with a 1 s tick must not become. `repo::messages::claim_ready_messages` applies this rule in
/// SQL.
pub fn draw_range(range: DelayRange, tick: Duration) -> DelayRange {
    let min_s = if range.max_s > 0.0 {
        range.min_s.max(MIN_PACED_GAP_S)
    } else {
        range.min_s
    };
    DelayRange {
        min_s,
        max_s: (range.max_s - tick.as_secs_f64()).max(min_s),
    }
}

/// The smallest gap a paced range draws (1 ms; see [`draw_range`]).
pub const MIN_PACED_GAP_S: f64 = 0.001;

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
    fn the_draw_leaves_a_tick_of_the_range_for_the_wait() {
        let r = |min_s, max_s| DelayRange { min_s, max_s };
        let d = draw_range(r(30.0, 90.0), Duration::from_secs(1));
        assert_eq!((d.min_s, d.max_s), (30.0, 89.0));
        let d = draw_range(r(0.5, 1.0), Duration::from_millis(200));
        assert_eq!(d.min_s, 0.5);
        assert!((d.max_s - 0.8).abs() < 1e-9);
        // narrower than a tick: the minimum, never less
        let d = draw_range(r(10.0, 10.5), Duration::from_secs(1));
        assert_eq!((d.min_s, d.max_s), (10.0, 10.0));
        // unpaced stays unpaced; paced stays paced, however narrow
        let d = draw_range(r(0.0, 0.0), Duration::from_secs(1));
        assert_eq!((d.min_s, d.max_s), (0.0, 0.0));
        let d = draw_range(r(0.0, 0.5), Duration::from_secs(1));
        assert_eq!((d.min_s, d.max_s), (MIN_PACED_GAP_S, MIN_PACED_GAP_S));
        let d = draw_range(r(0.0, 3.0), Duration::from_secs(1));
        assert_eq!((d.min_s, d.max_s), (MIN_PACED_GAP_S, 2.0));
        // no tick, no change
        let d = draw_range(r(2.0, 4.0), Duration::ZERO);
        assert_eq!((d.min_s, d.max_s), (2.0, 4.0));
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
