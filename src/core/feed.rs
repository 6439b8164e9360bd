//! In-app feed messages: what a step's rendered template becomes in Knock's
//! feed item, `blocks` (a `body` Markdown block with its HTML, an
//! `action_url` text block, an `actions` button set).
//!
//! Knock's React components put `body.rendered` into the page as HTML, and the
//! Markdown comes from templates filled with user data, so the HTML is made
//! safe here: raw HTML in the Markdown is shown as text, and a link or image
//! whose URL is not http(s), mailto or relative points nowhere (`#`).

use pulldown_cmark::{CowStr, Event, Parser, Tag};
use serde_json::{json, Map, Value};

/// The template fields of an in-app step.
pub const MARKDOWN_BODY: &str = "markdownBody";
pub const ACTION_URL: &str = "actionUrl";
pub const ACTION_BUTTONS: &str = "actionButtons";

/// Markdown to HTML, with raw HTML escaped and unsafe URLs dropped.
pub fn render_markdown(markdown: &str) -> String {
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, markdown_events(markdown));
    html
}

/// The Markdown's events made safe: raw HTML as text, unsafe URLs dropped
/// (also the templates' `from_markdown` filter, which writes them capped).
pub fn markdown_events(markdown: &str) -> impl Iterator<Item = Event<'_>> {
    Parser::new(markdown).map(|event| match event {
        // Raw HTML is shown, never interpreted.
        Event::Html(html) | Event::InlineHtml(html) => Event::Text(html),
        Event::Start(Tag::Link { link_type, dest_url, title, id }) => Event::Start(Tag::Link { link_type, dest_url: safe_url(dest_url), title, id }),
        Event::Start(Tag::Image { link_type, dest_url, title, id }) => Event::Start(Tag::Image { link_type, dest_url: safe_url(dest_url), title, id }),
        other => other,
    })
}

/// `url` when it is http(s), mailto or relative; `#` otherwise (`javascript:`, `data:`, ...).
fn safe_url(url: CowStr<'_>) -> CowStr<'_> {
    if is_safe_url(&url) {
        url
    } else {
        CowStr::Borrowed("#")
    }
}

/// Whether a link target is safe to put in a page.
pub fn is_safe_url(url: &str) -> bool {
    let trimmed: String = url.trim().chars().filter(|c| !c.is_control() && !c.is_whitespace()).collect();
    match trimmed.split_once(':') {
        // A colon before any `/`, `?` or `#` is a scheme.
        Some((scheme, _)) if !scheme.contains(['/', '?', '#']) => ["http", "https", "mailto"].contains(&scheme.to_ascii_lowercase().as_str()),
        _ => true,
    }
}

/// The feed blocks of a rendered in-app template.
pub fn blocks(fields: &Map<String, Value>) -> Vec<Value> {
    let text = |key: &str| fields.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
    let body = text(MARKDOWN_BODY);
    let mut out = vec![json!({"type": "markdown", "name": "body", "content": body, "rendered": render_markdown(&body)})];
    let action = text(ACTION_URL);
    if !action.is_empty() {
        let safe = if is_safe_url(&action) { action.clone() } else { "#".to_string() };
        out.push(json!({"type": "text", "name": "action_url", "content": action, "rendered": safe}));
    }
    if let Some(Value::Array(buttons)) = fields.get(ACTION_BUTTONS) {
        let names = ["primary", "secondary"];
        let buttons: Vec<Value> = buttons
            .iter()
            .take(2)
            .enumerate()
            .map(|(i, b)| {
                let action = b.get("action").and_then(Value::as_str).filter(|a| is_safe_url(a)).unwrap_or("#");
                json!({"name": names[i], "label": b.get("label").and_then(Value::as_str).unwrap_or_default(), "action": action})
            })
            .collect();
        out.push(json!({"type": "button_set", "name": "actions", "buttons": buttons}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_becomes_html() {
        assert_eq!(render_markdown("**Jane** commented"), "<p><strong>Jane</strong> commented</p>\n");
        assert_eq!(render_markdown("[open](https://app.example/p/1)"), "<p><a href=\"https://app.example/p/1\">open</a></p>\n");
    }

    #[test]
    fn hostile_markdown_stays_text() {
        let html = render_markdown("hi <script>alert(1)</script> <img src=x onerror=alert(1)>");
        assert!(!html.contains("<script") && !html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        let html = render_markdown("<div onclick=\"x\">block</div>\n\n[x](javascript:alert(1)) ![i](data:text/html;base64,AAAA) [y]( JaVaScRiPt:alert(2))");
        assert!(!html.contains("<div") && !html.contains("javascript") && !html.contains("JaVaScRiPt") && !html.contains("data:"), "{html}");
        assert!(html.contains("href=\"#\""), "{html}");
    }

    #[test]
    fn urls_are_checked_by_scheme() {
        for ok in ["https://a.example", "http://a", "mailto:a@b", "/relative/path", "page?x=a:b", "#frag"] {
            assert!(is_safe_url(ok), "{ok}");
        }
        for bad in ["javascript:alert(1)", " javascript:x", "java\tscript:x", "data:text/html,x", "vbscript:x", "JAVASCRIPT:x"] {
            assert!(!is_safe_url(bad), "{bad}");
        }
    }

    #[test]
    fn blocks_as_knocks_feed_items_have_them() {
        let fields: Map<String, Value> = serde_json::from_value(json!({
            "markdownBody": "**Jane** commented", "actionUrl": "https://app.example/p/1",
            "actionButtons": [{"label": "Open", "action": "https://app.example/p/1"}, {"label": "Bad", "action": "javascript:x"}],
        }))
        .unwrap();
        let b = blocks(&fields);
        assert_eq!(b[0], json!({"type": "markdown", "name": "body", "content": "**Jane** commented", "rendered": "<p><strong>Jane</strong> commented</p>\n"}));
        assert_eq!(b[1]["rendered"], "https://app.example/p/1");
        assert_eq!(b[2]["buttons"][0], json!({"name": "primary", "label": "Open", "action": "https://app.example/p/1"}));
        assert_eq!(b[2]["buttons"][1]["action"], "#");
        let only_body: Map<String, Value> = serde_json::from_value(json!({"markdownBody": "x"})).unwrap();
        assert_eq!(blocks(&only_body).len(), 1);
        let javascript_action: Map<String, Value> = serde_json::from_value(json!({"markdownBody": "x", "actionUrl": "javascript:alert(1)"})).unwrap();
        assert_eq!(blocks(&javascript_action)[1]["rendered"], "#");
    }
}
