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

/// Every view, routine, trigger and event whose DEFINER is one of
/// `definers` (`user@host`), except the broker's own failsafe events.
/// Columns: kind, schema, name, definer, extra, security (see [`Defined`]).
pub fn defined_objects_sql(definers: &[String], failsafe_schema: &str) -> String {
    let list = definers
        .iter()
        .map(|d| lit(d))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT 'VIEW', TABLE_SCHEMA, TABLE_NAME, DEFINER, ALGORITHM, SECURITY_TYPE \
           FROM information_schema.VIEWS WHERE DEFINER IN ({list}) \
         UNION ALL SELECT ROUTINE_TYPE, ROUTINE_SCHEMA, ROUTINE_NAME, DEFINER, '', '' \
           FROM information_schema.ROUTINES WHERE DEFINER IN ({list}) \
         UNION ALL SELECT 'TRIGGER', TRIGGER_SCHEMA, TRIGGER_NAME, DEFINER, '', '' \
           FROM information_schema.TRIGGERS WHERE DEFINER IN ({list}) \
         UNION ALL SELECT 'EVENT', EVENT_SCHEMA, EVENT_NAME, DEFINER, ON_COMPLETION, '' \
           FROM information_schema.EVENTS WHERE DEFINER IN ({list}) AND EVENT_SCHEMA <> {fs}",
        fs = lit(failsafe_schema)
    )
}

/// The SQL expression counting what `user@host` defines: the failsafe
/// event drops the user only when it is 0.
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
        let sql = defined_objects_sql(&["cb_x@%".into(), "cb_'y@h".into()], "credbroker");
        assert!(sql.contains("DEFINER IN ('cb_x@%', 'cb_''y@h')"));
        assert!(sql.contains("EVENT_SCHEMA <> 'credbroker'"));
        assert!(defined_count_expr("cb_x@%", "credbroker")
            .contains("ROUTINES WHERE DEFINER = 'cb_x@%'"));
        let v = obj(ObjectKind::View, "", "");
        let t = obj(ObjectKind::Trigger, "", "");
        assert_eq!(summary(&[&v, &t, &v]), "2 view(s), 1 trigger(s)");
    }
}
