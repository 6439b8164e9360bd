//! Schedules (Knock's managed crons): the occurrences of a set of repeat
//! rules in a recipient's time zone, and what to do about the ones that are
//! due. Pure: the caller passes the time (tests inject any clock).
//!
//! Rules, as herald reads Knock's `ScheduleRepeatRule` (Knock leaves some of
//! this undocumented):
//! - `hourly`: every hour at `minutes` (local wall-clock hours); `days`, if
//!   given, limits the days.
//! - `daily`: every day at `hours:minutes`; `days` limits the days.
//! - `weekly`: on `days` (default: the weekday of the schedule's start) at `hours:minutes`.
//! - `monthly`: on `day_of_month` (default: the start's day; past the end of
//!   a short month, its last day) at `hours:minutes`.
//! - `interval` (default 1) counts hours, days, weeks (Monday to Sunday) or
//!   calendar months from the schedule's start (`scheduled_at`, else when the
//!   schedule was created), in the recipient's zone: `weekly` with interval 2
//!   fires in the start's week, then every other week.
//! - Several rules: the earliest next match of any of them.
//! - Local times follow the zone's daylight-saving changes: 09:00 stays 09:00
//!   local on both sides; a time a change skips (02:30 on a spring-forward
//!   night) moves forward by the gap (03:30); a time that happens twice (fall
//!   back) is taken the first time.
//! - `scheduled_at` is the only occurrence of a schedule without rules, and
//!   the earliest moment of one with rules; `ending_at` is the latest.

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use super::windows::parse_days;

/// How often a rule fires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Frequency {
    Hourly,
    #[default]
    Daily,
    Weekly,
    Monthly,
}

/// One of Knock's repeat rules (`ScheduleRepeatRule`), as a Schedule's
/// `spec.repeats` stores it. Also read in Knock's snake_case (`day_of_month`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepeatRule {
    /// `hourly`, `daily`, `weekly` or `monthly`.
    pub frequency: Frequency,
    /// Every `interval` hours, days, weeks or months, counted from the schedule's start (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub interval: Option<i32>,
    /// Days of the week: a list (`[mon, tue]`), or `weekdays` / `weekends` (as a string, or the only entry of the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub days: Option<Value>,
    /// For `monthly`: the day of the month, 1 to 31 (the last day of shorter months).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "day_of_month")]
    #[schemars(range(min = 1, max = 31))]
    pub day_of_month: Option<i32>,
    /// The hour, 0 to 23, in the recipient's time zone (default 0; `hourly` ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 23))]
    pub hours: Option<i32>,
    /// The minute, 0 to 59 (default 0; Knock allows multiples of 5, herald any minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 59))]
    pub minutes: Option<i32>,
}

/// The largest interval per frequency (a year or so: every occurrence search stays short).
fn max_interval(frequency: Frequency) -> i32 {
    match frequency {
        Frequency::Hourly => 24 * 31,
        Frequency::Daily => 366,
        Frequency::Weekly => 53,
        Frequency::Monthly => 12,
    }
}

/// A checked rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub frequency: Frequency,
    pub interval: i64,
    pub days: Option<Vec<Weekday>>,
    pub hours: i8,
    pub minutes: i8,
    pub day_of_month: Option<i8>,
}

impl Rule {
    /// Checks a rule; the error names the field.
    pub fn parse(rule: &RepeatRule) -> Result<Rule, String> {
        let interval = rule.interval.unwrap_or(1);
        let max = max_interval(rule.frequency);
        if !(1..=max).contains(&interval) {
            return Err(format!("interval must be 1 to {max} for a {:?} rule, not {interval}", rule.frequency).to_lowercase());
        }
        let hours = rule.hours.unwrap_or(0);
        if !(0..24).contains(&hours) {
            return Err(format!("hours must be 0 to 23, not {hours}"));
        }
        let minutes = rule.minutes.unwrap_or(0);
        if !(0..60).contains(&minutes) {
            return Err(format!("minutes must be 0 to 59, not {minutes}"));
        }
        let day_of_month = match rule.day_of_month {
            None => None,
            Some(d) if (1..=31).contains(&d) => Some(d as i8),
            Some(d) => return Err(format!("day_of_month must be 1 to 31, not {d}")),
        };
        if day_of_month.is_some() && rule.frequency != Frequency::Monthly {
            return Err("day_of_month is only for monthly rules".into());
        }
        let days = parse_days(rule.days.as_ref())?;
        if days.is_some() && rule.frequency == Frequency::Monthly {
            return Err("days is not for monthly rules (use day_of_month)".into());
        }
        Ok(Rule { frequency: rule.frequency, interval: interval as i64, days, hours: hours as i8, minutes: minutes as i8, day_of_month })
    }

    /// The first occurrence strictly after `t`, in `zone`, for a schedule
    /// starting at `anchor` (local date and time in `zone`), or None within
    /// the search horizon (about two years).
    fn next_after(&self, t: Timestamp, zone: &TimeZone, anchor: DateTime) -> Option<Timestamp> {
        let from = t.to_zoned(zone.clone()).date();
        let anchor_date = anchor.date();
        let anchor_week = monday_of(anchor_date);
        let days = self.days.clone().unwrap_or_else(|| match self.frequency {
            Frequency::Weekly => vec![anchor_date.weekday()],
            _ => ALL_DAYS.to_vec(),
        });
        for offset in 0..800 {
            let date = from.checked_add(offset.days()).ok()?;
            let date_ok = match self.frequency {
                Frequency::Hourly | Frequency::Daily => days.contains(&date.weekday()),
                Frequency::Weekly => days.contains(&date.weekday()) && (weeks_between(anchor_week, monday_of(date))).rem_euclid(self.interval) == 0,
                Frequency::Monthly => {
                    let wanted = self.day_of_month.unwrap_or(anchor_date.day()).min(date.days_in_month());
                    date.day() == wanted && months_between(anchor_date, date).rem_euclid(self.interval) == 0
                }
            };
            if !date_ok {
                continue;
            }
            if self.frequency == Frequency::Daily && days_between(anchor_date, date).rem_euclid(self.interval) != 0 {
                continue;
            }
            let hours: Vec<i8> = match self.frequency {
                Frequency::Hourly => (0..24).collect(),
                _ => vec![self.hours],
            };
            for h in hours {
                if self.frequency == Frequency::Hourly {
                    let since = days_between(anchor_date, date) * 24 + h as i64 - anchor.hour() as i64;
                    if since.rem_euclid(self.interval) != 0 {
                        continue;
                    }
                }
                let at = local(date, Time::new(h, self.minutes, 0, 0).ok()?, zone)?;
                if at > t {
                    return Some(at);
                }
            }
        }
        None
    }
}

const ALL_DAYS: [Weekday; 7] = [Weekday::Monday, Weekday::Tuesday, Weekday::Wednesday, Weekday::Thursday, Weekday::Friday, Weekday::Saturday, Weekday::Sunday];

fn monday_of(date: Date) -> Date {
    date.checked_sub((date.weekday().to_monday_zero_offset() as i64).days()).unwrap_or(date)
}

fn days_between(a: Date, b: Date) -> i64 {
    a.until(b).map(|span| span.get_days() as i64).unwrap_or(0)
}

fn weeks_between(a: Date, b: Date) -> i64 {
    days_between(a, b).div_euclid(7)
}

fn months_between(a: Date, b: Date) -> i64 {
    (b.year() as i64 - a.year() as i64) * 12 + (b.month() as i64 - a.month() as i64)
}

/// A local date and time in `zone` as an instant: a time skipped by a
/// daylight-saving change moves forward by the gap, a repeated one is taken
/// the first time (jiff's "compatible" disambiguation, as RFC 5545 does).
fn local(date: Date, time: Time, zone: &TimeZone) -> Option<Timestamp> {
    super::windows::local(date, time, zone).ok()
}

/// A schedule's timing: its rules, start and end.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// No rules: a one-off at `start`.
    pub rules: Vec<Rule>,
    /// `scheduled_at`, else when the schedule was created: no occurrence is earlier.
    pub start: Timestamp,
    /// No occurrence is later.
    pub ending_at: Option<Timestamp>,
}

impl Plan {
    /// A plan from a schedule's fields. `scheduled_at` or rules are required.
    pub fn new(repeats: &[RepeatRule], scheduled_at: Option<Timestamp>, ending_at: Option<Timestamp>, created: Timestamp) -> Result<Plan, String> {
        if repeats.is_empty() && scheduled_at.is_none() {
            return Err("a schedule needs scheduledAt (once) or repeats".into());
        }
        if repeats.len() > 20 {
            return Err(format!("{} repeat rules; at most 20", repeats.len()));
        }
        let rules = repeats.iter().enumerate().map(|(i, r)| Rule::parse(r).map_err(|e| format!("repeats[{i}]: {e}"))).collect::<Result<Vec<_>, _>>()?;
        Ok(Plan { rules, start: scheduled_at.unwrap_or(created), ending_at })
    }

    /// Whether the plan is a one-off.
    pub fn is_once(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first occurrence strictly after `t` in `zone` (None: no more).
    pub fn next_after(&self, t: Timestamp, zone: &TimeZone) -> Option<Timestamp> {
        let next = if self.is_once() {
            Some(self.start).filter(|s| *s > t)
        } else {
            // No occurrence before the start (one at the start itself counts).
            let from = t.max(self.start - SignedDuration::from_nanos(1));
            let anchor = self.start.to_zoned(zone.clone()).datetime();
            self.rules.iter().filter_map(|r| r.next_after(from, zone, anchor)).min()
        };
        next.filter(|n| self.ending_at.is_none_or(|end| *n <= end))
    }

    /// The first occurrence at or after the start.
    pub fn first(&self, zone: &TimeZone) -> Option<Timestamp> {
        self.next_after(self.start - SignedDuration::from_nanos(1), zone)
    }
}

/// What is due for one recipient at `now`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Due {
    /// The occurrence to fire now: the latest one due, if within the catch-up window.
    pub fire: Option<Timestamp>,
    /// Occurrences passed over (earlier ones, or the latest when it is too old); counted up to [`MAX_COUNTED`].
    pub skipped: u32,
    /// The latest occurrence passed over (of those counted).
    pub last_skipped: Option<Timestamp>,
    /// The first occurrence after `now` (None: the schedule has ended for this recipient).
    pub next: Option<Timestamp>,
}

/// Skipped occurrences counted one by one before the rest are passed over at once.
pub const MAX_COUNTED: u32 = 1000;

/// Decides what is due for a recipient whose occurrences up to `through`
/// (the last fired or skipped; None: none yet) are dealt with.
///
/// Only one occurrence is ever fired at once: after downtime, the latest
/// occurrence that is due fires if it is at most `catch_up` old; every
/// earlier one, and the latest too when older, is skipped (and counted).
pub fn due(plan: &Plan, zone: &TimeZone, through: Option<Timestamp>, now: Timestamp, catch_up: SignedDuration) -> Due {
    let floor = now - catch_up.max(SignedDuration::ZERO);
    let mut out = Due::default();
    let mut cursor = through.unwrap_or(plan.start - SignedDuration::from_nanos(1));
    let mut latest: Option<Timestamp> = None;
    while let Some(t) = plan.next_after(cursor, zone).filter(|t| *t <= now) {
        if let Some(previous) = latest {
            out.skipped = out.skipped.saturating_add(1);
            out.last_skipped = Some(previous);
        }
        latest = Some(t);
        cursor = t;
        // A long outage: the old occurrences are passed over without counting each one.
        if out.skipped >= MAX_COUNTED && t < floor {
            out.last_skipped = Some(t);
            latest = None;
            cursor = cursor.max(floor - SignedDuration::from_nanos(1));
        }
    }
    match latest {
        Some(t) if t >= floor => out.fire = Some(t),
        Some(t) => {
            out.skipped = out.skipped.saturating_add(1);
            out.last_skipped = Some(t);
        }
        None => {}
    }
    out.next = plan.next_after(now, zone);
    out
}

/// A recipient's time zone: its `timezone` (an IANA name), else the
/// namespace default, else UTC. An unknown name counts as absent.
pub fn zone_for(recipient_timezone: Option<&str>, namespace_default: Option<&str>) -> (TimeZone, String) {
    for name in [recipient_timezone, namespace_default].into_iter().flatten() {
        if let Ok(zone) = TimeZone::get(name) {
            return (zone, name.to_string());
        }
    }
    (TimeZone::UTC, "UTC".into())
}

/// A clock for schedules: the real one, or (tests) one that starts at a
/// chosen instant and runs `speed` times faster than real time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clock {
    /// The real instant the clock was started.
    pub real_origin: Timestamp,
    /// What the clock read then.
    pub origin: Timestamp,
    /// How many clock seconds pass per real second.
    pub speed: u32,
}

impl Clock {
    /// A clock reading `origin` now, running `speed` times real time.
    pub fn fast(origin: Timestamp, speed: u32) -> Clock {
        Clock { real_origin: Timestamp::now(), origin, speed: speed.max(1) }
    }

    /// The time on this clock.
    pub fn now(&self) -> Timestamp {
        let elapsed = Timestamp::now().duration_since(self.real_origin);
        self.origin.checked_add(elapsed * self.speed as i32).unwrap_or(Timestamp::MAX)
    }

    /// The real time until the clock reads `t` (zero when it already has).
    pub fn real_until(&self, t: Timestamp) -> std::time::Duration {
        let clock = t.duration_since(self.now());
        std::time::Duration::try_from(clock / self.speed as i32).unwrap_or_default()
    }
}

/// The schedule id Knock's API shows for one recipient of a Schedule:
/// UUID v5 of its canonical recipient key under the Schedule's uid.
pub fn schedule_id(schedule_uid: &str, canonical_recipient: &str) -> String {
    let namespace = uuid::Uuid::parse_str(schedule_uid).unwrap_or_else(|_| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, schedule_uid.as_bytes()));
    uuid::Uuid::new_v5(&namespace, canonical_recipient.as_bytes()).to_string()
}

/// The name of the TriggerRun of one occurrence for one recipient: the same
/// from every replica, after restarts and on retries, so the Kubernetes API
/// refuses a second one (AlreadyExists = already fired).
pub fn run_name(schedule_name: &str, schedule_uid: &str, canonical_recipient: &str, occurrence: Timestamp) -> String {
    let prefix: String = schedule_name.chars().take(40).collect();
    let prefix = prefix.trim_end_matches(['-', '.']);
    let hash = super::ids::short_hash(&format!("{schedule_uid}\u{0}{canonical_recipient}\u{0}{}", occurrence.as_second()), 16);
    format!("{prefix}-{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn zone(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    fn rule(v: Value) -> RepeatRule {
        serde_json::from_value(v).unwrap()
    }

    fn plan(rules: Vec<Value>, start: &str) -> Plan {
        Plan::new(&rules.into_iter().map(rule).collect::<Vec<_>>(), None, None, t(start)).unwrap()
    }

    /// The next `n` occurrences after `from`.
    fn occurrences(plan: &Plan, zone: &TimeZone, from: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut cursor = t(from);
        while out.len() < n {
            let Some(next) = plan.next_after(cursor, zone) else { break };
            out.push(next.to_string());
            cursor = next;
        }
        out
    }

    #[test]
    fn daily_at_nine_in_several_zones() {
        // Created Monday 2026-03-02 00:00 UTC.
        let p = plan(vec![json!({"frequency": "daily", "hours": 9})], "2026-03-02T00:00:00Z");
        assert_eq!(occurrences(&p, &TimeZone::UTC, "2026-03-02T00:00:00Z", 2), ["2026-03-02T09:00:00Z", "2026-03-03T09:00:00Z"]);
        assert_eq!(occurrences(&p, &zone("Europe/Paris"), "2026-03-02T00:00:00Z", 2), ["2026-03-02T08:00:00Z", "2026-03-03T08:00:00Z"]);
        assert_eq!(occurrences(&p, &zone("Asia/Tokyo"), "2026-03-02T00:00:00Z", 2), ["2026-03-03T00:00:00Z", "2026-03-04T00:00:00Z"]);
        assert_eq!(occurrences(&p, &zone("Asia/Kolkata"), "2026-03-02T00:00:00Z", 1), ["2026-03-02T03:30:00Z"]);
        // In Tokyo, 09:00 on 2026-03-02 local was 00:00Z, the creation instant itself: it counts.
        assert_eq!(p.first(&zone("Asia/Tokyo")), Some(t("2026-03-02T00:00:00Z")));
    }

    #[test]
    fn nine_local_on_both_sides_of_daylight_saving_changes() {
        let ny = zone("America/New_York");
        let p = plan(vec![json!({"frequency": "daily", "hours": 9})], "2026-03-01T00:00:00Z");
        // New York springs forward on 2026-03-08: 09:00 EST is 14:00Z, 09:00 EDT is 13:00Z.
        assert_eq!(occurrences(&p, &ny, "2026-03-07T00:00:00Z", 3), ["2026-03-07T14:00:00Z", "2026-03-08T13:00:00Z", "2026-03-09T13:00:00Z"]);
        // ...and falls back on 2026-11-01.
        assert_eq!(occurrences(&p, &ny, "2026-10-31T00:00:00Z", 2), ["2026-10-31T13:00:00Z", "2026-11-01T14:00:00Z"]);
        // Paris changes on 2026-03-29.
        assert_eq!(occurrences(&p, &zone("Europe/Paris"), "2026-03-28T00:00:00Z", 2), ["2026-03-28T08:00:00Z", "2026-03-29T07:00:00Z"]);
        // Sydney (southern hemisphere) falls back on 2026-04-05 at 03:00: 09:00 AEDT on the 4th is 22:00Z, 09:00 AEST on the 5th 23:00Z.
        assert_eq!(occurrences(&p, &zone("Australia/Sydney"), "2026-04-03T12:00:00Z", 2), ["2026-04-03T22:00:00Z", "2026-04-04T23:00:00Z"]);
    }

    #[test]
    fn a_skipped_local_time_moves_forward() {
        let ny = zone("America/New_York");
        // 02:30 does not exist in New York on 2026-03-08: it fires at 03:30 EDT (07:30Z).
        let p = plan(vec![json!({"frequency": "daily", "hours": 2, "minutes": 30})], "2026-03-01T00:00:00Z");
        assert_eq!(occurrences(&p, &ny, "2026-03-07T00:00:00Z", 3), ["2026-03-07T07:30:00Z", "2026-03-08T07:30:00Z", "2026-03-09T06:30:00Z"]);
        // 01:30 happens twice on 2026-11-01: it fires once, the first time (EDT, 05:30Z).
        let p = plan(vec![json!({"frequency": "daily", "hours": 1, "minutes": 30})], "2026-10-01T00:00:00Z");
        assert_eq!(occurrences(&p, &ny, "2026-10-31T12:00:00Z", 2), ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]);
        // Hourly across the spring-forward night: local hours, the skipped one folds into the next.
        let p = plan(vec![json!({"frequency": "hourly", "minutes": 0})], "2026-03-01T00:00:00Z");
        assert_eq!(
            occurrences(&p, &ny, "2026-03-08T05:30:00Z", 3),
            ["2026-03-08T06:00:00Z", "2026-03-08T07:00:00Z", "2026-03-08T08:00:00Z"],
            "01:00 EST, then 03:00 EDT (02:00 skipped), then 04:00 EDT"
        );
    }

    #[test]
    fn weekly_days_weekdays_weekends_and_intervals() {
        let ny = zone("America/New_York");
        // Created Monday 2026-03-02 (UTC).
        let weekdays = plan(vec![json!({"frequency": "weekly", "days": "weekdays", "hours": 10, "minutes": 30})], "2026-03-02T00:00:00Z");
        let got = occurrences(&weekdays, &TimeZone::UTC, "2026-03-05T12:00:00Z", 3);
        assert_eq!(got, ["2026-03-06T10:30:00Z", "2026-03-09T10:30:00Z", "2026-03-10T10:30:00Z"]);
        let weekends = plan(vec![json!({"frequency": "weekly", "days": ["weekends"], "hours": 8})], "2026-03-02T00:00:00Z");
        assert_eq!(occurrences(&weekends, &TimeZone::UTC, "2026-03-02T00:00:00Z", 3), ["2026-03-07T08:00:00Z", "2026-03-08T08:00:00Z", "2026-03-14T08:00:00Z"]);
        // Knock's example: every other week on mon, tue, fri at 18:00, in New York.
        let biweekly = plan(vec![json!({"frequency": "weekly", "interval": 2, "days": ["mon", "tue", "fri"], "hours": 18})], "2026-03-02T12:00:00Z");
        assert_eq!(
            occurrences(&biweekly, &ny, "2026-03-02T12:00:00Z", 5),
            ["2026-03-02T23:00:00Z", "2026-03-03T23:00:00Z", "2026-03-06T23:00:00Z", "2026-03-16T22:00:00Z", "2026-03-17T22:00:00Z"]
        );
        // Weekly without days: the start's weekday (a Wednesday here).
        let wed = plan(vec![json!({"frequency": "weekly", "hours": 9})], "2026-03-04T12:00:00Z");
        assert_eq!(occurrences(&wed, &TimeZone::UTC, "2026-03-04T12:00:00Z", 2), ["2026-03-11T09:00:00Z", "2026-03-18T09:00:00Z"]);
    }

    #[test]
    fn hourly_daily_and_monthly_intervals() {
        let every_3h = plan(vec![json!({"frequency": "hourly", "interval": 3, "minutes": 15})], "2026-03-02T10:40:00Z");
        assert_eq!(occurrences(&every_3h, &TimeZone::UTC, "2026-03-02T10:40:00Z", 3), ["2026-03-02T13:15:00Z", "2026-03-02T16:15:00Z", "2026-03-02T19:15:00Z"]);
        let weekday_hours = plan(vec![json!({"frequency": "hourly", "days": ["sat"], "minutes": 0})], "2026-03-02T00:00:00Z");
        assert_eq!(occurrences(&weekday_hours, &TimeZone::UTC, "2026-03-02T00:00:00Z", 2), ["2026-03-07T00:00:00Z", "2026-03-07T01:00:00Z"]);
        let every_other_day = plan(vec![json!({"frequency": "daily", "interval": 2, "hours": 7})], "2026-03-02T08:00:00Z");
        assert_eq!(occurrences(&every_other_day, &TimeZone::UTC, "2026-03-02T08:00:00Z", 2), ["2026-03-04T07:00:00Z", "2026-03-06T07:00:00Z"]);
        // The 31st: the last day of shorter months.
        let month_end = plan(vec![json!({"frequency": "monthly", "day_of_month": 31, "hours": 12})], "2026-01-05T00:00:00Z");
        assert_eq!(
            occurrences(&month_end, &TimeZone::UTC, "2026-01-05T00:00:00Z", 4),
            ["2026-01-31T12:00:00Z", "2026-02-28T12:00:00Z", "2026-03-31T12:00:00Z", "2026-04-30T12:00:00Z"]
        );
        let quarterly = plan(vec![json!({"frequency": "monthly", "interval": 3, "dayOfMonth": 1})], "2026-01-01T00:00:00Z");
        assert_eq!(occurrences(&quarterly, &TimeZone::UTC, "2026-01-01T00:00:00Z", 3), ["2026-04-01T00:00:00Z", "2026-07-01T00:00:00Z", "2026-10-01T00:00:00Z"]);
        assert_eq!(quarterly.first(&TimeZone::UTC), Some(t("2026-01-01T00:00:00Z")));
    }

    #[test]
    fn several_rules_take_the_earliest() {
        let p = plan(vec![json!({"frequency": "daily", "hours": 18}), json!({"frequency": "weekly", "days": ["mon"], "hours": 9})], "2026-03-01T00:00:00Z");
        assert_eq!(occurrences(&p, &TimeZone::UTC, "2026-03-01T00:00:00Z", 3), ["2026-03-01T18:00:00Z", "2026-03-02T09:00:00Z", "2026-03-02T18:00:00Z"]);
    }

    #[test]
    fn one_off_start_and_end() {
        let once = Plan::new(&[], Some(t("2026-03-02T10:00:00Z")), None, t("2026-03-01T00:00:00Z")).unwrap();
        assert!(once.is_once());
        assert_eq!(once.next_after(t("2026-03-02T09:00:00Z"), &zone("Asia/Tokyo")), Some(t("2026-03-02T10:00:00Z")));
        assert_eq!(once.next_after(t("2026-03-02T10:00:00Z"), &TimeZone::UTC), None);
        // scheduled_at starts a recurring schedule; ending_at stops it (an occurrence at the end still counts).
        let rules = [rule(json!({"frequency": "daily", "hours": 9}))];
        let bounded = Plan::new(&rules, Some(t("2026-03-05T00:00:00Z")), Some(t("2026-03-07T09:00:00Z")), t("2026-03-01T00:00:00Z")).unwrap();
        assert_eq!(occurrences(&bounded, &TimeZone::UTC, "2026-03-01T00:00:00Z", 5), ["2026-03-05T09:00:00Z", "2026-03-06T09:00:00Z", "2026-03-07T09:00:00Z"]);
        assert!(Plan::new(&[], None, None, t("2026-03-01T00:00:00Z")).is_err());
    }

    #[test]
    fn invalid_rules_are_named() {
        let bad = [
            json!({"frequency": "daily", "hours": 24}),
            json!({"frequency": "daily", "minutes": 60}),
            json!({"frequency": "daily", "interval": 0}),
            json!({"frequency": "monthly", "interval": 13}),
            json!({"frequency": "weekly", "days": ["funday"]}),
            json!({"frequency": "weekly", "days": "sometimes"}),
            json!({"frequency": "daily", "day_of_month": 3}),
            json!({"frequency": "monthly", "day_of_month": 32}),
        ];
        for b in bad {
            let r = Plan::new(&[rule(b.clone())], None, None, t("2026-03-01T00:00:00Z"));
            assert!(r.as_ref().is_err_and(|e| e.starts_with("repeats[0]: ")), "{b}: {r:?}");
        }
        assert!(serde_json::from_value::<RepeatRule>(json!({"frequency": "yearly"})).is_err());
    }

    #[test]
    fn due_fires_the_latest_within_catch_up_and_skips_the_rest() {
        let p = plan(vec![json!({"frequency": "hourly", "minutes": 0})], "2026-03-02T00:30:00Z");
        let hour = SignedDuration::from_hours(1);
        // Nothing yet: the first occurrence is 01:00.
        let d = due(&p, &TimeZone::UTC, None, t("2026-03-02T00:59:00Z"), hour);
        assert_eq!(d, Due { next: Some(t("2026-03-02T01:00:00Z")), ..Default::default() });
        // On time (the clock reads the occurrence, or a little after).
        let d = due(&p, &TimeZone::UTC, None, t("2026-03-02T01:00:00Z"), hour);
        assert_eq!(d, Due { fire: Some(t("2026-03-02T01:00:00Z")), next: Some(t("2026-03-02T02:00:00Z")), ..Default::default() });
        // Once fired, nothing more is due before the next one.
        let d = due(&p, &TimeZone::UTC, Some(t("2026-03-02T01:00:00Z")), t("2026-03-02T01:30:00Z"), hour);
        assert_eq!(d.fire, None);
        // After 3.5 hours down: 02:00 and 03:00 are skipped, 04:00 fires (30 minutes late).
        let d = due(&p, &TimeZone::UTC, Some(t("2026-03-02T01:00:00Z")), t("2026-03-02T04:30:00Z"), hour);
        assert_eq!(d, Due { fire: Some(t("2026-03-02T04:00:00Z")), skipped: 2, last_skipped: Some(t("2026-03-02T03:00:00Z")), next: Some(t("2026-03-02T05:00:00Z")) });
        // With a 10-minute catch-up window, 04:00 is too old as well.
        let d = due(&p, &TimeZone::UTC, Some(t("2026-03-02T01:00:00Z")), t("2026-03-02T04:30:00Z"), SignedDuration::from_mins(10));
        assert_eq!(d, Due { fire: None, skipped: 3, last_skipped: Some(t("2026-03-02T04:00:00Z")), next: Some(t("2026-03-02T05:00:00Z")) });
        // A year down: counted up to the cap, then passed over in one step; the latest still fires.
        let d = due(&p, &TimeZone::UTC, Some(t("2026-03-02T01:00:00Z")), t("2027-03-02T00:10:00Z"), hour);
        assert_eq!(d.fire, Some(t("2027-03-02T00:00:00Z")));
        assert!(d.skipped >= MAX_COUNTED, "{d:?}");
        assert!(d.last_skipped.is_some_and(|s| s < t("2027-03-01T23:10:00Z")), "{d:?}");
    }

    #[test]
    fn a_one_off_fires_once() {
        let once = Plan::new(&[], Some(t("2026-03-02T10:00:00Z")), None, t("2026-03-02T09:00:00Z")).unwrap();
        let hour = SignedDuration::from_hours(1);
        let d = due(&once, &TimeZone::UTC, None, t("2026-03-02T10:00:01Z"), hour);
        assert_eq!(d, Due { fire: Some(t("2026-03-02T10:00:00Z")), ..Default::default() });
        assert_eq!(due(&once, &TimeZone::UTC, d.fire, t("2026-03-02T10:00:02Z"), hour), Due::default());
        // Created after its time, within the catch-up window: it fires at once; beyond it, skipped.
        let late = Plan::new(&[], Some(t("2026-03-02T08:30:00Z")), None, t("2026-03-02T09:00:00Z")).unwrap();
        assert_eq!(due(&late, &TimeZone::UTC, None, t("2026-03-02T09:00:00Z"), hour).fire, Some(t("2026-03-02T08:30:00Z")));
        let d = due(&late, &TimeZone::UTC, None, t("2026-03-02T10:00:00Z"), hour);
        assert_eq!((d.fire, d.skipped, d.next), (None, 1, None));
    }

    #[test]
    fn due_follows_the_recipient_zone_across_a_change() {
        // A daily 09:00 in New York, checked with an injected clock each minute around the change.
        let ny = zone("America/New_York");
        let p = plan(vec![json!({"frequency": "daily", "hours": 9})], "2026-03-06T00:00:00Z");
        let mut through = None;
        let mut fired = Vec::new();
        let mut now = t("2026-03-06T00:00:00Z");
        while now < t("2026-03-10T00:00:00Z") {
            let d = due(&p, &ny, through, now, SignedDuration::from_hours(1));
            if let Some(f) = d.fire {
                fired.push(f.to_string());
                through = Some(f);
            }
            now += SignedDuration::from_mins(7);
        }
        assert_eq!(fired, ["2026-03-06T14:00:00Z", "2026-03-07T14:00:00Z", "2026-03-08T13:00:00Z", "2026-03-09T13:00:00Z"]);
    }

    #[test]
    fn zones_fall_back_to_the_namespace_then_utc() {
        assert_eq!(zone_for(Some("Asia/Tokyo"), Some("Europe/Paris")).1, "Asia/Tokyo");
        assert_eq!(zone_for(Some("Mars/Olympus"), Some("Europe/Paris")).1, "Europe/Paris");
        assert_eq!(zone_for(None, None), (TimeZone::UTC, "UTC".to_string()));
    }

    #[test]
    fn run_names_are_deterministic_and_distinct() {
        let uid = "6f1c0c2e-8d1e-4a39-9f55-3f2d7a0a1b2c";
        let a = run_name("digest", uid, "user:u1", t("2026-03-02T09:00:00Z"));
        assert_eq!(a, run_name("digest", uid, "user:u1", t("2026-03-02T09:00:00Z")));
        assert_ne!(a, run_name("digest", uid, "user:u2", t("2026-03-02T09:00:00Z")));
        assert_ne!(a, run_name("digest", uid, "user:u1", t("2026-03-03T09:00:00Z")));
        assert_ne!(a, run_name("digest", "another-uid", "user:u1", t("2026-03-02T09:00:00Z")));
        assert!(crate::core::ids::is_dns_subdomain(&a) && a.starts_with("digest-"), "{a}");
        let long = run_name(&"x".repeat(253), uid, "user:u1", t("2026-03-02T09:00:00Z"));
        assert!(long.len() <= 63 && crate::core::ids::is_dns_subdomain(&long), "{long}");
        assert_eq!(schedule_id(uid, "user:u1"), schedule_id(uid, "user:u1"));
        assert_ne!(schedule_id(uid, "user:u1"), schedule_id(uid, "user:u2"));
    }

    #[test]
    fn a_fast_clock_runs_faster() {
        let c = Clock::fast(t("2026-03-08T05:00:00Z"), 3600);
        assert!(c.now() >= t("2026-03-08T05:00:00Z") && c.now() < t("2026-03-08T06:00:00Z"));
        let wait = c.real_until(c.now() + SignedDuration::from_hours(1));
        assert!(wait <= std::time::Duration::from_secs(1) && wait > std::time::Duration::from_millis(900), "{wait:?}");
    }
}
