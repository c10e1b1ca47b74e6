//! A plant with one source of each kind around a real gateway: MQTT bursts on the burst
//! orders, a counting Modbus PLC (`PLC_ORDER`) and a serial presence sensor on a
//! pseudo-terminal (`SERIAL_ORDER`, one piece per frame).

use std::path::Path;

use super::mqtt::{write_burst_config, Mosquitto};
use super::plc::CounterPlc;
use super::FakeD365;

pub const PLC_ORDER: &str = "PLC001";
pub const SERIAL_ORDER: &str = "SER001";
/// The pty end the gateway opens, in the config directory; the test writes the other.
pub const GATEWAY_END: &str = "gateway-end";
pub const DEVICE_END: &str = "device-end";

/// Writes the configuration for the three sources; `extra` is appended to gateway.yaml
/// (after the `sources` list: start it with a section name).
pub fn write_plant_config(
    dir: &Path,
    fake: &FakeD365,
    broker: &Mosquitto,
    plc: std::net::SocketAddr,
    extra: &str,
) {
    write_burst_config(
        dir,
        fake,
        &broker.url(),
        &format!(
            "{}  - type: serial\n    id: sensor\n    device: {}\n    baud: 9600\n    point: presence\n    framing: fixed\n    length: 1\n    mode: presence\n{extra}",
            CounterPlc::gateway_yaml(plc),
            dir.join(GATEWAY_END).display()
        ),
    );
    std::fs::write(
        dir.join("rules.d/plc.yaml"),
        CounterPlc::rules_yaml(PLC_ORDER),
    )
    .unwrap();
    std::fs::write(
        dir.join("rules.d/sensor.yaml"),
        format!("rules:\n  - name: sensor\n    line: sensor-line\n    when: {{ source: sensor, point: presence, edge: rising }}\n    count: impulse\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: {{ ProductionOrderNumber: {SERIAL_ORDER}, ItemNumber: A0001, ReportedGoodQuantity: \"{{quantity}}\" }}\n"),
    )
    .unwrap();
}

/// One presence frame from the sensor; false when the port is not there.
pub async fn send_frame(device: &Path) -> bool {
    use tokio::io::AsyncWriteExt;
    match tokio::fs::OpenOptions::new().write(true).open(device).await {
        Ok(mut end) => end.write_all(b"\x01").await.is_ok() && end.flush().await.is_ok(),
        Err(_) => false,
    }
}
