//! The networks. Model code knows nothing of files, hubs or terminals: it takes a `VarBuilder`,
//! a config struct and tensors.

pub mod attention;
pub mod resnet;
pub mod text_encoder;
pub mod unet;
pub mod vae;

pub use text_encoder::TextEncoder;
pub use unet::UNet;
pub use vae::{LatentDist, VaeDecoder, VaeEncoder};
