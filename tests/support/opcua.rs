//! A real OPC UA server on a loopback port (async-opcua's server), standing in for a
//! PLC: folder `Line1` with `GoodCount` (UInt32), `Running` (Boolean) and `Order`
//! (String) in namespace `urn:test-plc`; endpoints without security and with
//! Basic256Sha256 SignAndEncrypt; anonymous or user `operator` / `line1-secret`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use opcua::server::node_manager::memory::{simple_node_manager, SimpleNodeManager};
use opcua::server::{
    diagnostics::NamespaceMetadata, ServerBuilder, ServerHandle, ServerUserToken,
    ANONYMOUS_USER_TOKEN_ID,
};
use opcua::types::{DataValue, DateTime, MessageSecurityMode, NodeId, StatusCode, Variant};

pub const NAMESPACE: &str = "urn:test-plc";
pub const USER: &str = "operator";
pub const PASSWORD: &str = "line1-secret";

pub struct UaPlc {
    handle: ServerHandle,
    nodes: Arc<SimpleNodeManager>,
    pub ns: u16,
    pub port: u16,
    /// The server's certificate store (its `own/cert.der` is what a client must trust).
    pub pki: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl UaPlc {
    /// Starts the server on `port` (0: any free one) with its certificates in `pki`.
    pub async fn start(pki: &Path, port: u16) -> UaPlc {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the OPC UA server");
        let port = listener.local_addr().unwrap().port();
        let tokens = vec![ANONYMOUS_USER_TOKEN_ID, USER];
        let mut builder = ServerBuilder::new()
            .application_name("test PLC")
            .application_uri("urn:test-plc-server")
            .product_uri("urn:test-plc-server")
            .create_sample_keypair(true)
            .pki_dir(pki)
            .host("127.0.0.1")
            .port(port)
            .discovery_urls(vec![format!("opc.tcp://127.0.0.1:{port}/")])
            .trust_client_certs(true)
            .add_user_token(USER, ServerUserToken::user_pass(USER, PASSWORD))
            .add_endpoint(
                "none",
                (
                    "/",
                    opcua::crypto::SecurityPolicy::None,
                    MessageSecurityMode::None,
                    &tokens as &[&str],
                ),
            )
            .add_endpoint(
                "basic256sha256_sign_encrypt",
                (
                    "/",
                    opcua::crypto::SecurityPolicy::Basic256Sha256,
                    MessageSecurityMode::SignAndEncrypt,
                    &tokens as &[&str],
                ),
            )
            .with_node_manager(simple_node_manager(
                NamespaceMetadata {
                    namespace_uri: NAMESPACE.to_owned(),
                    ..Default::default()
                },
                "plc",
            ));
        let limits = builder.limits_mut();
        // A PLC samples on change: every value set is a notification.
        limits.subscriptions.min_sampling_interval_ms = 0.0;
        limits.subscriptions.min_publishing_interval_ms = 10.0;
        limits.subscriptions.max_monitored_item_queue_size = 100_000;
        limits.subscriptions.max_queued_notifications = 100_000;
        limits.subscriptions.max_notifications_per_publish = 100_000;
        limits.subscriptions.max_lifetime_count = 1_000_000;
        let (server, handle) = builder.build().expect("build the OPC UA server");
        let nodes = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .expect("the simple node manager");
        let ns = handle.get_namespace_index(NAMESPACE).expect("namespace");
        {
            let mut space = nodes.address_space().write();
            let folder = NodeId::new(ns, "Line1");
            space.add_folder(&folder, "Line1", "Line1", &NodeId::objects_folder_id());
            space.add_variables(
                vec![
                    opcua::nodes::Variable::new(
                        &NodeId::new(ns, "GoodCount"),
                        "GoodCount",
                        "GoodCount",
                        0u32,
                    ),
                    opcua::nodes::Variable::new(
                        &NodeId::new(ns, "Running"),
                        "Running",
                        "Running",
                        false,
                    ),
                    opcua::nodes::Variable::new(&NodeId::new(ns, "Order"), "Order", "Order", ""),
                ],
                &folder,
            );
        }
        let task = tokio::spawn(async move {
            let _ = server.run_with(listener).await;
        });
        UaPlc {
            handle,
            nodes,
            ns,
            port,
            pki: pki.to_path_buf(),
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("opc.tcp://127.0.0.1:{}/", self.port)
    }

    /// The YAML `node_id` of a variable.
    pub fn node_id(&self, name: &str) -> String {
        format!("ns={};s={name}", self.ns)
    }

    /// Sets a variable now, as the PLC program would.
    pub fn set(&self, name: &str, value: impl Into<Variant>) {
        self.set_value(name, DataValue::new_now(value));
    }

    /// Sets a variable with a status (Bad, Uncertain).
    pub fn set_with_status(&self, name: &str, value: impl Into<Variant>, status: StatusCode) {
        self.set_value(name, DataValue::new_now_status(value, status));
    }

    fn set_value(&self, name: &str, mut value: DataValue) {
        // Strictly increasing source timestamps even for values set in one microsecond.
        let now = DateTime::now();
        value.source_timestamp = Some(now);
        value.server_timestamp = Some(now);
        self.nodes
            .set_value(
                self.handle.subscriptions(),
                &NodeId::new(self.ns, name),
                None,
                value,
            )
            .expect("set the value");
    }

    /// Adds `n` UInt32 counters `C000`, `C001`, … under `Line1` (the benchmark's 200
    /// monitored items).
    pub fn add_counters(&self, n: usize) -> Vec<String> {
        let folder = NodeId::new(self.ns, "Line1");
        let names: Vec<String> = (0..n).map(|i| format!("C{i:03}")).collect();
        let mut space = self.nodes.address_space().write();
        space.add_variables(
            names
                .iter()
                .map(|name| {
                    opcua::nodes::Variable::new(
                        &NodeId::new(self.ns, name.as_str()),
                        name.as_str(),
                        name.as_str(),
                        0u32,
                    )
                })
                .collect(),
            &folder,
        );
        names
    }

    /// The server's own certificate file.
    pub fn certificate(&self) -> PathBuf {
        self.pki.join("own/cert.der")
    }

    /// Stops the server (all sessions end); returns when its task is gone.
    pub async fn stop(self) {
        self.handle.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.task).await;
    }
}
