//! Building a template: a session from its base image, under the build
//! policy (balanced by default: the package registries), runs the
//! template's steps as root; then its VM is shut down and its writable
//! layer, what the steps changed, is kept as it is as the image
//! `template/NAME`, stacked over the base image's root: nothing is copied
//! through the guest or unpacked again.

use std::path::Path;
use std::time::Duration;

use sandbox::attach;
use sandbox::{disks, launch, Selection, SessionSpec};
use sbx_image::{ImageRecord, Store};

use crate::{Result, Template, TemplateError};

/// Progress lines for people (`sbx: …`).
pub type Progress<'a> = &'a dyn Fn(&str);

/// The build session's size: npm and compilers want more than the default.
const BUILD_MEM_MIB: u64 = 1024;
const BUILD_DISK: u64 = 16 << 30;
/// Package managers' download caches go to the guest's /tmp (memory) while
/// steps run, so the template does not keep what it installed twice; npm
/// does not look for a newer npm.
const BUILD_ENV: [(&str, &str); 3] = [
    ("npm_config_cache", "/tmp/sbx-build/npm"),
    ("npm_config_update_notifier", "false"),
    ("PIP_CACHE_DIR", "/tmp/sbx-build/pip"),
];

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
    for (k, v) in BUILD_ENV {
        if !spec.env.iter().any(|(have, _)| have == k) {
            spec.env.push((k.into(), v.into()));
        }
    }
    // A build killed before it cleaned up (the host went down) may have
    // left a disk under this name; it is no one's work.
    let _ = disks::remove_layer(&name);

    progress(&format!(
        "building template {} on {} ({})",
        t.name,
        base.name,
        sbx_image::store::count(t.build.steps.len(), "step")
    ));
    let dir = launch::start(&spec, sbx, || {})?;
    let result = run_steps(t, &dir, progress).and_then(|()| {
        progress("saving what the steps changed");
        // The guest syncs its disks as it shuts down; a VM ended any other
        // way may have lost writes, which no check of the disk would show.
        let info = dir.read_info()?;
        let how = launch::stop(&dir, info.pid, Duration::from_secs(30));
        if how != launch::STOPPED {
            return Err(TemplateError::Session(sandbox::Error::Session(format!(
                "the build session of template {} did not shut down cleanly ({how}); build it again",
                t.name
            ))));
        }
        let source = format!(
            "built from template {} ({}, recipe {recipe})",
            t.name, t.origin
        );
        let record = store.save(
            &base,
            &disks::layer_path(&name),
            &sbx_image::store::Derived {
                name: t.image_name(),
                env: t.env_words(),
                user: t.user.clone(),
                source,
            },
            progress,
        )?;
        Ok(record)
    });
    if let Ok(info) = dir.read_info() {
        if dir.alive() {
            launch::end_process(&dir, info.pid, Duration::from_secs(10));
        }
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
