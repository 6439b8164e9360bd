//! Bounds on what one template render may cost. The liquid crate has none:
//! `{% for i in (1..9999999999) %}` builds every item before the loop starts
//! (an out-of-memory crash, repeated at every restart as the run resumes), and
//! a loop can write without end. So counted ranges are checked (literal bounds
//! when the Workflow is applied, variable bounds against the render context
//! just before rendering) and each rendered field is capped in size.
//!
//! Loops over arrays are bounded by the data they iterate (an API body is at
//! most `--max-body-bytes`).

use std::io;

use serde_json::Value;

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
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("%}") else { break };
        collect_ranges(&after[..close], &mut ranges)?;
        rest = &after[close + 2..];
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
    format!("the rendered output passes {} KiB", MAX_OUTPUT_BYTES / 1024)
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
