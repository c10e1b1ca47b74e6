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

pub use types::{ContentSchema, CustomType, MessageTypes, UnknownType};

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The queue name D365 uses for the MES integration.
pub const DEFAULT_QUEUE: &str = "JmgMES3P";

pub const TYPE_START: &str = "ProdProductionOrderStart";
pub const TYPE_REPORT_FINISHED: &str = "ProdProductionOrderReportFinished";
pub const TYPE_PICKING_LIST: &str = "ProdProductionOrderPickingList";
pub const TYPE_ROUTE_CARD: &str = "ProdProductionOrderRouteCard";
pub const TYPE_END: &str = "ProdProductionOrderEnd";

/// The five documented message types.
pub const KNOWN_TYPES: [&str; 5] = [
    TYPE_START,
    TYPE_REPORT_FINISHED,
    TYPE_PICKING_LIST,
    TYPE_ROUTE_CARD,
    TYPE_END,
];

/// D365 `Real`: sent as an integer when it has no fractional part (as in the official
/// examples, `"ReportedGoodQuantity":10`), otherwise as a decimal number.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Real(pub f64);

impl Serialize for Real {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 && self.0.abs() < EXACT_INTEGER_LIMIT {
            // Exact: |value| < 2^53 with no fraction converts to i64 without loss.
            s.serialize_i64(self.0 as i64)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

/// A value as a user wrote it, for error texts: `true`, `"abc"`, `1.5`, `a list`.
struct Shown<'a>(serde::de::Unexpected<'a>);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use serde::de::Unexpected as U;
        match self.0 {
            U::Bool(b) => write!(f, "{b}"),
            U::Unsigned(n) => write!(f, "{n}"),
            U::Signed(n) => write!(f, "{n}"),
            U::Float(n) => write!(f, "{n}"),
            U::Str(s) => write!(f, "{s:?}"),
            U::Unit | U::Option => f.write_str("null"),
            U::Seq => f.write_str("a list"),
            U::Map => f.write_str("an object"),
            ref other => write!(f, "{other}"),
        }
    }
}

/// "expected WANTED, got VALUE": what D365's field table wants, in its words.
fn wanted<E: serde::de::Error>(wanted: &str, got: serde::de::Unexpected<'_>) -> E {
    E::custom(format!("expected {wanted}, got {}", Shown(got)))
}

/// A visitor for the D365 scalar types: numbers and text are offered to `parse`, every
/// other value is refused in the field table's words.
struct ScalarVisitor<T> {
    wanted: &'static str,
    from_f64: fn(f64) -> Option<T>,
    from_str: fn(&str) -> Option<T>,
}

impl<'de, T> serde::de::Visitor<'de> for ScalarVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wanted)
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<T, E> {
        Err(wanted(self.wanted, serde::de::Unexpected::Bool(v)))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        (self.from_f64)(v as f64)
            .ok_or_else(|| wanted(self.wanted, serde::de::Unexpected::Signed(v)))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        (self.from_f64)(v as f64)
            .ok_or_else(|| wanted(self.wanted, serde::de::Unexpected::Unsigned(v)))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
        (self.from_f64)(v).ok_or_else(|| wanted(self.wanted, serde::de::Unexpected::Float(v)))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.from_str)(v.trim()).ok_or_else(|| wanted(self.wanted, serde::de::Unexpected::Str(v)))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<T, E> {
        Err(wanted(self.wanted, serde::de::Unexpected::Unit))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(wanted(self.wanted, serde::de::Unexpected::Seq))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(wanted(self.wanted, serde::de::Unexpected::Map))
    }
}

/// The largest integer a JSON number (f64) holds exactly: 2^53.
const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;

/// Values rendered from templates (a regex capture, a context field) arrive as text, so
/// text holding a number is a number.
impl<'de> Deserialize<'de> for Real {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            wanted: "a number (Real)",
            from_f64: |n| n.is_finite().then_some(Real(n)),
            from_str: |t| t.parse::<f64>().ok().filter(|n| n.is_finite()).map(Real),
        })
    }
}

/// D365 `Integer`; accepts text holding an integer, like [`Real`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Int(pub i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            wanted: "a whole number (Integer)",
            from_f64: |n| {
                (n.fract() == 0.0 && n.abs() < EXACT_INTEGER_LIMIT).then_some(Int(n as i64))
            },
            from_str: |t| t.parse().ok().map(Int),
        })
    }
}

impl From<f64> for Real {
    fn from(v: f64) -> Self {
        Real(v)
    }
}

/// D365 `DateTime`: ISO 8601 in UTC, e.g. `2024-01-15T08:30:00Z`. Any offset is accepted
/// and converted to UTC (`2024-01-15T10:30:00+02:00` is sent as `2024-01-15T08:30:00Z`);
/// milliseconds that were given are sent (`08:30:00.123Z`), finer digits are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DateTimeUtc(pub jiff::Timestamp);

const DATE_TIME_WANTED: &str =
    "a date-time with a zone like 2024-01-15T08:30:00Z or 2024-01-15T10:30:00+02:00";

impl Serialize for DateTimeUtc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let millis = self.0.subsec_millisecond();
        if millis == 0 {
            s.collect_str(&self.0.strftime("%Y-%m-%dT%H:%M:%SZ"))
        } else {
            s.collect_str(&format_args!(
                "{}.{millis:03}Z",
                self.0.strftime("%Y-%m-%dT%H:%M:%S")
            ))
        }
    }
}

impl<'de> Deserialize<'de> for DateTimeUtc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            wanted: DATE_TIME_WANTED,
            from_f64: |_| None,
            from_str: |t| t.parse::<jiff::Timestamp>().ok().map(DateTimeUtc),
        })
    }
}

/// D365 `Date`: `YYYY-MM-DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date(pub jiff::civil::Date);

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            wanted: "a date like 2024-01-15",
            from_f64: |_| None,
            // Only the plain form: a date-time here is a mistake, not a date.
            from_str: |t| {
                (t.len() == 10)
                    .then(|| t.parse::<jiff::civil::Date>().ok())
                    .flatten()
                    .map(Date)
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoYes {
    No,
    Yes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BomConsumptionRule {
    FlushingPrincip,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteConsumptionRule {
    RouteDependent,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskType {
    QueueBefore,
    Setup,
    Process,
    Overlap,
    Transport,
    QueueAfter,
    Burden,
}

/// An extensible D365 enum (customers add values): any symbol is accepted; the
/// documented symbols are listed on the fields that use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Symbol(pub String);

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
mod tests {
    use super::*;
    use serde_json::json;

    fn content(m: &Message) -> serde_json::Value {
        serde_json::from_str(&m.to_content(&FieldNames::default()).unwrap()).unwrap()
    }

    #[test]
    fn official_report_finished_example_round_trips() {
        let official = json!({"ProductionOrderNumber":"P000123","ReportFinishedLines":[{"ItemNumber":"A0001","ReportedGoodQuantity":10,"ReportAsFinishedDate":"2021-01-01"}]});
        let m = Message::from_json(TYPE_REPORT_FINISHED, official.clone()).unwrap();
        assert_eq!(content(&m), official);
    }

    #[test]
    fn enums_are_symbols_and_unset_fields_are_omitted() {
        let m = Message::Start(StartMessage {
            production_order_number: "P1".into(),
            automatic_bom_consumption_rule: Some(BomConsumptionRule::FlushingPrincip),
            started_quantity: Some(Real(2.5)),
            ..Default::default()
        });
        assert_eq!(
            content(&m),
            json!({"ProductionOrderNumber":"P1","StartedQuantity":2.5,"AutomaticBOMConsumptionRule":"FlushingPrincip"})
        );
    }

    #[test]
    fn date_times_are_utc_and_keep_the_milliseconds_given() {
        let sent = |written: &str| {
            let m = Message::from_json(
                TYPE_END,
                json!({"ProductionOrderNumber":"P1","ExecutedDateTime":written}),
            )
            .unwrap();
            content(&m)["ExecutedDateTime"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(sent("2024-01-15T08:30:00.123Z"), "2024-01-15T08:30:00.123Z");
        assert_eq!(sent("2024-01-15T08:30:00Z"), "2024-01-15T08:30:00Z");
        assert_eq!(
            sent("2024-01-15T10:30:00.5+02:00"),
            "2024-01-15T08:30:00.500Z"
        );
        assert_eq!(
            sent("2024-01-15T08:30:00.123456Z"),
            "2024-01-15T08:30:00.123Z"
        );
    }

    #[test]
    fn content_lists_fields_in_the_order_of_the_field_tables() {
        let m = Message::from_json(
            TYPE_REPORT_FINISHED,
            json!({"ReportFinishedLines":[{"ReportAsFinishedDate":"2024-01-15","JournalNameId":"Prod","ReportedGoodQuantity":10,"ItemNumber":"A0001","LineNumber":1}],"PrintLabel":"No","ProductionOrderNumber":"P000123"}),
        )
        .unwrap();
        assert_eq!(
            m.to_content(&FieldNames {
                journal_name: "ProductionJournalNameId".into(),
                ..FieldNames::default()
            })
            .unwrap(),
            r#"{"ProductionOrderNumber":"P000123","PrintLabel":"No","ReportFinishedLines":[{"LineNumber":1,"ItemNumber":"A0001","ReportedGoodQuantity":10,"ReportAsFinishedDate":"2024-01-15","ProductionJournalNameId":"Prod"}]}"#
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_says_what_the_field_table_wants() {
        let error = |message_type: &str, content: serde_json::Value| {
            Message::from_json(message_type, content)
                .unwrap_err()
                .to_string()
        };
        let shape = |detail: &str| {
            format!("{TYPE_REPORT_FINISHED}: content does not fit the message type: {detail}")
        };
        let line = |field: &str, value: serde_json::Value| {
            error(
                TYPE_REPORT_FINISHED,
                json!({"ProductionOrderNumber":"P1","ReportFinishedLines":[{ field: value }]}),
            )
        };
        assert_eq!(
            line("ReportedGoodQuantity", json!(true)),
            shape(
                "ReportFinishedLines[0].ReportedGoodQuantity: expected a number (Real), got true"
            )
        );
        assert_eq!(
            line("ReportedGoodQuantity", json!("ten")),
            shape("ReportFinishedLines[0].ReportedGoodQuantity: expected a number (Real), got \"ten\"")
        );
        assert_eq!(
            line("FromOperationNumber", json!(1.5)),
            shape("ReportFinishedLines[0].FromOperationNumber: expected a whole number (Integer), got 1.5")
        );
        assert_eq!(
            line("ReportAsFinishedDate", json!("15.01.2024")),
            shape("ReportFinishedLines[0].ReportAsFinishedDate: expected a date like 2024-01-15, got \"15.01.2024\"")
        );
        assert_eq!(
            line("ExecutedDateTime", json!("2024-01-15 08:30")),
            shape("ReportFinishedLines[0].ExecutedDateTime: expected a date-time with a zone like 2024-01-15T08:30:00Z or 2024-01-15T10:30:00+02:00, got \"2024-01-15 08:30\"")
        );
        assert_eq!(
            line("ExecutedDateTime", json!("2024-01-15T08:30:00")),
            shape("ReportFinishedLines[0].ExecutedDateTime: expected a date-time with a zone like 2024-01-15T08:30:00Z or 2024-01-15T10:30:00+02:00, got \"2024-01-15T08:30:00\""),
            "a local time without a zone is ambiguous"
        );
        let text_number = Message::from_json(
            TYPE_REPORT_FINISHED,
            json!({"ProductionOrderNumber":"P1","ReportFinishedLines":[{"ReportedGoodQuantity":" 12.5 ","FromOperationNumber":"10"}]}),
        )
        .unwrap();
        assert_eq!(
            content(&text_number)["ReportFinishedLines"][0],
            json!({"ReportedGoodQuantity":12.5,"FromOperationNumber":10}),
            "text holding a number (a template's result) is a number"
        );
    }

    #[test]
    fn mandatory_fields_are_checked() {
        let no_order = Message::End(EndMessage::default());
        assert!(
            matches!(no_order.validate(), Err(MessageError::Missing { field, .. }) if field == "ProductionOrderNumber")
        );

        let no_lines =
            Message::from_json(TYPE_REPORT_FINISHED, json!({"ProductionOrderNumber":"P1"}))
                .unwrap();
        assert!(no_lines.validate().is_err());

        let no_item = Message::from_json(
            TYPE_PICKING_LIST,
            json!({"ProductionOrderNumber":"P1","PickingListLines":[{"ConsumptionBOMQuantity":1}]}),
        )
        .unwrap();
        assert_eq!(
            no_item.validate().unwrap_err().to_string(),
            "ProdProductionOrderPickingList: PickingListLines[0].ItemNumber is mandatory"
        );

        let no_operation = Message::from_json(
            TYPE_ROUTE_CARD,
            json!({"ProductionOrderNumber":"P1","RouteCardLines":[{"Hours":1}]}),
        )
        .unwrap();
        assert_eq!(
            no_operation.validate().unwrap_err().to_string(),
            "ProdProductionOrderRouteCard: RouteCardLines[0].OperationNumber is mandatory"
        );
    }

    #[test]
    fn unknown_fields_and_bad_enum_symbols_are_rejected() {
        let typo = Message::from_json(
            TYPE_START,
            json!({"ProductionOrderNumber":"P1","StartedQty":3}),
        );
        assert!(matches!(typo, Err(MessageError::Shape { .. })));
        let bad = Message::from_json(
            TYPE_END,
            json!({"ProductionOrderNumber":"P1","AutoUpdate":"yes"}),
        );
        let err = bad.unwrap_err().to_string();
        assert!(err.contains("AutoUpdate"), "{err}");
    }

    #[test]
    fn operation_priority_is_checked() {
        for (priority, ok) in [
            ("Primary", true),
            ("Secondary1", true),
            ("Secondary20", true),
            ("Secondary21", false),
            ("Secondary0", false),
            ("Tertiary", false),
        ] {
            let m = Message::from_json(
                TYPE_ROUTE_CARD,
                json!({"ProductionOrderNumber":"P1","RouteCardLines":[{"OperationNumber":10,"OperationPriority":priority}]}),
            )
            .unwrap();
            assert_eq!(m.validate().is_ok(), ok, "{priority}");
        }
    }

    #[test]
    fn journal_names_follow_the_configured_version() {
        let m = Message::from_json(
            TYPE_REPORT_FINISHED,
            json!({"ProductionOrderNumber":"P1","ReportFinishedLines":[{"JournalNameId":"Prod","RouteCardJournalNameId":"Route"}]}),
        )
        .unwrap();
        let names_2022 = FieldNames {
            journal_name: "ProductionJournalNameId".into(),
            picking_list_journal_name: "PickingListProductionJournalNameId".into(),
            route_card_journal_name: "RouteCardProductionJournalNameId".into(),
        };
        let v: serde_json::Value =
            serde_json::from_str(&m.to_content(&names_2022).unwrap()).unwrap();
        assert_eq!(
            v["ReportFinishedLines"][0],
            json!({"ProductionJournalNameId":"Prod","RouteCardProductionJournalNameId":"Route"})
        );
    }

    #[test]
    fn wire_content_with_2022_journal_names_reads_back() {
        let names_2022 = FieldNames {
            journal_name: "ProductionJournalNameId".into(),
            picking_list_journal_name: "PickingListProductionJournalNameId".into(),
            route_card_journal_name: "RouteCardProductionJournalNameId".into(),
        };
        let wire = json!({"ProductionOrderNumber":"P1","ReportFinishedLines":[{"ProductionJournalNameId":"Prod","ReportedGoodQuantity":3}]});
        let m = Message::from_wire_json(TYPE_REPORT_FINISHED, wire.clone(), &names_2022).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&m.to_content(&names_2022).unwrap()).unwrap();
        assert_eq!(back, wire, "read back and written again unchanged");
        assert!(
            Message::from_json(TYPE_REPORT_FINISHED, wire).is_err(),
            "the model itself knows only the 2024 names"
        );
    }

    #[test]
    fn custom_types_pass_content_through() {
        let m = Message::from_json(
            "TSIInventCountJournal",
            json!({"ProductionOrderNumber":"P9","Anything":[1,2]}),
        )
        .unwrap();
        assert_eq!(m.production_order(), "P9");
        assert_eq!(
            content(&m),
            json!({"ProductionOrderNumber":"P9","Anything":[1,2]})
        );
    }
}
