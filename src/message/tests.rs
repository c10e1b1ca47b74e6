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
        shape("ReportFinishedLines[0].ReportedGoodQuantity: expected a number (Real), got true")
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
        Message::from_json(TYPE_REPORT_FINISHED, json!({"ProductionOrderNumber":"P1"})).unwrap();
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
    let v: serde_json::Value = serde_json::from_str(&m.to_content(&names_2022).unwrap()).unwrap();
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
