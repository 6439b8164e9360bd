//! Bounds on what one template render may cost. The liquid crate has none:
//! `{% for i in (1..9999999999) %}` builds every item before the loop starts
//! (an out-of-memory crash, repeated at every restart as the run resumes), and
//! a loop can write without end. So counted ranges are checked (literal bounds
//! when the Workflow is applied, variable bounds against the render context
//! just before rendering) and each rendered field is capped in size.
//!
//! Loops over arrays are bounded by the data they iterate (an API body is at
//! most `--max-body-bytes`). Loops together are bounded by the render's
//! [`budget`]: [`check_loop_iterations`] refuses, when the Workflow is
//! applied, a template whose written loop sizes already exceed it.

use std::io;

use serde_json::Value;

use super::budget::{self, MAX_LOOP_ITERATIONS};
use super::markup;

/// The most items a counted range `(a..b)` may have.
pub const MAX_RANGE_ITEMS: i128 = 1_000;

/// The most bytes one rendered field may have.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// The render context's top-level names a range bound may start from.
const ROOTS: [&str; 5] = ["data", "recipient", "actor", "tenant", "workflow"];

/// A counted range `(start..stop)` found in a template's tags.
#[derive(Debug, Clone, PartialEq)]
pub struct CountedRange {
    /// As written, for messages.
    source: String,
    start: Bound,
    stop: Bound,
}

#[derive(Debug, Clone, PartialEq)]
enum Bound {
    Number(i64),
    /// A variable path in the render context: keys and array indexes.
    Path(Vec<Segment>),
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// Every counted range in `source`'s tags (`{% ... %}`), refusing those that
/// are too large or whose bounds cannot be checked before rendering.
pub fn counted_ranges(source: &str) -> Result<Vec<CountedRange>, String> {
    let mut ranges = Vec::new();
    for tag in markup::tags(source) {
        collect_ranges(tag.args, &mut ranges)?;
    }
    for range in &ranges {
        if let (Bound::Number(start), Bound::Number(stop)) = (&range.start, &range.stop) {
            check_size(&range.source, *start, *stop)?;
        }
    }
    Ok(ranges)
}

/// Checks the ranges with variable bounds against the render context.
/// Bounds that are missing or not numbers are left to liquid, which refuses them.
pub fn check_ranges(ranges: &[CountedRange], context: &Value) -> Result<(), String> {
    for range in ranges {
        if let (Some(start), Some(stop)) = (range.start.resolve(context), range.stop.resolve(context)) {
            check_size(&range.source, start, stop)?;
        }
    }
    Ok(())
}

/// Refuses a template whose loops would run more than [`MAX_LOOP_ITERATIONS`]
/// by the sizes written in it: counted ranges with whole-number bounds (and a
/// whole-number `limit:`), each multiplied by the loops around it. Loops of
/// unknown size (arrays, variable bounds) count once, so this only refuses
/// what is certain to exceed the budget if every loop runs; loops in a
/// `comment` never run and do not count. The rest is counted as it renders.
pub fn check_loop_iterations(source: &str) -> Result<(), String> {
    // The loops around the current tag: each one's size, and its range as written if known.
    let mut open: Vec<(u128, Option<String>)> = Vec::new();
    let mut comments = 0usize;
    let mut total: u128 = 0;
    let mut worst: (u128, Vec<String>) = (0, Vec::new());
    for tag in markup::tags(source) {
        match tag.name {
            "comment" => comments += 1,
            "endcomment" => comments = comments.saturating_sub(1),
            _ if comments > 0 => {}
            "for" | "tablerow" => {
                open.push(literal_loop_size(tag.args).map_or((1, None), |(size, range)| (size, Some(range))));
                let product = open.iter().fold(1u128, |p, (size, _)| p.saturating_mul(*size));
                total = total.saturating_add(product);
                if product > worst.0 {
                    worst = (product, open.iter().filter_map(|(_, range)| range.clone()).collect());
                }
            }
            "endfor" | "endtablerow" => {
                open.pop();
            }
            _ => {}
        }
    }
    if total > u128::from(MAX_LOOP_ITERATIONS) {
        let nest = worst.1.iter().rev().map(|r| format!("`{r}`")).collect::<Vec<_>>().join(" inside ");
        return Err(format!("its loops would run {total} iterations ({nest}); a render may run at most {MAX_LOOP_ITERATIONS}"));
    }
    Ok(())
}

/// The size of a loop over a counted range with whole-number bounds, at most
/// its whole-number `limit:`, and the range as written; None otherwise.
/// `args` is what follows `for`: `i in (1..10) limit: 3 reversed`.
fn literal_loop_size(args: &str) -> Option<(u128, String)> {
    let after_var = args.trim_start().split_once(char::is_whitespace)?.1.trim_start();
    let collection = after_var.strip_prefix("in")?.trim_start().strip_prefix('(')?;
    let (inner, rest) = collection.split_once(')')?;
    let (start, stop) = inner.split_once("..")?;
    let (start, stop): (i64, i64) = (start.trim().parse().ok()?, stop.trim().parse().ok()?);
    let mut size = u128::try_from((i128::from(stop) - i128::from(start) + 1).max(0)).unwrap_or(0);
    if let Some((_, limit)) = rest.split_once("limit") {
        let digits = limit.trim_start().strip_prefix(':').map(str::trim_start).unwrap_or("");
        let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
        if let Ok(limit) = digits[..end].parse::<u128>() {
            size = size.min(limit);
        }
    }
    Some((size, format!("({})", inner.trim())))
}

fn check_size(source: &str, start: i64, stop: i64) -> Result<(), String> {
    let items = i128::from(stop) - i128::from(start) + 1;
    if items > MAX_RANGE_ITEMS {
        return Err(format!("the range `{source}` has {items} items; at most {MAX_RANGE_ITEMS} are allowed"));
    }
    Ok(())
}

/// Finds `( a .. b )` in one tag's text, outside string literals.
fn collect_ranges(tag: &str, ranges: &mut Vec<CountedRange>) -> Result<(), String> {
    let mut quote: Option<char> = None;
    for (i, c) in tag.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '(') => {
                let Some(len) = tag[i..].find(')') else { continue };
                let inner = &tag[i + 1..i + len];
                if let Some((start, stop)) = inner.split_once("..") {
                    let source = format!("({})", inner.trim());
                    let bound = |text: &str| {
                        Bound::parse(text.trim())
                            .ok_or_else(|| format!("the range `{source}`: bounds must be whole numbers or variables of {} (e.g. `(1..data.count)`)", ROOTS.join(", ")))
                    };
                    ranges.push(CountedRange { start: bound(start)?, stop: bound(stop)?, source });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

impl Bound {
    fn parse(text: &str) -> Option<Bound> {
        if let Ok(n) = text.parse::<i64>() {
            return Some(Bound::Number(n));
        }
        let mut segments = Vec::new();
        for part in text.split('.') {
            let (key, mut indexes) = part.split_once('[').map_or((part, ""), |(k, i)| (k, i));
            let identifier = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !identifier {
                return None;
            }
            segments.push(Segment::Key(key.to_string()));
            // `[0][1]` after the key: `indexes` is `0][1]`.
            while !indexes.is_empty() {
                let (index, after) = indexes.split_once(']')?;
                segments.push(Segment::Index(index.parse().ok()?));
                indexes = match after {
                    "" => "",
                    more => more.strip_prefix('[')?,
                };
            }
        }
        match segments.first() {
            Some(Segment::Key(root)) if ROOTS.contains(&root.as_str()) => Some(Bound::Path(segments)),
            _ => None,
        }
    }

    fn resolve(&self, context: &Value) -> Option<i64> {
        let path = match self {
            Bound::Number(n) => return Some(*n),
            Bound::Path(path) => path,
        };
        let mut value = context;
        for segment in path {
            value = match segment {
                Segment::Key(key) => value.get(key)?,
                Segment::Index(index) => value.get(index)?,
            };
        }
        // What liquid takes as a whole number (it refuses anything else).
        match value {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
}

/// The message for output past [`MAX_OUTPUT_BYTES`].
pub fn output_too_large() -> String {
    too_large("the rendered output")
}

/// The message for `what` (output, a `capture`) past [`MAX_OUTPUT_BYTES`].
pub fn too_large(what: &str) -> String {
    format!("{what} passes {} KiB", MAX_OUTPUT_BYTES / 1024)
}

/// Collects rendered output, failing once it passes [`MAX_OUTPUT_BYTES`].
#[derive(Default)]
pub struct CappedOutput {
    pub bytes: Vec<u8>,
    /// Set when a write was refused (liquid's own error does not say why).
    pub overflowed: bool,
}

impl io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Every piece of output passes here: loops that write (`tablerow`'s
        // cells too) and long templates meet the render's deadline.
        budget::check_time().map_err(|e| io::Error::other(e.message()))?;
        if self.bytes.len() + buf.len() > MAX_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(io::Error::other(output_too_large()));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn literal_ranges_are_checked_when_compiled() {
        assert_eq!(counted_ranges("{% for i in (1..1000) %}{{ i }}{% endfor %}").unwrap().len(), 1);
        let err = counted_ranges("{% for i in (1..9999999999) %}{% endfor %}").unwrap_err();
        assert_eq!(err, "the range `(1..9999999999)` has 9999999999 items; at most 1000 are allowed");
        assert!(counted_ranges("{%- tablerow i in (-5000..5) -%}{% endtablerow %}").unwrap_err().contains("5006 items"));
        // No overflow at the ends of i64.
        assert!(counted_ranges(&format!("{{% for i in ({}..{}) %}}{{% endfor %}}", i64::MIN, i64::MAX)).is_err());
        // A reversed range is empty.
        assert!(counted_ranges("{% for i in (1000000..1) %}{% endfor %}").is_ok());
    }

    #[test]
    fn ranges_outside_tags_or_in_strings_are_text() {
        assert!(counted_ranges("(1..9999999999) {{ \"(1..9999999999)\" }}").unwrap().is_empty());
        assert!(counted_ranges("{% if x == \"(1..9999999999)\" %}{% endif %}").unwrap().is_empty());
    }

    #[test]
    fn bounds_must_be_numbers_or_context_variables() {
        assert!(counted_ranges("{% for i in (1..data.count) %}{% endfor %}").is_ok());
        assert!(counted_ranges("{% for i in (recipient.a[0].b..data.items[2]) %}{% endfor %}").is_ok());
        for bad in ["(1..n)", "(1..forloop.index)", "(1..\"9\")", "(1..data[x])", "(1..data.)"] {
            let err = counted_ranges(&format!("{{% assign n = 5 %}}{{% for i in {bad} %}}{{% endfor %}}")).unwrap_err();
            assert!(err.contains("bounds must be whole numbers or variables of data"), "{bad}: {err}");
        }
    }

    #[test]
    fn variable_ranges_are_checked_against_the_context() {
        let ranges = counted_ranges("{% for i in (data.from..data.to) %}{% endfor %}").unwrap();
        assert!(check_ranges(&ranges, &json!({"data": {"from": 1, "to": 1000}})).is_ok());
        let err = check_ranges(&ranges, &json!({"data": {"from": 1, "to": "5000000000"}})).unwrap_err();
        assert_eq!(err, "the range `(data.from..data.to)` has 5000000000 items; at most 1000 are allowed");
        // Missing or not whole numbers: left to liquid, which refuses them.
        assert!(check_ranges(&ranges, &json!({"data": {"to": 5000000000i64}})).is_ok());
        assert!(check_ranges(&ranges, &json!({"data": {"from": 0.5, "to": 5e9}})).is_ok());
        let indexed = counted_ranges("{% for i in (1..data.sizes[1]) %}{% endfor %}").unwrap();
        assert!(check_ranges(&indexed, &json!({"data": {"sizes": [1, 100000]}})).is_err());
    }

    #[test]
    fn nested_written_loop_sizes_are_counted_against_the_budget() {
        let ok = |source: &str| check_loop_iterations(source).is_ok();
        // 1,000 + 1,000 x 99 = 100,000: exactly the budget.
        assert!(ok("{% for a in (1..1000) %}{% for b in (1..99) %}{% endfor %}{% endfor %}"));
        assert!(!ok("{% for a in (1..1000) %}{% for b in (1..100) %}{% endfor %}{% endfor %}"));
        // Loops in sequence add up; loops of unknown size count once.
        assert!(!ok(&"{% for a in (1..1000) %}{% endfor %}".repeat(101)));
        assert!(ok("{% for a in data.items %}{% for b in (1..data.n) %}{% for c in (1..1000) %}{% endfor %}{% endfor %}{% endfor %}"));
        // `limit:` caps a loop; tablerow is a loop; comments and raw text never run.
        assert!(ok("{% tablerow a in (1..1000) %}{%- for b in (0..999) limit:50 -%}{% endfor %}{% endtablerow %}"));
        assert!(!ok("{% tablerow a in (1..1000) %}{% for b in (1..1000) %}{% endfor %}{% endtablerow %}"));
        assert!(ok("{% comment %}{% comment %}{% endcomment %}{% for a in (1..1000) %}{% for b in (1..1000) %}{% endfor %}{% endfor %}{% endcomment %}"));
        assert!(ok("{% raw %}{% for a in (1..1000) %}{% for b in (1..1000) %}{% endraw %}"));
        // The message names the nest that costs most.
        let err =
            check_loop_iterations("{% for a in (1..10) %}{% endfor %}{% for a in (1..500) %}{% for b in data.x %}{% for c in (-9..990) %}{% endfor %}{% endfor %}{% endfor %}")
                .unwrap_err();
        assert_eq!(err, "its loops would run 501010 iterations (`(-9..990)` inside `(1..500)`); a render may run at most 100000");
    }

    #[test]
    fn output_is_capped() {
        use std::io::Write;
        let mut out = CappedOutput::default();
        out.write_all(&vec![b'x'; MAX_OUTPUT_BYTES]).unwrap();
        assert!(!out.overflowed);
        assert!(out.write_all(b"y").is_err());
        assert!(out.overflowed);
        assert_eq!(out.bytes.len(), MAX_OUTPUT_BYTES);
    }
}
