//! diffusers' `RobertaSeriesModelWithTransformation`: XLM-R plus AltDiffusion's projection heads.
//!
//! Owned rather than taken from candle-transformers' `xlm_roberta`: that model returns only the last
//! hidden state, while m18 reads the penultimate one (`hidden_states[-2]` -> `pre_LN` ->
//! `transformation_pre`). Owning it also lets m18 skip the last layer, whose output it never uses.
//! Numerics follow transformers' `XLMRobertaModel` in eval mode: position ids `padding_idx +
//! cumsum(mask)` for real tokens and `padding_idx` for pads, an additive attention mask, exact-erf GELU.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

use crate::kernels::layer_norm::{layer_norm, LayerNorm};
use crate::kernels::linear::{linear, Linear};

use crate::config::TextEncoderConfig;

struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    norm: LayerNorm,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, cfg: &TextEncoderConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let s = vb.pp("self");
        Ok(Self {
            query: linear(h, h, s.pp("query"))?,
            key: linear(h, h, s.pp("key"))?,
            value: linear(h, h, s.pp("value"))?,
            output: linear(h, h, vb.pp("output.dense"))?,
            norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `mask` is additive, [B, 1, 1, L], in f32; `keys`, when known, the number of real tokens of
    /// each row, which come first (see [`Keys`]).
    fn forward(&self, xs: &Tensor, mask: &Tensor, keys: &Keys) -> candle_core::Result<Tensor> {
        let (b, l, h) = xs.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let dtype = xs.dtype();
        let q = split(self.query.forward(xs)?)?.to_dtype(DType::F32)?;
        let k = split(self.key.forward(xs)?)?.to_dtype(DType::F32)?;
        let v = split(self.value.forward(xs)?)?.to_dtype(DType::F32)?;
        let scale = 1.0 / (d as f64).sqrt();
        let ctx = match keys {
            // The fused kernel over each row's real keys: the masked ones' probabilities are
            // exactly zero (exp of f32::MIN below the row's maximum), so they are left out.
            Keys::Prefix(lens) if crate::kernels::attention::applies(&q) => {
                let rows = lens
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let (q, k, v) =
                            (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
                        let (k, v) = (k.narrow(2, 0, n)?, v.narrow(2, 0, n)?);
                        crate::kernels::attention::attend(&q, &k, &v, scale)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
            _ => {
                let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
                candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?
            }
        };
        let ctx = ctx.to_dtype(dtype)?.transpose(1, 2)?.reshape((b, l, h))?;
        self.norm.forward(&self.output.forward_add(&ctx, xs)?)
    }
}

/// Which keys each row of a batch attends to.
enum Keys {
    /// The first n of each row (every row's real tokens come first, at least one of them).
    Prefix(Vec<usize>),
    /// As the additive mask says.
    Masked,
}

impl Keys {
    /// From a [B, L] mask of 1s (real tokens) and 0s.
    fn of(mask: &Tensor) -> candle_core::Result<Self> {
        let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let lens = rows
            .iter()
            .map(|row| {
                let n = row.iter().take_while(|&&m| m == 1.0).count();
                (n > 0 && row[n..].iter().all(|&m| m == 0.0)).then_some(n)
            })
            .collect::<Option<Vec<_>>>();
        Ok(lens.map_or(Keys::Masked, Keys::Prefix))
    }
}

struct Layer {
    attention: SelfAttention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    act: candle_nn::Activation,
}

impl Layer {
    fn new(vb: VarBuilder, cfg: &TextEncoderConfig) -> candle_core::Result<Self> {
        // Config validation admits only these names; "gelu" is transformers' exact erf GELU.
        let act = match cfg.hidden_act.as_str() {
            "gelu" => candle_nn::Activation::Gelu,
            "relu" => candle_nn::Activation::Relu,
            _ => candle_nn::Activation::GeluPytorchTanh,
        };
        Ok(Self {
            attention: SelfAttention::new(vb.pp("attention"), cfg)?,
            intermediate: linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                vb.pp("intermediate.dense"),
            )?,
            output: linear(
                cfg.intermediate_size,
                cfg.hidden_size,
                vb.pp("output.dense"),
            )?,
            norm: layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("output.LayerNorm"),
            )?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor, keys: &Keys) -> candle_core::Result<Tensor> {
        let attn = self.attention.forward(xs, mask, keys)?;
        let hidden = self.intermediate.forward(&attn)?;
        let ff = match self.act {
            // One vectorised pass on the CPU (candle's is a scalar erf per value).
            candle_nn::Activation::Gelu => crate::kernels::geglu::gelu_erf(&hidden)?,
            act => act.forward(&hidden)?,
        };
        self.norm.forward(&self.output.forward_add(&ff, &attn)?)
    }
}

/// The projection that turns XLM-R features into the UNet's text features.
enum Projection {
    /// m9: `transformation(last_hidden_state)`.
    Last(Linear),
    /// m18: `transformation_pre(pre_LN(hidden_states[-2]))`.
    Penultimate { pre_ln: LayerNorm, proj: Linear },
}

/// AltDiffusion's text encoder.
pub struct TextEncoder {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    projection: Projection,
    padding_idx: usize,
    max_positions: usize,
    project_dim: usize,
}

impl TextEncoder {
    /// Builds the encoder from `text_encoder/` weights (keys `roberta.*`, `transformation*`, `pre_LN.*`).
    pub fn new(vb: VarBuilder, cfg: &TextEncoderConfig) -> candle_core::Result<Self> {
        let r = vb.pp("roberta");
        let e = r.pp("embeddings");
        let h = cfg.hidden_size;
        // m18 never uses the last layer's output: don't load or run it.
        let n_layers = if cfg.has_pre_transformation {
            cfg.num_hidden_layers - 1
        } else {
            cfg.num_hidden_layers
        };
        let layers = (0..n_layers)
            .map(|i| Layer::new(r.pp(format!("encoder.layer.{i}")), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let projection = if cfg.has_pre_transformation {
            Projection::Penultimate {
                pre_ln: layer_norm(h, cfg.layer_norm_eps, vb.pp("pre_LN"))?,
                proj: linear(h, cfg.project_dim, vb.pp("transformation_pre"))?,
            }
        } else {
            Projection::Last(linear(h, cfg.project_dim, vb.pp("transformation"))?)
        };
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?,
            position_embeddings: embedding(
                cfg.max_position_embeddings,
                h,
                e.pp("position_embeddings"),
            )?,
            token_type_embeddings: embedding(
                cfg.type_vocab_size,
                h,
                e.pp("token_type_embeddings"),
            )?,
            embeddings_norm: layer_norm(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?,
            layers,
            projection,
            padding_idx: cfg.pad_token_id,
            max_positions: cfg.max_position_embeddings,
            project_dim: cfg.project_dim,
        })
    }

    /// Size of the output features.
    pub fn project_dim(&self) -> usize {
        self.project_dim
    }

    /// Longest sequence the position embeddings allow.
    pub fn max_tokens(&self) -> usize {
        max_tokens(self.max_positions, self.padding_idx)
    }

    /// Encodes `input_ids` ([B, L], u32) with `attention_mask` (same shape, 1 for real tokens) into
    /// `prompt_embeds` [B, L, project_dim], diffusers' `text_encoder(ids, attention_mask)[0]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let dtype = self.word_embeddings.embeddings().dtype();
        let device = input_ids.device();
        let (b, l) = input_ids.dims2()?;
        let mask_f = attention_mask.to_dtype(DType::F32)?;
        // Position ids: padding_idx + cumsum(mask) on real tokens, padding_idx on pads.
        let positions =
            ((mask_f.cumsum(1)? * &mask_f)? + self.padding_idx as f64)?.to_dtype(DType::U32)?;
        let token_types = Tensor::zeros((b, l), DType::U32, device)?;
        let xs = (self.word_embeddings.forward(input_ids)?
            + self.token_type_embeddings.forward(&token_types)?)?
        .add(&self.position_embeddings.forward(&positions)?)?;
        let mut xs = self.embeddings_norm.forward(&xs)?;
        // transformers: (1 - mask) * finfo(f32).min, added to the scores.
        let additive = ((1.0 - &mask_f)? * f32::MIN as f64)?.reshape((b, 1, 1, l))?;
        let keys = Keys::of(&mask_f)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &additive, &keys)?;
        }
        match &self.projection {
            Projection::Last(proj) => proj.forward(&xs),
            Projection::Penultimate { pre_ln, proj } => proj.forward(&pre_ln.forward(&xs)?),
        }
        .and_then(|t| t.to_dtype(dtype))
    }
}

/// Makes `[B, L]` u32 id and mask tensors from padded rows.
pub fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> candle_core::Result<Tensor> {
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), l), device)
}

/// Longest sequence that `max_position_embeddings` positions allow: positions start after
/// `padding_idx` (transformers' `create_position_ids_from_input_ids`).
pub fn max_tokens(max_positions: usize, padding_idx: usize) -> usize {
    max_positions.saturating_sub(padding_idx + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused attention over each row's real keys gives what the additive mask gives, and
    /// only masks whose real tokens come first take it.
    #[test]
    fn attention_over_real_keys_matches_the_masked_attention() {
        let cfg: TextEncoderConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 8, "max_position_embeddings": 20
        }))
        .unwrap();
        let dev = Device::Cpu;
        let mut weights = std::collections::HashMap::new();
        for (i, name) in ["query", "key", "value", "output"].iter().enumerate() {
            let t = |shape: &[usize], seed: f64| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|j| ((j as f64 * 0.37 + seed).sin() * 0.2) as f32)
                    .collect();
                Tensor::from_vec(v, shape, &dev).unwrap()
            };
            let at = if *name == "output" {
                "output.dense".to_string()
            } else {
                format!("self.{name}")
            };
            weights.insert(format!("{at}.weight"), t(&[64, 64], i as f64));
            weights.insert(format!("{at}.bias"), t(&[64], i as f64 + 0.5));
        }
        weights.insert(
            "output.LayerNorm.weight".into(),
            Tensor::ones(64, DType::F32, &dev).unwrap(),
        );
        weights.insert(
            "output.LayerNorm.bias".into(),
            Tensor::zeros(64, DType::F32, &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
        let attention = SelfAttention::new(vb, &cfg).unwrap();
        let x: Vec<f32> = (0..2 * 9 * 64).map(|i| (i as f32 * 0.11).cos()).collect();
        let x = Tensor::from_vec(x, (2, 9, 64), &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 0., 0., 0., 0., 0.], [1.; 9]], &dev).unwrap();
        let additive = ((1.0 - &mask).unwrap() * f32::MIN as f64)
            .unwrap()
            .reshape((2, 1, 1, 9))
            .unwrap();
        let keys = Keys::of(&mask).unwrap();
        assert!(matches!(&keys, Keys::Prefix(n) if n == &[4, 9]));
        let fused = attention.forward(&x, &additive, &keys).unwrap();
        let masked = attention.forward(&x, &additive, &Keys::Masked).unwrap();
        let d = crate::test_support::max_abs_diff(&fused, &masked);
        assert!(d < 1e-5, "{d}");
        // Real tokens after a pad, or none at all: the mask decides.
        for row in [[1f32, 0., 1.], [0.; 3]] {
            let mask = Tensor::new(&[row], &dev).unwrap();
            assert!(matches!(Keys::of(&mask).unwrap(), Keys::Masked));
        }
    }

    #[test]
    fn position_ids_follow_xlmr() {
        // padding_idx + cumsum(mask) * mask: [2, 3, 4, 1, 1] for a 3-token prompt padded to 5.
        let mask = Tensor::new(&[[1f32, 1., 1., 0., 0.]], &Device::Cpu).unwrap();
        let pos = ((mask.cumsum(1).unwrap() * &mask).unwrap() + 1.0).unwrap();
        assert_eq!(
            pos.to_vec2::<f32>().unwrap(),
            vec![vec![2., 3., 4., 1., 1.]]
        );
    }
}
