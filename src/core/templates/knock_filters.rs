//! Knock's Liquid helpers, so that templates imported from Knock render the
//! same in herald (Knock's "Liquid helpers" reference): `timezone`, `date`
//! (with its timezone argument), `format_date_in_locale`,
//! `format_datetime_in_locale`, `format_number`, `currency`,
//! `rounded_currency`, `pluralize`, `titlecase`, `from_json`,
//! `from_markdown`, `intersect`, `compare_versions`, `md5`, `sha256` and
//! `hmac_sha256`. (`json` is in the parent module.)
//!
//! Like the rest of herald's templates, every filter here is bounded (see
//! [`super::capped`]): text they build is written into a buffer capped at
//! [`MAX_OUTPUT_BYTES`] that also checks the render's deadline; numbers and
//! timestamps they read are refused past a small length; `from_json` takes
//! at most 1 MiB, [`MAX_JSON_DEPTH`] levels and [`MAX_JSON_VALUES`] values.
//! No input makes them panic: a value they cannot read is either returned
//! as it is (a timestamp that is not one, as liquid's `date` does) or fails
//! the render with a message naming the filter.
//!
//! Locales: Knock formats numbers, currencies and dates with CLDR data for
//! some 80 locales. herald carries a small table ([`Locale`]) of separators
//! and currency placement for common ones; other locales format as `en`.

use std::fmt::{self, Write as _};

use hmac::Mac;
use jiff::fmt::strtime::{BrokenDownTime, Config, PosixCustom};
use jiff::fmt::temporal::{Pieces, PiecesOffset};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use liquid_core::model::{Object, Value, ValueView};
use liquid_core::parser::{FilterArguments, ParameterReflection};
use liquid_core::{Expression, Filter, FilterReflection, ParseFilter, Runtime};
use sha2::Digest;

use super::budget;
use super::limits::MAX_OUTPUT_BYTES;

/// The deepest nesting `from_json` builds.
pub const MAX_JSON_DEPTH: usize = 64;

/// The most values (scalars, arrays and objects) one `from_json` builds.
pub const MAX_JSON_VALUES: usize = 100_000;

/// The longest text read as a number (1e308 written out has 309 digits).
const MAX_NUMBER_CHARS: usize = 400;

/// The longest text read as a timestamp.
const MAX_TIMESTAMP_CHARS: usize = 100;

/// The most fraction digits `format_number` writes.
const MAX_PRECISION: i64 = 20;

/// Registers Knock's helpers (over liquid's `date`).
pub fn register(builder: liquid::ParserBuilder) -> liquid::ParserBuilder {
    use Kind::*;
    [
        (Timezone, "timezone", 1, 1, "Converts a timestamp to an IANA time zone (ISO 8601 with its offset)."),
        (Date, "date", 0, 2, "Formats a timestamp with strftime, optionally in an IANA time zone."),
        (FormatDateInLocale, "format_date_in_locale", 0, 2, "Formats a timestamp's date for a locale: short, medium, long or full."),
        (FormatDatetimeInLocale, "format_datetime_in_locale", 0, 3, "Formats a timestamp's date and time for a locale."),
        (FormatNumber, "format_number", 0, 2, "Formats a number with the locale's separators."),
        (Currency, "currency", 0, 2, "Formats an amount of a currency (USD by default) for a locale."),
        (RoundedCurrency, "rounded_currency", 0, 2, "Formats an amount of a currency, rounded to a whole number."),
        (Pluralize, "pluralize", 1, 2, "The first word when the input is 1, else the second."),
        (Titlecase, "titlecase", 0, 0, "Capitalizes the first letter of every word."),
        (FromJson, "from_json", 0, 0, "Parses a JSON string into a value."),
        (FromMarkdown, "from_markdown", 0, 0, "Renders Markdown as HTML (raw HTML escaped)."),
        (Intersect, "intersect", 1, 1, "The items of the input that are also in the argument."),
        (CompareVersions, "compare_versions", 1, 1, "Compares two semantic versions: -1, 0 or 1."),
        (Md5, "md5", 0, 0, "The MD5 of the input, in hex."),
        (Sha256, "sha256", 0, 0, "The SHA-256 of the input, in hex."),
        (HmacSha256, "hmac_sha256", 1, 1, "The HMAC-SHA-256 of the input with a key, in hex."),
    ]
    .into_iter()
    .fold(builder, |builder, (kind, name, min_args, max_args, description)| builder.filter(KnockFilter { kind, name, min_args, max_args, description }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Timezone,
    Date,
    FormatDateInLocale,
    FormatDatetimeInLocale,
    FormatNumber,
    Currency,
    RoundedCurrency,
    Pluralize,
    Titlecase,
    FromJson,
    FromMarkdown,
    Intersect,
    CompareVersions,
    Md5,
    Sha256,
    HmacSha256,
}

/// One of Knock's helpers, as liquid parses it: positional arguments only.
#[derive(Debug, Clone)]
struct KnockFilter {
    kind: Kind,
    name: &'static str,
    min_args: usize,
    max_args: usize,
    description: &'static str,
}

impl FilterReflection for KnockFilter {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> &str {
        self.description
    }
    fn positional_parameters(&self) -> &'static [ParameterReflection] {
        &[]
    }
    fn keyword_parameters(&self) -> &'static [ParameterReflection] {
        &[]
    }
}

impl ParseFilter for KnockFilter {
    fn parse(&self, arguments: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        if arguments.keyword.count() > 0 {
            return Err(liquid_core::Error::with_msg(format!("`{}` takes no named arguments", self.name)));
        }
        let args: Vec<Expression> = arguments.positional.collect();
        if args.len() < self.min_args || args.len() > self.max_args {
            let wanted = match (self.min_args, self.max_args) {
                (0, 0) => "no arguments".to_string(),
                (min, max) if min == max => format!("{min} argument{}", if min == 1 { "" } else { "s" }),
                (min, max) => format!("{min} to {max} arguments"),
            };
            return Err(liquid_core::Error::with_msg(format!("`{}` takes {wanted} ({} given)", self.name, args.len())));
        }
        Ok(Box::new(Parsed { kind: self.kind, name: self.name, args }))
    }
    fn reflection(&self) -> &dyn FilterReflection {
        self
    }
}

#[derive(Debug)]
struct Parsed {
    kind: Kind,
    name: &'static str,
    args: Vec<Expression>,
}

impl fmt::Display for Parsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        for (i, arg) in self.args.iter().enumerate() {
            write!(f, "{}{arg}", if i == 0 { ": " } else { ", " })?;
        }
        Ok(())
    }
}

impl Filter for Parsed {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<Value> {
        budget::check_time_liquid()?;
        let args = self.args.iter().map(|e| e.evaluate(runtime).map(|v| v.into_owned())).collect::<liquid_core::Result<Vec<Value>>>()?;
        evaluate(self.kind, input, &args).map_err(|message| liquid_core::Error::with_msg(format!("{}: {message}", self.name)))
    }
}

/// The `i`th argument, when given and not nil.
fn arg(args: &[Value], i: usize) -> Option<&Value> {
    args.get(i).filter(|v| !v.is_nil())
}

/// The `i`th argument as text, when given, not nil and not empty.
fn text_arg(args: &[Value], i: usize) -> Option<String> {
    arg(args, i).map(|v| v.to_kstr().to_string()).filter(|s| !s.is_empty())
}

fn evaluate(kind: Kind, input: &dyn ValueView, args: &[Value]) -> Result<Value, String> {
    match kind {
        Kind::Timezone => timezone(input, args),
        Kind::Date => date(input, args),
        Kind::FormatDateInLocale | Kind::FormatDatetimeInLocale => date_in_locale(kind, input, args),
        Kind::FormatNumber => format_number(input, args),
        Kind::Currency | Kind::RoundedCurrency => currency(input, args, kind == Kind::RoundedCurrency),
        Kind::Pluralize => Ok(pluralize(input, args)),
        Kind::Titlecase => titlecase(&input.to_kstr()).map(Value::scalar),
        Kind::FromJson => from_json(input),
        Kind::FromMarkdown => from_markdown(&input.to_kstr()).map(Value::scalar),
        Kind::Intersect => intersect(input, arg(args, 0)),
        Kind::CompareVersions => compare_versions(&input.to_kstr(), &args[0].to_kstr()).map(|o| Value::scalar(o as i64)),
        Kind::Md5 => Ok(Value::scalar(hex(&<md5::Md5 as md5::Digest>::digest(input.to_kstr().as_bytes())))),
        Kind::Sha256 => Ok(Value::scalar(hex(&sha2::Sha256::digest(input.to_kstr().as_bytes())))),
        Kind::HmacSha256 => {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(args[0].to_kstr().as_bytes()).map_err(|e| e.to_string())?;
            mac.update(input.to_kstr().as_bytes());
            Ok(Value::scalar(hex(&mac.finalize().into_bytes())))
        }
    }
}

// ---------------------------------------------------------------------------
// Text built under the cap.

/// Text that fails once it passes [`MAX_OUTPUT_BYTES`] (or the render's deadline).
#[derive(Default)]
struct CappedText(String);

impl fmt::Write for CappedText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.0.len().saturating_add(s.len()) > MAX_OUTPUT_BYTES || budget::check_time().is_err() {
            return Err(fmt::Error);
        }
        self.0.push_str(s);
        Ok(())
    }
}

fn too_large() -> String {
    format!("the result passes {} KiB", MAX_OUTPUT_BYTES / 1024)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// ---------------------------------------------------------------------------
// Timestamps.

/// A timestamp as Knock and liquid read one: RFC 3339 / ISO 8601 (with an
/// offset or `Z`, which are kept; with a `[zone]` annotation; without an
/// offset, read as UTC; a date alone is its midnight UTC), a Unix time in
/// seconds, `now` / `today`, or one of liquid's own formats
/// (`13 Jun 2016 02:30:00 +0300`). None for anything else.
fn parse_timestamp(input: &dyn ValueView) -> Option<Zoned> {
    let scalar = input.as_scalar()?;
    if input.type_name() == "whole number" {
        return Timestamp::from_second(scalar.to_integer()?).ok().map(|t| t.to_zoned(TimeZone::UTC));
    }
    let text = scalar.to_kstr();
    let text = text.trim();
    if text.is_empty() || text.len() > MAX_TIMESTAMP_CHARS {
        return None;
    }
    if text.eq_ignore_ascii_case("now") || text.eq_ignore_ascii_case("today") {
        return Some(Timestamp::now().to_zoned(TimeZone::UTC));
    }
    if let Ok(seconds) = text.parse::<i64>() {
        return Timestamp::from_second(seconds).ok().map(|t| t.to_zoned(TimeZone::UTC));
    }
    if let Ok(pieces) = Pieces::parse(text) {
        if pieces.time_zone_annotation().is_some() {
            if let Ok(zoned) = text.parse::<Zoned>() {
                return Some(zoned);
            }
        }
        let civil = pieces.date().to_datetime(pieces.time().unwrap_or_default());
        let zone = match pieces.offset() {
            Some(PiecesOffset::Numeric(offset)) => TimeZone::fixed(offset.offset()),
            // `Z`, or none: UTC.
            _ => TimeZone::UTC,
        };
        return civil.to_zoned(zone).ok();
    }
    // liquid's formats, through liquid's own parser; it writes them back as `2016-06-13 02:30:00 +0300`.
    let liquid = scalar.to_date_time()?.to_string();
    BrokenDownTime::parse("%Y-%m-%d %H:%M:%S%.f %z", &liquid).ok()?.to_zoned().ok()
}

/// An IANA time zone by name (`America/New_York`, `UTC`).
fn zone(name: &str) -> Result<TimeZone, String> {
    if name.len() > MAX_TIMESTAMP_CHARS {
        return Err("the time zone name is too long".to_string());
    }
    jiff::tz::db().get(name).map_err(|_| format!("unknown time zone `{name}` (expected an IANA name such as `America/New_York`)"))
}

/// strftime, in Ruby's manner: an unknown directive is written as it is;
/// `%c`, `%x`, `%X` and `%r` as in the POSIX locale.
fn strftime(time: &Zoned, format: &str) -> Result<String, String> {
    let config = Config::new().custom(PosixCustom::new()).lenient(true);
    let mut out = CappedText::default();
    BrokenDownTime::from(time).format_with_config(&config, format, &mut jiff::fmt::StdFmtWrite(&mut out)).map_err(|_| too_large())?;
    Ok(out.0)
}

/// `{{ ts | timezone: "America/New_York" }}` → `2023-12-31T19:30:00-05:00`.
/// Input that is not a timestamp is returned as it is; a nil or empty zone
/// leaves the timestamp in UTC.
fn timezone(input: &dyn ValueView, args: &[Value]) -> Result<Value, String> {
    let Some(time) = parse_timestamp(input) else {
        return Ok(input.to_value());
    };
    let zone = match text_arg(args, 0) {
        Some(name) => zone(&name)?,
        None => TimeZone::UTC,
    };
    strftime(&time.with_time_zone(zone), "%Y-%m-%dT%H:%M:%S%.f%:z").map(Value::scalar)
}

/// `{{ ts | date: "%-I:%M %p %Z", "America/New_York" }}` → `2:30 PM EST`.
/// Without a zone the timestamp keeps its own offset. As liquid's `date`,
/// input that is not a timestamp, or an empty format, returns the input.
fn date(input: &dyn ValueView, args: &[Value]) -> Result<Value, String> {
    let Some(format) = text_arg(args, 0) else {
        return Ok(input.to_value());
    };
    let Some(mut time) = parse_timestamp(input) else {
        return Ok(input.to_value());
    };
    if let Some(name) = text_arg(args, 1) {
        time = time.with_time_zone(zone(&name)?);
    }
    strftime(&time, &format).map(Value::scalar)
}

/// `format_date_in_locale: locale, date_style` and
/// `format_datetime_in_locale: locale, date_style, time_style`, with CLDR's
/// English patterns (`en-GB`; `en` and every other locale as `en-US`).
fn date_in_locale(kind: Kind, input: &dyn ValueView, args: &[Value]) -> Result<Value, String> {
    let Some(time) = parse_timestamp(input) else {
        return Ok(input.to_value());
    };
    let british = text_arg(args, 0).is_some_and(|l| l.eq_ignore_ascii_case("en-GB") || l.eq_ignore_ascii_case("en_GB"));
    let style = |i: usize| -> Result<usize, String> {
        let name = text_arg(args, i).unwrap_or_else(|| "short".to_string());
        ["short", "medium", "long", "full"].iter().position(|s| s.eq_ignore_ascii_case(&name)).ok_or_else(|| format!("unknown format `{name}` (short, medium, long or full)"))
    };
    let date_style = style(1)?;
    const US_DATES: [&str; 4] = ["%-m/%-d/%y", "%b %-d, %Y", "%B %-d, %Y", "%A, %B %-d, %Y"];
    const GB_DATES: [&str; 4] = ["%d/%m/%Y", "%-d %b %Y", "%-d %B %Y", "%A, %-d %B %Y"];
    const US_TIMES: [&str; 4] = ["%-I:%M %p", "%-I:%M:%S %p", "%-I:%M:%S %p %Z", "%-I:%M:%S %p %Z"];
    const GB_TIMES: [&str; 4] = ["%H:%M", "%H:%M:%S", "%H:%M:%S %Z", "%H:%M:%S %Z"];
    let date_format = if british { GB_DATES } else { US_DATES }[date_style];
    let format = if kind == Kind::FormatDatetimeInLocale {
        let time_style = style(2)?;
        let time_format = if british { GB_TIMES } else { US_TIMES }[time_style];
        // CLDR joins long and full dates to the time with " at ".
        format!("{date_format}{}{time_format}", if date_style >= 2 { " at " } else { ", " })
    } else {
        date_format.to_string()
    };
    strftime(&time, &format).map(Value::scalar)
}

// ---------------------------------------------------------------------------
// Numbers and currencies.

/// A decimal number as digits, so that integers of any size and decimal
/// text keep every digit.
#[derive(Debug, Clone, PartialEq)]
struct Decimal {
    negative: bool,
    /// At least one digit, no leading zeros (except `0` itself).
    int: String,
    fraction: String,
}

impl Decimal {
    /// Integers, floats, and text holding either; None for anything else
    /// (nil, booleans, `abc`, infinities).
    fn read(input: &dyn ValueView) -> Option<Decimal> {
        let scalar = input.as_scalar()?;
        match input.type_name() {
            "whole number" => Decimal::parse(&scalar.to_integer()?.to_string()),
            "fractional number" => Decimal::from_float(scalar.to_float()?),
            "string" => {
                let text = scalar.to_kstr();
                let text = text.trim();
                if text.len() > MAX_NUMBER_CHARS {
                    return None;
                }
                Decimal::parse(text).or_else(|| Decimal::from_float(text.parse::<f64>().ok()?))
            }
            _ => None,
        }
    }

    fn from_float(f: f64) -> Option<Decimal> {
        // Display never uses an exponent and writes the shortest exact digits.
        f.is_finite().then(|| Decimal::parse(&f.to_string())).flatten()
    }

    /// `-1234.50`, `+3`, `.5`, `7.`: optional sign, digits, optional fraction.
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, unsigned) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let (int, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
        if int.is_empty() && fraction.is_empty() || !int.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let int = int.trim_start_matches('0');
        Some(Decimal { negative, int: if int.is_empty() { "0".to_string() } else { int.to_string() }, fraction: fraction.to_string() })
    }

    /// Rounded to `digits` fraction digits, half to even (CLDR's default);
    /// with `pad`, exactly that many.
    fn round(mut self, digits: usize, pad: bool) -> Decimal {
        if self.fraction.len() > digits {
            let dropped = self.fraction.split_off(digits);
            let mut rest = dropped.bytes();
            let first = rest.next().unwrap_or(b'0');
            let last_kept = self.fraction.bytes().last().or_else(|| self.int.bytes().last()).unwrap_or(b'0');
            let up = first > b'5' || first == b'5' && (rest.any(|b| b != b'0') || (last_kept - b'0') % 2 == 1);
            if up {
                self.increment_last();
            }
        }
        if pad {
            while self.fraction.len() < digits {
                self.fraction.push('0');
            }
        } else {
            self.fraction.truncate(self.fraction.trim_end_matches('0').len());
        }
        if self.int == "0" && self.fraction.bytes().all(|b| b == b'0') {
            self.negative = false;
        }
        self
    }

    /// Adds one unit in the last kept place.
    fn increment_last(&mut self) {
        let split = self.int.len();
        let mut digits: Vec<u8> = self.int.bytes().chain(self.fraction.bytes()).collect();
        let mut i = digits.len();
        loop {
            if i == 0 {
                digits.insert(0, b'1');
                break;
            }
            i -= 1;
            if digits[i] == b'9' {
                digits[i] = b'0';
            } else {
                digits[i] += 1;
                break;
            }
        }
        let int_len = split + (digits.len() - split - self.fraction.len());
        self.fraction = String::from_utf8_lossy(&digits[int_len..]).into_owned();
        self.int = String::from_utf8_lossy(&digits[..int_len]).into_owned();
    }

    /// Digits with the locale's separators, without the sign.
    fn format(&self, locale: &Locale) -> String {
        let mut out = String::with_capacity(self.int.len() * 2 + self.fraction.len() + 2);
        let group = self.int.len() >= 3 + locale.min_grouping;
        for (i, c) in self.int.chars().enumerate() {
            if group && i > 0 && (self.int.len() - i).is_multiple_of(3) {
                out.push_str(locale.group);
            }
            out.push(c);
        }
        if !self.fraction.is_empty() {
            out.push_str(locale.decimal);
            out.push_str(&self.fraction);
        }
        out
    }
}

/// Where a locale puts the currency symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// `$1,234.50`
    Before,
    /// `R$ 1.234,50`
    BeforeSpaced,
    /// `1.234,50 €`
    After,
}

/// A locale's number conventions (CLDR's).
#[derive(Debug)]
struct Locale {
    decimal: &'static str,
    group: &'static str,
    /// Digits needed before the first group separator is used, less 3
    /// (Spanish and Polish write `1234` but `12 345`).
    min_grouping: usize,
    placement: Placement,
    /// The locale's own currency and its local symbol, where that differs from English's.
    own: Option<(&'static str, &'static str)>,
}

const NBSP: &str = "\u{a0}";

/// The conventions for a locale tag (`en`, `de-DE`, `pt_BR`): the whole tag,
/// else its language, else English.
fn locale(tag: Option<&str>) -> &'static Locale {
    const fn l(decimal: &'static str, group: &'static str, min_grouping: usize, placement: Placement, own: Option<(&'static str, &'static str)>) -> Locale {
        Locale { decimal, group, min_grouping, placement, own }
    }
    use Placement::*;
    static EN: Locale = l(".", ",", 1, Before, None);
    static DE: Locale = l(",", ".", 1, After, None);
    static FR: Locale = l(",", "\u{202f}", 1, After, None);
    static FR_CA: Locale = l(",", NBSP, 1, After, Some(("CAD", "$")));
    static ES: Locale = l(",", ".", 2, After, None);
    static ES_419: Locale = l(".", ",", 1, Before, None);
    static IT: Locale = l(",", ".", 1, After, None);
    static NL: Locale = l(",", ".", 1, BeforeSpaced, None);
    static PT: Locale = l(",", ".", 1, BeforeSpaced, None);
    static JA: Locale = l(".", ",", 1, Before, Some(("JPY", "￥")));
    static ZH: Locale = l(".", ",", 1, Before, Some(("CNY", "¥")));
    static KO: Locale = l(".", ",", 1, Before, None);
    static RU: Locale = l(",", NBSP, 1, After, Some(("RUB", "₽")));
    static UK: Locale = l(",", NBSP, 1, After, Some(("UAH", "₴")));
    static PL: Locale = l(",", NBSP, 2, After, Some(("PLN", "zł")));
    static SV: Locale = l(",", NBSP, 1, After, Some(("SEK", "kr")));
    static NB: Locale = l(",", NBSP, 1, After, Some(("NOK", "kr")));
    static FI: Locale = l(",", NBSP, 1, After, None);
    static CS: Locale = l(",", NBSP, 1, After, Some(("CZK", "Kč")));
    static DA: Locale = l(",", ".", 1, After, Some(("DKK", "kr.")));
    static TR: Locale = l(",", ".", 1, Before, Some(("TRY", "₺")));
    let Some(tag) = tag else {
        return &EN;
    };
    let tag = tag.trim().to_ascii_lowercase().replace('_', "-");
    let by_name = |name: &str| -> Option<&'static Locale> {
        Some(match name {
            "en" => &EN,
            "de" => &DE,
            "fr" => &FR,
            "fr-ca" => &FR_CA,
            "es" => &ES,
            "es-419" => &ES_419,
            "it" => &IT,
            "nl" => &NL,
            "pt" | "pt-br" => &PT,
            "ja" => &JA,
            "zh" => &ZH,
            "ko" => &KO,
            "ru" => &RU,
            "uk" => &UK,
            "pl" => &PL,
            "sv" => &SV,
            "nb" | "no" | "nn" => &NB,
            "fi" => &FI,
            "cs" | "sk" => &CS,
            "da" => &DA,
            "tr" => &TR,
            _ => return None,
        })
    };
    by_name(&tag).or_else(|| by_name(tag.split('-').next().unwrap_or_default())).unwrap_or(&EN)
}

/// A number for a filter that needs one; nil stays nil.
fn number(input: &dyn ValueView) -> Result<Option<Decimal>, String> {
    if input.is_nil() {
        return Ok(None);
    }
    match Decimal::read(input) {
        Some(d) => Ok(Some(d)),
        None => Err(format!("`{}` is not a number", crate::core::truncate(&input.to_kstr(), 40))),
    }
}

/// `{{ 1234567.891 | format_number: "en" }}` → `1,234,567.891`: the locale's
/// separators and at most 3 fraction digits (CLDR's `#,##0.###`). herald also
/// takes a precision, `format_number: "de", 2` → `1.234.567,89` (or alone,
/// `format_number: 2`).
fn format_number(input: &dyn ValueView, args: &[Value]) -> Result<Value, String> {
    let Some(n) = number(input)? else {
        return Ok(Value::Nil);
    };
    let (tag, precision) = match arg(args, 0) {
        Some(first) if first.type_name() == "whole number" => (None, Some(first)),
        first => (first.map(|v| v.to_kstr().to_string()), arg(args, 1)),
    };
    let precision = match precision {
        None => None,
        Some(p) => match p.as_scalar().and_then(|s| s.to_integer()) {
            Some(p) if (0..=MAX_PRECISION).contains(&p) => Some(p as usize),
            _ => return Err(format!("the precision must be a whole number from 0 to {MAX_PRECISION}")),
        },
    };
    let rounded = n.round(precision.unwrap_or(3), precision.is_some());
    let text = rounded.format(locale(tag.as_deref()));
    Ok(Value::scalar(if rounded.negative { format!("-{text}") } else { text }))
}

/// The English symbol (CLDR's) and minor digits of an ISO 4217 code.
fn currency_symbol(code: &str) -> (&str, usize) {
    let symbol = match code {
        "USD" => "$",
        "EUR" => "€",
        "GBP" => "£",
        "JPY" => "¥",
        "CAD" => "CA$",
        "AUD" => "A$",
        "NZD" => "NZ$",
        "CNY" => "CN¥",
        "INR" => "₹",
        "KRW" => "₩",
        "BRL" => "R$",
        "MXN" => "MX$",
        "HKD" => "HK$",
        "TWD" => "NT$",
        "ILS" => "₪",
        "VND" => "₫",
        "PHP" => "₱",
        "XAF" => "FCFA",
        "XOF" => "F\u{202f}CFA",
        other => other,
    };
    let digits = match code {
        "JPY" | "KRW" | "VND" | "CLP" | "ISK" | "UGX" | "PYG" | "XAF" | "XOF" | "XPF" | "RWF" | "KMF" | "GNF" | "DJF" | "VUV" | "BIF" => 0,
        "BHD" | "KWD" | "OMR" | "JOD" | "IQD" | "LYD" | "TND" => 3,
        _ => 2,
    };
    (symbol, digits)
}

/// `{{ 1234.5 | currency }}` → `$1,234.50`; `{{ 10 | currency: "GBP", "en" }}`
/// → `£10.00`; `{{ 10 | currency: "EUR", "de" }}` → `10,00 €`. The currency's
/// own minor digits (JPY none, BHD three); `rounded_currency` rounds to a
/// whole amount (`{{ 10.99 | rounded_currency: "GBP" }}` → `£11`).
fn currency(input: &dyn ValueView, args: &[Value], rounded: bool) -> Result<Value, String> {
    let Some(n) = number(input)? else {
        return Ok(Value::Nil);
    };
    let code = text_arg(args, 0).unwrap_or_else(|| "USD".to_string()).trim().to_ascii_uppercase();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!("`{}` is not a currency code (three letters, such as USD)", crate::core::truncate(&code, 40)));
    }
    let locale = locale(text_arg(args, 1).as_deref());
    let (english, digits) = currency_symbol(&code);
    let symbol = match locale.own {
        Some((own, local)) if own == code => local,
        _ => english,
    };
    let amount = n.round(if rounded { 0 } else { digits }, true);
    let sign = if amount.negative { "-" } else { "" };
    let number = amount.format(locale);
    Ok(Value::scalar(match locale.placement {
        // CLDR puts a space between digits and a symbol ending in a letter (`CHF 10.00`).
        Placement::Before if symbol.chars().last().is_some_and(char::is_alphabetic) => format!("{sign}{symbol}{NBSP}{number}"),
        Placement::Before => format!("{sign}{symbol}{number}"),
        Placement::BeforeSpaced => format!("{sign}{symbol}{NBSP}{number}"),
        Placement::After => format!("{sign}{number}{NBSP}{symbol}"),
    }))
}

// ---------------------------------------------------------------------------
// Text and data.

/// `{{ count | pluralize: "item", "items" }}`: the first word when the count
/// is 1 (`1`, `1.0`, `"1"`), else the second (0, 2, nil, anything else); the
/// second defaults to the first with an `s`.
fn pluralize(input: &dyn ValueView, args: &[Value]) -> Value {
    let singular = args[0].to_kstr().to_string();
    let one = input.as_scalar().and_then(|s| s.to_float().or_else(|| s.to_kstr().trim().parse::<f64>().ok())) == Some(1.0);
    if one {
        Value::scalar(singular)
    } else {
        Value::scalar(match arg(args, 1) {
            Some(plural) => plural.to_kstr().to_string(),
            None => format!("{singular}s"),
        })
    }
}

/// `{{ "my project name" | titlecase }}` → `My Project Name`: the first
/// letter of every word upper-cased, the rest left as they are (`iOS app` →
/// `IOS App`, `API docs` → `API Docs`).
fn titlecase(text: &str) -> Result<String, String> {
    let mut out = CappedText::default();
    let mut word_start = true;
    for c in text.chars() {
        if word_start && c.is_alphabetic() {
            for upper in c.to_uppercase() {
                out.write_char(upper).map_err(|_| too_large())?;
            }
        } else {
            out.write_char(c).map_err(|_| too_large())?;
        }
        word_start = c.is_whitespace();
    }
    Ok(out.0)
}

/// `{% assign o = data.payload | from_json %}`: a JSON string as a value
/// (objects, arrays, strings, numbers, booleans, nil). Input that is already
/// an object or array is returned as it is, nil stays nil; text that is not
/// JSON fails the render. At most 1 MiB, [`MAX_JSON_DEPTH`] levels deep and
/// [`MAX_JSON_VALUES`] values.
fn from_json(input: &dyn ValueView) -> Result<Value, String> {
    if input.is_nil() || input.as_array().is_some() || input.as_object().is_some() {
        return Ok(input.to_value());
    }
    let text = input.to_kstr();
    if text.len() > MAX_OUTPUT_BYTES {
        return Err(format!("the JSON text has {} bytes; at most {MAX_OUTPUT_BYTES}", text.len()));
    }
    // serde_json refuses nesting past 128 levels itself, without recursing further.
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?;
    let mut values = 0usize;
    json_to_liquid(&json, 0, &mut values)
}

fn json_to_liquid(json: &serde_json::Value, depth: usize, values: &mut usize) -> Result<Value, String> {
    use serde_json::Value as J;
    *values += 1;
    if *values > MAX_JSON_VALUES {
        return Err(format!("the JSON holds more than {MAX_JSON_VALUES} values"));
    }
    if depth > MAX_JSON_DEPTH {
        return Err(format!("the JSON nests more than {MAX_JSON_DEPTH} levels deep"));
    }
    Ok(match json {
        J::Null => Value::Nil,
        J::Bool(b) => Value::scalar(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::scalar(i),
            // Past i64 (liquid's widest integer) the digits are kept as text, as the render context does.
            None if n.is_u64() => Value::scalar(n.to_string()),
            None => Value::scalar(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::scalar(s.clone()),
        J::Array(items) => Value::Array(items.iter().map(|v| json_to_liquid(v, depth + 1, values)).collect::<Result<_, _>>()?),
        J::Object(map) => {
            let mut object = Object::new();
            for (k, v) in map {
                object.insert(k.clone().into(), json_to_liquid(v, depth + 1, values)?);
            }
            Value::Object(object)
        }
    })
}

/// `{{ data.comment | from_markdown }}`: Markdown as HTML, made safe as the
/// in-app feed's is (raw HTML shown as text, unsafe link targets dropped).
fn from_markdown(markdown: &str) -> Result<String, String> {
    let mut out = CappedText::default();
    // A reference link repeated can expand its target many times: the buffer caps it.
    pulldown_cmark::html::write_html_fmt(&mut out, crate::core::feed::markdown_events(markdown)).map_err(|_| too_large())?;
    Ok(out.0)
}

/// `{{ a | intersect: b }}`: the items of `a` that are also in `b`, in `a`'s
/// order, each once. nil is an empty list.
fn intersect(input: &dyn ValueView, other: Option<&Value>) -> Result<Value, String> {
    let items = |v: Option<&dyn ValueView>, which: &str| -> Result<Vec<Value>, String> {
        match v {
            None => Ok(Vec::new()),
            Some(v) if v.is_nil() => Ok(Vec::new()),
            Some(v) => v.as_array().map(|a| a.values().map(|v| v.to_value()).collect()).ok_or_else(|| format!("the {which} is not a list")),
        }
    };
    let left = items(Some(input), "input")?;
    let right = items(other.map(|v| v.as_view()), "argument")?;
    // Compared by their JSON text: linear, however long the lists.
    let key = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    let wanted: std::collections::HashSet<String> = right.iter().map(key).collect();
    let mut seen = std::collections::HashSet::new();
    budget::check_time().map_err(|e| e.message())?;
    Ok(Value::Array(left.into_iter().filter(|v| wanted.contains(&key(v)) && seen.insert(key(v))).collect()))
}

/// `{{ "1.0.0" | compare_versions: "2.0.0" }}` → `-1`: semantic versions
/// (a leading `v`, and a missing minor or patch, are accepted: `v1.2` is `1.2.0`).
fn compare_versions(left: &str, right: &str) -> Result<std::cmp::Ordering, String> {
    fn version(text: &str) -> Result<semver::Version, String> {
        let trimmed = text.trim();
        let bare = trimmed.strip_prefix(['v', 'V']).unwrap_or(trimmed);
        semver::Version::parse(bare)
            .or_else(|_| {
                // Pad the numeric core (`1`, `1.2`) before any pre-release or build part.
                let end = bare.find(['-', '+']).unwrap_or(bare.len());
                let dots = bare[..end].matches('.').count();
                semver::Version::parse(&format!("{}{}{}", &bare[..end], ".0".repeat(2usize.saturating_sub(dots)), &bare[end..]))
            })
            .map_err(|_| format!("`{}` is not a semantic version", crate::core::truncate(text, 40)))
    }
    Ok(version(left)?.cmp_precedence(&version(right)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders `source` with herald's parser and no context.
    fn render(source: &str) -> Result<String, String> {
        let parser = super::super::parser(false).unwrap();
        let template = parser.parse(source).map_err(|e| e.to_string())?;
        template.render(&liquid::object!({})).map_err(|e| e.to_string())
    }

    fn ok(source: &str) -> String {
        render(source).unwrap_or_else(|e| panic!("{source}: {e}"))
    }

    fn fails(source: &str, expected: &str) {
        let err = render(source).expect_err(source);
        assert!(err.contains(expected), "{}: {}", crate::core::truncate(source, 300), crate::core::truncate(&err, 300));
    }

    #[test]
    fn timezone_converts_to_an_iana_zone() {
        assert_eq!(ok(r#"{{ "2024-01-01T00:30:00Z" | timezone: "America/New_York" }}"#), "2023-12-31T19:30:00-05:00");
        assert_eq!(ok(r#"{{ "2026-03-02T10:00:00Z" | timezone: "Europe/Paris" }}"#), "2026-03-02T11:00:00+01:00");
        // Summer time, an offset in the input, fractional seconds, a Unix time, a date.
        assert_eq!(ok(r#"{{ "2026-07-01T10:00:00+02:00" | timezone: "America/New_York" }}"#), "2026-07-01T04:00:00-04:00");
        assert_eq!(ok(r#"{{ "2026-07-01T10:00:00.250Z" | timezone: "UTC" }}"#), "2026-07-01T10:00:00.25+00:00");
        assert_eq!(ok(r#"{{ 0 | timezone: "Asia/Kolkata" }}"#), "1970-01-01T05:30:00+05:30");
        assert_eq!(ok(r#"{{ "2026-07-01" | timezone: "Asia/Tokyo" }}"#), "2026-07-01T09:00:00+09:00");
        // No zone: UTC. Not a timestamp: as it is.
        assert_eq!(ok(r#"{{ "2026-07-01T10:00:00+02:00" | timezone: nil }}"#), "2026-07-01T08:00:00+00:00");
        assert_eq!(ok(r#"[{{ "soon" | timezone: "Europe/Paris" }}][{{ nil | timezone: "Europe/Paris" }}][{{ true | timezone: "UTC" }}]"#), "[soon][][true]");
        // Hostile: unknown zones fail naming the zone; huge and odd inputs do not panic.
        fails(r#"{{ "2026-07-01T10:00:00Z" | timezone: "Mars/Olympus_Mons" }}"#, "unknown time zone `Mars/Olympus_Mons`");
        fails(r#"{{ "2026-07-01T10:00:00Z" | timezone: "../../etc/passwd" }}"#, "unknown time zone");
        assert_eq!(ok(r#"{{ 9223372036854775807 | timezone: "UTC" }}"#), "9223372036854775807");
        assert_eq!(ok(r#"{{ -9223372036854775807 | timezone: "UTC" }}"#), "-9223372036854775807");
        assert_eq!(ok(r#"{{ "99999-01-01T00:00:00Z" | timezone: "UTC" }}"#), "99999-01-01T00:00:00Z");
        assert_eq!(ok(r#"{{ "9999-12-31T23:59:59-23:59" | timezone: "Pacific/Kiritimati" }}"#), "9999-12-31T23:59:59-23:59");
        fails(r#"{{ "now" | timezone: "a", "b" }}"#, "`timezone` takes 1 argument (2 given)");
        fails(r#"{{ "now" | timezone }}"#, "`timezone` takes 1 argument (0 given)");
    }

    #[test]
    fn date_formats_with_strftime_and_a_zone() {
        assert_eq!(ok(r#"{{ "2026-03-02T10:00:00Z" | timezone: "Europe/Paris" | date: "%H:%M" }}"#), "11:00");
        assert_eq!(ok(r#"{{ "2023-12-31T19:30:00Z" | date: "%-I:%M %p %Z", "America/New_York" }}"#), "2:30 PM EST");
        assert_eq!(ok(r#"{{ "2026-07-04T19:30:00Z" | date: "%A %B %-d, %Y %l:%M %P %Z", "America/Los_Angeles" }}"#), "Saturday July 4, 2026 12:30 pm PDT");
        assert_eq!(ok(r#"{{ "2026-03-02T10:00:00Z" | date: "%Y-%m-%d %H:%M:%S %z" }}"#), "2026-03-02 10:00:00 +0000");
        // liquid's own inputs still work, and so do its (Ruby's) specifiers.
        assert_eq!(ok(r#"{{ "13 Jun 2016 02:30:00 +0300" | date: "%Y-%m-%d %H:%M %z" }}"#), "2016-06-13 02:30 +0300");
        assert_eq!(ok(r#"{{ "2016-06-13 02:30:00 +0300" | date: "%b %e, %y" }}"#), "Jun 13, 16");
        assert_eq!(ok(r#"{{ 1700000000 | date: "%s %F" }}"#), "1700000000 2023-11-14");
        assert_eq!(ok(r#"{{ "1700000000" | date: "%c" }}"#), "Tue Nov 14 22:13:20 2023");
        // As liquid's: not a timestamp, or no format, gives the input back; unknown specifiers are written as they are.
        assert_eq!(
            ok(r#"[{{ "tomorrow-ish" | date: "%Y" }}][{{ 3.5 | date: "%Y" }}][{{ "2026-01-01" | date: "" }}][{{ nil | date: "%Y" }}]"#),
            "[tomorrow-ish][3.5][2026-01-01][]"
        );
        assert_eq!(ok(r#"{{ "2026-01-01" | date: "%Y %! %" }}"#), "2026 %! %");
        assert!(ok(r#"{{ "now" | date: "%Y" }}"#).parse::<i32>().unwrap() >= 2025);
        // Hostile: padding is clamped; a long format is capped; bad zones fail.
        assert_eq!(ok(r#"{{ "2026-01-01" | date: "%255Y" }}"#).len(), 20);
        let long = r#"{% assign f = "%Q%Q%Q%Q%Q%Q%Q%Q" %}{% for i in (1..15) %}{% assign f = f | append: f %}{% endfor %}{{ "2026-01-01T00:00:00Z" | date: f, "America/Argentina/ComodRivadavia" }}"#;
        fails(long, "the result passes 1024 KiB");
        fails(r#"{{ "2026-01-01" | date: "%Y", "Nowhere/Land" }}"#, "unknown time zone `Nowhere/Land`");
    }

    #[test]
    fn dates_in_locales() {
        let ts = r#"{% assign t = "2023-12-31T14:30:45Z" %}"#;
        let cases = [
            (r#"format_date_in_locale: "en-US""#, "12/31/23"),
            (r#"format_date_in_locale: "en-GB", "long""#, "31 December 2023"),
            (r#"format_date_in_locale: "en-GB", "full""#, "Sunday, 31 December 2023"),
            (r#"format_date_in_locale: "en", "medium""#, "Dec 31, 2023"),
            (r#"format_datetime_in_locale: "en-GB", "medium", "short""#, "31 Dec 2023, 14:30"),
            (r#"format_datetime_in_locale: "en-US", "short", "medium""#, "12/31/23, 2:30:45 PM"),
            (r#"format_datetime_in_locale: "en-US", "long", "long""#, "December 31, 2023 at 2:30:45 PM UTC"),
        ];
        for (filter, expected) in cases {
            assert_eq!(ok(&format!("{ts}{{{{ t | {filter} }}}}")), expected, "{filter}");
        }
        assert_eq!(ok(r#"{{ "2023-12-31T14:30:45Z" | timezone: "America/New_York" | format_datetime_in_locale: "en-US", "short", "short" }}"#), "12/31/23, 9:30 AM");
        fails(r#"{{ "2023-12-31" | format_date_in_locale: "en", "tiny" }}"#, "unknown format `tiny`");
        assert_eq!(ok(r#"{{ "not a date" | format_date_in_locale: "en" }}"#), "not a date");
    }

    #[test]
    fn format_number_groups_digits() {
        assert_eq!(ok(r#"{{ 10000 | format_number: "en" }}"#), "10,000");
        assert_eq!(ok(r#"{{ 1234567.891 | format_number }}"#), "1,234,567.891");
        assert_eq!(ok(r#"{{ 1234567.8915 | format_number: "de" }}"#), "1.234.567,892");
        assert_eq!(ok(r#"{{ 1234.5 | format_number: "fr", 2 }}"#), "1\u{202f}234,50");
        assert_eq!(ok(r#"{{ 1234 | format_number: "es" }} {{ 12345 | format_number: "es" }}"#), "1234 12.345");
        assert_eq!(ok(r#"{{ 2.5 | format_number: 0 }} {{ 3.5 | format_number: 0 }} {{ -0.001 | format_number: 2 }} {{ 999.9996 | format_number }}"#), "2 4 0.00 1,000");
        assert_eq!(
            ok(r#"{{ "-1234.5" | format_number: "en-US" }} {{ "  42 " | format_number }} {{ "1e6" | format_number }} {{ 0.1 | plus: 0.2 | format_number }}"#),
            "-1,234.5 42 1,000,000 0.3"
        );
        assert_eq!(ok(r#"{{ 1000 | format_number: "xx-YY" }} {{ 1000 | format_number: "pt_BR" }}"#), "1,000 1.000");
        // Hostile: the widest integers, floats and digit strings; non-numbers.
        assert_eq!(ok(r#"{{ -9223372036854775808 | format_number }}"#), "-9,223,372,036,854,775,808");
        assert_eq!(ok(r#"{{ "18446744073709551615" | format_number }}"#), "18,446,744,073,709,551,615");
        assert_eq!(ok(r#"{{ "1e308" | format_number }}"#).len(), 309 + 102);
        assert_eq!(ok(r#"[{{ nil | format_number }}]"#), "[]");
        fails(r#"{{ "abc" | format_number }}"#, "`abc` is not a number");
        fails(r#"{{ true | format_number }}"#, "is not a number");
        fails(r#"{{ "1e999" | format_number }}"#, "is not a number");
        fails(r#"{{ 1 | format_number: "en", 99 }}"#, "precision must be a whole number from 0 to 20");
        fails(r#"{{ 1 | format_number: "en", "x" }}"#, "precision");
        let long_digits = format!(r#"{{{{ "{}" | format_number }}}}"#, "9".repeat(MAX_NUMBER_CHARS + 1));
        fails(&long_digits, "is not a number");
    }

    #[test]
    fn currency_formats_amounts() {
        assert_eq!(ok(r#"{{ 1234.5 | currency }}"#), "$1,234.50");
        assert_eq!(ok(r#"{{ 10 | currency: "GBP", "en" }}"#), "£10.00");
        assert_eq!(ok(r#"{{ 10.99 | rounded_currency: "GBP", "en" }}"#), "£11");
        assert_eq!(ok(r#"{{ -5 | currency }}"#), "-$5.00");
        assert_eq!(ok(r#"{{ 1234.5 | currency: "EUR", "de" }}"#), "1.234,50\u{a0}€");
        assert_eq!(ok(r#"{{ 1234.5 | currency: "eur", "fr-FR" }}"#), "1\u{202f}234,50\u{a0}€");
        assert_eq!(ok(r#"{{ 1234.5 | currency: "JPY" }} {{ 1234.5 | currency: "JPY", "ja" }}"#), "¥1,234 ￥1,234");
        assert_eq!(ok(r#"{{ 1.2345 | currency: "KWD" }} {{ 10 | currency: "CHF" }} {{ 10 | currency: "BRL", "pt-BR" }}"#), "KWD\u{a0}1.234 CHF\u{a0}10.00 R$\u{a0}10,00");
        assert_eq!(ok(r#"{{ 0.005 | currency }} {{ 0.015 | currency }} {{ "19.999" | currency }}"#), "$0.00 $0.02 $20.00");
        // Hostile.
        assert_eq!(ok(r#"{{ 9223372036854775807 | currency }}"#), "$9,223,372,036,854,775,807.00");
        assert_eq!(ok(r#"[{{ nil | currency }}]"#), "[]");
        fails(r#"{{ "ten" | currency }}"#, "`ten` is not a number");
        fails(r#"{{ 10 | currency: "DOLLARS" }}"#, "`DOLLARS` is not a currency code");
        fails(r#"{{ 10 | currency: "€€€" }}"#, "is not a currency code");
    }

    #[test]
    fn decimals_round_half_to_even() {
        let round = |s: &str, digits: usize| {
            let d = Decimal::parse(s).unwrap().round(digits, true);
            format!("{}{}{}{}", if d.negative { "-" } else { "" }, d.int, if d.fraction.is_empty() { "" } else { "." }, d.fraction)
        };
        assert_eq!(round("0.125", 2), "0.12");
        assert_eq!(round("0.135", 2), "0.14");
        assert_eq!(round("0.1251", 2), "0.13");
        assert_eq!(round("9.995", 2), "10.00");
        assert_eq!(round("999.5", 0), "1000");
        assert_eq!(round("-0.4", 0), "0");
        assert_eq!(round(".5", 0), "0");
        assert_eq!(round("7.", 1), "7.0");
        assert!(Decimal::parse("1.2.3").is_none() && Decimal::parse("-").is_none() && Decimal::parse(".").is_none() && Decimal::parse("").is_none());
    }

    #[test]
    fn pluralize_titlecase() {
        assert_eq!(ok(r#"{{ 1 | pluralize: "item", "items" }} {{ 2 | pluralize: "item", "items" }} {{ 0 | pluralize: "item", "items" }}"#), "item items items");
        assert_eq!(
            ok(r#"{{ "1" | pluralize: "person", "people" }} {{ 1.0 | pluralize: "person", "people" }} {{ nil | pluralize: "user" }} {{ "x" | pluralize: "user" }}"#),
            "person person users users"
        );
        fails(r#"{{ 1 | pluralize }}"#, "`pluralize` takes 1 to 2 arguments");
        assert_eq!(
            ok(r#"{{ "my project name" | titlecase }}|{{ "  API docs for ünïcode" | titlecase }}|{{ 42 | titlecase }}|{{ nil | titlecase }}"#),
            "My Project Name|  API Docs For Ünïcode|42|"
        );
        // Upper-casing can grow text (ΐ, 2 bytes, is 3 characters and 6 bytes upper-cased): still capped.
        let grows = "{% assign s = 'ΐ ' %}{% for i in (1..18) %}{% assign s = s | append: s %}{% endfor %}{{ s | titlecase | size }}";
        fails(grows, "the result passes 1024 KiB");
    }

    #[test]
    fn from_json_parses_bounded_json() {
        assert_eq!(
            ok(
                r#"{% assign o = '{"a": {"b": [1, 2.5, "x", null, true]}, "big": 18446744073709551615}' | from_json %}{{ o.a.b[1] }} {{ o.a.b | size }} {{ o.big }} {{ o.a | json }}"#
            ),
            r#"2.5 5 18446744073709551615 {"b":[1,2.5,"x",null,true]}"#
        );
        assert_eq!(ok(r#"{% assign l = "[3, 1]" | from_json %}{{ l | sort | join: "," }} {{ '"s"' | from_json }} {{ "42" | from_json | plus: 1 }}"#), "1,3 s 43");
        // Objects and arrays pass through; nil stays nil.
        assert_eq!(ok(r#"{% assign l = "[1]" | from_json | from_json %}{{ l | json }}[{{ nil | from_json }}]"#), "[1][]");
        fails(r#"{{ "{oops" | from_json }}"#, "invalid JSON: key must be a string");
        fails(r#"{{ "" | from_json }}"#, "invalid JSON");
        // Deep: past our depth, and past serde_json's own recursion limit.
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(ok(&format!(r#"{{{{ "{}" | from_json | size }}}}"#, nested(MAX_JSON_DEPTH))), "1");
        fails(&format!(r#"{{{{ "{}" | from_json }}}}"#, nested(MAX_JSON_DEPTH + 2)), "nests more than 64 levels deep");
        fails(&format!(r#"{{{{ "{}" | from_json }}}}"#, nested(100_000)), "invalid JSON: recursion limit exceeded");
        // Many values, and too much text.
        let many = format!("[{}0]", "0,".repeat(MAX_JSON_VALUES));
        fails(&format!(r#"{{{{ "{many}" | from_json }}}}"#), "more than 100000 values");
        // Templates cannot build more than 1 MiB, but the data can hold more.
        let parser = super::super::parser(false).unwrap();
        let big = format!("\"{}\"", "x".repeat(MAX_OUTPUT_BYTES));
        let err = parser.parse("{{ big | from_json }}").unwrap().render(&liquid::object!({"big": big})).unwrap_err();
        assert!(err.to_string().contains("the JSON text has 1048578 bytes; at most 1048576"), "{}", crate::core::truncate(&err.to_string(), 300));
    }

    #[test]
    fn markdown_hashes_sets_versions() {
        assert_eq!(ok(r##"{{ "# Hello *you*" | from_markdown }}"##), "<h1>Hello <em>you</em></h1>\n");
        assert_eq!(ok(r#"{{ "Hi <script>x</script> [a](javascript:alert(1))" | from_markdown }}"#), "<p>Hi &lt;script&gt;x&lt;/script&gt; <a href=\"#\">a</a></p>\n");
        // HTML is larger than its Markdown (`<` is `&lt;`): capped. (pulldown-cmark
        // itself limits how often a long reference link may be expanded.)
        fails("{% assign s = '<<<<<<<<' %}{% for i in (1..16) %}{% assign s = s | append: s %}{% endfor %}{{ s | from_markdown }}", "the result passes 1024 KiB");

        assert_eq!(ok(r#"{{ "user_1" | md5 }}"#), "3f49044c1469c6990a665f46ec6c0a41");
        assert_eq!(ok(r#"{{ "" | md5 }}"#), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(ok(r#"{{ "abc" | sha256 }}"#), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        // RFC 4231 test case 2.
        assert_eq!(ok(r#"{{ "what do ya want for nothing?" | hmac_sha256: "Jefe" }}"#), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        fails(r#"{{ "x" | hmac_sha256 }}"#, "`hmac_sha256` takes 1 argument");

        assert_eq!(
            ok(r#"{% assign a = "Acme Corp,InGen,Umbrella,InGen" | split: "," %}{% assign b = "InGen,Acme Corp,Cyberdyne" | split: "," %}{{ a | intersect: b | json }}"#),
            r#"["Acme Corp","InGen"]"#
        );
        assert_eq!(ok(r#"{% assign a = "1" | split: "," %}{{ a | intersect: nil | size }} {{ nil | intersect: a | size }}"#), "0 0");
        fails(r#"{% assign a = "1" | split: "," %}{{ a | intersect: "1" }}"#, "the argument is not a list");

        assert_eq!(ok(r#"{{ "1.0.0" | compare_versions: "2.0.0" }} {{ "2.0.0" | compare_versions: "2.0.0" }} {{ "2.10.0" | compare_versions: "2.9.1" }}"#), "-1 0 1");
        assert_eq!(ok(r#"{{ "v1.2" | compare_versions: "1.2.0" }} {{ "1.0.0-beta" | compare_versions: "1.0.0" }} {{ "1" | compare_versions: "1.0.1-rc.1" }}"#), "0 -1 -1");
        fails(r#"{{ "one" | compare_versions: "1.0.0" }}"#, "`one` is not a semantic version");
    }
}
