//! The model's tokenizer: a byte-level BPE tokenizer built from a GGUF file's own
//! `tokenizer.ggml.*` metadata (or loaded from a `tokenizer.json`), wrapping the
//! `tokenizers` crate, plus a streaming detokenizer that never splits a UTF-8 character.
//!
//! The pre-tokenizer follows the GGUF's `tokenizer.ggml.pre` the way llama.cpp and the
//! original `tokenizer.json` files do: e.g. `smollm` (SmolLM/SmolLM2, StarCoder) splits
//! every digit on its own and then applies GPT-2's byte-level regex.

use crate::template::TokenizerConfig;
use candle_core::quantized::gguf_file;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, ModelWrapper, SplitDelimiterBehavior};

/// llama.cpp's `llama_token_type` values as written to `tokenizer.ggml.token_type`.
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// Special tokens that end an assistant turn in the common chat formats; whichever of
/// them the vocabulary has as special tokens count as end-of-sequence besides `eos`.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
];

/// Llama-3's split regex (tiktoken cl100k): digits in groups of up to three.
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: like Llama-3's but every digit on its own.
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("the GGUF file has no `{0}` metadata; it carries no usable tokenizer")]
    MissingKey(String),
    #[error("GGUF metadata `{key}` is malformed: {message}")]
    BadMetadata { key: String, message: String },
    #[error(
        "unsupported tokenizer model `{0}` in the GGUF file: only byte-level BPE (`gpt2`) tokenizers are supported"
    )]
    UnsupportedModel(String),
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode token ids: {0}")]
    Decode(String),
}

type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// A model's tokenizer plus the special-token facts the chat layer needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    fingerprint: String,
    /// A copy that reads special-token text as plain text, built on first use.
    literal: OnceLock<tokenizers::Tokenizer>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Tokenizer {
    /// Load a `tokenizer.json`. The bos/eos tokens come from a `tokenizer_config.json`
    /// next to it when there is one, else from the usual token names.
    pub fn from_file(path: &Path) -> Result<Self> {
        let load_err = |message: String| TokenizerError::Load {
            path: path.to_path_buf(),
            message,
        };
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| load_err(e.to_string()))?;
        let config = match path
            .parent()
            .map(|dir| dir.join("tokenizer_config.json"))
            .filter(|p| p.is_file())
            .map(|p| TokenizerConfig::read(&p))
        {
            Some(Ok(config)) => config,
            Some(Err(e)) => {
                // Only the bos/eos names come from it here; a bad chat template there is
                // the template loader's error to report.
                tracing::warn!("{e}; guessing the bos/eos tokens from their usual names");
                TokenizerConfig::default()
            }
            None => TokenizerConfig::default(),
        };
        let lookup = |configured: Option<&String>, fallbacks: &[&str]| {
            configured
                .and_then(|t| inner.token_to_id(t).map(|id| (id, t.clone())))
                .or_else(|| {
                    fallbacks
                        .iter()
                        .find_map(|t| inner.token_to_id(t).map(|id| (id, (*t).to_string())))
                })
        };
        let bos = lookup(
            config.bos_token.as_ref(),
            &["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"],
        );
        let eos = lookup(
            config.eos_token.as_ref(),
            &[
                "<|end_of_text|>",
                "</s>",
                "<eos>",
                "<|endoftext|>",
                "<|im_end|>",
            ],
        );

        let mut vocab: Vec<(u32, String)> = inner
            .get_vocab(true)
            .into_iter()
            .map(|(t, id)| (id, t))
            .collect();
        vocab.sort();
        let merges = model_merges(inner.get_model())?;
        let fingerprint = fingerprint_of(&vocab, &merges);
        // A tokenizer.json's own post-processor adds bos where the model wants it.
        Ok(Self::assemble(
            inner,
            bos,
            eos,
            Vec::new(),
            false,
            fingerprint,
        ))
    }

    /// Build the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| md.get(key);
        let require = |key: &str| get(key).ok_or_else(|| TokenizerError::MissingKey(key.into()));

        let model = string_value(require("tokenizer.ggml.model")?, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let tokens = string_array(require("tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
        let merges = string_array(require("tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::BadMetadata {
                        key: "tokenizer.ggml.merges".into(),
                        message: format!("merge `{m}` is not two tokens separated by a space"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let token_types = match get("tokenizer.ggml.token_type") {
            Some(v) => {
                let key = "tokenizer.ggml.token_type";
                let types = v
                    .to_vec()
                    .map_err(|e| bad(key, e))?
                    .iter()
                    .map(|t| int_value(t, key))
                    .collect::<Result<Vec<_>>>()?;
                if types.len() != tokens.len() {
                    return Err(TokenizerError::BadMetadata {
                        key: key.into(),
                        message: format!("{} token types for {} tokens", types.len(), tokens.len()),
                    });
                }
                types
            }
            None => Vec::new(),
        };
        let id_of = |key: &str| -> Result<Option<u32>> {
            let Some(v) = get(key) else { return Ok(None) };
            let id = int_value(v, key)?;
            if id as usize >= tokens.len() {
                return Err(TokenizerError::BadMetadata {
                    key: key.into(),
                    message: format!(
                        "token id {id} is outside the {}-token vocabulary",
                        tokens.len()
                    ),
                });
            }
            Ok(Some(id))
        };
        let bos_id = id_of("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_of("tokenizer.ggml.eos_token_id")?;
        let unk_id = id_of("tokenizer.ggml.unknown_token_id")?;
        let pad_id = id_of("tokenizer.ggml.padding_token_id")?;
        let eot_id = id_of("tokenizer.ggml.eot_token_id")?;
        let eom_id = id_of("tokenizer.ggml.eom_token_id")?;
        let add_bos = match get("tokenizer.ggml.add_bos_token") {
            Some(v) => v
                .to_bool()
                .map_err(|e| bad("tokenizer.ggml.add_bos_token", e))?,
            None => false,
        };
        let pre = match get("tokenizer.ggml.pre") {
            Some(v) => string_value(v, "tokenizer.ggml.pre")?.to_string(),
            None => "default".to_string(),
        };

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.to_string(), id as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.tokens".into(),
                message: "the vocabulary lists a token more than once".into(),
            });
        }
        let pipeline = Pipeline::for_pre(&pre)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges.clone())
            .byte_fallback(false)
            .ignore_merges(pipeline.ignore_merges)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        if let Some(normalizer) = pipeline.normalizer {
            inner
                .with_normalizer(Some(normalizer))
                .map_err(|e| TokenizerError::Build(e.to_string()))?;
        }
        inner.with_pre_tokenizer(Some(pipeline.pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control tokens (and the ids the metadata names) are special: matched whole in
        // the input, dropped by `decode(.., skip_special = true)`. User-defined tokens are
        // matched whole too but decode like text.
        let mut special_ids: Vec<u32> = token_types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(id, _)| id as u32)
            .collect();
        special_ids.extend(
            [bos_id, eos_id, unk_id, pad_id, eot_id, eom_id]
                .into_iter()
                .flatten(),
        );
        special_ids.sort_unstable();
        special_ids.dedup();
        let specials: Vec<AddedToken> = special_ids
            .iter()
            .map(|id| AddedToken::from(tokens[*id as usize], true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let user_defined: Vec<AddedToken> = token_types
            .iter()
            .enumerate()
            .filter(|(id, t)| {
                **t == TOKEN_TYPE_USER_DEFINED && special_ids.binary_search(&(*id as u32)).is_err()
            })
            .map(|(id, _)| AddedToken::from(tokens[id], false).normalized(false))
            .collect();
        if !user_defined.is_empty() {
            inner
                .add_tokens(user_defined)
                .map_err(|e| TokenizerError::Build(e.to_string()))?;
        }

        let named = |id: Option<u32>| id.map(|id| (id, tokens[id as usize].to_string()));
        let vocab: Vec<(u32, String)> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (id as u32, t.to_string()))
            .collect();
        let fingerprint = fingerprint_of(&vocab, &merges);
        let extra_eos = [eot_id, eom_id].into_iter().flatten().collect();
        Ok(Self::assemble(
            inner,
            named(bos_id),
            named(eos_id),
            extra_eos,
            add_bos,
            fingerprint,
        ))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<(u32, String)>,
        eos: Option<(u32, String)>,
        extra_eos: Vec<u32>,
        add_bos: bool,
        fingerprint: String,
    ) -> Self {
        let specials = inner.get_added_tokens_decoder();
        let mut eos_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        let end_tokens = END_OF_TURN_TOKENS.iter().filter_map(|t| {
            inner
                .token_to_id(t)
                .filter(|id| specials.get(id).is_some_and(|added| added.special))
        });
        for id in extra_eos.into_iter().chain(end_tokens) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Self {
            inner,
            bos,
            eos,
            eos_ids,
            add_bos,
            fingerprint,
            literal: OnceLock::new(),
        }
    }

    /// Token ids for `text`. Special tokens written in the text (`<|im_start|>`) become
    /// their ids either way; `add_special_tokens` adds what the model puts around every
    /// sequence (bos, for models whose GGUF says `add_bos_token`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = encoding.get_ids();
        match &self.bos {
            Some((bos, _)) if add_special_tokens && self.add_bos && ids.first() != Some(bos) => {
                let mut with_bos = Vec::with_capacity(ids.len() + 1);
                with_bos.push(*bos);
                with_bos.extend_from_slice(ids);
                Ok(with_bos)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Token ids for untrusted text (a user's message): special-token text such as
    /// `<|im_end|>` is tokenized as ordinary characters, so it cannot forge a turn
    /// boundary. Never adds bos.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>> {
        let literal = self.literal.get_or_init(|| {
            let mut literal = self.inner.clone();
            literal.set_encode_special_tokens(true);
            literal
        });
        let encoding = literal
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text for `ids`; `skip_special` drops special tokens (bos, `<|im_end|>`, ...).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn stream(&self, skip_special: bool) -> TokenStream<'_> {
        TokenStream::new(self, skip_special)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<(u32, String)> {
        self.bos.clone()
    }

    pub fn eos_token(&self) -> Option<(u32, String)> {
        self.eos.clone()
    }

    /// Ids that end generation: eos first, then the vocabulary's end-of-turn tokens
    /// (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    /// The bos token's text, for chat templates; empty when the model has none.
    pub fn bos_str(&self) -> &str {
        self.bos.as_ref().map_or("", |(_, t)| t.as_str())
    }

    /// The eos token's text, for chat templates; empty when the model has none.
    pub fn eos_str(&self) -> &str {
        self.eos.as_ref().map_or("", |(_, t)| t.as_str())
    }

    /// Whether `encode(.., true)` prepends bos.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// Hex sha256 over the vocabulary (id and text of every token) and the merges, in
    /// order: equal for the same tokenizer whether read from GGUF or `tokenizer.json`.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Turns token ids pushed one at a time into text deltas. A delta is only emitted once it
/// ends on a whole character, so multi-byte characters split across tokens (emoji) come
/// out whole; the deltas concatenate to `decode(all ids)`, less an incomplete character
/// at the very end (see [`TokenStream::finish`]).
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the ids decoded as context for the next delta.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
}

impl<'a> TokenStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer,
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Add one token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (prefix, text) = self.pending()?;
        if text.len() <= prefix.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let Some(delta) = text
            .strip_prefix(prefix.as_str())
            .map(str::to_string)
            .or_else(|| text.get(prefix.len()..).map(str::to_string))
        else {
            return Ok(None);
        };
        // The ids just emitted become the context for the next delta; older ones are
        // no longer needed.
        let consumed = self.read_offset;
        self.ids.drain(..consumed);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(Some(delta))
    }

    /// The text still held back, if any, less an incomplete character at its end: the
    /// last tokens were the first bytes of a character whose rest never came (the reply
    /// was cut at `max_tokens`, or ended). Decoding shows those bytes as U+FFFD; vLLM's
    /// and TGI's incremental detokenizers never emit them either.
    pub fn finish(self) -> Result<Option<String>> {
        let (prefix, text) = self.pending()?;
        Ok(text
            .get(prefix.len()..)
            .map(|rest| rest.trim_end_matches(char::REPLACEMENT_CHARACTER))
            .filter(|rest| !rest.is_empty())
            .map(str::to_string))
    }

    /// (text of the context ids, text of the context plus the pending ids).
    fn pending(&self) -> Result<(String, String)> {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, self.skip_special);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = decode(&self.ids[self.prefix_offset..])?;
        Ok((prefix, text))
    }
}

/// The normalizer/pre-tokenizer a GGUF `tokenizer.ggml.pre` type stands for, as in the
/// models' original `tokenizer.json` files (and llama.cpp's `llama-vocab.cpp`).
struct Pipeline {
    normalizer: Option<NFC>,
    pre_tokenizer: PreTokenizerWrapper,
    ignore_merges: bool,
}

impl Pipeline {
    fn for_pre(pre: &str) -> Result<Self> {
        let split = |regex: &str| -> Result<PreTokenizerWrapper> {
            Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|e| TokenizerError::Build(e.to_string()))
        };
        // GPT-2's regex, applied by the byte-level pre-tokenizer itself.
        let gpt2 = || ByteLevel::new(false, true, true).into();
        let bytes_only = || ByteLevel::new(false, true, false).into();
        Ok(match pre {
            // SmolLM/SmolLM2, StarCoder and friends: `Sequence[Digits(individual_digits),
            // ByteLevel(use_regex)]`; llama.cpp: `\p{N}` then the GPT-2 regex.
            "smollm" | "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" => Self {
                normalizer: None,
                pre_tokenizer: Sequence::new(vec![Digits::new(true).into(), gpt2()]).into(),
                ignore_merges: false,
            },
            "llama-bpe" | "llama3" | "smaug-bpe" | "dbrx" => Self {
                normalizer: None,
                pre_tokenizer: Sequence::new(vec![split(REGEX_LLAMA3)?, bytes_only()]).into(),
                ignore_merges: true,
            },
            "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => Self {
                normalizer: Some(NFC),
                pre_tokenizer: Sequence::new(vec![split(REGEX_QWEN2)?, bytes_only()]).into(),
                ignore_merges: false,
            },
            "default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "phi-2" => Self {
                normalizer: None,
                pre_tokenizer: gpt2(),
                ignore_merges: false,
            },
            other => {
                tracing::warn!(
                    pre = other,
                    "unknown GGUF pre-tokenizer type; using GPT-2's byte-level split, tokenization may differ from the model's"
                );
                Self {
                    normalizer: None,
                    pre_tokenizer: gpt2(),
                    ignore_merges: false,
                }
            }
        })
    }
}

/// The merges of a BPE model, in rank order (empty for other model types).
pub(crate) fn model_merges(model: &ModelWrapper) -> Result<Vec<(String, String)>> {
    let ModelWrapper::BPE(bpe) = model else {
        return Ok(Vec::new());
    };
    let json = serde_json::to_value(bpe).map_err(|e| TokenizerError::Build(e.to_string()))?;
    let Some(merges) = json.get("merges").and_then(|m| m.as_array()) else {
        return Ok(Vec::new());
    };
    merges
        .iter()
        .map(|m| {
            let pair = match m {
                serde_json::Value::String(s) => s.split_once(' '),
                serde_json::Value::Array(parts) => match parts.as_slice() {
                    [a, b] => a.as_str().zip(b.as_str()),
                    _ => None,
                },
                _ => None,
            };
            pair.map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TokenizerError::Build(format!("unreadable BPE merge {m}")))
        })
        .collect()
}

fn fingerprint_of(vocab: &[(u32, String)], merges: &[(String, String)]) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(b"loraloop-tokenizer-v1");
    field(&(vocab.len() as u64).to_le_bytes());
    for (id, token) in vocab {
        field(&id.to_le_bytes());
        field(token.as_bytes());
    }
    field(&(merges.len() as u64).to_le_bytes());
    for (a, b) in merges {
        field(a.as_bytes());
        field(b.as_bytes());
    }
    hex::encode(hasher.finalize())
}

fn bad(key: &str, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::BadMetadata {
        key: key.into(),
        message: e.to_string(),
    }
}

fn string_value<'v>(v: &'v gguf_file::Value, key: &str) -> Result<&'v str> {
    v.to_string().map(String::as_str).map_err(|e| bad(key, e))
}

fn string_array<'v>(v: &'v gguf_file::Value, key: &str) -> Result<Vec<&'v str>> {
    v.to_vec()
        .map_err(|e| bad(key, e))?
        .iter()
        .map(|s| string_value(s, key))
        .collect()
}

fn int_value(v: &gguf_file::Value, key: &str) -> Result<u32> {
    use gguf_file::Value as V;
    let n: i128 = match v {
        V::U8(n) => (*n).into(),
        V::I8(n) => (*n).into(),
        V::U16(n) => (*n).into(),
        V::I16(n) => (*n).into(),
        V::U32(n) => (*n).into(),
        V::I32(n) => (*n).into(),
        V::U64(n) => (*n).into(),
        V::I64(n) => (*n).into(),
        other => return Err(bad(key, format!("expected an integer, got {other:?}"))),
    };
    u32::try_from(n).map_err(|_| bad(key, format!("{n} is not a valid token id or type")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value;
    use std::collections::HashMap;
    use std::io::BufReader;

    fn model_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/models")
            .join(crate::DEFAULT_MODEL_FILE)
    }

    fn real_tokenizer() -> Tokenizer {
        let path = model_path();
        let file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo run -- models fetch` first",
                path.display()
            )
        });
        let content = gguf_file::Content::read(&mut BufReader::new(file)).unwrap();
        Tokenizer::from_gguf(&content).unwrap()
    }

    /// Expected ids, from three independent references that all printed exactly these:
    ///
    /// 1. transformers' own GGUF-to-tokenizers conversion (transformers 5.23.0,
    ///    tokenizers 0.23.3; `python3 -m venv /tmp/tokref && /tmp/tokref/bin/pip install
    ///    transformers tokenizers gguf sentencepiece protobuf numpy jinja2 torch`):
    ///    `/tmp/tokref/bin/python -c 'from transformers import AutoTokenizer;
    ///    tok = AutoTokenizer.from_pretrained("data/models", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf");
    ///    print(tok.encode(s, add_special_tokens=False))'` for each string `s`.
    ///    Its conversion uses a plain `ByteLevel` pre-tokenizer, without SmolLM2's digit
    ///    split; that cannot change ids here, since the vocabulary has no multi-character
    ///    token containing a digit.
    /// 2. SmolLM2's original pipeline, `Sequence[Digits(individual_digits=True),
    ///    ByteLevel(add_prefix_space=False, use_regex=True)]`, built with Python `tokenizers`
    ///    over the vocabulary/merges the `gguf` package reads from the file.
    /// 3. llama.cpp (`smollm` pre-type: `\p{N}` then GPT-2's regex):
    ///    `llama-tokenize -m data/models/SmolLM2-135M-Instruct.Q4_1.gguf -p "$s" --ids
    ///    --no-bos --log-disable`.
    const REFERENCE: &[(&str, &[u32])] = &[
        ("Hello, world!", &[19556, 28, 905, 17]),
        (
            "Café déjà vu — naïve",
            &[
                51, 1939, 2756, 32564, 90, 16739, 386, 101, 1841, 15486, 46494,
            ],
        ),
        (
            "I ❤️ 🦀 Rust",
            &[57, 4636, 247, 114, 31752, 15107, 116, 218, 36828],
        ),
        (
            "fn main() {\n    println!(\"{}\", 42);\n}",
            &[
                7853, 1085, 1000, 1662, 472, 1628, 34115, 17, 43331, 1002, 216, 36, 34, 4258, 198,
                109,
            ],
        ),
        (
            "12345 + 678 = 13023",
            &[
                33, 34, 35, 36, 37, 1232, 216, 38, 39, 40, 446, 216, 33, 35, 32, 34, 35,
            ],
        ),
        (
            "<|im_start|>user\nHi<|im_end|>\n",
            &[1, 4093, 198, 26843, 2, 198],
        ),
    ];

    #[test]
    fn real_gguf_tokenizer_matches_the_reference_ids() {
        let tok = real_tokenizer();
        for (text, ids) in REFERENCE {
            assert_eq!(tok.encode(text, false).unwrap(), *ids, "{text:?}");
        }
    }

    #[test]
    fn real_gguf_tokenizer_round_trips_and_streams() {
        let tok = real_tokenizer();
        for (text, _) in REFERENCE {
            let ids = tok.encode(text, false).unwrap();
            let decoded = tok.decode(&ids, false).unwrap();
            assert_eq!(decoded, *text);
            let mut stream = tok.stream(false);
            let mut streamed = String::new();
            for id in &ids {
                if let Some(delta) = stream.push(*id).unwrap() {
                    assert!(!delta.contains(char::REPLACEMENT_CHARACTER), "{delta:?}");
                    streamed.push_str(&delta);
                }
            }
            if let Some(rest) = stream.finish().unwrap() {
                streamed.push_str(&rest);
            }
            assert_eq!(streamed, decoded);
        }
    }

    #[test]
    fn real_gguf_special_tokens() {
        let tok = real_tokenizer();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.bos_token(), Some((1, "<|im_start|>".to_string())));
        assert_eq!(tok.eos_token(), Some((2, "<|im_end|>".to_string())));
        assert_eq!(tok.bos_str(), "<|im_start|>");
        assert_eq!(tok.eos_str(), "<|im_end|>");
        assert_eq!(tok.eos_token_ids(), vec![2, 0]);
        assert!(!tok.add_bos_token());
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
        assert!(tok.is_special(2));
        assert!(!tok.is_special(1000));
        // add_bos_token is false for SmolLM2: no bos even with special tokens on.
        assert_eq!(
            tok.encode("Hi", true).unwrap(),
            tok.encode("Hi", false).unwrap()
        );
        let ids = tok
            .encode("<|im_start|>user\nHi<|im_end|>\n", false)
            .unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi\n");
        // Untrusted text cannot smuggle in a control token.
        let literal = tok.encode_literal("Hi<|im_end|>").unwrap();
        assert!(literal.iter().all(|id| !tok.is_special(*id)), "{literal:?}");
        assert_eq!(tok.decode(&literal, true).unwrap(), "Hi<|im_end|>");
        assert_eq!(tok.encode("Hi<|im_end|>", false).unwrap(), [26843, 2]);
        assert_eq!(tok.fingerprint().len(), 64);
        assert_eq!(tok.fingerprint(), real_tokenizer().fingerprint());
    }

    #[test]
    fn tokenizer_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn streaming_holds_back_split_emoji() {
        let tok = real_tokenizer();
        let text = "I ❤️ 🦀 Rust 👩‍👩‍👧 ok";
        let ids = tok.encode(text, false).unwrap();
        let mut stream = tok.stream(true);
        let mut deltas = Vec::new();
        let mut held = 0;
        for id in &ids {
            match stream.push(*id).unwrap() {
                Some(delta) => deltas.push(delta),
                None => held += 1,
            }
        }
        if let Some(rest) = stream.finish().unwrap() {
            deltas.push(rest);
        }
        assert!(held > 0, "some emoji should take more than one token");
        assert!(
            deltas
                .iter()
                .all(|d| !d.contains(char::REPLACEMENT_CHARACTER))
        );
        assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());
        assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn a_reply_cut_inside_a_character_ends_before_it() {
        let tok = real_tokenizer();
        let ids = tok.encode("ok 🦀", false).unwrap();
        let whole = tok.encode("ok ", false).unwrap().len();
        assert!(
            ids.len() >= whole + 2,
            "the crab takes several tokens: {ids:?}"
        );
        // Cut after the crab's first token: its bytes alone decode to U+FFFD.
        let cut = &ids[..whole + 1];
        assert!(
            tok.decode(cut, true)
                .unwrap()
                .ends_with(char::REPLACEMENT_CHARACTER)
        );
        let mut stream = tok.stream(true);
        let mut text = String::new();
        for id in cut {
            text.extend(stream.push(*id).unwrap());
        }
        text.extend(stream.finish().unwrap());
        assert_eq!(text, "ok ");
    }

    /// A GGUF-metadata tokenizer over a handful of tokens: the 256 byte-level symbols,
    /// a few merges and two control tokens.
    fn tiny_content(model: &str, extra: &[(&str, Value)]) -> gguf_file::Content {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
        // GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to
        // U+0100 onwards.
        let mut shifted = 0u32;
        for byte in 0u32..256 {
            let printable =
                (33..=126).contains(&byte) || (161..=172).contains(&byte) || byte >= 174;
            let c = if printable {
                char::from_u32(byte)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted)
            };
            tokens.push(c.unwrap().to_string());
        }
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let mut types = vec![Value::I32(3), Value::I32(3)];
        types.resize(tokens.len(), Value::I32(1));
        let mut metadata: HashMap<String, Value> = [
            ("tokenizer.ggml.model", Value::String(model.into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.merges",
                Value::Array(
                    merges
                        .iter()
                        .map(|m| Value::String(m.to_string()))
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.bos_token_id", Value::U32(0)),
            ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            metadata.insert(k.to_string(), v.clone());
        }
        gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn tiny_gguf_tokenizer_encodes_and_decodes() {
        let tok = Tokenizer::from_gguf(&tiny_content("gpt2", &[])).unwrap();
        let id = |t: &str| tok.token_to_id(t).unwrap();
        assert_eq!(tok.vocab_size(), 2 + 256 + 6);
        assert_eq!(
            tok.encode("hello world12", false).unwrap(),
            vec![
                id("hello"),
                id("Ġwo"),
                id("r"),
                id("l"),
                id("d"),
                id("1"),
                id("2")
            ]
        );
        // Control tokens are matched whole; skip_special drops them on decode.
        let ids = tok.encode("hello<|im_end|>", false).unwrap();
        assert_eq!(ids, vec![id("hello"), 1]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello<|im_end|>");
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello");
        assert_eq!(tok.eos_token_ids(), vec![1, 0]);
        let text = "hello wörld ✓ 123\n\ttabs";
        assert_eq!(
            tok.decode(&tok.encode(text, false).unwrap(), false)
                .unwrap(),
            text
        );
    }

    #[test]
    fn tiny_gguf_tokenizer_adds_bos_when_asked() {
        let content = tiny_content(
            "gpt2",
            &[("tokenizer.ggml.add_bos_token", Value::Bool(true))],
        );
        let tok = Tokenizer::from_gguf(&content).unwrap();
        assert!(tok.add_bos_token());
        let plain = tok.encode("hello", false).unwrap();
        assert_eq!(
            tok.encode("hello", true).unwrap(),
            [vec![0], plain].concat()
        );
    }

    #[test]
    fn fingerprint_follows_vocabulary_and_merges() {
        let a = Tokenizer::from_gguf(&tiny_content("gpt2", &[])).unwrap();
        let b = Tokenizer::from_gguf(&tiny_content("gpt2", &[])).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let fewer = tiny_content(
            "gpt2",
            &[(
                "tokenizer.ggml.merges",
                Value::Array(vec![Value::String("h e".into())]),
            )],
        );
        let c = Tokenizer::from_gguf(&fewer).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn other_tokenizer_models_are_refused_by_name() {
        let err = Tokenizer::from_gguf(&tiny_content("llama", &[])).unwrap_err();
        assert!(matches!(err, TokenizerError::UnsupportedModel(ref m) if m == "llama"));
        assert!(err.to_string().contains("`llama`"), "{err}");
        let mut content = tiny_content("gpt2", &[]);
        content.metadata.remove("tokenizer.ggml.merges");
        let err = Tokenizer::from_gguf(&content).unwrap_err();
        assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");
    }

    #[test]
    fn tokenizer_json_round_trips_through_from_file() {
        let tok = Tokenizer::from_gguf(&tiny_content("gpt2", &[])).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.inner().save(&path, false).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>"}"#,
        )
        .unwrap();
        let loaded = Tokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.fingerprint(), tok.fingerprint());
        assert_eq!(loaded.bos_token(), Some((0, "<|endoftext|>".to_string())));
        assert_eq!(loaded.eos_token_ids(), vec![1, 0]);
        let text = "hello world 42<|im_end|>";
        assert_eq!(
            loaded.encode(text, false).unwrap(),
            tok.encode(text, false).unwrap()
        );
    }
}
