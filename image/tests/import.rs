//! Importing image archives into a store: real tarballs, real mke2fs and
//! debugfs; what lands in the store is read back from the file system image.

use std::path::{Path, PathBuf};

use sbx_image::manifest::RunConfig;
use sbx_image::testing::debugfs;
use sbx_image::{archive, layout, ImageError, Store};

fn layer(dir: &Path) -> PathBuf {
    let path = dir.join("layer.tar");
    sbx_image::testing::Layer::new()
        .dir("etc/", 0o755, 0)
        .file("etc/hostname", 0o644, 0, b"sbx\n")
        .dir("home/agent/", 0o755, 1000)
        .file("home/agent/.profile", 0o644, 1000, b"# hi\n")
        .write(&path)
        .unwrap();
    path
}

fn quiet(_: &str) {}

fn tmp_is_empty(store: &Store) -> bool {
    std::fs::read_dir(store.root().join("tmp")).unwrap().count() == 0
}

#[test]
fn an_oci_archive_becomes_a_root_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let archive_path = dir.path().join("img.tar");
    let run = RunConfig {
        env: Some(vec!["PATH=/usr/bin:/bin".into()]),
        user: Some("agent".into()),
        ..RunConfig::default()
    };
    let digest = layout::write_archive(
        &archive_path,
        "test/base:1",
        &[&layer(dir.path())],
        run,
        &dir.path().join("scratch"),
    )
    .unwrap();
    let rec = archive::import(&store, &archive_path, None, &quiet).unwrap();
    assert_eq!(rec.name, "test/base:1");
    assert_eq!(rec.digest, digest);
    assert_eq!(rec.user.as_deref(), Some("agent"));
    let root = store.root_paths(&rec)[0].clone();
    let profile = debugfs(&root, "stat /home/agent/.profile");
    assert!(profile.contains("User:  1000"), "{profile}");
    assert_eq!(debugfs(&root, "cat /etc/hostname"), "sbx\n");
    assert!(tmp_is_empty(&store));
    // Found by name, by name with a pin, and refused with a wrong pin.
    assert_eq!(store.find("test/base:1").unwrap(), rec);
    assert!(store.find(&format!("test/base:1@{digest}")).is_ok());
    let wrong = format!("test/base:1@sha256:{}", "0".repeat(64));
    assert!(store.find(&wrong).is_err());
    assert!(matches!(store.find("nope"), Err(ImageError::NotFound(_))));

    // A second name for the same image shares its root; removing one keeps it.
    let again = archive::import(&store, &archive_path, Some("copy"), &quiet).unwrap();
    assert_eq!(store.root_paths(&again)[0], root);
    store.remove("test/base:1").unwrap();
    assert!(root.is_file());
    store.remove("copy").unwrap();
    assert!(!root.exists());
    assert_eq!(
        std::fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn an_altered_blob_is_refused_naming_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let archive_path = dir.path().join("img.tar");
    layout::write_archive(
        &archive_path,
        "x",
        &[&layer(dir.path())],
        RunConfig::default(),
        &dir.path().join("scratch"),
    )
    .unwrap();
    // Flip one byte inside the (largest) layer blob's data, keeping the tar valid.
    let mut bytes = std::fs::read(&archive_path).unwrap();
    let mut a = tar::Archive::new(&bytes[..]);
    let (offset, name) = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .max_by_key(|e| e.size())
        .map(|e| {
            (
                e.raw_file_position(),
                e.path().unwrap().to_string_lossy().into_owned(),
            )
        })
        .unwrap();
    bytes[offset as usize + 20] ^= 0xff;
    std::fs::write(&archive_path, &bytes).unwrap();
    let e = archive::import(&store, &archive_path, None, &quiet).unwrap_err();
    let hex = name.trim_start_matches("blobs/sha256/");
    assert!(matches!(e, ImageError::Digest { .. }), "{e}");
    assert!(e.to_string().contains(hex), "{e}");
    assert!(tmp_is_empty(&store));
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn docker_save_archives_import_and_other_platforms_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let save = |arch: &str| -> PathBuf {
        let path = dir.path().join(format!("{arch}.tar"));
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let manifest = format!(
            r#"[{{"Config":"c.json","RepoTags":["saved:{arch}"],"Layers":["l/layer.tar"]}}]"#
        );
        let layer = std::fs::read(layer(dir.path())).unwrap();
        for (p, body) in [
            ("c.json", config.as_bytes()),
            ("manifest.json", manifest.as_bytes()),
            ("l/layer.tar", &layer[..]),
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, p, body).unwrap();
        }
        b.finish().unwrap();
        path
    };
    let rec = archive::import(&store, &save("amd64"), None, &quiet).unwrap();
    assert_eq!(rec.name, "saved:amd64");
    let e = archive::import(&store, &save("arm64"), None, &quiet).unwrap_err();
    assert!(matches!(e, ImageError::Platform { .. }), "{e}");
    assert!(e.to_string().contains("linux/arm64"), "{e}");

    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, b"this is not a tarball at all, just some words").unwrap();
    let e = archive::import(&store, &junk, None, &quiet)
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n') && e.contains("junk.tar"), "{e}");
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(tmp_is_empty(&store));
}
