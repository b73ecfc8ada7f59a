//! `sbx template`: agent templates (an image, install steps, environment
//! and policy rules), built once into images that sessions start from.

use anyhow::Context;

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx template ls
  sbx template build claude-code          install it once (through the egress proxy)
  sbx secret set ANTHROPIC_API_KEY        the agent sees a placeholder, never the key
  sbx run --template claude-code          start the agent in a fresh sandbox
  sbx start --name work --template codex  keep a session with its own disk

Your own templates go in ~/.config/sbx/templates/NAME.toml (see `sbx
template show shell` for the format), or pass a path to a .toml file.")]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// List templates and whether each is built.
    Ls(LsArgs),
    /// Print a template's file.
    Show(NameArg),
    /// Build templates' images (runs their install steps in a session).
    Build(BuildArgs),
}

#[derive(clap::Args)]
struct LsArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct NameArg {
    /// A template name, or a path to a .toml file.
    name: String,
}

#[derive(clap::Args)]
struct BuildArgs {
    #[arg(required = true)]
    names: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<u8> {
    match a.command {
        Cmd::Ls(o) => {
            let store = sandbox::disks::image_store()?;
            let mut rows = Vec::new();
            for t in sbx_template::all() {
                let t = t?;
                let built = sbx_template::image_of(&t, &store).ok().flatten();
                rows.push(serde_json::json!({
                    "name": t.name,
                    "description": t.description,
                    "image": t.image,
                    "user": t.user,
                    "built": built.as_ref().map(|b| b.name.clone()),
                    "origin": t.origin,
                }));
            }
            if o.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            println!("{:<14} {:<8} {:<6} DESCRIPTION", "NAME", "IMAGE", "BUILT");
            for r in &rows {
                println!(
                    "{:<14} {:<8} {:<6} {}",
                    r["name"].as_str().unwrap_or_default(),
                    r["image"].as_str().unwrap_or_default(),
                    if r["built"].is_null() { "no" } else { "yes" },
                    r["description"].as_str().unwrap_or_default()
                );
            }
        }
        Cmd::Show(n) => {
            let t = sbx_template::find(&n.name)?;
            println!("# {}\n{}", t.origin, t.text());
        }
        Cmd::Build(b) => {
            let sbx = std::env::current_exe().context("cannot find the sbx binary")?;
            for name in &b.names {
                let t = sbx_template::find(name)?;
                let started = std::time::Instant::now();
                let rec = sbx_template::build(&t, &sbx, &crate::image_cmd::progress)
                    .with_context(|| format!("cannot build template {name}"))?;
                eprintln!(
                    "sbx: template {name} is image {} ({:.1} s)",
                    rec.name,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(0)
}
