//! One stored message: its content, its state in the delivery state machine, its attempts
//! and its history, and how it is encoded on disk.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store::StoreError;

pub type MessageId = u64;

const FORMAT_VERSION: u8 = 1;
/// Attempts kept per message: a message retried for a week of outage must not grow
/// without bound; the count is kept separately.
const MAX_ATTEMPTS_KEPT: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Sending,
    Delivered,
    Failed,
    Uncertain,
    Cancelled,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Queued,
        State::Sending,
        State::Delivered,
        State::Failed,
        State::Uncertain,
        State::Cancelled,
    ];

    /// Terminal messages no longer belong to their order's lane.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Delivered | State::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Sending => "sending",
            State::Delivered => "delivered",
            State::Failed => "failed",
            State::Uncertain => "uncertain",
            State::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, not `write_str`: tables align states with `{:<10}`.
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state {s:?}, expected one of queued, sending, delivered, failed, uncertain, cancelled"))
    }
}

/// A message to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub production_order: String,
    pub message_type: String,
    /// The `_messageContent` string, exactly as it will be posted.
    pub content: String,
    /// Who or what created it (`rule good-parts`, `cli root`).
    pub origin: String,
    /// The line whose events built it (`None` for a message queued by hand).
    pub line: Option<String>,
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub at: jiff::Timestamp,
    pub outcome: String,
}

/// One change of state or content, by the gateway or an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub at: jiff::Timestamp,
    pub by: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: MessageId,
    pub production_order: String,
    pub message_type: String,
    /// The line whose events built it; not stored before the operator service existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    pub content: String,
    pub state: State,
    pub created_at: jiff::Timestamp,
    pub updated_at: jiff::Timestamp,
    /// All attempts ever made.
    pub attempt_count: u32,
    /// HTTP 500 answers so far, counted against `max_attempts`; reset by an operator retry.
    pub server_errors: u32,
    /// The most recent attempts (at most 20, see `MAX_ATTEMPTS_KEPT`).
    pub attempts: Vec<Attempt>,
    pub history: Vec<Change>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// A queued message waiting for a retry is not sent before this time. On disk, so a
    /// restart does not retry everything at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<jiff::Timestamp>,
    /// The content index's digest of `content` (see verdict.rs), kept so the index key can
    /// be removed without reading the content again. `None` when the message was stored
    /// without an index entry (no `d365_events` source configured, or an older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_digest: Option<u64>,
    /// What D365 did with it, once its "message processed" event came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d365: Option<super::verdict::D365Verdict>,
    /// When the request that left it `uncertain` may have left (that attempt's `sending`
    /// mark): what D365's later events are weighed against (d365/evidence.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_at: Option<jiff::Timestamp>,
    /// When the gateway judged, from D365's events, that D365 never received it, and
    /// queued it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resent_unreceived: Option<jiff::Timestamp>,
    /// D365's verdicts on its content since then: a second one means D365 has it twice.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub verdicts_since_resend: u32,
    /// D365 may have it twice (the judgement was wrong): an operator should reverse the
    /// second report in D365.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Sent in one request with other messages of its order (join.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Group>,
}

/// A message's part in a joined request (join.rs): the lead's request carries its own
/// lines and then every member's, in lane order. Fixed once formed: the group is sent,
/// settled, retried, resolved and cancelled as one, whatever happens to it later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// The first message: its request is `content`, its lines followed by the members'.
    Lead {
        members: Vec<MessageId>,
        /// The `_messageContent` of the joined request, exactly as posted.
        content: String,
        /// Lines in the request.
        lines: u32,
        /// The content index's digest of `content` (verdict.rs), when indexed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<u64>,
    },
    /// A later message whose lines went out in the request of message `lead`.
    Member { lead: MessageId },
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Record {
    pub(crate) fn new(id: MessageId, m: &NewMessage, now: jiff::Timestamp) -> Record {
        let mut r = Record {
            id,
            production_order: m.production_order.clone(),
            message_type: m.message_type.clone(),
            line: m.line.clone(),
            content: m.content.clone(),
            state: State::Queued,
            created_at: now,
            updated_at: now,
            attempt_count: 0,
            server_errors: 0,
            attempts: Vec::new(),
            history: Vec::new(),
            last_error: None,
            retry_at: None,
            content_digest: None,
            d365: None,
            left_at: None,
            resent_unreceived: None,
            verdicts_since_resend: 0,
            duplicate: false,
            group: None,
        };
        r.change(State::Queued, &m.origin, "created", None);
        r
    }

    pub(super) fn record_attempt(&mut self, outcome: impl Into<String>) {
        self.record_attempt_at(outcome, jiff::Timestamp::now());
    }

    pub(super) fn record_attempt_at(&mut self, outcome: impl Into<String>, at: jiff::Timestamp) {
        self.attempt_count += 1;
        self.attempts.push(Attempt {
            at,
            outcome: outcome.into(),
        });
        if self.attempts.len() > MAX_ATTEMPTS_KEPT {
            let excess = self.attempts.len() - MAX_ATTEMPTS_KEPT;
            self.attempts.drain(..excess);
        }
    }

    /// Moves to `state` and records who did it and why in the history.
    pub(super) fn change(&mut self, state: State, by: &str, action: &str, detail: Option<String>) {
        self.change_at(state, by, action, detail, jiff::Timestamp::now());
    }

    pub(super) fn change_at(
        &mut self,
        state: State,
        by: &str,
        action: &str,
        detail: Option<String>,
        now: jiff::Timestamp,
    ) {
        self.state = state;
        self.updated_at = now;
        self.history.push(Change {
            at: now,
            by: by.to_string(),
            action: action.to_string(),
            detail,
        });
    }

    /// What its request posts as `_messageContent`: the joined content of a group's lead,
    /// else its own.
    pub fn request_content(&self) -> &str {
        match &self.group {
            Some(Group::Lead { content, .. }) => content,
            _ => &self.content,
        }
    }

    /// The message whose request carries it: itself, or its group's lead.
    pub fn lead(&self) -> MessageId {
        match self.group {
            Some(Group::Member { lead }) => lead,
            _ => self.id,
        }
    }

    /// The other messages its request carries (a group's lead), in order.
    pub fn members(&self) -> &[MessageId] {
        match &self.group {
            Some(Group::Lead { members, .. }) => members,
            _ => &[],
        }
    }

    /// Its part in a joined request, for an operator; `None` when it is sent on its own.
    pub fn group_summary(&self) -> Option<String> {
        let listed = |ids: &[MessageId]| {
            ids.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &self.group {
            None => None,
            Some(Group::Lead { members, lines, .. }) => Some(format!(
                "its request also carries messages {} ({lines} lines in all)",
                listed(members)
            )),
            Some(Group::Member { lead }) => Some(format!(
                "sent in the request of message {lead} (acting on it acts on that request)"
            )),
        }
    }

    /// Its part in a joined request in a few words, for a listing's row: `request +N
    /// joined` on the lead, `in request of ID` on a member.
    pub fn group_tag(&self) -> Option<String> {
        match &self.group {
            None => None,
            Some(Group::Lead { members, .. }) => Some(format!("request +{} joined", members.len())),
            Some(Group::Member { lead }) => Some(format!("in request of {lead}")),
        }
    }

    /// Whether its lines went out in another message's request.
    pub fn is_member(&self) -> bool {
        matches!(self.group, Some(Group::Member { .. }))
    }

    /// The content index's digest of what its requests posted: the group's content for a
    /// lead, none for a member (never posted on its own), else its own content's.
    pub(super) fn sent_digest(&self) -> Option<u64> {
        match &self.group {
            Some(Group::Lead { digest, .. }) => *digest,
            Some(Group::Member { .. }) => None,
            None => self.content_digest,
        }
    }

    /// Refuses a transition the state machine does not allow from the current state.
    pub(super) fn require(
        &self,
        action: &'static str,
        allowed: &[State],
    ) -> Result<(), StoreError> {
        if allowed.contains(&self.state) {
            return Ok(());
        }
        Err(StoreError::WrongState {
            id: self.id,
            state: self.state.to_string(),
            action,
            allowed: allowed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

pub(super) fn encode(r: &Record) -> Result<Vec<u8>, StoreError> {
    let mut v = Vec::with_capacity(512);
    v.push(FORMAT_VERSION);
    serde_json::to_writer(&mut v, r).map_err(crate::store::storage)?;
    Ok(v)
}

pub(super) fn decode(bytes: &[u8]) -> Result<Record, String> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, json)) => serde_json::from_slice(json).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("unknown record format version {v}")),
        None => Err("empty record".into()),
    }
}
