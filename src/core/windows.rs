//! Time rules of the workflow steps: durations (`30s` or Knock's `{unit,
//! value}`), windows taken from the data (a timestamp, a duration or a window
//! rule such as `{frequency: daily, hours: 9}`), and channel send windows, all
//! in the recipient's time zone.

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan, Zoned};
use serde_json::Value;

use crate::resources::workflow::{DurationValue, SendWindow};

/// The longest duration herald accepts (adding it to now can never overflow).
const MAX_DURATION: SignedDuration = SignedDuration::from_hours(100 * 365 * 24);

/// A duration as a [`SignedDuration`]: `30s`, `1h30m`, or `{unit, value}` with
/// unit seconds, minutes, hours, days or weeks (a day is exactly 24 hours).
pub fn duration(d: &DurationValue) -> Result<SignedDuration, String> {
    match d {
        DurationValue::Text(text) => {
            let std = super::templates::parse_duration(text)?;
            SignedDuration::try_from(std).map_err(|e| e.to_string())
        }
        DurationValue::Unit { unit, value } => {
            if *value < 0 {
                return Err(format!("duration {value} {unit} is negative"));
            }
            let seconds_per: i64 = match unit.trim_end_matches('s') {
                "second" => 1,
                "minute" => 60,
                "hour" => 3_600,
                "day" => 86_400,
                "week" => 7 * 86_400,
                _ => return Err(format!("unknown duration unit `{unit}` (seconds, minutes, hours, days or weeks)")),
            };
            let d = value.checked_mul(seconds_per).map(SignedDuration::from_secs).filter(|d| *d <= MAX_DURATION);
            d.ok_or_else(|| format!("duration {value} {unit} is too long (at most 100 years)"))
        }
    }
}

/// The recipient's time zone: its `timezone` property (an IANA name), else UTC.
/// An unknown name falls back to UTC rather than stopping the recipient.
pub fn recipient_zone(recipient: &Value) -> TimeZone {
    recipient.get("timezone").and_then(Value::as_str).and_then(|name| TimeZone::get(name).ok()).unwrap_or(TimeZone::UTC)
}

/// The value at a dot path of the context (`data.digest_until`).
pub fn lookup<'a>(context: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(context, |current, segment| match current {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// When a window read from the data ends: a timestamp is the end itself; a
/// duration (`"30s"` or `{unit, value}`) is counted from `now`; a window rule
/// is its next occurrence after `now` in `zone`.
pub fn window_end(value: &Value, now: Timestamp, zone: &TimeZone) -> Result<Timestamp, String> {
    match value {
        Value::String(s) => {
            if let Ok(t) = s.trim().parse::<Timestamp>() {
                return Ok(t);
            }
            let d = duration(&DurationValue::Text(s.clone())).map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a duration"))?;
            now.checked_add(d).map_err(|e| e.to_string())
        }
        Value::Object(map) if map.contains_key("frequency") => {
            let rule: WindowRule = serde_json::from_value(value.clone()).map_err(|e| format!("invalid window rule: {e}"))?;
            rule.next_after(now, zone)
        }
        Value::Object(_) => {
            let d: DurationValue = serde_json::from_value(value.clone()).map_err(|e| format!("invalid duration: {e}"))?;
            now.checked_add(duration(&d)?).map_err(|e| e.to_string())
        }
        Value::Null => Err("the value is null".into()),
        other => Err(format!("`{other}` is neither a time, a duration nor a window rule")),
    }
}

/// Knock's window rule: the next matching time, e.g. `{frequency: weekly, days: [mon], hours: 9}`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct WindowRule {
    pub frequency: String,
    #[serde(default)]
    pub days: Option<Value>,
    #[serde(default)]
    pub hours: Option<i8>,
    #[serde(default)]
    pub minutes: Option<i8>,
    #[serde(default)]
    pub day_of_month: Option<i8>,
}

impl WindowRule {
    /// The first matching instant strictly after `now`, in `zone`.
    pub fn next_after(&self, now: Timestamp, zone: &TimeZone) -> Result<Timestamp, String> {
        let hours = self.hours.unwrap_or(0);
        let minutes = self.minutes.unwrap_or(0);
        if !(0..24).contains(&hours) || !(0..60).contains(&minutes) {
            return Err(format!("window rule time {hours}:{minutes:02} is out of range"));
        }
        let days = parse_days(self.days.as_ref())?;
        let hourly = match self.frequency.as_str() {
            "hourly" => true,
            "daily" | "weekly" | "monthly" => false,
            other => return Err(format!("unknown window frequency `{other}` (hourly, daily, weekly or monthly)")),
        };
        if self.frequency == "monthly" && !self.day_of_month.is_some_and(|d| (1..=31).contains(&d)) {
            return Err("a monthly window rule needs day_of_month 1 to 31".into());
        }
        let start = now.to_zoned(zone.clone()).date();
        // 400 days covers every monthly rule (a day_of_month of 31 recurs within two months).
        for offset in 0..400 {
            let date = start.checked_add(offset.days()).map_err(|e| e.to_string())?;
            if !days.as_ref().is_none_or(|d| d.contains(&date.weekday())) {
                continue;
            }
            if self.frequency == "monthly" && Some(date.day()) != self.day_of_month {
                continue;
            }
            let hours_of_day: Vec<i8> = if hourly { (0..24).collect() } else { vec![hours] };
            for h in hours_of_day {
                let at = local(date, Time::new(h, minutes, 0, 0).map_err(|e| e.to_string())?, zone)?;
                if at > now {
                    return Ok(at);
                }
            }
        }
        Err("the window rule never matches".into())
    }
}

/// A local date and time in `zone` as an instant (a time skipped by a
/// daylight-saving change moves forward, as clocks do; a repeated one is
/// taken the first time: jiff's "compatible" disambiguation, as RFC 5545 does).
pub fn local(date: Date, time: Time, zone: &TimeZone) -> Result<Timestamp, String> {
    date.to_datetime(time).to_zoned(zone.clone()).map(|z| z.timestamp()).map_err(|e| e.to_string())
}

/// `days`: a list of days (`mon` … `sun`, full names too), `weekdays` or
/// `weekends` (a string, or alone in the list); None for every day.
pub fn parse_days(days: Option<&Value>) -> Result<Option<Vec<Weekday>>, String> {
    use Weekday::*;
    let shorthand = |s: &str| match s {
        "weekdays" => Some(vec![Monday, Tuesday, Wednesday, Thursday, Friday]),
        "weekends" => Some(vec![Saturday, Sunday]),
        _ => None,
    };
    match days {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => shorthand(s).map(Some).ok_or_else(|| format!("days must be a list of days, `weekdays` or `weekends`, not `{s}`")),
        Some(Value::Array(items)) if items.is_empty() => Ok(None),
        Some(Value::Array(items)) => {
            if let [Value::String(s)] = items.as_slice() {
                if let Some(days) = shorthand(s) {
                    return Ok(Some(days));
                }
            }
            let mut out = Vec::new();
            for item in items {
                let day = item.as_str().filter(|s| s.len() == 3 || s.len() >= 6).and_then(weekday).ok_or_else(|| format!("unknown day {item} (mon … sun)"))?;
                if !out.contains(&day) {
                    out.push(day);
                }
            }
            Ok(Some(out))
        }
        Some(other) => Err(format!("days must be a list of days, `weekdays` or `weekends`, not {other}")),
    }
}

/// `mon` or `monday` (any case).
pub fn weekday(name: &str) -> Option<Weekday> {
    use Weekday::*;
    let lower = name.to_ascii_lowercase();
    Some(match lower.get(..3)? {
        "mon" => Monday,
        "tue" => Tuesday,
        "wed" => Wednesday,
        "thu" => Thursday,
        "fri" => Friday,
        "sat" => Saturday,
        "sun" => Sunday,
        _ => return None,
    })
}

/// Checks a channel step's send windows when the Workflow is applied.
pub fn check_send_windows(windows: &[SendWindow]) -> Result<(), String> {
    for w in windows {
        day_window(w)?;
    }
    Ok(())
}

/// One day's window: its weekday and, for `send`, its [from, until) times.
fn day_window(w: &SendWindow) -> Result<(Weekday, Option<(Time, Time)>), String> {
    let day = weekday(&w.day).filter(|_| w.day.len() == 3 || w.day.len() >= 6).ok_or_else(|| format!("send window day `{}` is not a weekday (monday ... sunday)", w.day))?;
    let time = |s: &Option<String>, default: Time| -> Result<Time, String> {
        match s {
            None => Ok(default),
            Some(s) => s.parse::<Time>().map_err(|_| format!("send window time `{s}` is not HH:MM or HH:MM:SS")),
        }
    };
    match w.window_type.as_str() {
        "send" => Ok((day, Some((time(&w.from, Time::midnight())?, time(&w.until, Time::MAX)?)))),
        "do_not_send" => Ok((day, None)),
        other => Err(format!("send window type `{other}` is neither `send` nor `do_not_send`")),
    }
}

/// When a message may go out: `now` when it is inside a send window (or there
/// are none), else the next opening, in `zone`. A day without an entry is open
/// all day, as in Knock; `do_not_send` closes it.
pub fn next_send_time(windows: &[SendWindow], now: Timestamp, zone: &TimeZone) -> Result<Timestamp, String> {
    if windows.is_empty() {
        return Ok(now);
    }
    let parsed = windows.iter().map(day_window).collect::<Result<Vec<_>, _>>()?;
    let rule_for = |d: Weekday| parsed.iter().find(|(day, _)| *day == d).map(|(_, w)| *w);
    let today: Zoned = now.to_zoned(zone.clone());
    for offset in 0..8 {
        let date = today.date().checked_add(offset.days()).map_err(|e| e.to_string())?;
        let (open, close) = match rule_for(date.weekday()) {
            None => (Time::midnight(), Time::MAX),
            Some(None) => continue,
            Some(Some(window)) => window,
        };
        let opens = local(date, open, zone)?;
        let closes = local(date, close, zone)?;
        if now < closes {
            return Ok(opens.max(now));
        }
    }
    Err("no send window is ever open".into())
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

    #[test]
    fn durations_in_both_shapes() {
        assert_eq!(duration(&DurationValue::Text("1h30m".into())), Ok(SignedDuration::from_mins(90)));
        assert_eq!(duration(&DurationValue::Unit { unit: "minutes".into(), value: 5 }), Ok(SignedDuration::from_mins(5)));
        assert_eq!(duration(&DurationValue::Unit { unit: "week".into(), value: 2 }), Ok(SignedDuration::from_hours(336)));
        assert!(duration(&DurationValue::Unit { unit: "fortnights".into(), value: 1 }).is_err());
        assert!(duration(&DurationValue::Unit { unit: "days".into(), value: -1 }).is_err());
        assert!(duration(&DurationValue::Unit { unit: "weeks".into(), value: i64::MAX }).is_err());
    }

    #[test]
    fn windows_from_data() {
        let now = t("2026-03-02T10:00:00Z");
        assert_eq!(window_end(&json!("2026-03-02T12:00:00Z"), now, &TimeZone::UTC), Ok(t("2026-03-02T12:00:00Z")));
        assert_eq!(window_end(&json!("30s"), now, &TimeZone::UTC), Ok(t("2026-03-02T10:00:30Z")));
        assert_eq!(window_end(&json!({"unit": "hours", "value": 2}), now, &TimeZone::UTC), Ok(t("2026-03-02T12:00:00Z")));
        assert_eq!(window_end(&json!({"frequency": "daily", "hours": 9}), now, &TimeZone::UTC), Ok(t("2026-03-03T09:00:00Z")));
        for bad in [json!("soon"), json!(null), json!(5), json!({"frequency": "yearly"}), json!({"unit": "x", "value": 1})] {
            assert!(window_end(&bad, now, &TimeZone::UTC).is_err(), "{bad}");
        }
    }

    #[test]
    fn window_rules_in_the_recipient_zone() {
        // 2026-03-02 is a Monday.
        let now = t("2026-03-02T10:00:00Z");
        let ny = zone("America/New_York");
        let weekly = WindowRule { frequency: "weekly".into(), days: Some(json!(["mon"])), hours: Some(9), ..Default::default() };
        // 10:00Z is 05:00 in New York: Monday 09:00 local is still ahead.
        assert_eq!(weekly.next_after(now, &ny), Ok(t("2026-03-02T14:00:00Z")));
        assert_eq!(weekly.next_after(now, &TimeZone::UTC), Ok(t("2026-03-09T09:00:00Z")));
        let hourly = WindowRule { frequency: "hourly".into(), minutes: Some(30), ..Default::default() };
        assert_eq!(hourly.next_after(now, &TimeZone::UTC), Ok(t("2026-03-02T10:30:00Z")));
        let weekends = WindowRule { frequency: "daily".into(), days: Some(json!("weekends")), hours: Some(8), ..Default::default() };
        assert_eq!(weekends.next_after(now, &TimeZone::UTC), Ok(t("2026-03-07T08:00:00Z")));
        let monthly = WindowRule { frequency: "monthly".into(), day_of_month: Some(1), hours: Some(0), ..Default::default() };
        assert_eq!(monthly.next_after(now, &TimeZone::UTC), Ok(t("2026-04-01T00:00:00Z")));
        // Daylight saving: 09:00 local on both sides of New York's change (2026-03-08).
        let daily = WindowRule { frequency: "daily".into(), hours: Some(9), ..Default::default() };
        assert_eq!(daily.next_after(t("2026-03-07T15:00:00Z"), &ny), Ok(t("2026-03-08T13:00:00Z")));
        assert_eq!(daily.next_after(t("2026-03-06T15:00:00Z"), &ny), Ok(t("2026-03-07T14:00:00Z")));
    }

    fn window(day: &str, from: &str, until: &str) -> SendWindow {
        SendWindow { day: day.into(), window_type: "send".into(), from: Some(from.into()), until: Some(until.into()) }
    }

    #[test]
    fn send_windows() {
        let weekdays: Vec<SendWindow> = ["monday", "tuesday", "wednesday", "thursday", "friday"].iter().map(|d| window(d, "09:00", "17:00")).collect();
        let mut windows = weekdays.clone();
        windows.extend(["saturday", "sunday"].iter().map(|d| SendWindow { day: d.to_string(), window_type: "do_not_send".into(), from: None, until: None }));
        // Monday 10:00 UTC: open.
        assert_eq!(next_send_time(&windows, t("2026-03-02T10:00:00Z"), &TimeZone::UTC), Ok(t("2026-03-02T10:00:00Z")));
        // Monday 07:00: wait for 09:00.
        assert_eq!(next_send_time(&windows, t("2026-03-02T07:00:00Z"), &TimeZone::UTC), Ok(t("2026-03-02T09:00:00Z")));
        // Friday 18:00: next Monday 09:00.
        assert_eq!(next_send_time(&windows, t("2026-03-06T18:00:00Z"), &TimeZone::UTC), Ok(t("2026-03-09T09:00:00Z")));
        // In Tokyo, Monday 10:00Z is 19:00: the next opening is Tuesday 09:00 JST.
        assert_eq!(next_send_time(&windows, t("2026-03-02T10:00:00Z"), &zone("Asia/Tokyo")), Ok(t("2026-03-03T00:00:00Z")));
        // A day without an entry is open all day.
        assert_eq!(next_send_time(&weekdays, t("2026-03-07T03:00:00Z"), &TimeZone::UTC), Ok(t("2026-03-07T03:00:00Z")));
        assert!(next_send_time(&[window("funday", "09:00", "10:00")], t("2026-03-02T10:00:00Z"), &TimeZone::UTC).is_err());
        assert!(check_send_windows(&[window("monday", "9am", "10:00")]).is_err());
        let closed: Vec<SendWindow> = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            .iter()
            .map(|d| SendWindow { day: d.to_string(), window_type: "do_not_send".into(), from: None, until: None })
            .collect();
        assert!(next_send_time(&closed, t("2026-03-02T10:00:00Z"), &TimeZone::UTC).is_err());
    }

    #[test]
    fn recipient_zones() {
        assert_eq!(recipient_zone(&json!({"timezone": "Europe/Paris"})), zone("Europe/Paris"));
        assert_eq!(recipient_zone(&json!({"timezone": "Mars/Olympus"})), TimeZone::UTC);
        assert_eq!(recipient_zone(&json!({})), TimeZone::UTC);
    }
}
