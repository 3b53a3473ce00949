//! The encoder's tokenizer: the folder's `tokenizer.json`, else a WordPiece tokenizer
//! built from `vocab.txt` the way `BertTokenizer` works (lower-casing unless
//! `tokenizer_config.json` says `do_lower_case: false`), and batches of token ids.

use candle_core::{Device, Result, Tensor};
use std::path::Path;
use tokenizers::Tokenizer;

/// Load the tokenizer of a model folder.
pub fn load_tokenizer(dir: &Path) -> std::result::Result<Tokenizer, String> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        let mut tok =
            Tokenizer::from_file(&json).map_err(|e| format!("{}: {e}", json.display()))?;
        tok.with_truncation(None).map_err(|e| e.to_string())?;
        tok.with_padding(None);
        return Ok(tok);
    }
    let vocab = dir.join("vocab.txt");
    if !vocab.is_file() {
        return Err(format!(
            "{} has neither tokenizer.json nor vocab.txt",
            dir.display()
        ));
    }
    let lower = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true);
    wordpiece_from_vocab(&vocab, lower)
}

/// `BertTokenizer` from a `vocab.txt`: BERT's normalizer and pre-tokenizer, WordPiece, and
/// `[CLS] ... [SEP]` around each text.
pub fn wordpiece_from_vocab(
    vocab: &Path,
    lowercase: bool,
) -> std::result::Result<Tokenizer, String> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::bert::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;
    let path = vocab.to_string_lossy().to_string();
    let wp = WordPiece::from_file(&path)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| format!("{}: {e}", vocab.display()))?;
    let mut tok = Tokenizer::new(wp);
    let id = |t: &str| -> std::result::Result<u32, String> {
        tok.token_to_id(t)
            .ok_or_else(|| format!("{} has no {t} token", vocab.display()))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let _ = tok.with_normalizer(Some(BertNormalizer::new(
        true,
        true,
        Some(lowercase),
        lowercase,
    )));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(tok)
}

/// Token ids `[n, longest]` (u32, padding 0) and the attention mask `[n, longest]` (f32)
/// of `texts`, each truncated to `max_len` tokens (its final `[SEP]` kept).
pub fn encode_batch(
    tok: &Tokenizer,
    texts: &[&str],
    max_len: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut rows: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
    for t in texts {
        let enc = tok.encode(*t, true).map_err(candle_core::Error::wrap)?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > max_len && max_len >= 2 {
            let last = *ids.last().unwrap_or(&0);
            ids.truncate(max_len - 1);
            ids.push(last);
        }
        rows.push(ids);
    }
    let longest = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let n = rows.len();
    let mut ids = vec![0u32; n * longest];
    let mut mask = vec![0f32; n * longest];
    for (i, r) in rows.iter().enumerate() {
        ids[i * longest..i * longest + r.len()].copy_from_slice(r);
        mask[i * longest..i * longest + r.len()].fill(1.0);
    }
    Ok((
        Tensor::from_vec(ids, (n, longest), dev)?,
        Tensor::from_vec(mask, (n, longest), dev)?,
    ))
}
