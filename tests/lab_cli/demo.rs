//! `npc-lab demo [DIR]`: a lab from DIR's cluster files (the files without NetworkPolicies),
//! the matrix, then DIR's policy files copied into the directory the agent watches, the matrix
//! again, and which connections the policies closed. The lab is removed at the end, also on
//! failure or interruption.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    manifests::{self, Protocol},
    probe::{self, Cell, Column, Matrix},
    state,
    up::{self, UpOptions},
};

pub struct DemoOptions {
    pub dir: PathBuf,
    pub name: String,
    pub routed: bool,
    pub agent: Option<PathBuf>,
    pub ready_timeout: Duration,
    pub timeout: Duration,
    pub parallel: usize,
    /// How long the agent gets to apply the policies.
    pub settle: Duration,
}

/// Splits DIR's manifest files into cluster files and policy files.
pub fn split_files(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut cluster = Vec::new();
    let mut policies = Vec::new();
    for file in manifests::manifest_files(dir)? {
        let text = fs::read_to_string(&file)?;
        let mut c = manifests::Cluster::default();
        manifests::add_file(&mut c, &file, &text)?;
        let summary = &c.files[0];
        if summary.has("NetworkPolicy") {
            ensure!(
                summary.kinds.len() == 1,
                "{} mixes NetworkPolicies with other objects: the demo applies policy files \
                 as a whole, after the cluster is up",
                file.display()
            );
            policies.push(file);
        } else {
            cluster.push(file);
        }
    }
    ensure!(
        !cluster.is_empty(),
        "{} has no cluster file (Namespaces and Pods)",
        dir.display()
    );
    ensure!(!policies.is_empty(), "{} has no policy file", dir.display());
    Ok((cluster, policies))
}

/// Copies `file` into `dir` atomically (a temporary name the agent ignores, then a rename).
fn install(file: &Path, dir: &Path) -> Result<()> {
    let name = file.file_name().context("file name")?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    fs::copy(file, &tmp).with_context(|| format!("copying {}", file.display()))?;
    fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

pub fn run(opts: &DemoOptions) -> Result<()> {
    state::check_name(&opts.name)?;
    let (cluster_files, policy_files) = split_files(&opts.dir)?;
    let workdir = state::lab_dir(&opts.name);
    let manifests_dir = workdir.join("manifests");
    {
        let _held = up::lifecycle();
        if let Some(old) = state::read(&opts.name)? {
            ensure!(
                !old.alive(),
                "lab {:?} is up: `npc-lab down --name {}` first",
                opts.name,
                opts.name
            );
            up::teardown(&opts.name)?;
        }
        state::remove_dir(&workdir)?;
        fs::create_dir_all(&manifests_dir)?;
    }
    let result = demo(opts, &cluster_files, &policy_files, &manifests_dir);
    let _held = up::lifecycle();
    let down = up::teardown(&opts.name);
    let rm = state::remove_dir(&workdir);
    println!("\nlab {} removed", opts.name);
    result?;
    down?;
    rm
}

fn demo(
    opts: &DemoOptions,
    cluster_files: &[PathBuf],
    policy_files: &[PathBuf],
    manifests_dir: &Path,
) -> Result<()> {
    for f in cluster_files {
        install(f, manifests_dir)?;
    }
    let names = |fs: &[PathBuf]| -> String {
        fs.iter()
            .map(|f| {
                f.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "==> bringing up the lab from {} ({})",
        opts.dir.display(),
        names(cluster_files)
    );
    let st = up::up(&UpOptions {
        dir: manifests_dir.to_path_buf(),
        name: opts.name.clone(),
        routed: opts.routed,
        agent: opts.agent.clone(),
        ready_timeout: opts.ready_timeout,
        verbose: true,
    })?;

    println!("\n==> reachability without policies");
    let before = probe::run(&st, opts.timeout, opts.parallel)?;
    print!("{}", probe::render(&before));

    println!(
        "\n==> applying {} (copied into {}, which the agent watches)",
        names(policy_files),
        manifests_dir.display()
    );
    let mut policies = manifests::Cluster::default();
    for f in policy_files {
        manifests::add_file(&mut policies, f, &fs::read_to_string(f)?)?;
        install(f, manifests_dir)?;
    }
    for p in &policies.policies {
        println!("    NetworkPolicy {p}");
    }
    if st.agent.is_none() {
        println!("    (no agent: nothing enforces them, the matrix will not change)");
    }
    thread::sleep(opts.settle);

    println!("\n==> reachability with policies");
    let after = probe::run(&st, opts.timeout, opts.parallel)?;
    print!("{}", probe::render(&after));

    println!("\n==> what the policies changed");
    print!("{}", changes(&before, &after));
    if st.agent.is_some() && after.connections() == before.connections() {
        bail!(
            "the policies changed nothing: is the agent applying {}? (log: {})",
            manifests_dir.display(),
            st.agent
                .as_ref()
                .map(|a| a.log.display().to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Per server port: the clients that lost (or gained) the connection.
pub fn changes(before: &Matrix, after: &Matrix) -> String {
    // Server ports in the matrix's column order.
    type Key = (usize, String, u16, Protocol);
    let key = |col: &Column| -> Key {
        let at = after
            .columns
            .iter()
            .position(|c| c == col)
            .unwrap_or(usize::MAX);
        (at, col.pod.clone(), col.port, col.protocol)
    };
    let was: BTreeMap<(Key, String), Cell> = before
        .connections()
        .into_iter()
        .map(|(client, col, cell)| ((key(&col), client), cell))
        .collect();
    let short = probe::short_names(&after.clients);
    let show = |pod: &str| short.get(pod).cloned().unwrap_or_else(|| pod.to_string());
    let mut closed: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    let mut opened: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    let mut open: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    for (client, col, cell) in after.connections() {
        let k = key(&col);
        let name = show(&client);
        match (was.get(&(k.clone(), client)), cell) {
            (Some(Cell::Ok), Cell::Blocked | Cell::Partial) => {
                closed.entry(k).or_default().push(name)
            }
            (Some(Cell::Blocked | Cell::Partial), Cell::Ok) => {
                opened.entry(k.clone()).or_default().push(name.clone());
                open.entry(k).or_default().push(name)
            }
            (_, Cell::Ok) => open.entry(k).or_default().push(name),
            _ => {}
        }
    }
    let label = |k: &Key| format!("{}:{}", show(&k.1), probe::port_label(k.2, k.3));
    let mut out = String::new();
    let total: usize = closed.values().map(Vec::len).sum();
    if total == 0 {
        out.push_str("no connection was closed\n");
    } else {
        writeln!(out, "{total} connections are now blocked:").unwrap();
        let w = closed.keys().map(|k| label(k).len()).max().unwrap_or(0);
        for (k, clients) in &closed {
            let open = open
                .get(k)
                .map_or_else(|| "nobody".to_string(), |v| v.join(", "));
            writeln!(
                out,
                "  {:w$}  blocked from {}; open to {open}",
                label(k),
                clients.join(", ")
            )
            .unwrap();
        }
    }
    for (k, clients) in &opened {
        writeln!(out, "  {} newly open from {}", label(k), clients.join(", ")).unwrap();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Probe;

    fn matrix(oks: &[bool]) -> Matrix {
        let col = |pod: &str| Column {
            pod: pod.into(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let p = |from: &str, to: &str, ok| Probe {
            from: from.into(),
            to: to.into(),
            address: "10.0.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            ok,
            outcome: String::new(),
            ms: 0,
        };
        Matrix {
            lab: "t".into(),
            timeout_ms: 1,
            elapsed_ms: 1,
            clients: vec!["n/a".into(), "n/b".into(), "n/c".into()],
            columns: vec![col("n/a")],
            probes: vec![p("n/b", "n/a", oks[0]), p("n/c", "n/a", oks[1])],
        }
    }

    #[test]
    fn changes_lists_closed_connections() {
        let out = changes(&matrix(&[true, true]), &matrix(&[true, false]));
        assert_eq!(
            out,
            "1 connections are now blocked:\n  a:80  blocked from c; open to b\n"
        );
        assert_eq!(
            changes(&matrix(&[true, true]), &matrix(&[true, true])),
            "no connection was closed\n"
        );
        assert!(changes(&matrix(&[false, true]), &matrix(&[true, true])).contains("newly open"));
    }

    #[test]
    fn example_files_split() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sock-shop");
        let (cluster, policies) = split_files(&dir).unwrap();
        assert_eq!(cluster.len(), 1);
        assert_eq!(policies.len(), 1);
        assert!(policies[0].ends_with("policies.yaml"));
    }
}
