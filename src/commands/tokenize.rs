//! `altdiff tokenize`: how a prompt is tokenised, as the pipeline will see it.

use crate::error::{Error, Result};
use crate::options::ModelChoice;
use crate::pipeline::DEFAULT_MAX_LENGTH;
use crate::tokenizer::PromptTokenizer;

/// Prints the pieces and ids of `text`, the count against the limit and what would be truncated.
pub fn run(
    model: &ModelChoice,
    max_length: Option<usize>,
    json: bool,
    text: &str,
    progress: bool,
) -> Result<()> {
    let fetched = super::fetch_model(model, crate::source::Scope::Tokenizer, progress)?;
    let tokenizer = PromptTokenizer::load(&fetched.root.join("tokenizer"))?;
    let limit = max_length.unwrap_or_else(|| {
        DEFAULT_MAX_LENGTH.min(tokenizer.model_max_length().unwrap_or(DEFAULT_MAX_LENGTH))
    });
    if !(2..=512).contains(&limit) {
        return Err(Error::usage(format!(
            "--max-length {limit} is out of range (2 to 512)"
        )));
    }
    let (pieces, ids) = tokenizer.pieces(text)?;
    let total = ids.len() + 2;
    let kept = ids.len().min(limit - 2);
    let encoded = tokenizer.encode(text, limit)?;
    let input_ids: Vec<u32> = encoded.ids[..kept + 2].to_vec();
    let mut tokens = Vec::with_capacity(kept + 2);
    tokens.push("<s>".to_string());
    tokens.extend(pieces[..kept].iter().cloned());
    tokens.push("</s>".to_string());
    if json {
        let out = serde_json::json!({
            "text": text,
            "input_ids": input_ids,
            "tokens": tokens,
            "length": total,
            "max_length": limit,
            "truncated": encoded.dropped.is_some(),
            "dropped": encoded.dropped,
            "dropped_tokens": &pieces[kept..],
            "model": fetched.identity.to_string(),
        });
        println!("{out}");
        return Ok(());
    }
    for (id, tok) in input_ids.iter().zip(&tokens) {
        println!("{id:>8}  {tok}");
    }
    println!("{total} tokens of {limit} (with <s> and </s>)");
    if let Some(dropped) = &encoded.dropped {
        println!(
            "truncated: {} token(s) beyond {limit} are dropped: \"{dropped}\"",
            total - limit
        );
    }
    Ok(())
}
