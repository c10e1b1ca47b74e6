//! Text that came from outside (payloads, login names, event fields, URLs), made safe to
//! put in a log line: control characters escaped so a value cannot start a forged line,
//! and a bound on its length so a megabyte cannot become a megabyte of log.

/// The most characters of one outside value a log line shows.
pub const LOG_CHARS: usize = 120;

/// `text` for a log line: at most [`LOG_CHARS`] characters, control characters (newlines
/// included) and backslashes escaped, and how much was cut when it was.
pub fn for_log(text: &str) -> String {
    bounded(text, LOG_CHARS)
}

/// [`for_log`] with its own bound.
pub fn bounded(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 2));
    for (shown, (i, c)) in text.char_indices().enumerate() {
        if shown == max_chars {
            out.push_str(&format!("…(+{} bytes)", text.len() - i));
            return out;
        }
        if c.is_control() || c == '\\' || c == '\u{2028}' || c == '\u{2029}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// How much of a device's payload a log line shows.
pub const PAYLOAD_EXCERPT: usize = 80;
/// How much of a server's answer (D365, Entra, Service Bus) a log line or a message's
/// history shows.
pub const BODY_EXCERPT: usize = 300;

/// Bytes from outside (a payload) for a log line: lossy UTF-8, then [`bounded`].
pub fn excerpt(bytes: &[u8], max_chars: usize) -> String {
    // Decoding more than 4 bytes a character could use is never needed for the bound.
    let head = &bytes[..bytes.len().min(max_chars * 4 + 4)];
    let mut out = bounded(&String::from_utf8_lossy(head), max_chars);
    if head.len() < bytes.len() && !out.contains('…') {
        out.push_str(&format!("…(+{} bytes)", bytes.len() - head.len()));
    }
    out
}

/// A URL for a log line without what may be a credential: scheme, host and port only
/// (a Teams or Slack webhook's path *is* its secret; a user:password may precede the host).
pub fn url_origin(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(p) => format!("{}://{host}:{p}/…", u.scheme()),
                None => format!("{}://{host}/…", u.scheme()),
            }
        }
        Err(_) => "(not a URL)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newline_cannot_start_a_forged_log_line() {
        let logged = for_log("x\n2026-12-07T10:00:00Z  INFO Console login. name=admin");
        assert!(!logged.contains('\n'), "{logged}");
        assert!(logged.starts_with("x\\n2026"), "{logged}");
        assert_eq!(
            for_log("a\\nb"),
            "a\\\\nb",
            "a literal backslash-n is told apart"
        );
        assert_eq!(for_log("tab\there\r"), "tab\\there\\r");
    }

    #[test]
    fn a_long_value_is_cut_and_says_how_much_was_cut() {
        let long = "A".repeat(1_500_000);
        let logged = for_log(&long);
        assert!(logged.len() < 200, "{}", logged.len());
        assert!(
            logged.ends_with(&format!("…(+{} bytes)", 1_500_000 - LOG_CHARS)),
            "{logged}"
        );
        assert_eq!(for_log("short"), "short");
        let cut = excerpt(&vec![b'x'; 10_000], 10);
        assert!(cut.starts_with("xxxxxxxxxx…(+"), "{cut}");
        assert_eq!(excerpt(b"ok\x00", 10), "ok\\u{0}");
    }

    #[test]
    fn a_url_is_logged_without_its_path_query_or_user() {
        assert_eq!(
            url_origin("https://user:pw@example.webhook.office.com/webhookb2/SECRET?x=1"),
            "https://example.webhook.office.com/…"
        );
        assert_eq!(
            url_origin("http://127.0.0.1:8080/hook/KEY"),
            "http://127.0.0.1:8080/…"
        );
        assert_eq!(url_origin("not a url"), "(not a URL)");
    }
}
