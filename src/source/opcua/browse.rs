//! `mes-gateway opcua browse`: walks a server's address space with a configured
//! source's connection (endpoint, security, identity, trust folders) and prints, per
//! node, what the configuration needs — NodeId, browse name, class, data type and the
//! current value — so an engineer can write the `nodes` list without a separate UA tool.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt as _;
use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, NodeClass, NodeClassMask,
    NodeId, ObjectId, ReadValueId, ReferenceTypeId, TimestampsToReturn,
};

use super::config::OpcuaConfig;
use super::OpcuaSource;

/// One node found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Found {
    pub depth: usize,
    pub node_id: String,
    pub browse_name: String,
    pub class: String,
    pub data_type: Option<String>,
    pub value: Option<String>,
}

/// The most nodes one browse lists (a large server has hundreds of thousands).
pub const MAX_NODES: usize = 5_000;

/// Browses from `start` (default: the Objects folder) down to `depth` levels.
pub async fn browse(
    config: &OpcuaConfig,
    start: Option<NodeId>,
    depth: usize,
) -> Result<Vec<Found>, String> {
    let source = OpcuaSource::new(
        config.clone(),
        crate::systemd::Heartbeats::default().register("browse"),
        std::sync::Arc::default(),
    );
    let mut client = OpcuaSource::client(config)?;
    let identity = source.identity()?;
    let (session, event_loop) = source.open_session(&mut client, &identity).await?;
    let stream = event_loop.enter();
    // The event loop retries for ever; a browse stops at the first failure and says why.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<opcua::types::StatusCode>();
    let driver = tokio::spawn(async move {
        tokio::pin!(stream);
        let mut failed_tx = Some(failed_tx);
        while let Some(polled) = stream.next().await {
            let status = match polled {
                Err(status)
                | Ok(opcua::client::SessionPollResult::ReconnectFailed(status))
                | Ok(opcua::client::SessionPollResult::ConnectionLost(status)) => status,
                Ok(_) => continue,
            };
            if let Some(tx) = failed_tx.take() {
                let _ = tx.send(status);
            }
        }
    });
    let connected = tokio::select! {
        _ = session.wait_for_connection() => Ok(()),
        status = failed_rx => Err(match status {
            Ok(status) => source.explain(status, ""),
            Err(_) => "the session ended".to_string(),
        }),
        _ = tokio::time::sleep(config.request_timeout) => Err("no session within the request timeout".to_string()),
    };
    if let Err(why) = connected {
        driver.abort();
        return Err(why);
    }
    let start = start.unwrap_or_else(|| ObjectId::ObjectsFolder.into());
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut level = vec![start];
    for d in 0..depth {
        let mut next = Vec::new();
        for parent in level {
            if !seen.insert(parent.clone()) || out.len() >= MAX_NODES {
                continue;
            }
            let results = session
                .browse(
                    &[BrowseDescription {
                        node_id: parent.clone(),
                        browse_direction: BrowseDirection::Forward,
                        reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
                        include_subtypes: true,
                        node_class_mask: (NodeClassMask::OBJECT | NodeClassMask::VARIABLE).bits(),
                        result_mask: BrowseResultMask::All as u32,
                    }],
                    1_000,
                    None,
                )
                .await
                .map_err(|e| format!("browse {parent}: {e}"))?;
            for r in results
                .into_iter()
                .flat_map(|r| r.references.unwrap_or_default())
            {
                let id = r.node_id.node_id.clone();
                let mut found = Found {
                    depth: d,
                    node_id: id.to_string(),
                    browse_name: format!(
                        "{}:{}",
                        r.browse_name.namespace_index, r.browse_name.name
                    ),
                    class: format!("{:?}", r.node_class),
                    data_type: None,
                    value: None,
                };
                if r.node_class == NodeClass::Variable {
                    let read = session
                        .read(
                            &[
                                ReadValueId {
                                    node_id: id.clone(),
                                    attribute_id: AttributeId::Value as u32,
                                    ..Default::default()
                                },
                                ReadValueId {
                                    node_id: id.clone(),
                                    attribute_id: AttributeId::DataType as u32,
                                    ..Default::default()
                                },
                            ],
                            TimestampsToReturn::Neither,
                            0.0,
                        )
                        .await
                        .unwrap_or_default();
                    found.value = read
                        .first()
                        .and_then(|v| v.value.as_ref())
                        .map(|v| crate::text::bounded(&format!("{v}"), 80));
                    found.data_type = read
                        .get(1)
                        .and_then(|v| v.value.as_ref())
                        .map(|v| data_type_name(&format!("{v}")));
                }
                next.push(id);
                out.push(found);
            }
        }
        level = next;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
    driver.abort();
    Ok(out)
}

/// `i=7` → `UInt32`, for the data types of namespace 0 that counters and states use.
fn data_type_name(id: &str) -> String {
    let name = match id.trim_start_matches("ns=0;") {
        "i=1" => "Boolean",
        "i=2" => "SByte",
        "i=3" => "Byte",
        "i=4" => "Int16",
        "i=5" => "UInt16",
        "i=6" => "Int32",
        "i=7" => "UInt32",
        "i=8" => "Int64",
        "i=9" => "UInt64",
        "i=10" => "Float",
        "i=11" => "Double",
        "i=12" => "String",
        "i=13" => "DateTime",
        "i=21" => "LocalizedText",
        _ => return id.to_string(),
    };
    name.to_string()
}
