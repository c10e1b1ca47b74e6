//! What the running components publish about themselves (health, counters), for those
//! that report on them: the operator service, the HTTP API and the alerts. Replaced at
//! every start and reload, so readers always see the configuration that runs.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::d365::DispatchStats;
use crate::pipeline::PipelineStats;
use crate::rules::RuleStats;
use crate::source::SourceHealth;

#[derive(Debug, Default)]
pub struct ComponentStats {
    pub sources: Vec<(String, Arc<SourceHealth>)>,
    pub dispatch: Option<Arc<DispatchStats>>,
    pub pipeline: Option<Arc<PipelineStats>>,
    pub rules: Option<Arc<RuleStats>>,
    /// The MQTT publisher of each broker rules publish to, by `mqtt` source id.
    pub publishers: Vec<(String, Arc<crate::publish::PublishStats>)>,
    /// The webhook's way into each running `d365_events` source, by source id.
    pub webhooks: std::collections::BTreeMap<String, crate::source::d365_events::Intake>,
}

/// Shared, replaceable [`ComponentStats`].
#[derive(Debug, Clone, Default)]
pub struct Live(Arc<Mutex<ComponentStats>>);

impl Live {
    pub fn get(&self) -> MutexGuard<'_, ComponentStats> {
        // Plain data, replaced whole: a panic elsewhere cannot leave it half-written.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn replace(&self, stats: ComponentStats) {
        *self.get() = stats;
    }
}
