//! Building a template: a session from its base image, under the build
//! policy (balanced by default: the package registries), runs the
//! template's steps as root; what they changed (the session's writable
//! layer, read through the guest's view of it) becomes one more image
//! layer, stored as the image `template/NAME`.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use sandbox::attach;
use sandbox::{disks, launch, Selection, SessionSpec};
use sbx_image::{ImageRecord, Store};
use sbx_protocol::cmdline::LAYER_VIEW;

use crate::{Result, Template, TemplateError};

/// Progress lines for people (`sbx: …`).
pub type Progress<'a> = &'a dyn Fn(&str);

/// The build session's size: npm and compilers want more than the default.
const BUILD_MEM_MIB: u64 = 1024;
const BUILD_DISK: u64 = 16 << 30;

/// The built image of `t`, if its current recipe was built.
pub fn image_of(t: &Template, store: &Store) -> Result<Option<ImageRecord>> {
    let base = store.find(&t.image)?;
    Ok(built(t, store, &t.recipe(base.digest.as_str())))
}

/// The image built from `recipe` of `t`, if there is one.
fn built(t: &Template, store: &Store, recipe: &str) -> Option<ImageRecord> {
    store
        .find(&t.image_name())
        .ok()
        .filter(|r| r.source.contains(recipe))
}

/// Builds `t` (unless its current recipe is built) and returns its image.
/// `sbx` is the sbx binary the build session runs as.
pub fn build(t: &Template, sbx: &Path, progress: Progress<'_>) -> Result<ImageRecord> {
    let store = disks::image_store()?;
    let base = store.find(&t.image).map_err(|e| match e {
        sbx_image::ImageError::NotFound(_) => TemplateError::Image(sbx_image::ImageError::NotFound(format!(
            "{} (template {} builds on it; for `base`: `cargo xtask image base`, then `sbx image import` the archive it prints)",
            t.image, t.name
        ))),
        e => e.into(),
    })?;
    let recipe = t.recipe(base.digest.as_str());
    if let Some(image) = built(t, &store, &recipe) {
        return Ok(image);
    }
    let name = format!("build-{}-{}", t.name, std::process::id());
    let selection = Selection {
        preset: Some(t.build.preset.clone().unwrap_or_else(|| "balanced".into())),
        texts: t
            .build
            .policy
            .iter()
            .map(|p| {
                (
                    format!("template {} build ({})", t.name, t.origin),
                    p.clone(),
                )
            })
            .collect(),
        ..Selection::default()
    };
    let mut spec = SessionSpec::new(&name, &selection)?;
    spec.vm.mem_mib = BUILD_MEM_MIB;
    spec.root = Some(disks::resolve(&t.image, Some(BUILD_DISK))?);
    spec.env = t.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();

    progress(&format!(
        "building template {} on {} ({})",
        t.name,
        base.name,
        sbx_image::store::count(t.build.steps.len(), "step")
    ));
    let dir = launch::start(&spec, sbx, || {})?;
    let work = store.tmp("template");
    let result = (|| {
        run_steps(t, &dir, progress)?;
        progress("saving what the steps changed as a layer");
        std::fs::create_dir_all(&work).map_err(|source| TemplateError::Read {
            path: work.clone(),
            source,
        })?;
        let upper = work.join("upper.tar");
        capture_upper(&dir, &upper)?;
        let layer = work.join("layer.tar");
        let out = std::fs::File::create(&layer).map_err(|source| TemplateError::Read {
            path: layer.clone(),
            source,
        })?;
        let input = std::fs::File::open(&upper).map_err(|source| TemplateError::Read {
            path: upper.clone(),
            source,
        })?;
        sbx_image::overlay::layer_from_upper(
            std::io::BufReader::new(input),
            std::io::BufWriter::new(out),
        )?;
        let source = format!(
            "built from template {} ({}, recipe {recipe})",
            t.name, t.origin
        );
        let record = store.derive(
            &base,
            &layer,
            &sbx_image::store::Derived {
                name: t.image_name(),
                env: t.env_words(),
                user: t.user.clone(),
                source,
            },
            progress,
        )?;
        Ok(record)
    })();
    if let Ok(info) = dir.read_info() {
        launch::end_process(&dir, info.pid, Duration::from_secs(10));
    }
    if result.is_err() {
        // The session goes with the build; what it said first, for the error.
        for (what, path) in [
            ("session log", dir.log_path()),
            ("guest console", dir.console_path()),
        ] {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            if !tail.is_empty() {
                progress(&format!("the build session's {what} ended with:"));
                for line in tail.iter().rev() {
                    progress(&format!("  {}", sbx_audit::printable(line)));
                }
            }
        }
    }
    let _ = launch::remove(&dir);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run_steps(t: &Template, dir: &sandbox::state::Dir, progress: Progress<'_>) -> Result<()> {
    let n = t.build.steps.len();
    for (i, step) in t.build.steps.iter().enumerate() {
        progress(&format!("step {}/{n}: {step}", i + 1));
        // The steps' output is progress too: it goes to our stderr.
        let status = attach::script(dir, step, Some("root"), 2)?;
        if status != 0 {
            return Err(TemplateError::Step {
                template: t.name.clone(),
                step: i + 1,
                status,
                command: step.clone(),
            });
        }
    }
    Ok(())
}

/// The guest's writable layer as a tar stream (GNU tar in the image, with
/// the attributes overlayfs marks deletions and opaque directories with).
fn capture_upper(dir: &sandbox::state::Dir, out: &Path) -> Result<()> {
    let file = std::fs::File::create(out).map_err(|source| TemplateError::Read {
        path: out.to_path_buf(),
        source,
    })?;
    let upper = format!("{LAYER_VIEW}/upper");
    let tar = format!(
        "sync && exec tar --create --file=- --numeric-owner --xattrs \
         --xattrs-include='trusted.overlay.*' --xattrs-include='security.capability' \
         --directory={upper} ."
    );
    let status = attach::script(dir, &tar, Some("root"), file.as_raw_fd())?;
    if status != 0 {
        return Err(TemplateError::Step {
            template: dir.name.clone(),
            step: 0,
            status,
            command: format!("tar of {upper} (the image needs GNU tar)"),
        });
    }
    Ok(())
}
