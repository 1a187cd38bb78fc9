//! `altdiff tokenize`: how a prompt is tokenised, as the pipeline will see it (plain syntax: the
//! ids and what is truncated; webui syntax: the weighted fragments and the 77-token chunks).

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

/// `--prompt-syntax webui`: the fragments with their weights, then each 77-token chunk (ids,
/// pieces, weights) as the text encoder gets it.
pub fn run_webui(model: &ModelChoice, json: bool, text: &str, progress: bool) -> Result<()> {
    use crate::text::webui;
    let fetched = super::fetch_model(model, crate::source::Scope::Tokenizer, progress)?;
    let tokenizer = PromptTokenizer::load(&fetched.root.join("tokenizer"))?;
    let fragments = webui::parse_checked(text)?;
    let special = webui::SpecialIds {
        bos: tokenizer.bos_id(),
        eos: tokenizer.eos_id(),
        pad: tokenizer.pad_id(),
        comma: tokenizer.vocab_id(","),
    };
    // id -> piece, for display.
    let mut names = std::collections::HashMap::new();
    names.insert(special.bos, "<s>".to_string());
    names.insert(special.eos, "</s>".to_string());
    names.insert(special.pad, "<pad>".to_string());
    let chunks = webui::chunks(
        &fragments,
        |f| {
            let (pieces, ids) = tokenizer.pieces(f)?;
            for (p, id) in pieces.into_iter().zip(&ids) {
                names.entry(*id).or_insert(p);
            }
            Ok(ids)
        },
        special,
    )?;
    let piece = |id: &u32| names.get(id).cloned().unwrap_or_else(|| format!("#{id}"));
    if json {
        let chunks: Vec<serde_json::Value> = chunks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "input_ids": c.ids,
                    "attention_mask": c.mask,
                    "tokens": c.ids.iter().map(piece).collect::<Vec<_>>(),
                    "weights": c.multipliers,
                })
            })
            .collect();
        let out = serde_json::json!({
            "text": text,
            "prompt_syntax": "webui",
            "fragments": fragments,
            "chunks": chunks,
            "length": chunks.len() * webui::CHUNK_TOKENS,
            "model": fetched.identity.to_string(),
        });
        println!("{out}");
        return Ok(());
    }
    for (t, w) in &fragments {
        println!("{w:>8.4}  {t:?}");
    }
    for (k, c) in chunks.iter().enumerate() {
        println!("chunk {} of {}:", k + 1, chunks.len());
        for ((id, m), w) in c.ids.iter().zip(&c.mask).zip(&c.multipliers) {
            if *m == 0 {
                break;
            }
            println!("{id:>8}  {w:>6.4}  {}", piece(id));
        }
    }
    println!(
        "{} chunk(s): the UNet attends over {} tokens",
        chunks.len(),
        chunks.len() * webui::CHUNK_TOKENS
    );
    Ok(())
}
