//! What a rule does when it fires: its actions (context, release, withdraw, publication,
//! message) built first and applied only when all could be built (all or nothing), the
//! aggregation of quantities per line and order, and the messages built from templates.

use crate::message::Message;
use crate::outbox::Publication;
use matcher::counter_delta;
use serde_json::Value as Json;
use state::{Accumulator, OrderContext, ReleasedOrder, Trigger};
use std::sync::atomic::Ordering;
use template::{Missing, Scope, Template, Var};

use super::*;

/// A value as a number. Text like "nan" or "inf" parses as a float but is no number to
/// count with: a counter based on it would report garbage and could not be saved.
/// A rule's actions for one trigger, built before any is applied (see `Engine::fire`).
#[derive(Debug, Default)]
pub(super) struct Plan {
    context: Option<OrderContext>,
    released: Option<ReleasedOrder>,
    withdrawn: Option<String>,
    publication: Option<Publication>,
    quantity: Option<f64>,
    /// The message, when it goes out now (not aggregated).
    message: Option<BuiltMessage>,
}

impl Engine {
    /// `release` and `withdraw`: the line's list of released orders.
    /// `publish`: the topic and payload rendered in `scope`; the pipeline stores the
    /// message with the batch and the publisher sends it.
    pub(super) fn publication(
        rule: &Rule,
        publish: &Publish,
        scope: &Scope<'_>,
    ) -> Result<Publication, Missing> {
        let topic = publish.topic.render_text(scope)?;
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(Missing::Other(format!(
                "publish.topic rendered {topic:?}, not a topic to publish to"
            )));
        }
        let payload = match &publish.payload {
            PublishPayload::Text(t) => t.render_text(scope)?,
            PublishPayload::Fields(fields) => {
                let mut object = serde_json::Map::new();
                for (name, t) in fields {
                    object.insert(name.clone(), t.render(scope)?);
                }
                Json::Object(object).to_string()
            }
        };
        Ok(Publication {
            via: publish.via.clone(),
            topic,
            payload,
            retain: publish.retain,
            rule: rule.name.clone(),
        })
    }

    pub(super) fn rule_index(&self, name: &str) -> Option<usize> {
        self.rules.iter().position(|r| r.name == name)
    }

    /// Runs a rule's actions for one trigger: context, releases, publication, counting,
    /// emit — all or nothing. Every action is built first, against the context the rule
    /// itself sets; if any cannot be built, none runs, and the log says which part failed
    /// and why. (A line without an order is not a failure: the event is counted as
    /// unassigned, as before.)
    pub(super) fn fire(&mut self, i: usize, trigger: Trigger, out: &mut Vec<BuiltMessage>) {
        let rule = self.rules[i].clone();
        let line = match &rule.line {
            None => None,
            Some(t) => match t.render_text(&self.scope(&rule, &trigger, None, None)) {
                Ok(l) => Some(l),
                Err(m) => {
                    self.refuse(&rule, &trigger, "line", &m);
                    return;
                }
            },
        };
        let plan = match self.plan(&rule, &trigger, line.as_deref()) {
            Ok(plan) => plan,
            Err((part, m)) => {
                self.refuse(&rule, &trigger, part, &m);
                return;
            }
        };

        if let (Some(ctx), Some(line)) = (plan.context, &line) {
            let current = self.state.contexts.get(line).cloned();
            if current
                .as_ref()
                .is_some_and(|c| c.order != ctx.order || c.item != ctx.item)
            {
                self.flush_line(line, trigger.at, out);
            }
            if current.as_ref().is_none_or(|c| c.order != ctx.order) {
                tracing::info!(%line, order = %crate::text::for_log(&ctx.order), item = ?ctx.item, rule = %rule.name, "Order context set.");
            }
            self.warned_unassigned.remove(line);
            self.state.contexts.insert(line.clone(), ctx);
            self.dirty = true;
        }
        if rule.clear_context {
            if let Some(line) = &line {
                self.flush_line(line, trigger.at, out);
                if let Some(old) = self.state.contexts.remove(line) {
                    tracing::info!(%line, order = %crate::text::for_log(&old.order), rule = %rule.name, "Order context cleared.");
                    self.dirty = true;
                }
            }
        }
        if let Some(line) = &line {
            self.apply_release(&rule, line, plan.released, plan.withdrawn);
        }
        if let Some(p) = plan.publication {
            self.publications.push(p);
        }

        let quantity = match &rule.count {
            None => None,
            Some(counting) => {
                if counting.mode == CountMode::Delta {
                    // The plan read the counter; now it is stored.
                    if let Some(v) = as_f64(&trigger.value) {
                        self.state.counters.insert(rule.key(&trigger.point), v);
                        self.dirty = true;
                    }
                }
                match plan.quantity {
                    Some(q) if q > 0.0 && q.is_finite() => Some(q),
                    _ => return,
                }
            }
        };
        let Some(emit) = &rule.emit else { return };
        let Some(line) = line else { return };
        let context = self.state.contexts.get(&line).cloned();
        if context.is_none() && self.needs_context(emit) {
            self.unassigned(&rule, &line, &trigger, quantity);
            return;
        }
        match (&rule.aggregate, quantity) {
            (Some(aggregate), Some(q)) => {
                // Without a context the rule names its production order itself.
                let key = match &context {
                    Some(ctx) => {
                        Accumulator::key(&rule.name, &line, &ctx.order, ctx.item.as_deref())
                    }
                    None => Accumulator::key(&rule.name, &line, "", None),
                };
                let acc = self
                    .state
                    .accumulators
                    .entry(key.clone())
                    .or_insert_with(|| Accumulator {
                        rule: rule.name.clone(),
                        line: line.clone(),
                        context: context.clone(),
                        quantity: 0.0,
                        opened_at: trigger.at,
                        trigger: trigger.clone(),
                    });
                acc.quantity += q;
                acc.trigger = trigger.clone();
                self.dirty = true;
                if aggregate.every.is_some_and(|every| acc.quantity >= every) {
                    self.flush_accumulator(&key, trigger.at, out);
                }
            }
            _ => {
                if let Some(b) = plan.message {
                    out.push(b);
                }
            }
        }
    }

    /// Builds every action of `rule` for `trigger` without changing anything: the
    /// context it sets, its release and withdrawal, its publication, the quantity it
    /// counts, and (when not aggregated) its message. The first part that cannot be built
    /// is the error, named.
    pub(super) fn plan(
        &self,
        rule: &Rule,
        trigger: &Trigger,
        line: Option<&str>,
    ) -> Result<Plan, (&'static str, Missing)> {
        let mut plan = Plan::default();
        let current = line.and_then(|l| self.state.contexts.get(l)).cloned();
        if let (Some(set), Some(line)) = (&rule.set_context, line) {
            let scope = self.scope(rule, trigger, current.as_ref(), Some(line));
            let render =
                |t: &Option<Template>| t.as_ref().map(|t| t.render_text(&scope)).transpose();
            let part = |m| ("set_context", m);
            let ctx = OrderContext {
                order: set.order.render_text(&scope).map_err(part)?,
                item: render(&set.item).map_err(part)?,
                operation: render(&set.operation).map_err(part)?,
                resource: render(&set.resource).map_err(part)?,
                since: Some(trigger.at),
            };
            if ctx.order.trim().is_empty() {
                return Err(part(Missing::Other(
                    "set_context.order rendered empty".into(),
                )));
            }
            plan.context = Some(ctx);
        }
        // What the other actions see: the context this rule sets, else the line's.
        let context = if rule.clear_context {
            None
        } else {
            plan.context.clone().or(current)
        };
        let scope = self.scope(rule, trigger, context.as_ref(), line);
        if line.is_some() {
            if let Some(r) = &rule.release {
                let part = |m| ("release", m);
                let released = ReleasedOrder {
                    order: r.order.render_text(&scope).map_err(part)?,
                    item: r
                        .item
                        .as_ref()
                        .map(|t| t.render_text(&scope))
                        .transpose()
                        .map_err(part)?,
                    at: trigger.at,
                    rule: rule.name.clone(),
                };
                if released.order.trim().is_empty() {
                    return Err(part(Missing::Other("release.order rendered empty".into())));
                }
                plan.released = Some(released);
            }
            if let Some(w) = &rule.withdraw {
                plan.withdrawn = Some(w.render_text(&scope).map_err(|m| ("withdraw", m))?);
            }
        }
        if let Some(publish) = &rule.publish {
            plan.publication =
                Some(Self::publication(rule, publish, &scope).map_err(|m| ("publish", m))?);
        }
        if let Some(counting) = &rule.count {
            plan.quantity = Some(match counting.mode {
                CountMode::Impulse => counting.quantity,
                CountMode::Value => as_f64(&trigger.value).map_or(0.0, |v| v * counting.quantity),
                CountMode::Delta => match as_f64(&trigger.value) {
                    // Not a number: nothing counted, nothing else done (as before).
                    None => {
                        return Err(("count", Missing::Other("the value is not a number".into())))
                    }
                    // The first reading only sets the base: what the counter showed
                    // before the gateway watched it was not counted by us.
                    Some(v) => self
                        .state
                        .counters
                        .get(&rule.key(&trigger.point))
                        .map_or(0.0, |last| {
                            counter_delta(*last, v, counting.counter_max) * counting.quantity
                        }),
                },
            });
        }
        if let (Some(emit), Some(line)) = (&rule.emit, line) {
            let counted_nothing =
                rule.count.is_some() && !plan.quantity.is_some_and(|q| q > 0.0 && q.is_finite());
            let unassigned = context.is_none() && self.needs_context(emit);
            // An aggregated message is built when its window closes (from the window's
            // context and last event); building it for every event here as well would
            // double the hot path's cost, so it is not checked now.
            if !counted_nothing && !unassigned && rule.aggregate.is_none() {
                plan.message = Some(
                    self.build_message(rule, emit, trigger, context.as_ref(), line, plan.quantity)
                        .map_err(|m| ("emit", m))?,
                );
            }
        }
        Ok(plan)
    }

    /// Stores a planned release and withdrawal for `line`.
    pub(super) fn apply_release(
        &mut self,
        rule: &Rule,
        line: &str,
        released: Option<ReleasedOrder>,
        withdrawn: Option<String>,
    ) {
        if let Some(r) = released {
            let list = self.state.released.entry(line.to_string()).or_default();
            list.retain(|o| o.order != r.order);
            tracing::info!(%line, order = %crate::text::for_log(&r.order), item = ?r.item, rule = %rule.name, "Order released for the line.");
            list.push(r);
            if list.len() > MAX_RELEASED_PER_LINE {
                let dropped = list.remove(0);
                tracing::warn!(%line, order = %crate::text::for_log(&dropped.order), kept = MAX_RELEASED_PER_LINE, "Too many released orders for one line; the oldest is no longer listed (withdraw finished orders with a rule).");
            }
            self.dirty = true;
        }
        if let Some(order) = withdrawn {
            if let Some(list) = self.state.released.get_mut(line) {
                let before = list.len();
                list.retain(|o| o.order != order);
                if list.len() != before {
                    tracing::info!(%line, order = %crate::text::for_log(&order), rule = %rule.name, "Order withdrawn from the line's released list.");
                    self.dirty = true;
                }
                if list.is_empty() {
                    self.state.released.remove(line);
                }
            }
        }
    }

    /// A rule's action that could not be built: none of its actions ran.
    pub(super) fn refuse(&self, rule: &Rule, trigger: &Trigger, part: &str, missing: &Missing) {
        self.stats.build_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(rule = %rule.name, origin = %rule.origin, source = %trigger.source, point = %crate::text::for_log(&trigger.point), part, problem = ?missing,
            "Rule not applied: its {part} could not be built, so none of its actions ran (no context change, release, publication, count or message).");
    }

    pub(super) fn needs_context(&self, emit: &Emit) -> bool {
        let uses = |fields: &[(String, Template)]| {
            fields
                .iter()
                .any(|(_, t)| t.vars().any(|v| matches!(v, Var::Context(_))))
        };
        let sets_order = emit
            .header
            .iter()
            .any(|(n, _)| n == "ProductionOrderNumber");
        !sets_order || uses(&emit.header) || uses(&emit.line)
    }

    pub(super) fn unassigned(
        &mut self,
        rule: &Rule,
        line: &str,
        trigger: &Trigger,
        quantity: Option<f64>,
    ) {
        self.stats.unassigned.fetch_add(1, Ordering::Relaxed);
        if self.warned_unassigned.insert(line.to_string()) {
            tracing::warn!(%line, rule = %rule.name, point = %trigger.point, quantity = ?quantity,
                "Line has no production order: events are counted as unassigned and no message is built until an order is set (further ones are not logged until then).");
        }
    }

    pub(super) fn build_error(&self, rule: &Rule, trigger: &Trigger, missing: &Missing) {
        self.stats.build_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(rule = %rule.name, origin = %rule.origin, source = %trigger.source, point = %trigger.point, problem = ?missing, "Rule could not build its message; event skipped.");
    }

    pub(super) fn flush_line(
        &mut self,
        line: &str,
        now: jiff::Timestamp,
        out: &mut Vec<BuiltMessage>,
    ) {
        let keys: Vec<String> = self
            .state
            .accumulators
            .iter()
            .filter(|(_, a)| a.line == line)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.flush_accumulator(&key, now, out);
        }
    }

    pub(super) fn flush_accumulator(
        &mut self,
        key: &str,
        now: jiff::Timestamp,
        out: &mut Vec<BuiltMessage>,
    ) {
        let Some(acc) = self.state.accumulators.remove(key) else {
            return;
        };
        self.dirty = true;
        let Some(i) = self.rule_index(&acc.rule) else {
            tracing::warn!(rule = %acc.rule, quantity = acc.quantity, order = ?acc.context.as_ref().map(|c| &c.order),
                "Accumulated quantity of a rule that no longer exists is dropped.");
            return;
        };
        let rule = self.rules[i].clone();
        let Some(emit) = &rule.emit else { return };
        let mut trigger = acc.trigger.clone();
        trigger.at = now.max(acc.trigger.at);
        if let Some(b) = self.build(
            &rule,
            emit,
            &trigger,
            acc.context.as_ref(),
            &acc.line,
            Some(acc.quantity),
        ) {
            out.push(b);
        }
    }

    pub(super) fn scope<'a>(
        &'a self,
        rule: &'a Rule,
        trigger: &'a Trigger,
        context: Option<&'a OrderContext>,
        line: Option<&'a str>,
    ) -> Scope<'a> {
        Scope {
            quantity: None,
            context,
            captures: &trigger.captures,
            payload: trigger.payload.as_ref(),
            value: &trigger.value,
            at: trigger.at,
            time_zone: &self.time_zone,
            line,
            source: &trigger.source,
            point: &trigger.point,
            rule: &rule.name,
        }
    }

    /// The message of `emit`, logged and counted when it cannot be built (a window that
    /// closes later: its context may have lost a field since).
    pub(super) fn build(
        &self,
        rule: &Rule,
        emit: &Emit,
        trigger: &Trigger,
        context: Option<&OrderContext>,
        line: &str,
        quantity: Option<f64>,
    ) -> Option<BuiltMessage> {
        match self.build_message(rule, emit, trigger, context, line, quantity) {
            Ok(b) => Some(b),
            Err(m) => {
                self.build_error(rule, trigger, &m);
                None
            }
        }
    }

    /// The message of `emit` for `trigger` in `context`, checked as D365 will check it.
    pub(super) fn build_message(
        &self,
        rule: &Rule,
        emit: &Emit,
        trigger: &Trigger,
        context: Option<&OrderContext>,
        line: &str,
        quantity: Option<f64>,
    ) -> Result<BuiltMessage, Missing> {
        let mut scope = self.scope(rule, trigger, context, Some(line));
        scope.quantity = quantity;
        let mut header = serde_json::Map::new();
        for (name, t) in &emit.header {
            header.insert(name.clone(), t.render(&scope)?);
        }
        if !header.contains_key("ProductionOrderNumber") {
            let order = context
                .map(|c| c.order.clone())
                .ok_or(Missing::Context("order"))?;
            header.insert("ProductionOrderNumber".into(), Json::String(order));
        }
        if let Some(key) = emit.lines_key {
            let mut l = serde_json::Map::new();
            for (name, t) in &emit.line {
                l.insert(name.clone(), t.render(&scope)?);
            }
            header.insert(key.into(), Json::Array(vec![Json::Object(l)]));
        }
        let message = Message::from_json(&emit.message_type, Json::Object(header))
            .and_then(|m| m.validate().map(|()| m))
            .map_err(|e| Missing::Other(format!("the message is not valid: {e}")))?;
        Ok(BuiltMessage {
            message,
            rule: rule.name.clone(),
            line: line.to_string(),
        })
    }
}
