//! The rules a migration must follow to run on a live database (README, "Migrations on a live
//! database"), checked on the text of every migration file newer than [`FIRST_CHECKED`].
//!
//! - An index on one of [`BIG_TABLES`] is built with `CREATE INDEX CONCURRENTLY`: a plain build
//!   holds a lock that blocks every write to the table for as long as it runs (on
//!   `broadcast_messages` at 10 M rows, minutes without a status change: nothing is sent).
//! - A concurrent build is alone in its file, which starts with `-- no-transaction`: sqlx runs
//!   a file as one query string, and several statements in one string run in one implicit
//!   transaction, where `CONCURRENTLY` is refused.
//! - It says `IF NOT EXISTS`: a build that failed leaves an invalid index behind and its
//!   migration unrecorded; `wabcast migrate` rebuilds the index and runs the migration again,
//!   which must then skip it rather than fail.
//! - A `CHECK` or `FOREIGN KEY` constraint added to one of [`BIG_TABLES`] is added `NOT VALID`
//!   and validated (`VALIDATE CONSTRAINT`) in a later migration: added valid, every row is
//!   checked under the `ALTER TABLE`'s lock, which blocks every write to the table meanwhile;
//!   a validation of its own only blocks schema changes.

/// Tables that grow with the messages or the leads.
pub const BIG_TABLES: [&str; 5] = [
    "broadcast_messages",
    "message_transitions",
    "host_sends",
    "leads",
    "enrollments",
];

/// The last migration written before these rules (it and its elders are applied wherever
/// wabcast runs, and a migration cannot change once applied: sqlx checks its checksum).
pub const FIRST_CHECKED: i64 = 20261204000002;

/// The migration's version: the digits before the first `_` of its file name.
pub fn version_of(file_name: &str) -> Option<i64> {
    file_name.split('_').next()?.parse().ok()
}

/// The SQL without `--` comments, lower-cased.
fn code_of(sql: &str) -> String {
    sql.lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
        .to_lowercase()
}

/// How many statements: non-blank runs between semicolons (a dollar-quoted body counts its
/// inner semicolons too, which only makes a function in a concurrent build's file an error,
/// as it should be).
fn statements(code: &str) -> usize {
    code.split(';').filter(|s| !s.trim().is_empty()).count()
}

/// One `CREATE INDEX` found in a migration.
#[derive(Debug, PartialEq, Eq)]
struct IndexBuild {
    concurrently: bool,
    if_not_exists: bool,
    table: String,
}

fn index_builds(code: &str) -> Vec<IndexBuild> {
    let spaced = code.replace('(', " ( ").replace(';', " ; ");
    let words: Vec<&str> = spaced.split_whitespace().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        if words[i] != "create" {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        if words.get(j) == Some(&"unique") {
            j += 1;
        }
        if words.get(j) != Some(&"index") {
            i += 1;
            continue;
        }
        j += 1;
        let concurrently = words.get(j) == Some(&"concurrently");
        if concurrently {
            j += 1;
        }
        let if_not_exists = words.get(j..j + 3) == Some(&["if", "not", "exists"][..]);
        if if_not_exists {
            j += 3;
        }
        // the index name is optional: up to `on`
        while j < words.len() && words[j] != "on" && words[j] != ";" {
            j += 1;
        }
        j += 1;
        if words.get(j) == Some(&"only") {
            j += 1;
        }
        let table = words
            .get(j)
            .map(|t| t.trim_matches('"'))
            .map(|t| t.rsplit('.').next().unwrap_or(t).trim_matches('"'))
            .unwrap_or("")
            .to_string();
        out.push(IndexBuild {
            concurrently,
            if_not_exists,
            table,
        });
        i = j;
    }
    out
}

/// The big tables to which a statement adds a `CHECK` or `FOREIGN KEY` constraint that is
/// validated at once (not `NOT VALID`).
fn constraints_validated_at_once(code: &str) -> Vec<String> {
    code.split(';')
        .filter_map(|statement| {
            let words: Vec<&str> = statement.split_whitespace().collect();
            if words.get(..2) != Some(&["alter", "table"][..]) {
                return None;
            }
            let table = words[2..]
                .iter()
                .find(|w| !["only", "if", "exists"].contains(w))?
                .trim_matches('"');
            let table = table.rsplit('.').next().unwrap_or(table).trim_matches('"');
            let adds = statement.contains(" check") || statement.contains("foreign key");
            (BIG_TABLES.contains(&table)
                && statement.contains(" add ")
                && adds
                && !statement.contains("not valid"))
            .then(|| table.to_string())
        })
        .collect()
}

/// What is wrong with one migration file (nothing for those older than [`FIRST_CHECKED`]).
pub fn lint_migration(file_name: &str, sql: &str) -> Vec<String> {
    match version_of(file_name) {
        Some(v) if v >= FIRST_CHECKED => {}
        Some(_) => return Vec::new(),
        None => return vec![format!("{file_name}: no version before the first `_`")],
    }
    let code = code_of(sql);
    let builds = index_builds(&code);
    let mut problems = Vec::new();
    for b in &builds {
        if !b.concurrently && BIG_TABLES.contains(&b.table.as_str()) {
            problems.push(format!(
                "{file_name}: builds an index on {} without CONCURRENTLY, blocking every write \
                 to it while it runs; use `CREATE INDEX CONCURRENTLY IF NOT EXISTS`, alone in a \
                 file that starts with `-- no-transaction`",
                b.table
            ));
        }
        if b.concurrently && !b.if_not_exists {
            problems.push(format!(
                "{file_name}: a concurrent build without IF NOT EXISTS fails when it runs again \
                 after an interrupted build"
            ));
        }
    }
    for table in constraints_validated_at_once(&code) {
        problems.push(format!(
            "{file_name}: adds a constraint to {table} that checks every row under a lock that \
             blocks every write to it; add it NOT VALID and VALIDATE CONSTRAINT in a later \
             migration"
        ));
    }
    if code.contains("concurrently") {
        if !sql.starts_with("-- no-transaction") {
            problems.push(format!(
                "{file_name}: CONCURRENTLY needs the file to start with `-- no-transaction`"
            ));
        }
        if statements(&code) != 1 {
            problems.push(format!(
                "{file_name}: a CONCURRENTLY statement must be alone in its file (found {} \
                 statements; several run in one implicit transaction)",
                statements(&code)
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "20270101000001_x.sql";

    #[test]
    fn a_plain_build_on_a_big_table_is_refused() {
        for sql in [
            "CREATE INDEX bm_x ON broadcast_messages (sent_at);",
            "create unique index if not exists l_x on public.leads(phone, device_id);",
            "CREATE INDEX ON ONLY \"host_sends\" (state)",
        ] {
            let p = lint_migration(NEW, sql);
            assert_eq!(p.len(), 1, "{sql}: {p:?}");
            assert!(p[0].contains("without CONCURRENTLY"), "{p:?}");
        }
    }

    #[test]
    fn a_plain_build_on_a_small_table_passes() {
        let sql = "-- devices: a few thousand rows\nCREATE INDEX d_x ON devices (label);\n\
                   ALTER TABLE devices ADD COLUMN note text;";
        assert!(lint_migration(NEW, sql).is_empty());
    }

    #[test]
    fn a_concurrent_build_passes_alone_in_a_no_transaction_file() {
        let sql = "-- no-transaction\n-- why: the history view\n\
                   CREATE INDEX CONCURRENTLY IF NOT EXISTS bm_x ON broadcast_messages (sent_at);\n";
        assert_eq!(lint_migration(NEW, sql), Vec::<String>::new());
    }

    #[test]
    fn a_concurrent_build_needs_its_own_file_and_if_not_exists() {
        let in_tx = "CREATE INDEX CONCURRENTLY IF NOT EXISTS bm_x ON broadcast_messages (a);";
        assert!(lint_migration(NEW, in_tx)[0].contains("no-transaction"));
        let two = "-- no-transaction\n\
                   CREATE INDEX CONCURRENTLY IF NOT EXISTS bm_x ON broadcast_messages (a);\n\
                   CREATE INDEX CONCURRENTLY IF NOT EXISTS bm_y ON broadcast_messages (b);";
        let p = lint_migration(NEW, two);
        assert!(p.iter().any(|m| m.contains("found 2 statements")), "{p:?}");
        let again = "-- no-transaction\nCREATE INDEX CONCURRENTLY bm_x ON broadcast_messages (a)";
        assert!(lint_migration(NEW, again)[0].contains("IF NOT EXISTS"));
    }

    #[test]
    fn a_constraint_on_a_big_table_is_added_not_valid() {
        let valid = "ALTER TABLE host_sends ADD CONSTRAINT c CHECK (claim >= 0);";
        let p = lint_migration(NEW, valid);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("NOT VALID"), "{p:?}");
        let fk =
            "ALTER TABLE ONLY public.leads ADD FOREIGN KEY (device_id) REFERENCES devices (id);";
        assert_eq!(lint_migration(NEW, fk).len(), 1);
        for fine in [
            "ALTER TABLE host_sends ADD CONSTRAINT c CHECK (claim >= 0) NOT VALID;",
            "ALTER TABLE host_sends VALIDATE CONSTRAINT c;",
            "ALTER TABLE host_sends ADD COLUMN claim integer NOT NULL DEFAULT 0;",
            "ALTER TABLE host_sends DROP CONSTRAINT host_sends_state_check;",
            "ALTER TABLE devices ADD CONSTRAINT c CHECK (max_delay_s >= min_delay_s);",
        ] {
            assert!(lint_migration(NEW, fine).is_empty(), "{fine}");
        }
    }

    #[test]
    fn files_before_the_rules_are_not_checked() {
        let sql = "CREATE INDEX bm_x ON broadcast_messages (sent_at);";
        assert!(lint_migration("20261204000001_opt_out_lookups.sql", sql).is_empty());
        assert_eq!(lint_migration("x.sql", sql).len(), 1);
    }
}
