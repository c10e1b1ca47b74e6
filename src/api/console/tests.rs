use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use super::auth::*;
use super::pages::page_link;
use super::*;
use crate::api::config::SessionTimes;

fn with_cookie(id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::COOKIE,
        header::HeaderValue::from_str(&format!("other=1; {COOKIE}={id}")).unwrap(),
    );
    h
}

const TIMES: SessionTimes = SessionTimes {
    idle: Duration::from_secs(60),
    lifetime: Duration::from_secs(600),
};

#[test]
fn a_session_ends_when_idle_and_the_self_reload_does_not_keep_it() {
    let sessions = Sessions::new(TIMES);
    let t0 = Instant::now();
    let id = sessions.create_at("ann".into(), t0).unwrap();
    let h = with_cookie(&id);
    // Reloads every 10 s for 50 s: alive, but the idle clock runs from the login.
    for s in (10..=50).step_by(10) {
        assert!(sessions
            .get_at(&h, false, t0 + Duration::from_secs(s))
            .is_some());
    }
    assert!(
        sessions
            .get_at(&h, false, t0 + Duration::from_secs(61))
            .is_none(),
        "reloads alone do not extend it"
    );
    // Gone for good once ended.
    assert!(sessions
        .get_at(&h, true, t0 + Duration::from_secs(62))
        .is_none());
    // An operator's own clicks do.
    let id = sessions.create_at("bob".into(), t0).unwrap();
    let h = with_cookie(&id);
    assert!(sessions
        .get_at(&h, true, t0 + Duration::from_secs(50))
        .is_some());
    assert!(sessions
        .get_at(&h, false, t0 + Duration::from_secs(100))
        .is_some());
    assert!(sessions
        .get_at(&h, false, t0 + Duration::from_secs(111))
        .is_none());
}

#[test]
fn a_session_ends_at_its_lifetime_however_busy_the_operator_is() {
    let sessions = Sessions::new(TIMES);
    let t0 = Instant::now();
    let id = sessions.create_at("ann".into(), t0).unwrap();
    let h = with_cookie(&id);
    for s in (30..600).step_by(30) {
        assert!(
            sessions
                .get_at(&h, true, t0 + Duration::from_secs(s))
                .is_some(),
            "{s}"
        );
    }
    assert!(sessions
        .get_at(&h, true, t0 + Duration::from_secs(600))
        .is_none());
}

#[test]
fn ending_all_sessions_logs_everyone_out() {
    let sessions = Sessions::new(TIMES);
    let t0 = Instant::now();
    let a = sessions.create_at("a".into(), t0).unwrap();
    let b = sessions.create_at("b".into(), t0).unwrap();
    assert_eq!(sessions.end_all(), 2);
    for id in [a, b] {
        assert!(sessions.get_at(&with_cookie(&id), true, t0).is_none());
    }
}

#[test]
fn logins_from_one_address_are_paused_after_repeated_failures_with_a_doubling_pause() {
    let throttle = LoginThrottle::default();
    let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let other: std::net::IpAddr = "192.0.2.8".parse().unwrap();
    let t0 = Instant::now();
    for i in 0..LOGIN_FREE_FAILURES - 1 {
        assert_eq!(throttle.check(ip, t0), Attempt::Allowed, "{i}");
        throttle.failed(ip, t0);
    }
    assert_eq!(throttle.check(ip, t0), Attempt::Allowed);
    throttle.failed(ip, t0);
    assert_eq!(throttle.check(ip, t0), Attempt::Wait(LOGIN_FIRST_PAUSE));
    assert_eq!(throttle.check(other, t0), Attempt::Allowed, "per address");
    let t1 = t0 + LOGIN_FIRST_PAUSE;
    assert_eq!(throttle.check(ip, t1), Attempt::Allowed);
    throttle.failed(ip, t1);
    assert_eq!(throttle.check(ip, t1), Attempt::Wait(LOGIN_FIRST_PAUSE * 2));
    // Capped.
    let mut t = t1;
    for _ in 0..20 {
        t += LOGIN_MAX_PAUSE;
        throttle.failed(ip, t);
    }
    assert_eq!(throttle.check(ip, t), Attempt::Wait(LOGIN_MAX_PAUSE));
    assert_eq!(
        throttle.failures.load(std::sync::atomic::Ordering::Relaxed),
        u64::from(LOGIN_FREE_FAILURES) + 21
    );
    assert!(
        throttle
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    // A success forgets the address.
    throttle.succeeded(ip);
    assert_eq!(throttle.check(ip, t), Attempt::Allowed);
}

#[test]
fn only_an_https_link_from_d365_is_rendered_as_a_link() {
    assert!(
        page_link("https://contoso.operations.dynamics.com/?mi=JmgMES3P")
            .contains("<a id=\"d365-page\" href=\"https://contoso")
    );
    for hostile in [
        "javascript:alert(document.domain)",
        "JAVASCRIPT:alert(1)",
        " javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "http://contoso.example/",
        "//evil.example/",
    ] {
        let html = page_link(hostile);
        assert!(!html.contains("<a "), "{hostile}: {html}");
        assert!(!html.contains("<script>"), "{hostile}: {html}");
    }
}
