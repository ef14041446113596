//! The broker's calls on static roles: reading the current credential
//! (policy-checked and audited like an issue) and the admin's status,
//! rotate and revoke. The state machine itself is
//! `crate::static_roles::rotation`; a forced step runs in a task of its own
//! so a caller that hangs up cannot cut it off.

use std::sync::Arc;
use std::time::Duration;

use super::{check_role_name, truncate_text, Broker};
use crate::audit::{Event, Outcome};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::Username;
use crate::policy::any_matches;
use crate::static_roles::rotation::Force;
use crate::static_roles::{Rotator, StaticCredential, StaticRoleConfig, StaticStatus};

impl Broker {
    /// The static roles' rotator (its loop runs in the daemon).
    pub fn static_rotator(&self) -> &Arc<Rotator> {
        &self.statics
    }

    /// The current credential of static role `name`, for a caller its
    /// `allowed` patterns match (else `PermissionDenied`). Audited either way.
    pub async fn static_credential(&self, who: &Identity, name: &str) -> Result<StaticCredential> {
        let mut event = Event::new(who.as_str(), "static_read");
        event.role = Some(truncate_text(name));
        let result = async {
            let config = self.config();
            let role = lookup_static(&config, name)?;
            event.database = Some(role.database.clone());
            if !any_matches(&role.allowed, who) {
                return Err(Error::denied(format!(
                    "identity may not read static role {name:?}"
                )));
            }
            let backend = self.backend(&role.database)?.clone();
            let st = self.statics.readable(role).await?;
            let (cur, password) = self.statics.unseal_current(&st)?;
            event.username = Some(cur.user.clone());
            let dsn = backend.dsn(&Username::from_store(cur.user.clone()), Some(&password));
            Ok(StaticCredential {
                static_role: role.name.clone(),
                database: role.database.clone(),
                kind: backend.kind(),
                username: cur.user,
                password,
                dsn,
                endpoint: backend.endpoint().clone(),
                generation: st.generation,
                rotated_at: cur.rotated_at,
                next_rotation_at: st.next_rotation_at.unwrap_or(cur.valid_until),
                valid_until: cur.valid_until,
            })
        }
        .await;
        match result {
            Ok(c) => {
                let mut ok = event;
                ok.outcome = Some(Outcome::Ok);
                ok.detail = Some(format!("generation={}", c.generation));
                // An unaudited credential must not be handed out.
                self.audit_event(ok)?;
                Ok(c)
            }
            Err(e) => Err(self.refused("static_read", event, e)),
        }
    }

    /// Every configured static role with its state, for an admin.
    pub async fn admin_static_roles(&self, who: &Identity) -> Result<Vec<StaticStatus>> {
        self.require_admin(who, "static_roles")?;
        let config = self.config();
        let states = self.store.static_list().await?;
        Ok(config
            .static_roles
            .values()
            .map(|r| {
                let st = states.iter().find(|s| s.role == r.name);
                StaticStatus {
                    name: r.name.clone(),
                    database: r.database.clone(),
                    users: r.users.clone(),
                    current_user: st.and_then(|s| s.current.as_ref().map(|c| c.user.clone())),
                    generation: st.map(|s| s.generation).unwrap_or(0),
                    rotated_at: st.and_then(|s| s.current.as_ref().map(|c| c.rotated_at)),
                    next_rotation_at: st.and_then(|s| s.next_rotation_at),
                    valid_until: st.and_then(|s| s.current.as_ref().map(|c| c.valid_until)),
                    previous_user: st.and_then(|s| s.previous.as_ref().map(|p| p.user.clone())),
                    previous_retire_at: st.and_then(|s| s.previous.as_ref().map(|p| p.retire_at)),
                    pending: st.is_some_and(|s| s.pending.is_some()),
                    last_error: st.and_then(|s| s.last_error.clone()),
                }
            })
            .collect())
    }

    /// Rotates static role `name` now (admin). The previous user keeps its
    /// overlap unless it is the one being rotated onto.
    pub async fn rotate_static(&self, who: &Identity, name: &str) -> Result<StaticStatus> {
        self.force_static(who, name, Force::Rotate, "static_rotate")
            .await
    }

    /// Incident: both users' passwords replaced and their sessions ended;
    /// whoever reads next gets a new credential (admin).
    pub async fn revoke_static(&self, who: &Identity, name: &str) -> Result<StaticStatus> {
        self.force_static(who, name, Force::Revoke, "static_revoke")
            .await
    }

    /// Recovery: abandons static role `name`'s pending rotation (one that
    /// cannot be finished, e.g. sealed under a sealing key this broker
    /// does not have) and rotates afresh under this broker's key; with
    /// nothing pending, a plain rotation (admin). Audited
    /// (`static_abandon`, then the rotation).
    pub async fn recover_static(&self, who: &Identity, name: &str) -> Result<StaticStatus> {
        self.force_static(who, name, Force::Abandon, "static_abandon")
            .await
    }

    async fn force_static(
        &self,
        who: &Identity,
        name: &str,
        force: Force,
        action: &'static str,
    ) -> Result<StaticStatus> {
        self.require_admin(who, action)?;
        let config = self.config();
        let role = match lookup_static(&config, name) {
            Ok(r) => r.clone(),
            Err(e) => {
                let mut ev = Event::new(who.as_str(), action);
                ev.role = Some(truncate_text(name));
                return Err(self.audit_failure(ev, e));
            }
        };
        let statics = self.statics.clone();
        let actor = who.as_str().to_string();
        // Its own task: a caller that hangs up must not cut a rotation off
        // between the database's change and the commit (the intent would
        // be finished later, but the admin deserves a clear answer).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (statics, role2, actor2) = (statics.clone(), role.clone(), actor.clone());
            let out = tokio::spawn(async move { statics.step(&role2, force, &actor2).await })
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("static rotation task: {e}"))))?;
            if out.is_some() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut ev = Event::new(who.as_str(), action);
                ev.role = Some(role.name.clone());
                return Err(self.audit_failure(
                    ev,
                    Error::Unavailable(
                        "another replica is rotating this static role; try again".into(),
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.statics.wake();
        self.admin_static_roles(who)
            .await?
            .into_iter()
            .find(|s| s.name == role.name)
            .ok_or_else(|| Error::internal("static role vanished"))
    }
}

pub(crate) fn lookup_static<'c>(config: &'c Config, name: &str) -> Result<&'c StaticRoleConfig> {
    check_role_name(name, "static_role", "static role")?;
    config
        .static_roles
        .get(name)
        .ok_or_else(|| Error::NotFound(format!("no static role {name:?} is configured")))
}
