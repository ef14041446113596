//! Moving the DEFINER of what a leased MySQL/MariaDB user created to the
//! role's owner before the user is dropped (invariant 7: revocation never
//! destroys data).
//!
//! Why: a view, routine, trigger or event runs with its DEFINER's rights.
//! MariaDB lets `DROP USER` remove a definer, after which each of its
//! objects fails with "The user specified as a definer does not exist";
//! MySQL 8.0.22+ refuses the `DROP USER` instead (unless the admin holds
//! SET_USER_ID / SET_ANY_DEFINER, when it orphans them with a warning).
//! Either way the objects must get a new definer first.
//!
//! How, per kind (the statements are built here, pure, and unit-tested):
//! - view: `ALTER ALGORITHM=… DEFINER=… SQL SECURITY … VIEW …`, from the
//!   view's own `SHOW CREATE VIEW` text (keeps a column list and
//!   `WITH … CHECK OPTION` as they are);
//! - event: `ALTER DEFINER=… EVENT … ON COMPLETION <as it is>` (MariaDB
//!   wants at least one clause besides the definer);
//! - procedure, function, trigger: no `ALTER` can change their definer, so
//!   they are re-created from `SHOW CREATE …` with only the leading
//!   `DEFINER=` clause replaced, under the object's own `sql_mode`: MariaDB
//!   with `CREATE OR REPLACE` (one statement, never absent); MySQL 8 has no
//!   `OR REPLACE` for them, so drop and create, and on a failed create the
//!   original is put back (written from MySQL's documentation, not run
//!   here: no MySQL 8 server on this machine).
//!
//! Where, on MariaDB: `information_schema.VIEWS` and `TRIGGERS` open the
//! definition of every table they consider and `ROUTINES` parses every
//! function's signature, so a lookup filtered by DEFINER alone reads every
//! table of every schema, for each revocation. Instead the lookup first
//! reads what the users can reach ([`reach_sql`]: schema, table, column
//! and routine grants, their own, `PUBLIC`'s and, for schemas, the
//! anonymous user's; ANY privilege counts, SELECT included) and looks for
//! views, triggers and routines in those schemas only, one schema at a
//! time ([`Scope`], [`defined_objects_sql`]): an equality on the schema is
//! what makes MariaDB read only that schema's directory and `mysql.proc`
//! rows (`IN (…)` still lists every schema's tables). No schema at all: a
//! user without any privilege cannot have made one itself, so none is
//! looked for. Events are looked for everywhere: MariaDB reads
//! `mysql.event` whole whatever the filter. A global privilege, a granted
//! role (not followed), grant tables the admin cannot read, or MySQL
//! (whose information_schema reads the data dictionary, not table files)
//! mean the full scan, as does the error path of a refused `DROP USER`.
//!
//! What the scoped lookup does not see: a view, trigger or routine whose
//! DEFINER is the user in a schema where the user, at revocation, holds
//! no privilege at all. Only an account with SET USER (or SUPER) can
//! define one for someone else, and the user can leave one behind itself
//! only under a grant or role a DBA has revoked since: both deliberate
//! acts outside the broker on an account known to be short-lived. It is
//! not lost: on MariaDB it fails ("the user specified as a definer does
//! not exist") until an admin gives it a definer again (`ALTER VIEW`,
//! `CREATE OR REPLACE`), its text intact. The failsafe event keeps
//! counting everywhere ([`defined_count_expr`]): without the broker, a
//! user that defines anything, anywhere, is locked, not dropped.
//!
//! Nothing is parsed beyond an exact prefix match on the statement the
//! server itself produced, built from the broker-made user name and host:
//! a text that does not start as expected fails the revocation rather
//! than guess. The rest of a routine's or trigger's text is what the
//! leased user wrote, sent back as the admin: it is the one statement the
//! server stored (it ended where the server's parser ended it), re-parsed
//! under the `sql_mode` it was first parsed under, so it defines the same
//! object again and nothing more. (It is re-sent as utf8mb4, not in its
//! original `character_set_client`: a body written in a multi-byte
//! charset such as GBK is the one case not checked here.) On MySQL 8 a
//! trigger is absent for the moment between its drop and its re-creation.

use std::collections::BTreeSet;

use super::quote::{ident, lit};
use super::Flavor;
use crate::error::{Error, Result};

/// The kinds of stored objects that carry a DEFINER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKind {
    View,
    Procedure,
    Function,
    Trigger,
    Event,
}

impl ObjectKind {
    /// From the first column of [`defined_objects_sql`].
    pub fn parse(s: &str) -> Option<ObjectKind> {
        Some(match s {
            "VIEW" => ObjectKind::View,
            "PROCEDURE" => ObjectKind::Procedure,
            "FUNCTION" => ObjectKind::Function,
            "TRIGGER" => ObjectKind::Trigger,
            "EVENT" => ObjectKind::Event,
            _ => return None,
        })
    }

    /// The SQL keyword (`SHOW CREATE <kw>`, `DROP <kw>`).
    pub fn keyword(self) -> &'static str {
        match self {
            ObjectKind::View => "VIEW",
            ObjectKind::Procedure => "PROCEDURE",
            ObjectKind::Function => "FUNCTION",
            ObjectKind::Trigger => "TRIGGER",
            ObjectKind::Event => "EVENT",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            ObjectKind::View => "view(s)",
            ObjectKind::Procedure => "procedure(s)",
            ObjectKind::Function => "function(s)",
            ObjectKind::Trigger => "trigger(s)",
            ObjectKind::Event => "event(s)",
        }
    }
}

/// One stored object whose DEFINER is a user being revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defined {
    pub kind: ObjectKind,
    pub schema: String,
    pub name: String,
    /// `user@host`, as information_schema shows it.
    pub definer: String,
    /// Views: `ALGORITHM`; events: `ON_COMPLETION`; else empty.
    pub extra: String,
    /// Views: `SECURITY_TYPE`; else empty.
    pub security: String,
}

impl Defined {
    /// `` `schema`.`name` ``
    pub fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
}

/// `user@host` as information_schema's DEFINER columns spell it.
pub fn definer_key(user: &str, host: &str) -> String {
    format!("{user}@{host}")
}

/// Where a lookup looks for views, triggers and routines (events are
/// always looked for everywhere: see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every schema the admin can see: the full scan.
    Everywhere,
    /// Only these schemas (none at all is a valid scope).
    Schemas(BTreeSet<String>),
}

/// Whether the server's grants can be read to scope a lookup: MariaDB
/// from 10.4 (`mysql.global_priv`). MySQL keeps the full scan: from 8.0
/// its information_schema is a view over the data dictionary, which
/// opens no table definition to filter by DEFINER.
pub fn scopes_lookups(flavor: Flavor, version: (u32, u32, u32)) -> bool {
    flavor == Flavor::Mariadb && version >= (10, 4, 0)
}

/// The grant tables [`reach_sql`] reads (`check` says when the admin
/// cannot read them: then every revocation scans every schema).
pub const GRANT_TABLES: [&str; 6] = [
    "global_priv",
    "roles_mapping",
    "db",
    "tables_priv",
    "columns_priv",
    "procs_priv",
];

/// What the MariaDB accounts named `users` (any host) can reach: rows of
/// (kind, name). `global`: a global privilege (`access` other than 0,
/// which is `USAGE`); `role`: a granted role; `db`: a schema pattern
/// (`%`, `_`, `\` escapes, as the server matches it) from a schema-level
/// grant, the anonymous user's (`''`, which MariaDB applies to every
/// account) included; `table`, `column`, `routine`: a schema named by such
/// a grant; `schema`: every schema the admin sees, to match the patterns
/// against. `PUBLIC` (MariaDB 10.11) is every account's grantee.
pub fn reach_sql(users: &[&str]) -> String {
    let named = users
        .iter()
        .copied()
        .chain(["PUBLIC"])
        .map(lit)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT 'global', '' FROM mysql.global_priv WHERE User IN ({named}) \
           AND COALESCE(JSON_VALUE(Priv, '$.access'), 1) <> 0 \
         UNION ALL SELECT 'role', Role FROM mysql.roles_mapping WHERE User IN ({named}) \
         UNION ALL SELECT 'db', Db FROM mysql.db WHERE User IN ({named}, '') \
         UNION ALL SELECT 'table', Db FROM mysql.tables_priv WHERE User IN ({named}) \
         UNION ALL SELECT 'column', Db FROM mysql.columns_priv WHERE User IN ({named}) \
         UNION ALL SELECT 'routine', Db FROM mysql.procs_priv WHERE User IN ({named}) \
         UNION ALL SELECT 'schema', SCHEMA_NAME FROM information_schema.SCHEMATA"
    )
}

/// The scope [`reach_sql`]'s rows give: every schema a grant names or a
/// schema pattern matches; everywhere for a global privilege, a role,
/// a row of an unknown kind, or a schema name with a backslash (which
/// [`lit`] cannot quote the same under every `sql_mode`).
pub fn scope_of(rows: &[(String, String)]) -> Scope {
    let existing: Vec<&str> = rows
        .iter()
        .filter(|(kind, _)| kind == "schema")
        .map(|(_, name)| name.as_str())
        .collect();
    let mut schemas = BTreeSet::new();
    for (kind, name) in rows {
        match kind.as_str() {
            "schema" => {}
            "db" => schemas.extend(
                existing
                    .iter()
                    .filter(|s| wild_match(name, s))
                    .map(|s| s.to_string()),
            ),
            "table" | "column" | "routine" => {
                schemas.insert(name.clone());
            }
            _ => return Scope::Everywhere,
        }
    }
    if schemas.iter().any(|s| s.contains('\\')) {
        return Scope::Everywhere;
    }
    Scope::Schemas(schemas)
}

/// Whether schema `name` matches a grant's schema `pattern` as the server
/// matches them (`%` any run, `_` one character, `\` takes the next one
/// literally), ignoring case: on a case-sensitive server that can only
/// widen the scope.
fn wild_match(pattern: &str, name: &str) -> bool {
    enum Token {
        Run,
        One,
        Char(char),
    }
    let mut pattern = pattern.chars().flat_map(char::to_lowercase);
    let mut tokens = Vec::new();
    while let Some(c) = pattern.next() {
        tokens.push(match c {
            '%' => Token::Run,
            '_' => Token::One,
            '\\' => Token::Char(pattern.next().unwrap_or('\\')),
            c => Token::Char(c),
        });
    }
    let name: Vec<char> = name.chars().flat_map(char::to_lowercase).collect();
    // matched[j]: the tokens so far match the first j characters.
    let mut matched = vec![false; name.len() + 1];
    matched[0] = true;
    for token in &tokens {
        let mut next = vec![false; name.len() + 1];
        for j in 0..=name.len() {
            next[j] = match token {
                Token::Run => matched[j] || (j > 0 && next[j - 1]),
                Token::One => j > 0 && matched[j - 1],
                Token::Char(c) => j > 0 && matched[j - 1] && name[j - 1] == *c,
            };
        }
        matched = next;
    }
    matched[name.len()]
}

/// Every view, routine, trigger and event whose DEFINER is one of
/// `definers` (`user@host`), except the broker's own failsafe events:
/// views, triggers and routines within `scope`, one branch per schema
/// (see the module doc for why not `IN (…)`), events everywhere.
/// Columns: kind, schema, name, definer, extra, security (see
/// [`Defined`]).
pub fn defined_objects_sql(definers: &[String], scope: &Scope, failsafe_schema: &str) -> String {
    let list = definers
        .iter()
        .map(|d| lit(d))
        .collect::<Vec<_>>()
        .join(", ");
    let views = |filter: &str| {
        format!(
            "SELECT 'VIEW', TABLE_SCHEMA, TABLE_NAME, DEFINER, ALGORITHM, SECURITY_TYPE \
               FROM information_schema.VIEWS WHERE {filter}DEFINER IN ({list}) UNION ALL "
        )
    };
    // A trigger lives in its table's schema; MariaDB looks tables up by
    // EVENT_OBJECT_SCHEMA, not by TRIGGER_SCHEMA.
    let triggers = |filter: &str| {
        format!(
            "SELECT 'TRIGGER', TRIGGER_SCHEMA, TRIGGER_NAME, DEFINER, '', '' \
               FROM information_schema.TRIGGERS WHERE {filter}DEFINER IN ({list}) UNION ALL "
        )
    };
    let routines = |filter: &str| {
        format!(
            "SELECT ROUTINE_TYPE, ROUTINE_SCHEMA, ROUTINE_NAME, DEFINER, '', '' \
               FROM information_schema.ROUTINES WHERE {filter}DEFINER IN ({list}) UNION ALL "
        )
    };
    let scoped = match scope {
        Scope::Everywhere => views("") + &triggers("") + &routines(""),
        Scope::Schemas(schemas) => {
            let mut sql = String::new();
            for s in schemas {
                sql += &views(&format!("TABLE_SCHEMA = {} AND ", lit(s)));
            }
            for s in schemas {
                sql += &triggers(&format!("EVENT_OBJECT_SCHEMA = {} AND ", lit(s)));
            }
            for s in schemas {
                sql += &routines(&format!("ROUTINE_SCHEMA = {} AND ", lit(s)));
            }
            sql
        }
    };
    format!(
        "{scoped}SELECT 'EVENT', EVENT_SCHEMA, EVENT_NAME, DEFINER, ON_COMPLETION, '' \
           FROM information_schema.EVENTS WHERE DEFINER IN ({list}) AND EVENT_SCHEMA <> {fs}",
        fs = lit(failsafe_schema)
    )
}

/// The SQL expression counting what `user@host` defines: the failsafe
/// event drops the user only when it is 0. Always every schema, never a
/// [`Scope`]: it runs once per lease and only when the broker did not
/// revoke in time, and a user it drops must define nothing anywhere.
pub fn defined_count_expr(definer: &str, failsafe_schema: &str) -> String {
    let d = lit(definer);
    format!(
        "(SELECT COUNT(*) FROM information_schema.VIEWS WHERE DEFINER = {d}) + \
         (SELECT COUNT(*) FROM information_schema.ROUTINES WHERE DEFINER = {d}) + \
         (SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE DEFINER = {d}) + \
         (SELECT COUNT(*) FROM information_schema.EVENTS WHERE DEFINER = {d} AND EVENT_SCHEMA <> {fs})",
        fs = lit(failsafe_schema)
    )
}

/// "2 view(s), 1 procedure(s)": what a user defines, for error messages.
pub fn summary(objects: &[&Defined]) -> String {
    let mut counts: std::collections::BTreeMap<ObjectKind, usize> = Default::default();
    for o in objects {
        *counts.entry(o.kind).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{n} {}", k.noun()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The account an owner setting names: `name` → `'name'@'%'`,
/// `name@host` → `'name'@'host'` (split at the last `@`).
pub fn owner_account(owner: &str) -> (&str, &str) {
    match owner.rsplit_once('@') {
        Some((user, host)) if !user.is_empty() => (user, host),
        _ => (owner, "%"),
    }
}

/// The `DEFINER=` clause `SHOW CREATE` prints for `user@host`.
fn shown_definer(user: &str, host: &str) -> String {
    format!("DEFINER={}@{}", ident(user), ident(host))
}

/// `ALTER … VIEW` giving the view `new_definer` (an `account()`),
/// everything else as `SHOW CREATE VIEW` printed it.
pub fn alter_view_sql(
    shown: &str,
    object: &Defined,
    old_user: &str,
    old_host: &str,
    new_definer: &str,
) -> Result<String> {
    let head = format!(
        "CREATE ALGORITHM={} {} SQL SECURITY {} VIEW ",
        object.extra,
        shown_definer(old_user, old_host),
        object.security
    );
    let rest = shown
        .strip_prefix(&head)
        .ok_or_else(|| unexpected(object, "SHOW CREATE VIEW"))?;
    Ok(format!(
        "ALTER ALGORITHM={} DEFINER={new_definer} SQL SECURITY {} VIEW {rest}",
        object.extra, object.security
    ))
}

/// `ALTER DEFINER=… EVENT`: MariaDB refuses an `ALTER EVENT` with no
/// clause besides the definer, so its `ON COMPLETION` is restated.
pub fn alter_event_sql(object: &Defined, new_definer: &str) -> Result<String> {
    let completion = match object.extra.as_str() {
        "PRESERVE" => "PRESERVE",
        "NOT PRESERVE" => "NOT PRESERVE",
        _ => return Err(unexpected(object, "information_schema.EVENTS")),
    };
    Ok(format!(
        "ALTER DEFINER={new_definer} EVENT {} ON COMPLETION {completion}",
        object.qualified()
    ))
}

/// The routine's or trigger's `SHOW CREATE` text with `new_definer`:
/// `CREATE OR REPLACE DEFINER=…` on MariaDB, `CREATE DEFINER=…` on MySQL
/// (which then drops the old one first). Run in the object's schema: the
/// text names it unqualified.
pub fn recreate_sql(
    shown: &str,
    object: &Defined,
    old_user: &str,
    old_host: &str,
    new_definer: &str,
    flavor: Flavor,
) -> Result<String> {
    let head = format!("CREATE {} ", shown_definer(old_user, old_host));
    let rest = shown
        .strip_prefix(&head)
        .ok_or_else(|| unexpected(object, "SHOW CREATE"))?;
    let create = match flavor {
        Flavor::Mariadb => "CREATE OR REPLACE",
        Flavor::Mysql => "CREATE",
    };
    Ok(format!("{create} DEFINER={new_definer} {rest}"))
}

fn unexpected(object: &Defined, what: &str) -> Error {
    Error::internal(format!(
        "{} {} (definer {}): {what} answered in an unexpected form; its definer was not moved",
        object.kind.keyword().to_ascii_lowercase(),
        object.qualified(),
        object.definer
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mysql::account;

    fn obj(kind: ObjectKind, extra: &str, security: &str) -> Defined {
        Defined {
            kind,
            schema: "shop".into(),
            name: "v1".into(),
            definer: "cb_x_0123@%".into(),
            extra: extra.into(),
            security: security.into(),
        }
    }

    #[test]
    fn owners_name_accounts() {
        assert_eq!(owner_account("app_owner"), ("app_owner", "%"));
        assert_eq!(owner_account("app@10.0.0.%"), ("app", "10.0.0.%"));
        assert_eq!(owner_account("a@b@localhost"), ("a@b", "localhost"));
        assert_eq!(owner_account("@x"), ("@x", "%"));
    }

    #[test]
    fn views_keep_their_text_and_get_the_new_definer() {
        let v = obj(ObjectKind::View, "UNDEFINED", "INVOKER");
        let shown = "CREATE ALGORITHM=UNDEFINED DEFINER=`cb_x_0123`@`%` SQL SECURITY INVOKER \
                     VIEW `shop`.`v1` AS select 1 AS `a` WITH CASCADED CHECK OPTION";
        let to = account("app_owner", "%");
        assert_eq!(
            alter_view_sql(shown, &v, "cb_x_0123", "%", &to).unwrap(),
            "ALTER ALGORITHM=UNDEFINED DEFINER='app_owner'@'%' SQL SECURITY INVOKER \
             VIEW `shop`.`v1` AS select 1 AS `a` WITH CASCADED CHECK OPTION"
        );
        // Another definer (or any surprise) is refused, never rewritten.
        let other = shown.replace("cb_x_0123", "cb_y_0123");
        assert!(alter_view_sql(&other, &v, "cb_x_0123", "%", &to).is_err());
    }

    #[test]
    fn routines_and_triggers_are_recreated_with_only_the_definer_changed() {
        let p = obj(ObjectKind::Procedure, "", "");
        let shown = "CREATE DEFINER=`cb_x_0123`@`%` PROCEDURE `p1`(IN x INT)\n    COMMENT 'it''s'\nBEGIN SELECT x; END";
        let to = account("root", "localhost");
        assert_eq!(
            recreate_sql(shown, &p, "cb_x_0123", "%", &to, Flavor::Mariadb).unwrap(),
            "CREATE OR REPLACE DEFINER='root'@'localhost' PROCEDURE `p1`(IN x INT)\n    COMMENT 'it''s'\nBEGIN SELECT x; END"
        );
        assert!(
            recreate_sql(shown, &p, "cb_x_0123", "%", &to, Flavor::Mysql)
                .unwrap()
                .starts_with("CREATE DEFINER='root'@'localhost' PROCEDURE `p1`")
        );
        assert!(recreate_sql(shown, &p, "cb_x_0123", "10.%", &to, Flavor::Mariadb).is_err());
    }

    #[test]
    fn events_restate_their_completion() {
        let e = obj(ObjectKind::Event, "NOT PRESERVE", "");
        assert_eq!(
            alter_event_sql(&e, "'o'@'%'").unwrap(),
            "ALTER DEFINER='o'@'%' EVENT `shop`.`v1` ON COMPLETION NOT PRESERVE"
        );
        assert!(alter_event_sql(&obj(ObjectKind::Event, "x; DROP", ""), "'o'@'%'").is_err());
    }

    #[test]
    fn lookups_are_quoted_and_skip_the_failsafe_schema() {
        let sql = defined_objects_sql(
            &["cb_x@%".into(), "cb_'y@h".into()],
            &Scope::Everywhere,
            "credbroker",
        );
        assert!(sql.contains("DEFINER IN ('cb_x@%', 'cb_''y@h')"));
        assert!(sql.contains("EVENT_SCHEMA <> 'credbroker'"));
        assert!(defined_count_expr("cb_x@%", "credbroker")
            .contains("ROUTINES WHERE DEFINER = 'cb_x@%'"));
        let v = obj(ObjectKind::View, "", "");
        let t = obj(ObjectKind::Trigger, "", "");
        assert_eq!(summary(&[&v, &t, &v]), "2 view(s), 1 trigger(s)");
    }

    #[test]
    fn a_full_lookup_filters_by_definer_only() {
        let sql = defined_objects_sql(&["cb_x@%".into()], &Scope::Everywhere, "credbroker");
        for table in ["VIEWS", "ROUTINES", "TRIGGERS", "EVENTS"] {
            assert!(
                sql.contains(&format!(
                    "information_schema.{table} WHERE DEFINER IN ('cb_x@%')"
                )),
                "{table}: {sql}"
            );
        }
        assert!(!sql.contains("_SCHEMA ="), "{sql}");
        // The failsafe's count is never scoped.
        assert!(!defined_count_expr("cb_x@%", "credbroker").contains("_SCHEMA ="));
    }

    #[test]
    fn a_scoped_lookup_reads_views_triggers_and_routines_one_schema_at_a_time() {
        let scope = Scope::Schemas(["shop".to_string(), "it's".to_string()].into());
        let sql = defined_objects_sql(&["cb_x@%".into()], &scope, "credbroker");
        for schema in ["'shop'", "'it''s'"] {
            assert!(
                sql.contains(&format!(
                    "information_schema.VIEWS WHERE TABLE_SCHEMA = {schema} AND DEFINER IN ('cb_x@%')"
                )),
                "{sql}"
            );
            assert!(
                sql.contains(&format!(
                    "information_schema.TRIGGERS WHERE EVENT_OBJECT_SCHEMA = {schema} AND DEFINER IN ('cb_x@%')"
                )),
                "{sql}"
            );
            assert!(
                sql.contains(&format!(
                    "information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {schema} AND DEFINER IN ('cb_x@%')"
                )),
                "{sql}"
            );
        }
        assert_eq!(sql.matches("information_schema.VIEWS").count(), 2);
        assert_eq!(sql.matches("information_schema.TRIGGERS").count(), 2);
        assert_eq!(sql.matches("information_schema.ROUTINES").count(), 2);
        // Events: everywhere, whatever the scope.
        assert!(sql.contains("information_schema.EVENTS WHERE DEFINER IN ('cb_x@%') AND EVENT_SCHEMA <> 'credbroker'"));
        // No schema reachable: only events are looked for.
        let none = defined_objects_sql(
            &["cb_x@%".into()],
            &Scope::Schemas(BTreeSet::new()),
            "credbroker",
        );
        assert!(
            !none.contains("VIEWS") && !none.contains("TRIGGERS") && !none.contains("ROUTINES"),
            "{none}"
        );
        assert!(none.starts_with("SELECT 'EVENT'"), "{none}");
    }

    #[test]
    fn reach_reads_every_grant_table_for_the_users_and_public() {
        let sql = reach_sql(&["cb_x", "cb_'y"]);
        let named = "User IN ('cb_x', 'cb_''y', 'PUBLIC')";
        for table in [
            "global_priv",
            "roles_mapping",
            "tables_priv",
            "columns_priv",
            "procs_priv",
        ] {
            assert!(
                sql.contains(&format!("mysql.{table} WHERE {named}")),
                "{table}: {sql}"
            );
        }
        // The anonymous user's schema grants apply to every account.
        assert!(sql.contains("mysql.db WHERE User IN ('cb_x', 'cb_''y', 'PUBLIC', '')"));
        // What `check` probes is what this reads, no more, no less.
        let read: Vec<&str> = sql
            .split("FROM mysql.")
            .skip(1)
            .map(|rest| rest.split(' ').next().unwrap())
            .collect();
        assert_eq!(read, GRANT_TABLES);
        assert!(sql.contains("JSON_VALUE(Priv, '$.access'), 1) <> 0"));
        assert!(sql.contains("SELECT 'schema', SCHEMA_NAME FROM information_schema.SCHEMATA"));
        assert!(scopes_lookups(Flavor::Mariadb, (10, 11, 6)));
        assert!(scopes_lookups(Flavor::Mariadb, (10, 4, 0)));
        assert!(!scopes_lookups(Flavor::Mariadb, (10, 3, 39)));
        assert!(!scopes_lookups(Flavor::Mysql, (8, 0, 36)));
    }

    fn rows(r: &[(&str, &str)]) -> Vec<(String, String)> {
        r.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn schemas(s: &[&str]) -> Scope {
        Scope::Schemas(s.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn the_scope_is_every_schema_a_grant_reaches() {
        let existing = [
            ("schema", "shop"),
            ("schema", "shop_eu"),
            ("schema", "shopXeu"),
            ("schema", "Billing"),
            ("schema", "hr"),
            ("schema", "credbroker"),
        ];
        let with = |grants: &[(&str, &str)]| scope_of(&rows(&[&existing[..], grants].concat()));
        // No grant: nothing to look in.
        assert_eq!(with(&[]), schemas(&[]));
        // `_` in a schema grant is a wildcard unless escaped; case is ignored.
        assert_eq!(with(&[("db", "shop_eu")]), schemas(&["shopXeu", "shop_eu"]));
        assert_eq!(with(&[("db", "shop\\_eu")]), schemas(&["shop_eu"]));
        assert_eq!(
            with(&[("db", "shop%")]),
            schemas(&["shop", "shopXeu", "shop_eu"])
        );
        assert_eq!(with(&[("db", "billing")]), schemas(&["Billing"]));
        // A pattern matching no schema the admin sees adds nothing.
        assert_eq!(with(&[("db", "gone")]), schemas(&[]));
        // Table, column and routine grants name their schema exactly,
        // SELECT among them (an admin-made view where the user only reads).
        assert_eq!(
            with(&[
                ("table", "hr"),
                ("column", "shop"),
                ("routine", "credbroker"),
                ("table", "hr")
            ]),
            schemas(&["credbroker", "hr", "shop"])
        );
        // A global privilege or a role: everywhere.
        assert_eq!(with(&[("db", "shop"), ("global", "")]), Scope::Everywhere);
        assert_eq!(with(&[("role", "dev")]), Scope::Everywhere);
        assert_eq!(with(&[("proxy", "x")]), Scope::Everywhere);
        // A name `lit` cannot quote under every sql_mode: everywhere.
        assert_eq!(with(&[("table", "a\\b")]), Scope::Everywhere);
    }

    #[test]
    fn schema_patterns_match_as_the_server_matches_them() {
        assert!(wild_match("%", ""));
        assert!(wild_match("a%c", "abbbc"));
        assert!(wild_match("a%c", "ac"));
        assert!(!wild_match("a%c", "acb"));
        assert!(wild_match("a_c", "abc"));
        assert!(!wild_match("a_c", "ac"));
        assert!(wild_match("a\\%", "a%"));
        assert!(!wild_match("a\\%", "ab"));
        assert!(wild_match("A\\_B", "a_b"));
        assert!(!wild_match("a\\_b", "axb"));
        // Many runs stay cheap (no backtracking).
        assert!(wild_match(
            "%%%%%%%%%%%%%%%%x",
            &format!("{}x", "y".repeat(63))
        ));
        assert!(!wild_match("%%%%%%%%%%%%%%%%x", &"y".repeat(64)));
    }
}
