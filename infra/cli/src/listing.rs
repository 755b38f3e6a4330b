//! What the CLI's listings share (`campaign messages`, `sequence messages`, `leads list`):
//! keyset pages of bounded size, the line that says how to go on, text fitted to a column, and
//! CSV written for a spreadsheet that must never run what it opens. Prints; writes no row.

use crate::stdout_failed;
use anyhow::{bail, Result};
use std::future::Future;

/// How much of a listing to print: `--limit` and `--after`, shared by every listing.
#[derive(clap::Args)]
pub(crate) struct Paging {
    /// At most this many lines; 0 for all [default: 100; with --csv, all].
    #[arg(long)]
    limit: Option<u64>,
    /// Start after this lead id: the `--after` a page that stopped at its limit prints.
    #[arg(long, default_value_t = 0)]
    after: i64,
}

impl Paging {
    /// The key to start after, and how many rows at most (`None`: all; the default for a CSV,
    /// which is for a file, while a table is for a terminal).
    pub(crate) fn resolve(&self, csv: bool) -> Result<(i64, Option<u64>)> {
        if self.after < 0 {
            bail!("--after takes a lead id, 0 or more");
        }
        let limit = match self.limit {
            Some(0) => None,
            Some(n) => Some(n),
            None if csv => None,
            None => Some(100),
        };
        Ok((self.after, limit))
    }
}

/// Rows read per query: a listing of any length runs in this much memory.
pub(crate) const PAGE: u64 = 5_000;

/// Calls `each` for every row after the key `after`, in key order, up to `limit` rows (`None`:
/// all), reading `fetch(after, n)` pages of at most [`PAGE`]. Returns whether rows were left
/// past the limit (one row read ahead, only when the limit stopped the listing), and the last
/// key listed: the `--after` that continues it.
pub(crate) async fn each_page<T, F, Fut>(
    after: i64,
    limit: Option<u64>,
    fetch: F,
    key: impl Fn(&T) -> i64,
    mut each: impl FnMut(&T) -> Result<()>,
) -> Result<(bool, i64)>
where
    F: Fn(i64, i64) -> Fut,
    Fut: Future<Output = Result<Vec<T>>>,
{
    let mut after = after;
    let mut left = limit;
    loop {
        let want = left.map_or(PAGE, |l| l.min(PAGE));
        if want == 0 {
            return Ok((!fetch(after, 1).await?.is_empty(), after));
        }
        let page = fetch(after, want as i64).await?;
        for row in &page {
            each(row)?;
            after = key(row);
        }
        left = left.map(|l| l - page.len() as u64);
        if (page.len() as u64) < want {
            return Ok((false, after));
        }
    }
}

/// The line that ends a table: how many rows it showed and, when its limit cut it, how to go
/// on (`--after` the last `key_name` shown).
pub(crate) fn print_tail(shown: u64, more: bool, last: i64, nothing: &str, key_name: &str) {
    if shown == 0 {
        out!("{nothing}");
    } else if more {
        out!("{shown} shown; more after {key_name} {last}: add --after {last} (or --limit 0 for all)");
    } else {
        out!("{shown} shown");
    }
}

/// At most `width` characters of `s`, the last one `…` when cut.
pub(crate) fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Text for a spreadsheet: a field that starts like a formula (`=`, `+`, `-`, `@`, a tab or a
/// carriage return) gets a leading `'`, so that opening the export never runs a lead's name;
/// so does one that would read as such a quoted field (`'=…`), so that [`from_spreadsheet`]
/// gives every field back as it was.
pub(crate) fn spreadsheet_text(s: &str) -> String {
    if quoted_if_exported(s) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

/// A field as [`spreadsheet_text`] wrote it, back to what it was: `leads import` reads what
/// `leads list --csv` wrote, so a name or label exported with a leading `'` imports unchanged.
pub(crate) fn from_spreadsheet(s: &str) -> &str {
    match s.strip_prefix('\'') {
        Some(rest) if quoted_if_exported(rest) => rest,
        _ => s,
    }
}

/// Whether [`spreadsheet_text`] puts a `'` before this field: it starts like a formula after
/// any `'`s.
fn quoted_if_exported(s: &str) -> bool {
    s.trim_start_matches('\'')
        .starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// A CSV writer on standard output; [`Csv::row`] ends the command quietly when the reader has
/// gone, as `out!` does.
pub(crate) struct Csv(csv::Writer<std::io::StdoutLock<'static>>);

impl Csv {
    pub(crate) fn stdout() -> Self {
        Self(csv::Writer::from_writer(std::io::stdout().lock()))
    }

    pub(crate) fn row<I, S>(&mut self, fields: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        match self.0.write_record(fields) {
            Ok(()) => Ok(()),
            Err(e) => match e.into_kind() {
                csv::ErrorKind::Io(io) => stdout_failed(io),
                other => bail!("cannot write the CSV: {other:?}"),
            },
        }
    }

    pub(crate) fn finish(mut self) {
        if let Err(e) = self.0.flush() {
            stdout_failed(e);
        }
    }
}

/// An instant in a CSV: UTC, RFC 3339, to the microsecond; empty for none.
pub(crate) fn csv_time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreadsheet_text_round_trips() {
        for s in [
            "=1+1", "+60123", "-x", "@a", "'=quoted", "''@x", "plain", "", "'", "'plain", "it's",
        ] {
            assert_eq!(from_spreadsheet(&spreadsheet_text(s)), s, "{s:?}");
        }
        assert_eq!(spreadsheet_text("=1+1"), "'=1+1");
        assert_eq!(from_spreadsheet("'plain"), "'plain");
    }
}
