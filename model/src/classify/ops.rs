//! The building blocks of the encoder and the ResNet written with ops that candle can
//! differentiate. candle-nn's fused `layer_norm`, `softmax_last_dim` and `rms_norm` have no
//! backward pass: a model built on them trains nothing below them and says nothing. These
//! are composed of means, exps and broadcasts, each with a backward, and are checked against
//! PyTorch in `model/tests/classify.rs`.

use candle_core::{D, DType, Result, Tensor};

/// Layer norm over the last dimension (`torch.nn.LayerNorm`, biased variance).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    if !weight.track_op() && !bias.track_op() {
        return normed.broadcast_mul(weight)?.broadcast_add(bias);
    }
    let n = weight.elem_count();
    let rows = x.elem_count() / n.max(1);
    let normed = normed.reshape((rows, n))?;
    (normed.mul(&repeat_rows(weight, rows)?)? + repeat_rows(bias, rows)?)?.reshape(x.shape())
}

/// `v` repeated as the `rows` rows of a `[rows, len(v)]` matrix, as the product of a column
/// of ones with `v`, so that its backward is a matrix product too. A broadcast's backward
/// sums the gradient over the leading dimensions with candle's strided reduction (a divide
/// and a modulo per element): a tenth of a MiniLM training step in `perf`, for the biases
/// and layer-norm weights alone.
pub fn repeat_rows(v: &Tensor, rows: usize) -> Result<Tensor> {
    let ones = Tensor::ones((rows, 1), v.dtype(), v.device())?;
    ones.matmul(&v.reshape((1, v.elem_count()))?)
}

/// Softmax over the last dimension. The max subtracted for stability is a constant (the
/// softmax does not depend on it), so it is detached.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mean cross-entropy of `logits` `[n, classes]` against class indices `labels` `[n]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_z)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}

thread_local! {
    /// The dropout masks' generator: seeded by the training run (`seed_dropout`), so a run
    /// with the same seed draws the same masks.
    static DROPOUT_RNG: std::cell::RefCell<rand::rngs::StdRng> =
        std::cell::RefCell::new(rand::SeedableRng::seed_from_u64(0));
}

/// Seed this thread's dropout masks.
pub fn seed_dropout(seed: u64) {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = rand::SeedableRng::seed_from_u64(seed));
}

/// The dropout generator's state, to replay the same masks when a segment is recomputed
/// (gradient checkpointing, see `recompute`).
pub fn dropout_state() -> rand::rngs::StdRng {
    DROPOUT_RNG.with(|r| r.borrow().clone())
}

/// Put back a state `dropout_state` returned.
pub fn set_dropout_state(state: rand::rngs::StdRng) {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = state);
}

/// Inverted dropout (`torch.nn.Dropout` in training mode); identity when `p` is 0.
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = DROPOUT_RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..x.elem_count())
            .map(|_| {
                if rand::Rng::random::<f64>(&mut *r) < p {
                    0.0
                } else {
                    scale
                }
            })
            .collect()
    });
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// Batch statistics of a `[n, c, h, w]` tensor per channel: (mean, biased variance), each
/// `[1, c, 1, 1]`.
pub fn channel_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim((0, 2, 3))?;
    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
    Ok((mean, var))
}

/// `torch.nn.BatchNorm2d`'s normalization with the given per-channel mean and variance
/// (`[c]` or `[1, c, 1, 1]`) and affine parameters `[c]`.
pub fn batch_norm(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let shape = (1, c, 1, 1);
    let scale = (var.reshape(shape)? + eps)?.sqrt()?.recip()?;
    let scale = scale.broadcast_mul(&weight.reshape(shape)?)?;
    x.broadcast_sub(&mean.reshape(shape)?)?
        .broadcast_mul(&scale)?
        .broadcast_add(&bias.reshape(shape)?)
}

/// `torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)`, the ResNet stem's pool. candle's
/// max-pool has a backward only when the kernel equals the stride, so this takes the max
/// over the nine shifted, stride-2 views of the padded input; the max's backward sends the
/// gradient to the winning element.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // Padding: one row/column before (the pool's padding) and two after, so that every
    // shifted view can take 2*out rows; the extra ones are never selected.
    let pad = |t: &Tensor, dim: usize, before: usize, after: usize| -> Result<Tensor> {
        let mut shape = t.dims().to_vec();
        shape[dim] = before;
        let lo = Tensor::full(f32::MIN, shape.clone(), t.device())?.to_dtype(t.dtype())?;
        shape[dim] = after;
        let hi = Tensor::full(f32::MIN, shape, t.device())?.to_dtype(t.dtype())?;
        Tensor::cat(&[&lo, t, &hi], dim)
    };
    let padded = pad(&pad(x, 2, 1, 2)?, 3, 1, 2)?;
    let mut views = Vec::with_capacity(9);
    for dy in 0..3 {
        let rows = padded
            .narrow(2, dy, 2 * ho)?
            .reshape((n, c, ho, 2, w + 3))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for dx in 0..3 {
            let v = rows
                .narrow(3, dx, 2 * wo)?
                .reshape((n, c, ho, wo, 2))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            views.push(v);
        }
    }
    Tensor::stack(&views, 0)?.max(0)
}

/// Global average pool: `[n, c, h, w]` to `[n, c]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}

/// `x W^T + b` for `x` of any rank. The leading dimensions are folded into one matrix
/// product: a broadcast product's backward would build a `[batch, in, out]` gradient of
/// `W` per batch row and sum it.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let mut out_dims = dims.clone();
    out_dims[dims.len() - 1] = weight.dim(0)?;
    let y = x.reshape((rows, inner))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) if b.track_op() => (y + repeat_rows(b, rows)?)?,
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape(out_dims)
}

/// Everything these models compute in is f32 (on the CPU and on CUDA alike).
pub const DTYPE: DType = DType::F32;
