//! The production-order messages D365 accepts on queue `JmgMES3P`, and their envelope.
//!
//! Every documented field of every type (docs/d365-api.md) is here, PascalCase on the
//! wire, omitted when unset. Enums are sent as their symbol strings (`Yes`,
//! `FlushingPrincip`). Fields that only a third-party source lists are marked
//! *unverified* in their doc comment. D365's extensible enums (`ErrorCause`,
//! `ProductionType`) accept any symbol so customer extensions can be sent.
//!
//! The journal-name fields were renamed between D365 versions (2022: `ProductionJournalNameId`,
//! 2024: `JournalNameId`); [`FieldNames`] decides which names go on the wire.
//!
//! A [`Message`] is checked with [`Message::validate`] before it may enter the outbox, then
//! turned into its final wire content with [`Message::to_content`]: what the outbox keeps is
//! exactly the string that will be posted.

mod types;
mod values;

pub use types::{ContentSchema, CustomType, MessageTypes, UnknownType};
pub use values::{
    BomConsumptionRule, Date, DateTimeUtc, Int, NoYes, Real, RouteConsumptionRule, Symbol, TaskType,
};

use std::fmt;

use serde::{Deserialize, Serialize};

/// The queue name D365 uses for the MES integration.
pub const DEFAULT_QUEUE: &str = "JmgMES3P";

pub const TYPE_START: &str = "ProdProductionOrderStart";
pub const TYPE_REPORT_FINISHED: &str = "ProdProductionOrderReportFinished";
pub const TYPE_PICKING_LIST: &str = "ProdProductionOrderPickingList";
pub const TYPE_ROUTE_CARD: &str = "ProdProductionOrderRouteCard";
pub const TYPE_END: &str = "ProdProductionOrderEnd";

/// The field holding the lines of a message type that has them.
pub fn lines_field(message_type: &str) -> Option<&'static str> {
    match message_type {
        TYPE_REPORT_FINISHED => Some("ReportFinishedLines"),
        TYPE_PICKING_LIST => Some("PickingListLines"),
        TYPE_ROUTE_CARD => Some("RouteCardLines"),
        _ => None,
    }
}

/// The five documented message types.
pub const KNOWN_TYPES: [&str; 5] = [
    TYPE_START,
    TYPE_REPORT_FINISHED,
    TYPE_PICKING_LIST,
    TYPE_ROUTE_CARD,
    TYPE_END,
];

/// Start a production order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct StartMessage {
    pub production_order_number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_date: Option<Date>,
    #[serde(
        default,
        rename = "AutomaticBOMConsumptionRule",
        skip_serializing_if = "Option::is_none"
    )]
    pub automatic_bom_consumption_rule: Option<BomConsumptionRule>,
    /// Unverified: listed by a third-party source only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automatic_route_consumption_rule: Option<RouteConsumptionRule>,
}

/// Report produced (good) or scrapped (error) quantity.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ReportFinishedMessage {
    pub production_order_number: String,
    /// Unverified header field (third-party source only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub print_label: Option<NoYes>,
    #[serde(default)]
    pub report_finished_lines: Vec<ReportFinishedLine>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ReportFinishedLine {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_number: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_number: Option<String>,
    /// `MainItem`, `Formula`, `BOM`, `Co_Product`, `By_Product`, `None` (extensible).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_type: Option<Symbol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_good_quantity: Option<Real>,
    /// Scrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_error_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_good_catch_weight_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_error_catch_weight_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_error: Option<NoYes>,
    /// `None`, `Material`, `Machine`, `OperatingStaff` (extensible).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_cause: Option<Symbol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executed_date_time: Option<DateTimeUtc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_as_finished_date: Option<Date>,
    #[serde(
        default,
        rename = "AutomaticBOMConsumptionRule",
        skip_serializing_if = "Option::is_none"
    )]
    pub automatic_bom_consumption_rule: Option<BomConsumptionRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automatic_route_consumption_rule: Option<RouteConsumptionRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respect_flushing_principle_during_overproduction: Option<NoYes>,
    /// Wire name set by [`FieldNames::journal_name`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_name_id: Option<String>,
    /// Wire name set by [`FieldNames::picking_list_journal_name`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picking_list_journal_name_id: Option<String>,
    /// Wire name set by [`FieldNames::route_card_journal_name`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_card_journal_name_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_operation_number: Option<Int>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_operation_number: Option<Int>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_lot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_job: Option<NoYes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_picking_list: Option<NoYes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_route_card: Option<NoYes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_now: Option<NoYes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_update: Option<NoYes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_color_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_configuration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_size_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_style_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_batch_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license_plate_number: Option<String>,
    /// Unverified (third-party source only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_license_plate: Option<NoYes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_status_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_warehouse_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_site_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_warehouse_location_id: Option<String>,
    /// `InventoryDimension1` … `12`: only with custom extension dimensions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension5: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension7: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension8: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension9: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension10: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension11: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension12: Option<String>,
}

/// Report material consumption.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PickingListMessage {
    pub production_order_number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_name_id: Option<String>,
    #[serde(default)]
    pub picking_list_lines: Vec<PickingListLine>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PickingListLine {
    /// Mandatory: checked by [`Message::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_number: Option<String>,
    #[serde(
        default,
        rename = "ConsumptionBOMQuantity",
        skip_serializing_if = "Option::is_none"
    )]
    pub consumption_bom_quantity: Option<Real>,
    #[serde(
        default,
        rename = "ProposalBOMQuantity",
        skip_serializing_if = "Option::is_none"
    )]
    pub proposal_bom_quantity: Option<Real>,
    #[serde(
        default,
        rename = "ScrapBOMQuantity",
        skip_serializing_if = "Option::is_none"
    )]
    pub scrap_bom_quantity: Option<Real>,
    #[serde(
        default,
        rename = "BOMUnitSymbol",
        skip_serializing_if = "Option::is_none"
    )]
    pub bom_unit_symbol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumption_inventory_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal_inventory_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumption_catch_weight_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal_catch_weight_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumption_date: Option<Date>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_number: Option<Int>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_number: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_consumption_ended: Option<NoYes>,
    /// `None`, `Material`, `Machine`, `OperatingStaff` (extensible).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_cause: Option<Symbol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_lot_id: Option<String>,
    /// Unverified: this and the dimension fields below are listed by a third-party source only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_batch_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license_plate_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_status_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_warehouse_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_site_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_warehouse_location_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_color_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_configuration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_size_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_style_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_version_id: Option<String>,
    /// `InventoryDimension1` … `12`: only with custom extension dimensions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension5: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension7: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension8: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension9: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension10: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension11: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_dimension12: Option<String>,
}

/// Report time and quantity for an operation (route card).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RouteCardMessage {
    pub production_order_number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_name_id: Option<String>,
    #[serde(default)]
    pub route_card_lines: Vec<RouteCardLine>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RouteCardLine {
    /// Mandatory: checked by [`Message::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_number: Option<Int>,
    /// `Primary` or `Secondary1` … `Secondary20`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_priority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operations_resource_id: Option<String>,
    /// Personnel number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours_route_cost_category_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity_route_cost_category_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly_rate: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub good_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_weight_good_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_weight_error_quantity: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity_price: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing_percentage: Option<Real>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumption_date: Option<Date>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<TaskType>,
    /// `None`, `Material`, `Machine`, `OperatingStaff` (extensible).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_cause: Option<Symbol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_completed: Option<NoYes>,
    #[serde(
        default,
        rename = "BOMConsumption",
        skip_serializing_if = "Option::is_none"
    )]
    pub bom_consumption: Option<NoYes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_as_finished: Option<NoYes>,
}

/// End a production order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct EndMessage {
    pub production_order_number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executed_date_time: Option<DateTimeUtc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_date: Option<Date>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_time_and_attendance_cost: Option<NoYes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_report_as_finished: Option<NoYes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_update: Option<NoYes>,
}

/// A message ready to be validated and queued.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Start(StartMessage),
    ReportFinished(ReportFinishedMessage),
    PickingList(PickingListMessage),
    RouteCard(RouteCardMessage),
    End(EndMessage),
    /// A customer-defined message type (the message processor is extensible). Its content
    /// is sent as given; it must name its production order so it joins that order's lane.
    Custom {
        message_type: String,
        production_order_number: String,
        content: serde_json::Map<String, serde_json::Value>,
    },
}

/// Why a message may not enter the outbox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("{message_type}: {field} is mandatory")]
    Missing { message_type: String, field: String },
    #[error("{message_type}: {field}: {problem}")]
    Invalid {
        message_type: String,
        field: String,
        problem: String,
    },
    #[error("{message_type}: content does not fit the message type: {detail}")]
    Shape {
        message_type: String,
        detail: String,
    },
}

/// Wire names of the journal-name fields, which changed between D365 versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FieldNames {
    /// `ReportFinishedLines[].JournalNameId` (2022 docs: `ProductionJournalNameId`).
    pub journal_name: String,
    /// `ReportFinishedLines[].PickingListJournalNameId` (2022: `PickingListProductionJournalNameId`).
    pub picking_list_journal_name: String,
    /// `ReportFinishedLines[].RouteCardJournalNameId` (2022: `RouteCardProductionJournalNameId`).
    pub route_card_journal_name: String,
}

impl FieldNames {
    /// (name in the message model, name on the wire) for each journal-name field.
    pub fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            ("JournalNameId", self.journal_name.as_str()),
            (
                "PickingListJournalNameId",
                self.picking_list_journal_name.as_str(),
            ),
            (
                "RouteCardJournalNameId",
                self.route_card_journal_name.as_str(),
            ),
        ]
    }
}

impl Default for FieldNames {
    fn default() -> Self {
        FieldNames {
            journal_name: "JournalNameId".into(),
            picking_list_journal_name: "PickingListJournalNameId".into(),
            route_card_journal_name: "RouteCardJournalNameId".into(),
        }
    }
}

impl Message {
    pub fn message_type(&self) -> &str {
        match self {
            Message::Start(_) => TYPE_START,
            Message::ReportFinished(_) => TYPE_REPORT_FINISHED,
            Message::PickingList(_) => TYPE_PICKING_LIST,
            Message::RouteCard(_) => TYPE_ROUTE_CARD,
            Message::End(_) => TYPE_END,
            Message::Custom { message_type, .. } => message_type,
        }
    }

    pub fn production_order(&self) -> &str {
        match self {
            Message::Start(m) => &m.production_order_number,
            Message::ReportFinished(m) => &m.production_order_number,
            Message::PickingList(m) => &m.production_order_number,
            Message::RouteCard(m) => &m.production_order_number,
            Message::End(m) => &m.production_order_number,
            Message::Custom {
                production_order_number,
                ..
            } => production_order_number,
        }
    }

    /// Builds a message from a type name and its content as JSON (as typed by an operator
    /// or read back from the outbox). Unknown fields of the five known types are errors,
    /// so a typo cannot silently drop a value.
    pub fn from_json(
        message_type: &str,
        content: serde_json::Value,
    ) -> Result<Message, MessageError> {
        fn typed<T: serde::de::DeserializeOwned>(
            message_type: &str,
            content: serde_json::Value,
        ) -> Result<T, MessageError> {
            serde_path_to_error::deserialize(content).map_err(|e| MessageError::Shape {
                message_type: message_type.to_string(),
                detail: if e.path().to_string() == "." {
                    e.inner().to_string()
                } else {
                    format!("{}: {}", e.path(), e.inner())
                },
            })
        }
        Ok(match message_type {
            TYPE_START => Message::Start(typed(message_type, content)?),
            TYPE_REPORT_FINISHED => Message::ReportFinished(typed(message_type, content)?),
            TYPE_PICKING_LIST => Message::PickingList(typed(message_type, content)?),
            TYPE_ROUTE_CARD => Message::RouteCard(typed(message_type, content)?),
            TYPE_END => Message::End(typed(message_type, content)?),
            other => {
                let serde_json::Value::Object(content) = content else {
                    return Err(MessageError::Shape {
                        message_type: other.to_string(),
                        detail: "content must be a JSON object".into(),
                    });
                };
                let production_order_number = content
                    .get("ProductionOrderNumber")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string();
                Message::Custom {
                    message_type: other.to_string(),
                    production_order_number,
                    content,
                }
            }
        })
    }

    /// Like [`Message::from_json`], for content as it goes on the wire (as stored in the
    /// outbox and edited by operators): the journal-name fields carry the configured names.
    pub fn from_wire_json(
        message_type: &str,
        mut content: serde_json::Value,
        names: &FieldNames,
    ) -> Result<Message, MessageError> {
        if message_type == TYPE_REPORT_FINISHED {
            for line in content
                .get_mut("ReportFinishedLines")
                .and_then(|v| v.as_array_mut())
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_object_mut())
            {
                rename_keys(line, |key| {
                    names
                        .pairs()
                        .into_iter()
                        .find(|(model, wire)| model != wire && *wire == key)
                        .map(|(model, _)| model.to_string())
                });
            }
        }
        Message::from_json(message_type, content)
    }

    /// Checks the mandatory fields and the value formats D365 documents.
    pub fn validate(&self) -> Result<(), MessageError> {
        let message_type = self.message_type();
        let missing = |field: &str| MessageError::Missing {
            message_type: message_type.to_string(),
            field: field.to_string(),
        };
        if message_type.trim().is_empty() {
            return Err(missing("_messageType"));
        }
        if self.production_order().trim().is_empty() {
            return Err(missing("ProductionOrderNumber"));
        }
        match self {
            Message::ReportFinished(m) if m.report_finished_lines.is_empty() => {
                Err(missing("ReportFinishedLines (at least one line)"))
            }
            Message::PickingList(m) => {
                if m.picking_list_lines.is_empty() {
                    return Err(missing("PickingListLines (at least one line)"));
                }
                for (i, line) in m.picking_list_lines.iter().enumerate() {
                    if line
                        .item_number
                        .as_deref()
                        .is_none_or(|s| s.trim().is_empty())
                    {
                        return Err(missing(&format!("PickingListLines[{i}].ItemNumber")));
                    }
                }
                Ok(())
            }
            Message::RouteCard(m) => {
                if m.route_card_lines.is_empty() {
                    return Err(missing("RouteCardLines (at least one line)"));
                }
                for (i, line) in m.route_card_lines.iter().enumerate() {
                    if line.operation_number.is_none() {
                        return Err(missing(&format!("RouteCardLines[{i}].OperationNumber")));
                    }
                    if let Some(priority) = &line.operation_priority {
                        if !is_operation_priority(priority) {
                            return Err(MessageError::Invalid {
                                message_type: message_type.to_string(),
                                field: format!("RouteCardLines[{i}].OperationPriority"),
                                problem: format!(
                                    "{priority:?} is not Primary or Secondary1 … Secondary20"
                                ),
                            });
                        }
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The `_messageContent` string: the message as JSON, fields in the order of D365's
    /// field tables (header first, then lines), with the journal-name fields renamed as
    /// configured. Validates first.
    pub fn to_content(&self, names: &FieldNames) -> Result<String, MessageError> {
        self.validate()?;
        let mut value = match self {
            Message::Start(m) => serde_json::to_value(m),
            Message::ReportFinished(m) => serde_json::to_value(m),
            Message::PickingList(m) => serde_json::to_value(m),
            Message::RouteCard(m) => serde_json::to_value(m),
            Message::End(m) => serde_json::to_value(m),
            Message::Custom { content, .. } => Ok(serde_json::Value::Object(content.clone())),
        }
        .map_err(|e| MessageError::Shape {
            message_type: self.message_type().to_string(),
            detail: e.to_string(),
        })?;
        if let Message::ReportFinished(_) = self {
            if let Some(lines) = value
                .get_mut("ReportFinishedLines")
                .and_then(|v| v.as_array_mut())
            {
                for line in lines.iter_mut().filter_map(|l| l.as_object_mut()) {
                    rename_keys(line, |key| {
                        names
                            .pairs()
                            .into_iter()
                            .find(|(model, _)| *model == key)
                            .map(|(_, wire)| wire.to_string())
                    });
                }
            }
        }
        Ok(value.to_string())
    }
}

/// Renames the keys `rename` names, keeping every field in its place: the content lists
/// fields in the order of D365's field tables.
fn rename_keys(
    object: &mut serde_json::Map<String, serde_json::Value>,
    rename: impl Fn(&str) -> Option<String>,
) {
    *object = std::mem::take(object)
        .into_iter()
        .map(|(key, value)| (rename(&key).unwrap_or(key), value))
        .collect();
}

fn is_operation_priority(s: &str) -> bool {
    s == "Primary"
        || s.strip_prefix("Secondary")
            .and_then(|n| n.parse::<u8>().ok())
            .is_some_and(|n| (1..=20).contains(&n) && !s.ends_with("Secondary0"))
}

/// The body of one `SendMessage` POST. `_messageContent` is the message JSON as a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "_companyId")]
    pub company_id: String,
    #[serde(rename = "_messageQueue")]
    pub message_queue: String,
    #[serde(rename = "_messageType")]
    pub message_type: String,
    #[serde(rename = "_messageContent")]
    pub message_content: String,
}

impl fmt::Display for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // serde_json::to_string on a struct of strings cannot fail.
        f.write_str(&serde_json::to_string(self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests;
