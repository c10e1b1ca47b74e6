//! The web console in a real headless Chromium against the real binary: log in with the
//! API token, open a failed message, edit its content, retry it, see it delivered; set a
//! line's order, also from the orders D365 released for it; see D365's verdict on a
//! message; see the sources. Screenshots of the three pages go to
//! `target/console/`. Cross-site request forgery and a wrong token are refused.

use mes_gateway_testkit as support;

use std::path::PathBuf;

use serde_json::{json, Value};
use support::browser::Browser;
use support::Operated;

const TOKEN: &str = "console-token-0123456789abcdef";
const ORDER: &str = "P000321";

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console")
}

/// Posts one D365 business event to the webhook; it is stored when this returns.
async fn post_event(http: &reqwest::Client, base: &str, event: &Value) {
    let posted = http
        .post(format!("{base}/events/d365/d365"))
        .header("X-Webhook-Secret", support::WEBHOOK_SECRET)
        .json(event)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
}

async fn api_lines(http: &reqwest::Client, base: &str) -> Value {
    http.get(format!("{base}/api/v1/lines"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_fixes_a_failed_message_in_the_console_and_sees_it_delivered() {
    let Operated {
        fake,
        dir: _dir,
        api_port,
        out: _out,
        gw,
    } = Operated::start_with_rules(
        ORDER,
        TOKEN,
        "sources:\n  - type: simulator\n    id: light-barrier\n    interval: 1h\n  - type: d365_events\n    id: d365\n    webhook_secret_file: webhook-secret\n",
        Some("rules:\n  - name: released\n    line: line2\n    when: { source: d365, point: released }\n    release: { order: \"{payload.ProductionOrderNumber}\", item: \"{payload.ItemNumber}\" }\n"),
    )
    .await;
    let base = format!("http://127.0.0.1:{api_port}");
    let http = reqwest::Client::new();
    let sent: Value = http
        .post(format!("{base}/api/v1/messages?type=ProdProductionOrderReportFinished"))
        .bearer_auth(TOKEN)
        .json(&json!({ "ProductionOrderNumber": ORDER, "ReportFinishedLines": [{ "ItemNumber": "A0001", "ReportedGoodQuantity": 1 }] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sent["id"].as_u64().expect("queued");

    let browser = Browser::start().await;
    // Not logged in: the console sends the browser to the login page.
    browser.goto(&format!("{base}/console/messages")).await;
    assert!(
        browser.url().await.ends_with("/console/login"),
        "{}",
        browser.url().await
    );
    browser.fill("#name", "Alice").await;
    browser.fill("#token", "not-the-token-0123456789").await;
    browser.click("#login").await;
    assert!(browser.text(".error").await.contains("Wrong token"));
    browser.fill("#name", "Alice").await;
    browser.fill("#token", TOKEN).await;
    browser.click("#login").await;
    // The click returns before the next page is there: wait for what only it has.
    browser.find("#messages").await;
    let after_login = browser.url().await;
    assert!(after_login.ends_with("/console/messages"), "{after_login}");

    // The message fails (500 three times); the grid shows it, the detail pane opens.
    let detail = format!("{base}/console/messages?id={id}");
    browser
        .wait_text(&detail, "#detail-state", |s| s == "failed")
        .await;
    let row = browser.text(&format!("tr[data-id=\"{id}\"]")).await;
    assert!(
        row.contains(ORDER) && row.contains("failed") && row.contains("HTTP 500"),
        "{row}"
    );
    browser
        .screenshot(&screenshots().join("messages.png"))
        .await;

    // Edit and retry: the content as the operator fixed it is what D365 receives.
    let fixed = json!({ "ProductionOrderNumber": ORDER, "ReportFinishedLines": [{ "ItemNumber": "A0001", "ReportedGoodQuantity": 4 }] });
    browser.fill("#content", &fixed.to_string()).await;
    browser.click("#edit-retry").await;
    assert_eq!(
        browser.text("#note").await,
        format!("Message {id} queued again.")
    );
    browser
        .wait_text(&detail, "#detail-state", |s| s == "delivered")
        .await;
    let history = browser.text("#history").await;
    assert!(
        history.contains("console:Alice") && history.contains("edited and retried"),
        "{history}"
    );
    let delivered = fake.accepted();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].content, fixed);

    // D365 processes it and fails it in its batch job: the console shows its verdict.
    let infolog = "Item A0001 is blocked for production.";
    let verdict = json!({
        "BusinessEventId": "SysMessageProcessorMessageProcessedBusinessEvent",
        "EventId": "V-1",
        "MessageQueue": "JmgMES3P",
        "MessageType": "ProdProductionOrderReportFinished",
        "MessageContent": delivered[0].envelope["_messageContent"],
        "MessageState": "Failed",
        "MessageInfolog": infolog
    });
    post_event(&http, &base, &verdict).await;
    browser.goto(&detail).await;
    assert_eq!(browser.text("#d365-infolog").await, infolog);
    let row = browser.text(&format!("tr[data-id=\"{id}\"]")).await;
    assert!(
        row.contains("delivered") && row.contains("failed in D365"),
        "{row}"
    );

    // A form posted from elsewhere (right session cookie, no anti-forgery token) is refused.
    let session = browser
        .cookie("mesgw_session")
        .await
        .expect("session cookie");
    let forged = http
        .post(format!("{base}/console/messages/{id}/cancel"))
        .header("cookie", format!("mesgw_session={session}"))
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);

    // Lines: a line no rule reads (a typo) is refused with the lines the rules read.
    browser.goto(&format!("{base}/console/lines")).await;
    browser.fill("#line", "line1").await;
    browser.fill("#order", "P000999").await;
    browser.click("#set-line").await;
    assert_eq!(
        browser.text("#error").await,
        "no rule reads line \"line1\": an order set there would never be reported (the rules read these lines: line2)"
    );
    assert!(api_lines(&http, &base).await["lines"]["line1"].is_null());
    // Set line2's order.
    browser.fill("#line", "line2").await;
    browser.fill("#order", "P000999").await;
    browser.click("#set-line").await;
    assert_eq!(
        browser.text("#note").await,
        "Line line2 runs order P000999."
    );
    assert!(browser.text("#lines").await.contains("P000999"));
    browser.screenshot(&screenshots().join("lines.png")).await;
    let lines = api_lines(&http, &base).await;
    assert_eq!(lines["lines"]["line2"]["order"], "P000999");

    // D365 released another order for line2: listed, and one click runs it there.
    let released = json!({
        "BusinessEventId": "ProductionOrderReleasedBusinessEvent",
        "EventId": "R-1",
        "ProductionOrderNumber": "P000777",
        "ItemNumber": "A0042"
    });
    post_event(&http, &base, &released).await;
    browser.goto(&format!("{base}/console/lines")).await;
    let list = browser.text("#released").await;
    assert!(list.contains("P000777") && list.contains("A0042"), "{list}");
    browser.click("#released button").await;
    assert_eq!(
        browser.text("#note").await,
        "Line line2 runs order P000777."
    );
    assert!(browser.text("#released").await.contains("running"));
    let lines = api_lines(&http, &base).await;
    assert_eq!(lines["lines"]["line2"]["item"], "A0042");

    // Sources: the simulator is connected.
    browser.goto(&format!("{base}/console/sources")).await;
    let sources = browser.text("#sources").await;
    assert!(
        sources.contains("light-barrier") && sources.contains("connected"),
        "{sources}"
    );
    browser.screenshot(&screenshots().join("sources.png")).await;
    browser.close().await;
    assert_eq!(gw.terminate().await, 0);
    for page in ["messages", "lines", "sources"] {
        let png = std::fs::read(screenshots().join(format!("{page}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{page}.png is an image"
        );
    }
}
