//! A real Kubernetes API server for tests: etcd and kube-apiserver (1.20) on free 127.0.0.1
//! ports, with their own certificates and a temporary directory, all gone on drop.
//!
//! The binaries come from `NPC_KUBE_APISERVER` and `NPC_ETCD` (`cargo xtask test` sets them),
//! else from `target/kube/`, where `cargo xtask kube-apiserver` builds them once per machine.
//!
//! Two identities: the admin (a static token in group `system:masters`, so everything, status
//! subresources included) and the agent (ServiceAccount `kube-system/npc-agent` with a real
//! TokenRequest token and an RBAC role that only reads pods, namespaces and NetworkPolicies),
//! the latter as a kubeconfig file for the agent's `KUBECONFIG`. There is no kubelet or
//! scheduler: pods stay Pending until a test writes their status.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{OnceLock, mpsc},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Api,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};

/// How long etcd, then kube-apiserver, may take to become ready (about 4 s alone; several
/// servers starting at once on a small machine take longer).
pub const START_WAIT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after SIGTERM before it gets SIGKILL. kube-apiserver
/// 1.20 takes all of it while a watch is open: it waits for open requests, and a watch lasts.
pub const STOP_WAIT: Duration = Duration::from_secs(5);
/// Attempts with other ports when one turned out to be taken.
const PORT_ATTEMPTS: usize = 5;

/// The objects of `deploy/rbac.yaml`, which must be the agent's ServiceAccount
/// ([`AGENT_NAMESPACE`]/[`AGENT_NAME`]), its ClusterRole and its ClusterRoleBinding, in order.
pub fn deploy_rbac() -> (ServiceAccount, ClusterRole, ClusterRoleBinding) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let [account, role, binding] = <[serde_json::Value; 3]>::try_from(docs)
        .unwrap_or_else(|docs| panic!("{}: {} documents, want 3", path.display(), docs.len()));
    let account: ServiceAccount = serde_json::from_value(account).unwrap();
    let role: ClusterRole = serde_json::from_value(role).unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(binding).unwrap();
    assert_eq!(account.metadata.namespace.as_deref(), Some(AGENT_NAMESPACE));
    assert_eq!(account.metadata.name.as_deref(), Some(AGENT_NAME));
    (account, role, binding)
}

/// The agent's identity.
pub const AGENT_NAMESPACE: &str = "kube-system";
pub const AGENT_NAME: &str = "npc-agent";
/// The agent's token is valid this long.
const AGENT_TOKEN_SECONDS: i64 = 24 * 3600;

// ---------------------------------------------------------------------------------------------
// The servers, as a guard
// ---------------------------------------------------------------------------------------------

/// etcd and kube-apiserver, their certificates and data in a temporary directory. Drop stops
/// both (SIGTERM, SIGKILL after [`STOP_WAIT`]) and removes the directory.
pub struct ApiServer {
    name: String,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    etcd_port: u16,
    port: u16,
    kube_apiserver_bin: PathBuf,
    admin_token: String,
    /// Dropped last: the servers are gone by then.
    dir: tempfile::TempDir,
}

impl ApiServer {
    /// Starts etcd and kube-apiserver on free 127.0.0.1 ports and waits until `/readyz` is ok
    /// (as admin). Panics when the binaries are missing or a server does not start (with the
    /// end of its log).
    pub fn start(name: &str) -> ApiServer {
        let started = Instant::now();
        let etcd_bin = binary("NPC_ETCD", "etcd");
        let kube_apiserver_bin = binary("NPC_KUBE_APISERVER", "kube-apiserver");
        let dir = tempfile::Builder::new()
            .prefix(&format!("npc-apiserver-{name}-"))
            .tempdir()
            .expect("creating the API server's temporary directory");
        let admin_token = random_hex(16);
        let mut server = ApiServer {
            name: name.to_string(),
            etcd: None,
            apiserver: None,
            etcd_port: 0,
            port: 0,
            kube_apiserver_bin,
            admin_token,
            dir,
        };
        // From here on a panic drops `server`, which stops what was started.
        server.write_credentials();
        server.start_etcd(&etcd_bin);
        server.start_apiserver(true);
        eprintln!(
            "apiserver {name}: ready at {} in {:.1}s",
            server.url(),
            started.elapsed().as_secs_f64()
        );
        server
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The API server's port on 127.0.0.1 (the same after a restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory: certificates, kubeconfigs, etcd's data, logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kubeconfig file for the admin (`system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir().join("admin.kubeconfig")
    }

    /// A client with every right (static token, group `system:masters`).
    pub async fn admin(&self) -> kube::Client {
        client(&self.admin_kubeconfig()).await
    }

    /// Creates (if absent) the objects of `deploy/rbac.yaml`: ServiceAccount
    /// `kube-system/npc-agent`, the ClusterRole `npc-agent` that may only get, list and watch
    /// pods, namespaces and NetworkPolicies, and its ClusterRoleBinding; asks the TokenRequest
    /// API for a token of the ServiceAccount (valid 24 h) and writes a kubeconfig with it.
    /// Returns the kubeconfig's path (in [`Self::dir`]).
    pub async fn agent_kubeconfig(&self) -> PathBuf {
        let admin = self.admin().await;
        let pp = PostParams::default();
        let (account, role, binding) = deploy_rbac();
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), AGENT_NAMESPACE);
        created(accounts.create(&pp, &account).await, "ServiceAccount");
        let roles: Api<ClusterRole> = Api::all(admin.clone());
        created(roles.create(&pp, &role).await, "ClusterRole");
        let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
        created(bindings.create(&pp, &binding).await, "ClusterRoleBinding");

        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(AGENT_TOKEN_SECONDS),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = accounts
            .create_token_request(AGENT_NAME, &pp, &request)
            .await
            .expect("requesting a token for the agent's ServiceAccount")
            .status
            .and_then(|status| status.token)
            .expect("the TokenRequest has no token");
        let path = self.dir().join("agent.kubeconfig");
        self.write_kubeconfig(&path, AGENT_NAME, &token);
        path
    }

    /// Stops kube-apiserver (etcd and its data stay): the API is unreachable until
    /// [`Self::restart_apiserver`].
    pub fn stop_apiserver(&mut self) {
        if let Some(child) = self.apiserver.take() {
            stop(child);
        }
    }

    /// Kills kube-apiserver (SIGKILL, a crash: no graceful shutdown, which waits up to
    /// [`STOP_WAIT`] for open watches); otherwise like [`Self::stop_apiserver`].
    pub fn kill_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts kube-apiserver again, on the same port with the same certificates and keys (tokens
    /// stay valid), and waits until it is ready.
    pub fn restart_apiserver(&mut self) {
        self.stop_apiserver();
        self.start_apiserver(false);
    }

    /// The process ids of etcd and kube-apiserver (`None` when stopped).
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.etcd.as_ref().map(Child::id),
            self.apiserver.as_ref().map(Child::id),
        )
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir().join(file)
    }

    /// The CA, the serving certificate (127.0.0.1 and localhost), the ServiceAccount key pair
    /// and the static token file.
    fn write_credentials(&self) {
        let dir = self.dir();
        openssl(
            dir,
            "req -x509 -newkey rsa:2048 -nodes -days 7 -subj /CN=npc-test-ca \
             -keyout ca.key -out ca.crt \
             -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign",
        );
        openssl(
            dir,
            "req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver \
             -keyout server.key -out server.csr",
        );
        fs::write(
            self.path("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            dir,
            "x509 -req -in server.csr -days 7 -extfile server.ext -out server.crt \
             -CA ca.crt -CAkey ca.key -CAcreateserial -CAserial ca.srl",
        );
        openssl(dir, "genrsa -out sa.key 2048");
        openssl(dir, "rsa -in sa.key -pubout -out sa.pub");
        fs::write(
            self.path("tokens.csv"),
            format!("{},admin,admin-uid,\"system:masters\"\n", self.admin_token),
        )
        .unwrap();
    }

    /// A kubeconfig for `user` with `token`, for the current port (written again on start).
    fn write_kubeconfig(&self, path: &Path, user: &str, token: &str) {
        let ca = fs::read(self.path("ca.crt")).unwrap();
        let yaml = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: npc-test\n  cluster:\n    server: {url}\n    \
               certificate-authority-data: {ca}\n\
             users:\n\
             - name: {user}\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: npc-test\n  context:\n    cluster: npc-test\n    user: {user}\n\
             current-context: npc-test\n",
            url = self.url(),
            ca = base64(&ca),
        );
        // Write then rename: a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, yaml).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    /// Starts etcd on two free ports (client, peer), trying others when one is taken, and waits
    /// until it is healthy.
    fn start_etcd(&mut self, bin: &Path) {
        let log = self.path("etcd.log");
        let data = self.path("etcd");
        let deadline = Instant::now() + START_WAIT;
        for attempt in 1.. {
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(bin);
            cmd.arg("--name=default")
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=default={peer_url}"));
            let (child, offset) = spawn(cmd, &log);
            match wait_started(child, deadline, || etcd_healthy(client)) {
                Started::Ready(child) => {
                    self.etcd = Some(child);
                    self.etcd_port = client;
                    return;
                }
                Started::Exited(_) if port_taken(&log, offset) && attempt < PORT_ATTEMPTS => {
                    // Start over with other ports and a new data directory.
                    let _ = fs::remove_dir_all(&data);
                }
                failed => panic!(
                    "apiserver {}: etcd {failed}:\n{}",
                    self.name,
                    tail(&log, offset)
                ),
            }
        }
    }

    /// Starts kube-apiserver and waits until `/readyz` is ok. With a new port (`fresh`), another
    /// port is tried when the one picked was taken; a restart keeps its port and tries again
    /// until [`START_WAIT`] ends.
    fn start_apiserver(&mut self, fresh: bool) {
        let log = self.path("kube-apiserver.log");
        let deadline = Instant::now() + START_WAIT;
        for attempt in 1.. {
            if fresh {
                self.port = free_port();
                let token = self.admin_token.clone();
                self.write_kubeconfig(&self.admin_kubeconfig(), "admin", &token);
            }
            let (child, offset) = spawn(self.apiserver_command(), &log);
            let started = wait_started(child, deadline, || self.ready());
            let retry = if fresh {
                attempt < PORT_ATTEMPTS
            } else {
                Instant::now() < deadline
            };
            match started {
                Started::Ready(child) => {
                    self.apiserver = Some(child);
                    return;
                }
                Started::Exited(_) if port_taken(&log, offset) && retry => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                failed => panic!(
                    "apiserver {}: kube-apiserver {failed}:\n{}",
                    self.name,
                    tail(&log, offset)
                ),
            }
        }
    }

    fn apiserver_command(&self) -> Command {
        let file = |flag: &str, name: &str| format!("--{flag}={}", self.path(name).display());
        let mut cmd = Command::new(&self.kube_apiserver_bin);
        cmd.args([
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            format!("--secure-port={}", self.port),
            file("tls-cert-file", "server.crt"),
            file("tls-private-key-file", "server.key"),
            file("client-ca-file", "ca.crt"),
            file("token-auth-file", "tokens.csv"),
            file("service-account-key-file", "sa.pub"),
            file("service-account-signing-key-file", "sa.key"),
        ])
        .args([
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--insecure-port=0",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16",
            // No Endpoints for the `kubernetes` Service: nothing serves it.
            "--endpoint-reconciler-type=none",
            // Pods need no ServiceAccount (nor its token volume).
            "--disable-admission-plugins=ServiceAccount",
            "--profiling=false",
        ]);
        cmd
    }

    /// `/readyz` answers ok to the admin.
    fn ready(&self) -> bool {
        let kubeconfig = self.admin_kubeconfig();
        block_on_side(async move {
            let client = client(&kubeconfig).await;
            let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
            matches!(
                tokio::time::timeout(Duration::from_secs(2), client.request_text(request)).await,
                Ok(Ok(text)) if text.trim() == "ok"
            )
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // A failed start already said why; a failing test may want the server's side.
        if std::thread::panicking() && self.apiserver.is_some() {
            eprintln!(
                "apiserver {}: kube-apiserver.log ends with:\n{}",
                self.name,
                tail(&self.path("kube-apiserver.log"), 0)
            );
        }
        // The API server first: it would log etcd's absence.
        if let Some(child) = self.apiserver.take() {
            stop(child);
        }
        if let Some(child) = self.etcd.take() {
            stop(child);
        }
        // The directory goes with `self.dir`.
    }
}

/// `ok` for an `Api::create` result, and for 409 AlreadyExists (created before).
fn created<K>(result: kube::Result<K>, what: &str) {
    match result {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_already_exists() => {}
        Err(e) => panic!("creating the agent's {what}: {e}"),
    }
}

/// A client from a kubeconfig file.
pub async fn client(kubeconfig: &Path) -> kube::Client {
    let file = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kubeconfig.display()));
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", kubeconfig.display()));
    kube::Client::try_from(config).expect("building a kube client")
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// The binary from `env`, else `target/kube/<file>`; panics with how to get it when absent.
fn binary(env: &str, file: &str) -> PathBuf {
    let path = match std::env::var_os(env) {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("kube").join(file),
    };
    assert!(
        path.is_file(),
        "{file} not found at {}: run `./x kube-apiserver` (as root, once per machine; it builds \
         kube-apiserver and etcd into target/kube/) or set {env} to the binary",
        path.display()
    );
    path
}

/// Cargo's target directory, as xtask computes it: `CARGO_TARGET_DIR`, else the workspace's.
fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir), // an absolute `dir` replaces `workspace`
        None => workspace.join("target"),
    }
}

/// Spawns `cmd` with stdout and stderr appended to `log`; returns the child and where its output
/// starts in the log. The child gets SIGKILL when the test process dies, however it dies.
fn spawn(mut cmd: Command, log: &Path) -> (Child, u64) {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
    let offset = file.metadata().unwrap().len();
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died before prctl: nothing would kill us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("the test process is gone"));
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = spawner_spawn(cmd).unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    (child, offset)
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the test process. PR_SET_PDEATHSIG fires
/// when the *thread* that forked the child ends, and a test may stop and restart a server from
/// a thread that ends first (a runtime's blocking pool, a helper thread).
fn spawner_spawn(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("apiserver-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        tx
    });
    let (reply, result) = mpsc::channel();
    spawner
        .send((cmd, reply))
        .expect("the spawner thread is gone");
    result.recv().expect("the spawner thread is gone")
}

/// SIGTERM, then SIGKILL when the process is still there after [`STOP_WAIT`].
fn stop(mut child: Child) {
    // SAFETY: a plain syscall; the child is not reaped yet, so its pid is still its own.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How a server start ended.
enum Started {
    Ready(Child),
    Exited(ExitStatus),
    TimedOut,
}

impl std::fmt::Display for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Started::Ready(_) => write!(f, "is ready"),
            Started::Exited(status) => write!(f, "exited ({status}); its log ends with"),
            Started::TimedOut => write!(
                f,
                "was not ready within {START_WAIT:?} (now stopped); its log ends with"
            ),
        }
    }
}

/// Polls `ready` until it holds, the child exits or `deadline` passes (then the child is
/// stopped).
fn wait_started(mut child: Child, deadline: Instant, ready: impl Fn() -> bool) -> Started {
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a server") {
            return Started::Exited(status);
        }
        if ready() {
            return Started::Ready(child);
        }
        if Instant::now() >= deadline {
            stop(child);
            return Started::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the server's log since `offset` says a port was taken (by another test's server).
fn port_taken(log: &Path, offset: u64) -> bool {
    log_since(log, offset).contains("address already in use")
}

/// A port nobody listens on now (the kernel's pick for port 0); it may be taken again before
/// the server binds it, hence the retries.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// etcd's `/health` says so (plain HTTP on 127.0.0.1).
fn etcd_healthy(port: u16) -> bool {
    let attempt = || -> io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    };
    attempt().is_ok_and(|response| response.contains(r#""health":"true""#))
}

/// What was appended to `log` from `offset` on.
fn log_since(log: &Path, offset: u64) -> String {
    let text = fs::read(log).unwrap_or_default();
    let start = (offset as usize).min(text.len());
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// The last lines of `log` from `offset` on, for failure messages.
fn tail(log: &Path, offset: u64) -> String {
    let text = log_since(log, offset);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs `future` to completion on a runtime of its own in a thread of its own: usable from
/// synchronous code whether or not it runs inside a tokio runtime (where `block_on` panics).
fn block_on_side<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building a tokio runtime")
                    .block_on(future)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// `openssl ARGS` (split at whitespace) in `dir`; panics with its stderr when it fails.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running openssl (apt-get install openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {} failed ({}):\n{}",
        args.split_whitespace().collect::<Vec<_>>().join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` random bytes as hex, from the kernel.
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding (kubeconfig's `*-data` fields).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
