//! Message rendering: `{name}`, `{first_name}` and `{phone}` placeholders, `{name:Friend}` for a
//! custom fallback when a lead has no name, and spintax `{Hi|Hello|Hey}` (nestable) chosen at
//! random per recipient. A template is parsed once per campaign and rendered once per lead;
//! malformed templates are refused when the campaign is created, never at send time.

use crate::domain::InvalidInput;
use rand::{Rng, SeedableRng};

/// What an empty `{name}` becomes unless the template says otherwise.
pub const DEFAULT_NAME_FALLBACK: &str = "there";

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Text(String),
    Name { fallback: Option<String> },
    FirstName { fallback: Option<String> },
    Phone,
    Spin(Vec<Vec<Segment>>),
}

/// A parsed template, cheap to render many times.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    segments: Vec<Segment>,
}

/// The per-recipient values a template may use.
pub struct Recipient<'a> {
    pub name: &'a str,
    pub phone: &'a str,
}

impl Template {
    pub fn parse(src: &str) -> Result<Self, InvalidInput> {
        if src.trim().is_empty() {
            return Err(InvalidInput::new("template", "is empty"));
        }
        if src.len() > 4096 {
            return Err(InvalidInput::new("template", "is longer than 4096 bytes"));
        }
        let chars: Vec<char> = src.chars().collect();
        let mut pos = 0;
        let segments = parse_seq(&chars, &mut pos, 0)?;
        if pos != chars.len() {
            return Err(InvalidInput::new(
                "template",
                format!("unexpected '{}' at character {pos}", chars[pos]),
            ));
        }
        Ok(Self { segments })
    }

    pub fn render(&self, to: &Recipient<'_>, rng: &mut impl Rng) -> String {
        let mut out = String::with_capacity(128);
        render_seq(&self.segments, to, rng, &mut out);
        out
    }
}

/// A Cloud API message template a campaign sends instead of free text (needed outside the
/// 24-hour window): its approved name and language, and the body parameters as templates
/// rendered per recipient (`{name}`, `{phone}`, spintax). Devices of other providers send the
/// campaign's text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WaTemplate {
    pub name: String,
    pub language: String,
    #[serde(default)]
    pub body_params: Vec<String>,
}

/// A template as one recipient gets it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateMessage {
    pub name: String,
    pub language: String,
    #[serde(default)]
    pub params: Vec<String>,
}

impl WaTemplate {
    /// Checks the name (Meta's: lower-case letters, digits, underscores), the language code
    /// (`en`, `en_US`, `ms`), and each parameter as a template (at most 10).
    pub fn new(name: &str, language: &str, body_params: Vec<String>) -> Result<Self, InvalidInput> {
        let name = name.trim();
        if name.is_empty()
            || name.len() > 512
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(InvalidInput::new(
                "template name",
                "must be 1 to 512 lower-case letters, digits or underscores",
            ));
        }
        let language = language.trim();
        let (lang, region) = match language.split_once('_') {
            Some((l, r)) => (l, Some(r)),
            None => (language, None),
        };
        let lang_ok = (2..=3).contains(&lang.len()) && lang.bytes().all(|b| b.is_ascii_lowercase());
        let region_ok =
            region.is_none_or(|r| r.len() == 2 && r.bytes().all(|b| b.is_ascii_uppercase()));
        if !lang_ok || !region_ok {
            return Err(InvalidInput::new(
                "template language",
                "must be a language code like en, ms or en_US",
            ));
        }
        if body_params.len() > 10 {
            return Err(InvalidInput::new(
                "template parameters",
                "at most 10 body parameters",
            ));
        }
        for p in &body_params {
            Template::parse(p)?;
        }
        Ok(Self {
            name: name.to_string(),
            language: language.to_string(),
            body_params,
        })
    }

    /// The template for one recipient; the same `seed` (the message id) renders the same
    /// parameters, so a retry sends what the first attempt would have.
    pub fn render(&self, to: &Recipient<'_>, seed: u64) -> Result<TemplateMessage, InvalidInput> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let params = self
            .body_params
            .iter()
            .map(|p| Template::parse(p).map(|t| t.render(to, &mut rng)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TemplateMessage {
            name: self.name.clone(),
            language: self.language.clone(),
            params,
        })
    }
}

const MAX_DEPTH: usize = 8;

/// Parses until end of input, or (inside a group) until the `|` or `}` that ends an option.
fn parse_seq(chars: &[char], pos: &mut usize, depth: usize) -> Result<Vec<Segment>, InvalidInput> {
    let mut out = Vec::new();
    let mut text = String::new();
    while *pos < chars.len() {
        match chars[*pos] {
            '{' => {
                if !text.is_empty() {
                    out.push(Segment::Text(std::mem::take(&mut text)));
                }
                *pos += 1;
                out.push(parse_brace(chars, pos, depth + 1)?);
            }
            '|' | '}' if depth > 0 => break,
            '}' => {
                return Err(InvalidInput::new(
                    "template",
                    format!("unmatched '}}' at character {pos}"),
                ))
            }
            c => {
                text.push(c);
                *pos += 1;
            }
        }
    }
    if !text.is_empty() {
        out.push(Segment::Text(text));
    }
    Ok(out)
}

/// Called just after a `{`: a placeholder or a spintax group.
fn parse_brace(chars: &[char], pos: &mut usize, depth: usize) -> Result<Segment, InvalidInput> {
    if depth > MAX_DEPTH {
        return Err(InvalidInput::new("template", "spintax nested too deeply"));
    }
    let start = *pos;
    let mut options = Vec::new();
    loop {
        let option = parse_seq(chars, pos, depth)?;
        options.push(option);
        match chars.get(*pos) {
            Some('|') => *pos += 1,
            Some('}') => {
                *pos += 1;
                break;
            }
            _ => {
                return Err(InvalidInput::new(
                    "template",
                    format!("'{{' at character {} is never closed", start - 1),
                ))
            }
        }
    }
    if options.len() == 1 {
        let inner: String = match options[0].as_slice() {
            [Segment::Text(t)] => t.clone(),
            [] => String::new(),
            _ => {
                return Err(InvalidInput::new(
                    "template",
                    format!(
                    "'{{...}}' at character {} is neither a placeholder nor spintax (use {{a|b}})",
                    start - 1
                ),
                ))
            }
        };
        let (key, fallback) = match inner.split_once(':') {
            Some((k, f)) => (k.trim().to_string(), Some(f.to_string())),
            None => (inner.trim().to_string(), None),
        };
        return match key.as_str() {
            "name" => Ok(Segment::Name { fallback }),
            "first_name" => Ok(Segment::FirstName { fallback }),
            "phone" if fallback.is_none() => Ok(Segment::Phone),
            other => Err(InvalidInput::new(
                "template",
                format!(
                    "unknown placeholder {{{other}}}; known: {{name}}, {{first_name}}, {{phone}}"
                ),
            )),
        };
    }
    Ok(Segment::Spin(options))
}

fn render_seq(segments: &[Segment], to: &Recipient<'_>, rng: &mut impl Rng, out: &mut String) {
    for seg in segments {
        match seg {
            Segment::Text(t) => out.push_str(t),
            Segment::Name { fallback } => push_name(out, to.name.trim(), fallback),
            Segment::FirstName { fallback } => {
                let first = to.name.split_whitespace().next().unwrap_or("");
                push_name(out, first, fallback)
            }
            Segment::Phone => out.push_str(to.phone),
            Segment::Spin(options) => {
                let i = rng.random_range(0..options.len());
                render_seq(&options[i], to, rng, out);
            }
        }
    }
}

fn push_name(out: &mut String, name: &str, fallback: &Option<String>) {
    if name.is_empty() {
        out.push_str(fallback.as_deref().unwrap_or(DEFAULT_NAME_FALLBACK));
    } else {
        out.push_str(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn wa_templates_are_checked_and_render_the_same_for_the_same_message() {
        assert!(WaTemplate::new("promo_1", "en_US", vec![]).is_ok());
        assert!(WaTemplate::new("promo_1", "ms", vec!["{name}".into()]).is_ok());
        for (name, lang) in [
            ("Promo", "en"),
            ("promo-1", "en"),
            ("", "en"),
            ("p", "english"),
            ("p", "en_us"),
            ("p", "e"),
        ] {
            assert!(
                WaTemplate::new(name, lang, vec![]).is_err(),
                "{name} {lang}"
            );
        }
        assert!(WaTemplate::new("p", "en", vec!["{unclosed".into()]).is_err());
        assert!(WaTemplate::new("p", "en", vec!["x".into(); 11]).is_err());
        let t = WaTemplate::new(
            "p",
            "en",
            vec!["{name:friend}".into(), "{A|B|C|D|E|F}".into()],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let to = Recipient {
            name: "",
            phone: "+60123456789",
        };
        let a = t.render(&to, 42).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.params[0], "friend");
        assert_eq!(
            a,
            t.render(&to, 42).unwrap_or_else(|e| panic!("{e}")),
            "a retry renders the same"
        );
        let spins: HashSet<String> = (0..50u64)
            .map(|seed| {
                t.render(&to, seed)
                    .map(|m| m.params[1].clone())
                    .unwrap_or_default()
            })
            .collect();
        assert!(spins.len() > 1, "different messages may differ");
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn placeholders_and_fallbacks() {
        let t = Template::parse("Hi {name}, {first_name:friend}! We'll call {phone}.").unwrap();
        let to = Recipient {
            name: "Aisyah Rahman",
            phone: "+60123456789",
        };
        assert_eq!(
            t.render(&to, &mut rng()),
            "Hi Aisyah Rahman, Aisyah! We'll call +60123456789."
        );
        let anon = Recipient {
            name: "  ",
            phone: "+60123456789",
        };
        assert_eq!(
            t.render(&anon, &mut rng()),
            "Hi there, friend! We'll call +60123456789."
        );
    }

    #[test]
    fn spintax_picks_every_option_and_nests() {
        let t = Template::parse("{Hi|Hello|{Hey|Yo} {name}}!").unwrap();
        let to = Recipient {
            name: "Ali",
            phone: "+60123456789",
        };
        let mut r = rng();
        let seen: HashSet<String> = (0..400).map(|_| t.render(&to, &mut r)).collect();
        let want: HashSet<String> = ["Hi!", "Hello!", "Hey Ali!", "Yo Ali!"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in [
            "",
            "Hi {name",
            "Hi }",
            "{unknown}",
            "{phone:x}",
            "{a|b",
            "{{{{{{{{{{a|b}}}}}}}}}}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
