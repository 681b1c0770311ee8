//! The command line: `npc-agent [GLOBAL OPTIONS] [run] [RUN OPTIONS]`,
//! `npc-agent [GLOBAL OPTIONS] dump [MAP] [--json]` and `npc-agent [GLOBAL OPTIONS] cleanup`.
//!
//! `run` is the default subcommand: `npc-agent --bpffs DIR --audit` is `npc-agent --bpffs DIR run
//! --audit`. Global options may stand before or after the subcommand.
use std::{ffi::OsString, fmt, path::PathBuf, str::FromStr};

use clap::{
    Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum,
    error::ErrorKind, parser::ValueSource,
};
use npc_common::{CONFIG_ALLOW_HOST, CONFIG_AUDIT, CONFIG_UNKNOWN_ALLOW, Config, capacity};

use crate::{
    dataplane::{AttachMode, LoadOptions},
    run::{InterfaceFilter, Options, PolicySource},
};

/// Largest `--events-per-sec` and `--events-burst`: the datapath's token bucket multiplies them
/// (scaled by 10^9) in 64 bits, so their product must stay well below 1.8 * 10^10.
pub const MAX_EVENTS: u32 = 100_000;

/// npc: Kubernetes NetworkPolicy enforced by eBPF on every pod's host veth.
#[derive(Debug, Parser)]
#[command(
    name = "npc-agent",
    version,
    override_usage = "npc-agent [GLOBAL OPTIONS] [run] [RUN OPTIONS]\n       \
                      npc-agent [GLOBAL OPTIONS] dump [MAP] [--json]\n       \
                      npc-agent [GLOBAL OPTIONS] cleanup",
    after_help = "Without a subcommand, `run` is assumed: `npc-agent --audit` is \
                  `npc-agent run --audit`.\nThe options under Paths and Logging are the global \
                  options: they may stand before or after the subcommand.\nThe log level comes from RUST_LOG (default: info), \
                  e.g. RUST_LOG=debug or RUST_LOG=npc_agent=debug,warn."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The options of `run`, when no subcommand is given.
    #[command(flatten)]
    pub run: RunArgs,

    /// After the options of `run`, so that `--help` lists them last.
    #[command(flatten)]
    pub global: GlobalArgs,
}

impl Cli {
    /// Parses the process's arguments; on bad input prints what is wrong and exits with
    /// status 2 (0 for `--help` and `--version`).
    pub fn parse_args() -> Cli {
        Cli::try_parse_args_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the first one is the program name). Use this rather than
    /// [`Parser::try_parse_from`]: it also rejects options of the implicit `run` given
    /// together with a subcommand (`npc-agent --audit cleanup`), which clap cannot express
    /// while global options may precede the subcommand.
    pub fn try_parse_args_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut cmd = Cli::command();
        let matches = cmd.try_get_matches_from_mut(args)?;
        if let Some((subcommand, _)) = matches.subcommand() {
            let run_args = RunArgs::augment_args(clap::Command::new("run"));
            let misplaced = run_args.get_arguments().find(|arg| {
                matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine)
            });
            if let Some(arg) = misplaced {
                let name = arg
                    .get_long()
                    .map_or_else(|| arg.get_id().to_string(), |l| format!("--{l}"));
                let message = if subcommand == "run" {
                    format!("'{name}' must come after 'run' (or leave out 'run')")
                } else {
                    format!("'{name}' is an option of 'run', not of '{subcommand}'")
                };
                return Err(cmd.error(ErrorKind::ArgumentConflict, message));
            }
        }
        Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
    }

    /// The subcommand to execute (`run` when none was given).
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Run(self.run))
    }
}

/// `--help` groups (`help_heading`): every argument names one (a unit test checks it).
pub mod heading {
    pub const POLICY_SOURCE: &str = "Policy source";
    pub const DATAPATH: &str = "Datapath";
    pub const HTTP: &str = "HTTP";
    pub const PATHS: &str = "Paths";
    pub const LOGGING: &str = "Logging";
    /// `dump`'s positional argument (clap's usual title for them).
    pub const ARGUMENTS: &str = "Arguments";
    pub const OUTPUT: &str = "Output";
}

/// Options every subcommand takes.
#[derive(Clone, Debug, Args)]
pub struct GlobalArgs {
    /// Directory where the datapath's maps are pinned (a new agent adopts the maps it finds
    /// there); a bpffs is mounted there when the directory is not on one (e.g. under `ip netns
    /// exec`, which hides /sys/fs/bpf).
    #[arg(
        long,
        global = true,
        env = "NPC_BPFFS",
        value_name = "DIR",
        default_value = "/sys/fs/bpf/npc",
        value_parser = parse_dir,
        help_heading = heading::PATHS
    )]
    pub bpffs: PathBuf,

    /// Directory where the agent publishes what the numbers in the maps stand for (pods,
    /// identities, rules: names.json), for `dump`.
    #[arg(
        long,
        global = true,
        env = "NPC_STATE_DIR",
        value_name = "DIR",
        default_value = "/run/npc",
        value_parser = parse_dir,
        help_heading = heading::PATHS
    )]
    pub state_dir: PathBuf,

    /// Format of the log lines on stderr; the level comes from RUST_LOG (default: info).
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value_t = LogFormat::Text,
        help_heading = heading::LOGGING
    )]
    pub log_format: LogFormat,
}

#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Load the datapath, attach it to pod interfaces and enforce the policy (the default); its
    /// pinned links keep enforcing after SIGTERM, for the next agent to adopt.
    Run(RunArgs),
    /// Print the pinned maps decoded, with pod, namespace and policy names next to the numbers.
    ///
    /// Only reads: the maps are opened read-only, and deny events are left to the agent. Works
    /// while the agent runs or after it stopped (its maps stay pinned under --bpffs); the names
    /// come from the agent's --state-dir (numbers only when absent).
    Dump(DumpArgs),
    /// Remove every pin under --bpffs (maps and links): detaches npc from every interface.
    ///
    /// Stop the agent first (uninstall): its programs stay attached through the pinned links
    /// after it stops, and removing them while it runs detaches it too.
    Cleanup,
}

/// Options of `dump`.
#[derive(Clone, Debug, Args)]
pub struct DumpArgs {
    /// What to print: every map (`all`), one map, or `identities` (what each identity number
    /// stands for, from the agent's names).
    #[arg(
        value_name = "MAP",
        default_value = "all",
        value_parser = crate::dump::Selection::parser(),
        help_heading = heading::ARGUMENTS
    )]
    pub map: crate::dump::Selection,

    /// Print one JSON object with a key per map (field names documented in `npc_agent::dump`)
    /// instead of tables.
    #[arg(long, help_heading = heading::OUTPUT)]
    pub json: bool,
}

/// Options of `run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Take Namespaces, Pods and NetworkPolicies from the YAML/JSON manifests in DIR (watched:
    /// changes apply within a second) instead of the Kubernetes API. Without it (and without
    /// --datapath-only) the agent watches the API server, with the in-cluster config or
    /// KUBECONFIG.
    #[arg(long, value_name = "DIR", help_heading = heading::POLICY_SOURCE)]
    pub manifests: Option<PathBuf>,

    /// No policy source: attach the datapath with its defaults only (every pod is an unknown
    /// endpoint, see --unknown-endpoints). For trying the attachment.
    #[arg(
        long,
        conflicts_with = "manifests",
        help_heading = heading::POLICY_SOURCE
    )]
    pub datapath_only: bool,

    /// This node's name: pods with this `spec.nodeName` are local. Required in Kubernetes mode
    /// (set it from the downward API's spec.nodeName); in manifests mode, when absent every pod
    /// is local.
    #[arg(
        long,
        env = "NODE_NAME",
        value_name = "NAME",
        help_heading = heading::POLICY_SOURCE
    )]
    pub node_name: Option<String>,

    /// Address of the HTTP endpoint: /metrics (OpenMetrics text), /healthz, and /readyz (200
    /// once the initial policy state is in the maps).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:9090",
        help_heading = heading::HTTP
    )]
    pub metrics_addr: std::net::SocketAddr,

    /// How to attach to interfaces: tcx links (kernel >= 6.6) or cls_bpf filters under a clsact
    /// qdisc; `auto` picks tcx where the kernel has it.
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value_t = AttachModeArg::Auto,
        help_heading = heading::DATAPATH
    )]
    pub attach_mode: AttachModeArg,

    /// Attach to the interfaces whose name matches GLOB, whatever their kind, instead of to
    /// every veth (`*` matches any run of characters, `?` one character; repeatable) [default:
    /// every veth]
    #[arg(long = "interfaces", value_name = "GLOB", help_heading = heading::DATAPATH)]
    pub interfaces: Vec<Glob>,

    /// What happens to a packet whose local address is no known endpoint, e.g. a pod not yet
    /// known to the agent (it is counted either way).
    #[arg(
        long,
        value_enum,
        value_name = "VERDICT",
        default_value_t = UnknownEndpoints::Deny,
        help_heading = heading::DATAPATH
    )]
    pub unknown_endpoints: UnknownEndpoints,

    /// What happens to traffic from the node's own addresses to local pods (kubelet probes,
    /// host-network pods).
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value_t = HostTraffic::Allow,
        help_heading = heading::DATAPATH
    )]
    pub host_traffic: HostTraffic,

    /// Audit mode: denials are counted and reported (metrics, deny log) but not enforced;
    /// every packet passes. Off by default.
    #[arg(long, help_heading = heading::DATAPATH)]
    pub audit: bool,

    /// Capacity of the conntrack table (flows). A conntrack map pinned by an earlier agent is
    /// reused only if it has this size: run `cleanup` first to change it.
    #[arg(
        long,
        value_name = "N",
        default_value_t = capacity::CONNTRACK,
        value_parser = clap::value_parser!(u32).range(1..),
        help_heading = heading::DATAPATH
    )]
    pub conntrack_size: u32,

    /// Distinct (direction, protocol, port) cells counting blocked connections (the
    /// `dport` label of npc_blocked_connections_total); ports beyond them are counted under
    /// dport="other". Like --conntrack-size, a pinned map of another size needs `cleanup` first.
    #[arg(
        long,
        value_name = "N",
        default_value_t = capacity::BLOCKED,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000),
        help_heading = heading::DATAPATH
    )]
    pub blocked_ports: u32,

    /// Denied-connection events (the deny log) each CPU may report per second; 0 disables
    /// them. Denials beyond the rate are still counted in the metrics.
    #[arg(
        long,
        value_name = "N",
        default_value_t = Config::default().events_per_sec,
        value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_EVENTS)),
        help_heading = heading::DATAPATH
    )]
    pub events_per_sec: u32,

    /// Denied-connection events each CPU may report at once, after a quiet period (the
    /// bucket size of the --events-per-sec rate limit).
    #[arg(
        long,
        value_name = "N",
        default_value_t = Config::default().events_burst,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_EVENTS)),
        help_heading = heading::DATAPATH
    )]
    pub events_burst: u32,
}

impl RunArgs {
    /// The datapath's runtime switches these options ask for.
    pub fn config(&self) -> Config {
        let mut flags = 0;
        if self.unknown_endpoints == UnknownEndpoints::Allow {
            flags |= CONFIG_UNKNOWN_ALLOW;
        }
        if self.host_traffic == HostTraffic::Allow {
            flags |= CONFIG_ALLOW_HOST;
        }
        if self.audit {
            flags |= CONFIG_AUDIT;
        }
        Config {
            flags,
            events_per_sec: self.events_per_sec,
            events_burst: self.events_burst,
            ..Config::default()
        }
    }

    /// What [`crate::run::run`] needs, with the maps pinned under `bpffs` and the names
    /// published in `state_dir`.
    pub fn into_options(self, bpffs: PathBuf, state_dir: PathBuf) -> Options {
        let config = self.config();
        Options {
            source: match (&self.manifests, self.datapath_only) {
                (Some(dir), _) => PolicySource::Manifests(dir.clone()),
                (None, true) => PolicySource::DatapathOnly,
                (None, false) => PolicySource::Kubernetes,
            },
            node_name: self.node_name.clone(),
            metrics_addr: self.metrics_addr,
            state_dir,
            load: LoadOptions {
                bpffs,
                conntrack_capacity: self.conntrack_size,
                blocked_capacity: self.blocked_ports,
                config,
                attach_mode: match self.attach_mode {
                    AttachModeArg::Auto => None,
                    AttachModeArg::Tcx => Some(AttachMode::Tcx),
                    AttachModeArg::Clsact => Some(AttachMode::Clsact),
                },
            },
            interfaces: if self.interfaces.is_empty() {
                InterfaceFilter::Veths
            } else {
                InterfaceFilter::Names(self.interfaces)
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the event's fields at the top level.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachModeArg {
    /// tcx where the kernel has it (>= 6.6), else clsact.
    Auto,
    /// tcx links, first in the chain.
    Tcx,
    /// cls_bpf filters under a clsact qdisc.
    Clsact,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UnknownEndpoints {
    /// Pass them.
    Allow,
    /// Drop them.
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HostTraffic {
    /// Always allowed, whatever the policies say.
    Allow,
    /// Subject to the pods' ingress policies like any other source.
    Policy,
}

fn parse_dir(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the directory must not be empty".into());
    }
    Ok(PathBuf::from(s))
}

/// A shell-style pattern over interface names: `*` matches any run of characters (also none),
/// `?` exactly one; every other character matches itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(Vec<char>);

impl Glob {
    pub fn matches(&self, name: &str) -> bool {
        let pattern = &self.0;
        let name: Vec<char> = name.chars().collect();
        let (mut p, mut n) = (0, 0);
        // The last `*` seen, and the name position it is currently taken to extend to: on a
        // mismatch, that star swallows one more character and matching resumes after it.
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            match pattern.get(p) {
                Some('*') => {
                    star = Some((p, n));
                    p += 1;
                }
                Some(&c) if c == '?' || c == name[n] => {
                    p += 1;
                    n += 1;
                }
                _ => match star {
                    Some((star_p, star_n)) => {
                        star = Some((star_p, star_n + 1));
                        p = star_p + 1;
                        n = star_n + 1;
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|&c| c == '*')
    }
}

impl FromStr for Glob {
    type Err = String;

    fn from_str(s: &str) -> Result<Glob, String> {
        if s.is_empty() {
            return Err("the pattern must not be empty".into());
        }
        Ok(Glob(s.chars().collect()))
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|c| write!(f, "{c}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump::{Section, Selection};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_args_from(std::iter::once("npc-agent").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> (GlobalArgs, RunArgs) {
        let cli = parse(args).unwrap();
        let global = cli.global.clone();
        match cli.into_command() {
            Command::Run(run) => (global, run),
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every argument of every subcommand has a help text and a `--help` group (clap's own
    /// --help and --version aside), and the groups show up in `--help`.
    #[test]
    fn every_argument_has_help_and_a_heading() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut commands = vec![&cmd];
        commands.extend(cmd.get_subcommands().filter(|sub| sub.get_name() != "help"));
        let mut checked = std::collections::BTreeSet::new();
        for command in commands {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let name = format!("{} {id}", command.get_name());
                assert!(
                    arg.get_help()
                        .is_some_and(|help| !help.to_string().trim().is_empty()),
                    "{name} has no help"
                );
                assert!(arg.get_help_heading().is_some(), "{name} has no heading");
                checked.insert(id.to_string());
            }
        }
        for id in [
            "bpffs",
            "state_dir",
            "log_format",
            "manifests",
            "metrics_addr",
            "events_burst",
            "map",
            "json",
        ] {
            assert!(checked.contains(id), "{id} not checked: {checked:?}");
        }
        let help = cmd.render_long_help().to_string();
        for heading in [
            heading::POLICY_SOURCE,
            heading::DATAPATH,
            heading::HTTP,
            heading::PATHS,
            heading::LOGGING,
        ] {
            assert!(help.contains(&format!("{heading}:")), "{heading} in {help}");
        }
        for shown in [
            "[env: NODE_NAME=]",
            "[env: NPC_BPFFS=]",
            "[default: 0.0.0.0:9090]",
        ] {
            assert!(help.contains(shown), "{shown} in {help}");
        }
        let mut dump = Cli::command();
        // Propagates the global options to the subcommands.
        dump.build();
        let dump_help = dump
            .find_subcommand_mut("dump")
            .unwrap()
            .render_long_help()
            .to_string();
        for heading in [heading::ARGUMENTS, heading::OUTPUT, heading::PATHS] {
            assert!(dump_help.contains(&format!("{heading}:")), "{dump_help}");
        }
    }

    #[test]
    fn defaults() {
        let (global, run) = run_args(&[]);
        assert_eq!(global.log_format, LogFormat::Text);
        assert_eq!(run.conntrack_size, capacity::CONNTRACK);
        assert_eq!(run.blocked_ports, capacity::BLOCKED);
        // Deny unknown endpoints, allow the host: the datapath's own defaults.
        assert_eq!(run.config(), Config::default());
        assert_eq!(global.bpffs, PathBuf::from("/sys/fs/bpf/npc"));
        assert_eq!(global.state_dir, PathBuf::from("/run/npc"));
        let opts = run.into_options(global.bpffs, global.state_dir);
        assert_eq!(opts.state_dir, PathBuf::from("/run/npc"));
        assert_eq!(opts.load.bpffs, PathBuf::from("/sys/fs/bpf/npc"));
        assert_eq!(opts.interfaces, InterfaceFilter::Veths);
        assert_eq!(opts.load.conntrack_capacity, capacity::CONNTRACK);
    }

    #[test]
    fn run_is_the_default_subcommand() {
        let args = [
            "--bpffs",
            "/x",
            "--unknown-endpoints",
            "allow",
            "--host-traffic",
            "policy",
            "--audit",
            "--interfaces",
            "cali*",
            "--interfaces",
            "veth?",
            "--conntrack-size",
            "1000",
            "--blocked-ports",
            "7",
            "--events-per-sec",
            "0",
            "--events-burst",
            "5",
        ];
        let (global, implicit) = run_args(&args);
        let mut explicit_args = vec!["--bpffs", "/x", "run"];
        explicit_args.extend_from_slice(&args[2..]);
        let (_, explicit) = run_args(&explicit_args);
        assert_eq!(global.bpffs, PathBuf::from("/x"));
        for run in [implicit, explicit] {
            assert_eq!(
                run.config(),
                Config {
                    flags: CONFIG_UNKNOWN_ALLOW | CONFIG_AUDIT,
                    events_per_sec: 0,
                    events_burst: 5,
                    _pad: 0,
                }
            );
            assert_eq!(run.conntrack_size, 1000);
            assert_eq!(run.blocked_ports, 7);
            let names: Vec<String> = run.interfaces.iter().map(|g| g.to_string()).collect();
            assert_eq!(names, ["cali*", "veth?"]);
        }
    }

    #[test]
    fn global_options_go_anywhere() {
        let (global, _) = run_args(&["run", "--bpffs", "/y", "--log-format", "json"]);
        assert_eq!(global.bpffs, PathBuf::from("/y"));
        assert_eq!(global.log_format, LogFormat::Json);
        let cli = parse(&["cleanup", "--bpffs", "/z"]).unwrap();
        assert_eq!(cli.global.bpffs, PathBuf::from("/z"));
        assert!(matches!(cli.into_command(), Command::Cleanup));
        let (global, run) = run_args(&["--state-dir", "/s", "run", "--audit"]);
        assert_eq!(global.state_dir, PathBuf::from("/s"));
        assert_eq!(
            run.into_options(global.bpffs, global.state_dir).state_dir,
            PathBuf::from("/s")
        );
        let (global, _) = run_args(&["run", "--state-dir", "/t"]);
        assert_eq!(global.state_dir, PathBuf::from("/t"));
    }

    fn dump_args(args: &[&str]) -> (GlobalArgs, DumpArgs) {
        let cli = parse(args).unwrap();
        let global = cli.global.clone();
        match cli.into_command() {
            Command::Dump(dump) => (global, dump),
            other => panic!("expected dump, got {other:?}"),
        }
    }

    #[test]
    fn dump() {
        let (global, dump) = dump_args(&["dump"]);
        assert_eq!(dump.map, Selection::All);
        assert!(!dump.json);
        assert_eq!(global.bpffs, PathBuf::from("/sys/fs/bpf/npc"));
        assert_eq!(global.state_dir, PathBuf::from("/run/npc"));
        let (global, dump) = dump_args(&[
            "--bpffs",
            "/b",
            "dump",
            "policy",
            "--json",
            "--state-dir",
            "/s",
        ]);
        assert_eq!(dump.map, Selection::One(Section::Policy));
        assert!(dump.json);
        assert_eq!(global.bpffs, PathBuf::from("/b"));
        assert_eq!(global.state_dir, PathBuf::from("/s"));
        for name in npc_common::map_names::ALL {
            let (_, dump) = dump_args(&["dump", name]);
            assert_eq!(dump.map, Selection::from_name(name).unwrap());
        }
        let (_, dump) = dump_args(&["dump", "identities"]);
        assert_eq!(dump.map, Selection::One(Section::Identities));
        let err = parse(&["dump", "conntrak"]).unwrap_err().to_string();
        assert!(
            err.contains("conntrack") && err.contains("event_rate"),
            "{err}"
        );
    }

    #[test]
    fn bad_input_is_rejected() {
        for args in [
            &["--unknown-endpoints", "maybe"][..],
            &["--host-traffic", "deny"],
            &["--log-format", "xml"],
            &["--conntrack-size", "0"],
            &["--conntrack-size", "-1"],
            &["--events-per-sec", "100001"],
            &["--events-burst", "0"],
            &["--interfaces", ""],
            &["--bpffs", ""],
            &["--state-dir", ""],
            &["dump", "frobnicate"],
            &["dump", "policy", "conntrack"],
            &["dump", "--audit"],
            &["--audit", "dump"],
            // Run options belong to `run`, not to `cleanup`.
            &["cleanup", "--audit"],
            // Either the implicit run or a subcommand, not both.
            &["--audit", "cleanup"],
            &["--audit", "run"],
            &["frobnicate"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn globs() {
        let m = |p: &str, n: &str| p.parse::<Glob>().unwrap().matches(n);
        assert!(m("*", ""));
        assert!(m("*", "eth0"));
        assert!(m("veth*", "veth"));
        assert!(m("veth*", "veth1a2b"));
        assert!(!m("veth*", "xveth1"));
        assert!(m("*0", "eth0"));
        assert!(!m("*0", "eth01"));
        assert!(m("npc?-a", "npc1-a"));
        assert!(!m("npc?-a", "npc12-a"));
        assert!(m("npc*-a", "npc12-a"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
        assert!(m("*a*a*a", "aaaa"));
        assert!(!m("*a*a*a*b", "aaaaaaaaaa"));
        assert!(m("eth0", "eth0"));
        assert!(!m("eth0", "eth00"));
        assert!(!m("eth?", "eth"));
        assert!(m("**", "x"));
        assert!("".parse::<Glob>().is_err());
    }
}
