//! A SentencePiece **Unigram** tokenizer read straight from `sentencepiece.bpe.model`, giving the ids of
//! transformers' slow `XLMRobertaTokenizer` (which is what diffusers' AltDiffusion pipeline uses).
//!
//! The real BAAI/AltDiffusion repositories ship no `tokenizer.json`, only the sentencepiece model, so
//! this module reimplements what the Python stack does with it:
//!
//! * [`ModelProto::parse`]: a small hand-written protobuf reader for sentencepiece's `ModelProto`
//!   (pieces, the trainer fields that matter, the normaliser spec). Malformed input is an error,
//!   never a panic, and parsing always terminates (every step consumes input; nesting is fixed).
//! * [`SentencePieceModel::normalize`]: sentencepiece's `Normalizer::Normalize`: longest-prefix
//!   rewriting through the precompiled charsmap (a darts-clone double-array trie), removal of leading,
//!   trailing and repeated spaces, the dummy prefix, and `' '` -> `'▁'`. Unlike the `Precompiled`
//!   normaliser of the `tokenizers` crate this works on bytes, not graphemes, which is why the fast
//!   tokenizer differs on e.g. stacked combining accents.
//! * [`SentencePieceModel::encode`]: sentencepiece's optimised Unigram Viterbi over the whole
//!   normalised text, in `f32` as sentencepiece does (ties resolved the same way), with runs of
//!   unknown characters merged into one piece.
//! * [`XlmRobertaSentencePiece`]: transformers' fairseq id mapping (`<s>`=0, `<pad>`=1, `</s>`=2,
//!   `<unk>`=3, piece i -> i + 1, `<mask>` last) and [`XlmRobertaSentencePiece::to_tokenizers`], the
//!   `tokenizer.json` that transformers' `XLMRobertaConverter` builds from the same file.
//!
//! Splitting the text on added special tokens (`<s>`, `<mask>`, ...) before sentencepiece sees it is
//! the slow tokenizer's job and lives in [`crate::tokenizer`].
//!
//! Not supported (clear errors, none of them occur in XLM-R / AltDiffusion models): model types other
//! than Unigram, byte fallback, user-defined or byte pieces, `treat_whitespace_as_suffix`.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{NormalizerWrapper, Precompiled, Replace, Sequence, Strip};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// sentencepiece's whitespace symbol, U+2581 LOWER ONE EIGHTH BLOCK.
pub const SPACE_SYMBOL: char = '\u{2581}';

/// Penalty of an unknown character below the lowest piece score (sentencepiece's `kUnkPenalty`).
const UNK_PENALTY: f32 = 10.0;

// ------------------------------------------------------------------------------------------------
// The protobuf
// ------------------------------------------------------------------------------------------------

/// The type of a piece (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece (1).
    Normal,
    /// The unknown piece (2).
    Unknown,
    /// A control symbol such as `<s>` (3): never produced from text.
    Control,
    /// A user-defined symbol (4).
    UserDefined,
    /// An unused piece (5): in the vocabulary, never produced.
    Unused,
    /// A byte-fallback piece (6).
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }

    /// The proto's number for this type.
    pub fn number(self) -> u32 {
        match self {
            Self::Normal => 1,
            Self::Unknown => 2,
            Self::Control => 3,
            Self::UserDefined => 4,
            Self::Unused => 5,
            Self::Byte => 6,
        }
    }
}

/// One vocabulary entry (`ModelProto.SentencePiece`).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece text (`'▁'` stands for a space).
    pub piece: String,
    /// Its log-probability.
    pub score: f32,
    /// Its type.
    pub kind: PieceType,
}

/// `TrainerSpec.model_type` of a Unigram model.
pub const MODEL_TYPE_UNIGRAM: i32 = 1;

/// The fields of `TrainerSpec` that matter for encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    /// `model_type` (3): 1 Unigram, 2 BPE, 3 word, 4 char.
    pub model_type: i32,
    /// `unk_id` (40).
    pub unk_id: i32,
    /// `byte_fallback` (35).
    pub byte_fallback: bool,
    /// `treat_whitespace_as_suffix` (24).
    pub treat_whitespace_as_suffix: bool,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        Self {
            model_type: MODEL_TYPE_UNIGRAM,
            unk_id: 0,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
        }
    }
}

/// `NormalizerSpec`.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizerSpec {
    /// `name` (1), e.g. `nmt_nfkc` (informational: the charsmap is what is applied).
    pub name: String,
    /// `precompiled_charsmap` (2): u32 trie size, darts-clone trie, NUL-terminated replacements.
    pub precompiled_charsmap: Vec<u8>,
    /// `add_dummy_prefix` (3, default true).
    pub add_dummy_prefix: bool,
    /// `remove_extra_whitespaces` (4, default true).
    pub remove_extra_whitespaces: bool,
    /// `escape_whitespaces` (5, default true).
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// The parts of sentencepiece's `ModelProto` that encoding needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelProto {
    /// `pieces` (1), in id order.
    pub pieces: Vec<Piece>,
    /// `trainer_spec` (2).
    pub trainer_spec: TrainerSpec,
    /// `normalizer_spec` (3).
    pub normalizer_spec: NormalizerSpec,
    /// Whether the proto has a `trainer_spec` field (real models always do).
    pub has_trainer_spec: bool,
    /// Whether the proto has a `normalizer_spec` field (real models always do; it is serialised after
    /// the pieces and the trainer spec, so a file cut anywhere before its end lacks it or is malformed).
    pub has_normalizer_spec: bool,
}

/// Protobuf wire types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Varint,
    Fixed64,
    Len,
    Fixed32,
}

impl Wire {
    fn name(self) -> &'static str {
        match self {
            Wire::Varint => "varint",
            Wire::Fixed64 => "fixed64",
            Wire::Len => "length-delimited",
            Wire::Fixed32 => "fixed32",
        }
    }
}

/// A cursor over one protobuf message. Offsets in errors are absolute (from the file start).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

fn malformed(offset: usize, what: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!(
        "malformed sentencepiece model at byte {offset}: {what}"
    ))
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }

    fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn varint(&mut self) -> Result<u64> {
        let start = self.offset();
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(malformed(start, "truncated varint"));
            };
            self.pos += 1;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed(start, "varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let start = self.offset();
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                malformed(
                    start,
                    format!(
                        "{n} bytes needed, {} left in the message",
                        self.buf.len() - self.pos
                    ),
                )
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next field's number and wire type, or `None` at the end of the message.
    fn field(&mut self) -> Result<Option<(u64, Wire)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.offset();
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return Err(malformed(at, format!("invalid field number {number}")));
        }
        let wire = match key & 7 {
            0 => Wire::Varint,
            1 => Wire::Fixed64,
            2 => Wire::Len,
            5 => Wire::Fixed32,
            3 | 4 => return Err(malformed(at, "protobuf groups are not supported")),
            w => return Err(malformed(at, format!("invalid wire type {w}"))),
        };
        Ok(Some((number, wire)))
    }

    /// A length-delimited payload and its absolute offset.
    fn len_delimited(&mut self) -> Result<(&'a [u8], usize)> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| malformed(self.offset(), "length too large"))?;
        let at = self.offset();
        Ok((self.take(len)?, at))
    }

    fn skip(&mut self, wire: Wire) -> Result<()> {
        match wire {
            Wire::Varint => self.varint().map(drop),
            Wire::Fixed64 => self.take(8).map(drop),
            Wire::Fixed32 => self.take(4).map(drop),
            Wire::Len => self.len_delimited().map(drop),
        }
    }

    /// Reads a field of a known number, checking its wire type.
    fn check_wire(&mut self, wire: Wire, want: Wire, what: &str) -> Result<()> {
        if wire != want {
            return Err(malformed(
                self.offset(),
                format!(
                    "field `{what}` has wire type {}, expected {}",
                    wire.name(),
                    want.name()
                ),
            ));
        }
        Ok(())
    }

    fn read_varint(&mut self, wire: Wire, what: &str) -> Result<u64> {
        self.check_wire(wire, Wire::Varint, what)?;
        self.varint()
    }

    fn read_bool(&mut self, wire: Wire, what: &str) -> Result<bool> {
        Ok(self.read_varint(wire, what)? != 0)
    }

    /// An `int32` / enum field: protobuf sends negative values as 10-byte varints and readers
    /// truncate to 32 bits.
    fn read_i32(&mut self, wire: Wire, what: &str) -> Result<i32> {
        Ok(self.read_varint(wire, what)? as u32 as i32)
    }

    fn read_bytes(&mut self, wire: Wire, what: &str) -> Result<(&'a [u8], usize)> {
        self.check_wire(wire, Wire::Len, what)?;
        self.len_delimited()
    }

    fn read_string(&mut self, wire: Wire, what: &str) -> Result<String> {
        let (bytes, at) = self.read_bytes(wire, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| malformed(at, format!("field `{what}` is not valid UTF-8")))
    }

    fn read_f32(&mut self, wire: Wire, what: &str) -> Result<f32> {
        self.check_wire(wire, Wire::Fixed32, what)?;
        let b = self.take(4)?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl ModelProto {
    /// Parses a serialised `ModelProto`. Unknown fields are skipped; a singular field given twice
    /// takes the last value and an embedded message given twice is merged, as protobuf does.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut proto = ModelProto::default();
        let mut r = Reader::new(bytes, 0);
        while let Some((number, wire)) = r.field()? {
            match number {
                1 => {
                    let (msg, at) = r.read_bytes(wire, "pieces")?;
                    proto.pieces.push(parse_piece(msg, at)?);
                }
                2 => {
                    let (msg, at) = r.read_bytes(wire, "trainer_spec")?;
                    parse_trainer_spec(&mut proto.trainer_spec, msg, at)?;
                    proto.has_trainer_spec = true;
                }
                3 => {
                    let (msg, at) = r.read_bytes(wire, "normalizer_spec")?;
                    parse_normalizer_spec(&mut proto.normalizer_spec, msg, at)?;
                    proto.has_normalizer_spec = true;
                }
                _ => r.skip(wire)?,
            }
        }
        Ok(proto)
    }
}

fn parse_piece(msg: &[u8], base: usize) -> Result<Piece> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut r = Reader::new(msg, base);
    while let Some((number, wire)) = r.field()? {
        match number {
            1 => piece.piece = r.read_string(wire, "piece")?,
            2 => piece.score = r.read_f32(wire, "score")?,
            3 => {
                let at = r.offset();
                let v = r.read_varint(wire, "type")?;
                piece.kind = PieceType::from_proto(v)
                    .ok_or_else(|| malformed(at, format!("unknown piece type {v}")))?;
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(piece)
}

fn parse_trainer_spec(spec: &mut TrainerSpec, msg: &[u8], base: usize) -> Result<()> {
    let mut r = Reader::new(msg, base);
    while let Some((number, wire)) = r.field()? {
        match number {
            3 => spec.model_type = r.read_i32(wire, "trainer_spec.model_type")?,
            24 => {
                spec.treat_whitespace_as_suffix =
                    r.read_bool(wire, "trainer_spec.treat_whitespace_as_suffix")?
            }
            35 => spec.byte_fallback = r.read_bool(wire, "trainer_spec.byte_fallback")?,
            40 => spec.unk_id = r.read_i32(wire, "trainer_spec.unk_id")?,
            _ => r.skip(wire)?,
        }
    }
    Ok(())
}

fn parse_normalizer_spec(spec: &mut NormalizerSpec, msg: &[u8], base: usize) -> Result<()> {
    let mut r = Reader::new(msg, base);
    while let Some((number, wire)) = r.field()? {
        match number {
            1 => spec.name = r.read_string(wire, "normalizer_spec.name")?,
            2 => {
                spec.precompiled_charsmap = r
                    .read_bytes(wire, "normalizer_spec.precompiled_charsmap")?
                    .0
                    .to_vec()
            }
            3 => spec.add_dummy_prefix = r.read_bool(wire, "normalizer_spec.add_dummy_prefix")?,
            4 => {
                spec.remove_extra_whitespaces =
                    r.read_bool(wire, "normalizer_spec.remove_extra_whitespaces")?
            }
            5 => {
                spec.escape_whitespaces = r.read_bool(wire, "normalizer_spec.escape_whitespaces")?
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The normaliser
// ------------------------------------------------------------------------------------------------

/// The precompiled charsmap: a darts-clone double array whose leaves point into a block of
/// NUL-terminated replacement strings.
#[derive(Debug, Clone)]
struct CharsMap {
    units: Vec<u32>,
    normalized: String,
}

fn unit_has_leaf(unit: u32) -> bool {
    (unit >> 8) & 1 == 1
}

fn unit_value(unit: u32) -> u32 {
    unit & ((1 << 31) - 1)
}

fn unit_label(unit: u32) -> u32 {
    unit & ((1 << 31) | 0xff)
}

fn unit_offset(unit: u32) -> usize {
    ((unit >> 10) as usize) << ((unit & (1 << 9)) >> 6)
}

impl CharsMap {
    /// Splits the blob as sentencepiece's `DecodePrecompiledCharsMap` does.
    fn parse(blob: &[u8]) -> Result<Self> {
        let broken = |what: &str| {
            Error::Tokenizer(format!(
                "sentencepiece model: normalizer_spec.precompiled_charsmap: {what}"
            ))
        };
        if blob.len() <= 4 {
            return Err(broken("blob for normalization rule is broken"));
        }
        let trie_size = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
        let rest = &blob[4..];
        if trie_size > rest.len() {
            return Err(broken("trie data size exceeds the input blob size"));
        }
        let (trie, normalized) = rest.split_at(trie_size);
        let units = trie
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let normalized = String::from_utf8(normalized.to_vec())
            .map_err(|_| broken("replacement strings are not valid UTF-8"))?;
        Ok(Self { units, normalized })
    }

    /// darts-clone's `commonPrefixSearch` keeping the longest match: its length in bytes and the
    /// offset of its replacement. A walk that leaves the array ends the search.
    fn longest_prefix(&self, key: &[u8]) -> Option<(usize, usize)> {
        let mut node_pos = unit_offset(*self.units.first()?);
        let mut best = None;
        for (i, &c) in key.iter().enumerate() {
            node_pos ^= usize::from(c);
            // (A walk off the array can only come from a corrupt trie; it ends the search.)
            let Some(&unit) = self.units.get(node_pos) else {
                break;
            };
            if unit_label(unit) != u32::from(c) {
                break;
            }
            node_pos ^= unit_offset(unit);
            if unit_has_leaf(unit) {
                let Some(&leaf) = self.units.get(node_pos) else {
                    break;
                };
                best = Some((i + 1, unit_value(leaf) as usize));
            }
        }
        best
    }

    /// Checks that the `tokenizers` crate's `Precompiled` normaliser (spm_precompiled) can use this
    /// map on any text without panicking: unlike [`CharsMap::longest_prefix`] it indexes the array
    /// and slices the replacement strings unchecked. Every state reachable from the root needs its
    /// children for the bytes 1 to 255 inside the array, and every reachable leaf a replacement
    /// offset at a character boundary of the strings. Each state is visited once: time linear in the
    /// array's size (times 255). A real darts-clone trie always passes; a corrupt one may not.
    fn check_unchecked_walks(&self) -> std::result::Result<(), String> {
        let units = &self.units;
        let outside = |at: usize| format!("the trie leads outside its array (unit {at})");
        let root = *units.first().ok_or("the trie is empty")?;
        let mut seen = vec![false; units.len()];
        let mut stack = vec![unit_offset(root)];
        *seen.get_mut(stack[0]).ok_or_else(|| outside(stack[0]))? = true;
        while let Some(node) = stack.pop() {
            for c in 1..=255 {
                let child = node ^ c;
                let unit = *units.get(child).ok_or_else(|| outside(child))?;
                if unit_label(unit) as usize != c {
                    continue;
                }
                let next = child ^ unit_offset(unit);
                if unit_has_leaf(unit) {
                    let offset = unit_value(*units.get(next).ok_or_else(|| outside(next))?);
                    if !self.normalized.is_char_boundary(offset as usize) {
                        return Err(format!(
                            "replacement offset {offset} is not a character boundary of the \
                             replacement strings"
                        ));
                    }
                }
                let visited = seen.get_mut(next).ok_or_else(|| outside(next))?;
                if !*visited {
                    *visited = true;
                    stack.push(next);
                }
            }
        }
        Ok(())
    }

    /// The NUL-terminated replacement string at `offset`.
    fn replacement(&self, offset: usize) -> Result<&str> {
        let bad = || {
            Error::Tokenizer(format!(
                "sentencepiece model: precompiled_charsmap: replacement offset {offset} is not \
                 a NUL-terminated string of the blob"
            ))
        };
        let rest = self.normalized.get(offset..).ok_or_else(bad)?;
        let end = rest.find('\0').ok_or_else(bad)?;
        Ok(&rest[..end])
    }
}

// ------------------------------------------------------------------------------------------------
// The model
// ------------------------------------------------------------------------------------------------

/// One piece of an encoding: its text (the normalised text it covers; for a run of unknown
/// characters, all of them) and its sentencepiece id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPiece {
    /// The normalised text of the piece.
    pub piece: String,
    /// The sentencepiece id (the unknown piece's id for unknown text).
    pub id: u32,
}

/// A loaded sentencepiece Unigram model: normaliser + vocabulary, encoding as
/// `SentencePieceProcessor.encode(text, out_type=str)` does.
#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    proto: ModelProto,
    charsmap: Option<CharsMap>,
    /// Pieces the segmentation can produce (normal and unused ones; unused ones are skipped).
    pieces: HashMap<String, u32>,
    /// Control and unknown pieces (looked up first by `piece_to_id`, as sentencepiece does).
    reserved: HashMap<String, u32>,
    unk_id: u32,
    /// Lowest score of a normal piece (`FLT_MAX` if there is none).
    min_score: f32,
    /// Longest piece in bytes.
    max_piece_len: usize,
    /// The ids of `pieces`, sorted by their text's bytes: the segmentation narrows a range of it
    /// byte by byte and stops where no piece continues the text, as sentencepiece's trie walk does
    /// (looking every prefix up in `pieces` would hash prefixes up to the longest piece at every
    /// position: cubic time on a model with a piece of thousands of bytes and a long text).
    sorted: Vec<u32>,
}

impl SentencePieceModel {
    /// Reads `path` (e.g. `tokenizer/sentencepiece.bpe.model`).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| Error::Model {
            path: path.to_path_buf(),
            message: match e {
                Error::Tokenizer(m) => m,
                e => e.to_string(),
            },
        })
    }

    /// Parses a serialised model.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_proto(ModelProto::parse(bytes)?)
    }

    /// Checks a parsed model and prepares it for encoding.
    pub fn from_proto(proto: ModelProto) -> Result<Self> {
        let err = |m: String| Error::Tokenizer(format!("sentencepiece model: {m}"));
        // sentencepiece itself would fall back to default specs, but a model without them (identity
        // normalisation) would give silently wrong ids; real files always have both.
        if !proto.has_trainer_spec || !proto.has_normalizer_spec {
            return Err(err(format!(
                "no {} (a truncated file?)",
                if proto.has_trainer_spec {
                    "normalizer_spec"
                } else {
                    "trainer_spec"
                }
            )));
        }
        let spec = &proto.trainer_spec;
        if spec.model_type != MODEL_TYPE_UNIGRAM {
            let name = match spec.model_type {
                2 => "BPE",
                3 => "WORD",
                4 => "CHAR",
                _ => "unknown",
            };
            return Err(err(format!(
                "model type {name} ({}) is not supported: only Unigram models (XLM-R's \
                 sentencepiece.bpe.model is one despite its name) can be read",
                spec.model_type
            )));
        }
        if spec.byte_fallback {
            return Err(err("byte fallback is not supported".into()));
        }
        if spec.treat_whitespace_as_suffix {
            return Err(err("treat_whitespace_as_suffix is not supported".into()));
        }
        let mut pieces = HashMap::new();
        let mut reserved = HashMap::new();
        let mut unk_id = None;
        let mut min_score = f32::MAX;
        let mut max_piece_len = 0;
        for (i, p) in proto.pieces.iter().enumerate() {
            let id = u32::try_from(i).map_err(|_| err("too many pieces".into()))?;
            if p.piece.is_empty() {
                return Err(err(format!("piece {i} is empty")));
            }
            let map = match p.kind {
                PieceType::Normal | PieceType::Unused => &mut pieces,
                PieceType::Unknown | PieceType::Control => &mut reserved,
                PieceType::UserDefined | PieceType::Byte => {
                    return Err(err(format!(
                        "piece {i} ({:?}) is a {} piece; user-defined and byte pieces are not \
                         supported",
                        p.piece,
                        if p.kind == PieceType::Byte {
                            "byte"
                        } else {
                            "user-defined"
                        }
                    )))
                }
            };
            if map.insert(p.piece.clone(), id).is_some() {
                return Err(err(format!("piece {:?} is defined twice", p.piece)));
            }
            if p.kind == PieceType::Unknown {
                if unk_id.is_some() {
                    return Err(err("more than one unknown piece".into()));
                }
                unk_id = Some(id);
            }
            if p.kind == PieceType::Normal {
                min_score = min_score.min(p.score);
                max_piece_len = max_piece_len.max(p.piece.len());
            }
        }
        let unk_id = unk_id.ok_or_else(|| err("no unknown piece (`<unk>`) is defined".into()))?;
        let mut sorted: Vec<u32> = pieces.values().copied().collect();
        sorted.sort_unstable_by(|&a, &b| {
            let text = |id: u32| proto.pieces[id as usize].piece.as_bytes();
            text(a).cmp(text(b))
        });
        let charsmap = if proto.normalizer_spec.precompiled_charsmap.is_empty() {
            None
        } else {
            Some(CharsMap::parse(
                &proto.normalizer_spec.precompiled_charsmap,
            )?)
        };
        Ok(Self {
            proto,
            charsmap,
            sorted,
            pieces,
            reserved,
            unk_id,
            min_score,
            max_piece_len,
        })
    }

    /// The parsed proto.
    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// Number of pieces (`len(sp_model)`).
    pub fn len(&self) -> usize {
        self.proto.pieces.len()
    }

    /// Whether the model has no pieces (never true for a loaded model: it has `<unk>`).
    pub fn is_empty(&self) -> bool {
        self.proto.pieces.is_empty()
    }

    /// The unknown piece's id.
    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// `PieceToId`: control / unknown pieces first, then the others, else the unknown id.
    pub fn piece_to_id(&self, piece: &str) -> u32 {
        self.reserved
            .get(piece)
            .or_else(|| self.pieces.get(piece))
            .copied()
            .unwrap_or(self.unk_id)
    }

    /// `IdToPiece`.
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.proto.pieces.get(id as usize).map(|p| p.piece.as_str())
    }

    /// `NormalizePrefix`: the normalised form of the longest charsmap match at the start of `input`,
    /// else of its first character unchanged, and how many bytes of `input` it consumed.
    fn normalize_prefix<'s>(&'s self, input: &'s str) -> Result<(&'s str, usize)> {
        if let Some(map) = &self.charsmap {
            if let Some((len, offset)) = map.longest_prefix(input.as_bytes()) {
                if !input.is_char_boundary(len) {
                    return Err(Error::Tokenizer(
                        "sentencepiece model: precompiled_charsmap matched part of a character"
                            .into(),
                    ));
                }
                return Ok((map.replacement(offset)?, len));
            }
        }
        let len = input.chars().next().map_or(0, char::len_utf8);
        Ok((&input[..len], len))
    }

    /// sentencepiece's `Normalizer::Normalize`.
    pub fn normalize(&self, input: &str) -> Result<String> {
        let spec = &self.proto.normalizer_spec;
        let mut input = input;
        let mut out = String::new();
        if input.is_empty() {
            return Ok(out);
        }
        if spec.remove_extra_whitespaces {
            while !input.is_empty() {
                let (sp, len) = self.normalize_prefix(input)?;
                if sp != " " {
                    break;
                }
                input = &input[len..];
            }
        }
        if input.is_empty() {
            return Ok(out);
        }
        out.reserve(input.len() * 3);
        let space = if spec.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            ' '
        };
        if spec.add_dummy_prefix {
            out.push(space);
        }
        let mut is_prev_space = spec.remove_extra_whitespaces;
        while !input.is_empty() {
            let (mut sp, len) = self.normalize_prefix(input)?;
            if is_prev_space {
                sp = sp.trim_start_matches(' ');
            }
            if !sp.is_empty() {
                for c in sp.chars() {
                    out.push(if c == ' ' { space } else { c });
                }
                is_prev_space = sp.ends_with(' ');
            }
            input = &input[len..];
            if !spec.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if spec.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.pop();
            }
        }
        Ok(out)
    }

    /// sentencepiece's optimised Unigram Viterbi (`Model::EncodeOptimized`) over already normalised
    /// text: `(start, end, id)` byte ranges, one per lattice node, unknown characters not merged.
    fn viterbi(&self, text: &str) -> Result<Vec<(usize, usize, u32)>> {
        #[derive(Clone, Copy)]
        struct Best {
            id: u32,
            score: f32,
            starts_at: Option<usize>,
        }
        let size = text.len();
        if size == 0 {
            return Ok(Vec::new());
        }
        let unk_score = self.min_score - UNK_PENALTY;
        let mut best = vec![
            Best {
                id: 0,
                score: 0.0,
                starts_at: None,
            };
            size + 1
        ];
        let mut starts_at = 0;
        while starts_at < size {
            let rest = &text[starts_at..];
            let till_here = best[starts_at].score;
            let mblen = rest.chars().next().map_or(1, char::len_utf8);
            let mut has_single_node = false;
            // Every piece that prefixes `rest`, shortest first (the order of the trie walk).
            let ends = rest
                .char_indices()
                .skip(1)
                .map(|(i, _)| i)
                .chain(std::iter::once(rest.len()))
                .take_while(|&len| len <= self.max_piece_len);
            // `sorted[lo..hi]`: the pieces that start with `rest[..done]`, narrowed character by
            // character; `rest[..len]` is a piece when it is the first (shortest) of its range.
            let (mut lo, mut hi, mut done) = (0, self.sorted.len(), 0);
            for len in ends {
                let key = &rest.as_bytes()[done..len];
                let tail = |id: &u32| {
                    let piece = self.proto.pieces[*id as usize].piece.as_bytes();
                    piece.get(done..).unwrap_or_default()
                };
                let range = &self.sorted[lo..hi];
                let start = range.partition_point(|id| tail(id) < key);
                let end = range.partition_point(|id| tail(id) < key || tail(id).starts_with(key));
                (lo, hi, done) = (lo + start, lo + end, len);
                if lo == hi {
                    // No piece starts with `rest[..len]`, so no longer prefix is a piece either.
                    break;
                }
                let id = self.sorted[lo];
                let piece = &self.proto.pieces[id as usize];
                if piece.piece.len() != len || piece.kind == PieceType::Unused {
                    continue;
                }
                let candidate = piece.score + till_here;
                let target = &mut best[starts_at + len];
                if target.starts_at.is_none() || candidate > target.score {
                    *target = Best {
                        id,
                        score: candidate,
                        starts_at: Some(starts_at),
                    };
                }
                if len == mblen {
                    has_single_node = true;
                }
            }
            if !has_single_node {
                let candidate = unk_score + till_here;
                let target = &mut best[starts_at + mblen];
                if target.starts_at.is_none() || candidate > target.score {
                    *target = Best {
                        id: self.unk_id,
                        score: candidate,
                        starts_at: Some(starts_at),
                    };
                }
            }
            starts_at += mblen;
        }
        let mut nodes = Vec::new();
        let mut ends_at = size;
        while ends_at > 0 {
            let node = best[ends_at];
            let start = node.starts_at.ok_or_else(|| {
                Error::Tokenizer(format!(
                    "no segmentation reaches byte {ends_at} of {text:?}"
                ))
            })?;
            nodes.push((start, ends_at, node.id));
            ends_at = start;
        }
        nodes.reverse();
        Ok(nodes)
    }

    /// Encodes `text` as `SentencePieceProcessor.encode(text, out_type=str)` does, with the ids:
    /// normalise, segment, merge runs of unknown pieces.
    pub fn encode(&self, text: &str) -> Result<Vec<EncodedPiece>> {
        let normalized = self.normalize(text)?;
        let mut out: Vec<EncodedPiece> = Vec::new();
        let mut prev_unk = false;
        for (start, end, id) in self.viterbi(&normalized)? {
            let piece = &normalized[start..end];
            let is_unk = id == self.unk_id;
            match out.last_mut() {
                Some(last) if prev_unk && is_unk => last.piece.push_str(piece),
                _ => out.push(EncodedPiece {
                    piece: piece.to_string(),
                    id,
                }),
            }
            prev_unk = is_unk;
        }
        Ok(out)
    }
}

// ------------------------------------------------------------------------------------------------
// XLM-R's view of the model
// ------------------------------------------------------------------------------------------------

/// The fairseq special tokens transformers puts in front of the sentencepiece vocabulary.
pub const FAIRSEQ_TOKENS: [(&str, u32); 4] = [("<s>", 0), ("<pad>", 1), ("</s>", 2), ("<unk>", 3)];

/// The mask token, appended after the sentencepiece vocabulary.
pub const MASK_TOKEN: &str = "<mask>";

/// A sentencepiece model with transformers' `XLMRobertaTokenizer` id mapping.
#[derive(Debug, Clone)]
pub struct XlmRobertaSentencePiece {
    sp: SentencePieceModel,
}

impl XlmRobertaSentencePiece {
    /// Reads `sentencepiece.bpe.model`.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self {
            sp: SentencePieceModel::load(path)?,
        })
    }

    /// Wraps a loaded model.
    pub fn new(sp: SentencePieceModel) -> Self {
        Self { sp }
    }

    /// The underlying sentencepiece model.
    pub fn sentencepiece(&self) -> &SentencePieceModel {
        &self.sp
    }

    /// `<mask>`'s id: `len(sp_model) + 1`, the last id.
    pub fn mask_id(&self) -> u32 {
        self.sp.len() as u32 + 1
    }

    /// `len(tokenizer)` for the default special tokens: pieces + 1 (fairseq offset) + 1 (`<mask>`).
    pub fn vocab_size(&self) -> usize {
        self.sp.len() + 2
    }

    /// The slow tokenizer's `_convert_token_to_id`: the fairseq tokens and `<mask>`, else the
    /// sentencepiece id + 1, where sentencepiece's id 0 (whatever the piece) maps to `<unk>` (3).
    pub fn token_to_id(&self, token: &str) -> u32 {
        if let Some(&(_, id)) = FAIRSEQ_TOKENS.iter().find(|(t, _)| *t == token) {
            return id;
        }
        if token == MASK_TOKEN {
            return self.mask_id();
        }
        match self.sp.piece_to_id(token) {
            0 => 3,
            id => id + 1,
        }
    }

    /// Whether `token` has an id of its own (is not mapped to `<unk>` for lack of a piece).
    pub fn contains(&self, token: &str) -> bool {
        token == "<unk>" || self.token_to_id(token) != 3
    }

    /// The slow tokenizer's `_convert_id_to_token`.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        if let Some(&(t, _)) = FAIRSEQ_TOKENS.iter().find(|(_, i)| *i == id) {
            return Some(t);
        }
        if id == self.mask_id() {
            return Some(MASK_TOKEN);
        }
        self.sp.id_to_piece(id.checked_sub(1)?)
    }

    /// `sp_model.encode(text, out_type=str)` with each piece's transformers id.
    pub fn encode(&self, text: &str) -> Result<Vec<(String, u32)>> {
        Ok(self
            .sp
            .encode(text)?
            .into_iter()
            .map(|p| {
                let id = self.token_to_id(&p.piece);
                (p.piece, id)
            })
            .collect())
    }

    /// The fast tokenizer transformers' `XLMRobertaConverter` builds from this model, i.e. what
    /// `XLMRobertaTokenizerFast.from_pretrained(dir, from_slow=True).backend_tokenizer` holds
    /// (transformers 4.57): Unigram over `<s> <pad> </s> <unk>` + pieces[3..] + `<mask>` (unk id 3),
    /// normaliser `Sequence[Precompiled(charsmap), Strip(right), Replace(" {2,}" -> "▁")]`,
    /// pre-tokeniser and decoder `Metaspace("▁", always, split)`, post-processor `<s> $A </s>`
    /// (pair `<s> $A </s> </s> $B </s>`), and the five special tokens as added tokens (`<mask>` with
    /// lstrip). Control / user-defined pieces beyond the first three become added tokens too, as the
    /// converter does.
    pub fn to_tokenizers(&self) -> Result<Tokenizer> {
        let err = |what: &str, e: &dyn std::fmt::Display| {
            Error::Tokenizer(format!("building tokenizer.json: {what}: {e}"))
        };
        let proto = self.sp.proto();
        let mut vocab: Vec<(String, f64)> = FAIRSEQ_TOKENS
            .iter()
            .map(|(t, _)| (t.to_string(), 0.0))
            .collect();
        vocab.extend(
            proto
                .pieces
                .iter()
                .skip(3)
                .map(|p| (p.piece.clone(), f64::from(p.score))),
        );
        vocab.push((MASK_TOKEN.to_string(), 0.0));
        let model = Unigram::from(vocab, Some(3), false).map_err(|e| err("Unigram model", &e))?;
        let mut tok = Tokenizer::new(model);

        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        let charsmap = &proto.normalizer_spec.precompiled_charsmap;
        if let Some(map) = &self.sp.charsmap {
            // `Precompiled` panics on text that walks a corrupt trie off its array or into the middle
            // of a character, and reads the strings from the trie size rounded down to 4 bytes:
            // refuse such a charsmap here rather than build a tokenizer that panics on some prompt.
            if charsmap.get(..4).is_some_and(|size| size[0] % 4 != 0) {
                return Err(err(
                    "precompiled charsmap",
                    &"the trie size is not a multiple of 4",
                ));
            }
            map.check_unchecked_walks()
                .map_err(|e| err("precompiled charsmap", &e))?;
            let pre = Precompiled::from(charsmap).map_err(|e| err("precompiled charsmap", &e))?;
            normalizers.push(pre.into());
        }
        normalizers.push(Strip::new(false, true).into());
        let replace = Replace::new(
            ReplacePattern::Regex(" {2,}".into()),
            SPACE_SYMBOL.to_string(),
        )
        .map_err(|e| err("Replace normaliser", &e))?;
        normalizers.push(replace.into());
        tok.with_normalizer(Some(Sequence::new(normalizers)))
            .map_err(|e| err("normaliser", &e))?;
        let metaspace = Metaspace::new(SPACE_SYMBOL, PrependScheme::Always, true);
        tok.with_pre_tokenizer(Some(metaspace.clone()));
        tok.with_decoder(Some(DecoderWrapper::Metaspace(metaspace)));
        let post = TemplateProcessing::builder()
            .try_single("<s> $A </s>")
            .map_err(|e| err("post-processor", &e))?
            .try_pair("<s> $A </s> </s> $B </s>")
            .map_err(|e| err("post-processor", &e))?
            .special_tokens(vec![
                ("<s>", self.token_to_id("<s>")),
                ("</s>", self.token_to_id("</s>")),
            ])
            .build()
            .map_err(|e| err("post-processor", &e))?;
        tok.with_post_processor(Some(post));

        // The converter: control (special) and user-defined pieces as added tokens, in proto order.
        let from_proto: Vec<AddedToken> = proto
            .pieces
            .iter()
            .filter(|p| matches!(p.kind, PieceType::Control | PieceType::UserDefined))
            .map(|p| {
                AddedToken::from(p.piece.clone(), p.kind == PieceType::Control).normalized(false)
            })
            .collect();
        tok.add_tokens(from_proto)
            .map_err(|e| err("added tokens", &e))?;
        // XLMRobertaTokenizerFast's special tokens.
        let special: Vec<AddedToken> = ["<s>", "</s>", "<unk>", "<pad>", MASK_TOKEN]
            .iter()
            .map(|t| {
                AddedToken::from(*t, true)
                    .normalized(false)
                    .lstrip(*t == MASK_TOKEN)
            })
            .collect();
        tok.add_special_tokens(special)
            .map_err(|e| err("special tokens", &e))?;
        Ok(tok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::fixture;

    fn model_path() -> std::path::PathBuf {
        fixture("models/tiny-m18/tokenizer/sentencepiece.bpe.model")
    }

    fn tiny() -> XlmRobertaSentencePiece {
        XlmRobertaSentencePiece::load(&model_path()).unwrap()
    }

    fn cases() -> Vec<(String, Vec<u32>, Vec<u32>)> {
        crate::test_support::tokenizer_cases()
    }

    #[test]
    fn parses_the_tiny_model() {
        let tok = tiny();
        let proto = tok.sentencepiece().proto();
        assert_eq!(proto.pieces.len(), 1000);
        assert_eq!(proto.trainer_spec.model_type, MODEL_TYPE_UNIGRAM);
        assert_eq!(proto.trainer_spec.unk_id, 0);
        assert_eq!(proto.normalizer_spec.name, "nmt_nfkc");
        assert!(proto.normalizer_spec.add_dummy_prefix);
        assert!(proto.normalizer_spec.remove_extra_whitespaces);
        assert!(proto.normalizer_spec.escape_whitespaces);
        assert!(!proto.normalizer_spec.precompiled_charsmap.is_empty());
        let kinds: Vec<PieceType> = proto.pieces[..4].iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [
                PieceType::Unknown,
                PieceType::Control,
                PieceType::Control,
                PieceType::Normal
            ]
        );
        assert_eq!(proto.pieces[3].piece, "▁");
        assert_eq!(tok.vocab_size(), 1002);
        assert_eq!(tok.mask_id(), 1001);
        assert_eq!(tok.token_to_id("<s>"), 0);
        assert_eq!(tok.token_to_id("<pad>"), 1);
        assert_eq!(tok.token_to_id("</s>"), 2);
        assert_eq!(tok.token_to_id("<unk>"), 3);
        assert_eq!(tok.token_to_id("▁"), 4);
        assert_eq!(tok.token_to_id("no such piece"), 3);
        assert_eq!(tok.id_to_token(4), Some("▁"));
        assert_eq!(tok.id_to_token(1001), Some("<mask>"));
        assert_eq!(tok.id_to_token(1002), None);
    }

    #[test]
    fn normalizes_as_sentencepiece() {
        let sp = SentencePieceModel::load(&model_path()).unwrap();
        let n = |s: &str| sp.normalize(s).unwrap();
        assert_eq!(n(""), "");
        assert_eq!(n("   "), "");
        assert_eq!(n("  a   cat  "), "▁a▁cat");
        assert_eq!(n("ＡＢＣ"), "▁ABC");
        assert_eq!(n("ﬁ"), "▁fi");
        assert_eq!(n("㍿"), "▁株式会社");
        // Longest match composes e + U+0301 and leaves the other accents alone.
        assert_eq!(n("e\u{301}\u{302}\u{303}"), "▁é\u{302}\u{303}");
        // Literal U+2581 is trailing whitespace after escaping and goes with the rest.
        assert_eq!(n("▁"), "");
        assert_eq!(n(" ▁ a ▁▁"), "▁a");
    }

    /// The Rust sentencepiece gives exactly the slow tokenizer's ids on every recorded string
    /// that has no special-token text (those are split by crate::tokenizer, tested there).
    #[test]
    fn sentencepiece_ids_equal_slow_tokenizer_without_special_text() {
        let tok = tiny();
        let mut n = 0;
        for (text, slow, _) in cases() {
            if ["<s>", "</s>", "<pad>", "<unk>", "<mask>"]
                .iter()
                .any(|t| text.contains(t))
            {
                continue;
            }
            let mut ids = vec![0];
            ids.extend(tok.encode(&text).unwrap().into_iter().map(|(_, id)| id));
            ids.push(2);
            assert_eq!(ids, slow, "{text:?}");
            n += 1;
        }
        assert!(n > 150, "{n}");
    }

    #[test]
    fn to_tokenizers_equals_the_converter() {
        let ours = tiny().to_tokenizers().unwrap();
        let json = ours.to_string(false).unwrap();
        // The same JSON as transformers' converter wrote (compared as values) ...
        let theirs_path = fixture("models/tiny-m18/tokenizer/tokenizer.json");
        let theirs_text = std::fs::read_to_string(&theirs_path).unwrap();
        let a: serde_json::Value = serde_json::from_str(&json).unwrap();
        let b: serde_json::Value = serde_json::from_str(&theirs_text).unwrap();
        for key in [
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
            "model",
            "truncation",
            "padding",
        ] {
            assert_eq!(a[key], b[key], "{key}");
        }
        assert_eq!(a, b);
        // ... and, reloaded from that JSON, the same ids as the fixture's tokenizer.json.
        let reloaded: Tokenizer = json.parse().unwrap();
        let fixture_tok = Tokenizer::from_file(&theirs_path).unwrap();
        for (text, _, fast) in cases() {
            let got = reloaded.encode(text.as_str(), true).unwrap();
            assert_eq!(got.get_ids(), fast.as_slice(), "{text:?}");
            let want = fixture_tok.encode(text.as_str(), true).unwrap();
            assert_eq!(got.get_ids(), want.get_ids(), "{text:?}");
        }
    }

    #[test]
    fn truncated_model_is_an_error_not_a_panic() {
        let bytes = std::fs::read(model_path()).unwrap();
        assert!(SentencePieceModel::from_bytes(&bytes).is_ok());
        // Every prefix of the first 600 bytes (the first pieces), a sample of longer prefixes and
        // the last 300 (cutting the charsmap at its end). The file ends with the normaliser spec,
        // so every strict prefix is malformed or lacks it: an error, never a panic or a hang.
        let mut cuts: Vec<usize> = (0..600).collect();
        cuts.extend((600..bytes.len()).step_by(997));
        cuts.extend(bytes.len() - 300..bytes.len());
        for cut in cuts {
            let err = SentencePieceModel::from_bytes(&bytes[..cut]);
            assert!(err.is_err(), "cut at {cut}");
        }
        // The proto reader alone: a cut inside the first piece's message is malformed.
        for cut in 1..8 {
            let err = ModelProto::parse(&bytes[..cut]).unwrap_err().to_string();
            assert!(err.contains("malformed sentencepiece model"), "{err}");
        }
        let err = SentencePieceModel::from_bytes(&[]).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    /// A tiny deterministic generator (xorshift) for garbage inputs.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut s = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut s) as u8).collect();
            let _ = SentencePieceModel::from_bytes(&bytes);
        }
        // Mutations of the real file: flip bytes everywhere (header, pieces, specs, charsmap) and
        // encode a few strings with whatever still loads.
        let real = std::fs::read(model_path()).unwrap();
        for _ in 0..300 {
            let mut bytes = real.clone();
            for _ in 0..4 {
                let i = (xorshift(&mut s) as usize) % bytes.len();
                bytes[i] = xorshift(&mut s) as u8;
            }
            if let Ok(m) = SentencePieceModel::from_bytes(&bytes) {
                for text in ["a cat", "ＡＢＣ ﬁ é", "   ", "一只猫"] {
                    let _ = m.encode(text);
                }
            }
        }
        // Specific malformations.
        let bad: [&[u8]; 8] = [
            &[0x0a],                   // length missing
            &[0x0a, 0x05, 0x0a],       // length beyond the end
            &[0x0a, 0xff, 0xff, 0xff], // truncated varint length
            &[0x08; 1],                // truncated varint value
            &[0xff; 11],               // over-long varint key
            &[0x0b],                   // group
            &[0x0f],                   // wire type 7
            &[0x00, 0x00],             // field number 0
        ];
        for b in bad {
            assert!(ModelProto::parse(b).is_err(), "{b:?}");
        }
    }

    /// Serialises a minimal proto by hand: pieces + trainer_spec (+ the real normaliser spec).
    fn encode_proto(pieces: &[(&str, f32, u8)], trainer_spec: &[u8]) -> Vec<u8> {
        fn len_field(out: &mut Vec<u8>, number: u8, payload: &[u8]) {
            out.push(number << 3 | 2);
            let mut n = payload.len();
            loop {
                let b = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    out.push(b);
                    break;
                }
                out.push(b | 0x80);
            }
            out.extend_from_slice(payload);
        }
        let mut out = Vec::new();
        for (piece, score, kind) in pieces {
            let mut p = Vec::new();
            len_field(&mut p, 1, piece.as_bytes());
            p.push(2 << 3 | 5);
            p.extend_from_slice(&score.to_le_bytes());
            p.extend_from_slice(&[3 << 3, *kind]);
            len_field(&mut out, 1, &p);
        }
        len_field(&mut out, 2, trainer_spec);
        len_field(&mut out, 3, &[]);
        out
    }

    #[test]
    fn bpe_model_is_a_clear_error() {
        let pieces = [
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("a", -1.0, 1),
        ];
        // model_type = 2 (BPE)
        let err = SentencePieceModel::from_bytes(&encode_proto(&pieces, &[3 << 3, 2]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("BPE") && err.contains("Unigram"), "{err}");
        // model_type = 1 works, and with no charsmap the text is only escaped.
        let m = SentencePieceModel::from_bytes(&encode_proto(&pieces, &[3 << 3, 1])).unwrap();
        let got = m.encode("a  b").unwrap();
        assert_eq!(
            got,
            [
                EncodedPiece {
                    piece: "▁".into(),
                    id: 0
                },
                EncodedPiece {
                    piece: "a".into(),
                    id: 3
                },
                EncodedPiece {
                    piece: "▁b".into(),
                    id: 0
                },
            ]
        );
        // Byte fallback and user-defined pieces are refused.
        // (field 35, varint: key 35 << 3 = 280 = varint bytes 0x98 0x02)
        let err = SentencePieceModel::from_bytes(&encode_proto(&pieces, &[0x98, 0x02, 1]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("byte fallback"), "{err}");
        let user = [("<unk>", 0.0, 2), ("x", 0.0, 4)];
        let err = SentencePieceModel::from_bytes(&encode_proto(&user, &[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("user-defined"), "{err}");
        // No normaliser spec at all.
        let mut no_norm = encode_proto(&pieces, &[3 << 3, 1]);
        no_norm.truncate(no_norm.len() - 2);
        let err = SentencePieceModel::from_bytes(&no_norm)
            .unwrap_err()
            .to_string();
        assert!(err.contains("normalizer_spec"), "{err}");
    }
}
