//! Property-based fuzzing on stable Rust (issue 9, item 7; a nightly toolchain for
//! cargo-fuzz cannot be installed on these machines): every decoder that sees bytes from
//! the shop floor or text from a configuration file is fed generated input and must
//! answer with a value or a clean error, never a panic, and keep its invariants.
//!
//! CI runs the default number of cases; a longer run:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

use mes_gateway::config::{Framer, PayloadFormat, PointType, WordOrder};
use mes_gateway::event::Value;
use mes_gateway::rules::template::Template;
use mes_gateway::source::modbus::decode_registers;
use mes_gateway::source::mqtt::decode;
use mes_gateway::source::serial::take_frames;
use proptest::prelude::*;

fn format() -> impl Strategy<Value = PayloadFormat> {
    prop_oneof![
        Just(PayloadFormat::Auto),
        Just(PayloadFormat::Text),
        Just(PayloadFormat::Number),
        Just(PayloadFormat::Json),
    ]
}

/// Payloads that look like what devices send, and plain noise.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..128),
        "[-+]?[0-9]{0,12}(\\.[0-9]{0,6})?([eE][-+]?[0-9]{1,4})?".prop_map(String::into_bytes),
        "(nan|NaN|inf|-inf|infinity|1e999|-1e999|true|false|null)".prop_map(String::into_bytes),
        "\\{\"[a-z]{1,8}\": ?(-?[0-9]{1,6}|\"[^\"]{0,12}\"|\\[[0-9,]{0,12}\\])\\}"
            .prop_map(String::into_bytes),
    ]
}

fn frames_of(framer: &Framer, chunks: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        frames.extend(take_frames(framer, &mut buf));
    }
    (frames, buf)
}

proptest! {
    #[test]
    fn mqtt_payloads_decode_or_fail_cleanly_and_numbers_are_finite(
        format in format(),
        bytes in payload(),
    ) {
        match decode(format, &bytes) {
            Ok(Value::Number(n)) => prop_assert!(n.is_finite(), "{n} from {bytes:?}"),
            Ok(_) => {}
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn modbus_registers_decode_from_any_words(
        words in prop::collection::vec(any::<u16>(), 0..4),
        ty in prop_oneof![
            Just(PointType::Bool), Just(PointType::U16), Just(PointType::I16),
            Just(PointType::U32), Just(PointType::I32), Just(PointType::F32),
        ],
        order in prop_oneof![Just(WordOrder::Big), Just(WordOrder::Little)],
    ) {
        let needed = match ty {
            PointType::U32 | PointType::I32 | PointType::F32 => 2,
            _ => 1,
        };
        let decoded = decode_registers(&words, ty, order);
        prop_assert_eq!(decoded.is_some(), words.len() >= needed, "{:?}", decoded);
        if ty != PointType::F32 {
            prop_assert!(decoded.is_none_or(f64::is_finite));
        }
    }

    /// However the bytes of a serial device arrive (split across reads anywhere), the
    /// frames are the same as if they had come in one read.
    #[test]
    fn serial_frames_do_not_depend_on_how_reads_split_the_bytes(
        data in prop::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(b';'), b'0'..=b'z'], 0..200),
        cuts in prop::collection::vec(0usize..200, 0..12),
        fixed in 1usize..16,
    ) {
        let mut cuts = cuts;
        cuts.retain(|c| *c <= data.len());
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for c in cuts.into_iter().chain([data.len()]) {
            chunks.push(data[start..c].to_vec());
            start = c;
        }
        for framer in [Framer::Lines(b"\n".to_vec()), Framer::Lines(b";\r\n".to_vec()), Framer::Fixed(fixed)] {
            let whole = frames_of(&framer, std::slice::from_ref(&data));
            let split = frames_of(&framer, &chunks);
            prop_assert_eq!(&whole, &split, "{:?}", framer);
            if let Framer::Fixed(n) = framer {
                prop_assert!(whole.0.iter().all(|f| f.len() == n));
                prop_assert_eq!(whole.0.len() * n + whole.1.len(), data.len(), "no byte lost");
            }
        }
    }

    #[test]
    fn templates_parse_or_fail_cleanly(text in "[a-z{}._ 0-9|:\\-]{0,40}") {
        if let Err(e) = Template::parse(&text) {
            prop_assert!(!e.is_empty());
        }
    }

    /// A real configuration with a few random edits (a character changed, a range cut, a
    /// line doubled) loads, or fails with every problem located in its file.
    #[test]
    fn edited_configurations_load_or_fail_with_located_errors(
        edits in prop::collection::vec((0usize..4000, 0usize..40, any::<char>(), 0u8..3), 1..4),
    ) {
        let mut main = include_str!("../config/example/gateway.yaml").to_string();
        for (at, len, ch, kind) in edits {
            let at = floor_char_boundary(&main, at % (main.len() + 1));
            let end = floor_char_boundary(&main, (at + len).min(main.len()));
            match kind {
                0 => main.replace_range(at..end.max(at), &ch.to_string()),
                1 => main.replace_range(at..end, ""),
                _ => {
                    let line = main[at..].lines().next().unwrap_or("").to_string();
                    main.insert_str(at, &format!("{line}\n"));
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gateway.yaml"), &main).unwrap();
        std::fs::create_dir_all(dir.path().join("rules.d")).unwrap();
        std::fs::write(
            dir.path().join("rules.d/line1.yaml"),
            include_str!("../config/example/rules.d/line1.yaml"),
        )
        .unwrap();
        std::fs::write(dir.path().join("d365-client-secret"), "s\n").unwrap();
        if let Err(errors) = mes_gateway::config::load(dir.path()) {
            let text = errors.to_string();
            for line in text.lines().skip(1) {
                prop_assert!(
                    line.contains("gateway.yaml") || line.contains("line1.yaml") || line.contains("more"),
                    "unlocated error {line:?} in:\n{text}"
                );
            }
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
