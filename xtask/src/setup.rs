//! `cargo xtask setup`: installs what building and testing npc need, only what is missing, so it
//! is cheap to run before every test run.

use std::{fs, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{self, command};

/// LLVM major of Debian's llvm-N-dev that bpf-linker links against. It must match the LLVM of the
/// Rust toolchain pinned in rust-toolchain.toml, or bpf-linker cannot read rustc's bitcode.
const LLVM_MAJOR: u32 = 22;
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages: LLVM and its link dependencies for building bpf-linker; `ip netns`, ping and
/// pkill/pgrep for the tests.
fn apt_packages() -> Vec<String> {
    vec![
        format!("llvm-{LLVM_MAJOR}-dev"),
        format!("libpolly-{LLVM_MAJOR}-dev"),
        "zlib1g-dev".into(),
        "libzstd-dev".into(),
        "iproute2".into(),
        "iputils-ping".into(),
        "procps".into(),
    ]
}

pub fn run() -> anyhow::Result<()> {
    // Order matters: bpf-linker builds against the apt LLVM and with the pinned toolchain.
    step("apt packages", apt)?;
    step("rust toolchain", toolchain)?;
    step("bpf-linker", bpf_linker)?;
    step("kubectl", kubectl)?;
    Ok(())
}

fn step(name: &str, f: fn(&str) -> anyhow::Result<String>) -> anyhow::Result<()> {
    util::step("setup", name, || f(name))
}

fn apt(name: &str) -> anyhow::Result<String> {
    ensure_apt(name, &apt_packages())
}

/// Installs those of `packages` that are missing (apt, as root); says what it did.
pub fn ensure_apt(name: &str, packages: &[String]) -> anyhow::Result<String> {
    let mut missing = Vec::new();
    for pkg in packages.iter().cloned() {
        // Exit status 1 and no output for packages dpkg has never heard of: also missing.
        let out = util::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", &pkg]))?
            .context("dpkg-query not found: setup supports Debian (bookworm) only")?;
        if String::from_utf8_lossy(&out.stdout).trim() != "install ok installed" {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok("already present".into());
    }
    apt_install(name, &missing)?;
    Ok(format!("installed {}", missing.join(" ")))
}

/// `apt-get update`, then `apt-get install` of `missing` (as root).
fn apt_install(name: &str, missing: &[String]) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!(
            "missing apt packages: {}; run `cargo xtask setup` as root, or install them with \
             `apt-get install {}`",
            missing.join(" "),
            missing.join(" "),
        );
    }
    println!("setup: {name}: installing {}", missing.join(" "));
    // The package lists are absent on fresh images, and llvm-22 comes from bookworm-security.
    util::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Debian's kubectl (1.20.2, with kustomize v2.0.3 built in).
const KUBECTL_PACKAGE: &str = "kubernetes-client";

/// kubectl with kustomize, which `npc-agent/tests/deploy.rs` renders `deploy/` with (the one in
/// `KUBECTL`, else `kubectl` on PATH, as the test picks it). Debian's is installed only when
/// there is no kubectl at all: its /usr/bin/kubectl conflicts with other kubectl packages, and
/// any kubectl from 1.14 on has kustomize.
fn kubectl(name: &str) -> anyhow::Result<String> {
    let program = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let kustomize = || util::output(Command::new(&program).args(["kustomize", "--help"]));
    match kustomize()? {
        Some(out) if out.status.success() => return Ok(format!("{program} already present")),
        Some(out) => bail!(
            "`{program} kustomize --help` failed ({}): this kubectl has no kustomize; use \
             kubectl >= 1.14, or point KUBECTL at one",
            out.status
        ),
        None if program != "kubectl" => bail!("KUBECTL={program}: no such program"),
        None => {}
    }
    apt_install(name, &[KUBECTL_PACKAGE.to_string()])?;
    match kustomize()? {
        Some(out) if out.status.success() => Ok(format!("installed {KUBECTL_PACKAGE}")),
        _ => bail!("installed {KUBECTL_PACKAGE}, but `kubectl kustomize --help` does not work"),
    }
}

/// The `[toolchain]` of rust-toolchain.toml, the single place the channel is written down.
struct ToolchainFile {
    channel: String,
    components: Vec<String>,
}

impl ToolchainFile {
    fn read() -> anyhow::Result<Self> {
        let path = util::workspace_root().join("rust-toolchain.toml");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        // A tiny reader for `key = "value"` and `key = ["a", "b"]` (a toml crate for two keys
        // would only slow xtask's build).
        let value = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim())
        };
        let unquote = |s: &str| s.trim().trim_matches('"').to_string();
        let channel = value("channel")
            .map(unquote)
            .with_context(|| format!("no `channel` in {}", path.display()))?;
        let components = match value("components") {
            Some(list) => list
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .map(unquote)
                .filter(|c| !c.is_empty())
                .collect(),
            None => Vec::new(),
        };
        Ok(Self {
            channel,
            components,
        })
    }
}

fn toolchain(name: &str) -> anyhow::Result<String> {
    let file = ToolchainFile::read()?;
    let channel = &file.channel;
    let missing = missing_components(&file)?;
    if missing.as_ref().is_some_and(|m| m.is_empty()) {
        return Ok(format!("{channel} already present"));
    }
    let what = match &missing {
        None => format!("{channel} with {}", file.components.join(", ")),
        Some(m) => format!("{} for {channel}", m.join(", ")),
    };
    println!("setup: {name}: installing {what}");
    // Idempotent: installs the toolchain if needed and adds the missing components.
    let mut cmd = command("rustup");
    cmd.args(["toolchain", "install", channel, "--profile", "minimal"]);
    if !file.components.is_empty() {
        cmd.args(["-c", &file.components.join(",")]);
    }
    util::run(&mut cmd)?;
    Ok(format!("installed {what}"))
}

/// The components rust-toolchain.toml asks for that the installed toolchain lacks; `None` if the
/// toolchain itself is not installed. Asking rustup first, rather than always running `rustup
/// toolchain install`, keeps setup offline and instant once everything is there.
fn missing_components(file: &ToolchainFile) -> anyhow::Result<Option<Vec<String>>> {
    let list = capture(command("rustup").args(["toolchain", "list"]))?;
    // Lines look like `1.98.0-x86_64-unknown-linux-gnu (active)`.
    let prefix = format!("{}-", file.channel);
    let Some(full) = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|t| t.starts_with(&prefix))
    else {
        return Ok(None);
    };
    let host = &full[prefix.len()..];
    let installed =
        capture(command("rustup").args(["component", "list", "--installed", "--toolchain", full]))?;
    // Host-specific components are listed with the host triple (`clippy-x86_64-...`), the others
    // (`rust-src`) without.
    let has = |c: &str| {
        installed
            .lines()
            .map(str::trim)
            .any(|l| l == c || l == format!("{c}-{host}"))
    };
    Ok(Some(
        file.components
            .iter()
            .filter(|c| !has(c))
            .cloned()
            .collect(),
    ))
}

/// Stdout of a command that must succeed.
fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = util::output(cmd)?
        .with_context(|| format!("`{}` not found (is rustup installed?)", util::display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            util::display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bpf_linker(name: &str) -> anyhow::Result<String> {
    // `bpf-linker 0.13.0`; not installed or unrunnable (e.g. its LLVM was removed) means install.
    let current = util::output(command("bpf-linker").arg("--version"))?
        .filter(|out| out.status.success())
        .and_then(|out| {
            let stdout = String::from_utf8_lossy(&out.stdout);
            stdout.split_whitespace().nth(1).map(str::to_string)
        });
    if current.as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(format!("{BPF_LINKER_VERSION} already present"));
    }
    println!(
        "setup: {name}: installing {BPF_LINKER_VERSION} (found: {})",
        current.as_deref().unwrap_or("none")
    );
    // Built from the workspace root, so with the pinned toolchain; llvm-config of the apt LLVM
    // must come first on PATH for llvm-sys to pick it.
    let llvm_bin = format!("/usr/lib/llvm-{LLVM_MAJOR}/bin").into();
    let path =
        util::path_with(&[vec![llvm_bin], util::cargo_bin_dir().into_iter().collect()].concat());
    let mut cmd = command("cargo");
    cmd.env("PATH", path)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{LLVM_MAJOR}"));
    util::run(&mut cmd)?;
    Ok(format!("installed {BPF_LINKER_VERSION}"))
}
