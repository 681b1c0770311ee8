//! The manifests source: Namespaces, Pods and NetworkPolicies from a directory of YAML/JSON
//! manifests, watched with inotify.
//!
//! What is read:
//! - every regular file (or symlink to one) in the directory, not recursively, whose name ends in
//!   `.yaml`, `.yml` or `.json` and does not start with `.` (hidden files, editors' lock and swap
//!   files, Kubernetes' ConfigMap `..data` entries are skipped). Files are read in name order.
//! - YAML files may hold several documents (`---`); JSON files one or more concatenated values.
//!   A document is an object (`kind: Namespace`, `v1`; `Pod`, `v1`; `NetworkPolicy`,
//!   `networking.k8s.io/v1`) or a list (`kind: List`, or `PodList` and the like, with `items`;
//!   items of a typed list may leave out `kind` and `apiVersion`). Other kinds are ignored (a debug
//!   line each). A known kind with another `apiVersion` is an error.
//! - Pods and NetworkPolicies without `metadata.namespace` are in `default`.
//! - A namespace that Pods or NetworkPolicies use but no (valid) Namespace manifest declares
//!   exists implicitly, with only its `kubernetes.io/metadata.name` label.
//!
//! Bad input never stops the source, and never panics; every problem is reported as a
//! [`SourceError`] in the [`Snapshot`] (and logged as a warning), and the rest applies:
//! - an object that fails validation: its previous valid version (from an earlier load) stays in
//!   force until a valid one replaces it; without one, it is absent.
//! - a file that cannot be read or parsed: every object it held at the previous load stays.
//! - an object defined twice (same kind, namespace and name): the first one (in file name order,
//!   then document order) applies, the others are reported and ignored.
//! - an object that is no longer in any file is gone.
//!
//! Watching: an inotify watch on the directory (the `notify` crate's recommended watcher, not
//! recursive). Changes (create, write, delete, rename, editors' atomic saves, ConfigMap volume
//! updates) are coalesced until 100 ms pass without one (at most 500 ms), then the whole
//! directory is read again; a snapshot is published only when the state or the errors changed.
//! If the directory itself is deleted or renamed, the last state stays and a warning says that
//! the watch is over.
use std::{
    collections::{BTreeMap, HashMap},
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::model::{
    ClusterState, NAMESPACE_NAME_LABEL, Namespace, NetworkPolicy, ObjectRef, Pod,
    convert::{self, ConvertError, FieldError, Kind},
};

/// Changes closer together than this are applied together.
const QUIET: Duration = Duration::from_millis(100);
/// ... but a steady stream of changes is applied at least this often.
const MAX_DELAY: Duration = Duration::from_millis(500);

/// One published state of the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// `node` is the source's node name; `node_ips` is left empty (the agent fills it). Shared
    /// with the syncs that use it (no copy per sync).
    pub state: Arc<ClusterState>,
    /// Every problem of the load that produced this snapshot.
    pub errors: Vec<SourceError>,
    /// 1 for the initial load, then one more for each published snapshot.
    pub generation: u64,
}

impl Snapshot {
    /// The problems of this load by kind of object (`file` for files and documents that are no
    /// object), for `npc_invalid_objects{kind}`; every kind is present.
    pub fn invalid_objects(&self) -> BTreeMap<String, u64> {
        let mut by_kind: BTreeMap<String, u64> = Kind::ALL
            .iter()
            .map(|k| k.as_str())
            .chain(["file"])
            .map(|k| (k.to_string(), 0))
            .collect();
        for e in &self.errors {
            let kind = match e {
                SourceError::Object { error, .. } => error.kind.as_str(),
                SourceError::Duplicate { key, .. } => key.kind.as_str(),
                SourceError::Directory { .. }
                | SourceError::File { .. }
                | SourceError::Document { .. } => "file",
            };
            *by_kind.entry(kind.to_string()).or_insert(0) += 1;
        }
        by_kind
    }
}

/// An object's identity across loads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    /// Empty for Namespaces.
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.is_namespaced() {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        } else {
            write!(f, "{} {}", self.kind, self.name)
        }
    }
}

/// Where in a file: the line (and column) when known, the document (1-based) and the index in
/// a list's `items`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub document: Option<usize>,
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    /// `:LINE[:COLUMN][ (items[I])]`, or without a line ` (document N[, items[I]])`, to
    /// follow a file name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut document = self.document;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
            // The line says where the document is (its number would not count empty ones).
            document = None;
        }
        match (document, self.item) {
            (Some(d), Some(i)) => write!(f, " (document {d}, items[{i}])"),
            (Some(d), None) => write!(f, " (document {d})"),
            (None, Some(i)) => write!(f, " (items[{i}])"),
            (None, None) => Ok(()),
        }
    }
}

/// A problem with the manifests. The `Display` form names the file, the place in it, the
/// object and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The directory cannot be listed: every object of the previous load stays.
    #[error("{}: cannot read the manifests directory: {message} (the previous state stays in force)", dir.display())]
    Directory { dir: PathBuf, message: String },
    /// A file cannot be read or parsed: every object it held at the previous load stays.
    #[error("{}{location}: {message} (the objects this file had stay in force)", file.display())]
    File {
        file: PathBuf,
        location: Location,
        message: String,
    },
    /// A document or list item that is not a Kubernetes object (not a mapping, no `kind`).
    #[error("{}{location}: {message}", file.display())]
    Document {
        file: PathBuf,
        location: Location,
        message: String,
    },
    /// An object that fails to decode or to validate.
    #[error("{}{location}: {error}{}", file.display(),
        if *kept { " (its previous version stays in force)" } else { " (ignored)" })]
    Object {
        file: PathBuf,
        location: Location,
        error: ConvertError,
        /// Whether a previous valid version stays in force.
        kept: bool,
    },
    /// The same object defined a second time.
    #[error("{}{location}: {key} is already defined at {}{first_location}: ignored",
        file.display(), first_file.display())]
    Duplicate {
        file: PathBuf,
        location: Location,
        key: ObjectKey,
        first_file: PathBuf,
        first_location: Location,
    },
}

impl SourceError {
    /// The file (or, for [`SourceError::Directory`], the directory) the error is about.
    pub fn file(&self) -> &Path {
        match self {
            SourceError::Directory { dir, .. } => dir,
            SourceError::File { file, .. }
            | SourceError::Document { file, .. }
            | SourceError::Object { file, .. }
            | SourceError::Duplicate { file, .. } => file,
        }
    }
}

/// A validated object of one of the three kinds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Object {
    Namespace(Namespace),
    Pod(Pod),
    NetworkPolicy(NetworkPolicy),
}

/// The objects in force after a load and the file each came from: what stays when an object
/// or a whole file turns bad.
#[derive(Clone, Debug, Default)]
pub struct LastGood {
    objects: BTreeMap<ObjectKey, (PathBuf, Object)>,
}

impl LastGood {
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

/// One object found in a file, before merging.
struct Found {
    location: Location,
    /// `None` when the object has no name: it can neither replace nor fall back to anything.
    key: Option<ObjectKey>,
    result: Result<Object, ConvertError>,
}

/// What a readable file holds, in order: objects and the documents that are none.
enum Entry {
    Found(Found),
    Error(SourceError),
}

/// Reads every manifest in `dir` and merges it with `last_good` (see the module docs), which is
/// updated to the objects now in force. The state's `node` and `node_ips` are left empty. Every
/// error is also logged as a warning.
pub fn load_dir(dir: &Path, last_good: &mut LastGood) -> (ClusterState, Vec<SourceError>) {
    let mut errors = Vec::new();
    let files = match manifest_files(dir) {
        Ok(files) => files,
        Err(e) => {
            errors.push(SourceError::Directory {
                dir: dir.to_path_buf(),
                message: e.to_string(),
            });
            log_errors(&errors);
            return (state_of(&last_good.objects), errors);
        }
    };

    let mut objects: BTreeMap<ObjectKey, (PathBuf, Object)> = BTreeMap::new();
    // Where each key was first seen this time (valid or not).
    let mut seen: HashMap<ObjectKey, (PathBuf, Location)> = HashMap::new();
    let mut failed_files = Vec::new();
    for file in files {
        let entries = match read_file(&file) {
            Ok(entries) => entries,
            Err((location, message)) => {
                errors.push(SourceError::File {
                    file: file.clone(),
                    location,
                    message,
                });
                failed_files.push(file);
                continue;
            }
        };
        for entry in entries {
            let found = match entry {
                Entry::Found(found) => found,
                Entry::Error(error) => {
                    errors.push(error);
                    continue;
                }
            };
            if let Some(key) = &found.key {
                if let Some((first_file, first_location)) = seen.get(key) {
                    errors.push(SourceError::Duplicate {
                        file: file.clone(),
                        location: found.location,
                        key: key.clone(),
                        first_file: first_file.clone(),
                        first_location: first_location.clone(),
                    });
                    continue;
                }
                seen.insert(key.clone(), (file.clone(), found.location.clone()));
            }
            match (found.result, found.key) {
                (Ok(object), Some(key)) => {
                    objects.insert(key, (file.clone(), object));
                }
                // Validation requires a name: a valid object always has a key.
                (Ok(_), None) => {}
                (Err(error), key) => {
                    let previous = key.and_then(|key| {
                        let (_, object) = last_good.objects.get(&key)?;
                        Some((key, object.clone()))
                    });
                    let kept = previous.is_some();
                    if let Some((key, object)) = previous {
                        objects.insert(key, (file.clone(), object));
                    }
                    errors.push(SourceError::Object {
                        file: file.clone(),
                        location: found.location,
                        error,
                        kept,
                    });
                }
            }
        }
    }
    // A file that could not be read keeps what it had, unless defined elsewhere now.
    for (key, (file, object)) in &last_good.objects {
        if failed_files.contains(file) && !seen.contains_key(key) {
            objects.insert(key.clone(), (file.clone(), object.clone()));
        }
    }

    log_errors(&errors);
    let state = state_of(&objects);
    last_good.objects = objects;
    (state, errors)
}

fn log_errors(errors: &[SourceError]) {
    for error in errors {
        warn!(file = %error.file().display(), "{error}");
    }
}

fn state_of(objects: &BTreeMap<ObjectKey, (PathBuf, Object)>) -> ClusterState {
    let mut state = ClusterState::default();
    for (_, object) in objects.values() {
        match object {
            Object::Namespace(ns) => {
                state.namespaces.insert(ns.name.clone(), ns.clone());
            }
            Object::Pod(pod) => {
                let key = ObjectRef {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                };
                state.pods.insert(key, pod.clone());
            }
            Object::NetworkPolicy(np) => {
                let key = ObjectRef {
                    namespace: np.namespace.clone(),
                    name: np.name.clone(),
                };
                state.policies.insert(key, np.clone());
            }
        }
    }
    // Namespaces used but not declared exist implicitly.
    let used: Vec<String> = state
        .pods
        .keys()
        .chain(state.policies.keys())
        .map(|r| r.namespace.clone())
        .collect();
    for name in used {
        state
            .namespaces
            .entry(name.clone())
            .or_insert_with(|| Namespace {
                labels: [(NAMESPACE_NAME_LABEL.to_string(), name.clone())].into(),
                name,
                audit: false,
            });
    }
    state
}

/// The manifest files of `dir`, sorted by name.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.starts_with('.') || file_format(Path::new(name)).is_none() {
            continue;
        }
        let path = entry.path();
        // Follows symlinks; a dangling one is skipped.
        if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Yaml,
    Json,
}

fn file_format(path: &Path) -> Option<Format> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "yaml" | "yml" => Some(Format::Yaml),
        "json" => Some(Format::Json),
        _ => None,
    }
}

/// Reads and parses one file. `Err`: the file as a whole is unusable (where, what).
fn read_file(file: &Path) -> Result<Vec<Entry>, ParseError> {
    let text =
        fs::read_to_string(file).map_err(|e| (Location::default(), format!("cannot read: {e}")))?;
    let documents = match file_format(file) {
        Some(Format::Json) => parse_json(&text),
        _ => parse_yaml(&text),
    }?;

    let mut entries = Vec::new();
    for (value, location) in documents {
        document(file, value, location, &mut entries);
    }
    Ok(entries)
}

type ParseError = (Location, String);

fn parse_yaml(text: &str) -> Result<Vec<(Value, Location)>, ParseError> {
    let options = serde_saphyr::options! {
        // Single-line messages: the location is reported separately.
        with_snippet: false,
        // Generous limits: the input is the operator's own files, and generated states of
        // thousands of objects in one file must load.
        budget: serde_saphyr::budget! {
            max_documents: 1_000_000,
            max_nodes: 100_000_000,
            max_events: 100_000_000,
        },
    };
    let docs: Vec<serde_saphyr::Spanned<Value>> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
            let location = e.location().map_or_else(Location::default, |l| Location {
                line: (l.line() > 0).then_some(l.line()),
                column: (l.column() > 0).then_some(l.column()),
                ..Location::default()
            });
            (location, format!("invalid YAML: {e}"))
        })?;
    Ok(docs
        .into_iter()
        .enumerate()
        .map(|(i, doc)| {
            let line = doc.referenced.line();
            let location = Location {
                line: (line > 0).then_some(line),
                document: Some(i + 1),
                ..Location::default()
            };
            (doc.value, location)
        })
        .collect())
}

fn parse_json(text: &str) -> Result<Vec<(Value, Location)>, ParseError> {
    let mut docs = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut start = 0;
    while let Some(next) = stream.next() {
        let value = next.map_err(|e| {
            let location = Location {
                line: (e.line() > 0).then_some(e.line() as u64),
                column: (e.column() > 0).then_some(e.column() as u64),
                ..Location::default()
            };
            (location, format!("invalid JSON: {e}"))
        })?;
        // The value starts at the first non-blank character after the previous one.
        let rest = &text[start..];
        let begin = start + (rest.len() - rest.trim_start().len());
        let line = text[..begin].matches('\n').count() as u64 + 1;
        start = stream.byte_offset();
        docs.push((
            value,
            Location {
                line: Some(line),
                document: Some(docs.len() + 1),
                ..Location::default()
            },
        ));
    }
    Ok(docs)
}

/// One document or list item: an object of a known kind, a list, or something ignored.
fn document(file: &Path, mut value: Value, location: Location, out: &mut Vec<Entry>) {
    let doc_error = |message: String| SourceError::Document {
        file: file.to_path_buf(),
        location: location.clone(),
        message,
    };
    if value.is_null() {
        return;
    }
    let Some(map) = value.as_object_mut() else {
        out.push(Entry::Error(doc_error(
            "not a Kubernetes object (a mapping)".to_string(),
        )));
        return;
    };
    let Some(kind) = map.get("kind").and_then(Value::as_str).map(str::to_string) else {
        out.push(Entry::Error(doc_error(
            "not a Kubernetes object: no `kind`".to_string(),
        )));
        return;
    };

    if let Some(item_kind) = kind.strip_suffix("List")
        && let Some(Value::Array(items)) = map.remove("items")
    {
        // `List`, or a typed list (`PodList`) whose items may lack kind and apiVersion.
        let list_api_version = map.get("apiVersion").cloned();
        for (i, mut item) in items.into_iter().enumerate() {
            if !item_kind.is_empty()
                && let Some(item_map) = item.as_object_mut()
            {
                if !item_map.contains_key("kind") {
                    item_map.insert("kind".into(), Value::String(item_kind.to_string()));
                }
                if let Some(v) = &list_api_version {
                    item_map.entry("apiVersion").or_insert_with(|| v.clone());
                }
            }
            let location = Location {
                item: Some(i),
                ..location.clone()
            };
            document(file, item, location, out);
        }
        return;
    }

    let Some(kind) = Kind::from_kind(&kind) else {
        debug!(file = %file.display(), %location, kind, "ignoring an object of another kind");
        return;
    };
    // The object's identity, defaulting the namespace.
    let meta = map.get_mut("metadata").and_then(Value::as_object_mut);
    let name = meta
        .as_ref()
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    // `None`: not a string (decoding reports it); the object then has no key.
    let namespace: Option<String> = if kind.is_namespaced() {
        match meta {
            Some(m) => match m.get("namespace") {
                None | Some(Value::Null) => Some(String::new()),
                Some(Value::String(ns)) => Some(ns.clone()),
                Some(_) => None,
            }
            .map(|ns| {
                if ns.is_empty() {
                    m.insert("namespace".into(), Value::String("default".into()));
                    "default".to_string()
                } else {
                    ns
                }
            }),
            None => Some("default".to_string()),
        }
    } else {
        Some(String::new())
    };
    let key = namespace
        .clone()
        .filter(|_| !name.is_empty())
        .map(|namespace| ObjectKey {
            kind,
            namespace,
            name: name.clone(),
        });
    let namespace = namespace.unwrap_or_default();
    let object_error = |errors: Vec<FieldError>| ConvertError {
        kind,
        namespace: kind.is_namespaced().then(|| namespace.clone()),
        name: name.clone(),
        errors,
    };

    let api_version = map.get("apiVersion").and_then(Value::as_str);
    let result = if api_version != Some(kind.api_version()) {
        let message = match api_version {
            Some(v) => format!(
                "unsupported value {v:?}: {kind} is read as {:?}",
                kind.api_version()
            ),
            None => "Required value".to_string(),
        };
        Err(object_error(vec![FieldError {
            field: "apiVersion".into(),
            message,
        }]))
    } else {
        decode(kind, &value, object_error)
    };
    out.push(Entry::Found(Found {
        location,
        key,
        result,
    }));
}

/// Decodes the API object and converts it. Decoding names the field of a type error, and is
/// strict like `kubectl apply` (whose field validation is strict by default): a field the API
/// does not have (a typo such as `podSelecter`, which would otherwise silently select every pod)
/// is an error.
fn decode(
    kind: Kind,
    value: &Value,
    error: impl Fn(Vec<FieldError>) -> ConvertError,
) -> Result<Object, ConvertError> {
    fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
        value: &Value,
    ) -> Result<T, Vec<FieldError>> {
        let object: T = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "<object>".into() } else { path };
            vec![FieldError {
                field,
                message: e.into_inner().to_string(),
            }]
        })?;
        // What the API type keeps, compared with what was written.
        let kept = serde_json::to_value(&object).map_err(|e| {
            vec![FieldError {
                field: "<object>".into(),
                message: e.to_string(),
            }]
        })?;
        let mut unknown = Vec::new();
        unknown_fields(value, &kept, "", &mut unknown);
        if unknown.is_empty() {
            Ok(object)
        } else {
            Err(unknown)
        }
    }
    match kind {
        Kind::Namespace => convert::namespace(&typed(value).map_err(error)?).map(Object::Namespace),
        Kind::Pod => convert::pod(&typed(value).map_err(error)?).map(Object::Pod),
        Kind::NetworkPolicy => {
            convert::network_policy(&typed(value).map_err(error)?).map(Object::NetworkPolicy)
        }
    }
}

/// The fields of `written` (not null) that `kept` lacks.
fn unknown_fields(written: &Value, kept: &Value, path: &str, out: &mut Vec<FieldError>) {
    match (written, kept) {
        (Value::Object(written), Value::Object(kept)) => {
            for (key, value) in written {
                let field = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match kept.get(key) {
                    Some(kept) => unknown_fields(value, kept, &field, out),
                    None if value.is_null() => {}
                    None => out.push(FieldError {
                        field,
                        message: format!("unknown field {key:?}"),
                    }),
                }
            }
        }
        (Value::Array(written), Value::Array(kept)) => {
            for (i, (w, k)) in written.iter().zip(kept).enumerate() {
                unknown_fields(w, k, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The manifests directory as a source of snapshots.
pub struct ManifestsSource {
    dir: PathBuf,
    node_name: Option<String>,
    last_good: LastGood,
    generation: u64,
}

impl ManifestsSource {
    /// `node_name`: this node (pods with this `spec.nodeName` are local); `None`: every pod is.
    pub fn new(dir: impl Into<PathBuf>, node_name: Option<String>) -> ManifestsSource {
        ManifestsSource {
            dir: dir.into(),
            node_name,
            last_good: LastGood::default(),
            generation: 0,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory once (merged with what previous loads left in force).
    pub fn load(&mut self) -> Snapshot {
        let (state, errors) = self.read();
        self.generation += 1;
        Snapshot {
            state: Arc::new(state),
            errors,
            generation: self.generation,
        }
    }

    fn read(&mut self) -> (ClusterState, Vec<SourceError>) {
        let (mut state, errors) = load_dir(&self.dir, &mut self.last_good);
        state.node = self.node_name.clone();
        (state, errors)
    }

    /// Loads the directory and keeps watching it. The receiver holds the initial load
    /// (generation 1), already marked as changed, so a loop on `changed().await` sees it first;
    /// each later change of the state or of the errors is a new snapshot. The watch runs until
    /// every receiver is dropped.
    ///
    /// Fails when the directory cannot be watched (missing, not a directory, inotify limits).
    pub async fn watch(self) -> anyhow::Result<watch::Receiver<Snapshot>> {
        let dir = self.dir.clone();
        anyhow::ensure!(
            fs::metadata(&dir).is_ok_and(|m| m.is_dir()),
            "{}: not a directory",
            dir.display()
        );
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            // The receiver is gone only when the watch task ended.
            let _ = events_tx.send(event);
        })
        .context("creating an inotify watcher")?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;

        // Watch first, then read: no change can fall between the two.
        let (source, snapshot) = tokio::task::spawn_blocking(move || {
            let mut source = self;
            let snapshot = source.load();
            (source, snapshot)
        })
        .await
        .context("the initial load panicked")?;
        info!(
            dir = %dir.display(),
            namespaces = snapshot.state.namespaces.len(),
            pods = snapshot.state.pods.len(),
            policies = snapshot.state.policies.len(),
            errors = snapshot.errors.len(),
            "manifests loaded"
        );
        let (tx, mut rx) = watch::channel(snapshot);
        rx.mark_changed();
        tokio::spawn(watch_loop(source, watcher, events, tx));
        Ok(rx)
    }
}

type NotifyEvent = notify::Result<notify::Event>;

async fn watch_loop(
    mut source: ManifestsSource,
    _watcher: notify::RecommendedWatcher,
    mut events: mpsc::UnboundedReceiver<NotifyEvent>,
    tx: watch::Sender<Snapshot>,
) {
    let dir = source.dir.clone();
    loop {
        // The first event of a burst.
        tokio::select! {
            () = tx.closed() => return,
            event = events.recv() => match event {
                Some(event) if is_change(&event, &dir) => {}
                Some(_) => continue,
                None => return,
            },
        }
        // The rest of the burst.
        let deadline = tokio::time::Instant::now() + MAX_DELAY;
        loop {
            let until = deadline.min(tokio::time::Instant::now() + QUIET);
            match tokio::time::timeout_at(until, events.recv()).await {
                Ok(Some(event)) => {
                    is_change(&event, &dir);
                }
                Ok(None) => return,
                Err(_elapsed) => break,
            }
        }

        let reloaded = tokio::task::spawn_blocking(move || {
            let result = source.read();
            (source, result)
        })
        .await;
        let (state, errors);
        (source, (state, errors)) = match reloaded {
            Ok(reloaded) => reloaded,
            Err(e) => {
                // load_dir does not panic; if it ever did, the source is lost: stop watching
                // and keep the last snapshot.
                warn!(error = %e, "the manifests reload failed; the watch stops");
                return;
            }
        };
        let published = tx.send_if_modified(|current| {
            if *current.state == state && current.errors == errors {
                return false;
            }
            current.generation += 1;
            current.state = Arc::new(state);
            current.errors = errors;
            true
        });
        if published {
            let snapshot = tx.borrow();
            info!(
                generation = snapshot.generation,
                namespaces = snapshot.state.namespaces.len(),
                pods = snapshot.state.pods.len(),
                policies = snapshot.state.policies.len(),
                errors = snapshot.errors.len(),
                "manifests changed"
            );
        } else {
            debug!("manifests reloaded: no change");
        }
    }
}

/// Whether the event may have changed the manifests (logging what needs a word).
fn is_change(event: &NotifyEvent, dir: &Path) -> bool {
    match event {
        Err(e) => {
            warn!(error = %e, "inotify error; reading the whole directory again");
            true
        }
        // Our own reads open the files.
        Ok(event) => match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            EventKind::Remove(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
                if event.paths.iter().any(|p| p == dir) =>
            {
                warn!(dir = %dir.display(), "the manifests directory was removed or renamed: \
                    no further changes will be seen (restart the agent)");
                true
            }
            _ => true,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Instant};

    use super::*;
    use crate::model::{Peer, PolicyPort, PortRef, Protocol};

    const NS_A: &str =
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels:\n    team: x\n";

    fn pod_yaml(name: &str, ns: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {name}\nspec:\n  containers:\n  - name: c\n    ports:\n    - containerPort: 80\n      name: http\nstatus:\n  podIP: {ip}\n"
        )
    }

    fn policy_yaml(name: &str, ns: &str, port: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  podSelector: {{}}\n  ingress:\n  - ports:\n    - port: {port}\n"
        )
    }

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    fn load(dir: &Path, last_good: &mut LastGood) -> (ClusterState, Vec<SourceError>) {
        load_dir(dir, last_good)
    }

    fn oref(ns: &str, name: &str) -> ObjectRef {
        ObjectRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn policy_port(state: &ClusterState, ns: &str, name: &str) -> Option<PortRef> {
        let np = state.policies.get(&oref(ns, name))?;
        np.ingress[0].ports.as_ref()?[0].port.clone()
    }

    /// The one error, as text.
    #[track_caller]
    fn single_error(errors: &[SourceError]) -> String {
        assert_eq!(errors.len(), 1, "{errors:#?}");
        errors[0].to_string()
    }

    #[track_caller]
    fn assert_contains(text: &str, parts: &[&str]) {
        for part in parts {
            assert!(text.contains(part), "{text:?} does not contain {part:?}");
        }
    }

    #[test]
    fn fixture_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/manifests");
        let mut lg = LastGood::default();
        let (state, errors) = load(&dir, &mut lg);
        assert!(errors.is_empty(), "{errors:#?}");
        // namespaces.yaml: multi-document; the metadata.name label is added.
        let shop = &state.namespaces["shop"];
        assert_eq!(shop.labels["kubernetes.io/metadata.name"], "shop");
        assert_eq!(shop.labels["purpose"], "demo");
        assert!(state.namespaces.contains_key("monitoring"));
        // `default` and `pricing` are implicit (used, not declared).
        assert_eq!(
            state.namespaces["default"].labels,
            [(NAMESPACE_NAME_LABEL.to_string(), "default".to_string())].into()
        );
        assert!(state.namespaces.contains_key("pricing"));
        assert_eq!(state.namespaces.len(), 4, "{:?}", state.namespaces.keys());
        // pods.json: a List; pods-more.yml: a PodList without item kinds; toolbox.json: a
        // single object without a namespace.
        let names: Vec<String> = state.pods.keys().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "default/toolbox",
                "monitoring/prometheus",
                "pricing/prices-api",
                "shop/carts-5d8f7b6c9-x2x7k",
                "shop/catalogue",
                "shop/front-end"
            ]
        );
        // exported-pod.yaml: everything `kubectl get -o yaml` prints decodes; the sidecar's
        // named port counts.
        let carts = &state.pods[&oref("shop", "carts-5d8f7b6c9-x2x7k")];
        let ports: Vec<(&str, u16)> = carts
            .named_ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect();
        assert_eq!(ports, [("http", 80), ("http-envoy-prom", 15090)]);
        assert_eq!(carts.node.as_deref(), Some("node-2"));
        let fe = &state.pods[&oref("shop", "front-end")];
        assert_eq!(fe.ips, vec!["10.1.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(fe.node.as_deref(), Some("node-1"));
        assert_eq!(fe.named_ports[0].name, "http");
        let api = &state.pods[&oref("pricing", "prices-api")];
        assert_eq!(api.ips.len(), 2);
        // policies.yaml: the Service and the Deployment in it are ignored.
        let names: Vec<String> = state.policies.keys().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "pricing/prices-api-allow",
                "shop/catalogue-from-front-end",
                "shop/default-deny"
            ]
        );
        let np = &state.policies[&oref("shop", "catalogue-from-front-end")];
        assert_eq!(
            np.ingress[0].ports.as_ref().unwrap(),
            &vec![PolicyPort {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Name("http".into())),
                end_port: None
            }]
        );
        assert!(matches!(
            np.ingress[0].peers.as_ref().unwrap()[0],
            Peer::Pods {
                namespaces: None,
                ..
            }
        ));
        assert_eq!(state.node, None);
        assert!(state.node_ips.is_empty());
        assert_eq!(lg.len(), 2 + 6 + 3);
    }

    #[test]
    fn multi_document_yaml_json_stream_and_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(
            dir,
            "a.yaml",
            &format!(
                "---\n{NS_A}---\n# only a comment\n---\n{}...\n---\n{}",
                pod_yaml("p1", "a", "10.0.0.1"),
                policy_yaml("np1", "a", "80")
            ),
        );
        write(
            dir,
            "b.json",
            r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p2", "namespace": "a"}}
               {"apiVersion": "v1", "kind": "List", "items": [
                 {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p3"}},
                 {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}}
               ]}"#,
        );
        let (state, errors) = load(dir, &mut LastGood::default());
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(state.namespaces["a"].labels["team"], "x");
        assert!(state.pods.contains_key(&oref("a", "p1")));
        assert!(state.pods.contains_key(&oref("a", "p2")));
        assert!(state.pods.contains_key(&oref("default", "p3")));
        assert!(state.policies.contains_key(&oref("a", "np1")));
        assert!(state.namespaces.contains_key("default"));
    }

    #[test]
    fn ignored_files_and_kinds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "notes.txt", "not: [yaml");
        write(dir, ".hidden.yaml", &pod_yaml("hidden", "a", "10.0.0.9"));
        write(dir, "a.yaml~", "garbage: [");
        fs::create_dir(dir.join("sub.yaml")).unwrap();
        write(
            &dir.join("sub.yaml"),
            "p.yaml",
            &pod_yaml("nested", "a", "10.0.0.8"),
        );
        write(
            dir,
            "other.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  replicas: 1\n\
             ---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  x: y\n",
        );
        write(dir, "empty.yml", "");
        let (state, errors) = load(dir, &mut LastGood::default());
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(state, ClusterState::default());
    }

    #[test]
    fn implicit_namespaces_only_for_used_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "p.yaml", &pod_yaml("p", "implicit", "10.0.0.1"));
        write(dir, "np.yaml", &policy_yaml("np", "other", "80"));
        let (state, errors) = load(dir, &mut LastGood::default());
        assert!(errors.is_empty(), "{errors:#?}");
        let names: Vec<&String> = state.namespaces.keys().collect();
        assert_eq!(names, ["implicit", "other"]);
        assert_eq!(state.namespaces["implicit"].labels.len(), 1);
    }

    #[test]
    fn unparseable_yaml_names_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "ok.yaml", &pod_yaml("p", "a", "10.0.0.1"));
        write(
            dir,
            "bad.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n",
        );
        let (state, errors) = load(dir, &mut LastGood::default());
        let text = single_error(&errors);
        assert_contains(&text, &["bad.yaml:", "invalid YAML"]);
        assert!(matches!(
            &errors[0],
            SourceError::File {
                location: Location { line: Some(_), .. },
                ..
            }
        ));
        // The rest applies.
        assert!(state.pods.contains_key(&oref("a", "p")));
    }

    #[test]
    fn unparseable_json_names_file_line_and_column() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "bad.json", "{\"kind\": \"Pod\",\n \"metadata\": }\n");
        let (_, errors) = load(dir, &mut LastGood::default());
        let text = single_error(&errors);
        assert_contains(&text, &["bad.json:2:", "invalid JSON"]);
    }

    #[test]
    fn invalid_object_names_file_document_object_and_field() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(
            dir,
            "policies.yaml",
            &format!("{NS_A}---\n{}", policy_yaml("np", "a", "70000")),
        );
        let (state, errors) = load(dir, &mut LastGood::default());
        let text = single_error(&errors);
        assert_contains(
            &text,
            &[
                "policies.yaml:8: ",
                "NetworkPolicy a/np: ",
                "spec.ingress[0].ports[0].port: ",
                "between 1 and 65535",
                "(ignored)",
            ],
        );
        assert!(state.policies.is_empty());
        assert!(state.namespaces.contains_key("a"));
    }

    #[test]
    fn type_errors_name_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(
            dir,
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: c\n    ports:\n    - containerPort: eighty\n",
        );
        let (_, errors) = load(dir, &mut LastGood::default());
        let text = single_error(&errors);
        assert_contains(
            &text,
            &[
                "p.yaml:1: Pod default/p: ",
                "spec.containers[0].ports[0].containerPort: ",
                "invalid type",
            ],
        );
    }

    #[test]
    fn list_items_are_located() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(
            dir,
            "l.json",
            r#"{"apiVersion": "v1", "kind": "List", "items": [
                 {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ok"}},
                 {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad"},
                  "status": {"podIP": "1.2.3"}},
                 42
               ]}"#,
        );
        let (state, errors) = load(dir, &mut LastGood::default());
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_contains(
            &errors[0].to_string(),
            &[
                "l.json:1 (items[1]): Pod default/bad: status.podIP: ",
                "valid IP",
            ],
        );
        assert_contains(
            &errors[1].to_string(),
            &["l.json:1 (items[2]): not a Kubernetes object"],
        );
        assert!(state.pods.contains_key(&oref("default", "ok")));
    }

    #[test]
    fn unknown_fields_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(
            dir,
            "np.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: typo\n  namespace: a\n  creationTimestamp: null\nspec:\n  podSelecter:\n    matchLabels: {app: db}\n  ingress:\n  - form: []\n    ports: [{port: 80, protocl: UDP}]\n",
        );
        let (state, errors) = load(dir, &mut LastGood::default());
        let text = single_error(&errors);
        assert_contains(
            &text,
            &[
                "NetworkPolicy a/typo: ",
                "spec.podSelecter: unknown field \"podSelecter\"",
                "spec.ingress[0].form: unknown field",
                "spec.ingress[0].ports[0].protocl: unknown field",
            ],
        );
        assert!(!text.contains("creationTimestamp"), "{text}");
        assert!(state.policies.is_empty());
    }

    #[test]
    fn namespace_defaults_and_must_be_a_string() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(
            dir,
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: 7\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: q\n  namespace: \"\"\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: r\n  namespace: null\n",
        );
        let (state, errors) = load(dir, &mut LastGood::default());
        assert_contains(
            &single_error(&errors),
            &["p.yaml:1: Pod /p: metadata.namespace: invalid type"],
        );
        let names: Vec<String> = state.pods.keys().map(ToString::to_string).collect();
        assert_eq!(names, ["default/q", "default/r"]);
    }

    #[test]
    fn api_version_is_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(
            dir,
            "np.yaml",
            "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata:\n  name: old\n  namespace: a\nspec: {}\n---\nkind: Pod\nmetadata:\n  name: p\n",
        );
        let (state, errors) = load(dir, &mut LastGood::default());
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_contains(
            &errors[0].to_string(),
            &[
                "NetworkPolicy a/old: apiVersion: unsupported value \"extensions/v1beta1\"",
                "networking.k8s.io/v1",
            ],
        );
        assert_contains(
            &errors[1].to_string(),
            &["np.yaml:8: Pod default/p: apiVersion: Required value"],
        );
        assert!(state.policies.is_empty() && state.pods.is_empty());
    }

    #[test]
    fn documents_without_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "x.yaml", "just: a map\n---\n- a list\n");
        let (_, errors) = load(dir, &mut LastGood::default());
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_contains(&errors[0].to_string(), &["x.yaml:1: ", "no `kind`"]);
        assert_contains(
            &errors[1].to_string(),
            &["x.yaml:3: ", "not a Kubernetes object"],
        );
    }

    #[test]
    fn duplicates_first_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "1.yaml", &pod_yaml("p", "a", "10.0.0.1"));
        write(dir, "2.yaml", &pod_yaml("p", "a", "10.0.0.2"));
        let (state, errors) = load(dir, &mut LastGood::default());
        let text = single_error(&errors);
        assert_contains(
            &text,
            &[
                "2.yaml:1: Pod a/p is already defined at ",
                "1.yaml:1: ignored",
            ],
        );
        assert_eq!(
            state.pods[&oref("a", "p")].ips,
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn invalid_object_keeps_its_previous_version() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut lg = LastGood::default();
        write(dir, "np.yaml", &policy_yaml("np", "a", "80"));
        write(dir, "other.yaml", &policy_yaml("other", "a", "81"));
        let (state, errors) = load(dir, &mut lg);
        assert!(errors.is_empty());
        assert_eq!(policy_port(&state, "a", "np"), Some(PortRef::Number(80)));

        // Invalid now: the old version stays, the rest changes.
        write(dir, "np.yaml", &policy_yaml("np", "a", "0"));
        write(dir, "other.yaml", &policy_yaml("other", "a", "82"));
        let (state, errors) = load(dir, &mut lg);
        let text = single_error(&errors);
        assert_contains(
            &text,
            &[
                "np.yaml:1: NetworkPolicy a/np: spec.ingress[0].ports[0].port",
                "its previous version stays in force",
            ],
        );
        assert_eq!(policy_port(&state, "a", "np"), Some(PortRef::Number(80)));
        assert_eq!(policy_port(&state, "a", "other"), Some(PortRef::Number(82)));

        // Still invalid (another way): still the old version.
        write(dir, "np.yaml", &policy_yaml("np", "a", "Bad_Name"));
        let (state, errors) = load(dir, &mut lg);
        assert_eq!(errors.len(), 1);
        assert_eq!(policy_port(&state, "a", "np"), Some(PortRef::Number(80)));

        // A valid version replaces it.
        write(dir, "np.yaml", &policy_yaml("np", "a", "http"));
        let (state, errors) = load(dir, &mut lg);
        assert!(errors.is_empty());
        assert_eq!(
            policy_port(&state, "a", "np"),
            Some(PortRef::Name("http".into()))
        );

        // Deleted: gone, even though it was invalid at some point.
        write(dir, "np.yaml", &policy_yaml("np", "a", "0"));
        load(dir, &mut lg);
        fs::remove_file(dir.join("np.yaml")).unwrap();
        let (state, errors) = load(dir, &mut lg);
        assert!(errors.is_empty());
        assert!(!state.policies.contains_key(&oref("a", "np")));
        assert!(state.policies.contains_key(&oref("a", "other")));
    }

    #[test]
    fn unparseable_file_keeps_all_its_objects() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut lg = LastGood::default();
        write(
            dir,
            "a.yaml",
            &format!(
                "{NS_A}---\n{}---\n{}",
                pod_yaml("p1", "a", "10.0.0.1"),
                pod_yaml("p2", "a", "10.0.0.2")
            ),
        );
        write(dir, "b.yaml", &pod_yaml("q", "b", "10.0.1.1"));
        let (before, errors) = load(dir, &mut lg);
        assert!(errors.is_empty());

        // a.yaml breaks (and would have dropped p2); b.yaml changes.
        write(
            dir,
            "a.yaml",
            &format!(
                "{NS_A}---\n{}  - [unclosed\n",
                pod_yaml("p1", "a", "10.0.0.1")
            ),
        );
        write(dir, "b.yaml", &pod_yaml("q", "b", "10.0.1.2"));
        let (state, errors) = load(dir, &mut lg);
        let text = single_error(&errors);
        assert_contains(
            &text,
            &["a.yaml:", "the objects this file had stay in force"],
        );
        assert_eq!(state.namespaces["a"], before.namespaces["a"]);
        assert!(state.pods.contains_key(&oref("a", "p1")));
        assert!(state.pods.contains_key(&oref("a", "p2")));
        assert_eq!(
            state.pods[&oref("b", "q")].ips,
            vec!["10.0.1.2".parse::<IpAddr>().unwrap()]
        );

        // Twice in a row: still kept.
        let (again, errors) = load(dir, &mut lg);
        assert_eq!(errors.len(), 1);
        assert_eq!(again, state);

        // Unreadable (not UTF-8) is the same.
        fs::write(dir.join("a.yaml"), b"\xff\xfe").unwrap();
        let (again, errors) = load(dir, &mut lg);
        assert_contains(&single_error(&errors), &["a.yaml: cannot read"]);
        assert_eq!(again, state);

        // Fixed, without p2: p2 is gone.
        write(
            dir,
            "a.yaml",
            &format!("{NS_A}---\n{}", pod_yaml("p1", "a", "10.0.0.1")),
        );
        let (state, errors) = load(dir, &mut lg);
        assert!(errors.is_empty());
        assert!(!state.pods.contains_key(&oref("a", "p2")));

        // Deleted as a whole: its objects are gone.
        fs::remove_file(dir.join("a.yaml")).unwrap();
        let (state, _) = load(dir, &mut lg);
        assert!(!state.pods.contains_key(&oref("a", "p1")));
        assert!(!state.namespaces.contains_key("a"));
    }

    #[test]
    fn object_moving_between_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut lg = LastGood::default();
        write(dir, "a.yaml", &pod_yaml("p", "a", "10.0.0.1"));
        load(dir, &mut lg);
        fs::remove_file(dir.join("a.yaml")).unwrap();
        write(dir, "b.yaml", &pod_yaml("p", "a", "10.0.0.2"));
        let (state, errors) = load(dir, &mut lg);
        assert!(errors.is_empty());
        assert_eq!(
            state.pods[&oref("a", "p")].ips,
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn missing_directory_keeps_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        fs::create_dir(&dir).unwrap();
        let mut lg = LastGood::default();
        write(&dir, "a.yaml", &pod_yaml("p", "a", "10.0.0.1"));
        let (before, _) = load(&dir, &mut lg);
        fs::remove_dir_all(&dir).unwrap();
        let (after, errors) = load(&dir, &mut lg);
        assert_contains(
            &single_error(&errors),
            &["cannot read the manifests directory"],
        );
        assert_eq!(after, before);
    }

    #[test]
    fn source_sets_node_and_generation() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "a.yaml", &pod_yaml("p", "a", "10.0.0.1"));
        let mut source = ManifestsSource::new(tmp.path(), Some("node-1".into()));
        let s1 = source.load();
        assert_eq!(s1.generation, 1);
        assert_eq!(s1.state.node.as_deref(), Some("node-1"));
        assert_eq!(source.load().generation, 2);
    }

    // ---- The watch ----

    const WITHIN: Duration = Duration::from_secs(1);

    /// Waits (at most [`WITHIN`]) for a snapshot satisfying `pred`, and returns it.
    async fn next_where(
        rx: &mut watch::Receiver<Snapshot>,
        what: &str,
        pred: impl FnMut(&Snapshot) -> bool,
    ) -> Snapshot {
        let start = Instant::now();
        let result = tokio::time::timeout(WITHIN, rx.wait_for(pred))
            .await
            .map(|r| r.map(|s| s.clone()));
        let snapshot = match result {
            Ok(Ok(snapshot)) => snapshot,
            Ok(Err(_)) => panic!("the watch stopped"),
            Err(_) => panic!(
                "no snapshot with {what} within {WITHIN:?}: {:#?}",
                *rx.borrow()
            ),
        };
        eprintln!("{what}: {:?}", start.elapsed());
        snapshot
    }

    fn has_pod(s: &Snapshot, ns: &str, name: &str) -> bool {
        s.state.pods.contains_key(&oref(ns, name))
    }

    #[tokio::test]
    async fn watch_applies_changes_within_a_second() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        write(&dir, "a.yaml", &pod_yaml("p1", "a", "10.0.0.1"));
        let mut rx = ManifestsSource::new(&dir, Some("n1".into()))
            .watch()
            .await
            .unwrap();

        // The initial load, marked as changed.
        assert!(rx.has_changed().unwrap());
        let initial = rx.borrow_and_update().clone();
        assert_eq!(initial.generation, 1);
        assert!(has_pod(&initial, "a", "p1"));
        assert_eq!(initial.state.node.as_deref(), Some("n1"));

        // A new file.
        write(&dir, "b.yaml", &pod_yaml("p2", "a", "10.0.0.2"));
        let s = next_where(&mut rx, "a created file", |s| has_pod(s, "a", "p2")).await;
        assert!(s.generation > 1);

        // A modified file.
        write(&dir, "b.yaml", &pod_yaml("p2", "a", "10.0.0.3"));
        next_where(&mut rx, "a modified file", |s| {
            s.state
                .pods
                .get(&oref("a", "p2"))
                .is_some_and(|p| p.ips == ["10.0.0.3".parse::<IpAddr>().unwrap()])
        })
        .await;

        // An editor's atomic save: write a temporary file, rename it over the original.
        write(&dir, ".b.yaml.tmp", &pod_yaml("p2", "a", "10.0.0.4"));
        fs::rename(dir.join(".b.yaml.tmp"), dir.join("b.yaml")).unwrap();
        next_where(&mut rx, "an atomic save", |s| {
            s.state
                .pods
                .get(&oref("a", "p2"))
                .is_some_and(|p| p.ips == ["10.0.0.4".parse::<IpAddr>().unwrap()])
        })
        .await;

        // Renamed away (no longer a manifest name), then back.
        fs::rename(dir.join("b.yaml"), dir.join("b.yaml.off")).unwrap();
        next_where(&mut rx, "a file renamed away", |s| !has_pod(s, "a", "p2")).await;
        fs::rename(dir.join("b.yaml.off"), dir.join("b.yml")).unwrap();
        next_where(&mut rx, "a file renamed in", |s| has_pod(s, "a", "p2")).await;

        // An invalid change: reported, the old version stays.
        write(&dir, "b.yml", &pod_yaml("p2", "a", "10.0.0.999"));
        let s = next_where(&mut rx, "an error", |s| !s.errors.is_empty()).await;
        assert_contains(
            &s.errors[0].to_string(),
            &["b.yml", "Pod a/p2", "status.podIP"],
        );
        assert_eq!(
            s.state.pods[&oref("a", "p2")].ips,
            ["10.0.0.4".parse::<IpAddr>().unwrap()]
        );

        // A deleted file.
        fs::remove_file(dir.join("b.yml")).unwrap();
        next_where(&mut rx, "a deleted file", |s| {
            !has_pod(s, "a", "p2") && s.errors.is_empty()
        })
        .await;

        // A burst of changes is applied (at most MAX_DELAY after its start).
        for i in 0..20 {
            write(
                &dir,
                &format!("burst-{i}.yaml"),
                &pod_yaml(&format!("b{i}"), "a", &format!("10.0.1.{i}")),
            );
        }
        next_where(&mut rx, "a burst", |s| s.state.pods.len() == 21).await;

        // Nothing changes: no new snapshot (touching a file, an unrelated file).
        let generation = rx.borrow_and_update().generation;
        write(&dir, "notes.txt", "hello");
        write(&dir, "a.yaml", &pod_yaml("p1", "a", "10.0.0.1"));
        tokio::time::sleep(QUIET * 4).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow().generation, generation);
    }

    #[tokio::test]
    async fn watch_rejects_a_missing_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let err = ManifestsSource::new(&missing, None)
            .watch()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err:#}");
    }

    #[tokio::test]
    async fn watch_ends_when_the_receiver_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let rx = ManifestsSource::new(tmp.path(), None)
            .watch()
            .await
            .unwrap();
        drop(rx);
        // The task notices (tx.closed()) and drops the watcher; writing must not fail or hang.
        tokio::time::sleep(Duration::from_millis(50)).await;
        write(tmp.path(), "a.yaml", &pod_yaml("p", "a", "10.0.0.1"));
    }
}
