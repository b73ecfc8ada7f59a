//! A session's changes as an image layer: the guest's overlayfs upper
//! directory, as a tar stream (`tar --xattrs` of `upper/`), rewritten in
//! the OCI layer form: overlayfs marks a deleted file with a 0/0 character
//! device and an opaque directory with the `trusted.overlay.opaque`
//! attribute; OCI layers say `.wh.NAME` and `.wh..wh..opq`. Other
//! `trusted.overlay.*` attributes are overlayfs's bookkeeping and dropped.
//!
//! The stream comes from a guest: it is read as untrusted input (the
//! layer is unpacked later by [`crate::unpack`], which keeps every entry
//! inside the root).

use std::io::{Read, Write};

use crate::error::{At, Result};

const OPAQUE: &str = "SCHILY.xattr.trusted.overlay.opaque";
const OVERLAY_XATTRS: &str = "SCHILY.xattr.trusted.overlay.";

/// Rewrites the upper directory's tar stream `input` into an OCI layer.
pub fn layer_from_upper(input: impl Read, out: impl Write) -> Result<()> {
    let mut archive = tar::Archive::new(input);
    let mut b = tar::Builder::new(out);
    let bad = |e: std::io::Error| {
        crate::ImageError::Malformed(format!(
            "the session's changes are not a readable tar stream: {e}"
        ))
    };
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        let mut opaque = false;
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                let (Ok(k), v) = (ext.key(), ext.value_bytes()) else {
                    continue;
                };
                if k == OPAQUE {
                    opaque = v == b"y";
                } else if k.starts_with("SCHILY.xattr.") && !k.starts_with(OVERLAY_XATTRS) {
                    pax.push((k.to_string(), v.to_vec()));
                }
            }
        }
        let mut header = entry.header().clone();
        let et = header.entry_type();
        let whiteout = et.is_character_special()
            && header.device_major().ok().flatten() == Some(0)
            && header.device_minor().ok().flatten() == Some(0);
        if whiteout {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let marker = path.with_file_name(format!(".wh.{name}"));
            empty_file(&mut b, &marker)?;
            continue;
        }
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .at(|| "cannot write the layer".into())?;
        }
        if et.is_symlink() || et.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(bad)?
                .map(|t| t.into_owned())
                .unwrap_or_default();
            b.append_link(&mut header, &path, &target)
                .at(|| "cannot write the layer".into())?;
        } else {
            b.append_data(&mut header, &path, &mut entry)
                .at(|| "cannot write the layer".into())?;
        }
        if opaque && et.is_dir() {
            empty_file(&mut b, &path.join(".wh..wh..opq"))?;
        }
    }
    b.into_inner()
        .at(|| "cannot write the layer".into())?
        .flush()
        .at(|| "cannot write the layer".into())
}

fn empty_file<W: Write>(b: &mut tar::Builder<W>, path: &std::path::Path) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(0);
    b.append_data(&mut h, path, &[][..])
        .at(|| "cannot write the layer".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_marks_become_oci_whiteouts() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_device_major(0).unwrap();
        h.set_device_minor(0).unwrap();
        h.set_size(0);
        b.append_data(&mut h, "./etc/gone", &[][..]).unwrap();
        b.append_pax_extensions([
            (OPAQUE, &b"y"[..]),
            ("SCHILY.xattr.trusted.overlay.origin", &b"x"[..]),
        ])
        .unwrap();
        let mut d = tar::Header::new_gnu();
        d.set_entry_type(tar::EntryType::Directory);
        d.set_size(0);
        d.set_mode(0o755);
        b.append_data(&mut d, "./opt/fresh/", &[][..]).unwrap();
        b.append_pax_extensions([("SCHILY.xattr.security.capability", &b"\x01\x00"[..])])
            .unwrap();
        let mut f = tar::Header::new_gnu();
        f.set_size(2);
        f.set_mode(0o755);
        b.append_data(&mut f, "./usr/bin/ping", &b"hi"[..]).unwrap();
        let input = b.into_inner().unwrap();

        let mut out = Vec::new();
        layer_from_upper(&input[..], &mut out).unwrap();
        let mut a = tar::Archive::new(&out[..]);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let xattrs: Vec<String> = e
                .pax_extensions()
                .unwrap()
                .map(|x| x.flatten().map(|x| x.key().unwrap().to_string()).collect())
                .unwrap_or_default();
            seen.push((p, xattrs));
        }
        let names: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc/.wh.gone",
                "opt/fresh/",
                "opt/fresh/.wh..wh..opq",
                "usr/bin/ping"
            ]
        );
        assert!(
            seen[1].1.is_empty(),
            "overlay attributes kept: {:?}",
            seen[1].1
        );
        assert_eq!(seen[3].1, ["SCHILY.xattr.security.capability"]);
    }
}
