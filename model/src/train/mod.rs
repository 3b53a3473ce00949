//! The training graph: the llama forward that keeps what the backward pass needs, and a
//! hand-written backward pass.
//!
//! Why not candle's autograd: `candle_nn`'s RMSNorm, softmax and rotary ops have no
//! backward (a model built on them silently trains nothing), and autograd computes the
//! gradient of every frozen base weight only to throw it away, and keeps one gradient per
//! intermediate tensor. Written out by hand, the backward computes exactly what training
//! needs: input gradients through the frozen base matmuls, weight gradients only where a
//! parameter is trainable, and the cross-entropy over the vocabulary only on the positions
//! that are scored, a chunk of rows at a time (the `[tokens, vocab]` logits are never
//! materialised whole). Gradient checkpointing then is simple: keep each layer's input,
//! recompute the layer in the backward pass (all but the top layer, whose backward comes
//! right after its forward). On the f32 host path a layer also keeps the residual between
//! its attention and its MLP, so each residual sub-block is recomputed from its own input
//! and the o and down products, whose outputs only feed that kept residual stream, are
//! not run again.
//!
//! Everything runs on candle tensors, so the same code runs on CUDA; the dtype is a
//! parameter (f32 on the CPU; on CUDA the trainer runs the base in bf16 with f32 LoRA
//! weights, the LoRA branch in f32 and norms and softmax through f32, as PEFT on a bf16
//! model does). Gradients are checked against a PyTorch autograd reference
//! and against finite differences in the tests.
//!
//! The base weights are dense here (quantized GGUF weights are dequantized once) and in
//! Hugging Face row order: llama GGUF files store q/k rows permuted for interleaved rope,
//! which is undone on load, so adapters trained here are PEFT adapters as they are.

mod batch;
mod ctx;
mod dense;
mod dropout;
mod fused;
mod graph;
mod host;
mod lora_params;
mod ops;
mod pass;
pub mod profile;

pub use batch::{BaseTrain, Grads, PassOptions, PassStats, Pause, Row, SoftTarget, TrainBatch};
pub use dense::{DenseBlock, DenseLinear, DenseLlama, base_name, unpermute_interleaved_rope};
pub use lora_params::{LoraAb, LoraParams};
