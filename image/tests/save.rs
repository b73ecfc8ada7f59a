//! Saving a session's writable layer as an image over its base: a real
//! ext4 disk (mkfs.ext4 -d), checked by a real e2fsck, moved into the
//! store and stacked over the base's root.

use std::path::{Path, PathBuf};

use sbx_image::manifest::RunConfig;
use sbx_image::store::Derived;
use sbx_image::testing::debugfs;
use sbx_image::{archive, layout, ImageError, ImageRecord, Store};

fn quiet(_: &str) {}

fn base(store: &Store, dir: &Path) -> ImageRecord {
    let layer = dir.join("layer.tar");
    sbx_image::testing::Layer::new()
        .dir("etc/", 0o755, 0)
        .file("etc/hostname", 0o644, 0, b"sbx\n")
        .write(&layer)
        .unwrap();
    let archive_path = dir.join("img.tar");
    let run = RunConfig {
        env: Some(vec!["PATH=/usr/bin:/bin".into(), "LANG=C".into()]),
        ..RunConfig::default()
    };
    layout::write_archive(&archive_path, "base", &[&layer], run, &dir.join("scratch")).unwrap();
    archive::import(store, &archive_path, None, &quiet).unwrap()
}

/// A session's disk as the guest leaves it: the changes in `upper/`.
fn session_disk(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("upper/usr/local/bin")).unwrap();
    std::fs::create_dir_all(tree.join("work")).unwrap();
    std::fs::write(tree.join("upper/usr/local/bin/agent"), "#!/bin/sh\n").unwrap();
    let disk = dir.join("session.ext4");
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    disk
}

fn derived(name: &str) -> Derived {
    Derived {
        name: name.into(),
        env: vec!["LANG=C.UTF-8".into(), "MODE=agent".into()],
        user: Some("agent".into()),
        source: "built from a test".into(),
    }
}

#[test]
fn a_saved_layer_stacks_over_its_base_and_goes_with_the_last_image_using_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let base = base(&store, dir.path());
    let disk = session_disk(dir.path());

    let saved = store
        .save(&base, &disk, &derived("template/t"), &quiet)
        .unwrap();
    assert!(!disk.exists(), "the disk moves into the store");
    let roots = store.root_paths(&saved);
    assert_eq!(roots.len(), 2);
    assert_eq!(
        roots[1],
        store.root_paths(&base)[0],
        "the base's root is shared"
    );
    assert!(debugfs(&roots[0], "cat /upper/usr/local/bin/agent").starts_with("#!/bin/sh"));
    assert_eq!(saved.user.as_deref(), Some("agent"));
    assert_eq!(
        saved.env,
        ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "MODE=agent"],
        "the template's variables replace the base's"
    );
    assert_eq!(saved.layers, base.layers);
    assert_eq!(store.find("template/t").unwrap(), saved);
    assert_eq!(
        std::fs::read_dir(store.root().join("tmp")).unwrap().count(),
        0
    );

    // The base's name goes; its root stays while the template uses it.
    store.remove("base").unwrap();
    assert!(roots.iter().all(|r| r.is_file()));
    store.remove("template/t").unwrap();
    assert!(roots.iter().all(|r| !r.exists()), "{roots:?}");
}

#[test]
fn a_disk_that_is_not_a_file_system_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let base = base(&store, dir.path());
    let disk = dir.path().join("garbage.ext4");
    std::fs::write(&disk, vec![0x5a; 1 << 20]).unwrap();
    let err = store
        .save(&base, &disk, &derived("template/t"), &quiet)
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Tool { tool: "e2fsck", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("garbage.ext4"), "{err}");
    assert!(disk.is_file());
    assert!(matches!(
        store.find("template/t"),
        Err(ImageError::NotFound(_))
    ));
}
