//! Agent templates: what an agent needs to run in sbx, as a file. A
//! template names a base image, the steps that install the agent into it
//! (run once, in an sbx session, by [`build`]), the environment and the
//! user the agent runs as, and the policy rules it needs (its model API
//! host, its API key as an sbx secret that the guest only sees as a
//! placeholder). The shipped ones are in the repository's `templates/`;
//! a user's go in the config directory's `templates/`, or anywhere, by path.

mod build;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

pub use build::{build, image_of, Progress};

/// The templates shipped with sbx (`templates/*.toml`).
const SHIPPED: [(&str, &str); 4] = [
    (
        "claude-code",
        include_str!("../../templates/claude-code.toml"),
    ),
    ("codex", include_str!("../../templates/codex.toml")),
    ("gemini", include_str!("../../templates/gemini.toml")),
    ("shell", include_str!("../../templates/shell.toml")),
];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A template file that does not parse: where, and what.
    #[error("{file}:{line}: {message}")]
    Parse {
        file: String,
        line: usize,
        message: String,
    },
    #[error("no template named {0}; `sbx template ls` lists them, or give a path to a .toml file")]
    NotFound(String),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template {template}: build step {step} failed with status {status}: {command}")]
    Step {
        template: String,
        step: usize,
        status: u8,
        command: String,
    },
    #[error(transparent)]
    Session(#[from] sandbox::Error),
    #[error(transparent)]
    Image(#[from] sbx_image::ImageError),
}

pub type Result<T, E = TemplateError> = std::result::Result<T, E>;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The image it builds on (a name in the image store).
    pub image: String,
    /// Who commands run as (default: root).
    #[serde(default)]
    pub user: Option<String>,
    /// What starts the agent (`sbx run --template NAME` with no command).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub build: Build,
    #[serde(default)]
    pub policy: PolicyText,
    /// Where it was read from (a path, or `shipped`).
    #[serde(skip)]
    pub origin: String,
    /// Its text, for the recipe hash.
    #[serde(skip)]
    text: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// Shell commands run as root, in order, in a session from `image`.
    #[serde(default)]
    pub steps: Vec<String>,
    /// The preset the build session runs under (default: balanced, which
    /// reaches the common package registries).
    #[serde(default)]
    pub preset: Option<String>,
    /// More rules for the build session only.
    #[serde(default)]
    pub policy: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyText {
    /// Rules (policy file syntax) added to the agent's sessions.
    #[serde(default)]
    pub text: Option<String>,
}

impl Template {
    /// Parses a template; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Template> {
        let mut t: Template = toml::from_str(text).map_err(|e| TemplateError::Parse {
            file: origin.to_string(),
            line: e.span().map_or(1, |s| {
                text[..s.start.min(text.len())].matches('\n').count() + 1
            }),
            message: e.message().to_string(),
        })?;
        if t.name.is_empty()
            || !t
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(TemplateError::Parse {
                file: origin.to_string(),
                line: 1,
                message: format!("name {:?} must be letters, digits, '-', '_' or '.'", t.name),
            });
        }
        t.origin = origin.to_string();
        t.text = text.to_string();
        Ok(t)
    }

    /// What identifies a build of this template: its text and its base
    /// image's digest. A changed template or base makes a new build.
    pub fn recipe(&self, base_digest: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.text.as_bytes());
        h.update([0]);
        h.update(base_digest.as_bytes());
        format!("{:x}", h.finalize())[..16].to_string()
    }

    /// The image its build is stored as.
    pub fn image_name(&self) -> String {
        format!("template/{}", self.name)
    }

    /// Its rules as a named policy text for a session's selection.
    pub fn policy_text(&self) -> Option<(String, String)> {
        self.policy
            .text
            .clone()
            .map(|t| (format!("template {} ({})", self.name, self.origin), t))
    }

    /// The file it was read from, as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Its environment as `NAME=VALUE` words.
    pub fn env_words(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

/// The user's own templates: `<config dir>/templates/*.toml`.
fn user_dir() -> PathBuf {
    sbx_policy::Locations::here().config.join("templates")
}

/// The template `name_or_path` names: a path to a .toml file, a user's
/// template, or a shipped one (a user's of the same name wins).
pub fn find(name_or_path: &str) -> Result<Template> {
    let path = Path::new(name_or_path);
    if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
        return read(path);
    }
    let user = user_dir().join(format!("{name_or_path}.toml"));
    if user.is_file() {
        return read(&user);
    }
    SHIPPED
        .iter()
        .find(|(n, _)| *n == name_or_path)
        .map(|(n, text)| Template::parse(text, &format!("shipped template {n}")))
        .unwrap_or_else(|| Err(TemplateError::NotFound(name_or_path.to_string())))
}

fn read(path: &Path) -> Result<Template> {
    let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Template::parse(&text, &path.display().to_string())
}

/// Every template there is: the user's, then the shipped ones they do not replace.
pub fn all() -> Vec<Result<Template>> {
    let mut out: Vec<Result<Template>> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(user_dir()) {
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        paths.sort();
        out.extend(paths.iter().map(|p| read(p)));
    }
    for (name, text) in SHIPPED {
        let replaced = out.iter().any(|t| t.as_ref().is_ok_and(|t| t.name == name));
        if !replaced {
            out.push(Template::parse(text, &format!("shipped template {name}")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_templates_parse_and_their_rules_are_valid_policy() {
        for (name, text) in SHIPPED {
            let t = Template::parse(text, name).unwrap();
            assert_eq!(t.name, name);
            for rules in t.policy.text.iter().chain(&t.build.policy) {
                let mut b = sbx_policy::PolicyBuilder::new();
                b.add_text(name, rules)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                b.build().unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }

    #[test]
    fn a_bad_template_names_its_line() {
        let e = Template::parse("name = \"x\"\nimage = \"base\"\nbogus = 1\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:3:"), "{e}");
        let e = Template::parse("name = \"a b\"\nimage = \"base\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("letters, digits"), "{e}");
        assert!(matches!(
            find("no-such-template"),
            Err(TemplateError::NotFound(_))
        ));
    }
}
