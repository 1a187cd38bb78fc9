//! Where a batch's noise comes from: one or more seeded PyTorch CPU generators, laid out over the
//! batch as diffusers lays them out.
//!
//! diffusers draws every random tensor of a run (the initial latents, then the step noise of
//! ancestral and eta > 0 samplers, in that order) from the `generator` the pipeline was given:
//! - one generator: one `torch.randn((B, C, h, w))` over the whole batch per draw;
//! - a list of generators (one per image): `torch.randn((1, C, h, w), generator=g[i])` per image.
//!
//! A [`NoiseStreams`] is a list of [`Segment`]s, each a generator whose draws cover `draw` images
//! of which the batch keeps `keep`. That one shape covers every layout altdiff uses: a shared seed
//! (one segment over all images), batch-file jobs (one segment per job), `--per-image-seeds` (one
//! segment per image) and `--from-image` (the image's slice of the batch it came from: each draw is
//! made for the whole original batch and only this image's share is kept, so ancestral samplers
//! regenerate it exactly too).

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result, TensorContext};
use crate::rng::TorchGenerator;
use crate::schedulers::StepNoise;

/// One generator's share of a batch.
#[derive(Clone)]
pub struct Segment {
    generator: TorchGenerator,
    /// Images each draw covers (the original call's batch).
    draw: usize,
    /// The images of each draw that this batch uses.
    keep: Range<usize>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("draw", &self.draw)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl Segment {
    /// A generator seeded with `seed` whose draws cover `images` images, all kept.
    pub fn whole(seed: u64, images: usize) -> Self {
        Self {
            generator: TorchGenerator::new(seed),
            draw: images,
            keep: 0..images,
        }
    }

    /// Image `index` of the draws of a generator seeded with `seed` over `batch` images.
    pub fn slice(seed: u64, batch: usize, index: usize) -> Result<Self> {
        if index >= batch || batch == 0 {
            return Err(Error::usage(format!(
                "image {index} of a batch of {batch} is not a valid noise slice"
            )));
        }
        Ok(Self {
            generator: TorchGenerator::new(seed),
            draw: batch,
            keep: index..index + 1,
        })
    }
}

/// The generators of one batch, in batch order.
#[derive(Debug, Clone)]
pub struct NoiseStreams {
    segments: Vec<Segment>,
}

impl NoiseStreams {
    /// Streams from segments, in batch order.
    pub fn new(segments: Vec<Segment>) -> Self {
        Self { segments }
    }

    /// One generator for the whole batch (diffusers' `generator=torch.Generator().manual_seed(seed)`).
    pub fn shared(seed: u64, images: usize) -> Self {
        Self::new(vec![Segment::whole(seed, images)])
    }

    /// One generator per image, seeded `seeds` (diffusers' list of generators).
    pub fn per_image(seeds: impl IntoIterator<Item = u64>) -> Self {
        Self::new(seeds.into_iter().map(|s| Segment::whole(s, 1)).collect())
    }

    /// The images the streams cover.
    pub fn images(&self) -> usize {
        self.segments.iter().map(|s| s.keep.len()).sum()
    }

    /// The next draw: standard normals for every image of the batch, `per_image` values each, in
    /// batch order (each segment draws `torch.randn` over its `draw` images and keeps its share).
    pub fn draw(&mut self, per_image: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.images() * per_image);
        for s in &mut self.segments {
            let all = s.generator.randn(s.draw * per_image);
            out.extend_from_slice(&all[s.keep.start * per_image..s.keep.end * per_image]);
        }
        out
    }

    /// One draw of `per_image` values per generator, repeated over the images that generator
    /// covers, in batch order: what diffusers draws when it encodes the one init image of a call
    /// (`retrieve_latents(vae.encode(image), generator)` samples `randn((1, C, h, w))`, then the
    /// latents are repeated over the batch). A `--from-image` slice draws it as the whole call did;
    /// with one generator per image (`--per-image-seeds`) each generator draws its own, so that
    /// every image is the one a single-image run with its seed makes (diffusers' list-of-generators
    /// path encodes the init image with the first generator only).
    pub fn draw_per_generator(&mut self, per_image: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.images() * per_image);
        for s in &mut self.segments {
            let one = s.generator.randn(per_image);
            for _ in s.keep.clone() {
                out.extend_from_slice(&one);
            }
        }
        out
    }

    /// The next draw as a tensor of `shape` (`[B, ...]` with B the images covered) on `device`.
    pub fn draw_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.tensor_of(shape, device, Self::draw)
    }

    /// [`draw_per_generator`](Self::draw_per_generator) as a tensor of `shape` (`[B, ...]`).
    pub fn draw_per_generator_tensor(
        &mut self,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        self.tensor_of(shape, device, Self::draw_per_generator)
    }

    fn tensor_of(
        &mut self,
        shape: &[usize],
        device: &Device,
        draw: fn(&mut Self, usize) -> Vec<f32>,
    ) -> Result<Tensor> {
        let images = self.images();
        if shape.first() != Some(&images) {
            return Err(Error::Numerics(format!(
                "noise of shape {shape:?} asked from generators covering {images} image(s)"
            )));
        }
        let per_image = shape[1..].iter().product();
        let data = draw(self, per_image);
        Tensor::from_vec(data, shape, &Device::Cpu)
            .and_then(|t| t.to_device(device))
            .context(|| "drawing noise".into())
    }
}

impl StepNoise for NoiseStreams {
    /// diffusers' `randn_tensor(like.shape, generator=...)`: drawn in f32 on the CPU, then moved to
    /// `like`'s device and dtype.
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        self.draw_tensor(like.dims(), like.device())?
            .to_dtype(like.dtype())
            .context(|| "drawing step noise".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_stream_continues_one_generator() {
        let mut s = NoiseStreams::shared(42, 2);
        let first = s.draw(20);
        let second = s.draw(20);
        let mut g = TorchGenerator::new(42);
        assert_eq!(first, g.randn(40));
        assert_eq!(second, g.randn(40));
    }

    #[test]
    fn per_image_streams_are_independent_generators() {
        let mut s = NoiseStreams::per_image([7, 8]);
        let d = s.draw(18);
        assert_eq!(&d[..18], TorchGenerator::new(7).randn(18).as_slice());
        assert_eq!(&d[18..], TorchGenerator::new(8).randn(18).as_slice());
        // The second draw continues each generator.
        let d2 = s.draw(18);
        let mut g = TorchGenerator::new(8);
        g.randn(18);
        assert_eq!(&d2[18..], g.randn(18).as_slice());
    }

    #[test]
    fn slice_keeps_its_share_of_every_draw() -> Result<()> {
        let mut whole = NoiseStreams::shared(3, 3);
        let mut one = NoiseStreams::new(vec![Segment::slice(3, 3, 1)?]);
        for _ in 0..3 {
            let all = whole.draw(17);
            assert_eq!(one.draw(17), all[17..34].to_vec());
        }
        assert!(Segment::slice(3, 3, 3).is_err());
        Ok(())
    }

    #[test]
    fn per_generator_draws_once_per_generator() -> Result<()> {
        let mut shared = NoiseStreams::shared(5, 3);
        let d = shared.draw_per_generator(20);
        let mut g = TorchGenerator::new(5);
        let one = g.randn(20);
        assert_eq!(d, [one.clone(), one.clone(), one].concat());
        // The next ordinary draw continues after the single one.
        assert_eq!(shared.draw(20), g.randn(60));
        let mut slice = NoiseStreams::new(vec![Segment::slice(5, 3, 2)?]);
        let d = slice.draw_per_generator(20);
        assert_eq!(d, TorchGenerator::new(5).randn(20));
        let mut each = NoiseStreams::per_image([1, 2]);
        let d = each.draw_per_generator(17);
        let (a, b) = (
            TorchGenerator::new(1).randn(17),
            TorchGenerator::new(2).randn(17),
        );
        assert_eq!(d, [a, b].concat());
        Ok(())
    }

    #[test]
    fn tensor_shape_must_cover_the_images() -> Result<()> {
        let mut s = NoiseStreams::shared(1, 2);
        assert!(s.draw_tensor(&[3, 4, 2, 2], &Device::Cpu).is_err());
        let t = s.draw_tensor(&[2, 4, 2, 2], &Device::Cpu)?;
        assert_eq!(t.dims(), &[2, 4, 2, 2]);
        Ok(())
    }
}
