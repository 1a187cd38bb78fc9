//! Fuzz / property tests of altdiff's input parsers (issue 8, "Bad input, faults and interruptions"):
//! no input makes them panic or hang, and what they return stays in proportion to what they read.
//!
//! One test per target, so each can be run on its own:
//!
//! - `fuzz_batch_file`: [`altdiff::batch::parse`] (plain lines, JSON Lines, webui command lines
//!   with shell quoting) on random bytes, on mutations of realistic batch files (byte flips, inserted
//!   syntax tokens, deletions, duplications, truncations, splices of two files) and on generated
//!   files of JSON / webui / plain / comment / deeply nested lines.
//! - `fuzz_sentencepiece_model`: [`altdiff::sentencepiece`]'s protobuf reader and model checks
//!   (`ModelProto::parse`, `SentencePieceModel::from_bytes`) on mutations of the tiny model's real
//!   `sentencepiece.bpe.model`, on generated protobuf (pieces with any scores and types, trainer and
//!   normaliser specs, real / mutated / random charsmaps, unknown fields and wrong wire types) and on
//!   random bytes; every model that loads also normalises and encodes texts (the pieces must spell
//!   the normalised text and equal a straightforward reference segmentation), maps ids, and builds
//!   its `tokenizers` tokenizer and encodes with it.
//! - `fuzz_png_metadata`: [`altdiff::metadata::read_png_text_from`] / `read_record_from` (and the
//!   path versions now and then) on byte mutations of real altdiff PNGs (with and without CRCs
//!   repaired), chunk-level mutations (chunks dropped, repeated, swapped, inserted, given wrong lengths
//!   or CRCs, the `altdiff` JSON record mutated as JSON), random chunk sequences (text chunks with
//!   random, compressed and zip-bomb payloads, random IHDRs, unknown types) and random bytes. The text
//!   returned may not exceed twice the file plus twice [`altdiff::metadata::MAX_INFLATED_TEXT`].
//! - `fuzz_configs`: [`altdiff::config`]'s loaders (`ModelIndex` via `read_json`,
//!   `TextEncoderConfig`, `UNetConfig`, `VaeConfig`, `SchedulerConfig`, `TokenizerConfig`) on byte
//!   mutations and JSON-value mutations (extreme numbers, wrong types, removed and added keys, arrays
//!   truncated or grown) of the tiny model's real JSON files, and on random JSON; what loads goes on to
//!   `VaeConfig::scale_factor`, `UNetConfig::cross_attention_dim`, `TokenizerConfig::max_length` and
//!   `schedulers::build` (then a few scheduler steps on a 1x1 latent).
//!
//! Every case must finish in under [`CASE_LIMIT`] (a hang or a quadratic blow-up fails the case).
//!
//! By default each target runs a fixed, small number of cases, so that the whole file stays short in
//! CI (`cargo test --test fuzz`). For a long run set `ALTDIFF_FUZZ_SECONDS=N`: each target then runs
//! rounds of cases, each round with a fresh random seed, until N seconds have passed, and prints the
//! number of cases, the seconds, the cases per second and the slowest case. Ten minutes of one target:
//!
//! ```sh
//! ALTDIFF_FUZZ_SECONDS=600 cargo test --release --test fuzz fuzz_png_metadata -- --nocapture
//! ```
//!
//! A failure prints the shrunk input (for the large seeds, the recipe: seed number and mutations) and
//! the round's seed; `ALTDIFF_FUZZ_SEED=S` replays that round.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use altdiff::batch;
use altdiff::config::{
    read_json, ModelIndex, PerBlock, SchedulerConfig, TextEncoderConfig, TokenizerConfig,
    UNetConfig, VaeConfig,
};
use altdiff::metadata::{self, ImageRecord, ModelRecord, NoiseRecord, MAX_INFLATED_TEXT};
use altdiff::schedulers::{self, SchedulerKind, SchedulerOptions, TimestepSpacing};
use altdiff::sentencepiece::{ModelProto, SentencePieceModel, XlmRobertaSentencePiece};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestCaseResult, TestRunner};
use serde_json::{json, Value};

/// The most one case may take: far above any case seen (the slowest take tens of milliseconds, a few
/// hundred on a loaded 2-core machine), so only a hang or a blow-up fails, not a busy CI machine.
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// Cases slower than this are printed (with the input) but pass.
const SLOW_REPORT: Duration = Duration::from_millis(250);

/// Cases per round in a timed run (`ALTDIFF_FUZZ_SECONDS`).
const ROUND_CASES: u32 = 512;

// ---------------------------------------------------------------------------------------------
// The runner
// ---------------------------------------------------------------------------------------------

/// Runs `check` on values of `strategy`: `ci_cases` cases, or rounds until `ALTDIFF_FUZZ_SECONDS`
/// have passed. Each case is timed against [`CASE_LIMIT`]; the totals are printed at the end.
fn fuzz<S>(name: &str, ci_cases: u32, strategy: S, check: impl Fn(&S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let env_u64 = |var: &str| -> Option<u64> {
        let text = std::env::var(var).ok()?;
        Some(
            text.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{var}={text:?} is not a whole number")),
        )
    };
    let seconds = env_u64("ALTDIFF_FUZZ_SECONDS");
    let fixed_seed = env_u64("ALTDIFF_FUZZ_SEED");
    let started = Instant::now();
    let deadline = seconds.map(|s| started + Duration::from_secs(s));
    let cases = Cell::new(0u64);
    let slowest = Cell::new(Duration::ZERO);
    let timed = |value: S::Value| -> TestCaseResult {
        let t = Instant::now();
        let result = check(&value);
        let took = t.elapsed();
        if took > SLOW_REPORT {
            eprintln!("{name}: slow case ({took:?}): {value:?}");
        }
        cases.set(cases.get() + 1);
        slowest.set(slowest.get().max(took));
        result?;
        prop_assert!(
            took < CASE_LIMIT,
            "the case took {took:?} (limit {CASE_LIMIT:?})"
        );
        Ok(())
    };
    let mut rounds = 0u64;
    loop {
        let seed = fixed_seed.unwrap_or_else(|| RandomState::new().build_hasher().finish());
        let config = Config {
            cases: match (deadline, fixed_seed) {
                // (A replayed round may come from either mode: run the longer of the two.)
                (_, Some(_)) => ROUND_CASES.max(ci_cases),
                (Some(_), None) => ROUND_CASES,
                (None, None) => ci_cases,
            },
            failure_persistence: None,
            rng_seed: RngSeed::Fixed(seed),
            max_shrink_time: 60_000,
            ..Config::default()
        };
        if let Err(e) = TestRunner::new(config).run(&strategy, timed) {
            panic!("{name}: {e}\n(round seed {seed}: ALTDIFF_FUZZ_SEED={seed} replays this round)");
        }
        rounds += 1;
        match deadline {
            Some(d) if fixed_seed.is_none() && Instant::now() < d => {}
            _ => break,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{name}: {} cases in {secs:.1} s ({:.0} cases/s, {rounds} round(s)), slowest case {:.1} ms",
        cases.get(),
        cases.get() as f64 / secs.max(1e-9),
        slowest.get().as_secs_f64() * 1e3
    );
    let notes = NOTES.with(|n| std::mem::take(&mut *n.borrow_mut()));
    let notes: Vec<String> = notes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!("{name}: outcomes: {}", notes.join(", "));
}

thread_local! {
    /// Outcome counts of the target running on this thread (each test has its own thread).
    static NOTES: RefCell<BTreeMap<&'static str, u64>> = const { RefCell::new(BTreeMap::new()) };
}

/// Counts an outcome (a model that loads, a record that parses, ...); each target prints its counts
/// with its totals, to show how deep the generated inputs get.
fn note(outcome: &'static str) {
    NOTES.with(|n| *n.borrow_mut().entry(outcome).or_default() += 1);
}

/// Bytes that print as an escaped byte string (cut after 512 bytes) in failure messages.
#[derive(Clone, PartialEq)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(512)];
        write!(f, "b\"{}\"", shown.escape_ascii())?;
        if shown.len() < self.0.len() {
            write!(f, "… ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read_fixture(rel: &str) -> Vec<u8> {
    let path = fixture(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The scratch directory of one target (tests run in parallel threads of one process).
fn scratch_dir(target: &str) -> PathBuf {
    std::env::temp_dir().join(format!("altdiff-fuzz-{}-{target}", std::process::id()))
}

/// A scratch file for one target.
fn scratch_file(target: &str, name: &str) -> PathBuf {
    let dir = scratch_dir(target);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir.join(name)
}

// ---------------------------------------------------------------------------------------------
// Byte-level mutations
// ---------------------------------------------------------------------------------------------

/// One edit of a byte string; positions are fractions of its current length.
#[derive(Debug, Clone)]
enum ByteOp {
    /// Flip one bit.
    Flip(Index, u8),
    /// Set one byte.
    Set(Index, u8),
    /// Insert bytes.
    Insert(Index, Bytes),
    /// Overwrite bytes in place.
    Overwrite(Index, Bytes),
    /// Delete up to n bytes.
    Delete(Index, u16),
    /// Copy up to n bytes from the first position to the second.
    Duplicate(Index, u16, Index),
    /// Cut the rest.
    Truncate(Index),
    /// Replace the rest by the rest of another seed from the second position.
    Splice(Index, usize, Index),
}

fn apply_byte_ops(data: &mut Vec<u8>, ops: &[ByteOp], seeds: &[Vec<u8>]) {
    for op in ops {
        let len = data.len();
        match op {
            ByteOp::Flip(i, bit) if len > 0 => data[i.index(len)] ^= 1 << (bit % 8),
            ByteOp::Set(i, b) if len > 0 => data[i.index(len)] = *b,
            ByteOp::Insert(i, bytes) => {
                let at = i.index(len + 1);
                data.splice(at..at, bytes.0.iter().copied());
            }
            ByteOp::Overwrite(i, bytes) if len > 0 => {
                let at = i.index(len);
                for (d, b) in data[at..].iter_mut().zip(&bytes.0) {
                    *d = *b;
                }
            }
            ByteOp::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                data.drain(at..(at + usize::from(*n)).min(len));
            }
            ByteOp::Duplicate(i, n, to) if len > 0 => {
                let at = i.index(len);
                let piece = data[at..(at + usize::from(*n)).min(len)].to_vec();
                let to = to.index(len + 1);
                data.splice(to..to, piece);
            }
            ByteOp::Truncate(i) => data.truncate(i.index(len + 1)),
            ByteOp::Splice(i, other, from) if !seeds.is_empty() => {
                let other = &seeds[other % seeds.len()];
                data.truncate(i.index(len + 1));
                data.extend_from_slice(&other[from.index(other.len() + 1)..]);
            }
            _ => {}
        }
    }
}

/// Bytes to insert: a token of `dict`, a run of one, or random bytes.
fn insertion(dict: &'static [&'static [u8]]) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => proptest::sample::select(dict).prop_map(|t| Bytes(t.to_vec())),
        1 => (proptest::sample::select(dict), 2usize..64).prop_map(|(t, n)| Bytes(t.repeat(n))),
        2 => proptest::collection::vec(any::<u8>(), 1..24).prop_map(Bytes),
    ]
}

fn byte_op(dict: &'static [&'static [u8]]) -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteOp::Flip(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteOp::Set(i, b)),
        4 => (any::<Index>(), insertion(dict)).prop_map(|(i, b)| ByteOp::Insert(i, b)),
        2 => (any::<Index>(), insertion(dict)).prop_map(|(i, b)| ByteOp::Overwrite(i, b)),
        2 => (any::<Index>(), 1u16..256).prop_map(|(i, n)| ByteOp::Delete(i, n)),
        1 => (any::<Index>(), 1u16..4096, any::<Index>())
            .prop_map(|(i, n, t)| ByteOp::Duplicate(i, n, t)),
        1 => any::<Index>().prop_map(ByteOp::Truncate),
        1 => (any::<Index>(), any::<usize>(), any::<Index>())
            .prop_map(|(i, s, f)| ByteOp::Splice(i, s, f)),
    ]
}

/// A mutation recipe: seed number and edits (printed instead of the mutated bytes on failure).
#[derive(Debug, Clone)]
struct Mutation {
    seed: usize,
    ops: Vec<ByteOp>,
}

impl Mutation {
    fn apply(&self, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut data = seeds[self.seed % seeds.len()].clone();
        apply_byte_ops(&mut data, &self.ops, seeds);
        data
    }
}

/// A few edits usually (the input stays close to its seed and gets further into the parser), up to
/// `max_ops` sometimes.
fn op_list<S: Strategy>(
    op: impl Fn() -> S,
    max_ops: usize,
) -> impl Strategy<Value = Vec<S::Value>> {
    prop_oneof![
        3 => proptest::collection::vec(op(), 1..=2),
        1 => proptest::collection::vec(op(), 1..=max_ops),
    ]
}

fn mutation(dict: &'static [&'static [u8]], max_ops: usize) -> impl Strategy<Value = Mutation> {
    (any::<usize>(), op_list(move || byte_op(dict), max_ops))
        .prop_map(|(seed, ops)| Mutation { seed, ops })
}

/// Edits that keep the length (and so a binary format's framing).
fn in_place_mutation(
    dict: &'static [&'static [u8]],
    max_ops: usize,
) -> impl Strategy<Value = Mutation> {
    let op = move || {
        prop_oneof![
            4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteOp::Flip(i, b)),
            2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteOp::Set(i, b)),
            2 => (any::<Index>(), insertion(dict)).prop_map(|(i, b)| ByteOp::Overwrite(i, b)),
        ]
    };
    (any::<usize>(), op_list(op, max_ops)).prop_map(|(seed, ops)| Mutation { seed, ops })
}

fn random_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes)
}

// ---------------------------------------------------------------------------------------------
// JSON values and their mutations
// ---------------------------------------------------------------------------------------------

/// Field names of the config files other than the scheduler's (and a few the loaders reject).
const OTHER_FIELDS: &[&str] = &[
    "text_encoder",
    "scheduler",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
    "project_dim",
    "has_pre_transformation",
    "position_embedding_type",
    "is_decoder",
    "add_cross_attention",
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "use_linear_projection",
    "upcast_attention",
    "only_cross_attention",
    "class_embed_type",
    "act_fn",
    "resnet_out_scale_factor",
    "conv_in_kernel",
    "latent_channels",
    "scaling_factor",
    "use_quant_conv",
    "use_post_quant_conv",
    "shift_factor",
    "latents_mean",
    "mid_block_add_attention",
    "model_max_length",
    // the image record's
    "altdiff",
    "prompt",
    "negative_prompt",
    "lang",
    "noise",
    "kind",
    "seed",
    "batch",
    "index",
    "steps",
    "guidance",
    "scheduler_config",
    "eta",
    "karras",
    "width",
    "height",
    "max_length",
    "model",
    "source",
    "revision",
    "commit",
    "variant",
    "dtype",
];

/// Strings the configs and records give meaning to.
const JSON_STRINGS: &[&str] = &[
    "CrossAttnDownBlock2D",
    "DownBlock2D",
    "CrossAttnUpBlock2D",
    "UpBlock2D",
    "UNetMidBlock2DCrossAttn",
    "UNetMidBlock2DSimpleCrossAttn",
    "DownEncoderBlock2D",
    "UpDecoderBlock2D",
    "gelu",
    "gelu_new",
    "relu",
    "silu",
    "swish",
    "absolute",
    "default",
    "positional",
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
    "epsilon",
    "v_prediction",
    "sample",
    "leading",
    "linspace",
    "trailing",
    "log_linear",
    "discrete",
    "continuous",
    "zero",
    "sigma_min",
    "dpmsolver++",
    "dpmsolver",
    "midpoint",
    "heun",
    "bh1",
    "bh2",
    "fixed_small",
    "learned_range",
    "PNDMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "UniPCMultistepScheduler",
    "diffusers",
    "seed",
    "latents_file",
    "pndm",
    "ddim",
    "euler-a",
    "f32",
    "f16",
    "",
    " ",
    "\u{0}",
    "é",
    "\u{202e}",
];

/// Numbers at the edges: zero, one, negatives, the largest integers, huge and tiny floats.
fn extreme_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        proptest::sample::select(vec![
            json!(0),
            json!(1),
            json!(2),
            json!(3),
            json!(4),
            json!(8),
            json!(32),
            json!(64),
            json!(65),
            json!(-1),
            json!(-2),
            json!(1000),
            json!(1001),
            json!(1_000_000),
            json!(1_000_000_000),
            json!(u32::MAX),
            json!(1u64 << 32),
            json!(1u64 << 53),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(0.0),
            json!(-0.0),
            json!(0.5),
            json!(1.5),
            json!(-0.5),
            json!(1e-300),
            json!(5e-324),
            json!(1e30),
            json!(1e300),
            json!(1.7976931348623157e308),
            json!(-1.7976931348623157e308),
            json!(f32::MAX),
            json!(f32::MIN_POSITIVE),
        ]),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (0u64..5000).prop_map(Value::from),
    ]
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::sample::select(json_fields()).prop_map(str::to_string),
        1 => "\\PC{0,12}",
    ]
}

/// A JSON scalar: extreme numbers, booleans, null, meaningful and random strings.
fn json_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => extreme_number(),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        2 => proptest::sample::select(JSON_STRINGS).prop_map(Value::from),
        1 => "\\PC{0,24}".prop_map(Value::from),
    ]
}

/// Any JSON value of bounded depth and size, arrays of a repeated scalar (long block lists)
/// included.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = json_scalar();
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            3 => proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            1 => (json_scalar(), 0usize..200).prop_map(|(v, n)| Value::Array(vec![v; n])),
            3 => proptest::collection::vec((json_key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// One edit of a JSON document; `Index`es pick a node in pre-order.
#[derive(Debug, Clone)]
enum JsonOp {
    /// Replace a node.
    Replace(Index, Value),
    /// Remove an entry of an object or array.
    Remove(Index, Index),
    /// Add a key to an object (or an element to an array).
    Insert(Index, String, Value),
    /// Truncate an array, or grow it by repeating its last element.
    Resize(Index, usize),
    /// Nest a node in `depth` arrays.
    Nest(Index, usize),
}

fn json_op() -> impl Strategy<Value = JsonOp> {
    prop_oneof![
        6 => (any::<Index>(), json_value()).prop_map(|(i, v)| JsonOp::Replace(i, v)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| JsonOp::Remove(i, j)),
        2 => (any::<Index>(), json_key(), json_value()).prop_map(|(i, k, v)| JsonOp::Insert(i, k, v)),
        2 => (any::<Index>(), 0usize..200).prop_map(|(i, n)| JsonOp::Resize(i, n)),
        1 => (any::<Index>(), 1usize..200).prop_map(|(i, n)| JsonOp::Nest(i, n)),
    ]
}

fn node_count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(node_count).sum(),
        Value::Object(o) => o.values().map(node_count).sum(),
        _ => 0,
    }
}

/// The node number `k` in pre-order (`k < node_count(v)`).
fn node_mut(v: &mut Value, mut k: usize) -> &mut Value {
    if k == 0 {
        return v;
    }
    k -= 1;
    let children: Vec<&mut Value> = match v {
        Value::Array(a) => a.iter_mut().collect(),
        Value::Object(o) => o.values_mut().collect(),
        _ => unreachable!("node index past a leaf"),
    };
    for child in children {
        let n = node_count(child);
        if k < n {
            return node_mut(child, k);
        }
        k -= n;
    }
    unreachable!("node index past the end")
}

/// The most nodes a mutated JSON document may grow to.
const MAX_JSON_NODES: usize = 20_000;

fn apply_json_ops(root: &mut Value, ops: &[JsonOp]) {
    for op in ops {
        let count = node_count(root);
        match op {
            JsonOp::Replace(i, v) => *node_mut(root, i.index(count)) = v.clone(),
            JsonOp::Remove(i, j) => match node_mut(root, i.index(count)) {
                Value::Array(a) if !a.is_empty() => {
                    let at = j.index(a.len());
                    a.remove(at);
                }
                Value::Object(o) if !o.is_empty() => {
                    let key = o.keys().nth(j.index(o.len())).cloned().unwrap_or_default();
                    o.remove(&key);
                }
                _ => {}
            },
            JsonOp::Insert(i, k, v) => match node_mut(root, i.index(count)) {
                Value::Array(a) => a.push(v.clone()),
                Value::Object(o) => {
                    o.insert(k.clone(), v.clone());
                }
                _ => {}
            },
            JsonOp::Resize(i, n) => {
                if let Value::Array(a) = node_mut(root, i.index(count)) {
                    let fill = a.last().cloned().unwrap_or(json!(32));
                    // (Repeating a big element again and again would only test serde_json's speed.)
                    if count + node_count(&fill) * n.saturating_sub(a.len()) <= MAX_JSON_NODES {
                        a.resize(*n, fill);
                    }
                }
            }
            JsonOp::Nest(i, depth) => {
                let node = node_mut(root, i.index(count));
                for _ in 0..*depth {
                    *node = Value::Array(vec![node.take()]);
                }
            }
        }
    }
}

/// A JSON document from a seed: edited as JSON, then written compact or pretty.
#[derive(Debug, Clone)]
struct JsonMutation {
    seed: usize,
    ops: Vec<JsonOp>,
    pretty: bool,
}

impl JsonMutation {
    fn apply(&self, seeds: &[Value]) -> Vec<u8> {
        let mut v = seeds[self.seed % seeds.len()].clone();
        apply_json_ops(&mut v, &self.ops);
        if self.pretty {
            serde_json::to_vec_pretty(&v)
        } else {
            serde_json::to_vec(&v)
        }
        .expect("serialise a JSON value")
    }
}

fn json_mutation(max_ops: usize) -> impl Strategy<Value = JsonMutation> {
    (any::<usize>(), op_list(json_op, max_ops), any::<bool>())
        .prop_map(|(seed, ops, pretty)| JsonMutation { seed, ops, pretty })
}

/// Tokens that matter to JSON parsers, inserted by byte mutations.
const JSON_DICT: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-",
    b"0",
    b"-1",
    b"1e400",
    b"-1e400",
    b"18446744073709551616",
    b"99999999999999999999999999",
    b"1.5",
    b"NaN",
    b"Infinity",
    b"\\u0000",
    b"\\ud800",
    b"\\",
    b"\xFF",
    b"\xC3",
    b"\xEF\xBB\xBF",
    b" ",
    b"\n",
];

// ---------------------------------------------------------------------------------------------
// fuzz_batch_file
// ---------------------------------------------------------------------------------------------

/// Realistic batch files: every format, comments, CRLF, a BOM, odd quoting.
const BATCH_SEEDS: &[&str] = &[
    "a red fox in the snow\n# a comment\n\n一只在雪地里的红狐狸\r\nun renard roux dans la neige\n",
    "{\"prompt\": \"un renard\", \"negative_prompt\": \"blurry\", \"lang\": \"fr\", \"seed\": 42, \
     \"steps\": 20, \"guidance\": 7.5, \"scheduler\": \"ddim\", \"width\": 512, \"height\": 768, \
     \"num_images\": 2, \"output\": \"out/\"}\n{\"prompt\": \"x\", \"cfg_scale\": 1.5, \"sampler\": \
     \"k_euler_a\", \"seed\": null}\n",
    "--prompt \"a cat\" --negative_prompt 'ugly hands' --seed -1 --steps 25 --cfg_scale 7 \
     --sampler_name \"Euler a\" --width 512 --height 768 --batch_size 2 --n_iter 3 \
     --outpath_samples out\n--prompt a red fox in the snow --steps 20\n",
    "\u{FEFF}--prompt=\"x\" --seed 1\r\n--prompt \"say \\\"hi\\\"\" --lang en --scheduler pndm \
     --guidance 7 --num_images 1 --output a.png\n  {\"prompt\":\"\\u00e9t\\u00e9\"}\n\t# indented \
     comment\n--prompt 'it'\\''s' --sampler_index 3\n",
    "{red|blue} car\n--prompt x --subseed 3\n{\"prompt\": \"a\", \"prompt\": \"b\"}\n{\"promt\": \
     \"typo\"}\n--prompt\n--prompt \"unterminated\n--prompt x \\\n",
];

/// Tokens that matter to the batch parsers.
const BATCH_DICT: &[&[u8]] = &[
    b"\n",
    b"\r\n",
    b"\r",
    b"#",
    b"{",
    b"}",
    b"\"",
    b"'",
    b"\\",
    b" ",
    b"\t",
    b"--",
    b"-",
    b"--prompt ",
    b"--negative_prompt ",
    b"--seed ",
    b"--steps ",
    b"--cfg_scale ",
    b"--sampler_index ",
    b"--sampler_name ",
    b"--batch_size ",
    b"--n_iter ",
    b"--num_images ",
    b"--styles ",
    b"--width=",
    b"\"prompt\": ",
    b"\"seed\": ",
    b"\"steps\": ",
    b"\"guidance\": ",
    b"\"cfg_scale\": ",
    b"\"sampler\": ",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1.5",
    b"1e400",
    b"inf",
    b"nan",
    b"18446744073709551616",
    b"340282366920938463463374607431768211456",
    b"[",
    b"]",
    b"\xC3\xA9",
    b"\xE4\xB8\x80",
    b"\xF0\x9F\xA6\x8A",
    b"\xFF",
    b"\xC3",
    b"\0",
    b"\xEF\xBB\xBF",
    b"\xFF\xFE",
    b"\\u0000",
    b"\\ud800",
    b"\\\"",
];

fn batch_seeds() -> Vec<Vec<u8>> {
    BATCH_SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// A word of a webui line, quoted in one of the ways shlex knows (or broken).
fn webui_word() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        3 => proptest::sample::select(batch::WEBUI_OPTIONS).prop_map(|o| format!("--{o}")),
        1 => proptest::sample::select(batch::WEBUI_OPTIONS).prop_map(|o| format!("--{}", o.replace('_', "-"))),
        1 => "--[a-z_=-]{0,12}",
        4 => "\\PC{0,12}",
        2 => json_scalar().prop_map(|v| match v {
            Value::String(s) => s,
            v => v.to_string(),
        }),
    ];
    (word, 0u8..7).prop_map(|(w, q)| match q {
        0 => format!("'{w}'"),
        1 => format!("\"{}\"", w.replace('\\', "\\\\").replace('"', "\\\"")),
        2 => w.replace(' ', "\\ "),
        3 => format!("\"{w}"),
        4 => format!("{w}\\"),
        _ => w,
    })
}

/// A JSON line: keys in order, duplicates kept, with optional trailing text.
fn json_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        6 => proptest::sample::select(batch::JSON_KEYS).prop_map(str::to_string),
        1 => json_key(),
    ];
    (
        proptest::collection::vec((key, json_value()), 0..8),
        prop_oneof![4 => Just(String::new()), 1 => "\\PC{0,6}"],
    )
        .prop_map(|(entries, tail)| {
            let body: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}: {v}", Value::from(k.as_str())))
                .collect();
            format!("{{{}}}{tail}", body.join(", "))
        })
}

/// One line of a generated batch file.
fn batch_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => json_line(),
        4 => proptest::collection::vec(webui_word(), 0..10).prop_map(|w| format!("--{}", w.join(" "))),
        2 => "\\PC{0,40}",
        1 => "[ \t]*#\\PC{0,20}",
        1 => "[ \t\r]{0,4}",
        // Nesting deeper than serde_json's recursion limit, closed or not.
        1 => (1usize..3000, any::<bool>(), prop_oneof![Just("["), Just("{\"a\":")]).prop_map(
            |(n, closed, open)| {
                let close = if open == "[" { "]" } else { "}" };
                format!(
                    "{{\"prompt\": {}{}}}",
                    open.repeat(n),
                    if closed { close.repeat(n) } else { String::new() }
                )
            }
        ),
    ]
}

fn generated_batch_file() -> impl Strategy<Value = Bytes> {
    (
        proptest::collection::vec(batch_line(), 0..12),
        any::<bool>(),
        0u8..4,
    )
        .prop_map(|(lines, crlf, bom)| {
            let mut out = match bom {
                0 => b"\xEF\xBB\xBF".to_vec(),
                1 => b"\xFF\xFE".to_vec(),
                _ => Vec::new(),
            };
            out.extend_from_slice(lines.join(if crlf { "\r\n" } else { "\n" }).as_bytes());
            Bytes(out)
        })
}

fn batch_input() -> impl Strategy<Value = Bytes> {
    let seeds = batch_seeds();
    prop_oneof![
        2 => random_bytes(2048),
        4 => mutation(BATCH_DICT, 8).prop_map(move |m| Bytes(m.apply(&seeds))),
        4 => generated_batch_file(),
    ]
}

fn check_batch(input: &Bytes) -> TestCaseResult {
    let input = &input.0;
    let entries = batch::parse(input);
    let lines = input.iter().filter(|&&b| b == b'\n').count() + 1;
    prop_assert!(entries.len() <= lines);
    let mut last_line = 0;
    let mut out_bytes = 0usize;
    for entry in &entries {
        let line = match entry {
            Ok(job) => {
                note(if job.overrides.is_empty() {
                    "job"
                } else {
                    "job with overrides"
                });
                prop_assert!(!job.prompt.trim().is_empty(), "blank prompt: {job:?}");
                let o = &job.overrides;
                if let Some(g) = o.guidance {
                    prop_assert!(g.is_finite() && g >= 0.0, "guidance {g}");
                }
                if let Some(s) = &o.scheduler {
                    let _ = altdiff::schedulers::SchedulerKind::parse(s);
                }
                out_bytes += job.prompt.len()
                    + [&o.negative_prompt, &o.lang, &o.scheduler, &o.output]
                        .iter()
                        .map(|s| s.as_ref().map_or(0, String::len))
                        .sum::<usize>();
                job.line
            }
            Err(e) => {
                note("line error");
                out_bytes += e.message.len();
                let _ = e.to_string();
                e.line
            }
        };
        prop_assert!(
            line > last_line && line <= lines,
            "line {line} after {last_line} of {lines}"
        );
        last_line = line;
    }
    // Bounded output: values are (at most doubled) copies of the input; messages are short.
    prop_assert!(
        out_bytes <= 2 * input.len() + 2048 * entries.len(),
        "{out_bytes} bytes out of {} in",
        input.len()
    );
    Ok(())
}

#[test]
fn fuzz_batch_file() {
    fuzz("fuzz_batch_file", 1024, batch_input(), check_batch);
}

// ---------------------------------------------------------------------------------------------
// fuzz_sentencepiece_model
// ---------------------------------------------------------------------------------------------

const SP_MODEL: &str = "tests/fixtures/models/tiny-m18/tokenizer/sentencepiece.bpe.model";

fn sp_seed() -> &'static Vec<u8> {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| read_fixture(SP_MODEL))
}

/// The real model's precompiled charsmap (nmt_nfkc).
fn real_charsmap() -> &'static Vec<u8> {
    static MAP: OnceLock<Vec<u8>> = OnceLock::new();
    MAP.get_or_init(|| {
        ModelProto::parse(sp_seed())
            .expect("parse the tiny sentencepiece model")
            .normalizer_spec
            .precompiled_charsmap
    })
}

/// Tokens that matter to a protobuf reader: varint edges, field keys, lengths.
const PROTO_DICT: &[&[u8]] = &[
    b"\x00",
    b"\x80",
    b"\xFF",
    b"\x7F",
    b"\xFF\xFF\xFF\xFF\x0F",
    b"\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\x01",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"\x0A",
    b"\x12",
    b"\x1A",
    b"\x0A\x00",
    b"\x0A\x7F",
    b"\x0A\xFF\xFF\xFF\xFF\x0F",
    b"\x15\x00\x00\x80\x7F",
    b"\x15\x00\x00\xC0\x7F",
    b"\x18\x02",
    b"\x18\x04",
    b"\x18\x06",
    b"\x18\x07",
    b"\x0B",
    b"\x0C",
    b"\x0E",
    b"\x01",
    b"\x05",
    b"\x09",
    b"\xE2\x96\x81",
    b"<unk>",
];

/// A protobuf field as written: number, wire type and payload.
#[derive(Debug, Clone)]
enum Field {
    Varint(u64, u64),
    Fixed32(u64, u32),
    Fixed64(u64, u64),
    Len(u64, Bytes),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode_fields(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        match f {
            Field::Varint(n, v) => {
                put_varint(&mut out, n << 3);
                put_varint(&mut out, *v);
            }
            Field::Fixed64(n, v) => {
                put_varint(&mut out, (n << 3) | 1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Len(n, b) => {
                put_varint(&mut out, (n << 3) | 2);
                put_varint(&mut out, b.0.len() as u64);
                out.extend_from_slice(&b.0);
            }
            Field::Fixed32(n, v) => {
                put_varint(&mut out, (n << 3) | 5);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

/// A field with a random number, wire type and payload (unknown fields, wrong wire types).
fn junk_field() -> impl Strategy<Value = Field> {
    let number = prop_oneof![
        1u64..8,
        1u64..64,
        Just((1 << 29) - 1),
        Just(1 << 29),
        Just(0)
    ];
    prop_oneof![
        (number.clone(), any::<u64>()).prop_map(|(n, v)| Field::Varint(n, v)),
        (number.clone(), any::<u32>()).prop_map(|(n, v)| Field::Fixed32(n, v)),
        (number.clone(), any::<u64>()).prop_map(|(n, v)| Field::Fixed64(n, v)),
        (number, random_bytes(16)).prop_map(|(n, b)| Field::Len(n, b)),
    ]
}

fn piece_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(vec![
            "<unk>", "<s>", "</s>", "<pad>", "<mask>", "\u{2581}", "\u{2581}a", "a", "b", "ab",
            "abc", "\u{2581}the", "the", "é", "e\u{301}", "中", "文", "\u{2581}中文", " ", "",
            "\u{0}", "\u{2581}\u{2581}", "fi", "ﬁ", "1", "①",
        ])
        .prop_map(str::to_string),
        2 => "[a\u{2581}bé中 ]{1,4}",
        1 => "\\PC{1,6}",
        // A long piece: the segmentation tries every prefix up to the longest piece.
        1 => (1usize..600).prop_map(|n| "a".repeat(n)),
    ]
}

fn piece_score() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -20.0f32..0.0,
        1 => any::<f32>(),
        1 => proptest::sample::select(vec![
            f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, 0.0, -0.0,
        ]),
    ]
}

/// A generated `ModelProto.SentencePiece`.
#[derive(Debug, Clone)]
struct SynthPiece {
    text: String,
    score: f32,
    kind: u64,
    junk: Vec<Field>,
    /// 0: fields reversed, 1: no type, 2: no text, 3: unknown fields added, else as written.
    shape: u8,
}

impl SynthPiece {
    fn field(&self) -> Field {
        let mut fields = vec![
            Field::Len(1, Bytes(self.text.clone().into_bytes())),
            Field::Fixed32(2, self.score.to_bits()),
            Field::Varint(3, self.kind),
        ];
        match self.shape {
            0 => fields.reverse(),
            1 => fields.truncate(2),
            2 => {
                fields.remove(0);
            }
            3 => fields.extend(self.junk.iter().cloned()),
            _ => {}
        }
        Field::Len(1, Bytes(encode_fields(&fields)))
    }
}

fn synth_piece() -> impl Strategy<Value = SynthPiece> {
    (
        piece_text(),
        piece_score(),
        prop_oneof![24 => Just(1u64), 2 => Just(5), 1 => Just(3), 1 => 0u64..8, 1 => any::<u64>()],
        proptest::collection::vec(junk_field(), 0..2),
        0u8..8,
    )
        .prop_map(|(text, score, kind, junk, shape)| SynthPiece {
            text,
            score,
            kind,
            junk,
            shape,
        })
}

/// Which precompiled charsmap a generated model has.
#[derive(Debug, Clone)]
enum Charsmap {
    Real,
    Mutated(Vec<ByteOp>),
    Random(Bytes),
    /// A trie size header (possibly wrong) over random bytes.
    Header(u32, Bytes),
    None,
}

impl Charsmap {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Charsmap::Real => real_charsmap().clone(),
            Charsmap::Mutated(ops) => {
                let mut m = real_charsmap().clone();
                apply_byte_ops(&mut m, ops, &[]);
                m
            }
            Charsmap::Random(b) => b.0.clone(),
            Charsmap::Header(size, b) => {
                let mut m = size.to_le_bytes().to_vec();
                m.extend_from_slice(&b.0);
                m
            }
            Charsmap::None => Vec::new(),
        }
    }
}

fn charsmap() -> impl Strategy<Value = Charsmap> {
    prop_oneof![
        4 => Just(Charsmap::Real),
        4 => proptest::collection::vec(byte_op(PROTO_DICT), 1..6).prop_map(Charsmap::Mutated),
        1 => random_bytes(64).prop_map(Charsmap::Random),
        1 => (prop_oneof![0u32..64, any::<u32>()], random_bytes(64))
            .prop_map(|(s, b)| Charsmap::Header(s, b)),
        1 => Just(Charsmap::None),
    ]
}

/// A generated model file: the recipe, encoded by [`SynthModel::bytes`].
#[derive(Debug, Clone)]
struct SynthModel {
    /// Keep to what loads: unique non-empty pieces of supported types, a Unigram trainer spec, both
    /// specs once, no byte edits (the charsmap, scores and flags stay as generated).
    clean: bool,
    /// `<unk>`, `<s>`, `</s>` first, as real models have them.
    specials: bool,
    pieces: Vec<SynthPiece>,
    trainer: Vec<Field>,
    normalizer_flags: [Option<u64>; 3],
    charsmap: Charsmap,
    junk: Vec<Field>,
    /// The order of the top-level fields.
    order: u8,
    /// Byte edits of the encoded file.
    ops: Vec<ByteOp>,
}

impl SynthModel {
    fn bytes(&self) -> Vec<u8> {
        let mut pieces = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if self.specials || self.clean {
            for (text, kind) in [("<unk>", 2u64), ("<s>", 3), ("</s>", 3)] {
                seen.insert(text.to_string());
                pieces.push(Field::Len(
                    1,
                    Bytes(encode_fields(&[
                        Field::Len(1, Bytes(text.as_bytes().to_vec())),
                        Field::Fixed32(2, 0f32.to_bits()),
                        Field::Varint(3, kind),
                    ])),
                ));
            }
        }
        for p in &self.pieces {
            if !self.clean {
                pieces.push(p.field());
            } else if !p.text.is_empty() && seen.insert(p.text.clone()) {
                pieces.push(
                    SynthPiece {
                        kind: if matches!(p.kind, 1 | 3 | 5) {
                            p.kind
                        } else {
                            1
                        },
                        shape: p.shape.max(3),
                        ..p.clone()
                    }
                    .field(),
                );
            }
        }
        let trainer = if self.clean {
            vec![Field::Varint(3, 1)]
        } else {
            self.trainer.clone()
        };
        let (order, ops, junk) = if self.clean {
            (0, &[][..], &[][..])
        } else {
            (self.order, &self.ops[..], &self.junk[..])
        };
        let trainer = Field::Len(2, Bytes(encode_fields(&trainer)));
        let mut normalizer = vec![
            Field::Len(1, Bytes(b"nmt_nfkc".to_vec())),
            Field::Len(2, Bytes(self.charsmap.bytes())),
        ];
        for (n, flag) in (3..).zip(self.normalizer_flags) {
            if let Some(v) = flag {
                normalizer.push(Field::Varint(n, v));
            }
        }
        let normalizer = Field::Len(3, Bytes(encode_fields(&normalizer)));
        let mut fields = pieces;
        match order % 4 {
            0 => fields.extend([trainer, normalizer]),
            1 => {
                fields.insert(0, trainer);
                fields.insert(0, normalizer);
            }
            2 => fields.push(trainer),
            _ => fields.extend([normalizer.clone(), trainer, normalizer]),
        }
        fields.extend(junk.iter().cloned());
        let mut out = encode_fields(&fields);
        apply_byte_ops(&mut out, ops, &[]);
        out
    }
}

fn synth_model() -> impl Strategy<Value = SynthModel> {
    let trainer_field = prop_oneof![
        4 => prop_oneof![8 => Just(1u64), 1 => 0u64..6, 1 => any::<u64>()]
            .prop_map(|v| Field::Varint(3, v)),
        1 => any::<bool>().prop_map(|b| Field::Varint(24, u64::from(b))),
        1 => any::<bool>().prop_map(|b| Field::Varint(35, u64::from(b))),
        1 => prop_oneof![0u64..4, any::<u64>()].prop_map(|v| Field::Varint(40, v)),
        1 => junk_field(),
        1 => random_bytes(8).prop_map(|b| Field::Len(3, b)),
    ];
    let flag = prop_oneof![
        3 => Just(Some(1u64)),
        1 => Just(Some(0)),
        1 => Just(None),
        1 => any::<u64>().prop_map(Some),
    ];
    (
        prop_oneof![3 => Just(true), 1 => Just(false)],
        prop_oneof![5 => Just(true), 1 => Just(false)],
        proptest::collection::vec(synth_piece(), 0..40),
        proptest::collection::vec(trainer_field, 0..4),
        [flag.clone(), flag.clone(), flag],
        charsmap(),
        proptest::collection::vec(junk_field(), 0..3),
        prop_oneof![6 => Just(0u8), 1 => any::<u8>()],
        prop_oneof![
            4 => Just(Vec::new()),
            1 => proptest::collection::vec(byte_op(PROTO_DICT), 1..4),
        ],
    )
        .prop_map(
            |(clean, specials, pieces, trainer, normalizer_flags, charsmap, junk, order, ops)| {
                SynthModel {
                    clean,
                    specials,
                    pieces,
                    trainer,
                    normalizer_flags,
                    charsmap,
                    junk,
                    order,
                    ops,
                }
            },
        )
}

#[derive(Debug, Clone)]
enum SpModel {
    /// A mutation of the real model file.
    Mutated(Mutation),
    /// A generated protobuf.
    Synth(SynthModel),
    /// Random bytes.
    Random(Bytes),
}

impl SpModel {
    fn bytes(&self) -> Vec<u8> {
        match self {
            SpModel::Mutated(m) => m.apply(std::slice::from_ref(sp_seed())),
            SpModel::Synth(s) => s.bytes(),
            SpModel::Random(b) => b.0.clone(),
        }
    }
}

/// Texts to encode with a model that loads.
fn sp_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => proptest::sample::select(vec![
            "",
            " ",
            "   a   b   ",
            "a red fox in the snow",
            "一只在雪地里的红狐狸",
            "ｆｕｌｌｗｉｄｔｈ ① ﬁ Å e\u{301}\u{302}\u{303}",
            "\u{3000}\u{a0}\t\n\r",
            "<s> <mask> </s>",
            "\u{0}\u{1}\u{7f}\u{feff}\u{202e}",
            "🦊🦊🦊 👩‍👩‍👧",
        ])
        .prop_map(str::to_string),
        2 => "\\PC{0,40}",
        1 => "[a\u{2581} ]{0,200}",
        1 => (1usize..400).prop_map(|n| "a".repeat(n)),
    ]
}

fn sp_input() -> impl Strategy<Value = (SpModel, Vec<String>)> {
    (
        prop_oneof![
            3 => in_place_mutation(PROTO_DICT, 6).prop_map(SpModel::Mutated),
            1 => mutation(PROTO_DICT, 6).prop_map(SpModel::Mutated),
            5 => synth_model().prop_map(SpModel::Synth),
            1 => random_bytes(512).prop_map(SpModel::Random),
        ],
        proptest::collection::vec(sp_text(), 1..4),
    )
}

/// The segmentation as `SentencePieceModel` did it before it walked a sorted piece list (every
/// prefix up to the longest piece looked up in a map), to check that the two agree exactly.
fn reference_encode(sp: &SentencePieceModel, text: &str) -> Vec<(String, u32)> {
    use altdiff::sentencepiece::PieceType;
    let proto = sp.proto();
    let mut pieces = std::collections::HashMap::new();
    let (mut min_score, mut max_len) = (f32::MAX, 0);
    for (id, p) in proto.pieces.iter().enumerate() {
        if matches!(p.kind, PieceType::Normal | PieceType::Unused) {
            pieces.insert(p.piece.as_str(), id as u32);
        }
        if p.kind == PieceType::Normal {
            min_score = min_score.min(p.score);
            max_len = max_len.max(p.piece.len());
        }
    }
    let Ok(text) = sp.normalize(text) else {
        return Vec::new();
    };
    let unk_score = min_score - 10.0;
    // (end, score, start, id) per byte position.
    let mut best: Vec<Option<(f32, usize, u32)>> = vec![None; text.len() + 1];
    best[0] = Some((0.0, 0, 0));
    let mut at = 0;
    while at < text.len() {
        let rest = &text[at..];
        let here = best[at].map_or(0.0, |b| b.0);
        let mblen = rest.chars().next().map_or(1, char::len_utf8);
        let mut single = false;
        let ends = rest
            .char_indices()
            .skip(1)
            .map(|(i, _)| i)
            .chain(std::iter::once(rest.len()))
            .take_while(|&len| len <= max_len);
        let offer = |len: usize, score: f32, id: u32, best: &mut Vec<Option<(f32, usize, u32)>>| {
            let target = &mut best[at + len];
            if target.is_none_or(|t| score > t.0) {
                *target = Some((score, at, id));
            }
        };
        for len in ends {
            let Some(&id) = pieces.get(&rest[..len]) else {
                continue;
            };
            let p = &proto.pieces[id as usize];
            if p.kind == PieceType::Unused {
                continue;
            }
            offer(len, p.score + here, id, &mut best);
            single |= len == mblen;
        }
        if !single {
            offer(mblen, unk_score + here, sp.unk_id(), &mut best);
        }
        at += mblen;
    }
    let mut nodes = Vec::new();
    let mut end = text.len();
    while end > 0 {
        let Some((_, start, id)) = best[end] else {
            return Vec::new();
        };
        nodes.push((text[start..end].to_string(), id));
        end = start;
    }
    nodes.reverse();
    // Runs of unknown pieces merged, as `encode` does.
    let mut out: Vec<(String, u32)> = Vec::new();
    for (piece, id) in nodes {
        match out.last_mut() {
            Some(last) if last.1 == sp.unk_id() && id == sp.unk_id() => last.0.push_str(&piece),
            _ => out.push((piece, id)),
        }
    }
    out
}

fn check_sentencepiece(model: &SpModel, texts: &[String]) -> TestCaseResult {
    let bytes = model.bytes();
    if let Ok(proto) = ModelProto::parse(&bytes) {
        note("proto parsed");
        // Everything the proto holds was read from the file.
        let text: usize = proto.pieces.iter().map(|p| p.piece.len()).sum();
        prop_assert!(proto.pieces.len() <= bytes.len() / 2);
        prop_assert!(text + proto.normalizer_spec.precompiled_charsmap.len() <= bytes.len());
    }
    let Ok(sp) = SentencePieceModel::from_bytes(&bytes) else {
        return Ok(());
    };
    note("model loaded");
    prop_assert!(!sp.is_empty());
    prop_assert!(sp.id_to_piece(sp.unk_id()).is_some());
    prop_assert!(sp.id_to_piece(sp.len() as u32).is_none());
    for piece in ["<unk>", "<s>", "\u{2581}", "a", ""] {
        let id = sp.piece_to_id(piece);
        prop_assert!((id as usize) < sp.len());
    }
    for text in texts {
        let normalized = sp.normalize(text);
        match sp.encode(text) {
            Ok(pieces) => {
                note("text encoded");
                let normalized = normalized.map_err(|e| {
                    TestCaseError::fail(format!("encode worked, normalize failed: {e}"))
                })?;
                let spelled: String = pieces.iter().map(|p| p.piece.as_str()).collect();
                prop_assert_eq!(&spelled, &normalized, "the pieces do not spell the text");
                let got: Vec<(String, u32)> =
                    pieces.iter().map(|p| (p.piece.clone(), p.id)).collect();
                prop_assert_eq!(
                    got,
                    reference_encode(&sp, text),
                    "differs from the reference"
                );
                prop_assert!(pieces.iter().all(|p| (p.id as usize) < sp.len()));
            }
            Err(e) => prop_assert!(normalized.is_err(), "normalize worked, encode failed: {e}"),
        }
    }
    let xlmr = XlmRobertaSentencePiece::new(sp);
    prop_assert_eq!(xlmr.vocab_size(), xlmr.sentencepiece().len() + 2);
    prop_assert_eq!(xlmr.id_to_token(xlmr.mask_id()), Some("<mask>"));
    let _ = xlmr.id_to_token(xlmr.mask_id() + 1);
    let _ = xlmr.contains("<s>");
    for text in texts {
        if let Ok(ids) = xlmr.encode(text) {
            prop_assert!(ids.iter().all(|(_, id)| (*id as usize) < xlmr.vocab_size()));
        }
    }
    if let Ok(tok) = xlmr.to_tokenizers() {
        note("tokenizers built");
        for text in texts {
            let _ = tok.encode(text.as_str(), true);
        }
    }
    Ok(())
}

#[test]
fn fuzz_sentencepiece_model() {
    // The seed itself loads and encodes.
    let seed = SentencePieceModel::from_bytes(sp_seed()).expect("load the tiny model");
    assert!(!seed.encode("a red fox").expect("encode").is_empty());
    fuzz(
        "fuzz_sentencepiece_model",
        512,
        sp_input(),
        |(model, texts)| check_sentencepiece(model, texts),
    );
}

// ---------------------------------------------------------------------------------------------
// fuzz_png_metadata
// ---------------------------------------------------------------------------------------------

use common::crc32;

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// One chunk as it will be written: a wrong length or CRC on request.
#[derive(Debug, Clone)]
struct Chunk {
    ty: [u8; 4],
    data: Bytes,
    length: Option<u32>,
    bad_crc: bool,
}

impl Chunk {
    fn new(ty: &[u8; 4], data: Vec<u8>) -> Self {
        Self {
            ty: *ty,
            data: Bytes(data),
            length: None,
            bad_crc: false,
        }
    }
}

/// The chunks of a PNG (which must be well formed).
fn split_png(png: &[u8]) -> Vec<Chunk> {
    assert!(png.starts_with(PNG_SIGNATURE));
    let mut chunks = Vec::new();
    let mut rest = &png[8..];
    while rest.len() >= 12 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let ty: [u8; 4] = rest[4..8].try_into().unwrap();
        chunks.push(Chunk::new(&ty, rest[8..8 + len].to_vec()));
        rest = &rest[12 + len..];
    }
    chunks
}

fn join_png(signature: bool, chunks: &[Chunk]) -> Vec<u8> {
    let mut out = if signature {
        PNG_SIGNATURE.to_vec()
    } else {
        Vec::new()
    };
    for c in chunks {
        let len = c.length.unwrap_or(c.data.0.len() as u32);
        out.extend_from_slice(&len.to_be_bytes());
        let start = out.len();
        out.extend_from_slice(&c.ty);
        out.extend_from_slice(&c.data.0);
        let crc = crc32(&out[start..]) ^ u32::from(c.bad_crc);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    out
}

/// Recomputes the CRC of every chunk whose length fits in the file (after byte mutations).
fn repair_crcs(png: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e + 4 <= png.len()) else {
            break;
        };
        let crc = crc32(&png[at + 4..end]);
        png[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

/// An image record like the ones `altdiff generate` writes.
fn sample_record() -> ImageRecord {
    ImageRecord {
        altdiff: "0.1.0".into(),
        prompt: "un renard roux dans la neige, 一只红狐狸".into(),
        negative_prompt: Some("blurry".into()),
        lang: Some("fr".into()),
        noise: NoiseRecord::Seed {
            seed: 42,
            batch: 2,
            index: 1,
        },
        steps: 20,
        guidance: 7.5,
        scheduler: "euler-a".into(),
        scheduler_config: json!({
            "_class_name": "PNDMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "steps_offset": 1
        }),
        eta: Some(0.5),
        karras: true,
        timestep_spacing: Some("trailing".into()),
        width: 512,
        height: 768,
        max_length: 77,
        model: ModelRecord {
            source: "BAAI/AltDiffusion-m18".into(),
            revision: Some("main".into()),
            commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            variant: None,
        },
        dtype: "f16".into(),
        init: Some(altdiff::metadata::InitRecord {
            image: "photos/fox, 1.png".into(),
            image_sha256: "ab".repeat(32),
            mask: Some("masks/fox.png".into()),
            mask_sha256: Some("cd".repeat(32)),
            strength: 0.75,
        }),
        prompt_syntax: altdiff::text::PromptSyntax::Webui,
    }
}

/// The zlib stream of `text` (through png's own encoder).
fn zlib(text: &str) -> Vec<u8> {
    let mut chunk = png::text_metadata::ITXtChunk::new("k", text);
    chunk.compressed = true;
    chunk.compress_text().expect("compress");
    let mut raw = Vec::new();
    png::text_metadata::EncodableTextChunk::encode(&chunk, &mut raw).expect("encode");
    let parsed = split_png(&[PNG_SIGNATURE, &raw].concat());
    // keyword "k", NUL, flag, method, empty language tag + NUL, empty translation + NUL.
    parsed[0].data.0[6..].to_vec()
}

/// 32 MiB of text in a small zlib stream: four times [`MAX_INFLATED_TEXT`].
fn zip_bomb() -> &'static Vec<u8> {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| zlib(&"a".repeat(4 * MAX_INFLATED_TEXT)))
}

fn ztxt(keyword: &[u8], zdata: &[u8]) -> Vec<u8> {
    [keyword, b"\0\0", zdata].concat()
}

fn itxt(keyword: &[u8], compressed: bool, text: &[u8]) -> Vec<u8> {
    [
        keyword,
        b"\0",
        &[u8::from(compressed), 0],
        b"en\0",
        b"\0",
        text,
    ]
    .concat()
}

/// The PNGs mutations start from: what altdiff writes; one with every kind of text chunk; one with
/// zip bombs.
fn png_seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let image = altdiff::pipeline::RgbImage {
            width: 4,
            height: 3,
            pixels: (0..36).map(|i| (i * 7) as u8).collect(),
        };
        let record = sample_record();
        let chunks = record.chunks().expect("record chunks");
        let text: Vec<(&str, &str)> = chunks.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let altdiff_png = altdiff::output::encode_png(&image, &text).expect("encode a PNG");
        // Check the seed reads back as what was written.
        let back = metadata::read_record_from(Cursor::new(&altdiff_png), Path::new("seed.png"))
            .expect("read the seed's record");
        assert_eq!(back, record);

        let plain = split_png(&altdiff_png);
        let json = serde_json::to_string(&record).unwrap();
        let mut all_kinds = vec![plain[0].clone()];
        all_kinds.push(Chunk::new(b"tEXt", b"Comment\0caf\xe9".to_vec()));
        all_kinds.push(Chunk::new(
            b"zTXt",
            ztxt(b"parameters", &zlib("a fox\nSteps: 20")),
        ));
        all_kinds.push(Chunk::new(b"iTXt", itxt(b"altdiff", true, &zlib(&json))));
        all_kinds.push(Chunk::new(
            b"iTXt",
            itxt(b"Title", false, "狐狸".as_bytes()),
        ));
        all_kinds.extend(plain[1..].iter().cloned());
        let all_kinds = join_png(true, &all_kinds);

        let mut bombs = vec![plain[0].clone()];
        bombs.push(Chunk::new(b"zTXt", ztxt(b"bomb", zip_bomb())));
        bombs.push(Chunk::new(b"iTXt", itxt(b"altdiff", true, zip_bomb())));
        bombs.extend(plain[1..].iter().cloned());
        let bombs = join_png(true, &bombs);
        vec![altdiff_png, all_kinds, bombs]
    })
}

/// Chunk types, known and not.
const CHUNK_TYPES: &[&[u8; 4]] = &[
    b"IHDR",
    b"PLTE",
    b"IDAT",
    b"IEND",
    b"tEXt",
    b"zTXt",
    b"iTXt",
    b"tRNS",
    b"gAMA",
    b"cHRM",
    b"sRGB",
    b"iCCP",
    b"sBIT",
    b"pHYs",
    b"bKGD",
    b"tIME",
    b"eXIf",
    b"cICP",
    b"mDCV",
    b"cLLI",
    b"acTL",
    b"fcTL",
    b"fdAT",
    b"sPLT",
    b"hIST",
    b"caNv",
    b"xxxx",
    b"\0\0\0\0",
];

/// Keywords of text chunks: the ones altdiff reads, and invalid ones.
fn keyword() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(b"altdiff".to_vec()),
        2 => Just(b"parameters".to_vec()),
        1 => Just(Vec::new()),
        1 => Just(vec![b'k'; 80]),
        1 => Just(b"caf\xe9".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

/// The text of a text chunk: the record (mutated as JSON), random text or bytes.
fn chunk_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => json_mutation(4).prop_map(|m| {
            m.apply(&[serde_json::to_value(sample_record()).unwrap()])
        }),
        2 => "\\PC{0,64}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

/// A generated chunk: text chunks with plain, compressed, broken and bomb payloads, IHDRs, others.
fn any_chunk() -> impl Strategy<Value = Chunk> {
    let zdata = prop_oneof![
        4 => chunk_text().prop_map(|t| zlib(&String::from_utf8_lossy(&t))),
        2 => (chunk_text(), proptest::collection::vec(byte_op(PROTO_DICT), 1..4)).prop_map(
            |(t, ops)| {
                let mut z = zlib(&String::from_utf8_lossy(&t));
                apply_byte_ops(&mut z, &ops, &[]);
                z
            }
        ),
        1 => Just(()).prop_map(|()| zip_bomb().clone()),
        1 => proptest::collection::vec(any::<u8>(), 0..32),
    ];
    prop_oneof![
        3 => (keyword(), chunk_text())
            .prop_map(|(k, t)| Chunk::new(b"tEXt", [&k[..], b"\0", &t].concat())),
        3 => (keyword(), prop_oneof![8 => Just(0u8), 1 => any::<u8>()], zdata.clone())
            .prop_map(|(k, m, z)| Chunk::new(b"zTXt", [&k[..], b"\0", &[m], &z].concat())),
        3 => (keyword(), chunk_text()).prop_map(|(k, t)| Chunk::new(b"iTXt", itxt(&k, false, &t))),
        3 => (keyword(), zdata).prop_map(|(k, z)| Chunk::new(b"iTXt", itxt(&k, true, &z))),
        1 => (keyword(), any::<u8>(), any::<u8>(), random_bytes(24)).prop_map(|(k, f, m, t)| {
            Chunk::new(b"iTXt", [&k[..], b"\0", &[f, m], &t.0].concat())
        }),
        2 => (
            prop_oneof![1u32..64, any::<u32>()],
            prop_oneof![1u32..64, any::<u32>()],
            proptest::sample::select(vec![1u8, 2, 4, 8, 16, 0, 3, 255]),
            proptest::sample::select(vec![0u8, 2, 3, 4, 6, 1, 7]),
            proptest::collection::vec(prop_oneof![4 => Just(0u8), 1 => any::<u8>()], 3),
        )
            .prop_map(|(w, h, depth, color, rest)| {
                let mut d = w.to_be_bytes().to_vec();
                d.extend_from_slice(&h.to_be_bytes());
                d.extend_from_slice(&[depth, color]);
                d.extend_from_slice(&rest);
                Chunk::new(b"IHDR", d)
            }),
        3 => (proptest::sample::select(CHUNK_TYPES), random_bytes(40))
            .prop_map(|(ty, d)| Chunk::new(ty, d.0)),
        1 => (any::<[u8; 4]>(), random_bytes(16)).prop_map(|(ty, d)| Chunk::new(&ty, d.0)),
    ]
}

/// One edit of a PNG's chunk list.
#[derive(Debug, Clone)]
enum ChunkOp {
    Delete(Index),
    Duplicate(Index, Index),
    Swap(Index, Index),
    Insert(Index, Chunk),
    Data(Index, Vec<ByteOp>),
    Length(Index, u32),
    BadCrc(Index),
    /// Replaces the text of the `altdiff` record (mutated as JSON).
    Record(JsonMutation),
}

fn chunk_op() -> impl Strategy<Value = ChunkOp> {
    prop_oneof![
        2 => any::<Index>().prop_map(ChunkOp::Delete),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| ChunkOp::Duplicate(i, j)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| ChunkOp::Swap(i, j)),
        3 => (any::<Index>(), any_chunk()).prop_map(|(i, c)| ChunkOp::Insert(i, c)),
        2 => (any::<Index>(), proptest::collection::vec(byte_op(JSON_DICT), 1..4))
            .prop_map(|(i, ops)| ChunkOp::Data(i, ops)),
        1 => (any::<Index>(), prop_oneof![0u32..64, any::<u32>()])
            .prop_map(|(i, n)| ChunkOp::Length(i, n)),
        1 => any::<Index>().prop_map(ChunkOp::BadCrc),
        4 => json_mutation(4).prop_map(ChunkOp::Record),
    ]
}

fn apply_chunk_ops(chunks: &mut Vec<Chunk>, ops: &[ChunkOp]) {
    let record = serde_json::to_value(sample_record()).unwrap();
    for op in ops {
        let len = chunks.len();
        match op {
            ChunkOp::Delete(i) if len > 0 => {
                chunks.remove(i.index(len));
            }
            ChunkOp::Duplicate(i, j) if len > 0 => {
                let c = chunks[i.index(len)].clone();
                chunks.insert(j.index(len + 1), c);
            }
            ChunkOp::Swap(i, j) if len > 0 => chunks.swap(i.index(len), j.index(len)),
            ChunkOp::Insert(i, c) => chunks.insert(i.index(len + 1), c.clone()),
            ChunkOp::Data(i, ops) if len > 0 => {
                apply_byte_ops(&mut chunks[i.index(len)].data.0, ops, &[]);
            }
            ChunkOp::Length(i, n) if len > 0 => chunks[i.index(len)].length = Some(*n),
            ChunkOp::BadCrc(i) if len > 0 => chunks[i.index(len)].bad_crc = true,
            ChunkOp::Record(m) => {
                let text = m.apply(std::slice::from_ref(&record));
                let at = chunks
                    .iter()
                    .position(|c| c.data.0.starts_with(b"altdiff\0"))
                    .unwrap_or(len.min(1));
                let chunk = Chunk::new(b"iTXt", itxt(b"altdiff", false, &text));
                if at < len && chunks[at].data.0.starts_with(b"altdiff\0") {
                    chunks[at] = chunk;
                } else {
                    chunks.insert(at, chunk);
                }
            }
            _ => {}
        }
    }
}

#[derive(Debug, Clone)]
enum PngInput {
    /// Byte edits of a seed PNG, CRCs repaired afterwards or not.
    Bytes(Mutation, bool),
    /// Chunk edits of a seed PNG.
    Chunks(usize, Vec<ChunkOp>),
    /// The signature, maybe a valid IHDR, random chunks, maybe IDAT + IEND.
    Sequence(bool, Vec<Chunk>, bool),
    /// Random bytes after the signature (or not).
    Random(bool, Bytes),
}

impl PngInput {
    fn bytes(&self) -> Vec<u8> {
        let seeds = png_seeds();
        match self {
            PngInput::Bytes(m, repair) => {
                let mut png = m.apply(seeds);
                if *repair {
                    repair_crcs(&mut png);
                }
                png
            }
            PngInput::Chunks(seed, ops) => {
                let mut chunks = split_png(&seeds[seed % seeds.len()]);
                apply_chunk_ops(&mut chunks, ops);
                join_png(true, &chunks)
            }
            PngInput::Sequence(header, body, end) => {
                let plain = split_png(&seeds[0]);
                let mut chunks = Vec::new();
                if *header {
                    chunks.push(plain[0].clone());
                }
                chunks.extend(body.iter().cloned());
                if *end {
                    chunks.extend(plain[plain.len() - 2..].iter().cloned());
                }
                join_png(true, &chunks)
            }
            PngInput::Random(signature, b) => {
                let mut out = if *signature {
                    PNG_SIGNATURE.to_vec()
                } else {
                    Vec::new()
                };
                out.extend_from_slice(&b.0);
                out
            }
        }
    }
}

fn png_input() -> impl Strategy<Value = (PngInput, bool)> {
    (
        prop_oneof![
            3 => (mutation(JSON_DICT, 6), any::<bool>()).prop_map(|(m, r)| PngInput::Bytes(m, r)),
            4 => (any::<usize>(), proptest::collection::vec(chunk_op(), 1..6))
                .prop_map(|(s, ops)| PngInput::Chunks(s, ops)),
            2 => (
                prop_oneof![4 => Just(true), 1 => Just(false)],
                proptest::collection::vec(any_chunk(), 0..8),
                any::<bool>(),
            )
                .prop_map(|(h, body, e)| PngInput::Sequence(h, body, e)),
            1 => (any::<bool>(), random_bytes(256)).prop_map(|(s, b)| PngInput::Random(s, b)),
        ],
        // Now and then through a real file and the path functions too.
        prop_oneof![7 => Just(false), 1 => Just(true)],
    )
}

fn check_png(input: &PngInput, via_file: bool) -> TestCaseResult {
    let bytes = input.bytes();
    let name = Path::new("fuzz.png");
    let text = metadata::read_png_text_from(Cursor::new(&bytes), name);
    let record = metadata::read_record_from(Cursor::new(&bytes), name);
    if let Ok(chunks) = &text {
        note(if chunks.is_empty() {
            "PNG read, no text"
        } else {
            "PNG read, text"
        });
        let total: usize = chunks.iter().map(|(k, v)| k.len() + v.len()).sum();
        prop_assert!(
            total <= 2 * bytes.len() + 2 * MAX_INFLATED_TEXT,
            "{total} bytes of text from a {}-byte file",
            bytes.len()
        );
    }
    if let Ok(r) = &record {
        note("record read");
        let _ = r.seed();
        let params = r.webui_parameters();
        prop_assert!(params.len() <= 64 * bytes.len() + 4096);
        let _ = r.chunks();
    }
    if via_file {
        let path = scratch_file("png", "case.png");
        std::fs::write(&path, &bytes).expect("write the case");
        let from_path = metadata::read_png_text(&path);
        prop_assert_eq!(from_path.is_ok(), text.is_ok());
        if let (Ok(a), Ok(b)) = (&from_path, &text) {
            prop_assert_eq!(a, b);
        }
        let from_path = metadata::read_record(&path);
        prop_assert_eq!(from_path.is_ok(), record.is_ok());
        if let (Ok(a), Ok(b)) = (&from_path, &record) {
            prop_assert_eq!(a, b);
        }
    }
    Ok(())
}

#[test]
fn fuzz_png_metadata() {
    // The bomb seed: too much compressed text is dropped, the rest is read.
    let bombs = &png_seeds()[2];
    let chunks = metadata::read_png_text_from(Cursor::new(bombs), Path::new("bombs.png"))
        .expect("read the bomb PNG");
    let total: usize = chunks.iter().map(|(_, v)| v.len()).sum();
    assert!(total <= 2 * MAX_INFLATED_TEXT, "{total} bytes inflated");
    fuzz(
        "fuzz_png_metadata",
        512,
        png_input(),
        |(input, via_file)| check_png(input, *via_file),
    );
    let _ = std::fs::remove_dir_all(scratch_dir("png"));
}

// ---------------------------------------------------------------------------------------------
// fuzz_configs
// ---------------------------------------------------------------------------------------------

const CONFIG_FILES: &[&str] = &[
    "tests/fixtures/models/tiny-m18/model_index.json",
    "tests/fixtures/models/tiny-m18/text_encoder/config.json",
    "tests/fixtures/models/tiny-m18/unet/config.json",
    "tests/fixtures/models/tiny-m18/vae/config.json",
    "tests/fixtures/models/tiny-m18/scheduler/scheduler_config.json",
    "tests/fixtures/models/tiny-m18/tokenizer/tokenizer_config.json",
];

fn config_seeds() -> &'static (Vec<Vec<u8>>, Vec<Value>) {
    static SEEDS: OnceLock<(Vec<Vec<u8>>, Vec<Value>)> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let bytes: Vec<Vec<u8>> = CONFIG_FILES.iter().map(|f| read_fixture(f)).collect();
        let values = bytes
            .iter()
            .map(|b| serde_json::from_slice(b).expect("fixture JSON"))
            .collect();
        (bytes, values)
    })
}

#[derive(Debug, Clone)]
enum ConfigText {
    /// Byte edits of a real config file.
    Bytes(Mutation),
    /// JSON edits of a real config file.
    Json(JsonMutation),
    /// Any JSON value.
    Random(Value),
    /// An object of config fields with any values.
    Object(Vec<(String, Value)>),
    /// A scheduler config of small and edge values.
    Scheduler(Vec<(String, Value)>),
}

impl ConfigText {
    fn bytes(&self) -> Vec<u8> {
        let (bytes, values) = config_seeds();
        match self {
            ConfigText::Bytes(m) => m.apply(bytes),
            ConfigText::Json(m) => m.apply(values),
            ConfigText::Random(v) => serde_json::to_vec(v).unwrap(),
            ConfigText::Object(kv) | ConfigText::Scheduler(kv) => {
                serde_json::to_vec(&Value::Object(kv.iter().cloned().collect())).unwrap()
            }
        }
    }
}

/// Field names of every config file (and a few the loaders reject), for generated objects.
fn json_fields() -> Vec<&'static str> {
    [OTHER_FIELDS, SCHEDULER_FIELDS].concat()
}

/// The fields of `scheduler_config.json` altdiff reads.
const SCHEDULER_FIELDS: &[&str] = &[
    "_class_name",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "set_alpha_to_one",
    "steps_offset",
    "skip_prk_steps",
    "prediction_type",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "timestep_spacing",
    "rescale_betas_zero_snr",
    "interpolation_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "timestep_type",
    "final_sigmas_type",
    "algorithm_type",
    "solver_order",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "use_dynamic_shifting",
    "lambda_min_clipped",
    "variance_type",
    "predict_x0",
    "disable_corrector",
    "solver_p",
];

/// Values a scheduler field may plausibly (or implausibly) have: small counts, the edges of the
/// accepted ranges, betas and sigmas, names, flags, short arrays.
fn scheduler_value() -> impl Strategy<Value = Value> {
    let small_float = || {
        prop_oneof![
            proptest::sample::select(vec![
                0.0,
                1e-30,
                1e-4,
                8.5e-4,
                0.012,
                0.02,
                0.5,
                0.999,
                1.0,
                1.5,
                2.0,
                14.6,
                80.0,
                -1.0,
                -0.5,
                1e30,
                f64::MAX,
                f64::MIN_POSITIVE,
            ]),
            -2.0f64..2.0,
        ]
    };
    prop_oneof![
        4 => (0u64..5).prop_map(Value::from),
        2 => proptest::sample::select(vec![
            999u64,
            1000,
            1001,
            99_999,
            100_000,
            100_001,
            1 << 62,
            i64::MAX as u64,
            u64::MAX,
        ])
            .prop_map(Value::from),
        3 => small_float().prop_map(Value::from),
        2 => any::<bool>().prop_map(Value::Bool),
        3 => proptest::sample::select(JSON_STRINGS).prop_map(Value::from),
        1 => Just(Value::Null),
        2 => proptest::collection::vec(small_float(), 0..6)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::from).collect())),
        1 => proptest::collection::vec(-3i64..8, 0..6)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::from).collect())),
    ]
}

fn scheduler_config_text() -> impl Strategy<Value = Vec<(String, Value)>> {
    // The fields that size or shape the schedules, more often than the others.
    const NUMERIC: &[&str] = &[
        "num_train_timesteps",
        "steps_offset",
        "trained_betas",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "solver_order",
        "sigma_min",
        "sigma_max",
        "use_karras_sigmas",
        "timestep_spacing",
        "rescale_betas_zero_snr",
    ];
    let entry = || {
        (
            prop_oneof![
                2 => proptest::sample::select(NUMERIC),
                1 => proptest::sample::select(SCHEDULER_FIELDS),
            ]
            .prop_map(str::to_string),
            scheduler_value(),
        )
    };
    // Mostly a few fields, so that one odd value is not hidden behind the error of another.
    prop_oneof![
        3 => proptest::collection::vec(entry(), 0..4),
        1 => proptest::collection::vec(entry(), 0..12),
    ]
}

/// How the loaded scheduler config is then used: as `altdiff generate` would.
#[derive(Debug, Clone)]
struct SchedulerUse {
    kind: usize,
    steps: usize,
    eta: f64,
    karras: bool,
    spacing: Option<TimestepSpacing>,
}

fn scheduler_use() -> impl Strategy<Value = SchedulerUse> {
    (
        any::<usize>(),
        prop_oneof![
            3 => Just(1usize),
            3 => 2usize..5,
            3 => 5usize..12,
            2 => 12usize..60,
            1 => Just(1000),
            1 => 0usize..1200
        ],
        prop_oneof![4 => Just(0.0), 1 => 0.0f64..=1.0],
        any::<bool>(),
        proptest::option::of(proptest::sample::select(vec![
            TimestepSpacing::Leading,
            TimestepSpacing::Linspace,
            TimestepSpacing::Trailing,
        ])),
    )
        .prop_map(|(kind, steps, eta, karras, spacing)| SchedulerUse {
            kind,
            steps,
            eta,
            karras,
            spacing,
        })
}

fn config_input() -> impl Strategy<Value = (ConfigText, SchedulerUse, f64)> {
    (
        prop_oneof![
            3 => mutation(JSON_DICT, 6).prop_map(ConfigText::Bytes),
            6 => json_mutation(6).prop_map(ConfigText::Json),
            1 => json_value().prop_map(ConfigText::Random),
            4 => scheduler_config_text().prop_map(ConfigText::Scheduler),
            2 => proptest::collection::vec((json_key(), json_value()), 0..12)
                .prop_map(ConfigText::Object),
        ],
        scheduler_use(),
        any::<f64>(),
    )
}

/// Runs a built scheduler over a 1x1 latent for a few steps (deterministic ones only).
fn run_scheduler(s: &mut dyn schedulers::Scheduler) -> TestCaseResult {
    use candle_core::{DType, Device, Tensor};
    let sample = Tensor::ones((1, 4, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let output = Tensor::zeros((1, 4, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let _ = s.init_noise_sigma();
    let timesteps = s.timesteps().to_vec();
    let mut sample = sample;
    for t in timesteps {
        let Ok(input) = s.scale_model_input(sample.clone(), t) else {
            break;
        };
        drop(input);
        match s.step(&output, t, &sample, &mut schedulers::NoNoise) {
            Ok(next) => sample = next,
            Err(_) => break,
        }
    }
    Ok(())
}

fn check_config(text: &ConfigText, use_: &SchedulerUse, max_length: f64) -> TestCaseResult {
    let bytes = text.bytes();
    let path = scratch_file("configs", "config.json");
    std::fs::write(&path, &bytes).expect("write the case");

    if read_json::<ModelIndex>(&path).is_ok() {
        note("model index loaded");
    }
    if let Ok(c) = TextEncoderConfig::load(&path) {
        note("text encoder loaded");
        prop_assert!(c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0);
        let _ = altdiff::lang::ModelLanguages::from_text_encoder(&c);
    }
    if let Ok(u) = UNetConfig::load(&path) {
        note("unet loaded");
        prop_assert!(!u.blocks.is_empty() && u.blocks.len() <= bytes.len());
        let _ = u.cross_attention_dim();
    }
    if let Ok(v) = VaeConfig::load(&path) {
        note("vae loaded");
        let f = v.scale_factor();
        prop_assert!(f.is_power_of_two(), "scale factor {f}");
    }
    if let Ok(t) = TokenizerConfig::load(&path) {
        let _ = t.max_length();
    }
    if let Ok((cfg, cfg_path)) = SchedulerConfig::load(&path) {
        note("scheduler config loaded");
        let kind = SchedulerKind::ALL[use_.kind % SchedulerKind::ALL.len()];
        let options = SchedulerOptions {
            eta: if kind == SchedulerKind::Ddim {
                use_.eta
            } else {
                0.0
            },
            karras: use_.karras && kind.supports_karras(),
            timestep_spacing: use_.spacing,
        };
        if let Ok(mut s) = schedulers::build(kind, &cfg, &cfg_path, use_.steps, &options) {
            note("scheduler built");
            let n = s.timesteps().len();
            prop_assert!(
                n <= 4 * use_.steps + 4,
                "{n} timesteps for {} steps",
                use_.steps
            );
            if let Some(sigmas) = s.sigmas() {
                prop_assert!(sigmas.len() <= 4 * use_.steps + 4);
            }
            if use_.steps <= 12 {
                run_scheduler(s.as_mut())?;
            }
        }
    }
    // Without the loaders' checks: what serde accepts must not make the helpers panic either.
    if let Ok(v) = serde_json::from_slice::<VaeConfig>(&bytes) {
        let _ = v.scale_factor();
    }
    if let Ok(p) = serde_json::from_slice::<PerBlock>(&bytes) {
        for n in 0..5 {
            if let Ok(v) = p.expand(n, &path, "field") {
                prop_assert_eq!(v.len(), n);
            }
        }
    }
    let t = TokenizerConfig {
        model_max_length: Some(max_length),
    };
    if let Some(n) = t.max_length() {
        prop_assert!(n > 0 && n < 1_000_000_000);
    }
    Ok(())
}

#[test]
fn fuzz_configs() {
    // The seeds themselves load.
    let dir = fixture("tests/fixtures/models/tiny-m18");
    UNetConfig::load(&dir.join("unet/config.json")).expect("unet config");
    VaeConfig::load(&dir.join("vae/config.json")).expect("vae config");
    TextEncoderConfig::load(&dir.join("text_encoder/config.json")).expect("text encoder config");
    SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json")).expect("scheduler");
    fuzz(
        "fuzz_configs",
        768,
        config_input(),
        |(text, use_, max_length)| check_config(text, use_, *max_length),
    );
    let _ = std::fs::remove_dir_all(scratch_dir("configs"));
}
