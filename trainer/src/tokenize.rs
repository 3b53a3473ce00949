//! Chat examples to token ids with loss weights, through the model's own chat template.
//!
//! The conversation is rendered piece by piece: the text up to each assistant turn (with
//! the template's generation prompt) and the assistant turn itself, each tokenized on its
//! own. That is exactly how the engine sees a conversation at inference time (a prompt,
//! then the tokens it generates), so the model is trained on the token boundaries it
//! will produce. The assistant pieces (content and the template's end-of-turn text) carry
//! the message's weight; everything else carries weight 0 unless `train_on_inputs`.

use loraloop_core::domain::{ChatExample, Role};
use loraloop_model::template::{ChatTemplate, TemplateMessage};
use loraloop_model::tokenizer::Tokenizer;
use loraloop_model::train::SoftTarget;

/// One example as tokens, with the loss weight of each token (0: not scored).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizedExample {
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
    /// Positions (`t`: predicting token `t + 1`) that learn a distribution instead of
    /// the next token (replay's distillation targets).
    pub soft: Vec<SoftTarget>,
    /// `Some((turn, of))`: the example trains only in epochs `e` with `e % of == turn`
    /// (replay shows different prompts in different epochs); `None`: every epoch.
    pub rotation: Option<(usize, usize)>,
}

impl TokenizedExample {
    /// Whether the example is part of epoch `epoch`.
    pub fn trains_in(&self, epoch: usize) -> bool {
        self.rotation
            .is_none_or(|(turn, of)| of == 0 || epoch % of == turn)
    }

    /// Tokens scored with a positive weight (after the first: the first token has no
    /// position predicting it).
    pub fn scored(&self) -> usize {
        self.weights.iter().skip(1).filter(|&&w| w > 0.0).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("example {index}: {message}")]
    Example { index: usize, message: String },
    #[error(
        "no example has assistant tokens left after truncation to sequence_len {sequence_len} ({dropped} dropped): nothing to train on or score; raise sequence_len or shorten the prompts"
    )]
    NothingToTrain { sequence_len: usize, dropped: usize },
}

/// What tokenizing a dataset did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizeReport {
    pub examples: usize,
    /// Examples cut to `sequence_len`.
    pub truncated: usize,
    /// Examples left out: nothing scored remained (after truncation, or all weights 0).
    pub dropped: usize,
    pub tokens: usize,
    pub scored_tokens: usize,
}

fn template_messages(ex: &ChatExample) -> Vec<TemplateMessage> {
    ex.messages
        .iter()
        .map(|m| TemplateMessage::new(m.role.as_str(), m.content.clone()))
        .collect()
}

/// Tokenize one example; `index` only labels errors.
pub fn tokenize_example(
    ex: &ChatExample,
    index: usize,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    train_on_inputs: bool,
) -> Result<TokenizedExample, TokenizeError> {
    let err = |message: String| TokenizeError::Example { index, message };
    let msgs = template_messages(ex);
    // (text, weight) pieces in order.
    let mut pieces: Vec<(String, f32)> = Vec::new();
    let mut done = String::new();
    for (i, m) in ex.messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let before = template
            .render(&msgs[..i], true)
            .map_err(|e| err(e.to_string()))?;
        let through = template
            .render(&msgs[..=i], false)
            .map_err(|e| err(e.to_string()))?;
        let split = match (
            before.strip_prefix(done.as_str()),
            through.strip_prefix(before.as_str()),
        ) {
            (Some(prompt), Some(reply)) => Some((prompt, reply)),
            // A conversation that opens with the assistant (a `text` example): templates
            // that add a default system prompt before the first message add none before
            // no message at all, so the turn's prompt is what its own rendering holds
            // before its text.
            _ if i == 0 => through
                .find(m.content.as_str())
                .map(|at| through.split_at(at)),
            _ => None,
        };
        let Some((prompt, reply)) = split else {
            return Err(err(
                "the chat template does not render this conversation as a growing prefix, so assistant turns cannot be located".into(),
            ));
        };
        pieces.push((prompt.to_string(), if train_on_inputs { 1.0 } else { 0.0 }));
        pieces.push((reply.to_string(), m.weight.unwrap_or(1.0) as f32));
        done = through;
    }
    let full = template
        .render(&msgs, false)
        .map_err(|e| err(e.to_string()))?;
    match full.strip_prefix(done.as_str()) {
        Some(rest) if !rest.is_empty() => {
            pieces.push((rest.to_string(), if train_on_inputs { 1.0 } else { 0.0 }))
        }
        Some(_) => {}
        None => {
            return Err(err(
                "the chat template renders the whole conversation differently from its turns"
                    .into(),
            ));
        }
    }
    let mut out = TokenizedExample::default();
    for (k, (text, w)) in pieces.iter().enumerate() {
        if text.is_empty() {
            continue;
        }
        let ids = tokenizer
            .encode(text, k == 0)
            .map_err(|e| err(e.to_string()))?;
        out.weights.extend(std::iter::repeat_n(*w, ids.len()));
        out.tokens.extend(ids);
    }
    Ok(out)
}

/// Tokenize a dataset, truncating to `sequence_len` and dropping examples with nothing
/// left to score.
pub fn tokenize_dataset(
    examples: &[ChatExample],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    sequence_len: usize,
    train_on_inputs: bool,
) -> Result<(Vec<TokenizedExample>, TokenizeReport), TokenizeError> {
    let mut report = TokenizeReport::default();
    let mut out = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let mut t = tokenize_example(ex, i, tokenizer, template, train_on_inputs)?;
        if t.tokens.len() > sequence_len {
            t.tokens.truncate(sequence_len);
            t.weights.truncate(sequence_len);
            report.truncated += 1;
        }
        if t.scored() == 0 {
            report.dropped += 1;
            continue;
        }
        report.tokens += t.tokens.len();
        report.scored_tokens += t.scored();
        out.push(t);
    }
    report.examples = out.len();
    if out.is_empty() {
        return Err(TokenizeError::NothingToTrain {
            sequence_len,
            dropped: report.dropped,
        });
    }
    Ok((out, report))
}
