//! Decoder reward models (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, GPT-NeoX, GPT-2
//! `*ForSequenceClassification`):
//! a causal transformer with grouped-query attention and rotary positions; the `score`
//! head reads the hidden state at each sequence's last real token. Batches are padded on
//! the right, so a causal mask alone keeps real tokens from seeing padding.
//!
//! The families differ in a few switches, gathered in [`Variant`]: q/k/v biases (Qwen2),
//! per-head q/k RMSNorm (Qwen3), sliding-window attention (Mistral on every layer, Gemma2 on
//! even layers), Gemma's scaled embeddings, (1 + w) norms and tanh GELU, and Gemma2's
//! extra norms around attention and MLP, tanh soft-capping of attention scores and
//! `query_pre_attn_scalar`, GPT-NeoX's LayerNorms, fused attention projection (cut at load,
//! src/model/neox.rs), partial rotary embeddings, ungated MLP and parallel residual, and
//! GPT-2's learned positions and Conv1D projections (src/model/gpt2.rs).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Activation, Embedding, VarBuilder};

use super::dense::Dense;

use super::gated;
use super::layers::{
    attention, causal_mask, embedding, layer_norm, linear, split_heads, Norm, Packing, RmsNorm,
    Rotary, RowRotation,
};
use super::packed_attention::{self, KeySpan, Queries, Spec};
use super::score_head::{HeadOutput, HeadSpec, ScoreHead};
use super::segments::Segments;
use super::shared_padding::{Heads, SharedPadding};
use super::step_head::StepSpec;
use super::{gpt2, neox};
use super::{
    load_err, logits_to_rows, parse_config, unshared_work, BatchLayout, Forward, ModelError,
    PaddedBatch, Pooling, RewardModel, Sequence, Work,
};

/// A decoder family under the names checkpoints give it: config.json's `model_type`, its
/// causal-LM class, its sequence-classification class (the name [`load`] takes) and its
/// token-classification class.
pub struct Family {
    pub model_type: &'static str,
    pub causal_lm: &'static str,
    pub classification: &'static str,
    pub token_classification: Option<&'static str>,
}

/// The sequence-classification name ([`load`]'s) of a token-classification class.
pub fn token_classification_family(architecture: &str) -> Option<&'static str> {
    FAMILIES
        .iter()
        .find(|family| family.token_classification == Some(architecture))
        .map(|family| family.classification)
}

pub const FAMILIES: &[Family] = &[
    Family {
        model_type: "llama",
        causal_lm: "LlamaForCausalLM",
        classification: "LlamaForSequenceClassification",
        token_classification: Some("LlamaForTokenClassification"),
    },
    Family {
        model_type: "mistral",
        causal_lm: "MistralForCausalLM",
        classification: "MistralForSequenceClassification",
        token_classification: Some("MistralForTokenClassification"),
    },
    Family {
        model_type: "qwen2",
        causal_lm: "Qwen2ForCausalLM",
        classification: "Qwen2ForSequenceClassification",
        token_classification: Some("Qwen2ForTokenClassification"),
    },
    Family {
        model_type: "qwen3",
        causal_lm: "Qwen3ForCausalLM",
        classification: "Qwen3ForSequenceClassification",
        token_classification: Some("Qwen3ForTokenClassification"),
    },
    Family {
        model_type: "gemma",
        causal_lm: "GemmaForCausalLM",
        classification: "GemmaForSequenceClassification",
        token_classification: Some("GemmaForTokenClassification"),
    },
    Family {
        model_type: "gemma2",
        causal_lm: "Gemma2ForCausalLM",
        classification: "Gemma2ForSequenceClassification",
        token_classification: Some("Gemma2ForTokenClassification"),
    },
    Family {
        model_type: "gpt2",
        causal_lm: "GPT2LMHeadModel",
        classification: "GPT2ForSequenceClassification",
        // Its head is `classifier`, not `score`: not served (no fixture checks it).
        token_classification: None,
    },
    Family {
        model_type: "gpt_neox",
        causal_lm: "GPTNeoXForCausalLM",
        classification: "GPTNeoXForSequenceClassification",
        // Its head is `classifier`, not `score`: not served (no fixture checks it).
        token_classification: None,
    },
];

/// config.json, under Llama's names; GPT-2's own names (`n_embd`, `n_layer`, ...) are
/// read as aliases.
#[derive(serde::Deserialize)]
struct Config {
    vocab_size: usize,
    #[serde(alias = "n_embd")]
    hidden_size: usize,
    /// GPT-2's `n_inner` may be null: four times the hidden size.
    #[serde(default, alias = "n_inner")]
    intermediate_size: Option<usize>,
    #[serde(alias = "n_layer")]
    num_hidden_layers: usize,
    #[serde(alias = "n_head")]
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(alias = "n_positions")]
    max_position_embeddings: usize,
    #[serde(default, alias = "activation_function")]
    hidden_act: Option<Activation>,
    #[serde(default)]
    hidden_activation: Option<Activation>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pad_token_id: Option<u32>,
    /// GPT-NeoX: the share of each head's channels that rotary embeddings turn
    /// (`partial_rotary_factor` in newer transformers).
    #[serde(default, alias = "partial_rotary_factor")]
    rotary_pct: Option<f64>,
    /// GPT-NeoX's name for the rotary base (`rope_theta` in newer configs).
    #[serde(default)]
    rotary_emb_base: Option<f64>,
    #[serde(default, alias = "layer_norm_epsilon")]
    layer_norm_eps: Option<f64>,
    #[serde(default)]
    use_parallel_residual: Option<bool>,
    /// GPT-2: scores divided by sqrt(head_dim) unless false.
    #[serde(default)]
    scale_attn_weights: Option<bool>,
    /// GPT-2's per-layer 1 / (layer + 1) on the scores: not served.
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: Option<bool>,
}

impl Config {
    fn intermediate_size(&self, v: Variant) -> std::result::Result<usize, ModelError> {
        match (self.intermediate_size, v.gpt2) {
            (Some(size), _) => Ok(size),
            (None, true) => Ok(4 * self.hidden_size),
            (None, false) => Err(ModelError::Config(
                "missing field `intermediate_size`".into(),
            )),
        }
    }
}

/// GPTNeoXConfig's `layer_norm_eps` and GPT2Config's `layer_norm_epsilon`.
const DEFAULT_LAYER_NORM_EPS: f64 = 1e-5;

/// Where a family keeps its tensors: Llama's names, or GPT-NeoX's.
/// Where a family keeps its tensors: Llama's names, GPT-NeoX's or GPT-2's.
struct Names {
    model: &'static str,
    embed: &'static str,
    /// Learned position embeddings (GPT-2's `wpe`).
    positions: Option<&'static str>,
    layers: &'static str,
    input_norm: &'static str,
    pre_mlp_norm: &'static str,
    final_norm: &'static str,
    attention: &'static str,
    out: &'static str,
    up: &'static str,
    down: &'static str,
}

impl Names {
    fn of(v: Variant) -> Self {
        let llama = Self {
            model: "model",
            embed: "embed_tokens",
            positions: None,
            layers: "layers",
            input_norm: "input_layernorm",
            pre_mlp_norm: "post_attention_layernorm",
            final_norm: "norm",
            attention: "self_attn",
            out: "o_proj",
            up: "up_proj",
            down: "down_proj",
        };
        if v.neox {
            Self {
                model: "gpt_neox",
                embed: "embed_in",
                final_norm: "final_layer_norm",
                attention: "attention",
                out: "dense",
                up: "dense_h_to_4h",
                down: "dense_4h_to_h",
                ..llama
            }
        } else if v.gpt2 {
            Self {
                model: "transformer",
                embed: "wte",
                positions: Some("wpe"),
                layers: "h",
                input_norm: "ln_1",
                pre_mlp_norm: "ln_2",
                final_norm: "ln_f",
                attention: "attn",
                out: "c_proj",
                up: "c_fc",
                down: "c_proj",
            }
        } else {
            llama
        }
    }
}

fn default_eps() -> f64 {
    1e-6
}

fn default_theta() -> f64 {
    10_000.0
}

/// The switches that tell the families apart.
#[derive(Debug, Clone, Copy)]
struct Variant {
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    qk_norm: bool,
    /// Gemma and Gemma2: embeddings scaled by sqrt(hidden), (1 + w) norms, the activation
    /// named by `hidden_activation` (tanh GELU when absent; `hidden_act` is not read).
    gemma: bool,
    /// Gemma2: norms after attention and MLP, soft-capped scores, `query_pre_attn_scalar`.
    gemma2: bool,
    /// Which layers use the sliding window.
    sliding: SlidingLayers,
    /// GPT-NeoX: LayerNorms, a fused query/key/value projection, partial rotary
    /// embeddings, an ungated MLP and (`use_parallel_residual`) attention and MLP both
    /// reading the layer's input.
    neox: bool,
    /// GPT-2: LayerNorms, learned positions instead of rotary ones, Conv1D projections
    /// (`[in, out]` weights) with a fused `c_attn`, an ungated MLP.
    gpt2: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlidingLayers {
    None,
    All,
    Even,
}

impl Variant {
    fn of(architecture: &str, cfg: &Config) -> Self {
        let bias = cfg.attention_bias.unwrap_or(false);
        let base = Self {
            qkv_bias: bias,
            o_bias: bias,
            mlp_bias: cfg.mlp_bias.unwrap_or(false),
            qk_norm: false,
            gemma: false,
            gemma2: false,
            sliding: SlidingLayers::None,
            neox: false,
            gpt2: false,
        };
        match architecture {
            "MistralForSequenceClassification" => Self {
                sliding: if cfg.sliding_window.is_some() {
                    SlidingLayers::All
                } else {
                    SlidingLayers::None
                },
                ..base
            },
            // transformers' eager Qwen2 attention ignores `sliding_window`, so does warm.
            "Qwen2ForSequenceClassification" => Self {
                qkv_bias: true,
                o_bias: false,
                ..base
            },
            "Qwen3ForSequenceClassification" => Self {
                qk_norm: true,
                ..base
            },
            "GemmaForSequenceClassification" => Self {
                gemma: true,
                ..base
            },
            "Gemma2ForSequenceClassification" => Self {
                gemma: true,
                gemma2: true,
                sliding: if cfg.sliding_window.is_some() {
                    SlidingLayers::Even
                } else {
                    SlidingLayers::None
                },
                ..base
            },
            "GPTNeoXForSequenceClassification" => Self {
                qkv_bias: cfg.attention_bias.unwrap_or(true),
                o_bias: cfg.attention_bias.unwrap_or(true),
                mlp_bias: true,
                neox: true,
                ..base
            },
            "GPT2ForSequenceClassification" => Self {
                qkv_bias: true,
                o_bias: true,
                mlp_bias: true,
                gpt2: true,
                ..base
            },
            _ => base,
        }
    }

    /// LayerNorms with biases in place of RMSNorms.
    fn layer_norms(self) -> bool {
        self.neox || self.gpt2
    }

    /// `down(act(up(x)))`, no gate.
    fn ungated(self) -> bool {
        self.neox || self.gpt2
    }
}

struct Layer {
    input_norm: Norm,
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Gemma2's norm of the attention output before the residual add.
    post_attn_norm: Option<RmsNorm>,
    /// Before the MLP: `post_attention_layernorm` (Llama naming) or Gemma2's
    /// `pre_feedforward_layernorm`.
    pre_mlp_norm: Norm,
    post_mlp_norm: Option<RmsNorm>,
    /// None: GPT-NeoX's ungated MLP, `down(act(up(x)))`.
    gate: Option<Dense>,
    up: Dense,
    down: Dense,
    sliding: bool,
}

pub struct DecoderModel {
    embed: Embedding,
    embed_scale: Option<f64>,
    layers: Vec<Layer>,
    norm: Norm,
    /// GPT-NeoX's `use_parallel_residual`: the MLP reads the layer's input, not the
    /// attention's output, and both are added to it.
    parallel_residual: bool,
    score: ScoreHead,
    /// None: GPT-2, whose positions are learned embeddings (`positions`).
    rotary: Option<Rotary>,
    positions: Option<Embedding>,
    act: Activation,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
    pad_id: u32,
    max_positions: usize,
    num_labels: usize,
    /// Inputs of a batch sharing at least this many first tokens compute them once (0:
    /// never).
    min_shared_prefix: usize,
}

/// The backbone of `architecture`'s family (a *ForSequenceClassification class) under
/// `head`.
pub fn load(
    architecture: &str,
    raw: &serde_json::Value,
    vb: VarBuilder,
    head: &HeadSpec,
) -> std::result::Result<Box<dyn RewardModel>, ModelError> {
    let cfg: Config = parse_config(raw)?;
    let variant = Variant::of(architecture, &cfg);
    if variant.gpt2 && cfg.scale_attn_by_inverse_layer_idx == Some(true) {
        return Err(ModelError::Config(
            "scale_attn_by_inverse_layer_idx is not supported".into(),
        ));
    }
    let head_dim = cfg
        .head_dim
        .unwrap_or(cfg.hidden_size / cfg.num_attention_heads);
    let inv_freq = if variant.gpt2 {
        None
    } else {
        Some(inv_freq(&cfg, rotary_dims(&cfg, variant, head_dim)?)?)
    };
    let intermediate = cfg.intermediate_size(variant)?;
    let shape = Shape {
        head_dim,
        intermediate,
    };
    DecoderModel::new(&cfg, variant, shape, inv_freq.as_deref(), head, vb)
        .map(|m| Box::new(m) as Box<dyn RewardModel>)
        .map_err(load_err)
}

/// Sizes derived from config.json.
#[derive(Debug, Clone, Copy)]
struct Shape {
    head_dim: usize,
    intermediate: usize,
}

/// How many of a head's channels rotary embeddings turn: all but in GPT-NeoX, where
/// `rotary_pct` of them (rounded down, as transformers does).
fn rotary_dims(
    cfg: &Config,
    variant: Variant,
    head_dim: usize,
) -> std::result::Result<usize, ModelError> {
    if !variant.neox {
        return Ok(head_dim);
    }
    // GPTNeoXConfig's default.
    let share = cfg.rotary_pct.unwrap_or(0.25);
    let dims = (head_dim as f64 * share) as usize;
    if !(0.0..=1.0).contains(&share) || dims == 0 || dims % 2 == 1 {
        return Err(ModelError::Config(format!(
            "rotary_pct {share} turns {dims} of a head's {head_dim} channels: warm needs an even number above 0"
        )));
    }
    Ok(dims)
}

/// Rotary inverse frequencies over `head_dim` rotated channels, in f32 as transformers
/// computes them, with `rope_scaling` (`linear`, `llama3`; `dynamic` equals the default
/// within max_position_embeddings).
fn inv_freq(cfg: &Config, head_dim: usize) -> std::result::Result<Vec<f32>, ModelError> {
    let base = cfg.rotary_emb_base.unwrap_or(cfg.rope_theta) as f32;
    let mut freqs: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let Some(scaling) = cfg.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
        return Ok(freqs);
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |key: &str| -> std::result::Result<f32, ModelError> {
        scaling
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| ModelError::Config(format!("rope_scaling '{kind}' needs '{key}'")))
    };
    match kind {
        "default" | "dynamic" => {}
        "linear" => {
            let factor = num("factor")?;
            freqs.iter_mut().for_each(|f| *f /= factor);
        }
        "llama3" => {
            let factor = num("factor")?;
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            let old_context = num("original_max_position_embeddings")?;
            let low_wavelen = old_context / low;
            let high_wavelen = old_context / high;
            for f in &mut freqs {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen {
                    *f / factor
                } else {
                    *f
                };
                *f = if wavelen >= high_wavelen && wavelen <= low_wavelen {
                    let smooth = (old_context / wavelen - low) / (high - low);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
        other => {
            return Err(ModelError::Config(format!(
            "rope_scaling type '{other}' is not supported (default, linear, dynamic, llama3 are)"
        )))
        }
    }
    Ok(freqs)
}

impl DecoderModel {
    fn new(
        cfg: &Config,
        v: Variant,
        shape: Shape,
        inv_freq: Option<&[f32]>,
        head: &HeadSpec,
        vb: VarBuilder,
    ) -> Result<Self> {
        let Shape {
            head_dim,
            intermediate,
        } = shape;
        let h = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
        let names = Names::of(v);
        let m = vb.pp(names.model);
        let norm = |vb: VarBuilder, size: usize| RmsNorm::load(vb, size, cfg.rms_norm_eps, v.gemma);
        // The norms every family has: LayerNorms in GPT-NeoX, RMSNorms elsewhere.
        let main_norm = |vb: VarBuilder, size: usize| -> Result<Norm> {
            if v.layer_norms() {
                let eps = cfg.layer_norm_eps.unwrap_or(DEFAULT_LAYER_NORM_EPS);
                layer_norm(vb, size, eps).map(Norm::Layer)
            } else {
                norm(vb, size).map(Norm::Rms)
            }
        };
        // GPT-2's Conv1D layers store `[in, out]` weights.
        let proj = |vb: VarBuilder, inputs: usize, outputs: usize, bias: bool| {
            if v.gpt2 {
                gpt2::conv1d(vb, inputs, outputs)
            } else {
                linear(vb, inputs, outputs, bias)
            }
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp(format!("{}.{i}", names.layers));
                let a = l.pp(names.attention);
                let mlp = l.pp("mlp");
                let [q, k, val] = if v.neox {
                    neox::split_qkv(a.pp("query_key_value"), h, heads, head_dim, v.qkv_bias)?
                } else if v.gpt2 {
                    gpt2::split_c_attn(a.pp("c_attn"), h)?
                } else {
                    [
                        linear(a.pp("q_proj"), h, heads * head_dim, v.qkv_bias)?,
                        linear(a.pp("k_proj"), h, kv_heads * head_dim, v.qkv_bias)?,
                        linear(a.pp("v_proj"), h, kv_heads * head_dim, v.qkv_bias)?,
                    ]
                };
                Ok(Layer {
                    input_norm: main_norm(l.pp(names.input_norm), h)?,
                    q,
                    k,
                    v: val,
                    o: proj(a.pp(names.out), heads * head_dim, h, v.o_bias)?,
                    q_norm: v
                        .qk_norm
                        .then(|| norm(a.pp("q_norm"), head_dim))
                        .transpose()?,
                    k_norm: v
                        .qk_norm
                        .then(|| norm(a.pp("k_norm"), head_dim))
                        .transpose()?,
                    post_attn_norm: v
                        .gemma2
                        .then(|| norm(l.pp("post_attention_layernorm"), h))
                        .transpose()?,
                    pre_mlp_norm: if v.gemma2 {
                        main_norm(l.pp("pre_feedforward_layernorm"), h)?
                    } else {
                        main_norm(l.pp(names.pre_mlp_norm), h)?
                    },
                    post_mlp_norm: v
                        .gemma2
                        .then(|| norm(l.pp("post_feedforward_layernorm"), h))
                        .transpose()?,
                    gate: (!v.ungated())
                        .then(|| linear(mlp.pp("gate_proj"), h, intermediate, v.mlp_bias))
                        .transpose()?,
                    up: proj(mlp.pp(names.up), h, intermediate, v.mlp_bias)?,
                    down: proj(mlp.pp(names.down), intermediate, h, v.mlp_bias)?,
                    sliding: match v.sliding {
                        SlidingLayers::None => false,
                        SlidingLayers::All => true,
                        SlidingLayers::Even => i % 2 == 0,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let dtype = vb.dtype();
        let device = vb.device().clone();
        // transformers' Gemma and Gemma2 MLPs read `hidden_activation` only (early Gemma
        // configs say `hidden_act: gelu`, which transformers ignores).
        let act = if v.gemma {
            cfg.hidden_activation.unwrap_or(Activation::GeluPytorchTanh)
        } else if v.neox {
            cfg.hidden_act.unwrap_or(Activation::Gelu)
        } else if v.gpt2 {
            cfg.hidden_act.unwrap_or(Activation::NewGelu)
        } else {
            cfg.hidden_act.unwrap_or(Activation::Silu)
        };
        Ok(Self {
            embed: embedding(m.pp(names.embed), cfg.vocab_size, h)?,
            embed_scale: v.gemma.then(|| (h as f64).sqrt()),
            layers,
            norm: main_norm(m.pp(names.final_norm), h)?,
            // GPTNeoXConfig's default.
            parallel_residual: v.neox && cfg.use_parallel_residual.unwrap_or(true),
            score: ScoreHead::load(vb.clone(), h, cfg.vocab_size, head)?,
            rotary: inv_freq
                .map(|f| Rotary::new(f, cfg.max_position_embeddings, dtype, &device))
                .transpose()?,
            positions: names
                .positions
                .map(|name| embedding(m.pp(name), cfg.max_position_embeddings, h))
                .transpose()?,
            act,
            heads,
            kv_heads,
            head_dim,
            scale: match (v.gemma2, cfg.query_pre_attn_scalar) {
                (true, Some(s)) => 1.0 / s.sqrt(),
                _ if v.gpt2 && cfg.scale_attn_weights == Some(false) => 1.0,
                _ => 1.0 / (head_dim as f64).sqrt(),
            },
            softcap: if v.gemma2 {
                cfg.attn_logit_softcapping
            } else {
                None
            },
            window: cfg.sliding_window,
            pad_id: cfg.pad_token_id.unwrap_or(0),
            max_positions: cfg.max_position_embeddings,
            num_labels: head.labels,
            min_shared_prefix: super::DEFAULT_MIN_SHARED_PREFIX,
        })
    }

    /// The score head's output and what was computed.
    fn forward(&self, sequences: &[&Sequence]) -> Result<(HeadOutput, Work)> {
        let device: Device = self.embed.embeddings().device().clone();
        let read = self.score.read_positions(sequences)?;
        if packed_attention::applies(&device, self.embed.embeddings().dtype()) {
            return self.forward_packed(sequences, read, &device);
        }
        if self.min_shared_prefix > 0 {
            let (segments, ids) = Segments::share_prefixes(sequences, self.min_shared_prefix);
            let shared = segments.rows_saved(sequences);
            if shared > 0 {
                return self.forward_shared_padded(&segments, ids, shared, read, &device);
            }
        }
        let batch = PaddedBatch::new(sequences, self.pad_id, &device)?;
        // Dense layers run on the real tokens only (packed rows), attention on the padded
        // layout rebuilt from them. Padding is on the right and the mask causal, so no
        // real token ever attends to a padded one.
        let packing = Packing::new(&batch.lengths, batch.seq_len, &device)?;
        let positions: Vec<usize> = batch.lengths.iter().flat_map(|&n| 0..n).collect();
        let mut x = self.embed_rows(&packing.pack(&batch.ids)?, &positions)?;
        let full_mask = causal_mask(batch.seq_len, None, &device)?;
        let window_mask = match self.window {
            Some(w) if self.layers.iter().any(|l| l.sliding) => {
                Some(causal_mask(batch.seq_len, Some(w), &device)?)
            }
            _ => None,
        };
        for layer in &self.layers {
            let mask = match (&window_mask, layer.sliding) {
                (Some(m), true) => m,
                _ => &full_mask,
            };
            x = self.layer_forward(layer, &x, mask, &packing)?;
        }
        // The packed rows are the inputs' tokens one after another: plain segments.
        let read_rows = read.map(|p| ReadRows::new(&Segments::plain(&batch.lengths), &p));
        let output = self.read_out(&x, &packing.last_rows(&x)?, read_rows)?;
        Ok((output, unshared_work(BatchLayout::Padded, sequences)))
    }

    /// The padded layout (GPU, half types) for a batch whose inputs share prompts: dense
    /// layers on the packed rows (a shared prompt's once), attention padded per segment
    /// (src/model/shared_padding.rs).
    fn forward_shared_padded(
        &self,
        segments: &Segments,
        ids: Vec<u32>,
        shared: usize,
        read: Option<Vec<Vec<usize>>>,
        device: &Device,
    ) -> Result<(HeadOutput, Work)> {
        let total = ids.len();
        tracing::debug!(
            shared,
            rows = total,
            "shared prefixes computed once (padded)"
        );
        let sliding = self.layers.iter().any(|l| l.sliding);
        let layout = SharedPadding::new(segments, self.window.filter(|_| sliding), device)?;
        tracing::trace!(
            queries = layout.padded_rows(),
            gathered = layout.gathered_rows(),
            "padded attention rows"
        );
        let positions = segments.positions();
        let rotation = match &self.rotary {
            Some(rotary) => {
                let at: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
                Some(rotary.at(&Tensor::from_vec(at, total, device)?)?)
            }
            None => None,
        };
        let heads = Heads {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale,
            softcap: self.softcap,
        };
        let mut x = self.embed_rows(&Tensor::from_vec(ids, total, device)?, &positions)?;
        for layer in &self.layers {
            x = self.shared_layer_forward(layer, &x, &layout, rotation.as_ref(), &heads)?;
        }
        let last_rows = Tensor::from_vec(segments.last_rows(), segments.inputs(), device)?;
        let last = x.index_select(&last_rows, 0)?;
        let output = self.read_out(&x, &last, read.map(|p| ReadRows::new(segments, &p)))?;
        Ok((
            output,
            Work {
                tokens: layout.padded_rows(),
                shared,
            },
        ))
    }

    /// On the CPU in f32 everything, attention included, runs on the packed rows, and a
    /// start that inputs share is packed (and computed) once.
    fn forward_packed(
        &self,
        sequences: &[&Sequence],
        read: Option<Vec<Vec<usize>>>,
        device: &Device,
    ) -> Result<(HeadOutput, Work)> {
        let (segments, ids) = Segments::share_prefixes(sequences, self.min_shared_prefix);
        let shared = segments.rows_saved(sequences);
        if shared > 0 {
            tracing::debug!(
                shared,
                rows = segments.total_rows(),
                "shared prefixes computed once"
            );
        }
        let read_rows = read.map(|p| ReadRows::new(&segments, &p));
        let rows = PackedRows::new(segments, device)?;
        let total = ids.len();
        let mut x = self.embed_rows(&Tensor::from_vec(ids, total, device)?, &rows.positions)?;
        let work = Work {
            tokens: total,
            shared,
        };
        let Some(last) = self.layers.len().checked_sub(1) else {
            let last_rows = x.index_select(&rows.last_rows, 0)?;
            return Ok((self.read_out(&x, &last_rows, read_rows)?, work));
        };
        // The last layer computes only the rows the head reads: each input's last one and,
        // for a head that reads others (where prompts end, steps), those after them.
        let selected = Selected::new(&rows, read_rows.as_ref(), device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let only = (i == last).then_some(&selected);
            x = self.packed_layer_forward(layer, &x, &rows, only)?;
        }
        let inputs = rows.segments.inputs();
        let last_rows = x.narrow(0, 0, inputs)?;
        let read = match read_rows {
            Some(ReadRows { rows, counts }) => Some((x.narrow(0, inputs, rows.len())?, counts)),
            None => None,
        };
        Ok((self.head(&last_rows, read)?, work))
    }

    /// The score head on the last rows `last` `[b, h]` and, for a head that reads them, the
    /// rows `read` of `x` `[t, h]` (where prompts end, or steps).
    fn read_out(&self, x: &Tensor, last: &Tensor, read: Option<ReadRows>) -> Result<HeadOutput> {
        let read = match read {
            Some(ReadRows { rows, counts }) => {
                let count = rows.len();
                let rows = Tensor::from_vec(rows, count, x.device())?;
                Some((x.index_select(&rows, 0)?, counts))
            }
            None => None,
        };
        self.head(last, read)
    }

    /// The score head on the last rows `last` `[b, h]` and, for a head that reads them,
    /// the rows `read` with how many are each input's (final norm not yet applied).
    fn head(&self, last: &Tensor, read: Option<(Tensor, Vec<usize>)>) -> Result<HeadOutput> {
        let read = match read {
            Some((rows, counts)) => Some((self.norm.forward(&rows)?, counts)),
            None => None,
        };
        self.score.forward(
            &self.norm.forward(last)?,
            read.as_ref()
                .map(|(rows, counts)| (rows, counts.as_slice())),
        )
    }

    /// Token embeddings of packed ids `[t]` at `positions` -> `[t, h]` (plus the position
    /// embeddings where they are learned).
    fn embed_rows(&self, ids: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let mut x = self.embed.forward(ids)?;
        if let Some(table) = &self.positions {
            let at: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
            let at = Tensor::from_vec(at, positions.len(), ids.device())?;
            x = (x + table.forward(&at)?)?;
        }
        match self.embed_scale {
            Some(scale) => {
                // Gemma and Gemma2 multiply by sqrt(hidden) rounded to the compute dtype.
                let s = Tensor::new(scale as f32, x.device())?.to_dtype(x.dtype())?;
                x.broadcast_mul(&s)
            }
            None => Ok(x),
        }
    }

    /// One layer on packed rows `[t, h]`, attention on the padded layout.
    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        mask: &Tensor,
        packing: &Packing,
    ) -> Result<Tensor> {
        let h = l.input_norm.forward(x)?;
        let heads = |t: Tensor, n: usize| split_heads(&packing.unpack(&t)?, n, self.head_dim);
        let mut q = heads(l.q.forward(&h)?, self.heads)?;
        let mut k = heads(l.k.forward(&h)?, self.kv_heads)?;
        let v = heads(l.v.forward(&h)?, self.kv_heads)?;
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (q, k) = match &self.rotary {
            Some(rotary) => (rotary.apply(&q)?, rotary.apply(&k)?),
            None => (q, k),
        };
        let mask = mask.to_dtype(DType::F32)?;
        let attn = attention(&q, &k, &v, &mask, self.scale, self.softcap)?;
        let attn = packing.pack(&attn)?;
        self.residual_and_mlp(l, x, &attn)
    }

    /// One layer on packed rows `[t, h]` whose inputs share prompts, attention padded per
    /// segment.
    fn shared_layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        layout: &SharedPadding,
        rotation: Option<&RowRotation>,
        heads: &Heads,
    ) -> Result<Tensor> {
        let h = l.input_norm.forward(x)?;
        let mut q = l.q.forward(&h)?;
        let mut k = l.k.forward(&h)?;
        let v = l.v.forward(&h)?;
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            q = per_head(qn, &q, self.head_dim)?;
            k = per_head(kn, &k, self.head_dim)?;
        }
        let (q, k) = match rotation {
            Some(rotation) => (
                rotation.apply(&q, self.head_dim)?,
                rotation.apply(&k, self.head_dim)?,
            ),
            None => (q, k),
        };
        let attn = layout.attend(&q, &k, &v, heads, l.sliding)?;
        self.residual_and_mlp(l, x, &attn)
    }

    /// One layer on packed rows `[t, h]` with attention on them as well (CPU, f32). In the
    /// last layer only the `selected` rows go on (those the score head reads): their
    /// queries, attention outputs and MLP are computed alone, while keys and values still
    /// come from every row. Returns those rows then, in the selection's order.
    fn packed_layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        rows: &PackedRows,
        selected: Option<&Selected>,
    ) -> Result<Tensor> {
        let h = l.input_norm.forward(x)?;
        let (x, q_in, q_positions, queries) = match selected {
            Some(selected) => (
                x.index_select(&selected.index, 0)?,
                h.index_select(&selected.index, 0)?,
                &selected.positions,
                selected.queries(),
            ),
            None => (x.clone(), h.clone(), &rows.positions, Queries::Every),
        };
        let mut q = l.q.forward(&q_in)?;
        let mut k = l.k.forward(&h)?;
        let v = l.v.forward(&h)?;
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            q = per_head(qn, &q, self.head_dim)?;
            k = per_head(kn, &k, self.head_dim)?;
        }
        let (q, k) = match &self.rotary {
            Some(rotary) => (
                rotary
                    .apply_packed(&q, self.head_dim, q_positions)?
                    .ok_or_else(packed_attention::refused)?,
                rotary
                    .apply_packed(&k, self.head_dim, &rows.positions)?
                    .ok_or_else(packed_attention::refused)?,
            ),
            None => (q, k),
        };
        let spec = Spec {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale as f32,
            softcap: self.softcap.map(|c| c as f32),
            keys: KeySpan::Causal {
                window: self.window.filter(|_| l.sliding),
            },
        };
        let attn = packed_attention::attend(&spec, &rows.segments, queries, &q, &k, &v)?
            .ok_or_else(packed_attention::refused)?;
        self.residual_and_mlp(l, &x, &attn)
    }

    /// The attention output projection, residual adds and MLP, on rows `x` and their
    /// attention output `attn`.
    fn residual_and_mlp(&self, l: &Layer, x: &Tensor, attn: &Tensor) -> Result<Tensor> {
        // A parallel residual's MLP reads the layer's input.
        let mlp_in = if self.parallel_residual {
            Some(l.pre_mlp_norm.forward(x)?)
        } else {
            None
        };
        // Without Gemma2's post-norms the residual add is folded into the projection.
        let x = match &l.post_attn_norm {
            Some(n) => (x + n.forward(&l.o.forward(attn)?)?)?,
            None => l.o.forward_add(attn, x)?,
        };
        let h = match mlp_in {
            Some(h) => h,
            None => l.pre_mlp_norm.forward(&x)?,
        };
        let up = l.up.forward(&h)?;
        let inner = match &l.gate {
            Some(gate) => {
                let gate = gate.forward(&h)?;
                match gated::act_mul(self.act, &gate, &up)? {
                    Some(inner) => inner,
                    None => (super::gelu::activate(self.act, &gate)? * up)?,
                }
            }
            None => super::gelu::activate(self.act, &up)?,
        };
        match &l.post_mlp_norm {
            Some(n) => x + n.forward(&l.down.forward(&inner)?)?,
            None => l.down.forward_add(&inner, &x),
        }
    }
}

/// The packed rows' segments (for attention), each row's position in its input (for
/// rotary embeddings), and each input's last row (all the score head reads).
struct PackedRows {
    segments: Segments,
    /// Of every row.
    positions: Vec<usize>,
    /// Of each input's last row, in input order.
    last_positions: Vec<usize>,
    /// Each input's last row, in input order.
    last_rows: Tensor,
}

impl PackedRows {
    fn new(segments: Segments, device: &Device) -> Result<Self> {
        let last_rows = segments.last_rows();
        let inputs = last_rows.len();
        Ok(Self {
            positions: segments.positions(),
            last_positions: segments.last_positions(),
            last_rows: Tensor::from_vec(last_rows, inputs, device)?,
            segments,
        })
    }
}

/// The rows a decoder's last layer computes: each input's last row (in input order), then
/// the rows the score head reads besides, if any.
struct Selected {
    index: Tensor,
    positions: Vec<usize>,
    /// The rows, where the head reads more than the last ones.
    rows: Option<Vec<usize>>,
}

impl Selected {
    fn new(packed: &PackedRows, read: Option<&ReadRows>, device: &Device) -> Result<Self> {
        let Some(read) = read else {
            return Ok(Self {
                index: packed.last_rows.clone(),
                positions: packed.last_positions.clone(),
                rows: None,
            });
        };
        let rows: Vec<usize> = packed
            .segments
            .last_rows()
            .into_iter()
            .chain(read.rows.iter().copied())
            .map(|row| row as usize)
            .collect();
        let index: Vec<u32> = rows.iter().map(|&row| row as u32).collect();
        Ok(Self {
            index: Tensor::from_vec(index, rows.len(), device)?,
            positions: rows.iter().map(|&row| packed.positions[row]).collect(),
            rows: Some(rows),
        })
    }

    fn queries(&self) -> Queries<'_> {
        match &self.rows {
            Some(rows) => Queries::Rows(rows),
            None => Queries::Last,
        }
    }
}

/// The rows a score head reads besides the last ones, input after input, and how many of
/// them are each input's.
struct ReadRows {
    rows: Vec<u32>,
    counts: Vec<usize>,
}

impl ReadRows {
    fn new(segments: &Segments, positions: &[Vec<usize>]) -> Self {
        Self {
            rows: segments.rows_at(positions),
            counts: positions.iter().map(Vec::len).collect(),
        }
    }
}

/// A per-head norm (Qwen3's q/k norms) on packed rows `[t, heads * head_dim]`.
fn per_head(norm: &RmsNorm, x: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (rows, width) = x.dims2()?;
    norm.forward(&x.reshape((rows * width / head_dim, head_dim))?)?
        .reshape((rows, width))
}

impl RewardModel for DecoderModel {
    fn logits(&self, sequences: &[&Sequence]) -> std::result::Result<Forward, ModelError> {
        let (output, work) = self.forward(sequences)?;
        Ok(Forward {
            logits: logits_to_rows(&output.logits)?,
            steps: output.steps,
            objectives: output.objectives.as_ref().map(logits_to_rows).transpose()?,
            work,
        })
    }

    fn max_input_length(&self) -> usize {
        self.max_positions
    }

    fn pooling(&self) -> Pooling {
        Pooling::Last
    }

    fn num_labels(&self) -> usize {
        self.num_labels
    }

    fn input_error(&self, ids: &[u32]) -> Option<String> {
        self.score.input_error(ids)
    }

    fn step_spec(&self) -> Option<&StepSpec> {
        self.score.step_spec()
    }

    fn share_prefixes_from(&mut self, tokens: usize) {
        self.min_shared_prefix = tokens;
    }

    fn batch_layout(&self) -> BatchLayout {
        let weights = self.embed.embeddings();
        let packed = packed_attention::applies(weights.device(), weights.dtype());
        let min_shared = self.min_shared_prefix;
        match (packed, min_shared > 0) {
            (false, false) => BatchLayout::Padded,
            (false, true) => BatchLayout::PaddedSharing { min_shared },
            (true, false) => BatchLayout::Packed,
            (true, true) => BatchLayout::PackedSharing { min_shared },
        }
    }
}
