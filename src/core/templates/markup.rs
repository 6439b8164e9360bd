//! Where a template's tags are, without parsing it: what [`super::limits`]
//! and [`super::budget`] need to read (loop ranges) and to mark (loop bodies).
//!
//! This follows liquid's own lexer (liquid-core's `grammar.pest`) for
//! templates liquid accepts, which are the only ones it is used on: markup
//! starts at `{{` or `{%` and ends at the first `}}` or `%}` outside a quoted
//! string (liquid strings have no escapes), and what lies between
//! `{% raw %}` and `{% endraw %}` is text. Markup that never closes is text,
//! as liquid treats it (it can only occur inside `raw`). Should this lexer
//! and liquid's ever disagree (unbalanced markup inside `raw`), the budget
//! notices when the template is compiled and refuses it.

/// One `{% ... %}` tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Tag<'a> {
    /// Byte offset of its `{%`.
    pub start: usize,
    /// Byte offset just past its `%}`.
    pub end: usize,
    /// `for`, `endfor`, `if`, ...
    pub name: &'a str,
    /// What follows the name, trimmed (`i in (1..5) limit: 2`).
    pub args: &'a str,
    /// Closes with `-%}`, so liquid drops the whitespace that follows it.
    pub trims_right: bool,
}

/// Every tag of `source` in order, leaving out the text of `raw` blocks.
pub fn tags(source: &str) -> Vec<Tag<'_>> {
    let mut tags = Vec::new();
    let mut pos = 0;
    let mut in_raw = false;
    while let Some(offset) = source[pos..].find('{') {
        let start = pos + offset;
        let rest = &source[start..];
        let close = if rest.starts_with("{%") {
            "%}"
        } else if rest.starts_with("{{") {
            "}}"
        } else {
            pos = start + 1;
            continue;
        };
        let Some(len) = markup_len(&rest[2..], close) else {
            // Never closes: text, as for liquid.
            pos = start + 1;
            continue;
        };
        let end = start + 2 + len;
        if close == "%}" {
            let inner = &source[start + 2..end - 2];
            let (inner, trims_right) = match inner.strip_suffix('-') {
                Some(inner) => (inner, true),
                None => (inner, false),
            };
            let inner = inner.strip_prefix('-').unwrap_or(inner).trim_start();
            // liquid identifiers: letters, digits, `_` and `-`.
            let name_len = inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')).unwrap_or(inner.len());
            let (name, args) = inner.split_at(name_len);
            let args = args.trim();
            if in_raw {
                // `raw` ends at the first `endraw` without arguments (it does not nest).
                in_raw = !(name == "endraw" && args.is_empty());
            } else {
                in_raw = name == "raw";
                tags.push(Tag { start, end, name, args, trims_right });
            }
        }
        pos = end;
    }
    tags
}

/// The length of markup after its opening `{{`/`{%` up to and including
/// `close`, skipping quoted strings; None when it never closes.
fn markup_len(after_open: &str, close: &str) -> Option<usize> {
    let mut i = 0;
    while i < after_open.len() {
        let rest = &after_open[i..];
        if rest.starts_with(close) {
            return Some(i + close.len());
        }
        let c = rest.chars().next()?;
        if c == '"' || c == '\'' {
            // The string runs to the next same quote; unterminated, the markup is invalid.
            i += 1 + rest[1..].find(c)? + 1;
        } else {
            i += c.len_utf8();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(source: &str) -> Vec<&str> {
        tags(source).into_iter().map(|t| t.name).collect()
    }

    #[test]
    fn finds_tags_names_arguments_and_trimming() {
        let source = "a {% for i in (1..3) %}{{ i }}{%- endfor -%} b {%-if x-%}{% endif %}";
        let found = tags(source);
        assert_eq!(
            found.iter().map(|t| (t.name, t.args, t.trims_right)).collect::<Vec<_>>(),
            [("for", "i in (1..3)", false), ("endfor", "", true), ("if", "x", true), ("endif", "", false)]
        );
        assert_eq!(&source[found[0].start..found[0].end], "{% for i in (1..3) %}");
        assert_eq!(&source[found[1].start..found[1].end], "{%- endfor -%}");
        // Multi-line tags, and a hyphenated argument that is not trimming.
        assert_eq!(tags("{%\n  for x in data.a-b\n%}")[0].args, "x in data.a-b");
        assert!(!tags("{% for x in a- %}")[0].trims_right);
    }

    #[test]
    fn quoted_strings_and_output_are_not_tags() {
        assert_eq!(names("{{ \"{% for i in (1..9) %}\" }}{% if a == \"%}\" %}{% endif %}"), ["if", "endif"]);
        assert_eq!(names("{{ '}}' }}{% for c in '%}' %}{% endfor %}"), ["for", "endfor"]);
        assert_eq!(names("100% {not markup} {% if x %}{% endif %}"), ["if", "endif"]);
    }

    #[test]
    fn raw_text_is_not_markup() {
        assert_eq!(names("{% raw %}{% for i in (1..9) %}{{ x }}{% endraw %}{% for j in y %}{% endfor %}"), ["raw", "for", "endfor"]);
        assert_eq!(names("{%- raw -%}{% endraw x %}{%- endraw -%}{% if a %}{% endif %}"), ["raw", "if", "endif"]);
        // Markup that never closes is text, inside raw as elsewhere.
        assert_eq!(names("{% raw %}{{ \"oops {% endraw %}{% if a %}{% endif %}"), ["raw", "if", "endif"]);
        assert_eq!(names("{% if a %}{% \"unterminated %}"), ["if"]);
    }
}
