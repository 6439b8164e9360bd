//! Knock step conditions: `variable` `operator` `argument`, evaluated against
//! a run's context (`{"data", "recipient", "actor", "tenant", "workflow"}`).
//!
//! Comparisons are loose on purpose: YAML authors write `argument: 5` and
//! `argument: "5"` interchangeably, so numbers compare numerically whenever one
//! side is a number and the other is a number or a numeric string.

use std::cmp::Ordering;

use jiff::Timestamp;
use serde_json::Value;

use crate::resources::workflow::{ConditionItem, Conditions, StepCondition};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConditionError {
    #[error("condition on `{variable}`: unknown operator `{operator}`")]
    UnknownOperator { variable: String, operator: String },
    #[error("condition on `{variable}`: operator `{operator}` needs an argument")]
    MissingArgument { variable: String, operator: String },
    #[error("condition groups nest one level deep: a group inside a group may hold only conditions")]
    TooDeep,
}

/// Audience membership, for `is_audience_member` (the controller's directory answers it).
pub trait AudienceMembers {
    /// Whether the user `id` is a member of the audience `audience`.
    fn is_member(&self, audience: &str, id: &str) -> bool;
}

/// No audiences: every membership test is false.
pub struct NoAudiences;

impl AudienceMembers for NoAudiences {
    fn is_member(&self, _: &str, _: &str) -> bool {
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    EqualTo,
    NotEqualTo,
    GreaterThan,
    LessThan,
    GreaterThanOrEqualTo,
    LessThanOrEqualTo,
    Contains,
    NotContains,
    Empty,
    NotEmpty,
    Exists,
    NotExists,
    ContainsAll,
    NotContainsAll,
    IsBetween,
    IsTimestamp,
    IsTimestampBefore,
    IsTimestampOnOrAfter,
    IsTimestampBetween,
    IsTimestampBeforeNow,
    IsTimestampOnOrAfterNow,
    IsAudienceMember,
    IsNotAudienceMember,
}

impl Operator {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "equal_to" => Operator::EqualTo,
            "not_equal_to" => Operator::NotEqualTo,
            "greater_than" => Operator::GreaterThan,
            "less_than" => Operator::LessThan,
            "greater_than_or_equal_to" => Operator::GreaterThanOrEqualTo,
            "less_than_or_equal_to" => Operator::LessThanOrEqualTo,
            "contains" => Operator::Contains,
            "not_contains" => Operator::NotContains,
            "empty" => Operator::Empty,
            "not_empty" => Operator::NotEmpty,
            "exists" => Operator::Exists,
            "not_exists" => Operator::NotExists,
            "contains_all" => Operator::ContainsAll,
            "not_contains_all" => Operator::NotContainsAll,
            "is_between" => Operator::IsBetween,
            "is_timestamp" => Operator::IsTimestamp,
            "is_timestamp_before" => Operator::IsTimestampBefore,
            "is_timestamp_on_or_after" => Operator::IsTimestampOnOrAfter,
            "is_timestamp_between" => Operator::IsTimestampBetween,
            "is_timestamp_before_now" => Operator::IsTimestampBeforeNow,
            "is_timestamp_on_or_after_now" => Operator::IsTimestampOnOrAfterNow,
            "is_audience_member" => Operator::IsAudienceMember,
            "is_not_audience_member" => Operator::IsNotAudienceMember,
            _ => return None,
        })
    }

    fn needs_argument(self) -> bool {
        !matches!(
            self,
            Operator::Empty
                | Operator::NotEmpty
                | Operator::Exists
                | Operator::NotExists
                | Operator::IsTimestamp
                | Operator::IsTimestampBeforeNow
                | Operator::IsTimestampOnOrAfterNow
        )
    }
}

/// The operator of `c`, checked to be known and to have its argument.
fn checked(c: &StepCondition) -> Result<(Operator, Option<&Value>), ConditionError> {
    let op = Operator::parse(&c.operator).ok_or_else(|| ConditionError::UnknownOperator { variable: c.variable.clone(), operator: c.operator.clone() })?;
    let argument = c.argument.as_ref();
    if op.needs_argument() && argument.is_none() {
        return Err(ConditionError::MissingArgument { variable: c.variable.clone(), operator: c.operator.clone() });
    }
    Ok((op, argument))
}

/// Checks every condition's operator (and argument), for validating a Workflow
/// when it is applied.
pub fn check_operators(conditions: &[StepCondition]) -> Result<(), ConditionError> {
    conditions.iter().try_for_each(|c| checked(c).map(|_| ()))
}

/// Checks a condition list or group: every operator known with its argument,
/// and groups nested at most one level.
pub fn check(conditions: &Conditions) -> Result<(), ConditionError> {
    fn items(list: &[ConditionItem], depth: usize) -> Result<(), ConditionError> {
        for item in list {
            match item {
                ConditionItem::Condition(c) => checked(c).map(|_| ())?,
                ConditionItem::All(_) | ConditionItem::Any(_) if depth >= 1 => return Err(ConditionError::TooDeep),
                ConditionItem::All(g) => items(&g.all, depth + 1)?,
                ConditionItem::Any(g) => items(&g.any, depth + 1)?,
            }
        }
        Ok(())
    }
    match conditions {
        Conditions::List(list) => items(list, 0),
        Conditions::All(g) => items(&g.all, 0),
        Conditions::Any(g) => items(&g.any, 0),
    }
}

/// True when every condition holds (an empty list holds). Malformed conditions
/// are reported whatever the data, so a typo is never hidden by a short-circuit.
/// `now` is the time the `is_timestamp*` operators and relative arguments
/// ("7 days ago") are measured from.
pub fn all_hold(conditions: &[StepCondition], context: &Value, now: Timestamp) -> Result<bool, ConditionError> {
    let parsed = conditions.iter().map(|c| checked(c).map(|(op, arg)| (c, op, arg))).collect::<Result<Vec<_>, _>>()?;
    Ok(parsed.into_iter().all(|(c, op, argument)| holds(op, lookup(context, &c.variable), argument, now, &NoAudiences)))
}

/// Whether a condition list (all must hold), `{all}` or `{any}` group holds.
/// An empty list or `all` holds; an empty `any` does not. Checked first (see [`check`]).
pub fn hold(conditions: &Conditions, context: &Value, now: Timestamp, audiences: &dyn AudienceMembers) -> Result<bool, ConditionError> {
    check(conditions)?;
    let one = |c: &StepCondition| -> bool {
        let (op, argument) = checked(c).expect("checked above");
        holds(op, lookup(context, &c.variable), argument, now, audiences)
    };
    fn item(i: &ConditionItem, one: &dyn Fn(&StepCondition) -> bool) -> bool {
        match i {
            ConditionItem::Condition(c) => one(c),
            ConditionItem::All(g) => g.all.iter().all(|i| item(i, one)),
            ConditionItem::Any(g) => g.any.iter().any(|i| item(i, one)),
        }
    }
    Ok(match conditions {
        Conditions::List(list) => list.iter().all(|i| item(i, &one)),
        Conditions::All(g) => g.all.iter().all(|i| item(i, &one)),
        Conditions::Any(g) => g.any.iter().any(|i| item(i, &one)),
    })
}

/// The value at a dot path; numeric segments index arrays. `None` when any
/// segment is missing.
fn lookup<'a>(context: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return None;
    }
    path.split('.').try_fold(context, |current, segment| match current {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// Knock's message statuses, low to high, for `refs.<step>.delivery_status`
/// comparisons (`interacted` and `link_clicked` rank the same).
const MESSAGE_ORDER: [&[&str]; 11] = [
    &["undelivered"],
    &["bounced"],
    &["delivery_attempted"],
    &["queued"],
    &["not_sent"],
    &["sent"],
    &["delivered"],
    &["seen"],
    &["read"],
    &["interacted", "link_clicked"],
    &["archived"],
];

fn message_rank(status: &str) -> Option<usize> {
    MESSAGE_ORDER.iter().position(|names| names.contains(&status))
}

/// A message-status condition: `refs.X.delivery_status` or
/// `refs.X.engagement_status` against a reserved `$message.<case>` argument.
/// A step with no message (not reached, or aged out) makes it false.
fn message_holds(op: Operator, value: Option<&Value>, case: &str) -> bool {
    match value {
        Some(Value::Array(statuses)) => {
            let has = |s: &str| statuses.iter().any(|v| v.as_str() == Some(s));
            let matched = match case {
                "seen_not_read" => has("seen") && !has("read"),
                "read_not_link_clicked" => has("read") && !has("link_clicked"),
                other => has(other),
            };
            match op {
                Operator::Contains => matched,
                Operator::NotContains => !matched,
                _ => false,
            }
        }
        Some(Value::String(status)) => match op {
            Operator::EqualTo => status == case,
            Operator::NotEqualTo => status != case,
            _ => match (message_rank(status), message_rank(case)) {
                (Some(s), Some(c)) => match op {
                    Operator::GreaterThanOrEqualTo => s >= c,
                    Operator::GreaterThan => s > c,
                    Operator::LessThan => s < c,
                    Operator::LessThanOrEqualTo => s <= c,
                    _ => false,
                },
                _ => false,
            },
        },
        _ => false,
    }
}

fn holds(op: Operator, value: Option<&Value>, argument: Option<&Value>, now: Timestamp, audiences: &dyn AudienceMembers) -> bool {
    if let Some(case) = argument.and_then(Value::as_str).and_then(|a| a.strip_prefix("$message.")) {
        return message_holds(op, value, case);
    }
    let time = value.and_then(timestamp_of);
    let bound = |a: &Value| timestamp_argument(a, now);
    fn pair(a: Option<&Value>) -> Option<(&Value, &Value)> {
        match a {
            Some(Value::Array(items)) if items.len() == 2 => Some((&items[0], &items[1])),
            _ => None,
        }
    }
    match op {
        Operator::IsAudienceMember | Operator::IsNotAudienceMember => {
            // The variable names a user: an id, or an entity with an `id` (`recipient`).
            let id = value.and_then(|v| v.as_str().or_else(|| v.get("id").and_then(Value::as_str)));
            let member = matches!((id, argument.and_then(Value::as_str)), (Some(id), Some(audience)) if audiences.is_member(audience, id));
            return member == (op == Operator::IsAudienceMember);
        }
        Operator::ContainsAll => return value.is_some_and(|v| argument.is_some_and(|a| contains_all(v, a))),
        Operator::NotContainsAll => return !value.is_some_and(|v| argument.is_some_and(|a| contains_all(v, a))),
        Operator::IsBetween => {
            return match (value.and_then(Number::of), pair(argument).and_then(|(lo, hi)| Some((Number::of(lo)?, Number::of(hi)?)))) {
                (Some(v), Some((lo, hi))) => v.cmp(lo).is_some_and(|o| o != Ordering::Less) && v.cmp(hi).is_some_and(|o| o != Ordering::Greater),
                _ => false,
            }
        }
        Operator::IsTimestamp => return time.is_some(),
        Operator::IsTimestampBefore => return matches!((time, argument.and_then(bound)), (Some(t), Some(b)) if t < b),
        Operator::IsTimestampOnOrAfter => return matches!((time, argument.and_then(bound)), (Some(t), Some(b)) if t >= b),
        Operator::IsTimestampBetween => {
            return match (time, pair(argument).and_then(|(start, end)| Some((bound(start)?, bound(end)?)))) {
                (Some(t), Some((start, end))) => start <= t && t <= end,
                _ => false,
            }
        }
        Operator::IsTimestampBeforeNow => return time.is_some_and(|t| t < now),
        Operator::IsTimestampOnOrAfterNow => return time.is_some_and(|t| t >= now),
        _ => {}
    }
    // A missing variable (or argument) makes a comparison false, and so its
    // negation (not_equal_to, not_contains) true.
    let compared = |test: &dyn Fn(&Value, &Value) -> bool| match (value, argument) {
        (Some(v), Some(a)) => test(v, a),
        _ => false,
    };
    let ordered = |accept: &[Ordering]| compared(&|v, a| compare(v, a).is_some_and(|o| accept.contains(&o)));
    match op {
        Operator::EqualTo => compared(&loose_eq),
        Operator::NotEqualTo => !compared(&loose_eq),
        Operator::Contains => compared(&contains),
        Operator::NotContains => !compared(&contains),
        Operator::GreaterThan => ordered(&[Ordering::Greater]),
        Operator::LessThan => ordered(&[Ordering::Less]),
        Operator::GreaterThanOrEqualTo => ordered(&[Ordering::Greater, Ordering::Equal]),
        Operator::LessThanOrEqualTo => ordered(&[Ordering::Less, Ordering::Equal]),
        Operator::Empty => is_empty(value),
        Operator::NotEmpty => !is_empty(value),
        Operator::Exists => exists(value),
        Operator::NotExists => !exists(value),
        // Handled above.
        _ => false,
    }
}

/// Every item of `argument` (a list, or one value) is in the list `value`.
fn contains_all(value: &Value, argument: &Value) -> bool {
    let Value::Array(items) = value else { return false };
    let wanted: Vec<&Value> = match argument {
        Value::Array(a) => a.iter().collect(),
        one => vec![one],
    };
    wanted.iter().all(|w| items.iter().any(|i| loose_eq(i, w)))
}

/// A time a value holds: an RFC 3339 timestamp, or a date (midnight UTC).
fn timestamp_of(value: &Value) -> Option<Timestamp> {
    let text = value.as_str()?.trim();
    text.parse::<Timestamp>().ok().or_else(|| text.parse::<jiff::civil::Date>().ok()?.to_zoned(jiff::tz::TimeZone::UTC).ok().map(|z| z.timestamp()))
}

/// A timestamp argument: absolute (RFC 3339 or a date) or relative to `now`,
/// as Knock writes them: "7 days ago", "3 hours from now" (minutes, hours,
/// days or weeks; a day is exactly 24 hours).
fn timestamp_argument(argument: &Value, now: Timestamp) -> Option<Timestamp> {
    if let Some(t) = timestamp_of(argument) {
        return Some(t);
    }
    let text = argument.as_str()?.trim().to_ascii_lowercase();
    let (amount, rest) = text.split_once(' ')?;
    let amount: i64 = amount.parse().ok().filter(|n: &i64| *n >= 0)?;
    let (unit, direction) = rest.trim().split_once(' ')?;
    let seconds = match unit.trim_end_matches('s') {
        "minute" => 60,
        "hour" => 3600,
        "day" => 86_400,
        "week" => 604_800,
        _ => return None,
    };
    let span = jiff::SignedDuration::from_secs(amount.checked_mul(seconds)?);
    match direction.trim() {
        "ago" => now.checked_sub(span).ok(),
        "from now" => now.checked_add(span).ok(),
        _ => None,
    }
}

fn is_empty(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::Bool(_) | Value::Number(_)) => false,
    }
}

fn exists(value: Option<&Value>) -> bool {
    !matches!(value, None | Some(Value::Null))
}

/// A number read from a JSON number or a numeric string. Integers are kept
/// exact (i128 covers both i64 and u64); anything else is a finite f64.
#[derive(Debug, Clone, Copy)]
enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    fn of(v: &Value) -> Option<Number> {
        match v {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Some(Number::Int(i.into()))
                } else if let Some(u) = n.as_u64() {
                    Some(Number::Int(u.into()))
                } else {
                    n.as_f64().filter(|f| f.is_finite()).map(Number::Float)
                }
            }
            Value::String(s) => {
                let s = s.trim();
                if let Ok(i) = s.parse::<i128>() {
                    Some(Number::Int(i))
                } else {
                    // f64 parsing accepts "inf" and "NaN"; those are words, not numbers.
                    s.parse::<f64>().ok().filter(|f| f.is_finite()).map(Number::Float)
                }
            }
            _ => None,
        }
    }

    fn cmp(self, other: Number) -> Option<Ordering> {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }
}

/// Numeric ordering when one side is a number and the other is a number or a
/// numeric string. Non-numeric values have no order (comparisons are false):
/// comparing e.g. arbitrary strings lexicographically would surprise more
/// often than help.
fn compare(value: &Value, argument: &Value) -> Option<Ordering> {
    if !(value.is_number() || argument.is_number()) {
        // Two numeric strings ("10" vs "9") still compare as numbers: an author
        // writing `argument: "9"` against a stringly-typed field means a number.
        if !(value.is_string() && argument.is_string()) {
            return None;
        }
    }
    Number::of(value)?.cmp(Number::of(argument)?)
}

/// The string form of a scalar, for comparing against a string.
fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Knock-style loose equality.
fn loose_eq(a: &Value, b: &Value) -> bool {
    // Numbers (or a number and a numeric string) compare numerically: 7 == "7.0".
    if a.is_number() || b.is_number() {
        if let (Some(x), Some(y)) = (Number::of(a), Number::of(b)) {
            return x.cmp(y) == Some(Ordering::Equal);
        }
    }
    match (a, b) {
        (Value::String(x), Value::String(y)) => x == y,
        // A string against a bool or number compares the other side's string
        // form: `argument: "true"` matches `true`.
        (Value::String(s), other) | (other, Value::String(s)) => scalar_string(other).is_some_and(|o| &o == s),
        _ => a == b,
    }
}

fn contains(value: &Value, argument: &Value) -> bool {
    match value {
        Value::String(s) => scalar_string(argument).is_some_and(|needle| s.contains(needle.as_str())),
        Value::Array(items) => items.iter().any(|item| loose_eq(item, argument)),
        Value::Object(map) => scalar_string(argument).is_some_and(|key| map.contains_key(&key)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(variable: &str, operator: &str, argument: Option<Value>) -> StepCondition {
        StepCondition { variable: variable.into(), operator: operator.into(), argument }
    }

    fn context() -> Value {
        json!({
            "data": {
                "severity": "high",
                "count": 7,
                "count_str": "7",
                "ratio": 0.5,
                "big": 18446744073709551615u64,
                "urgent": true,
                "nothing": null,
                "blank": "",
                "none": [],
                "empty_obj": {},
                "tags": ["a", "b", 3],
                "items": [{"name": "first"}, {"name": "second"}],
                "labels": {"team": "core"}
            },
            "recipient": {"plan": "pro", "age": "42"},
            "tenant": {"id": "acme"}
        })
    }

    /// Evaluates a single condition against [`context`].
    fn check(variable: &str, operator: &str, argument: Option<Value>) -> bool {
        all_hold(&[cond(variable, operator, argument)], &context(), Timestamp::now()).expect("valid condition")
    }

    #[test]
    fn empty_list_holds() {
        assert_eq!(all_hold(&[], &context(), Timestamp::now()), Ok(true));
    }

    #[test]
    fn equal_to_and_not_equal_to() {
        assert!(check("data.severity", "equal_to", Some(json!("high"))));
        assert!(!check("data.severity", "equal_to", Some(json!("low"))));
        assert!(check("data.severity", "not_equal_to", Some(json!("low"))));
        assert!(!check("data.severity", "not_equal_to", Some(json!("high"))));
        assert!(check("recipient.plan", "equal_to", Some(json!("pro"))));
        assert!(check("tenant.id", "equal_to", Some(json!("acme"))));
        // Numbers, numeric strings and string forms of scalars.
        assert!(check("data.count", "equal_to", Some(json!(7))));
        assert!(check("data.count", "equal_to", Some(json!("7"))));
        assert!(check("data.count", "equal_to", Some(json!("7.0"))));
        assert!(check("data.count_str", "equal_to", Some(json!(7))));
        assert!(check("data.ratio", "equal_to", Some(json!("0.5"))));
        assert!(check("data.urgent", "equal_to", Some(json!("true"))));
        assert!(check("data.urgent", "equal_to", Some(json!(true))));
        assert!(!check("data.urgent", "equal_to", Some(json!("false"))));
        assert!(!check("data.count", "equal_to", Some(json!("seven"))));
        assert!(check("data.big", "equal_to", Some(json!("18446744073709551615"))));
        assert!(!check("data.big", "equal_to", Some(json!("18446744073709551614"))));
        // Two strings compare as strings, not numbers.
        assert!(!check("data.count_str", "equal_to", Some(json!("7.0"))));
        // Null and structured values.
        assert!(check("data.nothing", "equal_to", Some(Value::Null)));
        assert!(check("data.labels", "equal_to", Some(json!({"team": "core"}))));
    }

    #[test]
    fn ordering_operators() {
        assert!(check("data.count", "greater_than", Some(json!(5))));
        assert!(check("data.count", "greater_than", Some(json!("5"))));
        assert!(!check("data.count", "greater_than", Some(json!(7))));
        assert!(check("data.count", "greater_than_or_equal_to", Some(json!(7))));
        assert!(check("data.count", "greater_than_or_equal_to", Some(json!("6.5"))));
        assert!(!check("data.count", "greater_than_or_equal_to", Some(json!(8))));
        assert!(check("data.count", "less_than", Some(json!(10))));
        assert!(!check("data.count", "less_than", Some(json!("7"))));
        assert!(check("data.count", "less_than_or_equal_to", Some(json!("7"))));
        assert!(!check("data.count", "less_than_or_equal_to", Some(json!(6))));
        assert!(check("data.ratio", "less_than", Some(json!(1))));
        // Numeric strings on both sides compare numerically ("42" > "100" as text).
        assert!(check("recipient.age", "less_than", Some(json!("100"))));
        assert!(check("recipient.age", "greater_than", Some(json!(41))));
        // Non-numeric values have no order.
        assert!(!check("data.severity", "greater_than", Some(json!("a"))));
        assert!(!check("data.severity", "less_than", Some(json!("z"))));
        assert!(!check("data.count", "greater_than", Some(json!("many"))));
        assert!(!check("data.urgent", "greater_than", Some(json!(0))));
    }

    #[test]
    fn contains_and_not_contains() {
        assert!(check("data.severity", "contains", Some(json!("ig"))));
        assert!(!check("data.severity", "contains", Some(json!("low"))));
        assert!(check("data.severity", "not_contains", Some(json!("low"))));
        assert!(check("data.tags", "contains", Some(json!("a"))));
        assert!(check("data.tags", "contains", Some(json!("3"))));
        assert!(check("data.tags", "contains", Some(json!(3))));
        assert!(!check("data.tags", "contains", Some(json!("c"))));
        assert!(check("data.tags", "not_contains", Some(json!("c"))));
        assert!(!check("data.tags", "not_contains", Some(json!("b"))));
        assert!(check("data.labels", "contains", Some(json!("team"))));
        assert!(!check("data.labels", "contains", Some(json!("core"))));
        assert!(!check("data.count", "contains", Some(json!(7))));
    }

    #[test]
    fn empty_and_not_empty() {
        for path in ["data.missing", "data.nothing", "data.blank", "data.none", "data.empty_obj"] {
            assert!(check(path, "empty", None), "{path} should be empty");
            assert!(!check(path, "not_empty", None), "{path} should not be not_empty");
        }
        for path in ["data.severity", "data.count", "data.urgent", "data.tags", "data.labels"] {
            assert!(!check(path, "empty", None), "{path} should not be empty");
            assert!(check(path, "not_empty", None), "{path} should be not_empty");
        }
    }

    #[test]
    fn exists_and_not_exists() {
        assert!(check("data.blank", "exists", None));
        assert!(check("data.none", "exists", None));
        assert!(!check("data.nothing", "exists", None));
        assert!(!check("data.missing", "exists", None));
        assert!(check("data.missing", "not_exists", None));
        assert!(check("data.nothing", "not_exists", None));
        assert!(!check("data.count", "not_exists", None));
    }

    #[test]
    fn missing_paths_make_comparisons_false_and_negations_true() {
        for op in ["equal_to", "greater_than", "less_than", "greater_than_or_equal_to", "less_than_or_equal_to", "contains"] {
            assert!(!check("data.missing", op, Some(json!(1))), "{op}");
            assert!(!check("actor.id", op, Some(json!("x"))), "{op}");
        }
        assert!(check("data.missing", "not_equal_to", Some(json!(1))));
        assert!(check("data.missing", "not_contains", Some(json!(1))));
        // A path through a scalar is missing, not an error.
        assert!(!check("data.severity.deeper", "exists", None));
        assert!(!check("", "exists", None));
    }

    #[test]
    fn numeric_segments_index_arrays() {
        assert!(check("data.items.0.name", "equal_to", Some(json!("first"))));
        assert!(check("data.items.1.name", "equal_to", Some(json!("second"))));
        assert!(check("data.tags.2", "equal_to", Some(json!(3))));
        assert!(!check("data.items.2.name", "exists", None));
        assert!(!check("data.items.x", "exists", None));
        assert!(!check("data.items.-1", "exists", None));
    }

    #[test]
    fn all_conditions_must_hold() {
        let both = [cond("data.severity", "equal_to", Some(json!("high"))), cond("data.count", "greater_than", Some(json!(3)))];
        assert_eq!(all_hold(&both, &context(), Timestamp::now()), Ok(true));
        let one_fails = [cond("data.severity", "equal_to", Some(json!("high"))), cond("data.count", "greater_than", Some(json!(30)))];
        assert_eq!(all_hold(&one_fails, &context(), Timestamp::now()), Ok(false));
    }

    #[test]
    fn malformed_conditions_are_errors() {
        let unknown = cond("data.x", "equals", Some(json!(1)));
        let expected = ConditionError::UnknownOperator { variable: "data.x".into(), operator: "equals".into() };
        assert_eq!(check_operators(std::slice::from_ref(&unknown)), Err(expected.clone()));
        assert_eq!(all_hold(&[unknown], &context(), Timestamp::now()), Err(expected.clone()));
        assert_eq!(expected.to_string(), "condition on `data.x`: unknown operator `equals`");

        let no_arg = cond("data.count", "greater_than", None);
        let expected = ConditionError::MissingArgument { variable: "data.count".into(), operator: "greater_than".into() };
        assert_eq!(check_operators(std::slice::from_ref(&no_arg)), Err(expected.clone()));
        assert_eq!(expected.to_string(), "condition on `data.count`: operator `greater_than` needs an argument");

        // Reported even when an earlier condition is false.
        let later_typo = [cond("data.severity", "equal_to", Some(json!("low"))), cond("data.x", "bogus", None)];
        assert!(matches!(all_hold(&later_typo, &context(), Timestamp::now()), Err(ConditionError::UnknownOperator { .. })));

        let fine = [cond("data.x", "exists", None), cond("data.x", "equal_to", Some(json!(1)))];
        assert_eq!(check_operators(&fine), Ok(()));
    }

    #[test]
    fn message_status_conditions() {
        let ctx = json!({"refs": {
            "in_app": {"delivery_status": "delivered", "engagement_status": ["seen"]},
            "hook": {"delivery_status": "undelivered", "engagement_status": []},
            "maybe": {"delivery_status": "skipped", "engagement_status": []},
        }});
        let holds = |variable: &str, operator: &str, case: &str| all_hold(&[cond(variable, operator, Some(json!(format!("$message.{case}"))))], &ctx, Timestamp::now()).unwrap();
        assert!(holds("refs.in_app.engagement_status", "contains", "seen"));
        assert!(!holds("refs.in_app.engagement_status", "not_contains", "seen"));
        assert!(holds("refs.in_app.engagement_status", "not_contains", "read"));
        assert!(holds("refs.in_app.engagement_status", "contains", "seen_not_read"));
        assert!(holds("refs.in_app.delivery_status", "greater_than_or_equal_to", "sent"), "delivered ranks above sent");
        assert!(holds("refs.in_app.delivery_status", "greater_than_or_equal_to", "delivered"));
        assert!(holds("refs.hook.delivery_status", "less_than", "sent"));
        assert!(holds("refs.hook.delivery_status", "equal_to", "undelivered"));
        assert!(holds("refs.maybe.delivery_status", "equal_to", "skipped"));
        assert!(holds("refs.in_app.delivery_status", "not_equal_to", "skipped"));
        // A step with no message (not reached, or aged out): false, negations included.
        assert!(!holds("refs.later.engagement_status", "not_contains", "seen"));
        assert!(!holds("refs.later.delivery_status", "less_than", "sent"));
    }

    #[test]
    fn knocks_other_operators() {
        let now: Timestamp = "2026-06-15T12:00:00Z".parse().unwrap();
        let ctx = json!({"data": {"tags": ["a", "b", "c"], "n": 5, "at": "2026-06-10T00:00:00Z", "day": "2026-06-20", "word": "soon"}});
        let check = |variable: &str, operator: &str, argument: Option<Value>| all_hold(&[cond(variable, operator, argument)], &ctx, now).expect("valid");
        assert!(check("data.tags", "contains_all", Some(json!(["a", "c"]))));
        assert!(!check("data.tags", "contains_all", Some(json!(["a", "z"]))));
        assert!(check("data.tags", "not_contains_all", Some(json!(["a", "z"]))));
        assert!(check("data.tags", "contains_all", Some(json!("b"))));
        assert!(check("data.n", "is_between", Some(json!([5, 10]))), "inclusive");
        assert!(!check("data.n", "is_between", Some(json!([6, 10]))));
        assert!(check("data.at", "is_timestamp", None) && check("data.day", "is_timestamp", None) && !check("data.word", "is_timestamp", None));
        assert!(check("data.at", "is_timestamp_before_now", None) && !check("data.at", "is_timestamp_on_or_after_now", None));
        assert!(check("data.day", "is_timestamp_on_or_after_now", None));
        assert!(check("data.at", "is_timestamp_before", Some(json!("3 days ago"))), "June 10 is before June 12");
        assert!(!check("data.at", "is_timestamp_before", Some(json!("7 days ago"))));
        assert!(check("data.at", "is_timestamp_on_or_after", Some(json!("1 week ago"))));
        assert!(check("data.day", "is_timestamp_before", Some(json!("2 weeks from now"))));
        assert!(check("data.at", "is_timestamp_before", Some(json!("2026-06-11T00:00:00Z"))));
        assert!(check("data.at", "is_timestamp_between", Some(json!(["2026-06-01", "2026-06-30T00:00:00Z"]))));
        assert!(!check("data.at", "is_timestamp_between", Some(json!(["2026-06-11", "2026-06-30"]))));
        // Unreadable times and arguments make the condition false, never an error.
        for bad in [json!("soon"), json!("7 fortnights ago"), json!("-3 days ago"), json!(7), json!("99999999999999 weeks ago")] {
            assert!(!check("data.at", "is_timestamp_before", Some(bad.clone())), "{bad}");
        }
        assert!(!check("data.word", "is_timestamp_before", Some(json!("1 day from now"))));
        assert_eq!(
            check_operators(&[cond("data.at", "is_timestamp_before", None)]),
            Err(ConditionError::MissingArgument { variable: "data.at".into(), operator: "is_timestamp_before".into() })
        );
        assert!(check_operators(&[cond("data.at", "is_timestamp_before_now", None)]).is_ok());
    }

    #[test]
    fn groups_nest_one_level() {
        use crate::resources::workflow::Conditions;
        let groups: Conditions = serde_json::from_value(json!({"any": [
            {"variable": "data.severity", "operator": "equal_to", "argument": "critical"},
            {"all": [{"variable": "data.severity", "operator": "equal_to", "argument": "high"}, {"variable": "recipient.oncall", "operator": "equal_to", "argument": true}]}
        ]}))
        .unwrap();
        let now = Timestamp::now();
        let holds = |severity: &str, oncall: bool| hold(&groups, &json!({"data": {"severity": severity}, "recipient": {"oncall": oncall}}), now, &NoAudiences).unwrap();
        assert!(holds("critical", false));
        assert!(holds("high", true));
        assert!(!holds("high", false));
        assert!(!holds("low", true));
        // A flat list is all-of, as before.
        let list: Conditions = serde_json::from_value(json!([{"variable": "data.a", "operator": "exists"}, {"variable": "data.b", "operator": "exists"}])).unwrap();
        assert!(hold(&list, &json!({"data": {"a": 1, "b": 2}}), now, &NoAudiences).unwrap());
        assert!(!hold(&list, &json!({"data": {"a": 1}}), now, &NoAudiences).unwrap());
        // Empty any never holds; empty all always does.
        assert!(!hold(&serde_json::from_value(json!({"any": []})).unwrap(), &json!({}), now, &NoAudiences).unwrap());
        assert!(hold(&serde_json::from_value(json!({"all": []})).unwrap(), &json!({}), now, &NoAudiences).unwrap());
        let deep: Conditions = serde_json::from_value(json!({"all": [{"any": [{"all": [{"variable": "data.a", "operator": "exists"}]}]}]})).unwrap();
        assert_eq!(super::check(&deep), Err(ConditionError::TooDeep));
        let typo: Conditions = serde_json::from_value(json!({"all": [{"any": [{"variable": "data.a", "operator": "equals", "argument": 1}]}]})).unwrap();
        assert!(matches!(super::check(&typo), Err(ConditionError::UnknownOperator { .. })));
    }

    #[test]
    fn audience_membership() {
        struct Pros;
        impl AudienceMembers for Pros {
            fn is_member(&self, audience: &str, id: &str) -> bool {
                audience == "pros" && id == "u1"
            }
        }
        let c = |op: &str| crate::resources::workflow::Conditions::from(vec![StepCondition { variable: "recipient".into(), operator: op.into(), argument: Some(json!("pros")) }]);
        let now = Timestamp::now();
        for (id, member) in [("u1", true), ("u2", false)] {
            let context = json!({"recipient": {"id": id}});
            assert_eq!(hold(&c("is_audience_member"), &context, now, &Pros).unwrap(), member);
            assert_eq!(hold(&c("is_not_audience_member"), &context, now, &Pros).unwrap(), !member);
        }
        let by_id = crate::resources::workflow::Conditions::from(vec![StepCondition {
            variable: "recipient.id".into(),
            operator: "is_audience_member".into(),
            argument: Some(json!("pros")),
        }]);
        assert!(hold(&by_id, &json!({"recipient": {"id": "u1"}}), now, &Pros).unwrap());
    }
}
