//! The one-time move from the sled store.

use super::*;

/// An outbox written by an earlier build (sled, one lane key per member) is moved into redb
/// at the first open, with every record, lane, count, delivery and the rules state; sled's
/// files are gone afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_of_the_old_format_is_migrated_whole_at_the_first_open() {
    let written = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(written.path()).unwrap();
    let delivery = drained_store(&outbox, 3_000).await;
    let before = snapshot(&outbox);
    let next_before = outbox
        .commit(Ingest::of(vec![msg("C", 1)]))
        .await
        .unwrap()
        .records[0]
        .id;
    let before_last = snapshot(&outbox);
    // The same trees, keys and values in a sled store, as earlier builds left them.
    let old = tempfile::tempdir().unwrap();
    let old_dir = old.path().join("outbox");
    {
        let sled_db = sled::Config::new().path(&old_dir).open().unwrap();
        let rx = outbox.store().read().unwrap();
        // Their lane index had one key per member (order ++ id); the lists came later.
        let legacy_lanes = sled_db.open_tree(kv::T::Lanes.name()).unwrap();
        for order in ["A", "B", "C"] {
            for id in outbox.lane(order).unwrap() {
                legacy_lanes
                    .insert(lanes::legacy_key(order, id), &[])
                    .unwrap();
            }
        }
        assert!(!legacy_lanes.is_empty());
        for table in kv::T::ALL {
            if matches!(table, kv::T::LaneEnds | kv::T::LaneLinks) {
                continue;
            }
            let tree = sled_db.open_tree(table.name()).unwrap();
            rx.scan(table, kv::Span::all(), false, |k, v| {
                tree.insert(k, v).unwrap();
                Ok(true)
            })
            .unwrap();
        }
        sled_db.flush().unwrap();
    }
    drop(outbox);
    assert!(old_dir.join("db").exists() && old_dir.join("conf").exists());

    let migrated = Outbox::open(old.path()).unwrap();
    assert_same(&snapshot(&migrated), &before_last, "after migration");
    assert!(migrated.store().receipts().holds(&delivery.id).unwrap());
    assert_eq!(
        migrated.store().owners().load("rules").unwrap().as_deref(),
        Some(&b"{\"counters\":1}"[..])
    );
    let next = migrated
        .commit(Ingest::of(vec![msg("B", 2)]))
        .await
        .unwrap()
        .records[0]
        .id;
    assert_eq!(
        next,
        next_before + 1,
        "ids continue where the old store left them"
    );
    assert!(before.0.len() < before_last.0.len());
    let leftovers: Vec<_> = std::fs::read_dir(&old_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "outbox.redb")
        .collect();
    assert!(
        leftovers.is_empty(),
        "sled's files are removed: {leftovers:?}"
    );
    drop(migrated);
    // Opening again reads the redb store only.
    let again = Outbox::open(old.path()).unwrap();
    assert_eq!(
        again.list(None, None).unwrap().len(),
        before_last.0.len() + 1
    );
}

/// An old-format store that sled itself cannot read (torn by a power cut under an earlier
/// build) is refused with the reason, and left exactly as it was: nothing is migrated
/// half, nothing of it is deleted.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_format_store_sled_cannot_read_is_refused_and_left_untouched() {
    let old = tempfile::tempdir().unwrap();
    let dir = old.path().join("outbox");
    {
        let sled_db = sled::Config::new().path(&dir).open().unwrap();
        let messages = sled_db.open_tree(kv::T::Messages.name()).unwrap();
        for id in 1u64..=2_000 {
            messages.insert(id.to_be_bytes(), vec![1u8; 400]).unwrap();
        }
        sled_db.flush().unwrap();
    }
    // Tear it: garble its configuration file, which sled checks before anything else.
    let conf = dir.join("conf");
    let mut bytes = std::fs::read(&conf).unwrap();
    for b in &mut bytes {
        *b ^= 0x5a;
    }
    std::fs::write(&conf, &bytes).unwrap();
    let files = |dir: &std::path::Path| {
        let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        all.sort();
        all
    };
    let before = files(&dir);

    let Err(e) = Outbox::open(old.path()) else {
        panic!("a torn old store was opened");
    };
    let text = e.to_string();
    assert!(
        text.contains("the outbox in the old format (sled) cannot be read: corrupted data; it is left as it is"),
        "{text}"
    );
    let after: Vec<_> = files(&dir)
        .into_iter()
        .filter(|(name, _)| name != "outbox.redb.migrating")
        .collect();
    assert_eq!(
        after.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        before.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "no file of the old store is removed and no new store appears"
    );
    assert!(after == before, "the old store's files are unchanged");
}
