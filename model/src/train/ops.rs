//! The training graph's tensor operations that candle lacks or does slowly: matmuls
//! under the profiler, RMSNorm, softmax and SiLU with their backward parts, the linear
//! layer with its unmerged LoRA branch.

use super::dense::DenseLinear;
use super::dropout::dropout_mask;
use super::lora_params::LoraAb;
use super::profile;
use candle_core::Result;
use candle_core::{D, DType, Tensor};

pub(super) fn mm(tag: &'static str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    profile::time(tag, || a.matmul(b))
}

/// Whether `dt` is a 16-bit float: such tensors go through f32 for reductions (norms,
/// softmax), as PyTorch's llama does (`LlamaRMSNorm` and eager attention upcast to f32).
pub(super) fn is_half(dt: DType) -> bool {
    matches!(dt, DType::BF16 | DType::F16)
}

/// `f` on f32 copies of 16-bit inputs, its result cast back to `x`'s dtype; `f` as is
/// for other dtypes.
pub(super) fn via_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if is_half(x.dtype()) {
        f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
    } else {
        f(x)
    }
}

pub(super) fn rms_norm(x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    if is_half(x.dtype()) {
        let y = candle_nn::ops::rms_norm(
            &x.to_dtype(DType::F32)?,
            &g.to_dtype(DType::F32)?,
            eps as f32,
        )?;
        return y.to_dtype(x.dtype());
    }
    if x.dtype() == DType::F64 {
        // The fused kernel has no f64 path; f64 is for the gradient checks.
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(g)
    } else {
        candle_nn::ops::rms_norm(x, g, eps as f32)
    }
}

pub(super) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        via_f32(x, candle_nn::ops::softmax_last_dim)
    }
}

/// RMSNorm backward: `y = x r g`, `r = 1/sqrt(mean(x^2) + eps)`;
/// `dx = r (dxhat - xhat mean(dxhat xhat))` with `dxhat = dy g`, `dg = sum(dy xhat)`.
pub(super) fn rms_norm_bwd(
    x: &Tensor,
    g: &Tensor,
    dy: &Tensor,
    eps: f64,
    want_dg: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    if is_half(x.dtype()) {
        // In f32 (the mean over the hidden size loses too much in 16 bits).
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (dx, dg) = rms_norm_bwd(&f(x)?, &f(g)?, &f(dy)?, eps, want_dg)?;
        return Ok((
            dx.to_dtype(x.dtype())?,
            dg.map(|d| d.to_dtype(x.dtype())).transpose()?,
        ));
    }
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = x.broadcast_mul(&r)?;
    let dxhat = dy.broadcast_mul(g)?;
    let c = (&dxhat * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (dxhat - xhat.broadcast_mul(&c)?)?.broadcast_mul(&r)?;
    let dg = if want_dg {
        Some((dy * &xhat)?.sum(0)?)
    } else {
        None
    };
    Ok((dx, dg))
}

pub(super) fn silu_parts(g: &Tensor) -> Result<(Tensor, Tensor)> {
    let sig = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &sig)?;
    Ok((sig, silu))
}

/// `x` `[n, in]`: `x W^T + b + scale * (x_d A^T) B^T`, and what the backward needs.
///
/// The LoRA branch runs in the LoRA weights' dtype: with a bf16 base and f32 LoRA
/// weights (the trainer's mixed precision), `x` is cast to f32 before the dropout and the
/// two small matmuls, and the branch's output back to bf16 before it is added, as PEFT
/// does for f32 adapter weights on a bf16 model (`_cast_input_dtype`, then
/// `result.to(torch_result_dtype)`).
pub(super) fn linear_fwd(
    l: &DenseLinear,
    x: &Tensor,
    lora: Option<&LoraAb>,
    scale: f64,
    dropout: Option<(f64, u64)>,
    keep: bool,
) -> Result<(Tensor, Option<LoraSaved>)> {
    let mut y = mm("fwd x W^T", x, &l.w.t()?)?;
    if let Some(b) = &l.b {
        y = y.broadcast_add(b)?;
    }
    let Some(ab) = lora else {
        return Ok((y, None));
    };
    let xl = x.to_dtype(ab.a.dtype())?;
    let (xd, mask) = match dropout {
        Some((p, seed)) if p > 0.0 => {
            let mask = dropout_mask(&xl, p, seed)?;
            ((&xl * &mask)?, Some(mask))
        }
        _ => (xl, None),
    };
    let u = mm("fwd lora", &xd, &ab.a.t()?)?;
    let delta = (mm("fwd lora", &u, &ab.b.t()?)? * scale)?.to_dtype(y.dtype())?;
    let y = (y + delta)?;
    Ok((y, keep.then_some(LoraSaved { xd, u, mask })))
}

/// What a LoRA projection keeps for its backward.
pub(super) struct LoraSaved {
    /// The input after dropout.
    pub(super) xd: Tensor,
    /// `u = xd A^T`, `[n, r]`.
    pub(super) u: Tensor,
    /// The dropout mask (already divided by `1 - p`), when dropout is on.
    pub(super) mask: Option<Tensor>,
}
