//! Operators' transitions: retry (optionally with edited content), cancel, and resolve an
//! uncertain message as delivered. Each reads the record, checks the state machine allows
//! the action from its state, and writes it back under the transition lock, so an action
//! never overwrites what the dispatcher wrote meanwhile. An action on any message of a
//! joined request acts on the whole group, in one write (join.rs).

use super::{verdict, MessageId, Outbox, Record, State};
use crate::store::{storage, StoreError};

impl Outbox {
    /// Operator: send a `failed` or `uncertain` message again, optionally with new content.
    /// A `sending` message is retried only when `sending` is [`Sending::Interrupted`].
    pub async fn retry(
        &self,
        id: MessageId,
        by: &str,
        new_content: Option<String>,
        sending: Sending,
    ) -> Result<Record, StoreError> {
        let allowed = sending.allowing(&[State::Failed, State::Uncertain]);
        // A joined request is sent again as it was (join.rs): its content is the group's.
        let new_content = match new_content {
            Some(content) => {
                let r = self.get(id)?;
                match (&r.group, content == r.content) {
                    (None, _) => Some(content),
                    (Some(_), true) => None,
                    (Some(_), false) => return Err(StoreError::Joined { id, lead: r.lead() }),
                }
            }
            None => None,
        };
        self.transition(id, "retry", &allowed, |r| {
            let detail = match &new_content {
                Some(content) if *content != r.content => {
                    let detail = format!("content edited; previous content: {}", r.content);
                    r.content_digest = Some(verdict::content_digest(&r.message_type, content));
                    r.content = content.clone();
                    Some(detail)
                }
                _ => None,
            };
            r.server_errors = 0;
            r.last_error = None;
            r.retry_at = None;
            let action = if detail.is_some() {
                "edited and retried"
            } else {
                "retried"
            };
            r.change(State::Queued, by, action, detail);
        })
        .await
    }

    /// The gateway: D365's events show it never received this `uncertain` message
    /// (`evidence` says which events, d365/evidence.rs): queued to be sent again.
    pub async fn resend_unreceived(
        &self,
        id: MessageId,
        evidence: String,
    ) -> Result<Record, StoreError> {
        let now = jiff::Timestamp::now();
        self.transition(id, "resend", &[State::Uncertain], |r| {
            r.last_error = None;
            r.retry_at = None;
            r.resent_unreceived = Some(now);
            r.verdicts_since_resend = 0;
            r.change(
                State::Queued,
                super::GATEWAY,
                "resent: D365 never received it",
                Some(evidence.clone()),
            );
        })
        .await
    }

    /// Operator: never send this message. Releases the order's lane.
    pub async fn cancel(&self, id: MessageId, by: &str) -> Result<Record, StoreError> {
        let allowed = &[State::Queued, State::Failed, State::Uncertain];
        self.transition(id, "cancel", allowed, |r| {
            r.change(State::Cancelled, by, "cancelled", None)
        })
        .await
    }

    /// Operator: an `uncertain` message (or one left `sending` by a crash, when `sending`
    /// is [`Sending::Interrupted`]) did reach D365 (checked on the MES page).
    pub async fn resolve_delivered(
        &self,
        id: MessageId,
        by: &str,
        sending: Sending,
    ) -> Result<Record, StoreError> {
        let allowed = sending.allowing(&[State::Uncertain]);
        self.transition(id, "resolve", &allowed, |r| {
            r.change(State::Delivered, by, "resolved as delivered", None)
        })
        .await
    }

    /// Reads a record, checks the state machine allows `action` from its state, applies
    /// `change` and writes it: all under the transition lock. A message of a joined
    /// request stands for its group: the change is applied to the lead and every member
    /// in the lead's state, in one write; the lead is returned.
    async fn transition(
        &self,
        id: MessageId,
        action: &'static str,
        allowed: &[State],
        change: impl Fn(&mut Record),
    ) -> Result<Record, StoreError> {
        let _transition = self.transitions.lock().await;
        let mut r = self.get(id)?;
        if r.is_member() {
            r = self.get(r.lead())?;
        }
        r.require(action, allowed)?;
        let mut group = Vec::with_capacity(1 + r.members().len());
        for m in r.members() {
            let m = self.get(*m)?;
            if m.state == r.state && m.lead() == r.id {
                group.push(m);
            }
        }
        group.insert(0, r);
        let changed = group
            .into_iter()
            .map(|mut m| {
                let old = m.state;
                change(&mut m);
                (m, old)
            })
            .collect();
        let mut written = self.write(changed).await?;
        if written.is_empty() {
            return Err(storage("nothing written"));
        }
        Ok(written.swap_remove(0))
    }
}

/// What a message found `sending` is, for an operator action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// The gateway runs: its request is on the wire; only the dispatcher settles it.
    InFlight,
    /// The gateway is stopped: a crash interrupted its request, it is as uncertain as an
    /// `uncertain` message.
    Interrupted,
}

impl Sending {
    /// `states`, plus `sending` when it means interrupted.
    pub(super) fn allowing(self, states: &[State]) -> Vec<State> {
        let mut allowed = states.to_vec();
        if self == Sending::Interrupted {
            allowed.push(State::Sending);
        }
        allowed
    }
}
