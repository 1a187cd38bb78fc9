//! The pipeline: tokenizer -> text encoder -> (uncond, cond) -> scheduler loop over the UNet -> VAE
//! decode, as diffusers' `AltDiffusionPipeline` does it; with an init image, diffusers'
//! `AltDiffusionImg2ImgPipeline` (the image encoded, noised to the first timestep that `strength`
//! leaves, then the rest of the schedule) and, with a mask too, `StableDiffusionInpaintPipeline`
//! for a 4-channel UNet (the kept region re-noised and blended back after every step).
//!
//! No files, no prints: the pipeline takes loaded components and a request, reports progress through
//! [`Progress`], and returns images and (on request) the intermediate tensors.

use std::cell::RefCell;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result, TensorContext};
use crate::model::{ModelConfig, ModelFiles};
use crate::models::{TextEncoder, UNet, VaeDecoder, VaeEncoder};
use crate::noise::NoiseStreams;
use crate::options::{LoadPolicy, Sampling};
use crate::picture::Picture;
use crate::schedulers::{self, SchedulerKind};
use crate::text::PromptSyntax;
use crate::tokenizer::PromptTokenizer;

/// What the authors trained and sampled with; used unless the tokenizer allows fewer tokens.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// Receives progress reports; every method has an empty default.
pub trait Progress {
    /// A named stage starts (`"load"`, `"encode"`, `"denoise"`, `"decode"`).
    fn stage(&mut self, _name: &str) {}
    /// Denoising step `done` of `total` finished.
    fn step(&mut self, _done: usize, _total: usize) {}
    /// Whether the run should stop (Ctrl-C): polled before each denoising step and before
    /// decoding, so an abandoned image never reaches the disk.
    fn cancelled(&self) -> bool {
        false
    }
}

/// [`Error::Interrupted`] if `progress` asks to stop.
fn check_cancelled(progress: &dyn Progress) -> Result<()> {
    if progress.cancelled() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// A [`Progress`] that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Where a request's randomness comes from: the initial latents and the step noise of stochastic
/// schedulers, as diffusers' `latents=` and `generator=`.
#[derive(Debug, Clone)]
pub struct Noise {
    /// Given initial latents [B, C, h, w] (diffusers' `latents=`), multiplied by
    /// `init_noise_sigma`; drawn from `generators` when `None`.
    pub latents: Option<Tensor>,
    /// The generators: first the initial latents (unless given), then each step's noise.
    pub generators: NoiseStreams,
}

impl Noise {
    /// Everything from one generator seeded with `seed` over `images` images.
    pub fn seeded(seed: u64, images: usize) -> Self {
        Self {
            latents: None,
            generators: NoiseStreams::shared(seed, images),
        }
    }
}

/// One generation: a batch of prompts with shared settings.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompts; each gets `sampling.num_images` images, adjacent in the output.
    pub prompts: Vec<String>,
    /// The settings.
    pub sampling: Sampling,
    /// Initial noise.
    pub noise: Noise,
    /// Keep the intermediate tensors for `--dump-tensors`.
    pub keep_tensors: bool,
    /// Image-to-image or inpainting: the picture every image of the request starts from.
    pub init: Option<Init>,
}

/// What image-to-image and inpainting start from (diffusers' `image=`, `mask_image=`, `strength=`).
#[derive(Debug, Clone)]
pub struct Init {
    /// The init image (grey or RGB), at any size: it is resized to the output size as diffusers'
    /// `VaeImageProcessor` does (Pillow's Lanczos).
    pub image: Picture,
    /// Inpainting: white = repaint, black = keep (grey or RGB, resized to the output size, then
    /// binarised at 0.5 as diffusers does).
    pub mask: Option<Picture>,
    /// How much of the schedule runs, 0 < strength <= 1: `int(steps * strength)` steps, started
    /// from the init image noised to that level (1 = from the noise level of the first step).
    pub strength: f64,
}

/// An 8-bit RGB image.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major RGB bytes.
    pub pixels: Vec<u8>,
}

/// What a request produced.
pub struct Generation {
    /// One image per prompt x image, images of one prompt adjacent.
    pub images: Vec<RgbImage>,
    /// Token prompts that were cut, as (prompt index, dropped text).
    pub truncated: Vec<(usize, String)>,
    /// The resolved settings.
    pub resolved: Resolved,
    /// diffusers-named intermediates, when requested.
    pub tensors: Vec<(String, Tensor)>,
}

/// Settings after defaults were applied.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Scheduler used.
    pub scheduler: SchedulerKind,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// Token length.
    pub max_length: usize,
    /// With an init image: what was resized to the output size.
    pub resized: Option<Resized>,
}

/// The sizes (width, height) an init image and its mask had before they were resized to the
/// output size; `None` for one that already had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    /// The init image's size.
    pub image: Option<(usize, usize)>,
    /// The mask's size.
    pub mask: Option<(usize, usize)>,
}

/// The model: configuration and tokenizer, and the three networks, loaded at start-up or stage
/// by stage ([`LoadPolicy`]).
pub struct Pipeline {
    config: ModelConfig,
    files: ModelFiles,
    tokenizer: PromptTokenizer,
    text_encoder: RefCell<Option<TextEncoder>>,
    unet: RefCell<Option<UNet>>,
    vae: RefCell<Option<VaeDecoder>>,
    /// Loaded when a request first needs it (image-to-image, inpainting).
    vae_encoder: RefCell<Option<VaeEncoder>>,
    per_stage: bool,
    device: Device,
    dtype: DType,
}

/// A network that cannot be built from its weights (a missing tensor, a wrong shape) is a model
/// error naming the file: exit 2, found before any work.
fn model_error<T>(
    built: candle_core::Result<T>,
    what: &str,
    w: &crate::weights::Weights,
) -> Result<T> {
    built.map_err(|e| Error::Model {
        path: w.files[0].clone(),
        message: format!("cannot load the {what} from it: {e}"),
    })
}

/// Loads `slot` if it is empty, timed as a `load` stage before `resume` goes on.
fn load_component<T>(
    slot: &RefCell<Option<T>>,
    progress: &mut dyn Progress,
    resume: &str,
    load: impl FnOnce() -> Result<T>,
) -> Result<()> {
    if slot.borrow().is_none() {
        progress.stage("load");
        let c = load()?;
        *slot.borrow_mut() = Some(c);
        progress.stage(resume);
    }
    Ok(())
}

impl Pipeline {
    /// Opens `files` for `device` in `dtype`. With [`LoadPolicy::Keep`] the three networks are
    /// loaded now; with [`LoadPolicy::PerStage`] each is built once from the checkpoint's names and
    /// shapes only (so a broken checkpoint fails here, before any work) and loaded when its stage
    /// starts. ([`LoadPolicy::Auto`] is resolved by the caller; here it means `Keep`.)
    pub fn load(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        policy: LoadPolicy,
    ) -> Result<Self> {
        let config = ModelConfig::load(files)?;
        let tokenizer = PromptTokenizer::load(&files.tokenizer_dir)?;
        let per_stage = policy == LoadPolicy::PerStage;
        let p = Self {
            config,
            files: files.clone(),
            tokenizer,
            text_encoder: RefCell::new(None),
            unet: RefCell::new(None),
            vae: RefCell::new(None),
            vae_encoder: RefCell::new(None),
            per_stage,
            device: device.clone(),
            dtype,
        };
        if per_stage {
            let check =
                |w: &crate::weights::Weights| crate::weights::shape_checker(w, dtype, device);
            drop(p.build_text_encoder(check(&files.text_encoder_weights)?)?);
            drop(p.build_unet(check(&files.unet_weights)?)?);
            drop(p.build_vae(check(&files.vae_weights)?)?);
        } else {
            *p.text_encoder.borrow_mut() = Some(p.load_text_encoder()?);
            *p.unet.borrow_mut() = Some(p.load_unet()?);
            *p.vae.borrow_mut() = Some(p.load_vae()?);
        }
        Ok(p)
    }

    fn build_text_encoder(&self, vb: VarBuilder) -> Result<TextEncoder> {
        let built = TextEncoder::new(vb, &self.config.text_encoder);
        model_error(built, "text encoder", &self.files.text_encoder_weights)
    }

    fn build_unet(&self, vb: VarBuilder) -> Result<UNet> {
        let built = UNet::new(vb, &self.config.unet);
        model_error(built, "UNet", &self.files.unet_weights)
    }

    fn build_vae(&self, vb: VarBuilder) -> Result<VaeDecoder> {
        let built = VaeDecoder::new(vb, &self.config.vae);
        model_error(built, "VAE", &self.files.vae_weights)
    }

    fn load_vae_encoder(&self) -> Result<VaeEncoder> {
        let built = VaeEncoder::new(self.weights(&self.files.vae_weights)?, &self.config.vae);
        model_error(built, "VAE encoder", &self.files.vae_weights)
    }

    fn weights(&self, w: &crate::weights::Weights) -> Result<VarBuilder<'static>> {
        crate::weights::var_builder(w, self.dtype, &self.device)
    }

    fn load_text_encoder(&self) -> Result<TextEncoder> {
        self.build_text_encoder(self.weights(&self.files.text_encoder_weights)?)
    }

    fn load_unet(&self) -> Result<UNet> {
        self.build_unet(self.weights(&self.files.unet_weights)?)
    }

    fn load_vae(&self) -> Result<VaeDecoder> {
        self.build_vae(self.weights(&self.files.vae_weights)?)
    }

    /// Frees `slot` after its stage when loading per stage, with the convolution scratch and the
    /// allocator's pooled blocks the stage kept (sized by its layers).
    fn release<T>(&self, slot: &RefCell<Option<T>>) {
        if self.per_stage {
            *slot.borrow_mut() = None;
            crate::kernels::winograd::release_scratch();
            crate::alloc::new_stage();
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// Pixels per latent.
    pub fn vae_scale_factor(&self) -> usize {
        self.config.vae.scale_factor()
    }

    /// Applies defaults and checks the request against the model.
    pub fn resolve(&self, req: &Request) -> Result<Resolved> {
        if req.prompts.is_empty() {
            return Err(Error::usage("no prompt given"));
        }
        let sampling = &req.sampling;
        sampling.validate()?;
        let f = self.vae_scale_factor();
        let default_px = self.config.unet.sample_size * f;
        let (default_w, default_h) = match &req.init {
            None => (default_px, default_px),
            Some(init) => {
                if req.noise.latents.is_some() {
                    return Err(Error::usage(
                        "--latents cannot be combined with --init-image: the init image gives \
                         the starting latents",
                    ));
                }
                init.image.default_size(f).ok_or_else(|| {
                    Error::usage(format!(
                        "the init image is {}x{} pixels, smaller than the VAE's {f}-pixel \
                         blocks; give --width and --height to resize it",
                        init.image.width, init.image.height
                    ))
                })?
            }
        };
        let height = sampling.height.unwrap_or(default_h);
        let width = sampling.width.unwrap_or(default_w);
        for (name, v) in [("height", height), ("width", width)] {
            if v == 0 || v % f != 0 {
                return Err(Error::usage(format!(
                    "--{name} {v} must be a positive multiple of {f} (the VAE's scale factor)"
                )));
            }
        }
        let scheduler = match sampling.scheduler.or(self.config.default_scheduler) {
            Some(s) => s,
            None => {
                return Err(Error::config(
                    &self.files.scheduler_config,
                    "_class_name",
                    format!(
                        "this scheduler is not supported; pick one with --scheduler ({})",
                        schedulers::SchedulerKind::names()
                    ),
                ))
            }
        };
        let te = &self.config.text_encoder;
        let limit =
            crate::models::text_encoder::max_tokens(te.max_position_embeddings, te.pad_token_id);
        let max_length = match sampling.max_length {
            Some(m) => m,
            None => DEFAULT_MAX_LENGTH.min(
                self.tokenizer
                    .model_max_length()
                    .unwrap_or(DEFAULT_MAX_LENGTH),
            ),
        };
        if max_length < 2 || max_length > limit {
            return Err(Error::usage(format!(
                "--max-length {max_length} is out of range: the text encoder takes 2 to {limit} tokens"
            )));
        }
        // The scheduler is built here once to check it (options that do not apply to it, a
        // config it cannot take, a step count its schedule cannot give) before any work: it is
        // cheap, and `generate` builds the one it steps with.
        let built = schedulers::build(
            scheduler,
            &self.config.scheduler,
            &self.files.scheduler_config,
            sampling.steps,
            &sampling.schedule,
        )?;
        let resized = match &req.init {
            None => None,
            Some(init) => {
                schedulers::img2img_start(sampling.steps, init.strength, built.order())?;
                let from = |p: &Picture| {
                    ((p.width, p.height) != (width, height)).then_some((p.width, p.height))
                };
                Some(Resized {
                    image: from(&init.image),
                    mask: init.mask.as_ref().and_then(from),
                })
            }
        };
        Ok(Resolved {
            scheduler,
            height,
            width,
            max_length,
            resized,
        })
    }

    /// Encodes `texts`, returning ids [P, L] (u32) and embeddings [P, L, D].
    fn encode(
        &self,
        texts: &[&str],
        max_length: usize,
    ) -> Result<(Tensor, Tensor, Vec<Option<String>>)> {
        let tokens = texts
            .iter()
            .map(|t| self.tokenizer.encode(t, max_length))
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<Vec<u32>> = tokens.iter().map(|t| t.ids.clone()).collect();
        let masks: Vec<Vec<u32>> = tokens.iter().map(|t| t.mask.clone()).collect();
        let what = || "encoding the prompts".to_string();
        let ids = crate::models::text_encoder::ids_tensor(&ids, &self.device).context(what)?;
        let masks = crate::models::text_encoder::ids_tensor(&masks, &self.device).context(what)?;
        let embeds = match self.text_encoder.borrow().as_ref() {
            Some(te) => te.forward(&ids, &masks).context(what)?,
            None => return Err(Error::Numerics("the text encoder is not loaded".into())),
        };
        Ok((ids, embeds, tokens.into_iter().map(|t| t.dropped).collect()))
    }

    /// Text features for the UNet: `context` ([uncond; cond] with guidance, else cond), each
    /// [B, L, D] with a prompt's images adjacent, as diffusers' `encode_prompt` builds them.
    fn text_features(
        &self,
        req: &Request,
        r: &Resolved,
        tensors: &mut Vec<(String, Tensor)>,
    ) -> Result<(Tensor, Vec<(usize, String)>)> {
        let n = req.sampling.num_images;
        let what = || "preparing the text features".to_string();
        // diffusers: embeds.repeat(1, n, 1).view(P * n, L, D).
        let per_image = |t: Tensor| -> Result<Tensor> {
            let (p, l, d) = t.dims3().context(what)?;
            t.unsqueeze(1)
                .and_then(|t| t.broadcast_as((p, n, l, d)))
                .and_then(|t| t.reshape((p * n, l, d)))
                .context(what)
        };
        let (ids, cond, uncond, truncated) = if req.sampling.prompt_syntax == PromptSyntax::Webui {
            let (cond, uncond) = self.webui_features(req)?;
            (
                None,
                per_image(cond)?,
                uncond.map(per_image).transpose()?,
                Vec::new(),
            )
        } else {
            // The prompts and the negative prompt in one batch through the encoder (one pass
            // over its weights, wider matmuls); every row is computed on its own, so batching
            // changes nothing in the numbers. diffusers encodes `[negative_prompt] * P`:
            // identical rows, so one is encoded and repeated.
            let mut texts: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
            let p = texts.len();
            let guided = req.sampling.guidance > 1.0;
            if guided {
                texts.push(req.sampling.negative_prompt.as_deref().unwrap_or(""));
            }
            let (ids, embeds, dropped) = self.encode(&texts, r.max_length)?;
            let truncated = dropped
                .into_iter()
                .take(p)
                .enumerate()
                .filter_map(|(i, d)| d.map(|d| (i, d)))
                .collect();
            let ids = ids.narrow(0, 0, p).context(what)?;
            let cond = per_image(embeds.narrow(0, 0, p).context(what)?)?;
            let uncond = if guided {
                let neg = embeds.narrow(0, p, 1).context(what)?;
                let (_, l, d) = neg.dims3().context(what)?;
                let negs = neg.broadcast_as((p, l, d)).and_then(|t| t.contiguous());
                Some(per_image(negs.context(what)?)?)
            } else {
                None
            };
            (Some(ids), cond, uncond, truncated)
        };
        if req.keep_tensors {
            if let Some(ids) = ids {
                tensors.push(("input_ids".into(), ids.to_dtype(DType::I64).context(what)?));
            }
            tensors.push(("prompt_embeds".into(), cond.clone()));
            if let Some(u) = &uncond {
                tensors.push(("negative_prompt_embeds".into(), u.clone()));
            }
        }
        let context = match &uncond {
            Some(u) => Tensor::cat(&[u, &cond], 0).context(what)?,
            None => cond,
        };
        Ok((context, truncated))
    }

    /// webui's conditioning ([`crate::text::webui`]): the prompts' embeddings [P, 77 x K, D] (a
    /// prompt with fewer chunks than the longest padded with its last vector, as webui's
    /// `stack_conds` does) and, with guidance, the negative prompt's repeated for each prompt; the
    /// shorter of the two padded with the empty prompt's chunk (webui's "pad prompt/negative
    /// prompt to be same length"). All chunks go through the encoder in one batch.
    fn webui_features(&self, req: &Request) -> Result<(Tensor, Option<Tensor>)> {
        use crate::text::webui;
        let what = || "encoding the prompts (webui syntax)".to_string();
        let tok = &self.tokenizer;
        let special = webui::SpecialIds {
            bos: tok.bos_id(),
            eos: tok.eos_id(),
            pad: tok.pad_id(),
            comma: tok.vocab_id(","),
        };
        let guided = req.sampling.guidance > 1.0;
        let mut texts: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
        if guided {
            texts.push(req.sampling.negative_prompt.as_deref().unwrap_or(""));
        }
        let mut chunked = Vec::with_capacity(texts.len() + 1);
        for text in &texts {
            let parsed = webui::parse_checked(text)?;
            chunked.push(webui::chunks(&parsed, |f| tok.ids(f), special)?);
        }
        // With guidance, the empty prompt's chunk, for padding prompt and negative prompt to the
        // same length.
        if guided {
            chunked.push(webui::chunks(
                &[(String::new(), 1.0)],
                |f| tok.ids(f),
                special,
            )?);
        }
        let rows: Vec<&webui::Chunk> = chunked.iter().flatten().collect();
        let ids: Vec<Vec<u32>> = rows.iter().map(|c| c.ids.clone()).collect();
        let masks: Vec<Vec<u32>> = rows.iter().map(|c| c.mask.clone()).collect();
        let ids = crate::models::text_encoder::ids_tensor(&ids, &self.device).context(what)?;
        let masks = crate::models::text_encoder::ids_tensor(&masks, &self.device).context(what)?;
        let z = match self.text_encoder.borrow().as_ref() {
            Some(te) => te.forward(&ids, &masks).context(what)?,
            None => return Err(Error::Numerics("the text encoder is not loaded".into())),
        };
        let z = z.to_dtype(DType::F32).context(what)?;
        // Each text's chunks, emphasised, side by side: [1, 77 x k, D].
        let mut row = 0;
        let mut encoded = Vec::with_capacity(chunked.len());
        for chunks in &chunked {
            let mut parts = Vec::with_capacity(chunks.len());
            for c in chunks {
                let zc = z.narrow(0, row, 1).context(what)?;
                parts.push(webui::emphasis(&zc, &c.multipliers).context(what)?);
                row += 1;
            }
            encoded.push(Tensor::cat(&parts, 1).context(what)?);
        }
        let empty = if guided { encoded.pop() } else { None };
        let tokens = |t: &Tensor| t.dim(1).context(what);
        // `t` ([n, L, D]) followed by copies of `filler` ([1, F, D]) up to `to` tokens.
        let pad_with = |t: &Tensor, filler: &Tensor, to: usize| -> Result<Tensor> {
            let (n, have, d) = t.dims3().context(what)?;
            if have >= to {
                return Ok(t.clone());
            }
            let f = tokens(filler)?;
            let filler = filler.broadcast_as((n, f, d)).context(what)?;
            let mut parts = vec![t.clone()];
            parts.extend(std::iter::repeat_n(filler, (to - have) / f));
            Tensor::cat(&parts, 1).context(what)
        };
        let p = req.prompts.len();
        let mut longest = 0;
        for e in &encoded[..p] {
            longest = longest.max(tokens(e)?);
        }
        let mut conds = Vec::with_capacity(p);
        for e in &encoded[..p] {
            // stack_conds: the last vector repeated.
            let l = tokens(e)?;
            let last = e.narrow(1, l - 1, 1).context(what)?;
            conds.push(pad_with(e, &last, longest)?);
        }
        let mut cond = Tensor::cat(&conds, 0).context(what)?;
        let uncond = match (encoded.get(p), &empty) {
            (Some(u), Some(empty)) => {
                let target = tokens(u)?.max(longest);
                cond = pad_with(&cond, empty, target)?;
                let u = pad_with(u, empty, target)?;
                let (_, l, d) = u.dims3().context(what)?;
                let u = u.broadcast_as((p, l, d)).and_then(|t| t.contiguous());
                Some(u.and_then(|t| t.to_dtype(self.dtype)).context(what)?)
            }
            _ => None,
        };
        let cond = cond.to_dtype(self.dtype).context(what)?;
        Ok((cond, uncond))
    }

    /// The initial noise [B, C, h, w] in f32 on the device, drawn from `generators` unless given.
    fn initial_noise(
        &self,
        req: &Request,
        r: &Resolved,
        generators: &mut NoiseStreams,
    ) -> Result<Tensor> {
        let f = self.vae_scale_factor();
        let shape = [
            req.prompts.len() * req.sampling.num_images,
            self.config.unet.in_channels,
            r.height / f,
            r.width / f,
        ];
        if generators.images() != shape[0] {
            return Err(Error::Numerics(format!(
                "the noise generators cover {} image(s) but this run makes {}",
                generators.images(),
                shape[0]
            )));
        }
        match &req.noise.latents {
            None => generators.draw_tensor(&shape, &self.device),
            Some(t) if t.dims() != shape => Err(Error::usage(format!(
                "--latents has shape {:?} but this run needs {shape:?} ({} prompt(s) x {} image(s), {} channels, {}x{} latents for {}x{} pixels)",
                t.dims(),
                req.prompts.len(),
                req.sampling.num_images,
                shape[1],
                shape[2],
                shape[3],
                r.height,
                r.width
            ))),
            Some(t) => t
                .to_device(&self.device)
                .and_then(|t| t.to_dtype(DType::F32))
                .context(|| "moving the latents".into()),
        }
    }

    /// One denoising step: the (guided) UNet prediction, then the scheduler update.
    fn denoise_step(
        &self,
        latents: &Tensor,
        t: f64,
        context: &Tensor,
        guidance: Option<f64>,
        scheduler: &mut dyn schedulers::Scheduler,
        generators: &mut NoiseStreams,
    ) -> Result<Tensor> {
        let what = || format!("denoising at timestep {t}");
        let input = match guidance {
            Some(_) => Tensor::cat(&[latents, latents], 0).context(what)?,
            None => latents.clone(),
        };
        let input = scheduler
            .scale_model_input(input, t)?
            .to_dtype(self.dtype)
            .context(what)?;
        let unet = self.unet.borrow();
        let Some(unet) = unet.as_ref() else {
            return Err(Error::Numerics("the UNet is not loaded".into()));
        };
        let out = unet
            .forward(&input, t, context)
            .and_then(|o| o.to_dtype(DType::F32))
            .context(what)?;
        let noise_pred = match guidance {
            // uncond + g * (cond - uncond)
            Some(g) => {
                let b = latents.dim(0).context(what)?;
                let (un, co) = (out.i(0..b).context(what)?, out.i(b..2 * b).context(what)?);
                ((co - &un).and_then(|d| d * g).and_then(|d| d + &un)).context(what)?
            }
            None => out,
        };
        scheduler.step(&noise_pred, t, latents, generators)
    }

    /// Decodes latents one image at a time: `vae.decode(latents / scaling_factor)`, then
    /// `(x / 2 + 0.5).clamp(0, 1)`. Returns the images and, if `keep`, the [B, 3, H, W] tensor.
    fn decode(&self, latents: &Tensor, keep: bool) -> Result<(Vec<RgbImage>, Option<Tensor>)> {
        let b = latents.dim(0).context(|| "decoding".into())?;
        let scale = 1.0 / self.config.vae.scaling_factor;
        let mut images = Vec::with_capacity(b);
        let mut kept = Vec::new();
        let vae = self.vae.borrow();
        let Some(vae) = vae.as_ref() else {
            return Err(Error::Numerics("the VAE is not loaded".into()));
        };
        for i in 0..b {
            let what = || format!("decoding image {}", i + 1);
            let x = latents
                .i(i..i + 1)
                .and_then(|z| z * scale)
                .and_then(|z| z.to_dtype(self.dtype))
                .and_then(|z| vae.decode(&z))
                .and_then(|x| x.to_dtype(DType::F32))
                .and_then(|x| (x / 2.0)? + 0.5)
                .and_then(|x| x.clamp(0f32, 1f32))
                .context(what)?;
            images.push(to_rgb(&x).context(what)?);
            if keep {
                kept.push(x);
            }
        }
        let tensor = if keep {
            Some(Tensor::cat(&kept, 0).context(|| "collecting the images".into())?)
        } else {
            None
        };
        Ok((images, tensor))
    }

    /// The init image [1, 3, H, W] in [-1, 1] and, with a mask, the mask [1, 1, H, W] (1 =
    /// repaint) at the output size, as diffusers' `VaeImageProcessor.preprocess` makes them:
    /// Pillow's Lanczos resize in the picture's own mode, `x / 255` in float32, then `2x - 1` for
    /// the image; grey conversion after the resize and `x >= 0.5` for the mask.
    fn init_tensors(&self, init: &Init, r: &Resolved) -> Result<(Tensor, Option<Tensor>)> {
        let (w, h) = (r.width, r.height);
        let fit = |p: &Picture| {
            if (p.width, p.height) == (w, h) {
                p.clone()
            } else {
                p.resized(w, h)
            }
        };
        let what = || "preparing the init image".to_string();
        let image = fit(&init.image).to_rgb();
        let plane = h * w;
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in image.pixels.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                data[c * plane + i] = 2.0 * (f32::from(v) / 255.0) - 1.0;
            }
        }
        let image = Tensor::from_vec(data, (1, 3, h, w), &self.device).context(what)?;
        let mask = match &init.mask {
            None => None,
            Some(m) => {
                let m = fit(m).to_gray();
                let data: Vec<f32> = m
                    .pixels
                    .iter()
                    .map(|&v| if f32::from(v) / 255.0 < 0.5 { 0.0 } else { 1.0 })
                    .collect();
                let t = Tensor::from_vec(data, (1, 1, h, w), &self.device);
                Some(t.context(|| "preparing the mask".into())?)
            }
        };
        Ok((image, mask))
    }

    /// `scaling_factor * latent_dist.sample(generator)` of the init image for each of `b` images
    /// (`[b, C, h, w]`): one encoding, one sample per generator ([`NoiseStreams::draw_per_generator`]).
    /// Also returns the distribution itself (mean and std, `[1, C, h, w]`, f32, unscaled) for
    /// `--dump-tensors`.
    fn image_latents(
        &self,
        image: &Tensor,
        b: usize,
        generators: &mut NoiseStreams,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let what = || "encoding the init image".to_string();
        let encoder = self.vae_encoder.borrow();
        let Some(encoder) = encoder.as_ref() else {
            return Err(Error::Numerics("the VAE encoder is not loaded".into()));
        };
        let dist = image
            .to_dtype(self.dtype)
            .and_then(|x| encoder.encode(&x))
            .context(what)?;
        let (mean, std) = (
            dist.mean.to_dtype(DType::F32).context(what)?,
            dist.std.to_dtype(DType::F32).context(what)?,
        );
        let (_, c, h, w) = mean.dims4().context(what)?;
        let sample = generators.draw_per_generator_tensor(&[b, c, h, w], &self.device)?;
        let latents = std
            .broadcast_mul(&sample)
            .and_then(|x| x.broadcast_add(&mean))
            .and_then(|x| x * self.config.vae.scaling_factor)
            .context(what)?;
        Ok((latents, mean, std))
    }

    /// Runs a request.
    pub fn generate(&self, req: &Request, progress: &mut dyn Progress) -> Result<Generation> {
        let r = self.resolve(req)?;
        let mut tensors = Vec::new();
        let keep = req.keep_tensors;
        let init = req
            .init
            .as_ref()
            .map(|i| self.init_tensors(i, &r).map(|t| (i, t)))
            .transpose()?;

        progress.stage("encode");
        load_component(&self.text_encoder, progress, "encode", || {
            self.load_text_encoder()
        })?;
        let features = self.text_features(req, &r, &mut tensors);
        self.release(&self.text_encoder);
        let (context, truncated) = features?;

        let mut scheduler = schedulers::build(
            r.scheduler,
            &self.config.scheduler,
            &self.files.scheduler_config,
            req.sampling.steps,
            &req.sampling.schedule,
        )?;
        let all_timesteps = scheduler.timesteps().to_vec();
        let what = || "initialising the latents".to_string();
        let mut generators = req.noise.generators.clone();
        // With an init image: where the run starts, the image's latents, the noise they were
        // noised with and (inpainting) the mask over the latents.
        let mut inpaint = None;
        let (start, mut latents) = match &init {
            None => {
                let noise = self.initial_noise(req, &r, &mut generators)?;
                (0, (noise * scheduler.init_noise_sigma()).context(what)?)
            }
            Some((init, (image, mask))) => {
                let start = schedulers::img2img_start(
                    req.sampling.steps,
                    init.strength,
                    scheduler.order(),
                )?;
                progress.stage("encode_image");
                load_component(&self.vae_encoder, progress, "encode_image", || {
                    self.load_vae_encoder()
                })?;
                let b = req.prompts.len() * req.sampling.num_images;
                let image_latents = self.image_latents(image, b, &mut generators);
                self.release(&self.vae_encoder);
                let (image_latents, mean, std) = image_latents?;
                let noise = generators.draw_tensor(image_latents.dims(), &self.device)?;
                if keep {
                    tensors.push(("init_image".into(), image.clone()));
                    tensors.push(("image_latent_mean".into(), mean));
                    tensors.push(("image_latent_std".into(), std));
                    tensors.push(("image_latents".into(), image_latents.clone()));
                }
                let latents = match mask {
                    // AltDiffusionImg2ImgPipeline: add_noise at the first timestep left; the
                    // scheduler finds its place by `index_for_timestep`.
                    None => {
                        let at =
                            schedulers::index_for_timestep(&all_timesteps, all_timesteps[start])
                                .unwrap_or(start);
                        scheduler.begin_at(at);
                        scheduler.add_noise(&image_latents, &noise, at)?
                    }
                    // StableDiffusionInpaintPipeline: `set_begin_index(start)`; strength 1 starts
                    // from pure noise; the masked image is encoded too (its latents feed only a
                    // 9-channel UNet, but its sample is drawn from the generator: drawn here).
                    Some(mask) => {
                        scheduler.begin_at(start);
                        let latents = if init.strength >= 1.0 {
                            (&noise * scheduler.init_noise_sigma()).context(what)?
                        } else {
                            scheduler.add_noise(&image_latents, &noise, start)?
                        };
                        generators.draw_per_generator(image_latents.elem_count() / b.max(1));
                        let (_, _, h, w) = image_latents.dims4().context(what)?;
                        // F.interpolate(mask, size=(h, w)), nearest: every f-th pixel.
                        let f = self.vae_scale_factor();
                        let m = mask
                            .reshape((r.height / f, f, r.width / f, f))
                            .and_then(|m| m.narrow(1, 0, 1))
                            .and_then(|m| m.narrow(3, 0, 1))
                            .and_then(|m| m.reshape((1, 1, h, w)))
                            .and_then(|m| m.broadcast_as(image_latents.shape()))
                            .and_then(|m| m.ne(0f32))
                            .context(what)?;
                        inpaint = Some((m, image_latents, noise));
                        latents
                    }
                };
                (start, latents)
            }
        };
        let timesteps = all_timesteps[start..].to_vec();
        if keep {
            let n = timesteps.len();
            tensors.push((
                "timesteps".into(),
                Tensor::from_vec(timesteps.clone(), n, &Device::Cpu).context(what)?,
            ));
            tensors.push(("latents_init".into(), latents.clone()));
        }

        progress.stage("denoise");
        load_component(&self.unet, progress, "denoise", || self.load_unet())?;
        let guidance = (req.sampling.guidance > 1.0).then_some(req.sampling.guidance);
        let denoised = (|| {
            let n = timesteps.len();
            for (i, &t) in timesteps.iter().enumerate() {
                check_cancelled(progress)?;
                latents = self.denoise_step(
                    &latents,
                    t,
                    &context,
                    guidance,
                    scheduler.as_mut(),
                    &mut generators,
                )?;
                // Inpainting: the kept region back from the init image, noised to the next
                // timestep's level (clean after the last step).
                if let Some((mask, image_latents, noise)) = &inpaint {
                    let known = if i + 1 < n {
                        scheduler.add_noise(image_latents, noise, start + i + 1)?
                    } else {
                        image_latents.clone()
                    };
                    latents = mask
                        .where_cond(&latents, &known)
                        .context(|| format!("blending the kept region after step {}", i + 1))?;
                }
                check_finite(&latents, i + 1, n)?;
                progress.step(i + 1, n);
            }
            Ok::<(), Error>(())
        })();
        self.release(&self.unet);
        denoised?;
        if keep {
            tensors.push(("latents_final".into(), latents.clone()));
        }

        check_cancelled(progress)?;
        progress.stage("decode");
        load_component(&self.vae, progress, "decode", || self.load_vae())?;
        let decoded = self.decode(&latents, keep);
        self.release(&self.vae);
        let (images, image) = decoded?;
        if let Some(image) = image {
            tensors.push(("image".into(), image));
        }
        Ok(Generation {
            images,
            truncated,
            resolved: r,
            tensors,
        })
    }
}

/// Fails with the step number when the latents hold NaN or infinity.
fn check_finite(latents: &Tensor, step: usize, total: usize) -> Result<()> {
    let sum = latents
        .abs()
        .and_then(|a| a.sum_all())
        .and_then(|s| s.to_dtype(DType::F32))
        .and_then(|s| s.to_scalar::<f32>())
        .context(|| format!("checking the latents after step {step}"))?;
    if sum.is_finite() {
        Ok(())
    } else {
        Err(Error::Numerics(format!(
            "the latents hold NaN or infinite values after denoising step {step} of {total}; \
             no image was written (try --dtype f32, fewer steps or a lower guidance)"
        )))
    }
}

/// [1, 3, H, W] in [0, 1] -> 8-bit RGB with numpy's `round(x * 255)` (ties to even), as diffusers'
/// `numpy_to_pil` does.
fn to_rgb(x: &Tensor) -> candle_core::Result<RgbImage> {
    let (_, _, h, w) = x.dims4()?;
    let pixels = x
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
        .collect();
    Ok(RgbImage {
        width: w,
        height: h,
        pixels,
    })
}
