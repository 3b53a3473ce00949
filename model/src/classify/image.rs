//! Images to tensors, with the `image` crate: decoding (JPEG, PNG, WebP), resizing the shorter
//! side, a centre crop (evaluation) or a random crop and horizontal flip (training), and
//! ImageNet's normalization, as torchvision's standard transforms do.

use candle_core::{Device, Result, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use rand::Rng;

/// torchvision's ImageNet mean and standard deviation (what pretrained ResNets expect).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an image becomes the network's input.
#[derive(Debug, Clone, Copy)]
pub struct Preprocess {
    /// Side of the square the network sees (224 for ImageNet models).
    pub size: u32,
    /// Random crop and flip (training) or a centre crop (evaluation).
    pub augment: bool,
}

impl Preprocess {
    /// The shorter side is resized to `size * 8 / 7` (256 for 224, as torchvision), then
    /// cropped to `size`.
    fn resize_to(&self) -> u32 {
        (self.size * 8).div_ceil(7)
    }

    /// `[3, size, size]` f32, normalized.
    pub fn apply(&self, img: &DynamicImage, rng: &mut impl Rng) -> RgbImage {
        let img = img.to_rgb8();
        let (w, h) = img.dimensions();
        let short = self.resize_to();
        let (nw, nh) = if w <= h {
            (
                short,
                ((h as u64 * short as u64) / w.max(1) as u64).max(short as u64) as u32,
            )
        } else {
            (
                ((w as u64 * short as u64) / h.max(1) as u64).max(short as u64) as u32,
                short,
            )
        };
        let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
        let (x, y) = if self.augment {
            (
                rng.random_range(0..=nw - self.size),
                rng.random_range(0..=nh - self.size),
            )
        } else {
            ((nw - self.size) / 2, (nh - self.size) / 2)
        };
        let mut crop = image::imageops::crop_imm(&resized, x, y, self.size, self.size).to_image();
        if self.augment && rng.random_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut crop);
        }
        crop
    }
}

/// Decode an image file (format from its content).
pub fn open(path: &std::path::Path) -> std::result::Result<DynamicImage, String> {
    image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("{}: {e}", path.display()))?
        .decode()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Decode an image from bytes.
pub fn decode(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    image::load_from_memory(bytes).map_err(|e| format!("not a readable image: {e}"))
}

/// A batch `[n, 3, size, size]` of prepared images, normalized.
pub fn to_tensor(images: &[RgbImage], dev: &Device) -> Result<Tensor> {
    let n = images.len();
    let Some(first) = images.first() else {
        candle_core::bail!("no images");
    };
    let (w, h) = first.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; n * 3 * plane];
    for (i, img) in images.iter().enumerate() {
        for (j, px) in img.pixels().enumerate() {
            for c in 0..3 {
                data[i * 3 * plane + c * plane + j] = (px[c] as f32 / 255.0 - MEAN[c]) / STD[c];
            }
        }
    }
    Tensor::from_vec(data, (n, 3, h as usize, w as usize), dev)
}
